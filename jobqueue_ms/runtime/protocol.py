"""Wire protocol: message kinds, framing, the protocol version and the handshake.

Every message is a ZeroMQ multipart message ``[kind, control, *buffers]``:

* ``kind`` is a short ASCII verb (``b"tasks"``, ``b"lease"``...), listed in :class:`Kind`;
* ``control`` is plain data (tuples, lists, dicts, str, bytes, int, float, bool, None) pickled
  with protocol 5 and loaded by :func:`loads_control`, which refuses every global, so a control
  frame can never name a class or function to build;
* ``buffers`` are out-of-band pickle-5 buffers of user data, sent zero-copy.

User functions, arguments and results travel inside control frames as opaque ``bytes`` produced by
:func:`dumps_user` (cloudpickle) and are only unpickled by the worker that runs the task or the
client that asked for the result. Schedulers never unpickle user data.
"""

from __future__ import annotations

import io
import pickle
import platform
import sys
from typing import Any

from .._version import __version__

PROTOCOL_VERSION = 1


class Kind:
    """Message verbs. Direction is noted as sender -> receiver."""

    HELLO = b"hello"  # client|worker -> scheduler: register (versions, identity)
    WELCOME = b"welcome"  # scheduler -> client|worker: registration accepted
    REFUSED = b"refused"  # scheduler -> peer: registration refused (reason)
    HEARTBEAT = b"hb"  # any -> any: liveness (+ worker status)
    SUBMIT = b"submit"  # client -> scheduler: a batch of tasks
    RESULTS = b"results"  # scheduler -> client: a batch of finished tasks
    NEED_FUNCS = b"needfuncs"  # scheduler -> client: resend these function blobs (tasks held)
    RELEASE = b"release"  # client -> scheduler, scheduler -> worker: forget these keys
    CANCEL = b"cancel"  # client -> scheduler: cancel these keys
    SCATTER = b"scatter"  # client -> scheduler: store data under keys
    LEASE = b"lease"  # worker -> scheduler: grant n more slots (and resources)
    REVOKE = b"revoke"  # worker -> scheduler: give back unused slots
    RETURNED = b"returned"  # scheduler -> worker: slots given back after a revoke
    HAVE_WORK = b"havework"  # scheduler -> worker: ready tasks but no lease from you
    TASKS = b"tasks"  # scheduler -> worker: run these (consumes leased slots)
    DROP = b"drop"  # scheduler -> worker: do not start these queued tasks (cancelled, orphaned)
    STARTED = b"started"  # worker -> scheduler: these tasks began running
    DONE = b"done"  # worker -> scheduler: these tasks finished (results or errors)
    MISSING = b"missing"  # worker -> scheduler: an input could not be fetched
    REPLICATE = b"replicate"  # scheduler -> worker: fetch these keys from a peer and keep them
    STORED = b"stored"  # worker -> scheduler: keys now held here (after replicate)
    RETIRE = b"retire"  # admin -> scheduler -> worker: drain and leave every scheduler
    GOODBYE = b"goodbye"  # worker|client -> scheduler: leaving cleanly
    INFO = b"info"  # admin -> scheduler: request state; scheduler -> admin: the state
    GET = b"get"  # client|worker -> worker data port: send me these stored values
    DATA = b"data"  # worker data port -> requester: the values (out-of-band buffers)
    PUT = b"put"  # scheduler|client -> worker data port: store these values
    SHUTDOWN = b"shutdown"  # admin -> scheduler: stop (and optionally its workers)


class ProtocolError(Exception):
    """A frame that does not follow the protocol; the receiver drops and counts it."""


class _ControlUnpickler(pickle.Unpickler):
    """Unpickler for control frames: builtin containers and scalars only, never a global."""

    def find_class(self, module: str, name: str) -> Any:
        raise ProtocolError(f"control frames may not reference {module}.{name}")


def dumps_control(obj: Any) -> bytes:
    """Serialize plain control data."""
    return pickle.dumps(obj, protocol=5)


def loads_control(frame: bytes | memoryview) -> Any:
    """Load a control frame, refusing anything but plain data."""
    try:
        return _ControlUnpickler(io.BytesIO(frame)).load()
    except ProtocolError:
        raise
    except Exception as exc:  # truncated or garbage frames
        raise ProtocolError(f"malformed control frame: {exc}") from None


def pack(kind: bytes, control: Any = None, buffers: list[Any] | None = None) -> list[Any]:
    """Build the frames of one message."""
    frames: list[Any] = [kind, dumps_control(control)]
    if buffers:
        frames.extend(buffers)
    return frames


_PLAIN = (int, float, str, bytes, bool, type(None), complex)


def _is_plain(obj: Any, depth: int = 0) -> bool:
    """True for builtin scalars and small containers of them (pickle == cloudpickle there)."""
    if type(obj) in _PLAIN:
        return True
    if depth < 2 and type(obj) in (tuple, list) and len(obj) <= 64:
        return all(_is_plain(x, depth + 1) for x in obj)
    if depth < 2 and type(obj) is dict and len(obj) <= 64:
        return all(type(k) is str and _is_plain(v, depth + 1) for k, v in obj.items())
    return False


def dumps_user(obj: Any) -> bytes:
    """Serialize user data (arguments, results) in-band.

    Plain builtin data goes through the C pickler directly; anything else through cloudpickle,
    which also handles classes and functions defined in ``__main__`` or interactively.
    """
    if _is_plain(obj):
        return pickle.dumps(obj, protocol=5)
    import cloudpickle

    return cloudpickle.dumps(obj, protocol=5)


def dumps_function(func: Any) -> bytes:
    """Serialize a callable: by reference when importable, by value (cloudpickle) otherwise."""
    import cloudpickle

    return cloudpickle.dumps(func, protocol=5)


def dumps_oob(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Serialize a large value with out-of-band buffers (bytes, bytearray, NumPy arrays)."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    except Exception:
        import cloudpickle

        buffers.clear()
        head = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return head, buffers


def loads_user(data: bytes | memoryview, buffers: list[Any] | None = None) -> Any:
    """Load user data (trusted: it comes from an authenticated peer of the same cluster)."""
    return pickle.loads(data, buffers=buffers or ())


def versions() -> dict[str, str]:
    """Versions that must agree between every process of a cluster."""
    import cloudpickle

    return {
        "protocol": str(PROTOCOL_VERSION),
        "jobqueue_ms": __version__,
        "python": ".".join(map(str, sys.version_info[:2])),
        "cloudpickle": cloudpickle.__version__,
    }


def host_description() -> dict[str, str]:
    """Informational versions that may differ (shown by get_versions)."""
    import zmq

    return {
        "python_full": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "platform": platform.platform(),
    }


def version_mismatch(mine: dict[str, str], theirs: dict[str, str], who: str) -> str | None:
    """Describe a protocol-relevant version mismatch, naming both sides, or return None."""
    bad = [k for k in ("protocol", "jobqueue_ms", "python") if mine.get(k) != theirs.get(k)]
    if not bad:
        return None
    parts = ", ".join(f"{k}: here {mine.get(k)!r}, {who} {theirs.get(k)!r}" for k in bad)
    return f"version mismatch with {who} ({parts})"
