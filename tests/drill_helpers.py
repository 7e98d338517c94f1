"""Helpers for the failure drills (tests/test_drills.py): hostile frames, memory, execution logs.

Nothing here starts a cluster; the drills do, and stop what they start.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
import zmq
from helpers import wait_until

from jobqueue_ms.runtime import protocol
from jobqueue_ms.runtime.protocol import Kind
from jobqueue_ms.runtime.security import Guard, Security

SCHEDULER_KINDS = [
    Kind.HELLO,
    Kind.HEARTBEAT,
    Kind.SUBMIT,
    Kind.RELEASE,
    Kind.CANCEL,
    Kind.SCATTER,
    Kind.LEASE,
    Kind.REVOKE,
    Kind.STARTED,
    Kind.DONE,
    Kind.MISSING,
    Kind.STORED,
    Kind.GOODBYE,
    Kind.RETIRE,
    Kind.INFO,
]
DATA_KINDS = [Kind.GET, b"put"]  # a worker's data port serves GET only; "put" is not a kind


# ============================================================================ figures
def report(request: pytest.FixtureRequest, drill: str, **figures: Any) -> None:
    """Show a drill's figures on the terminal, in the JUnit XML, and (if asked) in a JSON file.

    ``JOBQUEUE_MS_DRILL_REPORT=/tmp/drills.jsonl`` appends one JSON line per drill;
    docs/reliability.md quotes those lines.
    """
    for name, value in figures.items():
        request.node.user_properties.append((name, value))
    text = ", ".join(f"{k}={v}" for k, v in figures.items())
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nDRILL {drill}: {text}")
    path = os.environ.get("JOBQUEUE_MS_DRILL_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"drill": drill, "time": time.time(), **figures}) + "\n")


# ============================================================================ processes
def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    return int(psutil.Process(pid).memory_info().rss)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone: PID 1 here does not reap orphans)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def worker_pid(nanny_pid: int, timeout: float = 30) -> int:
    """The worker process a nanny runs now (its only child)."""

    def child() -> int:
        kids = [p for p in psutil.Process(nanny_pid).children() if alive(p.pid)]
        return kids[0].pid if len(kids) == 1 else 0

    return wait_until(child, timeout, message=f"the worker child of nanny {nanny_pid}")


def start_scheduler(
    port: int, cluster_id: str, log_path: str, security: Security
) -> subprocess.Popen[bytes]:
    """Start a scheduler process on a fixed loopback port (the caller stops it)."""
    argv = [sys.executable, "-m", "jobqueue_ms", "scheduler", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--cluster-id", cluster_id, *security.argv()]
    with open(log_path, "ab") as log_f:
        return subprocess.Popen(argv, stdout=log_f, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; reap."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ============================================================================ execution logs
def record_execution(path: str, key: int, delay: float = 0.0) -> int:
    """A task: log its start and end (one O_APPEND write each: atomic lines); return 2 * key."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"S {key} {os.getpid()} {time.time():.6f}\n".encode())
        if delay:
            time.sleep(delay)
        os.write(fd, f"E {key} {os.getpid()} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)
    return 2 * key


@dataclass
class Execution:
    """One run of a task on one process; ``ended`` is False if the process died in it."""

    pid: int
    started: float
    ended: bool = False


@dataclass
class ExecutionLog:
    """Every execution of every task key, read back from ``record_execution`` lines."""

    runs: dict[int, list[Execution]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str) -> ExecutionLog:
        log = cls()
        open_runs: dict[tuple[int, int], list[Execution]] = {}
        if not os.path.exists(path):
            return log
        with open(path) as f:
            for line in f:
                what, key_s, pid_s, t = line.split()
                key, pid = int(key_s), int(pid_s)
                if what == "S":
                    run = Execution(pid, float(t))
                    log.runs.setdefault(key, []).append(run)
                    open_runs.setdefault((key, pid), []).append(run)
                else:
                    open_runs[key, pid].pop(0).ended = True
        return log

    def wrongly_duplicated(self, killed: set[int]) -> list[int]:
        """Keys run more than once where the extra runs are not explained by a killed process.

        A task may run again only because the process running it was killed: at most one run
        of each key may be on a process that was never killed.
        """
        return [
            key
            for key, runs in self.runs.items()
            if sum(1 for r in runs if r.pid not in killed) > 1
        ]

    def reruns(self) -> int:
        """Executions beyond the first, summed over keys."""
        return sum(len(runs) - 1 for runs in self.runs.values())

    def interrupted(self) -> int:
        """Executions that never ended (their process was killed inside the task)."""
        return sum(1 for runs in self.runs.values() for r in runs if not r.ended)

    def started_after(self, t: float) -> int:
        return sum(1 for runs in self.runs.values() for r in runs if r.started > t)


# ============================================================================ capture
class CaptureProxy:
    """A recording man-in-the-middle between clients and one scheduler (loopback, a thread).

    Clients connect to ``address``; every message is forwarded unchanged on a DEALER of its own
    per client identity, and recorded (``sent``: client -> scheduler, ``received``: back).
    """

    def __init__(self, upstream: str, security: Security) -> None:
        self.upstream = upstream
        self.security = security  # a member of the cluster: it holds the keys
        self.sent: list[list[bytes]] = []
        self.received: list[list[bytes]] = []
        self._ctx = zmq.Context()
        self._front = security.socket(self._ctx, zmq.ROUTER, server=True)
        self._guard = Guard(self._ctx, security, [self._front])
        port = self._front.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture-proxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        backs: dict[bytes, zmq.Socket[Any]] = {}
        idents: dict[zmq.Socket[Any], bytes] = {}
        while not self._stop.is_set():
            for sock, _ in poller.poll(50):
                frames = sock.recv_multipart()
                if sock is self._front:
                    ident, msg = frames[0], frames[1:]
                    back = backs.get(ident)
                    if back is None:
                        back = backs[ident] = self.security.socket(
                            self._ctx, zmq.DEALER, server=False
                        )
                        back.connect(self.upstream)
                        idents[back] = ident
                        poller.register(back, zmq.POLLIN)
                    self.sent.append(msg)
                    back.send_multipart(msg)
                else:
                    self.received.append(frames)
                    self._front.send_multipart([idents[sock], *frames])
        for s in backs.values():
            s.close(0)
        self._front.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._ctx.term()


# ============================================================================ hostile frames
def _garbage_value(rng: random.Random, depth: int = 0) -> Any:
    """A plain value of a random, usually wrong, type (never a positive number: see below)."""
    choices: list[Any] = [
        None,
        0,
        -1,
        -(2**70),
        math.nan,
        -math.inf,
        "",
        "x" * rng.randint(1, 40),
        b"\x00" * rng.randint(0, 40),
        True,
        (),
        [],
        {},
        1j,
    ]
    if depth < 2:
        choices += [
            [_garbage_value(rng, depth + 1) for _ in range(rng.randint(1, 4))],
            tuple(_garbage_value(rng, depth + 1) for _ in range(rng.randint(1, 7))),
            {
                rng.choice(["n", "tasks", "funcs", "keys", "req", "items", "role", "done"]): (
                    _garbage_value(rng, depth + 1)
                )
            },
        ]
    return rng.choice(choices)


# Realistic field names per kind, so malformed payloads reach the handlers' bodies. Values never
# include a positive number: a fuzzer that registers as a worker and leases positive slots would
# legitimately receive (and sit on) real tasks, which is a matter for authentication, not fuzzing.
_FIELDS: dict[bytes, list[str]] = {
    Kind.HELLO: ["role", "versions", "name", "client_id", "data_address", "nthreads", "resources"],
    Kind.SUBMIT: ["funcs", "tasks"],
    Kind.LEASE: ["n", "resources", "status"],
    Kind.REVOKE: ["n", "resources", "retiring", "seq"],
    Kind.DONE: ["done", "lease", "resources", "status"],
    Kind.MISSING: ["missing"],
    Kind.RETIRE: ["names", "name"],
    Kind.GET: ["req", "keys"],
    b"put": ["req", "items"],
}


def malformed_control(kind: bytes, rng: random.Random) -> Any:
    """A control payload for ``kind`` with the right field names and wrong values or shapes."""
    fields = _FIELDS.get(kind)
    if fields is None or rng.random() < 0.3:
        return _garbage_value(rng)
    out = {name: _garbage_value(rng) for name in fields if rng.random() < 0.7}
    if kind == Kind.HELLO and rng.random() < 0.6:
        # a plausible hello with one bad field: registers, then the bad field must not hurt
        out.update(
            role=rng.choice(["client", "worker", "admin"]),
            versions=protocol.versions() if rng.random() < 0.8 else _garbage_value(rng),
            name="fuzz",
            client_id="fuzz",
            data_address="tcp://127.0.0.1:9",
        )
        bad = rng.choice(["nthreads", "resources", "name", "data_address", "job", "pid", "host"])
        out[bad] = _garbage_value(rng)
    return out


@dataclass
class FrameSource:
    """Generates the drill's hostile messages for one target (scheduler or worker data port)."""

    rng: random.Random
    kinds: list[bytes]
    replay: list[list[bytes]]  # captured valid messages (kind, control, *buffers)
    big: bytes  # random bytes to slice oversized frames from (zero copy)
    counts: dict[str, int] = field(default_factory=dict)

    def message(self) -> list[Any]:
        """One hostile message: random, truncated, oversized, replayed or malformed-control."""
        r = self.rng.random()
        rng = self.rng
        if r < 0.25:
            what = "random"
            msg: list[Any] = [rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(1, 4))]
            if rng.random() < 0.5:
                msg[0] = rng.choice(self.kinds)
        elif r < 0.45 and self.replay:
            what = "truncated"
            msg = [f[: rng.randint(0, max(0, len(f) - 1))] for f in rng.choice(self.replay)]
            msg = msg[: rng.randint(1, len(msg))]
        elif r < 0.452:
            what = "oversized"
            size = rng.randint(1 << 20, 4 << 20)
            start = rng.randint(0, len(self.big) - size)
            view = memoryview(self.big)[start : start + size]
            msg = [rng.choice(self.kinds), view] if rng.random() < 0.5 else [view]
        elif r < 0.65 and self.replay:
            what = "replayed"
            msg = list(rng.choice(self.replay))
        else:
            what = "malformed_control"
            kind = rng.choice(self.kinds)
            msg = protocol.pack(kind, malformed_control(kind, rng))
            if rng.random() < 0.2:
                msg.append(rng.randbytes(rng.randint(0, 64)))
        self.counts[what] = self.counts.get(what, 0) + 1
        return msg


class Fuzzer:
    """DEALER sockets with fresh identities that send hostile messages to one address.

    With the cluster's ``security`` it is a buggy or hostile *member* (its frames reach the
    parsers); with other keys or none it is an outsider, refused at the CurveZMQ handshake.
    """

    def __init__(
        self, ctx: zmq.Context[Any], address: str, security: Security, n_sockets: int = 8
    ) -> None:
        self.ctx = ctx
        self.address = address
        self.security = security
        self.n_sockets = n_sockets
        self.socks: list[zmq.Socket[Any]] = []
        self.identities = 0
        self.renew()

    def renew(self) -> None:
        """Close every socket and connect new ones (new identities, as a new attacker would)."""
        for s in self.socks:
            s.close(0)
        self.socks = []
        for _ in range(self.n_sockets):
            s = self.security.socket(self.ctx, zmq.DEALER, server=False)
            s.setsockopt(zmq.RCVHWM, 100)
            s.connect(self.address)
            self.socks.append(s)
        self.identities += self.n_sockets

    def send(self, rng: random.Random, msg: list[Any]) -> None:
        rng.choice(self.socks).send_multipart(msg, copy=False)

    def drain(self) -> None:
        """Throw away answers (refusals, data) so they do not pile up here."""
        for s in self.socks:
            while s.poll(0):
                s.recv_multipart()

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
        self.socks = []


def data_port_ping(sock: zmq.Socket[Any], req: int, timeout: float = 30.0) -> float:
    """Ask a worker's data port for nothing; return the round trip in seconds (raise if none)."""
    t0 = time.monotonic()
    sock.send_multipart(protocol.pack(Kind.GET, {"req": req, "keys": []}))
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if sock.poll(100):
            frames = sock.recv_multipart()
            if protocol.loads_control(frames[1]).get("req") == req:
                return time.monotonic() - t0
    raise AssertionError(f"the worker data port did not answer within {timeout} s")


def chunks(n: int, size: int) -> Iterator[int]:
    """Sizes of consecutive chunks of at most ``size`` covering ``n``."""
    while n > 0:
        yield min(n, size)
        n -= size
