#!/usr/bin/env bash
#BSUB -J jqms-golden-1[1-4]
#BSUB -o jqms-golden-1-%J.%I.out
#BSUB -n 4
#BSUB -R "span[hosts=1]"
#BSUB -M 8388608

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
first=$(( (LSB_JOBINDEX - 1) * 1 ))
host=$(hostname)
pids=()
"${worker[@]}" --host "$host" --name "jqms-golden-1-$((first + 0))" & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
