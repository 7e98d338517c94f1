"""Started by mpirun directly: the in-script form, initialize() then plain Client().

argv[1]: the exit code to leave with (default 0), or ``raise`` for an uncaught exception.
"""

from __future__ import annotations

import sys

from jobqueue_ms.mpi import client, initialize
from jobqueue_ms.runtime.client import Client

c = initialize(n_schedulers=2)  # only the client rank gets past this line
assert c is client()
with Client() as plain:
    assert plain.submit(pow, 2, 10).result(30) == 1024
print(f"IN_SCRIPT {sum(c.map(abs, range(-5, 0)))}", flush=True)
if sys.argv[1:] == ["raise"]:
    raise RuntimeError("the in-script client failed on purpose")
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
