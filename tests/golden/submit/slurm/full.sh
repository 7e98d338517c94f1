#!/usr/bin/env bash
#SBATCH --job-name=mpi-full
#SBATCH --output=/scratch/logs/%x-%j.out
#SBATCH --partition=normal
#SBATCH --account=proj42
#SBATCH --nodes=3
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=2
#SBATCH --mem=65536M
#SBATCH --time=1-00:00:00

set -euo pipefail

# job_script_prologue
module load mpich
export OMP_NUM_THREADS=1

cd /home/me/project
# The script's exit code goes here, so `jobqueue-ms submit --wait` can return it.
exit_file="/scratch/logs/mpi-full-${SLURM_JOB_ID}.exit"

# 12 MPI rank(s): 2 scheduler(s), 1 client running the script, the rest workers (every rank also runs a worker).
status=0
srun --cpus-per-task=2 --mpi=pmi2 --cpu-bind=none \
    /opt/venv/bin/python -m jobqueue_ms.mpi --schedulers 2 --threads-per-worker 2 --memory-limit 7GiB --workers-everywhere --interface ib0 \
    /home/me/project/work.py --steps 10 'a b' || status=$?
echo "$status" >"$exit_file.tmp" && mv -f "$exit_file.tmp" "$exit_file"
exit "$status"
