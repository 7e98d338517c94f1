"""Adaptive scaling: a pure policy turns a Snapshot into a Decision, and a small driver acts on it.

The pieces, from the bottom up:

* ``WorkerView``, ``JobView`` and ``Snapshot`` describe the cluster at one moment, summed over every
  scheduler (``Snapshot.from_scheduler_info`` merges the per-scheduler info dicts of
  docs/CONTRACTS.md). They are frozen dataclasses of plain numbers and strings.
* ``Decision`` is data too: add n jobs, retire these jobs or workers, or hold, with a reason.
* A policy is any object with ``decide(snapshot, state) -> Decision``. ``LoadPolicy`` is the
  default, ``FixedPolicy`` keeps n jobs alive, and docs/adaptive.md shows a custom one.
* ``Adaptive`` is the only part that acts: every ``interval`` it takes a snapshot, asks the policy
  and calls ``cluster.scale_up(n)`` or ``cluster.scale_down(names)``. The cluster is any object with
  those three methods (``ScalableCluster``); this module imports nothing from ``deploy``, ``batch``
  or ``runtime``, only the standard library and the stdlib-only ``units``.

Where a policy keeps its memory
-------------------------------
A policy needs a little memory: how many consecutive decisions each job has been idle, which jobs
it already asked to retire, when it last decided. We keep that memory *outside* the policy object.
The driver passes the previous memory in as ``state`` (``None`` the first time) and the policy
returns the updated memory inside the Decision, as ``Decision.state``; the driver hands it back on
the next step.

We chose this over a policy object that mutates itself because then

* ``decide`` is a pure function: the same snapshot and prior state always give the same decision, so
  a test is a table of (snapshot, state) -> decision, or a loop that threads the state through;
* the memory is explicit, small and inspectable: every Decision in ``Adaptive.history`` carries
  the memory it left, so with its snapshot a surprising decision can be reproduced from the state
  of the decision before it;
* policies are immutable configuration (frozen dataclasses): they can be shared, wrapped (a policy
  that delegates to one of two ``LoadPolicy`` values sharing one ``PolicyState``) or compared;
* a policy that needs no memory ignores ``state`` and returns ``Decision(...)`` whose state is None.

The unit of scaling is the *job* (one allocation or SSH launch, the thing one pays queue time for);
``minimum``/``maximum`` in workers are converted to jobs with ``Snapshot.workers_per_job``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any, Protocol

from .units import parse_duration

__all__ = [
    "JOB_STATES",
    "Adaptive",
    "AdaptiveError",
    "Decision",
    "FixedPolicy",
    "JobView",
    "LoadPolicy",
    "Policy",
    "PolicyState",
    "ScalableCluster",
    "Snapshot",
    "WorkerView",
]

logger = logging.getLogger(__name__)

#: Every state a job can be in (the names of ``JobState`` in deploy/cluster.py, as plain strings).
JOB_STATES: tuple[str, ...] = (
    "PENDING",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "UNKNOWN",
)
#: States in which a job holds a place in the queue. UNKNOWN means the queue could not be asked;
#: such a job is assumed alive, so an unreachable controller never causes resubmissions.
LIVE_JOB_STATES: frozenset[str] = frozenset({"PENDING", "RUNNING", "UNKNOWN"})
WORKER_STATUSES: tuple[str, ...] = ("running", "paused", "retiring")

# ``idle_s`` is measured when a scheduler answered, a moment before the snapshot's ``time``; this
# slack keeps that delay from resetting an idle streak (see ``_job_is_idle``).
_IDLE_SLACK = 0.9
# Lines of a failed job's log quoted in AdaptiveError.
_LOG_TAIL_LINES = 20


# --------------------------------------------------------------------------------------------------
# What the policy sees


@dataclass(frozen=True)
class WorkerView:
    """One connected worker, merged over every scheduler it serves.

    ``running`` is the number of tasks it runs now for all schedulers together; ``idle_s`` is the
    time since it last ran any task; ``lifetime_end`` (epoch seconds) is when it will start to drain
    because its job's walltime or ``--lifetime`` ends.
    """

    name: str
    job: str | None = None
    nthreads: int = 1
    running: int = 0
    memory_bytes: int = 0
    memory_limit_bytes: int | None = None
    idle_s: float = 0.0
    stored_bytes: int = 0
    status: str = "running"
    lifetime_end: float | None = None

    def __post_init__(self) -> None:
        if self.status not in WORKER_STATUSES:
            raise ValueError(
                f"WorkerView(status={self.status!r}) is not a worker status; "
                f"use one of {', '.join(WORKER_STATUSES)}"
            )


@dataclass(frozen=True)
class JobView:
    """One job (allocation or SSH launch) as the cluster knows it.

    ``workers`` are the names of the workers the job starts (``f"{name}-{i}"``); a worker also
    belongs to the job when its ``WorkerView.job`` is the job's name. Times are epoch seconds, None
    when unknown; ``walltime_end`` is when the job starts to leave: the clusters put the moment
    they drain it, a little before its workers' lifetime (and so its walltime) ends, staggered per
    job (None if unlimited or not started).
    ``failed_at_start`` marks a job that ended before any of its workers connected, and ``log_tail``
    is the end of its log, quoted when repeated start failures stop adaptive scaling.
    """

    name: str
    state: str
    workers: tuple[str, ...] = ()
    workers_per_job: int = 1
    submitted_at: float | None = None
    started_at: float | None = None
    walltime_end: float | None = None
    failed_at_start: bool = False
    log_tail: str | None = None

    def __post_init__(self) -> None:
        if self.state not in JOB_STATES:
            raise ValueError(
                f"JobView(state={self.state!r}) is not a job state; "
                f"use one of {', '.join(JOB_STATES)}"
            )
        object.__setattr__(self, "workers", tuple(self.workers))

    @property
    def live(self) -> bool:
        """Return whether the job holds a place in the queue (pending, running or unknown)."""
        return self.state in LIVE_JOB_STATES


@dataclass(frozen=True)
class Snapshot:
    """The whole cluster at ``time`` (epoch seconds), summed over all its schedulers.

    Task counts are totals over the schedulers; ``task_duration_s`` is the observed mean run time
    of a task (None until one has finished). ``workers`` are the connected workers, ``jobs`` every
    job the cluster knows, ended ones included. ``workers_per_job`` and ``threads_per_worker``
    describe a job the cluster would submit now. ``start_failures`` counts consecutive jobs that
    ended before any of their workers connected (reset to 0 when a worker of a new job connects).
    """

    time: float
    tasks_ready: int = 0
    tasks_waiting: int = 0
    tasks_running: int = 0
    task_duration_s: float | None = None
    workers: tuple[WorkerView, ...] = ()
    jobs: tuple[JobView, ...] = ()
    workers_per_job: int = 1
    threads_per_worker: int = 1
    start_failures: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers", tuple(self.workers))
        object.__setattr__(self, "jobs", tuple(self.jobs))
        for name in ("tasks_ready", "tasks_waiting", "tasks_running", "start_failures"):
            if getattr(self, name) < 0:
                raise ValueError(f"Snapshot({name}={getattr(self, name)!r}) must be >= 0")
        for name in ("workers_per_job", "threads_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"Snapshot({name}={getattr(self, name)!r}) must be >= 1")

    @property
    def tasks(self) -> int:
        """Return the number of unfinished tasks: ready, waiting and running."""
        return self.tasks_ready + self.tasks_waiting + self.tasks_running

    @property
    def threads_per_job(self) -> int:
        """Return the threads one new job brings."""
        return self.workers_per_job * self.threads_per_worker

    @cached_property
    def _workers_by_job(self) -> dict[str, tuple[WorkerView, ...]]:
        by_name = {w.name: w for w in self.workers}
        result: dict[str, tuple[WorkerView, ...]] = {}
        for job in self.jobs:
            named = [by_name[n] for n in job.workers if n in by_name]
            tagged = [w for w in self.workers if w.job == job.name and w.name not in job.workers]
            result[job.name] = tuple(named + tagged)
        return result

    def workers_of(self, job: JobView) -> tuple[WorkerView, ...]:
        """Return the connected workers of ``job``."""
        return self._workers_by_job.get(job.name, ())

    @classmethod
    def from_scheduler_info(
        cls,
        infos: Sequence[Mapping[str, Any]],
        jobs: Iterable[JobView],
        workers_per_job: int,
        threads_per_worker: int,
        start_failures: int,
        now: float,
    ) -> Snapshot:
        """Merge one info dict per scheduler (docs/CONTRACTS.md) into one Snapshot.

        The same worker appears in the list of every scheduler it serves. Its ``running`` counts are
        summed; ``idle_s`` is the smallest report (the most recent task on any scheduler); status
        is ``retiring`` if any scheduler says so, else ``paused`` if any does; ``lifetime_end`` is
        the earliest report; ``memory_bytes`` and ``stored_bytes`` are per process, so the largest
        report is kept; the other fields are taken from the first report that has them. Task counts
        are summed. ``task_duration_s`` is the mean of the schedulers' estimates weighted by their
        unfinished tasks, so that ``tasks * task_duration_s`` is the sum of the schedulers' own
        estimates of their work; schedulers without an estimate are left out, and it is None only
        when no scheduler has one.
        """
        ready = waiting = running = 0
        weighted: list[tuple[float, int]] = []
        merged: dict[str, dict[str, Any]] = {}
        for info in infos:
            tasks = info["tasks"]
            s_ready, s_waiting, s_running = (
                int(tasks["ready"]),
                int(tasks["waiting"]),
                int(tasks["running"]),
            )
            ready, waiting, running = ready + s_ready, waiting + s_waiting, running + s_running
            duration = info.get("task_duration_s")
            if duration is not None:
                weighted.append((float(duration), s_ready + s_waiting + s_running))
            for report in info["workers"]:
                _merge_worker(merged, report)
        task_duration_s: float | None = None
        if weighted:
            total = sum(n for _, n in weighted)
            if total:
                task_duration_s = sum(d * n for d, n in weighted) / total
            else:
                task_duration_s = sum(d for d, _ in weighted) / len(weighted)
        return cls(
            time=float(now),
            tasks_ready=ready,
            tasks_waiting=waiting,
            tasks_running=running,
            task_duration_s=task_duration_s,
            workers=tuple(WorkerView(**fields) for fields in merged.values()),
            jobs=tuple(jobs),
            workers_per_job=workers_per_job,
            threads_per_worker=threads_per_worker,
            start_failures=start_failures,
        )


_STATUS_RANK = {"running": 0, "paused": 1, "retiring": 2}


def _merge_worker(merged: dict[str, dict[str, Any]], report: Mapping[str, Any]) -> None:
    """Fold one scheduler's report of a worker into ``merged`` (see ``from_scheduler_info``)."""
    name = str(report["name"])
    limit = report.get("memory_limit_bytes")
    lifetime_end = report.get("lifetime_end")
    job = report.get("job")
    new: dict[str, Any] = {
        "name": name,
        "job": None if job is None else str(job),
        "nthreads": int(report["nthreads"]),
        "running": int(report["running"]),
        "memory_bytes": int(report["memory_bytes"]),
        "memory_limit_bytes": None if limit is None else int(limit),
        "idle_s": float(report["idle_s"]),
        "stored_bytes": int(report["stored_bytes"]),
        "status": str(report["status"]),
        "lifetime_end": None if lifetime_end is None else float(lifetime_end),
    }
    old = merged.get(name)
    if old is None:
        merged[name] = new
        return
    old["running"] += new["running"]
    old["idle_s"] = min(old["idle_s"], new["idle_s"])
    old["memory_bytes"] = max(old["memory_bytes"], new["memory_bytes"])
    old["stored_bytes"] = max(old["stored_bytes"], new["stored_bytes"])
    old["nthreads"] = max(old["nthreads"], new["nthreads"])
    if _STATUS_RANK.get(new["status"], 0) > _STATUS_RANK.get(old["status"], 0):
        old["status"] = new["status"]
    ends = [t for t in (old["lifetime_end"], new["lifetime_end"]) if t is not None]
    old["lifetime_end"] = min(ends) if ends else None
    for key in ("job", "memory_limit_bytes"):
        if old[key] is None:
            old[key] = new[key]


# --------------------------------------------------------------------------------------------------
# What the policy answers


@dataclass(frozen=True)
class Decision:
    """What to do now: submit ``add_jobs`` jobs, retire the jobs or workers named in ``retire``,
    or neither (a hold).

    ``reason`` says why, for people. ``state`` is the policy's memory to pass to its next ``decide``
    call; it is not part of equality, so tables of decisions compare the actions.
    """

    add_jobs: int = 0
    retire: tuple[str, ...] = ()
    reason: str = ""
    state: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.add_jobs, bool) or not isinstance(self.add_jobs, int):
            raise TypeError(f"Decision(add_jobs={self.add_jobs!r}) must be an int >= 0")
        if self.add_jobs < 0:
            raise ValueError(
                f"Decision(add_jobs={self.add_jobs!r}) must be >= 0; retire jobs by name instead, "
                "e.g. Decision(retire=('job-3',))"
            )
        if isinstance(self.retire, str):
            raise TypeError(
                f"Decision(retire={self.retire!r}) must be a sequence of names, "
                f"e.g. retire=({self.retire!r},)"
            )
        retire = tuple(self.retire)
        if not all(isinstance(name, str) for name in retire):
            raise TypeError(f"Decision(retire={retire!r}) must hold job or worker names (str)")
        if len(set(retire)) != len(retire):
            raise ValueError(f"Decision(retire={retire!r}) names a job or worker twice")
        object.__setattr__(self, "retire", retire)

    @classmethod
    def hold(cls, reason: str, state: Any = None) -> Decision:
        """Return a Decision to change nothing, because of ``reason``."""
        return cls(reason=reason, state=state)

    @property
    def is_hold(self) -> bool:
        """Return whether this Decision changes nothing."""
        return not self.add_jobs and not self.retire

    def __str__(self) -> str:
        actions = []
        if self.add_jobs:
            actions.append(f"add {self.add_jobs} job{'s' if self.add_jobs != 1 else ''}")
        if self.retire:
            actions.append(f"retire {', '.join(self.retire)}")
        return f"{' and '.join(actions) or 'hold'}: {self.reason}"


class Policy(Protocol):
    """What ``Adaptive`` needs of a policy: a deterministic ``decide``.

    ``state`` is whatever the policy put in ``Decision.state`` last time, or None on the first call.
    """

    def decide(self, snapshot: Snapshot, state: Any) -> Decision:
        """Return what to do about ``snapshot``, with the updated memory in ``Decision.state``."""
        ...


@dataclass(frozen=True)
class PolicyState:
    """The memory ``LoadPolicy`` and ``FixedPolicy`` keep from one decision to the next.

    ``time`` is the previous snapshot's time. ``idle_streaks`` maps a job name to the number of
    consecutive decisions at which it was idle (or still pending) while the cluster had more jobs
    than it needed. ``retiring`` names the jobs this policy asked to retire that are still in the
    queue (they no longer count as capacity and are not retired twice). ``recent_needs`` holds
    (time, jobs needed) pairs over the cool-down window, reduced to those that can still be its
    maximum (each need is larger than every later one), so it stays a few entries long.
    Treat it as read-only.
    """

    time: float | None = None
    idle_streaks: Mapping[str, int] = field(default_factory=dict)
    retiring: frozenset[str] = frozenset()
    recent_needs: tuple[tuple[float, int], ...] = ()


def _push_need(
    recent: tuple[tuple[float, int], ...], now: float, need: int, window_s: float
) -> tuple[tuple[float, int], ...]:
    """Return the sliding-window maximum of needs over ``window_s`` with (now, need) added.

    The result keeps only entries newer than the window that exceed every later entry, so its
    first entry is the window's maximum.
    """
    kept = [(t, n) for t, n in recent if t > now - window_s and n > need]
    return (*kept, (now, need))


# --------------------------------------------------------------------------------------------------
# Facts about jobs shared by the policies


def _start_latency_s(snapshot: Snapshot) -> float | None:
    """Return the longest observed time from submission to start among the snapshot's jobs."""
    latencies = [
        job.started_at - job.submitted_at
        for job in snapshot.jobs
        if job.started_at is not None and job.submitted_at is not None
    ]
    return max(0.0, max(latencies)) if latencies else None


def _job_end(snapshot: Snapshot, job: JobView) -> float | None:
    """Return when the job starts losing capacity: its walltime end or a worker's lifetime end."""
    ends = [job.walltime_end] + [w.lifetime_end for w in snapshot.workers_of(job)]
    known = [t for t in ends if t is not None]
    return min(known) if known else None


def _going_away(snapshot: Snapshot, job: JobView, lead_s: float) -> bool:
    """Return whether a started job is draining or will end within ``lead_s`` seconds.

    The lead time is capped at half the job's life, so that a lead longer than the walltime cannot
    make every job count as going away from the moment it starts.
    """
    if job.started_at is None:
        return False
    workers = snapshot.workers_of(job)
    if workers and all(w.status == "retiring" for w in workers):
        return True
    end = _job_end(snapshot, job)
    if end is None:
        return False
    lead_s = min(lead_s, max(0.0, end - job.started_at) / 2)
    return end - snapshot.time <= lead_s


def _job_is_idle(snapshot: Snapshot, job: JobView, elapsed_s: float | None) -> bool:
    """Return whether retiring ``job`` now would stop no work.

    A pending job is idle. A running job is idle when it has connected workers and none of them runs
    a task, is paused or retiring, or has run a task since the previous decision (``idle_s`` covers
    the time elapsed since then, less a little slack for the delay in collecting it). A running job
    without connected workers is still starting and is not idle.
    """
    if job.state == "PENDING":
        return True
    if job.state != "RUNNING":
        return False
    workers = snapshot.workers_of(job)
    return bool(workers) and all(
        w.status == "running"
        and w.running == 0
        and (elapsed_s is None or w.idle_s >= _IDLE_SLACK * elapsed_s)
        for w in workers
    )


def _retire_order(snapshot: Snapshot, job: JobView) -> tuple[int, float, float, str]:
    """Sort key: pending jobs first (newest first), then by stored data, then soonest to end."""
    if job.state == "PENDING":
        return (0, -(job.submitted_at or 0.0), 0.0, job.name)
    stored = float(sum(w.stored_bytes for w in snapshot.workers_of(job)))
    end = _job_end(snapshot, job)
    return (1, stored, math.inf if end is None else end, job.name)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _check_count(owner: str, name: str, value: int | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}({name}={value!r}) must be an int >= 0")


# --------------------------------------------------------------------------------------------------
# Policies


@dataclass(frozen=True)
class LoadPolicy:
    """Grow when work would take longer than ``target_duration_s``; shrink jobs idle for a while.

    Parameters
    ----------
    minimum, maximum
        Bounds in workers, converted to jobs with ``Snapshot.workers_per_job``: the minimum rounds
        up (never fewer workers than asked), the maximum rounds down (never more). None: no maximum.
    minimum_jobs, maximum_jobs
        Bounds in jobs. Given together with the worker bounds, the tighter bound wins; if the
        minimum ends up above the maximum, the maximum wins. The maximum bounds every job in the
        queue, pending, running or draining.
    target_duration_s
        Scale up while the unfinished tasks times their observed duration would take longer than
        this on the threads of the jobs already there or pending.
    wait_count
        A job is retired only after it was idle (or still pending) on this many consecutive
        decisions while the cluster had more jobs than it needed.
    memory_fraction
        Keep enough jobs that the workers' memory use stays below this fraction of their limits.
    replace_before_s
        Count a running job as gone this long before its walltime (or a worker's lifetime) ends, so
        its replacement is submitted ahead of time. None: ``max(2 * observed start latency, 60 s)``.
    cooldown_s
        Shrink only to the largest number of jobs needed during the last ``cooldown_s`` seconds,
        and never retire a job younger than this (since submission). None:
        ``max(2 * target_duration_s, observed start latency)``: a job is kept at least as long as
        it took to get one.

    Returns
    -------
    ``decide(snapshot, state)`` returns a Decision whose ``state`` is the next ``PolicyState``.

    Examples
    --------
    >>> policy = LoadPolicy(maximum_jobs=4)
    >>> decision = policy.decide(Snapshot(time=0.0, tasks_ready=40, task_duration_s=1.0,
    ...                                   threads_per_worker=2), None)
    >>> decision.add_jobs
    4
    """

    minimum: int = 0
    maximum: int | None = None
    minimum_jobs: int | None = None
    maximum_jobs: int | None = None
    target_duration_s: float = 5.0
    wait_count: int = 3
    memory_fraction: float = 0.6
    replace_before_s: float | None = None
    cooldown_s: float | None = None

    def __post_init__(self) -> None:
        _check_count("LoadPolicy", "minimum", self.minimum, allow_none=False)
        for name in ("maximum", "minimum_jobs", "maximum_jobs"):
            _check_count("LoadPolicy", name, getattr(self, name))
        if self.maximum is not None and self.minimum > self.maximum:
            raise ValueError(
                f"LoadPolicy(minimum={self.minimum}, maximum={self.maximum}): minimum must not "
                "exceed maximum"
            )
        if (
            self.minimum_jobs is not None
            and self.maximum_jobs is not None
            and self.minimum_jobs > self.maximum_jobs
        ):
            raise ValueError(
                f"LoadPolicy(minimum_jobs={self.minimum_jobs}, maximum_jobs={self.maximum_jobs}): "
                "minimum_jobs must not exceed maximum_jobs"
            )
        if not self.target_duration_s > 0:
            raise ValueError(
                f"LoadPolicy(target_duration_s={self.target_duration_s!r}) must be > 0 seconds"
            )
        if isinstance(self.wait_count, bool) or not isinstance(self.wait_count, int):
            raise ValueError(f"LoadPolicy(wait_count={self.wait_count!r}) must be an int >= 1")
        if self.wait_count < 1:
            raise ValueError(f"LoadPolicy(wait_count={self.wait_count!r}) must be an int >= 1")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(
                f"LoadPolicy(memory_fraction={self.memory_fraction!r}) must be in (0, 1], e.g. 0.6"
            )
        for name in ("replace_before_s", "cooldown_s"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"LoadPolicy({name}={value!r}) must be >= 0 seconds or None")

    def job_bounds(self, workers_per_job: int) -> tuple[int, int | None]:
        """Return (minimum, maximum) in jobs for jobs of ``workers_per_job`` workers."""
        low = -(-self.minimum // workers_per_job)
        if self.minimum_jobs is not None:
            low = max(low, self.minimum_jobs)
        high = self.maximum_jobs
        if self.maximum is not None:
            by_workers = self.maximum // workers_per_job
            high = by_workers if high is None else min(high, by_workers)
        if high is not None:
            low = min(low, high)
        return low, high

    def lead_time_s(self, snapshot: Snapshot) -> float:
        """Return how long before its end a running job counts as gone (``replace_before_s``)."""
        if self.replace_before_s is not None:
            return self.replace_before_s
        return max(2 * (_start_latency_s(snapshot) or 0.0), 60.0)

    def cooldown_for(self, snapshot: Snapshot) -> float:
        """Return the cool-down: the shrink window and the youngest age retired (``cooldown_s``)."""
        if self.cooldown_s is not None:
            return self.cooldown_s
        return max(2 * self.target_duration_s, _start_latency_s(snapshot) or 0.0)

    def needed_jobs(self, snapshot: Snapshot) -> tuple[int, str]:
        """Return how many jobs the work and the memory in use call for, and why (before bounds)."""
        known = {job.name for job in snapshot.jobs}
        unmanaged = [w for w in snapshot.workers if w.status != "retiring" and w.job not in known]
        unmanaged_threads = sum(w.nthreads for w in unmanaged)
        tasks = snapshot.tasks
        duration = snapshot.task_duration_s
        if tasks == 0:
            threads, load_why = 0, "no tasks"
        elif duration is None:
            # Nothing has finished yet: give every ready task a thread rather than guess a duration.
            threads = max(1, snapshot.tasks_ready + snapshot.tasks_running)
            load_why = f"{_plural(threads, 'task')} of unknown duration want {threads} threads"
        else:
            work_s = tasks * duration
            threads = min(tasks, max(1, math.ceil(work_s / self.target_duration_s)))
            load_why = (
                f"{_plural(tasks, 'task')} x {duration:.3g}s need {threads} threads "
                f"to finish within {self.target_duration_s:g}s"
            )
        load_jobs = -(-max(0, threads - unmanaged_threads) // snapshot.threads_per_job)

        memory_jobs, memory_why = self._memory_jobs(snapshot)
        if memory_jobs > load_jobs:
            return memory_jobs, f"memory: {memory_why} needs {_plural(memory_jobs, 'job')}"
        return load_jobs, f"load: {load_why}"

    def _memory_jobs(self, snapshot: Snapshot) -> tuple[int, str]:
        """Return the jobs that memory calls for, and why.

        Above ``memory_fraction`` of the limits, enough jobs to bring the use under it. Below, only
        stored data holds jobs back: it moves to the remaining workers when a job is retired, while
        each job's own overhead (its memory that is not stored data) leaves with it. So the floor is
        the smallest k with ``stored + k * overhead <= memory_fraction * k * limit``, which keeps a
        shrink from landing above the line and straight back into a scale-up. Nothing stored: no
        floor, so an idle cluster can return to zero.
        """
        limited = [w for w in snapshot.workers if w.memory_limit_bytes]
        if not limited:
            return 0, ""
        used = sum(w.memory_bytes for w in limited)
        limit = sum(w.memory_limit_bytes or 0 for w in limited)
        stored = sum(w.stored_bytes for w in limited)
        per_worker = snapshot.workers_per_job / len(limited)
        room = self.memory_fraction * limit * per_worker  # usable memory of one job
        share = f"{used / limit:.0%} of {limit / 2**30:.1f} GiB"
        if used > self.memory_fraction * limit:
            return (
                math.ceil(used / room),
                f"{used / 2**30:.1f} GiB in use ({share}; keep below {self.memory_fraction:.0%})",
            )
        if not stored:
            return 0, ""
        # Below the line, overhead < room: (used - stored) / workers < used / workers <= room.
        overhead = max(0, used - stored) * per_worker
        return math.ceil(stored / (room - overhead)), (
            f"{stored / 2**30:.1f} GiB stored ({share} in use; keep below "
            f"{self.memory_fraction:.0%} after a shrink)"
        )

    def decide(self, snapshot: Snapshot, state: PolicyState | None = None) -> Decision:
        """Return the Decision for ``snapshot`` given the memory of the previous decision."""
        prior = _prior_state(state, "LoadPolicy")
        now = snapshot.time
        elapsed_s = None if prior.time is None else now - prior.time
        low, high = self.job_bounds(snapshot.workers_per_job)
        queue = [job for job in snapshot.jobs if job.live]
        retiring = prior.retiring & {job.name for job in queue}
        lead_s = self.lead_time_s(snapshot)
        going = {j.name for j in queue if j.name in retiring or _going_away(snapshot, j, lead_s)}
        staying = [job for job in queue if job.name not in going]
        pending = sum(job.state == "PENDING" for job in staying)
        have = f"{_plural(len(staying), 'job')} staying ({pending} pending)"
        if going:
            have += f", {len(going)} going away"

        def bounded(jobs: int) -> int:
            return max(low, jobs) if high is None else min(high, max(low, jobs))

        need, why = self.needed_jobs(snapshot)
        if low > need:
            why = f"minimum of {_plural(low, 'job')} ({why})"
        cooldown_s = self.cooldown_for(snapshot)
        recent_needs = _push_need(prior.recent_needs, now, need, cooldown_s)

        # Grow to what is needed now. Pending jobs count as capacity (they are in `staying`), so
        # a slow queue does not make us submit again and again for the same work.
        target = bounded(need)
        if target > len(staying):
            add = target - len(staying)
            if high is not None:
                add = min(add, high - len(queue))  # maximum_jobs bounds everything in the queue
            next_state = PolicyState(now, {}, retiring, recent_needs)
            if add <= 0:
                return Decision.hold(
                    f"{why}; want {target} jobs, but the queue holds {len(queue)}, the maximum; "
                    f"{have}",
                    next_state,
                )
            return Decision(add, (), f"{why}; {have}", next_state)

        # Shrink only to the largest need within the cool-down, so a load that comes back within
        # it finds its jobs still there (a stabilization window; it bounds submit/cancel loops).
        peak = recent_needs[0][1]
        target = bounded(peak)
        if peak > need:
            why += f"; keeping {_plural(target, 'job')} needed within the {cooldown_s:g}s cool-down"
        surplus = len(staying) - target
        if surplus <= 0:
            return Decision.hold(f"{why}; {have}", PolicyState(now, {}, retiring, recent_needs))

        # Retire idle jobs after wait_count consecutive idle decisions, once they are older than
        # the cool-down: pending jobs first, then the running ones with the least stored data.
        idle = [job for job in staying if _job_is_idle(snapshot, job, elapsed_s)]
        streaks = {job.name: prior.idle_streaks.get(job.name, 0) + 1 for job in idle}
        # The first `surplus` jobs in that order are the ones to go. One that is not ready yet
        # blocks those behind it: a running job is never retired while a pending job could be.
        proposed = sorted(idle, key=lambda job: _retire_order(snapshot, job))[:surplus]
        ready = tuple(
            job.name
            for job in proposed
            if streaks[job.name] >= self.wait_count
            and (job.submitted_at is None or now - job.submitted_at >= cooldown_s)
        )
        why = f"{_plural(surplus, 'job')} more than needed, {len(idle)} idle; {why}; {have}"
        if not ready:
            if proposed:
                first = proposed[0]
                waiting = (
                    f"idle {streaks[first.name]}/{self.wait_count} decisions"
                    if streaks[first.name] < self.wait_count
                    else f"younger than the {cooldown_s:g}s cool-down"
                )
                why = f"{first.name} {waiting}; {why}"
            return Decision.hold(why, PolicyState(now, streaks, retiring, recent_needs))
        streaks = {name: n for name, n in streaks.items() if name not in ready}
        return Decision(
            0, ready, why, PolicyState(now, streaks, retiring | frozenset(ready), recent_needs)
        )


@dataclass(frozen=True)
class FixedPolicy:
    """Keep exactly ``n_jobs`` jobs alive, replacing any that die, fail or reach their walltime.

    Extra jobs (after a manual ``scale``) are retired at once: pending ones first, then the idle
    ones with the least stored data, then the busy ones. With ``replace_before_s > 0`` a running job
    counts as gone that long before its walltime ends, so its replacement is submitted ahead of time
    and ``n_jobs + 1`` jobs may briefly be in the queue.
    """

    n_jobs: int
    replace_before_s: float = 0.0

    def __post_init__(self) -> None:
        _check_count("FixedPolicy", "n_jobs", self.n_jobs, allow_none=False)
        if not self.replace_before_s >= 0:
            raise ValueError(
                f"FixedPolicy(replace_before_s={self.replace_before_s!r}) must be >= 0 seconds"
            )

    def decide(self, snapshot: Snapshot, state: PolicyState | None = None) -> Decision:
        """Return the Decision that brings the live jobs back to ``n_jobs``."""
        prior = _prior_state(state, "FixedPolicy")
        now = snapshot.time
        queue = [job for job in snapshot.jobs if job.live]
        retiring = prior.retiring & {job.name for job in queue}
        staying = [
            job
            for job in queue
            if job.name not in retiring and not _going_away(snapshot, job, self.replace_before_s)
        ]
        have = f"{len(staying)} of {_plural(self.n_jobs, 'job')} alive"
        if len(queue) > len(staying):
            have += f", {len(queue) - len(staying)} going away"
        if len(staying) < self.n_jobs:
            return Decision(
                self.n_jobs - len(staying),
                (),
                f"keep {self.n_jobs}: {have}",
                PolicyState(now, {}, retiring),
            )
        if len(staying) == self.n_jobs:
            return Decision.hold(f"keep {self.n_jobs}: {have}", PolicyState(now, {}, retiring))
        elapsed_s = None if prior.time is None else now - prior.time

        def order(job: JobView) -> tuple[bool, tuple[int, float, float, str]]:
            return (not _job_is_idle(snapshot, job, elapsed_s), _retire_order(snapshot, job))

        extra = tuple(job.name for job in sorted(staying, key=order)[: len(staying) - self.n_jobs])
        return Decision(
            0, extra, f"keep {self.n_jobs}: {have}", PolicyState(now, {}, retiring | set(extra))
        )


def _prior_state(state: object, owner: str) -> PolicyState:
    if state is None:
        return PolicyState()
    if not isinstance(state, PolicyState):
        raise TypeError(
            f"{owner}.decide(state={state!r}) takes the PolicyState of its previous Decision "
            "(decision.state) or None"
        )
    return state


# --------------------------------------------------------------------------------------------------
# The driver


class ScalableCluster(Protocol):
    """What ``Adaptive`` needs of a cluster: exactly these three methods."""

    def snapshot(self) -> Snapshot:
        """Return the cluster now, summed over its schedulers."""
        ...

    def scale_up(self, n: int) -> None:
        """Submit ``n`` more jobs."""
        ...

    def scale_down(self, names: Sequence[str]) -> None:
        """Retire these jobs or workers gracefully, then cancel the jobs."""
        ...


class AdaptiveError(RuntimeError):
    """Adaptive scaling stopped and will not resume by itself.

    Raised by ``Adaptive.step()`` and ``Adaptive.raise_for_error()``. ``start_failures`` is the
    count of consecutive jobs that failed before a worker connected, ``job`` the last of them and
    ``log_tail`` the end of its log, when the cluster provided them.
    """

    def __init__(
        self,
        message: str,
        *,
        start_failures: int = 0,
        job: str | None = None,
        log_tail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.start_failures = start_failures
        self.job = job
        self.log_tail = log_tail


def _start_failure_error(snapshot: Snapshot, limit: int) -> AdaptiveError:
    """Return the error that stops adaptive scaling after ``limit`` failed starts in a row."""
    failed = [job for job in snapshot.jobs if job.failed_at_start]
    last = max(failed, key=lambda job: job.submitted_at or 0.0, default=None)
    message = (
        f"adaptive scaling stopped: {snapshot.start_failures} jobs in a row failed before any "
        f"worker connected (max_start_failures={limit}), so no more are submitted."
    )
    log_tail = None
    if last is not None:
        message += f"\nLast failed job: {last.name!r} ({last.state})."
        if last.log_tail:
            log_tail = "\n".join(last.log_tail.rstrip().splitlines()[-_LOG_TAIL_LINES:])
            message += " Its log ends with:\n" + "\n".join(
                "    " + line for line in log_tail.splitlines()
            )
        else:
            message += " Its log was not available."
    message += (
        "\nCheck what a job runs with cluster.job_script(), fix it, then call cluster.adapt(...) "
        "again."
    )
    return AdaptiveError(
        message,
        start_failures=snapshot.start_failures,
        job=None if last is None else last.name,
        log_tail=log_tail,
    )


def _seconds(value: str | float | timedelta, parameter: str) -> float:
    """Return ``value`` in seconds; a bare number is seconds here (not minutes as for walltimes)."""
    if isinstance(value, bool):
        raise ValueError(f"{parameter}={value!r} is not a duration; use e.g. {parameter}='1s'")
    if isinstance(value, (int, float)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(
                f"{parameter}={value!r} must be a positive number of seconds or a duration "
                f"such as '500ms', '1s' or '2m'"
            )
        return float(value)
    return parse_duration(value, parameter)


class Adaptive:
    """Grow and shrink ``cluster`` under ``policy``: every ``interval``, snapshot, decide, act.

    ``cluster.adapt(...)`` constructs this with the cluster itself; any object with ``snapshot``,
    ``scale_up`` and ``scale_down`` (``ScalableCluster``) will do. A daemon thread calls ``step()``
    right away and then every ``interval``. An exception in a step is logged and counted
    (``failed_steps``) and the next step runs as usual; ``max_start_failures`` jobs in a row failing
    before any worker connected stops the thread with an ``AdaptiveError``, shown by ``repr`` and
    raised by ``raise_for_error()``.

    Parameters
    ----------
    cluster
        What to scale.
    policy
        Any object with ``decide(snapshot, state) -> Decision``. None: a ``LoadPolicy`` built from
        the next six arguments, which must keep their defaults when a policy is given.
    minimum, maximum, minimum_jobs, maximum_jobs, wait_count
        See ``LoadPolicy``.
    interval, target_duration
        Durations: ``"1s"``, ``"500ms"``, ``"2m"``, a ``timedelta`` or a number of seconds.
    max_start_failures
        Stop after this many consecutive jobs failed before a worker connected.
        ``cluster.adapt()`` makes it the cluster's own limit while it adapts, so the cluster
        refuses to submit at the same count at which this stops.
    history
        How many recent decisions ``history`` keeps.
    autostart
        Start the thread now. With False, call ``start()`` or drive it with ``step()``.

    Raises
    ------
    ValueError
        For a malformed bound or duration, or load-policy arguments given together with ``policy``.

    Examples
    --------
    >>> adaptive = cluster.adapt(minimum_jobs=0, maximum_jobs=4)  # doctest: +SKIP
    >>> adaptive  # doctest: +SKIP
    <Adaptive running: LoadPolicy(...), every 1s; submitted 2 jobs, retired 0; last: add 2 jobs...>
    >>> adaptive.stop()  # doctest: +SKIP

    A manual ``cluster.scale()``, ``scale_up()`` or ``scale_down()`` stops the ``Adaptive`` that
    ``cluster.adapt()`` returned (as in dask): the user has taken over. ``cluster.adapt()`` again
    resumes.
    """

    def __init__(
        self,
        cluster: ScalableCluster,
        policy: Policy | None = None,
        minimum: int = 0,
        maximum: int | None = None,
        minimum_jobs: int | None = None,
        maximum_jobs: int | None = None,
        interval: str | float | timedelta = "1s",
        target_duration: str | float | timedelta = "5s",
        wait_count: int = 3,
        *,
        max_start_failures: int = 3,
        history: int = 100,
        autostart: bool = True,
    ) -> None:
        self.interval_s = _seconds(interval, "interval")
        target_duration_s = _seconds(target_duration, "target_duration")
        if policy is None:
            policy = LoadPolicy(
                minimum=minimum,
                maximum=maximum,
                minimum_jobs=minimum_jobs,
                maximum_jobs=maximum_jobs,
                target_duration_s=target_duration_s,
                wait_count=wait_count,
            )
        else:
            if not callable(getattr(policy, "decide", None)):
                raise TypeError(
                    f"policy={policy!r} has no decide(snapshot, state) method; pass e.g. "
                    "policy=FixedPolicy(n_jobs=4) or policy=LoadPolicy(maximum_jobs=10)"
                )
            given = {
                "minimum": minimum != 0,
                "maximum": maximum is not None,
                "minimum_jobs": minimum_jobs is not None,
                "maximum_jobs": maximum_jobs is not None,
                "target_duration": target_duration_s != 5.0,
                "wait_count": wait_count != 3,
            }
            clashes = [name for name, was_given in given.items() if was_given]
            if clashes:
                raise ValueError(
                    f"{', '.join(clashes)} configure the default LoadPolicy and would be ignored "
                    f"with policy={policy!r}; give them to the policy instead, e.g. "
                    "policy=LoadPolicy(maximum_jobs=10, target_duration_s=30)"
                )
        _check_count("Adaptive", "history", history, allow_none=False)
        if max_start_failures < 1:
            raise ValueError(f"Adaptive(max_start_failures={max_start_failures!r}) must be >= 1")
        self.cluster = cluster
        self.policy: Policy = policy
        self.max_start_failures = max_start_failures
        self._history: deque[Decision] = deque(maxlen=history)
        self._state: Any = None
        self._submitted = 0
        self._retired = 0
        self._failed_steps = 0
        self._failing_in_a_row = 0
        self._error: AdaptiveError | None = None
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        if autostart:
            self.start()

    # ---- inspection

    @property
    def running(self) -> bool:
        """Return whether the thread is calling ``step()`` every interval."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping.is_set()

    @property
    def history(self) -> tuple[Decision, ...]:
        """Return the most recent decisions, oldest first."""
        return tuple(self._history)

    @property
    def last_decision(self) -> Decision | None:
        """Return the latest Decision, or None before the first step."""
        return self._history[-1] if self._history else None

    @property
    def submitted(self) -> int:
        """Return how many jobs this driver has asked the cluster to submit."""
        return self._submitted

    @property
    def retired(self) -> int:
        """Return how many jobs or workers this driver has asked the cluster to retire."""
        return self._retired

    @property
    def failed_steps(self) -> int:
        """Return how many steps raised an exception (logged, then the thread carried on)."""
        return self._failed_steps

    @property
    def error(self) -> AdaptiveError | None:
        """Return the error that stopped adaptive scaling, or None."""
        return self._error

    def raise_for_error(self) -> None:
        """Raise the ``AdaptiveError`` that stopped adaptive scaling, if one did."""
        if self._error is not None:
            raise self._error

    def __repr__(self) -> str:
        if self._error is not None:
            first_line = str(self._error).splitlines()[0]
            status = f"stopped by AdaptiveError({first_line!r})"
        else:
            status = "running" if self.running else "stopped"
        last = self.last_decision
        last_text = "none yet" if last is None else str(last)
        if len(last_text) > 120:
            last_text = last_text[:117] + "..."
        failed = f", {self._failed_steps} failed steps" if self._failed_steps else ""
        return (
            f"<Adaptive {status}: {self.policy!r}, every {self.interval_s:g}s; "
            f"submitted {_plural(self._submitted, 'job')}, retired {self._retired}{failed}; "
            f"last: {last_text}>"
        )

    # ---- acting

    def step(self) -> Decision:
        """Take a snapshot, ask the policy, act on its Decision and return it.

        Raises
        ------
        AdaptiveError
            When ``max_start_failures`` jobs in a row failed to start; the thread then stops.
        """
        with self._step_lock:
            snapshot = self.cluster.snapshot()
            if snapshot.start_failures >= self.max_start_failures:
                error = _start_failure_error(snapshot, self.max_start_failures)
                self._error = error
                self._stopping.set()
                raise error
            decision = self.policy.decide(snapshot, self._state)
            if not isinstance(decision, Decision):
                raise TypeError(
                    f"{self.policy!r}.decide() returned {decision!r}; it must return a Decision"
                )
            self._state = decision.state
            self._history.append(decision)
            if decision.is_hold:
                logger.debug("adaptive: %s", decision)
            else:
                logger.info("adaptive: %s", decision)
            # Submit before retiring so that capacity never dips when a policy does both.
            if decision.add_jobs:
                self.cluster.scale_up(decision.add_jobs)
                self._submitted += decision.add_jobs
            if decision.retire:
                self.cluster.scale_down(list(decision.retire))
                self._retired += len(decision.retire)
            return decision

    def start(self) -> None:
        """Start calling ``step()`` every interval in a daemon thread; do nothing if running."""
        if self.running:
            return
        self._error = None
        self._stopping = stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(stopping,), name="jobqueue-ms-adaptive", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread and wait up to ``timeout`` seconds for a step in progress to finish.

        Jobs stay as they are; ``cluster.close()`` or ``cluster.scale(0)`` removes them.
        """
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self, stopping: threading.Event) -> None:
        """Call ``step()`` now and every interval until stopped or stopped by an AdaptiveError."""
        while not stopping.is_set():
            try:
                self.step()
            except AdaptiveError as error:
                logger.error("%s", error)
                return
            except Exception:
                self._failed_steps += 1
                self._failing_in_a_row += 1
                if self._failing_in_a_row == 1:
                    logger.exception("adaptive: step failed; retrying every %gs", self.interval_s)
                else:
                    logger.warning(
                        "adaptive: step failed again (%d in a row)", self._failing_in_a_row
                    )
            else:
                self._failing_in_a_row = 0
            stopping.wait(self.interval_s)
