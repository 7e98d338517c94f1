"""Helpers shared by the tests: polling with a deadline, and the real systems the suite can use.

Import them with ``from helpers import wait_until`` (pytest puts tests/ on sys.path), or take the
``wait_until`` fixture from conftest.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
CI = REPO / "ci"

T = TypeVar("T")


MPICH_LEFTOVERS = ((Path("/tmp"), "hydra_hwloc_xmlfile_*"), (Path("/dev/shm"), "mpich_shm_*"))


def socket_dirs() -> set[Path]:
    """Same-host socket directories of workers and clients (runtime/localdata.py) in the temp
    directory."""
    import tempfile

    return set(Path(tempfile.gettempdir()).glob("jqms-*"))


def sweep_socket_dirs(before: set[Path], timeout: float = 30) -> None:
    """Ranks of a job killed outright (SIGKILL) cannot remove their socket directories: check
    that the sweep the next cluster runs removes every one made since ``before``."""
    from jobqueue_ms.deploy.leftovers import sweep

    def swept() -> bool:
        sweep()  # only directories whose owner process is gone
        return not socket_dirs() - before

    wait_until(swept, timeout=timeout, message=lambda: f"{socket_dirs() - before} swept")


def remove_mpich_leftovers(since: float) -> list[Path]:
    """Remove what MPICH left of this user's jobs started since ``since`` (epoch seconds).

    Hydra writes its topology file to /tmp whatever TMPDIR says, and the ranks share memory
    through files in /dev/shm; both stay when hydra is killed or aborts a job whose rank died.
    Call once the job's processes are gone. Returns what was removed.
    """
    removed = []
    for leftover in (p for where, pattern in MPICH_LEFTOVERS for p in where.glob(pattern)):
        try:
            st = leftover.stat()
        except FileNotFoundError:
            continue
        if st.st_mtime >= since - 1 and st.st_uid == os.getuid():
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


class WaitTimeout(AssertionError):
    """A wait_until deadline passed."""


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.02,
    message: str | Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy; return that.

    Parameters
    ----------
    predicate
        Called with no arguments. Exceptions it raises propagate at once.
    timeout
        Seconds before giving up with ``WaitTimeout`` (an ``AssertionError``).
    interval
        Seconds between calls.
    message
        What was awaited, for the error. A callable is called at the timeout (to show the queue).

    Examples
    --------
    >>> wait_until(lambda: 42, timeout=1)
    42
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            raise WaitTimeout(f"timed out after {timeout} s waiting for {what or predicate!r}")
        time.sleep(interval)


def run(
    argv: Sequence[str | os.PathLike],
    *,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text; with ``check``, fail showing argv, exit code and output."""
    argv = [str(a) for a in argv]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, input=input, cwd=cwd, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{argv} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def is_root() -> bool:
    return os.geteuid() == 0


def have(command: str) -> bool:
    """Whether ``command`` is on PATH (or in /usr/sbin, where the daemons live)."""
    return shutil.which(command) is not None or Path("/usr/sbin", command).exists()
