"""BatchCluster: workers in batch jobs, and the one function every queue command goes through.

The mechanism is written once, here: validate the options into a :class:`JobSpec`, render the job
script from a template, submit it through :func:`run_command`, parse the job id, record it before
``_submit`` returns, poll many jobs with one status command, and cancel. A batch system is a
small subclass of facts (see :class:`BatchCluster`) plus one template.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..config import Config, get_config
from ..deploy import render as render_module
from ..deploy.cluster import Cluster, ClusterError, JobRecord, JobState
from ..units import parse_duration
from .spec import JobSpec, SystemOption, declare_system_options
from .units import FILTERS

log = logging.getLogger("jobqueue_ms.batch")

PLACEHOLDER_ADDRESS = "tcp://SCHEDULER:PORT"
PLACEHOLDER_SECURITY = ("--keyfile", "KEYFILE")  # a cluster's own key file, made when it starts
"""Shown in rendered scripts when no scheduler is running yet (``jobqueue-ms render``)."""

PLACEMENTS = ("local", "job")


# ---------------------------------------------------------------------------- the command seam


@dataclass(frozen=True)
class CompletedCommand:
    """A queue command that exited 0."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandError(RuntimeError):
    """A queue command failed; carries its argv, exit code, stdout and stderr.

    ``returncode`` is None when the command did not finish (timeout) and 127 when it could not be
    started (not on ``PATH``).
    """

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stdout: str,
        stderr: str,
        *,
        reason: str = "",
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        what = reason or f"exited with code {returncode}"
        lines = [f"`{shlex.join(self.argv)}` {what}"]
        for label, text in (("stdout", stdout), ("stderr", stderr)):
            text = text.strip()
            if text:
                lines.append(f"{label}: {_last_lines(text, 10)}")
        super().__init__("\n".join(lines))


def run_command(
    argv: Sequence[str], *, stdin: str | None = None, timeout: float
) -> CompletedCommand:
    """Run one queue command and return its output; raise :class:`CommandError` unless it exits 0.

    Every ``sbatch``, ``squeue``, ``qsub``, ``bjobs``... of this package goes through here.

    Parameters
    ----------
    argv
        The command and its arguments (no shell is involved).
    stdin
        Text written to the command's standard input (LSF's ``bsub`` reads the script there).
    timeout
        Seconds before the command is killed and CommandError raised.
    """
    words = [str(word) for word in argv]
    log.debug("run %s", shlex.join(words))
    try:
        proc = subprocess.run(
            words,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise CommandError(
            words,
            127,
            "",
            f"{words[0]}: command not found",
            reason=f"could not start: "
            f"{words[0]!r} is not on PATH (is this a login node of the cluster?)",
        ) from None
    except subprocess.TimeoutExpired as exc:
        raise CommandError(
            words,
            None,
            _text(exc.stdout),
            _text(exc.stderr),
            reason=f"did not finish within {timeout:g} s",
        ) from None
    if proc.returncode != 0:
        raise CommandError(words, proc.returncode, proc.stdout, proc.stderr)
    return CompletedCommand(tuple(words), proc.returncode, proc.stdout, proc.stderr)


def _text(value: str | bytes | None) -> str:
    """Output captured by a timed-out subprocess, as text."""
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _last_lines(text: str, n: int) -> str:
    """The last ``n`` lines of ``text``, joined with newlines."""
    return "\n".join(text.splitlines()[-n:])


# ---------------------------------------------------------------------------- job states


@dataclass(frozen=True)
class Observation:
    """What a queue said about one job, or one task of a job array."""

    state: str
    exit_code: int | None = None
    reason: str = ""
    elapsed_s: float | None = None


def combine_states(states: Iterable[JobState]) -> JobState:
    """One state for a job array from its tasks' states.

    Running if any task runs, else pending if any waits; once all ended: FAILED beats TIMEOUT
    beats CANCELLED beats COMPLETED.
    """
    seen = set(states)
    for state in (
        JobState.RUNNING,
        JobState.PENDING,
        JobState.UNKNOWN,
        JobState.FAILED,
        JobState.TIMEOUT,
        JobState.CANCELLED,
        JobState.COMPLETED,
    ):
        if state in seen:
            return state
    return JobState.UNKNOWN


def ended_state(
    exit_code: int | None, elapsed_s: float | None, walltime_s: float | None
) -> JobState:
    """Classify an ended job from its exit code where the queue gives no reason.

    0 is COMPLETED. Killed by a signal (128+n, or 256+n as PBS reports it) is TIMEOUT when it
    ran for its whole walltime, else CANCELLED. Anything else is FAILED.
    """
    if exit_code == 0:
        return JobState.COMPLETED
    if exit_code is not None and exit_code > 128:
        if walltime_s is not None and elapsed_s is not None and elapsed_s >= walltime_s - 1:
            return JobState.TIMEOUT
        return JobState.CANCELLED
    return JobState.FAILED


# ---------------------------------------------------------------------------- BatchCluster

_FACTS: dict[str, type | tuple[type, ...]] = {
    "system": str,
    "template": str,
    "directive_prefix": str,
    "submit_cmd": tuple,
    "status_cmd": tuple,
    "cancel_cmd": tuple,
    "job_id_pattern": str,
    "states": Mapping,
    "log_name": str,
    "array_log_name": str,
}

_SYSTEMS: dict[str, type[BatchCluster]] = {}

CLUSTER_OPTIONS = (
    "n_schedulers",
    "scheduler_placement",
    "scheduler_host",
    "scheduler_options",
    "scheduler_timeout",
    "shared_directory",
    "template",
    "template_dirs",
    "poll_interval",
    "command_timeout",
    "lost_after",
    "lifetime_stagger",
    "security",
    "key_directory",
    "keep_keys",
    "max_message_bytes",
)


@dataclass(frozen=True)
class _ClusterSettings:
    """The cluster-level options of a BatchCluster, validated."""

    n_schedulers: int = 1
    scheduler_placement: str = "local"
    scheduler_host: str | None = None
    scheduler_options: Mapping[str, Any] = field(default_factory=dict)
    scheduler_timeout_s: float = 300.0
    shared_directory: str | None = None
    template: str | None = None
    template_dirs: tuple[str, ...] = ()
    poll_interval_s: float = 5.0
    command_timeout_s: float = 60.0
    lost_after_s: float = 60.0
    lifetime_stagger_s: float | None = None
    security: Any = None  # a Security, a key file path, or None for new keys
    key_directory: str | None = None
    keep_keys: bool = False
    max_message_bytes: Any = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> _ClusterSettings:
        """Validate cluster options; errors name the parameter, value and accepted form."""
        kwargs: dict[str, Any] = {}
        if options.get("n_schedulers") is not None:
            n = options["n_schedulers"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"n_schedulers={n!r} must be a positive integer, like 2")
            kwargs["n_schedulers"] = n
        placement = options.get("scheduler_placement")
        if placement is not None:
            if placement not in PLACEMENTS:
                raise ValueError(
                    f"scheduler_placement={placement!r} is not one of 'local' (schedulers on "
                    "this machine) or 'job' (schedulers in their own batch job)"
                )
            kwargs["scheduler_placement"] = placement
        for name in ("scheduler_host", "shared_directory", "key_directory"):
            if options.get(name) is not None:
                kwargs[name] = str(options[name])
        for name in ("security", "max_message_bytes"):
            if options.get(name) is not None:
                kwargs[name] = options[name]  # validated by the Cluster base
        if options.get("keep_keys") is not None:
            if not isinstance(options["keep_keys"], bool):
                raise ValueError(f"keep_keys={options['keep_keys']!r} must be True or False")
            kwargs["keep_keys"] = options["keep_keys"]
        if options.get("template") is not None:
            # A template file is read at each submission: keep its absolute path, so a later
            # chdir does not lose it.
            source = render_module.template_source(options["template"])
            kwargs["template"] = str(source.absolute()) if isinstance(source, Path) else source
        if options.get("scheduler_options") is not None:
            value = options["scheduler_options"]
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"scheduler_options={value!r} is not a mapping; use e.g. "
                    "{'walltime': '24:00:00', 'memory': '4GiB'}"
                )
            kwargs["scheduler_options"] = dict(value)
        if options.get("template_dirs") is not None:
            dirs = options["template_dirs"]
            if isinstance(dirs, (str, os.PathLike)):
                dirs = [dirs]
            kwargs["template_dirs"] = tuple(os.fspath(d) for d in dirs)
        for name in ("scheduler_timeout", "poll_interval", "command_timeout", "lost_after"):
            if options.get(name) is not None:
                kwargs[f"{name}_s"] = _seconds(name, options[name])
        if options.get("lifetime_stagger") is not None:
            # Read like the walltime it staggers (a bare number is minutes), as Cluster does.
            kwargs["lifetime_stagger_s"] = parse_duration(
                options["lifetime_stagger"], parameter="lifetime_stagger"
            )
        return cls(**kwargs)


def _seconds(name: str, value: Any) -> float:
    """Seconds from a number (taken as seconds here) or a duration string ('30s', '5m')."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a duration; use seconds like 30 or '30s'")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"{name}={value!r} must be positive; use seconds like 30 or '30s'")
        return float(value)
    return parse_duration(value, parameter=name)


class BatchCluster(Cluster):
    """Workers in batch jobs on SLURM, SGE, PBS or LSF; one subclass per system.

    A subclass is a datasheet. It **must** declare (checked when the class is created):

    1. ``system``: the config section and ``jobqueue-ms render --system`` name (``"slurm"``);
    2. ``template``: its job script template (``"slurm.sh.j2"``);
    3. ``directive_prefix``: ``"#SBATCH"``;
    4. ``submit_cmd``, ``status_cmd``, ``cancel_cmd``: argv prefixes of the queue commands;
    5. ``job_id_pattern``: a regex with a ``job_id`` group, searched in the submit output;
    6. ``states``: native state code -> :class:`JobState`, citing the man page;
    7. ``log_name``, ``array_log_name``: the job log's file name, as the template writes it
       (``{name}``, ``{job_id}`` and ``{index}`` of the first array task are filled in).

    It **may** override, each a small named quirk:

    8. ``system_options``: its own job options, ``{name: SystemOption(default, parse)}``
       (``pe``, ``pbs_flavor``...); templates read them as ``job.<name>``;
    9. ``submit_via_stdin``: give the script on stdin instead of as a file (LSF);
    10. ``_status_argv(ids)``: how ids are passed to the status command;
    11. ``_parse_status(stdout)``: status output -> ``{job id: [Observation, ...]}``;
    12. ``_partial_answer(error)``: whether a failed status command still answered for the known
        ids (some ids were unknown) rather than failing (controller unreachable);
    13. ``_observe_finished(ids)``: ask about jobs missing from the status output;
    14. ``_classify(observation)``: native state (and exit code) -> JobState;
    15. ``stuck_states``: states in which a job stays queued but can never run (cancelled at once);
    16. ``cancel_by_name_cmd``: cancel a job by name, when its submission printed no id;
    17. ``multi_node``: whether its template starts workers on every node of a ``nodes > 1``
        job (SLURM's srun, PBS's pbsdsh, LSF's blaunch); ``multi_node_hint``: what to do
        instead where it does not (SGE);
    18. ``default_options()``: site-dependent defaults (LSF reads ``lsf.conf``);
    19. ``_log_pattern(spec)``: which of the log names applies (Torque arrays differ).

    Parameters
    ----------
    cores, memory, processes, walltime, queue, account, ...
        The job options, validated into a :class:`~jobqueue_ms.batch.spec.JobSpec`; see
        ``docs/batch.md`` for the table.
    n_schedulers
        Schedulers sharing every worker of the cluster.
    scheduler_placement
        ``"local"`` (default): scheduler processes on this machine. ``"job"``: the schedulers
        run in their own batch job, write scheduler files to ``shared_directory`` and the
        cluster reads their addresses from there.
    scheduler_host
        Address the local schedulers listen on (default: the IPv4 address of ``interface`` on
        this machine when one is given, else this host's name).
    scheduler_options
        Job options for the scheduler job (``scheduler_placement="job"``), e.g.
        ``{"walltime": "24:00:00", "memory": "4GiB"}``.
    scheduler_timeout
        How long to wait for the scheduler job's files (default 300 s).
    shared_directory
        A directory every node sees, for scheduler files (default: ``log_directory``, else
        ``~/.jobqueue-ms``).
    template
        A template file that replaces the system's template entirely.
    template_dirs
        Directories searched before the built-in templates (a file there named like a built-in
        one, e.g. ``slurm.sh.j2`` or ``base.sh.j2``, shadows it).
    poll_interval
        Seconds between two status commands (each asks about every job at once; default 5).
    command_timeout
        Seconds before a queue command is given up (default 60).
    lost_after
        Seconds a job may be missing from the queue, with no record of how it ended, before it
        counts as FAILED (default 60).
    lifetime_stagger
        Drain jobs up to this much before their workers' lifetime ends, spread out so that jobs
        started together do not all leave at once ("10m", a bare number is minutes; default: a
        tenth of the lifetime, at most 5 minutes). Only with a ``walltime``.
    config
        Settings to use instead of the config files and environment (for tests).

    Raises
    ------
    TypeError
        An option this system does not know (every option is checked before anything starts).
    ValueError
        A value out of range or not in the accepted form.
    """

    # Facts a subclass declares (see the list above).
    system: ClassVar[str]
    template: ClassVar[str]
    directive_prefix: ClassVar[str]
    submit_cmd: ClassVar[tuple[str, ...]]
    status_cmd: ClassVar[tuple[str, ...]]
    cancel_cmd: ClassVar[tuple[str, ...]]
    job_id_pattern: ClassVar[str]
    states: ClassVar[Mapping[str, JobState]]
    log_name: ClassVar[str]
    array_log_name: ClassVar[str]
    # Quirks with defaults.
    system_options: ClassVar[Mapping[str, SystemOption]] = {}
    submit_via_stdin: ClassVar[bool] = False
    unknown_id_pattern: ClassVar[str | None] = None
    stuck_states: ClassVar[frozenset[str]] = frozenset()
    cancel_by_name_cmd: ClassVar[tuple[str, ...] | None] = None
    multi_node: ClassVar[bool] = False
    multi_node_hint: ClassVar[str] = ""
    max_ids_per_command: ClassVar[int] = 200

    _job_id_re: ClassVar[re.Pattern[str]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check that every fact is declared, so a half-written backend fails at import."""
        super().__init_subclass__(**kwargs)
        for name, kind in _FACTS.items():
            value = getattr(cls, name, None)
            if value is None:
                raise TypeError(f"{cls.__name__} must declare {name} (see BatchCluster)")
            if not isinstance(value, kind):
                raise TypeError(f"{cls.__name__}.{name}={value!r} must be a {kind}")
        try:
            pattern = re.compile(cls.job_id_pattern, re.MULTILINE)
        except re.error as exc:
            raise TypeError(f"{cls.__name__}.job_id_pattern does not compile: {exc}") from None
        if "job_id" not in pattern.groupindex:
            raise TypeError(
                f"{cls.__name__}.job_id_pattern={cls.job_id_pattern!r} "
                "needs a (?P<job_id>...) group"
            )
        cls._job_id_re = pattern
        bad = {k: v for k, v in cls.states.items() if not isinstance(v, JobState)}
        if bad:
            raise TypeError(f"{cls.__name__}.states maps {bad} to something not a JobState")
        for name, option in cls.system_options.items():
            if not isinstance(option, SystemOption):
                raise TypeError(f"{cls.__name__}.system_options[{name!r}] is not a SystemOption")
            taken = set(JobSpec.COMMON_OPTIONS) | set(CLUSTER_OPTIONS) | set(vars(JobSpec))
            if name in taken:
                raise TypeError(f"{cls.__name__}.system_options[{name!r}] is a common option")
        declare_system_options(cls.system_options)
        if "system" in vars(cls):  # a site's subclass of SLURMCluster does not replace it
            _SYSTEMS[cls.system] = cls

    def __init__(
        self,
        *,
        n_schedulers: int | None = None,
        scheduler_placement: str | None = None,
        scheduler_host: str | None = None,
        scheduler_options: Mapping[str, Any] | None = None,
        scheduler_timeout: Any = None,
        shared_directory: str | None = None,
        template: str | None = None,
        template_dirs: Sequence[str] | None = None,
        poll_interval: Any = None,
        command_timeout: Any = None,
        lost_after: Any = None,
        lifetime_stagger: Any = None,
        security: Any = None,
        key_directory: str | None = None,
        keep_keys: bool | None = None,
        max_message_bytes: Any = None,
        config: Config | None = None,
        **job_options: Any,
    ) -> None:
        given = dict(
            job_options,
            n_schedulers=n_schedulers,
            scheduler_placement=scheduler_placement,
            scheduler_host=scheduler_host,
            scheduler_options=scheduler_options,
            scheduler_timeout=scheduler_timeout,
            shared_directory=shared_directory,
            template=template,
            template_dirs=template_dirs,
            poll_interval=poll_interval,
            command_timeout=command_timeout,
            lost_after=lost_after,
            lifetime_stagger=lifetime_stagger,
            security=security,
            key_directory=key_directory,
            keep_keys=keep_keys,
            max_message_bytes=max_message_bytes,
        )
        settings, options = self._merge_options(given, config)
        # Everything is validated, and the template rendered once, before anything starts.
        self.settings = _ClusterSettings.from_options(settings)
        self.job_options = options
        self.spec = self._spec_from(options)
        self.scheduler_spec = self._make_scheduler_spec()
        stagger = self.settings.lifetime_stagger_s
        lifetime = self.spec.worker_lifetime_s
        if stagger is not None and lifetime and stagger >= lifetime:
            raise ValueError(
                f"lifetime_stagger={lifetime_stagger!r} must be shorter than the workers' "
                f"lifetime ({lifetime} s, the walltime less a margin), e.g. "
                f"lifetime_stagger='{max(1, lifetime // 10)}s'"
            )
        self._check_template()
        if self.spec.log_directory:  # the queues write there but do not create it
            Path(self.spec.log_directory).expanduser().mkdir(parents=True, exist_ok=True)
        self.workers_per_job = self.spec.workers_per_job
        self.threads_per_worker = self.spec.threads
        self._vanished: dict[str, float] = {}
        self._scheduler_jobs: list[JobRecord] = []
        self._scheduler_dir: Path | None = None
        super().__init__(
            n_schedulers=self.settings.n_schedulers,
            name=self.spec.job_name,
            scheduler_host=self._scheduler_host(),
            memory_limit=self.spec.worker_memory_bytes,
            lifetime=(f"{self.spec.worker_lifetime_s}s" if self.spec.worker_lifetime_s else None),
            lifetime_stagger=f"{stagger}s" if stagger is not None and lifetime else None,
            poll_interval=f"{self.settings.poll_interval_s}s",
            # python= is the compute nodes' interpreter, in the job script; local schedulers
            # run with this one.
            security=self.settings.security,
            # the jobs read the key file: next to the scheduler files on the shared filesystem
            key_directory=self.settings.key_directory
            or (
                str(Path(self.settings.shared_directory).expanduser() / "keys")
                if self.settings.shared_directory
                else None
            ),
            keep_keys=self.settings.keep_keys,
            max_message_bytes=self.settings.max_message_bytes,
        )
        self._start()

    def _scheduler_host(self) -> str:
        """Where local schedulers listen: scheduler_host, else interface's address, else hostname.

        With ``interface=`` the workers bind to that interface of their node; local schedulers
        (``scheduler_placement="local"``) listen on its IPv4 address on this machine, so that
        the whole cluster talks over it (``ib0``). A scheduler job reads ``--interface`` itself.
        """
        if self.settings.scheduler_host:
            return self.settings.scheduler_host
        if self.spec.interface and self.settings.scheduler_placement == "local":
            return interface_address(self.spec.interface)
        return _default_scheduler_host()

    # ------------------------------------------------------------------ options
    @classmethod
    def _merge_options(
        cls, given: Mapping[str, Any], config: Config | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Config files, environment, then keywords; split into cluster and job options."""
        config = config if config is not None else get_config()
        defaults = {k: v for k, v in cls.default_options().items() if v is not None}
        merged = {**defaults, **config.options(cls.system, given)}
        cluster = {k: merged.pop(k) for k in CLUSTER_OPTIONS if k in merged}
        allowed = set(JobSpec.COMMON_OPTIONS) | set(cls.system_options)
        for key in merged:
            origin = config.origin(cls.system, key)
            if key not in allowed and origin is not None and key not in given:
                raise TypeError(
                    f"{origin} sets {key!r}, which {cls.__name__} does not know; "
                    f"accepted options: {', '.join(sorted(allowed | set(CLUSTER_OPTIONS)))}"
                )
        return cluster, merged

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """Site-dependent defaults, below the config files (quirk; LSF reads lsf.conf)."""
        return {}

    @classmethod
    def make_spec(cls, *, config: Config | None = None, **options: Any) -> JobSpec:
        """Validate job options (with the config file's) into a JobSpec, starting nothing.

        Examples
        --------
        >>> from jobqueue_ms.batch.slurm import SLURMCluster
        >>> SLURMCluster.make_spec(cores=8, memory="16GiB", config=Config()).threads
        8
        """
        _, job_options = cls._merge_options(options, config)
        return cls._spec_from(job_options)

    @classmethod
    def _spec_from(cls, options: Mapping[str, Any], owner: str | None = None) -> JobSpec:
        """Validate merged job options into a JobSpec, with this system's own limits."""
        owner = owner or cls.__name__
        spec = JobSpec.from_options(owner, options, system_options=cls.system_options)
        if spec.nodes > 1 and not cls.multi_node:
            others = [c.__name__ for c in batch_systems().values() if c.multi_node]
            raise ValueError(
                f"nodes={spec.nodes}: {cls.__name__} starts the workers of a job on one node"
                f"{' (' + cls.multi_node_hint + ')' if cls.multi_node_hint else ''}; ask for "
                f"one-node jobs instead, e.g. nodes=1 with scale(jobs={spec.nodes}) or "
                f"job_array={spec.nodes} ({', '.join(others)} start workers on every node)"
            )
        return spec

    def _make_scheduler_spec(self) -> JobSpec:
        """The scheduler job's options: the workers' with one core per scheduler, overridable."""
        options = dict(self.job_options)
        options.update(cores=self.settings.n_schedulers, processes=1, nodes=1, job_array=1, gpus=0)
        options.update(self.settings.scheduler_options)
        return self._spec_from(options, owner=f"{type(self).__name__}(scheduler_options=...)")

    def _check_template(self) -> None:
        """Render both scripts once so a template mistake fails before anything starts."""
        self.render_script(self.spec, name="check-1", **self._render_options())
        if self.settings.scheduler_placement == "job":
            self.render_script(
                self.scheduler_spec,
                name="check-scheduler",
                role="scheduler",
                scheduler_files=["/shared/sched-0.json"],
                **self._render_options(),
            )

    def _render_options(self) -> dict[str, Any]:
        return {"template": self.settings.template, "template_dirs": self.settings.template_dirs}

    # ------------------------------------------------------------------ rendering
    @classmethod
    def render_script(
        cls,
        spec: JobSpec,
        *,
        name: str,
        role: str = "worker",
        scheduler_addresses: Sequence[str] = (),
        scheduler_files: Sequence[str] = (),
        cluster_id: str | None = None,
        security_args: Sequence[str] = PLACEHOLDER_SECURITY,
        template: str | os.PathLike[str] | None = None,
        template_dirs: Sequence[str | os.PathLike[str]] = (),
    ) -> str:
        """Render the job script for one job named ``name``; pure, starts nothing.

        ``role="scheduler"`` renders the scheduler job: one scheduler per ``scheduler_files``.
        ``security_args`` (``--keyfile PATH``, never a key) go to every scheduler and worker.
        """
        context = {
            "job": spec,
            "name": name,
            "role": role,
            "directive_prefix": cls.directive_prefix,
            "scheduler_addresses": list(scheduler_addresses or [PLACEHOLDER_ADDRESS]),
            "scheduler_files": list(scheduler_files),
            "cluster_id": cluster_id,
            "security_args": list(security_args),
        }
        source = cls.template if template is None else render_module.template_source(template)
        return render_module.render(source, context, template_dirs=template_dirs, filters=FILTERS)

    def job_script(self) -> str:
        """Return exactly the script the next job will run (only its name differs per job)."""
        return self._worker_script(f"{self.unique_name}-{len(self.jobs) + 1}")

    def _worker_script(self, name: str) -> str:
        return self.render_script(
            self.spec,
            name=name,
            scheduler_addresses=self.scheduler_addresses,
            cluster_id=self.cluster_id,
            security_args=self._security_argv(),
            **self._render_options(),
        )

    # ------------------------------------------------------------------ submit
    @classmethod
    def parse_job_id(cls, stdout: str) -> str:
        """Find the job id in what the submit command printed.

        Raises
        ------
        ValueError
            The output holds no job id.
        """
        match = cls._job_id_re.search(stdout)
        if match is None:
            raise ValueError(
                f"no job id in the output of {cls.submit_cmd[0]}: {stdout.strip()!r} "
                f"(expected a match for {cls.job_id_pattern!r})"
            )
        return match.group("job_id")

    def _submit(self, record: JobRecord) -> str:
        """Submit one worker job; the id is on the record before this returns."""
        return self._submit_script(record, self._worker_script(record.name), self.spec)

    def _submit_script(self, record: JobRecord, script: str, spec: JobSpec) -> str:
        """Submit ``script`` through run_command, parse the id and record it on ``record``."""
        path = Path(self.cluster_dir) / f"{record.name}.sh"
        path.write_text(script, encoding="utf-8")
        record.info.update(system=self.system, script_path=str(path))
        timeout = self.settings.command_timeout_s
        try:
            if self.submit_via_stdin:
                result = run_command(self.submit_cmd, stdin=script, timeout=timeout)
            else:
                result = run_command([*self.submit_cmd, str(path)], timeout=timeout)
        except CommandError as exc:
            if exc.returncode is None:  # timed out: the queue may have taken the job anyway
                self._cancel_by_name(record.name)
            raise
        try:
            job_id = self.parse_job_id(result.stdout)
        except ValueError as exc:
            self._cancel_by_name(record.name)
            raise CommandError(
                result.argv, result.returncode, result.stdout, result.stderr, reason=str(exc)
            ) from None
        record.job_id = job_id  # recorded before returning, so close() can cancel it
        record.log_path = self._log_path(record.name, job_id, spec)
        record.info["submit_output"] = result.stdout.strip()
        return job_id

    def _log_path(self, name: str, job_id: str, spec: JobSpec) -> str:
        """Where the template sends the job's output (the first task's, for an array)."""
        pattern = self._log_pattern(spec)
        filename = pattern.format(name=name, job_id=job_id, index=self._first_array_index(spec))
        return str(Path(spec.log_directory or os.getcwd()) / filename)

    def _log_pattern(self, spec: JobSpec) -> str:
        """``array_log_name`` for an array, else ``log_name`` (quirk: PBS's two flavours)."""
        return self.array_log_name if spec.job_array > 1 else self.log_name

    def _first_array_index(self, spec: JobSpec) -> int:
        """The first array task's index as the system numbers it (quirk)."""
        return 0

    def _cancel_by_name(self, name: str) -> None:
        """Cancel a job whose submission printed no id, so it is not orphaned."""
        if self.cancel_by_name_cmd is None:
            log.error("job %s may be queued but its id is unknown; cancel it by hand", name)
            return
        try:
            run_command([*self.cancel_by_name_cmd, name], timeout=self.settings.command_timeout_s)
        except CommandError as exc:
            log.error("could not cancel job %s by name: %s", name, exc)

    # ------------------------------------------------------------------ poll
    def _poll(self, records: list[JobRecord]) -> dict[str, JobState]:
        """Ask the queue about every record at once; missing jobs are asked about separately."""
        ids = [r.job_id for r in records if r.job_id]
        observed: dict[str, list[Observation]] = {}
        for chunk in _chunks(ids, self.max_ids_per_command):
            try:
                observed.update(self._observe(chunk))
            except CommandError as exc:
                log.warning("could not ask the queue about jobs %s: %s", chunk, exc)
                return {job_id: JobState.UNKNOWN for job_id in ids}
        missing = [job_id for job_id in ids if not observed.get(job_id)]
        if missing:
            observed.update(self._observe_finished(missing))
        self._cancel_stuck(observed)
        by_id = {r.job_id: r for r in records}
        states: dict[str, JobState] = {}
        for job_id in ids:
            tasks = observed.get(job_id)
            if tasks:
                self._vanished.pop(job_id, None)
                states[job_id] = combine_states(self._classify(o) for o in tasks)
            else:
                states[job_id] = self._vanished_state(by_id[job_id])
        return states

    def _observe(self, ids: list[str]) -> dict[str, list[Observation]]:
        """Run the status command once for ``ids`` and parse what it printed."""
        argv = self._status_argv(ids)
        try:
            stdout = run_command(argv, timeout=self.settings.command_timeout_s).stdout
        except CommandError as exc:
            if not self._partial_answer(exc):
                raise
            stdout = exc.stdout  # the unknown ids are simply missing from it
        return self._parse_status(stdout)

    def _status_argv(self, ids: list[str]) -> list[str]:
        """The status command for these ids (quirk; default: ids as separate arguments)."""
        return [*self.status_cmd, *ids]

    def _parse_status(self, stdout: str) -> dict[str, list[Observation]]:
        """Status output -> observations by job id (quirk; default: lines of 'id state')."""
        observed: dict[str, list[Observation]] = {}
        for line in stdout.splitlines():
            words = line.split()
            if len(words) >= 2:
                observed.setdefault(words[0], []).append(Observation(words[1]))
        return observed

    def _partial_answer(self, error: CommandError) -> bool:
        """Whether a failed status command answered for the known ids (quirk)."""
        if self.unknown_id_pattern is None:
            return False
        return re.search(self.unknown_id_pattern, error.stderr + error.stdout) is not None

    def _observe_finished(self, ids: list[str]) -> dict[str, list[Observation]]:
        """Ask about jobs missing from the status output (quirk; default: nobody to ask)."""
        return {}

    def _classify(self, observation: Observation) -> JobState:
        """A native state -> JobState through the ``states`` table (quirk for exit codes)."""
        return self.states.get(observation.state, JobState.UNKNOWN)

    def _cancel_stuck(self, observed: Mapping[str, list[Observation]]) -> None:
        """Cancel jobs that sit in the queue but can never run (SGE's Eqw)."""
        stuck = [
            job_id
            for job_id, tasks in observed.items()
            if any(o.state in self.stuck_states for o in tasks)
        ]
        if stuck:
            log.warning("jobs %s are in an error state and can never run; cancelling them", stuck)
            self._cancel_ids(stuck)

    def _vanished_state(self, record: JobRecord) -> JobState:
        """A job the queue no longer knows, and nobody could say how it ended.

        UNKNOWN at first (it may show up again: a slow controller, accounting not yet written);
        after ``lost_after`` seconds it counts as FAILED, unless its log says how it ended.
        """
        first = self._vanished.setdefault(record.job_id, time.monotonic())
        from_log = self._state_from_log(self._log_tail(record))
        if from_log is not None:
            return from_log
        if time.monotonic() - first < self.settings.lost_after_s:
            return JobState.UNKNOWN
        record.info["lost"] = (
            f"job {record.job_id} left the queue and no command knows how it ended"
        )
        log.warning("%s; counting it as FAILED", record.info["lost"])
        return JobState.FAILED

    def _state_from_log(self, log_tail: str) -> JobState | None:
        """How a job ended, from the last lines of its log, where the system writes it (quirk)."""
        return None

    # ------------------------------------------------------------------ cancel
    def _cancel(self, records: list[JobRecord]) -> None:
        """Cancel these jobs, many ids per command; an already finished job is not an error."""
        self._cancel_ids([r.job_id for r in records if r.job_id])

    def _cancel_ids(self, ids: list[str]) -> None:
        for chunk in _chunks(ids, self.max_ids_per_command):
            try:
                run_command([*self.cancel_cmd, *chunk], timeout=self.settings.command_timeout_s)
            except CommandError as exc:
                log.warning("cancelling jobs %s: %s", chunk, exc)

    # ------------------------------------------------------------------ schedulers
    def _start_schedulers(self) -> list[str]:
        """Start the schedulers here (``"local"``) or in their own batch job (``"job"``)."""
        if self.settings.scheduler_placement == "local":
            return super()._start_schedulers()
        return self._start_scheduler_job()

    def _start_scheduler_job(self) -> list[str]:
        """Submit the scheduler job, wait for its scheduler files, return the addresses."""
        shared = Path(
            self.settings.shared_directory or self.spec.log_directory or "~/.jobqueue-ms"
        ).expanduser()
        self._scheduler_dir = shared / self.unique_name
        self._scheduler_dir.mkdir(parents=True, exist_ok=True)
        files = [str(self._scheduler_dir / f"sched-{i}.json") for i in range(self.n_schedulers)]
        record = JobRecord(name=f"{self.unique_name}-scheduler")
        self._scheduler_jobs.append(record)
        script = self.render_script(
            self.scheduler_spec,
            name=record.name,
            role="scheduler",
            scheduler_files=files,
            cluster_id=self.cluster_id,
            security_args=self._security_argv(),
            **self._render_options(),
        )
        self._submit_script(record, script, self.scheduler_spec)
        log.info("submitted scheduler job %s (%s)", record.name, record.job_id)
        return self._wait_for_scheduler_job(record, files)

    def _wait_for_scheduler_job(self, record: JobRecord, files: list[str]) -> list[str]:
        """Poll for the scheduler files until the deadline; fail fast if the job ends."""
        from ..runtime.scheduler import read_scheduler_file

        deadline = time.monotonic() + self.settings.scheduler_timeout_s
        next_poll = time.monotonic()
        while True:
            addresses = []
            for path in files:
                try:
                    addresses.append(read_scheduler_file(path)["address"])
                except ValueError:  # not there yet, or still being written
                    break
            if len(addresses) == len(files):
                return addresses
            now = time.monotonic()
            if now >= next_poll:
                state = self._poll([record]).get(record.job_id, JobState.UNKNOWN)
                record.state = state
                if state.finished:
                    raise ClusterError(
                        f"scheduler job {record.name} ({record.job_id}) ended ({state.value}) "
                        f"before writing {files}; end of its log ({record.log_path}):\n"
                        f"{self._log_tail(record)}"
                    )
                next_poll = now + self.settings.poll_interval_s
            if now >= deadline:
                raise ClusterError(
                    f"scheduler job {record.name} ({record.job_id}, {record.state.value}) did not "
                    f"write {files} within {self.settings.scheduler_timeout_s:g} s; raise "
                    "scheduler_timeout= if the queue is slow"
                )
            time.sleep(0.2)  # polling a shared filesystem for files another host writes

    def _stop_schedulers(self, timeout: float) -> None:
        """Stop local schedulers, cancel the scheduler job and remove its files."""
        super()._stop_schedulers(timeout)
        live = [r for r in self._scheduler_jobs if r.job_id and not r.state.finished]
        if live:
            self._cancel(live)
            for record in live:
                record.state = JobState.CANCELLED
        if self._scheduler_dir is not None:
            for path in self._scheduler_dir.glob("sched-*.json"):
                path.unlink(missing_ok=True)
            try:
                self._scheduler_dir.rmdir()
            except OSError:
                pass

    @classmethod
    def queue_only(cls, settings: _ClusterSettings, spec: JobSpec, directory: str) -> BatchCluster:
        """The queue-facing half of a cluster: submit a rendered script, poll, cancel.

        For ``jobqueue-ms submit``, whose schedulers run inside the job: nothing is started (no
        schedulers, no keys, no sync thread). Only ``_submit_script``, ``_poll``, ``_cancel`` and
        what they use (the system's facts, ``settings``, ``spec``, ``cluster_dir``) are valid on
        it; ``__init__`` is skipped because it starts the schedulers.
        """
        queue = cls.__new__(cls)
        queue.settings = settings
        queue.spec = spec
        queue.cluster_dir = directory
        queue._vanished = {}
        return queue

    @classmethod
    def for_system(cls, system: str) -> type[BatchCluster]:
        """The cluster class of a batch system by name (``"slurm"``, ``"sge"``, ...)."""
        systems = batch_systems()
        if system not in systems:
            raise ValueError(
                f"system={system!r} is not a batch system; use one of {', '.join(systems)}"
            )
        return systems[system]


def batch_systems() -> dict[str, type[BatchCluster]]:
    """Every batch system by name, from the registry of BatchCluster subclasses.

    A subclass that declares ``system`` registers itself when its class is created. The first
    call imports every module of this package (``jobqueue_ms/batch/*.py``), so a new system is
    one module with its class, plus its template: no list of systems to extend anywhere.

    >>> sorted(batch_systems())
    ['lsf', 'pbs', 'sge', 'slurm']
    """
    global _DISCOVERED
    if not _DISCOVERED:
        package = importlib.import_module(__package__ or "jobqueue_ms.batch")
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{package.__name__}.{module.name}")
        _DISCOVERED = True
    return dict(sorted(_SYSTEMS.items()))


_DISCOVERED = False


def render_job_script(
    system: str,
    *,
    role: str = "worker",
    scheduler_addresses: Sequence[str] = (),
    n_schedulers: int = 1,
    name: str | None = None,
    template: str | None = None,
    template_dirs: Sequence[str] = (),
    config: Config | None = None,
    **options: Any,
) -> str:
    """Render a batch job script without starting anything (``jobqueue-ms render``).

    Options come from the config file and environment, then ``options``. Without
    ``scheduler_addresses`` the worker lines show ``tcp://SCHEDULER:PORT``.

    Examples
    --------
    >>> script = render_job_script("slurm", cores=8, memory="16GiB", python="python3",
    ...                            config=Config())
    >>> "#SBATCH --cpus-per-task=8" in script
    True
    """
    cls = BatchCluster.for_system(system)
    if role not in ("worker", "scheduler"):
        raise ValueError(f"role={role!r} is not 'worker' or 'scheduler'")
    given = dict(options, template=template, template_dirs=template_dirs or None)
    settings, job_options = cls._merge_options(given, config)
    if role == "scheduler":
        job_options.update(cores=n_schedulers, processes=1, nodes=1, job_array=1, gpus=0)
    spec = cls._spec_from(job_options)
    job_name = name or f"{spec.job_name or 'jqms'}-1"
    directory = Path(
        settings.get("shared_directory") or spec.log_directory or "~/.jobqueue-ms"
    ).expanduser()
    return cls.render_script(
        spec,
        name=job_name,
        role=role,
        scheduler_addresses=scheduler_addresses,
        scheduler_files=[f"{directory}/{job_name}/sched-{i}.json" for i in range(n_schedulers)]
        if role == "scheduler"
        else [],
        template=settings.get("template"),
        template_dirs=tuple(settings.get("template_dirs") or ()),
    )


def interface_address(interface: str) -> str:
    """The IPv4 address of a network interface of this machine (``"lo"`` -> ``"127.0.0.1"``).

    Raises
    ------
    ValueError
        No such interface here, or it has no IPv4 address (the message lists the known ones).
    """
    from ..netif import InterfaceError, ipv4_address

    try:
        return ipv4_address(interface)
    except InterfaceError as exc:
        raise ValueError(
            f"{exc} -- this machine is where the schedulers run (scheduler_placement='local'). "
            "Give one of those interfaces, or scheduler_host=... to choose the schedulers' "
            "address yourself"
        ) from None


def _default_scheduler_host() -> str:
    """This host's name, which compute nodes can resolve (unlike 127.0.0.1)."""
    return socket.gethostname()


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    """Split ``items`` into lists of at most ``size``."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
