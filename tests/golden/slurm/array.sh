#!/usr/bin/env bash
#SBATCH --job-name=jqms-golden-1
#SBATCH --output=%x-%A_%a.out
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=2
#SBATCH --mem=8192M
#SBATCH --array=0-4

set -euo pipefail

# 2 worker process(es) per node, 2 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 2 --memory-limit 4GiB
    --job jqms-golden-1
)
# Job array: the workers of task i are numbered from i * 2.
first=$(( (SLURM_ARRAY_TASK_ID) * 2 ))
host=$(hostname)
pids=()
"${worker[@]}" --host "$host" --name "jqms-golden-1-$((first + 0))" & pids+=($!)
"${worker[@]}" --host "$host" --name "jqms-golden-1-$((first + 1))" & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
