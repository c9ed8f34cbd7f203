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

import torch

from .format import LeafRecord, StorageRecord
from .tree import Flattened, dtype_name

#: Storage spans start at a multiple of this, so views of every dtype (element sizes up to
#: 16 bytes) that share a storage keep an integral element offset.
_SPAN_ALIGN = 16


def byte_view(storage: torch.UntypedStorage, start: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor aliasing ``nbytes`` of ``storage`` from byte ``start`` (any device)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, start, (nbytes,))


@dataclass
class _Span:
    storage: torch.UntypedStorage | None  # None for numpy arrays
    array: object  # numpy array (contiguous) when storage is None
    start: int  # byte offset in the source storage
    nbytes: int
    offset: int = 0  # byte offset in the data stream


@dataclass(frozen=True)
class Plan:
    """Where every storage of one state goes in the data stream."""

    spans: tuple[_Span, ...]
    storages: tuple[StorageRecord, ...]
    leaves: tuple[LeafRecord, ...]
    structure: object
    total_bytes: int
    needs_pinned: bool


def _extent_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def plan(flat: Flattened) -> Plan:
    """Group leaves by storage and lay the storages out back to back."""
    groups: dict[tuple[str, int], list[int]] = {}
    tensors: dict[int, torch.Tensor] = {}
    spans: list[_Span] = []
    leaf_span: dict[int, int] = {}
    for i, leaf in enumerate(flat.leaves):
        if isinstance(leaf, torch.Tensor):
            t = leaf
            if t.is_conj() or t.is_neg():
                # Lazy conjugate/negative views: their raw bytes are not their values.
                t = t.resolve_conj().resolve_neg()
            tensors[i] = t
            st = t.untyped_storage()
            if st.nbytes() == 0 or t.numel() == 0:
                leaf_span[i] = len(spans)
                spans.append(_Span(None, None, 0, 0))
                continue
            groups.setdefault((str(t.device), st.data_ptr()), []).append(i)
        else:  # numpy array
            import numpy as np

            # ascontiguousarray would turn a 0-d array into shape (1,)
            a = leaf if leaf.flags.c_contiguous else np.ascontiguousarray(leaf)
            tensors[i] = a  # type: ignore[assignment]
            leaf_span[i] = len(spans)
            spans.append(_Span(None, a, 0, a.nbytes))
    for members in groups.values():
        first = tensors[members[0]]
        assert isinstance(first, torch.Tensor)
        starts = [tensors[m].storage_offset() * tensors[m].element_size() for m in members]  # type: ignore[union-attr]
        ends = [s + _extent_bytes(tensors[m]) for s, m in zip(starts, members)]  # type: ignore[arg-type]
        lo = (min(starts) // _SPAN_ALIGN) * _SPAN_ALIGN
        hi = min(max(ends), first.untyped_storage().nbytes())
        for m in members:
            leaf_span[m] = len(spans)
        spans.append(_Span(first.untyped_storage(), None, lo, hi - lo))
    offset = 0
    for sp in spans:
        sp.offset = offset
        offset += sp.nbytes
    leaves = []
    for i in range(len(flat.leaves)):
        sp = spans[leaf_span[i]]
        obj = tensors[i]
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
            shape = tuple(obj.shape)  # type: ignore[attr-defined]
            stride = tuple(int(math.prod(shape[j + 1 :])) for j in range(len(shape)))
            leaves.append(LeafRecord("ndarray", leaf_span[i], obj.dtype.str, shape, stride, 0))  # type: ignore[attr-defined]
    needs_pinned = any(sp.storage is not None and sp.storage.device.type == "cuda" for sp in spans)
    return Plan(
        spans=tuple(spans),
        storages=tuple(StorageRecord(sp.offset, sp.nbytes) for sp in spans),
        leaves=tuple(leaves),
        structure=flat.structure,
        total_bytes=offset,
        needs_pinned=needs_pinned,
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
    cuda_devices: set[torch.device] = set()
    for sp in p.spans:
        if sp.nbytes == 0:
            continue
        dst = stream[sp.offset : sp.offset + sp.nbytes]
        if sp.storage is None:
            import numpy as np

            dst.numpy()[:] = np.asarray(sp.array).reshape(-1).view(np.uint8)
            continue
        src = byte_view(sp.storage, sp.start, sp.nbytes)
        if src.device.type == "cuda":
            dst.copy_(src, non_blocking=True)
            cuda_devices.add(src.device)
        else:
            dst.copy_(src)
    for dev in cuda_devices:
        # The copies were queued on each device's current stream; wait for them so the caller
        # may change its tensors as soon as we return.
        torch.cuda.current_stream(dev).synchronize()
    return stream
