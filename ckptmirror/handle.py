"""The save handle: what one ``save()`` returns, and how its background outcome is reported."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .errors import SaveFailedError, SaveSkippedError

log = logging.getLogger("ckptmirror")

ReplicaState = Literal["pending", "committed", "failed", "skipped"]
#: How a save ended: committed on enough replicas, failed, or skipped (no free staging buffer).
Outcome = Literal["committed", "failed", "skipped"]


@dataclass(frozen=True)
class ReplicaStatus:
    """Outcome of one save on one replica. ``seconds`` counts from the ``save()`` call."""

    url: str
    state: ReplicaState
    error: BaseException | None = None
    seconds: float | None = None
    #: bytes this rank wrote to the replica for this save (objects as stored, placement record,
    #: manifest): less than the state with compression, far less with incremental saves
    written_bytes: int | None = None


@dataclass(frozen=True)
class HandleEvent:
    """What changed on a :class:`SaveHandle`, as told to its observers (see ``SaveHandle._observe``)."""

    #: The replica outcomes recorded now (each replica's once: pending -> committed/failed/skipped).
    changed: tuple[ReplicaStatus, ...]
    #: Set on the one event that decided the save (the handle became done), else None.
    outcome: Outcome | None
    #: True on the one event after which no replica is pending any more.
    settled: bool


class SaveHandle:
    """Tracks one background save.

    ``result()`` blocks until the step is committed on at least ``min_replicas`` replicas
    and returns the handle, or raises :class:`SaveFailedError` carrying every replica's
    error (the original traceback is chained). Example::

        h = mirror.save(step, model, optim)
        ...                      # training goes on
        h.result(timeout=60)     # durable now, or raises
        print(h.stall_s, h.replicas)
    """

    def __init__(self, step: int, urls: list[str], min_replicas: int, started: float) -> None:
        self.step = step
        #: Seconds ``save()`` blocked the caller: state_dict(), planning, waiting for a free
        #: staging buffer, and the copy.
        self.stall_s: float = 0.0
        #: Of ``stall_s``, seconds spent waiting for the previous save to release its buffer.
        self.wait_s: float = 0.0
        #: Bytes of tensor data in this save (one replica's copy).
        self.nbytes: int = 0
        #: Seconds from the ``save()`` call until committed on ``min_replicas`` (None until then).
        self.committed_s: float | None = None
        self.skipped = False
        self._started = started
        self._min = min_replicas
        self._status = {u: ReplicaStatus(u, "pending") for u in urls}
        self._cond = threading.Condition()
        self._done = False
        self._error: BaseException | None = None
        self._reach_failed = False  # failed because too few replicas could still commit
        self._observed = False
        self._callbacks: list[Callable[[SaveHandle], object]] = []
        self._observers: list[Callable[[SaveHandle, HandleEvent], object]] = []

    def __repr__(self) -> str:
        states = ", ".join(f"{u}={s.state}" for u, s in self._status.items())
        return f"SaveHandle(step={self.step}, {states})"

    @property
    def replicas(self) -> dict[str, ReplicaStatus]:
        """Per replica URL: pending, committed, failed (with the error) or skipped."""
        with self._cond:
            return dict(self._status)

    @property
    def committed_count(self) -> int:
        """On how many replicas the step is committed so far."""
        with self._cond:
            return sum(s.state == "committed" for s in self._status.values())

    def done(self) -> bool:
        """Whether the outcome is known (committed on enough replicas, or failed)."""
        with self._cond:
            return self._done

    def result(self, timeout: float | None = None) -> SaveHandle:
        """Wait for the outcome; return self when committed, raise if the save failed.

        Raises :class:`TimeoutError` if ``timeout`` seconds pass first.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout=timeout):
                raise TimeoutError(f"save of step {self.step} not committed after {timeout} s: {self!r}")
            self._observed = True
            if self._error is not None:
                raise self._error
        return self

    def _wait_done(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._done, timeout=timeout)

    def add_done_callback(self, fn: Callable[[SaveHandle], object]) -> None:
        """Call ``fn(handle)`` once the outcome is known (at once if it is already), like
        :meth:`concurrent.futures.Future.add_done_callback`.

        It runs on a background thread: keep it short (log ``stall_s``,
        ``committed_s``, ``nbytes`` to a tracker). An exception it raises is logged, not
        propagated. Example::

            h = mirror.save(step, model, optim)
            h.add_done_callback(lambda h: wandb.log({"ckpt/stall_s": h.stall_s, "ckpt/commit_s": h.committed_s}))
        """
        with self._cond:
            if not self._done:
                self._callbacks.append(fn)
                return
        self._call(fn)

    def _call_all(self, callbacks: list[Callable[[SaveHandle], object]]) -> None:
        for fn in callbacks:
            self._call(fn)

    def _call(self, fn: Callable[[SaveHandle], object]) -> None:
        try:
            fn(self)
        except Exception:  # noqa: BLE001 - a user's logging hook must not fail the save path
            log.exception("a done callback of the save of step %d raised", self.step)

    def _observe(self, fn: Callable[[SaveHandle, HandleEvent], object]) -> None:
        """Call ``fn(handle, event)`` for every replica outcome (used by :mod:`ckptmirror.metrics`).

        At once for what is recorded already (one event, with the outcome if the save is decided),
        then for each later change, on the thread that records it and with the handle's lock held:
        whoever waits in :meth:`result` sees the observer's effect as soon as it returns, and the
        events of one handle never interleave. So ``fn`` must be quick and must not block (the
        handle's lock is re-entrant: reading this handle's properties is fine). Unlike
        :meth:`add_done_callback`, it sees replicas that finish after the save was decided.
        """
        with self._cond:
            self._observers.append(fn)
            changed = tuple(s for s in self._status.values() if s.state != "pending")
            if changed or self._done:
                settled = bool(changed) and len(changed) == len(self._status)
                self._emit(fn, HandleEvent(changed, self._outcome() if self._done else None, settled))

    def _outcome(self) -> Outcome:
        if self.skipped:
            return "skipped"
        return "committed" if self._error is None else "failed"

    def _notify(self, changed: list[ReplicaStatus], was_done: bool) -> None:
        """Tell the observers about ``changed`` (called with ``self._cond`` held, after ``_finish``)."""
        decided = self._done and not was_done
        if not self._observers or not (changed or decided):
            return
        settled = bool(changed) and all(s.state != "pending" for s in self._status.values())
        event = HandleEvent(tuple(changed), self._outcome() if decided else None, settled)
        for fn in list(self._observers):
            self._emit(fn, event)

    def _emit(self, fn: Callable[[SaveHandle, HandleEvent], object], event: HandleEvent) -> None:
        try:
            fn(self, event)
        except Exception:  # noqa: BLE001 - bookkeeping must never fail the save path
            log.exception("an observer of the save of step %d raised", self.step)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error of a failed save (after waiting for the outcome), else None."""
        try:
            self.result(timeout)
        except TimeoutError:
            raise
        except BaseException as exc:  # noqa: BLE001 - returned, not swallowed
            return exc
        return None

    # -- used by the writer --------------------------------------------------------------
    def _set_replica(
        self, url: str, state: ReplicaState, error: BaseException | None = None, written_bytes: int | None = None
    ) -> None:
        with self._cond:
            was_done = self._done
            previous = self._status.get(url)
            self._status[url] = ReplicaStatus(url, state, error, time.perf_counter() - self._started, written_bytes)
            committed = sum(s.state == "committed" for s in self._status.values())
            open_ = sum(s.state == "pending" for s in self._status.values())
            if not self._done and committed >= self._min:
                self.committed_s = time.perf_counter() - self._started
                self._finish(None)
            elif not self._done and committed + open_ < self._min:
                self._finish(self._failure())
                self._reach_failed = True
            elif was_done and self._reach_failed:
                # Decided early, while other replicas were still writing: what result() raises
                # from now on says how those ended (an error taken at decision time said "none").
                self._error = self._failure()
            changed = [self._status[url]] if previous is None or previous.state == "pending" else []
            self._notify(changed, was_done)

    def _failure(self) -> SaveFailedError:
        failures = {u: s.error for u, s in self._status.items() if s.error is not None}
        committed = [u for u, s in self._status.items() if s.state == "committed"]
        pending = [u for u, s in self._status.items() if s.state == "pending"]
        still = f"; still writing: {pending}" if pending else ""
        err = SaveFailedError(
            self.step,
            failures,
            f"save of step {self.step} cannot reach the {self._min} committed replica(s) required "
            f"(committed so far: {committed or 'none'}{still}); "
            + "; ".join(f"{u}: {type(e).__name__}: {e}" for u, e in failures.items()),
        )
        first = next(iter(failures.values()), None)
        err.__cause__ = first
        return err

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            if not self._done:
                changed = []
                for u, s in self._status.items():
                    if s.state == "pending":
                        self._status[u] = ReplicaStatus(u, "failed", error, time.perf_counter() - self._started)
                        changed.append(self._status[u])
                if isinstance(error, SaveFailedError):
                    self._finish(error)
                else:
                    wrapped = SaveFailedError(
                        self.step,
                        {u: error for u in self._status},
                        f"save of step {self.step} failed: {type(error).__name__}: {error}",
                    )
                    wrapped.__cause__ = error
                    self._finish(wrapped)
                self._notify(changed, False)

    def _skip(self) -> None:
        with self._cond:
            was_done = self._done
            self.skipped = True
            changed = []
            for u, s in self._status.items():
                self._status[u] = ReplicaStatus(u, "skipped")
                if s.state == "pending":
                    changed.append(self._status[u])
            self._finish(SaveSkippedError(f"save of step {self.step} skipped: the previous save was still writing"))
            self._observed = True  # a skip is reported by a warning, not raised later
            self._notify(changed, was_done)

    def _finish(self, error: BaseException | None) -> None:
        # Called with self._cond held; callbacks run after it is released (see _set_replica
        # and friends), so a callback may read the handle's properties.
        self._error = error
        self._done = True
        self._cond.notify_all()
        callbacks, self._callbacks = self._callbacks, []
        if callbacks:
            threading.Thread(target=self._call_all, args=(callbacks,), daemon=True).start()

    @property
    def _unobserved_error(self) -> BaseException | None:
        with self._cond:
            return None if self._observed else self._error

    def _mark_observed(self) -> None:
        with self._cond:
            self._observed = True
