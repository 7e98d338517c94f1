#!/usr/bin/env bash
#SBATCH --job-name=jqms-golden-1
#SBATCH --output=%x-%A_%a.out
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=2048M
#SBATCH --array=0-2

set -euo pipefail

# 1 worker process(es) per node, 2 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 2 --memory-limit 2GiB
    --job jqms-golden-1
)
# Job array: the workers of task i are numbered from i * 2.
first=$(( (SLURM_ARRAY_TASK_ID) * 2 ))
host=$(hostname)
pids=()
# One srun task per worker, 1 per node on 2 nodes; SLURM_PROCID numbers them.
srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=2 \
    bash -c 'exec "${@:2}" --host "$(hostname)" --name "jqms-golden-1-$(($1 + SLURM_PROCID))"' worker "$first" "${worker[@]}" & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
