"""Exceptions raised to users of the runtime."""

from __future__ import annotations


class JobqueueError(Exception):
    """Base class of jobqueue-ms errors."""


class CommError(JobqueueError, OSError):
    """A scheduler or worker could not be reached, or stopped answering."""


class VersionMismatchError(JobqueueError):
    """Two processes of one cluster run incompatible versions; the message names both."""


class KilledWorkerError(JobqueueError):
    """A task was running on workers that died, more times than allowed."""


class LostDataError(JobqueueError):
    """A result was lost with the worker that held it and could not be recomputed."""


class TooManyTasksError(JobqueueError):
    """A client would hold more tasks on a scheduler than its ``max_tasks_per_client``."""


class SchedulerLostError(JobqueueError):
    """Every scheduler a client knows is gone."""


class RemoteTraceback(Exception):
    """Carries the text of a traceback from the worker; set as ``__cause__`` of remote errors."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
