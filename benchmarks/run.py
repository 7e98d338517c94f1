#!/usr/bin/env python
"""Benchmarks: the same workload shapes on jobqueue-ms and dask.distributed, in ONE run.

    scripts/bench                 # full sizes (what docs/performance.md reports)
    scripts/bench --quick         # small sizes, a smoke run (< 60 s)
    scripts/bench --only a,b      # some sections
    scripts/bench --json out.json # also write every figure as JSON

Sections (see issue 2, "Benchmarks"):
  a  no-op tasks, 1 scheduler, 2 single-thread worker processes: tasks/s (bulk and submit loop)
  b  round trip of one tiny task (sequential submit -> result after warm-up): median, p99
  c  dependency chain (each task takes the previous future): total and per task
  d  50 results of 10 MB (bytes; NumPy array) gathered to the client: MB/s
  e  worker process start -> first task run; import time of the worker module
  f  scheduler memory per queued task (no workers): RSS growth / n
  g  aggregate throughput, 1 vs 2 schedulers sharing the same 2 workers (jobqueue-ms only)

Every ratio is printed as "jobqueue-ms / dask" for rates (higher is better for jobqueue-ms)
and "dask / jobqueue-ms" for times and bytes (also: higher is better for jobqueue-ms), so a
ratio above 1 always means jobqueue-ms does better. dask is only a benchmark dependency.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import psutil

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None

MB = 1_000_000
PY = sys.executable


# ---------------------------------------------------------------------- task functions
def noop(x: Any = None) -> None:
    return None


def inc(x: int) -> int:
    return x + 1


def now(_: Any = None) -> float:
    return time.time()


def make_bytes(i: int, size: int) -> bytes:
    return random.Random(i).randbytes(size)


def make_array(i: int, size: int) -> Any:
    import numpy

    return numpy.random.default_rng(i).random(size // 8)


# ---------------------------------------------------------------------- plumbing
class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after ``seconds``: a hang is reported, not waited."""

    def fire(*_: Any) -> None:
        raise SectionTimeout(f"no answer within {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    outer_left, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer_left:  # an enclosing deadline keeps running
            signal.setitimer(signal.ITIMER_REAL, max(0.01, outer_left - (time.monotonic() - t0)))


class Procs:
    """Every subprocess this script starts, so that all are ended even on error."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: str | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        p = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        if log:
            out.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # children of a nanny, if any survived
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        self.procs.clear()


PROCS = Procs()


def wait_file(path: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not os.path.exists(path) or os.path.getsize(path) == 0:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if time.monotonic() > end:
            raise RuntimeError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
    time.sleep(0.1)  # let the writer finish (dask writes non-atomically)


def pctl(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class Results:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def add(self, sec: str, what: str, unit: str, jq: Any, dk: Any, better: str) -> None:
        """``better`` is "high" (rates) or "low" (times, bytes)."""
        ratio = None
        if isinstance(jq, (int, float)) and isinstance(dk, (int, float)) and jq and dk:
            ratio = jq / dk if better == "high" else dk / jq
        self.rows.append(
            {
                "section": sec,
                "what": what,
                "unit": unit,
                "jobqueue_ms": jq,
                "dask": dk,
                "ratio": ratio,
                "ratio_means": "jq/dask" if better == "high" else "dask/jq",
            }
        )
        print(f"  [{sec}] {what}: jobqueue-ms={fmt(jq)} dask={fmt(dk)} {unit}", flush=True)

    def error(self, sec: str, who: str, exc: BaseException) -> str:
        msg = f"[{sec}] {who}: {type(exc).__name__}: {exc}"
        self.errors.append(msg)
        print("  ERROR " + msg, flush=True)
        if not isinstance(exc, SectionTimeout):
            traceback.print_exc()
        return "ERROR" if not isinstance(exc, SectionTimeout) else "TIMEOUT"


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 0.1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def guarded(res: Results, sec: str, who: str, seconds: float, fn: Callable[[], Any]) -> Any:
    try:
        with deadline(seconds):
            return fn()
    except Exception as exc:  # noqa: BLE001 - reported in the table and the error list
        return res.error(sec, who, exc)


# ---------------------------------------------------------------------- a-d: one cluster each
def process_cpu() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process and of its children, by role."""
    me = psutil.Process()
    out = {"client": sum(me.cpu_times()[:2]), "scheduler": 0.0, "workers": 0.0}
    for p in me.children(recursive=True):
        try:
            role = "scheduler" if "scheduler" in p.cmdline() else "workers"
            out[role] += sum(p.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return out


def jq_abcd(cfg: dict[str, Any], only: set[str], out: dict[str, Any], res: Results) -> None:
    import concurrent.futures as cf

    from jobqueue_ms import Client, LocalCluster

    with LocalCluster(n_schedulers=1, n_workers=2, threads_per_worker=1) as cluster:
        cluster.wait_for_workers(2)
        with contextlib.closing(Client(cluster)) as client:
            client.gather(client.submit_many(noop, range(200)))  # warm-up
            n = cfg["a_tasks"]

            def a_bulk() -> float:
                t0 = time.perf_counter()
                futs = client.submit_many(noop, range(n))
                done, _ = cf.wait(futs, timeout=cfg["timeout"])
                assert len(done) == n, f"{n - len(done)} of {n} futures unfinished"
                r = client.gather(futs)
                assert len(r) == n and r[0] is None
                return n / (time.perf_counter() - t0)

            def a_loop() -> float:
                t0 = time.perf_counter()
                futs = [client.submit(noop, i) for i in range(n)]
                done, _ = cf.wait(futs, timeout=cfg["timeout"])
                assert len(done) == n, f"{n - len(done)} of {n} futures unfinished"
                client.gather(futs)
                return n / (time.perf_counter() - t0)

            def b() -> tuple[float, float, dict[str, Any]]:
                for i in range(cfg["b_warm"]):
                    client.submit(inc, i).result(timeout=10)
                lat = []
                for i in range(cfg["b_n"]):
                    t0 = time.perf_counter()
                    v = client.submit(inc, i).result(timeout=10)
                    lat.append(time.perf_counter() - t0)
                    assert v == i + 1
                # Where it goes: CPU per round trip by process (over more of them: the clock
                # behind cpu_times ticks every 10 ms), and the messages the scheduler receives.
                m = cfg["b_cpu_n"]
                cpu0, msgs0 = process_cpu(), client.scheduler_info()[0]["counters"]["messages"]
                for i in range(m):
                    client.submit(inc, i).result(timeout=10)
                cpu1, msgs1 = process_cpu(), client.scheduler_info()[0]["counters"]["messages"]
                where = {
                    "cpu_us": {k: (cpu1[k] - cpu0[k]) / m * 1e6 for k in cpu0},
                    "scheduler_messages": (msgs1 - msgs0 - 1) / m,  # less the info request
                }
                return statistics.median(lat) * 1e3, pctl(lat, 0.99) * 1e3, where

            def c() -> tuple[float, float]:
                m = cfg["c_len"]
                t0 = time.perf_counter()
                f = client.submit(inc, 0)
                for _ in range(m - 1):
                    f = client.submit(inc, f)
                v = f.result(timeout=cfg["timeout"])
                dt = time.perf_counter() - t0
                assert v == m, f"chain gave {v}, expected {m}"
                return dt, dt / m * 1e3

            def d(maker: Callable[[int, int], Any]) -> float:
                k, size = cfg["d_n"], cfg["d_size"]
                futs = [client.submit(maker, i, size) for i in range(k)]
                done, _ = cf.wait(futs, timeout=cfg["timeout"])
                assert len(done) == k
                t0 = time.perf_counter()
                vals = client.gather(futs)
                dt = time.perf_counter() - t0
                assert len(vals) == k and len(vals[-1]) * (8 if maker is make_array else 1) == size
                del vals, futs
                return k * size / MB / dt

            if "a" in only:
                out["a_bulk"] = guarded(res, "a", "jobqueue-ms submit_many", cfg["timeout"], a_bulk)
                out["a_loop"] = guarded(res, "a", "jobqueue-ms submit loop", cfg["timeout"], a_loop)
            if "b" in only:
                out["b"] = guarded(res, "b", "jobqueue-ms", cfg["timeout"], b)
            if "c" in only:
                out["c"] = guarded(res, "c", "jobqueue-ms", cfg["timeout"], c)
            if "d" in only:
                out["d_bytes"] = guarded(
                    res, "d", "jobqueue-ms bytes", cfg["timeout"], lambda: d(make_bytes)
                )
                out["d_bytes2"] = guarded(  # the client's freed memory is reused this time
                    res, "d", "jobqueue-ms bytes again", cfg["timeout"], lambda: d(make_bytes)
                )
                if np is not None:
                    out["d_numpy"] = guarded(
                        res, "d", "jobqueue-ms numpy", cfg["timeout"], lambda: d(make_array)
                    )


def dask_abcd(cfg: dict[str, Any], only: set[str], out: dict[str, Any], res: Results) -> None:
    from dask.distributed import Client, LocalCluster, wait

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        client.gather(client.map(noop, range(200), pure=False))
        n = cfg["a_tasks"]

        def a_bulk() -> float:
            t0 = time.perf_counter()
            futs = client.map(noop, range(n))
            wait(futs, timeout=cfg["timeout"])
            client.gather(futs)
            dt = time.perf_counter() - t0
            del futs
            return n / dt

        def a_loop() -> float:
            t0 = time.perf_counter()
            futs = [client.submit(noop, i, pure=False) for i in range(n)]
            wait(futs, timeout=cfg["timeout"])
            client.gather(futs)
            dt = time.perf_counter() - t0
            del futs
            return n / dt

        def b() -> tuple[float, float]:
            for i in range(cfg["b_warm"]):
                client.submit(inc, i, pure=False).result(timeout=10)
            lat = []
            for i in range(cfg["b_n"]):
                t0 = time.perf_counter()
                v = client.submit(inc, i, pure=False).result(timeout=10)
                lat.append(time.perf_counter() - t0)
                assert v == i + 1
            return statistics.median(lat) * 1e3, pctl(lat, 0.99) * 1e3

        def c() -> tuple[float, float]:
            m = cfg["c_len"]
            t0 = time.perf_counter()
            f = client.submit(inc, 0, pure=False)
            for _ in range(m - 1):
                f = client.submit(inc, f, pure=False)
            v = f.result(timeout=cfg["timeout"])
            dt = time.perf_counter() - t0
            assert v == m
            return dt, dt / m * 1e3

        def d(maker: Callable[[int, int], Any]) -> float:
            k, size = cfg["d_n"], cfg["d_size"]
            futs = [client.submit(maker, i, size, pure=False) for i in range(k)]
            wait(futs, timeout=cfg["timeout"])
            t0 = time.perf_counter()
            vals = client.gather(futs)
            dt = time.perf_counter() - t0
            assert len(vals) == k
            del vals, futs
            return k * size / MB / dt

        if "a" in only:
            out["a_bulk"] = guarded(res, "a", "dask map", cfg["timeout"], a_bulk)
            out["a_loop"] = guarded(res, "a", "dask submit loop", cfg["timeout"], a_loop)
        if "b" in only:
            out["b"] = guarded(res, "b", "dask", cfg["timeout"], b)
        if "c" in only:
            out["c"] = guarded(res, "c", "dask", cfg["timeout"], c)
        if "d" in only:
            out["d_bytes"] = guarded(res, "d", "dask bytes", cfg["timeout"], lambda: d(make_bytes))
            out["d_bytes2"] = guarded(
                res, "d", "dask bytes again", cfg["timeout"], lambda: d(make_bytes)
            )
            if np is not None:
                out["d_numpy"] = guarded(
                    res, "d", "dask numpy", cfg["timeout"], lambda: d(make_array)
                )


# ---------------------------------------------------------------------- e: worker start
def import_time(module: str, reps: int) -> tuple[float, float]:
    """Median wall time of ``python -c "import MODULE"`` and of a bare ``python -c pass``."""

    def run(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", code], check=True, stdin=subprocess.DEVNULL)
        return time.perf_counter() - t0

    run(f"import {module}")  # warm the page cache: both systems are measured warm
    bare = statistics.median(run("pass") for _ in range(max(3, reps)))
    mod = statistics.median(run(f"import {module}") for _ in range(max(3, reps)))
    return mod, bare


def jq_e(cfg: dict[str, Any], tmp: str) -> dict[str, float]:
    from jobqueue_ms import Client

    sf = os.path.join(tmp, "jq-e.json")
    sched = PROCS.start(
        [PY, "-m", "jobqueue_ms", "scheduler", "--scheduler-file", sf],
        os.path.join(tmp, "jq-e-scheduler.log"),
    )
    try:
        wait_file(sf, sched)
        info = json.load(open(sf))
        addr, keyfile = info["addresses"][0], info["keyfile"]  # the scheduler made its keys
        starts = []
        with contextlib.closing(Client(scheduler_file=sf)) as client:
            for _ in range(cfg["e_reps"]):
                fut = client.submit(now, random.random())
                t_launch = time.time()
                w = PROCS.start(
                    [PY, "-m", "jobqueue_ms", "worker", "--scheduler", addr, "--keyfile", keyfile],
                    os.path.join(tmp, "jq-e-worker.log"),
                )
                try:
                    ran = fut.result(timeout=60)
                    starts.append(ran - t_launch)
                finally:
                    PROCS.stop(w)
                time.sleep(0.5)  # let the scheduler notice the worker left
        mod, bare = import_time("jobqueue_ms.runtime.worker", cfg["e_reps"])
        return {"start": statistics.median(starts), "import": mod, "python": bare, "starts": starts}
    finally:
        PROCS.stop(sched)


def dask_e(cfg: dict[str, Any], tmp: str) -> dict[str, float]:
    from dask.distributed import Client

    sf = os.path.join(tmp, "dask-e.json")
    sched = PROCS.start(
        [
            PY,
            "-m",
            "distributed.cli.dask_scheduler",
            "--scheduler-file",
            sf,
            "--no-dashboard",
            "--host",
            "127.0.0.1",
        ],
        os.path.join(tmp, "dask-e-scheduler.log"),
    )
    try:
        wait_file(sf, sched)
        addr = json.load(open(sf))["address"]
        starts = []
        with Client(addr) as client:
            for _ in range(cfg["e_reps"]):
                fut = client.submit(now, random.random(), pure=False)
                t_launch = time.time()
                w = PROCS.start(
                    [
                        PY,
                        "-m",
                        "distributed.cli.dask_worker",
                        addr,
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--host",
                        "127.0.0.1",
                    ],
                    os.path.join(tmp, "dask-e-worker.log"),
                )
                try:
                    ran = fut.result(timeout=60)
                    starts.append(ran - t_launch)
                finally:
                    PROCS.stop(w)
                time.sleep(0.5)
        mod, bare = import_time("distributed.worker", cfg["e_reps"])
        return {"start": statistics.median(starts), "import": mod, "python": bare, "starts": starts}
    finally:
        PROCS.stop(sched)


# ---------------------------------------------------------------------- f: scheduler memory
def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def jq_f(cfg: dict[str, Any], tmp: str) -> dict[str, float]:
    from jobqueue_ms import Client

    n = cfg["f_tasks"]
    sf = os.path.join(tmp, "jq-f.json")
    sched = PROCS.start(
        [PY, "-m", "jobqueue_ms", "scheduler", "--scheduler-file", sf],
        os.path.join(tmp, "jq-f-scheduler.log"),
    )
    client = None
    try:
        wait_file(sf, sched)
        client = Client(scheduler_file=sf)
        client.scheduler_info()
        time.sleep(0.5)
        before = rss(sched.pid)
        t0 = time.perf_counter()
        futs = client.submit_many(noop, range(n))
        while client.scheduler_info()[0]["tasks"]["ready"] < n:
            time.sleep(0.05)
        queued_s = time.perf_counter() - t0
        time.sleep(0.5)
        after = rss(sched.pid)
        del futs
        return {
            "per_task": (after - before) / n,
            "before": before,
            "after": after,
            "queue_s": queued_s,
        }
    finally:
        if client is not None:
            client.shutdown(wait=False, cancel_futures=True)
        PROCS.stop(sched)


def dask_f(cfg: dict[str, Any], tmp: str) -> dict[str, float]:
    from dask.distributed import Client

    n = cfg["f_tasks"]
    sf = os.path.join(tmp, "dask-f.json")
    sched = PROCS.start(
        [
            PY,
            "-m",
            "distributed.cli.dask_scheduler",
            "--scheduler-file",
            sf,
            "--no-dashboard",
            "--host",
            "127.0.0.1",
        ],
        os.path.join(tmp, "dask-f-scheduler.log"),
    )
    try:
        wait_file(sf, sched)
        addr = json.load(open(sf))["address"]
        with Client(addr) as client:
            time.sleep(0.5)
            before = rss(sched.pid)
            t0 = time.perf_counter()
            futs = client.map(noop, range(n))

            def count(dask_scheduler: Any) -> int:
                return len(dask_scheduler.tasks)

            while client.run_on_scheduler(count) < n:
                time.sleep(0.1)
            queued_s = time.perf_counter() - t0
            time.sleep(0.5)
            after = rss(sched.pid)
            client.cancel(futs)
            del futs
        return {
            "per_task": (after - before) / n,
            "before": before,
            "after": after,
            "queue_s": queued_s,
        }
    finally:
        PROCS.stop(sched)


# ---------------------------------------------------------------------- g: 1 vs 2 schedulers
def jq_g(cfg: dict[str, Any]) -> dict[str, float]:
    import concurrent.futures as cf

    from jobqueue_ms import Client, LocalCluster

    n = cfg["g_tasks"]

    def run(client: Client, k: int) -> None:
        futs = client.submit_many(noop, range(k))
        done, _ = cf.wait(futs, timeout=cfg["timeout"])
        assert len(done) == k, f"{k - len(done)} of {k} futures unfinished"
        client.gather(futs)

    out: dict[str, float] = {}
    with LocalCluster(n_schedulers=1, n_workers=2) as cluster:
        cluster.wait_for_workers(2)
        with contextlib.closing(Client(cluster)) as client:
            run(client, 200)
            t0 = time.perf_counter()
            run(client, n)
            out["one"] = n / (time.perf_counter() - t0)
    with LocalCluster(n_schedulers=2, n_workers=2) as cluster:
        cluster.wait_for_workers(2)
        with contextlib.closing(Client(cluster)) as client:
            run(client, 200)
            t0 = time.perf_counter()
            run(client, n)
            out["two_one_client"] = n / (time.perf_counter() - t0)
            per = [i["counters"].get("tasks_done") for i in client.scheduler_info()]
            out["two_one_client_split"] = per  # type: ignore[assignment]
        clients = [Client(a) for a in cluster.scheduler_addresses]
        try:
            for c in clients:
                run(c, 200)
            errs: list[BaseException] = []

            def go(c: Client) -> None:
                try:
                    run(c, n // 2)
                except BaseException as e:  # noqa: BLE001
                    errs.append(e)

            ts = [threading.Thread(target=go, args=(c,)) for c in clients]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            out["two_two_clients"] = n / (time.perf_counter() - t0)
            if errs:
                raise errs[0]
        finally:
            for c in clients:
                c.close()
    return out


# ---------------------------------------------------------------------- h: what CURVE costs
def jq_h(cfg: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Throughput (bulk no-ops) and round trip with CurveZMQ on (the default) and off.

    Two rounds, alternating the order, each on its own fresh LocalCluster(1 scheduler, 2
    workers x 1 thread); the better of the two rounds of each mode is kept. Large values go over
    TCP here, as between hosts (``JOBQUEUE_MS_LOCAL_DATA=0``): on one host they take the
    workers' private Unix sockets, unencrypted either way (runtime/localdata.py).
    """
    n = cfg["h_tasks"]
    out: dict[str, dict[str, float]] = {"curve": {}, "plaintext": {}}
    # for the cluster's processes and our client; restored afterwards
    with mock.patch.dict(os.environ, {"JOBQUEUE_MS_LOCAL_DATA": "0"}):
        _h_rounds(cfg, n, out)
    return out


def _h_rounds(cfg: dict[str, Any], n: int, out: dict[str, dict[str, float]]) -> None:
    import concurrent.futures as cf

    from jobqueue_ms import Client, LocalCluster
    from jobqueue_ms.runtime.security import Security

    for mode in ("curve", "plaintext", "plaintext", "curve"):
        security = Security.insecure_plaintext() if mode == "plaintext" else None
        with LocalCluster(n_schedulers=1, n_workers=2, security=security) as cluster:
            cluster.wait_for_workers(2)
            with contextlib.closing(Client(cluster)) as client:
                client.gather(client.submit_many(noop, range(200)))  # warm-up
                t0 = time.perf_counter()
                futs = client.submit_many(noop, range(n))
                done, _ = cf.wait(futs, timeout=cfg["timeout"])
                assert len(done) == n
                rate = n / (time.perf_counter() - t0)
                del futs, done
                lat = []
                for i in range(cfg["b_warm"] + cfg["b_n"]):
                    t1 = time.perf_counter()
                    assert client.submit(inc, i).result(timeout=10) == i + 1
                    lat.append(time.perf_counter() - t1)
                rtt = statistics.median(lat[cfg["b_warm"] :]) * 1e3
                gather = None
                if np is not None:  # section d's NumPy case: CURVE encrypts every byte
                    k, size = cfg["d_n"], cfg["d_size"]
                    futs = [client.submit(make_array, i, size) for i in range(k)]
                    cf.wait(futs, timeout=cfg["timeout"])
                    t1 = time.perf_counter()
                    vals = client.gather(futs)
                    gather = k * size / MB / (time.perf_counter() - t1)
                    assert len(vals) == k
                    del vals, futs
        best = out[mode]
        best["rate"] = max(best.get("rate", 0.0), rate)
        best["rtt_ms"] = min(best.get("rtt_ms", float("inf")), rtt)
        if gather is not None:
            best["gather_mb_s"] = max(best.get("gather_mb_s", 0.0), gather)


# ---------------------------------------------------------------------- main
def machine() -> dict[str, Any]:
    import dask
    import distributed

    import jobqueue_ms

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cores_logical": psutil.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": platform.processor() or platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "jobqueue_ms": jobqueue_ms.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "numpy": np.__version__ if np is not None else None,
        "load_avg": os.getloadavg(),
    }
    with contextlib.suppress(Exception):
        import zmq

        info["pyzmq"] = zmq.__version__
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--only", default="a,b,c,d,e,f,g,h", help="comma-separated sections")
    ap.add_argument("--json", dest="json_out", default=None, help="write figures to this file")
    args = ap.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    bad = only - set("abcdefgh")
    if bad:
        ap.error(f"unknown section(s) {sorted(bad)}; choose from a,b,c,d,e,f,g,h")
    if args.quick:
        cfg = {
            "a_tasks": 1000,
            "b_warm": 10,
            "b_n": 50,
            "b_cpu_n": 300,
            "c_len": 100,
            "d_n": 4,
            "d_size": 10 * MB,
            "e_reps": 1,
            "f_tasks": 10_000,
            "g_tasks": 2000,
            "h_tasks": 2000,
            "timeout": 30,
        }
    else:
        cfg = {
            "a_tasks": 20_000,
            "b_warm": 30,
            "b_n": 300,
            "b_cpu_n": 3000,
            "c_len": 1000,
            "d_n": 50,
            "d_size": 10 * MB,
            "e_reps": 3,
            "f_tasks": 100_000,
            "g_tasks": 20_000,
            "h_tasks": 20_000,
            "timeout": 300,
        }

    tmp = tempfile.mkdtemp(prefix="jqms-bench-")
    # dask's scratch space (dask-scratch-space/) goes there too, and is removed with it; set
    # before dask is first imported (machine()), which reads its config from the environment
    os.environ["DASK_TEMPORARY_DIRECTORY"] = tmp
    info = machine()
    print(f"jobqueue-ms benchmarks {'(quick) ' if args.quick else ''}{info['date']}")
    print(f"command: {' '.join(['scripts/bench', *(argv if argv is not None else sys.argv[1:])])}")
    print(
        f"machine: {info['cores_logical']} logical cores ({info['cores_physical']} physical), "
        f"{info['memory_gb']} GiB, {info['cpu']}, load {info['load_avg']}"
    )
    print(
        f"versions: python {info['python']}, jobqueue-ms {info['jobqueue_ms']}, "
        f"dask {info['dask']}, distributed {info['distributed']}, numpy {info['numpy']}, "
        f"pyzmq {info.get('pyzmq')}"
    )
    print(f"sizes: {cfg}", flush=True)

    res = Results()
    jq: dict[str, Any] = {}
    dk: dict[str, Any] = {}
    t_start = time.perf_counter()
    try:
        if only & set("abcd"):
            print("== a-d: jobqueue-ms LocalCluster(1 scheduler, 2 workers x 1 thread)", flush=True)
            guarded(
                res,
                "a-d",
                "jobqueue-ms cluster",
                cfg["timeout"] * 4,
                lambda: jq_abcd(cfg, only, jq, res),
            )
            print(
                "== a-d: dask LocalCluster(n_workers=2, threads_per_worker=1, processes=True)",
                flush=True,
            )
            guarded(
                res,
                "a-d",
                "dask cluster",
                cfg["timeout"] * 4,
                lambda: dask_abcd(cfg, only, dk, res),
            )
        if "e" in only:
            print("== e: worker process start -> first task", flush=True)
            jq["e"] = guarded(res, "e", "jobqueue-ms", 180, lambda: jq_e(cfg, tmp))
            dk["e"] = guarded(res, "e", "dask", 180, lambda: dask_e(cfg, tmp))
        if "f" in only:
            print(
                f"== f: scheduler RSS per queued task ({cfg['f_tasks']:,} tasks, no workers)",
                flush=True,
            )
            jq["f"] = guarded(res, "f", "jobqueue-ms", cfg["timeout"], lambda: jq_f(cfg, tmp))
            dk["f"] = guarded(res, "f", "dask", cfg["timeout"], lambda: dask_f(cfg, tmp))
        if "g" in only:
            print("== g: 1 vs 2 schedulers sharing 2 workers (jobqueue-ms)", flush=True)
            jq["g"] = guarded(res, "g", "jobqueue-ms", cfg["timeout"] * 3, lambda: jq_g(cfg))
        if "h" in only:
            print(
                "== h: CurveZMQ on (the default) vs plaintext (jobqueue-ms; large values over "
                "TCP, as between hosts)",
                flush=True,
            )
            jq["h"] = guarded(res, "h", "jobqueue-ms", cfg["timeout"] * 4, lambda: jq_h(cfg))
    finally:
        PROCS.stop_all()
    elapsed = time.perf_counter() - t_start

    def pick(d: dict[str, Any], key: str, sub: Any = None) -> Any:
        v = d.get(key)
        if isinstance(v, str) or v is None or sub is None:
            return v
        return v[sub]

    n, m = cfg["a_tasks"], cfg["c_len"]
    if "a" in only:
        res.add(
            "a",
            f"{n:,} no-ops, bulk (submit_many / dask map)",
            "tasks/s",
            pick(jq, "a_bulk"),
            pick(dk, "a_bulk"),
            "high",
        )
        res.add(
            "a",
            f"{n:,} no-ops, submit loop",
            "tasks/s",
            pick(jq, "a_loop"),
            pick(dk, "a_loop"),
            "high",
        )
    if "b" in only:
        res.add(
            "b",
            f"round trip median ({cfg['b_n']} sequential)",
            "ms",
            pick(jq, "b", 0),
            pick(dk, "b", 0),
            "low",
        )
        res.add("b", "round trip p99", "ms", pick(jq, "b", 1), pick(dk, "b", 1), "low")
    if "c" in only:
        res.add("c", f"{m:,}-task chain, total", "s", pick(jq, "c", 0), pick(dk, "c", 0), "low")
        res.add("c", f"{m:,}-task chain, per task", "ms", pick(jq, "c", 1), pick(dk, "c", 1), "low")
    if "d" in only:
        res.add(
            "d",
            f"{cfg['d_n']} x {cfg['d_size'] // MB} MB bytes gathered",
            "MB/s",
            pick(jq, "d_bytes"),
            pick(dk, "d_bytes"),
            "high",
        )
        res.add(
            "d",
            f"{cfg['d_n']} x {cfg['d_size'] // MB} MB bytes gathered again (memory reused)",
            "MB/s",
            pick(jq, "d_bytes2"),
            pick(dk, "d_bytes2"),
            "high",
        )
        if np is not None:
            res.add(
                "d",
                f"{cfg['d_n']} x {cfg['d_size'] // MB} MB NumPy arrays gathered",
                "MB/s",
                pick(jq, "d_numpy"),
                pick(dk, "d_numpy"),
                "high",
            )
    if "e" in only:
        res.add(
            "e",
            f"worker start -> first task (median of {cfg['e_reps']})",
            "s",
            pick(jq, "e", "start"),
            pick(dk, "e", "start"),
            "low",
        )
        res.add(
            "e",
            "import worker module (python -c; incl. interpreter)",
            "s",
            pick(jq, "e", "import"),
            pick(dk, "e", "import"),
            "low",
        )
        res.add(
            "e",
            "bare interpreter (python -c pass)",
            "s",
            pick(jq, "e", "python"),
            pick(dk, "e", "python"),
            "low",
        )
    if "f" in only:
        res.add(
            "f",
            f"scheduler RSS growth per queued task ({cfg['f_tasks']:,})",
            "bytes",
            pick(jq, "f", "per_task"),
            pick(dk, "f", "per_task"),
            "low",
        )
        res.add(
            "f",
            f"time to queue {cfg['f_tasks']:,} tasks on the scheduler",
            "s",
            pick(jq, "f", "queue_s"),
            pick(dk, "f", "queue_s"),
            "low",
        )
    if "g" in only:
        g = jq.get("g")
        ok = isinstance(g, dict)
        res.add(
            "g",
            f"1 scheduler, submit_many {cfg['g_tasks']:,}",
            "tasks/s",
            g["one"] if ok else g,
            None,
            "high",
        )
        res.add(
            "g",
            "2 schedulers, one client on both",
            "tasks/s",
            g["two_one_client"] if ok else g,
            None,
            "high",
        )
        res.add(
            "g",
            "2 schedulers, two clients (one each, concurrent)",
            "tasks/s",
            g["two_two_clients"] if ok else g,
            None,
            "high",
        )
        if ok and g["one"]:
            res.add(
                "g",
                "aggregate 2 schedulers / 1 scheduler (one client on both)",
                "x",
                g["two_one_client"] / g["one"],
                None,
                "high",
            )
            res.add(
                "g",
                "aggregate 2 schedulers / 1 scheduler (two clients)",
                "x",
                g["two_two_clients"] / g["one"],
                None,
                "high",
            )

    print()
    print("ratio > 1 means jobqueue-ms is better: rates jq/dask, times and bytes dask/jq")
    print()
    header = "| sec | figure | unit | jobqueue-ms | dask | ratio |"
    print(header)
    print("|---|---|---|---:|---:|---:|")
    for r in res.rows:
        ratio = f"{r['ratio']:.1f}x ({r['ratio_means']})" if r["ratio"] else "-"
        print(
            f"| {r['section']} | {r['what']} | {r['unit']} | {fmt(r['jobqueue_ms'])} | "
            f"{fmt(r['dask'])} | {ratio} |"
        )
    print()
    h = jq.get("h")
    if isinstance(h, dict):
        on, off = h["curve"], h["plaintext"]
        print(
            "h: what encryption costs (jobqueue-ms; best of 2 rounds each, alternated; large "
            "values over TCP, as between hosts: JOBQUEUE_MS_LOCAL_DATA=0)"
        )
        print()
        print("| sec | figure | unit | CurveZMQ (default) | plaintext | CURVE / plaintext |")
        print("|---|---|---|---:|---:|---:|")
        print(
            f"| h | {cfg['h_tasks']:,} no-ops, submit_many | tasks/s | {fmt(on['rate'])} | "
            f"{fmt(off['rate'])} | {on['rate'] / off['rate']:.2f}x |"
        )
        print(
            f"| h | round trip median ({cfg['b_n']} sequential) | ms | {fmt(on['rtt_ms'])} | "
            f"{fmt(off['rtt_ms'])} | {on['rtt_ms'] / off['rtt_ms']:.2f}x |"
        )
        if "gather_mb_s" in on and "gather_mb_s" in off:
            print(
                f"| h | {cfg['d_n']} x {cfg['d_size'] // MB} MB NumPy arrays gathered | MB/s | "
                f"{fmt(on['gather_mb_s'])} | {fmt(off['gather_mb_s'])} | "
                f"{on['gather_mb_s'] / off['gather_mb_s']:.2f}x |"
            )
        print()
    if isinstance(jq.get("b"), (list, tuple)) and len(jq["b"]) > 2:
        where = jq["b"][2]
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in where["cpu_us"].items())
        print(
            f"b: per jobqueue-ms round trip: CPU µs {cpu} (workers: both, with nannies); "
            f"messages the scheduler receives: {where['scheduler_messages']:.2f}"
        )
    if isinstance(jq.get("g"), dict):
        print(
            f"g: tasks done per scheduler (one client on both): {jq['g']['two_one_client_split']}"
        )
    if isinstance(jq.get("e"), dict):
        print(
            f"e: jobqueue-ms start times {[round(x, 3) for x in jq['e']['starts']]}; "
            f"dask {[round(x, 3) for x in dk['e']['starts']] if isinstance(dk.get('e'), dict) else '-'}"  # noqa: E501
        )
    print(f"total benchmark time: {elapsed:.1f} s")
    if res.errors:
        print("ERRORS:")
        for e in res.errors:
            print("  " + e)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {
                    "machine": info,
                    "sizes": cfg,
                    "rows": res.rows,
                    "errors": res.errors,
                    "raw": {"jobqueue_ms": jq, "dask": dk},
                    "elapsed_s": elapsed,
                },
                f,
                indent=1,
                default=str,
            )
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
