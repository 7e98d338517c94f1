"""SSHCluster: schedulers and workers on plain SSH hosts, through the system OpenSSH client.

A *job* is one SSH launch: the rendered ``templates/ssh.sh.j2`` copied to the host's remote
directory and started detached with ``setsid nohup bash``, so the script and its workers form one
remote process group whose id (the pgid) is the job's native id, ``<host>:<pgid>``. Polling is
one ``ssh`` per host (``kill -0 -PGID``), cancelling signals the groups (TERM, then KILL).

Every ``ssh`` shares one ControlMaster connection per host (socket in the local cluster
directory), runs with ``BatchMode=yes`` and gets its remote command quoted once, with
``shlex.join``: ssh joins its arguments with spaces and the remote login shell parses the line
again, so a list of words must become exactly one correctly quoted string.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .cluster import Cluster, ClusterError, JobRecord, JobState

log = logging.getLogger("jobqueue_ms.ssh")

T = TypeVar("T")
SSH_ERROR = 255  # ssh's own exit code: connection or authentication failed


class SSHError(ClusterError):
    """An ssh command failed; the message names the host and shows ssh's stderr."""

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


@dataclass
class _Host:
    """One ssh destination and what we started there."""

    destination: str  # as given: "node1", "user@10.0.0.2"
    address: str  # what workers and schedulers bind to on that host
    reached: bool = False  # the remote directory may exist: clean it up at close


class SSHCluster(Cluster):
    """Schedulers and workers on SSH hosts; each job is one SSH launch of workers on one host.

    Parameters
    ----------
    hosts:
        SSH destinations for workers (``"node1"``, ``"user@10.0.0.2"``, aliases from
        ``~/.ssh/config``). Each job goes to the host with the fewest of this cluster's jobs.
    scheduler_hosts:
        Where the schedulers run (default: the first host); schedulers go round-robin over them.
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
        Port the schedulers listen on (default 0: any free port).
    max_jobs_per_host:
        Refuse to start more jobs than this on one host (default: no limit).
    env:
        Environment variables exported in each job.
    connect_timeout:
        Seconds ssh waits for a host to answer.
    lifetime:
        Workers drain and leave after this long (e.g. "1h").
    poll_interval:
        Seconds between polls of the remote jobs (default 1).
    name:
        Cluster name; prefixes job and worker names and the remote directory.

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

    def __init__(
        self,
        hosts: Sequence[str],
        scheduler_hosts: Sequence[str] | None = None,
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
    ) -> None:
        if isinstance(hosts, str) or not hosts:
            raise ValueError(f"hosts={hosts!r} must be a non-empty list, e.g. hosts=['node1']")
        if scheduler_hosts is not None and (
            isinstance(scheduler_hosts, str) or not scheduler_hosts
        ):
            raise ValueError(
                f"scheduler_hosts={scheduler_hosts!r} must be a non-empty list or None, "
                "e.g. scheduler_hosts=['node1']"
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
        super().__init__(
            n_schedulers=n_schedulers,
            name=name,
            memory_limit=memory_limit,
            lifetime=lifetime,
            poll_interval=poll_interval,
            python=python,
        )
        self.workers_per_job = workers_per_host
        self.threads_per_worker = threads_per_worker
        self.ssh_options = [os.path.expanduser(o) for o in ssh_options]
        self.prologue = list(prologue)
        self.env = dict(env or {})
        for key in self.env:
            if not key.isidentifier():
                raise ValueError(
                    f"env key {key!r} is not a shell variable name; "
                    "e.g. env={'OMP_NUM_THREADS': '1'}"
                )
        self.port = port
        self.scheduler_port = scheduler_port
        self.max_jobs_per_host = max_jobs_per_host
        self.connect_timeout = connect_timeout
        self.remote_directory = f"{(remote_directory or '/tmp').rstrip('/')}/{self.name}"
        self.close_errors: list[str] = []
        self._hosts: dict[str, _Host] = {}
        for h in [*hosts, *(scheduler_hosts or [])]:
            if h not in self._hosts:
                self._hosts[h] = _Host(h, self._resolve_address(h))
        self.hosts = list(dict.fromkeys(hosts))
        self.scheduler_hosts = list(scheduler_hosts or [self.hosts[0]])
        self._remote_schedulers: list[tuple[str, int]] = []  # (host, pgid)
        self._unstopped: set[tuple[str, int]] = set()  # job groups not yet seen gone or killed
        self._start_failed = False
        self._start()

    # ------------------------------------------------------------------ ssh
    def _ssh_argv(self, host: str, *extra: str) -> list[str]:
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(self.connect_timeout)}"]
        argv += [
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={os.path.join(self.cluster_dir, 'cm-%C')}",
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
        stdin: str | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with bash on ``host``; raise SSHError (host, ssh stderr) on failure."""
        argv = self._ssh_argv(host)
        try:
            proc = subprocess.run(
                [*argv, shlex.join(["bash", "-c", script])],
                input=stdin,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            raise SSHError(
                host, f"{what}: no answer within {timeout} s", argv, -1, err, script
            ) from None
        if check and proc.returncode != 0:
            raise SSHError(host, what, argv, proc.returncode, proc.stderr, script)
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
        """Make the remote directory and check that ``python`` imports jobqueue_ms there."""
        d = shlex.quote(self.remote_directory)
        lines = [f"mkdir -p {d}", f"cd {d}", *self._prologue_lines()]
        lines.append(shlex.join([self.python, "-c", "import jobqueue_ms"]))
        try:
            self._ssh(host, "set -e\n" + "\n".join(lines), "cannot prepare the host")
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

    def _detach(self, command: list[str], log_path: str) -> str:
        """Shell text that starts ``command`` in its own session and prints its pid (= pgid)."""
        return (
            f"{{ setsid nohup {shlex.join(command)} > {shlex.quote(log_path)} 2>&1 < /dev/null"
            " & echo $!; }"
        )

    # ------------------------------------------------------------------ schedulers
    def _start_schedulers(self) -> list[str]:
        """Check every host, start the schedulers over ssh and read their files back."""
        try:
            for host in self._hosts:
                self._check_host(host)
            started = []
            for i in range(self.n_schedulers):
                host = self.scheduler_hosts[i % len(self.scheduler_hosts)]
                started.append((host, *self._start_scheduler(i, host)))
            return [self._read_scheduler_file(*s) for s in started]
        except BaseException:
            self._start_failed = True
            raise

    def _start_scheduler(self, i: int, host: str) -> tuple[str, str]:
        d = self.remote_directory
        file, log_path = f"{d}/scheduler-{i}.json", f"{d}/scheduler-{i}.log"
        argv = [self.python, "-m", "jobqueue_ms", "scheduler", "--host", self._hosts[host].address]
        argv += ["--port", str(self.scheduler_port), "--scheduler-file", file]
        argv += ["--cluster-id", self.cluster_id]
        script = "\n".join(
            [
                "set -e",
                f"cd {shlex.quote(d)}",
                *self._prologue_lines(),
                self._detach(argv, log_path),
            ]
        )
        out = self._ssh(host, script, f"cannot start scheduler {i}").stdout
        pgid = int(out.split()[-1])
        self._remote_schedulers.append((host, pgid))
        log.info("scheduler %d on %s: pgid %d", i, host, pgid)
        return file, log_path

    def _read_scheduler_file(
        self, host: str, file: str, log_path: str, timeout: float = 60.0
    ) -> str:
        """Poll (deadline) for the scheduler file; fail with the log if the scheduler died."""
        pgid = next(p for h, p in reversed(self._remote_schedulers) if h == host)
        script = (
            f"if [ -s {shlex.quote(file)} ]; then cat {shlex.quote(file)}; "
            f"elif kill -0 -- -{pgid} 2>/dev/null; then exit 0; "
            f"else tail -n 20 {shlex.quote(log_path)} >&2; exit 3; fi"
        )
        deadline = time.monotonic() + timeout
        while True:
            proc = self._ssh(host, script, "cannot read the scheduler file", check=False)
            if proc.returncode == 3:
                raise ClusterError(
                    f"host {host!r}: the scheduler exited before listening on "
                    f"{self._hosts[host].address}:{self.scheduler_port or 'any port'}; "
                    f"end of its log ({log_path}):\n{proc.stderr.strip()}"
                )
            if proc.returncode != 0:
                raise SSHError(
                    host, "cannot read the scheduler file", [], proc.returncode, proc.stderr
                )
            try:
                return str(json.loads(proc.stdout)["address"])
            except (ValueError, KeyError):
                pass  # not written yet, or half written
            if time.monotonic() > deadline:
                raise ClusterError(f"host {host!r}: no scheduler file {file} after {timeout} s")
            time.sleep(0.1)  # polling a file another process writes

    # ------------------------------------------------------------------ jobs
    def _pick_host(self) -> str:
        """The worker host with the fewest live jobs of this cluster (first listed wins ties)."""
        count = {h: 0 for h in self.hosts}
        for r in self.jobs.values():
            h = r.info.get("host")
            if h in count and not r.state.finished and r.job_id:
                count[h] += 1
        host = min(self.hosts, key=lambda h: count[h])
        if self.max_jobs_per_host is not None and count[host] >= self.max_jobs_per_host:
            raise ClusterError(
                f"every host already runs max_jobs_per_host={self.max_jobs_per_host} jobs: "
                f"{self.hosts}"
            )
        return host

    def _worker_argvs(self, record: JobRecord, host: str) -> list[list[str]]:
        address = self._hosts[host].address
        return [
            [*self._worker_command(record, i), "--host", address]
            for i in range(self.workers_per_job)
        ]

    def _render(self, record: JobRecord, host: str) -> str:
        from .render import render

        return render(
            "ssh.sh.j2",
            {
                "name": record.name,
                "host": host,
                "address": self._hosts[host].address,
                "prologue": self.prologue,
                "env": self.env,
                "workers": self._worker_argvs(record, host),
                "exit_file": f"{self.remote_directory}/{record.name}.exit",
            },
        )

    def job_script(self) -> str:
        """The script the next job runs on the host it would go to."""
        try:
            host = self._pick_host()
        except ClusterError:  # every host full: still show the script
            host = self.hosts[0]
        return self._render(JobRecord(name=f"{self.name}-N"), host)

    def _submit(self, record: JobRecord) -> str:
        host = self._pick_host()
        record.info["host"] = host
        d = self.remote_directory
        path, record.log_path = f"{d}/{record.name}.sh", f"{d}/{record.name}.log"
        script = "\n".join(
            [
                "set -e",
                f"cd {shlex.quote(d)}",
                f"cat > {shlex.quote(path)}",
                self._detach(["bash", path], record.log_path),
            ]
        )
        out = self._ssh(
            host, script, f"cannot start job {record.name}", stdin=self._render(record, host)
        )
        pgid = int(out.stdout.split()[-1])
        record.info["pgid"] = pgid
        self._unstopped.add((host, pgid))
        return f"{host}:{pgid}"

    def _by_host(self, records: Sequence[JobRecord]) -> dict[str, list[JobRecord]]:
        out: dict[str, list[JobRecord]] = {}
        for r in records:
            if "pgid" in r.info:
                out.setdefault(r.info["host"], []).append(r)
        return out

    def _on_hosts(self, fn: Callable[[str], T], hosts: Sequence[str]) -> dict[str, T]:
        """Run ``fn(host)`` for every host at once (a slow host must not hold up the rest).

        Plain threads, not a ThreadPoolExecutor: close() also runs at interpreter exit, when an
        executor refuses new work. ``fn`` handles its own errors.
        """
        if len(hosts) <= 1:
            return {h: fn(h) for h in hosts}
        results: dict[str, T] = {}

        def run(host: str) -> None:
            results[host] = fn(host)

        threads = [threading.Thread(target=run, args=(h,), daemon=True) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        missing = [h for h in hosts if h not in results]
        if missing:
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
        steps = max(1, int(grace_s / 0.1))
        script = f"""
pgids="{ids}"
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
            pgids = [p for sh, p in self._remote_schedulers if sh == host]
            pgids += sorted(p for sh, p in self._unstopped if sh == host)
            rm = f"rm -rf -- {shlex.quote(self.remote_directory)}"
            try:
                self._kill_groups(host, pgids, grace_s=min(timeout, 10.0), then=rm)
            except SSHError as exc:
                msg = f"{exc}\n  left behind: process groups {pgids}, {self.remote_directory}"
                log.error("%s", msg)
                self.close_errors.append(msg)

        self._on_hosts(clean, [h for h, info in self._hosts.items() if info.reached])
        for host in self._hosts:  # stop the shared connections before their sockets go
            subprocess.run(
                self._ssh_argv(host, "-O", "exit"),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
            )
