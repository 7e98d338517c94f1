"""A small synchronous control connection to schedulers (for clusters, the CLI and tests)."""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq

from .errors import CommError
from .protocol import Kind, loads_control, pack
from .security import Security


class SchedulerAdmin:
    """Ask schedulers for their state, retire workers, shut schedulers down.

    Thread-safe; one DEALER socket per scheduler, used under a lock.
    """

    def __init__(
        self, addresses: list[str], timeout: float = 10.0, security: Security | str | None = None
    ) -> None:
        self.addresses = list(addresses)
        self.timeout = timeout
        self.security = Security.coerce(security, self.addresses)
        self._ctx = zmq.Context()
        self._lock = threading.Lock()
        self._socks: dict[str, Any] = {}

    def _sock(self, address: str) -> Any:
        s = self._socks.get(address)
        if s is None:
            s = self.security.socket(self._ctx, zmq.DEALER, server=False)
            s.connect(address)
            self._socks[address] = s
        return s

    def _drop(self, address: str) -> None:
        s = self._socks.pop(address, None)
        if s is not None:
            s.close(linger=0)

    def request(
        self, address: str, kind: bytes, control: Any = None, timeout: float | None = None
    ) -> Any:
        """Send one request to one scheduler and wait for the answer of the same kind."""
        with self._lock:
            s = self._sock(address)
            s.send_multipart(pack(kind, control))
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not s.poll(int(left * 1000)):
                    self._drop(address)  # discard late answers with the socket
                    raise CommError(f"scheduler {address} did not answer within the timeout")
                frames = s.recv_multipart()
                if frames[0] == kind:
                    return loads_control(frames[1])

    def info(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """State of every reachable scheduler (unreachable ones are left out)."""
        out = []
        for a in self.addresses:
            try:
                out.append(self.request(a, Kind.INFO, None, timeout))
            except CommError:
                continue
        return out

    def retire_workers(self, names: list[str]) -> None:
        """Retire workers (or every worker of the named jobs) gracefully, via any scheduler."""
        for a in self.addresses:
            try:
                self.request(a, Kind.RETIRE, {"names": list(names)}, timeout=5.0)
                return
            except CommError:
                continue
        raise CommError("no scheduler reachable to retire workers")

    def shutdown(self, address: str) -> None:
        """Stop one scheduler."""
        self.request(address, Kind.SHUTDOWN, None, timeout=5.0)

    def close(self) -> None:
        with self._lock:
            for a in list(self._socks):
                self._drop(a)
            self._ctx.term()
