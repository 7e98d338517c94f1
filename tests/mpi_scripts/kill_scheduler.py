"""Run by the MPI bootstrap: SIGKILL one of the scheduler ranks mid-run; the work must complete.

The scheduler rank is found by the port it listens on (every rank runs on this machine).
"""

from __future__ import annotations

import os
import signal
import time

import psutil

from jobqueue_ms.mpi import client, scheduler_addresses


def slow_square(x: int) -> int:
    time.sleep(0.05)
    return x * x


def listening_pid(address: str) -> int:
    port = int(address.rsplit(":", 1)[1])
    (pid,) = {
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
    }
    return pid


def main() -> None:
    c = client()
    addresses = scheduler_addresses()
    assert len(addresses) == 2, addresses
    victim = listening_pid(addresses[1])
    assert victim != os.getpid()
    futures = [c.submit(slow_square, i) for i in range(120)]
    deadline = time.monotonic() + 30
    while sum(f.done() for f in futures) < 10:  # mid-run: some done, most still to do
        assert time.monotonic() < deadline, "no progress before the kill"
        time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)
    print(f"KILLED SCHEDULER {victim}", flush=True)
    results = c.gather(futures)
    assert results == [i * i for i in range(120)]
    more = list(c.map(slow_square, range(20)))  # new work goes to the scheduler left
    assert more == [i * i for i in range(20)]
    print(f"DONE {sum(results)}", flush=True)


if __name__ == "__main__":
    main()
