"""glibc malloc tuning for the long-lived processes jobqueue-ms owns (schedulers, workers).

glibc serves a large allocation (128 KiB by default) with its own ``mmap``, returned to the
system on ``free`` -- but the first time such a block is freed it raises that threshold to the
block's size (up to 32 MiB), so later blocks of that size come from the heap, and the heap keeps
the memory of freed ones wherever a live block sits above them. A process that now and then
receives a multi-megabyte message (a hostile or merely oversized frame, a large result) then grows
by megabytes that are never given back: the fuzz drill saw a worker's RSS grow +24 % and a
scheduler's +14 % over 300,000 messages, against +2 % and +7 % with the threshold pinned.

Pinning the threshold (any explicit setting turns the adjustment off) keeps those processes flat;
the cost is fresh pages for each large block. Processes started by jobqueue-ms pin it at 1 MiB;
a site that prefers otherwise sets glibc's own ``MALLOC_MMAP_THRESHOLD_`` variable, which wins.
Never applied to the user's own process (a client, an in-process scheduler).
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
DEFAULT_THRESHOLD = 1 << 20


def pin_mmap_threshold(nbytes: int = DEFAULT_THRESHOLD) -> bool:
    """Serve allocations of ``nbytes`` and more by mmap, always; return whether it was set.

    A no-op where glibc is not the C library, or when ``MALLOC_MMAP_THRESHOLD_`` is set.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, nbytes))
