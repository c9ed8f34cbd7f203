"""The plan of a snapshot: where every storage of a state goes in the data stream.

Holds :class:`Plan` and what makes, caches and patches it: :func:`plan` (group leaves by
storage, lay the storages out back to back, small host storages last and coalesced into runs
when that pays), :func:`plan_key` (whether a cached plan still fits), :func:`replan` (patch a
plan when only a few tensors moved) and :func:`frozen_flags` (which storages are frozen
parameters, for the writer's cut).

Apart from :mod:`~ckptmirror.save.copies` (the copy list and the copies, which run on every
save) because this is decided once per layout of the state and cached; a plan's copy list is
built from its spans by :class:`~ckptmirror.save.copies._Copies` when the plan is made.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter
from typing import cast

import numpy as np  # torch imports it anyway
import torch

from ..format import LeafRecord, StorageRecord, paused_gc  # one pause shared with restore
from ..state.tree import Flattened, dtype_name, find_layout, make_layout
from .copies import _address, _Copies, _Span

#: Storage spans start at a multiple of this, so views of every dtype (element sizes up to
#: 16 bytes) that share a storage keep an integral element offset.
_SPAN_ALIGN = 16

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
