#!/bin/bash
# Example: run a jobqueue-ms deployment and your script inside ONE SLURM allocation.
# 2 nodes x 4 tasks = 8 ranks: ranks 0-1 schedulers, rank 2 runs my_script.py, ranks 3-7 workers.
# Submit with: sbatch scripts/example-sbatch-mpi.sh my_script.py --my-arg 1
#SBATCH --job-name=jqms-mpi
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=2
#SBATCH --mem-per-cpu=2G
#SBATCH --time=00:20:00
#SBATCH --output=jqms-mpi-%j.out
##SBATCH --partition=debug
##SBATCH --account=myproject

set -euo pipefail

# module load openmpi            # site-specific; or a venv with `pip install mpi4py mpich`
source "${VENV:-$HOME/venvs/jqms}/bin/activate"

SCRIPT=${1:?usage: sbatch example-sbatch-mpi.sh script.py [args...]}
shift

# Where ranks listen: by default the hostname's address (a routable interface's when the
# hostname resolves to loopback). To pick a network, add `--interface ib0` to the command
# below: each rank looks up that interface's address on its own node.

# Either launcher works; pick the one your MPI supports:
#   srun --mpi=pmi2 (PyPI/apt MPICH)  |  srun --mpi=pmix (Open MPI)  |  mpiexec -n "$SLURM_NTASKS"
# Since SLURM 22.05 srun no longer takes --cpus-per-task from the allocation: pass it on.
srun --mpi=pmi2 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" python -m jobqueue_ms.mpi \
    --schedulers 2 \
    --threads-per-worker "${SLURM_CPUS_PER_TASK:-1}" \
    --memory-limit 3GiB \
    "$SCRIPT" "$@"
# The job's exit code is the script's.
