"""Ahead: verifying a step's local objects where they lie while the calling thread checks.

Part of :func:`~ckptmirror.restore.fill.fill_step`: for a restore whose local objects wait in
a :class:`~ckptmirror.restore.undo.Landing` (torch's own loading), mapping and checksumming
the objects runs on the restore's pool while the manifest is checked and the targets are
matched, on one lane until the results are needed (see :class:`Ahead`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch

from ..buffers import usable_cpus
from ..format import RankManifest
from ..replicas.base import Replica
from .fetch import Fetcher, Mapped, ObjectPlan

#: What :meth:`Fetcher.verify_mapped` returns: the verified mapping (or None), its replica's URL,
#: the replicas to read the object from otherwise.
Verified = tuple[Mapped | None, str, Sequence[Replica]]


class Ahead:
    """The objects of a step verified ahead, where they lie (``Fetcher.verify_mapped``), on the
    fetcher's pool while the main thread checks the manifest and matches the targets.

    Only for restores whose local objects wait in a :class:`Landing` (``defer``): verifying
    touches no tensor, and mapping and checksumming the objects (~30 ms of a core for 0.26 GB
    here) and checking the manifest and matching 10k targets (~30 ms of Python) then run side
    by side, not one after the other. :func:`~ckptmirror.restore.reads._read_objects` takes
    each result once, for the object's own read; :meth:`drop` closes what nobody took (the
    step failed before its reads, or an object held only resharded storages).

    One lane first, more once the main thread needs the results (:meth:`hurry`): the main
    thread's checks are the restore's critical path, and every verifying thread beyond the
    first competes with them for the CPUs and the GIL. Measured in-process on 2 cores against
    one thread per object from the start (12 alternating rounds, medians): 10k tensors
    112 -> 106 ms, 50k 360 -> 336 ms, 1k 55 -> 58 ms (noisy). Once the main thread waits for
    the results, every lane helps finish them.

    No deadlock on the shared pool: the lanes are queued before any read, and they wait for
    nothing; a read that waits for an object's result waits for a lane that runs or is queued
    ahead of it.
    """

    def __init__(self, fetcher: Fetcher, m: RankManifest, plan: ObjectPlan) -> None:
        self._fetcher = fetcher
        futures: list[Future[Verified]] = [Future() for _ in m.objects]
        self._jobs = deque((f, o.key, o.size, o.checksum, plan[o.key]) for f, o in zip(futures, m.objects))
        self._futures: list[Future[Verified] | None] = list(futures)
        self._hurried = False
        self._lock = threading.Lock()
        fetcher.pool.submit(self._lane)

    def _lane(self) -> None:
        """Verify queued objects until none is left (one lane of the pool)."""
        verify = self._fetcher.verify_mapped
        while True:
            try:
                f, key, size, checksum, cands = self._jobs.popleft()  # atomic: lanes share the deque
            except IndexError:
                return
            if not f.set_running_or_notify_cancel():
                continue  # dropped: the step failed already
            try:
                f.set_result(verify(key, size, checksum, cands))
            except BaseException as exc:
                f.set_exception(exc)

    def hurry(self) -> None:
        """The main thread waits for the results now: every lane the pool and the CPUs allow."""
        with self._lock:  # (reads may call it from the pool)
            if self._hurried:
                return
            self._hurried = True
            # One lane runs already. (Lanes beyond the pool's threads wait in its queue, find
            # nothing left when they start, and end.)
            for _ in range(min(usable_cpus(), len(self._jobs) + 1) - 1):
                self._fetcher.pool.submit(self._lane)

    def take(self, j: int) -> Verified:
        """Object ``j``'s result (waits for it); raises what verifying it raised."""
        f = self._futures[j]
        self._futures[j] = None
        assert f is not None, "each object's result is taken once"
        self.hurry()
        return f.result()

    def drop(self) -> None:
        """Close the mappings nobody took, after the verifications under way (idempotent)."""
        futures, self._futures = self._futures, []
        for f in futures:
            if f is not None:
                f.cancel()  # not started yet: never will
        for f in futures:
            if f is None or f.cancelled():
                continue
            try:
                mo = f.result()[0]
            except BaseException:  # the step failed already, or never needed this object
                continue
            if mo is not None:
                mo.close()


def host_first(tree: Any) -> bool:
    """Whether the first tensor in ``tree`` is in host memory (or there is none): the guess,
    made before the targets are matched, that verifying objects ahead pays. An object that then
    meets a CUDA target is read again the usual way (see :func:`~ckptmirror.restore.reads._deferred`)."""
    t = _first_tensor(tree, 0)
    return t is None or t.device.type == "cpu"


def _first_tensor(node: Any, depth: int) -> torch.Tensor | None:
    if isinstance(node, torch.Tensor):
        return node
    if depth > 64 or not isinstance(node, (dict, list, tuple)):
        return None
    for v in node.values() if isinstance(node, dict) else node:
        if isinstance(v, torch.Tensor):
            return v
        if isinstance(v, (dict, list, tuple)):
            t = _first_tensor(v, depth + 1)
            if t is not None:
                return t
    return None
