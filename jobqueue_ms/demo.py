"""``jobqueue-ms demo``: a real workload on a LocalCluster with several schedulers."""

from __future__ import annotations

import time
from collections.abc import Callable


def _square(x: int) -> int:
    return x * x


def _add(a: int, b: int) -> int:
    return a + b


def _tree_sum(client, futures):  # type: ignore[no-untyped-def]
    """Sum futures pairwise as a dependency graph (inputs move worker to worker)."""
    while len(futures) > 1:
        nxt = [
            client.submit(_add, futures[i], futures[i + 1]) for i in range(0, len(futures) - 1, 2)
        ]
        if len(futures) % 2:
            nxt.append(futures[-1])
        futures = nxt
    return futures[0]


def run_demo(
    n_schedulers: int, n_workers: int, n_tasks: int, echo: Callable[[str], None] = print
) -> int:
    """Start a cluster, run many independent tasks plus a dependency graph, print figures."""
    from .deploy.local import LocalCluster
    from .runtime.client import Client

    t0 = time.perf_counter()
    with LocalCluster(n_schedulers=n_schedulers, n_workers=n_workers) as cluster:
        cluster.wait_for_workers(n_workers)
        echo(f"cluster: {cluster!r} (started in {time.perf_counter() - t0:.2f} s)")
        with Client(cluster) as client:
            t1 = time.perf_counter()
            futures = client.submit_many(_square, range(n_tasks))
            squares = client.gather(futures)
            t2 = time.perf_counter()
            expected = sum(x * x for x in range(n_tasks))
            assert sum(squares) == expected, "wrong sum of squares"
            echo(
                f"{n_tasks} tasks: sum of squares = {sum(squares)} "
                f"({n_tasks / (t2 - t1):,.0f} tasks/s)"
            )
            leaves = client.submit_many(_square, range(1024))
            total = _tree_sum(client, leaves).result()
            t3 = time.perf_counter()
            assert total == sum(x * x for x in range(1024)), "wrong tree sum"
            echo(
                f"dependency graph (1024 leaves, 1023 pairwise sums): total = {total} "
                f"({t3 - t2:.2f} s)"
            )
            per_sched = [i["counters"]["tasks_done"] for i in client.scheduler_info()]
            echo(f"tasks done per scheduler: {per_sched}")
    echo("ok")
    return 0
