#!/usr/bin/env bash
#PBS -N jqms-golden-1
#PBS -S /bin/bash
#PBS -j oe
#PBS -o jqms-golden-1.out
#PBS -l select=3:ncpus=8:mpiprocs=1:mem=16gb
#PBS -l place=scatter

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
# 2 worker(s) on each of 3 nodes, started there by pbsdsh (PBS's task manager).
mapfile -t hosts < <(awk '!seen[$0]++' "$PBS_NODEFILE")
for ((node = 0; node < 3; node++)); do
    for ((i = 0; i < 2; i++)); do
        pbsdsh -n "$node" -- "${worker[@]}" --host "${hosts[node]}" --name "jqms-golden-1-$((node * 2 + i))" & pids+=($!)
    done
done

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
