"""Failure drills (issue 7): hostile frames, killed workers, schedulers and clients, a soak.

Real processes on loopback, each drill reporting its figures (``DRILL <name>: ...`` on the
terminal; ``JOBQUEUE_MS_DRILL_REPORT=<file>`` also appends them as JSON lines). What the figures
mean and the latest ones: docs/reliability.md. Run them with

    .venv/bin/python -m pytest tests/test_drills.py -p no:randomly -rA
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cloudpickle
import drill_helpers
import pytest
import zmq
from drill_helpers import (
    DATA_KINDS,
    SCHEDULER_KINDS,
    CaptureProxy,
    ExecutionLog,
    FrameSource,
    Fuzzer,
    alive,
    chunks,
    data_port_ping,
    record_execution,
    report,
    rss,
    start_scheduler,
    stop,
    worker_pid,
)
from helpers import wait_until

from jobqueue_ms import Client, LocalCluster
from jobqueue_ms.runtime import protocol
from jobqueue_ms.runtime.admin import SchedulerAdmin
from jobqueue_ms.runtime.protocol import Kind

# workers cannot import the test modules: ship their functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(drill_helpers)

HEARTBEAT_TIMEOUT_S = 3.0
HEARTBEAT_INTERVAL_S = 0.25
SEED = int(os.environ.get("JOBQUEUE_MS_DRILL_SEED", "7"))


@pytest.fixture
def fast_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process started by the test notices a dead peer within ~3 s instead of 10 s."""
    monkeypatch.setenv("JOBQUEUE_MS_HEARTBEAT_TIMEOUT", str(HEARTBEAT_TIMEOUT_S))
    monkeypatch.setenv("JOBQUEUE_MS_HEARTBEAT_INTERVAL", str(HEARTBEAT_INTERVAL_S))


def inc(x: int) -> int:
    return x + 1


def add(a: int, b: int) -> int:
    return a + b


def nanny_pids(cluster: LocalCluster) -> list[int]:
    """The job processes (nannies) of a LocalCluster that are running now."""
    return [r.info["pid"] for r in cluster.jobs.values() if alive(r.info.get("pid", 0))]


def scheduler_pids(cluster: LocalCluster) -> list[int]:
    return [p.pid for p in cluster._scheduler_procs]


def infos(addresses: list[str], timeout: float = 5.0) -> list[dict[str, Any]]:
    """State of each scheduler that answers."""
    admin = SchedulerAdmin(addresses, timeout=timeout)
    try:
        return admin.info()
    finally:
        admin.close()


def tasks_on(addresses: list[str]) -> list[int]:
    """Tasks each scheduler holds (answering ones only)."""
    return [i["tasks_total"] for i in infos(addresses)]


# ============================================================================ fuzz
def _workload_round(client: Client, rng: random.Random) -> None:
    """Ordinary work: bulk, a dependency chain, a large result, scattered data; all checked."""
    n = rng.randint(100, 400)
    futures = client.submit_many(inc, range(n))
    assert [f.result(timeout=60) for f in futures] == list(range(1, n + 1))
    x = client.submit(inc, 0)
    for _ in range(10):
        x = client.submit(inc, x)
    assert x.result(timeout=60) == 11
    big = client.submit(bytes, 300_000)  # stored on the worker, fetched from its data port
    assert client.submit(len, big).result(timeout=60) == 300_000
    assert big.result(timeout=60) == bytes(300_000)
    data = client.scatter([1, 2, 3])
    assert client.submit(sum, data).result(timeout=60) == 6


def _captured(cluster: LocalCluster) -> tuple[list[list[bytes]], list[list[bytes]]]:
    """Valid messages of a real client session (to the scheduler), and GET/PUT for the worker."""
    proxy = CaptureProxy(cluster.scheduler_addresses[0], cluster.security)
    try:
        with Client(proxy.address, security=cluster.security) as client:
            _workload_round(client, random.Random(0))
        sent = [m for m in proxy.sent if m] + [protocol.pack(Kind.HEARTBEAT, None)]
        remote = []
        for frames in proxy.received:
            if frames[0] == Kind.RESULTS:
                for _, status, value in protocol.loads_control(frames[1])["results"]:
                    if status == 1:  # a result stored on the worker: (data address, skey, nbytes)
                        remote.append(list(value[1]))
    finally:
        proxy.close()
    assert {m[0] for m in sent} >= {Kind.HELLO, Kind.SUBMIT, Kind.RELEASE} and remote
    data = [protocol.pack(Kind.GET, {"req": i, "keys": [k]}) for i, k in enumerate(remote)]
    data.append(
        # no such request any more: a data port used to store what anyone PUT there, forever
        protocol.pack(b"put", {"req": 1, "items": [(("fuzz", 1), b"", 1)]}, [b"x" * 1000])
    )
    return sent, data


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fuzz_scheduler_and_worker_ports_under_load(
    fast_heartbeats: None, request: pytest.FixtureRequest
) -> None:
    total = int(os.environ.get("JOBQUEUE_MS_FUZZ_MESSAGES", "100000"))
    batch = 500
    warmup = 10_000
    rng = random.Random(SEED)
    t0 = time.monotonic()
    with LocalCluster(n_schedulers=1, n_workers=1, threads_per_worker=2) as cluster:
        cluster.wait_for_workers(1)
        address = cluster.scheduler_addresses[0]
        sched_pid = scheduler_pids(cluster)[0]
        work_pid = worker_pid(nanny_pids(cluster)[0])
        data_address = next(iter(cluster.workers.values()))["data_address"]
        sent, data_msgs = _captured(cluster)
        big = rng.randbytes(8 << 20)
        sources = [
            FrameSource(random.Random(SEED + 1), SCHEDULER_KINDS, sent, big),
            FrameSource(random.Random(SEED + 2), DATA_KINDS, data_msgs, big),
        ]
        ctx: zmq.Context[Any] = zmq.Context()
        # members of the cluster (they hold its keys), so that their frames reach the parsers;
        # test_security.py shows that outsiders do not even get that far
        fuzzers = [Fuzzer(ctx, a, cluster.security) for a in (address, data_address)]
        probe = cluster.security.socket(ctx, zmq.DEALER, server=False)
        probe.connect(data_address)
        admin = SchedulerAdmin([address], timeout=30.0)
        stop_work = threading.Event()
        rounds: list[int] = [0]
        errors: list[BaseException] = []

        def workload() -> None:
            wrng = random.Random(SEED + 3)
            try:
                with Client(cluster) as client:
                    while not stop_work.is_set():
                        _workload_round(client, wrng)
                        rounds[0] += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        def check_alive(where: str) -> None:
            gone = [n for n, p in (("scheduler", sched_pid), ("worker", work_pid)) if not alive(p)]
            assert not gone, f"{' and '.join(gone)} died {where}; logs in {cluster.cluster_dir}"
            assert len(admin.info()) == 1, f"the scheduler stopped answering {where}"
            data_port_ping(probe, req=-1)

        def settled_rss() -> tuple[int, int]:
            """RSS once the ghost clients that replayed hellos have expired."""
            for f in fuzzers:
                f.renew()
            wait_until(lambda: admin.info()[0]["clients"] == 1, timeout=30, interval=0.2)
            gc.collect()
            return rss(sched_pid), rss(work_pid)

        worker_thread = threading.Thread(target=workload, name="drill-workload", daemon=True)
        worker_thread.start()
        sent_n = 0
        base: tuple[int, int] | None = None
        try:
            for n in chunks(total, batch):
                for _ in range(n):
                    i = rng.randrange(2)
                    fuzzers[i].send(rng, sources[i].message())
                sent_n += n
                for f in fuzzers:
                    f.drain()
                check_alive(f"after {sent_n} hostile messages (seed {SEED})")
                assert not errors, errors
                if sent_n % 5000 == 0:
                    for f in fuzzers:
                        f.renew()
                if sent_n == warmup:
                    base = settled_rss()
            assert base is not None
            final = settled_rss()
            check_alive("after the drill")
        finally:
            stop_work.set()
            worker_thread.join(120)
            for f in fuzzers:
                f.close()
            probe.close(0)
            admin.close()
            ctx.term()
        assert not errors, errors
        info = cluster.scheduler_info(max_age=0)[0]
    growth = [final[0] / base[0] - 1, final[1] / base[1] - 1]
    counts = {**sources[0].counts}
    for k, v in sources[1].counts.items():
        counts[k] = counts.get(k, 0) + v
    report(
        request,
        "fuzz",
        messages=sent_n,
        **{f"n_{k}": v for k, v in sorted(counts.items())},
        identities=fuzzers[0].identities + fuzzers[1].identities,
        workload_rounds=rounds[0],
        scheduler_dropped_frames=info["counters"]["dropped_frames"],
        scheduler_rss_mb=f"{base[0] / 2**20:.1f}->{final[0] / 2**20:.1f}",
        worker_rss_mb=f"{base[1] / 2**20:.1f}->{final[1] / 2**20:.1f}",
        scheduler_rss_growth=f"{growth[0]:+.1%}",
        worker_rss_growth=f"{growth[1]:+.1%}",
        seconds=round(time.monotonic() - t0, 1),
    )
    assert rounds[0] > 0
    assert growth[0] < 0.1 and growth[1] < 0.1, growth


# ============================================================================ kill workers
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_sigkill_a_worker_100_times_under_load(
    fast_heartbeats: None, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """8 supervised workers, 2 schedulers; a random worker killed every ~0.5 s, 100 times."""
    kills = 100
    n_workers = 8
    in_flight = 300
    log_path = str(tmp_path / "executions")
    rng = random.Random(SEED)
    t0 = time.monotonic()
    killed: set[int] = set()
    last_kills: dict[int, list[float]] = {}  # nanny pid -> when we killed its worker
    with LocalCluster(n_schedulers=2, n_workers=n_workers, threads_per_worker=1) as cluster:
        cluster.wait_for_workers(n_workers)
        nannies = nanny_pids(cluster)
        assert len(nannies) == n_workers
        results: dict[int, cf.Future[Any]] = {}
        pending: list[tuple[int, cf.Future[Any]]] = []
        next_key = 0
        with Client(cluster) as client:

            def top_up() -> None:
                nonlocal next_key, pending
                pending = [(k, f) for k, f in pending if not f.done()]
                n = in_flight - len(pending)
                args = [(log_path, k, rng.uniform(0, 0.02)) for k in range(next_key, next_key + n)]
                futures = client.submit_many(record_execution, args)
                for (_, key, _), f in zip(args, futures, strict=True):
                    results[key] = f
                    pending.append((key, f))
                next_key += n

            def victim() -> int:
                """A nanny we may kill a worker of: the nanny gives up after 6 deaths in 30 s."""
                now = time.monotonic()
                ok = [p for p in nannies if sum(now - t < 32 for t in last_kills.get(p, [])) < 5]
                return rng.choice(ok) if ok else 0

            for _ in range(kills):
                top_up()
                time.sleep(rng.uniform(0.05, 0.6))  # the random moment (the drill, not a wait)
                nanny = wait_until(victim, timeout=40, interval=0.1)
                pid = worker_pid(nanny)
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
                last_kills.setdefault(nanny, []).append(time.monotonic())
            kill_s = time.monotonic() - t0
            done, not_done = cf.wait(list(results.values()), timeout=180)
            ok = {k for k, f in results.items() if f in done and f.exception() is None}
            wrong = [k for k in ok if results[k].result() != 2 * k]
            lost = [k for k, f in results.items() if f in not_done or f.exception() is not None]
            errors = {type(results[k].exception()).__name__ for k in lost if results[k].done()}
        # the nannies restarted every worker
        wait_until(lambda: len(cluster.workers) == n_workers, timeout=60)
        assert sorted(nanny_pids(cluster)) == sorted(nannies)
    runs = ExecutionLog.read(log_path)
    wrongly = runs.wrongly_duplicated(killed)
    never_ran = [k for k in results if k not in runs.runs]
    report(
        request,
        "kill-worker-100",
        kills=len(killed),
        tasks=len(results),
        lost=len(lost),
        wrong_results=len(wrong),
        never_ran=len(never_ran),
        wrongly_duplicated=len(wrongly),
        reruns_after_kills=runs.reruns(),
        interrupted_runs=runs.interrupted(),
        kill_phase_s=round(kill_s, 1),
        seconds=round(time.monotonic() - t0, 1),
    )
    assert len(killed) == kills
    assert not lost, f"{len(lost)} lost ({errors}), e.g. {lost[:10]}"
    assert not wrong and not never_ran
    assert not wrongly, {k: runs.runs[k] for k in wrongly[:5]}


# ============================================================================ kill a scheduler
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_one_of_three_schedulers_then_restart_it(
    fast_heartbeats: None, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    n_tasks = 3000
    log_path = str(tmp_path / "executions")
    t0 = time.monotonic()
    with LocalCluster(n_schedulers=3, n_workers=2, threads_per_worker=2) as cluster:
        cluster.wait_for_workers(2)
        victim_address = cluster.scheduler_addresses[0]
        others = cluster.scheduler_addresses[1:]
        port = int(victim_address.rsplit(":", 1)[1])
        with Client(cluster) as client:
            futures = client.submit_many(
                record_execution, [(log_path, k, 0.005) for k in range(n_tasks)]
            )
            wait_until(lambda: sum(f.done() for f in futures) > 300, timeout=60)
            assert all(n > 0 for n in tasks_on(cluster.scheduler_addresses))  # all three busy
            os.kill(scheduler_pids(cluster)[0], signal.SIGKILL)
            killed_at = time.monotonic()
            results = [f.result(timeout=120) for f in futures]
            recovered_s = time.monotonic() - killed_at
            assert results == [2 * k for k in range(n_tasks)]
            # the workers keep serving the other two
            survivors = infos(others)
            assert len(survivors) == 2 and all(len(i["workers"]) == 2 for i in survivors)
            more = client.submit_many(inc, range(500))
            assert client.gather(more) == list(range(1, 501))
            # a scheduler restarted on the same address is rejoined by the workers and the client
            proc = start_scheduler(
                port, cluster.cluster_id, str(tmp_path / "restarted.log"), cluster.security
            )
            try:
                started_at = time.monotonic()
                wait_until(
                    lambda: [len(i["workers"]) for i in infos([victim_address], 2.0)] == [2],
                    timeout=60,
                )
                rejoin_s = time.monotonic() - started_at
                wait_until(lambda: len(client.scheduler_info()) == 3, timeout=60)
                client_rejoin_s = time.monotonic() - started_at
                with Client(victim_address) as direct:
                    futures = direct.submit_many(inc, range(200))
                    assert direct.gather(futures) == list(range(1, 201))
                assert infos([victim_address])[0]["counters"]["tasks_done"] >= 200
                client.shutdown()
            finally:
                stop(proc)
    runs = ExecutionLog.read(log_path)
    report(
        request,
        "kill-scheduler-1-of-3",
        tasks=n_tasks,
        lost=0,
        reruns_after_failover=runs.reruns(),
        all_done_after_kill_s=round(recovered_s, 2),
        workers_rejoined_restarted_s=round(rejoin_s, 2),
        client_rejoined_restarted_s=round(client_rejoin_s, 2),
        seconds=round(time.monotonic() - t0, 1),
    )
    assert set(runs.runs) == set(range(n_tasks))


# ============================================================================ kill a client
CLIENT_SCRIPT = """
import sys
import cloudpickle
sys.path.insert(0, sys.argv[1])
import drill_helpers
from jobqueue_ms import Client
cloudpickle.register_pickle_by_value(drill_helpers)
c = Client(sys.argv[3:])
fs = c.submit_many(drill_helpers.record_execution, [(sys.argv[2], k, 0.05) for k in range(4000)])
print("submitted", c.reply_address, flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_client_releases_its_tasks_on_every_scheduler(
    fast_heartbeats: None, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    log_path = str(tmp_path / "executions")
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    tests_dir = str(Path(__file__).parent)
    with LocalCluster(n_schedulers=2, n_workers=2, threads_per_worker=2) as cluster:
        cluster.wait_for_workers(2)
        addresses = cluster.scheduler_addresses
        proc = subprocess.Popen(
            [sys.executable, str(script), tests_dir, log_path, *addresses],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "JOBQUEUE_MS_KEYFILE": str(cluster.security.path)},
        )
        try:
            assert proc.stdout is not None
            said, reply_address = proc.stdout.readline().split()
            assert said == "submitted" and reply_address.startswith("ipc://")
            wait_until(lambda: all(n > 100 for n in tasks_on(addresses)), timeout=60)
            wait_until(lambda: os.path.exists(log_path), timeout=60)
            proc.kill()
            killed_at = time.monotonic()
            per_scheduler: dict[str, float] = {}

            def released() -> bool:
                for a, n in zip(addresses, tasks_on(addresses), strict=True):
                    if n == 0 and a not in per_scheduler:
                        per_scheduler[a] = time.monotonic() - killed_at
                return len(per_scheduler) == len(addresses)

            wait_until(released, timeout=60, interval=0.05)
            released_wall = time.time()
            clients = [i["clients"] for i in infos(addresses)]
        finally:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
    runs = ExecutionLog.read(log_path)
    ran = len(runs.runs)
    slowest = max(per_scheduler.values())
    report(
        request,
        "kill-client",
        heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
        released_after_s=", ".join(f"{s:.2f}" for s in sorted(per_scheduler.values())),
        tasks_submitted=4000,
        tasks_that_ran=ran,
        started_after_release=runs.started_after(released_wall),
    )
    assert clients == [0, 0]
    assert slowest <= HEARTBEAT_TIMEOUT_S + 2 * HEARTBEAT_INTERVAL_S + 1.0, per_scheduler
    assert runs.started_after(released_wall) == 0
    # its same-host reply socket's directory: left by the SIGKILL, removed by the next cluster
    reply_dir = Path(reply_address[len("ipc://") :]).parent
    assert reply_dir.exists()
    with LocalCluster(n_schedulers=1, n_workers=0):
        assert not reply_dir.exists()


# ============================================================================ soak
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_one_million_tasks_memory_stays_flat(request: pytest.FixtureRequest) -> None:
    """1,000,000 small tasks through 2 schedulers and 2 workers, in waves of 20,000."""
    total = int(os.environ.get("JOBQUEUE_MS_SOAK_TASKS", "1000000"))
    wave = 20_000
    warmup = min(100_000, total // 5)
    t0 = time.monotonic()
    with LocalCluster(n_schedulers=2, n_workers=2, threads_per_worker=1) as cluster:
        cluster.wait_for_workers(2)
        pids = scheduler_pids(cluster) + [worker_pid(p) for p in nanny_pids(cluster)]
        samples: list[tuple[int, list[int]]] = []

        def sample(done: int) -> None:
            """RSS of all four processes once the schedulers forgot every released task."""
            gc.collect()
            wait_until(lambda: tasks_on(cluster.scheduler_addresses) == [0, 0], timeout=60)
            samples.append((done, [rss(p) for p in pids]))

        with Client(cluster) as client:

            def check(first: int, futures: list[Any]) -> int:
                assert client.gather(futures) == list(range(first + 1, first + len(futures) + 1))
                return len(futures)

            done = start = 0
            ahead: list[tuple[int, list[Any]]] = []  # two waves in flight
            for n in chunks(total, wave):
                ahead.append((start, client.submit_many(inc, range(start, start + n))))
                start += n
                if len(ahead) == 2:
                    done += check(*ahead.pop(0))
                if start % warmup == 0 or start == total:
                    while ahead:
                        done += check(*ahead.pop(0))
                    sample(done)
            elapsed = time.monotonic() - t0
        assert all(alive(p) for p in pids), "a process was replaced during the soak"
    base = samples[0][1]
    final = samples[-1][1]
    growth = [f / b - 1 for b, f in zip(base, final, strict=True)]
    names = ["scheduler0", "scheduler1", "worker0", "worker1"]
    report(
        request,
        "soak",
        tasks=done,
        seconds=round(elapsed, 1),
        tasks_per_s=round(done / elapsed),
        **{
            f"{n}_rss_mb": "->".join(f"{s[1][i] / 2**20:.1f}" for s in samples)
            for i, n in enumerate(names)
        },
        **{f"{n}_growth": f"{g:+.1%}" for n, g in zip(names, growth, strict=True)},
    )
    assert done == total
    assert all(g < 0.10 for g in growth), dict(zip(names, growth, strict=True))
