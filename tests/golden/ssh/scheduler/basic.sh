#!/usr/bin/env bash
# jobqueue-ms SSH scheduler job scheduler-0 on node1
set -euo pipefail

# prologue
module load gcc/12

# 1 scheduler process(es), listening on 10.0.0.1.
pids=()
/opt/venv/bin/python -m jobqueue_ms scheduler --host 10.0.0.1 --port 0 --scheduler-file /tmp/jqms-ab12/scheduler-0.json --cluster-id ab12 & pids+=($!)

# Wait for every process; the launch fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
echo "$status" > /tmp/jqms-ab12/scheduler-0.exit
exit "$status"
