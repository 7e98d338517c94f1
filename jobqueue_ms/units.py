"""Human units at the edge: memory sizes and durations, parsed once into bytes and seconds.

Pure functions, stdlib only; imported by the runtime, the deployment layer and the backends.

>>> parse_memory("16GB"), parse_memory("4GiB"), parse_memory(1000)
(16000000000, 4294967296, 1000)
>>> parse_duration("01:30:00"), parse_duration("2-00:00:00"), parse_duration("90s")
(5400.0, 172800.0, 90.0)
"""

from __future__ import annotations

import re
from datetime import timedelta

_MEMORY_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_MEMORY_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")

MEMORY_FORM = (
    "a byte count or a number with a unit: 500MB, 16GB, 4GiB, 1.5TiB "
    "(k/M/G/T = 1000, Ki/Mi/Gi/Ti = 1024)"
)
DURATION_FORM = (
    "HH:MM:SS, MM:SS, D-HH:MM:SS, a number of minutes, a number with a unit (90s, 30m, 2h, 1d) "
    "or a datetime.timedelta"
)


def parse_memory(value: str | int | float, parameter: str = "memory") -> int:
    """Return ``value`` in bytes; raise ValueError naming ``parameter`` and the accepted form."""
    if isinstance(value, bool):
        raise ValueError(f"{parameter}={value!r} is not a memory size; use {MEMORY_FORM}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"{parameter}={value!r} must be positive; use {MEMORY_FORM}")
        return int(value)
    match = _MEMORY_RE.match(str(value))
    unit = match.group("unit").lower() if match else None
    if match is None or unit not in _MEMORY_UNITS:
        raise ValueError(f"{parameter}={value!r} is not a memory size; use {MEMORY_FORM}")
    result = int(float(match.group("num")) * _MEMORY_UNITS[unit])
    if result <= 0:
        raise ValueError(f"{parameter}={value!r} must be positive; use {MEMORY_FORM}")
    return result


def format_memory(n_bytes: int) -> str:
    """Render a byte count for people: ``format_memory(4 * 2**30) == '4.0 GiB'``."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_CLOCK_RE = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")
_UNIT_RE = re.compile(r"^(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>ms|s|min|m|h|d)$")


def parse_duration(value: str | int | float | timedelta, parameter: str = "walltime") -> float:
    """Return ``value`` in seconds.

    Accepts ``HH:MM:SS``, ``MM:SS``, ``D-HH:MM:SS``, ``D-HH``, a bare number of minutes (as SLURM
    reads ``-t 30``), a number with a unit (``90s``, ``30m``, ``2h``) or a ``timedelta``.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"{parameter}={value!r} is not a duration; use {DURATION_FORM}")
    elif isinstance(value, (int, float)):
        seconds = float(value) * 60.0
    else:
        text = str(value).strip()
        unit_match = _UNIT_RE.match(text)
        clock = _CLOCK_RE.match(text)
        if unit_match:
            seconds = float(unit_match.group("num")) * _DURATION_UNITS[unit_match.group("unit")]
        elif clock:
            days = int(clock.group("d") or 0)
            parts = [int(p) for p in clock.group("a", "b", "c") if p is not None]
            if clock.group("d") is not None:
                # D-HH, D-HH:MM, D-HH:MM:SS
                hours, minutes, secs = (parts + [0, 0])[:3]
            elif len(parts) == 3:
                hours, minutes, secs = parts
            elif len(parts) == 2:
                hours, minutes, secs = 0, parts[0], parts[1]
            else:
                hours, minutes, secs = 0, parts[0], 0
            seconds = float(((days * 24 + hours) * 60 + minutes) * 60 + secs)
        else:
            raise ValueError(f"{parameter}={value!r} is not a duration; use {DURATION_FORM}")
    if seconds <= 0:
        raise ValueError(f"{parameter}={value!r} must be positive; use {DURATION_FORM}")
    return seconds


def format_hms(seconds: float) -> str:
    """Render seconds as ``HH:MM:SS`` (hours may exceed 24), rounding up to whole seconds."""
    total = int(-(-seconds // 1))
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"
