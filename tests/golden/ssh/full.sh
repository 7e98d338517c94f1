#!/usr/bin/env bash
# jobqueue-ms SSH job jqms-golden-N on 10.1.0.7
set -euo pipefail

# prologue
source /opt/venv/bin/activate
module load gcc

export OMP_NUM_THREADS=1
export SITE_NOTE='a b'

# 1 worker process(es), data port on 10.1.0.7.
pids=()
/opt/venv/bin/python -m jobqueue_ms worker --scheduler tcp://10.1.0.5:40123 --scheduler tcp://10.1.0.5:40125 --nthreads 8 --memory-limit 16000000000 --name jqms-golden-N-0 --job jqms-golden-N --lifetime 3600s --host 10.1.0.7 & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
echo "$status" > /scratch/jqms/jqms-golden/jqms-golden-N.exit
exit "$status"
