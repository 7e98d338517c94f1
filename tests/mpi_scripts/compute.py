"""Run by the MPI bootstrap: compute on the cluster, check the results, print them."""

from __future__ import annotations

import os
import sys

from jobqueue_ms.mpi import client, scheduler_addresses
from jobqueue_ms.runtime.client import Client


def square(x: int) -> int:
    return x * x


def where(_: int) -> int:
    return os.getpid()


def main() -> None:
    c = client()
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    assert len(scheduler_addresses()) == len(c.addresses), (scheduler_addresses(), c.addresses)
    results = list(c.map(square, range(n)))
    assert results == [x * x for x in range(n)], results[:10]
    pids = set(c.map(where, range(50)))
    with Client() as plain:  # finds the bootstrap through JOBQUEUE_MS_SCHEDULER
        assert plain.submit(sum, [1, 2, 3]).result(30) == 6
    info = c.scheduler_info()
    print(f"SCHEDULERS {len(c.addresses)}")
    print(f"WORKERS {len(info[0]['workers'])}")
    print(f"SUM {sum(results)}")
    print(f"PIDS {len(pids)}")
    print(f"ARGV {sys.argv[1:]}")
    print(f"ADDRESSES {' '.join(scheduler_addresses())}")
    print(f"WORKER_HOSTS {sorted({w['host'] for i in info for w in i['workers']})}")
    # what --threads-per-worker and --memory-limit gave the workers, as the schedulers see it
    print(f"NTHREADS {sorted({w['nthreads'] for i in info for w in i['workers']})}")
    limits = {w["memory_limit_bytes"] for i in info for w in i["workers"]}
    print(f"MEMORY_LIMITS {sorted(limits, key=str)}")


if __name__ == "__main__":
    main()
