"""Upload admission and pacing: the free-space ledger of uploads in flight and the minimum-rate rule.

Plain bookkeeping, no I/O and no aiohttp: the upload handlers (:mod:`._agent_upload`) consult it,
and tests exercise it directly.
"""

from __future__ import annotations

import math

__all__ = ["Promise", "SpaceLedger", "UploadPace"]


class UploadPace:
    """The minimum-rate rule of one upload: at least ``min_bytes_per_s`` x ``window_s`` bytes (or
    the rest of the body, if less) in every window of ``window_s`` seconds spent waiting for the
    client. The first window is the grace period: nothing is judged before it ends.

    Only time spent waiting for the client counts, not time the agent spends writing to disk:
    a slow disk must not get its clients cut. ``min_bytes_per_s == 0`` disables the rule.
    """

    def __init__(self, min_bytes_per_s: int, window_s: float, length: int) -> None:
        self.min_bytes_per_s = min_bytes_per_s
        self.window_s = window_s
        self.need = math.inf if min_bytes_per_s <= 0 else min_bytes_per_s * window_s
        self.waited = 0.0  # seconds spent waiting for the client in this window
        self.got = 0  # bytes received in this window
        self.left = length  # bytes still to come when this window started

    def time_left(self) -> float:
        """Seconds of waiting left in this window (inf when the rule is off)."""
        return math.inf if self.min_bytes_per_s <= 0 else max(0.0, self.window_s - self.waited)

    def record(self, waited: float, nbytes: int) -> bool:
        """Account one wait of ``waited`` seconds that brought ``nbytes``; False if the window
        just ended short of the minimum (cut the upload). A window that ends on time starts the next."""
        self.waited += waited
        self.got += nbytes
        if self.min_bytes_per_s <= 0 or self.waited < self.window_s:
            return True
        if self.got < min(self.need, self.left):
            return False
        self.left -= self.got
        self.waited, self.got = 0.0, 0
        return True


class SpaceLedger:
    """Bytes the uploads in flight were admitted with and have not written yet.

    The free space the disk reports already leaves out what an upload has written, so each
    upload's promise shrinks as its bytes reach the disk, only after each write returns: in
    between its bytes are counted twice (too careful), never zero times. Lives on the event
    loop (no lock): every change happens between two awaits.
    """

    def __init__(self) -> None:
        #: bytes promised and not written yet (``uploads_reserved_bytes`` on ``/v1/health``)
        self.pending = 0
        #: every byte ever promised: only grows, so that :meth:`others_since` sees promises made
        #: while a check waited for the free space, even those already written or released
        self.promised = 0

    def mark(self) -> tuple[int, int]:
        """What a check takes before it reads the free space (see :meth:`others_since`)."""
        return self.pending, self.promised

    def others_since(self, mark: tuple[int, int]) -> int:
        """Bytes to count as taken by other uploads for a free space read after ``mark``.

        What was pending at the mark (bytes written while the free space was read are then
        counted twice, which only errs on the side of refusing), plus all that was promised
        since: an upload admitted during the read must count in full, its writes may or may not
        show in the number read."""
        return mark[0] + self.promised - mark[1]

    def promise(self, nbytes: int) -> Promise:
        self.pending += nbytes
        self.promised += nbytes
        return Promise(self, nbytes)


class Promise:
    """One upload's share of a :class:`SpaceLedger`: shrinks as it is written; released
    (:meth:`release`, idempotent) however the upload ends."""

    __slots__ = ("ledger", "left")

    def __init__(self, ledger: SpaceLedger, nbytes: int) -> None:
        self.ledger = ledger
        self.left = nbytes

    def wrote(self, nbytes: int) -> None:
        n = min(nbytes, self.left)
        self.left -= n
        self.ledger.pending -= n

    def release(self) -> None:
        self.ledger.pending -= self.left
        self.left = 0
