"""Undo: a restore either completes or leaves the caller's tensors exactly as they were.

Restore writes into the caller's tensors in place (objects are read straight into them), so a
step that fails halfway, an object that verifies on no replica, ranks that disagree, or a
``load_state_dict`` that raises afterwards would leave a half-restored model: part new step,
part old values, part bytes that failed their checksum. Instead, the restore path copies each
region of a caller's tensor into an :class:`UndoLog` right before its first byte is
overwritten, and :meth:`UndoLog.rollback` copies them all back. On success the log is
released; nothing is kept.

Cost: one memcpy of the bytes restored in place, into a buffer the caller provides (the
mirror lends its staging arena, which the first save needs anyway, so a run pays no extra
memory and no extra page faults for it).

Objects on local disk skip that copy: they are verified where they lie (mapped read-only,
:class:`~ckptmirror.replicas.local.MappedObject`) and their bytes wait in a :class:`Landing`
until every object of the step verified, every rank agreed and nothing is left that can fail;
only then :meth:`Landing.land` copies them in: with ``preadv`` on the verified object file, up
to 1024 tensors a system call (:mod:`~ckptmirror.restore.vread`), on ``io_threads`` threads. Nothing of
theirs needs undoing, because nothing of theirs landed before the point of no return.
"""

from __future__ import annotations

import ctypes
import operator
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from itertools import compress, groupby, repeat
from typing import Any, Protocol, cast

import numpy as np
import torch

from ..buffers import usable_cpus
from ..errors import CorruptObjectError
from . import vread

#: Returns a host uint8 buffer of at least the given number of bytes.
BufferFactory = Callable[[int], torch.Tensor]
_Ints = Sequence[int] | np.ndarray


class UndoLog:
    """Copies of the caller's bytes taken before they are overwritten, for one restore.

    ``capacity`` bounds the bytes that may be saved (or a function that returns it, called on
    first use); ``factory`` provides the buffer, on first use. :meth:`save` is thread-safe
    (object reads run on a pool).
    """

    def __init__(self, capacity: int | Callable[[], int], factory: BufferFactory | None = None) -> None:
        self._capacity = capacity
        self._factory = factory or (lambda n: torch.empty(n, dtype=torch.uint8))
        self._buf: torch.Tensor | None = None
        self._used = 0
        # (live region, or None for raw host memory at ptr; ptr; saved copy)
        self._entries: list[tuple[torch.Tensor | None, int, torch.Tensor]] = []
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        """The bytes that may be saved. Given as a function, it is called once, on first use:
        a restore whose bytes all wait in a :class:`Landing` never saves, and never sizes it."""
        if callable(self._capacity):
            self._capacity = self._capacity()
        return self._capacity

    @property
    def saved_bytes(self) -> int:
        """Bytes copied so far."""
        return self._used

    def _slot(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            if self._buf is None:
                self._buf = self._factory(self.capacity)
            if self._used + nbytes > self._buf.numel():
                # More than planned (should not happen): a separate copy keeps it correct.
                return torch.empty(nbytes, dtype=torch.uint8)
            copy = self._buf[self._used : self._used + nbytes]
            self._used += -(-nbytes // 16) * 16  # aligned, so a copy can be viewed as any dtype
            return copy

    def save_raw(self, ptr: int, nbytes: int) -> None:
        """Copy ``nbytes`` of host memory at ``ptr`` (inside a caller's CPU tensor) aside."""
        if nbytes <= 0:
            return
        copy = self._slot(nbytes)
        # A plain memmove: it releases the GIL and never enters torch's OpenMP team, which on
        # a busy machine makes large copies wait on descheduled threads.
        ctypes.memmove(copy.data_ptr(), ptr, nbytes)
        with self._lock:
            self._entries.append((None, ptr, copy))

    def save(self, region: torch.Tensor) -> None:
        """Copy ``region`` (any tensor, any device) aside before it is overwritten."""
        nbytes = region.numel() * region.element_size()
        if nbytes == 0:
            return
        if region.is_contiguous() and not region.is_cuda:
            self.save_raw(region.data_ptr(), nbytes)
            return
        copy = self._slot(nbytes)
        if region.is_contiguous():
            copy.copy_(region.detach().reshape(-1).view(torch.uint8))
        else:  # a strided view: save its values, element by element, in its own dtype
            copy.view(region.dtype).view(region.shape).copy_(region.detach())
        with self._lock:
            self._entries.append((region, 0, copy))

    def rollback(self) -> None:
        """Put every saved region back, newest first (a region saved twice ends at its oldest)."""
        with self._lock:
            entries, self._entries = self._entries, []
        with torch.no_grad():
            for region, ptr, copy in reversed(entries):
                if region is None:
                    ctypes.memmove(ptr, copy.data_ptr(), copy.numel())
                elif region.is_contiguous():
                    region.detach().reshape(-1).view(torch.uint8).copy_(copy)
                else:
                    region.detach().copy_(copy.view(region.dtype).view(region.shape))
        self.release()

    def release(self) -> None:
        """Forget the saved copies (the restore succeeded)."""
        with self._lock:
            self._entries = []
            self._buf = None
            self._used = 0


class _Closable(Protocol):
    def close(self) -> None: ...


#: Copies smaller than this land on the calling thread; larger ones are split over threads.
_PARALLEL_BYTES = 32 << 20
_CHUNK = 8 << 20
_SMALL = 256 << 10


class Landing:
    """Verified bytes that wait outside the caller's tensors until nothing can fail any more.

    Holds host-to-host copies (destination address, source address, bytes) from verified
    mappings (kept open until the copies are done), and tensor copies from fresh buffers.
    :meth:`land` performs them all; :meth:`discard` drops them (the restore failed: the caller's
    tensors were never touched by them). Thread-safe to fill.

    A mapping that is a local object file (:meth:`~ckptmirror.replicas.local.MappedObject.reopen`)
    lands by reading that file with ``preadv`` (:mod:`~ckptmirror.restore.vread`): at 50k small
    tensors it takes a third of the time of one ``memmove`` per tensor. Anything else is copied
    out of the mapping.

    The copies are kept as three int64 arrays per source, not a tuple each: a restore of 50k
    small tensors queues 50k of them, and the callers compute them with array operations (at
    50k tensors the same columns as Python lists cost ~60 ms of CPU to build and ~20 ms more to
    turn into ``preadv`` plans).
    """

    def __init__(self) -> None:
        self._keep: list[_Closable] = []
        # (source, dst, src, nbytes): copies out of one source, as int64 arrays
        self._spans: list[tuple[_Closable, np.ndarray, np.ndarray, np.ndarray]] = []
        self._tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes waiting to land."""
        with self._lock:
            return sum(int(n.sum()) for _, _, _, n in self._spans) + sum(
                d.numel() * d.element_size() for d, _ in self._tensors
            )

    def add(self, source: _Closable, copies: list[tuple[int, int, int]]) -> None:
        """Copies ``(dst, src, nbytes)`` out of ``source``, which stays open until landed or discarded."""
        dst, src, n = (list(c) for c in zip(*copies)) if copies else ([], [], [])
        self.add_columns(source, dst, src, n)

    def add_columns(self, source: _Closable, dst: _Ints, src: _Ints, nbytes: _Ints) -> None:
        """Like :meth:`add`, the copies given as columns (sequences or arrays of ints):
        ``nbytes[i]`` bytes from ``src[i]`` to ``dst[i]``. Copied: the caller may reuse its arrays."""
        d, s, n = (np.array(c, dtype=np.int64) for c in (dst, src, nbytes))
        with self._lock:
            self._keep.append(source)
            self._spans.append((source, d, s, n))

    def add_tensor(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src)`` later (a caller's tensor that is not filled byte for byte)."""
        with self._lock:
            self._tensors.append((dst, src))

    def land(self, threads: int = 2, pool: Executor | None = None) -> None:
        """Copy everything into place on up to ``threads`` threads (no more than the CPUs this
        process may use), then release the sources. ``pool``: where the helper threads come
        from (the restore's own, started already); by default threads started for this.

        Raises :class:`~ckptmirror.errors.CorruptObjectError` (naming the object and its replica)
        if an object file cannot be read in full any more (cut shorter, a disk error): it was
        verified, and committed objects never change, so this means the disk or someone else
        changed it. The caller's tensors then hold part of the step: the error says so.
        """
        with self._lock:
            tensors, spans = self._tensors, self._spans
            self._tensors, self._spans = [], []
        threads = max(1, min(threads, usable_cpus()))
        fds: list[int] = []
        try:
            if vread.AVAILABLE and spans:
                # Out of verified object files: preadv, up to 1024 copies a call (see vread).
                # What cannot be read that way (no file, replaced since) is copied below.
                files, spans = _plan_files(spans, fds)
                _read_files(files, threads, pool)
            dst, src, n = _columns(spans)
            # Small copies on this thread in one loop: spread over threads, each memmove's GIL
            # hand-off costs more than the copy. Large ones in chunks on the pool, so that one
            # big tensor also spreads over it.
            small = list(map(operator.lt, n, repeat(_SMALL)))
            if all(small):
                sd, ss, sn = dst, src, n
                large: tuple[list[int], list[int], list[int]] = ([], [], [])
            else:
                sd, ss, sn = (list(compress(c, small)) for c in (dst, src, n))
                big = list(map(operator.not_, small))
                large = ([], [], [])
                for d, s, k in zip(compress(dst, big), compress(src, big), compress(n, big)):
                    for off in range(0, k, _CHUNK):
                        large[0].append(d + off)
                        large[1].append(s + off)
                        large[2].append(min(_CHUNK, k - off))
            if threads > 1 and sum(large[2]) >= _PARALLEL_BYTES:
                # memmove through ctypes releases the GIL: the threads copy in parallel.
                parts = [[c[i::threads] for c in large] for i in range(threads)]

                def own() -> None:  # the small copies, then a share of the large ones
                    _move_all(sd, ss, sn)
                    _move_all(*parts[0])

                _on_helpers(pool, threads, [(_move_all, *p) for p in parts[1:]], own)
            else:
                _move_all(sd, ss, sn)
                _move_all(*large)
            with torch.no_grad():
                for d_t, s_t in tensors:
                    d_t.copy_(s_t)
        finally:
            for fd in fds:
                os.close(fd)
            self.discard()

    def discard(self) -> None:
        """Drop whatever has not landed and release the sources (idempotent)."""
        with self._lock:
            keep, self._keep = self._keep, []
            self._tensors, self._spans = [], []
        for k in keep:
            k.close()


class _File(Protocol):
    """A verified mapping that can also be read as a file (:class:`~ckptmirror.replicas.local.MappedObject`)."""

    addr: int
    size: int
    replica: str
    key: str

    def reopen(self) -> int | None: ...


#: One file's copies: its descriptor, its plan, the mapping it was verified as.
_FilePlan = tuple[int, vread.Plan, _File]


_Span = tuple[_Closable, np.ndarray, np.ndarray, np.ndarray]


def _plan_files(spans: list[_Span], fds: list[int]) -> tuple[list[_FilePlan], list[_Span]]:
    """Split the copies into those read from their object files (planned per file; each opened
    descriptor appended to ``fds``) and the rest (returned, copied with memmove)."""
    files: list[_FilePlan] = []
    rest: list[_Span] = []
    for span in spans:
        source, dst, src, n = span
        fd = source.reopen() if hasattr(source, "reopen") and dst.size else None
        if fd is None:
            rest.append(span)
            continue
        fds.append(fd)
        f = cast(_File, source)
        offsets = src - f.addr  # addresses in the mapping -> file offsets
        if int(offsets.min()) < 0 or int((offsets + n).max()) > f.size:
            raise AssertionError(f"landing copies outside the mapping of {f.key} ({f.size} bytes)")
        files.append((fd, vread.plan(dst, offsets, n, _CHUNK), f))
    return files, rest


def _columns(spans: list[_Span]) -> tuple[list[int], list[int], list[int]]:
    """The copies of ``spans`` as three lists of ints (for one ``memmove`` each)."""
    if not spans:
        return [], [], []
    return cast(
        tuple[list[int], list[int], list[int]],
        tuple(np.concatenate([sp[c] for sp in spans]).tolist() for c in (1, 2, 3)),
    )


def _on_helpers(pool: Executor | None, threads: int, helpers: list[tuple[Any, ...]], own: Callable[[], None]) -> None:
    """Run each ``(fn, *args)`` of ``helpers`` on ``pool`` (or on up to ``threads - 1`` threads
    started for it) and ``own`` on this thread; returns once every one is over, raising the
    first error. Waiting for all of them also when one raised: the caller closes the
    descriptors next, and a helper still writing into the tensors after an error would race
    whatever the caller does about it."""
    started = None
    if pool is None and helpers:
        started = ThreadPoolExecutor(max(1, threads - 1), thread_name_prefix="ckptmirror-land")
    ex = pool or started
    futures: list[Future[Any]] = []
    try:
        for h in helpers:  # (appended one by one: those submitted before a failing submit are waited for)
            assert ex is not None  # (helpers: a pool given, or started above)
            futures.append(ex.submit(*h))
        own()
    finally:
        wait(futures)
        if started is not None:
            started.shutdown(wait=True)
    for fut in futures:
        fut.result()


def _read_files(files: list[_FilePlan], threads: int, pool: Executor | None = None) -> None:
    """Perform every file's calls, split over ``threads`` threads by bytes (in order, so that
    each thread reads runs of the files)."""
    units = [(i, c, nb) for i, (_, p, _) in enumerate(files) for c, (_, _, _, nb) in enumerate(p.calls)]
    if not units:
        return
    total = sum(u[2] for u in units) or 1
    threads = max(1, min(threads, len(units)))
    groups: list[list[tuple[int, int, int]]] = [[] for _ in range(threads)]
    done = 0
    for u in units:
        groups[min(threads - 1, done * threads // total)].append(u)
        done += u[2]

    def run(group: list[tuple[int, int, int]]) -> None:
        for fi, units_of_file in groupby(group, key=operator.itemgetter(0)):
            fd, p, f = files[fi]
            try:
                vread.read(fd, p, [u[1] for u in units_of_file])
            except OSError as exc:
                raise CorruptObjectError(
                    f"reading the object file after it verified failed ({exc}): it was cut shorter or the "
                    "disk failed; the caller's tensors hold part of the restored step and part of what "
                    "they held before: restore again",
                    replica=f.replica,
                    key=f.key,
                ) from exc

    _on_helpers(pool, threads, [(run, g) for g in groups[1:] if g], lambda: run(groups[0]))


def _move_all(dst: Sequence[int], src: Sequence[int], nbytes: Sequence[int]) -> None:
    # One ctypes call per copy (~1 us of overhead, at 50k copies about the time of the copying
    # itself); process_vm_readv on the own process, which takes 1024 copies per call, measured
    # no faster.
    memmove = ctypes.memmove
    for d, s, n in zip(dst, src, nbytes):
        memmove(d, s, n)
