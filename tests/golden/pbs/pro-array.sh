#!/usr/bin/env bash
#PBS -N jqms-golden-1
#PBS -S /bin/bash
#PBS -j oe
#PBS -o jqms-golden-1.^array_index^.out
#PBS -l select=1:ncpus=4:mem=8gb
#PBS -J 0-9

set -euo pipefail

# 1 worker process(es) per node, 4 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 4 --memory-limit 8GiB
    --job jqms-golden-1
)
# Job array: the workers of task i are numbered from i * 1.
first=$(( (PBS_ARRAY_INDEX) * 1 ))
host=$(hostname)
pids=()
"${worker[@]}" --host "$host" --name "jqms-golden-1-$((first + 0))" & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
