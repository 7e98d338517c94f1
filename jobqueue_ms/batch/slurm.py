"""SLURM: sbatch / squeue / scancel, with scontrol and sacct for jobs that left squeue."""

from __future__ import annotations

import re

from ..deploy.cluster import JobState
from .base import BatchCluster, CommandError, Observation, run_command

# squeue(1), "JOB STATE CODES". A job that waits for nodes to boot (CONFIGURING) or is suspended
# has no worker doing work yet, so it counts as pending; COMPLETING is still running its epilogue.
SLURM_STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.PENDING,
    "STOPPED": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT,
    "DEADLINE": JobState.TIMEOUT,
    "FAILED": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
}

# slurmstepd's last words in a job's output, for a job that left the controller before we asked.
_LOG_ENDINGS = (
    (
        re.compile(r"\*\*\* JOB \d+ ON \S+ CANCELLED AT .* DUE TO TIME LIMIT \*\*\*"),
        JobState.TIMEOUT,
    ),
    (re.compile(r"\*\*\* JOB \d+ ON \S+ CANCELLED AT "), JobState.CANCELLED),
)


class SLURMCluster(BatchCluster):
    """Workers in SLURM jobs: sbatch / squeue / scancel.

    ``cores`` and ``memory`` are per node. With ``nodes=N`` one job spans N nodes and starts
    ``processes`` workers on each through ``srun --ntasks-per-node``.

    Examples
    --------
    >>> from jobqueue_ms import Client, SLURMCluster
    >>> cluster = SLURMCluster(cores=8, memory="16GiB", walltime="01:00:00",
    ...                        queue="normal", account="proj")       # doctest: +SKIP
    >>> cluster.scale(jobs=10)                                      # doctest: +SKIP
    >>> client = Client(cluster)                                    # doctest: +SKIP
    """

    system = "slurm"
    template = "slurm.sh.j2"
    directive_prefix = "#SBATCH"
    submit_cmd = ("sbatch", "--parsable")
    status_cmd = ("squeue", "--noheader", "--format=%i %T", "--states=all")
    cancel_cmd = ("scancel",)
    cancel_by_name_cmd = ("scancel", "--name")
    # `--parsable` prints "123" or "123;cluster"; without it sbatch says "Submitted batch job 123".
    job_id_pattern = r"^(?:Submitted batch job )?(?P<job_id>\d+)(?:;\S+)?\s*$"
    states = SLURM_STATES
    log_name = "{name}-{job_id}.out"
    array_log_name = "{name}-{job_id}_{index}.out"
    # squeue exits 1 with this when every id it was given has left the controller.
    unknown_id_pattern = r"Invalid job id specified"
    multi_node = True  # slurm.sh.j2 starts the workers of every node with srun
    # Set once sacct said "Slurm accounting storage is disabled", so it is not asked again.
    _no_accounting = False

    def _status_argv(self, ids: list[str]) -> list[str]:
        """squeue takes one comma-separated --jobs list."""
        return [*self.status_cmd, f"--jobs={','.join(ids)}"]

    def _parse_status(self, stdout: str) -> dict[str, list[Observation]]:
        """Lines ``123 RUNNING``; array tasks ``123_4 RUNNING`` and ``123_[5-9] PENDING``."""
        observed: dict[str, list[Observation]] = {}
        for line in stdout.splitlines():
            words = line.split()
            if len(words) >= 2:
                job_id = words[0].split("_", 1)[0]
                observed.setdefault(job_id, []).append(Observation(words[1]))
        return observed

    def _observe_finished(self, ids: list[str]) -> dict[str, list[Observation]]:
        """Jobs that left squeue: ``scontrol show job`` (until MinJobAge), then ``sacct``."""
        observed: dict[str, list[Observation]] = {}
        timeout = self.settings.command_timeout_s
        for job_id in ids:
            try:
                text = run_command(["scontrol", "show", "job", job_id], timeout=timeout).stdout
            except CommandError:
                text = ""
            found = re.findall(r"\bJobState=(\S+)", text)
            if not found and not self._no_accounting:
                try:
                    text = run_command(
                        [
                            "sacct",
                            "--noheader",
                            "--parsable2",
                            "--allocations",
                            "--format=JobID,State",
                            f"--jobs={job_id}",
                        ],
                        timeout=timeout,
                    ).stdout
                except CommandError as exc:
                    # "Slurm accounting storage is disabled": do not ask again.
                    self._no_accounting = "disabled" in exc.stderr + exc.stdout
                    text = ""
                # sacct says "CANCELLED by 1000"; the first word is the state.
                found = [
                    line.split("|")[1].split()[0]
                    for line in text.splitlines()
                    if line.count("|") >= 1 and line.split("|")[1].strip()
                ]
            if found:
                observed[job_id] = [Observation(state) for state in found]
        return observed

    def _state_from_log(self, log_tail: str) -> JobState | None:
        """slurmstepd writes ``*** JOB 5 ON n1 CANCELLED AT ... DUE TO TIME LIMIT ***``."""
        for pattern, state in _LOG_ENDINGS:
            if pattern.search(log_tail):
                return state
        return None
