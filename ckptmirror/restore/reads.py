"""Reads: one step's objects into the restore's destinations, in parallel (restore).

The reading half of :func:`~ckptmirror.restore.fill.fill_step`, once the manifest is checked and
every storage's destination decided (:func:`~ckptmirror.restore.match.storage_targets`):
:func:`_read_plan` lays out the storages that are read in stream order and finds the objects
that hold one; :func:`_read_objects` reads those objects on the fetcher's pool, verified, each
into the storages it overlaps: straight into the caller's tensor where an object lies inside
one, else out of a verified buffer. Local objects of a restore that defers its landing are
verified where they lie and their bytes queued in the :class:`~ckptmirror.restore.undo.Landing`
(:func:`_deferred`). The per-storage columns are int64 arrays, a slice per object.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from concurrent.futures import wait
from itertools import accumulate
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..format import OBJECT_SIZE, ObjectRecord, RankManifest, storage_columns
from ..replicas.base import Replica
from .ahead import Ahead, Verified
from .fetch import Fetcher, ObjectPlan
from .match import StorageTargets
from .undo import Landing

if TYPE_CHECKING:
    from .fill import Loaded


def _host_memory(ptr: int, nbytes: int) -> memoryview:
    """A writable memoryview of ``nbytes`` at host address ``ptr`` (no copy, no torch call)."""
    return memoryview((ctypes.c_ubyte * nbytes).from_address(ptr)).cast("B")


def _read_objects(
    fetcher: Fetcher,
    m: RankManifest,
    plan: ObjectPlan,
    targets: StorageTargets,
    loaded: Loaded,
    ahead: Ahead | None = None,
) -> None:
    # Storages with bytes that are read, by offset; the manifest check guarantees they do not
    # overlap, so the storages an object touches are a contiguous run found by bisection.
    # Objects that hold none of them are not read. The columns are arrays: at 50k storages,
    # the same steps over Python lists (a ``map`` each) cost ~25 ms, a fifth of it per object.
    sc = storage_columns(m)
    obj_offsets = list(accumulate(map(OBJECT_SIZE, m.objects), initial=0))
    cols, order, wanted = _read_plan(sc.offsets, sc.nbytes, targets, obj_offsets)
    starts, ends = cols.starts, cols.ends
    lock = threading.Lock()
    failed = threading.Event()
    landing = loaded.landing

    def work(j: int) -> None:
        if failed.is_set():
            return  # the step is lost already; do not write more of it into the targets
        obj = m.objects[j]
        lo, hi = obj_offsets[j], obj_offsets[j + 1]
        k = int(np.searchsorted(ends, lo, side="right"))  # storages [k, k1) overlap [lo, hi)
        k1 = k + int(np.searchsorted(starts[k:], hi, side="left"))
        undo = loaded.undo
        cands: Sequence[Replica] = plan[obj.key]
        mine = cols.slice(k, k1)
        try:
            if landing is not None:
                verified = ahead.take(j) if ahead is not None else None
                rest = _deferred(fetcher, obj, cands, lo, hi, mine, landing, verified)
                if isinstance(rest, str):
                    with lock:
                        loaded.sources[obj.key] = rest
                    return
                cands = rest
            # Python ints from here: one step per storage of the object (ctypes takes no numpy ints).
            o_starts, o_ends, o_ptrs, o_direct = (c.tolist() for c in mine)
            # An object that lies inside one storage filled in place on the CPU is read straight
            # into it (verified there; a mismatch is read again from the next replica): no copy.
            if k < k1 and o_direct[0] and o_ptrs[0] and o_starts[0] <= lo and hi <= o_ends[0]:
                addr = o_ptrs[0] + lo - o_starts[0]
                if undo is not None:
                    undo.save_raw(addr, hi - lo)  # before the first byte of the caller's tensor changes
                url = fetcher.fetch_into(obj.key, obj.checksum, cands, _host_memory(addr, hi - lo))
                with lock:
                    loaded.sources[obj.key] = url
                return
            buf, url = fetcher.fetch(obj.key, obj.size, obj.checksum, cands)
        except BaseException:
            failed.set()
            raise
        buf_ptr = buf.data_ptr()
        for p, (start, end, ptr, is_direct) in enumerate(zip(o_starts, o_ends, o_ptrs, o_direct), k):
            a, b = max(lo, start), min(hi, end)
            if a >= b:
                continue
            if ptr:
                dst = ptr + a - start
                if is_direct and undo is not None:
                    undo.save_raw(dst, b - a)  # the caller's tensor
                ctypes.memmove(dst, buf_ptr + a - lo, b - a)
            else:
                dest = targets.dest[p if order is None else int(order[p])]
                assert dest is not None  # a CUDA target: copied by torch
                region = dest[a - start : b - start]
                if undo is not None:
                    undo.save(region)
                region.copy_(buf[a - lo : b - lo], non_blocking=False)
        with lock:
            loaded.sources[obj.key] = url

    if ahead is not None:
        ahead.hurry()  # the lanes before the reads that wait for them
    futures = [fetcher.pool.submit(work, j) for j in wanted]
    # Every read must be over before we return or raise: a straggler writing into the
    # targets after a fallback to an older step would mix two steps.
    wait(futures)
    for f in futures:
        f.result()


def _read_plan(
    offsets: Sequence[int], sizes: Sequence[int], targets: StorageTargets, obj_offsets: Sequence[int]
) -> tuple[_Cols, np.ndarray | None, list[int]]:
    """What :func:`_read_objects` reads: the storages with bytes that are read, in stream order,
    as :class:`_Cols`; which storage each position is (None: position ``p`` is storage ``p``);
    and the objects (stream bytes ``[obj_offsets[j], obj_offsets[j + 1])``) that overlap one of
    them. Storages do not overlap (the manifest check), so the ends are in order too and the
    storages of an object are a contiguous run of positions. Array operations throughout: at 50k
    storages the same steps over Python lists cost ~25 ms.
    """
    i64 = np.int64
    off, size = np.asarray(offsets, i64), np.asarray(sizes, i64)
    read = _bools(targets.read) & (size > 0)
    ptr, direct = np.asarray(targets.ptr, i64), _bools(targets.is_direct)
    order: np.ndarray | None
    if read.all() and (off[1:] >= off[:-1]).all():
        # Every storage read, in stream order (the writer's usual layout): the columns as they are.
        order = None
        cols = _Cols(off, off + size, ptr, direct)
    else:
        order = np.flatnonzero(read)
        if not (off[order][1:] >= off[order][:-1]).all():  # the writer lays them out in order
            order = order[np.argsort(off[order], kind="stable")]
        cols = _Cols(off[order], off[order] + size[order], ptr[order], direct[order])
    # An object overlaps a storage that is read iff the first one that ends after the object's
    # first byte starts before its end.
    oo = np.asarray(obj_offsets, i64)
    first = np.searchsorted(cols.ends, oo[:-1], side="right")
    hit = first < len(cols.starts)
    hit[hit] = cols.starts[first[hit]] < oo[1:][hit]
    return cols, order, np.flatnonzero(hit).tolist()


class _Cols(NamedTuple):
    """Per read storage, in stream order: first and end byte in the stream, host address of
    its first byte (0: none, a CUDA target), whether it is the caller's tensor."""

    starts: np.ndarray
    ends: np.ndarray
    ptrs: np.ndarray
    direct: np.ndarray

    def slice(self, a: int, b: int) -> _Cols:
        """Storages ``[a, b)`` (views)."""
        return _Cols(self.starts[a:b], self.ends[a:b], self.ptrs[a:b], self.direct[a:b])


def _bools(column: list[bool]) -> np.ndarray:
    """A list of bools as a bool array (through bytes: a third of the time of ``np.asarray``)."""
    return np.frombuffer(bytes(column), dtype=bool)


def _deferred(
    fetcher: Fetcher,
    obj: ObjectRecord,
    cands: Sequence[Replica],
    lo: int,
    hi: int,
    cols: _Cols,
    landing: Landing,
    verified: Verified | None = None,
) -> str | Sequence[Replica]:
    """Verify object ``obj`` (stream bytes ``[lo, hi)``) where it lies and queue its bytes for
    the caller's tensors in ``landing``; returns the replica's URL when done, else the replicas
    to read it from the usual way (not mappable, or this copy failed).

    ``cols`` describes the storages the object overlaps (read only: views of the restore's
    columns). Applies when every one is in host memory and at least one is the caller's: the
    bytes for fresh buffers are copied at once (nothing of the caller's to protect), those for
    the caller's tensors wait. ``verified``: the object's :meth:`Fetcher.verify_mapped`
    result, where it was verified ahead (:class:`Ahead`); then an object of fresh buffers only
    is copied out of the verified mapping too.
    """
    ptrs, direct = cols.ptrs, cols.direct
    if verified is None:
        if not ptrs.all():
            return cands  # a CUDA target: copied by torch, the usual way
        if not direct.any():
            return cands  # nothing of the caller's: the usual read lands it at once, with no undo
        verified = fetcher.verify_mapped(obj.key, obj.size, obj.checksum, cands)
    mo, url, rest = verified
    if mo is None:
        return rest
    if not ptrs.all():  # a CUDA target (the guess of host_first was wrong): verified again the usual way
        mo.close()
        return cands
    # The part of each storage inside the object: storages lie in order and apart, so only the
    # first can start before it and only the last end after it.
    first = np.maximum(cols.starts, lo)
    n = np.minimum(cols.ends, hi) - first
    dst = ptrs + (first - cols.starts)
    src = first + (mo.addr - lo)
    if not direct.all():
        fresh = ~direct
        for d, s, c in zip(dst[fresh].tolist(), src[fresh].tolist(), n[fresh].tolist()):
            ctypes.memmove(d, s, c)
        dst, src, n = dst[direct], src[direct], n[direct]
    if dst.size:
        landing.add_columns(mo, dst, src, n)
    else:
        mo.close()  # fresh buffers only: copied already
    return url
