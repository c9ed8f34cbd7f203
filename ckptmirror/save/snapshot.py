"""Snapshot: copy the state's tensors into reusable host staging buffers ("arenas").

This is the only part of a save that runs on the training thread. It plans where every
storage goes, then does one memcpy per storage into an arena that is reused from one save
to the next, so steady-state saves of a same-shaped state allocate nothing (ANCHORS:
pytorch#170163 saw RSS grow with every async_save). A fresh allocation costs ~4x a copy into
existing pages here (page faults), which is why arenas are kept, not re-created, and why
:func:`prepare` (``Mirror.reserve``) can allocate and map them before the training loop.

The host copy never goes through torch's copy kernels: NumPy gathers the storages into the
arena in a few large pieces, on the calling thread plus one helper for large states, without
OpenMP (see :mod:`ckptmirror.buffers` for the 10,000-tensor stall that this avoids). Planning
is cached: :func:`plan_key` says whether the last plan still fits, :func:`replan` patches it
when only a few tensors moved (a fresh RNG state in every save's ``extra``).

Layout: storages are placed back to back in the arena; that byte range is the rank's *data
stream*, cut into objects of ``object_bytes`` by the writer. Tensors that share a storage
(tied weights, views) are stored once, as the smallest span of the storage that covers
them all, and restored sharing it.

CUDA tensors are copied with ``non_blocking=True`` into pinned arenas, and the copy is
synchronised before :func:`snapshot` returns: the caller may modify its tensors the moment
``save()`` returns, on any stream.
"""

from __future__ import annotations

import bisect
import copy
import ctypes
import dataclasses
import gc
import math
import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from operator import attrgetter
from typing import cast

import numpy as np  # torch imports it anyway
import torch

from ..buffers import byte_view, gather_bytes, host_array, host_bytes, usable_cpus
from ..format import LeafRecord, StorageRecord, paused_gc  # one pause shared with restore
from ..state.tree import Flattened, dtype_name, find_layout, make_layout
from .arena import Arena, ArenaPool

#: Storage spans start at a multiple of this, so views of every dtype (element sizes up to
#: 16 bytes) that share a storage keep an integral element offset.
_SPAN_ALIGN = 16

#: The unit of work of the host copy (see :class:`_Copies`). Large, because glibc's memmove
#: switches to non-temporal stores only above a size that depends on the cache (here between 16
#: and 32 MiB): measured on 256 MiB, pieces of <= 16 MiB copied at 6.4 GB/s, pieces of >= 32 MiB
#: at 10 GB/s. Small enough that a copy thread descheduled mid-piece costs the caller a few ms.
PIECE_BYTES = 64 << 20

#: Threads that share a host copy (the caller's included) once it holds at least
#: :data:`PARALLEL_MIN_BYTES`: one piece's worth, cut into one piece a thread (of at least 32 MiB,
#: still large enough for non-temporal stores).
COPY_THREADS = 2
PARALLEL_MIN_BYTES = PIECE_BYTES
#: ... and the average host span at least this large (see :class:`_Copies`).
PARALLEL_MIN_AVERAGE = 64 << 10

#: A host copy whose sources average at least this many bytes is mostly GIL-free (see ``gil_light``).
GIL_LIGHT_AVERAGE = 16 << 10

# ------------------------------------------------------------------ coalesced copies of small storages
# A state of many small tensors costs the host copy ~1 us a storage in per-call work (NumPy's
# ``concatenate``, or a hand-written ``memmove`` loop: the memcpy floor itself), which at 50,000
# tensors in 0.1 GB is most of the copy. But small storages that were allocated one after the
# other lie one after the other in memory, a few hundred bytes apart (the allocator's headers
# and the tensors' own C++ objects in between). Such a *run* is copied in one ``memmove``, gaps
# included, into a "loose" staging layout; the background writer then closes the gaps (moves
# each storage down to its place in the stream) before anything hashes or writes the stream.
# The stream, the manifest and the objects are exactly those of a storage-by-storage copy: the
# gap bytes never leave the staging buffer. Measured (50,000 tensors, 0.1 GB): 43 runs; the copy
# went from ~50 ms to ~15 ms of save()'s stall, the gap closing costs the writer ~40 ms.
#
# Why reading the gaps is safe: a gap is shorter than a page, so each of its bytes lies in the
# page of the last byte of the storage before it or in that of the first byte of the storage
# after it, both of which are mapped while the plan holds the two storages (it does, see
# ``_Copies.keep``). Nothing read from a gap is kept: the closing overwrites or drops it.

#: A plan coalesces only with at least this many small host storages (fewer: per-call costs
#: are small, and the stream keeps the plain layout).
COALESCE_MIN = 256
#: A storage of fewer bytes is *small*: with coalescing on, small host storages are laid out
#: after all the others (in state order), so that closing the gaps moves only their bytes.
SMALL_SPAN = 64 << 10
#: Two small storages are in one run when the second starts at most this many bytes after the
#: first ends. Below a page, for the safety argument above.
MAX_GAP = min(1024, mmap.PAGESIZE - 1)
#: Coalesce only when the gaps add at most this share of the stream's bytes to the staging
#: buffer (else copy storage by storage): 50,000 tensors in 0.1 GB staged 20% more.
MAX_GAP_SHARE = 0.25


@dataclass
class _Span:
    storage: torch.UntypedStorage | None  # None for numpy arrays
    array: object  # numpy array (contiguous) when storage is None
    start: int  # byte offset in the source storage
    nbytes: int
    offset: int = 0  # byte offset in the data stream


@dataclass(frozen=True)
class _Piece:
    """A unit of work of the host copy: ``srcs`` back to back are ``stream[start:end]``."""

    start: int
    end: int
    srcs: list[np.ndarray]
    spans: list[int]  # the span each source belongs to (see :func:`replan`)


class _Copies:
    """The copy list of a plan, built once: with a cached plan, a steady-state snapshot only
    copies bytes.

    Host sources (CPU storages, NumPy arrays, coalesced runs of small storages) are flat uint8
    NumPy views, cut into pieces of about :data:`PIECE_BYTES`: consecutive small sources are
    gathered into one piece (one C call for thousands of tensors), large spans are split (so
    that two threads can share them). Nothing goes through ``Tensor.copy_`` on the host: see
    :mod:`ckptmirror.buffers` for why. Device sources (CUDA) stay torch views, copied with
    ``non_blocking=True``.

    ``loose`` (one staging offset per span) and ``runs`` (lists of span indices, each copied as
    one range of memory) describe a coalesced plan (see :data:`COALESCE_MIN`); without them the
    staging layout is the stream's.
    """

    def __init__(
        self,
        spans: tuple[_Span, ...],
        loose: list[int] | None = None,
        runs: list[list[int]] | None = None,
        moves: list[tuple[int, int, int]] | None = None,
    ) -> None:
        self.pieces: list[_Piece] = []
        self.device: list[tuple[int, int, torch.Tensor]] = []  # (span index, stream offset, view)
        #: (staging offset, source) of the spans of a run that moved since the run was made
        #: (see :meth:`patched`): copied after the pieces, over the run's stale bytes
        self.fixups: dict[int, tuple[int, np.ndarray]] = {}
        #: where each span is staged; the gap closing of :meth:`close_gaps`, (to, from, bytes)
        self.loose = loose if loose is not None else [sp.offset for sp in spans]
        self.moves = moves or []
        self.in_run: frozenset[int] = frozenset(j for r in runs or () for j in r)
        #: the storages a run's memory range covers, alive as long as these copies are (a run's
        #: array points into them without holding them)
        self.keep = tuple(spans[j].storage for j in self.in_run)
        self.staging_bytes = max((o + sp.nbytes for o, sp in zip(self.loose, spans)), default=0)
        run_at = {r[0]: r for r in runs or ()}
        # (span index or -1 for a run, staging offset, bytes, flat uint8 source)
        host: list[tuple[int, int, int, np.ndarray]] = []
        for j, sp in enumerate(spans):
            if sp.nbytes == 0 or (j in self.in_run and j not in run_at):
                continue
            if j in run_at:
                r = run_at[j]
                last = spans[r[-1]]
                first_addr = _address(sp)
                n = _address(last) + last.nbytes - first_addr
                host.append((-1, self.loose[j], n, _raw_bytes(first_addr, n)))
                continue
            src = _span_source(sp)
            if isinstance(src, torch.Tensor):
                self.device.append((j, sp.offset, src))
            else:
                host.append((j, self.loose[j], sp.nbytes, src))
        self.host_bytes = sum(n for _, _, n, _ in host)
        #: Whether copying these is mostly memmoves that NumPy runs without the GIL (so another
        #: thread may check the state meanwhile: see ``Mirror``'s speculative staging): the GIL is
        #: held ~1 us a source, a source of 16 KiB takes ~2 us to copy.
        self.gil_light = bool(host) and not self.device and self.host_bytes >= GIL_LIGHT_AVERAGE * len(host)
        #: (copies, spans) when these were patched from other copies (:meth:`patched`)
        self.base: tuple[_Copies, frozenset[int]] | None = None
        #: Threads for the host copy: one for small states, and for states of many small
        #: tensors, whose copy is mostly NumPy's per-array work under the GIL (50,000 tensors
        #: in 0.1 GB: 0.024 s on one thread, 0.04-0.05 s on two).
        self.threads = 1
        piece = PIECE_BYTES
        if (
            COPY_THREADS > 1
            and self.host_bytes >= PARALLEL_MIN_BYTES
            and self.host_bytes >= PARALLEL_MIN_AVERAGE * len(host)
        ):
            self.threads = COPY_THREADS
            # Pieces of about host_bytes / threads when that is under PIECE_BYTES, so that a
            # state of 64-128 MiB is shared too (0.1 GB in 6 tensors: 0.008 s, was 0.012 s).
            piece = max(1, min(PIECE_BYTES, -(-self.host_bytes // COPY_THREADS)))
        run: list[np.ndarray] = []
        run_spans: list[int] = []
        run_start = run_end = 0
        for j, off, nbytes, src in host:
            if run and run_end != off:  # a device span lies in between: close the run
                self.pieces.append(_Piece(run_start, run_end, run, run_spans))
                run, run_spans = [], []
            if not run:
                run_start = run_end = off
            if nbytes >= piece:
                if run:
                    self.pieces.append(_Piece(run_start, run_end, run, run_spans))
                    run, run_spans = [], []
                for lo in range(0, nbytes, piece):
                    hi = min(nbytes, lo + piece)
                    self.pieces.append(_Piece(off + lo, off + hi, [src[lo:hi]], [j]))
                run_start = run_end = off + nbytes
                continue
            run.append(src)
            run_spans.append(j)
            run_end += nbytes
            if run_end - run_start >= piece:
                self.pieces.append(_Piece(run_start, run_end, run, run_spans))
                run, run_spans = [], []
                run_start = run_end
        if run:
            self.pieces.append(_Piece(run_start, run_end, run, run_spans))
        self._dst_for: int | None = None
        self._dst_host: np.ndarray | None = None
        self._dst_device: list[torch.Tensor] = []

    def destinations(self, stream: torch.Tensor) -> tuple[np.ndarray, list[torch.Tensor]]:
        """The staging buffer as a NumPy array, and the destination view of each device span
        (cached per arena buffer)."""
        if self._dst_for != stream.data_ptr() or self._dst_host is None:
            self._dst_host = host_array(stream)
            self._dst_device = [stream[off : off + src.numel()] for _, off, src in self.device]
            self._dst_for = stream.data_ptr()
        return self._dst_host, self._dst_device

    def close_gaps(self, staged: torch.Tensor) -> None:
        """Move every coalesced storage down to its stream offset (in order, so no source is
        overwritten before it is moved: each one moves down by the gaps before it)."""
        if not self.moves:
            return
        # memoryview slice assignment is one memmove (overlap-safe) at ~0.8 us a call, about half
        # of a NumPy slice assignment's or ctypes.memmove's per-call cost
        mv = host_bytes(staged)
        for to, frm, n in self.moves:
            mv[to : to + n] = mv[frm : frm + n]

    def patched(self, spans: tuple[_Span, ...], changed: set[int]) -> _Copies:
        """These copies with the sources of spans ``changed`` taken anew from ``spans`` (same layout)."""
        new = copy.copy(self)
        new.base = (self, frozenset(changed))
        fresh = {j: _span_source(spans[j]) for j in changed}
        new.fixups = dict(self.fixups)
        for j in changed & self.in_run:
            # Copied as part of a run: the run still copies the old storage's bytes (kept alive
            # by ``keep``), and the new ones are copied over them afterwards.
            src = fresh.pop(j)
            assert isinstance(src, np.ndarray)  # a run holds host spans only
            new.fixups[j] = (self.loose[j], src)
        new.device = []
        for j, off, v in self.device:
            dsrc = fresh.get(j, v)
            assert isinstance(dsrc, torch.Tensor)  # a device span stays a device span
            new.device.append((j, off, dsrc))
        new.pieces = []
        for pc in self.pieces:
            if fresh.keys().isdisjoint(pc.spans):
                new.pieces.append(pc)
                continue
            srcs = list(pc.srcs)
            for k, j in enumerate(pc.spans):
                if j in fresh:
                    sp, hsrc, base = spans[j], fresh[j], self.loose[j]
                    assert isinstance(hsrc, np.ndarray)  # a host span stays a host span
                    srcs[k] = hsrc[max(pc.start, base) - base : min(pc.end, base + sp.nbytes) - base]
            new.pieces.append(_Piece(pc.start, pc.end, srcs, pc.spans))
        return new


def _address(sp: _Span) -> int:
    """Where a CPU storage span's bytes start in memory."""
    assert sp.storage is not None
    return int(sp.storage.data_ptr()) + sp.start


def _raw_bytes(address: int, nbytes: int) -> np.ndarray:
    """A flat uint8 NumPy array over ``nbytes`` of memory at ``address`` (no copy, no owner: the
    caller keeps the memory alive)."""
    return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(address))


def _coalesce(
    spans: list[_Span], first_small: int
) -> tuple[list[int], list[list[int]], list[tuple[int, int, int]]] | None:
    """Runs of the small storages ``spans[first_small:]`` (laid out last, in order) that lie one
    after the other in memory: (staging offset per span, runs, gap-closing moves), or None when
    coalescing would not pay (few runs of two or more, or too many gap bytes)."""
    loose = [sp.offset for sp in spans]
    runs: list[list[int]] = []
    cur: list[int] = []
    shift = 0  # gap bytes staged so far
    end_addr = -1
    for j in range(first_small, len(spans)):
        sp = spans[j]
        addr = _address(sp)
        gap = addr - end_addr
        if cur and 0 <= gap <= MAX_GAP:
            shift += gap
            cur.append(j)
        else:
            if len(cur) > 1:
                runs.append(cur)
            cur = [j]
        loose[j] = sp.offset + shift
        end_addr = addr + sp.nbytes
    if len(cur) > 1:
        runs.append(cur)
    coalesced = sum(len(r) for r in runs)
    total = spans[-1].offset + spans[-1].nbytes
    if coalesced - len(runs) < COALESCE_MIN // 2 or shift > MAX_GAP_SHARE * total:
        return None
    # Spans not in a run keep their own copy; their staging offset still includes the gaps
    # staged before them (the loose layout only grows). Consecutive moves that stay adjacent
    # (no gap between the two storages) are one move.
    moves: list[tuple[int, int, int]] = []
    for j in range(first_small, len(spans)):
        n = spans[j].nbytes
        to, frm = spans[j].offset, loose[j]
        if frm == to or n == 0:
            continue
        if moves and moves[-1][0] + moves[-1][2] == to and moves[-1][1] + moves[-1][2] == frm:
            moves[-1] = (moves[-1][0], moves[-1][1], moves[-1][2] + n)
        else:
            moves.append((to, frm, n))
    return loose, runs, moves


def _span_source(sp: _Span) -> np.ndarray | torch.Tensor:
    """What a span is copied from: a flat uint8 NumPy view on the host, a torch view on a device."""
    if sp.storage is None:
        return _array_bytes(sp.array)
    view = byte_view(sp.storage, sp.start, sp.nbytes)
    return view if view.device.type != "cpu" else host_array(view)


def _array_bytes(a: object) -> np.ndarray:
    """The bytes of a contiguous NumPy array as a flat uint8 array (no copy)."""
    return np.asarray(a).reshape(-1).view(np.uint8)


@dataclass(frozen=True)
class Plan:
    """Where every storage of one state goes in the data stream."""

    spans: tuple[_Span, ...]
    storages: tuple[StorageRecord, ...]
    leaves: tuple[LeafRecord, ...]
    structure: object
    total_bytes: int
    needs_pinned: bool
    copies: _Copies


def plan_key(flat: Flattened) -> tuple[object, ...] | None:
    """What a cached plan depends on: where each leaf's bytes are and how they are laid out.

    Two keys compare equal only if, leaf by leaf, the data pointers are equal and the Python
    type, dtype, device, shape, strides and ``requires_grad`` are too, with no lazy conjugate or
    negative bit: then the old plan copies the same bytes into the same places, and its leaf
    records (dtype, shape, strides, offset, flags) still hold; so must
    :attr:`~ckptmirror.state.tree.Flattened.plain`, which sets flags too. The storage offset is
    not part of it: with the data pointer, shape, strides and dtype it changes no byte copied
    nor record.

    None when the plan must not be reused: NumPy leaves are copied to contiguous arrays and
    lazily conjugated/negated tensors are resolved into new tensors, both anew on every save.
    Reuse is safe because a cached plan keeps the old storages alive, so a different tensor
    cannot show up at the same address.

    Computed on every save: ``(data pointers, layout)``, the pointers one C loop (``map``), the
    rest one C++ pass (a :class:`~ckptmirror.state.tree.TensorLayout`, usually found by
    :func:`~ckptmirror.state.tree.flatten` already). Without TensorGuards, column by column
    (~0.3 us a leaf and an attribute: 0.1 s at 50,000 tensors).
    """
    leaves = flat.leaves
    layout = flat.layout
    if layout is None:
        layout = find_layout(leaves) or make_layout(leaves)
    if layout is not None:
        with paused_gc():
            return (tuple(map(_Tensor.data_ptr, leaves)), layout, flat.plain)
    if not all(map(isinstance, leaves, repeat(torch.Tensor))):
        return None
    if any(map(_Tensor.is_conj, leaves)) or any(map(_Tensor.is_neg, leaves)):
        return None
    with paused_gc():
        return (
            tuple(map(_Tensor.data_ptr, leaves)),
            tuple(map(_Tensor.size, leaves)),  # size(): 0.2 us a call, the shape property 1.4 us
            tuple(map(_Tensor.stride, leaves)),
            tuple(map(_dtype, leaves)),
            tuple(map(_requires_grad, leaves)),
            tuple(map(type, leaves)),
            flat.plain,
        )


_Tensor = torch.Tensor
_dtype = attrgetter("dtype")
_requires_grad = attrgetter("requires_grad")


def _extent_bytes(t: torch.Tensor) -> int:
    if t.is_contiguous():
        return t.numel() * t.element_size()
    if t.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def plan(flat: Flattened) -> Plan:
    """Group leaves by storage and lay the storages out back to back."""
    with paused_gc():
        return _plan(flat)


def _plan(flat: Flattened) -> Plan:
    groups: dict[tuple[str, int], list[int]] = {}
    tensors: dict[int, torch.Tensor] = {}
    arrays: dict[int, np.ndarray] = {}
    storages: dict[int, torch.UntypedStorage] = {}
    spans: list[_Span] = []
    leaf_span: dict[int, int] = {}
    needs_pinned = False
    for i, leaf in enumerate(flat.leaves):
        if isinstance(leaf, torch.Tensor):
            t = leaf
            if t.is_conj() or t.is_neg():
                # Lazy conjugate/negative views: their raw bytes are not their values.
                t = t.resolve_conj().resolve_neg()
            tensors[i] = t
            st = storages[i] = t.untyped_storage()
            if t.numel() == 0 or st.nbytes() == 0:
                leaf_span[i] = len(spans)
                spans.append(_Span(None, None, 0, 0))
                continue
            needs_pinned = needs_pinned or t.is_cuda
            groups.setdefault((str(t.device) if t.is_cuda else "cpu", st.data_ptr()), []).append(i)
        else:  # numpy array
            # ascontiguousarray would turn a 0-d array into shape (1,)
            a = leaf if leaf.flags.c_contiguous else np.ascontiguousarray(leaf)
            arrays[i] = a
            leaf_span[i] = len(spans)
            spans.append(_Span(None, a, 0, a.nbytes))
    for members in groups.values():
        first = storages[members[0]]
        starts = [int(tensors[m].storage_offset()) * tensors[m].element_size() for m in members]
        ends = [s + _extent_bytes(tensors[m]) for s, m in zip(starts, members)]
        lo = (min(starts) // _SPAN_ALIGN) * _SPAN_ALIGN
        hi = min(max(ends), first.nbytes())
        for m in members:
            leaf_span[m] = len(spans)
        spans.append(_Span(first, None, lo, hi - lo))
    first_small = len(spans)
    if all(sp.storage is None or sp.storage.device.type == "cpu" for sp in spans):
        small = [sp.storage is not None and 0 < sp.nbytes < SMALL_SPAN for sp in spans]
        count = sum(small)
        if count >= COALESCE_MIN:
            # Small storages last (each part in state order): closing the gaps of a coalesced
            # copy then moves only their bytes (see COALESCE_MIN).
            order = [j for j in range(len(spans)) if not small[j]] + [j for j in range(len(spans)) if small[j]]
            new_index = [0] * len(order)
            for k, j in enumerate(order):
                new_index[j] = k
            spans = [spans[j] for j in order]
            leaf_span = {i: new_index[j] for i, j in leaf_span.items()}
            first_small = len(spans) - count
    offset = 0
    for sp in spans:
        sp.offset = offset
        offset += sp.nbytes
    coalesced = _coalesce(spans, first_small) if first_small < len(spans) else None
    leaves = []
    plain = flat.plain  # leaves recorded as state_dict()'s detached aliases would be
    for i in range(len(flat.leaves)):
        sp = spans[leaf_span[i]]
        obj: torch.Tensor | np.ndarray = tensors[i] if i in tensors else arrays[i]
        if isinstance(obj, torch.Tensor):
            esize = obj.element_size()
            elem_off = 0 if sp.nbytes == 0 else (obj.storage_offset() * esize - sp.start) // esize
            src = flat.leaves[i]
            leaves.append(
                LeafRecord(
                    kind="tensor",
                    storage=leaf_span[i],
                    dtype=dtype_name(obj.dtype),
                    shape=tuple(obj.shape),
                    stride=tuple(obj.stride()),
                    offset=elem_off,
                    requires_grad=i >= plain and bool(src.requires_grad),
                    parameter=i >= plain and isinstance(src, torch.nn.Parameter),
                )
            )
        else:
            shape = tuple(obj.shape)
            stride = tuple(int(math.prod(shape[j + 1 :])) for j in range(len(shape)))
            leaves.append(LeafRecord("ndarray", leaf_span[i], obj.dtype.str, shape, stride, 0))
    frozen = tuple(spans)
    return Plan(
        spans=frozen,
        storages=tuple(StorageRecord(sp.offset, sp.nbytes) for sp in spans),
        leaves=tuple(leaves),
        structure=flat.structure,
        total_bytes=offset,
        needs_pinned=needs_pinned,
        copies=_Copies(frozen, *coalesced) if coalesced is not None else _Copies(frozen),
    )


def frozen_flags(p: Plan, model: object) -> tuple[bool, ...] | None:
    """Per storage of ``p``: whether it is the storage of one of ``model``'s frozen parameters.

    For :func:`~ckptmirror.format.cut_objects`, so that incremental saves keep frozen small
    tensors out of the objects that change. ``model.state_dict()`` detaches, so the flag is
    read off ``model.parameters()`` (``requires_grad`` False) and matched by storage address.
    Runs on the background writer, not in ``save()``'s stall: ~2 us a parameter. None when
    ``model`` has no parameters() or none is frozen (then the cut is the plain one).
    """
    params = getattr(model, "parameters", None)
    if not callable(params):
        return None
    frozen: set[int] = set()
    try:
        for prm in params():
            if prm.requires_grad:
                continue
            local = prm.to_local() if hasattr(prm, "to_local") else prm  # DTensor (FSDP2): this rank's shard
            if local.numel():
                frozen.add(local.untyped_storage().data_ptr())
    except Exception:  # noqa: BLE001 - a hint only: a module whose parameters() misbehaves gets the plain cut
        return None
    if not frozen:
        return None
    return tuple(sp.storage is not None and sp.storage.data_ptr() in frozen for sp in p.spans)


def replan(
    prev: Plan, prev_key: tuple[object, ...] | None, flat: Flattened, key: tuple[object, ...] | None
) -> Plan | None:
    """A plan for ``flat`` made from ``prev``, when only where some tensors live has changed.

    The case: a state that is the same tensors every save but for a few new ones laid out like
    the old, typically ``extra={"rng": torch.get_rng_state()}`` (a new tensor on every call).
    The key differs, so :func:`plan` would redo the whole layout (~10 us a tensor plus a view per
    storage: 0.3 s at 10,000 tensors) on every save; here only the moved tensors' sources are
    replaced. Returns None when anything else changed (then call :func:`plan`): shapes, strides,
    dtypes, flags, the number of leaves, a moved tensor that shares its storage with another
    leaf, or a new storage whose bytes would lay out differently.
    """
    if key is None or prev_key is None or len(key) != len(prev_key) or key[1:] != prev_key[1:]:
        return None
    old_ptrs, new_ptrs = cast(tuple[int, ...], prev_key[0]), cast(tuple[int, ...], key[0])
    if len(old_ptrs) != len(new_ptrs):
        return None
    moved = [i for i, (a, b) in enumerate(zip(old_ptrs, new_ptrs)) if a != b]
    if len(moved) > max(8, len(new_ptrs) // 16):
        return None  # much has moved: planning anew costs about the same
    members: dict[int, int] = {}
    for rec in prev.leaves:
        members[rec.storage] = members.get(rec.storage, 0) + 1
    taken = {sp.storage.data_ptr() for sp in prev.spans if sp.storage is not None and sp.nbytes}
    spans = list(prev.spans)
    changed: set[int] = set()
    for i in moved:
        j = prev.leaves[i].storage
        old, t = prev.spans[j], flat.leaves[i]
        if members[j] != 1 or old.storage is None or not isinstance(t, torch.Tensor):
            return None  # a span shared by several leaves: their grouping may have changed
        st = t.untyped_storage()
        if st.data_ptr() in taken or st.device != old.storage.device:
            return None  # now shares a storage with another leaf, or moved between devices
        start = int(t.storage_offset()) * t.element_size()
        lo = (start // _SPAN_ALIGN) * _SPAN_ALIGN
        hi = min(start + _extent_bytes(t), st.nbytes())
        if lo != old.start or hi - lo != old.nbytes:
            return None
        taken.add(st.data_ptr())
        spans[j] = _Span(st, None, lo, hi - lo, old.offset)
        changed.add(j)
    frozen = tuple(spans)
    return dataclasses.replace(
        prev, spans=frozen, structure=flat.structure, copies=prev.copies.patched(frozen, changed)
    )


def prepare(flat: Flattened, pool: ArenaPool, cap: int | None = None) -> tuple[tuple[object, ...] | None, Plan]:
    """Plan ``flat`` and grow and map every arena of ``pool`` for it: what :meth:`Mirror.reserve` does.

    Returns the plan's cache key (None: not reusable) and the plan. Ends with a full garbage
    collection: planning makes thousands of long-lived objects (one NumPy view per storage),
    and the collection they would trigger otherwise lands in the first save (measured: 0.06 s
    of a 0.07 s stall at 1,000 tensors).
    """
    key = plan_key(flat)
    p = plan(flat)
    pool.reserve(staging_need(p, cap), p.needs_pinned)
    gc.collect()
    return key, p


def staging_need(p: Plan, cap: int | None = None) -> int:
    """The bytes of staging buffer a save of ``p`` uses under a staging cap of ``cap`` bytes:
    the cap for a state larger than it (a sliced save), else the staging layout's size (the
    stream plus the gaps of a coalesced copy) when it fits, else the stream's."""
    staged = p.copies.staging_bytes
    if cap is None:
        return staged
    if p.total_bytes > cap:
        return cap
    return staged if staged <= cap else p.total_bytes


def snapshot(p: Plan, arena: Arena) -> torch.Tensor:
    """Copy every span into the arena; return the stream (a uint8 CPU tensor of ``total_bytes``)."""
    stream, finish = stage(p, arena)
    finish()
    return stream


def stage(p: Plan, arena: Arena, cap: int | None = None) -> tuple[torch.Tensor, Callable[[], None]]:
    """Copy every span into the arena: what ``save()`` waits for.

    Returns the stream (a uint8 CPU tensor of ``total_bytes``) and the work left before it may
    be read: closing the gaps of a coalesced copy (see :data:`COALESCE_MIN`), for the background
    writer; a no-op for other plans. A coalesced plan whose staging layout exceeds ``cap`` bytes
    is copied storage by storage instead, straight into the stream.

    Host bytes are copied by NumPy on this thread (plus one helper thread for large states),
    never by an OpenMP team: see :mod:`ckptmirror.buffers`. A cached plan's views hold the data
    pointers its tensors had when it was made; :func:`plan_key` (which includes every leaf's
    data pointer) is what makes reusing it safe.
    """
    c = p.copies
    if cap is not None and c.staging_bytes > cap:
        stream = arena.reserve(p.total_bytes, p.needs_pinned)
        copy_range(p, stream, 0, p.total_bytes)
        return stream, _nothing
    staged = arena.reserve(c.staging_bytes, p.needs_pinned)
    _copy_staged(c, staged)
    return staged[: p.total_bytes], partial(c.close_gaps, staged)


def _nothing() -> None:
    pass


def reuse_staged(p: Plan, copied: Plan, staged: torch.Tensor) -> bool:
    """Whether ``staged``, just staged by :func:`stage` for ``copied`` (uncapped), holds ``p``'s
    staging: ``p`` copies the same sources, or was patched from ``copied`` by :func:`replan`
    (then the patched spans are copied again here, from their new sources). False: stage anew."""
    c = p.copies
    if c is copied.copies:
        return True
    if c.base is None or c.base[0] is not copied.copies or c.device:
        return False
    dst, _ = c.destinations(staged)
    for j in c.base[1]:
        src = _span_source(p.spans[j])
        assert isinstance(src, np.ndarray)  # host spans only (no device copies)
        off = c.loose[j]
        gather_bytes(dst[off : off + src.nbytes], [src])
    return True


def _copy_staged(c: _Copies, stream: torch.Tensor) -> None:
    dst, device_dst = c.destinations(stream)
    # Device copies first: they run on the device's DMA engines while the host copies below.
    devices: set[torch.device] = set()
    for (_, _, src), d in zip(c.device, device_dst):
        d.copy_(src, non_blocking=src.is_cuda)
        devices.add(src.device)
    if c.pieces:
        _copy_pieces(dst, c.pieces, c.threads)
    for off, fix in c.fixups.values():
        gather_bytes(dst[off : off + len(fix)], [fix])
    for dev in devices:
        if dev.type == "cuda":
            # The copies were queued on each device's current stream; wait for them so the caller
            # may change its tensors as soon as we return.
            torch.cuda.current_stream(dev).synchronize()


def copy_range(p: Plan, dst: torch.Tensor, lo: int, hi: int) -> None:
    """Copy bytes ``[lo, hi)`` of ``p``'s data stream into ``dst`` (a uint8 host tensor of
    ``hi - lo`` bytes): one slice of a snapshot, for a state larger than the staging cap
    (``Mirror(staging_bytes=...)``). Same copies as :func:`snapshot`, span by span."""
    if dst.numel() != hi - lo:
        raise ValueError(f"destination of {dst.numel()} bytes for a range of {hi - lo}")
    host = host_array(dst) if hi > lo else None
    offsets = [sp.offset for sp in p.spans]
    devices: set[torch.device] = set()
    i = max(0, bisect.bisect_right(offsets, lo) - 1)
    while i < len(p.spans) and p.spans[i].offset < hi:
        sp = p.spans[i]
        i += 1
        a, b = max(lo, sp.offset), min(hi, sp.offset + sp.nbytes)
        if a >= b:
            continue
        src = _span_source(sp)[a - sp.offset : b - sp.offset]
        if isinstance(src, torch.Tensor):  # a device tensor: DMA into the (pinned) staging buffer
            dst[a - lo : b - lo].copy_(src, non_blocking=src.is_cuda)
            devices.add(src.device)
        else:
            assert host is not None
            np.copyto(host[a - lo : b - lo], src, casting="no")
    for dev in devices:
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()


def _copy_pieces(dst: np.ndarray, pieces: list[_Piece], threads: int) -> None:
    """Copy every piece into ``dst``; with ``threads`` > 1, helper threads take pieces too.

    The caller works through the pieces itself and waits only for pieces a helper has taken:
    a helper that is slow to start (a busy machine) takes none and costs nothing; one that is
    descheduled mid-piece delays the caller by at most one piece.
    """
    threads = min(threads, len(pieces), usable_cpus())
    if threads <= 1:
        for pc in pieces:
            gather_bytes(dst[pc.start : pc.end], pc.srcs)
        return
    cond = threading.Condition()
    state = {"next": 0, "busy": 0}
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with cond:
                i = state["next"]
                if i >= len(pieces) or errors:
                    return
                state["next"] = i + 1
                state["busy"] += 1
            try:
                pc = pieces[i]
                gather_bytes(dst[pc.start : pc.end], pc.srcs)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller below
                errors.append(exc)
            finally:
                with cond:
                    state["busy"] -= 1
                    cond.notify_all()

    for _ in range(threads - 1):
        threading.Thread(target=work, name="ckptmirror-copy", daemon=True).start()
    work()
    with cond:
        cond.wait_for(lambda: state["busy"] == 0)
    if errors:
        raise errors[0]
