#!/usr/bin/env bash
#PBS -N jqms-golden-1
#PBS -S /bin/bash
#PBS -j oe
#PBS -o /scratch/logs/jqms-golden-1.out
#PBS -q normal
#PBS -A proj42
#PBS -l select=1:ncpus=8:mem=30518mb:ngpus=2
#PBS -l walltime=02:00:00
#PBS --extra-directive-a
#PBS --extra-directive-b

set -euo pipefail

# job_script_prologue
source /etc/profile.d/modules.sh
module load python/3.11

# local_directory: node-local scratch, the workers' TMPDIR.
export TMPDIR='/tmp/jqms work'
mkdir -p "$TMPDIR"

# 4 worker process(es) per node, 2 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 2 --memory-limit 8GB
    --job jqms-golden-1 --lifetime 6900s
    --interface ib0
    --resources GPU=2
    --log-level info
)
pids=()
"${worker[@]}" --name jqms-golden-1-0 & pids+=($!)
"${worker[@]}" --name jqms-golden-1-1 & pids+=($!)
"${worker[@]}" --name jqms-golden-1-2 & pids+=($!)
"${worker[@]}" --name jqms-golden-1-3 & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done

# job_script_epilogue
echo 'job done'
exit "$status"
