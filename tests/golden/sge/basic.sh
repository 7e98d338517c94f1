#!/usr/bin/env bash
#$ -N jqms-golden-1
#$ -S /bin/bash
#$ -cwd
#$ -j y
#$ -o $JOB_NAME-$JOB_ID.out
#$ -pe smp 8
#$ -l h_vmem=2G,mem_free=2G
#$ -l h_rt=01:00:00

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
