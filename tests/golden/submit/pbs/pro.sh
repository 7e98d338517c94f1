#!/usr/bin/env bash
#PBS -N jqms-work
#PBS -S /bin/bash
#PBS -j oe
#PBS -o /scratch/logs/jqms-work.out
#PBS -q workq
#PBS -A proj42
#PBS -l select=2:ncpus=4:mpiprocs=4:mem=95368mb
#PBS -l place=scatter
#PBS -l walltime=00:20:00

set -euo pipefail

cd /home/me/project
# The script's exit code goes here, so `jobqueue-ms submit --wait` can return it.
exit_file="/scratch/logs/jqms-work.exit"

# 8 MPI rank(s): 2 scheduler(s), 1 client running the script, the rest workers.
status=0
mpiexec -n 8 \
    /opt/venv/bin/python -m jobqueue_ms.mpi --schedulers 2 --threads-per-worker 1 \
    /home/me/project/work.py --steps 10 'a b' || status=$?
echo "$status" >"$exit_file.tmp" && mv -f "$exit_file.tmp" "$exit_file"
exit "$status"
