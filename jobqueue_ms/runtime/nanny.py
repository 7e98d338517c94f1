"""The nanny: runs a worker in a forked child and restarts it if it dies or outgrows its memory.

Forking (instead of starting a second interpreter) keeps worker start-up to one Python start.
The child exits 0 when it retired or reached its lifetime, 3 on a fatal misconfiguration (such as
a version mismatch); the nanny stops in both cases and restarts the child otherwise.

Nothing outlives the process that started it: given ``parent_pid`` (a LocalCluster passes its
own), the nanny stops the worker when that parent is gone, even if it was SIGKILLed; the worker
itself stops when the nanny is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

from . import localdata

log = logging.getLogger("jobqueue_ms.nanny")

KILL_FRACTION = 0.95  # of the memory limit: the child is killed and restarted
MAX_RAPID_RESTARTS = 5  # restarts within RAPID_WINDOW_S before the nanny gives up
RAPID_WINDOW_S = 30.0


def run_worker(
    worker_kwargs: dict[str, Any], nanny: bool = True, parent_pid: int | None = None
) -> int:
    """Run a worker (supervised by default); return the exit code for the process.

    ``parent_pid``: stop when that process is no longer our parent.
    """
    from .worker import EXIT_FATAL, EXIT_OK, Worker

    if not nanny:
        worker = Worker(**worker_kwargs, parent_pid=parent_pid)
        _stop_on_signals(worker)
        return worker.run()

    stopping = False
    child = 0

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if child:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    limit = worker_kwargs.get("memory_limit")
    if isinstance(limit, str):
        from ..units import parse_memory

        limit = parse_memory(limit, "memory_limit")
    if worker_kwargs.get("lifetime"):  # fixed now, so a restarted worker does not outlive it
        worker_kwargs = dict(worker_kwargs)
        worker_kwargs["lifetime_end"] = time.time() + worker_kwargs.pop("lifetime")
    restarts: list[float] = []
    nanny_pid = os.getpid()
    # The same-host data socket's private directory outlives a SIGKILLed worker: the nanny owns it.
    local_dir = localdata.make_dir()
    worker_kwargs = {**worker_kwargs, "local_data_dir": local_dir or ""}
    try:
        while True:
            child = os.fork()
            if child == 0:  # the worker
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = 1
                try:
                    worker = Worker(**worker_kwargs, parent_pid=nanny_pid)
                    _stop_on_signals(worker)
                    code = worker.run()
                except BaseException as exc:  # noqa: BLE001
                    print(f"jobqueue-ms worker: {type(exc).__name__}: {exc}", file=sys.stderr)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            code, orphaned = _watch(child, limit, parent_pid)
            child = 0
            stopping = stopping or orphaned
            if stopping or code in (EXIT_OK, EXIT_FATAL):
                return EXIT_OK if stopping else code
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RAPID_WINDOW_S] + [now]
            if len(restarts) > MAX_RAPID_RESTARTS:
                print(
                    f"jobqueue-ms nanny: worker died {len(restarts)} times in "
                    f"{RAPID_WINDOW_S:.0f} s (last exit code {code}); giving up",
                    file=sys.stderr,
                )
                return 1
            print(f"jobqueue-ms nanny: worker exited with code {code}; restarting", file=sys.stderr)

    finally:
        localdata.remove_dir(local_dir)


def _watch(pid: int, limit: int | None, parent_pid: int | None = None) -> tuple[int, bool]:
    """Wait for the child; kill it if its memory passes the limit, stop it if our parent is gone.

    Return its exit code and whether our parent is gone.
    """
    proc = None
    if limit:
        import psutil

        proc = psutil.Process(pid)
    polling = proc is not None or parent_pid is not None
    orphaned_at: float | None = None
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG if polling else 0)
        except ChildProcessError:
            return 1, orphaned_at is not None
        except InterruptedError:
            continue
        if done:
            return os.waitstatus_to_exitcode(status), orphaned_at is not None
        if orphaned_at is None and parent_pid is not None and os.getppid() != parent_pid:
            print(
                f"jobqueue-ms nanny: parent process {parent_pid} is gone; stopping the worker",
                file=sys.stderr,
            )
            orphaned_at = time.monotonic()
            os.kill(pid, signal.SIGTERM)
        elif orphaned_at is not None and time.monotonic() - orphaned_at > 10:
            os.kill(pid, signal.SIGKILL)  # it did not stop in time
        try:
            rss = proc.memory_info().rss if proc is not None else 0
        except Exception:  # noqa: BLE001 - exiting right now
            rss = 0
        if limit and rss > KILL_FRACTION * limit:
            print(
                f"jobqueue-ms nanny: worker uses {rss} bytes, over {KILL_FRACTION:.0%} of its "
                f"memory limit ({limit}); restarting it",
                file=sys.stderr,
            )
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)  # polling interval of the memory watch (not synchronisation)


def _stop_on_signals(worker: Any) -> None:
    def stop(signum: int, _frame: Any) -> None:
        worker.stop()

    def dump(signum: int, _frame: Any) -> None:
        import json

        print(f"jobqueue-ms worker state: {json.dumps(worker.debug_state())}", file=sys.stderr)
        sys.stderr.flush()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, dump)
