"""Which replicas are degraded, and the background thread that brings them back.

A replica that fails with an ``OSError`` (unreachable, disk full, timed out) is *degraded*:
saves skip it, so a dead replica costs the training thread nothing, and a background thread
pings it every ``interval_s`` until it answers again. Replicas that ask for a heartbeat
(:attr:`Replica.heartbeat`: peers, since a node can vanish between saves) are pinged even while
healthy. A replica degraded by a write error (disk full, quota, read-only: its ``errno`` is in
:data:`~ckptmirror.replicas.base.WRITE_ERRNOS`) still answers a ping, so it comes back only once
:meth:`~ckptmirror.replicas.base.Replica.probe_write` also passes for the bytes the failed save
needed there: else every save would try it, fail at the same point and mark it again, and its
health would flap. One :class:`ReplicaHealth` belongs to one :class:`~ckptmirror.mirror.Mirror`; its save
fan-out marks replicas through it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence

from .replicas.base import WRITE_ERRNOS, Replica

log = logging.getLogger("ckptmirror")

#: A replica degraded again within this many seconds of its last failure counts one more
#: strike (see :meth:`ReplicaHealth.mark`); after a quiet spell this long it starts from one.
STRIKE_MEMORY_S = 600.0
#: The longest a replica that keeps failing is held out of saves after it answers again.
MAX_HOLD_S = 600.0


class ReplicaHealth:
    """Thread-safe record of degraded replicas (URL -> last error text), with its prober."""

    def __init__(self, replicas: Sequence[Replica], interval_s: float) -> None:
        self.replicas = list(replicas)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._degraded: dict[str, str] = {}
        #: URL -> bytes a save needs there, for replicas degraded by a write error
        self._need_write: dict[str, int] = {}
        #: URL -> how many times it was marked: a probe that passed clears nothing marked since
        self._marks: dict[str, int] = {}
        #: URL -> failures in a row (each within STRIKE_MEMORY_S of the last), and when the last was
        self._strikes: dict[str, int] = {}
        self._last_fail: dict[str, float] = {}
        #: URL -> the monotonic time before which it is not brought back, however it answers
        self._hold_until: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def mark(self, replica: Replica, exc: BaseException | str, need_bytes: int = 0) -> None:
        """Record ``replica`` as degraded because of ``exc`` (logged once per outage).

        ``need_bytes``: what the save that failed needed to write there; after a write error
        the replica comes back only once that much can be written (see the module docstring).
        """
        why = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        refuses_writes = isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS
        now = time.monotonic()
        with self._lock:
            if replica.url not in self._degraded:
                # A replica whose pings pass while its uploads stall (a slow or lossy link, a
                # path MTU black hole) came back at the next probe and failed the next save
                # again, a time budget later each time: every other save stalled for as long as
                # the fault lasted. Each failure soon after the last holds it out longer.
                recent = now - self._last_fail.get(replica.url, -STRIKE_MEMORY_S - 1) <= STRIKE_MEMORY_S
                strikes = self._strikes[replica.url] = self._strikes.get(replica.url, 0) + 1 if recent else 1
                hold = 0.0 if strikes < 2 else min(MAX_HOLD_S, self.interval_s * 2 ** (strikes - 1))
                self._hold_until[replica.url] = now + hold
                until = "it can be written again" if refuses_writes else "it answers again"
                if hold:
                    until += f", and at least {hold:g} s (failure {strikes} in a row)"
                log.warning("replica %s is degraded (%s); saves skip it until %s", replica.url, why, until)
            self._last_fail[replica.url] = now
            self._degraded[replica.url] = why
            self._marks[replica.url] = self._marks.get(replica.url, 0) + 1
            if refuses_writes:
                # The latest save's need (it may be smaller: an incremental save); a mark that
                # knows none (a sliced save's early part) keeps the one known.
                self._need_write[replica.url] = need_bytes or self._need_write.get(replica.url, 0)

    def mark_all(self, failures: Mapping[str, str]) -> None:
        """Record several replicas (by URL) as degraded, without a log line each."""
        with self._lock:
            self._degraded.update(failures)

    def degraded(self) -> dict[str, str]:
        """A copy of URL -> error text of the replicas degraded now."""
        with self._lock:
            return dict(self._degraded)

    def summary(self) -> dict[str, str]:
        """Per replica URL: ``"ok"`` or ``"degraded: <last error>"``."""
        with self._lock:
            return {
                r.url: ("degraded: " + self._degraded[r.url]) if r.url in self._degraded else "ok"
                for r in self.replicas
            }

    def start(self) -> None:
        """Start the background prober."""
        self._thread = threading.Thread(target=self._probe, name="ckptmirror-health", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 0.0) -> bool:
        """Stop the prober: no ping starts after this. Waits up to ``timeout`` seconds (None: no
        limit) for a ping in progress, which its replica's own deadline bounds; True if the
        prober thread has ended (or never ran)."""
        self._stop.set()
        t = self._thread
        if t is None or t is threading.current_thread():
            return True
        t.join(timeout)
        return not t.is_alive()

    def _probe(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                probe = [r for r in self.replicas if r.url in self._degraded or r.heartbeat]
            for r in probe:
                if self._stop.is_set():
                    return  # closing: the replicas are about to be closed under it
                try:
                    r.ping()
                except Exception as exc:  # noqa: BLE001 - recorded as degraded
                    self.mark(r, exc)
                    # What waits on it now would wait out its own budget (an upload sent to a
                    # stopped agent, waiting for the answer): cut it, the save moves on.
                    r.abort_inflight(f"{type(exc).__name__}: {exc}")
                    continue
                with self._lock:
                    need = self._need_write.get(r.url)
                    marks = self._marks.get(r.url, 0)
                if need is not None:
                    try:
                        r.probe_write(need)
                    except Exception as exc:  # noqa: BLE001 - still refuses writes: stays degraded
                        with self._lock:
                            self._degraded[r.url] = f"{type(exc).__name__}: {exc}"
                        continue
                with self._lock:
                    if self._marks.get(r.url, 0) != marks:
                        continue  # marked again while we probed (a newer failure): probe that next time
                    if time.monotonic() < self._hold_until.get(r.url, 0.0):
                        continue  # failed repeatedly: held out a while longer (see mark)
                    self._need_write.pop(r.url, None)
                    was_down = self._degraded.pop(r.url, None) is not None
                if was_down:
                    log.warning("replica %s answers again; saves use it from now on", r.url)
