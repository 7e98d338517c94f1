#!/usr/bin/env bash
#BSUB -J jqms-work
#BSUB -o /scratch/logs/jqms-work-%J.out
#BSUB -n 8
#BSUB -R "span[ptile=4]"
#BSUB -M 8388608
#BSUB -W 00:20

set -euo pipefail

cd /home/me/project
# The script's exit code goes here, so `jobqueue-ms submit --wait` can return it.
exit_file="/scratch/logs/jqms-work-${LSB_JOBID}.exit"

# 8 MPI rank(s): 2 scheduler(s), 1 client running the script, the rest workers.
status=0
mpiexec -n 8 \
    /opt/venv/bin/python -m jobqueue_ms.mpi --schedulers 2 --threads-per-worker 1 \
    /home/me/project/work.py --steps 10 'a b' || status=$?
echo "$status" >"$exit_file.tmp" && mv -f "$exit_file.tmp" "$exit_file"
exit "$status"
