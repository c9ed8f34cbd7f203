"""Manifest validation: every check made on a rank manifest before a byte of data is read.

A manifest that parsed (:mod:`ckptmirror.format`) can still describe data that does not fit
together: storages that overlap, a leaf that reaches past the end of its storage, an
implausible element count, a dtype that is unknown or holds Python objects, a structure that
references a leaf twice or never, a shard that does not fit its global shape.
:func:`validate_manifest` rejects all of these with :class:`ManifestError`, so that a step is
refused before any target tensor is touched. Restore (:mod:`ckptmirror.restore.fill`) and
``ckptmirror verify`` (:mod:`ckptmirror.ops`) use the same checks.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from itertools import compress
from typing import Any

import torch

from ..errors import ManifestError
from ..format import RankManifest, contiguous_strides, paused_gc
from ..state.reshard import Box
from ..state.tree import DTYPES_BY_NAME, dtype_from_name, key_path, unflatten

__all__ = ["MAX_EXPANDED_ELEMENTS", "LeafSpec", "ManifestCheck", "contiguous_strides", "validate_manifest"]

#: A leaf may hold more elements than its storage span only through overlapping strides (an
#: ``expand()``ed tensor: stride 0); such a leaf holds at most this many elements. A few bytes of
#: manifest could otherwise describe a view of 2^45 elements that a caller then materialises.
MAX_EXPANDED_ELEMENTS = 1 << 24


class LeafSpec:
    """Placeholder for a stored tensor or array, before its bytes are read (read-only).

    A plain class with ``__slots__``, not a frozen dataclass: one is built per leaf on every
    validation, and a frozen dataclass costs three times as much to build.
    """

    __slots__ = ("kind", "dtype", "shape")

    def __init__(self, kind: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.kind = kind
        self.dtype = dtype
        self.shape = shape

    def __repr__(self) -> str:
        return f"LeafSpec(kind={self.kind!r}, dtype={self.dtype!r}, shape={self.shape!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LeafSpec):
            return NotImplemented
        return (self.kind, self.dtype, self.shape) == (other.kind, other.dtype, other.shape)

    def __hash__(self) -> int:
        return hash((self.kind, self.dtype, self.shape))


def _elem_size(kind: str, dtype: str, where: str, key: str) -> int:
    """Element size of a leaf's dtype; a :class:`ManifestError` for unknown or object dtypes."""
    if kind == "tensor":
        return dtype_from_name(dtype, key).itemsize
    import numpy as np

    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: bad numpy dtype {dtype!r}", key=key) from exc
    if dt.hasobject or dt.fields is not None:
        raise ManifestError(f"{where}: numpy dtype {dtype!r} holds objects", key=key)
    return int(dt.itemsize)


def _check_storages(m: RankManifest, key: str) -> None:
    """Storages must not overlap (storages of no bytes are exempt)."""
    if not m.storages:
        return
    offsets, nbytes = zip(*m.storages)
    # The writer lays storages out in index order, back to back: one pass in C proves that.
    if all(map(operator.le, map(operator.add, offsets, nbytes), offsets[1:])):
        return
    end = 0
    for i in sorted((i for i, s in enumerate(m.storages) if s.nbytes), key=lambda i: m.storages[i].offset):
        if m.storages[i].offset < end:
            raise ManifestError(f"storages[{i}] overlaps another storage", key=key)
        end = m.storages[i].offset + m.storages[i].nbytes


def _check_leaf_bounds(m: RankManifest, key: str) -> list[int]:
    """Storages must not overlap and every leaf must lie inside its storage span.

    A leaf holds at most as many elements as its span (non-overlapping layouts cannot hold
    more), or :data:`MAX_EXPANDED_ELEMENTS` if its strides overlap. Returns each leaf's element
    size. A manifest that fails is rejected before any read.

    The common leaf (C-contiguous strides) is checked a whole column at a time in C (``map``
    over the columns); only leaves with other strides take a Python step each.
    """
    _check_storages(m, key)
    if not m.leaves:
        return []
    kinds, sidx, dtypes, shapes, strides, offsets, _, _ = zip(*m.leaves)
    types = list(zip(kinds, dtypes))
    size_of = {}
    for t in dict.fromkeys(types):  # first appearance order, so that the error names the first bad leaf
        size_of[t] = _elem_size(*t, f"leaves[{types.index(t)}]", key)
    esizes = list(map(size_of.__getitem__, types))
    numels = list(map(math.prod, shapes))
    contiguous = {sh: contiguous_strides(sh) for sh in set(shapes)}
    regular = list(map(operator.eq, strides, map(contiguous.__getitem__, shapes)))
    span = list(map([s.nbytes for s in m.storages].__getitem__, sidx))
    # A C-contiguous leaf with elements ends at byte (offset + numel) * esize; others count 0 here.
    ends = map(operator.mul, map(operator.mul, map(operator.add, offsets, numels), esizes), map(bool, numels))
    ends = map(operator.mul, ends, regular)
    if not all(map(operator.le, ends, span)):
        for i, (end, nb) in enumerate(zip(map(operator.mul, map(operator.add, offsets, numels), esizes), span)):
            if numels[i] and regular[i] and end > nb:
                raise ManifestError(f"leaves[{i}] reaches byte {end} of a {nb}-byte storage", key=key)
    for i in compress(range(len(kinds)), map(operator.not_, regular)):
        numel = numels[i]
        if not numel:
            continue
        if kinds[i] == "ndarray":
            raise ManifestError(f"leaves[{i}]: ndarray strides must be C-contiguous", key=key)
        last = offsets[i] + sum((d - 1) * s for d, s in zip(shapes[i], strides[i]))
        if (last + 1) * esizes[i] > span[i]:
            raise ManifestError(
                f"leaves[{i}] reaches byte {(last + 1) * esizes[i]} of a {span[i]}-byte storage", key=key
            )
        if numel > max(span[i] // esizes[i], MAX_EXPANDED_ELEMENTS):
            raise ManifestError(
                f"leaves[{i}]: {numel} elements over a {span[i]}-byte storage (overlapping strides "
                f"{list(strides[i])}); an expanded leaf may hold at most {MAX_EXPANDED_ELEMENTS}",
                key=key,
            )
    return esizes


@dataclass(frozen=True)
class ManifestCheck:
    """What :func:`validate_manifest` learned about a manifest that passed every check."""

    esizes: list[int]  # element size of each leaf
    dtypes: list[torch.dtype | None]  # torch dtype of each tensor leaf (None for arrays)
    paths: dict[int, tuple[Any, ...]]  # key path of each leaf
    skeleton: Any  # the state tree with LeafSpec placeholders
    dtensors: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]  # leaf -> (global shape, offset)

    def boxes(self, m: RankManifest) -> dict[tuple[Any, ...], tuple[int, tuple[int, ...], Box]]:
        """path -> (leaf, global shape, box) of every tensor leaf; a plain tensor is one box
        at offset 0 covering its whole shape."""
        out = {}
        for i, path in self.paths.items():
            lf = m.leaves[i]
            if lf.kind != "tensor":
                continue
            gshape, goffset = self.dtensors.get(i, (lf.shape, (0,) * len(lf.shape)))
            out[path] = (i, gshape, (goffset, lf.shape))
        return out


def validate_manifest(m: RankManifest, key: str) -> ManifestCheck:
    """Every check the reader makes on a manifest before reading a byte of data.

    Storage and leaf bounds, dtypes, and the structure: each leaf referenced exactly once.
    Used by restore and by ``ckptmirror verify`` alike. Raises :class:`ManifestError`.
    """
    with paused_gc():  # a burst of acyclic allocations: see format.paused_gc
        return _validate_manifest(m, key)


def _validate_manifest(m: RankManifest, key: str) -> ManifestCheck:
    esizes = _check_leaf_bounds(m, key)
    n_leaves = len(m.leaves)
    kinds = list(map(operator.itemgetter(0), m.leaves))
    types = list(zip(kinds, map(operator.itemgetter(2), m.leaves)))
    # _check_leaf_bounds accepted every (kind, dtype): a tensor's dtype name is a known one.
    torch_dtypes = {t: DTYPES_BY_NAME[t[1]] if t[0] == "tensor" else None for t in set(types)}
    dtypes: list[torch.dtype | None] = list(map(torch_dtypes.__getitem__, types))
    paths: dict[int, tuple[Any, ...]] = {}
    dtensors: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    leaves = m.leaves

    def collect(kind: str, i: int, path: tuple[Any, ...]) -> Any:
        leaf_kind = "tensor" if kind == "dtensor" else kind
        if not 0 <= i < n_leaves or kinds[i] != leaf_kind or i in paths:
            raise ManifestError(f"bad or repeated {kind} reference {i} at {key_path('state', path)}", key=key)
        paths[i] = path
        lf = leaves[i]
        return LeafSpec(lf.kind, lf.dtype, lf.shape)

    skeleton = unflatten(m.structure, collect, key, dtensors)
    if len(paths) != len(m.leaves):
        raise ManifestError(f"{len(m.leaves) - len(paths)} leaves are never referenced by the structure", key=key)
    for i, (gshape, goffset) in dtensors.items():
        shape = m.leaves[i].shape
        if len(gshape) != len(shape) or any(o + n > g for o, n, g in zip(goffset, shape, gshape)):
            raise ManifestError(
                f"leaves[{i}]: shard {list(shape)} at {list(goffset)} does not fit the global shape {list(gshape)}",
                key=key,
            )
    return ManifestCheck(esizes, dtypes, paths, skeleton, dtensors)
