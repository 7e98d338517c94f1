#!/usr/bin/env bash
#SBATCH --job-name=jqms-golden-1
#SBATCH --output=%x-%j.out
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=954M

set -euo pipefail

# 1 worker process(es) per node, 1 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 1 --memory-limit 1GB
    --job jqms-golden-1
)
host=$(hostname)
pids=()
"${worker[@]}" --host "$host" --name jqms-golden-1-0 & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
