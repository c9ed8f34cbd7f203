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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from itertools import chain, compress, repeat
from typing import TYPE_CHECKING, Any

from ..errors import ManifestError
from ..format import (
    COMPACT_TREE_VERSION,
    LeafColumns,
    ParsedColumns,
    RankManifest,
    StorageColumns,
    contiguous_strides,
    leaf_columns,
    parsed_columns,
    paused_gc,
    storage_columns,
)
from ..state.decode import dtype_itemsize, key_path, node_paths, unflatten

if TYPE_CHECKING:  # checking a manifest needs no torch (the operator commands run without it)
    import torch

    from ..state.reshard import Box

__all__ = ["MAX_EXPANDED_ELEMENTS", "KeyPaths", "LeafSpec", "ManifestCheck", "contiguous_strides", "validate_manifest"]

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


class KeyPaths:
    """The key paths of a manifest's leaves, as columns, in the structure's (tree) order.

    ``order[j]`` is a leaf index, ``parents[j]`` its parent's key path (None for a leaf at the
    root) and ``lasts[j]`` its last key (None at the root); :attr:`cuts` are where the runs of
    siblings start (and the end). Leaves of one parent come in one run, and share one parent
    tuple: a ``tensors`` node of 50,000 leaves adds its keys and one parent, not a tuple per
    leaf (which took ~40 ms to build and index at 50k, restore's and verify's every time).
    Full paths are built only where asked (:meth:`path`, :attr:`ManifestCheck.paths`).
    """

    __slots__ = ("_cuts", "lasts", "order", "parents")

    def __init__(self) -> None:
        self.order: list[int] = []
        self.parents: list[tuple[Any, ...] | None] = []
        self.lasts: list[Any] = []
        self._cuts: list[int] = [0]  # cuts of the first _cuts[-1] entries (entries are only appended)

    def __len__(self) -> int:
        return len(self.order)

    def _parent(self, parent: tuple[Any, ...]) -> tuple[Any, ...]:
        # The previous entry's parent object where equal, so that a run shares one object
        # (:attr:`cuts` compares identities).
        prev = self.parents[-1] if self.parents else None
        return prev if prev is not None and prev == parent else parent

    def add(self, i: int, path: tuple[Any, ...]) -> None:
        """Leaf ``i`` at ``path``."""
        self.order.append(i)
        if path:
            self.parents.append(self._parent(path[:-1]))
            self.lasts.append(path[-1])
        else:
            self.parents.append(None)
            self.lasts.append(None)

    def add_node(self, start: int, stop: int, path: tuple[Any, ...], keys: list[Any], fields: list[str] | None) -> None:
        """Leaves ``start`` to ``stop - 1``, a ``tensors`` node at ``path`` (see
        :func:`ckptmirror.state.decode.unflatten`), in C: one parent tuple per key at most."""
        self.order += range(start, stop)
        if fields is None:
            self.parents += repeat(self._parent(path), stop - start)
            self.lasts += keys
        else:
            parents = list(map(path.__add__, zip(keys)))
            if parents:
                parents[0] = self._parent(parents[0])
            self.parents += chain.from_iterable(map(repeat, parents, repeat(len(fields))))
            self.lasts += fields * len(keys)

    @property
    def cuts(self) -> list[int]:
        """Where each run of siblings starts, and the end."""
        n = len(self.order)
        if not n:
            return [0]
        if self._cuts[-1] != n:  # computed once per length: restore asks for them twice (~4 ms at 50k)
            ps = self.parents
            self._cuts = [0, *compress(range(1, n), map(operator.is_not, ps[1:], ps)), n]
        return list(self._cuts)

    def runs(self) -> Iterator[tuple[tuple[Any, ...] | None, int, int]]:
        """(parent path, start, end) of each run of siblings."""
        cuts = self.cuts
        return zip(map(self.parents.__getitem__, cuts[:-1]), cuts, cuts[1:])

    def path(self, j: int) -> tuple[Any, ...]:
        """The key path of entry ``j`` (of leaf ``order[j]``)."""
        parent = self.parents[j]
        return () if parent is None else parent + (self.lasts[j],)

    def paths(self) -> list[tuple[Any, ...]]:
        """The key path of every entry, in order (a tuple built per leaf)."""
        return list(map(self.path, range(len(self.order))))


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


def _check_storages(sc: StorageColumns, key: str) -> None:
    """Storages must not overlap (storages of no bytes are exempt)."""
    offsets, nbytes = sc.offsets, sc.nbytes
    # The writer lays storages out in index order, back to back: one pass in C proves that.
    if all(map(operator.le, map(operator.add, offsets, nbytes), offsets[1:])):
        return
    end = 0
    for i in sorted(compress(range(len(nbytes)), nbytes), key=offsets.__getitem__):
        if offsets[i] < end:
            raise ManifestError(f"storages[{i}] overlaps another storage", key=key)
        end = offsets[i] + nbytes[i]


def _check_leaf_bounds(m: RankManifest, key: str, lc: LeafColumns) -> tuple[list[int], bool]:
    """Storages must not overlap and every leaf must lie inside its storage span.

    A leaf holds at most as many elements as its span (non-overlapping layouts cannot hold
    more), or :data:`MAX_EXPANDED_ELEMENTS` if its strides overlap. Returns each leaf's element
    size, and whether every leaf fills its storage exactly (:attr:`ManifestCheck.exact`). A
    manifest that fails is rejected before any read. ``lc``: the leaves' columns.

    The common leaf (C-contiguous strides) is checked a whole column at a time in C (``map``
    over the columns); only leaves with other strides take a Python step each.
    """
    sc = storage_columns(m)
    _check_storages(sc, key)
    n = len(lc)
    if not n:
        return [], True
    kinds, dtypes = lc.kinds, lc.dtypes
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
    shapes, strides, offsets = lc.shapes, lc.strides, lc.offsets
    numels = list(map(math.prod, shapes))
    regular = list(map(operator.eq, strides, map(_StridesCache().__getitem__, shapes)))
    span = list(map(sc.nbytes.__getitem__, lc.storage))
    # A C-contiguous leaf ends at byte (offset + numel) * esize. Checked for every leaf at once
    # first; only if that fails are leaves without elements or with other strides set aside.
    ends = list(map(operator.mul, map(operator.add, offsets, numels), esizes))
    exact = ends == span
    if not exact and not all(map(operator.le, ends, span)):
        for i in compress(range(n), map(operator.gt, ends, span)):
            if numels[i] and regular[i]:
                raise ManifestError(f"leaves[{i}] reaches byte {ends[i]} of a {span[i]}-byte storage", key=key)
    if regular.count(True) != n:
        exact = False
        _check_irregular(lc, key, compress(range(n), map(operator.not_, regular)), esizes, span)
    return esizes, exact and offsets.count(0) == n


def _check_irregular(lc: LeafColumns, key: str, which: Iterable[int], esizes: list[int], span: list[int]) -> None:
    """The bounds of leaves ``which``, whose strides are not C-contiguous: one Python step each."""
    for i in which:
        shape, stride = lc.shapes[i], lc.strides[i]
        numel = math.prod(shape)
        if not numel:
            continue
        if lc.kinds[i] == "ndarray":
            raise ManifestError(f"leaves[{i}]: ndarray strides must be C-contiguous", key=key)
        last = lc.offsets[i] + sum((d - 1) * s for d, s in zip(shape, stride))
        if (last + 1) * esizes[i] > span[i]:
            raise ManifestError(
                f"leaves[{i}] reaches byte {(last + 1) * esizes[i]} of a {span[i]}-byte storage", key=key
            )
        if numel > max(span[i] // esizes[i], MAX_EXPANDED_ELEMENTS):
            raise ManifestError(
                f"leaves[{i}]: {numel} elements over a {span[i]}-byte storage (overlapping strides "
                f"{list(stride)}); an expanded leaf may hold at most {MAX_EXPANDED_ELEMENTS}",
                key=key,
            )


def _check_parsed_bounds(m: RankManifest, key: str, c: ParsedColumns) -> tuple[list[int], bool] | None:
    """:func:`_check_leaf_bounds` on what parsing built (:class:`ckptmirror.format.ParsedColumns`):
    storages are known to tile the stream; element sizes, element counts and byte extents are
    computed once per distinct type and shape, then looked up per leaf by index. Returns what
    :func:`_check_leaf_bounds` does, or None if some leaf may be out of bounds (the caller then
    runs :func:`_check_leaf_bounds`, which names it).
    """
    n = len(m.leaves)
    if not n:
        return [], True
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
    exact = ends == span
    if not exact and not all(map(operator.le, ends, span)):
        irregular = set(c.irregular)
        bad = compress(range(n), map(operator.gt, ends, span))
        if any(i not in irregular and numel_of[c.shape_index[i]] for i in bad):
            return None
    if c.irregular:
        _check_irregular(leaf_columns(m), key, c.irregular, esizes, span)
    return esizes, exact and zero_offsets and not c.irregular


@dataclass(frozen=True)
class ManifestCheck:
    """What :func:`validate_manifest` learned about a manifest that passed every check."""

    esizes: list[int]  # element size of each leaf
    dtype_names: list[str | None]  # dtype name of each tensor leaf (None for arrays)
    keys: KeyPaths  # key path of each leaf, as columns, in tree order
    skeleton: Any  # the state tree with LeafSpec placeholders
    dtensors: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]  # leaf -> (global shape, offset)
    #: Every leaf is C-contiguous from the first byte of its storage and ends at its last (the
    #: writer's usual layout), proven while checking the bounds: restore then need not check
    #: each leaf's layout again to read its storage straight into the target.
    exact: bool = False

    @cached_property
    def paths(self) -> dict[int, tuple[Any, ...]]:
        """leaf -> its key path, in tree order; built on first use (a tuple per leaf): the
        common restore reads :attr:`keys` instead."""
        return dict(zip(self.keys.order, self.keys.paths()))

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
    n_leaves = len(m.leaves)
    c = parsed_columns(m)
    bounds = _check_parsed_bounds(m, key, c) if c is not None else None
    names: list[str | None]
    if c is not None and bounds is not None and len(c.table) == 1:
        # One (kind, dtype) for every leaf (the common case): one LeafSpec per distinct shape,
        # looked up by each leaf's shape index; nothing is hashed per leaf.
        kind, dtype_name = c.table[0]
        kinds = c.kinds
        all_tensors = kind == "tensor"
        names = [dtype_name if all_tensors else None] * n_leaves
        spec_table = [LeafSpec(kind, dtype_name, sh) for sh in c.shapes]
        specs = list(map(spec_table.__getitem__, c.shape_index))
    else:
        lc = leaf_columns(m)
        kinds, dtype_names = lc.kinds, lc.dtypes
        if bounds is None:
            bounds = _check_leaf_bounds(m, key, lc)
        # _check_leaf_bounds accepted every (kind, dtype): a tensor's dtype name is a known one.
        all_tensors = kinds.count("tensor") == n_leaves
        if all_tensors and n_leaves and dtype_names.count(dtype_names[0]) == n_leaves:  # one dtype (common)
            names = [dtype_names[0]] * n_leaves
            # One read-only LeafSpec per distinct shape: leaves alike share theirs.
            spec_of = _SpecCache()
            spec_of.kind, spec_of.dtype = "tensor", dtype_names[0]
            specs = list(map(spec_of.__getitem__, lc.shapes))
        else:
            if all_tensors:
                names = list(dtype_names)
            else:
                names = [d if k == "tensor" else None for k, d in zip(kinds, dtype_names)]
            if c is not None:
                # Several (kind, dtype)s, as parsed (bf16 parts, integer buffers): one LeafSpec
                # per distinct (type, shape), found by an int made of the two indexes; hashing
                # a (kind, dtype, shape) tuple per leaf cost ~2 ms at 10k leaves.
                n_shapes = len(c.shapes)
                by_index = _IndexSpecCache(c.table, c.shapes)
                specs = list(
                    map(
                        by_index.__getitem__,
                        map(operator.add, map(operator.mul, c.type_index, repeat(n_shapes)), c.shape_index),
                    )
                )
            else:
                # One read-only LeafSpec per distinct (kind, dtype, shape): leaves alike share theirs.
                specs = list(map(_SpecsCache().__getitem__, zip(kinds, dtype_names, lc.shapes)))
    keys = KeyPaths()
    dtensors: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    # seen[i]: whether leaf i is referenced yet. A tensors node checks its whole range at once
    # (bytearray.find in C), so a 50k-leaf state takes no Python step per leaf.
    seen = bytearray(n_leaves)

    def collect(kind: str, i: int, path: tuple[Any, ...]) -> Any:
        leaf_kind = "tensor" if kind == "dtensor" else kind
        if not 0 <= i < n_leaves or kinds[i] != leaf_kind or seen[i]:
            raise ManifestError(f"bad or repeated {kind} reference {i} at {key_path('state', path)}", key=key)
        seen[i] = 1
        keys.add(i, path)
        return specs[i]

    def collect_node(
        start: int, stop: int, path: tuple[Any, ...], node_keys: list[Any], fields: list[str] | None
    ) -> list[Any]:
        # A tensors node: leaves start..stop-1, all plain tensors, none referenced before.
        if not (
            0 <= start <= stop <= n_leaves
            and (all_tensors or kinds[start:stop].count("tensor") == stop - start)
            and seen.find(1, start, stop) == -1
        ):
            for i, p in zip(range(start, stop), node_paths(path, node_keys, fields)):  # names the first bad one
                collect("tensor", i, p)
        seen[start:stop] = b"\x01" * (stop - start)
        keys.add_node(start, stop, path, node_keys, fields)
        return specs[start:stop]

    skeleton = unflatten(
        m.structure, collect, key, dtensors, bulk=collect_node, compact=m.format_version >= COMPACT_TREE_VERSION
    )
    if len(keys) != n_leaves:  # none is referenced twice: so some are never referenced
        raise ManifestError(f"{n_leaves - len(keys)} leaves are never referenced by the structure", key=key)
    for i, (gshape, goffset) in dtensors.items():
        shape = m.leaves[i].shape  # one record (see format.LeafColumns)
        if len(gshape) != len(shape) or any(o + n > g for o, n, g in zip(goffset, shape, gshape)):
            raise ManifestError(
                f"leaves[{i}]: shard {list(shape)} at {list(goffset)} does not fit the global shape {list(gshape)}",
                key=key,
            )
    return ManifestCheck(bounds[0], names, keys, skeleton, dtensors, bounds[1])


class _SpecsCache(dict[tuple[str, str, tuple[int, ...]], LeafSpec]):
    """(kind, dtype, shape) -> its LeafSpec, made on first use (a dict lookup in C after that)."""

    def __missing__(self, t: tuple[str, str, tuple[int, ...]]) -> LeafSpec:
        spec = self[t] = LeafSpec(*t)
        return spec


class _IndexSpecCache(dict[int, LeafSpec]):
    """``type * len(shapes) + shape`` -> the LeafSpec of ``table[type]`` and ``shapes[shape]``,
    made on first use (the indexes of :class:`ckptmirror.format.ParsedColumns`)."""

    def __init__(self, table: list[tuple[str, str]], shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.table, self.shapes = table, shapes

    def __missing__(self, k: int) -> LeafSpec:
        t, sh = divmod(k, len(self.shapes))
        spec = self[k] = LeafSpec(*self.table[t], self.shapes[sh])
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
