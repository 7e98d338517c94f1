"""JobSpec: the user's choices for one batch job, validated once, before anything is submitted.

Human strings ("16GB", "01:00:00") are accepted here and converted once; inside, names carry their
units (``memory_bytes``, ``walltime``). Every error names the parameter, the value received and the
accepted form.

>>> spec = JobSpec.from_options("SLURMCluster", {"cores": 8, "memory": "16GiB", "processes": 2,
...                                             "walltime": "01:00:00", "python": "python3"})
>>> spec.threads, spec.worker_memory_bytes, spec.worker_lifetime_s
(4, 8589934592, 3300)
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar

from ..units import DURATION_FORM, MEMORY_FORM, parse_duration, parse_memory

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_TOKEN_RE = re.compile(r"^[^\s'\"\\;&|<>`$]+$")
_RESOURCE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

LIFETIME_MARGIN_S = 300
"""Workers retire this long (at most a tenth of the walltime) before the queue's walltime kill."""


@dataclass(frozen=True)
class SystemOption:
    """A job option only one batch system has, declared by its class (``pe`` for SGE).

    ``parse(name, value)`` validates a given value (raising ValueError that names the option,
    the value and the accepted form) and returns what templates see as ``job.<name>``;
    ``default`` is used when the option is not given.

    >>> flavor = SystemOption("pro", one_of("pro", "torque"))
    >>> flavor.parse("pbs_flavor", "torque")
    'torque'
    """

    default: Any
    parse: Callable[[str, Any], Any]


# Every SystemOption some BatchCluster subclass declared, by name (see BatchCluster).
_DECLARED: dict[str, SystemOption] = {}


def declare_system_options(options: Mapping[str, SystemOption]) -> None:
    """Record a system's options, so that JobSpec.SYSTEM_OPTIONS lists them."""
    for name, option in options.items():
        _DECLARED.setdefault(name, option)


class _DeclaredOptions:
    """``JobSpec.SYSTEM_OPTIONS``: the names of every system-specific option of every system."""

    def __get__(self, obj: object, owner: type | None = None) -> tuple[str, ...]:
        from .base import batch_systems  # the systems declare their options as they load

        batch_systems()
        return tuple(sorted(_DECLARED))


@dataclass(frozen=True)
class JobSpec:
    """What one batch job asks the queue for, and how many workers it starts.

    ``cores`` and ``memory_bytes`` are per node; a job asks for ``nodes`` of them and starts
    ``processes`` workers on each, each with ``cores // processes`` threads. With ``job_array=n``
    one submission holds n array tasks, each such a job.

    A system's own options (SGE's ``pe``, PBS's ``pbs_flavor``...) are declared by its cluster
    class as :class:`SystemOption`; their values are in ``system_values`` and read as
    attributes like the others (``spec.pe``, ``{{ job.pe }}`` in a template).
    """

    cores: int
    memory_bytes: int
    processes: int = 1
    nodes: int = 1
    queue: str | None = None
    account: str | None = None
    walltime: timedelta | None = None
    job_name: str | None = None
    job_extra_directives: tuple[str, ...] = ()
    job_directives_skip: tuple[str, ...] = ()
    job_script_prologue: tuple[str, ...] = ()
    job_script_epilogue: tuple[str, ...] = ()
    worker_extra_args: tuple[str, ...] = ()
    python: str = field(default_factory=lambda: sys.executable or "python3")
    local_directory: str | None = None
    log_directory: str | None = None
    interface: str | None = None
    gpus: int = 0
    resources: tuple[tuple[str, float], ...] = ()
    job_array: int = 1
    shebang: str = "#!/usr/bin/env bash"
    # The values of the options the system's class declares, (name, value) in name order.
    system_values: tuple[tuple[str, Any], ...] = ()

    COMMON_OPTIONS: ClassVar[tuple[str, ...]] = (
        "cores",
        "memory",
        "processes",
        "nodes",
        "queue",
        "account",
        "project",
        "walltime",
        "job_name",
        "job_extra_directives",
        "job_directives_skip",
        "job_script_prologue",
        "job_script_epilogue",
        "worker_extra_args",
        "python",
        "local_directory",
        "log_directory",
        "interface",
        "gpus",
        "resources",
        "job_array",
        "shebang",
    )
    SYSTEM_OPTIONS = _DeclaredOptions()

    def __getattr__(self, name: str) -> Any:
        """Return a system option's value, as an attribute (``spec.pe``)."""
        if not name.startswith("__"):
            for key, value in object.__getattribute__(self, "system_values"):
                if key == name:
                    return value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- derived numbers (what the templates use) ------------------------------------------------
    @property
    def threads(self) -> int:
        """Threads per worker process."""
        return self.cores // self.processes

    @property
    def worker_memory_bytes(self) -> int:
        """Memory limit of one worker process."""
        return self.memory_bytes // self.processes

    @property
    def memory_per_core_bytes(self) -> int:
        """Memory per core (SGE counts ``h_vmem`` per slot), rounded up."""
        return -(-self.memory_bytes // self.cores)

    @property
    def workers_per_task(self) -> int:
        """Worker processes one job (one array task) starts over all its nodes."""
        return self.processes * self.nodes

    @property
    def workers_per_job(self) -> int:
        """Worker processes one submission starts (every array task included)."""
        return self.workers_per_task * self.job_array

    @property
    def walltime_s(self) -> int | None:
        """Walltime in whole seconds (rounded up), or None for the queue's default."""
        if self.walltime is None:
            return None
        return math.ceil(self.walltime.total_seconds())

    @property
    def worker_lifetime_s(self) -> int | None:
        """Seconds after which a worker retires by itself, before the walltime kill."""
        if self.walltime_s is None:
            return None
        margin = min(LIFETIME_MARGIN_S, self.walltime_s // 10)
        return max(self.walltime_s - margin, 1)

    @property
    def resource_pairs(self) -> list[str]:
        """Worker resources as ``NAME=amount`` words (``GPU=1``)."""
        return [f"{name}={_number(amount)}" for name, amount in self.resources]

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_options(
        cls,
        owner: str,
        options: Mapping[str, Any],
        *,
        system_options: Mapping[str, SystemOption] | None = None,
    ) -> JobSpec:
        """Validate human options (``memory="16GB"``) into a JobSpec, or raise naming what is wrong.

        Parameters
        ----------
        owner
            The class the options were given to, for messages (``"SLURMCluster"``).
        options
            Keyword options after config-file and environment merging.
        system_options
            The system-specific options ``owner`` accepts (``pe``, ``pbs_flavor``...), as its
            class declares them.

        Raises
        ------
        TypeError
            An option ``owner`` does not know.
        ValueError
            A value that is out of range or not in the accepted form.
        """
        system_options = dict(system_options or {})
        allowed = set(cls.COMMON_OPTIONS) | set(system_options)
        unknown = sorted(set(options) - allowed)
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"{owner}() got an unknown option {name!r}{hint}. "
                f"Accepted options: {', '.join(sorted(allowed))}"
            )
        opts = dict(options)
        for required in ("cores", "memory"):
            if opts.get(required) is None:
                raise ValueError(
                    f"{owner}() needs {required}=...; e.g. {owner}(cores=8, memory='16GiB'), "
                    f"or set {required} in the [{_section(owner)}] section of the config file"
                )
        kwargs: dict[str, Any] = {}
        kwargs["cores"] = _positive_int("cores", opts.pop("cores"))
        kwargs["memory_bytes"] = _memory("memory", opts.pop("memory"))
        account, project = opts.pop("account", None), opts.pop("project", None)
        if account is not None and project is not None and account != project:
            raise ValueError(
                f"account={account!r} and project={project!r} name the same setting "
                "(SLURM/PBS -A, SGE/LSF -P); give one of them"
            )
        kwargs["account"] = _token("account", account if account is not None else project)
        for name in ("processes", "nodes", "job_array"):
            if opts.get(name) is not None:
                kwargs[name] = _positive_int(name, opts.pop(name))
        if opts.get("gpus") is not None:
            kwargs["gpus"] = _count("gpus", opts.pop("gpus"))
        if opts.get("walltime") is not None:
            kwargs["walltime"] = _walltime(opts.pop("walltime"))
        for name in ("queue", "interface"):
            kwargs[name] = _token(name, opts.pop(name, None))
        if opts.get("job_name") is not None:
            kwargs["job_name"] = _job_name(opts.pop("job_name"))
        for name in ("job_extra_directives", "job_directives_skip", "worker_extra_args"):
            if opts.get(name) is not None:
                kwargs[name] = _lines(name, opts.pop(name), single_line=True)
        for name in ("job_script_prologue", "job_script_epilogue"):
            if opts.get(name) is not None:
                kwargs[name] = _lines(name, opts.pop(name), single_line=False)
        for name in ("python", "local_directory"):
            if opts.get(name) is not None:
                kwargs[name] = _path(name, opts.pop(name))
        if opts.get("log_directory") is not None:
            kwargs["log_directory"] = _log_directory(opts.pop("log_directory"))
        if opts.get("resources") is not None:
            kwargs["resources"] = _resources(opts.pop("resources"))
        if opts.get("shebang") is not None:
            kwargs["shebang"] = _shebang(opts.pop("shebang"))
        values = []
        for name, option in sorted(system_options.items()):
            value = opts.pop(name, None)
            values.append((name, option.default if value is None else option.parse(name, value)))
        kwargs["system_values"] = tuple(values)
        spec = cls(**kwargs)
        spec._check_consistency()
        return spec

    def _check_consistency(self) -> None:
        """Check rules that involve several options."""
        if self.processes > self.cores:
            raise ValueError(
                f"processes={self.processes} is more than cores={self.cores}: each worker process "
                f"needs at least one core; use processes<={self.cores}"
            )
        if self.cores % self.processes:
            raise ValueError(
                f"cores={self.cores} is not a multiple of processes={self.processes}, so "
                f"{self.cores % self.processes} core(s) would sit idle; use e.g. "
                f"processes={_largest_divisor(self.cores, self.processes)}"
            )


def _section(owner: str) -> str:
    """Config section for a class name: ``SLURMCluster`` -> ``slurm``."""
    return owner.removesuffix("Cluster").lower() or owner.lower()


def _number(value: float) -> str:
    """Render ``1.0`` as ``1`` and ``0.5`` as ``0.5``."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _largest_divisor(n: int, at_most: int) -> int:
    """Largest divisor of ``n`` not above ``at_most``."""
    return max(d for d in range(1, at_most + 1) if n % d == 0)


def _positive_int(name: str, value: Any) -> int:
    """An int >= 1 (a bool or a float with a fraction is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name}={value!r} is not a whole number; use a positive integer like 8")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(
            f"{name}={value!r} is not a whole number; use a positive integer like 8"
        ) from None
    if number < 1:
        raise ValueError(f"{name}={value!r} must be at least 1; use a positive integer like 8")
    return number


def _count(name: str, value: Any) -> int:
    """An int >= 0 (a bool or a float with a fraction is refused)."""
    form = "use 0 or a positive integer like 2"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name}={value!r} is not a whole number; {form}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number; {form}") from None
    if number < 0:
        raise ValueError(f"{name}={value!r} must be 0 or more; {form}")
    return number


def _memory(name: str, value: Any) -> int:
    """Bytes from a human memory size."""
    if not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}={value!r} is not a memory size; use {MEMORY_FORM}")
    return parse_memory(value, parameter=name)


def _walltime(value: Any) -> timedelta:
    """A timedelta from HH:MM:SS, D-HH:MM:SS, minutes, '2h' or a timedelta."""
    if not isinstance(value, (int, float, str, timedelta)):
        raise ValueError(f"walltime={value!r} is not a duration; use {DURATION_FORM}")
    return timedelta(seconds=parse_duration(value, parameter="walltime"))


def _token(name: str, value: Any) -> str | None:
    """One word that is safe in a directive line (no blanks, quotes or shell syntax)."""
    if value is None:
        return None
    text = str(value)
    if not _TOKEN_RE.match(text):
        raise ValueError(
            f"{name}={value!r} is not a single word; use a name without blanks, quotes or "
            "shell characters, like 'normal'"
        )
    return text


def _job_name(value: Any) -> str:
    """A job name every system accepts: a letter, then letters, digits, '_', '.', '-'."""
    text = str(value)
    if not _NAME_RE.match(text) or len(text) > 64:
        raise ValueError(
            f"job_name={value!r} is not a portable job name; use a letter followed by letters, "
            "digits, '_', '.' or '-' (at most 64 characters), like 'jobqueue-ms'"
        )
    return text


def _lines(name: str, value: Any, *, single_line: bool) -> tuple[str, ...]:
    """A list of strings (a bare string is refused: it would be iterated letter by letter)."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(
            f"{name}={value!r} is not a list of strings; use a list, like {name}=['...']"
        )
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{name} holds {item!r}, which is not a string; use a list of strings")
        if single_line and ("\n" in item or "\r" in item):
            raise ValueError(
                f"{name} holds {item!r}, which spans several lines; use one line per item"
            )
    return items


def _path(name: str, value: Any) -> str:
    """A non-empty path or command on one line."""
    text = str(value)
    if not text.strip() or "\n" in text or "\r" in text:
        raise ValueError(f"{name}={value!r} is not a path; use a path on one line, like '/scratch'")
    return text


def _log_directory(value: Any) -> str:
    """A directory for directive lines: ``~`` expanded here, no blanks or quotes."""
    text = os.path.expanduser(_path("log_directory", value))
    if not _TOKEN_RE.match(text):
        raise ValueError(
            f"log_directory={value!r} cannot go in a directive line; use a path without "
            "blanks, quotes or shell characters, like '/scratch/me/logs'"
        )
    return text


def _resources(value: Any) -> tuple[tuple[str, float], ...]:
    """Worker resources from a mapping ``{"GPU": 1}`` or words ``["GPU=1"]``."""
    form = "a mapping like {'GPU': 1} or a list like ['GPU=1']"
    pairs: list[tuple[str, Any]] = []
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, str):
        value = value.replace(",", " ").split()
    if not pairs:
        if not isinstance(value, Iterable):
            raise ValueError(f"resources={value!r} is not {form}")
        for word in value:
            if not isinstance(word, str) or "=" not in word:
                raise ValueError(f"resources={value!r} is not {form}")
            key, _, amount = word.partition("=")
            pairs.append((key.strip(), amount.strip()))
    result = []
    for key, amount in pairs:
        if not isinstance(key, str) or not _RESOURCE_RE.match(key):
            raise ValueError(f"resources has the name {key!r}; use a name like 'GPU' or 'MEM'")
        try:
            number = float(amount)
        except (TypeError, ValueError):
            raise ValueError(f"resources[{key!r}]={amount!r} is not a number; use {form}") from None
        if number <= 0 or isinstance(amount, bool):
            raise ValueError(f"resources[{key!r}]={amount!r} must be a positive number")
        result.append((key, number))
    return tuple(result)


def _shebang(value: Any) -> str:
    """A ``#!`` line for bash (the script body is bash)."""
    text = str(value)
    if not text.startswith("#!") or "\n" in text:
        raise ValueError(f"shebang={value!r} is not a '#!' line; use '#!/usr/bin/env bash'")
    return text


def word(name: str, value: Any) -> str:
    """Validate one word that is safe in a directive line (a :class:`SystemOption` parser)."""
    text = _token(name, value)
    assert text is not None
    return text


def one_of(*choices: str, upper: bool = False) -> Callable[[str, Any], str]:
    """Return a :class:`SystemOption` parser accepting one of ``choices`` (upper-cased first)."""

    def parse(name: str, value: Any) -> str:
        text = str(value).upper() if upper else value
        if text not in choices:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
        return str(text)

    return parse


def names(name: str, value: Any) -> tuple[str, ...]:
    """Validate resource names, as a list or ``"a,b"`` (a :class:`SystemOption` parser)."""
    if isinstance(value, str):
        value = [part for part in value.replace(",", " ").split() if part]
    items = _lines(name, value, single_line=True)
    for item in items:
        if not _RESOURCE_RE.match(item):
            raise ValueError(
                f"{name} holds {item!r}; use resource names like ['h_vmem', 'mem_free']"
            )
    return items
