#!/usr/bin/env bash
#SBATCH --job-name=jqms-work
#SBATCH --output=/scratch/logs/%x-%j.out
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=1
#SBATCH --time=00:20:00

set -euo pipefail

cd /home/me/project
# The script's exit code goes here, so `jobqueue-ms submit --wait` can return it.
exit_file="/scratch/logs/jqms-work-${SLURM_JOB_ID}.exit"

# 8 MPI rank(s): 2 scheduler(s), 1 client running the script, the rest workers.
status=0
mpiexec -n 8 \
    /opt/venv/bin/python -m jobqueue_ms.mpi --schedulers 2 --threads-per-worker 1 \
    /home/me/project/work.py --steps 10 'a b' || status=$?
echo "$status" >"$exit_file.tmp" && mv -f "$exit_file.tmp" "$exit_file"
exit "$status"
