"""Render ssh.sh.j2 through SSHCluster itself, for the golden files of tests/golden/ssh/.

An SSHCluster whose schedulers are given (its ``_start_schedulers`` hook returns fixed
addresses) reaches no host, so ``job_script()`` renders exactly what SSHCluster would run there.
test_batch_templates.py uses this module, and test_batch_wheel.py copies it next to the installed
wheel's interpreter to render the same cases from there.
"""

from __future__ import annotations

from typing import Any

from jobqueue_ms.deploy.ssh import SSHCluster

# (case) -> SSHCluster options; the host is an address, so `ssh -G` keeps it as it is.
SSH_CASES: dict[str, dict[str, Any]] = {
    "basic": {"workers_per_host": 2, "threads_per_worker": 4, "memory_limit": "4GiB"},
    "full": {
        "workers_per_host": 1,
        "threads_per_worker": 8,
        "memory_limit": "16GB",
        "prologue": ["source /opt/venv/bin/activate", "module load gcc"],
        "env": {"OMP_NUM_THREADS": "1", "SITE_NOTE": "a b"},
        "lifetime": "1h",
        "remote_directory": "/scratch/jqms",
    },
}


class GivenSchedulersSSHCluster(SSHCluster):
    """An SSHCluster whose schedulers already run at ``addresses`` (nothing is started)."""

    def __init__(self, addresses: list[str], **options: Any) -> None:
        self._given_addresses = list(addresses)
        super().__init__(**options)

    def _start_schedulers(self) -> list[str]:
        return list(self._given_addresses)


def render_ssh_case(case: str, addresses: list[str], python: str) -> str:
    """The script of SSH golden ``case``, as SSHCluster.job_script() renders it."""
    cluster = GivenSchedulersSSHCluster(
        addresses,
        hosts=["10.1.0.7"],
        python=python,
        name="jqms-golden",
        poll_interval=3600,  # the sync loop never asks the (absent) schedulers
        **SSH_CASES[case],
    )
    try:
        return cluster.job_script()
    finally:
        cluster.close()
