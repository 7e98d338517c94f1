"""Directive formatting: bytes and seconds in, the text each batch system reads out.

Pure functions, one per system and unit, each with a table of examples in
``tests/test_batch_units.py``. The templates use them as Jinja2 filters (see :data:`FILTERS`),
so that Python never writes a directive line itself.

Rounding always goes *up*: a job that asks for a little more than it needs runs, a job that asks
for a little less is killed by the memory or time limit.

>>> slurm_mem(16 * 10**9), pbs_mem(16 * 2**30), sge_mem(2 * 10**9), lsf_mem(2**30, "MB")
('15259M', '16gb', '1908M', '1024')
>>> slurm_time(5400), lsf_time(5401), pbs_time(90000)
('01:30:00', '01:31', '25:00:00')
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..units import format_hms

KIB = 1024
MIB = 1024**2
GIB = 1024**3

# LSF_UNIT_FOR_LIMITS values, each a power of 1024 bytes (lsf.conf(5): "KB ... EB", binary).
LSF_UNITS: dict[str, int] = {
    "KB": KIB,
    "MB": MIB,
    "GB": GIB,
    "TB": 1024**4,
    "PB": 1024**5,
    "EB": 1024**6,
}
LSF_DEFAULT_UNIT = "KB"


def _ceil_div(numerator: int, denominator: int) -> int:
    """Divide, rounding up."""
    return -(-numerator // denominator)


def slurm_mem(n_bytes: int) -> str:
    """Format bytes for ``sbatch --mem``: whole MiB (Slurm's ``M``), rounded up.

    sbatch(1): "Default units are megabytes. Different units can be specified using the suffix
    [K|M|G|T]", and Slurm's megabyte is 1024**2 bytes.
    """
    return f"{_ceil_div(n_bytes, MIB)}M"


def slurm_time(seconds: float) -> str:
    """Format a walltime for ``sbatch --time``: ``HH:MM:SS``, or ``D-HH:MM:SS`` from one day."""
    total = int(-(-seconds // 1))
    days, rest = divmod(total, 86400)
    hms = format_hms(rest)
    return f"{days}-{hms}" if days else hms


def pbs_mem(n_bytes: int) -> str:
    """Format bytes for a PBS ``mem=`` resource: ``gb`` when exact, else ``mb`` rounded up.

    pbs_resources(7B) size: "b, kb, mb, gb, tb ... K = 1024": PBS units are binary.
    """
    if n_bytes % GIB == 0:
        return f"{n_bytes // GIB}gb"
    return f"{_ceil_div(n_bytes, MIB)}mb"


def pbs_time(seconds: float) -> str:
    """Format a walltime for ``-l walltime=``: ``HH:MM:SS`` (hours may pass 24)."""
    return format_hms(seconds)


def sge_mem(n_bytes: int) -> str:
    """Format bytes for ``h_vmem``/``mem_free``: ``G`` when exact, else ``M`` rounded up.

    sge_types(1) memory_specifier: "K, M, G ... multiply by 1024" (lower case k, m, g by 1000).
    """
    if n_bytes % GIB == 0:
        return f"{n_bytes // GIB}G"
    return f"{_ceil_div(n_bytes, MIB)}M"


def sge_time(seconds: float) -> str:
    """Format a walltime for ``-l h_rt=``: ``HH:MM:SS``."""
    return format_hms(seconds)


def lsf_mem(n_bytes: int, unit: str = LSF_DEFAULT_UNIT) -> str:
    """Format bytes for ``bsub -M``: a number in the site's ``LSF_UNIT_FOR_LIMITS``, rounded up."""
    key = unit.upper()
    if key not in LSF_UNITS:
        raise ValueError(
            f"lsf_units={unit!r} is not an LSF unit; use one of {', '.join(LSF_UNITS)}"
        )
    return str(_ceil_div(n_bytes, LSF_UNITS[key]))


def lsf_time(seconds: float) -> str:
    """Format a walltime for ``bsub -W``: ``HH:MM``, rounded up to the minute (bsub(1))."""
    minutes = _ceil_div(int(-(-seconds // 1)), 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


_LSF_UNIT_LINE = re.compile(r"^\s*LSF_UNIT_FOR_LIMITS\s*=\s*\"?(?P<unit>[A-Za-z]+)\"?\s*(#.*)?$")


def read_lsf_unit(environ: Mapping[str, str] | None = None) -> str:
    """Return ``LSF_UNIT_FOR_LIMITS`` from ``$LSF_ENVDIR/lsf.conf`` (``/etc`` if unset) or ``KB``.

    The last assignment wins, as LSF reads the file top to bottom.
    """
    env = os.environ if environ is None else environ
    conf = Path(env.get("LSF_ENVDIR") or "/etc") / "lsf.conf"
    try:
        text = conf.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return LSF_DEFAULT_UNIT
    unit = LSF_DEFAULT_UNIT
    for line in text.splitlines():
        match = _LSF_UNIT_LINE.match(line)
        if match and match.group("unit").upper() in LSF_UNITS:
            unit = match.group("unit").upper()
    return unit


FILTERS: dict[str, Callable[..., Any]] = {
    "slurm_mem": slurm_mem,
    "slurm_time": slurm_time,
    "pbs_mem": pbs_mem,
    "pbs_time": pbs_time,
    "sge_mem": sge_mem,
    "sge_time": sge_time,
    "lsf_mem": lsf_mem,
    "lsf_time": lsf_time,
}
"""Jinja2 filters of the batch system templates by name (generic ones: deploy/render.py)."""
