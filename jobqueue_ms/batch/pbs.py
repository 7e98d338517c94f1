"""PBS Pro / OpenPBS and Torque: qsub / qstat -f / qdel."""

from __future__ import annotations

import re

from ..deploy.cluster import JobState
from .base import BatchCluster, CommandError, Observation, ended_state
from .spec import JobSpec, SystemOption, one_of

# qstat(1B) (PBS Pro) and qstat(1) (Torque), "job_state". An array job is B (begun) while any
# subjob runs; X is an ended subjob, F an ended job (PBS Pro, with -x), C an ended job (Torque).
# How an ended job ended comes from its exit status (see _classify).
PBS_STATES: dict[str, JobState] = {
    "Q": JobState.PENDING,
    "H": JobState.PENDING,
    "W": JobState.PENDING,
    "T": JobState.PENDING,
    "S": JobState.PENDING,
    "U": JobState.PENDING,
    "M": JobState.UNKNOWN,  # moved to another server
    "R": JobState.RUNNING,
    "B": JobState.RUNNING,
    "E": JobState.RUNNING,  # exiting: still ending
    "F": JobState.COMPLETED,
    "X": JobState.COMPLETED,
    "C": JobState.COMPLETED,
}
_ENDED = frozenset({"F", "X", "C"})
# PBS Pro's JOB_EXEC_KILL_WALLTIME (pbs_job_exit_status): the server killed it at its walltime.
_PBS_PRO_KILL_WALLTIME = -29
# PBS qstat exits with the PBS error number modulo 256; 153 is PBSE_UNKJOBID (15001).
_UNKNOWN_JOB_EXIT = 153


class PBSCluster(BatchCluster):
    """Workers in PBS jobs: qsub / qstat / qdel, for PBS Pro / OpenPBS or Torque.

    ``pbs_flavor="pro"`` (default) asks ``-l select=N:ncpus=C:mem=M`` (one chunk per node,
    ``place=scatter``) and numbers arrays with ``-J``; ``pbs_flavor="torque"`` asks
    ``-l nodes=N:ppn=C,mem=N*M`` and uses ``-t``. With ``nodes=N > 1`` the job starts
    ``processes`` workers on each node through ``pbsdsh``.

    Examples
    --------
    >>> from jobqueue_ms import PBSCluster
    >>> cluster = PBSCluster(cores=24, memory="100GB", walltime="02:00:00",
    ...                      queue="regular", account="proj")        # doctest: +SKIP
    """

    system = "pbs"
    template = "pbs.sh.j2"
    directive_prefix = "#PBS"
    submit_cmd = ("qsub",)
    status_cmd = ("qstat", "-f")
    cancel_cmd = ("qdel",)
    # "123.server" (PBS Pro, Torque "123.host.domain"), "123[].server" for an array, or a bare
    # id; the server suffix stays part of the id, as qstat and qdel want it.
    job_id_pattern = r"^(?P<job_id>\d+(?:\[\])?(?:\.[A-Za-z0-9_.-]+)?)\s*$"
    states = PBS_STATES
    log_name = "{name}.out"
    array_log_name = "{name}.{index}.out"  # PBS Pro: -o <name>.^array_index^.out
    # Torque has no index placeholder in -o: it appends "-<index>" to the path of every subjob
    # (job_clone() in Torque's src/server/job_func.c), so -o <name>.out gives <name>.out-0.
    torque_array_log_name = "{name}.out-{index}"
    system_options = {"pbs_flavor": SystemOption("pro", one_of("pro", "torque"))}
    multi_node = True  # pbs.sh.j2 starts the workers of every node with pbsdsh
    unknown_id_pattern = r"Unknown Job Id"

    def _status_argv(self, ids: list[str]) -> list[str]:
        """PBS Pro shows ended jobs only with ``-x``; arrays list their subjobs with ``-t``."""
        argv = list(self.status_cmd)
        if self.spec.pbs_flavor == "pro":
            argv.append("-x")
        if self.spec.job_array > 1:
            argv.append("-t")
        return [*argv, *ids]

    def _partial_answer(self, error: CommandError) -> bool:
        """qstat exits 153 when one of the ids is unknown, after printing the known ones."""
        return error.returncode == _UNKNOWN_JOB_EXIT or super()._partial_answer(error)

    def _parse_status(self, stdout: str) -> dict[str, list[Observation]]:
        """``qstat -f`` blocks: ``Job Id: 123.server`` then ``key = value`` lines.

        Ids are matched on their number, so ``123.server`` is found whether qstat prints the
        short or the full server name; subjobs ``123[4].server`` count for ``123[].server``.
        """
        observed: dict[str, list[Observation]] = {}
        for block in re.split(r"^Job Id:\s*", stdout, flags=re.MULTILINE)[1:]:
            lines = block.splitlines()
            fields: dict[str, str] = {}
            for line in lines[1:]:
                key, sep, value = line.strip().partition(" = ")
                if sep:
                    fields[key.lower()] = value.strip()
            state = fields.get("job_state")
            if state is None:
                continue
            exit_text = fields.get("exit_status")
            observed.setdefault(_number(lines[0].strip()), []).append(
                Observation(
                    state,
                    exit_code=int(exit_text) if exit_text and _is_int(exit_text) else None,
                    elapsed_s=_hms(fields.get("resources_used.walltime")),
                )
            )
        return observed

    def _observe(self, ids: list[str]) -> dict[str, list[Observation]]:
        """Map the numbers qstat printed back to the ids qsub gave."""
        by_number = super()._observe(ids)
        return {
            job_id: by_number[_number(job_id)] for job_id in ids if _number(job_id) in by_number
        }

    def _classify(self, observation: Observation) -> JobState:
        """Ended jobs by exit status; an ended job with none shown counts as completed."""
        if observation.state not in _ENDED or observation.exit_code is None:
            return super()._classify(observation)
        if observation.exit_code == _PBS_PRO_KILL_WALLTIME:
            return JobState.TIMEOUT
        if observation.exit_code < 0:  # the job could not start (JOB_EXEC_* codes)
            return JobState.FAILED
        return ended_state(observation.exit_code, observation.elapsed_s, self.spec.walltime_s)

    def _first_array_index(self, spec: JobSpec) -> int:
        return 0  # -J 0-(n-1) / -t 0-(n-1)

    def _log_pattern(self, spec: JobSpec) -> str:
        """Torque names an array task's log after the ``-o`` path, with ``-<index>`` appended."""
        if spec.job_array > 1 and spec.pbs_flavor == "torque":
            return self.torque_array_log_name
        return super()._log_pattern(spec)


def _number(job_id: str) -> str:
    """``123.server`` -> ``123``; ``123[4].server`` and ``123[].server`` -> ``123[]``."""
    match = re.match(r"(\d+)(\[\d*\])?", job_id)
    if match is None:
        return job_id
    return match.group(1) + ("[]" if match.group(2) else "")


def _is_int(text: str) -> bool:
    return re.fullmatch(r"-?\d+", text) is not None


def _hms(text: str | None) -> float | None:
    """``01:02:03`` -> 3723.0."""
    if not text or not re.fullmatch(r"\d+:\d{2}:\d{2}", text):
        return None
    hours, minutes, seconds = (int(part) for part in text.split(":"))
    return float(hours * 3600 + minutes * 60 + seconds)
