#!/usr/bin/env bash
#$ -N jqms-golden-1
#$ -S /bin/bash
#$ -cwd
#$ -j y
#$ -o /scratch/logs/$JOB_NAME-$JOB_ID.out
#$ -q normal
#$ -P proj42
#$ -pe mpi-fill 8
#$ -l h_vmem=3815M,mem_free=3815M
#$ -l h_rt=02:00:00
#$ -l gpu=2
#$ --extra-directive-a
#$ --extra-directive-b

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
