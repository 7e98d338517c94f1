#!/usr/bin/env bash
#PBS -N jqms-golden-scheduler
#PBS -S /bin/bash
#PBS -j oe
#PBS -o jqms-golden-scheduler.out
#PBS -l select=1:ncpus=1:mem=8gb

set -euo pipefail

# 1 scheduler(s); each writes its address to its scheduler file.
host=$(hostname)
pids=()
/opt/venv/bin/python -m jobqueue_ms scheduler --host "$host" --port 0 --scheduler-file /shared/jqms/jqms-golden-scheduler/sched-0.json --keyfile KEYFILE & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
