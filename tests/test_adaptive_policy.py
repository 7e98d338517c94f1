"""Unit tests of the adaptive policy and its driver: snapshots in, decisions out.

No processes and no queue here: decide() is tested as a table, the driver against SimCluster, a
pure-Python cluster with a clock that moves one second per tick. End-to-end runs on LocalCluster and
real batch systems live with the clusters.
"""

from __future__ import annotations

import ast
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from jobqueue_ms.adaptive import (
    Adaptive,
    AdaptiveError,
    Decision,
    FixedPolicy,
    JobView,
    LoadPolicy,
    PolicyState,
    Snapshot,
    WorkerView,
)

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
T0 = 1_800_000_000.0  # a fixed epoch for table snapshots


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(0.005)


# --------------------------------------------------------------------------------------------------
# Building blocks for table snapshots


def running_job(
    name: str,
    *,
    running: int = 0,
    stored: int = 0,
    idle_s: float = 1000.0,
    age_s: float = 1000.0,
    walltime_left_s: float | None = None,
    nthreads: int = 2,
    memory: int = 0,
    memory_limit: int | None = None,
    status: str = "running",
) -> tuple[JobView, WorkerView]:
    """Return a running one-worker job and its worker."""
    started = T0 - age_s + 1
    end = None if walltime_left_s is None else T0 + walltime_left_s
    job = JobView(
        name,
        "RUNNING",
        workers=(f"{name}-0",),
        submitted_at=T0 - age_s,
        started_at=started,
        walltime_end=end,
    )
    worker = WorkerView(
        f"{name}-0",
        job=name,
        nthreads=nthreads,
        running=running,
        memory_bytes=memory,
        memory_limit_bytes=memory_limit,
        idle_s=0.0 if running else idle_s,
        stored_bytes=stored,
        status=status,
        lifetime_end=end,
    )
    return job, worker


def pending_job(name: str, *, age_s: float = 1000.0) -> JobView:
    return JobView(name, "PENDING", workers=(f"{name}-0",), submitted_at=T0 - age_s)


def snap(*parts: JobView | tuple[JobView, WorkerView], **fields: Any) -> Snapshot:
    """Return a Snapshot at T0 of the given jobs (two threads per worker unless told)."""
    jobs, workers = [], []
    for part in parts:
        if isinstance(part, tuple):
            jobs.append(part[0])
            workers.append(part[1])
        else:
            jobs.append(part)
    fields.setdefault("threads_per_worker", 2)
    workers.extend(fields.pop("workers", ()))
    return Snapshot(time=T0, jobs=tuple(jobs), workers=tuple(workers), **fields)


def decide_steps(
    policy: LoadPolicy | FixedPolicy, snapshot: Snapshot, steps: int, dt: float = 1.0
) -> list[Decision]:
    """Decide on the same cluster ``steps`` times, ``dt`` apart, threading the state through."""
    decisions: list[Decision] = []
    state: PolicyState | None = None
    for i in range(steps):
        moved = replace(
            snapshot,
            time=snapshot.time + i * dt,
            workers=tuple(
                w if w.running else replace(w, idle_s=w.idle_s + i * dt) for w in snapshot.workers
            ),
        )
        decision = policy.decide(moved, state)
        decisions.append(decision)
        state = decision.state
    return decisions


# --------------------------------------------------------------------------------------------------
# decide(): one snapshot in, one decision out

SCALE_UP_CASES = [
    pytest.param(LoadPolicy(), snap(), 0, id="idle-empty-cluster-holds"),
    pytest.param(LoadPolicy(minimum_jobs=2), snap(), 2, id="minimum-jobs"),
    pytest.param(
        LoadPolicy(minimum=3), snap(workers_per_job=2), 2, id="minimum-workers-round-up-to-jobs"
    ),
    pytest.param(
        LoadPolicy(maximum=3),
        snap(workers_per_job=2, tasks_ready=500, task_duration_s=1.0),
        1,
        id="maximum-workers-round-down-to-jobs",
    ),
    pytest.param(LoadPolicy(minimum=3, maximum_jobs=1), snap(), 1, id="maximum-wins-over-minimum"),
    pytest.param(
        LoadPolicy(),
        snap(tasks_ready=40, task_duration_s=1.0),
        4,
        id="40x1s-within-5s-needs-8-threads",
    ),
    pytest.param(
        LoadPolicy(),
        snap(tasks_ready=40, task_duration_s=0.01),
        1,
        id="short-tasks-need-one-job",
    ),
    pytest.param(
        LoadPolicy(),
        snap(pending_job("a"), pending_job("b"), tasks_ready=40, task_duration_s=1.0),
        2,
        id="pending-jobs-count-as-capacity",
    ),
    pytest.param(
        LoadPolicy(),
        snap(*(pending_job(f"p{i}") for i in range(4)), tasks_ready=40, task_duration_s=1.0),
        0,
        id="slow-queue-does-not-flood",
    ),
    pytest.param(
        LoadPolicy(),
        snap(running_job("a", running=2), tasks_ready=40, tasks_running=2, task_duration_s=1.0),
        4,
        id="running-tasks-count-as-work",
    ),
    pytest.param(
        LoadPolicy(), snap(tasks_ready=5), 3, id="unknown-duration-a-thread-per-ready-task"
    ),
    pytest.param(
        LoadPolicy(maximum_jobs=4),
        snap(tasks_ready=100),
        4,
        id="unknown-duration-up-to-maximum",
    ),
    pytest.param(
        LoadPolicy(maximum_jobs=4),
        snap(running_job("a"), pending_job("b"), tasks_ready=100),
        2,
        id="maximum-counts-jobs-in-queue",
    ),
    pytest.param(
        LoadPolicy(),
        snap(
            running_job("a", memory=7 * GiB, memory_limit=10 * GiB),
            running_job("b", memory=7 * GiB, memory_limit=10 * GiB),
        ),
        1,
        id="memory-above-60-percent",
    ),
    pytest.param(
        LoadPolicy(),
        snap(
            running_job("a", memory=5 * GiB, memory_limit=10 * GiB),
            running_job("b", memory=5 * GiB, memory_limit=10 * GiB),
        ),
        0,
        id="memory-below-60-percent",
    ),
    pytest.param(
        LoadPolicy(minimum_jobs=2),
        snap(running_job("a"), JobView("b", "FAILED", submitted_at=T0 - 50)),
        1,
        id="dead-job-replaced-for-minimum",
    ),
    pytest.param(
        LoadPolicy(minimum_jobs=2),
        snap(running_job("a"), JobView("b", "UNKNOWN", submitted_at=T0 - 50)),
        0,
        id="unknown-state-counts-as-alive",
    ),
    pytest.param(
        LoadPolicy(minimum_jobs=1),
        snap(running_job("a", walltime_left_s=30)),
        1,
        id="walltime-replacement-ahead-of-time",
    ),
    pytest.param(
        LoadPolicy(),
        snap(running_job("a", walltime_left_s=30)),
        0,
        id="walltime-no-replacement-without-need",
    ),
    pytest.param(
        LoadPolicy(minimum_jobs=1),
        snap(running_job("a", walltime_left_s=300)),
        0,
        id="walltime-far-away",
    ),
    pytest.param(
        LoadPolicy(minimum_jobs=1, replace_before_s=600),
        snap(running_job("a", walltime_left_s=300)),
        1,
        id="walltime-replace-before-s",
    ),
    pytest.param(
        LoadPolicy(minimum_jobs=1),
        snap(running_job("a", walltime_left_s=30, age_s=11)),
        0,
        id="walltime-lead-capped-at-half-the-life",
    ),
    pytest.param(
        LoadPolicy(minimum_jobs=1, maximum_jobs=1),
        snap(running_job("a", walltime_left_s=30)),
        0,
        id="walltime-replacement-needs-room-under-maximum",
    ),
    pytest.param(
        LoadPolicy(minimum_jobs=1),
        snap(running_job("a", status="retiring")),
        1,
        id="retiring-workers-are-not-capacity",
    ),
    pytest.param(
        LoadPolicy(),
        snap(tasks_ready=4, task_duration_s=1.0, workers=(WorkerView("manual", nthreads=8),)),
        0,
        id="workers-outside-jobs-count-as-capacity",
    ),
]


@pytest.mark.parametrize(("policy", "snapshot", "add_jobs"), SCALE_UP_CASES)
def test_decide_scale_up(policy: LoadPolicy, snapshot: Snapshot, add_jobs: int) -> None:
    decision = policy.decide(snapshot, None)
    assert (decision.add_jobs, decision.retire) == (add_jobs, ()), decision.reason
    assert decision.reason


def test_decide_is_deterministic_given_snapshot_and_state() -> None:
    snapshot = snap(running_job("a"), running_job("b"), pending_job("c"))
    policy = LoadPolicy()
    first = policy.decide(snapshot, None)
    again = policy.decide(snapshot, None)
    assert first == again and first.state == again.state
    later = replace(snapshot, time=T0 + 1)
    assert policy.decide(later, first.state).state == policy.decide(later, first.state).state


def test_reasons_say_why() -> None:
    up = LoadPolicy().decide(snap(tasks_ready=40, task_duration_s=1.0), None)
    assert "40 tasks" in up.reason and "8 threads" in up.reason and "5s" in up.reason
    memory = LoadPolicy().decide(
        snap(running_job("a", memory=7 * GiB, memory_limit=10 * GiB)), None
    )
    assert memory.reason.startswith("memory: 7.0 GiB in use (70% of 10.0 GiB; keep below 60%)")
    assert str(memory).startswith("add 1 job: memory")
    assert str(Decision.hold("nothing to do")) == "hold: nothing to do"


# --------------------------------------------------------------------------------------------------
# decide() over several steps: scale-down rules


def idle_jobs(n: int, *, memory: float, stored: float, limit: float = 4) -> list:
    """Return ``n`` idle running jobs using ``memory`` GiB each, ``stored`` GiB of it data."""
    return [
        running_job(
            f"j{i}",
            memory=int(memory * GiB),
            stored=int(stored * GiB),
            memory_limit=int(limit * GiB),
        )
        for i in range(n)
    ]


SCALE_DOWN_CASES = [
    pytest.param(LoadPolicy(), snap(*idle_jobs(3, memory=0, stored=0)), 3, id="all-idle"),
    pytest.param(LoadPolicy(minimum_jobs=1), snap(*idle_jobs(3, memory=0, stored=0)), 2, id="min"),
    pytest.param(
        LoadPolicy(),
        snap(*idle_jobs(4, memory=0.5, stored=0)),
        4,
        id="memory-overhead-alone-holds-nothing",
    ),
    pytest.param(
        LoadPolicy(),
        # 2 GiB stored and 2 GiB overhead in 16 GiB; with 0.5 GiB overhead a job has 1.9 GiB
        # of room under 60 %, so two jobs hold the data: 3 + 1 GiB of 8 GiB is 50 %.
        snap(*idle_jobs(4, memory=1.0, stored=0.5)),
        2,
        id="stored-data-holds-jobs",
    ),
    pytest.param(
        LoadPolicy(),
        # 6 GiB stored: four jobs at 50 %; three would be 7.5 GiB of 12 GiB, 62 %.
        snap(*idle_jobs(4, memory=2.0, stored=1.5)),
        0,
        id="shrink-would-cross-the-memory-line",
    ),
]


@pytest.mark.parametrize(("policy", "snapshot", "n_retired"), SCALE_DOWN_CASES)
def test_decide_scale_down(policy: LoadPolicy, snapshot: Snapshot, n_retired: int) -> None:
    decisions = decide_steps(replace(policy, wait_count=1, cooldown_s=0), snapshot, steps=1)
    assert decisions[0].add_jobs == 0 and len(decisions[0].retire) == n_retired, decisions[0]


def test_scale_down_after_wait_count_idle_decisions() -> None:
    decisions = decide_steps(LoadPolicy(wait_count=3), snap(running_job("a")), steps=4)
    assert [d.retire for d in decisions] == [(), (), ("a",), ()]
    assert "idle 1/3" in decisions[0].reason
    # Retired once, then remembered as retiring: not retired again, not counted as capacity.
    assert decisions[3].state.retiring == frozenset({"a"})


def test_busy_step_resets_the_idle_streak() -> None:
    policy = LoadPolicy(wait_count=3, cooldown_s=0)
    idle = snap(running_job("a"))
    busy = snap(running_job("a", running=1), tasks_running=1, task_duration_s=0.1)
    state = None
    retired = []
    for i, snapshot in enumerate([idle, idle, busy, idle, idle, idle]):
        snapshot = replace(snapshot, time=T0 + i)
        decision = policy.decide(snapshot, state)
        state = decision.state
        retired.append(decision.retire)
    assert retired == [(), (), (), (), (), ("a",)]


def test_task_between_decisions_resets_the_idle_streak() -> None:
    # Nothing runs at either snapshot, but idle_s shows a task ran in between.
    policy = LoadPolicy(wait_count=2)
    first = policy.decide(snap(running_job("a", idle_s=100)), None)
    second = policy.decide(replace(snap(running_job("a", idle_s=0.2)), time=T0 + 5), first.state)
    assert second.is_hold and "a" not in second.state.idle_streaks
    third = policy.decide(replace(snap(running_job("a", idle_s=1.2)), time=T0 + 6), second.state)
    assert third.is_hold and "a idle 1/2" in third.reason


def test_busy_jobs_are_never_retired() -> None:
    snapshot = snap(
        running_job("a", running=2),
        running_job("b", running=2),
        tasks_running=4,
        task_duration_s=0.01,
    )
    decisions = decide_steps(LoadPolicy(wait_count=1, cooldown_s=0), snapshot, steps=5)
    assert all(d.is_hold for d in decisions)


def test_pending_jobs_are_retired_before_running_ones() -> None:
    snapshot = snap(
        running_job("run-empty", stored=0),
        pending_job("pend-old", age_s=500),
        running_job("run-full", stored=5 * GiB),
        pending_job("pend-new", age_s=100),
    )
    policy = LoadPolicy(minimum_jobs=1, wait_count=2, cooldown_s=0)
    retired = [d.retire for d in decide_steps(policy, snapshot, steps=2)]
    # Newest pending first (the older one is nearer the front of the queue), then the running job
    # with the least stored data; the one with 5 GiB stays.
    assert retired == [(), ("pend-new", "pend-old", "run-empty")]


def test_least_stored_running_jobs_go_first() -> None:
    snapshot = snap(
        running_job("a", stored=30), running_job("b", stored=10), running_job("c", stored=20)
    )
    policy = LoadPolicy(minimum_jobs=1, wait_count=1, cooldown_s=0)
    assert policy.decide(snapshot, None).retire == ("b", "c")


def test_equal_stored_data_retires_the_job_ending_first() -> None:
    snapshot = snap(
        running_job("late", walltime_left_s=9000), running_job("soon", walltime_left_s=5000)
    )
    policy = LoadPolicy(minimum_jobs=1, wait_count=1, cooldown_s=0)
    assert policy.decide(snapshot, None).retire == ("soon",)


def test_never_below_minimum() -> None:
    snapshot = snap(*(running_job(f"j{i}") for i in range(3)))
    decisions = decide_steps(LoadPolicy(minimum=2, wait_count=1, cooldown_s=0), snapshot, 5)
    assert sum(len(d.retire) for d in decisions) == 1


def test_young_jobs_wait_for_the_cooldown() -> None:
    snapshot = snap(pending_job("p", age_s=5))
    policy = LoadPolicy(wait_count=1, cooldown_s=8)
    decisions = decide_steps(policy, snapshot, steps=5)
    assert [d.retire for d in decisions] == [(), (), (), ("p",), ()]
    assert "cool-down" in decisions[0].reason


def test_unknown_submission_time_does_not_protect_a_job() -> None:
    job = JobView("x", "RUNNING", workers=("x-0",), started_at=T0 - 5)
    snapshot = snap(job, workers=(WorkerView("x-0", job="x", idle_s=100),))
    assert LoadPolicy(wait_count=1).decide(snapshot, None).retire == ("x",)


def test_a_pending_job_in_cooldown_protects_running_ones() -> None:
    # One job too many: the young pending job is the one to go, so the idle running job stays even
    # though it could be retired now.
    snapshot = snap(running_job("old"), pending_job("young", age_s=1))
    policy = LoadPolicy(minimum_jobs=1, wait_count=1, cooldown_s=10)
    decision = policy.decide(snapshot, None)
    assert decision.is_hold and "young younger than" in decision.reason


def test_shrink_waits_for_the_need_to_stay_low_for_the_cooldown() -> None:
    policy = LoadPolicy(wait_count=1, cooldown_s=10)
    jobs = [running_job(f"j{i}") for i in range(4)]
    busy = snap(*(running_job(j.name, running=2) for j, _ in jobs), tasks_running=8, tasks_ready=40)
    busy = replace(busy, task_duration_s=1.0)
    state = policy.decide(busy, None).state
    retired_at = None
    for i in range(1, 20):
        decision = policy.decide(replace(snap(*jobs), time=T0 + i), state)
        state = decision.state
        if decision.retire:
            retired_at = i
            break
    assert retired_at == 10
    assert decision.retire == ("j0", "j1", "j2", "j3")


def test_window_state_stays_small() -> None:
    policy = LoadPolicy(cooldown_s=1e9)
    state = None
    for i in range(200):
        load = snap(tasks_ready=i % 17, task_duration_s=10.0)
        state = policy.decide(replace(load, time=T0 + i), state).state
    assert len(state.recent_needs) <= 17


# --------------------------------------------------------------------------------------------------
# FixedPolicy

FIXED_CASES = [
    pytest.param(snap(), 3, (), id="empty"),
    pytest.param(
        snap(running_job("a"), running_job("b"), JobView("c", "FAILED")), 1, (), id="replace-dead"
    ),
    pytest.param(
        snap(running_job("a"), running_job("b"), JobView("c", "TIMEOUT")),
        1,
        (),
        id="replace-expired",
    ),
    pytest.param(snap(*(running_job(n) for n in "abc")), 0, (), id="exact"),
    pytest.param(
        snap(
            running_job("busy", running=2),
            running_job("idle"),
            running_job("a"),
            pending_job("p"),
            running_job("b"),
            tasks_running=2,
            task_duration_s=1.0,
        ),
        0,
        ("p", "a"),
        id="retire-extra-pending-then-idle",
    ),
]


@pytest.mark.parametrize(("snapshot", "add_jobs", "retire"), FIXED_CASES)
def test_fixed_policy(snapshot: Snapshot, add_jobs: int, retire: tuple[str, ...]) -> None:
    decision = FixedPolicy(3).decide(snapshot, None)
    assert (decision.add_jobs, decision.retire) == (add_jobs, retire), decision.reason


def test_fixed_policy_replaces_ahead_of_walltime_when_asked() -> None:
    snapshot = snap(running_job("a", walltime_left_s=30), running_job("b"))
    assert FixedPolicy(2).decide(snapshot, None).add_jobs == 0
    assert FixedPolicy(2, replace_before_s=60).decide(snapshot, None).add_jobs == 1


# --------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LoadPolicy(minimum=5, maximum=2), "minimum must not exceed maximum"),
        (lambda: LoadPolicy(minimum_jobs=5, maximum_jobs=2), "minimum_jobs must not exceed"),
        (lambda: LoadPolicy(wait_count=0), r"wait_count=0\) must be an int >= 1"),
        (lambda: LoadPolicy(target_duration_s=0), "target_duration_s=0"),
        (lambda: LoadPolicy(memory_fraction=1.5), r"memory_fraction=1.5\) must be in \(0, 1\]"),
        (lambda: LoadPolicy(maximum=-1), r"maximum=-1\) must be an int >= 0"),
        (lambda: FixedPolicy(-1), r"n_jobs=-1\)"),
        (lambda: Decision(add_jobs=-1), "retire jobs by name instead"),
        (lambda: Decision(retire="job-1"), r"retire=\('job-1',\)"),
        (lambda: Decision(retire=("a", "a")), "twice"),
        (lambda: JobView("a", "DONE"), "use one of PENDING, RUNNING"),
        (lambda: WorkerView("w", status="busy"), "use one of running, paused, retiring"),
        (lambda: Snapshot(time=0, workers_per_job=0), "workers_per_job=0"),
    ],
)
def test_invalid_values_are_refused_with_the_accepted_form(
    make: Callable[[], object], message: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_policy_refuses_foreign_state() -> None:
    with pytest.raises(TypeError, match="PolicyState of its previous Decision"):
        LoadPolicy().decide(snap(), {"streaks": {}})


# --------------------------------------------------------------------------------------------------
# Snapshot.from_scheduler_info


def _report(name: str, **fields: Any) -> dict[str, Any]:
    report = {
        "name": name,
        "job": "job-1",
        "host": "n1",
        "pid": 1,
        "nthreads": 4,
        "running": 0,
        "memory_bytes": GiB,
        "memory_limit_bytes": 4 * GiB,
        "idle_s": 30.0,
        "stored_bytes": 100,
        "status": "running",
        "lifetime_end": None,
    }
    report.update(fields)
    return report


def _info(sid: str, ready: int, waiting: int, running: int, duration: float | None, workers: list):
    return {
        "scheduler_id": sid,
        "address": f"tcp://127.0.0.1:{sid}",
        "cluster_id": "c",
        "time": T0,
        "tasks": {"ready": ready, "waiting": waiting, "running": running},
        "task_duration_s": duration,
        "workers": workers,
    }


def test_from_scheduler_info_merges_every_scheduler() -> None:
    infos = [
        _info(
            "1",
            10,
            2,
            3,
            2.0,
            [
                _report("w1", running=2, idle_s=0.0, lifetime_end=T0 + 99),
                _report("w2", running=1, idle_s=0.0, memory_limit_bytes=None),
            ],
        ),
        _info(
            "2",
            20,
            0,
            5,
            1.0,
            [
                _report("w1", running=3, idle_s=0.0, status="retiring", lifetime_end=T0 + 50),
                _report("w2", running=2, idle_s=0.0, memory_bytes=2 * GiB),
                _report("w3", job=None, idle_s=12.5),  # connected to one scheduler so far
            ],
        ),
        _info("3", 0, 0, 0, None, [_report("w1", idle_s=7.0)]),
    ]
    jobs = [JobView("job-1", "RUNNING", workers=("w1", "w2"), started_at=T0 - 100)]
    snapshot = Snapshot.from_scheduler_info(
        infos, jobs, workers_per_job=2, threads_per_worker=4, start_failures=1, now=T0
    )
    assert (snapshot.tasks_ready, snapshot.tasks_waiting, snapshot.tasks_running) == (30, 2, 8)
    # Weighted by each scheduler's unfinished tasks: (15 * 2.0 + 25 * 1.0) / 40.
    assert snapshot.task_duration_s == pytest.approx(55 / 40)
    workers = {w.name: w for w in snapshot.workers}
    assert set(workers) == {"w1", "w2", "w3"}
    w1, w2, w3 = workers["w1"], workers["w2"], workers["w3"]
    assert (w1.running, w1.status, w1.lifetime_end, w1.idle_s) == (5, "retiring", T0 + 50, 0.0)
    assert (w2.running, w2.memory_bytes, w2.memory_limit_bytes) == (3, 2 * GiB, 4 * GiB)
    assert (w3.job, w3.idle_s) == (None, 12.5)
    assert [w.name for w in snapshot.workers_of(jobs[0])] == ["w1", "w2"]
    assert (snapshot.workers_per_job, snapshot.threads_per_worker) == (2, 4)
    assert (snapshot.start_failures, snapshot.time) == (1, T0)


def test_from_scheduler_info_durations() -> None:
    def duration(*infos: dict[str, Any]) -> float | None:
        snapshot = Snapshot.from_scheduler_info(list(infos), [], 1, 1, 0, T0)
        return snapshot.task_duration_s

    assert duration(_info("1", 5, 0, 0, None, [])) is None
    assert duration(_info("1", 5, 0, 0, None, []), _info("2", 0, 0, 0, 3.0, [])) == 3.0
    assert duration(_info("1", 0, 0, 0, 1.0, []), _info("2", 0, 0, 0, 3.0, [])) == 2.0
    assert duration() is None


# --------------------------------------------------------------------------------------------------
# A simulated cluster


@dataclass
class SimJob:
    name: str
    state: str
    submitted_at: float
    started_at: float | None = None
    walltime_end: float | None = None
    retiring: bool = False
    failed_at_start: bool = False


class SimCluster:
    """A cluster in pure Python with the three methods Adaptive uses.

    Time moves one second per ``tick()``. A job pends ``pending_steps`` ticks, then runs
    ``workers_per_job`` workers of ``threads_per_worker`` threads (or fails at start). Every task
    takes one tick. ``load(t)`` tasks arrive at tick t. Retiring a running job stops its workers
    taking tasks; it ends once they finish. The snapshot goes through two schedulers'
    info dicts and ``Snapshot.from_scheduler_info``, as a real cluster's does.
    """

    def __init__(
        self,
        *,
        load: Callable[[int], int] = lambda t: 0,
        pending_steps: int = 2,
        workers_per_job: int = 1,
        threads_per_worker: int = 2,
        walltime_s: float | None = None,
        fail_at_start: bool = False,
    ) -> None:
        self.load = load
        self.pending_steps = pending_steps
        self.workers_per_job = workers_per_job
        self.threads_per_worker = threads_per_worker
        self.walltime_s = walltime_s
        self.fail_at_start = fail_at_start
        self.t = 0
        self.now = T0
        self.jobs: dict[str, SimJob] = {}
        self.ready = 0
        self.running: dict[str, int] = {}
        self.last_busy: dict[str, float] = {}
        self.done = 0
        self.start_failures = 0
        self.submissions = 0
        self.cancelled_pending: list[str] = []
        self.retired_running: list[str] = []

    # ---- the ScalableCluster protocol

    def scale_up(self, n: int) -> None:
        for _ in range(n):
            self.submissions += 1
            name = f"job-{self.submissions}"
            self.jobs[name] = SimJob(name, "PENDING", submitted_at=self.now)

    def scale_down(self, names: Sequence[str]) -> None:
        for name in names:
            job = self.jobs[name]
            if job.state == "PENDING":
                job.state = "CANCELLED"
                self.cancelled_pending.append(name)
            elif job.state == "RUNNING" and not job.retiring:
                job.retiring = True
                self.retired_running.append(name)

    def snapshot(self) -> Snapshot:
        halves = [(self.ready + 1) // 2, self.ready // 2]
        infos = []
        for s, ready in enumerate(halves):
            reports = []
            for worker in self.workers():
                running = self.running.get(worker, 0)
                mine = (running + 1) // 2 if s == 0 else running // 2
                job = self.jobs[worker.rsplit("-", 1)[0]]
                reports.append(
                    {
                        "name": worker,
                        "job": job.name,
                        "host": "sim",
                        "pid": 1,
                        "nthreads": self.threads_per_worker,
                        "running": mine,
                        "memory_bytes": 0,
                        "memory_limit_bytes": None,
                        "idle_s": 0.0 if running else self.now - self.last_busy[worker],
                        "stored_bytes": 0,
                        "status": "retiring" if job.retiring else "running",
                        "lifetime_end": job.walltime_end,
                    }
                )
            running_here = sum(r["running"] for r in reports)
            infos.append(_info(str(s), ready, 0, running_here, 1.0 if self.done else None, reports))
        views = [
            JobView(
                job.name,
                job.state,
                workers=self.worker_names(job.name),
                workers_per_job=self.workers_per_job,
                submitted_at=job.submitted_at,
                started_at=job.started_at,
                walltime_end=job.walltime_end,
                failed_at_start=job.failed_at_start,
                log_tail="line 1\nbash: line 7: nosuchcommand: command not found"
                if job.failed_at_start
                else None,
            )
            for job in self.jobs.values()
        ]
        return Snapshot.from_scheduler_info(
            infos,
            views,
            self.workers_per_job,
            self.threads_per_worker,
            self.start_failures,
            self.now,
        )

    # ---- the simulation

    def worker_names(self, job: str) -> tuple[str, ...]:
        return tuple(f"{job}-{i}" for i in range(self.workers_per_job))

    def workers(self) -> list[str]:
        return [
            w
            for job in self.jobs.values()
            if job.state == "RUNNING"
            for w in self.worker_names(job.name)
        ]

    def live(self) -> int:
        return sum(job.state in ("PENDING", "RUNNING") for job in self.jobs.values())

    def serving(self) -> int:
        """Return the running jobs that take tasks."""
        return sum(j.state == "RUNNING" and not j.retiring for j in self.jobs.values())

    def kill(self, name: str) -> None:
        self.jobs[name].state = "FAILED"

    def tick(self) -> None:
        self.t += 1
        self.now += 1.0
        for worker, n in self.running.items():
            self.done += n
            if n:
                self.last_busy[worker] = self.now
        self.running = {}
        for job in self.jobs.values():
            if job.state == "PENDING" and self.now - job.submitted_at >= self.pending_steps:
                if self.fail_at_start:
                    job.state, job.failed_at_start = "FAILED", True
                    self.start_failures += 1
                    continue
                job.state, job.started_at = "RUNNING", self.now
                if self.walltime_s is not None:
                    job.walltime_end = self.now + self.walltime_s
                self.start_failures = 0
                for worker in self.worker_names(job.name):
                    self.last_busy[worker] = self.now
            elif job.state == "RUNNING":
                if job.walltime_end is not None and self.now >= job.walltime_end:
                    job.state = "TIMEOUT"
                elif job.retiring:
                    job.state = "COMPLETED"  # its tasks finished above: drained
        self.ready += self.load(self.t)
        for worker in self.workers():
            job = self.jobs[worker.rsplit("-", 1)[0]]
            if job.retiring:
                continue
            take = min(self.threads_per_worker, self.ready)
            self.running[worker] = take
            self.ready -= take

    @property
    def outstanding(self) -> int:
        return self.ready + sum(self.running.values())


def simulate(
    cluster: SimCluster,
    policy: LoadPolicy | FixedPolicy,
    ticks: int,
    each_tick: Callable[[int], None] = lambda t: None,
) -> tuple[Adaptive, list[int]]:
    """Step the driver and the cluster ``ticks`` times; return the driver and live jobs per tick."""
    adaptive = Adaptive(cluster, policy=policy, autostart=False)
    live = []
    for _ in range(ticks):
        each_tick(cluster.t)
        adaptive.step()
        live.append(cluster.live())
        cluster.tick()
    return adaptive, live


def direction_changes(series: list[int]) -> int:
    steps = [b - a for a, b in zip(series, series[1:], strict=False) if b != a]
    return sum((x > 0) != (y > 0) for x, y in zip(steps, steps[1:], strict=False))


def test_burst_scales_up_finishes_and_returns_to_zero() -> None:
    cluster = SimCluster(load=lambda t: 200 if t == 1 else 0)
    adaptive, live = simulate(cluster, LoadPolicy(maximum_jobs=8), ticks=80)
    assert max(live) == 8
    assert cluster.done == 200 and cluster.outstanding == 0
    assert live[-1] == 0 and cluster.live() == 0
    assert direction_changes(live) == 1  # up once, down once
    assert adaptive.submitted == cluster.submissions == 8


def test_steady_load_converges_without_oscillating() -> None:
    # 8 one-second tasks a second on jobs of 2 threads: 4 jobs keep up.
    cluster = SimCluster(load=lambda t: 8)
    _, live = simulate(cluster, LoadPolicy(maximum_jobs=10), ticks=150)
    tail = live[-60:]
    assert min(tail) == max(tail) == 4
    assert cluster.outstanding <= 8  # the queue does not grow
    assert direction_changes(live) <= 1


def test_bursty_load_submits_a_bounded_number_of_jobs() -> None:
    # 16 tasks a second for 4 s, nothing for 4 s, for 300 s. The off phases are longer than
    # wait_count decisions, so it is the cool-down window that keeps jobs from being given back in
    # each lull and resubmitted in each burst.
    def load(t: int) -> int:
        return 16 if t % 8 < 4 else 0

    guarded = SimCluster(load=load)
    _, live = simulate(guarded, LoadPolicy(maximum_jobs=8), ticks=300)
    assert guarded.submissions <= 2 * 8
    # It settles during the first bursts, then neither submits nor retires anything.
    settled = T0 + 40
    assert all(job.submitted_at < settled for job in guarded.jobs.values())
    assert min(live[40:]) == max(live[40:])
    assert guarded.done + guarded.outstanding == sum(load(t) for t in range(1, 301))

    unguarded = SimCluster(load=load)
    simulate(unguarded, LoadPolicy(maximum_jobs=8, wait_count=1, cooldown_s=0), ticks=300)
    assert unguarded.submissions > 5 * guarded.submissions  # the guard is what bounds it


def test_slow_bursts_follow_the_load_at_a_bounded_rate() -> None:
    # Off phases longer than the cool-down: giving jobs back is right, but every job lives at least
    # the cool-down, so submissions <= maximum_jobs * (1 + duration / cooldown).
    def load(t: int) -> int:
        return 16 if t % 40 < 10 else 0

    cluster = SimCluster(load=load)
    policy = LoadPolicy(maximum_jobs=8, cooldown_s=10)
    simulate(cluster, policy, ticks=400)
    assert 8 < cluster.submissions <= 8 * (1 + 400 // 10)
    assert cluster.done + cluster.outstanding == sum(load(t) for t in range(1, 401))


def test_walltime_replacement_is_submitted_ahead_of_expiry() -> None:
    cluster = SimCluster(walltime_s=30, pending_steps=3)
    serving = []
    _, live = simulate(
        cluster,
        LoadPolicy(minimum_jobs=2, replace_before_s=6),
        ticks=120,
        each_tick=lambda t: serving.append(cluster.serving()),
    )
    # After the first start, two jobs always serve, though each lives only 30 s.
    first = serving.index(2)
    assert min(serving[first:]) == 2
    assert cluster.submissions >= 2 * 120 // 30
    assert max(live) <= 4
    assert sum(j.state == "TIMEOUT" for j in cluster.jobs.values()) >= 6
    assert all(j.state != "FAILED" for j in cluster.jobs.values())


def test_without_lead_time_capacity_dips_at_expiry() -> None:
    # The counterpart of the test above: it is the lead time that prevents the dip.
    cluster = SimCluster(walltime_s=30, pending_steps=3)
    serving = []
    simulate(
        cluster,
        LoadPolicy(minimum_jobs=2, replace_before_s=0),
        ticks=120,
        each_tick=lambda t: serving.append(cluster.serving()),
    )
    assert min(serving[serving.index(2) :]) < 2


def test_dead_jobs_are_replaced_while_work_remains() -> None:
    cluster = SimCluster(load=lambda t: 8 if t < 60 else 0)

    def kill(t: int) -> None:
        if t == 30:
            for job in [j for j in cluster.jobs.values() if j.state == "RUNNING"][:2]:
                cluster.kill(job.name)

    _, live = simulate(cluster, LoadPolicy(maximum_jobs=6), ticks=120, each_tick=kill)
    submitted_before = sum(j.submitted_at < T0 + 30 for j in cluster.jobs.values())
    assert cluster.submissions >= submitted_before + 2
    assert live[-1] == 0 and cluster.outstanding == 0


def test_fixed_policy_replaces_dead_jobs() -> None:
    cluster = SimCluster()

    def kill(t: int) -> None:
        if t in (10, 20):
            cluster.kill(next(j.name for j in cluster.jobs.values() if j.state == "RUNNING"))

    adaptive, live = simulate(cluster, FixedPolicy(3), ticks=40, each_tick=kill)
    assert cluster.submissions == 5
    assert live[-1] == 3 and cluster.serving() == 3
    assert adaptive.retired == 0


def test_repeated_start_failures_stop_with_the_log_tail() -> None:
    cluster = SimCluster(fail_at_start=True, pending_steps=1)
    adaptive = Adaptive(cluster, minimum_jobs=1, autostart=False)
    with pytest.raises(AdaptiveError) as caught:
        for _ in range(20):
            adaptive.step()
            cluster.tick()
    error = caught.value
    assert cluster.submissions == 3 and error.start_failures == 3
    assert "3 jobs in a row failed before any worker connected" in str(error)
    assert "max_start_failures=3" in str(error)
    assert error.job == "job-3" and "nosuchcommand: command not found" in str(error)
    assert error.log_tail is not None and error.log_tail.endswith("command not found")
    assert adaptive.error is error
    with pytest.raises(AdaptiveError):
        adaptive.raise_for_error()
    assert repr(adaptive).startswith(
        "<Adaptive stopped by AdaptiveError('adaptive scaling stopped: 3 jobs in a row failed"
    )


def test_a_successful_start_resets_the_failure_count() -> None:
    snapshot = snap(start_failures=2)
    cluster = _StaticCluster([snapshot, replace(snapshot, start_failures=0)])
    adaptive = Adaptive(cluster, max_start_failures=3, autostart=False)
    adaptive.step()
    adaptive.step()
    assert adaptive.error is None


# --------------------------------------------------------------------------------------------------
# The driver


class _StaticCluster:
    """Serves the given snapshots in turn (the last one forever) and records the calls."""

    def __init__(self, snapshots: list[Snapshot | Exception]) -> None:
        self.snapshots = list(snapshots)
        self.calls: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def snapshot(self) -> Snapshot:
        with self.lock:
            item = self.snapshots.pop(0) if len(self.snapshots) > 1 else self.snapshots[0]
        if isinstance(item, Exception):
            raise item
        return item

    def scale_up(self, n: int) -> None:
        self.calls.append(("scale_up", n))

    def scale_down(self, names: Sequence[str]) -> None:
        self.calls.append(("scale_down", list(names)))


def test_step_acts_on_the_decision() -> None:
    cluster = _StaticCluster([snap(tasks_ready=40, task_duration_s=1.0), snap(running_job("a"))])
    adaptive = Adaptive(cluster, wait_count=1, autostart=False)
    assert adaptive.step().add_jobs == 4
    assert cluster.calls == [("scale_up", 4)]
    assert adaptive.submitted == 4 and adaptive.last_decision is adaptive.history[-1]


def test_step_retires_through_scale_down() -> None:
    cluster = _StaticCluster([snap(running_job("a"), running_job("b"))])
    adaptive = Adaptive(cluster, policy=FixedPolicy(1), autostart=False)
    assert adaptive.step().retire == ("a",)
    assert cluster.calls == [("scale_down", ["a"])] and adaptive.retired == 1


def test_history_is_bounded() -> None:
    adaptive = Adaptive(_StaticCluster([snap()]), history=5, autostart=False)
    for _ in range(12):
        adaptive.step()
    assert len(adaptive.history) == 5 and all(d.is_hold for d in adaptive.history)


def test_thread_starts_steps_and_stops() -> None:
    cluster = _StaticCluster([snap()])
    adaptive = Adaptive(cluster, minimum_jobs=1, interval=0.01)
    try:
        assert adaptive.running and repr(adaptive).startswith("<Adaptive running: LoadPolicy(")
        wait_until(lambda: len(adaptive.history) >= 3)
    finally:
        adaptive.stop()
    assert not adaptive.running
    assert not any(t.name == "jobqueue-ms-adaptive" and t.is_alive() for t in threading.enumerate())
    text = repr(adaptive)
    assert text.startswith("<Adaptive stopped: LoadPolicy(minimum=0, maximum=None, minimum_jobs=1")
    assert "every 0.01s" in text and "submitted" in text and "last: add 1 job" in text
    count = len(adaptive.history)
    adaptive.stop()  # idempotent
    assert len(adaptive.history) == count


def test_thread_logs_and_counts_failed_steps_and_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    boom = RuntimeError("squeue: slurm_load_jobs error: Socket timed out")
    cluster = _StaticCluster([boom, boom, boom, snap()])
    with caplog.at_level(logging.WARNING, logger="jobqueue_ms.adaptive"):
        adaptive = Adaptive(cluster, interval="10ms")
        try:
            wait_until(lambda: len(adaptive.history) >= 1)
            assert adaptive.running
        finally:
            adaptive.stop()
    assert adaptive.failed_steps == 3 and adaptive.error is None
    assert "3 failed steps" in repr(adaptive)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "Socket timed out" in caplog.text
    assert "3 in a row" in caplog.text


def test_thread_stops_on_repeated_start_failures() -> None:
    failed = JobView("job-9", "FAILED", failed_at_start=True, log_tail="sbatch: error: bad qos")
    adaptive = Adaptive(_StaticCluster([snap(failed, start_failures=3)]), interval=0.01)
    wait_until(lambda: not adaptive.running)
    with pytest.raises(AdaptiveError, match="(?s)'job-9'.*bad qos"):
        adaptive.raise_for_error()
    assert repr(adaptive).startswith("<Adaptive stopped by AdaptiveError(")
    adaptive.stop()


def test_driver_arguments_are_checked() -> None:
    cluster = _StaticCluster([snap()])
    with pytest.raises(ValueError, match="maximum_jobs configure the default LoadPolicy"):
        Adaptive(cluster, policy=FixedPolicy(2), maximum_jobs=4, autostart=False)
    with pytest.raises(TypeError, match="has no decide"):
        Adaptive(cluster, policy=object(), autostart=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval=0 must be a positive number of seconds"):
        Adaptive(cluster, interval=0, autostart=False)
    with pytest.raises(ValueError, match="target_duration='soon' is not a duration"):
        Adaptive(cluster, target_duration="soon", autostart=False)
    adaptive = Adaptive(cluster, interval="500ms", target_duration="2m", autostart=False)
    assert adaptive.interval_s == 0.5 and adaptive.policy == LoadPolicy(target_duration_s=120)
    assert Adaptive(cluster, interval=2, autostart=False).interval_s == 2.0  # seconds, not minutes


def test_policy_must_return_a_decision() -> None:
    class Broken:
        def decide(self, snapshot: Snapshot, state: Any) -> Decision:
            return "add 2"  # type: ignore[return-value]

    adaptive = Adaptive(_StaticCluster([snap()]), policy=Broken(), autostart=False)
    with pytest.raises(TypeError, match="must return a Decision"):
        adaptive.step()


# --------------------------------------------------------------------------------------------------
# docs/adaptive.md and the import boundary


def _docs_example(marker: str) -> str:
    text = (ROOT / "docs" / "adaptive.md").read_text()
    match = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", text, re.S)
    assert match, f"no python block after {marker!r} in docs/adaptive.md"
    return match.group(1)


def test_docs_working_hours_policy_runs() -> None:
    namespace: dict[str, Any] = {}
    exec(
        compile(_docs_example("<!-- example: working-hours -->"), "adaptive.md", "exec"), namespace
    )
    policy = namespace["WorkingHours"](day_minimum_jobs=4, maximum_jobs=20)
    monday_10h = time.mktime((2026, 11, 23, 10, 0, 0, 0, 0, -1))
    monday_22h = time.mktime((2026, 11, 23, 22, 0, 0, 0, 0, -1))
    saturday_10h = time.mktime((2026, 11, 28, 10, 0, 0, 0, 0, -1))
    assert policy.decide(Snapshot(time=monday_10h), None).add_jobs == 4
    assert policy.decide(Snapshot(time=monday_22h), None).is_hold
    assert policy.decide(Snapshot(time=saturday_10h), None).is_hold
    # Work at night still scales up, to the same maximum.
    night_work = Snapshot(time=monday_22h, tasks_ready=1000, task_duration_s=1.0)
    assert policy.decide(night_work, None).add_jobs == 20
    # At 18:00 the warm jobs are given back, once idle past the cool-down.
    cluster = SimCluster()
    cluster.now = time.mktime((2026, 11, 23, 17, 0, 0, 0, 0, -1))
    adaptive = Adaptive(cluster, policy=policy, autostart=False)
    for _ in range(90 * 60):
        adaptive.step()
        cluster.tick()
    assert cluster.submissions == 4 and cluster.live() == 0


def test_docs_policy_example_runs() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(_docs_example("<!-- example: decide -->"), "adaptive.md", "exec"), namespace)
    assert namespace["decision"].add_jobs == 4


def test_adaptive_imports_only_the_standard_library_and_units() -> None:
    tree = ast.parse((ROOT / "jobqueue_ms" / "adaptive.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    outside = {
        name
        for name in imported
        if name != ".units" and name.split(".")[0] not in sys.stdlib_module_names
    }
    assert outside == set(), "adaptive.py must import only the standard library and .units"
