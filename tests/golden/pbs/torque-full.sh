#!/usr/bin/env bash
#PBS -N jqms-golden-1
#PBS -S /bin/bash
#PBS -j oe
#PBS -o /scratch/logs/jqms-golden-1.out
#PBS -q normal
#PBS -A proj42
#PBS -l nodes=1:ppn=8:gpus=2,mem=30518mb
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

# 1 worker process(es) per node, 8 thread(s) each.
worker=(
    /opt/venv/bin/python -m jobqueue_ms worker
    --scheduler tcp://10.1.0.5:40123
    --scheduler tcp://10.1.0.5:40125
    --keyfile KEYFILE
    --nthreads 8 --memory-limit 32GB
    --job jqms-golden-1 --lifetime 6900s
    --interface ib0
    --resources GPU=2
    --log-level info
)
pids=()
"${worker[@]}" --name jqms-golden-1-0 & pids+=($!)

# Wait for every process; the job fails if one of them failed.
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done

# job_script_epilogue
echo 'job done'
exit "$status"
