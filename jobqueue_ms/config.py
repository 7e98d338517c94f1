"""Settings: TOML files, then environment variables, then keyword arguments (last wins).

Read once, here. Every cluster class asks :func:`get_config` for its section and lays its own
keyword arguments on top; nothing else reads the files or the environment.

Where settings come from, lowest precedence first:

1. the site file ``/etc/jobqueue-ms/config.toml`` (``$JOBQUEUE_MS_SITE_CONFIG`` moves it);
2. the user file ``$JOBQUEUE_MS_CONFIG``, else ``$XDG_CONFIG_HOME/jobqueue-ms/config.toml``,
   else ``~/.config/jobqueue-ms/config.toml``;
3. environment variables ``JOBQUEUE_MS_<SECTION>_<OPTION>``, e.g. ``JOBQUEUE_MS_SLURM_QUEUE=debug``
   (the value is read as a TOML value when it is a number, boolean, list or table, else as text);
4. keyword arguments, e.g. ``SLURMCluster(queue="long")``.

A file has one table per section, keys as the keyword arguments spell them (``-`` may stand
for ``_``)::

    [slurm]
    queue = "normal"
    account = "proj"
    cores = 8
    memory = "16GiB"
    walltime = "01:00:00"
    job_extra_directives = ["--exclusive"]

>>> config = Config.load(environ={"JOBQUEUE_MS_SLURM_CORES": "8"}, paths=())
>>> config.options("slurm", {"memory": "16GB"})
{'cores': 8, 'memory': '16GB'}
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

OTHER_SECTIONS = ("ssh", "local", "mpi")
"""Sections besides the batch systems' (their names come from the registry: known_sections())."""
ENV_PREFIX = "JOBQUEUE_MS_"
ENV_USER_CONFIG = "JOBQUEUE_MS_CONFIG"
ENV_SITE_CONFIG = "JOBQUEUE_MS_SITE_CONFIG"
SITE_CONFIG = Path("/etc/jobqueue-ms/config.toml")


def site_config_path(environ: Mapping[str, str]) -> Path:
    """The site-wide file: ``$JOBQUEUE_MS_SITE_CONFIG`` or ``/etc/jobqueue-ms/config.toml``."""
    return Path(environ.get(ENV_SITE_CONFIG) or SITE_CONFIG)


def user_config_path(environ: Mapping[str, str]) -> Path:
    """The user's file: ``$JOBQUEUE_MS_CONFIG``, else in ``$XDG_CONFIG_HOME`` or ``~/.config``."""
    if environ.get(ENV_USER_CONFIG):
        return Path(environ[ENV_USER_CONFIG]).expanduser()
    base = environ.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(base) / "jobqueue-ms" / "config.toml"


class ConfigError(ValueError):
    """A config file or variable that cannot be read; names the file or variable."""


def known_sections() -> tuple[str, ...]:
    """Every section a config file may have: one per batch system, then ssh, local and mpi.

    The batch systems are the registered BatchCluster subclasses (``batch_systems()``), so a new
    system has its section without this list changing. Imported here, when first needed: the
    batch package reads its settings through this module.
    """
    from .batch.base import batch_systems

    return (*batch_systems(), *OTHER_SECTIONS)


@dataclass(frozen=True)
class Config:
    """Merged settings per section, and where each one came from."""

    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    origins: Mapping[tuple[str, str], str] = field(default_factory=dict)
    files: tuple[str, ...] = ()

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        paths: Iterable[str | os.PathLike[str]] | None = None,
    ) -> Config:
        """Read the files (``paths``, default site then user) and the environment, merged.

        Raises
        ------
        ConfigError
            A file that is not valid TOML, a section that is not a table or an unknown section.
        """
        env = os.environ if environ is None else environ
        if paths is None:
            paths = (site_config_path(env), user_config_path(env))
        sections: dict[str, dict[str, Any]] = {}
        origins: dict[tuple[str, str], str] = {}
        files: list[str] = []
        known = known_sections()
        for path in map(Path, paths):
            if not path.is_file():
                continue
            data = _read_toml(path)
            files.append(str(path))
            for section, table in data.items():
                if section not in known:
                    raise ConfigError(
                        f"{path}: unknown section [{section}]; use one of "
                        + ", ".join(f"[{s}]" for s in known)
                    )
                if not isinstance(table, dict):
                    raise ConfigError(f"{path}: {section} must be a table, like [{section}]")
                for key, value in table.items():
                    name = _option_name(key)
                    sections.setdefault(section, {})[name] = _plain(value)
                    origins[(section, name)] = str(path)
        for variable, text in sorted(env.items()):
            parsed = _env_option(variable, known)
            if parsed is None:
                continue
            section, name = parsed
            sections.setdefault(section, {})[name] = _env_value(text)
            origins[(section, name)] = f"${variable}"
        return cls(sections=sections, origins=origins, files=tuple(files))

    def options(self, section: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The section's settings with ``kwargs`` on top (a keyword given as None is not given)."""
        known = known_sections()
        if section not in known:
            raise ValueError(f"section={section!r} is not one of {', '.join(known)}")
        merged = dict(self.sections.get(section, {}))
        merged.update({key: value for key, value in kwargs.items() if value is not None})
        return merged

    def origin(self, section: str, name: str) -> str | None:
        """The file or variable a setting came from, or None if it was not configured."""
        return self.origins.get((section, name))


@functools.lru_cache(maxsize=1)
def get_config() -> Config:
    """Return the process-wide settings, read on first use."""
    return Config.load()


def _read_toml(path: Path) -> dict[str, Any]:
    """Parse one TOML file, naming it in errors."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def _option_name(key: str) -> str:
    """``job-extra-directives`` and ``job_extra_directives`` are the same option."""
    return key.strip().replace("-", "_").lower()


def _plain(value: Any) -> Any:
    """TOML times (``walltime = 01:00:00`` unquoted) become the text they were written as."""
    if isinstance(value, datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _env_option(variable: str, known: tuple[str, ...]) -> tuple[str, str] | None:
    """``JOBQUEUE_MS_SLURM_JOB_NAME`` -> ``("slurm", "job_name")``; other names -> None."""
    if not variable.startswith(ENV_PREFIX):
        return None
    rest = variable[len(ENV_PREFIX) :]
    section, _, option = rest.partition("_")
    if section.lower() not in known or not option:
        return None
    return section.lower(), option.lower()


def _env_value(text: str) -> Any:
    """Read a variable's value as a TOML number, boolean, list or table, else as text."""
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text
    if isinstance(value, (bool, int, float, list, dict)):
        return _plain(value)
    return text
