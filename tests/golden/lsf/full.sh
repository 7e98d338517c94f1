#!/usr/bin/env bash
#BSUB -J jqms-golden-1
#BSUB -o /scratch/logs/jqms-golden-1-%J.out
#BSUB -q normal
#BSUB -P proj42
#BSUB -n 8
#BSUB -R "span[hosts=1]"
#BSUB -M 30
#BSUB -W 02:00
#BSUB -gpu "num=2"
#BSUB --extra-directive-a
#BSUB --extra-directive-b

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
