#!/usr/bin/env bash
#PBS -N jqms-golden-1
#PBS -S /bin/bash
#PBS -j oe
#PBS -o jqms-golden-1.out
#PBS -l nodes=2:ppn=4:gpus=1,mem=16gb

set -euo pipefail

# 2 worker process(es) per node, 2 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 2 --memory-limit 4GiB
    --job jqms-golden-1
)
host=$(hostname)
pids=()
# 2 worker(s) on each of 2 nodes, started there by pbsdsh (PBS's task manager).
mapfile -t hosts < <(awk '!seen[$0]++' "$PBS_NODEFILE")
for ((node = 0; node < 2; node++)); do
    for ((i = 0; i < 2; i++)); do
        pbsdsh -h "${hosts[node]}" "${worker[@]}" --host "${hosts[node]}" --name "jqms-golden-1-$((node * 2 + i))" & pids+=($!)
    done
done

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
