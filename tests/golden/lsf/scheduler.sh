#!/usr/bin/env bash
#BSUB -J jqms-golden-scheduler
#BSUB -o jqms-golden-scheduler-%J.out
#BSUB -n 2
#BSUB -R "span[hosts=1]"
#BSUB -M 8388608

set -euo pipefail

# 2 scheduler(s); each writes its address to its scheduler file.
host=$(hostname)
pids=()
/opt/venv/bin/python -m jobqueue_ms scheduler --host "$host" --port 0 --scheduler-file /shared/jqms/jqms-golden-scheduler/sched-0.json --keyfile KEYFILE & pids+=($!)
/opt/venv/bin/python -m jobqueue_ms scheduler --host "$host" --port 0 --scheduler-file /shared/jqms/jqms-golden-scheduler/sched-1.json --keyfile KEYFILE & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
