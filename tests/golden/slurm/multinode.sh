#!/usr/bin/env bash
#SBATCH --job-name=jqms-golden-1
#SBATCH --output=%x-%j.out
#SBATCH --nodes=3
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=4
#SBATCH --mem=16384M

set -euo pipefail

# 2 worker process(es) per node, 4 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 4 --memory-limit 8GiB
    --job jqms-golden-1
)
host=$(hostname)
pids=()
# One srun task per worker, 2 per node on 3 nodes; SLURM_PROCID numbers them.
srun --nodes=3 --ntasks-per-node=2 --cpus-per-task=4 \
    bash -c 'exec "${@:2}" --host "$(hostname)" --name "jqms-golden-1-$(($1 + SLURM_PROCID))"' worker 0 "${worker[@]}" & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
