#!/usr/bin/env bash
#BSUB -J jqms-golden-1
#BSUB -o jqms-golden-1-%J.out
#BSUB -n 24
#BSUB -R "span[ptile=8]"
#BSUB -M 16777216

set -euo pipefail

# 2 worker process(es) per node, 4 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 4 --memory-limit 8GiB
    --job jqms-golden-1
)
host=$(hostname)
pids=()
# 2 worker(s) on each of 3 hosts, started there by blaunch; LSB_MCPU_HOSTS is "host slots ...".
read -ra mcpu <<< "$LSB_MCPU_HOSTS"
for ((node = 0; node < 3; node++)); do
    for ((i = 0; i < 2; i++)); do
        blaunch "${mcpu[2 * node]}" "${worker[@]}" --host "${mcpu[2 * node]}" --name "jqms-golden-1-$((node * 2 + i))" & pids+=($!)
    done
done

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
