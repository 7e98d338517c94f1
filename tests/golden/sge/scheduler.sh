#!/usr/bin/env bash
#$ -N jqms-golden-scheduler
#$ -S /bin/bash
#$ -cwd
#$ -j y
#$ -o $JOB_NAME-$JOB_ID.out
#$ -pe smp 3
#$ -l h_vmem=1366M,mem_free=1366M

set -euo pipefail

# 3 scheduler(s); each writes its address to its scheduler file.
pids=()
/opt/venv/bin/python -m jobqueue_ms scheduler --interface ib0 --port 0 --scheduler-file /shared/jqms/jqms-golden-scheduler/sched-0.json --keyfile KEYFILE & pids+=($!)
/opt/venv/bin/python -m jobqueue_ms scheduler --interface ib0 --port 0 --scheduler-file /shared/jqms/jqms-golden-scheduler/sched-1.json --keyfile KEYFILE & pids+=($!)
/opt/venv/bin/python -m jobqueue_ms scheduler --interface ib0 --port 0 --scheduler-file /shared/jqms/jqms-golden-scheduler/sched-2.json --keyfile KEYFILE & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
