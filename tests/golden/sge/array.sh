#!/usr/bin/env bash
#$ -N jqms-golden-1
#$ -S /bin/bash
#$ -cwd
#$ -j y
#$ -o $JOB_NAME-$JOB_ID.$TASK_ID.out
#$ -pe smp 2
#$ -l h_vmem=2G,mem_free=2G
#$ -t 1-3

set -euo pipefail

# 1 worker process(es) per node, 2 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 2 --memory-limit 4GiB
    --job jqms-golden-1
)
# Job array: the workers of task i are numbered from i * 1.
first=$(( (SGE_TASK_ID - 1) * 1 ))
host=$(hostname)
pids=()
"${worker[@]}" --host "$host" --name "jqms-golden-1-$((first + 0))" & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
