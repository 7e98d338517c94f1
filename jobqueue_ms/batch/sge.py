"""Son of Grid Engine / Univa / Altair Grid Engine: qsub / qstat / qdel, qacct for ended jobs."""

from __future__ import annotations

import getpass
import re

from ..deploy.cluster import JobState
from .base import BatchCluster, CommandError, Observation, ended_state, run_command
from .spec import JobSpec, SystemOption, names, word

# qstat(1), "state": letters combine (h hold, q queued, w waiting, r running, t transferring,
# R restarted, s/S/T suspended, E error, d deletion). Suspended jobs do no work, so they count
# as pending. A job in an E state stays queued but can never run (see stuck_states).
SGE_STATES: dict[str, JobState] = {
    "qw": JobState.PENDING,
    "hqw": JobState.PENDING,
    "hRwq": JobState.PENDING,
    "Rq": JobState.PENDING,
    "r": JobState.RUNNING,
    "t": JobState.RUNNING,
    "Rr": JobState.RUNNING,
    "Rt": JobState.RUNNING,
    "s": JobState.PENDING,
    "ts": JobState.PENDING,
    "S": JobState.PENDING,
    "tS": JobState.PENDING,
    "T": JobState.PENDING,
    "tT": JobState.PENDING,
    "Rs": JobState.PENDING,
    "Rts": JobState.PENDING,
    "RS": JobState.PENDING,
    "RtS": JobState.PENDING,
    "RT": JobState.PENDING,
    "RtT": JobState.PENDING,
    "Eqw": JobState.FAILED,
    "Ehqw": JobState.FAILED,
    "EhRqw": JobState.FAILED,
    # d: qdel was called, but the job is still being deleted and its processes (workers) may
    # still run; it is not finished until it leaves qstat (qacct then tells how it ended).
    "dr": JobState.RUNNING,
    "dt": JobState.RUNNING,
    "dRr": JobState.RUNNING,
    "dRt": JobState.RUNNING,
    "ds": JobState.PENDING,
    "dS": JobState.PENDING,
    "dT": JobState.PENDING,
    "dRs": JobState.PENDING,
    "dRS": JobState.PENDING,
    "dRT": JobState.PENDING,
    # Not printed by qstat: how qacct's record of an ended job is reported (see _classify).
    "ended": JobState.COMPLETED,
}

# sge_status(5), accounting "failed" codes: 37 is "qmaster enforced h_rt, h_cpu, or h_vmem
# limit", 100 "assumedly after job" (killed while running, as qdel does).
_FAILED_LIMIT = 37
_FAILED_AFTER_JOB = 100


class SGECluster(BatchCluster):
    """Workers in Grid Engine jobs: qsub / qstat / qdel.

    ``cores`` are slots of the parallel environment ``pe`` (default ``smp``) on one host (a job is
    one host: ``nodes > 1`` is refused, ask for more jobs instead), and
    ``memory`` is asked per slot through ``memory_resources`` (default ``h_vmem`` and
    ``mem_free``), as Grid Engine multiplies it by the slots.

    Examples
    --------
    >>> from jobqueue_ms import SGECluster
    >>> cluster = SGECluster(cores=8, memory="16GiB", walltime="01:00:00",
    ...                      queue="all.q", pe="smp")                # doctest: +SKIP
    """

    system = "sge"
    template = "sge.sh.j2"
    directive_prefix = "#$"
    submit_cmd = ("qsub",)
    status_cmd = ("qstat", "-u")
    cancel_cmd = ("qdel",)
    cancel_by_name_cmd = ("qdel",)  # qdel(1) takes job names as well as ids
    # "Your job 12 ("name") has been submitted", "Your job-array 12.1-4:1 ("name") has been
    # submitted", or the bare id with -terse.
    job_id_pattern = r"^(?:Your job(?:-array)? )?(?P<job_id>\d+)(?:\.\d+-\d+:\d+)?(?:\s|$)"
    states = SGE_STATES
    log_name = "{name}-{job_id}.out"
    array_log_name = "{name}-{job_id}.{index}.out"
    system_options = {
        # The parallel environment whose slots are the cores (its allocation_rule must keep
        # them on one host, like $pe_slots).
        "pe": SystemOption("smp", word),
        # Complexes the memory per slot is asked through (h_vmem limits, mem_free schedules).
        "memory_resources": SystemOption(("h_vmem", "mem_free"), names),
    }
    stuck_states = frozenset({"Eqw", "Ehqw", "EhRqw"})
    # Starting a worker on the other hosts of a parallel job needs qrsh -inherit and a parallel
    # environment with control_slaves TRUE, which sites rarely set up for users: not portable.
    multi_node_hint = (
        "Grid Engine has no portable way to start processes on the other hosts of a parallel job"
    )

    def _status_argv(self, ids: list[str]) -> list[str]:
        """qstat takes no job list (``-j`` is the long form): ask for this user's jobs."""
        return [*self.status_cmd, getpass.getuser()]

    def _parse_status(self, stdout: str) -> dict[str, list[Observation]]:
        """The table after the dashed line: job-ID prior name user state ... [ja-task-ID]."""
        observed: dict[str, list[Observation]] = {}
        for line in stdout.splitlines():
            words = line.split()
            if len(words) >= 5 and words[0].isdigit():
                observed.setdefault(words[0], []).append(Observation(words[4]))
        return observed

    def _first_array_index(self, spec: JobSpec) -> int:
        return 1  # -t 1-n

    def _observe_finished(self, ids: list[str]) -> dict[str, list[Observation]]:
        """``qacct -j`` for jobs that left qstat (one record per array task).

        Accounting is written a few seconds after the job ends; until then the job stays
        unobserved (UNKNOWN) and is asked about again at the next poll.
        """
        observed: dict[str, list[Observation]] = {}
        for job_id in ids:
            try:
                text = run_command(
                    ["qacct", "-j", job_id], timeout=self.settings.command_timeout_s
                ).stdout
            except CommandError:
                continue
            records = [r for r in re.split(r"^=+\s*$", text, flags=re.MULTILINE) if r.strip()]
            found = [_qacct_observation(r) for r in records]
            if found:
                observed[job_id] = found
        return observed

    def _classify(self, observation: Observation) -> JobState:
        """qacct records: by ``failed`` and ``exit_status``; qstat letters: the table."""
        if observation.state != "ended":
            return super()._classify(observation)
        failed = int(observation.reason.split()[0]) if observation.reason.strip() else 0
        walltime = self.spec.walltime_s
        elapsed = observation.elapsed_s
        if failed == _FAILED_LIMIT:
            ran_out = walltime is not None and elapsed is not None and elapsed >= walltime - 1
            return JobState.TIMEOUT if ran_out else JobState.FAILED
        if failed == _FAILED_AFTER_JOB:
            return ended_state(observation.exit_code, elapsed, walltime)
        if failed:
            return JobState.FAILED
        return ended_state(observation.exit_code, elapsed, walltime)


def _qacct_observation(record: str) -> Observation:
    """One qacct record -> Observation('ended', exit_status, failed text, wallclock seconds)."""
    fields: dict[str, str] = {}
    for line in record.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            fields[key] = value.strip()
    exit_match = re.match(r"-?\d+", fields.get("exit_status", ""))
    wall_match = re.match(r"\d+(?:\.\d+)?", fields.get("ru_wallclock", ""))
    return Observation(
        "ended",
        exit_code=int(exit_match.group()) if exit_match else None,
        reason=fields.get("failed", ""),
        elapsed_s=float(wall_match.group()) if wall_match else None,
    )
