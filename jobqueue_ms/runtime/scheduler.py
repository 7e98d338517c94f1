"""One scheduler: accepts clients and workers, queues tasks, leases them to workers.

Capacity belongs to the workers. A worker grants a scheduler a *lease* of ``n`` slots (and of
resources such as ``GPU``); the scheduler may send at most that many tasks, and gives unused
slots back when the worker revokes them. A worker serving several schedulers therefore never
receives more tasks than it offered, and decides itself how to share its time between them.

The scheduler never unpickles user data: functions, arguments and results are opaque bytes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import zmq

from . import protocol
from .protocol import (
    D_ERROR,
    D_INLINE,
    D_STORED,
    R_ERROR,
    R_FAILED,
    R_INLINE,
    R_REMOTE,
    Kind,
    ProtocolError,
    check_grant,
    check_hello,
    loads_control,
    pack,
    send_nowait,
    want_dict,
    want_keys,
)
from .security import ENV_KEYFILE, Guard, Security, default_for, register, unregister

log = logging.getLogger("jobqueue_ms.scheduler")

# task states
WAITING, READY, ASSIGNED, DONE, ERRED, CANCELLED = range(6)

CLIENT_BITS = 40  # internal key = client index << CLIENT_BITS | client's own key
CLIENT_KEY_MASK = (1 << CLIENT_BITS) - 1  # internal key & this = the client's own key
DEFAULT_MAX_TASKS_PER_CLIENT = 1_000_000  # ~0.5 GB of scheduler memory at most per client


class Task:
    """A task as the scheduler sees it; slotted to keep ~0.3 kB per queued task."""

    __slots__ = (
        "key",
        "client",
        "fhash",
        "payload",
        "deps",
        "ndeps",
        "dependents",
        "priority",
        "retries",
        "resources",
        "state",
        "worker",
        "started",
        "attempts",
        "result",
        "where",
        "wanted",
    )

    def __init__(
        self,
        key: int,
        client: ClientRecord,
        fhash: bytes,
        payload: bytes,
        priority: int,
        retries: int,
        resources: dict[str, float] | None,
    ) -> None:
        self.key = key
        self.client = client
        self.fhash = fhash
        self.payload = payload
        self.deps: list[Any] | None = None  # [(ckey, internal key | external source)]
        self.ndeps = 0  # inputs not yet available
        self.dependents: list[Task] | None = None
        self.priority = priority
        self.retries = retries
        self.resources = resources
        self.state = WAITING
        self.worker: WorkerRecord | None = None
        self.started = False
        self.attempts = 0
        self.result: Any = None  # inline bytes, (exc bytes, tb) or stored nbytes
        self.where: WorkerRecord | None = None  # worker that stores the result
        self.wanted = True  # the client still holds the future


class ClientRecord:
    """A connected client."""

    __slots__ = (
        "ident",
        "index",
        "client_id",
        "last_seen",
        "outbox",
        "ntasks",
        "name",
        "parked",
        "awaiting",
        "reply_to",
        "boot",
    )

    def __init__(self, ident: bytes, index: int, client_id: str, name: str) -> None:
        self.ident = ident
        self.reply_to = ""  # the client's same-host socket for direct results, if any
        self.boot = ""  # its machine (boot id): only workers on the same one use reply_to
        self.index = index
        self.client_id = client_id
        self.name = name
        self.last_seen = time.monotonic()
        self.outbox: list[tuple[Any, ...]] = []
        self.ntasks = 0
        # submissions held (in order) until the client resends function blobs we dropped
        self.parked: list[list[Any]] = []
        self.awaiting: set[bytes] | None = None


class WorkerRecord:
    """A connected worker and the slots it has leased to this scheduler."""

    def __init__(self, ident: bytes, hello: dict[str, Any]) -> None:
        self.ident = ident
        self.name: str = hello["name"]
        self.job: str | None = hello.get("job")
        self.host: str = hello.get("host", "")
        self.pid: int = hello.get("pid", 0)
        self.nthreads: int = hello.get("nthreads", 1)
        self.resources: dict[str, float] = dict(hello.get("resources") or {})
        self.data_address: str = hello["data_address"]
        self.boot: str = hello.get("boot", "")
        self.local_address: str = hello.get("local_address", "")  # its same-host data socket
        self.memory_limit: int | None = hello.get("memory_limit")
        self.lifetime_end: float | None = hello.get("lifetime_end")
        self.lease = 0
        self.lease_resources: dict[str, float] = {}
        self.hinted = False
        self.assigned: set[int] = set()
        self.holds: set[int] = set()
        self.last_seen = time.monotonic()
        self.status: dict[str, Any] = {}
        self.retiring = False


def _default_host() -> str:
    return "127.0.0.1"


class Scheduler:
    """A jobqueue-ms scheduler.

    Parameters
    ----------
    host, port:
        Where to listen. ``port=0`` picks a free port. The default host is loopback; pass the
        address of the interface that workers and clients use (never 0.0.0.0 unless told).
    scheduler_file:
        Write ``{"address", "addresses", "cluster_id", "protocol"}`` JSON here once listening.
    cluster_id:
        Identifies the cluster this scheduler belongs to (written to the scheduler file).
    heartbeat_interval_s, heartbeat_timeout_s:
        Peers silent for longer than the timeout are considered dead and their work recovered.
    max_attempts:
        A task that was running on this many workers that died fails with KilledWorkerError.
    security:
        The cluster's keys (:class:`~jobqueue_ms.runtime.security.Security`) or the path of its
        key file. None: ``$JOBQUEUE_MS_KEYFILE`` if set, else new keys owned by this scheduler
        (written to the key directory, removed by ``stop()``).
    max_message_bytes:
        The largest inbound frame (default 1 GiB or ``$JOBQUEUE_MS_MAX_MESSAGE_BYTES``).
    max_tasks_per_client:
        Tasks one client may have here at once (finished ones it still holds included); more
        fail at once with ``TooManyTasksError``, so one client cannot take the memory of all.
    parent_pid:
        Stop as soon as this process is no longer our parent (the cluster that started us was
        killed), so no scheduler outlives its cluster.

    Examples
    --------
    >>> s = Scheduler()
    >>> address = s.start()       # runs in a background thread
    >>> s.stop()
    """

    def __init__(
        self,
        host: str | None = None,
        port: int = 0,
        *,
        scheduler_file: str | None = None,
        cluster_id: str | None = None,
        heartbeat_interval_s: float | None = None,
        heartbeat_timeout_s: float | None = None,
        max_attempts: int = 3,
        inline_result_limit: int | None = None,
        security: Security | str | None = None,
        max_message_bytes: int | None = None,
        max_tasks_per_client: int = DEFAULT_MAX_TASKS_PER_CLIENT,
        parent_pid: int | None = None,
    ) -> None:
        self.host = host or _default_host()
        self.port = port
        self.scheduler_file = scheduler_file
        self.cluster_id = cluster_id or uuid.uuid4().hex[:12]
        self.scheduler_id = uuid.uuid4().hex[:12]
        self.heartbeat_interval_s = heartbeat_interval_s or float(
            os.environ.get("JOBQUEUE_MS_HEARTBEAT_INTERVAL", "0.5")
        )
        self.heartbeat_timeout_s = heartbeat_timeout_s or float(
            os.environ.get("JOBQUEUE_MS_HEARTBEAT_TIMEOUT", "10")
        )
        self.max_attempts = max_attempts
        if not isinstance(max_tasks_per_client, int) or max_tasks_per_client < 1:
            raise ValueError(f"max_tasks_per_client={max_tasks_per_client!r} must be >= 1")
        self.max_tasks_per_client = max_tasks_per_client
        self.parent_pid = parent_pid
        self._owns_keys = (
            security is None and default_for([]) is None and not os.environ.get(ENV_KEYFILE)
        )
        if self._owns_keys:
            self.security = Security.generate(
                name=f"scheduler-{self.scheduler_id}", max_message_bytes=max_message_bytes
            )
        else:
            self.security = Security.coerce(security)
            if max_message_bytes:
                self.security = dataclasses.replace(
                    self.security, max_message_bytes=max_message_bytes
                )
        self.address = ""
        self.tasks: dict[int, Task] = {}
        self.clients: dict[bytes, ClientRecord] = {}
        self.workers: dict[bytes, WorkerRecord] = {}
        self.ready: dict[int, deque[Task]] = {}  # priority -> FIFO of ready tasks
        self.ready_resourced: list[Task] = []  # ready tasks that need resources
        self.n_ready = 0
        self.leased: dict[bytes, WorkerRecord] = {}  # workers with unused lease
        self.funcs: dict[bytes, list[Any]] = {}  # fhash -> [blob, refcount]
        # blobs no task uses any more, oldest first; kept (bounded) because clients resubmit
        self._idle_funcs: OrderedDict[bytes, None] = OrderedDict()
        self.duration_ewma: float | None = None
        self.counters = {
            "tasks_done": 0,
            "tasks_erred": 0,
            "dropped_frames": 0,
            "refused": 0,
            "functions_asked_again": 0,
            "tasks_refused_limit": 0,
            "messages": 0,  # received, of every kind: what the peers' traffic costs
        }
        self._guard: Guard | None = None
        # batched messages are split well below the peers' per-frame limit
        self._frame_budget = protocol.frame_budget(self.security.max_message_bytes)
        self._logged_refusals: set[str] = set()
        self._client_index = itertools.count(1)
        self._refused_peers: dict[bytes, float] = {}
        self._dirty_clients: set[ClientRecord] = set()
        self._running = False
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context[Any] | None = None
        self._sock: zmq.Socket[Any] | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._handlers: dict[bytes, Callable[[bytes, Any, list[Any]], None]] = {
            Kind.HELLO: self._on_hello,
            Kind.HEARTBEAT: self._on_heartbeat,
            Kind.SUBMIT: self._on_submit,
            Kind.RELEASE: self._on_release,
            Kind.CANCEL: self._on_cancel,
            Kind.SCATTER: self._on_scatter,
            Kind.LEASE: self._on_lease,
            Kind.REVOKE: self._on_revoke,
            Kind.STARTED: self._on_started,
            Kind.DONE: self._on_done,
            Kind.MISSING: self._on_missing,
            Kind.STORED: self._on_stored,
            Kind.GOODBYE: self._on_goodbye,
            Kind.RETIRE: self._on_retire,
            Kind.INFO: self._on_info,
            Kind.SHUTDOWN: self._on_shutdown,
        }
        self._versions = protocol.versions()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Start serving in a background thread; return the address once listening."""
        self._thread = threading.Thread(target=self.run, name="jobqueue-ms-scheduler", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error
        return self.address

    def run(self) -> None:
        """Serve until stopped (blocking)."""
        try:
            self._bind()
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            raise
        self._started.set()
        try:
            self._loop()
        finally:
            self._close()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket (and remove keys this scheduler made)."""
        self._running = False
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._owns_keys:
            self.security.remove()

    @property
    def scheduler_addresses(self) -> list[str]:
        """``[address]``, so ``Client(scheduler)`` works like ``Client(cluster)``."""
        return [self.address] if self.address else []

    def _bind(self) -> None:
        """Bind the ROUTER socket and write the scheduler file."""
        self._ctx = zmq.Context()
        sock = self.security.socket(self._ctx, zmq.ROUTER, server=True)
        self._guard = Guard(self._ctx, self.security, [sock])
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        try:
            if self.port:
                sock.bind(f"tcp://{self.host}:{self.port}")
            else:
                self.port = sock.bind_to_random_port(f"tcp://{self.host}")
        except zmq.ZMQError as exc:
            sock.close()
            raise OSError(
                f"scheduler cannot listen on {self.host}:{self.port or 'any port'}: {exc}"
            ) from None
        self._sock = sock
        self.address = f"tcp://{self.host}:{self.port}"
        self._running = True
        register([self.address], self.security)
        if self.scheduler_file:
            write_scheduler_file(
                self.scheduler_file, [self.address], self.cluster_id, self.security
            )
        log.info(
            "scheduler %s listening at %s (%r)", self.scheduler_id, self.address, self.security
        )

    def _close(self) -> None:
        """Tell peers we are going and close the socket."""
        if self._sock is not None:
            for w in list(self.workers.values()):
                self._send(w.ident, Kind.GOODBYE, {"scheduler_id": self.scheduler_id})
            self._sock.close(linger=200)
            self._sock = None
            unregister([self.address])
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        """Receive and dispatch messages; check heartbeats between them."""
        sock = self._sock
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_check = time.monotonic() + self.heartbeat_interval_s
        recv = sock.recv_multipart
        handlers = self._handlers
        while self._running:
            events = poller.poll(timeout=int(self.heartbeat_interval_s * 1000))
            if events:
                for _ in range(1000):  # drain what is queued, then flush in one go
                    try:
                        frames = recv(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames, handlers)
                self._dispatch()
                self._flush_clients()
            now = time.monotonic()
            if now >= next_check:
                self._check_heartbeats(now)
                next_check = now + self.heartbeat_interval_s
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    log.warning("scheduler: parent process %d is gone; stopping", self.parent_pid)
                    self._running = False

    def _handle(self, frames: list[Any], handlers: dict[bytes, Any]) -> None:
        """Decode one message and call its handler; drop and count anything malformed.

        Nothing a peer sends may stop the scheduler: what the validators in ``protocol`` let
        through and a handler still chokes on is dropped too (and logged with its traceback).
        """
        self.counters["messages"] += 1
        try:
            ident = frames[0].bytes
            kind = frames[1].bytes
            handler = handlers.get(kind)
            if handler is None:
                raise ProtocolError(f"unknown message kind {kind[:20]!r}")
            control = loads_control(frames[2].buffer)
            handler(ident, control, frames[3:])
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self.counters["dropped_frames"] += 1
            if self.counters["dropped_frames"] <= 10:
                expected = (ProtocolError, IndexError, KeyError, TypeError, ValueError)
                log.warning(
                    "dropped a malformed message (logged for the first 10): %s",
                    exc,
                    exc_info=not isinstance(exc, expected),
                )

    def _send(self, ident: bytes, kind: bytes, control: Any = None, buffers: Any = None) -> None:
        """Send one message to a peer (never blocks; a vanished peer's messages are dropped)."""
        assert self._sock is not None
        try:
            send_nowait(self._sock, [ident, *pack(kind, control, buffers)])
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------------ registration
    def _on_hello(self, ident: bytes, msg: dict[str, Any], _: list[Any]) -> None:
        """Register a client or worker after checking versions."""
        msg = check_hello(msg)
        role = msg["role"]
        mismatch = protocol.version_mismatch(self._versions, msg["versions"], role)
        if mismatch:
            self.counters["refused"] += 1
            reason = f"scheduler {self.address} refused {role}: {mismatch}"
            if reason not in self._logged_refusals and len(self._logged_refusals) < 100:
                self._logged_refusals.add(reason)  # once per kind of peer, not per message
                log.warning("%s (logged once; %d refused so far)", reason, self.counters["refused"])
            self._send(ident, Kind.REFUSED, {"reason": reason, "versions": self._versions})
            return
        welcome = {
            "scheduler_id": self.scheduler_id,
            "cluster_id": self.cluster_id,
            "versions": self._versions,
            "address": self.address,
            "heartbeat_interval_s": self.heartbeat_interval_s,
            "max_tasks_per_client": self.max_tasks_per_client,
            "max_message_bytes": self.security.max_message_bytes,
            "hello_id": msg.get("hello_id"),
        }
        if role == "worker":
            old = self.workers.pop(ident, None)
            if old is not None:
                self._remove_worker(old, "re-registered")
            w = WorkerRecord(ident, msg)
            self.workers[ident] = w
            log.info("worker %s registered from %s", w.name, w.host)
            self._send(ident, Kind.WELCOME, welcome)
            if self.n_ready:
                self._nudge(w)
        elif role == "client":
            c = self.clients.get(ident)
            if c is None:
                c = ClientRecord(ident, next(self._client_index), msg["client_id"], msg["name"])
                self.clients[ident] = c
            c.reply_to = msg.get("reply_to", "")
            c.boot = msg.get("boot", "") if c.reply_to else ""
            self._send(ident, Kind.WELCOME, welcome)
        else:
            raise ProtocolError(f"unknown role {role!r}")

    def _unknown_peer(self, ident: bytes) -> None:
        """Ask a peer we do not know (e.g. after our restart) to say hello again, once a second."""
        now = time.monotonic()
        if now - self._refused_peers.get(ident, 0.0) > 1.0:
            self._refused_peers[ident] = now
            self._send(ident, Kind.REFUSED, {"reason": "unknown peer", "rejoin": True})

    def _on_heartbeat(self, ident: bytes, msg: Any, _: list[Any]) -> None:
        """Record liveness (and worker status); answer so the peer knows we are alive.

        A worker is also told how much ready work we have: it grants and parks slots by that
        figure, which must not stay stale when tasks leave the queue by other ways than
        dispatch to it (cancelled, their client gone, taken by other workers).
        """
        w = self.workers.get(ident)
        if w is not None:
            w.last_seen = time.monotonic()
            if msg:
                w.status = want_dict(msg, "worker status")
            self._send(ident, Kind.HEARTBEAT, self._work_hint())
            return
        c = self.clients.get(ident)
        if c is None:
            self._unknown_peer(ident)
            return
        c.last_seen = time.monotonic()
        self._send(ident, Kind.HEARTBEAT, None)

    def _check_heartbeats(self, now: float) -> None:
        """Remove workers and clients silent for longer than the heartbeat timeout."""
        limit = now - self.heartbeat_timeout_s
        for w in [w for w in self.workers.values() if w.last_seen < limit]:
            log.warning("worker %s missed its heartbeats; recovering its tasks", w.name)
            self.workers.pop(w.ident, None)
            self._remove_worker(w, "heartbeat timeout")
        for c in [c for c in self.clients.values() if c.last_seen < limit]:
            log.warning("client %s missed its heartbeats; releasing its tasks", c.name)
            self._remove_client(c)
        if len(self._refused_peers) > 1000:  # unknown peers are asked to rejoin once a second
            self._refused_peers = {k: t for k, t in self._refused_peers.items() if now - t <= 1.0}
        self._dispatch()
        self._flush_clients()

    # ------------------------------------------------------------------ clients
    def _client(self, ident: bytes) -> ClientRecord | None:
        c = self.clients.get(ident)
        if c is None:
            self._unknown_peer(ident)
            return None
        c.last_seen = time.monotonic()
        return c

    def _on_submit(self, ident: bytes, msg: dict[str, Any], _: list[Any]) -> None:
        """Queue a batch of tasks from a client.

        ``msg = {"funcs": {fhash: blob}, "tasks": [(ckey, fhash, payload, deps, priority,
        retries, resources), ...]}`` where ``deps`` is None or a list of ``(ckey, source)``;
        ``source`` is None for a task of the same client on this scheduler, or an external
        location ``("inline", bytes)`` / ``("remote", data_address, storage_id, nbytes)``.
        """
        c = self._client(ident)
        if c is None:
            return
        funcs = self.funcs
        sent = want_dict(msg, "submit").get("funcs")
        if type(sent) is not dict or not all(
            type(h) is bytes and type(b) is bytes for h, b in sent.items()
        ):
            raise ProtocolError("submit funcs must map hashes (bytes) to blobs (bytes)")
        if type(msg.get("tasks")) is not list or not all(
            type(t) is tuple and len(t) == 7 for t in msg["tasks"]
        ):
            raise ProtocolError("submit tasks must be a list of 7-tuples")
        for fhash, blob in sent.items():
            if fhash not in funcs:
                funcs[fhash] = [blob, 0]
                self._idle_funcs[fhash] = None
                self._trim_idle_funcs()
        if msg["tasks"]:
            c.parked.append(msg["tasks"])
        while c.parked:
            # The client believes we still hold every blob it sent before; when we dropped one
            # we ask for it, and its tasks (and every later submission) wait until it arrives.
            missing = {t[1] for t in c.parked[0]} - funcs.keys()
            if missing:
                if c.awaiting is None or not missing <= c.awaiting:
                    c.awaiting = missing
                    self.counters["functions_asked_again"] += len(missing)
                    self._send(c.ident, Kind.NEED_FUNCS, {"funcs": list(missing)})
                    return
                if msg["tasks"]:
                    return  # still waiting for the answer
                # the answer came without them: those tasks cannot run
                for t in c.parked[0]:
                    if t[1] in missing:
                        self._fail_task_direct(
                            c, t[0], "FunctionMissing", "the client could not resend the function"
                        )
                c.parked[0] = [t for t in c.parked[0] if t[1] not in missing]
            c.awaiting = None
            self._accept_tasks(c, c.parked.pop(0))

    def _trim_idle_funcs(self) -> None:
        idle = self._idle_funcs
        while len(idle) > 256:
            fhash, _ = idle.popitem(last=False)
            entry = self.funcs.get(fhash)
            if entry is not None and entry[1] <= 0:
                del self.funcs[fhash]

    def _accept_tasks(self, c: ClientRecord, batch: list[Any]) -> None:
        funcs = self.funcs
        base = c.index << CLIENT_BITS
        tasks = self.tasks
        room = self.max_tasks_per_client - c.ntasks
        for entry in batch:
            try:
                ckey, fhash, payload, deps, priority, retries, resources = entry
                if not (
                    type(ckey) is int
                    and 0 < ckey < (1 << CLIENT_BITS)
                    and type(payload) is bytes
                    and fhash in funcs
                    and type(priority) is int
                    and type(retries) is int
                    and (deps is None or type(deps) is list)
                    and (resources is None or protocol.want_resources(resources, "resources"))
                ):
                    raise ProtocolError("bad task")
            except (ValueError, TypeError, ProtocolError):
                self.counters["dropped_frames"] += 1  # a malformed task; the others go on
                continue
            key = base | ckey
            if key in tasks:
                continue  # a resubmission of a task we still have: exactly once
            if room <= 0:
                self.counters["tasks_refused_limit"] += 1
                self._fail_task_direct(
                    c,
                    ckey,
                    "TooManyTasksError",
                    f"scheduler {self.address} holds {c.ntasks:,} tasks of this client, its "
                    f"limit (max_tasks_per_client={self.max_tasks_per_client:,})",
                )
                continue
            room -= 1
            entry = funcs[fhash]
            if entry[1] <= 0:
                self._idle_funcs.pop(fhash, None)
            entry[1] += 1
            t = Task(key, c, fhash, payload, priority, retries, resources)
            tasks[key] = t
            c.ntasks += 1
            if deps:
                t.deps = []
                for dckey, source in deps:
                    if source is None:
                        dep = tasks.get(base | dckey)
                        if dep is None:
                            self._finish_error(
                                t, "LostDataError", f"input {dckey} is unknown to this scheduler"
                            )
                            break
                        t.deps.append((dckey, dep.key))
                        if dep.state == ERRED or dep.state == CANCELLED:
                            self._finish_error(t, "DependencyError", _dep_failed_text(dep))
                            break
                        if dep.state != DONE:
                            t.ndeps += 1
                            if dep.dependents is None:
                                dep.dependents = []
                            dep.dependents.append(t)
                    else:
                        t.deps.append((dckey, tuple(source)))
                if t.state != WAITING:
                    continue
            if t.ndeps == 0:
                self._make_ready(t)

    def _fail_task_direct(self, c: ClientRecord, ckey: int, etype: str, text: str) -> None:
        c.outbox.append((ckey, R_FAILED, (etype, text)))
        self._dirty_clients.add(c)

    def _on_release(self, ident: bytes, msg: list[int], _: list[Any]) -> None:
        """The client dropped these futures: forget them once nothing else needs them."""
        c = self._client(ident)
        if c is None:
            return
        base = c.index << CLIENT_BITS
        tasks = self.tasks
        for ckey in _client_keys(msg, "release"):
            t = tasks.get(base | ckey)
            if t is not None:
                t.wanted = False
                self._maybe_forget(t)

    def _on_cancel(self, ident: bytes, msg: list[int], _: list[Any]) -> None:
        """Cancel tasks that have not finished; running ones finish and are discarded."""
        c = self._client(ident)
        if c is None:
            return
        base = c.index << CLIENT_BITS
        drop: dict[WorkerRecord, list[int]] = {}
        for ckey in _client_keys(msg, "cancel"):
            t = self.tasks.get(base | ckey)
            if t is None or t.state in (DONE, ERRED, CANCELLED):
                continue
            if t.state == READY:
                self._unready(t)
            elif t.state == ASSIGNED:
                self._drop_assigned(t, drop)
            t.state = CANCELLED
            t.wanted = False
            self._fail_dependents(t)
            self._maybe_forget(t)
        self._send_drops(drop)
        self._tell_leased_no_work()

    def _on_scatter(self, ident: bytes, msg: list[tuple[int, bytes]], _: list[Any]) -> None:
        """Store client data inline under client keys (already finished tasks)."""
        c = self._client(ident)
        if c is None:
            return
        base = c.index << CLIENT_BITS
        if type(msg) is not list or not all(
            type(e) is tuple
            and len(e) == 2
            and type(e[0]) is int
            and 0 < e[0] < (1 << CLIENT_BITS)
            and type(e[1]) is bytes
            for e in msg
        ):
            raise ProtocolError("scatter must be a list of (key, bytes)")
        for ckey, data in msg:
            key = base | ckey
            if key in self.tasks:
                continue
            t = Task(key, c, b"", b"", 0, 0, None)
            t.state = DONE
            t.result = data
            self.tasks[key] = t
            c.ntasks += 1
            c.outbox.append((ckey, R_INLINE, None))
        self._dirty_clients.add(c)

    def _remove_client(self, c: ClientRecord) -> None:
        """Release every task of a vanished client (queued ones on workers are dropped)."""
        self.clients.pop(c.ident, None)
        drop: dict[WorkerRecord, list[int]] = {}
        for t in [t for t in self.tasks.values() if t.client is c]:
            if t.state == READY:
                self._unready(t)
            elif t.state == ASSIGNED and not t.started:
                self._drop_assigned(t, drop)
            if t.state in (WAITING, READY):
                t.state = CANCELLED
            t.wanted = False
            t.dependents = None
            self._maybe_forget(t)
        self._send_drops(drop)
        self._tell_leased_no_work()

    def _drop_assigned(self, t: Task, drop: dict[WorkerRecord, list[int]]) -> None:
        """Take a task back from the worker it was sent to; it will not be started there.

        The task becomes WAITING (the caller cancels it); if the worker had already started it,
        its result arrives for an unknown task and is discarded.
        """
        w = t.worker
        if w is not None:
            w.assigned.discard(t.key)
            drop.setdefault(w, []).append(t.key)
        t.worker = None
        t.state = WAITING

    def _send_drops(self, drop: dict[WorkerRecord, list[int]]) -> None:
        for w, keys in drop.items():
            self._send(w.ident, Kind.DROP, keys)

    def _flush_clients(self) -> None:
        """Send each client its finished tasks in one message."""
        if not self._dirty_clients:
            return
        hint = self.n_ready
        budget = self._frame_budget
        for c in self._dirty_clients:
            if c.outbox and c.ident in self.clients:
                for part in protocol.split_by_size(c.outbox, 2, budget):
                    self._send(c.ident, Kind.RESULTS, {"results": part, "queued": hint})
            c.outbox = []
        self._dirty_clients.clear()

    # ------------------------------------------------------------------ task states
    def _make_ready(self, t: Task) -> None:
        t.state = READY
        if t.resources:
            self.ready_resourced.append(t)
        else:
            q = self.ready.get(t.priority)
            if q is None:
                q = self.ready[t.priority] = deque()
            q.append(t)
        self.n_ready += 1

    def _unready(self, t: Task) -> None:
        """Take a READY task out of the ready queues (rare: cancel, lost input)."""
        if t.resources:
            self.ready_resourced.remove(t)
        else:
            self.ready[t.priority].remove(t)
        self.n_ready -= 1
        t.state = WAITING

    def _maybe_forget(self, t: Task) -> None:
        """Drop a task once the client released it and no waiting task needs its result."""
        if t.wanted or t.dependents or t.state in (READY, ASSIGNED):
            return
        if t.state == WAITING and t.ndeps:
            return
        if self.tasks.pop(t.key, None) is None:
            return
        t.client.ntasks -= 1
        entry = self.funcs.get(t.fhash)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                self._idle_funcs[t.fhash] = None
                self._trim_idle_funcs()
        if t.where is not None:
            t.where.holds.discard(t.key)
            self._send(t.where.ident, Kind.RELEASE, [t.key])
            t.where = None
        if t.deps:
            for _, src in t.deps:
                if type(src) is int:
                    dep = self.tasks.get(src)
                    if dep is not None:
                        self._maybe_forget(dep)

    def _finish_error(self, t: Task, etype: str, text: str) -> None:
        """Fail a task with a scheduler-side error (killed workers, failed inputs)."""
        if t.state == READY:
            self._unready(t)
        t.state = ERRED
        t.result = None
        c = t.client
        c.outbox.append((t.key & CLIENT_KEY_MASK, R_FAILED, (etype, text)))
        self._dirty_clients.add(c)
        self._fail_dependents(t)
        self._maybe_forget(t)

    def _fail_dependents(self, t: Task) -> None:
        deps = t.dependents
        t.dependents = None
        if deps:
            for d in deps:
                if d.state in (WAITING, READY):
                    self._finish_error(d, "DependencyError", _dep_failed_text(t))

    # ------------------------------------------------------------------ leases and dispatch
    def _worker(self, ident: bytes) -> WorkerRecord | None:
        w = self.workers.get(ident)
        if w is None:
            self._unknown_peer(ident)
            return None
        w.last_seen = time.monotonic()
        return w

    def _on_lease(self, ident: bytes, msg: dict[str, Any], _: list[Any]) -> None:
        """The worker grants us more slots (and resources)."""
        w = self._worker(ident)
        if w is None:
            return
        check_grant(msg, "lease")
        w.lease += msg["n"]
        for name, amount in (msg.get("resources") or {}).items():
            w.lease_resources[name] = w.lease_resources.get(name, 0) + amount
        w.hinted = False
        if w.lease > 0:
            self.leased[ident] = w
        if "status" in msg:
            w.status = msg["status"]

    def _on_revoke(self, ident: bytes, msg: dict[str, Any], _: list[Any]) -> None:
        """Give back unused slots (all of them if the worker is retiring or pausing)."""
        w = self._worker(ident)
        if w is None:
            return
        check_grant(msg, "revoke")
        n = min(msg["n"], w.lease)
        w.lease -= n
        res = {}
        for name, amount in (msg.get("resources") or {}).items():
            give = min(amount, w.lease_resources.get(name, 0))
            if give:
                w.lease_resources[name] -= give
                res[name] = give
        if w.lease <= 0:
            self.leased.pop(ident, None)
        if msg.get("retiring"):
            w.retiring = True
        self._send(ident, Kind.RETURNED, {"n": n, "resources": res, "seq": msg.get("seq")})

    def _work_hint(self) -> dict[str, Any]:
        """What a worker needs to know to lease us slots: ready tasks and resources they ask."""
        msg: dict[str, Any] = {"n": self.n_ready}
        if self.ready_resourced:
            msg["resources"] = self._resource_demand()
        return msg

    def _nudge(self, w: WorkerRecord) -> None:
        if not w.hinted and not w.retiring:
            w.hinted = True
            self._send(w.ident, Kind.HAVE_WORK, self._work_hint())

    def _tell_leased_no_work(self) -> None:
        """The ready queue emptied without dispatch: workers parking slots here may use them."""
        if not self.n_ready:
            for w in self.leased.values():
                self._send(w.ident, Kind.HAVE_WORK, {"n": 0})

    def _resource_demand(self) -> dict[str, float]:
        """The largest amount of each resource one ready task asks for."""
        demand: dict[str, float] = {}
        for t in self.ready_resourced:
            for name, amount in t.resources.items():  # type: ignore[union-attr]
                if amount > demand.get(name, 0):
                    demand[name] = amount
        return demand

    def _dispatch(self) -> None:
        """Send ready tasks to workers that hold unused leases, spreading them evenly."""
        if not self.n_ready:
            return
        if self.leased:
            workers = list(self.leased.values())
            share = -(-self.n_ready // len(workers))
            for w in workers:
                if not self.n_ready:
                    break
                batch = self._take(w, min(w.lease, share))
                if batch:
                    self._send_tasks(w, batch)
                if w.lease <= 0:
                    self.leased.pop(w.ident, None)
        if self.n_ready:
            budget = self.n_ready
            for w in self.workers.values():
                if budget <= 0:
                    break
                if w.lease == 0 and not w.hinted and not w.retiring:
                    self._nudge(w)
                    budget -= w.nthreads
        if self.ready_resourced:
            # slots alone do not run these: ask the workers that have the resources for them
            demand = self._resource_demand()
            for w in self.workers.values():
                if not w.hinted and not _fits(demand, w.lease_resources):
                    if any(w.resources.get(name, 0) >= a for name, a in demand.items()):
                        self._nudge(w)

    def _take(self, w: WorkerRecord, n: int) -> list[Task]:
        """Pop up to ``n`` ready tasks that fit the worker's leased resources."""
        batch: list[Task] = []
        if self.ready_resourced and w.lease_resources:
            keep: list[Task] = []
            for t in self.ready_resourced:
                if len(batch) < n and _fits(t.resources, w.lease_resources):
                    for name, amount in t.resources.items():  # type: ignore[union-attr]
                        w.lease_resources[name] -= amount
                    batch.append(t)
                else:
                    keep.append(t)
            self.ready_resourced = keep
        if len(batch) < n and self.ready:
            for prio in sorted(self.ready, reverse=True):
                q = self.ready[prio]
                pop = q.popleft
                while q and len(batch) < n:
                    batch.append(pop())
                if not q:
                    del self.ready[prio]
                if len(batch) >= n:
                    break
        self.n_ready -= len(batch)
        w.lease -= len(batch)
        return batch

    def _inputs_lost(self, t: Task) -> bool:
        """Hold a ready task back (WAITING) while an input of it is being recomputed.

        Its inputs were all finished when it became ready; a worker lost since then may have
        held one, which is now running again.
        """
        held = False
        for _, src in t.deps:  # type: ignore[union-attr]
            if type(src) is int:
                dep = self.tasks.get(src)
                if dep is not None and (
                    dep.state != DONE or (dep.where is None and dep.result is None)
                ):
                    held = True
                    t.ndeps += 1
                    if dep.dependents is None:
                        dep.dependents = []
                    dep.dependents.append(t)
        if held:
            t.state = WAITING
        return held

    def _send_tasks(self, w: WorkerRecord, batch: list[Task]) -> None:
        """Send a batch: each task's function blob once, inputs as values or locations."""
        funcs: dict[bytes, bytes] = {}
        out = []
        tasks = self.tasks
        held = [t for t in batch if t.deps and self._inputs_lost(t)]
        if held:
            w.lease += len(held)  # give back what _take reserved for them
            for t in held:
                for name, amount in (t.resources or {}).items():
                    w.lease_resources[name] = w.lease_resources.get(name, 0) + amount
            batch = [t for t in batch if t.state != WAITING]
            if not batch:
                return
        for t in batch:
            t.state = ASSIGNED
            t.worker = w
            t.started = False
            w.assigned.add(t.key)
            if t.fhash not in funcs:
                funcs[t.fhash] = self.funcs[t.fhash][0]
            deps = None
            if t.deps:
                deps = []
                for dckey, src in t.deps:
                    if type(src) is int:
                        dep = tasks[src]
                        if dep.where is not None:
                            if dep.where is w:
                                deps.append((dckey, ("local", dep.key)))
                            else:
                                deps.append(
                                    (
                                        dckey,
                                        (
                                            "remote",
                                            dep.where.data_address,
                                            (self.scheduler_id, dep.key),
                                            dep.result,
                                        ),
                                    )
                                )
                        else:
                            deps.append((dckey, ("inline", dep.result)))
                    else:
                        deps.append((dckey, src))
            out.append((t.key, t.fhash, t.payload, deps, t.resources))
        resources = self._resource_demand() if self.ready_resourced else None
        parts = protocol.split_by_size(out, 2, self._frame_budget - sum(map(len, funcs.values())))
        for i, part in enumerate(parts):
            msg = {"tasks": part, "funcs": funcs if i == 0 else {}, "more": self.n_ready}
            if resources is not None:
                msg["resources"] = resources
            if len(batch) == 1 and not self.n_ready:
                # One task and nothing else ready (a caller waiting on it, most likely): a
                # worker on the client's machine also sends the result straight there, a hop
                # shorter than through us. Not under load: there it would only double messages.
                c = batch[0].client
                if c.reply_to and w.boot and c.boot == w.boot:
                    msg["reply"] = (c.reply_to, batch[0].key & CLIENT_KEY_MASK)
            self._send(w.ident, Kind.TASKS, msg)

    # ------------------------------------------------------------------ results
    def _on_started(self, ident: bytes, msg: list[int], _: list[Any]) -> None:
        """Mark tasks as running (they are blamed if the worker dies now)."""
        w = self._worker(ident)
        if w is None:
            return
        tasks = self.tasks
        for key in want_keys(msg, "started"):
            t = tasks.get(key)
            if t is not None and t.worker is w:
                t.started = True

    def _on_done(self, ident: bytes, msg: dict[str, Any], _: list[Any]) -> None:
        """Record finished tasks, notify clients, release dependents, return resources."""
        w = self._worker(ident)
        if w is None:
            return
        msg = want_dict(msg, "done")
        if "status" in msg:
            w.status = want_dict(msg["status"], "worker status")
        lease_back = protocol.want_int(msg.get("lease", 0), "done lease")
        back_resources = protocol.want_resources(msg.get("resources"), "done resources")
        done = msg.get("done")
        if type(done) is not list or not all(_well_formed_done(e) for e in done):
            raise ProtocolError("done must be a list of (key, status, value, duration)")
        tasks = self.tasks
        dirty = self._dirty_clients
        ewma = self.duration_ewma
        for key, status, value, duration in done:
            w.assigned.discard(key)
            t = tasks.get(key)
            ewma = duration if ewma is None else 0.95 * ewma + 0.05 * duration
            if t is None or t.worker is not w or t.state != ASSIGNED:
                if status == D_STORED:  # nobody needs it any more
                    self._send(ident, Kind.RELEASE, [key])
                continue
            t.worker = None
            c = t.client
            ckey = key & CLIENT_KEY_MASK
            if status == D_ERROR:
                if t.retries > 0:
                    t.retries -= 1
                    self._make_ready(t)
                    continue
                t.state = ERRED
                t.result = value
                c.outbox.append((ckey, R_ERROR, value))
                dirty.add(c)
                self.counters["tasks_erred"] += 1
                self._fail_dependents(t)
                self._maybe_forget(t)
                continue
            t.state = DONE
            self.counters["tasks_done"] += 1
            if status == D_INLINE:
                t.result = value
                if t.wanted:
                    c.outbox.append((ckey, R_INLINE, value))
                    dirty.add(c)
            else:
                t.result = value  # nbytes
                t.where = w
                w.holds.add(key)
                if t.wanted:
                    c.outbox.append(
                        (ckey, R_REMOTE, (w.data_address, (self.scheduler_id, key), value))
                    )
                    dirty.add(c)
            deps = t.dependents
            if deps:
                t.dependents = None
                for d in deps:
                    d.ndeps -= 1
                    if d.ndeps == 0 and d.state == WAITING:
                        self._make_ready(d)
            if t.payload and not t.wanted and t.where is None:
                self._maybe_forget(t)
            elif not t.wanted:
                self._maybe_forget(t)
        self.duration_ewma = ewma
        if lease_back:
            w.lease += lease_back
            self.leased[ident] = w
        for name, amount in back_resources.items():
            w.lease_resources[name] = w.lease_resources.get(name, 0) + amount

    def _on_missing(self, ident: bytes, msg: dict[str, Any], _: list[Any]) -> None:
        """A worker could not fetch an input: recover the input, then rerun the task."""
        w = self._worker(ident)
        if w is None:
            return
        missing = want_dict(msg, "missing").get("missing")
        if type(missing) is not list or not all(
            type(e) in (tuple, list) and len(e) == 2 and all(type(k) is int for k in e)
            for e in missing
        ):
            raise ProtocolError("missing must be a list of (key, input key)")
        for key, dep_key in missing:
            w.assigned.discard(key)
            t = self.tasks.get(key)
            if t is None or t.worker is not w:
                continue
            t.worker = None
            t.state = WAITING
            dep = self.tasks.get(dep_key)
            if dep is None or dep.state != DONE:
                self._finish_error(t, "LostDataError", f"input {dep_key} is no longer available")
                continue
            holder = dep.where
            if holder is not None and holder.ident in self.workers:
                # the holder is alive but lost the value (e.g. restarted); recompute it
                holder.holds.discard(dep.key)
            self._recompute(dep, reason=f"input lost on {holder.name if holder else '?'}")
            t.ndeps += 1
            if dep.dependents is None:
                dep.dependents = []
            dep.dependents.append(t)

    def _on_stored(self, ident: bytes, msg: list[int], _: list[Any]) -> None:
        """A worker now holds replicas of these keys (after REPLICATE during a retirement)."""
        w = self._worker(ident)
        if w is None:
            return
        for key in want_keys(msg, "stored"):
            t = self.tasks.get(key)
            if t is None or t.state != DONE:
                self._send(ident, Kind.RELEASE, [key])
                continue
            old = t.where
            t.where = w
            w.holds.add(key)
            if old is not None and old is not w:
                old.holds.discard(key)
                self._send(old.ident, Kind.RELEASE, [key])
                if t.wanted:
                    ckey = key & CLIENT_KEY_MASK
                    t.client.outbox.append(
                        (ckey, R_REMOTE, (w.data_address, (self.scheduler_id, key), t.result))
                    )
                    self._dirty_clients.add(t.client)
                if old.retiring and not old.holds:
                    self._send(old.ident, Kind.GOODBYE, {"scheduler_id": self.scheduler_id})
            if w.retiring:  # it started leaving since it was chosen: pass the result on
                self._replicate(w, [key], self._hand_off_targets(w))

    # ------------------------------------------------------------------ worker loss and retirement
    def _recompute(self, t: Task, reason: str) -> None:
        """Run a finished task again because its stored result was lost."""
        if t.where is not None:
            t.where.holds.discard(t.key)
            t.where = None
        if not t.payload:  # scattered data cannot be recomputed
            self._finish_error(t, "LostDataError", f"scattered data lost: {reason}")
            return
        t.state = WAITING
        t.result = None
        pending = 0
        if t.deps:
            for _, src in t.deps:
                if type(src) is int:
                    dep = self.tasks.get(src)
                    if dep is None:
                        self._finish_error(t, "LostDataError", f"inputs of a lost result: {reason}")
                        return
                    if dep.state != DONE or (dep.where is None and dep.result is None):
                        if dep.state == DONE:
                            self._recompute(dep, reason)
                        pending += 1
                        if dep.dependents is None:
                            dep.dependents = []
                        dep.dependents.append(t)
        t.ndeps = pending
        if pending == 0:
            self._make_ready(t)

    def _remove_worker(self, w: WorkerRecord, reason: str) -> None:
        """Recover a gone worker's tasks and lost results."""
        self.leased.pop(w.ident, None)
        for key in list(w.assigned):
            t = self.tasks.get(key)
            if t is None or t.worker is not w:
                continue
            t.worker = None
            if t.started:
                t.attempts += 1
                if t.attempts >= self.max_attempts:
                    self._finish_error(
                        t,
                        "KilledWorkerError",
                        f"task was running on {t.attempts} workers that died "
                        f"(last: {w.name} on {w.host}, {reason})",
                    )
                    continue
            self._make_ready(t)
        w.assigned.clear()
        for key in list(w.holds):
            t = self.tasks.get(key)
            if t is None:
                continue
            t.where = None
            if t.wanted or t.dependents:
                self._recompute(t, reason=f"worker {w.name} lost ({reason})")
            else:
                self._maybe_forget(t)
        w.holds.clear()

    def _on_goodbye(self, ident: bytes, msg: Any, _: list[Any]) -> None:
        """A worker leaves after retiring, or a client closes."""
        w = self.workers.pop(ident, None)
        if w is not None:
            log.info("worker %s left", w.name)
            self._remove_worker(w, "retired")
            return
        c = self.clients.get(ident)
        if c is not None:
            self._remove_client(c)

    def _on_retire(self, ident: bytes, msg: dict[str, Any], _: list[Any]) -> None:
        """Admin: retire workers by name; a worker asks: move its stored results elsewhere."""
        w = self.workers.get(ident)
        if w is not None:  # the worker itself: it drained and now hands off its data
            w.retiring = True
            self.leased.pop(ident, None)
            self._hand_off(w)
            return
        names = want_dict(msg, "retire").get("names")
        if type(names) is not list or not all(type(n) is str for n in names):
            raise ProtocolError("retire names must be a list of strings")
        names = set(names)
        for w in self.workers.values():
            if w.name in names or (w.job is not None and w.job in names):
                # retiring from now on, not once it has drained: workers retired together must
                # not be chosen to receive each other's results (they would leave with them)
                w.retiring = True
                self.leased.pop(w.ident, None)
                self._send(w.ident, Kind.RETIRE, {"scheduler_id": self.scheduler_id})
        self._send(ident, Kind.RETIRE, {"ok": True})

    def _hand_off_targets(self, w: WorkerRecord) -> list[WorkerRecord]:
        """Workers that may receive a retiring worker's results: none that is leaving too."""
        return [
            x
            for x in self.workers.values()
            if x is not w
            and not x.retiring
            and x.status.get("state") != "retiring"  # retiring by itself (its lifetime)
            and x.data_address
        ]

    def _hand_off(self, w: WorkerRecord) -> None:
        """Replicate a retiring worker's needed results to other workers, then say goodbye."""
        targets = self._hand_off_targets(w)
        needed = [k for k in w.holds if (t := self.tasks.get(k)) and (t.wanted or t.dependents)]
        if not needed or not targets:
            for key in list(w.holds):
                t = self.tasks.get(key)
                if t is not None and t.where is w and (t.wanted or t.dependents):
                    self._recompute(t, reason=f"worker {w.name} retired with no other worker")
            w.holds.clear()
            self._send(w.ident, Kind.GOODBYE, {"scheduler_id": self.scheduler_id})
            return
        self._replicate(w, needed, targets)

    def _replicate(self, w: WorkerRecord, keys: list[int], targets: list[WorkerRecord]) -> None:
        """Have ``targets`` (spread by key) fetch these results from ``w`` and keep them."""
        if not targets:
            return
        for key in keys:
            target = targets[key % len(targets)]
            self._send(
                target.ident,
                Kind.REPLICATE,
                {"keys": [(key, w.data_address, (self.scheduler_id, key))]},
            )

    # ------------------------------------------------------------------ admin
    def _on_info(self, ident: bytes, msg: Any, _: list[Any]) -> None:
        """Report state for the cluster, the adaptive policy and users."""
        c = self.clients.get(ident)
        if c is not None:  # a client asking often sends no heartbeats: this is one
            c.last_seen = time.monotonic()
        self._send(ident, Kind.INFO, self.info())

    def info(self) -> dict[str, Any]:
        """Return this scheduler's state (the format in docs/CONTRACTS.md)."""
        waiting = running = 0
        for t in self.tasks.values():
            if t.state == WAITING:
                waiting += 1
            elif t.state == ASSIGNED:
                running += 1
        workers = []
        for w in self.workers.values():
            st = w.status
            workers.append(
                {
                    "name": w.name,
                    "job": w.job,
                    "host": w.host,
                    "pid": w.pid,
                    "nthreads": w.nthreads,
                    "resources": w.resources,
                    "data_address": w.data_address,
                    "running": len(w.assigned),
                    "memory_bytes": st.get("memory", 0),
                    "memory_limit_bytes": w.memory_limit,
                    "idle_s": st.get("idle_s", 0.0),
                    "stored_bytes": st.get("stored_bytes", 0),
                    "status": "retiring" if w.retiring else st.get("state", "running"),
                    "lifetime_end": w.lifetime_end,
                    "peak_running": st.get("peak_running", 0),
                    "dropped_frames": st.get("dropped_frames", 0),
                    "executed": st.get("executed", {}),
                    "inline": st.get("inline", {"runs": 0, "relieved": 0}),
                    # GETs its data port answered: over TCP, on its same-host socket, redirected
                    "data_served": st.get("data_served", {"tcp": 0, "local": 0, "redirected": 0}),
                    "local_address": w.local_address,
                }
            )
        return {
            "scheduler_id": self.scheduler_id,
            "address": self.address,
            "cluster_id": self.cluster_id,
            "time": time.time(),
            "versions": self._versions,
            "tasks": {"ready": self.n_ready, "waiting": waiting, "running": running},
            "tasks_total": len(self.tasks),
            "task_duration_s": self.duration_ewma,
            "clients": len(self.clients),
            "counters": {**self.counters, **(self._guard.counters if self._guard else {})},
            "security": "curve" if self.security.encrypted else "plaintext",
            "workers": workers,
        }

    def _on_shutdown(self, ident: bytes, msg: Any, _: list[Any]) -> None:
        """Admin: stop this scheduler."""
        self._send(ident, Kind.SHUTDOWN, {"ok": True})
        self._running = False


def _client_keys(msg: Any, what: str) -> list[int]:
    """A client's own keys: below ``1 << CLIENT_BITS``, so none reaches another client's tasks."""
    keys = want_keys(msg, what)
    if not all(0 < k < (1 << CLIENT_BITS) for k in keys):
        raise ProtocolError(f"{what}: a key out of this client's range")
    return keys


def _well_formed_done(entry: Any) -> bool:
    """One DONE entry: (key, status, value, duration) with the value its status needs."""
    if type(entry) is not tuple or len(entry) != 4:
        return False
    key, status, value, duration = entry
    if type(key) is not int or type(duration) not in (int, float):
        return False
    if status == D_INLINE:
        return type(value) is bytes
    if status == D_STORED:
        return type(value) is int and value >= 0
    if status == D_ERROR:
        return type(value) is tuple and len(value) == 3 and type(value[0]) is bytes
    return False


def _fits(need: dict[str, float] | None, have: dict[str, float]) -> bool:
    return all(have.get(k, 0) >= v for k, v in (need or {}).items())


def _dep_failed_text(dep: Task) -> str:
    return f"an input task ({dep.key & CLIENT_KEY_MASK}) failed or was cancelled"


def write_scheduler_file(
    path: str, addresses: list[str], cluster_id: str, security: Security
) -> None:
    """Write a scheduler file atomically (readers never see half a file).

    It names the key file (``keyfile``), never a key: scheduler files sit on shared filesystems.
    """
    data = {
        "protocol": protocol.PROTOCOL_VERSION,
        "cluster_id": cluster_id,
        "address": addresses[0],
        "addresses": list(addresses),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **security.scheduler_file_fields(),
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_scheduler_file(path: str) -> dict[str, Any]:
    """Read a scheduler file; raise ValueError naming the file if it is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
        addresses = data.get("addresses") or [data["address"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"scheduler_file={path!r} is not a jobqueue-ms scheduler file: {exc}"
        ) from None
    if data.get("protocol") != protocol.PROTOCOL_VERSION:
        raise ValueError(
            f"scheduler_file={path!r} is for protocol {data.get('protocol')!r}; "
            f"this jobqueue-ms speaks {protocol.PROTOCOL_VERSION}"
        )
    data["addresses"] = list(addresses)
    return data
