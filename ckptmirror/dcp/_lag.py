"""A slow replica does not hold a DCP save: its write is dropped once others have written.

:class:`~ckptmirror.Mirror` drops a slow replica's write when the *next* save needs the staging
buffer (:mod:`ckptmirror.save.lag`). A DCP save has no such moment: ``write_data`` must return
before DCP calls ``finish`` and completes the save's future, and ``dcp.async_save`` callers wait
for that future before the next save (torchtitan does). So the writer drops by time instead:
once ``min_replicas`` replica positions (at least one) have every object of the step from every
rank (each rank says so through the store as its part is written there), it waits
``slow_replica_timeout_s`` for the others, then drops those still writing. Not this rank's part
alone: ranks deciding on their own could each drop a different position, and then none commits.
A dropped position votes "failed" with ``give_back`` (nothing commits there, and every rank
deletes its part there: :class:`~ckptmirror.dist.GiveBackAbortError`), stops at its next object,
and once its call returns, gives its own files back; new saves skip the replica while it runs
(:class:`~ckptmirror.save.lag.Laggards`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait

from ..errors import ReplicaLaggingError


def await_writes(
    futures: Sequence[Future[BaseException | None]],
    enough: Callable[[Mapping[int, BaseException | None]], bool],
    timeout_s: float | None,
    poll_s: float = 0.05,
) -> tuple[dict[int, BaseException | None], list[int]]:
    """Wait for each position's write (a future that gives its error, None on success).

    Once ``enough(outcome so far)`` holds, wait at most ``timeout_s`` more (None: no limit, and
    ``enough`` is never asked). ``enough`` may depend on other ranks (every rank's part written
    at a position): it is asked again every ``poll_s`` until it holds. Returns the outcome of
    every position that finished, and the positions still writing then (to be dropped; empty
    when every write finished).
    """
    outcome: dict[int, BaseException | None] = {}
    pending = set(range(len(futures)))
    enough_at: float | None = None
    while pending:
        if enough_at is None:
            left = None if timeout_s is None else poll_s
        else:
            assert timeout_s is not None
            left = enough_at + timeout_s - time.monotonic()
            if left <= 0:
                break
        wait([futures[p] for p in pending], timeout=left, return_when=FIRST_COMPLETED)
        for p in [p for p in pending if futures[p].done()]:
            pending.discard(p)
            outcome[p] = futures[p].result()
        if enough_at is None and timeout_s is not None and pending and enough(outcome):
            enough_at = time.monotonic()
    return outcome, sorted(pending)


def dropped_error(url: str, step: int, rank: int, written: Sequence[str], timeout_s: float) -> ReplicaLaggingError:
    """What the writer records for ``url`` when its write of ``step`` was dropped."""
    return ReplicaLaggingError(
        f"dropped its write of step {step} (rank {rank}): still writing {timeout_s:g} s after "
        f"{', '.join(written)} had every object of it, so the step does not commit there. The replica "
        "lags; later saves go to it again. If this repeats, the replica is slower than the saves: save "
        "less often, or raise MirrorStorageWriter(slow_replica_timeout_s=...)",
        replica=url,
    )
