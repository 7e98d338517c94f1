"""The client: a ``concurrent.futures.Executor`` over one or more schedulers.

Submissions are spread over the schedulers by load (tasks this client has outstanding there plus
the queue length each scheduler reports). If a scheduler goes silent, every unfinished task sent
there is resubmitted to the others, so every future still completes exactly once.

A background I/O thread owns the ZeroMQ sockets; user threads hand it work through a queue.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import itertools
import logging
import os
import pickle
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, as_completed, wait
from typing import Any

import cloudpickle
import zmq

from . import localdata, protocol
from .errors import (
    CommError,
    JobqueueError,
    KilledWorkerError,
    LostDataError,
    RemoteTraceback,
    SchedulerLostError,
    TooManyTasksError,
    VersionMismatchError,
)
from .protocol import (
    R_ERROR,
    R_INLINE,
    R_REMOTE,
    Kind,
    ProtocolError,
    loads_control,
    pack,
    send_nowait,
    waiting,
)
from .security import Security, SecurityError, describe_handshake_failure, watch_handshakes
from .wakeup import Wakeup

log = logging.getLogger("jobqueue_ms.client")

__all__ = ["Client", "Future", "wait", "as_completed", "FIRST_COMPLETED"]

_FAILURES: dict[str, type[Exception]] = {
    "KilledWorkerError": KilledWorkerError,
    "LostDataError": LostDataError,
    "TooManyTasksError": TooManyTasksError,
}
_SLACK = 64 * 1024  # room for the framing around one task's payload in a message


_RELEASE_EVERY_MS = 10  # dropped futures are released on the schedulers this often
_RELEASE_BATCH = 4096  # ... or as soon as this many are waiting


class DependencyError(JobqueueError):
    """An input of this task failed or was cancelled."""


_FAILURES["DependencyError"] = DependencyError


class _Remote:
    """Marks a result stored on a worker; fetched directly from it on first ``result()``."""

    __slots__ = ("address", "skey", "nbytes")

    def __init__(self, address: str, skey: Any, nbytes: int) -> None:
        self.address = address
        self.skey = skey
        self.nbytes = nbytes


class Future(cf.Future):  # type: ignore[type-arg]
    """A ``concurrent.futures.Future`` for a task on the cluster.

    Large results stay on the worker that computed them until ``result()`` is called, and
    are then fetched directly from it. Dropping every reference releases the result.
    """

    def __init__(self, client: Client, ckey: int, name: str) -> None:
        super().__init__()
        self._client = client
        self._ckey = ckey
        self.key = f"{name}-{client.client_id}-{ckey}"

    def result(self, timeout: float | None = None) -> Any:
        value = super().result(timeout)
        if type(value) is _Remote:
            value = self._client._fetch_one(self, value, timeout)
        return value

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self._client._cancel([self._ckey])
        return True

    def __del__(self) -> None:
        client = self.__dict__.get("_client")
        if client is not None:
            client._release_later(self._ckey)

    def __repr__(self) -> str:
        return f"<Future {self.key} {self._state.lower()}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Future can be passed as an argument to client.submit (it becomes the task's "
            "result there), but it cannot be pickled in any other way"
        )


class _Spec:
    """What the client keeps to (re)submit a task."""

    __slots__ = (
        "ckey",
        "fhash",
        "blob",
        "payload",
        "deps",
        "priority",
        "retries",
        "resources",
        "sched",
    )

    def __init__(
        self,
        ckey: int,
        fhash: bytes,
        blob: bytes,
        payload: bytes,
        deps: list[Future] | None,
        priority: int,
        retries: int,
        resources: dict[str, float] | None,
    ) -> None:
        self.ckey = ckey
        self.fhash = fhash
        self.blob = blob  # shared with every spec of the function: resent if a scheduler asks
        self.payload = payload
        self.deps = deps
        self.priority = priority
        self.retries = retries
        self.resources = resources
        self.sched = -1


class _Link:
    """The client's view of one scheduler."""

    def __init__(self, index: int, address: str, sock: Any) -> None:
        self.index = index
        self.address = address
        self.sock = sock
        self.state = "connecting"  # connecting | ready | lost | refused
        self.scheduler_id: str | None = None
        self.outstanding = 0  # tasks sent there and not finished
        self.held = 0  # tasks sent there and not released (what its per-client limit counts)
        self.max_tasks = 1 << 62  # from the scheduler's welcome
        self.max_message_bytes = 1 << 62
        self.monitor: Any = None
        self.refusal: str | None = None
        self.queued_hint = 0
        self.last_recv = time.monotonic()
        self.last_send = 0.0
        self.last_hello = 0.0
        self.known_funcs: set[bytes] = set()
        self.info_waiters: deque[cf.Future] = deque()  # type: ignore[type-arg]


class _DepPickler(cloudpickle.Pickler):
    """Pickles task arguments, replacing this client's futures by references."""

    def __init__(self, file: Any, client: Client) -> None:
        super().__init__(file, protocol=5)
        self.client = client
        self.deps: list[Future] = []

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is Future or isinstance(obj, Future):
            if obj._client is not self.client:
                raise ValueError("a Future of another Client cannot be passed as an argument")
            self.deps.append(obj)
            return ("f", obj._ckey)
        return None


class _Options:
    """``client.options(retries=..., priority=..., resources=...)``: submit with these."""

    def __init__(self, client: Client, **options: Any) -> None:
        self._client = client
        self._options = options

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._client._submit_specs(fn, [(args, kwargs)], **self._options)[0]

    def submit_many(
        self,
        fn: Callable[..., Any],
        args: Iterable[Any],
        kwargs: Iterable[dict[str, Any]] | None = None,
    ) -> list[Future]:
        return self._client.submit_many(fn, args, kwargs, **self._options)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        return self._client._map(fn, iterables, timeout, chunksize, self._options)


def _run_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in chunk]


def _resolve(
    address: Any, scheduler_file: str | None, security: Security | str | None
) -> tuple[list[str], Security]:
    """The scheduler addresses and the keys to reach them with."""
    if scheduler_file is None and address is None:
        scheduler_file = os.environ.get("JOBQUEUE_MS_SCHEDULER_FILE") or None
    if scheduler_file is not None:
        from .scheduler import read_scheduler_file

        info = read_scheduler_file(scheduler_file)
        if security is None:
            return info["addresses"], Security.from_options(None, False, info)
        return info["addresses"], Security.coerce(security)
    addresses = _resolve_addresses(address)
    if security is None and isinstance(getattr(address, "security", None), Security):
        return addresses, address.security
    return addresses, Security.coerce(security, addresses)


def _resolve_addresses(address: Any) -> list[str]:
    if address is None:
        env = os.environ.get("JOBQUEUE_MS_SCHEDULER")
        if env:
            return [a for a in env.split(",") if a]
        raise ValueError(
            "Client() needs a cluster, an address ('tcp://host:port'), a list of addresses or "
            "scheduler_file=...; or set JOBQUEUE_MS_SCHEDULER / JOBQUEUE_MS_SCHEDULER_FILE"
        )
    if isinstance(address, str):
        addresses = [address]
    elif hasattr(address, "scheduler_addresses"):
        addresses = list(address.scheduler_addresses)
    else:
        addresses = list(address)
    for a in addresses:
        if not isinstance(a, str) or not a.startswith("tcp://"):
            raise ValueError(f"scheduler address {a!r} is not of the form 'tcp://host:port'")
    if not addresses:
        raise ValueError("Client() was given no scheduler address")
    return addresses


class Client(cf.Executor):
    """Submit Python functions to the schedulers of a cluster.

    Parameters
    ----------
    address:
        A cluster (anything with ``scheduler_addresses``), an address ``"tcp://host:port"`` or a
        list of addresses. Omit it and pass ``scheduler_file=`` instead, or set
        ``JOBQUEUE_MS_SCHEDULER`` / ``JOBQUEUE_MS_SCHEDULER_FILE``.
    timeout:
        Seconds to wait for at least one scheduler to accept the client.
    security:
        The cluster's key file (path) or a :class:`~jobqueue_ms.runtime.security.Security`.
        Not needed with a cluster object, a scheduler file, a scheduler started in this
        process, or ``$JOBQUEUE_MS_KEYFILE``.

    Examples
    --------
    >>> with LocalCluster(n_workers=2) as cluster, Client(cluster) as client:   # doctest: +SKIP
    ...     client.submit(pow, 2, 10).result()
    1024
    """

    def __init__(
        self,
        address: Any = None,
        *,
        scheduler_file: str | None = None,
        timeout: float = 30.0,
        name: str | None = None,
        heartbeat_interval_s: float | None = None,
        heartbeat_timeout_s: float | None = None,
        security: Security | str | None = None,
    ) -> None:
        self.addresses, self.security = _resolve(address, scheduler_file, security)
        self.client_id = uuid.uuid4().hex[:8]
        self.name = name or f"client-{self.client_id}"
        self.heartbeat_interval_s = heartbeat_interval_s or float(
            os.environ.get("JOBQUEUE_MS_HEARTBEAT_INTERVAL", "0.5")
        )
        self.heartbeat_timeout_s = heartbeat_timeout_s or float(
            os.environ.get("JOBQUEUE_MS_HEARTBEAT_TIMEOUT", "10")
        )
        self._keys = itertools.count(1)
        self._pending: dict[int, Future] = {}  # unfinished futures (strong refs)
        self._specs: dict[int, _Spec] = {}  # unreleased tasks: to resubmit on scheduler loss
        self._futures: weakref.WeakValueDictionary[int, Future] = weakref.WeakValueDictionary()
        self._held: list[_Spec] = []  # tasks waiting for inputs on other schedulers
        self._scattered: dict[int, Any] = {}
        self._fcache: dict[int, tuple[Any, bytes, bytes]] = {}
        self._inbox: deque[tuple[str, Any]] = deque()
        self._releases: deque[int] = deque()  # appended by Future.__del__ in any thread
        self._lock = threading.Lock()
        self._shutdown = False
        self._closed = threading.Event()
        self._error: BaseException | None = None
        self._ready = threading.Event()  # one scheduler answered
        self._all_answered = threading.Event()  # every scheduler answered (welcome or refusal)
        self._local = threading.local()
        self._ctx = zmq.Context(io_threads=2)
        self._wakeup = Wakeup()
        self._links: list[_Link] = []
        for i, a in enumerate(self.addresses):
            sock = self.security.socket(self._ctx, zmq.DEALER, server=False)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            link = _Link(i, a, sock)
            link.monitor = watch_handshakes(sock)
            sock.connect(a)
            self._links.append(link)
        # Workers on this host send results of single tasks here too, skipping a hop through
        # the scheduler (which still sends them: the first to arrive completes the future).
        self._reply_dir = localdata.make_dir()
        # removed by close(), at interpreter exit, or (SIGKILLed) by the next cluster started
        self._remove_reply_dir = weakref.finalize(self, localdata.remove_dir, self._reply_dir)
        self.counters = {"direct_results": 0}  # futures completed by a worker's direct result
        self._reply_sock: zmq.Socket[Any] | None = None
        self.reply_address = ""
        if self._reply_dir:
            try:
                self._reply_sock = localdata.listen(
                    self._ctx, self._reply_dir, self.security.max_message_bytes
                )
                self.reply_address = localdata.endpoint(self._reply_dir)
            except (OSError, zmq.ZMQError) as exc:
                log.warning("no same-host reply socket (%s): results come via schedulers", exc)
        self._thread = threading.Thread(
            target=self._io_loop, name="jobqueue-ms-client", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            err = self._error
            self._stop_io()
            if err is not None:
                raise err
            raise CommError(
                f"no scheduler answered within {timeout} s at {', '.join(self.addresses)}"
            )
        # The others are usually a millisecond behind: wait briefly so the first submissions
        # spread over all of them. One that stays silent is retried in the background.
        self._all_answered.wait(min(timeout, 2.0))

    # ------------------------------------------------------------------ Executor API
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on the cluster; futures in the arguments become values."""
        return self._submit_specs(fn, [(args, kwargs)])[0]

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like ``Executor.map``: results in order; ``chunksize`` items per task."""
        return self._map(fn, iterables, timeout, chunksize, {})

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally cancel pending futures and wait for the rest."""
        if self._closed.is_set():
            return
        self._shutdown = True
        if cancel_futures:
            for f in list(self._pending.values()):
                f.cancel()
        if wait:
            pending = list(self._pending.values())
            if pending:
                cf.wait(pending)
        self._stop_io()

    close = shutdown

    # ------------------------------------------------------------------ beyond the Executor
    def options(
        self, *, retries: int = 0, priority: int = 0, resources: dict[str, float] | None = None
    ) -> _Options:
        """Submit with per-task options: ``client.options(retries=2).submit(f, x)``."""
        return _Options(self, retries=retries, priority=priority, resources=resources)

    def submit_many(
        self,
        fn: Callable[..., Any],
        args: Iterable[Any],
        kwargs: Iterable[dict[str, Any]] | None = None,
        *,
        retries: int = 0,
        priority: int = 0,
        resources: dict[str, float] | None = None,
    ) -> list[Future]:
        """Submit many calls of ``fn`` in one message; return their futures in order.

        ``args`` yields one argument tuple per call (a non-tuple is a single argument);
        ``kwargs``, if given, yields one keyword dict per call.
        """
        arg_list = [a if isinstance(a, tuple) else (a,) for a in args]
        kw_list = list(kwargs) if kwargs is not None else [{}] * len(arg_list)
        if len(kw_list) != len(arg_list):
            raise ValueError(
                f"submit_many got {len(arg_list)} argument tuples but {len(kw_list)} kwargs dicts"
            )
        return self._submit_specs(
            fn,
            list(zip(arg_list, kw_list, strict=False)),
            retries=retries,
            priority=priority,
            resources=resources,
        )

    def gather(self, futures: Iterable[Future], errors: str = "raise") -> list[Any]:
        """Results of ``futures`` in order; remote results are fetched in parallel.

        ``errors="raise"`` re-raises the first error; ``"skip"`` leaves failed ones out.
        """
        futures = list(futures)
        cf.wait(futures)
        remote: dict[str, list[tuple[Future, _Remote]]] = {}
        for f in futures:
            if not f.cancelled() and f.exception() is None:
                v = cf.Future.result(f)
                if type(v) is _Remote:
                    remote.setdefault(v.address, []).append((f, v))
        if remote:
            self._fetch_many(remote)
        out = []
        for f in futures:
            try:
                out.append(f.result())
            except Exception:
                if errors == "raise":
                    raise
        return out

    def scatter(self, data: Any) -> Any:
        """Place data on the cluster once; return futures to pass to tasks by reference.

        A list (or dict) gives a list (or dict) of futures; anything else a single future.
        """
        if isinstance(data, dict):
            keys = list(data)
            futs = self._scatter_values([data[k] for k in keys])
            return dict(zip(keys, futs, strict=False))
        if isinstance(data, (list, tuple)):
            return self._scatter_values(list(data))
        return self._scatter_values([data])[0]

    def get_versions(self, check: bool = False) -> dict[str, Any]:
        """Versions of this client, every scheduler and every worker.

        ``check=True`` raises VersionMismatchError naming both sides of any mismatch.
        """
        mine = protocol.versions()
        out: dict[str, Any] = {
            "client": {**mine, **protocol.host_description()},
            "schedulers": {},
            "workers": {},
        }
        for info in self.scheduler_info():
            out["schedulers"][info["address"]] = info["versions"]
            for w in info["workers"]:
                out["workers"][w["name"]] = w.get("versions", info["versions"])
        if check:
            for who, v in [*out["schedulers"].items(), *out["workers"].items()]:
                problem = protocol.version_mismatch(mine, v, who)
                if problem:
                    raise VersionMismatchError(problem)
        return out

    def scheduler_info(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """State of every reachable scheduler (tasks, workers, counters)."""
        waits = []
        for link in self._links:
            if link.state == "ready":
                fut: cf.Future[Any] = cf.Future()
                self._command("info", (link, fut))
                waits.append(fut)
        return [f.result(timeout) for f in waits]

    @property
    def futures_pending(self) -> int:
        """Futures not done yet (one completed by a direct result counts as done)."""
        return sum(1 for f in list(self._pending.values()) if not f.done())

    def __repr__(self) -> str:
        ready = sum(1 for lk in self._links if lk.state == "ready")
        return (
            f"<Client {self.name}: {ready}/{len(self._links)} schedulers, "
            f"{len(self._pending)} pending>"
        )

    def __enter__(self) -> Client:
        return self

    # ------------------------------------------------------------------ submission internals
    def _function(self, fn: Callable[..., Any]) -> tuple[bytes, bytes]:
        entry = self._fcache.get(id(fn))
        if entry is None or entry[0] is not fn:
            blob = protocol.dumps_function(fn)
            fhash = hashlib.blake2b(blob, digest_size=16).digest()
            entry = (fn, fhash, blob)
            if len(self._fcache) > 256:
                self._fcache.pop(next(iter(self._fcache)))
            self._fcache[id(fn)] = entry
        return entry[1], entry[2]

    def _payload(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, list[Future]]:
        obj = (args, kwargs)
        if protocol._is_plain(obj):
            return pickle.dumps(obj, protocol=5), []
        buf = io.BytesIO()
        p = _DepPickler(buf, self)
        p.dump(obj)
        return buf.getvalue(), p.deps

    def _submit_specs(
        self,
        fn: Callable[..., Any],
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
        retries: int = 0,
        priority: int = 0,
        resources: dict[str, float] | None = None,
    ) -> list[Future]:
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        if not callable(fn):
            raise TypeError(f"fn={fn!r} is not callable")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries={retries!r} must be a non-negative integer")
        if not isinstance(priority, int):
            raise ValueError(f"priority={priority!r} must be an integer (higher runs first)")
        if resources is not None and (
            not isinstance(resources, dict)
            or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and v > 0
                for k, v in resources.items()
            )
        ):
            raise ValueError(f"resources={resources!r} must be a dict like {{'GPU': 1}}")
        fhash, blob = self._function(fn)
        name = getattr(fn, "__name__", "task")
        self._check_room(len(calls))
        limit = self._max_item_bytes() - len(blob)
        encoded = [self._payload(args, kwargs) for args, kwargs in calls]
        for payload, _ in encoded:
            if len(payload) > limit:
                raise ValueError(
                    f"a call of {name} pickles to {len(payload) + len(blob):,} bytes (function "
                    f"{len(blob):,}), more than max_message_bytes allows "
                    f"({self._max_item_bytes():,}); place large arguments on the cluster first "
                    "(x = client.scatter(value); client.submit(f, x)), or raise the limit "
                    "(max_message_bytes / $JOBQUEUE_MS_MAX_MESSAGE_BYTES) for every process"
                )
        futures = []
        specs = []
        keys = self._keys
        for payload, deps in encoded:
            ckey = next(keys)
            fut = Future(self, ckey, name)
            spec = _Spec(ckey, fhash, blob, payload, deps or None, priority, retries, resources)
            futures.append(fut)
            specs.append(spec)
            self._pending[ckey] = fut
            self._specs[ckey] = spec
            self._futures[ckey] = fut
        self._command("submit", (specs, {fhash: blob}))
        return futures

    def _max_item_bytes(self) -> int:
        """The largest task or value one message may carry to every scheduler."""
        limits = [lk.max_message_bytes for lk in self._links if lk.state == "ready"]
        return min([self.security.max_message_bytes, *limits]) - _SLACK

    def _check_room(self, n: int) -> None:
        """Refuse, before anything is sent, tasks the schedulers' per-client limits exceed.

        Counted here, in the caller's thread: every task not yet released, routed or not.
        """
        limits = [lk.max_tasks for lk in self._links if lk.state == "ready"]
        held = len(self._specs)
        if limits and held + n > sum(limits):
            raise TooManyTasksError(
                f"{n:,} more tasks would exceed the schedulers' limit of tasks per client: "
                f"this client holds {held:,}, and {len(limits)} scheduler(s) take "
                f"{', '.join(f'{m:,}' for m in limits)} each (max_tasks_per_client); tasks count "
                "until their futures are released: wait for results and drop the futures, or "
                "start the schedulers with a larger max_tasks_per_client"
            )

    def _map(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
        options: dict[str, Any],
    ) -> Iterator[Any]:
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize={chunksize!r} must be a positive integer")
        end = time.monotonic() + timeout if timeout is not None else None
        items = list(zip(*iterables, strict=False))
        if chunksize == 1:
            futures = self._submit_specs(fn, [(a, {}) for a in items], **options)
        else:
            chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
            futures = self._submit_specs(_run_chunk, [((fn, c), {}) for c in chunks], **options)

        def results() -> Iterator[Any]:
            try:
                futures.reverse()
                while futures:
                    f = futures.pop()
                    left = None if end is None else end - time.monotonic()
                    try:
                        value = f.result(left)
                    except BaseException:
                        f.cancel()  # as Executor.map: the one that timed out is cancelled too
                        raise
                    if chunksize == 1:
                        yield value
                    else:
                        yield from value
            finally:
                for f in futures:
                    f.cancel()

        return results()

    def _scatter_values(self, values: list[Any]) -> list[Future]:
        if self._shutdown:
            raise RuntimeError("cannot scatter after shutdown")
        futures = []
        items = []
        encoded = [protocol.dumps_user(v) for v in values]
        limit = self._max_item_bytes()
        for data in encoded:
            if len(data) > limit:
                raise ValueError(
                    f"a scattered value pickles to {len(data):,} bytes, more than "
                    f"max_message_bytes allows ({limit:,}); split it, or raise the limit "
                    "(max_message_bytes / $JOBQUEUE_MS_MAX_MESSAGE_BYTES) for every process"
                )
        self._check_room(len(values))
        for v, data in zip(values, encoded, strict=True):
            ckey = next(self._keys)
            fut = Future(self, ckey, "scatter")
            self._pending[ckey] = fut
            self._futures[ckey] = fut
            self._scattered[ckey] = v
            futures.append(fut)
            items.append((ckey, data))
        self._command("scatter", items)
        return futures

    def _cancel(self, ckeys: list[int]) -> None:
        for k in ckeys:
            self._pending.pop(k, None)
        self._command("cancel", ckeys)

    def _release_later(self, ckey: int) -> None:
        """Called from Future.__del__ (any thread, maybe the GC): queue a release."""
        self._releases.append(ckey)

    # ------------------------------------------------------------------ fetching large results
    def _socket_for(self, address: str) -> Any:
        """This thread's socket to a worker's data port (sockets are not shared by threads)."""
        socks = getattr(self._local, "socks", None)
        if socks is None:
            socks = self._local.socks = {}
            self._local.settled = set()  # on a same-host socket, or TCP after a refused offer
        s = socks.get(address)
        if s is None:
            s = self.security.socket(self._ctx, zmq.DEALER, server=False)
            s.connect(address)
            socks[address] = s
        return s

    def _redirect(self, address: str, sock: Any, local: Any) -> Any:
        """The worker at ``address`` is on this host: use its Unix socket if it is private."""
        near = localdata.connect(self._ctx, local, self.security.max_message_bytes)
        if near is None:
            log.warning("worker %s offered %r, not a private socket of ours: TCP", address, local)
            self._local.settled.add(sock)
            return sock
        sock.close(linger=0)  # nothing else is in flight on it: fetches are synchronous
        self._local.socks[address] = near
        self._local.settled.add(near)
        return near

    def _fetch_many(self, remote: dict[str, list[tuple[Future, _Remote]]]) -> None:
        """Fetch remote results, one GET per worker, all in flight at once."""
        from .worker import _decode_values

        host = localdata.host_token() if localdata.enabled() else ""
        pending = {}
        for address, pairs in remote.items():
            s = self._socket_for(address)
            get = {"req": 0, "keys": [list(r.skey) for _, r in pairs]}
            if host and s not in self._local.settled:
                get["host"] = host  # a worker on this host redirects us to its Unix socket
            s.send_multipart(pack(Kind.GET, get))
            pending[s] = (address, pairs)
        poller = zmq.Poller()
        for s in pending:
            poller.register(s, zmq.POLLIN)
        deadline = time.monotonic() + max(30.0, 3 * self.heartbeat_timeout_s)
        while pending and time.monotonic() < deadline:
            for s, _ in poller.poll(100):
                frames = s.recv_multipart(copy=False)
                msg = loads_control(frames[1].buffer)
                address, pairs = pending.pop(s)
                poller.unregister(s)
                if "local" in msg:  # same host: ask again on its socket (runtime/localdata.py)
                    s = self._redirect(address, s, msg["local"])
                    keys = [list(r.skey) for _, r in pairs]
                    s.send_multipart(pack(Kind.GET, {"req": 0, "keys": keys}))
                    pending[s] = (address, pairs)
                    poller.register(s, zmq.POLLIN)
                    continue
                for (f, r), v in zip(pairs, _decode_values(msg["items"], frames[2:]), strict=False):
                    if v is not _worker_missing():
                        with f._condition:
                            if f._result is r:
                                f._result = v
        for s, (address, _) in pending.items():  # unreachable worker: drop the socket
            s.close(linger=0)
            self._local.socks.pop(address, None)

    def _fetch_one(self, fut: Future, remote: _Remote, timeout: float | None) -> Any:
        """Fetch one remote result; if its worker is gone, wait for the recomputed location."""
        end = time.monotonic() + (timeout if timeout is not None else 6 * self.heartbeat_timeout_s)
        while True:
            self._fetch_many({remote.address: [(fut, remote)]})
            value = fut._result
            if type(value) is not _Remote:
                return value
            if time.monotonic() > end:
                raise LostDataError(
                    f"the result of {fut.key} was on worker {remote.address}, which is "
                    "unreachable, and was not recomputed in time"
                )
            with fut._condition:
                fut._condition.wait(0.1)
                remote = fut._result

    # ------------------------------------------------------------------ I/O thread
    def _command(self, kind: str, arg: Any) -> None:
        self._inbox.append((kind, arg))
        self._wake()

    def _wake(self) -> None:
        self._wakeup.set()

    def _stop_io(self) -> None:
        self._command("stop", None)
        self._thread.join(10)
        for s in getattr(self._local, "socks", {}).values():
            s.close(linger=0)
        if self._reply_sock is not None:
            self._reply_sock.close(linger=0)
        self._remove_reply_dir()
        self._ctx.term()
        self._wakeup.close()

    def _io_loop(self) -> None:
        """Own the sockets: send submissions, receive results, heartbeat, fail over."""
        poller = zmq.Poller()
        poller.register(self._wakeup.fd, zmq.POLLIN)
        by_sock = {}
        by_monitor = {}
        for link in self._links:
            poller.register(link.sock, zmq.POLLIN)
            by_sock[link.sock] = link
            if link.monitor is not None:
                poller.register(link.monitor, zmq.POLLIN)
                by_monitor[link.monitor] = link
        handlers = {
            Kind.WELCOME: self._on_welcome,
            Kind.REFUSED: self._on_refused,
            Kind.RESULTS: self._on_results,
            Kind.NEED_FUNCS: self._on_need_funcs,
            Kind.HEARTBEAT: lambda link, msg: None,
            Kind.INFO: self._on_info,
            Kind.GOODBYE: lambda link, msg: self._scheduler_lost(link, "it shut down"),
        }
        reply = self._reply_sock
        if reply is not None:
            poller.register(reply, zmq.POLLIN)
        next_tick = 0.0
        next_release = 0.0
        idle_ms = int(self.heartbeat_interval_s * 500)
        try:
            while True:
                events = poller.poll(_RELEASE_EVERY_MS if self._releases else idle_ms)
                for sock, _ in events:
                    if sock == self._wakeup.fd:
                        self._wakeup.drain()
                        continue
                    if sock in by_monitor:
                        self._on_monitor(by_monitor[sock])
                        continue
                    if sock is reply:
                        self._drain_replies(reply)
                        continue
                    link = by_sock[sock]
                    for frames in waiting(sock):
                        link.last_recv = time.monotonic()
                        try:
                            handler = handlers.get(frames[0].bytes)
                            if handler is None:
                                raise ProtocolError("unknown message kind")
                            handler(link, loads_control(frames[1].buffer))
                        except Exception as exc:  # noqa: BLE001 - keep serving the others
                            log.warning("dropped a malformed message: %s", exc, exc_info=True)
                if self._inbox and not self._process_inbox():
                    break
                now = time.monotonic()
                if self._releases and (
                    now >= next_release or len(self._releases) >= _RELEASE_BATCH
                ):
                    # Batched: one message per few ms, not one per finished future (a
                    # sequential caller would otherwise send a RELEASE with every submit).
                    self._flush_releases()
                    next_release = now + _RELEASE_EVERY_MS / 1000
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + self.heartbeat_interval_s / 2
        except BaseException as exc:  # pragma: no cover - a bug; fail every pending future
            log.exception("client I/O thread failed")
            for f in list(self._pending.values()):
                if not f.done():
                    f.set_exception(CommError(f"client I/O thread failed: {exc}"))
        finally:
            for link in self._links:
                if link.state == "ready":
                    self._send(link, Kind.GOODBYE, None)  # never raises: every socket closes
                if link.monitor is not None:
                    link.sock.disable_monitor()
                    link.monitor.close(linger=0)
                link.sock.close(linger=100)
            self._closed.set()

    def _drain_replies(self, sock: Any) -> None:
        """Results sent straight from workers on this host (see ``reply_address``)."""
        for frames in waiting(sock):
            try:
                if frames[1].bytes != Kind.RESULTS:
                    raise ProtocolError("unknown message kind")
                self._on_direct(loads_control(frames[2].buffer))
            except Exception as exc:  # noqa: BLE001 - a bad message must not stop the client
                log.warning("dropped a malformed direct result: %s", exc, exc_info=True)

    def _on_direct(self, msg: dict[str, Any]) -> None:
        """Complete futures from a worker's direct results; the scheduler's copy follows.

        Only the scheduler's copy does the bookkeeping (outstanding counts, resubmission
        state), so that a direct result that never comes changes nothing but latency.
        """
        link = next((lk for lk in self._links if lk.scheduler_id == msg["sid"]), None)
        if link is None:
            return
        for ckey, status, value in msg["results"]:
            fut = self._pending.get(ckey)
            spec = self._specs.get(ckey)
            if fut is None or fut.done() or spec is None or spec.sched != link.index:
                continue
            self.counters["direct_results"] += 1
            self._resolve_future(fut, ckey, status, value)

    def _on_monitor(self, link: _Link) -> None:
        """A handshake with this scheduler ended: hello at once, or say why it failed."""
        from zmq.utils.monitor import recv_monitor_message

        event = recv_monitor_message(link.monitor)
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if link.state in ("connecting", "lost"):
                self._hello(link, time.monotonic())  # the one sent before may have found no peer
            return
        if link.refusal is not None or link.state == "ready":
            return  # said once; libzmq keeps retrying in the background
        link.refusal = describe_handshake_failure(
            event["event"], event["value"], link.address, self.security
        )
        link.state = "refused"
        log.error("%s", link.refusal)
        if all(lk.state != "connecting" for lk in self._links):
            self._all_answered.set()
        if not self._ready.is_set() and all(lk.state == "refused" for lk in self._links):
            self._error = SecurityError("; ".join(lk.refusal or "" for lk in self._links))
            self._ready.set()

    def _send(self, link: _Link, kind: bytes, control: Any) -> bool:
        try:
            send_nowait(link.sock, pack(kind, control))
        except zmq.ZMQError:
            return False
        link.last_send = time.monotonic()
        return True

    def _process_inbox(self) -> bool:
        inbox = self._inbox
        while inbox:
            kind, arg = inbox.popleft()
            if kind == "submit":
                specs, funcs = arg
                self._route(specs, funcs)
            elif kind == "scatter":
                link = self._least_loaded()
                if link is None:
                    self._fail_all_lost([k for k, _ in arg])
                    continue
                for k, _ in arg:
                    spec = _Spec(k, b"", b"", b"", None, 0, 0, None)
                    spec.sched = link.index
                    self._specs[k] = spec
                link.outstanding += len(arg)
                link.held += len(arg)
                self._send(link, Kind.SCATTER, arg)
            elif kind == "cancel":
                by: dict[int, list[int]] = {}
                for k in arg:
                    spec = self._specs.get(k)
                    if spec is not None and spec.sched >= 0:
                        by.setdefault(spec.sched, []).append(k)
                        self._links[spec.sched].outstanding -= 1
                        self._links[spec.sched].held -= 1
                        spec.sched = -2
                for i, keys in by.items():
                    self._send(self._links[i], Kind.CANCEL, keys)
            elif kind == "info":
                link, fut = arg
                link.info_waiters.append(fut)
                self._send(link, Kind.INFO, None)
            elif kind == "stop":
                return False
        return True

    def _least_loaded(self, exclude: int = -1) -> _Link | None:
        best = None
        for link in self._links:
            if link.state != "ready" or link.index == exclude or link.held >= link.max_tasks:
                continue
            if best is None or (link.outstanding + link.queued_hint) < (
                best.outstanding + best.queued_hint
            ):
                best = link
        return best

    def _route(self, specs: list[_Spec], funcs: dict[bytes, bytes]) -> None:
        """Send tasks: dependents next to their inputs, the rest to the least loaded scheduler."""
        batches: dict[int, list[tuple[Any, ...]]] = {}
        chunk = 256
        link = None
        n_in_chunk = chunk
        for spec in specs:
            if spec.sched == -2:
                continue  # cancelled before sending
            if spec.deps:
                entry = self._dep_entry(spec)
                if entry is None:
                    continue
                target, wire = entry
            else:
                if n_in_chunk >= chunk or link is None or link.held >= link.max_tasks:
                    link = self._least_loaded()
                    n_in_chunk = 0
                    if link is None:
                        self._fail_all_lost([spec.ckey])
                        continue
                target, wire = (
                    link,
                    (
                        spec.ckey,
                        spec.fhash,
                        spec.payload,
                        None,
                        spec.priority,
                        spec.retries,
                        spec.resources,
                    ),
                )
                n_in_chunk += 1
            spec.sched = target.index
            target.outstanding += 1
            target.held += 1
            batches.setdefault(target.index, []).append(wire)
        for i, tasks in batches.items():
            link = self._links[i]
            need = {t[1] for t in tasks} - link.known_funcs
            send_funcs = {h: funcs.get(h) or self._blob(h) for h in need}
            link.known_funcs.update(need)
            self._send(link, Kind.SUBMIT, {"funcs": send_funcs, "tasks": tasks})

    def _blob(self, fhash: bytes) -> bytes:
        for _, h, blob in self._fcache.values():
            if h == fhash:
                return blob
        for spec in self._specs.values():
            if spec.fhash == fhash:
                return spec.blob
        raise KeyError("function blob no longer cached")

    def _on_need_funcs(self, link: _Link, msg: dict[str, Any]) -> None:
        """The scheduler dropped function blobs we thought it had: send them again."""
        funcs = {}
        for h in msg["funcs"]:
            try:
                funcs[h] = self._blob(h)
            except KeyError:
                log.error("scheduler %s asked for a function this client no longer has", link)
        link.known_funcs.update(funcs)
        self._send(link, Kind.SUBMIT, {"funcs": funcs, "tasks": []})

    def _dep_entry(self, spec: _Spec) -> tuple[_Link, tuple[Any, ...]] | None:
        """Pick the scheduler for a task with inputs and describe each input for it.

        Returns None (and holds the task) while an input on another scheduler is unfinished.
        """
        deps = spec.deps or []
        home = None
        for d in deps:
            ds = self._specs.get(d._ckey)
            if ds is not None and ds.sched >= 0 and not d.done():
                home = ds.sched
                break
        if home is None:
            for d in deps:
                ds = self._specs.get(d._ckey)
                if ds is not None and ds.sched >= 0:
                    home = ds.sched
                    break
        link = self._links[home] if home is not None else None
        if link is None or link.state != "ready":
            link = self._least_loaded()
        if link is None:
            self._fail_all_lost([spec.ckey])
            return None
        wire_deps = []
        for d in deps:
            ds = self._specs.get(d._ckey)
            if ds is not None and ds.sched == link.index:
                wire_deps.append((d._ckey, None))
                continue
            if not d.done():
                if spec not in self._held:
                    self._held.append(spec)
                return None
            if d.cancelled() or d.exception() is not None:
                self._pending.pop(spec.ckey, None)
                fut = self._futures.get(spec.ckey)
                if fut is not None and not fut.done():
                    fut.set_exception(DependencyError(f"input {d.key} failed or was cancelled"))
                return None
            v = cf.Future.result(d)
            if type(v) is _Remote:
                wire_deps.append((d._ckey, ("remote", v.address, list(v.skey), v.nbytes)))
            else:
                wire_deps.append((d._ckey, ("inline", protocol.dumps_user(v))))
        if spec in self._held:
            self._held.remove(spec)
        return link, (
            spec.ckey,
            spec.fhash,
            spec.payload,
            wire_deps,
            spec.priority,
            spec.retries,
            spec.resources,
        )

    def _flush_releases(self) -> None:
        releases = self._releases
        by: dict[int, list[int]] = {}
        while releases:  # popleft, not swap-and-iterate: an append racing the swap would be lost
            k = releases.popleft()
            spec = self._specs.pop(k, None)
            self._scattered.pop(k, None)
            if spec is not None and spec.sched >= 0:
                by.setdefault(spec.sched, []).append(k)
                self._links[spec.sched].held -= 1
        for i, keys in by.items():
            if self._links[i].state == "ready":
                self._send(self._links[i], Kind.RELEASE, keys)

    def _on_welcome(self, link: _Link, msg: dict[str, Any]) -> None:
        restarted = link.scheduler_id is not None and link.scheduler_id != msg["scheduler_id"]
        link.scheduler_id = msg["scheduler_id"]
        link.state = "ready"
        link.max_tasks = msg.get("max_tasks_per_client", link.max_tasks)
        link.max_message_bytes = msg.get("max_message_bytes", link.max_message_bytes)
        if restarted:
            link.known_funcs.clear()
        self._ready.set()
        if all(lk.state != "connecting" for lk in self._links):
            self._all_answered.set()

    def _on_refused(self, link: _Link, msg: dict[str, Any]) -> None:
        if msg.get("rejoin"):
            if link.state == "ready":
                self._scheduler_lost(link, "it restarted and forgot this client")
            link.state = "connecting"
            link.last_hello = 0.0
            return
        link.state = "refused"
        if all(lk.state != "connecting" for lk in self._links):
            self._all_answered.set()
        if not self._ready.is_set():
            self._error = VersionMismatchError(msg["reason"])
            self._ready.set()
        else:
            log.error("%s", msg["reason"])

    def _on_info(self, link: _Link, msg: dict[str, Any]) -> None:
        if link.info_waiters:
            link.info_waiters.popleft().set_result(msg)

    def _on_results(self, link: _Link, msg: dict[str, Any]) -> None:
        """Resolve futures from a batch of finished tasks."""
        link.queued_hint = msg.get("queued", 0)
        pending = self._pending
        finished = 0
        for ckey, status, value in msg["results"]:
            fut = pending.pop(ckey, None)
            if fut is None:
                if status == R_REMOTE:  # a recomputed or moved result: new location
                    f = self._futures.get(ckey)
                    if f is not None and f.done() and type(f._result) is _Remote:
                        with f._condition:
                            f._result = _Remote(value[0], tuple(value[1]), value[2])
                            f._condition.notify_all()
                continue
            spec = self._specs.get(ckey)
            if spec is None or spec.sched != link.index:
                pending[ckey] = fut  # a stale answer from a scheduler we failed over from
                continue
            finished += 1
            if fut.done():  # cancelled, a direct result came first, or recomputed elsewhere
                old = fut._result
                if (
                    status == R_REMOTE
                    and type(old) is _Remote
                    and (old.address, old.skey) != (value[0], tuple(value[1]))
                ):
                    with fut._condition:
                        fut._result = _Remote(value[0], tuple(value[1]), value[2])
                        fut._condition.notify_all()
            else:
                self._resolve_future(fut, ckey, status, value)
            spec_ = self._specs.get(ckey)
            if spec_ is not None and not spec_.deps and status == R_INLINE and spec_.payload:
                spec_.payload = b""  # resubmission no longer needed; keep memory small
        link.outstanding -= finished
        if self._held:
            for spec in list(self._held):
                self._route([spec], {})

    def _resolve_future(self, fut: Future, ckey: int, status: int, value: Any) -> None:
        try:
            if status == R_INLINE:
                if value is None:
                    fut.set_result(self._scattered.get(ckey))
                else:
                    fut.set_result(pickle.loads(value))
            elif status == R_REMOTE:
                fut.set_result(_Remote(value[0], tuple(value[1]), value[2]))
            elif status == R_ERROR:
                fut.set_exception(_rebuild_error(value))
            else:
                etype, text = value
                fut.set_exception(_FAILURES.get(etype, JobqueueError)(text))
        except cf.InvalidStateError:  # cancelled meanwhile
            pass
        except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be unpickled here
            fut.set_exception(exc)

    def _tick(self, now: float) -> None:
        """Heartbeats, (re)connection, and failover for silent schedulers."""
        for link in self._links:
            if link.state in ("connecting", "lost"):
                if now - link.last_hello > 0.5:
                    self._hello(link, now)
            elif link.state == "ready":
                if now - link.last_recv > self.heartbeat_timeout_s:
                    self._scheduler_lost(link, f"silent for {self.heartbeat_timeout_s:.1f} s")
                elif now - link.last_send >= self.heartbeat_interval_s * 0.9:
                    self._send(link, Kind.HEARTBEAT, None)

    def _hello(self, link: _Link, now: float) -> None:
        link.last_hello = now
        self._send(
            link,
            Kind.HELLO,
            {
                "role": "client",
                "versions": protocol.versions(),
                "client_id": self.client_id,
                "name": self.name,
                "reply_to": self.reply_address,  # "" or a same-host socket (runtime/localdata)
                "boot": localdata.host_token() if self.reply_address else "",
            },
        )

    def _scheduler_lost(self, link: _Link, reason: str) -> None:
        """Resubmit every unfinished task sent to a lost scheduler to the others."""
        if link.state != "ready":
            return
        log.warning("scheduler %s lost (%s); resubmitting its tasks", link.address, reason)
        link.state = "lost"
        link.scheduler_id = None
        link.known_funcs.clear()
        link.outstanding = 0
        link.held = 0
        for w in link.info_waiters:
            w.set_exception(CommError(f"scheduler {link.address} lost ({reason})"))
        link.info_waiters.clear()
        redo: list[_Spec] = []
        for ckey, spec in list(self._specs.items()):
            if spec.sched != link.index:
                continue
            fut = self._futures.get(ckey)
            lost_remote = fut is not None and fut.done() and type(fut._result) is _Remote
            if fut is not None and not fut.done() or lost_remote:
                if not spec.payload and not spec.fhash:
                    if ckey in self._scattered:  # re-scatter
                        spec.sched = -1
                        self._command(
                            "scatter", [(ckey, protocol.dumps_user(self._scattered[ckey]))]
                        )
                    continue
                if not spec.payload:
                    continue
                spec.sched = -1
                redo.append(spec)
            else:
                spec.sched = -1
                self._pending.pop(ckey, None)  # done by a direct result: no copy will come now
        if not any(lk.state == "ready" for lk in self._links):
            self._fail_all_lost([s.ckey for s in redo])
            return
        redo.sort(key=lambda s: s.ckey)  # inputs before the tasks that use them
        if redo:
            fhashes = {s.fhash for s in redo}
            funcs = {}
            for h in fhashes:
                try:
                    funcs[h] = self._blob(h)
                except KeyError:
                    pass
            missing = fhashes - set(funcs)
            for s in [s for s in redo if s.fhash in missing]:
                redo.remove(s)
                f = self._pending.pop(s.ckey, None)
                if f is not None and not f.done():
                    f.set_exception(
                        SchedulerLostError(
                            f"scheduler {link.address} was lost and the task could not be resent"
                        )
                    )
            for s in redo:
                f = self._futures.get(s.ckey)
                if f is not None and f.done():  # recompute a lost remote result
                    self._pending.setdefault(s.ckey, f)
            self._route(redo, funcs)

    def _fail_all_lost(self, ckeys: list[int]) -> None:
        ready = [lk for lk in self._links if lk.state == "ready"]
        err: JobqueueError
        if ready:  # reachable, but every one holds its limit of this client's tasks
            err = TooManyTasksError(
                "every scheduler holds its limit of this client's tasks ("
                + ", ".join(f"{lk.address}: {lk.max_tasks:,}" for lk in ready)
                + "); release futures of finished tasks before submitting more"
            )
        else:
            err = SchedulerLostError(
                f"no scheduler is reachable (tried {', '.join(self.addresses)})"
            )
        for k in ckeys:
            f = self._pending.pop(k, None)
            if f is not None and not f.done():
                f.set_exception(err)


def _worker_missing() -> Any:
    from .worker import _MISSING

    return _MISSING


def _rebuild_error(value: tuple[bytes, str, str]) -> BaseException:
    data, tb, etype = value
    try:
        exc = pickle.loads(data)
        if not isinstance(exc, BaseException):
            raise TypeError
    except Exception:  # noqa: BLE001
        exc = JobqueueError(f"{etype} (could not be rebuilt here)")
    exc.__cause__ = RemoteTraceback(tb)
    return exc
