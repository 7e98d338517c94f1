#!/usr/bin/env bash
#PBS -N jqms-golden-1
#PBS -S /bin/bash
#PBS -j oe
#PBS -o jqms-golden-1.^array_index^.out
#PBS -l select=2:ncpus=2:mpiprocs=1:mem=2gb
#PBS -l place=scatter
#PBS -J 0-2

set -euo pipefail

# 1 worker process(es) per node, 2 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 2 --memory-limit 2GiB
    --job jqms-golden-1
    --interface ib0
)
# Job array: the workers of task i are numbered from i * 2.
first=$(( (PBS_ARRAY_INDEX) * 2 ))
pids=()
# 1 worker(s) on each of 2 nodes, started there by pbsdsh (PBS's task manager).
mapfile -t hosts < <(awk '!seen[$0]++' "$PBS_NODEFILE")
for ((node = 0; node < 2; node++)); do
    for ((i = 0; i < 1; i++)); do
        pbsdsh -n "$node" -- "${worker[@]}" --name "jqms-golden-1-$((first + node * 1 + i))" & pids+=($!)
    done
done

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
