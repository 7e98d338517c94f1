"""The Cluster base: N schedulers plus jobs that start workers; scale, adapt, close.

A *job* is one thing we pay to start (a batch job, an SSH launch, a local process); it starts
``workers_per_job`` worker processes named ``<job name>-<i>``. Every worker serves every scheduler.

Subclasses provide:

1. ``_submit(record) -> str``: start one job and return its native id (must);
2. ``_cancel(records)``: stop these jobs (must);
3. ``_poll(records) -> {native id: JobState}``: their current states (must);
4. ``job_script() -> str``: exactly what one job runs (must);
5. ``_start_schedulers() -> list[str]``: start the schedulers (may; default: local processes);
6. ``_log_tail(record) -> str``: the end of a job's log, for errors (may);
7. ``_cleanup()``: release what the subclass holds, last thing in ``close()`` (may; it runs even
   when the start failed, so it must cope with half-made state).

``_poll`` runs outside the cluster's lock (a slow queue must not block ``scale`` or ``snapshot``);
``_submit`` and ``_cancel`` run under it.

Security: every cluster gets its own CurveZMQ keys, in a key file (0600) in ``key_directory``
(``shared_key_directory`` says whether that must be a directory the jobs can see); schedulers and
workers get its path (``--keyfile``), never the keys. ``close()`` removes the file unless
``keep_keys=True``. ``security=Security.insecure_plaintext()`` is the explicit opt-out.

Adaptive scaling (``adapt()``) drives the cluster through a private seam; a manual ``scale()``,
``scale_up()`` or ``scale_down()`` stops it, as in dask. Walltime: a job whose workers have a
lifetime is drained by the cluster a little before it (staggered per job, so jobs started together
do not all leave at once) and its end is recorded as ``TIMEOUT``, a normal expiry.
"""

from __future__ import annotations

import atexit
import enum
import itertools
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..runtime import security as _security
from ..runtime.admin import SchedulerAdmin
from ..runtime.security import Security
from ..units import parse_duration, parse_memory
from . import leftovers

log = logging.getLogger("jobqueue_ms.cluster")


class JobState(str, enum.Enum):
    """States of a job, the same for every batch system (see docs/batch.md)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"  # walltime reached: a normal end, not a failure
    UNKNOWN = "UNKNOWN"

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT)


@dataclass
class JobRecord:
    """One job of a cluster, recorded before its submission returns."""

    name: str
    job_id: str = ""
    state: JobState = JobState.PENDING
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    walltime_s: float | None = None
    worker_names: list[str] = field(default_factory=list)
    log_path: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    workers_seen: bool = False
    retiring_since: float | None = None
    cancel_requested: bool = False
    error: str | None = None

    @property
    def queued_s(self) -> float | None:
        """How long the job waited in the queue (None while still pending)."""
        return None if self.started_at is None else self.started_at - self.submitted_at


class ClusterError(RuntimeError):
    """The cluster cannot do what was asked (e.g. jobs keep failing at start)."""


_LIVE: weakref.WeakSet[Cluster] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for c in list(_LIVE):
        try:
            c.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


# Jobs started together are drained at spread-out times: job k's drain is brought forward by
# frac(k * golden ratio) of the stagger, a sequence that stays evenly spread for any number of jobs.
_GOLDEN = (5**0.5 - 1) / 2
# Ended jobs kept in the adaptive Snapshot (for start latencies and failed-start errors).
_ENDED_IN_SNAPSHOT = 20


class _AdaptiveSeam:
    """What ``Adaptive`` drives: the cluster's snapshot and scaling, as the policy's own calls.

    A user's manual ``scale_up``/``scale_down`` stops adaptive scaling; the driver's calls come
    through here and do not.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def snapshot(self) -> Any:
        return self.cluster.snapshot()

    def scale_up(self, n: int) -> None:
        self.cluster._scale_up(n)

    def scale_down(self, names: Sequence[str]) -> None:
        self.cluster._scale_down(names)

    def __repr__(self) -> str:
        return repr(self.cluster)


class Cluster:
    """Base of every cluster; see the module docstring for what a subclass provides."""

    workers_per_job: int = 1
    threads_per_worker: int = 1
    poll_interval_s: float = 1.0
    retire_timeout_s: float = 60.0
    max_start_failures: int = 3
    # While adapting: the Adaptive's max_start_failures, which then governs (see adapt()).
    _adapt_failure_limit: int | None = None
    # Jobs run elsewhere and read the key file there: keep it in a directory they can see (the
    # home directory by default). A LocalCluster keeps it in its own private cluster_dir.
    shared_key_directory: bool = True

    def __init__(
        self,
        *,
        n_schedulers: int = 1,
        name: str | None = None,
        scheduler_host: str = "127.0.0.1",
        memory_limit: int | str | None = None,
        lifetime: Any = None,
        lifetime_stagger: Any = None,
        poll_interval: Any = None,
        python: str | None = None,
        cluster_dir: str | None = None,
        security: Security | str | None = None,
        key_directory: str | None = None,
        keep_keys: bool = False,
        max_message_bytes: int | str | None = None,
    ) -> None:
        if not isinstance(n_schedulers, int) or n_schedulers < 1:
            raise ValueError(f"n_schedulers={n_schedulers!r} must be a positive integer")
        self.n_schedulers = n_schedulers
        self.cluster_id = uuid.uuid4().hex[:8]
        self.name = name or f"jqms-{self.cluster_id}"
        # What its jobs, scheduler files, key file and remote directories are named after: two
        # clusters given the same name (job_name="analysis" in two notebooks) must not cancel,
        # read or remove each other's.
        self.unique_name = (
            self.name if self.cluster_id in self.name else f"{self.name}-{self.cluster_id}"
        )
        self.scheduler_host = scheduler_host
        self.memory_limit = (
            parse_memory(memory_limit, "memory_limit") if memory_limit is not None else None
        )
        # Lifetimes read like walltimes (a bare number is minutes); poll intervals are seconds.
        self.lifetime_s = parse_duration(lifetime, "lifetime") if lifetime is not None else None
        stagger = (
            parse_duration(lifetime_stagger, "lifetime_stagger")
            if lifetime_stagger is not None
            else None
        )
        if stagger is None:
            stagger = min(0.1 * self.lifetime_s, 300.0) if self.lifetime_s else 0.0
        if self.lifetime_s and stagger >= self.lifetime_s:
            raise ValueError(
                f"lifetime_stagger={lifetime_stagger!r} must be shorter than "
                f"lifetime={lifetime!r}, e.g. lifetime_stagger='{self.lifetime_s / 10:g}s'"
            )
        self.lifetime_stagger_s = stagger
        if poll_interval is not None:
            self.poll_interval_s = _duration_s(poll_interval, "poll_interval") or 0.0
        self.python = python or sys.executable
        self.jobs: dict[str, JobRecord] = {}
        self.scheduler_addresses: list[str] = []
        self.start_failures = 0
        self.error: str | None = None
        self._target: int | None = None
        self._counter = itertools.count(1)
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()
        self._closed = False
        self._start_failed = False
        self._adaptive: Any = None
        self._scheduler_procs: list[subprocess.Popen[bytes]] = []
        self._own_dir = cluster_dir is None
        if self._own_dir:
            leftovers.sweep()  # what clusters killed before they could close() left behind
        self.cluster_dir = cluster_dir or tempfile.mkdtemp(prefix=f"{self.name}-")
        os.makedirs(self.cluster_dir, exist_ok=True)
        self.keep_keys = keep_keys
        self.security = self._make_security(security, key_directory, max_message_bytes)
        if self._own_dir:
            made = self._owns_keys and not keep_keys
            leftovers.mark_owner(self.cluster_dir, self.security.path if made else None)
        self._info_cache: tuple[float, list[dict[str, Any]]] = (0.0, [])
        self._stop_sync = threading.Event()
        self._sync_thread: threading.Thread | None = None
        _LIVE.add(self)

    def _make_security(
        self,
        security: Security | str | None,
        key_directory: str | None,
        max_message_bytes: int | str | None,
    ) -> Security:
        """The cluster's keys: given (a Security or a key file) or new ones, in a key file."""
        limit = (
            parse_memory(max_message_bytes, "max_message_bytes")
            if max_message_bytes is not None
            else None
        )
        self._owns_keys = security is None
        if security is None:
            # kept keys must outlive cluster_dir, which close() removes
            shared = self.shared_key_directory or self.keep_keys
            directory = key_directory or (
                _security.default_key_directory() if shared else self.cluster_dir
            )
            return Security.generate(directory, name=self.unique_name, max_message_bytes=limit)
        given = Security.coerce(security)
        return replace(given, max_message_bytes=limit) if limit else given

    def _start(self) -> None:
        """Start the schedulers and the background sync loop (call at the end of __init__).

        If anything fails, everything started so far is stopped (``close()`` does not raise then)
        and the original error propagates.
        """
        try:
            self.scheduler_addresses = self._start_schedulers()
            _security.register(self.scheduler_addresses, self.security)
            self._admin = SchedulerAdmin(self.scheduler_addresses, security=self.security)
        except BaseException:
            self._start_failed = True
            self.close()
            raise
        self._sync_thread = threading.Thread(
            target=self._sync_loop, name=f"{self.name}-sync", daemon=True
        )
        self._sync_thread.start()

    # ------------------------------------------------------------------ schedulers
    def _start_schedulers(self) -> list[str]:
        """Start ``n_schedulers`` scheduler processes here and wait for their files."""
        files = []
        for i in range(self.n_schedulers):
            f = os.path.join(self.cluster_dir, f"scheduler-{i}.json")
            files.append(f)
            log_f = open(os.path.join(self.cluster_dir, f"scheduler-{i}.log"), "ab")
            argv = [
                self.python,
                "-m",
                "jobqueue_ms",
                "scheduler",
                "--host",
                self.scheduler_host,
                "--port",
                "0",
                "--scheduler-file",
                f,
                "--cluster-id",
                self.cluster_id,
                "--parent-pid",  # gone with us, even when we are killed
                str(os.getpid()),
                *self._security_argv(),
            ]
            proc = subprocess.Popen(
                argv, stdout=log_f, stderr=subprocess.STDOUT, start_new_session=True
            )
            log_f.close()
            self._scheduler_procs.append(proc)
        return self._wait_for_scheduler_files(files, self._scheduler_procs)

    def _wait_for_scheduler_files(
        self, files: list[str], procs: Sequence[subprocess.Popen[bytes]] = (), timeout: float = 60
    ) -> list[str]:
        from ..runtime.scheduler import read_scheduler_file

        deadline = time.monotonic() + timeout
        addresses: list[str | None] = [None] * len(files)
        while time.monotonic() < deadline:
            for i, f in enumerate(files):
                if addresses[i] is None and os.path.exists(f):
                    addresses[i] = read_scheduler_file(f)["address"]
            if all(addresses):
                return [a for a in addresses if a]
            for i, p in enumerate(procs):
                if p.poll() is not None:
                    tail = _tail(os.path.join(self.cluster_dir, f"scheduler-{i}.log"))
                    raise ClusterError(
                        f"scheduler {i} exited with code {p.returncode} before listening:\n{tail}"
                    )
            time.sleep(0.02)  # polling for files another process writes
        raise ClusterError(f"schedulers did not write {files} within {timeout} s")

    # ------------------------------------------------------------------ hooks
    def _submit(self, record: JobRecord) -> str:
        raise NotImplementedError

    def _cancel(self, records: list[JobRecord]) -> None:
        raise NotImplementedError

    def _poll(self, records: list[JobRecord]) -> dict[str, JobState]:
        raise NotImplementedError

    def job_script(self) -> str:
        raise NotImplementedError

    def _log_tail(self, record: JobRecord) -> str:
        return _tail(record.log_path) if record.log_path else ""

    def _cleanup(self) -> None:
        """Release what a subclass holds; the last step of ``close()`` (default: nothing)."""

    def _security_argv(self) -> list[str]:
        """``--keyfile PATH`` (never the keys), the size limit, or ``--insecure-plaintext``."""
        argv = self.security.argv()
        if self.security.max_message_bytes != _security.DEFAULT_MAX_MESSAGE_BYTES:
            argv += ["--max-message-bytes", str(self.security.max_message_bytes)]
        return argv

    def _worker_command(self, record: JobRecord, index: int = 0) -> list[str]:
        """argv of worker ``index`` of a job: serves every scheduler of the cluster."""
        argv = [self.python, "-m", "jobqueue_ms", "worker"]
        for a in self.scheduler_addresses or ["tcp://SCHEDULER:PORT"]:
            argv += ["--scheduler", a]
        argv += self._security_argv()
        argv += ["--nthreads", str(self.threads_per_worker)]
        if self.memory_limit:
            argv += ["--memory-limit", str(self.memory_limit)]
        argv += ["--name", f"{record.name}-{index}", "--job", record.name]
        if self.lifetime_s:
            argv += ["--lifetime", f"{int(self.lifetime_s)}s"]
        return argv

    # ------------------------------------------------------------------ scaling
    def scale(self, n: int | None = None, *, jobs: int | None = None) -> None:
        """Keep ``n`` workers (rounded up to whole jobs) or ``jobs`` jobs running.

        Jobs that die or reach their walltime are replaced. This stops adaptive scaling, if it
        was on (as in dask); call ``adapt()`` to turn it on again.
        """
        if (n is None) == (jobs is None):
            raise ValueError("scale() takes either n (workers) or jobs=..., e.g. scale(jobs=2)")
        if jobs is None:
            if not isinstance(n, int) or n < 0:
                raise ValueError(
                    f"n={n!r} must be a non-negative number of workers, e.g. scale(4) "
                    "or scale(jobs=2)"
                )
            jobs = -(-n // self.workers_per_job)
        if not isinstance(jobs, int) or jobs < 0:
            raise ValueError(f"jobs={jobs!r} must be a non-negative integer")
        self._stop_adaptive("scale()")
        self._raise_if_failed()
        with self._lock:
            self._target = jobs
            self._reconcile()

    def scale_up(self, n: int) -> None:
        """Submit ``n`` more jobs and keep that many; stops adaptive scaling (see ``scale``)."""
        self._stop_adaptive("scale_up()")
        with self._lock:
            self._scale_up(n)
            self._target = len(self._live_jobs())

    def scale_down(self, names: Sequence[str]) -> None:
        """Retire these workers or jobs gracefully (their work finishes or moves first).

        A job name (or native id) retires the whole job; a worker name retires only that worker,
        and its job goes on with its other workers (it ends, normally, once the last one left).
        Stops adaptive scaling (see ``scale``); the jobs left are kept.
        """
        self._stop_adaptive("scale_down()")
        self._scale_down(names)
        with self._lock:
            self._target = len(self._live_jobs())

    def _scale_up(self, n: int) -> None:
        """Submit ``n`` jobs (the adaptive policy's call)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n={n!r} must be a non-negative number of jobs")
        self._raise_if_failed()
        with self._lock:
            if self._closed:
                raise ClusterError(f"{self.name} is closed; it submits no more jobs")
            for _ in range(n):
                self._submit_one()

    def _scale_down(self, names: Sequence[str]) -> None:
        """Retire these jobs or workers (the adaptive policy's call)."""
        if isinstance(names, str):
            raise TypeError(f"names={names!r} must be a list of job or worker names")
        # Ask the schedulers first (outside the lock): a job whose workers registered since the
        # last snapshot is retired gracefully, not cancelled with its work.
        self._note_workers(self.scheduler_info(max_age=0))
        with self._lock:
            for r, workers in self._records_for(names):
                if workers is None:
                    self._retire(r)
                else:
                    self._retire_workers(r, workers)

    def adapt(self, **kwargs: Any) -> Any:
        """Scale automatically; see ``jobqueue_ms.adaptive.Adaptive`` for the options.

        Replaces a running ``Adaptive`` and forgets earlier failed starts (call it again once a
        job script is fixed). A manual ``scale()``, ``scale_up()`` or ``scale_down()`` stops it.
        While it adapts, its ``max_start_failures`` is the cluster's limit too, so the cluster
        stops submitting exactly when adaptive scaling stops with an ``AdaptiveError``.
        """
        from ..adaptive import Adaptive

        self._stop_adaptive(None)
        with self._lock:
            if self._closed:
                raise ClusterError(f"{self.name} is closed; make a new cluster to adapt")
        autostart = kwargs.pop("autostart", True)
        adaptive = Adaptive(_AdaptiveSeam(self), autostart=False, **kwargs)
        with self._lock:
            self._target = None  # the policy decides now, replacements included
            self.start_failures = 0
            self.error = None
            self._adapt_failure_limit = adaptive.max_start_failures
        self._adaptive = adaptive
        if autostart:
            adaptive.start()
        return adaptive

    @property
    def _failure_limit(self) -> int:
        """Failed starts in a row after which the cluster stops submitting (one limit)."""
        return self._adapt_failure_limit or self.max_start_failures

    def _stop_adaptive(self, why: str | None) -> None:
        adaptive, self._adaptive = self._adaptive, None
        self._adapt_failure_limit = None
        if adaptive is not None and adaptive.running:
            if why:
                log.info("%s: %s stops adaptive scaling; call adapt() to resume", self.name, why)
            adaptive.stop()

    def _live_jobs(self) -> list[JobRecord]:
        return [
            r
            for r in self.jobs.values()
            if not r.state.finished and r.retiring_since is None and not r.cancel_requested
        ]

    def _records_for(self, names: Sequence[str]) -> list[tuple[JobRecord, list[str] | None]]:
        """Return the jobs these names retire, each whole or by some of its workers.

        ``(record, None)`` for a job named by its name or native id, ``(record, [worker, ...])``
        for single workers of a job; a job named whole is not also retired worker by worker.
        """
        whole: dict[str, JobRecord] = {}
        single: dict[str, tuple[JobRecord, list[str]]] = {}
        by_worker = {w: r for r in self.jobs.values() for w in r.worker_names}
        for n in names:
            r = self.jobs.get(n) or next((x for x in self.jobs.values() if x.job_id == n), None)
            if r is not None:
                whole[r.name] = r
            elif n in by_worker:
                r = by_worker[n]
                single.setdefault(r.name, (r, []))[1].append(n)
        out: list[tuple[JobRecord, list[str] | None]] = [(r, None) for r in whole.values()]
        out += [(r, workers) for name, (r, workers) in single.items() if name not in whole]
        return out

    def _reconcile(self) -> None:
        """Submit or retire jobs to reach a manual ``scale()`` target (none while adaptive)."""
        if self._target is None or self._closed:
            return
        live = self._live_jobs()
        missing = self._target - len(live)
        if missing > 0:
            if self.start_failures >= self._failure_limit:
                return
            for _ in range(missing):
                self._submit_one()
        elif missing < 0:
            order = sorted(live, key=lambda r: (r.state == JobState.RUNNING, r.submitted_at))
            for r in order[:-missing]:
                self._retire(r)

    def _submit_one(self) -> JobRecord:
        k = next(self._counter)
        name = f"{self.unique_name}-{k}"
        record = JobRecord(
            name=name,
            walltime_s=self.lifetime_s,
            worker_names=[f"{name}-{i}" for i in range(self.workers_per_job)],
        )
        if self.lifetime_s:
            record.info["lifetime_offset_s"] = self.lifetime_stagger_s * ((k * _GOLDEN) % 1.0)
        self.jobs[name] = record  # recorded before submission so close() always sees it
        try:
            record.job_id = self._submit(record)
        except BaseException as exc:
            record.state = JobState.FAILED
            record.ended_at = time.time()
            record.error = f"submission failed: {exc}"
            record.info["failed_at_start"] = True
            record.info["log_tail"] = str(exc)
            self.start_failures += 1
            self._check_failures(record)
            raise
        log.info("submitted job %s (%s)", name, record.job_id)
        return record

    def _retire(self, r: JobRecord) -> None:
        if r.state.finished or r.retiring_since is not None:
            return
        r.retiring_since = time.monotonic()
        # A job none of whose workers ever registered has no work to lose: cancel it. One whose
        # workers registered drains first, whatever state the queue last reported.
        if not r.workers_seen:
            r.cancel_requested = True
            self._cancel([r])
        else:
            try:
                self._admin.retire_workers([r.name])
            except Exception as exc:  # noqa: BLE001
                log.warning("could not retire %s gracefully (%s); cancelling it", r.name, exc)
                r.cancel_requested = True
                self._cancel([r])

    def _retire_workers(self, r: JobRecord, workers: list[str]) -> None:
        """Retire single workers of a running job; its last worker retires the whole job."""
        if r.state.finished or r.retiring_since is not None:
            return
        retired = set(r.info.get("retired_workers", ())) | set(workers)
        if retired >= set(r.worker_names):
            self._retire(r)  # nothing of the job would be left working
            return
        if not r.workers_seen:
            # A job in the queue cannot give back part of itself: it is kept whole (a policy
            # removes queued jobs by their job name).
            log.warning("%s: workers %s have not started; keeping their job", self.name, workers)
            return
        try:
            self._admin.retire_workers(list(workers))
        except Exception as exc:  # noqa: BLE001 - the job keeps running; retry on a later call
            log.warning("could not retire workers %s of %s: %s", workers, r.name, exc)
            return
        r.info["retired_workers"] = sorted(retired)

    def _raise_if_failed(self) -> None:
        if self.error:
            raise ClusterError(self.error)

    def _check_failures(self, record: JobRecord) -> None:
        if self.start_failures >= self._failure_limit and not self.error:
            self.error = (
                f"{self.start_failures} jobs in a row failed before any worker connected; "
                f"not submitting more. Last job {record.name} ({record.job_id or 'not submitted'})"
                f": {record.error or record.state.value}"
            )
            log.error(self.error)

    # ------------------------------------------------------------------ sync loop
    def _sync_loop(self) -> None:
        """Poll jobs and schedulers; notice failures; replace jobs while scaled."""
        while not self._stop_sync.wait(self.poll_interval_s):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - keep syncing; errors are logged
                log.exception("cluster sync failed")

    def sync(self) -> None:
        """One round: poll the jobs and schedulers, record what changed, drain expiring jobs.

        The queue and the schedulers are asked outside the lock; then, under it, job states are
        updated, jobs whose lifetime is about to end are retired, and a manual ``scale()`` target
        is restored. Rounds do not overlap.
        """
        with self._sync_lock:
            with self._lock:
                if self._closed:
                    return
                active = [r for r in self.jobs.values() if not r.state.finished and r.job_id]
            # Schedulers first: a worker they list and the queue then reports ended had started.
            seen, _ = self._note_workers(self.scheduler_info(max_age=0))
            states = self._poll(active) if active else {}
            now = time.time()
            failed: list[JobRecord] = []
            with self._lock:
                if self._closed:
                    return
                for r in active:
                    if not r.state.finished:
                        new = states.get(r.job_id, r.state)
                        if self._update(r, new, r.name in seen, now):
                            failed.append(r)
            # A log may be remote (SSH) or on a slow filesystem: read it outside the lock.
            tails = {r.name: self._log_tail(r) for r in failed}
            with self._lock:
                for r in failed:
                    r.error = f"job ended ({r.state.value}) before any worker connected"
                    if tails[r.name]:
                        r.error += f"; end of its log:\n{tails[r.name]}"
                    r.info["log_tail"] = tails[r.name]
                    log.warning("job %s: %s", r.name, r.error)
                    self.start_failures += 1
                    self._check_failures(r)
                self._reconcile()

    def _note_workers(self, infos: list[dict[str, Any]]) -> tuple[set[str], dict[str, float]]:
        """Mark the jobs whose workers the schedulers list; return them and their lifetime ends.

        Called with every scheduler answer (sync, snapshot, ``workers``), so that a job whose
        workers connected and died between two polls is not taken for a failed start.
        """
        seen: set[str] = set()
        lifetime_ends: dict[str, float] = {}
        for info in infos:
            for w in info["workers"]:
                job = w.get("job")
                if job is None:
                    continue
                seen.add(job)
                if w.get("lifetime_end") is not None:
                    end = float(w["lifetime_end"])
                    lifetime_ends[job] = min(end, lifetime_ends.get(job, end))
        now = time.time()
        with self._lock:
            for job in seen:
                r = self.jobs.get(job)
                if r is None:
                    continue
                if not r.workers_seen:
                    r.workers_seen = True
                    if not self.error:  # once stopped, the count that stopped it stays
                        self.start_failures = 0  # a job started: the failures were not in a row
                if r.state == JobState.PENDING:
                    # Its workers registered, so it runs, whatever the last poll (up to
                    # poll_interval ago) said: the policy must not take it for an idle queued job.
                    r.state = JobState.RUNNING
                    if r.started_at is None:
                        r.started_at = now
                if job in lifetime_ends:
                    r.info["lifetime_end"] = lifetime_ends[job]
        return seen, lifetime_ends

    def _update(self, r: JobRecord, new: JobState, seen: bool, now: float) -> bool:
        """Apply one poll to a record (under the lock); return whether it failed at start."""
        if seen and new == JobState.PENDING:
            new = JobState.RUNNING
        if new == JobState.RUNNING and r.started_at is None:
            r.started_at = now
        if not new.finished:
            r.state = new
        drain_at = self._drain_at(r)
        if drain_at is not None and now >= drain_at and r.workers_seen:
            # Its workers drain now (or already do, at their own lifetime): a normal expiry.
            r.info["expired"] = True
            if not new.finished and not r.cancel_requested and r.retiring_since is None:
                log.info("job %s reaches the end of its lifetime; draining it", r.name)
                self._retire(r)
        if not new.finished:
            if (
                r.retiring_since is not None
                and not r.cancel_requested
                and time.monotonic() - r.retiring_since > self.retire_timeout_s
            ):
                r.cancel_requested = True
                self._cancel([r])
            return False
        r.ended_at = now
        if r.info.get("expired") and new in (JobState.COMPLETED, JobState.CANCELLED):
            new = JobState.TIMEOUT
        elif r.cancel_requested and new != JobState.COMPLETED:
            new = JobState.CANCELLED
        r.state = new
        if r.workers_seen or r.cancel_requested:
            return False
        r.info["failed_at_start"] = True
        return True

    def _drain_at(self, r: JobRecord) -> float | None:
        """When the cluster drains a running job: its workers' lifetime end, less its stagger."""
        ends = [r.info.get("lifetime_end")]
        if r.started_at is not None and r.walltime_s:
            ends.append(r.started_at + r.walltime_s)
        known = [float(t) for t in ends if t is not None]
        if not known:
            return None
        return min(known) - float(r.info.get("lifetime_offset_s", 0.0))

    # ------------------------------------------------------------------ state
    def scheduler_info(self, max_age: float = 0.5) -> list[dict[str, Any]]:
        """Every scheduler's state (cached for ``max_age`` seconds)."""
        t, cached = self._info_cache
        if time.monotonic() - t <= max_age and cached:
            return cached
        admin = getattr(self, "_admin", None)
        infos = admin.info(timeout=5.0) if admin is not None else []
        self._info_cache = (time.monotonic(), infos)
        return infos

    @property
    def workers(self) -> dict[str, dict[str, Any]]:
        """Connected workers by name (as the schedulers see them)."""
        out: dict[str, dict[str, Any]] = {}
        infos = self.scheduler_info(max_age=0)
        self._note_workers(infos)
        for info in infos:
            for w in info["workers"]:
                out.setdefault(w["name"], w)
        return out

    def wait_for_workers(self, n: int, timeout: float = 60.0) -> None:
        """Block until at least ``n`` workers are connected (raise ClusterError on timeout).

        A worker counts once it has registered with any of the cluster's schedulers; it
        registers with each one separately, so for a moment after this returns a scheduler may
        still see fewer (tasks it receives meanwhile run on the workers it does see).
        """
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_failed()
            have = len(self.workers)
            if have >= n:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{have} of {n} workers connected after {timeout} s")
            time.sleep(0.05)  # polling the schedulers

    def snapshot(self) -> Any:
        """The adaptive policy's view: schedulers' state summed, plus this cluster's jobs.

        Every job still in the queue is included, retiring ones too (as ``RUNNING`` until they
        leave, so that ``maximum_jobs`` bounds what is really there), and the most recently ended
        ones, with ``failed_at_start`` and the tail of their log for those that never started.
        ``walltime_end`` is when the cluster will drain the job (its lifetime, staggered).
        """
        from ..adaptive import JobView, Snapshot

        infos = self.scheduler_info(max_age=0)
        self._note_workers(infos)
        now = time.time()
        with self._lock:
            live = [r for r in self.jobs.values() if not r.state.finished]
            ended = sorted(
                (r for r in self.jobs.values() if r.state.finished),
                key=lambda r: r.ended_at or 0.0,
            )[-_ENDED_IN_SNAPSHOT:]
            jobs = [
                JobView(
                    name=r.name,
                    state=r.state.value,
                    workers=tuple(r.worker_names),
                    workers_per_job=self.workers_per_job,
                    submitted_at=r.submitted_at,
                    started_at=r.started_at,
                    walltime_end=self._drain_at(r),
                    failed_at_start=bool(r.info.get("failed_at_start")),
                    log_tail=r.info.get("log_tail") or None,
                )
                for r in ended + live
            ]
            start_failures = self.start_failures
        return Snapshot.from_scheduler_info(
            infos,
            jobs=jobs,
            workers_per_job=self.workers_per_job,
            threads_per_worker=self.threads_per_worker,
            start_failures=start_failures,
            now=now,
        )

    # ------------------------------------------------------------------ closing
    def close(self, timeout: float = 20.0) -> None:
        """Stop adaptivity, cancel every job this cluster submitted, stop the schedulers.

        Every step is tried even if an earlier one failed.

        Raises
        ------
        ClusterError
            When a step failed (each failure is also logged). Never after a failed start: then
            the error that stopped the start is the one that matters.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[str] = []

        def attempt(what: str, step: Any) -> None:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - the other steps must still run
                log.error("%s: could not %s: %s", self.name, what, exc)
                errors.append(f"could not {what}: {exc}")

        adaptive, self._adaptive = self._adaptive, None
        if adaptive is not None:
            attempt("stop adaptive scaling", lambda: adaptive.stop(timeout))
        self._stop_sync.set()
        if self._sync_thread is not None and self._sync_thread is not threading.current_thread():
            self._sync_thread.join(timeout)
        with self._lock:
            live = [r for r in self.jobs.values() if not r.state.finished and r.job_id]
            for r in live:
                r.cancel_requested = True
        if live:
            attempt(f"cancel jobs {[r.job_id for r in live]}", lambda: self._cancel(live))
            for r in live:
                r.state = JobState.CANCELLED
                r.ended_at = time.time()
        attempt("stop the schedulers", lambda: self._stop_schedulers(timeout))
        admin = getattr(self, "_admin", None)
        if admin is not None:
            attempt("close the admin connection", admin.close)
        attempt("clean up", self._cleanup)
        _security.unregister(self.scheduler_addresses)
        if self._owns_keys and not self.keep_keys:
            attempt("remove the key file", self.security.remove)
        if self._own_dir:
            shutil.rmtree(self.cluster_dir, ignore_errors=True)
        _LIVE.discard(self)
        if errors and not self._start_failed:
            raise ClusterError(f"{self.name}: closed with errors:\n" + "\n".join(errors))

    def _stop_schedulers(self, timeout: float) -> None:
        _terminate(self._scheduler_procs, timeout)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # noqa: BLE001
                pass

    def _summary(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for r in self.jobs.values():
            states[r.state.value] = states.get(r.state.value, 0) + 1
        try:
            n_workers = len(self.workers) if not self._closed else 0
        except Exception:  # noqa: BLE001
            n_workers = -1
        return {"schedulers": len(self.scheduler_addresses), "workers": n_workers, "jobs": states}

    def __repr__(self) -> str:
        s = self._summary()
        jobs = ", ".join(f"{k.lower()}={v}" for k, v in sorted(s["jobs"].items())) or "none"
        status = "closed" if self._closed else ("failed" if self.error else "running")
        return (
            f"<{type(self).__name__} {self.name} {status}: {s['schedulers']} schedulers, "
            f"{s['workers']} workers, jobs: {jobs}>"
        )

    def _repr_html_(self) -> str:
        import html

        s = self._summary()
        rows = "".join(
            f"<tr><td>{html.escape(r.name)}</td><td>{html.escape(r.job_id)}</td>"
            f"<td>{r.state.value}</td><td>{len(r.worker_names)}</td></tr>"
            for r in list(self.jobs.values())[-20:]
        )
        addrs = "<br>".join(html.escape(a) for a in self.scheduler_addresses)
        return (
            f"<div><b>{html.escape(type(self).__name__)}</b> {html.escape(self.name)}"
            f"<br>Schedulers ({s['schedulers']}):<br>{addrs}<br>Workers: {s['workers']}"
            f"<table><tr><th>job</th><th>id</th><th>state</th><th>workers</th></tr>{rows}"
            f"</table></div>"
        )


def _duration_s(value: Any, parameter: str) -> float | None:
    """Seconds from a duration (``"30s"``, ``"2m"``, a number of seconds); None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = f"{value}s"
    return parse_duration(value, parameter)


def _tail(path: str | None, lines: int = 20) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 8192))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _terminate(procs: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM each process group, wait, then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # stragglers, and any grandchild left in the group
        except (ProcessLookupError, PermissionError):
            pass
        if p.poll() is None:
            p.wait(5)


def shell_join(argv: Sequence[str]) -> str:
    return shlex.join(argv)
