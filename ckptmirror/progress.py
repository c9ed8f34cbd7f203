"""Progress lines for long transfers: bytes done of total, rate and ETA, at most every few seconds.

A restore of a large state reads for minutes; without a sign of life an operator cannot tell a
slow replica from a hung one. :class:`Progress` is fed by the reader threads (``advance`` after
each object) and logs at INFO at most once per ``interval_s``, plus one final line at
:meth:`Progress.close`. Used by :func:`ckptmirror.restore.choose.load_newest`; the interval
comes from ``CKPTMIRROR_PROGRESS_INTERVAL_S`` (:mod:`ckptmirror.config`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

__all__ = ["Progress", "format_bytes", "format_seconds"]


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, e.g. ``"1.5 GiB"`` (``"512 B"`` below one KiB)."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def format_seconds(s: float) -> str:
    """A duration for a log line: ``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``."""
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    m, sec = divmod(int(s + 0.5), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class Progress:
    """Thread-safe byte counter that logs ``what: done of total (pct), rate, ETA`` every ``interval_s``.

    Args:
        total_bytes: the bytes expected. Reading more (a resharded restore reads other ranks'
            objects) raises the total to what was read; the percentage never passes 100.
        what: the operation, first in every line (``"restore of step 1200"``).
        logger: where the lines go (at INFO). Default: the ``ckptmirror`` logger.
        interval_s: the least time between two progress lines; the first comes after one interval,
            so an operation shorter than that logs only its final line.
        clock: monotonic seconds (tests may pass a fake one).

    Each line also carries the numbers as ``record.progress`` (a dict: ``done_bytes``,
    ``total_bytes``, ``bytes_per_s``, ``eta_s``, ``elapsed_s``, ``final``) for structured logging.
    Use as a context manager, or call :meth:`close` once done::

        with Progress(total, "restore of step 7", log) as p:
            for obj in objects:
                read(obj)
                p.advance(obj.size)
    """

    def __init__(
        self,
        total_bytes: int,
        what: str,
        logger: logging.Logger | None = None,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.total_bytes = max(0, int(total_bytes))
        self.what = what
        self.logger = logger if logger is not None else logging.getLogger("ckptmirror")
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._done = 0
        self._started = clock()
        self._last_line = self._started
        self._closed = False

    @property
    def done_bytes(self) -> int:
        """Bytes counted so far."""
        with self._lock:
            return self._done

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more; log a progress line if ``interval_s`` passed since the last one."""
        now = self._clock()
        with self._lock:
            self._done += nbytes
            if self._closed or now - self._last_line < self.interval_s:
                return
            # Claimed under the lock: of the readers that cross the interval together, one logs.
            self._last_line = now
            done, total, elapsed = self._done, max(self.total_bytes, self._done), now - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else None
        pct = 100.0 * done / total if total else 100.0
        self.logger.info(
            "%s: %s of %s (%.0f%%), %s/s, ETA %s",
            self.what,
            format_bytes(done),
            format_bytes(total),
            pct,
            format_bytes(rate),
            format_seconds(eta) if eta is not None else "unknown",
            extra={"progress": _numbers(done, total, rate, eta, elapsed, final=False)},
        )

    def close(self, failed: bool = False) -> None:
        """Log the final line (once): bytes read, time and mean rate; ``failed`` says it stopped short."""
        now = self._clock()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            done, elapsed = self._done, now - self._started
            total = max(self.total_bytes, done)
        rate = done / elapsed if elapsed > 0 else 0.0
        of = "" if done == total else f" of {format_bytes(total)}"
        self.logger.info(
            "%s: %s %s%s in %s (%s/s)",
            self.what,
            "failed after reading" if failed else "read",
            format_bytes(done),
            of,
            format_seconds(elapsed),
            format_bytes(rate),
            extra={"progress": _numbers(done, total, rate, 0.0, elapsed, final=True)},
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)


def _numbers(done: int, total: int, rate: float, eta: float | None, elapsed: float, final: bool) -> dict[str, object]:
    return {
        "done_bytes": done,
        "total_bytes": total,
        "bytes_per_s": rate,
        "eta_s": eta,
        "elapsed_s": elapsed,
        "final": final,
    }
