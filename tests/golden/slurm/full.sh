#!/usr/bin/env bash
#SBATCH --job-name=jqms-golden-1
#SBATCH --output=/scratch/logs/%x-%j.out
#SBATCH --partition=normal
#SBATCH --account=proj42
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=2
#SBATCH --mem=30518M
#SBATCH --time=02:00:00
#SBATCH --gres=gpu:2
#SBATCH --extra-directive-a
#SBATCH --extra-directive-b

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
