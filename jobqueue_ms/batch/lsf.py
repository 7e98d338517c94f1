"""IBM Spectrum LSF: bsub (script on stdin) / bjobs / bkill."""

from __future__ import annotations

from typing import Any

from ..deploy.cluster import JobState
from .base import BatchCluster, Observation
from .spec import JobSpec, SystemOption, one_of
from .units import LSF_UNITS, read_lsf_unit

# bjobs(1), "JOB STATUS". Suspended jobs (PSUSP, USUSP, SSUSP) do no work, so they count as
# pending. EXIT is refined by the exit reason (see _classify).
LSF_STATES: dict[str, JobState] = {
    "PEND": JobState.PENDING,
    "PROV": JobState.PENDING,
    "WAIT": JobState.PENDING,
    "PSUSP": JobState.PENDING,
    "USUSP": JobState.PENDING,
    "SSUSP": JobState.PENDING,
    "RUN": JobState.RUNNING,
    "DONE": JobState.COMPLETED,
    "EXIT": JobState.FAILED,
    "ZOMBI": JobState.FAILED,
    "UNKWN": JobState.UNKNOWN,
}

# Termination reasons (bacct/bjobs -l, "TERM_*"; lsbatch.h) that are not failures.
_TIMEOUT_REASONS = ("TERM_RUNLIMIT", "TERM_DEADLINE")
_CANCEL_REASONS = ("TERM_OWNER", "TERM_ADMIN", "TERM_FORCE_OWNER", "TERM_FORCE_ADMIN")
# LSF sends SIGUSR2 at the run limit: a job that dies of it exits 128 + 12.
_RUNLIMIT_EXIT = 140


class LSFCluster(BatchCluster):
    """Workers in LSF jobs: bsub / bjobs / bkill.

    ``cores`` are ``-n`` slots on one host (``span[hosts=1]``), or with ``nodes=N > 1``
    ``-n N*cores`` slots, ``cores`` per host (``span[ptile=cores]``), whose workers ``blaunch``
    starts on each host; ``memory`` is ``-M`` in the
    site's ``LSF_UNIT_FOR_LIMITS`` (read from ``$LSF_ENVDIR/lsf.conf``, KB if unset; override
    with ``lsf_units=``); the walltime is ``-W HH:MM``.

    Examples
    --------
    >>> from jobqueue_ms import LSFCluster
    >>> cluster = LSFCluster(cores=16, memory="64GB", walltime="02:00", queue="normal",
    ...                      project="proj")                         # doctest: +SKIP
    """

    system = "lsf"
    template = "lsf.sh.j2"
    directive_prefix = "#BSUB"
    # bsub reads #BSUB directives only from a script given on stdin (bsub(1): "bsub < script").
    submit_cmd = ("bsub",)
    submit_via_stdin = True
    status_cmd = ("bjobs", "-noheader", "-o", "jobid stat exit_code exit_reason delimiter='|'")
    cancel_cmd = ("bkill",)
    cancel_by_name_cmd = ("bkill", "-J")
    job_id_pattern = r"Job <(?P<job_id>\d+)> is submitted"
    states = LSF_STATES
    log_name = "{name}-{job_id}.out"
    array_log_name = "{name}-{job_id}.{index}.out"
    # LSF_UNIT_FOR_LIMITS, the unit of -M (default: from lsf.conf, see default_options).
    system_options = {"lsf_units": SystemOption("KB", one_of(*LSF_UNITS, upper=True))}
    multi_node = True  # lsf.sh.j2 starts the workers of every host with blaunch
    # bjobs exits 255 with "Job <123> is not found" for an unknown id, after the known ones.
    unknown_id_pattern = r"Job <\d+(\[\d+\])?> is not found"

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """``lsf_units`` from the site's lsf.conf."""
        return {"lsf_units": read_lsf_unit()}

    def _parse_status(self, stdout: str) -> dict[str, list[Observation]]:
        """``123|RUN|-|-`` lines; every task of an array is a line with the array's id."""
        observed: dict[str, list[Observation]] = {}
        for line in stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 2 or not parts[0].isdigit():
                continue
            code = parts[2].strip() if len(parts) > 2 else "-"
            reason = parts[3].strip() if len(parts) > 3 else ""
            observed.setdefault(parts[0], []).append(
                Observation(
                    parts[1].strip(),
                    exit_code=int(code) if code.lstrip("-").isdigit() else None,
                    reason="" if reason == "-" else reason,
                )
            )
        return observed

    def _classify(self, observation: Observation) -> JobState:
        """EXIT: the run limit is TIMEOUT, bkill is CANCELLED, anything else FAILED."""
        if observation.state != "EXIT":
            return super()._classify(observation)
        if observation.reason.startswith(_TIMEOUT_REASONS):
            return JobState.TIMEOUT
        if observation.reason.startswith(_CANCEL_REASONS):
            return JobState.CANCELLED
        if not observation.reason and observation.exit_code == _RUNLIMIT_EXIT:
            return JobState.TIMEOUT
        return JobState.FAILED

    def _first_array_index(self, spec: JobSpec) -> int:
        return 1  # name[1-n]
