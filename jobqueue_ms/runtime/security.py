"""CurveZMQ keys of one cluster, applied to every socket, and the guard that checks peers.

A cluster has two key pairs, kept together in one *key file* (JSON, mode 0600, in a 0700
directory): the **server** pair, held by every process that listens (schedulers and the data
ports of workers), and the **client** pair, presented by every process that connects (workers,
clients, admin connections). Connections are encrypted and mutually authenticated: a connecting
peer must know the server's public key (so nobody can pose as a scheduler), and the listening
side's :class:`Guard` accepts only the cluster's client public key (ZAP, RFC 27). Whoever holds
the key file is a member of the cluster; nobody else can send it a single message.

Command lines, job scripts, environment variables and scheduler files carry the key file's
*path*, never the keys (``ps``, ``scontrol show job`` and ``qstat -f`` are readable by others).

Plaintext is an explicit opt-out: :meth:`Security.insecure_plaintext`, ``--insecure-plaintext``.

Every socket also gets a maximum inbound message size (``max_message_bytes``): a peer that sends
a larger frame is disconnected by libzmq before the frame is buffered.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.utils.z85

from .errors import JobqueueError

log = logging.getLogger("jobqueue_ms.security")

KEYFILE_FORMAT = "jobqueue-ms-curve-keys-1"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30  # 1 GiB per frame; tasks and results are far smaller
ENV_KEYFILE = "JOBQUEUE_MS_KEYFILE"
ENV_KEY_DIRECTORY = "JOBQUEUE_MS_KEY_DIRECTORY"
ENV_MAX_MESSAGE_BYTES = "JOBQUEUE_MS_MAX_MESSAGE_BYTES"
ZAP_DOMAIN = b"jobqueue-ms"
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class SecurityError(JobqueueError):
    """Keys that cannot be used: missing, malformed, readable by others, or refused by a peer."""


def default_key_directory() -> str:
    """``$JOBQUEUE_MS_KEY_DIRECTORY``, else ``~/.jobqueue-ms/keys`` (home is shared on clusters)."""
    return os.environ.get(ENV_KEY_DIRECTORY) or os.path.join(
        os.path.expanduser("~"), ".jobqueue-ms", "keys"
    )


def max_message_bytes_default() -> int:
    """``$JOBQUEUE_MS_MAX_MESSAGE_BYTES`` (bytes), else 1 GiB."""
    raw = os.environ.get(ENV_MAX_MESSAGE_BYTES)
    if not raw:
        return DEFAULT_MAX_MESSAGE_BYTES
    from ..units import parse_memory

    return parse_memory(raw, ENV_MAX_MESSAGE_BYTES)


@dataclass(frozen=True, repr=False)
class Security:
    """The keys (or the explicit lack of them) that every socket of a cluster uses.

    Build one with :meth:`generate` (new keys in a new key file), :meth:`load` (an existing key
    file) or :meth:`insecure_plaintext` (no encryption, no authentication: only on a network you
    trust completely). Its ``repr`` never shows a key.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> sec = Security.generate(directory=d, name="demo")
    >>> sec.encrypted, oct(os.stat(sec.path).st_mode & 0o777)
    (True, '0o600')
    >>> Security.load(sec.path) == sec
    True
    >>> sec.remove()
    """

    server_public: bytes = b""
    server_secret: bytes = b""
    client_public: bytes = b""
    client_secret: bytes = b""
    path: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    # ------------------------------------------------------------------ construction
    @classmethod
    def new(cls, max_message_bytes: int | None = None) -> Security:
        """New key pairs, in memory only (the MPI bootstrap shares them over MPI)."""
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(
            server_public,
            server_secret,
            client_public,
            client_secret,
            None,
            max_message_bytes or max_message_bytes_default(),
        )

    @classmethod
    def generate(
        cls,
        directory: str | None = None,
        name: str = "cluster",
        max_message_bytes: int | None = None,
    ) -> Security:
        """Make new key pairs and write them to a new key file ``<directory>/<name>.keys``.

        ``directory`` (default :func:`default_key_directory`) is created with mode 0700; an
        existing one must not be readable or writable by group or others.
        """
        directory = os.path.abspath(os.path.expanduser(directory or default_key_directory()))
        _private_directory(directory)
        return cls.new(max_message_bytes).save(os.path.join(directory, f"{name}.keys"))

    def save(self, path: str) -> Security:
        """Write the keys to a new file ``path`` (mode 0600, never replacing one); return the
        same keys, now known by that path."""
        path = os.path.abspath(os.path.expanduser(path))
        body = json.dumps(
            {
                "format": KEYFILE_FORMAT,
                "name": os.path.basename(path),
                "created": time.time(),
                "server_public": self.server_public.decode(),
                "server_secret": self.server_secret.decode(),
                "client_public": self.client_public.decode(),
                "client_secret": self.client_secret.decode(),
            },
            indent=1,
        )
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, body.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces another cluster's keys
        except FileExistsError:
            raise SecurityError(f"key file {path} already exists; choose another name") from None
        finally:
            os.unlink(tmp)
        return dataclasses.replace(self, path=path)

    def material(self) -> tuple[bytes, bytes, bytes, bytes]:
        """The four keys, to hand to processes of the same cluster over a private channel."""
        return (self.server_public, self.server_secret, self.client_public, self.client_secret)

    @classmethod
    def load(cls, path: str, max_message_bytes: int | None = None) -> Security:
        """Read a key file, refusing one that others could read (like ssh does)."""
        path = os.path.abspath(os.path.expanduser(path))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise SecurityError(
                f"key file {path} does not exist (made by the cluster that owns it; "
                "`jobqueue-ms keys new PATH` makes one for hand-started processes)"
            ) from None
        if st.st_mode & 0o077:
            raise SecurityError(
                f"key file {path} is readable by others (mode {oct(st.st_mode & 0o777)}); "
                f"the keys may be known to other users: run `chmod 600 {path}`, or better, "
                "make new keys"
            )
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise SecurityError(f"key file {path} belongs to uid {st.st_uid}, not to this user")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("format") != KEYFILE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {KEYFILE_FORMAT!r}")
            keys = [
                data[k].encode()
                for k in ("server_public", "server_secret", "client_public", "client_secret")
            ]
            if any(len(k) != 40 for k in keys):
                raise ValueError("keys must be 40-character Z85 strings")
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise SecurityError(f"key file {path} cannot be used: {exc}") from None
        return cls(
            *keys, path=path, max_message_bytes=max_message_bytes or max_message_bytes_default()
        )

    @classmethod
    def insecure_plaintext(cls, max_message_bytes: int | None = None) -> Security:
        """No encryption and no authentication: anyone who reaches a port can run code."""
        return cls(max_message_bytes=max_message_bytes or max_message_bytes_default())

    @classmethod
    def from_options(
        cls,
        keyfile: str | None,
        insecure_plaintext: bool,
        scheduler_info: dict[str, Any] | None = None,
        max_message_bytes: int | None = None,
    ) -> Security:
        """What a command-line process uses: ``--keyfile``, ``--insecure-plaintext``, the
        scheduler file's ``keyfile``, or ``$JOBQUEUE_MS_KEYFILE``, in that order."""
        if keyfile and insecure_plaintext:
            raise SecurityError("give either a key file or --insecure-plaintext, not both")
        if insecure_plaintext:
            return cls.insecure_plaintext(max_message_bytes)
        if not keyfile and scheduler_info is not None:
            if scheduler_info.get("security") == "plaintext":
                return cls.insecure_plaintext(max_message_bytes)
            keyfile = scheduler_info.get("keyfile")
        keyfile = keyfile or os.environ.get(ENV_KEYFILE)
        if not keyfile:
            raise SecurityError(
                "no key file: connections are encrypted by default. Pass the cluster's key file "
                "(--keyfile PATH, Client(..., security=PATH) or $JOBQUEUE_MS_KEYFILE), a "
                "scheduler file that names it, or opt out with --insecure-plaintext / "
                "security=Security.insecure_plaintext()"
            )
        return cls.load(keyfile, max_message_bytes)

    @classmethod
    def coerce(cls, value: Security | str | None, addresses: list[str] | None = None) -> Security:
        """A ``security=`` argument: a Security, a key file path, or None.

        None means: the keys of a cluster or scheduler made in this process for these
        ``addresses`` (see :func:`register`), else the process default (set by the MPI
        bootstrap), else ``$JOBQUEUE_MS_KEYFILE``.
        """
        if isinstance(value, Security):
            return value
        if value is None:
            known = default_for(addresses or [])
            if known is not None:
                return known
        if value is None or isinstance(value, (str, os.PathLike)):
            return cls.from_options(os.fspath(value) if value else None, False)
        raise TypeError(
            f"security={value!r} must be a key file path or a Security "
            "(Security.load(path), Security.insecure_plaintext())"
        )

    # ------------------------------------------------------------------ use
    @property
    def encrypted(self) -> bool:
        return bool(self.server_public)

    def argv(self) -> list[str]:
        """Command-line options that give a child process the same security."""
        if not self.encrypted:
            return ["--insecure-plaintext"]
        assert self.path is not None
        return ["--keyfile", self.path]

    def scheduler_file_fields(self) -> dict[str, Any]:
        """What a scheduler file says about security: the key file's path, never a key."""
        if not self.encrypted:
            return {"security": "plaintext"}
        return {"security": "curve", "keyfile": self.path}

    def remove(self) -> None:
        """Delete the key file (a cluster does this on close unless told to keep its keys)."""
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def socket(self, ctx: zmq.Context[Any], kind: int, *, server: bool) -> zmq.Socket[Any]:
        """A new socket with the cluster's keys, the size limit and no linger."""
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        if self.encrypted:
            if server:
                if not self.server_secret:
                    raise SecurityError("listening needs the server's secret key")
                sock.setsockopt(zmq.CURVE_SERVER, 1)
                sock.setsockopt(zmq.CURVE_SECRETKEY, self.server_secret)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, self.server_public)
                sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
                # Refuse connections when the guard is not there, rather than accept everyone.
                sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            else:
                sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, self.client_public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, self.client_secret)
        return sock

    def __repr__(self) -> str:
        if not self.encrypted:
            return "Security(insecure plaintext)"
        return f"Security(curve, keyfile={self.path!r})"


_KNOWN: dict[str, Security] = {}
_PROCESS_DEFAULT: list[Security] = []


def register(addresses: list[str], security: Security) -> None:
    """Remember the keys of schedulers started by this process, so ``Client(address)`` works."""
    for a in addresses:
        _KNOWN[a] = security


def unregister(addresses: list[str]) -> None:
    """Forget what :func:`register` remembered (the cluster or scheduler closed)."""
    for a in addresses:
        _KNOWN.pop(a, None)


def set_process_default(security: Security | None) -> None:
    """Make ``security`` what ``Client()`` uses when given no keys (the MPI bootstrap's)."""
    _PROCESS_DEFAULT[:] = [security] if security is not None else []


def default_for(addresses: list[str]) -> Security | None:
    """Keys this process knows for every one of ``addresses``, else the process default."""
    found = {id(_KNOWN[a]): _KNOWN[a] for a in addresses if a in _KNOWN}
    if addresses and len(found) == 1 and all(a in _KNOWN for a in addresses):
        return next(iter(found.values()))
    return _PROCESS_DEFAULT[0] if _PROCESS_DEFAULT else None


def _private_directory(directory: str) -> None:
    """Create ``directory`` 0700, or check that an existing one is private to this user."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_mode & 0o077:
        raise SecurityError(
            f"key directory {directory} is open to other users (mode "
            f"{oct(st.st_mode & 0o777)}); run `chmod 700 {directory}` or choose another one"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise SecurityError(f"key directory {directory} is not a directory")


class Guard:
    """Check the client keys of peers connecting to this process's listening sockets.

    Runs the process's ZAP handler in a small thread, and watches the listening sockets for
    handshakes that fail before ZAP is asked (no encryption, wrong server key). Each refused peer
    is logged once (by address and key); the rest only counted, so a peer retrying ten times a
    second cannot flood the log.

    Create it *before* binding the watched sockets, so no connection is ever accepted unchecked.
    """

    def __init__(self, ctx: zmq.Context[Any], security: Security, sockets: list[Any]) -> None:
        self.security = security
        self.counters = {"refused_keys": 0, "refused_handshakes": 0, "accepted": 0}
        self._seen: set[tuple[str, str]] = set()
        self._last_handshake_log = 0.0
        self._thread: threading.Thread | None = None
        if not security.encrypted:
            return
        self._allowed = zmq.utils.z85.decode(security.client_public)
        self._zap = ctx.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(_ZAP_ENDPOINT)
        self._monitors = []
        for i, sock in enumerate(sockets):
            endpoint = f"inproc://jobqueue-ms-guard-{id(self)}-{i}"
            sock.monitor(endpoint, _HANDSHAKE_FAILED)
            m = ctx.socket(zmq.PAIR)
            m.setsockopt(zmq.LINGER, 0)
            m.connect(endpoint)
            self._monitors.append(m)
        self._thread = threading.Thread(target=self._run, name="jobqueue-ms-guard", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Answer ZAP requests and read monitor events until the context terminates."""
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        for m in self._monitors:
            poller.register(m, zmq.POLLIN)
        try:
            while True:
                for sock, _ in poller.poll():
                    if sock is self._zap:
                        self._answer(self._zap.recv_multipart())
                    else:
                        self._handshake_failed(sock.recv_multipart())
        except zmq.ContextTerminated:
            pass
        finally:
            self._zap.close(linger=0)
            for m in self._monitors:
                m.close(linger=0)

    def _answer(self, request: list[bytes]) -> None:
        """Reply to one ZAP request: 200 for the cluster's client key, 400 otherwise."""
        version, request_id = request[0], request[1]
        address, mechanism = request[3].decode(errors="replace"), request[5]
        key = request[6] if mechanism == b"CURVE" and len(request) > 6 else b""
        if key and key == self._allowed:
            self.counters["accepted"] += 1
            self._zap.send_multipart([version, request_id, b"200", b"OK", b"member", b""])
            return
        self.counters["refused_keys"] += 1
        shown = zmq.utils.z85.encode(key).decode() if len(key) == 32 else mechanism.decode()
        if (address, shown) not in self._seen and len(self._seen) < 1000:  # bounded memory
            self._seen.add((address, shown))
            log.warning(
                "refused a connection from %s: its key %s is not this cluster's client key "
                "(logged once per peer and key; %d refused so far)",
                address,
                shown,
                self.counters["refused_keys"],
            )
        self._zap.send_multipart([version, request_id, b"400", b"unknown key", b"", b""])

    def _handshake_failed(self, frames: list[bytes]) -> None:
        """Count a handshake that failed before ZAP; log at most once a minute."""
        self.counters["refused_handshakes"] += 1
        now = time.monotonic()
        if now - self._last_handshake_log >= 60.0:
            self._last_handshake_log = now
            log.warning(
                "refused a connection whose CurveZMQ handshake failed (a peer without this "
                "cluster's keys, with the wrong server key, or speaking plaintext); %d so far, "
                "logged at most once a minute",
                self.counters["refused_handshakes"],
            )


def watch_handshakes(sock: zmq.Socket[Any]) -> zmq.Socket[Any]:
    """A monitor socket that reports this connecting socket's handshakes.

    Poll it: on ``EVENT_HANDSHAKE_SUCCEEDED`` the connection is up (say hello now, rather than
    at the next timer); any other event is a failure to pass to
    :func:`describe_handshake_failure`, for a clear error instead of a silent timeout when the
    keys are wrong or one side is plaintext.
    """
    return sock.get_monitor_socket(_HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED)


def describe_handshake_failure(event: int, value: int, address: str, security: Security) -> str:
    """Explain, for a connecting peer, why a scheduler or worker refused our handshake."""
    if not security.encrypted:
        where = "no keys (--insecure-plaintext)"
    else:
        where = f"keyfile {security.path}" if security.path else "the keys in memory"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"{address} refused our client key ({where}): this key file is not that "
            "cluster's; use the key file its scheduler file names"
        )
    if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if security.encrypted:
            return (
                f"{address} does not use CurveZMQ (started with --insecure-plaintext?) but we "
                f"have {where}"
            )
        return (
            f"{address} requires CurveZMQ encryption: pass its cluster's key file "
            "(security=PATH / --keyfile PATH) instead of the plaintext opt-out"
        )
    if not security.encrypted:
        return (
            f"the handshake with {address} failed: it most likely requires CurveZMQ; pass its "
            "cluster's key file (security=PATH / --keyfile PATH) instead of the plaintext opt-out"
        )
    return (
        f"the CurveZMQ handshake with {address} failed ({where}): it does not accept these keys "
        "(another cluster's key file, or it runs --insecure-plaintext)"
    )
