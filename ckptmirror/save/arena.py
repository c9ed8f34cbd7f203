"""Arenas: the reusable host staging buffers a save copies the state into.

Part of the save path (:mod:`ckptmirror.save.snapshot` copies into them; the background writer
reads them until the step is written). An arena is allocated once and reused from one save to
the next: a fresh allocation costs ~4x a copy into existing pages here (page faults), and
steady-state saves allocate nothing (ANCHORS: pytorch#170163 saw RSS grow with every
async_save). :class:`ArenaPool` holds ``max_inflight`` of them: a save takes one, its writer
gives it back.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Callable

import torch

from ..buffers import fault_in
from .lag import POLL_S


class Arena:
    """One reusable host buffer. ``capacity`` only grows; steady state reuses the pages."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor = torch.empty(0, dtype=torch.uint8)
        self.pinned = False
        self.allocations = 0

    def reserve(self, nbytes: int, pinned: bool, prefault: bool = False) -> torch.Tensor:
        """A uint8 tensor of at least ``nbytes``; reallocated only if too small or not pinned as needed.

        ``prefault`` maps the buffer's first ``nbytes`` right away (one page-faulting pass; pages
        mapped already cost a cache miss each), so the next copy into it runs at memcpy speed.
        Pinned buffers are mapped when allocated.
        """
        if self.buffer.numel() < nbytes or (pinned and not self.pinned):
            self.buffer = torch.empty(0, dtype=torch.uint8)  # free the old one before allocating
            # Starting on a page: an object at a page multiple of the stream (a 4 KiB multiple
            # of bytes before it, as in most models) is then written with O_DIRECT straight
            # from here, with no bounce copy (a local replica's direct_io option).
            whole = torch.empty(nbytes + mmap.PAGESIZE, dtype=torch.uint8, pin_memory=pinned)
            start = -whole.data_ptr() % mmap.PAGESIZE
            self.buffer = whole[start : start + nbytes]
            self.pinned = pinned
            self.allocations += 1
        if prefault and not self.pinned:
            # Also when the buffer exists: a restore's undo log may have used only part of it.
            fault_in(self.buffer[:nbytes])
        return self.buffer[:nbytes]

    def release_memory(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.pinned = False


class ArenaPool:
    """``count`` arenas; :meth:`acquire` blocks (or fails fast) while all are in use by writers.

    ``reclaim``, with ``reclaim_after_s``: what a blocked :meth:`acquire` calls once it has
    waited that long, and again every :data:`~ckptmirror.save.lag.POLL_S` until an arena is
    free: it may give arenas back by dropping slow replicas' writes (:mod:`~ckptmirror.save.lag`).
    """

    def __init__(
        self, count: int, reclaim: Callable[[], object] | None = None, reclaim_after_s: float | None = None
    ) -> None:
        if count < 1:
            raise ValueError("max_inflight must be at least 1")
        self._free = [Arena() for _ in range(count)]
        self._all = list(self._free)
        self._cond = threading.Condition()
        self._reclaim = reclaim if reclaim_after_s is not None else None
        self._reclaim_after_s = reclaim_after_s or 0.0

    def acquire(self, block: bool, timeout: float | None = None) -> Arena | None:
        with self._cond:
            if self._free:
                return self._free.pop()
            if not block:
                return None
        start = time.monotonic()
        reclaim_at = start + self._reclaim_after_s
        deadline = None if timeout is None else start + timeout
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            wait: float | None = None
            if self._reclaim is not None:
                if now >= reclaim_at:
                    self._reclaim()  # outside the lock: it gives arenas back through release()
                    wait = POLL_S
                else:
                    wait = reclaim_at - now
            if deadline is not None:
                wait = deadline - now if wait is None else min(wait, deadline - now)
            with self._cond:
                if self._cond.wait_for(lambda: bool(self._free), timeout=wait):
                    return self._free.pop()

    def release(self, arena: Arena) -> None:
        with self._cond:
            self._free.append(arena)
            self._cond.notify()

    def reserve(self, nbytes: int, pinned: bool) -> None:
        """Grow every arena to ``nbytes`` and map its pages now, waiting for in-flight saves.

        Each arena is taken out of the pool while it is faulted in, so a concurrent save waits
        for it rather than copying into it.
        """
        for _ in range(len(self._all)):
            arena = self.acquire(block=True)
            assert arena is not None  # a blocking acquire without timeout returns one
            try:
                arena.reserve(nbytes, pinned, prefault=True)
            finally:
                # At the front: the next acquire takes another arena (pop() takes from the end).
                with self._cond:
                    self._free.insert(0, arena)
                    self._cond.notify()

    @property
    def allocations(self) -> int:
        """How many buffer allocations all arenas have made (steady state: constant)."""
        return sum(a.allocations for a in self._all)

    def release_memory(self) -> None:
        with self._cond:
            for a in self._all:
                a.release_memory()
