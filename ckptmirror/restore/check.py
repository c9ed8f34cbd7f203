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
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from itertools import compress, islice
from typing import TYPE_CHECKING, Any

from ..errors import ManifestError
from ..format import (
    COMPACT_TREE_VERSION,
    LEAF_DTYPE,
    LEAF_KIND,
    LEAF_OFFSET,
    LEAF_SHAPE,
    LEAF_STORAGE,
    LEAF_STRIDE,
    STORAGE_NBYTES,
    ParsedColumns,
    RankManifest,
    contiguous_strides,
    parsed_columns,
    paused_gc,
)
from ..state.decode import dtype_itemsize, key_path, unflatten

if TYPE_CHECKING:  # checking a manifest needs no torch (the operator commands run without it)
    import torch

    from ..state.reshard import Box

__all__ = ["MAX_EXPANDED_ELEMENTS", "LeafSpec", "ManifestCheck", "contiguous_strides", "validate_manifest"]

#: A manifest of at least this many leaves is checked with ``paused_gc(promote=True)``.
_PROMOTE_LEAVES = 4096

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
        return dtype_itemsize(dtype, key)
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


def _check_leaf_bounds(m: RankManifest, key: str, kinds: list[str], dtypes: list[str]) -> list[int]:
    """Storages must not overlap and every leaf must lie inside its storage span.

    A leaf holds at most as many elements as its span (non-overlapping layouts cannot hold
    more), or :data:`MAX_EXPANDED_ELEMENTS` if its strides overlap. Returns each leaf's element
    size. A manifest that fails is rejected before any read. ``kinds`` and ``dtypes`` are the
    leaves' columns.

    The common leaf (C-contiguous strides) is checked a whole column at a time in C (``map``
    over the columns); only leaves with other strides take a Python step each.
    """
    _check_storages(m, key)
    leaves = m.leaves
    if not leaves:
        return []
    n = len(leaves)
    if kinds.count("tensor") == n and dtypes.count(dtypes[0]) == n:  # one dtype: one size
        esizes = [_elem_size("tensor", dtypes[0], "leaves[0]", key)] * n
    elif kinds.count("tensor") == n:  # the dtype name alone gives the size
        size_of = {}
        for d in dict.fromkeys(dtypes):  # first appearance order, so that the error names the first bad leaf
            size_of[d] = _elem_size("tensor", d, f"leaves[{dtypes.index(d)}]", key)
        esizes = list(map(size_of.__getitem__, dtypes))
    else:
        types = list(zip(kinds, dtypes))
        tsize_of = {}
        for t in dict.fromkeys(types):
            tsize_of[t] = _elem_size(*t, f"leaves[{types.index(t)}]", key)
        esizes = list(map(tsize_of.__getitem__, types))
    shapes = list(map(LEAF_SHAPE, leaves))
    strides = list(map(LEAF_STRIDE, leaves))
    offsets = list(map(LEAF_OFFSET, leaves))
    numels = list(map(math.prod, shapes))
    regular = list(map(operator.eq, strides, map(_StridesCache().__getitem__, shapes)))
    span = list(map(list(map(STORAGE_NBYTES, m.storages)).__getitem__, map(LEAF_STORAGE, leaves)))
    # A C-contiguous leaf ends at byte (offset + numel) * esize. Checked for every leaf at once
    # first; only if that fails are leaves without elements or with other strides set aside.
    ends = list(map(operator.mul, map(operator.add, offsets, numels), esizes))
    if not all(map(operator.le, ends, span)):
        for i in compress(range(n), map(operator.gt, ends, span)):
            if numels[i] and regular[i]:
                raise ManifestError(f"leaves[{i}] reaches byte {ends[i]} of a {span[i]}-byte storage", key=key)
    if regular.count(True) != n:
        _check_irregular(m, key, compress(range(n), map(operator.not_, regular)), esizes, span)
    return esizes


def _check_irregular(m: RankManifest, key: str, which: Iterable[int], esizes: list[int], span: list[int]) -> None:
    """The bounds of leaves ``which``, whose strides are not C-contiguous: one Python step each."""
    for i in which:
        lf = m.leaves[i]
        numel = math.prod(lf.shape)
        if not numel:
            continue
        if lf.kind == "ndarray":
            raise ManifestError(f"leaves[{i}]: ndarray strides must be C-contiguous", key=key)
        last = lf.offset + sum((d - 1) * s for d, s in zip(lf.shape, lf.stride))
        if (last + 1) * esizes[i] > span[i]:
            raise ManifestError(
                f"leaves[{i}] reaches byte {(last + 1) * esizes[i]} of a {span[i]}-byte storage", key=key
            )
        if numel > max(span[i] // esizes[i], MAX_EXPANDED_ELEMENTS):
            raise ManifestError(
                f"leaves[{i}]: {numel} elements over a {span[i]}-byte storage (overlapping strides "
                f"{list(lf.stride)}); an expanded leaf may hold at most {MAX_EXPANDED_ELEMENTS}",
                key=key,
            )


def _check_parsed_bounds(m: RankManifest, key: str, c: ParsedColumns) -> list[int] | None:
    """:func:`_check_leaf_bounds` on what parsing built (:class:`ckptmirror.format.ParsedColumns`):
    storages are known to tile the stream; element sizes, element counts and byte extents are
    computed once per distinct type and shape, then looked up per leaf by index. Returns the
    element sizes, or None if some leaf may be out of bounds (the caller then runs
    :func:`_check_leaf_bounds`, which names it).
    """
    n = len(m.leaves)
    if not n:
        return []
    table, types = c.table, c.type_index
    size_of = [0] * len(table)
    for j in dict.fromkeys(types) if len(table) > 1 else (0,):  # first appearance order: names the first bad leaf
        size_of[j] = _elem_size(*table[j], f"leaves[{types.index(j)}]", key)
    numel_of = list(map(math.prod, c.shapes))
    span = list(map(c.nbytes.__getitem__, c.storage_index))
    zero_offsets = c.offsets.count(0) == n
    if len(table) == 1:
        esizes = [size_of[0]] * n
        if zero_offsets:  # the byte extent of a C-contiguous leaf depends on its shape alone
            ends = list(map([k * size_of[0] for k in numel_of].__getitem__, c.shape_index))
        else:
            ends = [(o + k) * size_of[0] for o, k in zip(c.offsets, map(numel_of.__getitem__, c.shape_index))]
    else:
        esizes = list(map(size_of.__getitem__, types))
        numels = map(numel_of.__getitem__, c.shape_index)
        ends = list(map(operator.mul, map(operator.add, c.offsets, numels) if not zero_offsets else numels, esizes))
    # Most leaves fill their storage exactly: one list compare (no call per leaf) proves them all.
    if ends != span and not all(map(operator.le, ends, span)):
        irregular = set(c.irregular)
        bad = compress(range(n), map(operator.gt, ends, span))
        if any(i not in irregular and numel_of[c.shape_index[i]] for i in bad):
            return None
    if c.irregular:
        _check_irregular(m, key, c.irregular, esizes, span)
    return esizes


@dataclass(frozen=True)
class ManifestCheck:
    """What :func:`validate_manifest` learned about a manifest that passed every check."""

    esizes: list[int]  # element size of each leaf
    dtype_names: list[str | None]  # dtype name of each tensor leaf (None for arrays)
    paths: dict[int, tuple[Any, ...]]  # key path of each leaf
    skeleton: Any  # the state tree with LeafSpec placeholders
    dtensors: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]  # leaf -> (global shape, offset)

    @cached_property
    def dtypes(self) -> list[torch.dtype | None]:
        """The torch dtype of each tensor leaf (None for arrays), looked up on first use: the
        checks themselves need only the names (see :mod:`ckptmirror.state.decode`)."""
        from ..state.tree import DTYPES_BY_NAME

        names = self.dtype_names
        if names and names.count(names[0]) == len(names):  # one dtype (common): one lookup
            return [None if names[0] is None else DTYPES_BY_NAME[names[0]]] * len(names)
        table = {n: None if n is None else DTYPES_BY_NAME[n] for n in set(names)}
        return list(map(table.__getitem__, names))

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
    # A burst of acyclic allocations: see format.paused_gc.
    with paused_gc(promote=len(m.leaves) >= _PROMOTE_LEAVES):
        return _validate_manifest(m, key)


def _validate_manifest(m: RankManifest, key: str) -> ManifestCheck:
    leaves = m.leaves
    n_leaves = len(leaves)
    c = parsed_columns(m)
    esizes = _check_parsed_bounds(m, key, c) if c is not None else None
    names: list[str | None]
    if c is not None and esizes is not None and len(c.table) == 1:
        # One (kind, dtype) for every leaf (the common case): one LeafSpec per distinct shape,
        # looked up by each leaf's shape index; nothing is hashed per leaf.
        kind, dtype_name = c.table[0]
        kinds = c.kinds
        all_tensors = kind == "tensor"
        names = [dtype_name if all_tensors else None] * n_leaves
        spec_table = [LeafSpec(kind, dtype_name, sh) for sh in c.shapes]
        specs = list(map(spec_table.__getitem__, c.shape_index))
    else:
        kinds = list(map(LEAF_KIND, leaves))
        dtype_names = list(map(LEAF_DTYPE, leaves))
        if esizes is None:
            esizes = _check_leaf_bounds(m, key, kinds, dtype_names)
        # _check_leaf_bounds accepted every (kind, dtype): a tensor's dtype name is a known one.
        all_tensors = kinds.count("tensor") == n_leaves
        if all_tensors and n_leaves and dtype_names.count(dtype_names[0]) == n_leaves:  # one dtype (common)
            names = [dtype_names[0]] * n_leaves
            # One read-only LeafSpec per distinct shape: leaves alike share theirs.
            spec_of = _SpecCache()
            spec_of.kind, spec_of.dtype = "tensor", dtype_names[0]
            specs = list(map(spec_of.__getitem__, map(LEAF_SHAPE, leaves)))
        else:
            if all_tensors:
                names = list(dtype_names)
            else:
                names = [d if k == "tensor" else None for k, d in zip(kinds, dtype_names)]
            # One read-only LeafSpec per distinct (kind, dtype, shape): leaves alike share theirs.
            specs = list(map(_SpecsCache().__getitem__, zip(kinds, dtype_names, map(LEAF_SHAPE, leaves))))
    paths: dict[int, tuple[Any, ...]] = {}
    dtensors: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    top, seen = -1, 0  # the greatest leaf index among the first ``seen`` keys of ``paths``

    def collect(kind: str, i: int, path: tuple[Any, ...]) -> Any:
        leaf_kind = "tensor" if kind == "dtensor" else kind
        if not 0 <= i < n_leaves or kinds[i] != leaf_kind or i in paths:
            raise ManifestError(f"bad or repeated {kind} reference {i} at {key_path('state', path)}", key=key)
        paths[i] = path
        return specs[i]

    def unreferenced(start: int, stop: int) -> bool:
        # Whether no leaf of start..stop-1 is referenced yet: in O(1) when every leaf referenced
        # so far comes before start (a writer numbers leaves in tree order), else one lookup each.
        nonlocal top, seen
        if len(paths) > seen:  # keys are only added, at the end: look at the new ones
            top = max(top, max(islice(reversed(paths), len(paths) - seen)))
            seen = len(paths)
        return top < start or paths.keys().isdisjoint(range(start, stop))

    def collect_range(start: int, stop: int, kpaths: list[tuple[Any, ...]]) -> list[Any]:
        # A tensors node: leaves start..stop-1, all plain tensors, none referenced before.
        if not (
            0 <= start <= stop <= n_leaves
            and (all_tensors or kinds[start:stop].count("tensor") == stop - start)
            and unreferenced(start, stop)
        ):
            for i, path in zip(range(start, stop), kpaths):  # names the first bad reference
                collect("tensor", i, path)
        paths.update(zip(range(start, stop), kpaths))
        return specs[start:stop]

    skeleton = unflatten(
        m.structure, collect, key, dtensors, bulk=collect_range, compact=m.format_version >= COMPACT_TREE_VERSION
    )
    if len(paths) != n_leaves:
        raise ManifestError(f"{n_leaves - len(paths)} leaves are never referenced by the structure", key=key)
    for i, (gshape, goffset) in dtensors.items():
        shape = leaves[i].shape
        if len(gshape) != len(shape) or any(o + n > g for o, n, g in zip(goffset, shape, gshape)):
            raise ManifestError(
                f"leaves[{i}]: shard {list(shape)} at {list(goffset)} does not fit the global shape {list(gshape)}",
                key=key,
            )
    return ManifestCheck(esizes, names, paths, skeleton, dtensors)


class _SpecsCache(dict[tuple[str, str, tuple[int, ...]], LeafSpec]):
    """(kind, dtype, shape) -> its LeafSpec, made on first use (a dict lookup in C after that)."""

    def __missing__(self, t: tuple[str, str, tuple[int, ...]]) -> LeafSpec:
        spec = self[t] = LeafSpec(*t)
        return spec


class _SpecCache(dict[tuple[int, ...], LeafSpec]):
    """shape -> the LeafSpec of a leaf of ``kind`` and ``dtype`` of that shape, made on first use."""

    kind: str
    dtype: str

    def __missing__(self, shape: tuple[int, ...]) -> LeafSpec:
        spec = self[shape] = LeafSpec(self.kind, self.dtype, shape)
        return spec


class _StridesCache(dict[tuple[int, ...], tuple[int, ...]]):
    """shape -> its C-contiguous strides, computed on first use."""

    def __missing__(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        out = self[shape] = contiguous_strides(shape)
        return out
