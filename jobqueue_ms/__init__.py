"""jobqueue-ms: parallel Python on SLURM, SGE, PBS, LSF, SSH hosts or one MPI allocation.

Public names are imported lazily (PEP 562) so that ``python -m jobqueue_ms worker``,
started by the thousand from a shared filesystem, imports only the runtime it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .adaptive import Adaptive
    from .batch.lsf import LSFCluster
    from .batch.pbs import PBSCluster
    from .batch.sge import SGECluster
    from .batch.slurm import SLURMCluster
    from .deploy.local import LocalCluster
    from .deploy.ssh import SSHCluster
    from .runtime.client import Client, Future, as_completed, wait
    from .runtime.errors import (
        CommError,
        JobqueueError,
        KilledWorkerError,
        LostDataError,
        VersionMismatchError,
    )
    from .runtime.scheduler import Scheduler
    from .runtime.worker import Worker

_LAZY: dict[str, str] = {
    "Client": "jobqueue_ms.runtime.client",
    "Future": "jobqueue_ms.runtime.client",
    "wait": "jobqueue_ms.runtime.client",
    "as_completed": "jobqueue_ms.runtime.client",
    "Scheduler": "jobqueue_ms.runtime.scheduler",
    "Worker": "jobqueue_ms.runtime.worker",
    "JobqueueError": "jobqueue_ms.runtime.errors",
    "CommError": "jobqueue_ms.runtime.errors",
    "KilledWorkerError": "jobqueue_ms.runtime.errors",
    "LostDataError": "jobqueue_ms.runtime.errors",
    "VersionMismatchError": "jobqueue_ms.runtime.errors",
    "LocalCluster": "jobqueue_ms.deploy.local",
    "SSHCluster": "jobqueue_ms.deploy.ssh",
    "SLURMCluster": "jobqueue_ms.batch.slurm",
    "SGECluster": "jobqueue_ms.batch.sge",
    "PBSCluster": "jobqueue_ms.batch.pbs",
    "LSFCluster": "jobqueue_ms.batch.lsf",
    "Adaptive": "jobqueue_ms.adaptive",
}

__all__ = [
    "__version__",
    "Adaptive",
    "Client",
    "CommError",
    "Future",
    "JobqueueError",
    "KilledWorkerError",
    "LSFCluster",
    "LocalCluster",
    "LostDataError",
    "PBSCluster",
    "SGECluster",
    "SLURMCluster",
    "SSHCluster",
    "Scheduler",
    "VersionMismatchError",
    "Worker",
    "as_completed",
    "wait",
]
assert set(__all__) == {"__version__", *_LAZY}


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jobqueue_ms' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
