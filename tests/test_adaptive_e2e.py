"""Adaptive scaling end to end: real schedulers, real worker processes, real SLURM jobs.

What issue 4 asks of a running cluster, each checked on what really happened (results, a file with
one line per execution, job records, the queue, process ids):

* a burst scales a LocalCluster up to its maximum, the work finishes, and it returns to zero;
  the same on the real SLURM with ``maximum_jobs=2``;
* shrinking under a steady load loses nothing and computes nothing twice;
* a job with a 30 s lifetime drains and is replaced ahead of time without a failed task, its end is
  recorded as TIMEOUT, and jobs started together drain at staggered times; the same for a SLURM job
  with a 30 s walltime;
* a load that comes and goes every few seconds gives a bounded number of submissions;
* a job that dies is replaced while work remains; jobs that keep failing at start stop adaptive
  scaling with an AdaptiveError quoting the job's log;
* the Cluster base: a manual ``scale()`` stops adaptive scaling, a slow queue does not block the
  cluster's lock, and ``close()`` after a failed start lets the original error through.

Intervals are short (decisions every 200 ms, heartbeats timing out in 3 s) to keep the module
around three minutes. Load generators pace submissions with sleeps; every wait for an outcome
polls with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
from helpers import wait_until

from jobqueue_ms import Client
from jobqueue_ms.adaptive import AdaptiveError, LoadPolicy
from jobqueue_ms.config import Config
from jobqueue_ms.deploy.cluster import Cluster, ClusterError, JobRecord, JobState
from jobqueue_ms.deploy.local import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# workers cannot import this test module: ship its functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

HEARTBEAT = {"JOBQUEUE_MS_HEARTBEAT_TIMEOUT": "3", "JOBQUEUE_MS_HEARTBEAT_INTERVAL": "0.25"}
FAST = {"interval": "200ms", "target_duration": "1s", "wait_count": 2}


@pytest.fixture(autouse=True)
def fast_heartbeats(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Notice lost workers in seconds; submit batch jobs from the test's directory."""
    for key, value in HEARTBEAT.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def local() -> Iterator[Callable[..., LocalCluster]]:
    """A factory of LocalClusters without workers; each is closed and its processes checked."""
    made: list[LocalCluster] = []

    def make(**kwargs: Any) -> LocalCluster:
        cluster = LocalCluster(n_workers=0, threads_per_worker=1, **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()
        pids = [r.info["pid"] for r in cluster.jobs.values() if "pid" in r.info]
        wait_until(
            lambda pids=pids: not any(_alive(p) for p in pids), timeout=15, message="job processes"
        )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def record(path: str, i: int, delay: float = 0.0, nbytes: int = 0) -> tuple[int, bytes]:
    """Run one task: append ``i`` to ``path`` (one line per execution), return i*i and padding.

    With ``nbytes`` above the inline limit the result stays on the worker that computed it.
    """
    if delay:
        time.sleep(delay)
    with open(path, "a") as f:
        f.write(f"{i}\n")
    return i * i, b"x" * nbytes


def total(results: list[tuple[int, bytes]]) -> int:
    return sum(value for value, _ in results)


def executions(path: Path) -> Counter[int]:
    return Counter(int(line) for line in path.read_text().split()) if path.exists() else Counter()


def live_jobs(cluster: Cluster) -> list[JobRecord]:
    return [r for r in list(cluster.jobs.values()) if not r.state.finished]


def back_to_zero(cluster: Cluster) -> bool:
    return not live_jobs(cluster) and not cluster.workers


def describe(cluster: Cluster, adaptive: Any = None) -> Callable[[], str]:
    def text() -> str:
        jobs = {r.name: r.state.value for r in cluster.jobs.values()}
        return f"{cluster!r}\njobs: {jobs}\nadaptive: {adaptive!r}"

    return text


class Sampler:
    """Sample the cluster every 50 ms in a thread: live jobs and workers not retiring."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.live_jobs: list[int] = []
        self.serving: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.live_jobs.append(len(live_jobs(self.cluster)))
            workers = self.cluster.workers.values()
            self.serving.append(sum(w["status"] != "retiring" for w in workers))


# ---------------------------------------------------------------------------------- 1 and 2: burst


def test_local_burst_scales_up_finishes_and_returns_to_zero(local, tmp_path: Path) -> None:
    cluster = local()
    adaptive = cluster.adapt(minimum=0, maximum=4, **FAST)
    log = tmp_path / "executions"
    with Sampler(cluster) as sampler, Client(cluster) as client:
        futures = [client.submit(record, str(log), i, 0.3) for i in range(40)]
        results = [f.result(timeout=60) for f in futures]
        wait_until(lambda: back_to_zero(cluster), timeout=30, message=describe(cluster, adaptive))
    assert total(results) == sum(i * i for i in range(40))
    assert executions(log) == Counter(range(40))
    assert max(sampler.live_jobs) == 4  # up to the maximum, never above it
    assert len(cluster.jobs) == 4  # and no job submitted twice
    assert {r.state for r in cluster.jobs.values()} == {JobState.COMPLETED}
    assert adaptive.running and adaptive.error is None


def slurm_options(slurm: Any, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "cores": 1,
        "memory": "1GiB",
        "walltime": "00:10:00",
        "queue": slurm.partition,
        "python": sys.executable,
        "log_directory": str(tmp_path),
        "poll_interval": 0.5,
        "job_script_prologue": [f"export {k}={v}" for k, v in HEARTBEAT.items()],
        "config": Config(),
        **extra,
    }


def squeue_ids() -> set[str]:
    out = subprocess.run(
        ["squeue", "--noheader", "--format=%i"], capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


@pytest.fixture
def slurm_cluster(slurm, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """A factory of SLURMClusters; at teardown each is closed and its jobs leave the queue."""
    from jobqueue_ms.batch.slurm import SLURMCluster

    made: list[Cluster] = []

    def make(**extra: Any) -> Cluster:
        cluster = SLURMCluster(**slurm_options(slurm, tmp_path, **extra))
        made.append(cluster)
        return cluster

    yield make
    ids: set[str] = set()
    for cluster in made:
        cluster.close()
        ids |= {r.job_id for r in cluster.jobs.values() if r.job_id}
    wait_until(lambda: not ids & squeue_ids(), timeout=60, message="jobs to leave squeue")


def test_slurm_burst_scales_to_maximum_jobs_and_back_to_zero(slurm_cluster, tmp_path: Path) -> None:
    cluster = slurm_cluster()
    adaptive = cluster.adapt(minimum_jobs=0, maximum_jobs=2, **FAST)
    log = tmp_path / "executions"
    with Sampler(cluster) as sampler, Client(cluster) as client:
        futures = [client.submit(record, str(log), i, 0.5) for i in range(20)]
        results = [f.result(timeout=120) for f in futures]
        wait_until(lambda: back_to_zero(cluster), timeout=60, message=describe(cluster, adaptive))
    assert total(results) == sum(i * i for i in range(20))
    assert executions(log) == Counter(range(20))
    assert max(sampler.live_jobs) == 2
    assert len(cluster.jobs) == 2
    ids = {r.job_id for r in cluster.jobs.values()}
    wait_until(lambda: not ids & squeue_ids(), timeout=30, message="the jobs to leave squeue")
    assert {r.state for r in cluster.jobs.values()} <= {JobState.COMPLETED, JobState.CANCELLED}
    assert adaptive.error is None


def sge_ids() -> set[str]:
    out = subprocess.run(["qstat", "-u", "*"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines()[2:] if line.strip()}


@pytest.fixture
def sge_cluster(sge, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """A factory of SGEClusters; at teardown each is closed and its jobs leave qstat."""
    from jobqueue_ms.batch.sge import SGECluster

    made: list[Cluster] = []

    def make(**extra: Any) -> Cluster:
        options = {
            "cores": 1,
            "memory": "2GiB",  # h_vmem: SGE limits the job's virtual memory to it
            "walltime": "00:10:00",
            "queue": sge.queue,
            "pe": sge.parallel_environment,
            "python": sys.executable,
            "log_directory": str(tmp_path),
            "poll_interval": 0.5,
            # SGE jobs do not inherit this environment
            "job_script_prologue": [f"export {k}={v}" for k, v in HEARTBEAT.items()],
            "config": Config(),
        }
        cluster = SGECluster(**{**options, **extra})
        made.append(cluster)
        return cluster

    yield make
    ids: set[str] = set()
    for cluster in made:
        cluster.close()
        ids |= {r.job_id for r in cluster.jobs.values() if r.job_id}
    wait_until(lambda: not ids & sge_ids(), timeout=60, message="jobs to leave qstat")


def test_sge_burst_scales_to_maximum_jobs_and_back_to_zero(sge_cluster, tmp_path: Path) -> None:
    """The real SGE has a slot per core (2 here): at most two one-slot jobs."""
    cluster = sge_cluster()
    adaptive = cluster.adapt(minimum_jobs=0, maximum_jobs=2, **FAST)
    log = tmp_path / "executions"
    with Sampler(cluster) as sampler, Client(cluster) as client:
        futures = [client.submit(record, str(log), i, 0.5) for i in range(20)]
        results = [f.result(timeout=120) for f in futures]
        wait_until(lambda: back_to_zero(cluster), timeout=60, message=describe(cluster, adaptive))
    assert total(results) == sum(i * i for i in range(20))
    assert executions(log) == Counter(range(20))
    assert max(sampler.live_jobs) == 2
    assert len(cluster.jobs) == 2
    ids = {r.job_id for r in cluster.jobs.values()}
    wait_until(lambda: not ids & sge_ids(), timeout=30, message="the jobs to leave qstat")
    assert {r.state for r in cluster.jobs.values()} <= {JobState.COMPLETED, JobState.CANCELLED}
    assert adaptive.error is None


def test_two_schedulers_the_snapshot_sums_both(local, tmp_path: Path) -> None:
    cluster = local(n_schedulers=2)
    log = tmp_path / "executions"

    def per_scheduler() -> list[int]:
        return [
            sum(info["tasks"][k] for k in ("ready", "waiting", "running"))
            for info in cluster.scheduler_info(max_age=0)
        ]

    with Client(cluster) as client:
        futures = [client.submit(record, str(log), i, 0.3) for i in range(60)]
        wait_until(lambda: sum(per_scheduler()) == 60, timeout=30, message=per_scheduler)
        counts = per_scheduler()
        assert len(counts) == 2 and all(counts), counts  # the client spread the work
        assert cluster.snapshot().tasks == 60  # the policy sees both schedulers' work
        adaptive = cluster.adapt(minimum=0, maximum=4, **FAST)
        with Sampler(cluster) as sampler:
            wait_until(lambda: len(cluster.workers) == 4, timeout=30, message=describe(cluster))

            # cluster.workers is the union: a new worker may not have reached both schedulers yet
            def all_see_four() -> list[dict] | None:
                infos = cluster.scheduler_info(max_age=0)
                return infos if all(len(info["workers"]) == 4 for info in infos) else None

            infos = wait_until(all_see_four, timeout=30, message=describe(cluster))
            snapshot = cluster.snapshot()
            # Every worker serves both schedulers, and is counted once.
            assert len(snapshot.workers) == 4
            assert all(len(info["workers"]) == 4 for info in infos)
            results = [f.result(timeout=60) for f in futures]
            wait_until(
                lambda: back_to_zero(cluster), timeout=30, message=describe(cluster, adaptive)
            )
    assert total(results) == sum(i * i for i in range(60))
    assert executions(log) == Counter(range(60))
    assert max(sampler.live_jobs) == 4 and len(cluster.jobs) == 4
    assert adaptive.error is None


# ------------------------------------------------------------------- 3: shrinking loses nothing


def test_scale_down_under_steady_load_loses_and_repeats_nothing(local, tmp_path: Path) -> None:
    cluster = local()
    adaptive = cluster.adapt(minimum=0, maximum=4, **FAST)
    log = tmp_path / "executions"
    with Client(cluster) as client:
        # A burst brings four jobs; its results (200 kB each) stay on the workers that made them.
        burst = [client.submit(record, str(log), i, 0.2, 200_000) for i in range(40)]
        wait_until(lambda: all(f.done() for f in burst), timeout=60)
        assert len(cluster.jobs) == 4
        # Then a steady trickle: one short task every 0.15 s, while idle jobs are retired.
        steady = []
        i = 1000
        deadline = time.monotonic() + 60
        while adaptive.retired < 2 and time.monotonic() < deadline:
            steady.append(client.submit(record, str(log), i, 0.1))
            i += 1
            time.sleep(0.15)  # pacing the load, not synchronising
        assert adaptive.retired >= 2, describe(cluster, adaptive)()
        for _ in range(10):  # a little more load after the shrink
            steady.append(client.submit(record, str(log), i, 0.1))
            i += 1
        # The burst's results held by retired workers were handed off, not recomputed.
        combined = client.submit(total, burst).result(timeout=60)
        steady_results = [f.result(timeout=60) for f in steady]
    assert combined == sum(i * i for i in range(40))
    assert [v for v, _ in steady_results] == [j * j for j in range(1000, i)]
    assert executions(log) == Counter([*range(40), *range(1000, i)])  # each exactly once
    retired = [r for r in cluster.jobs.values() if r.state.finished]
    assert retired and {r.state for r in retired} == {JobState.COMPLETED}


# ------------------------------------------------------------------------------ 4: walltime


def test_workers_retired_together_hand_their_results_to_the_others(local, tmp_path: Path) -> None:
    """Two workers retired at once must not hand results to each other (then both leave)."""
    cluster = local()
    cluster.scale(4)
    cluster.wait_for_workers(4)
    log = tmp_path / "executions"
    with Client(cluster) as client:
        for round_ in range(3):
            base = 100 * round_
            held = [client.submit(record, str(log), base + i, 0.05, 200_000) for i in range(24)]
            wait_until(lambda: all(f.done() for f in held), timeout=60)  # noqa: B023
            keep = sorted(cluster.workers)[:2]
            leaving = [w for w in sorted(cluster.workers) if w not in keep]
            cluster.scale_down(leaving)
            wait_until(lambda: sorted(cluster.workers) == keep, timeout=60)  # noqa: B023
            assert client.submit(total, held).result(timeout=60) == sum(
                (base + i) ** 2 for i in range(24)
            )
            cluster.scale(4)
            cluster.wait_for_workers(4)
    counts = executions(log)
    assert [k for k, n in counts.items() if n != 1] == [], counts  # handed off, not recomputed


def test_lifetime_drains_and_is_replaced_ahead_without_a_failed_task(local, tmp_path: Path) -> None:
    cluster = local(lifetime="30s", lifetime_stagger="8s")
    # The default lead time (at least 60 s, at most half a job's life) would replace 30 s jobs
    # from mid-life on, replacements included; 8 s keeps this run to one round of replacements.
    policy = LoadPolicy(minimum_jobs=2, maximum_jobs=4, target_duration_s=1, replace_before_s=8)
    adaptive = cluster.adapt(policy=policy, interval="200ms")
    wait_until(lambda: len(cluster.workers) == 2, timeout=30, message=describe(cluster, adaptive))
    first = sorted(cluster.jobs.values(), key=lambda r: r.submitted_at)
    assert len(first) == 2
    ends = {j.name: j.walltime_end for j in cluster.snapshot().jobs}
    assert all(ends[r.name] for r in first)
    assert abs(ends[first[0].name] - ends[first[1].name]) > 1.5  # started together, staggered

    log = tmp_path / "executions"
    with Sampler(cluster) as sampler, Client(cluster) as client:
        futures = []
        i = 0
        while not all(r.state.finished for r in first):
            assert i < 400, describe(cluster, adaptive)()  # 60 s: the lifetime is 30 s
            futures.append(client.submit(record, str(log), i, 0.3))
            i += 1
            time.sleep(0.15)  # a steady load through the expiry (pacing, not synchronising)
        results = [f.result(timeout=60) for f in futures]  # raises if any task failed
    assert [v for v, _ in results] == [j * j for j in range(i)]
    assert executions(log) == Counter(range(i))  # nothing lost, nothing run twice

    assert [r.state for r in first] == [JobState.TIMEOUT, JobState.TIMEOUT]  # normal expiry
    assert all(r.error is None for r in first)
    assert abs(first[0].ended_at - first[1].ended_at) > 1.0  # they left at different times
    replacements = [r for r in cluster.jobs.values() if r not in first]
    assert len(replacements) == 2
    # Submitted ahead of time: connected before the first of the old jobs began to drain, so the
    # cluster always had at least the minimum of two workers taking work.
    first_drain = min(ends.values())
    assert all(r.started_at is not None and r.started_at < first_drain for r in replacements)
    assert min(sampler.serving[10:]) >= 2
    assert max(sampler.live_jobs) <= 4
    assert adaptive.error is None and cluster.start_failures == 0


def test_slurm_walltime_drains_and_is_replaced_ahead(slurm_cluster, tmp_path: Path) -> None:
    # A 30 s walltime: the template starts workers with --lifetime 27s (walltime less a tenth);
    # the cluster drains the job a little earlier (its stagger) and replaces it ahead of time.
    cluster = slurm_cluster(walltime="00:00:30")
    policy = LoadPolicy(minimum_jobs=1, maximum_jobs=2, target_duration_s=1, replace_before_s=8)
    adaptive = cluster.adapt(policy=policy, interval="200ms")
    wait_until(lambda: len(cluster.workers) == 1, timeout=60, message=describe(cluster, adaptive))
    (first,) = cluster.jobs.values()
    log = tmp_path / "executions"
    with Client(cluster) as client:
        futures = []
        i = 0
        while not first.state.finished:
            assert i < 400, describe(cluster, adaptive)()  # 60 s: the walltime is 30 s
            futures.append(client.submit(record, str(log), i, 0.3))
            i += 1
            time.sleep(0.15)  # a steady load through the expiry (pacing, not synchronising)
        results = [f.result(timeout=60) for f in futures]
    assert [v for v, _ in results] == [j * j for j in range(i)]
    assert executions(log) == Counter(range(i))
    assert first.state == JobState.TIMEOUT and first.error is None
    replacement = next(r for r in cluster.jobs.values() if r is not first)
    assert replacement.workers_seen and replacement.started_at < first.ended_at
    assert adaptive.error is None


def test_slurm_jobs_started_together_drain_at_staggered_times(slurm_cluster) -> None:
    # Workers live 27 s (a 30 s walltime less a tenth); job k drains frac(k * 0.618) of the
    # 10 s stagger earlier: about 6.2 s and 2.4 s before, for the first two jobs.
    cluster = slurm_cluster(walltime="00:00:30", lifetime_stagger="10s")
    cluster.scale(jobs=2)
    cluster.wait_for_workers(2, timeout=60)
    first = sorted(cluster.jobs.values(), key=lambda r: r.name)
    ends = {j.name: j.walltime_end for j in cluster.snapshot().jobs}
    assert abs(ends[first[0].name] - ends[first[1].name]) > 2.5
    wait_until(lambda: all(r.state.finished for r in first), timeout=90, message=describe(cluster))
    assert [r.state for r in first] == [JobState.TIMEOUT, JobState.TIMEOUT]  # normal expiry
    assert all(r.error is None for r in first)
    assert abs(first[0].ended_at - first[1].ended_at) > 2.0  # they left at different times


# --------------------------------------------------------------------------------- 5: churn


def test_alternating_load_gives_a_bounded_number_of_submissions(local, tmp_path: Path) -> None:
    cluster = local()
    adaptive = cluster.adapt(maximum=4, interval="200ms", target_duration="2s", wait_count=3)
    log = tmp_path / "executions"
    with Client(cluster) as client:
        futures = []
        for cycle in range(6):  # a 2.5 s burst for four workers, then a lull, every 4 s
            started = time.monotonic()
            futures += [client.submit(record, str(log), 100 * cycle + k, 0.25) for k in range(40)]
            time.sleep(max(0.0, started + 4 - time.monotonic()))  # pacing the load
        results = [f.result(timeout=60) for f in futures]
        assert adaptive.retired == 0  # the lulls are shorter than the 4 s cool-down
        wait_until(lambda: back_to_zero(cluster), timeout=30, message=describe(cluster, adaptive))
    assert len(results) == 240 and len(executions(log)) == 240
    assert len(cluster.jobs) <= 5  # about one burst's worth; without the cool-down it is one per


# ------------------------------------------------------------------------------ 6: failures


def test_a_killed_job_is_replaced_while_work_remains(local, tmp_path: Path) -> None:
    cluster = local()
    adaptive = cluster.adapt(maximum=2, **FAST)
    log = tmp_path / "executions"
    with Client(cluster) as client:
        futures = [client.submit(record, str(log), i, 0.4) for i in range(30)]
        wait_until(lambda: len(cluster.workers) == 2, timeout=30, message=describe(cluster))
        wait_until(lambda: sum(f.done() for f in futures) >= 4, timeout=30)
        victim = sorted(cluster.jobs.values(), key=lambda r: r.name)[0]
        os.killpg(victim.info["pid"], signal.SIGKILL)  # the whole job, as when a node dies
        results = [f.result(timeout=90) for f in futures]
    assert total(results) == sum(i * i for i in range(30))
    counts = executions(log)
    assert set(counts) == set(range(30))
    assert sum(counts.values()) - 30 <= 1  # at most the task running in the killed job reran
    wait_until(lambda: victim.state.finished, timeout=10)
    assert victim.state == JobState.FAILED and victim.workers_seen  # died, did not fail to start
    assert len(cluster.jobs) == 3  # replaced once
    assert adaptive.error is None


def test_a_scancelled_slurm_job_is_replaced_while_work_remains(
    slurm_cluster, tmp_path: Path
) -> None:
    cluster = slurm_cluster()
    adaptive = cluster.adapt(maximum_jobs=2, **FAST)
    log = tmp_path / "executions"
    with Client(cluster) as client:
        futures = [client.submit(record, str(log), i, 0.5) for i in range(30)]
        wait_until(lambda: len(cluster.workers) == 2, timeout=60, message=describe(cluster))
        victim = sorted(cluster.jobs.values(), key=lambda r: r.name)[0]
        subprocess.run(["scancel", victim.job_id], check=True, capture_output=True)
        results = [f.result(timeout=120) for f in futures]
    assert total(results) == sum(i * i for i in range(30))
    assert set(executions(log)) == set(range(30))
    wait_until(lambda: victim.state.finished, timeout=30, message=describe(cluster))
    assert victim.state == JobState.CANCELLED and victim.workers_seen
    assert len(cluster.jobs) == 3  # replaced once
    assert adaptive.error is None


class BrokenStartCluster(LocalCluster):
    """Each job prints an error and exits 3 before a worker can start (a broken prologue)."""

    def _worker_command(self, record: JobRecord, index: int = 0) -> list[str]:
        code = "import sys; print('prologue broke: no module named site_env', file=sys.stderr)"
        return [self.python, "-c", f"{code}; sys.exit(3)"]


def test_repeated_start_failures_stop_adaptive_with_a_clear_error() -> None:
    with BrokenStartCluster(n_workers=0) as cluster, Client(cluster) as client:
        adaptive = cluster.adapt(maximum=2, **FAST)
        work = client.submit(sum, [1, 2])  # so that the policy wants a job
        wait_until(lambda: adaptive.error is not None, timeout=30, message=describe(cluster))
        work.cancel()  # no worker will ever run it
        assert not adaptive.running
        message = str(adaptive.error)
        assert "3 jobs in a row failed before any worker connected" in message
        assert "prologue broke: no module named site_env" in message  # the last job's log
        assert isinstance(adaptive.error, AdaptiveError)
        with pytest.raises(AdaptiveError):
            adaptive.raise_for_error()
        assert len(cluster.jobs) == 3  # one at a time, and no fourth
        assert all(
            r.state == JobState.FAILED and r.info["failed_at_start"] for r in cluster.jobs.values()
        )
        with pytest.raises(ClusterError, match="failed before any worker connected"):
            cluster.scale(jobs=1)


@pytest.mark.parametrize("limit", [2, 5])
def test_the_adapt_limit_on_start_failures_is_the_one_that_governs(limit: int) -> None:
    """adapt(max_start_failures=5) stops after 5, not at the cluster's own default of 3."""
    with BrokenStartCluster(n_workers=0) as cluster, Client(cluster) as client:
        adaptive = cluster.adapt(maximum=2, max_start_failures=limit, **FAST)
        work = client.submit(sum, [1, 2])
        wait_until(lambda: adaptive.error is not None, timeout=60, message=describe(cluster))
        work.cancel()
        assert not adaptive.running
        assert f"{limit} jobs in a row failed before any worker connected" in str(adaptive.error)
        assert f"max_start_failures={limit}" in str(adaptive.error)
        assert len(cluster.jobs) == limit
        assert cluster.error is not None and f"{limit} jobs in a row" in cluster.error


def test_repeated_slurm_start_failures_stop_adaptive_with_the_job_log(slurm_cluster) -> None:
    cluster = slurm_cluster(job_script_prologue=["echo 'prologue broke: bad module' >&2", "exit 3"])
    adaptive = cluster.adapt(maximum_jobs=2, **FAST)
    with Client(cluster) as client:
        work = client.submit(sum, [1, 2])
        wait_until(lambda: adaptive.error is not None, timeout=90, message=describe(cluster))
        work.cancel()
    assert "prologue broke: bad module" in str(adaptive.error)
    assert len(cluster.jobs) == 3
    assert {r.state for r in cluster.jobs.values()} == {JobState.FAILED}


def test_a_job_the_queue_rejects_stops_adaptive_with_the_queue_s_message(
    slurm, slurm_cluster
) -> None:
    """sbatch refuses --mem above what a node has: three refusals in a row stop adaptive."""
    cluster = slurm_cluster(memory=f"{slurm.memory_mb_per_node + 1000}MiB")
    adaptive = cluster.adapt(maximum_jobs=2, **FAST)
    with Client(cluster) as client:
        work = client.submit(sum, [1, 2])
        wait_until(lambda: adaptive.error is not None, timeout=60, message=describe(cluster))
        work.cancel()
    assert not adaptive.running
    message = str(adaptive.error)
    assert "3 jobs in a row failed before any worker connected" in message
    assert "Memory specification can not be satisfied" in message  # sbatch's own words
    assert len(cluster.jobs) == 3 and adaptive.failed_steps <= 3
    assert all(r.state == JobState.FAILED and not r.job_id for r in cluster.jobs.values())


# ------------------------------------------------------------------------- the Cluster base


def test_manual_scale_stops_adaptive(local) -> None:
    cluster = local()
    adaptive = cluster.adapt(minimum_jobs=2, **FAST)
    wait_until(lambda: len(cluster.workers) == 2, timeout=30, message=describe(cluster))
    cluster.scale(jobs=1)  # the user takes over, as in dask
    assert not adaptive.running
    wait_until(lambda: len(live_jobs(cluster)) == 1, timeout=30, message=describe(cluster))
    assert len(cluster.jobs) == 2  # the minimum of two is not restored

    again = cluster.adapt(minimum_jobs=2, **FAST)
    wait_until(lambda: len(live_jobs(cluster)) == 2, timeout=30)
    cluster.scale_down([live_jobs(cluster)[0].name])
    assert not again.running
    wait_until(lambda: len(live_jobs(cluster)) == 1, timeout=30, message=describe(cluster))


class SlowQueueCluster(LocalCluster):
    """A queue whose status command hangs until released."""

    def __init__(self, **kwargs: Any) -> None:
        self.polling = threading.Event()
        self.release = threading.Event()
        super().__init__(n_workers=0, **kwargs)

    def _poll(self, records: list[JobRecord]) -> dict[str, JobState]:
        self.polling.set()
        self.release.wait(30)
        return super()._poll(records)


def test_a_slow_queue_does_not_hold_the_cluster_lock() -> None:
    with SlowQueueCluster() as cluster:
        cluster.scale(jobs=1)
        assert cluster.polling.wait(10)
        started = time.monotonic()
        cluster.scale(jobs=2)  # submits while a poll hangs
        snapshot = cluster.snapshot()
        assert time.monotonic() - started < 5
        assert len([j for j in snapshot.jobs if j.live]) == 2
        cluster.release.set()
        cluster.wait_for_workers(2, timeout=30)


class FailingSchedulers(LocalCluster):
    def _start_schedulers(self) -> list[str]:
        raise OSError("port 8786 is taken")

    def _cleanup(self) -> None:
        raise RuntimeError("cleanup broke too")


def test_close_after_a_failed_start_lets_the_original_error_through() -> None:
    with pytest.raises(OSError, match="port 8786 is taken"):
        FailingSchedulers(n_workers=0)


class LaggingQueueCluster(LocalCluster):
    """A queue polled a while ago: a job whose process runs is still reported PENDING."""

    def _poll(self, records: list[JobRecord]) -> dict[str, JobState]:
        states = super()._poll(records)
        return {k: JobState.PENDING if v == JobState.RUNNING else v for k, v in states.items()}


def test_a_job_whose_workers_registered_runs_and_is_retired_gracefully(tmp_path: Path) -> None:
    """Not cancelled as a queued job because the last poll still said PENDING."""
    log = tmp_path / "executions"
    with LaggingQueueCluster(n_workers=0) as cluster, Client(cluster) as client:
        cluster.scale(jobs=1)
        wait_until(lambda: len(cluster.workers) == 1, timeout=30, message=describe(cluster))
        (job,) = cluster.snapshot().jobs
        (rec,) = cluster.jobs.values()
        assert job.state == "RUNNING" and rec.state == JobState.RUNNING
        assert rec.started_at is not None
        future = client.submit(record, str(log), 7, 1.5)
        wait_until(lambda: cluster.snapshot().tasks_running == 1, timeout=30)
        cluster.scale_down([rec.name])  # what the policy calls to retire the job
        assert future.result(timeout=30) == (49, b"")
        wait_until(lambda: rec.state.finished, timeout=30, message=describe(cluster))
        assert rec.state == JobState.COMPLETED and not rec.cancel_requested
    assert executions(log) == Counter([7])  # run once, not killed and rerun


def test_retiring_one_worker_keeps_its_job_and_the_last_one_ends_it(
    lsf_standin, tmp_path: Path
) -> None:
    """On the LSF stand-in (it runs the jobs as local processes), with two workers per job."""
    from jobqueue_ms.batch.lsf import LSFCluster

    cluster = LSFCluster(
        cores=2,
        processes=2,
        memory="1GiB",
        walltime="00:10",
        python=sys.executable,
        log_directory=str(tmp_path),
        poll_interval=0.5,
        config=Config(),
    )
    try:
        cluster.scale(jobs=1)
        cluster.wait_for_workers(2, timeout=60)
        (job,) = cluster.jobs.values()
        cluster.scale_down([f"{job.name}-1"])  # one worker: the job goes on with the other
        wait_until(
            lambda: sorted(cluster.workers) == [f"{job.name}-0"],
            timeout=30,
            message=describe(cluster),
        )
        assert job.state == JobState.RUNNING and job.retiring_since is None
        with Client(cluster) as client:
            assert client.submit(pow, 3, 2).result(timeout=30) == 9  # served by the one left
        assert len(cluster.jobs) == 1  # nothing replaced it, nothing else was submitted
        cluster.scale_down([f"{job.name}-0"])  # the last worker: the job ends, normally
        wait_until(lambda: job.state.finished, timeout=30, message=describe(cluster))
        assert job.state == JobState.COMPLETED and not job.cancel_requested
        assert not cluster.workers
    finally:
        cluster.close()
