"""The rank layout of the MPI bootstrap: which rank is a scheduler, the client or a worker.

Pure (standard library only) and shared by ``jobqueue_ms.mpi`` (which starts the ranks) and
``jobqueue_ms.submit`` (which checks a layout before submitting anything), so that neither has
to import the other: nothing imports ``mpi`` (see STYLE.md, section 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RoleKind = Literal["scheduler", "client", "worker"]


@dataclass(frozen=True)
class Role:
    """What one MPI rank does.

    ``kind`` is ``"scheduler"`` (then ``scheduler_index`` is 0..N-1), ``"client"`` (runs the
    script) or ``"worker"``. ``runs_worker`` is True when the rank serves tasks too: always for
    workers, and for every rank under ``workers_everywhere``.
    """

    kind: RoleKind
    scheduler_index: int | None = None
    runs_worker: bool = False


def min_world_size(
    n_schedulers: int, workers_everywhere: bool = False, has_client: bool = True
) -> int:
    """Smallest MPI world that fits the layout (at least one rank must run a worker)."""
    base = n_schedulers + (1 if has_client else 0)
    return max(base, 1) if workers_everywhere else base + 1


def role_for(
    rank: int,
    world_size: int,
    n_schedulers: int,
    client_rank: int | None = None,
    workers_everywhere: bool = False,
    *,
    has_client: bool = True,
) -> Role:
    """The role of ``rank`` in a world of ``world_size`` ranks (pure; same answer on every rank).

    Schedulers take the first ``n_schedulers`` ranks that are not the client rank; the client rank
    defaults to ``n_schedulers`` (just after the schedulers). With ``workers_everywhere`` every
    rank also runs a worker. ``has_client=False`` is service mode (no script, no client rank).

    Raises
    ------
    ValueError
        The world is too small for the layout, or an argument is out of range.
    """
    if n_schedulers < 1:
        raise ValueError(f"n_schedulers={n_schedulers!r} must be at least 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} is not in an MPI world of size {world_size!r}")
    need = min_world_size(n_schedulers, workers_everywhere, has_client)
    if world_size < need:
        parts = [f"{n_schedulers} scheduler(s)"]
        if has_client:
            parts.append("1 client")
        if not workers_everywhere:
            parts.append("at least 1 worker")
        raise ValueError(
            f"the MPI world has {world_size} rank(s) but the layout needs at least {need} "
            f"({' + '.join(parts)}); start more ranks (mpirun -n {need}) or ask for fewer "
            "schedulers" + ("" if workers_everywhere else " or use --workers-everywhere")
        )
    if has_client:
        if client_rank is None:
            client_rank = n_schedulers
        if not 0 <= client_rank < world_size:
            raise ValueError(
                f"client_rank={client_rank!r} is not a rank of the MPI world of size {world_size}"
            )
        if rank == client_rank:
            return Role("client", None, workers_everywhere)
        index = rank if rank < client_rank else rank - 1
    else:
        index = rank
    if index < n_schedulers:
        return Role("scheduler", index, workers_everywhere)
    return Role("worker", None, True)
