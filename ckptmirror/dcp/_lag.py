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

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

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


#: One position's write: ``write(pos, stop)`` gives its error (None: written); once ``stop`` is
#: set it writes no further object.
Write = Callable[[int, threading.Event], "BaseException | None"]


def write_positions(
    count: int,
    write: Write,
    enough: Callable[[Mapping[int, BaseException | None]], bool],
    timeout_s: float | None,
    on_written: Callable[[int], None],
    drop: Callable[[int, list[int]], BaseException],
    on_dropped_end: Callable[[int, BaseException | None], None],
) -> tuple[dict[int, BaseException | None], list[Future[BaseException | None]]]:
    """Run ``write`` for positions ``0..count-1`` at once (a thread each) and wait as
    :func:`await_writes` does; drop the writes still running then.

    ``on_written(pos)`` runs on the write's thread once ``pos`` is written (the other ranks are
    told). ``drop(pos, written)`` makes (and records) the error of a dropped write, given the
    positions written so far. ``on_dropped_end(pos, result)`` runs on a dropped write's own
    thread once its call returns, before its future completes (so a wait on the future covers
    that clean-up). Returns every position's outcome (a dropped one's: the error ``drop`` gave)
    and the futures of the dropped writes, still running perhaps.
    """
    stops = [threading.Event() for _ in range(count)]
    # Each position: running (""), "done", or "dropped" (by the caller's thread, below): the one
    # that comes second sees the other's mark, so a write either counts or is cleaned up.
    marks = [""] * count
    lock = threading.Lock()

    def one(pos: int) -> BaseException | None:
        result = write(pos, stops[pos])
        with lock:
            dropped = marks[pos] == "dropped"
            marks[pos] = marks[pos] or "done"
        if dropped:
            on_dropped_end(pos, result)
        elif result is None:
            on_written(pos)
        return result

    pool = ThreadPoolExecutor(max(count, 1), thread_name_prefix="ckptmirror-dcp-replica")
    try:
        writes = [pool.submit(one, pos) for pos in range(count)]
    finally:
        pool.shutdown(wait=False)  # a dropped write runs on alone
    outcome, slow = await_writes(writes, enough, timeout_s)
    written = [p for p, e in sorted(outcome.items()) if e is None]
    late: list[int] = []
    gone: list[Future[BaseException | None]] = []
    for pos in slow:
        with lock:
            if marks[pos]:  # it finished meanwhile: it counts as it went
                late.append(pos)
                continue
            marks[pos] = "dropped"
            stops[pos].set()
            outcome[pos] = drop(pos, written)  # before its thread can end it
        gone.append(writes[pos])
    for pos in late:
        outcome[pos] = writes[pos].result()
    return outcome, gone


def dropped_error(url: str, step: int, rank: int, written: Sequence[str], timeout_s: float) -> ReplicaLaggingError:
    """What the writer records for ``url`` when its write of ``step`` was dropped."""
    return ReplicaLaggingError(
        f"dropped its write of step {step} (rank {rank}): still writing {timeout_s:g} s after "
        f"{', '.join(written)} had every object of it, so the step does not commit there. The replica "
        "lags; later saves go to it again. If this repeats, the replica is slower than the saves: save "
        "less often, or raise MirrorStorageWriter(slow_replica_timeout_s=...)",
        replica=url,
    )
