#!/usr/bin/env bash
#PBS -N jqms-golden-1
#PBS -S /bin/bash
#PBS -j oe
#PBS -o jqms-golden-1.out
#PBS -l nodes=1:ppn=24,mem=95368mb
#PBS -l walltime=01:00:00

set -euo pipefail

# 1 worker process(es) per node, 24 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 24 --memory-limit 100GB
    --job jqms-golden-1 --lifetime 3300s
)
host=$(hostname)
pids=()
"${worker[@]}" --host "$host" --name jqms-golden-1-0 & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
