#!/usr/bin/env bash
#$ -N jqms-work
#$ -S /bin/bash
#$ -j y
#$ -o /scratch/logs/$JOB_NAME-$JOB_ID.out
#$ -q all.q
#$ -P p
#$ -pe mpi 16
#$ -l h_vmem=4G,mem_free=4G
#$ -l h_rt=02:00:00

set -euo pipefail

# job_script_prologue
module load openmpi

cd /home/me/project
# The script's exit code goes here, so `jobqueue-ms submit --wait` can return it.
exit_file="/scratch/logs/jqms-work-${JOB_ID}.exit"

# 8 MPI rank(s): 1 scheduler(s), 1 client running the script, the rest workers.
status=0
mpirun -n 8 \
    /opt/venv/bin/python -m jobqueue_ms.mpi --schedulers 1 --threads-per-worker 2 \
    /home/me/project/work.py --steps 10 'a b' || status=$?
echo "$status" >"$exit_file.tmp" && mv -f "$exit_file.tmp" "$exit_file"
exit "$status"
