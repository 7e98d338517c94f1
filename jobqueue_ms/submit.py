"""``jobqueue-ms submit``: one batch job that runs the MPI bootstrap, submitted and followed.

One job: validate the options into a :class:`SubmitSpec` (before anything is submitted), render
``templates/mpi-<system>.sh.j2`` with the one template engine, submit it through the system's
class (its submit, status and cancel facts and :func:`~jobqueue_ms.batch.base.run_command`), and
optionally follow it until it ends.

The job script records the launcher's exit code, which the bootstrap makes the script's (see
docs/mpi.md), in a file next to the job's output, named like it with ``.exit`` instead of
``.out``; :meth:`SubmittedJob.wait` reads it back once the queue says the job ended.

>>> spec = build_spec("slurm", __file__, nodes=2, tasks_per_node=2, schedulers=2,
...                   python="/opt/venv/bin/python", config=Config())
>>> spec.ntasks, spec.job.nodes, spec.job.threads
(4, 2, 1)
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .batch.base import BatchCluster, _ClusterSettings, ended_state
from .batch.spec import JobSpec
from .batch.units import FILTERS
from .config import Config, get_config
from .deploy import render as render_module
from .deploy.cluster import JobRecord, JobState
from .layout import min_world_size

SYSTEMS = ("slurm", "sge", "pbs", "lsf")
LAUNCHERS = ("mpiexec", "mpirun", "srun")
TEMPLATE = "mpi-{system}.sh.j2"
EXIT_SUFFIX = ".exit"
EXIT_FILE_GRACE_S = 15.0
"""How long to wait for the exit file after the queue says the job ended (shared filesystems)."""

# The [mpi] config section: how the allocation is laid out and launched.
MPI_DEFAULTS: dict[str, Any] = {
    "nodes": 1,
    "tasks_per_node": 4,
    "cpus_per_task": 1,
    "schedulers": 1,
    "launcher": "mpiexec",
    "launcher_args": [],
    "memory_limit": None,
    "workers_everywhere": False,
    "host": None,  # --host of the bootstrap: one address for every rank
    "interface": None,  # --interface of the bootstrap: looked up on each rank
}
# What a batch system's section ([slurm] ...) contributes: the rest of it (cores, processes,
# worker_extra_args...) describes the worker jobs of a BatchCluster and does not apply here.
JOB_KEYS = (
    "queue",
    "account",
    "project",
    "walltime",
    "memory",
    "job_name",
    "job_extra_directives",
    "job_directives_skip",
    "job_script_prologue",
    "job_script_epilogue",
    "python",
    "log_directory",
    "shebang",
    "pe",
    "memory_resources",
    "pbs_flavor",
    "lsf_units",
)
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class SubmitError(ValueError):
    """An option of ``jobqueue-ms submit`` that is wrong; the message names it and its form."""


@dataclass(frozen=True)
class SubmitSpec:
    """Everything one ``jobqueue-ms submit`` job is, validated.

    ``job`` is what the queue is asked for: ``nodes``, ``cores`` per node (ranks per node x
    threads), ``processes`` = MPI ranks per node, ``memory_bytes`` per node (0: the queue's
    default). The other fields say what runs inside the allocation.
    """

    system: str
    name: str
    job: JobSpec
    n_schedulers: int
    launcher: str
    launcher_command: str
    launcher_args: tuple[str, ...]
    memory_limit: str | None
    workers_everywhere: bool
    workdir: str
    script: str
    script_args: tuple[str, ...]
    host: str | None = None
    interface: str | None = None
    template_dirs: tuple[str, ...] = ()
    settings: _ClusterSettings = field(default_factory=_ClusterSettings)

    @property
    def ntasks(self) -> int:
        """MPI ranks in the whole allocation."""
        return self.job.nodes * self.job.processes

    @property
    def cluster_class(self) -> type[BatchCluster]:
        """The batch system's class: its queue commands and states."""
        return BatchCluster.for_system(self.system)


def build_spec(
    system: str | None,
    script: str | os.PathLike[str] | None,
    script_args: Sequence[str] = (),
    *,
    config: Config | None = None,
    **options: Any,
) -> SubmitSpec:
    """Validate the options of one submission, with config-file defaults, submitting nothing.

    Parameters
    ----------
    system
        ``"slurm"``, ``"sge"``, ``"pbs"`` or ``"lsf"``.
    script, script_args
        The Python script the client rank runs, and its arguments.
    config
        Settings (default: the config files and environment). ``[mpi]`` gives ``nodes``,
        ``tasks_per_node``, ``cpus_per_task``, ``schedulers``, ``launcher``, ``launcher_args``,
        ``memory_limit``, ``workers_everywhere``, ``host``, ``interface``; the system's section
        gives ``queue``, ``account``, ``walltime``, ``memory``, ``python``, ``log_directory``,
        the prologue...
    options
        The same names (a value of None is not given), plus ``prologue`` (shell lines, the
        ``job_script_prologue``), ``workdir`` and ``template_dirs``.

    Raises
    ------
    SubmitError
        A value that is missing, out of range or not in the accepted form.
    """
    try:
        return _build_spec(system, script, script_args, config, options)
    except SubmitError:
        raise
    except (TypeError, ValueError) as exc:
        raise SubmitError(str(exc)) from None


def _build_spec(
    system: str | None,
    script: str | os.PathLike[str] | None,
    script_args: Sequence[str],
    config: Config | None,
    options: Mapping[str, Any],
) -> SubmitSpec:
    if not system:
        raise SubmitError("--system is missing; use one of slurm, sge, pbs, lsf (--system slurm)")
    if system not in SYSTEMS:
        raise SubmitError(
            f"system={system!r} is not a batch system; use one of {', '.join(SYSTEMS)}"
        )
    cls = BatchCluster.for_system(system)
    config = config if config is not None else get_config()
    given = {k: v for k, v in options.items() if v is not None}
    if "prologue" in given:
        given["job_script_prologue"] = list(given.pop("prologue"))
    unknown = sorted(set(given) - set(MPI_DEFAULTS) - set(JOB_KEYS) - {"workdir", "template_dirs"})
    if unknown:
        raise TypeError(f"build_spec() got an unknown option {unknown[0]!r}")

    mpi = _mpi_options(config, {k: v for k, v in given.items() if k in MPI_DEFAULTS})
    cluster_settings, section = cls._merge_options(
        {k: v for k, v in given.items() if k in JOB_KEYS or k == "template_dirs"}, config
    )
    job_options = {k: v for k, v in section.items() if k in JOB_KEYS}
    for key in set(given) & set(JobSpec.SYSTEM_OPTIONS) - set(cls.system_options):
        raise SubmitError(f"{key}={given[key]!r} does not apply to {system}; leave it out")

    nodes = _positive("nodes", mpi["nodes"])
    tasks_per_node = _positive("tasks_per_node", mpi["tasks_per_node"])
    cpus_per_task = _positive("cpus_per_task", mpi["cpus_per_task"])
    n_schedulers = _positive("schedulers", mpi["schedulers"])
    launcher = mpi["launcher"]
    if launcher not in LAUNCHERS:
        raise SubmitError(f"launcher={launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if launcher == "srun" and system != "slurm":
        raise SubmitError(
            f"launcher='srun' needs SLURM, not {system}; use --launcher mpiexec or mpirun"
        )
    launcher_args = mpi["launcher_args"]
    if isinstance(launcher_args, str):
        launcher_args = shlex.split(launcher_args)
    if not isinstance(launcher_args, Sequence) or not all(
        isinstance(a, str) for a in launcher_args
    ):
        raise SubmitError(
            f"launcher_args={launcher_args!r} is not a list of strings; use e.g. ['--mpi=pmi2']"
        )
    workers_everywhere = mpi["workers_everywhere"]
    if not isinstance(workers_everywhere, bool):
        raise SubmitError(f"workers_everywhere={workers_everywhere!r} is not true or false")
    listen: dict[str, str | None] = {}
    for key, what, example in (("host", "an address", "10.0.0.5"), ("interface", "a name", "ib0")):
        value = mpi[key]
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise SubmitError(f"{key}={value!r} is not {what}; use e.g. --{key} {example}")
        listen[key] = value.strip() if value else None
    memory_limit = mpi["memory_limit"]
    if memory_limit is not None:
        memory_limit = render_module.memory_text(_memory_bytes("memory_limit", memory_limit))

    ntasks = nodes * tasks_per_node
    need = min_world_size(n_schedulers, workers_everywhere)
    if ntasks < need:
        extra = "" if workers_everywhere else " + at least 1 worker"
        raise SubmitError(
            f"nodes={nodes} x tasks_per_node={tasks_per_node} = {ntasks} MPI rank(s), but "
            f"{n_schedulers} scheduler(s) + 1 client{extra} need at least {need}; raise "
            f"--tasks-per-node or --nodes, or lower --schedulers"
        )

    cwd = Path.cwd()
    path = _script_path(script, cwd)
    workdir = Path(os.path.expanduser(str(given.get("workdir", cwd))))
    if not workdir.is_dir():
        raise SubmitError(f"workdir={str(workdir)!r} is not a directory; give an existing one")
    log_directory = os.path.abspath(
        os.path.expanduser(str(job_options.pop("log_directory", None) or cwd))
    )
    name = job_options.pop("job_name", None) or _default_name(path)

    # Memory is optional here (no directive: the queue's default), but JobSpec always carries
    # some; validate a given one, else a placeholder that is replaced by 0 just below.
    memory = job_options.pop("memory", None)
    spec_options = dict(
        job_options,
        cores=tasks_per_node * cpus_per_task,
        processes=tasks_per_node,
        nodes=nodes,
        memory=memory if memory is not None else 1,
        log_directory=log_directory,
        job_name=name,
    )
    job = JobSpec.from_options(
        "jobqueue-ms submit", spec_options, system_options=cls.system_options
    )
    if memory is None:
        job = replace(job, memory_bytes=0)

    settings = _ClusterSettings.from_options(cluster_settings)
    python = job.python
    launcher_command = launcher
    beside = Path(python).parent / launcher
    if launcher != "srun" and os.path.isabs(python) and os.access(beside, os.X_OK):
        launcher_command = str(beside)  # the MPI that matches this interpreter's mpi4py
    spec = SubmitSpec(
        system=system,
        name=job.job_name or name,
        job=job,
        n_schedulers=n_schedulers,
        launcher=launcher,
        launcher_command=launcher_command,
        launcher_args=tuple(launcher_args),
        memory_limit=memory_limit,
        workers_everywhere=workers_everywhere,
        workdir=str(workdir.resolve()),
        script=str(path),
        script_args=tuple(str(a) for a in script_args),
        host=listen["host"],
        interface=listen["interface"],
        template_dirs=settings.template_dirs,
        settings=settings,
    )
    render_submit_script(spec)  # a template mistake fails here, before anything is submitted
    return spec


def _mpi_options(config: Config, given: Mapping[str, Any]) -> dict[str, Any]:
    """The [mpi] section with ``given`` on top, over the defaults; unknown keys are refused."""
    merged = {**MPI_DEFAULTS, **config.options("mpi", given)}
    for key in merged:
        if key not in MPI_DEFAULTS:
            origin = config.origin("mpi", key) or "the [mpi] section"
            raise SubmitError(
                f"{origin} sets {key!r}, which jobqueue-ms submit does not know; accepted in "
                f"[mpi]: {', '.join(MPI_DEFAULTS)}"
            )
    return merged


def _positive(name: str, value: Any) -> int:
    """A whole number >= 1, from an int or its text."""
    form = f"use a positive whole number, like --{name.replace('_', '-')} 2"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SubmitError(f"{name}={value!r} is not a whole number; {form}")
    try:
        number = int(value)
    except ValueError:
        raise SubmitError(f"{name}={value!r} is not a whole number; {form}") from None
    if number < 1:
        raise SubmitError(f"{name}={value!r} must be at least 1; {form}")
    return number


def _memory_bytes(name: str, value: Any) -> int:
    from .units import parse_memory

    return parse_memory(value, parameter=name)


def _script_path(script: str | os.PathLike[str] | None, cwd: Path) -> Path:
    """The absolute path of an existing script file."""
    usage = "jobqueue-ms submit --system slurm ... my_script.py [args...]"
    if script is None or not str(script).strip():
        raise SubmitError(f"script is missing; give the Python script to run: {usage}")
    path = Path(os.path.expanduser(os.fspath(script)))
    path = path if path.is_absolute() else cwd / path
    if not path.is_file():
        raise SubmitError(
            f"script={os.fspath(script)!r}: no such file ({path}); give the path of the "
            f"Python script to run: {usage}"
        )
    return path.resolve()


def _default_name(script: Path) -> str:
    """``jqms-<script stem>``, cut to a portable job name."""
    stem = _NAME_CHARS.sub("-", script.stem).strip("-.") or "job"
    return f"jqms-{stem}"[:64]


# ---------------------------------------------------------------------------- render


def render_submit_script(spec: SubmitSpec) -> str:
    """Render the job script of ``spec`` from ``mpi-<system>.sh.j2``; pure, submits nothing."""
    cls = spec.cluster_class
    context = {
        "job": spec.job,
        "name": spec.name,
        "directive_prefix": cls.directive_prefix,
        "ntasks": spec.ntasks,
        "launcher": spec.launcher,
        "launcher_command": spec.launcher_command,
        "launcher_args": list(spec.launcher_args),
        "n_schedulers": spec.n_schedulers,
        "memory_limit": spec.memory_limit,
        "workers_everywhere": spec.workers_everywhere,
        "host": spec.host,
        "interface": spec.interface,
        "workdir": spec.workdir,
        "script": spec.script,
        "script_args": list(spec.script_args),
    }
    return render_module.render(
        TEMPLATE.format(system=spec.system),
        context,
        template_dirs=spec.template_dirs,
        filters=FILTERS,
    )


# ---------------------------------------------------------------------------- submit and follow


@dataclass(frozen=True)
class Outcome:
    """How a followed job ended: the queue's state and the script's exit code."""

    state: JobState
    exit_code: int
    recorded: bool  # False: the job ended without writing its exit file (killed, lost)


def _queue(spec: SubmitSpec) -> BatchCluster:
    """The system's submit/poll/cancel mechanism for one job, without starting a cluster."""
    return spec.cluster_class.queue_only(
        spec.settings, spec.job, spec.job.log_directory or spec.workdir
    )


class SubmittedJob:
    """One submitted job: its id, where its output and exit code go, its state."""

    def __init__(self, spec: SubmitSpec, queue: BatchCluster, record: JobRecord) -> None:
        self.spec = spec
        self.record = record
        self._queue = queue

    @property
    def job_id(self) -> str:
        return self.record.job_id

    @property
    def log_path(self) -> Path:
        """The job's output file, where the queue writes it."""
        return Path(self.record.log_path or "")

    @property
    def exit_path(self) -> Path:
        """The file the job script writes the script's exit code to."""
        return self.log_path.with_suffix(EXIT_SUFFIX)

    @property
    def cancel_command(self) -> str:
        """How to cancel this job by hand."""
        return shlex.join([*self.spec.cluster_class.cancel_cmd, self.job_id])

    def poll(self) -> JobState:
        """Ask the queue once."""
        state = self._queue._poll([self.record]).get(self.job_id, JobState.UNKNOWN)
        self.record.state = state
        return state

    def cancel(self) -> None:
        """Cancel the job (an already finished job is not an error)."""
        self._queue._cancel([self.record])

    def exit_code(self) -> int | None:
        """The script's exit code, once the job recorded it."""
        try:
            text = self.exit_path.read_text().strip()
        except OSError:
            return None
        return int(text) if re.fullmatch(r"-?\d+", text) else None

    def output(self) -> str | None:
        """The job's output, or None where the queue did not write it (yet)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return None

    def wait(
        self,
        *,
        poll_interval: float | None = None,
        on_state: Callable[[JobState], None] | None = None,
    ) -> Outcome:
        """Poll the queue until the job ends; return its state and the script's exit code.

        Done when the queue says the job ended, or when it no longer knows the job and the exit
        code is recorded. A job that ended without recording one (cancelled, out of walltime,
        lost) gives exit code 1.
        """
        interval = poll_interval or self.spec.settings.poll_interval_s
        last: JobState | None = None
        while True:
            state = self.poll()
            if state != last and on_state is not None:
                on_state(state)
            last = state
            code = self.exit_code()
            if state.finished or (state is JobState.UNKNOWN and code is not None):
                break
            time.sleep(interval)  # between queue commands; the queue is the clock here
        deadline = time.monotonic() + EXIT_FILE_GRACE_S
        while code is None and state in (JobState.COMPLETED, JobState.FAILED):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)  # the exit file may reach this host's view of a shared FS late
            code = self.exit_code()
        if code is None:
            return Outcome(state, 1, recorded=False)
        if state is JobState.UNKNOWN:  # left the queue before it said how: the code tells
            state = ended_state(code, None, None)
        return Outcome(state, code, recorded=True)


def submit(spec: SubmitSpec) -> SubmittedJob:
    """Render and submit ``spec``'s job script; the id is known when this returns.

    Raises
    ------
    jobqueue_ms.batch.base.CommandError
        The submit command failed or printed no job id.
    """
    script = render_submit_script(spec)
    queue = _queue(spec)
    cls = spec.cluster_class
    log_directory = Path(spec.job.log_directory or spec.workdir)
    log_directory.mkdir(parents=True, exist_ok=True)  # the queues write there but do not create it
    if "{job_id}" not in cls.log_name:
        # The output and exit file are named without the job id (PBS): an earlier job's must
        # not pass for this one's.
        stale = log_directory / cls.log_name.format(name=spec.name, job_id="", index=0)
        stale.unlink(missing_ok=True)
        stale.with_suffix(EXIT_SUFFIX).unlink(missing_ok=True)
    record = JobRecord(name=spec.name)
    queue._submit_script(record, script, spec.job)
    return SubmittedJob(spec, queue, record)
