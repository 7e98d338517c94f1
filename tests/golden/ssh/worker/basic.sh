#!/usr/bin/env bash
# jobqueue-ms SSH worker job jqms-ab12-1 on node1
set -euo pipefail

# 2 worker process(es), listening on 10.0.0.1.
pids=()
/opt/venv/bin/python -m jobqueue_ms worker --scheduler tcp://10.0.0.1:40001 --scheduler tcp://10.0.0.2:40002 --nthreads 2 --name jqms-ab12-1-0 --job jqms-ab12-1 --host 10.0.0.1 & pids+=($!)
/opt/venv/bin/python -m jobqueue_ms worker --scheduler tcp://10.0.0.1:40001 --scheduler tcp://10.0.0.2:40002 --nthreads 2 --name jqms-ab12-1-1 --job jqms-ab12-1 --host 10.0.0.1 & pids+=($!)

# Wait for every process; the launch fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
echo "$status" > /tmp/jqms-ab12/jqms-ab12-1.exit
exit "$status"
