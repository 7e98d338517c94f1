"""SSHCluster: schedulers and workers on plain SSH hosts, through the system OpenSSH client.

A *job* is one SSH launch: the rendered ``templates/ssh.sh.j2`` copied to the host's remote
directory and started detached with ``setsid nohup bash``, so the script and its workers form one
remote process group whose id (the pgid) is the job's native id, ``<host>:<pgid>``. Polling is
one ``ssh`` per host (``kill -0 -PGID``), cancelling signals the groups (TERM, then KILL). Each
scheduler is launched the same way, from the same template with ``role="scheduler"``, and is
polled too: a scheduler that dies is logged and shown in ``repr()`` and ``scheduler_status``.

Every ``ssh`` shares one ControlMaster connection per host (socket in a short local directory)
and runs with ``BatchMode=yes``. The remote command line is always just ``bash -s``: the script
travels on standard input, so the user's login shell (bash, zsh, csh, tcsh...) only has to start
bash, and nothing is parsed twice.

Each host also gets a *lifeline*: one ssh session that stays open while the cluster lives (see
:func:`lifeline_script`). If this process dies without ``close()`` -- SIGKILL, a crash, a lost
login node -- the session's end reaches the host, and after a grace period (a reconnecting owner
takes over within it) everything the cluster started there is stopped and its directory removed.

Workers are placed by free capacity: every host is probed once at start (cores it lets us use,
available memory, load) and each new job goes to the host with the most cores left after what
this cluster's jobs there use (see :func:`place_job`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import leftovers
from .cluster import Cluster, ClusterError, JobRecord, JobState

log = logging.getLogger("jobqueue_ms.ssh")

T = TypeVar("T")
SSH_ERROR = 255  # ssh's own exit code: connection or authentication failed
# A Unix socket path must fit sockaddr_un.sun_path (108 bytes on Linux, 104 on macOS/BSD), and
# ssh appends ".XXXXXXXXXXXXXXXX" to the ControlPath while it creates the socket.
UNIX_PATH_MAX = 104
_CONTROL_SUFFIX = len("/cm-") + 40 + len(".XXXXXXXXXXXXXXXX")  # %C is a 40-hex-digit hash
HOST_KEYS = ("host", "address")

# Printed by the host check: the cores this login may use (its CPU affinity, so cpusets and
# taskset count), memory available, the 1-minute load.
_PROBE = (
    "import os, psutil, jobqueue_ms; "
    "cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(); "
    "print('JQMS_CAPACITY', cores, psutil.virtual_memory().available, os.getloadavg()[0])"
)


class SSHError(ClusterError):
    """An ssh command failed; the message names the host and shows ssh's stderr and command."""

    def __init__(
        self,
        host: str,
        what: str,
        argv: Sequence[str],
        code: int,
        stderr: str,
        script: str = "",
    ) -> None:
        self.host = host
        self.argv = list(argv)
        self.returncode = code
        self.stderr = stderr
        self.script = script
        hint = _hint(code, stderr)
        remote = "".join(f"\n    {line}" for line in script.splitlines())
        super().__init__(
            f"host {host!r}: {what} (ssh exit {code}{hint})\n"
            f"  stderr: {stderr.strip() or '(empty)'}\n"
            f"  command: {shlex.join(argv)}"
            + (f"\n  remote bash script:{remote}" if remote else "")
        )


def _hint(code: int, stderr: str) -> str:
    if code != SSH_ERROR:
        return ""
    text = stderr.lower()
    if "permission denied" in text or "too many authentication failures" in text:
        return ": authentication failed; check the key (ssh_options=['-i', KEY]) and the user"
    if any(
        s in text
        for s in ("connection refused", "timed out", "no route", "could not resolve", "closed")
    ):
        return ": host unreachable; check the address, the port and that sshd runs there"
    return ""


# ---------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class HostCapacity:
    """What one host offered when probed: cores we may use, memory available, 1-minute load."""

    cores: int
    memory_bytes: int | None = None
    load: float = 0.0


def place_job(
    hosts: Sequence[str],
    capacity: Mapping[str, HostCapacity],
    jobs: Mapping[str, int],
    *,
    cores_per_job: int = 1,
    memory_per_job: int | None = None,
    max_jobs_per_host: int | None = None,
) -> str | None:
    """The host the next job goes to, or None when every host has ``max_jobs_per_host`` (pure).

    ``jobs`` counts this cluster's live jobs per host; each uses ``cores_per_job`` cores
    (workers x threads) and ``memory_per_job`` bytes (workers x memory limit, None: not
    counted). Hosts are ranked by:

    1. whether the job's memory still fits in what the host had available (only with a limit);
    2. cores left after this job: the host's cores minus what our jobs there use, this one too;
    3. fewer of our jobs, then the lower load measured at the probe;
    4. the order of ``hosts``.

    A host without a capacity entry counts as one core. Nothing is refused for lack of cores:
    when every host is full the least full gets the job (cap it with ``max_jobs_per_host``).

    >>> cap = {"big": HostCapacity(8), "small": HostCapacity(2)}
    >>> place_job(["small", "big"], cap, {"big": 2, "small": 0}, cores_per_job=2)
    'big'
    >>> place_job(["small", "big"], cap, {"big": 2, "small": 0}, cores_per_job=2,
    ...           max_jobs_per_host=2)
    'small'
    """
    best: tuple[Any, ...] | None = None
    chosen = None
    for index, host in enumerate(hosts):
        n = jobs.get(host, 0)
        if max_jobs_per_host is not None and n >= max_jobs_per_host:
            continue
        cap = capacity.get(host) or HostCapacity(1)
        fits = True
        if memory_per_job and cap.memory_bytes is not None:
            fits = cap.memory_bytes - memory_per_job * (n + 1) >= 0
        cores_left = cap.cores - cores_per_job * (n + 1)
        key = (fits, cores_left, -n, -cap.load, -index)
        if best is None or key > best:
            best, chosen = key, host
    return chosen


def parse_hosts(label: str, entries: Sequence[str | Mapping[str, str]]) -> dict[str, str | None]:
    """``["node1", {"host": "vm1", "address": "10.0.0.5"}]`` -> ``{destination: address}``.

    ``address`` (None when not given) is what processes on that host bind to and advertise,
    for hosts whose ssh name is not reachable from the others (NAT, ProxyJump targets).
    """
    if isinstance(entries, (str, Mapping)) or not entries:
        raise ValueError(
            f"{label}={entries!r} must be a non-empty list, e.g. {label}=['node1'] or "
            f"{label}=[{{'host': 'vm1', 'address': '10.0.0.5'}}]"
        )
    out: dict[str, str | None] = {}
    for entry in entries:
        if isinstance(entry, str):
            host, address = entry, None
        elif isinstance(entry, Mapping):
            unknown = sorted(set(entry) - set(HOST_KEYS))
            if unknown or not isinstance(entry.get("host"), str) or not entry["host"]:
                raise ValueError(
                    f"{label} entry {dict(entry)!r}: use {{'host': 'vm1'}} with an optional "
                    f"'address': '10.0.0.5'" + (f" (unknown keys: {unknown})" if unknown else "")
                )
            host, address = entry["host"], entry.get("address")
            if address is not None and (not isinstance(address, str) or not address):
                raise ValueError(f"{label} entry {dict(entry)!r}: address must be a string")
        else:
            raise ValueError(f"{label} entry {entry!r} is not a host name or a mapping")
        if host in out and out[host] != address and address is not None:
            raise ValueError(f"{label}: host {host!r} is given twice with different addresses")
        out[host] = address if address is not None else out.get(host)
    return out


def scheduler_placement(n_schedulers: int, scheduler_hosts: Sequence[str]) -> list[str]:
    """The host of each scheduler: round-robin over ``scheduler_hosts`` (pure)."""
    return [scheduler_hosts[i % len(scheduler_hosts)] for i in range(n_schedulers)]


def render_script(
    role: str,
    name: str,
    host: str,
    address: str,
    processes: Sequence[Sequence[str]],
    exit_file: str,
    prologue: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> str:
    """Render ``templates/ssh.sh.j2``: what one SSH launch (workers, or a scheduler) runs."""
    from .render import render

    return render(
        "ssh.sh.j2",
        {
            "role": role,
            "name": name,
            "host": host,
            "address": address,
            "prologue": list(prologue),
            "env": dict(env or {}),
            "processes": [list(p) for p in processes],
            "exit_file": exit_file,
        },
    )


def connect_timeout_option(seconds: float) -> str:
    """ssh's ``ConnectTimeout`` takes whole seconds and 0 means none: round up, at least 1.

    >>> connect_timeout_option(0.5), connect_timeout_option(10), connect_timeout_option(2.1)
    ('ConnectTimeout=1', 'ConnectTimeout=10', 'ConnectTimeout=3')
    """
    return f"ConnectTimeout={max(1, math.ceil(seconds))}"


REMOTE_COMMAND = "bash -s"
"""The whole remote command line: any login shell (sh, bash, zsh, csh, tcsh) parses it alike."""


def remote_stdin(script: str) -> str:
    """What ``ssh host bash -s`` gets on stdin to run ``script`` (pure).

    bash reads a script from stdin as it runs it, so a command that read stdin would eat the
    rest of the script: the script becomes a function, parsed whole first, then run with stdin
    from /dev/null.
    """
    return f"jqms_main() {{\n{script.rstrip()}\n}}\njqms_main < /dev/null\n"


def kill_groups_script(pgids: str, grace_s: float, then: str = "") -> str:
    """Shell text: TERM the process groups in shell word list ``pgids``, KILL what is left
    after ``grace_s``, then run ``then`` (pure; ``pgids`` may be an expansion like ``$ids``)."""
    steps = max(1, int(grace_s / 0.1))
    return f"""pgids="{pgids}"
for p in $pgids; do kill -TERM -- -$p 2>/dev/null || true; done
for _ in $(seq {steps}); do
    alive=""
    for p in $pgids; do kill -0 -- -$p 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.1  # polling the groups until they are gone, with a deadline
done
for p in $pgids; do kill -KILL -- -$p 2>/dev/null || true; done
{then}
"""


LIFELINE_GONE = 4  # the lifeline's exit status when the remote directory is already gone


def lifeline_script(directory: str, token: str, grace_s: float) -> str:
    """The remote end of a host's lifeline (pure): run by ``bash -s``, reading the owner's stdin.

    It records ``token`` as the host's current lifeline and reads lines until ``bye`` (close()
    ran: exit) or the end of input (the owner died, or the connection did). Then, detached and
    after ``grace_s`` -- the time a reconnecting owner has to start a new lifeline, which
    replaces the token -- it stops every process group launched there that has not exited
    (``<name>.pgid`` without ``<name>.exit``) and removes the directory. Its processes carry
    the directory in their command line, so they can be found like the ones they clean up.
    """
    d = shlex.quote(directory)
    wait = shlex.quote(f"jqms-lifeline {directory}")
    cleanup = f"""[ "$(cat {d}/lifeline 2>/dev/null)" = {token} ] || exit 0
ids=""
for f in {d}/*.pgid; do
    [ -e "$f" ] || continue
    [ -e "${{f%.pgid}}.exit" ] || ids="$ids $(cat "$f")"
done
{kill_groups_script("$ids", 10.0, f"rm -rf -- {d}")}"""
    return f"""trap '' HUP PIPE INT
[ -d {d} ] || exit {LIFELINE_GONE}
echo {token} > {d}/lifeline
while IFS= read -r line; do
    [ "$line" = bye ] && exit 0
done
(
    (exec -a {wait} sleep {grace_s:g})
    bash -c {shlex.quote(cleanup)} {wait}
) > /dev/null 2>&1 < /dev/null &
"""


def lifeline_stdin(script: str) -> str:
    """Like :func:`remote_stdin`, but the script reads the rest of stdin: the owner's pipe."""
    return f"jqms_main() {{\n{script.rstrip()}\n}}\njqms_main\n"


def _heredoc(path: str, text: str) -> str:
    """Shell text that writes ``text`` to ``path`` verbatim."""
    tag = f"JQMS_{uuid.uuid4().hex}"
    body = text if text.endswith("\n") else text + "\n"
    return f"cat > {shlex.quote(path)} <<'{tag}'\n{body}{tag}"


def _control_directory() -> str:
    """A new private directory for ControlMaster sockets, short enough for a socket path."""
    for base in (tempfile.gettempdir(), "/tmp"):
        if len(base) + len("/jqms-cm-XXXXXXXX") + _CONTROL_SUFFIX < UNIX_PATH_MAX:
            return tempfile.mkdtemp(prefix="jqms-cm-", dir=base)
    raise ClusterError(  # pragma: no cover - /tmp is always short
        f"no directory for ssh control sockets short enough ({UNIX_PATH_MAX} bytes) in "
        f"{tempfile.gettempdir()!r} or /tmp"
    )


@dataclass
class _Host:
    """One ssh destination and what we started there."""

    destination: str  # as given: "node1", "user@10.0.0.2"
    address: str  # what workers and schedulers bind to on that host
    reached: bool = False  # the remote directory may exist: clean it up at close
    capacity: HostCapacity | None = None


@dataclass
class _Lifeline:
    """The local end of a host's lifeline: an ssh whose stdin stays open while we live."""

    proc: subprocess.Popen[str]
    token: str
    started_at: float = field(default_factory=time.monotonic)
    warned: bool = False  # it replaces one whose end was logged


@dataclass
class _RemoteScheduler:
    """One scheduler launch: where, its process group, and what became of it."""

    index: int
    host: str
    pgid: int
    log_path: str
    address: str = ""
    state: str = "starting"  # "running" once listening, "dead" once its group is gone
    reason: str = ""


class SSHCluster(Cluster):
    """Schedulers and workers on SSH hosts; each job is one SSH launch of workers on one host.

    Parameters
    ----------
    hosts:
        SSH destinations for workers (``"node1"``, ``"user@10.0.0.2"``, aliases from
        ``~/.ssh/config``), or mappings ``{"host": "vm1", "address": "10.0.0.5"}`` where the
        address processes on that host bind to and advertise is not the one ssh connects to
        (NAT'd cloud VMs, ProxyJump targets). Each job goes to the host with the most free
        cores (see :func:`place_job`).
    scheduler_hosts:
        Where the schedulers run (default: the first host), the same forms as ``hosts``;
        schedulers go round-robin over them.
    n_schedulers:
        Schedulers sharing every worker.
    workers_per_host:
        Worker processes one job starts on its host.
    threads_per_worker:
        Tasks each worker runs at once.
    memory_limit:
        Per worker, e.g. "2GiB" (default: none).
    python:
        The interpreter on the remote hosts that can ``import jobqueue_ms`` (default: this one's
        path, which must then exist on every host). A venv is never on the remote PATH.
    ssh_options:
        Extra ``ssh`` arguments, e.g. ``["-i", "~/.ssh/cluster_key", "-o", "User=me"]``.
    prologue:
        Shell lines run before the schedulers and in each job (``module load``, ``source
        venv/bin/activate``, ``export VAR=value``).
    remote_directory:
        Parent directory on every host; the cluster creates ``<remote_directory>/<name>`` there
        for scripts, logs and scheduler files and removes it at close (default ``/tmp``).
    port:
        SSH port (default: ssh's own default or config).
    scheduler_port:
        Port the schedulers listen on (default 0: any free port). A fixed port allows one
        scheduler per host.
    max_jobs_per_host:
        Refuse to start more jobs than this on one host (default: no limit).
    env:
        Environment variables exported in each job.
    connect_timeout:
        Seconds ssh waits for a host to answer (rounded up to whole seconds, at least 1).
    lifetime:
        Workers drain and leave after this long (e.g. "1h").
    poll_interval:
        Seconds between polls of the remote jobs and schedulers (default 1).
    name:
        Cluster name; prefixes job and worker names and the remote directory.
    security, keep_keys, max_message_bytes:
        As for every cluster (docs/security.md): new CurveZMQ keys by default. Each host gets
        a copy of the key file in the remote directory, written through ssh's stdin with mode
        0600 (never on a command line), and removed with that directory at close.

    Examples
    --------
    >>> from jobqueue_ms import Client, SSHCluster
    >>> with SSHCluster(["node1", "node2"], python="/opt/venv/bin/python") as cluster:
    ...     cluster.scale(jobs=2)
    ...     with Client(cluster) as client:
    ...         client.submit(sum, [1, 2, 3]).result()
    6
    """

    poll_interval_s = 1.0
    retire_timeout_s = 30.0
    control_persist_s = 60
    # after the owner is gone, its processes on a host stop this much later (see lifeline_script)
    lifeline_grace_s = 60.0
    shared_key_directory = False  # the hosts get copies; the original stays in cluster_dir

    def __init__(
        self,
        hosts: Sequence[str | Mapping[str, str]],
        scheduler_hosts: Sequence[str | Mapping[str, str]] | None = None,
        n_schedulers: int = 1,
        workers_per_host: int = 1,
        threads_per_worker: int = 1,
        memory_limit: int | str | None = None,
        *,
        python: str = sys.executable,
        ssh_options: Sequence[str] = (),
        prologue: Sequence[str] = (),
        remote_directory: str | None = None,
        port: int | None = None,
        scheduler_port: int = 0,
        max_jobs_per_host: int | None = None,
        env: Mapping[str, str] | None = None,
        connect_timeout: float = 10.0,
        lifetime: Any = None,
        poll_interval: Any = None,
        name: str | None = None,
        security: Any = None,
        keep_keys: bool = False,
        max_message_bytes: int | str | None = None,
    ) -> None:
        worker_hosts = parse_hosts("hosts", hosts)
        given_scheduler_hosts = (
            parse_hosts("scheduler_hosts", scheduler_hosts) if scheduler_hosts is not None else {}
        )
        for label, value in (
            ("workers_per_host", workers_per_host),
            ("threads_per_worker", threads_per_worker),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label}={value!r} must be a positive integer")
        if max_jobs_per_host is not None and max_jobs_per_host < 1:
            raise ValueError(f"max_jobs_per_host={max_jobs_per_host!r} must be >= 1 or None")
        if isinstance(ssh_options, str) or isinstance(prologue, str):
            raise ValueError("ssh_options and prologue are lists of strings, e.g. ['-i', 'key']")
        if not isinstance(connect_timeout, (int, float)) or connect_timeout <= 0:
            raise ValueError(f"connect_timeout={connect_timeout!r} must be a positive number")
        self.hosts = list(worker_hosts)
        self.scheduler_hosts = list(given_scheduler_hosts or [self.hosts[0]])
        if isinstance(n_schedulers, int) and n_schedulers >= 1 and scheduler_port:
            placed = scheduler_placement(n_schedulers, self.scheduler_hosts)
            crowded = sorted({h for h in placed if placed.count(h) > 1})
            if crowded:
                raise ValueError(
                    f"scheduler_port={scheduler_port} with n_schedulers={n_schedulers} puts "
                    f"several schedulers on {crowded} (scheduler_hosts={self.scheduler_hosts}), "
                    "and only one can listen on a fixed port; give as many scheduler_hosts as "
                    "schedulers, or scheduler_port=0 (any free port)"
                )
        for key in env or {}:
            if not key.isidentifier():
                raise ValueError(
                    f"env key {key!r} is not a shell variable name; "
                    "e.g. env={'OMP_NUM_THREADS': '1'}"
                )
        super().__init__(
            n_schedulers=n_schedulers,
            name=name,
            memory_limit=memory_limit,
            lifetime=lifetime,
            poll_interval=poll_interval,
            python=python,
            security=security,
            keep_keys=keep_keys,
            max_message_bytes=max_message_bytes,
        )
        self.workers_per_job = workers_per_host
        self.threads_per_worker = threads_per_worker
        self.ssh_options = [os.path.expanduser(o) for o in ssh_options]
        self.prologue = list(prologue)
        self.env = dict(env or {})
        self.port = port
        self.scheduler_port = scheduler_port
        self.max_jobs_per_host = max_jobs_per_host
        self.connect_timeout = connect_timeout
        self.remote_directory = f"{(remote_directory or '/tmp').rstrip('/')}/{self.unique_name}"
        # each host gets a copy of the key file (over ssh's stdin, mode 0600), removed at close
        self.remote_keyfile = f"{self.remote_directory}/cluster.keys"
        self.close_errors: list[str] = []
        self.control_directory = _control_directory()
        leftovers.mark_owner(self.control_directory, None)  # removed by a later cluster if we die
        self._hosts: dict[str, _Host] = {}
        for h, address in {**worker_hosts, **given_scheduler_hosts}.items():
            other = worker_hosts.get(h) or given_scheduler_hosts.get(h)
            self._hosts[h] = _Host(h, address or other or self._resolve_address(h))
        self._schedulers: list[_RemoteScheduler] = []
        self._lifelines: dict[str, _Lifeline] = {}
        self._unstopped: set[tuple[str, int]] = set()  # job groups not yet seen gone or killed
        self._next_scheduler_check = 0.0
        self._start_failed = False
        self._start()

    # ------------------------------------------------------------------ ssh
    def _ssh_argv(self, host: str, *extra: str) -> list[str]:
        argv = ["ssh", "-o", "BatchMode=yes", "-o", connect_timeout_option(self.connect_timeout)]
        argv += [
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={os.path.join(self.control_directory, 'cm-%C')}",
            "-o",
            f"ControlPersist={self.control_persist_s}",
        ]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        return [*argv, *self.ssh_options, *extra, host]

    def _ssh(
        self,
        host: str,
        script: str,
        what: str,
        *,
        timeout: float = 60.0,
        check: bool = True,
        shown: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with ``bash -s`` on ``host``; raise SSHError (host, stderr) on failure.

        The script goes on stdin: the remote login shell, whatever it is, only parses
        ``bash -s``. ``shown`` is what errors show of it instead (a script carrying keys).
        """
        shown = script if shown is None else shown
        argv = [*self._ssh_argv(host), REMOTE_COMMAND]
        try:
            proc = subprocess.run(
                argv,
                input=remote_stdin(script),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            raise SSHError(
                host, f"{what}: no answer within {timeout} s", argv, -1, err, shown
            ) from None
        if check and proc.returncode != 0:
            raise SSHError(host, what, argv, proc.returncode, proc.stderr, shown)
        return proc

    def _resolve_address(self, host: str) -> str:
        """The host name ssh connects to (``ssh -G`` applies ~/.ssh/config); workers bind it."""
        proc = subprocess.run(
            ["ssh", "-G", *self.ssh_options, host],
            capture_output=True,
            text=True,
            timeout=30,
        )
        for line in proc.stdout.splitlines():
            key, _, value = line.partition(" ")
            if key == "hostname" and value:
                return value.strip()
        return host.rsplit("@", 1)[-1]

    def _prologue_lines(self) -> list[str]:
        return [*self.prologue, *(f"export {k}={shlex.quote(v)}" for k, v in self.env.items())]

    def _check_host(self, host: str) -> None:
        """Make the remote directory, copy the key file, check ``python``, probe capacity."""
        d = shlex.quote(self.remote_directory)
        lines = [f"mkdir -p {d}", f"chmod 700 {d}", f"cd {d}"]
        shown = list(lines)
        if self.security.encrypted:
            assert self.security.path is not None
            with open(self.security.path, encoding="utf-8") as f:  # on stdin: never in a ps line
                copy = _heredoc(self.remote_keyfile, f.read())
            lines += ["(umask 077", copy, ")"]
            shown += [f"(umask 077; cat > {shlex.quote(self.remote_keyfile)})  # the key file"]
        tail = [*self._prologue_lines(), shlex.join([self.python, "-c", _PROBE])]
        try:
            proc = self._ssh(
                host,
                "set -e\n" + "\n".join(lines + tail),
                "cannot prepare the host",
                shown="set -e\n" + "\n".join(shown + tail),
            )
        except SSHError as exc:
            if exc.returncode != SSH_ERROR:
                self._hosts[host].reached = True
                raise SSHError(
                    host,
                    f"python={self.python!r} cannot import jobqueue_ms (or the prologue failed); "
                    "install jobqueue-ms there and pass its interpreter, e.g. "
                    "SSHCluster(hosts, python='/path/to/venv/bin/python')",
                    exc.argv,
                    exc.returncode,
                    exc.stderr,
                    exc.script,
                ) from None
            raise
        self._hosts[host].reached = True
        self._hosts[host].capacity = _parse_capacity(proc.stdout)
        log.info("host %s: %s", host, self._hosts[host].capacity)

    # ------------------------------------------------------------------ lifelines
    def _start_lifeline(self, host: str) -> None:
        """Open the host's lifeline (a new token: an old one's pending cleanup is called off)."""
        token = uuid.uuid4().hex
        proc = subprocess.Popen(
            [*self._ssh_argv(host), REMOTE_COMMAND],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # a Ctrl-C meant for us must not cut it before close() runs
        )
        assert proc.stdin is not None
        proc.stdin.write(
            lifeline_stdin(lifeline_script(self.remote_directory, token, self.lifeline_grace_s))
        )
        proc.stdin.flush()
        self._lifelines[host] = _Lifeline(proc, token)

    def _check_lifelines(self) -> None:
        """Reopen a lifeline that ended while we live (a dropped connection); say so once."""
        if self._closed:
            return
        for host, line in list(self._lifelines.items()):
            code = line.proc.poll()
            if code is None:
                continue
            if code == LIFELINE_GONE:
                log.error(
                    "host %r: %s is gone: the host stopped this cluster's processes there after "
                    "losing its lifeline for %g s; no more jobs go there",
                    host,
                    self.remote_directory,
                    self.lifeline_grace_s,
                )
                del self._lifelines[host]
                self._hosts[host].reached = False
                continue
            # an unreachable host fails again at once: logged once, not at every poll
            quick = time.monotonic() - line.started_at < 10.0
            if not (line.warned and quick):
                log.warning(
                    "host %r: lifeline ended (ssh exit %s); reopening it (within %g s, or the "
                    "host stops this cluster's processes there)",
                    host,
                    code,
                    self.lifeline_grace_s,
                )
            self._start_lifeline(host)
            self._lifelines[host].warned = True

    def _end_lifelines(self, timeout: float = 5.0) -> None:
        """Say goodbye on every lifeline (close() cleaned up) and wait for the ssh to end."""
        for line in self._lifelines.values():
            try:
                assert line.proc.stdin is not None
                line.proc.stdin.write("bye\n")
                line.proc.stdin.close()
            except (OSError, ValueError):
                pass  # it ended already
        deadline = time.monotonic() + timeout
        for line in self._lifelines.values():
            try:
                line.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                line.proc.kill()
                line.proc.wait()
        self._lifelines.clear()

    @property
    def host_capacity(self) -> dict[str, HostCapacity | None]:
        """What each host offered when probed at start (cores, available memory, load)."""
        return {h: info.capacity for h, info in self._hosts.items()}

    def _launch(self, host: str, name: str, script: str, what: str) -> int:
        """Copy ``script`` to ``<remote_directory>/<name>.sh``, start it detached: its pgid."""
        d = self.remote_directory
        path, log_path = f"{d}/{name}.sh", f"{d}/{name}.log"
        text = "\n".join(
            [
                "set -e",
                f"cd {shlex.quote(d)}",
                _heredoc(path, script),
                f"{{ setsid nohup bash {shlex.quote(path)} > {shlex.quote(log_path)} 2>&1"
                f" < /dev/null & echo $! > {shlex.quote(f'{d}/{name}.pgid')}; echo $!; }}",
            ]
        )
        out = self._ssh(host, text, what).stdout
        return int(out.split()[-1])

    # ------------------------------------------------------------------ schedulers
    def _start_schedulers(self) -> list[str]:
        """Check every host, start the schedulers over ssh and read their files back."""
        try:
            self._on_hosts(self._check_host, list(self._hosts), raise_first=True)
            for host in self._hosts:
                self._start_lifeline(host)
            for i, host in enumerate(scheduler_placement(self.n_schedulers, self.scheduler_hosts)):
                self._start_scheduler(i, host)
            return [self._read_scheduler_file(s) for s in self._schedulers]
        except BaseException:
            self._start_failed = True
            raise

    def _scheduler_script(self, i: int, host: str) -> str:
        d = self.remote_directory
        argv = [self.python, "-m", "jobqueue_ms", "scheduler", "--host", self._hosts[host].address]
        argv += ["--port", str(self.scheduler_port), "--scheduler-file", f"{d}/scheduler-{i}.json"]
        argv += ["--cluster-id", self.cluster_id, *self._security_argv()]
        return render_script(
            "scheduler",
            f"scheduler-{i}",
            host,
            self._hosts[host].address,
            [argv],
            f"{d}/scheduler-{i}.exit",
            self.prologue,
            self.env,
        )

    def _start_scheduler(self, i: int, host: str) -> None:
        pgid = self._launch(
            host, f"scheduler-{i}", self._scheduler_script(i, host), f"cannot start scheduler {i}"
        )
        log_path = f"{self.remote_directory}/scheduler-{i}.log"
        self._schedulers.append(_RemoteScheduler(i, host, pgid, log_path))
        log.info("scheduler %d on %s: pgid %d", i, host, pgid)

    def _read_scheduler_file(self, s: _RemoteScheduler, timeout: float = 60.0) -> str:
        """Poll (deadline) for the scheduler's file; fail with its log if it died or is late."""
        file = f"{self.remote_directory}/scheduler-{s.index}.json"
        quoted_log = shlex.quote(s.log_path)
        script = (
            f"if [ -s {shlex.quote(file)} ]; then cat {shlex.quote(file)}; "
            f"elif kill -0 -- -{s.pgid} 2>/dev/null; then exit 0; "
            f"else tail -n 20 {quoted_log} >&2; exit 3; fi"
        )
        listen = f"{self._hosts[s.host].address}:{self.scheduler_port or 'any port'}"
        deadline = time.monotonic() + timeout
        while True:
            proc = self._ssh(s.host, script, "cannot read the scheduler file", check=False)
            if proc.returncode == 3:
                raise SSHError(
                    s.host,
                    f"scheduler {s.index} exited before listening on {listen}; its log "
                    f"({s.log_path}) is shown as stderr",
                    proc.args,
                    proc.returncode,
                    proc.stderr,
                    self._scheduler_script(s.index, s.host),
                )
            if proc.returncode != 0:
                raise SSHError(
                    s.host,
                    "cannot read the scheduler file",
                    proc.args,
                    proc.returncode,
                    proc.stderr,
                    script,
                )
            try:
                s.address = str(json.loads(proc.stdout)["address"])
                s.state = "running"
                return s.address
            except (ValueError, KeyError):
                pass  # not written yet, or half written
            if time.monotonic() > deadline:
                tail = self._ssh(
                    s.host, f"tail -n 20 {quoted_log}", "cannot read the log", check=False
                )
                raise SSHError(
                    s.host,
                    f"scheduler {s.index} wrote no scheduler file {file} within {timeout:g} s "
                    f"(it should listen on {listen}); its log ({s.log_path}) is shown as stderr",
                    tail.args,
                    tail.returncode,
                    tail.stdout + tail.stderr,
                    self._scheduler_script(s.index, s.host),
                )
            time.sleep(0.1)  # polling a file another process writes

    @property
    def scheduler_status(self) -> dict[str, str]:
        """Each scheduler's state by address: ``"running"`` or ``"dead: <why>"``."""
        return {
            s.address or f"scheduler-{s.index}": s.state
            if s.state != "dead"
            else f"dead: {s.reason}"
            for s in self._schedulers
        }

    def sync(self) -> None:
        """One round of the base class, then check the remote schedulers (every poll interval)."""
        super().sync()
        now = time.monotonic()
        if now >= self._next_scheduler_check and not self._closed:
            self._next_scheduler_check = now + self.poll_interval_s
            self._check_lifelines()
            self._check_schedulers()

    def _check_schedulers(self) -> None:
        """One ssh per scheduler host: notice schedulers whose process group is gone."""
        live = [s for s in self._schedulers if s.state == "running"]
        by_host: dict[str, list[_RemoteScheduler]] = {}
        for s in live:
            by_host.setdefault(s.host, []).append(s)

        def check(host: str) -> list[tuple[_RemoteScheduler, str]]:
            lines = [f"cd {shlex.quote(self.remote_directory)} 2>/dev/null || true"]
            for s in by_host[host]:
                exit_file = shlex.quote(f"scheduler-{s.index}.exit")
                lines.append(
                    f"if kill -0 -- -{s.pgid} 2>/dev/null; then echo {s.pgid} running; "
                    f'else echo {s.pgid} "$(cat {exit_file} 2>/dev/null || echo killed)"; fi'
                )
            proc = self._ssh(host, "\n".join(lines), "cannot poll schedulers", check=False)
            if proc.returncode != 0:
                log.warning("host %r: cannot poll schedulers: %s", host, proc.stderr.strip())
                return []
            seen = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
            return [
                (s, seen.get(str(s.pgid), "").strip())
                for s in by_host[host]
                if seen.get(str(s.pgid), "").strip() != "running"
            ]

        for found in self._on_hosts(check, list(by_host)).values():
            for s, status in found:
                if self._closed:
                    return
                s.state = "dead"
                s.reason = (
                    "its process group was killed"
                    if status in ("", "killed")
                    else f"exited with status {status}"
                )
                tail = self._ssh(
                    s.host, f"tail -n 20 {shlex.quote(s.log_path)}", "log", check=False
                ).stdout
                log.error(
                    "%s: scheduler %d (%s on %s, pgid %d) died: %s; end of its log:\n%s",
                    self.name,
                    s.index,
                    s.address,
                    s.host,
                    s.pgid,
                    s.reason,
                    tail.strip(),
                )
        if self._schedulers and all(s.state == "dead" for s in self._schedulers):
            with self._lock:
                if not self.error:
                    self.error = f"every scheduler of {self.name} died: " + "; ".join(
                        f"{s.address} on {s.host}: {s.reason}" for s in self._schedulers
                    )
                    log.error(self.error)

    def __repr__(self) -> str:
        text = super().__repr__()
        dead = [s for s in self._schedulers if s.state == "dead"]
        if not dead or self._closed:
            return text
        what = ", ".join(f"{s.address} on {s.host} ({s.reason})" for s in dead)
        return f"{text[:-1]}; dead schedulers: {what}>"

    # ------------------------------------------------------------------ jobs
    def _jobs_per_host(self) -> dict[str, int]:
        count = {h: 0 for h in self.hosts}
        for r in self.jobs.values():
            h = r.info.get("host")
            if h in count and not r.state.finished and r.job_id:
                count[h] += 1
        return count

    def _pick_host(self) -> str:
        """The worker host with the most free cores for one more job (see place_job)."""
        usable = [h for h in self.hosts if self._hosts[h].reached]  # not one whose dir is gone
        if not usable:
            raise ClusterError(f"no host is usable any more: {self.hosts} (see the log)")
        host = place_job(
            usable,
            {h: c for h, c in self.host_capacity.items() if c is not None},
            self._jobs_per_host(),
            cores_per_job=self.workers_per_job * self.threads_per_worker,
            memory_per_job=self.workers_per_job * self.memory_limit if self.memory_limit else None,
            max_jobs_per_host=self.max_jobs_per_host,
        )
        if host is None:
            raise ClusterError(
                f"every host already runs max_jobs_per_host={self.max_jobs_per_host} jobs: "
                f"{self.hosts}"
            )
        return host

    def _security_argv(self) -> list[str]:
        """As the base's, with the hosts' copy of the key file."""
        argv = super()._security_argv()
        if "--keyfile" in argv:
            argv[argv.index("--keyfile") + 1] = self.remote_keyfile
        return argv

    def _worker_argvs(self, record: JobRecord, host: str) -> list[list[str]]:
        address = self._hosts[host].address
        return [
            [*self._worker_command(record, i), "--host", address]
            for i in range(self.workers_per_job)
        ]

    def _render(self, record: JobRecord, host: str) -> str:
        return render_script(
            "worker",
            record.name,
            host,
            self._hosts[host].address,
            self._worker_argvs(record, host),
            f"{self.remote_directory}/{record.name}.exit",
            self.prologue,
            self.env,
        )

    def job_script(self, role: str = "worker") -> str:
        """The script the next job runs on the host it would go to, or scheduler 0's script.

        ``role="scheduler"`` shows what each scheduler launch runs (scheduler 0's, on its host).
        """
        if role == "scheduler":
            return self._scheduler_script(0, self.scheduler_hosts[0])
        if role != "worker":
            raise ValueError(f"role={role!r} is not 'worker' or 'scheduler'")
        try:
            host = self._pick_host()
        except ClusterError:  # every host full: still show the script
            host = self.hosts[0]
        return self._render(JobRecord(name=f"{self.unique_name}-N"), host)

    def _submit(self, record: JobRecord) -> str:
        host = self._pick_host()
        record.info["host"] = host
        record.log_path = f"{self.remote_directory}/{record.name}.log"
        pgid = self._launch(
            host, record.name, self._render(record, host), f"cannot start job {record.name}"
        )
        record.info["pgid"] = pgid
        self._unstopped.add((host, pgid))
        return f"{host}:{pgid}"

    def _by_host(self, records: Sequence[JobRecord]) -> dict[str, list[JobRecord]]:
        out: dict[str, list[JobRecord]] = {}
        for r in records:
            if "pgid" in r.info:
                out.setdefault(r.info["host"], []).append(r)
        return out

    def _on_hosts(
        self, fn: Callable[[str], T], hosts: Sequence[str], raise_first: bool = False
    ) -> dict[str, T]:
        """Run ``fn(host)`` for every host at once (a slow host must not hold up the rest).

        Plain threads, not a ThreadPoolExecutor: close() also runs at interpreter exit, when an
        executor refuses new work. With ``raise_first`` the first host's exception (in the
        order of ``hosts``) is raised; otherwise ``fn`` handles its own errors.
        """
        if len(hosts) <= 1:
            return {h: fn(h) for h in hosts}
        results: dict[str, T] = {}
        errors: dict[str, BaseException] = {}

        def run(host: str) -> None:
            try:
                results[host] = fn(host)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                errors[host] = exc

        threads = [threading.Thread(target=run, args=(h,), daemon=True) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors and raise_first:
            raise next(errors[h] for h in hosts if h in errors)
        missing = [h for h in hosts if h not in results]
        if missing:
            for h in missing:
                log.error("host %r: %s", h, errors.get(h))
            raise ClusterError(f"hosts {missing}: ssh call failed unexpectedly (see the log)")
        return results

    def _poll(self, records: list[JobRecord]) -> dict[str, JobState]:
        """One ssh per host: which process groups live, and the exit status of those gone."""
        by_host = self._by_host(records)
        states: dict[str, JobState] = {}
        for found in self._on_hosts(
            lambda h: self._poll_host(h, by_host[h]), list(by_host)
        ).values():
            states.update(found)
        return states

    def _poll_host(self, host: str, group: list[JobRecord]) -> dict[str, JobState]:
        lines = [f"cd {shlex.quote(self.remote_directory)} 2>/dev/null || true"]
        for r in group:
            pgid, exit_file = r.info["pgid"], shlex.quote(f"{r.name}.exit")
            lines.append(
                f"if kill -0 -- -{pgid} 2>/dev/null; then echo {pgid} running; "
                f'else echo {pgid} "$(cat {exit_file} 2>/dev/null || echo killed)"; fi'
            )
        proc = self._ssh(host, "\n".join(lines), "cannot poll jobs", check=False)
        if proc.returncode != 0:
            log.warning("host %r: cannot poll jobs: %s", host, proc.stderr.strip())
            return {r.job_id: JobState.UNKNOWN for r in group}
        seen = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
        states = {}
        for r in group:
            status = seen.get(str(r.info["pgid"]), "").strip()
            if status == "running":
                states[r.job_id] = JobState.RUNNING
                continue
            self._unstopped.discard((host, r.info["pgid"]))
            if status == "0":
                states[r.job_id] = JobState.COMPLETED
            elif r.cancel_requested:
                states[r.job_id] = JobState.CANCELLED
            else:
                states[r.job_id] = JobState.FAILED
        return states

    def _cancel(self, records: list[JobRecord]) -> None:
        """Stop these jobs' process groups (TERM, then KILL after 10 s); one ssh per host.

        While closing this does nothing: the groups stay in ``_unstopped`` and
        ``_stop_schedulers`` stops them with the schedulers and removes the remote directory, in
        one ssh per host, so an unreachable host costs one attempt and is reported once.
        """
        if self._closed:
            return
        by_host = self._by_host(records)

        def cancel(host: str) -> str | None:
            pgids = [r.info["pgid"] for r in by_host[host]]
            try:
                self._kill_groups(host, pgids)
            except SSHError as exc:
                return str(exc)
            self._unstopped.difference_update((host, p) for p in pgids)
            return None

        errors = [e for e in self._on_hosts(cancel, list(by_host)).values() if e]
        if errors:
            raise ClusterError("\n".join(errors))

    def _kill_groups(
        self, host: str, pgids: Sequence[int], grace_s: float = 10.0, then: str = ""
    ) -> None:
        """TERM process groups on ``host``, KILL what is left after ``grace_s``, run ``then``."""
        ids = " ".join(str(int(p)) for p in pgids)
        script = kill_groups_script(ids, grace_s, then)
        self._ssh(host, script, f"cannot stop process groups [{ids}]", timeout=grace_s + 60)

    def _log_tail(self, record: JobRecord) -> str:
        host = record.info.get("host")
        if not host or not record.log_path:
            return ""
        proc = self._ssh(
            host, f"tail -n 20 {shlex.quote(record.log_path)}", "cannot read the log", check=False
        )
        return proc.stdout

    # ------------------------------------------------------------------ closing
    def close(self, timeout: float = 20.0) -> None:
        """Stop every remote process, remove the remote directories; report unreachable hosts.

        Raises
        ------
        ClusterError
            When a host could not be cleaned up (also listed in ``close_errors`` and logged).
        """
        with self._lock:
            if self._closed:
                return
        super().close(timeout)  # cancels the jobs, then calls _stop_schedulers (below)
        if self.close_errors and not self._start_failed:
            raise ClusterError(
                f"{self.name}: could not clean up every host:\n" + "\n".join(self.close_errors)
            )

    def _stop_schedulers(self, timeout: float) -> None:
        """Per host: stop the schedulers and any job group left, remove the remote directory."""

        def clean(host: str) -> None:
            pgids = [s.pgid for s in self._schedulers if s.host == host]
            pgids += sorted(p for sh, p in self._unstopped if sh == host)
            rm = f"rm -rf -- {shlex.quote(self.remote_directory)}"
            try:
                self._kill_groups(host, pgids, grace_s=min(timeout, 10.0), then=rm)
            except SSHError as exc:
                msg = f"{exc}\n  left behind: process groups {pgids}, {self.remote_directory}"
                log.error("%s", msg)
                self.close_errors.append(msg)

        self._on_hosts(clean, [h for h, info in self._hosts.items() if info.reached])
        self._end_lifelines()
        for host in self._hosts:  # stop the shared connections before their sockets go
            subprocess.run(
                self._ssh_argv(host, "-O", "exit"),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
            )

    def _cleanup(self) -> None:
        """Remove the directory of the control sockets (the masters were stopped above)."""
        shutil.rmtree(getattr(self, "control_directory", ""), ignore_errors=True)


def _parse_capacity(stdout: str) -> HostCapacity | None:
    """The probe's ``JQMS_CAPACITY cores memory load`` line (None if the prologue hid it)."""
    for line in stdout.splitlines():
        words = line.split()
        if len(words) == 4 and words[0] == "JQMS_CAPACITY":
            try:
                return HostCapacity(int(words[1]), int(words[2]), float(words[3]))
            except ValueError:
                return None
    return None
