"""Run by the MPI bootstrap: SIGKILL one worker rank mid-run; the work must still complete."""

from __future__ import annotations

import os
import signal
import time

from jobqueue_ms.mpi import client


def slow_square(x: int) -> int:
    time.sleep(0.05)
    return x * x


def main() -> None:
    c = client()
    pids = sorted({w["pid"] for info in c.scheduler_info() for w in info["workers"]})
    assert len(pids) >= 2, pids
    futures = [c.submit(slow_square, i) for i in range(120)]
    deadline = time.monotonic() + 30
    while sum(f.done() for f in futures) < 10:  # mid-run: some done, most still to do
        assert time.monotonic() < deadline, "no progress before the kill"
        time.sleep(0.01)
    victim = pids[-1]
    record = os.environ.get("JQMS_TEST_KILL_RECORD")
    if record:  # evidence that survives an MPI launcher that drops this rank's output
        with open(record, "w") as f:
            f.write(f"{victim}\n")
    os.kill(victim, signal.SIGKILL)
    print(f"KILLED {victim}", flush=True)
    results = c.gather(futures)
    assert results == [i * i for i in range(120)]
    print(f"DONE {sum(results)}", flush=True)


if __name__ == "__main__":
    main()
