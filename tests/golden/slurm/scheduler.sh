#!/usr/bin/env bash
#SBATCH --job-name=jqms-golden-scheduler
#SBATCH --output=%x-%j.out
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=4096M
#SBATCH --time=12:00:00

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
