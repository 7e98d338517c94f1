#!/usr/bin/env bash
#BSUB -J jqms-golden-1[1-3]
#BSUB -o jqms-golden-1-%J.%I.out
#BSUB -n 4
#BSUB -R "span[ptile=2]"
#BSUB -M 2097152

set -euo pipefail

# 1 worker process(es) per node, 2 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 2 --memory-limit 2GiB
    --job jqms-golden-1
)
# Job array: the workers of task i are numbered from i * 2.
first=$(( (LSB_JOBINDEX - 1) * 2 ))
host=$(hostname)
pids=()
# 1 worker(s) on each of 2 hosts, started there by blaunch; LSB_MCPU_HOSTS is "host slots ...".
read -ra mcpu <<< "$LSB_MCPU_HOSTS"
for ((node = 0; node < 2; node++)); do
    for ((i = 0; i < 1; i++)); do
        blaunch "${mcpu[2 * node]}" "${worker[@]}" --host "${mcpu[2 * node]}" --name "jqms-golden-1-$((first + node * 1 + i))" & pids+=($!)
    done
done

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
