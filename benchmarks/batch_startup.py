#!/usr/bin/env python
"""Batch job startup on the real local SLURM (issue 3, "Measure").

    scripts/bench-batch                 # 5 rounds (what docs/performance.md reports)
    scripts/bench-batch --runs 3 --json out.json

Measures the time from ``cluster.scale(jobs=1)`` to the first worker registered, split into
stages, and in the same run (rounds interleaved, so both see the same machine) a bare
``sbatch --wrap`` of a command as cheap as ``true``:

  submit          scale(jobs=1) called -> returned (it runs sbatch and records the id)
  queue wait      -> the job script's first line ran (a ``date`` in the prologue)
  script -> exec  -> the worker's interpreter was started (its process start time, 10 ms ticks)
  imports         every import the worker process made (``PYTHONPROFILEIMPORTTIME``, summed)
  start+connect   the rest up to the worker's own "registered" log line: interpreter start-up,
                  the CLI, the nanny's fork, connecting and registering with the scheduler
  seen            -> the client's first ``cluster.workers`` that lists it (polled every 5 ms)

The bare job is ``sbatch --wrap 'date +%s.%N > FILE'`` (``true``, plus a timestamp saying
when it ran) and ``sbatch --wrap true`` until ``scontrol`` no longer says PENDING/RUNNING.
The SLURM is ci/slurm/start's (partition ``debug``); ``scripts/bench-batch`` starts it.

slurmctld allocates a submitted job on its next scheduling pass, up to about a second later
(its log: ``_slurm_rpc_submit_batch_job`` then ``sched: Allocate``), so the queue wait of one
job is anywhere in 0-1 s. Each submission waits a random 0-1 s first, so that the cluster's and
the bare jobs sample that tick at random phases rather than at a fixed offset; compare medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from jobqueue_ms.batch.slurm import SLURMCluster
from jobqueue_ms.config import Config

POLL_S = 0.005
STAGES = ("submit", "queue wait", "script -> exec", "imports", "start+connect", "seen")


def sh(*argv: str) -> str:
    """Run a command; return stdout or fail showing stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    """Poll ``predicate`` every POLL_S until truthy; return it (RuntimeError at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout} s")
        time.sleep(POLL_S)


# ---------------------------------------------------------------------------- bare sbatch
def bare_timestamp(partition: str, directory: Path) -> dict[str, float]:
    """sbatch --wrap 'date > FILE': submit, submit -> command ran, submit -> file seen."""
    stamp = directory / f"bare-{time.monotonic_ns()}.t"
    t0 = time.time()
    job_id = sh(
        "sbatch", "--parsable", f"--partition={partition}", "--mem=100M",
        f"--output={directory}/bare-%j.out", f"--wrap=date +%s.%N > {stamp}",
    ).split(";")[0].strip()  # fmt: skip
    t1 = time.time()

    def ran() -> float | None:
        text = stamp.read_text().strip() if stamp.exists() else ""
        return float(text) if re.fullmatch(r"\d+\.\d+", text) else None

    t_ran = wait_for(ran, 120, f"timestamp of bare job {job_id}")
    t_seen = time.time()
    return {"submit": t1 - t0, "queue wait": t_ran - t1, "total": t_ran - t0, "seen": t_seen - t0}


def bare_true(partition: str, directory: Path) -> dict[str, float]:
    """sbatch --wrap true, until scontrol shows it ended (polled every 20 ms)."""
    t0 = time.time()
    job_id = sh(
        "sbatch", "--parsable", f"--partition={partition}", "--mem=100M",
        f"--output={directory}/true-%j.out", "--wrap=true",
    ).split(";")[0].strip()  # fmt: skip
    t1 = time.time()

    def ended() -> bool:
        out = subprocess.run(
            ["scontrol", "show", "job", job_id], capture_output=True, text=True, check=False
        ).stdout
        state = re.search(r"JobState=(\S+)", out)
        return state is None or state.group(1) not in ("PENDING", "RUNNING", "CONFIGURING")

    deadline = time.monotonic() + 120
    while not ended():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bare job {job_id} did not end within 120 s")
        time.sleep(0.02)
    return {"submit": t1 - t0, "ended": time.time() - t0}


# ---------------------------------------------------------------------------- the cluster
def worker_times(log_text: str, worker: str) -> tuple[float, float, float]:
    """(script start, registered at, import seconds) from a job log."""
    start = re.search(r"^jqms-bench script-start (\d+\.\d+)$", log_text, re.MULTILINE)
    registered = re.search(
        rf"^(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{{3}}) \S+ INFO worker {re.escape(worker)} "
        "registered with",
        log_text,
        re.MULTILINE,
    )
    if not start or not registered:
        raise RuntimeError(f"the job log lacks the timestamps:\n{log_text[-2000:]}")
    t_reg = time.mktime(time.strptime(registered.group(1), "%Y-%m-%d %H:%M:%S"))
    t_reg += int(registered.group(2)) / 1000
    # "import time: self [us] | cumulative | package"; top-level imports are not indented.
    imports_us = sum(
        int(m.group(1))
        for m in re.finditer(r"^import time:\s+\d+ \|\s+(\d+) \| (?! )\S", log_text, re.MULTILINE)
    )
    return float(start.group(1)), t_reg, imports_us / 1e6


def exec_time(worker: str) -> float:
    """Epoch time the worker's interpreter started (the nanny: the oldest process named so).

    From /proc/<pid>/stat's start time in clock ticks since boot (10 ms), against the boot
    clock now; psutil's create_time() adds /proc/stat's btime, which is whole seconds.
    """
    pids = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if f"--name {worker}" in " ".join(p.info["cmdline"] or [])
        and "jobqueue_ms" in " ".join(p.info["cmdline"] or [])
    ]
    if not pids:
        raise RuntimeError(f"no process of worker {worker}")
    ticks = os.sysconf("SC_CLK_TCK")
    starts = []
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        starts.append(int(fields[19]) / ticks)  # field 22, "starttime"
    since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.time() - (since_boot - min(starts))


def cluster_round(cluster: SLURMCluster) -> dict[str, float]:
    """scale(jobs=1) -> first worker registered, split into stages; then scale(0)."""
    before = set(cluster.jobs)
    t0 = time.time()
    cluster.scale(jobs=1)
    t1 = time.time()
    (name,) = set(cluster.jobs) - before
    worker = f"{name}-0"
    wait_for(lambda: worker in cluster.workers, 120, f"worker {worker}")
    t_seen = time.time()
    record = cluster.jobs[name]
    t_exec = exec_time(worker)
    log_path = Path(record.log_path or "")
    start, registered, imports = wait_for(
        lambda: _times_or_none(log_path, worker), 30, f"timestamps in {log_path}"
    )
    cluster.scale(0)
    wait_for(lambda: record.state.finished, 120, f"job {name} to end")
    return {
        "submit": t1 - t0,
        "queue wait": start - t1,
        "script -> exec": t_exec - start,
        "imports": imports,
        "start+connect": registered - t_exec - imports,
        "seen": t_seen - registered,
        "total": t_seen - t0,
    }


def _times_or_none(path: Path, worker: str) -> tuple[float, float, float] | None:
    try:
        return worker_times(path.read_text(), worker)
    except (OSError, RuntimeError):
        return None


# ---------------------------------------------------------------------------- references
def python_start(python: str, code: str, n: int = 5) -> float:
    """Median wall time of ``python -c code`` (fresh interpreter each time)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([python, "-c", code], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def registration(n: int = 5) -> float:
    """Median time from Worker.run() (a thread here) to its scheduler listing it, no queue."""
    import threading

    from jobqueue_ms.runtime.admin import SchedulerAdmin
    from jobqueue_ms.runtime.scheduler import Scheduler
    from jobqueue_ms.runtime.worker import Worker

    scheduler = Scheduler(host="127.0.0.1", port=0)
    address = scheduler.start()
    admin = SchedulerAdmin([address])
    times = []
    try:
        for i in range(n):
            worker = Worker([address], name=f"bench-{i}")
            t0 = time.perf_counter()
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            wait_for(
                lambda i=i: any(w["name"] == f"bench-{i}" for w in admin.info()[0]["workers"]),
                30,
                "the worker to register",
            )
            times.append(time.perf_counter() - t0)
            worker.stop()
            thread.join(30)
    finally:
        admin.close()
        scheduler.stop()
    return statistics.median(times)


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds of each measurement")
    parser.add_argument("--partition", default="debug")
    parser.add_argument("--json", default=None, help="also write every figure here")
    parser.add_argument("--seed", type=int, default=3, help="of the random submit phases")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    directory = Path(tempfile.mkdtemp(prefix="jqms-bench-batch-"))
    t_make = time.time()
    cluster = SLURMCluster(
        cores=1,
        memory="1GiB",
        walltime="00:10:00",
        queue=args.partition,
        python=sys.executable,
        log_directory=str(directory),
        poll_interval=1,
        job_script_prologue=[
            'echo "jqms-bench script-start $(date +%s.%N)"',
            "export PYTHONPROFILEIMPORTTIME=1",
        ],
        worker_extra_args=["--log-level", "info"],
        config=Config(),
    )
    made_s = time.time() - t_make
    rounds: list[dict[str, float]] = []
    stamps: list[dict[str, float]] = []
    trues: list[dict[str, float]] = []
    try:
        for i in range(args.runs):
            time.sleep(rng.uniform(0, 1))  # a random phase against slurmctld's scheduling pass
            stamps.append(bare_timestamp(args.partition, directory))
            time.sleep(rng.uniform(0, 1))
            trues.append(bare_true(args.partition, directory))
            time.sleep(rng.uniform(0, 1))
            rounds.append(cluster_round(cluster))
            print(
                f"round {i + 1}: cluster {rounds[-1]['total']:.3f} s, "
                f"bare (command ran) {stamps[-1]['total']:.3f} s, "
                f"bare true ended {trues[-1]['ended']:.3f} s",
                flush=True,
            )
    finally:
        cluster.close()
    py = sys.executable
    refs = {
        "python -c pass": python_start(py, "pass"),
        "python -c 'import jobqueue_ms.cli, jobqueue_ms.runtime.nanny, ...worker'": python_start(
            py, "import jobqueue_ms.cli, jobqueue_ms.runtime.nanny, jobqueue_ms.runtime.worker"
        ),
        "Worker.run() in a thread -> listed by its scheduler (no queue, no new process)": (
            registration()
        ),
    }

    total = median(rounds, "total")
    bare_total = median(stamps, "total")
    print()
    print(f"SLURMCluster(...) with its local scheduler: {made_s:.3f} s (not in the figures below)")
    print(f"medians of {args.runs} rounds, seconds (min-max):")
    print(f"  {'stage':<22}{'cluster':>10}   {'bare sbatch --wrap':>20}")
    for stage in STAGES:
        values = [r[stage] for r in rounds]
        bare = f"{median(stamps, stage):.3f}" if stage in ("submit", "queue wait") else "-"
        print(
            f"  {stage:<22}{statistics.median(values):>10.3f}   {bare:>20}"
            f"   ({min(values):.3f}-{max(values):.3f})"
        )
    print(f"  {'total':<22}{total:>10.3f}   {bare_total:>20.3f}")
    print(
        f"  means: cluster total {statistics.mean(r['total'] for r in rounds):.3f}, "
        f"queue wait {statistics.mean(r['queue wait'] for r in rounds):.3f}; bare total "
        f"{statistics.mean(r['total'] for r in stamps):.3f}, "
        f"queue wait {statistics.mean(r['queue wait'] for r in stamps):.3f}"
    )
    print(f"  bare sbatch --wrap true, submit -> scontrol says ended: {median(trues, 'ended'):.3f}")
    print(f"ratio cluster / bare (scale -> worker registered vs sbatch -> command ran): "
          f"{total / bare_total:.2f}x; the difference: {total - bare_total:.3f} s")  # fmt: skip
    for label, value in refs.items():
        print(f"reference: {label}: {value:.3f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "machine": {
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "load": os.getloadavg(),
                    },
                    "cluster_start_s": made_s,
                    "cluster": rounds,
                    "bare_timestamp": stamps,
                    "bare_true": trues,
                    "references": refs,
                },
                indent=1,
            )
        )
    subprocess.run(["rm", "-rf", str(directory)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
