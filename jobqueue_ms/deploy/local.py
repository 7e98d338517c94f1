"""LocalCluster: schedulers and worker processes on this machine (the embedded default)."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

from .cluster import Cluster, JobRecord, JobState, _terminate, shell_join


class LocalCluster(Cluster):
    """Schedulers and workers as local processes; each job is one supervised worker process.

    Parameters
    ----------
    n_schedulers:
        Schedulers sharing every worker.
    n_workers:
        Workers to start now (default: one per CPU core). ``scale``/``adapt`` change it later.
    threads_per_worker:
        Tasks each worker runs at once.
    memory_limit:
        Per worker, e.g. "2GiB" (default: the machine's memory divided among the workers).
    lifetime:
        How long each job lives, like a walltime ("30s", "1h"; a bare number is minutes): its
        worker drains and leaves before then, and ``adapt()`` replaces it ahead of time.
    lifetime_stagger:
        Drain jobs up to this much earlier than ``lifetime``, spread out so that jobs started
        together do not all leave at once (default: a tenth of the lifetime, at most 5 minutes).
    security, keep_keys, max_message_bytes:
        Keys: new CurveZMQ keys for this cluster by default, in its private directory (removed
        by ``close()`` unless ``keep_keys=True``); or a key file path / ``Security``, or
        ``Security.insecure_plaintext()`` to opt out of encryption. ``max_message_bytes``
        bounds every inbound frame (default 1 GiB).

    Examples
    --------
    >>> from jobqueue_ms import Client, LocalCluster
    >>> with LocalCluster(n_workers=2) as cluster, Client(cluster) as client:
    ...     client.submit(sum, [1, 2, 3]).result()
    6
    """

    poll_interval_s = 0.2
    retire_timeout_s = 30.0
    shared_key_directory = False  # every process is on this machine

    def __init__(
        self,
        n_schedulers: int = 1,
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        memory_limit: int | str | None = None,
        *,
        lifetime: Any = None,
        lifetime_stagger: Any = None,
        name: str | None = None,
        host: str = "127.0.0.1",
        resources: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
        security: Any = None,
        keep_keys: bool = False,
        max_message_bytes: int | str | None = None,
    ) -> None:
        import psutil

        if n_workers is None:
            n_workers = psutil.cpu_count() or 1
        if not isinstance(n_workers, int) or n_workers < 0:
            raise ValueError(f"n_workers={n_workers!r} must be a non-negative integer")
        if not isinstance(threads_per_worker, int) or threads_per_worker < 1:
            raise ValueError(
                f"threads_per_worker={threads_per_worker!r} must be a positive integer"
            )
        if memory_limit is None:
            memory_limit = psutil.virtual_memory().total // max(1, n_workers)
        super().__init__(
            n_schedulers=n_schedulers,
            name=name,
            scheduler_host=host,
            memory_limit=memory_limit,
            lifetime=lifetime,
            lifetime_stagger=lifetime_stagger,
            security=security,
            keep_keys=keep_keys,
            max_message_bytes=max_message_bytes,
        )
        self.threads_per_worker = threads_per_worker
        self.resources = dict(resources or {})
        self.env = dict(env or {})
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._groups_gone: set[int] = set()  # job process groups already killed
        self._start()
        if n_workers:
            self.scale(n_workers)

    def _worker_command(self, record: JobRecord, index: int = 0) -> list[str]:
        argv = super()._worker_command(record, index)
        argv += ["--host", self.scheduler_host, "--parent-pid", str(os.getpid())]
        for k, v in self.resources.items():
            argv += ["--resources", f"{k}={v}"]
        return argv

    def job_script(self) -> str:
        """The command one job runs (a worker serving every scheduler)."""
        return shell_join(self._worker_command(JobRecord(name=f"{self.unique_name}-N"))) + "\n"

    def _submit(self, record: JobRecord) -> str:
        record.log_path = os.path.join(self.cluster_dir, f"{record.name}.log")
        with open(record.log_path, "ab") as log_f:
            proc = subprocess.Popen(
                self._worker_command(record),
                stdout=log_f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )
        self._procs[str(proc.pid)] = proc
        record.info["pid"] = proc.pid
        return str(proc.pid)

    def _poll(self, records: list[JobRecord]) -> dict[str, JobState]:
        out = {}
        for r in records:
            proc = self._procs.get(r.job_id)
            if proc is None:
                out[r.job_id] = JobState.UNKNOWN
                continue
            code = proc.poll()
            if code is None:
                out[r.job_id] = JobState.RUNNING
                continue
            self._kill_group(proc)  # the job's other processes, e.g. a worker whose nanny died
            if code == 0:
                out[r.job_id] = JobState.COMPLETED
            elif r.cancel_requested:
                out[r.job_id] = JobState.CANCELLED
            else:
                out[r.job_id] = JobState.FAILED
        return out

    def _cancel(self, records: list[JobRecord]) -> None:
        procs = [self._procs[r.job_id] for r in records if r.job_id in self._procs]
        _terminate(procs, timeout=10.0)  # the whole process group, SIGKILL at the end
        self._groups_gone.update(p.pid for p in procs)

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL what is left of an ended job's process group (its own session, see _submit).

        Called once, by the poll that reaped the job's first process: a process group id is not
        reused while the group has members, so this cannot reach anyone else's processes.
        """
        if proc.pid in self._groups_gone:
            return
        self._groups_gone.add(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _cleanup(self) -> None:
        """Stop any job process left (close() cancelled the live ones; this is the backstop)."""
        procs = list(getattr(self, "_procs", {}).values())
        _terminate([p for p in procs if p.poll() is None], timeout=5.0)
