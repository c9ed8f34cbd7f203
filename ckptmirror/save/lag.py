"""Slow replicas: who has not finished a save, and dropping the laggards' writes.

A save's staging arena is busy until every replica has finished the save. With
``max_inflight=1`` the next ``save()`` waits for it, so one replica whose upload crawls or
stalls held the training thread for that upload's whole time budget (measured: 58 s with an
S3 endpoint that stopped taking data, 67 s for a peer), although the step had been committed
on the other replicas long before.

:class:`Readers` tracks, for one save, the replicas that have not finished it and which of
them still write objects (read the arena). Once another replica has committed the step, the
ones still writing objects are *laggards*: when the next save has waited
``slow_replica_timeout_s`` for an arena, :meth:`Readers.drop_laggards` drops their writes of
this step. Each is told on the save's handle (:class:`~ckptmirror.errors.ReplicaLaggingError`),
votes "failed" at once so that no other rank waits for it, and gives the arena up: the next
save copies into it while the dropped upload may still be in flight. A replica already
committing (its objects written) is waited for, not dropped: so with ``max_inflight=1`` a
``save()`` that returned still means the previous save has an outcome on every replica.

What a dropped write still sends is garbage (the arena holds the next save's bytes by then),
and harmless: it can never be committed (the thread that wrote it finds the drop and stops
before the commit, and the other ranks were told "failed"), its files carry this save's own
token (no other save's file is touched), and they are removed once the write returns
(:func:`~ckptmirror.save.commit.discard_failed_save`). The writer also stops at the next
object (``stop``), so a dropped write costs at most the objects in flight, not the whole step.
Nothing is dropped before some replica has committed the step (it is durable nowhere): the
next save waits as before, however long that takes.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable

from ..errors import ReplicaLaggingError

log = logging.getLogger("ckptmirror")

#: How often a save() that waits for an arena past ``slow_replica_timeout_s`` looks again
#: for laggards to drop (a replica may finish writing the step meanwhile, which makes the
#: others laggards).
POLL_S = 0.02


class Readers:
    """The replicas of one save that have not finished it, and which of them still read its
    staging arena (see the module docstring).

    ``release`` gives the arena back (the caller makes it idempotent); it is called when
    every replica has finished the save (committed or failed: with ``max_inflight=1``, a
    ``save()`` that returned means the previous save has an outcome on every replica) or been
    dropped. Only replicas still writing objects (reading the arena) can be dropped, and only
    once ``need`` replicas (``min_replicas``; at least one) have committed the step.
    ``on_drop(url)`` reports a dropped write (handle, vote), outside the lock.
    """

    def __init__(
        self,
        urls: Iterable[str],
        release: Callable[[], None],
        on_drop: Callable[[str], None],
        need: int = 1,
    ) -> None:
        self._need = max(1, need)
        self._lock = threading.Lock()
        self._open = set(urls)  # not finished: writing objects, or committing
        self._reading = set(self._open)  # still writing objects: reading the arena
        self._committed: list[str] = []
        self._dropped: set[str] = set()
        self._stops = {u: threading.Event() for u in self._open}
        self._told = {u: threading.Event() for u in self._open}  # on_drop(u) has returned
        self._release = release
        self._on_drop = on_drop

    def stop(self, url: str) -> threading.Event:
        """Set once ``url``'s write is dropped: the writer stops at its next object."""
        return self._stops[url]

    def dropped(self, url: str) -> bool:
        with self._lock:
            return url in self._dropped

    def read(self, url: str) -> bool:
        """``url``'s write has stopped reading the arena (its objects are written, or it
        failed). False if it had been dropped: then its result must be thrown away."""
        with self._lock:
            if url in self._dropped:
                return False
            self._reading.discard(url)
            return True

    def done(self, url: str, committed: bool) -> None:
        """``url`` has finished the save (not called for a dropped write)."""
        with self._lock:
            if url in self._dropped:
                return
            self._reading.discard(url)
            last = url in self._open and len(self._open) == 1  # this call empties it
            self._open.discard(url)
            if committed:
                self._committed.append(url)
        if last:
            self._release()

    def drop_laggards(self) -> list[str]:
        """Drop the writes still reading the arena, if ``need`` other replicas have committed
        the step; returns their URLs (empty: nothing dropped)."""
        with self._lock:
            if len(self._committed) < self._need or not self._reading:
                return []
            gone = sorted(self._reading)
            self._dropped.update(gone)
            self._reading.clear()
            self._open.difference_update(gone)
            last = not self._open  # the drop empties it: nothing was open but what it dropped
            for u in gone:
                self._stops[u].set()
        for u in gone:
            try:
                self._on_drop(u)
            finally:
                self._told[u].set()
        if last:
            self._release()
        return gone

    def wait_told(self, url: str) -> None:
        """Wait until the drop of ``url`` has been reported (its writer, returning at once,
        must not clean up before the drop's own bookkeeping is in place)."""
        self._told[url].wait()

    @property
    def committed(self) -> list[str]:
        with self._lock:
            return list(self._committed)


def check_slow_replica_timeout(value: object) -> None:
    """``slow_replica_timeout_s`` as ``Mirror`` and the DCP writer take it: None or a number >= 0."""
    if value is not None and not (isinstance(value, (int, float)) and value >= 0):
        raise ValueError(f"slow_replica_timeout_s must be None or a number >= 0, got {value!r}")


def dropped_error(url: str, step: int, committed: list[str], timeout_s: float) -> ReplicaLaggingError:
    """What the handle of ``step`` records for ``url`` when its write was dropped."""
    return ReplicaLaggingError(
        f"dropped its write of step {step}: still writing {timeout_s:g} s after the next save needed the "
        f"staging buffer, while {', '.join(committed)} had committed the step. The replica lags; later saves "
        "go to it again. If this repeats, the replica is slower than the saves: save less often, or "
        "raise max_inflight (one more staging buffer) or slow_replica_timeout_s",
        replica=url,
    )


class Laggards:
    """Per replica: the dropped writes still running there (new saves skip it meanwhile), and
    how many saves were dropped there since its last commit (the log gets louder)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: Counter[str] = Counter()
        self._in_row: Counter[str] = Counter()

    def dropped(self, err: ReplicaLaggingError) -> None:
        """A write to ``err.replica`` was dropped: count it and log it (ERROR from the third in a row)."""
        url = err.replica
        with self._lock:
            self._busy[url] += 1
            self._in_row[url] += 1
            n = self._in_row[url]
        log.log(
            logging.ERROR if n >= 3 else logging.WARNING,
            "replica %s: %s%s",
            url,
            err.args[0].split(": ", 1)[-1],
            f" ({n} saves in a row dropped there)" if n > 1 else "",
        )

    def ended(self, url: str) -> None:
        """A dropped write to ``url`` has returned."""
        with self._lock:
            self._busy[url] -= 1
            if self._busy[url] <= 0:
                del self._busy[url]

    def committed(self, url: str) -> None:
        with self._lock:
            self._in_row.pop(url, None)

    def lagging(self) -> set[str]:
        """The replicas where a dropped write is still running."""
        with self._lock:
            return set(self._busy)
