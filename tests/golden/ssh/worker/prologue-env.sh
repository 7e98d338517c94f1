#!/usr/bin/env bash
# jobqueue-ms SSH worker job jqms-ab12-2 on me@vm1
set -euo pipefail

# prologue
module load gcc/12
source /opt/venv/bin/activate

export OMP_NUM_THREADS=1
export TRICKY='it'"'"'s $HOME'

# 1 worker process(es), listening on 192.168.7.5.
pids=()
/opt/venv/bin/python -m jobqueue_ms worker --scheduler tcp://10.0.0.1:40001 --scheduler tcp://10.0.0.2:40002 --nthreads 2 --name jqms-ab12-2-0 --job jqms-ab12-2 --host 192.168.7.5 & pids+=($!)

# Wait for every process; the launch fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
echo "$status" > '/scratch/me dir/jqms-ab12/jqms-ab12-2.exit'
exit "$status"
