"""Same-host transfers of stored values: a Unix socket in a private directory, not encrypted TCP.

A worker serves stored values (large results, inputs of other workers' tasks) on its data port,
over TCP with CurveZMQ. Encrypting bytes that never leave the machine buys nothing, and costs
most of the CPU of a large transfer on a small node (10 MB results: ~0.7 GB/s encrypted on two
cores against ~2.5 GB/s over a Unix socket). So each worker also listens on a Unix socket in a
directory only its user can enter (mode 0700), and a requester on the same host is redirected
there:

1. The requester sends its GET over the encrypted port as usual, naming its host
   (:func:`host_token`, the kernel's boot id).
2. A worker on the same host answers with the socket's endpoint instead of the values.
3. The requester checks that the socket and its directory belong to its own user, with nobody
   else allowed in (:func:`trusted`), connects, and sends the GET again there; later GETs to that
   worker go there directly. If the check fails, it asks again over TCP without naming its host.

Who can connect to that socket is decided by the kernel, from the directory's permissions: the
same user (and root), exactly those who can read the cluster's key file (0600) anyway. The bytes
travel through kernel memory, which other users cannot read. So the socket is as private as an
encrypted connection would be between the same two processes; it is only ever offered to a peer
that already authenticated with the cluster's keys. ``JOBQUEUE_MS_LOCAL_DATA=0`` turns it off
(workers then open no socket, requesters never ask), e.g. to measure the encrypted path.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import zmq

ENV = "JOBQUEUE_MS_LOCAL_DATA"
SOCKET_NAME = "data"
_MAX_PATH = 100  # a Unix socket's path is limited to 107 bytes on Linux
_token: str | None = None


def enabled() -> bool:
    """Whether same-host transfers are on (``$JOBQUEUE_MS_LOCAL_DATA`` is not "0")."""
    return os.environ.get(ENV, "1").strip() not in ("0", "false", "no", "off") and bool(
        host_token()
    )


def host_token() -> str:
    """This machine's boot id: equal for two processes exactly when they share a kernel."""
    global _token
    if _token is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _token = f.read().strip()
        except OSError:  # not Linux: no same-host transfers
            _token = ""
    return _token


def make_dir() -> str | None:
    """A new private directory (0700) for a worker's socket, or None where that cannot be."""
    import tempfile  # here, not at import: workers import fast (a thousand start at once)

    if not enabled():
        return None
    for parent in (tempfile.gettempdir(), "/tmp"):
        if len(parent) + 30 > _MAX_PATH or not os.path.isdir(parent):
            continue
        try:
            path = tempfile.mkdtemp(prefix="jqms-", dir=parent)  # created 0700
        except OSError:
            continue
        # Marked as ours: if we are SIGKILLed, the next cluster started here removes it.
        from ..deploy.leftovers import mark_owner

        mark_owner(path, None)
        return path
    return None


def remove_dir(path: str | None) -> None:
    """Remove a directory made by :func:`make_dir` and the socket in it."""
    import shutil

    if path:
        shutil.rmtree(path, ignore_errors=True)


def endpoint(directory: str) -> str:
    return f"ipc://{os.path.join(directory, SOCKET_NAME)}"


def trusted(address: str) -> bool:
    """Whether ``address`` is a Unix socket of this user in a directory only this user enters."""
    if not isinstance(address, str) or not address.startswith("ipc://"):
        return False
    path = address[len("ipc://") :]
    uid = os.getuid()
    try:
        sock = os.lstat(path)
        parent = os.lstat(os.path.dirname(path) or ".")
    except (OSError, ValueError):
        return False
    return (
        stat.S_ISSOCK(sock.st_mode)
        and sock.st_uid == uid
        and stat.S_ISDIR(parent.st_mode)
        and parent.st_uid == uid
        and stat.S_IMODE(parent.st_mode) & 0o077 == 0
    )


def listen(ctx: zmq.Context[Any], directory: str, max_message_bytes: int) -> zmq.Socket[Any]:
    """The worker's same-host data socket, bound in ``directory`` (which must be private)."""
    info = os.lstat(directory)
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise PermissionError(f"{directory} must be a directory of this user with mode 0700")
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.bind(endpoint(directory))
    return sock


def connect(ctx: zmq.Context[Any], address: str, max_message_bytes: int) -> zmq.Socket[Any] | None:
    """A socket to a peer's same-host socket, or None if that is not :func:`trusted`."""
    if not trusted(address):
        return None
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.connect(address)
    return sock
