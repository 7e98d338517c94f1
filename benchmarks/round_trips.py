#!/usr/bin/env python
"""Sequential round trips in longer samples than ``scripts/bench`` (b) takes.

    .venv/bin/python benchmarks/round_trips.py            # 5 x 1,000 round trips
    .venv/bin/python benchmarks/round_trips.py --n 300 --reps 3

One ``LocalCluster(n_schedulers=1, n_workers=2, threads_per_worker=1)``; 200 bulk no-ops and 30
``inc`` to warm up, then ``--reps`` times ``--n`` sequential ``client.submit(inc, i).result()``,
printing each median and, at the end, how many tasks each worker ran on its I/O thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

from jobqueue_ms import Client, LocalCluster


def inc(x: int) -> int:
    return x + 1


def noop(x: object = None) -> None:
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="round trips per sample (default 1000)")
    ap.add_argument("--reps", type=int, default=5, help="samples (default 5)")
    args = ap.parse_args()
    if args.n < 1 or args.reps < 1:
        ap.error("--n and --reps must be positive integers")
    with LocalCluster(n_schedulers=1, n_workers=2, threads_per_worker=1) as cluster:
        cluster.wait_for_workers(2)
        with Client(cluster) as client:
            client.gather(client.submit_many(noop, range(200)))
            for i in range(30):
                client.submit(inc, i).result(timeout=10)
            for _ in range(args.reps):
                lat = []
                for i in range(args.n):
                    t0 = time.perf_counter()
                    assert client.submit(inc, i).result(timeout=10) == i + 1
                    lat.append(time.perf_counter() - t0)
                print(f"median {statistics.median(lat) * 1e3:.3f} ms over {args.n}", flush=True)
            total = 200 + 30 + args.reps * args.n
            deadline = time.monotonic() + 10  # the workers report with their heartbeats
            while time.monotonic() < deadline:
                workers = client.scheduler_info()[0]["workers"]
                if sum(sum(w["executed"].values()) for w in workers) >= total:
                    break
            for w in workers:
                ran = sum(w["executed"].values())
                print(f"{w['name']}: {w['inline']['runs']} of {ran} tasks ran on its I/O thread")


if __name__ == "__main__":
    main()
