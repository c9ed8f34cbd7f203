"""A slow replica does not hold a DCP save: its write is dropped once others have written.

:class:`~ckptmirror.Mirror` drops a slow replica's write when the *next* save needs the staging
buffer (:mod:`ckptmirror.save.lag`). A DCP save has no such moment: ``write_data`` must return
before DCP calls ``finish`` and completes the save's future, and ``dcp.async_save`` callers wait
for that future before the next save (torchtitan does). So the writer drops by time instead:
once ``min_replicas`` replica positions (at least one) have every object of this rank's part of
the step, it waits ``slow_replica_timeout_s`` for the others, then drops those still writing.
A dropped position votes "failed" (nothing commits there, on any rank), stops at its next
object, and once its call returns, gives its files back; new saves skip the replica while it
runs (:class:`~ckptmirror.save.lag.Laggards`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait

from ..errors import ReplicaLaggingError


def await_writes(
    futures: Sequence[Future[BaseException | None]], need: int, timeout_s: float | None
) -> tuple[dict[int, BaseException | None], list[int]]:
    """Wait for each position's write (a future that gives its error, None on success).

    Once ``need`` of them succeeded, wait at most ``timeout_s`` more (None: no limit). Returns
    the outcome of every position that finished, and the positions still writing then (to be
    dropped; empty when every write finished).
    """
    outcome: dict[int, BaseException | None] = {}
    pending = set(range(len(futures)))
    enough_at: float | None = None
    while pending:
        left = None if enough_at is None or timeout_s is None else enough_at + timeout_s - time.monotonic()
        if left is not None and left <= 0:
            break
        wait([futures[p] for p in pending], timeout=left, return_when=FIRST_COMPLETED)
        for p in [p for p in pending if futures[p].done()]:
            pending.discard(p)
            outcome[p] = futures[p].result()
        if enough_at is None and sum(e is None for e in outcome.values()) >= need:
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
