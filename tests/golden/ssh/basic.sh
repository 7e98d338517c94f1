#!/usr/bin/env bash
# jobqueue-ms SSH job jqms-golden-N on 10.1.0.7
set -euo pipefail

# 2 worker process(es), data port on 10.1.0.7.
pids=()
/opt/venv/bin/python -m jobqueue_ms worker --scheduler tcp://10.1.0.5:40123 --scheduler tcp://10.1.0.5:40125 --nthreads 4 --memory-limit 4294967296 --name jqms-golden-N-0 --job jqms-golden-N --host 10.1.0.7 & pids+=($!)
/opt/venv/bin/python -m jobqueue_ms worker --scheduler tcp://10.1.0.5:40123 --scheduler tcp://10.1.0.5:40125 --nthreads 4 --memory-limit 4294967296 --name jqms-golden-N-1 --job jqms-golden-N --host 10.1.0.7 & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
echo "$status" > /tmp/jqms-golden/jqms-golden-N.exit
exit "$status"
