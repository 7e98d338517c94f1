"""Run by the MPI bootstrap: use the cluster, then fail with the exit code given (or raise)."""

from __future__ import annotations

import sys

from jobqueue_ms.mpi import client

assert client().submit(abs, -4).result(30) == 4
if sys.argv[1] == "raise":
    raise RuntimeError("the script failed on purpose")
sys.exit(int(sys.argv[1]))
