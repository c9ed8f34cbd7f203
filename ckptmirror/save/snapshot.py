"""Snapshot: copy the state's tensors into reusable host staging buffers ("arenas").

This is the only part of a save that runs on the training thread. It plans where every
storage goes, then does one memcpy per storage into an arena that is reused from one save
to the next, so steady-state saves of a same-shaped state allocate nothing (ANCHORS:
pytorch#170163 saw RSS grow with every async_save). A fresh allocation costs ~4x a copy into
existing pages here (page faults), which is why arenas are kept, not re-created.

Layout: storages are placed back to back in the arena; that byte range is the rank's *data
stream*, cut into objects of ``object_bytes`` by the writer. Tensors that share a storage
(tied weights, views) are stored once, as the smallest span of the storage that covers
them all, and restored sharing it.

CUDA tensors are copied with ``non_blocking=True`` into pinned arenas, and the copy is
synchronised before :func:`snapshot` returns: the caller may modify its tensors the moment
``save()`` returns, on any stream.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..buffers import byte_view
from ..format import LeafRecord, StorageRecord
from ..state.tree import Flattened, dtype_name

if TYPE_CHECKING:
    import numpy as np  # imported lazily at run time

#: Storage spans start at a multiple of this, so views of every dtype (element sizes up to
#: 16 bytes) that share a storage keep an integral element offset.
_SPAN_ALIGN = 16


@dataclass
class _Span:
    storage: torch.UntypedStorage | None  # None for numpy arrays
    array: object  # numpy array (contiguous) when storage is None
    start: int  # byte offset in the source storage
    nbytes: int
    offset: int = 0  # byte offset in the data stream


class _Copies:
    """The copy list of a plan: source views built once, destination views once per arena
    buffer. With a cached plan, a steady-state snapshot is a single batched copy."""

    def __init__(self, spans: tuple[_Span, ...]) -> None:
        self.cpu: list[tuple[int, torch.Tensor]] = []
        self.cuda: list[tuple[int, torch.Tensor]] = []
        self.arrays: list[tuple[int, object]] = []
        for sp in spans:
            if sp.nbytes == 0:
                continue
            if sp.storage is None:
                self.arrays.append((sp.offset, sp.array))
                continue
            src = byte_view(sp.storage, sp.start, sp.nbytes)
            (self.cuda if src.is_cuda else self.cpu).append((sp.offset, src))
        self._dst_for: int | None = None
        self._dst: list[torch.Tensor] = []
        self._src = [src for _, src in self.cpu]

    def cpu_pairs(self, stream: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self._dst_for != stream.data_ptr():
            self._dst = [stream[off : off + src.numel()] for off, src in self.cpu]
            self._dst_for = stream.data_ptr()
        return self._dst, self._src


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

    None when the plan must not be reused: NumPy leaves are copied to contiguous arrays and
    lazily conjugated/negated tensors are resolved into new tensors, both anew on every save.
    Reuse is safe because a cached plan keeps the old storages alive, so a different tensor
    cannot show up at the same address.
    """
    key = []
    for t in flat.leaves:
        if not isinstance(t, torch.Tensor) or t.is_conj() or t.is_neg():
            return None
        key.append((t.data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype, t.requires_grad, t.__class__))
    return tuple(key)


def _extent_bytes(t: torch.Tensor) -> int:
    if t.is_contiguous():
        return t.numel() * t.element_size()
    if t.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def plan(flat: Flattened) -> Plan:
    """Group leaves by storage and lay the storages out back to back."""
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
            import numpy as np

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
    offset = 0
    for sp in spans:
        sp.offset = offset
        offset += sp.nbytes
    leaves = []
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
                    requires_grad=bool(src.requires_grad),
                    parameter=isinstance(src, torch.nn.Parameter),
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
        copies=_Copies(frozen),
    )


class Arena:
    """One reusable host buffer. ``capacity`` only grows; steady state reuses the pages."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor = torch.empty(0, dtype=torch.uint8)
        self.pinned = False
        self.allocations = 0

    def reserve(self, nbytes: int, pinned: bool) -> torch.Tensor:
        """A uint8 tensor of at least ``nbytes``; reallocated only if too small or not pinned as needed."""
        if self.buffer.numel() < nbytes or (pinned and not self.pinned):
            self.buffer = torch.empty(0, dtype=torch.uint8)  # free the old one before allocating
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
            self.pinned = pinned
            self.allocations += 1
        return self.buffer[:nbytes]

    def release_memory(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.pinned = False


class ArenaPool:
    """``count`` arenas; :meth:`acquire` blocks (or fails fast) while all are in use by writers."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("max_inflight must be at least 1")
        self._free = [Arena() for _ in range(count)]
        self._all = list(self._free)
        self._cond = threading.Condition()

    def acquire(self, block: bool, timeout: float | None = None) -> Arena | None:
        with self._cond:
            if not block and not self._free:
                return None
            if not self._cond.wait_for(lambda: bool(self._free), timeout=timeout):
                return None
            return self._free.pop()

    def release(self, arena: Arena) -> None:
        with self._cond:
            self._free.append(arena)
            self._cond.notify()

    @property
    def allocations(self) -> int:
        """How many buffer allocations all arenas have made (steady state: constant)."""
        return sum(a.allocations for a in self._all)

    def release_memory(self) -> None:
        with self._cond:
            for a in self._all:
                a.release_memory()


def snapshot(p: Plan, arena: Arena) -> torch.Tensor:
    """Copy every span into the arena; return the stream (a uint8 CPU tensor of ``total_bytes``)."""
    stream = arena.reserve(p.total_bytes, p.needs_pinned)
    c = p.copies
    if c.cpu:
        dst, srcs = c.cpu_pairs(stream)
        torch._foreach_copy_(dst, srcs)  # one call for thousands of tensors
    for off, arr in c.arrays:
        import numpy as np

        a = np.asarray(arr)
        stream[off : off + a.nbytes].numpy()[:] = a.reshape(-1).view(np.uint8)
    devices: set[torch.device] = set()
    for off, src in c.cuda:
        stream[off : off + src.numel()].copy_(src, non_blocking=True)
        devices.add(src.device)
    for dev in devices:
        # The copies were queued on each device's current stream; wait for them so the caller
        # may change its tensors as soon as we return.
        torch.cuda.current_stream(dev).synchronize()
    return stream
