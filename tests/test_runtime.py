"""The runtime on real processes over loopback: results, errors, failures, multi-scheduler rules."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import psutil
import pytest
from helpers import wait_until

from jobqueue_ms import Client, KilledWorkerError, LocalCluster, VersionMismatchError
from jobqueue_ms.runtime import client as client_module
from jobqueue_ms.runtime import protocol
from jobqueue_ms.runtime.scheduler import Scheduler
from jobqueue_ms.runtime.security import Security

# workers cannot import this test module: ship its functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def _fast_heartbeats() -> Iterator[None]:
    """Notice dead processes within ~3 s instead of the default 10 s."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JOBQUEUE_MS_HEARTBEAT_TIMEOUT", "3")
    mp.setenv("JOBQUEUE_MS_HEARTBEAT_INTERVAL", "0.25")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(n_schedulers=2, n_workers=2, threads_per_worker=2) as c:
        c.wait_for_workers(2, timeout=30)
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster) as c:
        yield c


def inc(x: int) -> int:
    return x + 1


def add(a: int, b: int) -> int:
    return a + b


def slow_identity(x: int, delay: float = 0.05) -> int:
    time.sleep(delay)
    return x


def record_and_return(path: str, x: int, delay: float = 0.0) -> int:
    """Append the task's id to a file so the test can count executions."""
    if delay:
        time.sleep(delay)
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x * 2


# --------------------------------------------------------------------- results
def test_submit_map_bulk_and_executor_semantics(client: Client) -> None:
    assert client.submit(pow, 2, 10).result(timeout=30) == 1024
    assert client.submit(inc, x=41).result(timeout=30) == 42
    assert list(client.map(inc, range(100))) == list(range(1, 101))
    assert list(client.map(add, range(50), range(50), chunksize=7)) == [2 * i for i in range(50)]
    futures = client.submit_many(inc, range(5000))
    assert all(isinstance(f, cf.Future) for f in futures)
    assert client.gather(futures) == list(range(1, 5001))
    done, not_done = cf.wait(futures, timeout=30)
    assert len(done) == 5000 and not not_done
    assert sorted(f.result() for f in cf.as_completed(futures[:100])) == list(range(1, 101))
    seen: list[int] = []
    f = client.submit(inc, 1)
    f.add_done_callback(lambda fut: seen.append(fut.result()))
    wait_until(lambda: seen == [2], timeout=30)


def test_a_sequential_caller_costs_the_scheduler_two_messages_per_task() -> None:
    """submit -> result in a loop: the SUBMIT and the DONE, nothing else per task.

    A task that finishes before the worker reports it started is reported once (its DONE), and
    the client releases dropped futures in batches; both used to be a message per task.
    """
    n = 300
    with LocalCluster(n_schedulers=1, n_workers=1) as cluster, Client(cluster) as client:
        cluster.wait_for_workers(1, timeout=30)
        assert client.submit(inc, 0).result(timeout=30) == 1  # the function is known now
        before = client.scheduler_info()[0]["counters"]["messages"]
        t0 = time.monotonic()
        assert [client.submit(inc, i).result(timeout=30) for i in range(n)] == [
            i + 1 for i in range(n)
        ]
        elapsed = time.monotonic() - t0
        messages = client.scheduler_info()[0]["counters"]["messages"] - before
        # on top: one RELEASE per batching period, heartbeats (client and worker, every 0.25 s
        # here) and the info request
        releases = elapsed / (client_module._RELEASE_EVERY_MS / 1000) + 1
        heartbeats = 2 * (elapsed / 0.25 + 1)
        assert messages <= 2 * n + releases + heartbeats + 1, (messages, elapsed)
        assert messages < 2.5 * n  # it was 4 per task
        # and the batched releases do arrive: the scheduler forgets every task
        wait_until(lambda: client.scheduler_info()[0]["tasks_total"] == 0, timeout=10)


def nap(path: str, tag: str, delay: float) -> str:
    """Sleep; a run with a delay notes its start and end in the file."""
    if delay:
        with open(path, "a") as f:
            f.write(f"start {tag} {time.time()}\n")
        time.sleep(delay)
        with open(path, "a") as f:
            f.write(f"end {tag} {time.time()}\n")
    return tag


def now() -> float:
    return time.time()


@pytest.mark.parametrize("nthreads", [1, 2])
def test_tiny_tasks_run_inline_and_a_long_one_there_does_not_stall_the_worker(
    nthreads: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sequential caller's tiny tasks skip the executor hand-off; one that runs long anyway
    (longer than the heartbeat timeout) is taken off the I/O loop: the worker stays registered,
    the task runs once, never more than nthreads tasks run, and the function is not inlined again.
    """
    # generous, so a loaded machine does not make the warm-up runs count as slow
    monkeypatch.setenv("JOBQUEUE_MS_INLINE_MAX_S", "0.05")
    path = str(tmp_path / "runs")
    with LocalCluster(n_schedulers=1, n_workers=1, threads_per_worker=nthreads) as cluster:
        cluster.wait_for_workers(1, timeout=30)
        with Client(cluster) as client:

            def status() -> dict:
                return client.scheduler_info()[0]["workers"][0]

            def executed() -> int:
                return sum(status()["executed"].values())

            for _ in range(3 + 5):  # three to be known as fast, then five inline
                assert client.submit(nap, path, "tiny", 0).result(timeout=30) == "tiny"
            wait_until(lambda: status()["inline"]["runs"] == 5, timeout=10)
            worker_pid = status()["pid"]

            long = client.submit(nap, path, "long", 3.5)  # the heartbeat timeout here is 3 s
            wait_until(lambda: os.path.exists(path), timeout=10)
            other = client.submit(now)
            if nthreads == 2:  # the free thread runs it while the long task holds the other
                other.result(timeout=3)
                assert not long.done()
            assert long.result(timeout=30) == "long"
            lines = Path(path).read_text().split()
            assert lines[0::3] == ["start", "end"]  # it ran once: the worker was never dropped
            if nthreads == 1:  # the only thread was taken: it waited
                assert other.result(timeout=30) >= float(lines[5])
            wait_until(lambda: status()["inline"]["relieved"] == 1, timeout=10)
            assert status()["pid"] == worker_pid
            assert 0 < status()["peak_running"] <= nthreads

            assert client.submit(nap, path, "tiny", 0).result(timeout=30) == "tiny"
            wait_until(lambda: executed() == 8 + 3, timeout=10)  # reported with heartbeats
            assert status()["inline"]["runs"] == 6  # the long run was the sixth; none since


def test_map_timeout_raises_and_cancels_what_is_left(client: Client) -> None:
    it = client.map(slow_identity, [1, 2], [5.0, 5.0], timeout=0.2)
    with pytest.raises(cf.TimeoutError):
        list(it)
    # as Executor.map: the future that timed out is cancelled too, so nothing stays pending
    assert client.futures_pending == 0


def test_dependencies_move_between_workers_not_through_client(client: Client) -> None:
    a = client.submit(inc, 1)
    b = client.submit(inc, 10)
    c = client.submit(add, a, b)
    assert c.result(timeout=30) == 13
    # a large intermediate (stored on the worker) consumed by a dependent task
    big = client.submit(bytes, 2_000_000)
    size = client.submit(len, big)
    assert size.result(timeout=30) == 2_000_000
    # nested structures of futures
    parts = client.submit_many(inc, range(10))
    assert client.submit(sum, parts).result(timeout=30) == sum(range(1, 11))
    # a chain
    x = client.submit(inc, 0)
    for _ in range(100):
        x = client.submit(inc, x)
    assert x.result(timeout=60) == 101


def test_scatter_passes_data_by_reference(client: Client) -> None:
    data = client.scatter(list(range(1000)))
    assert isinstance(data, list) and len(data) == 1000
    one = client.scatter({"k": 5})
    assert client.submit(inc, one["k"]).result(timeout=30) == 6
    payload = client.scatter(b"y" * 100_000)
    assert client.submit(len, payload).result(timeout=30) == 100_000
    assert payload.result(timeout=30) == b"y" * 100_000


def test_large_results_fetched_directly_and_intact(client: Client) -> None:
    np = pytest.importorskip("numpy")
    arr = client.submit(np.arange, 2_000_000)
    out = arr.result(timeout=30)
    assert out.shape == (2_000_000,) and int(out[-1]) == 1_999_999
    blobs = client.gather([client.submit(bytes, 1_000_000) for _ in range(5)])
    assert [len(b) for b in blobs] == [1_000_000] * 5


def test_a_client_asking_only_for_info_is_not_dropped_as_silent(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Every request refreshes the client's send clock, so no heartbeat goes while it polls
    ``scheduler_info``; the schedulers must count the requests as signs of life."""
    end = time.monotonic() + 4.5  # past the 3 s heartbeat timeout of this module
    polls = 0
    while time.monotonic() < end:
        assert len(client.scheduler_info()) == 2
        polls += 1
    assert polls > 20
    assert client.submit(inc, 1).result(timeout=30) == 2
    assert not [r for r in caplog.records if "lost" in r.getMessage()], caplog.text


def test_remote_exception_keeps_type_and_remote_traceback(client: Client) -> None:
    def fail(x: int) -> None:
        raise KeyError(f"missing {x}")

    f = client.submit(fail, 7)
    with pytest.raises(KeyError, match="missing 7") as info:
        f.result(timeout=30)
    cause = info.value.__cause__
    assert cause is not None and "Traceback on worker" in str(cause)
    assert "fail" in str(cause) and "KeyError" in str(cause)
    dependent = client.submit(inc, f)
    with pytest.raises(Exception, match="failed or was cancelled"):
        dependent.result(timeout=30)


def test_cancel_pending_tasks(client: Client) -> None:
    blockers = [client.submit(slow_identity, i, 0.5) for i in range(8)]
    victim = client.submit(inc, 1)
    assert victim.cancel()
    assert victim.cancelled()
    with pytest.raises(cf.CancelledError):
        victim.result()
    assert client.gather(blockers) == list(range(8))


def test_cancelled_tasks_queued_on_a_worker_do_not_run(tmp_path: Path) -> None:
    """Tasks a worker prefetched and has not started are dropped there when cancelled."""
    log = tmp_path / "ran"
    with LocalCluster(n_schedulers=1, n_workers=1) as cluster, Client(cluster) as client:
        cluster.wait_for_workers(1)
        # tiny tasks first: the worker's prefetch grows to hundreds of slots
        client.gather(client.submit_many(inc, range(2000)))
        futures = client.submit_many(record_and_return, [(str(log), i, 0.05) for i in range(400)])
        wait_until(log.exists, timeout=30)
        for f in futures:
            f.cancel()
        del futures  # the finished ones are released too
        assert client.submit(inc, 1).result(timeout=30) == 2  # ran after the drop, in order

        def forgotten() -> bool:
            return cluster.scheduler_info(max_age=0)[0]["tasks_total"] == 0

        wait_until(forgotten, timeout=30)
        ran = len(log.read_text().split())
    # what had started when the cancel arrived, not the 400 (nor the ~200 prefetched)
    assert ran < 50, f"{ran} of 400 cancelled tasks ran"


def test_slots_parked_at_a_scheduler_whose_work_vanished_are_reclaimed(tmp_path: Path) -> None:
    """A worker keeps its slots where the work is, even when work vanishes without dispatch.

    A client of scheduler B dies with B's queue full; B drops its tasks. The worker, which had
    leased its slots to B for them, must learn that B has nothing left and lease them to A
    (it used to keep them parked at B forever, and A's tasks never ran).
    """
    script = tmp_path / "c.py"
    script.write_text(
        "import sys, time\nfrom jobqueue_ms import Client\n"
        "c = Client(sys.argv[1])\n"
        "fs = c.submit_many(time.sleep, [(0.05,)] * 2000)\n"
        "print('submitted', flush=True)\n"
        "time.sleep(600)\n"
    )
    with LocalCluster(n_schedulers=2, n_workers=1, threads_per_worker=2) as cluster:
        cluster.wait_for_workers(1)
        a, b = cluster.scheduler_addresses

        def tasks_on_b() -> int:
            info = [i for i in cluster.scheduler_info(max_age=0) if i["address"] == b]
            return int(info[0]["tasks_total"])

        env = {**os.environ, "JOBQUEUE_MS_KEYFILE": str(cluster.security.path)}
        proc = subprocess.Popen(
            [sys.executable, str(script), b], stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "submitted"
            wait_until(lambda: tasks_on_b() > 100, timeout=30)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
        wait_until(lambda: tasks_on_b() == 0, timeout=30, message="B dropping its dead client")
        with Client(a) as ca:
            assert ca.gather(ca.submit_many(inc, range(600)), errors="raise") == list(range(1, 601))


def test_retries_rerun_a_failing_task(client: Client, tmp_path: Path) -> None:
    marker = tmp_path / "attempts"

    def flaky(path: str) -> str:
        with open(path, "a") as f:
            f.write("x")
        if os.path.getsize(path) < 3:
            raise RuntimeError("not yet")
        return "ok"

    assert client.options(retries=3).submit(flaky, str(marker)).result(timeout=30) == "ok"
    assert marker.read_text() == "xxx"
    marker.unlink()
    with pytest.raises(RuntimeError, match="not yet"):
        client.options(retries=1).submit(flaky, str(marker)).result(timeout=30)


def test_priority_orders_queued_work() -> None:
    with LocalCluster(n_schedulers=1, n_workers=0) as cluster, Client(cluster) as client:
        low = client.options(priority=0).submit_many(time.time, [()] * 20)
        high = client.options(priority=10).submit_many(time.time, [()] * 20)
        cluster.scale(1)
        lows, highs = client.gather(low), client.gather(high)
        assert max(highs) <= min(lows)


def test_resources_limit_concurrency_across_schedulers() -> None:
    def busy(path: str) -> int:
        with open(path, "a") as f:
            f.write(f"start {time.time()}\n")
        time.sleep(0.2)
        with open(path, "a") as f:
            f.write(f"end {time.time()}\n")
        return 1

    with LocalCluster(
        n_schedulers=2, n_workers=1, threads_per_worker=4, resources={"GPU": 1}
    ) as cluster:
        cluster.wait_for_workers(1)
        log_path = os.path.join(cluster.cluster_dir, "gpu.log")
        with Client(cluster) as client:
            futures = client.options(resources={"GPU": 1}).submit_many(busy, [log_path] * 6)
            assert client.gather(futures) == [1] * 6
        with open(log_path) as f:
            events = sorted((float(t), kind) for kind, t in (line.split() for line in f))
        running = peak = 0
        for _, kind in events:
            running += 1 if kind == "start" else -1
            peak = max(peak, running)
        assert peak == 1


# --------------------------------------------------------------------- multi-scheduler rules
def test_peak_concurrency_never_exceeds_slots_with_two_schedulers() -> None:
    with LocalCluster(n_schedulers=2, n_workers=2, threads_per_worker=2) as cluster:
        cluster.wait_for_workers(2)
        clients = [Client(a) for a in cluster.scheduler_addresses]
        try:
            futures = [f for c in clients for f in c.submit_many(slow_identity, range(60))]
            assert sorted(f.result(timeout=60) for f in futures) == sorted(list(range(60)) * 2)

            def peaks() -> dict[str, int]:  # reported with heartbeats: poll until both came
                return {
                    w["name"]: w["peak_running"] for w in clients[0].scheduler_info()[0]["workers"]
                }

            wait_until(lambda: len(peaks()) == 2 and all(peaks().values()), timeout=30)
            assert all(0 < n <= 2 for n in peaks().values()), peaks()
            executed = {}
            for info in clients[0].scheduler_info():
                for w in info["workers"]:
                    for sid, n in w["executed"].items():
                        executed[sid] = executed.get(sid, 0) + n
            assert len(executed) == 2  # the same workers served both schedulers
        finally:
            for c in clients:
                c.shutdown()


def test_fairness_between_two_saturated_schedulers() -> None:
    """Two schedulers, each with far more work than the pool: equal shares of worker time."""
    with LocalCluster(n_schedulers=2, n_workers=2, threads_per_worker=1) as cluster:
        cluster.wait_for_workers(2)
        a, b = (Client(x) for x in cluster.scheduler_addresses)
        try:
            fa = a.submit_many(slow_identity, [(i, 0.01) for i in range(2000)])
            fb = b.submit_many(slow_identity, [(i, 0.01) for i in range(2000)])
            start = time.monotonic()
            wait_until(lambda: time.monotonic() - start > 3, timeout=10, interval=0.1)
            done_a = sum(f.done() for f in fa)
            done_b = sum(f.done() for f in fb)
            assert done_a > 20 and done_b > 20
            assert 0.8 <= done_a / done_b <= 1.25, (done_a, done_b)
        finally:
            a.shutdown(cancel_futures=True)
            b.shutdown(cancel_futures=True)


def test_identical_keys_from_two_clients_never_share_values(cluster: LocalCluster) -> None:
    with Client(cluster) as c1, Client(cluster) as c2:
        f1 = c1.submit(inc, 1)
        f2 = c2.submit(inc, 100)
        assert f1._ckey == f2._ckey  # same client-side key
        assert (f1.result(timeout=30), f2.result(timeout=30)) == (2, 101)
        d1 = c1.submit(inc, f1)
        d2 = c2.submit(inc, f2)
        assert (d1.result(timeout=30), d2.result(timeout=30)) == (3, 102)


# --------------------------------------------------------------------- failures
def _worker_pids(cluster: LocalCluster) -> list[int]:
    return sorted(w["pid"] for w in cluster.workers.values())


def test_sigkill_worker_under_load_loses_nothing(tmp_path: Path) -> None:
    log_path = str(tmp_path / "executions")
    with LocalCluster(n_schedulers=1, n_workers=2, threads_per_worker=2) as cluster:
        cluster.wait_for_workers(2)
        with Client(cluster) as client:
            futures = client.submit_many(
                record_and_return, [(log_path, i, 0.01) for i in range(400)]
            )
            wait_until(lambda: sum(f.done() for f in futures) > 50, timeout=60)
            victim = _worker_pids(cluster)[0]
            os.kill(victim, signal.SIGKILL)
            results = [f.result(timeout=120) for f in futures]
        assert results == [2 * i for i in range(400)]
        counts: dict[int, int] = {}
        with open(log_path) as f:
            for line in f:
                counts[int(line)] = counts.get(int(line), 0) + 1
        assert set(counts) == set(range(400))
        # only tasks running on the killed worker (at most its 2 threads) may have run twice
        assert sum(n - 1 for n in counts.values()) <= 2
        # the nanny restarted the worker
        wait_until(lambda: len(cluster.workers) == 2 and victim not in _worker_pids(cluster), 30)


def test_task_that_kills_its_workers_fails_after_three_attempts() -> None:
    with LocalCluster(n_schedulers=1, n_workers=1) as cluster, Client(cluster) as client:
        cluster.wait_for_workers(1)

        def die() -> None:
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)

        f = client.submit(die)
        with pytest.raises(KilledWorkerError, match="3 workers that died"):
            f.result(timeout=120)
        assert client.submit(inc, 1).result(timeout=60) == 2  # the pool recovered


def test_sigkill_one_of_three_schedulers_under_load() -> None:
    with LocalCluster(n_schedulers=3, n_workers=2, threads_per_worker=2) as cluster:
        cluster.wait_for_workers(2)
        with Client(cluster) as client:
            futures = client.submit_many(slow_identity, [(i, 0.005) for i in range(3000)])
            wait_until(lambda: sum(f.done() for f in futures) > 100, timeout=60)
            victim = cluster._scheduler_procs[0]
            os.kill(victim.pid, signal.SIGKILL)
            assert [f.result(timeout=120) for f in futures] == list(range(3000))
            # the workers keep serving the other two schedulers
            assert client.submit(inc, 1).result(timeout=30) == 2
            infos = client.scheduler_info()
            assert len(infos) == 2 and all(len(i["workers"]) == 2 for i in infos)


def test_restarted_scheduler_is_rejoined_by_workers(tmp_path: Path) -> None:
    sched = Scheduler(port=0)
    address = sched.start()
    port = sched.port
    argv = [sys.executable, "-m", "jobqueue_ms", "worker", "--scheduler", address, "--no-nanny"]
    proc = subprocess.Popen([*argv, *sched.security.argv()], start_new_session=True)
    try:
        wait_until(lambda: len(sched.info()["workers"]) == 1, timeout=30)
        sched.stop()
        again = Scheduler(port=port, security=sched.security)  # the same cluster's keys
        again.start()
        try:
            wait_until(lambda: len(again.info()["workers"]) == 1, timeout=30)
            with Client(address) as client:
                assert client.submit(inc, 1).result(timeout=30) == 2
        finally:
            again.stop()
    finally:
        proc.terminate()
        proc.wait(10)


def test_worker_leaves_when_no_scheduler_is_left(tmp_path: Path) -> None:
    """A batch job's worker must not burn its allocation once its cluster is gone."""
    sched = Scheduler(port=0)
    address = sched.start()
    argv = [sys.executable, "-m", "jobqueue_ms", "worker", "--scheduler", address]
    argv += ["--scheduler-lost-timeout", "2s", *sched.security.argv()]  # with its nanny
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until(lambda: len(sched.info()["workers"]) == 1, timeout=30)
        sched.stop()
        t0 = time.monotonic()
        assert proc.wait(30) == 0  # a clean exit: the nanny does not restart it
        assert time.monotonic() - t0 >= 2
        assert "no scheduler reachable for 2 s; leaving" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
    bad = subprocess.run(
        [*argv[:6], "--scheduler-lost-timeout", "0", *sched.security.argv()],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Error: --scheduler-lost-timeout='0'" in bad.stderr, bad.stderr


def test_vanished_client_tasks_are_released(cluster: LocalCluster, tmp_path: Path) -> None:
    script = tmp_path / "c.py"
    script.write_text(
        "import sys, time\nfrom jobqueue_ms import Client\n"
        "c = Client(sys.argv[1:])\n"
        "fs = c.submit_many(time.sleep, [(0.05,)] * 2000)\n"
        "print('submitted', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), *cluster.scheduler_addresses],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "JOBQUEUE_MS_KEYFILE": str(cluster.security.path)},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "submitted"

        def queued() -> int:
            return sum(i["tasks_total"] for i in cluster.scheduler_info(max_age=0))

        wait_until(lambda: queued() > 100, timeout=30)
        proc.kill()
        wait_until(lambda: queued() == 0, timeout=30, message="tasks of a dead client remain")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def test_client_shutdown_returns_after_its_scheduler_was_killed(tmp_path: Path) -> None:
    """Leaving a client whose scheduler vanished unannounced does not hang (it used to)."""
    sec = Security.generate(str(tmp_path / "keys"), name="c")
    sfile = tmp_path / "s.json"
    argv = [sys.executable, "-m", "jobqueue_ms", "scheduler", "--scheduler-file", str(sfile)]
    proc = subprocess.Popen([*argv, *sec.argv()])
    try:
        wait_until(sfile.exists, timeout=30)
        client = Client(scheduler_file=str(sfile))
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        client.shutdown()
        assert time.monotonic() - t0 < 15
    finally:
        proc.kill()
        proc.wait()


def test_version_mismatch_is_refused_naming_both_versions_and_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sched = Scheduler(port=0)
    address = sched.start()
    try:
        real = protocol.versions()
        monkeypatch.setattr(protocol, "versions", lambda: {**real, "jobqueue_ms": "0.0.0-old"})
        with caplog.at_level("WARNING", logger="jobqueue_ms.scheduler"):
            for _ in range(5):
                with pytest.raises(VersionMismatchError) as info:
                    Client(address, timeout=10)
                text = str(info.value)
                assert "0.0.0-old" in text and real["jobqueue_ms"] in text
        # logged once per kind of peer, counted every time
        refusals = [r for r in caplog.records if "refused client" in r.getMessage()]
        assert len(refusals) == 1
        assert sched.info()["counters"]["refused"] >= 5
    finally:
        sched.stop()
    assert not os.path.exists(str(sched.security.path))  # its own keys, removed by stop()


def test_get_versions_reports_every_process(client: Client) -> None:
    v = client.get_versions(check=True)
    assert v["client"]["protocol"] == str(protocol.PROTOCOL_VERSION)
    assert len(v["schedulers"]) == 2 and len(v["workers"]) == 2


def test_shutdown_semantics(cluster: LocalCluster) -> None:
    c = Client(cluster)
    futures = [c.submit(slow_identity, i, 0.3) for i in range(20)]
    c.shutdown(wait=False, cancel_futures=True)
    assert any(f.cancelled() for f in futures)
    with pytest.raises(RuntimeError, match="after shutdown"):
        c.submit(inc, 1)
    with Client(cluster) as c2:
        f = c2.submit(slow_identity, 5, 0.2)
    assert f.result() == 5  # __exit__ waited


def test_close_leaves_no_process() -> None:
    cluster = LocalCluster(n_schedulers=2, n_workers=2)
    cluster.wait_for_workers(2)
    pids = [p.pid for p in cluster._scheduler_procs] + _worker_pids(cluster)
    pids += [r.info["pid"] for r in cluster.jobs.values()]
    directory = cluster.cluster_dir
    cluster.close()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not os.path.exists(directory)
    assert "closed" in repr(cluster)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_owner_leaves_no_process(tmp_path: Path, sig: signal.Signals) -> None:
    """The process that made a LocalCluster is killed (no close, no atexit): all of it ends."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import json, time\nfrom jobqueue_ms import LocalCluster\n"
        "c = LocalCluster(n_schedulers=2, n_workers=2)\nc.wait_for_workers(2)\n"
        "pids = [p.pid for p in c._scheduler_procs] + [r.info['pid'] for r in c.jobs.values()]\n"
        "pids += [w['pid'] for w in c.workers.values()]\n"
        "print(json.dumps({'pids': pids, 'dir': c.cluster_dir}), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    started = {"dir": str(tmp_path / "none")}
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        pids = started["pids"]
        assert len(pids) == 6 and all(psutil.pid_exists(p) for p in pids)  # 2 + 2 nannies + 2
        proc.send_signal(sig)
        assert proc.wait(30) == -sig

        def left() -> list[int]:
            return [
                p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
            ]

        wait_until(lambda: not left(), timeout=30, message="processes outlived their owner")
        assert os.path.isdir(started["dir"])  # a killed owner cannot remove it...
        with LocalCluster(n_schedulers=1):  # ...the next cluster does, with its key file
            assert not os.path.exists(started["dir"])
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        for p in left():
            os.kill(p, signal.SIGKILL)
        shutil.rmtree(started["dir"], ignore_errors=True)


_HEAP_CHURN = """
import random, sys, psutil
from jobqueue_ms.runtime.malloc import pin_mmap_threshold
print(pin_mmap_threshold() if sys.argv[1] == "pin" else None)
p, rng, keep, live = psutil.Process(), random.Random(1), [], []
b = bytearray(8 << 20); del b  # unpinned, glibc raises its mmap threshold here
r0 = p.memory_info().rss
for i in range(400):  # large messages come and go while small long-lived objects appear
    live.append(bytearray(rng.randrange(1 << 20, 8 << 20)))
    keep.append(bytes(rng.randrange(100, 5000)))
    if len(live) > 3:
        live.pop(rng.randrange(len(live)))
live.clear()
print((p.memory_info().rss - r0) >> 20)
"""


def test_pinned_mmap_threshold_keeps_rss_flat_under_large_messages() -> None:
    """What schedulers and workers do at start (runtime/malloc.py), on this machine's glibc."""

    def growth(mode: str, **env: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _HEAP_CHURN, mode],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **env},
        ).stdout.split()
        return out[0], int(out[1])

    pinned, unpinned = growth("pin"), growth("none")
    assert pinned[0] == "True" and pinned[1] < 4, (pinned, unpinned)
    print(f"RSS growth: pinned {pinned[1]} MiB, glibc's default {unpinned[1]} MiB")
    # the site's own glibc setting wins: then we do not touch it
    assert growth("pin", MALLOC_MMAP_THRESHOLD_="131072")[0] == "False"


def test_local_cluster_scale_and_repr() -> None:
    with LocalCluster(n_schedulers=1, n_workers=1) as cluster:
        cluster.wait_for_workers(1)
        cluster.scale(3)
        cluster.wait_for_workers(3)
        assert "3 workers" in repr(cluster) and "<table>" in cluster._repr_html_()
        name = sorted(cluster.workers)[0]
        cluster.scale_down([name])
        wait_until(lambda: name not in cluster.workers, timeout=30)
        wait_until(lambda: len(cluster.workers) == 2, timeout=30)
        with pytest.raises(ValueError, match="jobs"):
            cluster.scale(-1)


def test_cli_help_and_clear_errors() -> None:
    for cmd in (["--help"], ["scheduler", "--help"], ["worker", "--help"], ["demo", "--help"]):
        out = subprocess.run(
            [sys.executable, "-m", "jobqueue_ms", *cmd], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0 and "Usage" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "jobqueue_ms", "worker", "--scheduler", "x:1", "--memory-limit",
         "lots"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode != 0 and "tcp://host:port" in bad.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "jobqueue_ms", "worker", "--scheduler", "tcp://127.0.0.1:1",
         "--memory-limit", "lots"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode != 0 and "--memory-limit='lots'" in bad.stderr
    for cmd in (["scheduler"], ["worker", "--scheduler", "tcp://127.0.0.1:1"]):
        bad = subprocess.run(
            [sys.executable, "-m", "jobqueue_ms", *cmd, "--interface", "nosuch0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert bad.returncode == 2, bad.stderr
        assert "interface='nosuch0' does not exist" in bad.stderr
        assert "lo (127.0.0.1)" in bad.stderr  # the interfaces it could have been


def _constant(k: int) -> Callable[[], int]:
    return lambda: k


def test_function_dropped_by_the_scheduler_is_asked_for_again(cluster: LocalCluster) -> None:
    """Schedulers keep a bounded number of idle function blobs; a client never notices."""

    def first(x: int) -> int:
        return x + 1

    # One scheduler, so that every submission goes where `first` was sent before (with two, the
    # map below may go to the scheduler that never had it, which then gets the blob unasked).
    with Client(cluster.scheduler_addresses[0]) as client:
        assert client.submit(first, 1).result(timeout=30) == 2
        # 600 distinct functions (closures over different values pickle differently) push
        # `first` out of the scheduler's 256-entry idle-function cache
        makers = [_constant(k) for k in range(600)]
        futures = [client.submit(m) for m in makers]
        assert client.gather(futures) == list(range(600))
        del futures

        def idle() -> bool:
            return all(i["tasks_total"] == 0 for i in client.scheduler_info())

        wait_until(idle, timeout=30, message="released tasks forgotten by the scheduler")
        assert list(client.map(first, range(20), timeout=30)) == list(range(1, 21))
        asked = sum(i["counters"]["functions_asked_again"] for i in client.scheduler_info())
        assert asked >= 1


def test_worker_local_directory_becomes_the_tasks_tmpdir(tmp_path: Path) -> None:
    import tempfile

    sched = Scheduler(port=0)
    address = sched.start()
    scratch = tmp_path / "scratch" / "w1"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobqueue_ms",
            "worker",
            "--scheduler",
            address,
            "--local-directory",
            str(scratch),
            *sched.security.argv(),
        ]  # fmt: skip
    )
    try:
        with Client(address) as client:
            assert client.submit(tempfile.gettempdir).result(timeout=60) == str(scratch)
        assert scratch.is_dir()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        sched.stop()
