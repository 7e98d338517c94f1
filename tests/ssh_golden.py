"""The golden cases of ssh.sh.j2 (tests/golden/ssh/<role>/<case>.sh), shared by test_ssh.py and
test_batch_wheel.py (which copies this file next to an installed wheel to render them there)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jobqueue_ms.deploy.ssh import render_script

GOLDEN = Path(__file__).parent / "golden" / "ssh"
UPDATE = os.environ.get("UPDATE_GOLDENS") == "1"
PY = "/opt/venv/bin/python"
SCHED = ["tcp://10.0.0.1:40001", "tcp://10.0.0.2:40002"]


def _worker_argv(name: str, i: int, address: str) -> list[str]:
    argv = [PY, "-m", "jobqueue_ms", "worker"]
    for a in SCHED:
        argv += ["--scheduler", a]
    return [*argv, "--nthreads", "2", "--name", f"{name}-{i}", "--job", name, "--host", address]


GOLDEN_CASES: dict[tuple[str, str], dict[str, Any]] = {
    ("worker", "basic"): dict(
        role="worker",
        name="jqms-ab12-1",
        host="node1",
        address="10.0.0.1",
        processes=[_worker_argv("jqms-ab12-1", i, "10.0.0.1") for i in range(2)],
        exit_file="/tmp/jqms-ab12/jqms-ab12-1.exit",
    ),
    ("worker", "prologue-env"): dict(
        role="worker",
        name="jqms-ab12-2",
        host="me@vm1",
        address="192.168.7.5",
        processes=[_worker_argv("jqms-ab12-2", 0, "192.168.7.5")],
        exit_file="/scratch/me dir/jqms-ab12/jqms-ab12-2.exit",
        prologue=["module load gcc/12", "source /opt/venv/bin/activate"],
        env={"OMP_NUM_THREADS": "1", "TRICKY": "it's $HOME"},
    ),
    ("scheduler", "basic"): dict(
        role="scheduler",
        name="scheduler-0",
        host="node1",
        address="10.0.0.1",
        processes=[
            [PY, "-m", "jobqueue_ms", "scheduler", "--host", "10.0.0.1", "--port", "0"]
            + ["--scheduler-file", "/tmp/jqms-ab12/scheduler-0.json", "--cluster-id", "ab12"]
        ],
        exit_file="/tmp/jqms-ab12/scheduler-0.exit",
        prologue=["module load gcc/12"],
    ),
}


def render_case(role: str, case: str) -> str:
    """The script of SSH golden ``(role, case)``, rendered as SSHCluster renders it."""
    return render_script(**GOLDEN_CASES[role, case])
