#!/usr/bin/env bash
#BSUB -J jqms-golden-1
#BSUB -o jqms-golden-1-%J.out
#BSUB -n 1
#BSUB -R "span[hosts=1]"
#BSUB -M 1431
#BSUB -W 00:02

set -euo pipefail

# 1 worker process(es) per node, 1 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 1 --memory-limit 1500MB
    --job jqms-golden-1 --lifetime 81s
)
host=$(hostname)
pids=()
"${worker[@]}" --host "$host" --name jqms-golden-1-0 & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
