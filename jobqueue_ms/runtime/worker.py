"""One worker: serves every scheduler it is given and runs their tasks in a thread pool.

The worker owns its capacity (``nthreads`` slots plus a small, adaptive prefetch) and *leases*
slots to schedulers. The sum of what is leased out, queued and running never exceeds that
capacity, so serving N schedulers never means running more than ``nthreads`` tasks at once.

Sharing: free slots go first to schedulers that say they have ready work, the one that used the
least worker time recently first (decayed busy-seconds), so two saturated schedulers get equal
shares. An idle worker *parks* single slots at idle schedulers so a new task starts without a
round trip; a parked slot is revoked when another scheduler has work.

Tiny tasks run on the I/O thread. Handing a task to an executor thread and its result back costs
two thread wake-ups, which for a sub-millisecond task is most of the worker's share of a round
trip. So a task whose function's last ``INLINE_AFTER_RUNS`` runs each took under
``inline_max_s`` (0.5 ms by default), arriving at a worker with nothing else queued or running,
runs on the I/O thread itself. Should it run long after all, a standby thread takes the I/O loop
over after ``RELIEF_AFTER_S`` (heartbeats, leases and the data port go on), one executor thread
waits until the task ends (so never more than ``nthreads`` tasks run at once), and a function
that once ran that long never runs inline again.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import pickle
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from typing import Any

import zmq

from . import localdata, protocol
from .protocol import (
    D_ERROR,
    D_INLINE,
    D_STORED,
    R_INLINE,
    R_REMOTE,
    Kind,
    ProtocolError,
    dumps_user,
    loads_control,
    pack,
    send_nowait,
    waiting,
)
from .security import Guard, Security, describe_handshake_failure, watch_handshakes
from .wakeup import Wakeup

log = logging.getLogger("jobqueue_ms.worker")

MAX_REPLY_SOCKETS = 32  # clients on this host a worker keeps a direct-result socket to
EXIT_OK = 0  # retired or lifetime reached: do not restart
EXIT_FATAL = 3  # misconfiguration (e.g. version mismatch): do not restart
PREFETCH_WINDOW_S = 0.002  # queue at most this much work per thread beyond the running tasks
MAX_PREFETCH_PER_THREAD = 256
USAGE_HALF_LIFE_S = 2.0
INLINE_MAX_S = 0.0005  # default: a function whose last runs each took less than this ...
INLINE_AFTER_RUNS = 3  # ... this many of them, may run on the I/O thread (see the module's text)
RELIEF_AFTER_S = 0.05  # an inline run longer than this hands the I/O loop to the standby thread


class _SchedulerLink:
    """The worker's view of one scheduler: socket, lease, work hint, recent usage."""

    def __init__(self, index: int, address: str, sock: zmq.Socket[Any]) -> None:
        self.index = index
        self.address = address
        self.sock = sock
        self.scheduler_id: str | None = None
        self.state = "connecting"  # connecting | ready | lost
        self.lease = 0  # slots granted and not yet used or returned
        self.lease_resources: dict[str, float] = {}
        self.has_work = 0
        self.wants_resources: dict[str, float] = {}  # what its ready tasks ask for
        self.revoking = False
        self.usage = 0.0  # decayed busy seconds spent on this scheduler's tasks
        self.usage_t = time.monotonic()
        self.last_recv = time.monotonic()
        self.last_send = 0.0
        self.last_hello = 0.0
        self.hello_id = 0  # the scheduler echoes it: only the answer to the latest hello counts
        self.hello_sent = False
        self.monitor: Any = None
        self.refusal: str | None = None
        self.done: list[tuple[Any, ...]] = []
        self.started: list[int] = []
        self.inflight: set[int] = set()  # its tasks here, queued, fetching inputs or running
        self.dropped: set[int] = set()  # queued tasks not to start (the executors skip them)
        self.goodbye = False
        self.pending_grant: tuple[int, dict[str, float]] | None = None

    def decayed_usage(self, now: float) -> float:
        self.usage *= 0.5 ** ((now - self.usage_t) / USAGE_HALF_LIFE_S)
        self.usage_t = now
        return self.usage


class _Item:
    """A task inside the worker."""

    __slots__ = (
        "link",
        "key",
        "fhash",
        "func",
        "payload",
        "deps",
        "resources",
        "waiting",
        "values",
        "reply",
    )

    def __init__(
        self,
        link: _SchedulerLink,
        key: int,
        fhash: bytes,
        func: Any,
        payload: bytes,
        deps: Any,
        resources: dict[str, float] | None,
    ) -> None:
        self.link = link
        self.key = key
        self.fhash = fhash
        self.func = func
        self.payload = payload
        self.deps = deps
        self.resources = resources
        self.waiting = 0  # remote inputs not fetched yet
        self.values: dict[int, Any] = {}
        self.reply: tuple[str, int] | None = None  # (client's same-host socket, its key)


class _ArgsUnpickler(pickle.Unpickler):
    """Loads a task's arguments, substituting its inputs for the client's future references."""

    def __init__(self, data: bytes, values: dict[int, Any]) -> None:
        super().__init__(io.BytesIO(data))
        self._values = values

    def persistent_load(self, pid: Any) -> Any:
        return self._values[pid[1]]


class Worker:
    """A jobqueue-ms worker.

    Parameters
    ----------
    schedulers:
        Addresses (``tcp://host:port``) of every scheduler to serve.
    nthreads:
        Tasks run at most this many at a time, across all schedulers.
    memory_limit:
        Bytes (or "4GiB"). At 80 % the worker pauses: it takes no new work until below 70 %.
    name, job:
        How the worker is known to schedulers and to the cluster that started it.
    resources:
        Abstract resources, e.g. ``{"GPU": 2}``; tasks that ask for them are leased accordingly.
    lifetime:
        Seconds until the worker drains and leaves by itself (a job's walltime, minus margin).
    lifetime_end:
        The same as an absolute time (epoch seconds); the nanny passes it to restarted workers.
    host:
        Address to bind the data port to (what peers and clients connect to).
    security:
        The cluster's keys or key file path (see :class:`~jobqueue_ms.runtime.security.Security`);
        None: those of schedulers started in this process, else ``$JOBQUEUE_MS_KEYFILE``.
    parent_pid:
        Stop as soon as this process is no longer our parent (the nanny, or the cluster that
        started us, was killed): a worker is never left behind serving nobody's cluster.
    scheduler_lost_timeout:
        Seconds without any registered scheduler after which the worker leaves (exit code 0: a
        batch job then ends instead of burning its allocation). None: wait for them forever.
    inline_max_s:
        A function whose last three runs each took less than this (seconds) may run on the
        I/O thread, saving two thread hand-offs per task (see the module's text). 0: never.
        None: ``$JOBQUEUE_MS_INLINE_MAX_S``, else 0.0005.
    local_data_dir:
        A private directory (0700) for the same-host data socket (see
        :mod:`~jobqueue_ms.runtime.localdata`); the nanny passes one and removes it when it ends.
        None: the worker makes its own (and removes it); "": no same-host socket.
    """

    def __init__(
        self,
        schedulers: list[str],
        nthreads: int = 1,
        memory_limit: int | str | None = None,
        name: str | None = None,
        job: str | None = None,
        resources: dict[str, float] | None = None,
        lifetime: float | None = None,
        lifetime_end: float | None = None,
        host: str | None = None,
        heartbeat_interval_s: float | None = None,
        heartbeat_timeout_s: float | None = None,
        inline_result_limit: int = 64 * 1024,
        security: Security | str | None = None,
        parent_pid: int | None = None,
        scheduler_lost_timeout: float | None = None,
        inline_max_s: float | None = None,
        local_data_dir: str | None = None,
    ) -> None:
        from ..units import parse_memory

        if not schedulers:
            raise ValueError("a worker needs at least one scheduler address (tcp://host:port)")
        if nthreads < 1:
            raise ValueError(f"nthreads={nthreads!r} must be a positive integer")
        self.scheduler_addresses = list(dict.fromkeys(schedulers))
        self.security = Security.coerce(security, self.scheduler_addresses)
        self._frame_budget = protocol.frame_budget(self.security.max_message_bytes)
        self.nthreads = nthreads
        self.memory_limit = (
            parse_memory(memory_limit, "memory_limit") if memory_limit is not None else None
        )
        self.name = name or f"worker-{socket.gethostname()}-{os.getpid()}"
        self.job = job
        self.resources = dict(resources or {})
        # an absolute end (epoch) wins: a nanny restarting the worker keeps the job's end
        self.lifetime_end = lifetime_end or (time.time() + lifetime if lifetime else None)
        self.host = host or "127.0.0.1"
        self.heartbeat_interval_s = heartbeat_interval_s or float(
            os.environ.get("JOBQUEUE_MS_HEARTBEAT_INTERVAL", "0.5")
        )
        self.heartbeat_timeout_s = heartbeat_timeout_s or float(
            os.environ.get("JOBQUEUE_MS_HEARTBEAT_TIMEOUT", "10")
        )
        self.inline_result_limit = inline_result_limit
        self.parent_pid = parent_pid
        if scheduler_lost_timeout is not None and not scheduler_lost_timeout > 0:
            raise ValueError(f"scheduler_lost_timeout={scheduler_lost_timeout!r} must be > 0 s")
        self.scheduler_lost_timeout = scheduler_lost_timeout
        if inline_max_s is None:
            raw = os.environ.get("JOBQUEUE_MS_INLINE_MAX_S", str(INLINE_MAX_S))
            try:
                inline_max_s = float(raw)
            except ValueError:
                raise ValueError(
                    f"JOBQUEUE_MS_INLINE_MAX_S={raw!r} must be a number of seconds (0: off)"
                ) from None
        if not inline_max_s >= 0:
            raise ValueError(f"inline_max_s={inline_max_s!r} must be >= 0 seconds (0: off)")
        self.inline_max_s = inline_max_s
        self._last_served = time.monotonic()  # when some scheduler was last registered
        self.exit_code = EXIT_OK
        self.data_address = ""
        self.local_address = ""  # the same-host data socket (ipc://...), if any
        self._local_dir = local_data_dir
        self._own_local_dir = False
        self._local_sock: zmq.Socket[Any] | None = None
        self._served = {"tcp": 0, "local": 0, "redirected": 0}  # GETs answered, by way
        self.store: dict[tuple[str, int], Any] = {}
        self.store_nbytes: dict[tuple[str, int], int] = {}
        self._links: list[_SchedulerLink] = []
        # items to run; None stops an executor thread, an Event holds one until it is set
        self._queue: queue.SimpleQueue[_Item | threading.Event | None] = queue.SimpleQueue()
        self._results: deque[tuple[Any, ...]] = deque()
        self._started: deque[tuple[_SchedulerLink, int]] = deque()
        self._queued = 0  # in _queue or being fetched
        self._active = 0  # tasks executing right now (exact; under _active_lock)
        self._active_lock = threading.Lock()
        self._peak_running = 0
        self._executed: dict[str, int] = {}
        self._res_used: dict[str, float] = {}
        self._duration = 0.0  # EWMA of task durations; 0 = unknown
        # Inline runs (see the module's text). Only the I/O thread touches _inline, _deferred
        # and _fast; _inline_since and _relief change under _inline_lock, which is also what
        # hands the sockets from one I/O thread to the other.
        self._fast: dict[bytes, int] = {}  # fast runs in a row, per function; -1: never inline
        self._inline: _Item | None = None  # chosen to run inline once the socket is drained
        self._deferred: list[_Item] = []  # arrived while it was chosen: queued after it
        self._inline_lock = threading.Lock()
        self._inline_since = 0.0  # when the inline run began; 0: none is running
        self._relief: threading.Event | None = None  # set by the standby: it has taken over
        self._standby_thread: threading.Thread | None = None
        self._finished = threading.Event()  # the I/O loop has ended
        self._loop_error: BaseException | None = None
        self._next_tick = 0.0
        self._inline_runs = 0
        self._reliefs = 0
        self._funcs: dict[bytes, Any] = {}
        self._fetching: dict[int, tuple[Any, list[_Item], list[tuple[str, int]], float]] = {}
        self._reply_socks: dict[str, Any] = {}  # client reply address -> socket (None: refused)
        self._peers: dict[str, zmq.Socket[Any]] = {}  # data address -> the socket we use now
        self._peer_address: dict[Any, str] = {}  # every peer socket opened -> its data address
        self._settled: set[Any] = set()  # on a same-host socket, or TCP after a refused offer
        self._req = itertools.count(1)
        self._stop = False
        self._retiring = False
        self._paused = False
        self._retire_deadline = 0.0
        self._retire_sent = False
        self._last_busy = time.monotonic()
        self._dropped_frames = 0
        self._memory = 0
        self._proc: Any = None
        self._handlers = {
            Kind.WELCOME: self._on_welcome,
            Kind.REFUSED: self._on_refused,
            Kind.HEARTBEAT: self._on_have_work,  # carries the scheduler's ready count
            Kind.TASKS: self._on_tasks,
            Kind.HAVE_WORK: self._on_have_work,
            Kind.RETURNED: self._on_returned,
            Kind.RELEASE: self._on_release,
            Kind.DROP: self._on_drop,
            Kind.REPLICATE: self._on_replicate,
            Kind.RETIRE: self._on_retire,
            Kind.GOODBYE: self._on_goodbye,
        }

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        """Serve until retired, expired or stopped; return the process exit code."""
        self._ctx = zmq.Context()
        self._wakeup = Wakeup()
        self._data = self.security.socket(self._ctx, zmq.ROUTER, server=True)
        self._guard = Guard(self._ctx, self.security, [self._data])  # before bind: no gap
        port = self._data.bind_to_random_port(f"tcp://{self.host}")
        self.data_address = f"tcp://{self.host}:{port}"
        self._poller = zmq.Poller()
        self._poller.register(self._data, zmq.POLLIN)
        self._poller.register(self._wakeup.fd, zmq.POLLIN)
        self._listen_locally()
        self._sock_link: dict[Any, _SchedulerLink] = {}
        self._monitor_link: dict[Any, _SchedulerLink] = {}
        for i, address in enumerate(self.scheduler_addresses):
            sock = self.security.socket(self._ctx, zmq.DEALER, server=False)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            link = _SchedulerLink(i, address, sock)
            link.monitor = watch_handshakes(sock)
            sock.connect(address)
            self._links.append(link)
            self._sock_link[sock] = link
            self._monitor_link[link.monitor] = link
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(link.monitor, zmq.POLLIN)
        threads = [
            threading.Thread(target=self._execute_loop, name=f"jqms-exec-{i}", daemon=True)
            for i in range(self.nthreads)
        ]
        for t in threads:
            t.start()
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:  # pragma: no cover
            self._proc = None
        self._tick(time.monotonic())  # say hello before the first wait
        self._next_tick = time.monotonic() + self.heartbeat_interval_s
        io_thread = threading.Thread(target=self._serve, args=(False,), name="jqms-io", daemon=True)
        try:
            # The I/O loop runs on its own thread: one stuck in a long inline task must not keep
            # this one (signals, and the return of run()) waiting.
            io_thread.start()
            try:
                self._finished.wait()
            except BaseException:  # Ctrl-C in a worker run in the foreground: leave properly
                self.stop()
                self._finished.wait(5)
                raise
            if self._loop_error is not None:
                raise self._loop_error
        finally:
            for _ in threads:
                self._queue.put(None)
            for link in self._links:
                if link.state == "ready":
                    self._send(link, Kind.GOODBYE, {"name": self.name})
            for lk in self._links:
                lk.sock.disable_monitor()
                lk.monitor.close(linger=0)
            for s in [*self._peer_address, *(lk.sock for lk in self._links), self._data]:
                s.close(linger=100)
            for s in self._reply_socks.values():
                if s is not None:
                    s.close(linger=0)
            self._close_local()
            self._ctx.term()
            self._wakeup.close()
        return self.exit_code

    def _listen_locally(self) -> None:
        """Open the same-host data socket (runtime/localdata.py), unless it is turned off."""
        if self._local_dir == "" or not localdata.enabled():
            return
        if self._local_dir is None:
            self._local_dir = localdata.make_dir()
            self._own_local_dir = self._local_dir is not None
        if not self._local_dir:
            return
        try:
            self._local_sock = localdata.listen(
                self._ctx, self._local_dir, self.security.max_message_bytes
            )
        except (OSError, zmq.ZMQError) as exc:
            log.warning("no same-host data socket in %s (%s); TCP only", self._local_dir, exc)
            return
        self.local_address = localdata.endpoint(self._local_dir)
        self._poller.register(self._local_sock, zmq.POLLIN)

    def _close_local(self) -> None:
        if self._local_sock is not None:
            self._local_sock.close(linger=0)
        if self._own_local_dir:
            localdata.remove_dir(self._local_dir)
        elif self.local_address:  # the nanny's directory: it removes that, we our socket
            try:
                os.unlink(self.local_address[len("ipc://") :])
            except OSError:
                pass

    def stop(self) -> None:
        """Stop at once (tasks in flight are recovered by the schedulers)."""
        self._stop = True
        self._wake()

    def retire(self) -> None:
        """Drain: stop taking work, finish, hand off stored results, leave every scheduler."""
        if not self._retiring:
            log.info("worker %s retiring", self.name)
            self._retiring = True
            self._retire_deadline = time.monotonic() + max(60.0, 3 * self.heartbeat_timeout_s)

    # ------------------------------------------------------------------ I/O loop
    def _serve(self, standing_by: bool) -> None:
        """An I/O thread: run the I/O loop, or stand by to take it over from an inline run."""
        try:
            while not standing_by or self._standby():
                if not self._loop():
                    return  # the worker is finished
                standing_by = True  # relieved during an inline run: the other thread has it
        except BaseException as exc:  # pragma: no cover - a bug; run() re-raises it
            self._loop_error = exc
        finally:
            self._finished.set()

    def _loop(self) -> bool:
        """Receive messages, collect results, rebalance leases, send; check timers.

        Return False when the worker is finished, True when this thread gave the loop up (an
        inline task ran long and the standby thread took over).
        """
        poll = self._poller.poll
        interval_ms = int(self.heartbeat_interval_s * 1000)
        while not self._stop:
            wait_ms = min(interval_ms, int((self._next_tick - time.monotonic()) * 1000) + 1)
            events = poll(timeout=max(0, wait_ms) if not self._results else 0)
            for sock, _ in events:
                if sock == self._wakeup.fd:
                    self._wakeup.drain()
                    continue
                if sock in self._monitor_link:
                    self._on_monitor(self._monitor_link[sock])
                    continue
                self._drain_socket(sock)
            if self._inline is not None and not self._run_inline():
                return True
            self._collect()
            self._rebalance()
            self._flush()
            now = time.monotonic()
            if now >= self._next_tick:
                self._tick(now)
                connecting = any(lk.state != "ready" for lk in self._links)
                self._next_tick = now + (0.05 if connecting else self.heartbeat_interval_s)
            if self._retiring and self._retire_step(now):
                break
        return False

    def _drain_socket(self, sock: Any) -> None:
        """Handle every message waiting on one socket."""
        for frames in waiting(sock):
            try:
                if sock is self._data or sock is self._local_sock:
                    self._on_data_request(sock, frames)
                    continue
                link = self._sock_link.get(sock)
                if link is None:
                    self._on_peer_data(sock, frames)
                    continue
                link.last_recv = time.monotonic()
                kind = frames[0].bytes
                handler = self._handlers.get(kind)
                if handler is None:
                    raise ProtocolError(f"unknown message kind {kind[:20]!r}")
                handler(link, loads_control(frames[1].buffer), frames[2:])
            except Exception as exc:  # noqa: BLE001 - nothing a peer sends may stop the worker
                self._dropped_frames += 1
                if self._dropped_frames <= 10:
                    expected = (ProtocolError, IndexError, KeyError, TypeError, ValueError)
                    log.warning(
                        "dropped a malformed message (logged for the first 10): %s",
                        exc,
                        exc_info=not isinstance(exc, expected),
                    )

    def _send(self, link: _SchedulerLink, kind: bytes, control: Any = None) -> bool:
        try:
            send_nowait(link.sock, pack(kind, control))
        except zmq.ZMQError:
            return False
        link.last_send = time.monotonic()
        return True

    def _wake(self) -> None:
        """Wake the I/O loop from an executor thread (once per batch of results)."""
        self._wakeup.set()

    # ------------------------------------------------------------------ registration
    def _hello(self, link: _SchedulerLink, now: float) -> None:
        link.last_hello = now
        link.hello_id += 1
        link.hello_sent = self._send(
            link,
            Kind.HELLO,
            {
                "role": "worker",
                "versions": protocol.versions(),
                "name": self.name,
                "job": self.job,
                "host": self.host,
                "pid": os.getpid(),
                "nthreads": self.nthreads,
                "resources": self.resources,
                "data_address": self.data_address,
                "memory_limit": self.memory_limit,
                "lifetime_end": self.lifetime_end,
                "hello_id": link.hello_id,
                "boot": localdata.host_token() if localdata.enabled() else "",
                "local_address": self.local_address,
            },
        )
        if not link.hello_sent:
            link.last_hello = now - 0.45  # not connected yet: try again soon

    def _on_welcome(self, link: _SchedulerLink, msg: dict[str, Any], _: Any) -> None:
        """Registered: start with a clean lease.

        Each hello re-registers us from scratch, so an answer to an earlier hello is stale: a
        lease granted on it would be counted by a record the scheduler has already replaced.
        """
        if msg.get("hello_id", link.hello_id) != link.hello_id:
            return
        if link.scheduler_id and link.scheduler_id != msg["scheduler_id"]:
            self._forget_scheduler(link, "scheduler restarted")
        link.scheduler_id = msg["scheduler_id"]
        link.state = "ready"
        link.lease = 0
        link.lease_resources = {}
        link.revoking = False
        log.info("worker %s registered with %s", self.name, link.address)

    def _on_refused(self, link: _SchedulerLink, msg: dict[str, Any], _: Any) -> None:
        """Rejoin a restarted scheduler, or stop on a version mismatch."""
        if msg.get("rejoin"):
            if link.state == "ready":
                self._forget_scheduler(link, "scheduler forgot us")
            link.state = "connecting"
            link.last_hello = 0.0
            return
        log.error("%s", msg.get("reason"))
        print(f"jobqueue-ms worker: {msg.get('reason')}", file=sys.stderr)
        self.exit_code = EXIT_FATAL
        self._stop = True

    def _on_monitor(self, link: _SchedulerLink) -> None:
        """A handshake with a scheduler ended: hello at once, or say why it failed (once) and
        stop if every scheduler refuses us."""
        from zmq.utils.monitor import recv_monitor_message

        event = recv_monitor_message(link.monitor)
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if link.state != "ready" and not link.hello_sent:
                self._hello(link, time.monotonic())  # the one before found no connection
            return
        if link.refusal is not None or link.state == "ready":
            return
        link.refusal = describe_handshake_failure(
            event["event"], event["value"], link.address, self.security
        )
        log.error("worker %s: %s", self.name, link.refusal)
        if all(lk.refusal for lk in self._links):
            print(f"jobqueue-ms worker: {link.refusal}", file=sys.stderr)
            self.exit_code = EXIT_FATAL  # wrong keys do not get better by restarting
            self._stop = True

    def _on_goodbye(self, link: _SchedulerLink, msg: Any, _: Any) -> None:
        """The scheduler finished our hand-off, or is shutting down."""
        if self._retiring:
            link.goodbye = True
            return
        self._forget_scheduler(link, "scheduler said goodbye")
        link.state = "lost"

    def _forget_scheduler(self, link: _SchedulerLink, reason: str) -> None:
        """Drop a gone scheduler's lease, queued work and stored results (others continue)."""
        log.warning("worker %s: lost scheduler %s (%s)", self.name, link.address, reason)
        link.lease = 0
        link.lease_resources = {}
        link.has_work = 0
        link.revoking = False
        link.done.clear()
        link.inflight.clear()
        link.dropped.clear()
        link.started.clear()
        sid = link.scheduler_id
        for k in [k for k in self.store if k[0] == sid]:
            self.store.pop(k, None)
            self.store_nbytes.pop(k, None)
        link.scheduler_id = None

    # ------------------------------------------------------------------ leases
    def _capacity(self) -> int:
        """Slots: threads plus a prefetch sized to ~2 ms of work per thread."""
        d = self._duration
        if d <= 0:
            prefetch = 1
        elif d >= PREFETCH_WINDOW_S:
            prefetch = 0
        else:
            prefetch = min(MAX_PREFETCH_PER_THREAD, int(PREFETCH_WINDOW_S / d))
        return self.nthreads * (1 + prefetch)

    def _rebalance(self) -> None:
        """Grant free slots to schedulers with work, fairly; park idle slots; revoke parked ones."""
        links = [lk for lk in self._links if lk.state == "ready"]
        if not links:
            return
        if self._retiring or self._paused:
            for lk in links:
                if (lk.lease or lk.lease_resources) and not lk.revoking:
                    lk.revoking = True
                    self._send(
                        lk,
                        Kind.REVOKE,
                        {
                            "n": lk.lease,
                            "resources": lk.lease_resources,
                            "retiring": self._retiring,
                        },
                    )
            return
        in_use = self._queued
        leased = sum(lk.lease for lk in links)
        free = self._capacity() - in_use - leased
        wanting = [lk for lk in links if lk.has_work > 0 and not lk.revoking]
        if self.resources and wanting:
            self._reclaim_resources(links, wanting)
        if free <= 0:
            if wanting and not any(lk.lease for lk in wanting):
                # someone has work but every free slot is parked at idle schedulers
                for lk in links:
                    if lk.lease and lk.has_work == 0 and not lk.revoking:
                        lk.revoking = True
                        self._send(
                            lk, Kind.REVOKE, {"n": lk.lease, "resources": lk.lease_resources}
                        )
            if self.resources:  # resources are not slots: hand out free ones anyway
                res_free = self._resources_free(links)
                for lk in wanting:
                    res = self._wanted_share(res_free, lk, wanting)
                    if res:
                        self._grant(lk, 0, res)
            return
        res_free = self._resources_free(links)
        now = time.monotonic()
        if wanting:
            grants: dict[int, int] = {}
            if len(wanting) == 1:
                grants[wanting[0].index] = free
            else:
                load = {lk.index: lk.decayed_usage(now) for lk in wanting}
                unit = self._duration or 0.001
                for _ in range(min(free, 4096)):
                    i = min(load, key=load.__getitem__)
                    grants[i] = grants.get(i, 0) + 1
                    load[i] += unit
                if free > 4096:
                    i = min(load, key=load.__getitem__)
                    grants[i] += free - 4096
            for lk in wanting:
                n = grants.get(lk.index, 0)
                res = self._wanted_share(res_free, lk, wanting)
                if n or res:
                    self._grant(lk, n, res)
        elif in_use == 0:
            # idle: park one slot at each idle scheduler that has none, so work starts at once
            for lk in links:
                if free <= 0:
                    break
                if lk.lease == 0 and not lk.revoking:
                    self._grant(lk, 1, {})
                    free -= 1
            if res_free:
                for lk in links:
                    if not lk.lease_resources and not lk.revoking:
                        self._grant(lk, 0, self._split_resources(res_free, lk, len(links)))
                        break

    def _reclaim_resources(
        self, links: list[_SchedulerLink], wanting: list[_SchedulerLink]
    ) -> None:
        """Revoke resources parked at schedulers that do not need them from one that does."""
        needed = set()
        for lk in wanting:
            for name, amount in lk.wants_resources.items():
                if lk.lease_resources.get(name, 0) < amount:
                    needed.add(name)
        if not needed:
            return
        free = self._resources_free(links)
        for lk in links:
            if lk.revoking or not lk.lease_resources:
                continue
            parked = {
                name: amount
                for name, amount in lk.lease_resources.items()
                if name in needed
                and free.get(name, 0) <= 0
                and not (lk.has_work and lk.wants_resources.get(name))
            }
            if parked:
                lk.revoking = True
                self._send(lk, Kind.REVOKE, {"n": 0, "resources": parked})

    def _wanted_share(
        self, res_free: dict[str, float], lk: _SchedulerLink, wanting: list[_SchedulerLink]
    ) -> dict[str, float]:
        """The share of free resources for a scheduler whose ready tasks ask for them."""
        if not lk.wants_resources or not res_free:
            return {}
        wanted = {k: v for k, v in res_free.items() if k in lk.wants_resources}
        askers = sum(1 for o in wanting if o.wants_resources)
        res = self._split_resources(wanted, lk, askers)
        for name, amount in res.items():
            res_free[name] -= amount
            if res_free[name] <= 0:
                del res_free[name]
        return res

    def _resources_free(self, links: list[_SchedulerLink]) -> dict[str, float]:
        free = {}
        for name, total in self.resources.items():
            leased = sum(lk.lease_resources.get(name, 0) for lk in links)
            left = total - self._res_used.get(name, 0) - leased
            if left > 0:
                free[name] = left
        return free

    def _split_resources(
        self, res_free: dict[str, float], lk: _SchedulerLink, n_links: int
    ) -> dict[str, float]:
        """Give a scheduler its share of free resources (whole units)."""
        res = {}
        for name, left in list(res_free.items()):
            share = max(1.0, float(int(left / n_links))) if n_links > 1 else left
            share = min(share, left)
            if share > 0:
                res[name] = share
                res_free[name] = left - share
                if res_free[name] <= 0:
                    del res_free[name]
        return res

    def _grant(self, lk: _SchedulerLink, n: int, res: dict[str, float]) -> None:
        """Lease slots to a scheduler (piggybacked on a DONE message when one is pending)."""
        lk.lease += n
        for name, amount in res.items():
            lk.lease_resources[name] = lk.lease_resources.get(name, 0) + amount
        if lk.done:
            prev_n, prev_res = lk.pending_grant or (0, {})
            merged = dict(prev_res)
            for name, amount in res.items():
                merged[name] = merged.get(name, 0) + amount
            lk.pending_grant = (prev_n + n, merged)
        else:
            self._send(lk, Kind.LEASE, {"n": n, "resources": res})

    def _on_have_work(self, link: _SchedulerLink, msg: dict[str, Any] | None, _: Any) -> None:
        """How much ready work a scheduler has (HAVE_WORK, and every heartbeat answer)."""
        if msg is None:  # an older scheduler's plain heartbeat
            return
        link.has_work = msg["n"]
        link.wants_resources = msg.get("resources") or {}

    def _on_returned(self, link: _SchedulerLink, msg: dict[str, Any], _: Any) -> None:
        """Slots given back after a revoke."""
        link.lease -= msg["n"]
        for name, amount in (msg.get("resources") or {}).items():
            link.lease_resources[name] = link.lease_resources.get(name, 0) - amount
            if link.lease_resources[name] <= 0:
                del link.lease_resources[name]
        link.revoking = False

    # ------------------------------------------------------------------ tasks
    def _on_tasks(self, link: _SchedulerLink, msg: dict[str, Any], _: Any) -> None:
        """Accept tasks sent against our lease; fetch remote inputs; queue for the threads."""
        tasks = msg["tasks"]
        link.lease -= len(tasks)
        link.has_work = msg["more"]
        link.wants_resources = msg.get("resources") or {}
        funcs = self._funcs
        for fhash, blob in msg["funcs"].items():
            if fhash not in funcs:
                try:
                    funcs[fhash] = protocol.loads_user(blob)
                except ModuleNotFoundError as exc:
                    hint = ModuleNotFoundError(
                        f"{exc} on worker {self.name}: the function was pickled by reference; "
                        "make its module importable on the workers, or call "
                        "cloudpickle.register_pickle_by_value(module) in the client"
                    )
                    funcs[fhash] = _Unloadable(hint)
                except Exception as exc:  # noqa: BLE001 - reported per task below
                    funcs[fhash] = _Unloadable(exc)
                if len(funcs) > 512:
                    funcs.pop(next(iter(funcs)))
        sid = link.scheduler_id
        reply = msg.get("reply") if len(tasks) == 1 else None
        if not (type(reply) in (list, tuple) and len(reply) == 2 and type(reply[1]) is int):
            reply = None  # (client's same-host socket, its key for the task), or none
        for key, fhash, payload, deps, resources in tasks:
            if resources:
                for name, amount in resources.items():
                    link.lease_resources[name] = link.lease_resources.get(name, 0) - amount
                    self._res_used[name] = self._res_used.get(name, 0) + amount
            func = funcs.get(fhash)
            item = _Item(link, key, fhash, func, payload, deps, resources)
            if reply is not None:
                item.reply = (str(reply[0]), reply[1])
            link.inflight.add(key)
            self._queued += 1
            if deps:
                self._resolve_inputs(item, sid)
                if item.waiting:
                    continue
            self._enqueue(item)

    def _enqueue(self, item: _Item) -> None:
        """Queue a task for the executor threads, or choose it to run inline (I/O thread)."""
        if self._inline is not None:
            self._deferred.append(item)  # queued once the inline run has begun... and ended
        elif self._queued == 1 and self._fast.get(item.fhash, 0) >= INLINE_AFTER_RUNS:
            self._inline = item  # nothing else is queued, fetching or running here
        else:
            self._queue.put(item)

    def _resolve_inputs(self, item: _Item, sid: str | None) -> None:
        """Find each input locally or start fetching it from the worker that holds it."""
        by_peer: dict[str, list[tuple[int, tuple[str, int]]]] = {}
        for ckey, src in item.deps:
            kind = src[0]
            if kind == "inline":
                item.values[ckey] = _Inline(src[1])
            elif kind == "local":
                skey = (sid, src[1])
                if skey in self.store:
                    item.values[ckey] = self.store[skey]
                else:
                    self._missing(item, src[1])
                    return
            else:  # ("remote", address, storage id, nbytes)
                skey = tuple(src[2])
                if skey in self.store:
                    item.values[ckey] = self.store[skey]
                else:
                    by_peer.setdefault(src[1], []).append((ckey, skey))
        for address, wanted in by_peer.items():
            item.waiting += 1
            self._fetch(address, wanted, item)

    def _fetch(self, address: str, wanted: list[tuple[int, Any]], item: _Item | None) -> None:
        """Ask a peer worker for stored values (answered on its data port)."""
        sock = self._peers.get(address)
        if sock is None:
            sock = self.security.socket(self._ctx, zmq.DEALER, server=False)
            sock.connect(address)
            self._add_peer(address, sock)
        req = next(self._req)
        self._fetching[req] = (item, [item] if item else [], wanted, time.monotonic())
        get = {"req": req, "keys": [list(k) for _, k in wanted]}
        if localdata.enabled() and sock not in self._settled:
            get["host"] = localdata.host_token()  # a peer on this host redirects us
        sock.send_multipart(pack(Kind.GET, get))

    def _add_peer(self, address: str, sock: zmq.Socket[Any]) -> None:
        self._peers[address] = sock
        self._peer_address[sock] = address
        self._poller.register(sock, zmq.POLLIN)

    def _on_redirect(self, sock: Any, req: int, local: Any) -> None:
        """A peer on this host named its same-host socket: ask again there (if it is safe)."""
        entry = self._fetching.get(req)
        address = self._peer_address.get(sock)
        if entry is None or address is None:
            return
        if self._peers.get(address, sock) is sock:  # not redirected by an earlier answer
            near = localdata.connect(self._ctx, local, self.security.max_message_bytes)
            if near is None:  # not ours, or not private: take the values over TCP after all
                log.warning("peer %s offered %r, not a private socket of ours: TCP", address, local)
                self._settled.add(sock)
            else:
                self._settled.add(near)
                self._add_peer(address, near)
        target = self._peers[address]
        target.send_multipart(pack(Kind.GET, {"req": req, "keys": [list(k) for _, k in entry[2]]}))

    def _on_peer_data(self, sock: Any, frames: list[Any]) -> None:
        """A peer answered a GET: store the values, then queue the tasks that waited for them."""
        msg = loads_control(frames[1].buffer)
        if "local" in msg:
            self._on_redirect(sock, msg["req"], msg["local"])
            return
        entry = self._fetching.pop(msg["req"], None)
        if entry is None:
            return
        item, _, wanted, _ = entry
        values = _decode_values(msg["items"], frames[2:])
        if item is None:  # a replication for a retiring peer
            stored = []
            for (_, skey), value in zip(wanted, values, strict=False):
                if value is not _MISSING:
                    self.store[skey] = value
                    self.store_nbytes[skey] = _nbytes(value) or 0
                    stored.append(skey[1])
            link = self._link_for_sid(wanted[0][1][0]) if wanted else None
            if link is not None and stored:
                self._send(link, Kind.STORED, stored)
            return
        for (ckey, skey), value in zip(wanted, values, strict=False):
            if value is _MISSING:
                self._missing(item, skey[1])
                return
            item.values[ckey] = value
        item.waiting -= 1
        if item.waiting == 0:
            self._enqueue(item)

    def _missing(self, item: _Item, dep_key: int) -> None:
        """An input is gone: hand the task back to its scheduler to recover the input."""
        item.link.inflight.discard(item.key)
        self._queued -= 1
        item.waiting = -1
        self._release_resources(item)
        self._send(item.link, Kind.MISSING, {"missing": [(item.key, dep_key)]})

    def _link_for_sid(self, sid: str) -> _SchedulerLink | None:
        for lk in self._links:
            if lk.scheduler_id == sid:
                return lk
        return None

    def _run_inline(self) -> bool:
        """Run the chosen task on this (I/O) thread; False if the standby thread took over."""
        item = self._inline
        assert item is not None
        self._inline = None
        if self._standby_thread is None:
            self._standby_thread = threading.Thread(
                target=self._serve, args=(True,), name="jqms-io-standby", daemon=True
            )
            self._standby_thread.start()
        relief = None
        if self._gone(item):
            result: tuple[Any, ...] = (item, None, None, 0.0)
        else:
            self._started.append((item.link, item.key))  # reported if the run turns out long
            self._inline_runs += 1
            with self._inline_lock:
                self._inline_since = time.perf_counter()
            result = self._run_item(item)
            with self._inline_lock:
                self._inline_since = 0.0
                relief, self._relief = self._relief, None
        self._results.append(result)
        if relief is not None:  # this thread no longer owns the sockets: hand over like an executor
            relief.set()
            self._wake()
            return False
        self._queue_deferred()
        return True

    def _queue_deferred(self) -> None:
        """Queue what arrived while a task was chosen to run inline (I/O thread)."""
        for item in self._deferred:
            self._queue.put(item)
        self._deferred.clear()

    def _standby(self) -> bool:
        """Wait while inline runs are short; take the I/O loop over from a long one.

        Return True once this thread owns the loop, False when the worker has finished.
        """
        while not self._finished.wait(RELIEF_AFTER_S):
            with self._inline_lock:
                since = self._inline_since
                if (
                    not since
                    or self._relief is not None
                    or time.perf_counter() - since < RELIEF_AFTER_S
                ):
                    continue
                relief = self._relief = threading.Event()
                self._reliefs += 1
            log.debug("worker %s: a long inline task; the standby thread takes over", self.name)
            self._queue.put(relief)  # first: one executor waits while the inline task runs
            self._queue_deferred()
            return True
        return False

    def _execute_loop(self) -> None:
        """Executor thread: run tasks from the local queue, one at a time."""
        get = self._queue.get
        results = self._results
        started = self._started
        while True:
            item = get()
            if item is None:
                return
            if type(item) is threading.Event:  # a relieved inline task holds this slot
                item.wait()
                continue
            assert isinstance(item, _Item)
            if self._gone(item):
                results.append((item, None, None, 0.0))
                self._wake()
                continue
            started.append((item.link, item.key))
            if self._duration == 0 or self._duration > 0.001:
                self._wake()
                time.sleep(0)  # let the I/O thread report the start before user code runs
            results.append(self._run_item(item))
            self._wake()

    @staticmethod
    def _gone(item: _Item) -> bool:
        """Its scheduler is gone, or dropped it: not to be run (reported with status None)."""
        return item.link.scheduler_id is None or item.key in item.link.dropped

    def _run_item(self, item: _Item) -> tuple[_Item, int, Any, float]:
        """Run one task (on an executor thread or inline): (item, status, value, seconds)."""
        with self._active_lock:
            self._active += 1
            if self._active > self._peak_running:
                self._peak_running = self._active
        t0 = time.perf_counter()
        try:
            func = item.func
            if isinstance(func, _Unloadable):
                raise func.exc
            if item.deps:
                values = {
                    k: (v.load() if isinstance(v, _Inline) else v) for k, v in item.values.items()
                }
                args, kwargs = _ArgsUnpickler(item.payload, values).load()
            else:
                args, kwargs = pickle.loads(item.payload)
            value = func(*args, **kwargs)
            status = D_INLINE
        except BaseException as exc:  # noqa: BLE001 - reported to the client
            value = exc
            status = D_ERROR
        duration = time.perf_counter() - t0
        with self._active_lock:
            self._active -= 1
        return item, status, value, duration

    def _collect(self) -> None:
        """Turn finished tasks into DONE entries per scheduler (serializing results)."""
        started = self._started
        while started:
            link, key = started.popleft()
            link.started.append(key)
        results = self._results
        if not results:
            return
        now = time.monotonic()
        self._last_busy = now
        limit = self.inline_result_limit
        fast = self._fast
        while results:
            item, status, value, duration = results.popleft()
            self._queued -= 1
            self._release_resources(item)
            link = item.link
            link.inflight.discard(item.key)
            link.dropped.discard(item.key)
            if status is None or link.scheduler_id is None:
                continue
            if self._duration == 0 or duration > 4 * self._duration:
                # a new kind of task: prefetch by it at once, not after ten slow ones
                self._duration = duration
            else:
                self._duration = 0.9 * self._duration + 0.1 * duration
            runs = fast.get(item.fhash, 0)
            if duration >= RELIEF_AFTER_S:
                fast[item.fhash] = -1  # once long, never inline
            elif duration >= self.inline_max_s:
                if runs > 0:  # slow (or preempted): needs a new series of fast runs
                    fast[item.fhash] = 0
            elif 0 <= runs < INLINE_AFTER_RUNS:
                fast[item.fhash] = runs + 1
                if len(fast) > 1024:
                    del fast[next(iter(fast))]
            link.usage = link.decayed_usage(now) + duration
            sid = link.scheduler_id
            self._executed[sid] = self._executed.get(sid, 0) + 1
            if status == D_ERROR:
                link.done.append((item.key, D_ERROR, _encode_error(value, self.name), duration))
                continue
            size = _nbytes(value)
            if size is not None and size > limit:
                self._keep(link, item.key, value, size, duration)
                if item.reply is not None and link.done[-1][1] == D_STORED:
                    self._reply(item, R_REMOTE, (self.data_address, (sid, item.key), size))
                continue
            try:
                data = dumps_user(value)
            except Exception as exc:  # noqa: BLE001
                link.done.append((item.key, D_ERROR, _encode_error(exc, self.name), duration))
                continue
            if len(data) > limit:
                self._keep(link, item.key, value, len(data), duration)
            else:
                link.done.append((item.key, D_INLINE, data, duration))
                if item.reply is not None:
                    self._reply(item, R_INLINE, data)

    def _reply(self, item: _Item, status: int, value: Any) -> None:
        """Send a result straight to its client on this host too (best effort: the scheduler
        sends it as well, and whichever comes first completes the future)."""
        address, ckey = item.reply  # type: ignore[misc]
        socks = self._reply_socks
        sock = socks.get(address, False)
        if sock is False:
            if len(socks) >= MAX_REPLY_SOCKETS:  # the oldest client's socket goes
                old = socks.pop(next(iter(socks)))
                if old is not None:
                    old.close(linger=0)
            # None unless ours and private, as for data (localdata.py)
            sock = localdata.connect(self._ctx, address, self.security.max_message_bytes)
            if sock is not None:
                sock.setsockopt(zmq.SNDHWM, 64)  # a client gone: drop, do not hoard
            socks[address] = sock
        if sock is None:
            return
        msg = {"sid": item.link.scheduler_id, "results": [(ckey, status, value)]}
        try:
            send_nowait(sock, pack(Kind.RESULTS, msg))
        except zmq.ZMQError:  # full (the client is gone or slow): the scheduler's copy will do
            pass

    def _keep(self, link: _SchedulerLink, key: int, value: Any, size: int, duration: float) -> None:
        """Store a large result here; the scheduler learns only where it is."""
        limit = self.security.max_message_bytes - (1 << 16)
        if size > limit:  # it could never be sent to anyone: fail loudly instead
            err = ValueError(
                f"the result is {size:,} bytes in one piece, more than max_message_bytes allows "
                f"({limit:,}); return smaller pieces, or raise the limit "
                "($JOBQUEUE_MS_MAX_MESSAGE_BYTES / max_message_bytes) for every process"
            )
            link.done.append((key, D_ERROR, _encode_error(err, self.name), duration))
            return
        skey = (link.scheduler_id, key)
        self.store[skey] = value  # type: ignore[index]
        self.store_nbytes[skey] = size  # type: ignore[index]
        link.done.append((key, D_STORED, size, duration))

    def _release_resources(self, item: _Item) -> None:
        if item.resources:
            for name, amount in item.resources.items():
                self._res_used[name] = self._res_used.get(name, 0) - amount

    def _flush(self) -> None:
        """Send each scheduler its DONE batch (with any new lease) and STARTED notices."""
        for lk in self._links:
            if lk.started:
                started = lk.started
                if lk.done:  # a DONE says it started too: no STARTED for what it carries
                    finished = {entry[0] for entry in lk.done}
                    started = [k for k in started if k not in finished]
                if started and lk.state == "ready":
                    self._send(lk, Kind.STARTED, started)
                lk.started = []
            if lk.done:
                grant = lk.pending_grant
                lk.pending_grant = None
                parts = protocol.split_by_size(lk.done, 2, self._frame_budget)
                lk.done = []
                for part in parts:
                    msg: dict[str, Any] = {"done": part}
                    if grant:
                        msg["lease"] = grant[0]
                        if grant[1]:
                            msg["resources"] = grant[1]
                        grant = None
                    if lk.state == "ready":
                        self._send(lk, Kind.DONE, msg)
            elif lk.pending_grant:
                n, res = lk.pending_grant
                lk.pending_grant = None
                self._send(lk, Kind.LEASE, {"n": n, "resources": res})

    def _on_drop(self, link: _SchedulerLink, msg: list[int], _: Any) -> None:
        """Queued tasks the scheduler no longer wants run; one already running finishes.

        Only tasks still here are noted: one that finished before the drop arrived would
        otherwise stay in the set forever.
        """
        link.dropped.update(k for k in msg if k in link.inflight)

    def _on_release(self, link: _SchedulerLink, msg: list[int], _: Any) -> None:
        sid = link.scheduler_id
        for key in msg:
            self.store.pop((sid, key), None)  # type: ignore[arg-type]
            self.store_nbytes.pop((sid, key), None)  # type: ignore[arg-type]

    def _on_replicate(self, link: _SchedulerLink, msg: dict[str, Any], _: Any) -> None:
        """Fetch values from a retiring peer and keep them (then report STORED)."""
        by_peer: dict[str, list[tuple[int, tuple[str, int]]]] = {}
        for key, address, skey in msg["keys"]:
            by_peer.setdefault(address, []).append((key, tuple(skey)))
        for address, wanted in by_peer.items():
            self._fetch(address, wanted, None)

    def _on_retire(self, link: _SchedulerLink, msg: Any, _: Any) -> None:
        self.retire()

    def _retire_step(self, now: float) -> bool:
        """Advance a retirement; return True when the worker may exit."""
        ready = [lk for lk in self._links if lk.state == "ready"]
        if any(lk.lease or lk.revoking for lk in ready) and now < self._retire_deadline:
            return False
        if self._queued or self._results:
            return now >= self._retire_deadline
        if not self._retire_sent:
            self._retire_sent = True
            for lk in ready:
                self._send(lk, Kind.RETIRE, {"name": self.name})
            return False
        return all(lk.goodbye for lk in ready) or now >= self._retire_deadline

    # ------------------------------------------------------------------ data port
    def _on_data_request(self, sock: Any, frames: list[Any]) -> None:
        """Serve GET (send stored values) on the data port: the only request it takes.

        A requester on this host, asking over TCP, is sent the same-host socket instead.
        """
        ident = frames[0].bytes
        kind = frames[1].bytes
        msg = loads_control(frames[2].buffer)
        if kind == Kind.GET:
            if (
                sock is self._data
                and self.local_address
                and msg.get("host") == localdata.host_token()
            ):
                self._served["redirected"] += 1
                sock.send_multipart(
                    [ident, *pack(Kind.DATA, {"req": msg["req"], "local": self.local_address})]
                )
                return
            self._served["tcp" if sock is self._data else "local"] += 1
            items = []
            buffers: list[Any] = []
            for skey in msg["keys"]:
                value = self.store.get(tuple(skey), _MISSING)
                if value is _MISSING:
                    items.append((skey, None, 0))
                    continue
                head, bufs = _encode_value(value)
                items.append((skey, head, len(bufs)))
                buffers.extend(bufs)
            sock.send_multipart(
                [ident, *pack(Kind.DATA, {"req": msg["req"], "items": items})] + buffers,
                copy=False,
            )
        else:
            raise ProtocolError(f"unknown data request {kind[:20]!r}")

    # ------------------------------------------------------------------ timers
    def _tick(self, now: float) -> None:
        """Heartbeats, (re)registration, scheduler loss, memory, lifetime, fetch timeouts."""
        status = self._status(now)
        for lk in self._links:
            if lk.state != "ready":
                if now - lk.last_hello > 0.5:
                    self._hello(lk, now)
                continue
            if now - lk.last_recv > self.heartbeat_timeout_s:
                self._forget_scheduler(lk, "no heartbeat")
                lk.state = "connecting"
                continue
            if now - lk.last_send >= self.heartbeat_interval_s * 0.9:
                self._send(lk, Kind.HEARTBEAT, status)
        for req, (item, _, wanted, t0) in list(self._fetching.items()):
            if now - t0 > self.heartbeat_timeout_s:
                del self._fetching[req]
                if item is not None and item.waiting >= 0:
                    self._missing(item, wanted[0][1][1])
        if self.lifetime_end is not None and time.time() >= self.lifetime_end:
            self.retire()
        if any(lk.state == "ready" for lk in self._links):
            self._last_served = now
        elif (
            self.scheduler_lost_timeout is not None
            and now - self._last_served > self.scheduler_lost_timeout
        ):
            log.warning(
                "worker %s: no scheduler for %.0f s (scheduler_lost_timeout); leaving",
                self.name,
                now - self._last_served,
            )
            print(
                f"jobqueue-ms worker {self.name}: no scheduler reachable for "
                f"{now - self._last_served:.0f} s; leaving",
                file=sys.stderr,
            )
            self.stop()
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("worker %s: parent %d is gone; stopping", self.name, self.parent_pid)
            self.stop()

    def debug_state(self) -> dict[str, Any]:
        """Slots, queue and each scheduler link's lease (``kill -USR1`` prints it to stderr)."""
        return {
            "name": self.name,
            "capacity": self._capacity(),
            "queued": self._queued,
            "active": self._active,
            "inline": (
                "relieved"
                if self._relief is not None
                else ("running" if self._inline_since else "idle")
            ),
            "results": len(self._results),
            "paused": self._paused,
            "retiring": self._retiring,
            "links": [
                {
                    "address": lk.address,
                    "state": lk.state,
                    "lease": lk.lease,
                    "has_work": lk.has_work,
                    "revoking": lk.revoking,
                    "pending_grant": lk.pending_grant,
                    "done": len(lk.done),
                }
                for lk in self._links
            ],
        }

    def _status(self, now: float) -> dict[str, Any]:
        """Memory (psutil), idleness and storage, sent with heartbeats."""
        if self._proc is not None:
            try:
                self._memory = self._proc.memory_info().rss
            except Exception:  # noqa: BLE001 - the process table can be briefly unreadable
                pass
        if self.memory_limit:
            frac = self._memory / self.memory_limit
            if not self._paused and frac > 0.8:
                log.warning(
                    "worker %s paused: memory at %.0f%% of its limit", self.name, 100 * frac
                )
                self._paused = True
            elif self._paused and frac < 0.7:
                self._paused = False
        if self._queued:
            self._last_busy = now
        return {
            "memory": self._memory,
            "idle_s": 0.0 if self._queued else now - self._last_busy,
            "stored_bytes": sum(self.store_nbytes.values()),
            "state": "paused" if self._paused else ("retiring" if self._retiring else "running"),
            "peak_running": self._peak_running,
            "dropped_frames": self._dropped_frames,
            "executed": dict(self._executed),
            "running": self._active,
            "inline": {"runs": self._inline_runs, "relieved": self._reliefs},
            "data_served": dict(self._served),
        }


class _Unloadable:
    """Stands for a function that could not be unpickled here; running it raises the error."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Inline:
    """An input sent inline; unpickled by the executor thread that needs it."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def load(self) -> Any:
        return pickle.loads(self.data)


_MISSING = object()


def _nbytes(value: Any) -> int | None:
    """Size of a value when it is cheap to know (bytes-like, NumPy arrays), else None."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value) if not isinstance(value, memoryview) else value.nbytes
    n = getattr(value, "nbytes", None)
    return n if isinstance(n, int) else None


def _encode_value(value: Any) -> tuple[bytes, list[Any]]:
    """Serialize a stored value for the wire: raw bytes as-is, others pickle-5 out-of-band."""
    if type(value) is bytes:
        return b"", [value]
    head, bufs = protocol.dumps_oob(value)
    return head, [b.raw() for b in bufs]


def _decode_values(items: list[Any], frames: list[Any]) -> list[Any]:
    """Inverse of _encode_value over a message's items and buffer frames."""
    out = []
    i = 0
    for _, head, nbuf in items:
        if head is None:
            out.append(_MISSING)
            continue
        bufs = [f.buffer for f in frames[i : i + nbuf]]
        i += nbuf
        if head == b"":
            out.append(frames[i - 1].bytes)
        else:
            out.append(pickle.loads(head, buffers=bufs))
    return out


def _encode_error(exc: BaseException, worker: str) -> tuple[bytes, str, str]:
    """An exception as (pickled exception, traceback text, type name)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    tb = f'Traceback on worker "{worker}":\n' + tb.split("\n", 1)[-1]
    try:
        data = protocol.dumps_user(exc)
        pickle.loads(data)  # some exceptions pickle but cannot be rebuilt
    except Exception:  # noqa: BLE001
        data = protocol.dumps_user(RuntimeError(f"{type(exc).__name__}: {exc}"))
    return data, tb, type(exc).__name__


def main_uuid() -> str:
    return uuid.uuid4().hex[:8]
