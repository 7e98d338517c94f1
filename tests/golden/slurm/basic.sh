#!/usr/bin/env bash
#SBATCH --job-name=jqms-golden-1
#SBATCH --output=%x-%j.out
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=4
#SBATCH --mem=16384M
#SBATCH --time=01:00:00

set -euo pipefail

# 2 worker process(es) per node, 4 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 4 --memory-limit 8GiB
    --job jqms-golden-1 --lifetime 3300s
)
host=$(hostname)
pids=()
"${worker[@]}" --host "$host" --name jqms-golden-1-0 & pids+=($!)
"${worker[@]}" --host "$host" --name jqms-golden-1-1 & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
