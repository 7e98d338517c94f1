"""Start a whole jobqueue-ms deployment inside one MPI allocation.

``mpirun -n K python -m jobqueue_ms.mpi [--schedulers N] script.py [args...]``: ranks become
schedulers, one client rank runs ``script.py`` with a ready :class:`Client`, every other rank is a
worker. Rank 0 broadcasts the cluster's CurveZMQ keys once (in memory: no key file, no shared
filesystem), then addresses are exchanged once over MPI (one ``allgather``); after that every
process speaks the normal runtime protocol, so worker code is the same under MPI, batch and SSH.

Shutdown uses MPI point-to-point only: each serving rank posts one non-blocking receive that a
watcher thread polls, so no rank ever blocks inside MPI while serving. The client rank (or, in
service mode, a rank whose scheduler was shut down by an admin) sends a small STOP message to every
other rank. A rank that crashed is simply never waited for.

See docs/mpi.md for the rank layout and the launch recipes.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import logging
import os
import runpy
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .layout import Role, RoleKind, min_world_size, role_for

if TYPE_CHECKING:
    from .runtime.client import Client

__all__ = [
    "Role",
    "RoleKind",
    "StartupError",
    "choose_host",
    "client",
    "host_address",
    "initialize",
    "interface_address",
    "main",
    "min_world_size",
    "role_for",
    "scheduler_addresses",
    "single_host_hint",
]

log = logging.getLogger("jobqueue_ms.mpi")

STOP_TAG = 7301  # MPI tag of the shutdown message (payload: the exit code)
_POLL_S = 0.05  # how often watcher threads test the pending receive
_SEND_GRACE_S = 5.0  # how long a stopping rank waits for its STOP sends to complete
# MPI_Finalize may hang when a peer rank died (Open MPI fences with every rank): past this many
# seconds after a rank stopped serving, it leaves without finalizing, with the same exit code.
_FINALIZE_TIMEOUT_S = float(os.environ.get("JOBQUEUE_MS_MPI_FINALIZE_TIMEOUT", "10"))


class StartupError(RuntimeError):
    """Some rank could not start (no such interface, a scheduler that cannot bind...).

    Raised on every rank alike, after the exchange, with every rank's reason.
    """


# ============================================================================ where to listen


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _routable(address: str) -> bool:
    """An IPv4 address other hosts may reach: not loopback, link-local or unspecified."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.version == 4 and not (ip.is_loopback or ip.is_link_local or ip.is_unspecified)


def choose_host(
    hostname_address: str | None,
    interface_addresses: Sequence[str],
    single_host: bool | None,
) -> str:
    """The address this rank listens on and advertises, when none was given (pure).

    ``hostname_address`` is what the hostname resolves to (None: it does not resolve),
    ``interface_addresses`` this host's IPv4 addresses in interface order, ``single_host``
    whether every rank of the world runs on this host (None: unknown).

    The hostname's address wins unless it is loopback: Debian-style ``/etc/hosts`` maps the
    hostname to 127.0.1.1, where ranks on other nodes cannot connect. Then loopback is kept
    only when every rank is known to be on this host; otherwise the first routable address of
    an interface is used (it works from this host too), and loopback only if there is none.

    >>> choose_host("10.1.2.3", ["10.1.2.3"], None)
    '10.1.2.3'
    >>> choose_host("127.0.1.1", ["127.0.0.1", "10.1.2.3"], False)
    '10.1.2.3'
    >>> choose_host("127.0.1.1", ["127.0.0.1", "10.1.2.3"], True)
    '127.0.1.1'
    """
    if hostname_address and not _is_loopback(hostname_address):
        return hostname_address
    if single_host:
        return hostname_address or "127.0.0.1"
    for address in interface_addresses:
        if _routable(address):
            return address
    return hostname_address or "127.0.0.1"


def single_host_hint(env: Mapping[str, str], world_size: int) -> bool | None:
    """Whether every rank runs on this host, from what the launcher exported (pure).

    Open MPI sets ``OMPI_COMM_WORLD_LOCAL_SIZE`` and MPICH's hydra ``MPI_LOCALNRANKS`` (ranks on
    this node); ``srun`` sets ``SLURM_STEP_NUM_NODES``. None when no launcher said.

    >>> single_host_hint({"MPI_LOCALNRANKS": "4"}, 4), single_host_hint({"MPI_LOCALNRANKS": "2"}, 4)
    (True, False)
    >>> single_host_hint({"SLURM_STEP_NUM_NODES": "2"}, 4), single_host_hint({}, 4)
    (False, None)
    """
    for key in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        value = env.get(key, "")
        if value.isdigit():
            return int(value) >= world_size
    nodes = env.get("SLURM_STEP_NUM_NODES", "")
    if nodes.isdigit():
        return int(nodes) == 1
    return None


def interface_address(interface: str) -> str:
    """The IPv4 address of network interface ``interface`` on this host (e.g. ``ib0``).

    Raises
    ------
    ValueError
        No such interface, or it has no IPv4 address; the message lists the interfaces.
    """
    from .netif import InterfaceError, ipv4_address

    try:
        return ipv4_address(interface)
    except InterfaceError as exc:
        raise ValueError(
            f"{exc}. Pass one of them (--interface ib0) or an address (--host 10.0.0.5)"
        ) from None


def _interface_addresses() -> list[str]:
    """This host's IPv4 addresses, interfaces that are up first."""
    try:
        import psutil

        stats = psutil.net_if_stats()
        found = [
            (not (stats.get(name) and stats[name].isup), str(a.address))
            for name, addrs in psutil.net_if_addrs().items()
            for a in addrs
            if a.family == socket.AF_INET
        ]
    except Exception:  # noqa: BLE001 - no psutil answer: fall back to the hostname
        return []
    return [address for _, address in sorted(found, key=lambda x: x[0])]


def host_address(
    host: str | None = None,
    interface: str | None = None,
    world_size: int = 1,
    env: Mapping[str, str] | None = None,
) -> str:
    """The address other ranks reach this one at.

    In order: ``host``, the address of ``interface``, ``$JOBQUEUE_MS_MPI_HOST``,
    ``$JOBQUEUE_MS_MPI_INTERFACE``, else :func:`choose_host` over the hostname's address and
    this host's interfaces. Each rank evaluates this itself, so an interface name gives every
    node its own address.
    """
    env = os.environ if env is None else env
    if host:
        return host
    if interface:
        return interface_address(interface)
    if env.get("JOBQUEUE_MS_MPI_HOST"):
        return env["JOBQUEUE_MS_MPI_HOST"]
    if env.get("JOBQUEUE_MS_MPI_INTERFACE"):
        return interface_address(env["JOBQUEUE_MS_MPI_INTERFACE"])
    try:
        hostname_address: str | None = socket.gethostbyname(socket.gethostname())
    except OSError:
        hostname_address = None
    if hostname_address and not _is_loopback(hostname_address):
        return hostname_address
    return choose_host(hostname_address, _interface_addresses(), single_host_hint(env, world_size))


# ============================================================================ the bootstrap


@dataclass
class _Options:
    n_schedulers: int = 1
    threads_per_worker: int = 1
    memory_limit: str | None = None
    client_rank: int | None = None
    workers_everywhere: bool = False
    scheduler_file: str | None = None
    host: str | None = None
    interface: str | None = None
    has_client: bool = True
    insecure_plaintext: bool = False


_client: Client | None = None
_addresses: list[str] = []


def client() -> Client:
    """The ready :class:`Client` of the client rank (after the bootstrap or ``initialize()``)."""
    if _client is None:
        raise RuntimeError(
            "no MPI bootstrap client in this process: run the script with "
            "`mpirun -n K python -m jobqueue_ms.mpi script.py` or call "
            "jobqueue_ms.mpi.initialize() first (only the client rank has a client)"
        )
    return _client


def scheduler_addresses() -> list[str]:
    """Addresses of every scheduler of the bootstrap (empty before it ran)."""
    return list(_addresses)


class _Node:
    """What one rank runs: maybe a scheduler, maybe a worker; and the STOP watcher."""

    def __init__(self, comm: Any, role: Role, opts: _Options) -> None:
        self.comm = comm
        self.role = role
        self.opts = opts
        self.rank: int = comm.Get_rank()
        self.size: int = comm.Get_size()
        self.host = ""  # found in start(), so that a failure is reported through the exchange
        self.scheduler: Any = None
        self.worker: Any = None
        self.worker_thread: threading.Thread | None = None
        self.addresses: list[str] = []
        self.cluster_id = ""
        self.security: Any = None
        self.exit_code = 0
        self.stopped = threading.Event()  # set when this rank must stop serving
        self.watcher: threading.Thread | None = None
        self._stop_sent: set[int] = set()
        self._wrote_scheduler_file = False

    # -------------------------------------------------------------- startup
    def start(self) -> None:
        """Share the keys, start the scheduler (if any), exchange addresses, start the worker.

        Rank 0 broadcasts the cluster id and the cluster's keys (made in memory; MPI is the
        allocation's private channel), so every scheduler listens with them from the start.
        Then the one address exchange: an ``allgather`` of (scheduler index, address, error).
        """
        from .runtime.malloc import pin_mmap_threshold
        from .runtime.scheduler import Scheduler
        from .runtime.security import Security, set_process_default

        if self.role.kind != "client":  # our process, not the user's script
            pin_mmap_threshold()
        shared = None
        if self.rank == 0:
            keys = None if self.opts.insecure_plaintext else Security.new().material()
            shared = (f"mpi-{uuid.uuid4().hex[:8]}", keys)
        self.cluster_id, keys = self.comm.bcast(shared, root=0)
        self.security = Security(*keys) if keys else Security.insecure_plaintext()
        set_process_default(self.security)  # what a plain Client() in the script uses
        address: str | None = None
        error: str | None = None
        try:
            self.host = host_address(self.opts.host, self.opts.interface, self.size)
            if self.role.kind == "scheduler":
                self.scheduler = Scheduler(
                    host=self.host, port=0, cluster_id=self.cluster_id, security=self.security
                )
                address = self.scheduler.start()
        except Exception as exc:  # reported on every rank below
            error = f"rank {self.rank}: {exc}"
        entry = (self.role.scheduler_index, address, error)
        gathered = self.comm.allgather(entry)  # the one address exchange
        errors = [e[2] for e in gathered if e[2]]
        if errors:
            if self.scheduler is not None:
                self.scheduler.stop()
            raise StartupError("startup failed: " + "; ".join(errors))
        found = sorted((e[0], e[1]) for e in gathered if e[0] is not None and e[1])
        self.addresses = [a for _, a in found]
        if self.role.runs_worker:
            self._start_worker()
        if self.role.kind != "client":
            self.watcher = threading.Thread(target=self._watch, name="jqms-mpi-watch", daemon=True)
            self.watcher.start()

    def _start_worker(self) -> None:
        from .deploy.leftovers import sweep
        from .runtime.worker import Worker

        sweep()  # what SIGKILLed ranks of earlier jobs left here (their same-host socket dirs)
        self.worker = Worker(
            self.addresses,
            nthreads=self.opts.threads_per_worker,
            memory_limit=self.opts.memory_limit,
            name=f"mpi-rank-{self.rank}",
            host=self.host,
            security=self.security,
        )
        self.worker_thread = threading.Thread(
            target=self._run_worker, name="jqms-mpi-worker", daemon=True
        )
        self.worker_thread.start()

    def _run_worker(self) -> None:
        try:
            self.worker.run()
        except Exception:
            log.exception("worker on rank %d failed", self.rank)
        finally:
            if self.role.kind == "worker":
                self.stopped.set()

    # -------------------------------------------------------------- stop protocol
    def _watch(self) -> None:
        """Poll one non-blocking receive for STOP; never block in MPI while serving."""
        from mpi4py import MPI

        req = self.comm.irecv(source=MPI.ANY_SOURCE, tag=STOP_TAG)
        while not self.stopped.is_set():
            done, code = req.test()
            if done:
                self.exit_code = int(code)
                self.stopped.set()
                return
            if self.scheduler is not None and not self.scheduler._running:
                # our scheduler was shut down by an admin (service mode): stop everyone
                self.send_stop(0)
                self.stopped.set()
            time.sleep(_POLL_S)
        try:
            req.Cancel()
            req.Free()
        except Exception:  # pragma: no cover - best effort; the process is leaving
            pass

    def send_stop(self, code: int, ranks: list[int] | None = None) -> None:
        """Tell other ranks to stop; wait a little for the sends, never for dead ranks."""
        targets = [
            r
            for r in (range(self.size) if ranks is None else ranks)
            if r != self.rank and r not in self._stop_sent
        ]
        self._stop_sent.update(targets)
        pending = [self.comm.isend(int(code), dest=r, tag=STOP_TAG) for r in targets]
        deadline = time.monotonic() + _SEND_GRACE_S
        while pending and time.monotonic() < deadline:
            pending = [r for r in pending if not r.test()[0]]
            if pending:
                time.sleep(0.01)

    def stop_all(self, code: int) -> None:
        """Stop worker ranks first (they leave the schedulers cleanly), then everyone else."""
        worker_ranks = [r for r in range(self.size) if self._role_of(r).kind == "worker"]
        self.send_stop(code, worker_ranks)
        if worker_ranks and self.addresses:
            from .runtime.admin import SchedulerAdmin

            admin = SchedulerAdmin(self.addresses, timeout=1.0, security=self.security)
            try:
                deadline = time.monotonic() + 2 * _POLL_S + 2.0
                while time.monotonic() < deadline:
                    infos = admin.info(timeout=1.0)
                    if not any(
                        w["name"] == f"mpi-rank-{r}"
                        for i in infos
                        for w in i["workers"]
                        for r in worker_ranks
                    ):
                        break
                    time.sleep(0.02)
            finally:
                admin.close()
        self.send_stop(code)

    def _role_of(self, rank: int) -> Role:
        o = self.opts
        return role_for(
            rank,
            self.size,
            o.n_schedulers,
            o.client_rank,
            o.workers_everywhere,
            has_client=o.has_client,
        )

    def shutdown_local(self) -> None:
        """Stop this rank's worker and scheduler."""
        if self.worker is not None:
            self.worker.stop()
            if self.worker_thread is not None:
                self.worker_thread.join(10)
        if self.scheduler is not None:
            self.scheduler.stop()

    def serve(self) -> int:
        """Serve until STOP (or a signal); return the exit code to use."""
        while not self.stopped.wait(0.2):
            pass
        if self.watcher is not None:
            self.watcher.join(5)  # it cancels its receive: no MPI call pending at finalize
        self.shutdown_local()
        self.remove_scheduler_file()
        if self.role.runs_worker:
            from .deploy.leftovers import sweep

            sweep()  # a peer rank SIGKILLed on this host left its socket directory
        _finalize(self.exit_code)
        return self.exit_code

    def write_scheduler_file(self) -> None:
        """Service mode: scheduler 0 writes the file outside clients read (all N addresses),
        and beside it the key file it names (``<file>.keys``, mode 0600)."""
        if self.opts.scheduler_file and self.role.scheduler_index == 0:
            from .runtime.scheduler import write_scheduler_file

            if self.security.encrypted:
                keyfile = f"{self.opts.scheduler_file}.keys"
                with contextlib.suppress(FileNotFoundError):
                    os.remove(keyfile)  # a previous deployment's, whose keys nobody uses now
                self.security = self.security.save(keyfile)
            write_scheduler_file(
                self.opts.scheduler_file, self.addresses, self.cluster_id, self.security
            )
            self._wrote_scheduler_file = True

    def remove_scheduler_file(self) -> None:
        """Remove the scheduler file we wrote, unless another deployment replaced it since."""
        path = self.opts.scheduler_file
        if not path or not self._wrote_scheduler_file:
            return
        from .runtime.scheduler import read_scheduler_file

        try:
            ours = read_scheduler_file(path).get("cluster_id") == self.cluster_id
        except ValueError:  # gone, or no longer a scheduler file
            return
        if ours:
            with contextlib.suppress(OSError):
                os.remove(path)
            if self.security.path:
                with contextlib.suppress(OSError):
                    os.remove(self.security.path)

    def wait_for_workers(self, timeout: float) -> None:
        """Wait (bounded) until every expected worker registered with the schedulers."""
        from .runtime.admin import SchedulerAdmin

        expected = sum(self._role_of(r).runs_worker for r in range(self.size))
        admin = SchedulerAdmin(self.addresses, timeout=2.0, security=self.security)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                infos = admin.info(timeout=2.0)
                if infos and all(len(i["workers"]) >= expected for i in infos):
                    return
                time.sleep(0.05)
            log.warning("not all %d MPI workers registered within %.0f s", expected, timeout)
        finally:
            admin.close()


def _comm() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "the MPI bootstrap needs mpi4py: pip install 'jobqueue-ms[mpi]' (or mpi4py mpich)"
        ) from exc
    return MPI.COMM_WORLD


def _role(comm: Any, opts: _Options) -> Role:
    """This rank's role; ValueError (the same on every rank) if the world is too small."""
    return role_for(
        comm.Get_rank(),
        comm.Get_size(),
        opts.n_schedulers,
        opts.client_rank,
        opts.workers_everywhere,
        has_client=opts.has_client,
    )


def _bootstrap(opts: _Options, comm: Any, role: Role) -> _Node:
    """Start this rank's part (scheduler and/or worker) after the one exchange."""
    node = _Node(comm, role, opts)
    node.start()
    return node


def _layout_error(comm: Any, exc: Exception) -> int:
    """Say once (rank 0) why the layout does not fit; every rank leaves with code 2."""
    if comm is None or comm.Get_rank() == 0:
        print(f"jobqueue-ms mpi: error: {exc}", file=sys.stderr, flush=True)
    return 2


def _become_client(node: _Node) -> Client:
    from .runtime.client import Client

    global _client, _addresses
    _addresses = list(node.addresses)
    os.environ["JOBQUEUE_MS_SCHEDULER"] = ",".join(node.addresses)
    os.environ.pop("JOBQUEUE_MS_SCHEDULER_FILE", None)
    node.wait_for_workers(timeout=60.0)
    _client = Client(list(node.addresses), security=node.security)
    return _client


def _finish_client(node: _Node, code: int) -> None:
    """Close the client, tell every rank to stop with ``code``, stop our own services."""
    global _client
    if _client is not None:
        try:
            _client.shutdown(wait=False, cancel_futures=True)
        except Exception:  # pragma: no cover - best effort
            log.exception("closing the MPI client failed")
        _client = None
    node.stop_all(code)
    node.shutdown_local()
    _finalize(code)


def _libmpi() -> Any:
    """The MPI library this process loaded (through mpi4py), opened with ctypes; or None."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f}
    except OSError:
        return None
    for path in sorted(p for p in paths if os.path.basename(p).startswith("libmpi.so")):
        with contextlib.suppress(OSError):
            return ctypes.CDLL(path)
    return None


def _finalize(code: int) -> None:
    """Arm the exit watchdog (leave with ``code``), then MPI_Finalize without holding the GIL.

    mpi4py finalizes at interpreter exit, after Python is torn down, and holds the GIL during
    MPI_Finalize: when that never returns (Open MPI fencing with a rank that died, seen about
    once in three runs of test_mpi.py), no Python thread runs again and the rank hangs for good.
    Called through ctypes the library runs without the GIL, so the watchdog can fire. mpi4py
    then sees MPI finalized and does nothing.
    """
    from mpi4py import MPI

    _arm_exit_watchdog(code)
    if not MPI.Is_initialized() or MPI.Is_finalized():
        return
    lib = _libmpi()
    if lib is None:  # pragma: no cover - not Linux, or a static MPI: mpi4py's way
        MPI.Finalize()
        return
    lib.MPI_Finalize()


def _arm_exit_watchdog(code: int) -> None:
    """Leave with ``code`` if the process is still alive (e.g. stuck in MPI_Finalize) later."""

    def leave() -> None:
        print(
            f"jobqueue-ms mpi: MPI_Finalize did not return within {_FINALIZE_TIMEOUT_S:g} s "
            "(a peer rank probably died); leaving without it",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(code)

    t = threading.Timer(_FINALIZE_TIMEOUT_S, leave)
    t.daemon = True
    t.start()


def _run_script(path: str, args: list[str]) -> int:
    """Run ``path`` as ``__main__`` with ``sys.argv`` set; return its exit code."""
    old_argv = sys.argv
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        runpy.run_path(path, run_name="__main__")
        return 0
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.argv = old_argv
        sys.stdout.flush()
        sys.stderr.flush()


def _install_signal_handlers(node: _Node) -> None:
    def handler(signum: int, frame: Any) -> None:
        node.exit_code = 0
        node.stopped.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# ============================================================================ in-script form


def initialize(
    n_schedulers: int = 1,
    threads_per_worker: int = 1,
    memory_limit: str | None = None,
    client_rank: int | None = None,
    workers_everywhere: bool = False,
    host: str | None = None,
    interface: str | None = None,
    insecure_plaintext: bool = False,
) -> Client:
    """Turn an ``mpirun``-started script into a deployment; only the client rank returns.

    Every other rank serves (scheduler and/or worker) and calls ``sys.exit`` with the client
    rank's exit code once the client rank finishes (an ``atexit`` hook there sends the stop):
    0, the code given to ``sys.exit(n)``, or 1 after an uncaught exception (its traceback is
    printed by the client rank). A world too small for the layout prints one line (rank 0)
    and every rank exits with code 2.

    Examples
    --------
    >>> from jobqueue_ms.mpi import initialize
    >>> client = initialize(n_schedulers=2)      # doctest: +SKIP
    >>> client.submit(sum, [1, 2]).result()      # doctest: +SKIP
    3
    """
    opts = _Options(
        n_schedulers=n_schedulers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit,
        client_rank=client_rank,
        workers_everywhere=workers_everywhere,
        host=host,
        interface=interface,
        insecure_plaintext=insecure_plaintext,
    )
    comm = _comm()
    try:
        role = _role(comm, opts)
    except ValueError as exc:
        sys.exit(_layout_error(comm, exc))
    node = _bootstrap(opts, comm, role)
    if node.role.kind != "client":
        _install_signal_handlers(node)
        sys.exit(node.serve())
    c = _become_client(node)
    exit_code = _track_exit_code()
    atexit.register(lambda: _finish_client(node, exit_code()))
    return c


def exit_code_of(code: object) -> int:
    """The process exit status Python gives ``sys.exit(code)`` (None 0, an int itself, else 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return int(code) & 0xFF
    return 1


def _track_exit_code() -> Any:
    """Record how the script ends, for the atexit hook that stops every rank with that code.

    An ``atexit`` hook cannot see the code the interpreter will exit with, so ``sys.exit`` is
    wrapped (it records its argument, from the main thread) and ``sys.excepthook`` records 1 for
    an uncaught exception (130 for KeyboardInterrupt). ``raise SystemExit(n)`` written out
    bypasses the wrapper: use ``sys.exit(n)``. Returns a function giving the code so far.
    """
    state = {"code": 0}
    real_exit, prev_hook = sys.exit, sys.excepthook

    def exit(code: object = None) -> None:  # noqa: A001 - stands in for sys.exit
        if threading.current_thread() is threading.main_thread():
            state["code"] = exit_code_of(code)
        real_exit(code)

    def excepthook(t: Any, v: Any, tb: Any) -> None:
        state["code"] = 130 if issubclass(t, KeyboardInterrupt) else 1
        prev_hook(t, v, tb)

    sys.exit = exit
    sys.excepthook = excepthook
    return lambda: state["code"]


# ============================================================================ command line


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run schedulers, workers and a client script inside one MPI allocation.",
    )
    p.add_argument("--schedulers", type=int, default=1, metavar="N", help="scheduler ranks")
    p.add_argument("--threads-per-worker", type=int, default=1, metavar="T")
    p.add_argument("--memory-limit", default=None, metavar="M", help="per worker, e.g. 4GiB")
    p.add_argument("--client-rank", type=int, default=None, metavar="R")
    p.add_argument(
        "--workers-everywhere",
        action="store_true",
        help="also run a worker on the scheduler and client ranks",
    )
    p.add_argument(
        "--host",
        default=None,
        help="address to listen on and advertise (default: see docs/mpi.md, 'Where ranks listen')",
    )
    p.add_argument(
        "--interface",
        default=None,
        metavar="IF",
        help="listen on this network interface's address (e.g. ib0), looked up on each rank",
    )
    p.add_argument(
        "--no-script", action="store_true", help="service mode: serve, write --scheduler-file"
    )
    p.add_argument("--scheduler-file", default=None, metavar="F")
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="NO encryption or authentication between the ranks' processes (docs/security.md)",
    )
    p.add_argument("script", nargs="?", help="the client script")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m jobqueue_ms.mpi") -> int:
    """Entry of ``python -m jobqueue_ms.mpi`` and ``jobqueue-ms mpi``; returns the exit code."""
    p = _parser(prog)
    a = p.parse_args(argv)
    if a.no_script:
        if a.script:
            p.error("--no-script takes no script")
        if not a.scheduler_file:
            p.error(
                "--no-script needs --scheduler-file F (how outside clients find the schedulers)"
            )
    elif not a.script:
        p.error("give a script to run (or --no-script --scheduler-file F for service mode)")
    opts = _Options(
        n_schedulers=a.schedulers,
        threads_per_worker=a.threads_per_worker,
        memory_limit=a.memory_limit,
        client_rank=a.client_rank,
        workers_everywhere=a.workers_everywhere,
        scheduler_file=a.scheduler_file,
        host=a.host,
        interface=a.interface,
        has_client=not a.no_script,
        insecure_plaintext=a.insecure_plaintext,
    )
    comm = None
    try:
        comm = _comm()
        role = _role(comm, opts)
    except (ValueError, ImportError) as exc:
        return _layout_error(comm, exc)
    try:
        node = _bootstrap(opts, comm, role)
    except StartupError as exc:  # every rank has the same message: say it once
        if comm.Get_rank() == 0:
            print(f"jobqueue-ms mpi: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        print(f"jobqueue-ms mpi: error on rank {comm.Get_rank()}: {exc}", file=sys.stderr)
        return 1
    if node.role.kind != "client":
        _install_signal_handlers(node)
        node.write_scheduler_file()
        if node.role.scheduler_index == 0 and opts.scheduler_file:
            print(f"jobqueue-ms mpi: schedulers at {', '.join(node.addresses)}", flush=True)
        return node.serve()
    code = 1
    try:
        _become_client(node)
        code = _run_script(a.script, a.args)
    except Exception:
        traceback.print_exc()
        code = 1
    finally:
        _finish_client(node, code)
    return code


if __name__ == "__main__":
    # run the imported module, not this __main__ copy: scripts use jobqueue_ms.mpi.client()
    from jobqueue_ms.mpi import main as _main

    sys.exit(_main())
