"""Parsing commit records and rank manifests (every format version) into validated records."""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Sequence
from itertools import accumulate, chain
from typing import Any

from .gcpause import paused_gc
from .jsondoc import _CHECKSUM_RE, _all_of_type, _Fields, load_json
from .manifest import CommitRecord, RankManifest, RankRef
from .names import (
    _OBJECT_NAME_RE,
    MAX_DIMS,
    MAX_MANIFEST_BYTES,
    MAX_OBJECT_BYTES,
    MAX_RANKS,
    MAX_STEP,
    MAX_STREAM_BYTES,
    RUNS_VERSION,
    commit_key,
    is_rank_manifest_key,
    step_dir,
)
from .records import (
    LeafColumns,
    LeafRecord,
    ObjectRecord,
    StorageColumns,
    StorageRecord,
    _records,
    contiguous_strides,
)

#: A manifest of at least this many bytes (a few thousand leaves) is parsed with ``paused_gc(promote=True)``.
_PROMOTE_BYTES = 64 << 10  # ~25 bytes a leaf in version 5 (runs, a shape table)


def parse_commit(data: bytes, key: str) -> CommitRecord:
    """Parse and validate a commit record (its layout is the same in format versions 1 and 2)."""
    doc = load_json(data, key)
    f = _Fields(key)
    if doc.get("kind") != "ckptmirror.commit":
        raise f.err("kind", "not a ckptmirror commit record")
    step = f.int(doc.get("step"), "step", 0, MAX_STEP)
    world = f.int(doc.get("world_size"), "world_size", 1, MAX_RANKS)
    replicated = f.bool(doc.get("replicated", False), "replicated")
    refs = []
    for i, item in enumerate(f.list(doc.get("ranks"), "ranks", 1 if replicated else world)):
        rank, rkey, size, csum = f.list(item, f"ranks[{i}]", 4)
        rank = f.int(rank, f"ranks[{i}][0]", 0, world - 1)
        if rank != i:
            raise f.err(f"ranks[{i}]", f"rank {rank} out of order")
        if not is_rank_manifest_key(f.str(rkey, f"ranks[{i}][1]"), step, rank):
            raise f.err(
                f"ranks[{i}][1]", f"rank manifest name {rkey!r} is not a manifest name of step {step} rank {rank}"
            )
        refs.append(
            RankRef(
                rank, rkey, f.int(size, f"ranks[{i}][2]", 1, MAX_MANIFEST_BYTES), f.checksum(csum, f"ranks[{i}][3]")
            )
        )
    created = f.number(doc.get("created_unix", 0.0), "created_unix")
    if key != commit_key(step):
        raise f.err("step", f"commit for step {step} found at {key!r}")
    return CommitRecord(step, world, tuple(refs), created, replicated)


def parse_rank_manifest(data: bytes, key: str) -> RankManifest:
    """Parse and validate a rank manifest (format version 1 to 5), including every bound a reader relies on.

    Memory is bounded before parsing (:func:`load_json`); the leaf checks that need dtypes
    (extent inside the storage, element counts) are :func:`ckptmirror.restore.check.validate_manifest`'s,
    which reuses what parsing checked and built (:func:`parsed_columns`) instead of redoing it.
    """
    with paused_gc(promote=len(data) >= _PROMOTE_BYTES):
        return _parse_rank_manifest(data, key)


def _parse_rank_manifest(data: bytes, key: str) -> RankManifest:
    doc = load_json(data, key)
    f = _Fields(key, data, runs=doc["format_version"] >= RUNS_VERSION)
    if doc.get("kind") != "ckptmirror.rank":
        raise f.err("kind", "not a ckptmirror rank manifest")
    step = f.int(doc.get("step"), "step", 0, MAX_STEP)
    world = f.int(doc.get("world_size"), "world_size", 1, MAX_RANKS)
    rank = f.int(doc.get("rank"), "rank", 0, world - 1)
    columns: ParsedColumns | None = None
    storages: Sequence[StorageRecord]
    leaves: Sequence[LeafRecord]
    if doc["format_version"] == 1:
        objects, storages, leaves = _parse_v1_records(doc, f)
    else:
        objects, storages, leaves, columns = _parse_v2_records(doc, f, step)
    created = f.number(doc.get("created_unix", 0.0), "created_unix")
    if "structure" not in doc:
        raise f.err("structure", "missing")
    m = RankManifest(step, rank, world, objects, storages, leaves, doc["structure"], created, doc["format_version"])
    if columns is not None:
        columns.leaves, columns.storages = leaves, storages
        _PARSED[id(m)] = columns
        weakref.finalize(m, _PARSED.pop, id(m), None)
    return m


class ParsedColumns:
    """What parsing a columnar manifest (version 2 on) already checked and built, for
    :func:`ckptmirror.restore.check.validate_manifest` not to check or build it again.

    Private to the library: :func:`parsed_columns` hands it out only for the very records it
    describes (``leaves`` and ``storages`` are the manifest's own :class:`LeafColumns` and
    :class:`StorageColumns`, whose columns nobody changes), so a manifest built or altered
    otherwise is validated from its records alone. What it vouches for: the storages
    tile the stream (so none overlap); every shape is checked; ``shapes`` holds each distinct
    shape once, ``shape_index`` each leaf's index into it; ``irregular`` the leaves whose strides
    are not the C-contiguous ones of their shape, ascending; the columns are the records' own.
    """

    __slots__ = (
        "leaves",
        "storages",
        "table",
        "type_index",
        "kinds",
        "dtypes",
        "shapes",
        "shape_index",
        "irregular",
        "storage_index",
        "offsets",
        "nbytes",
    )

    leaves: Sequence[LeafRecord]
    storages: Sequence[StorageRecord]
    table: list[tuple[str, str]]  # the distinct (kind, dtype) of the leaves
    type_index: list[int]  # each leaf's index into ``table``
    kinds: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]  # each distinct shape once, in first appearance order
    shape_index: list[int]  # each leaf's index into ``shapes``
    irregular: list[int]
    storage_index: list[int]
    offsets: list[int]
    nbytes: list[int]  # each storage's

    def __init__(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self, k, v)


#: id(manifest) -> its ParsedColumns, while the manifest lives (weakref.finalize removes it).
_PARSED: dict[int, ParsedColumns] = {}


def parsed_columns(m: RankManifest) -> ParsedColumns | None:
    """The :class:`ParsedColumns` of a manifest returned by :func:`parse_rank_manifest`, if its
    records are still the parsed ones; None otherwise."""
    c = _PARSED.get(id(m))
    if c is None or c.leaves is not m.leaves or c.storages is not m.storages:
        return None
    return c


class _BadShape(Exception):
    """A shape that is too long or holds something else than ints in bounds (see below)."""


class _ShapeIndex(dict[tuple[int, ...], int]):
    """shape -> its number (first appearance order), after checking the shape, on its first lookup.

    A dict lookup in C for every shape seen before; a shape of more than :data:`MAX_DIMS`
    dimensions, whose dimensions are not ints in ``[0, MAX_STREAM_BYTES]``, or that holds more
    elements than a stream could (:func:`_too_many_elements`), raises :class:`_BadShape` before
    any other arithmetic on it. Dimensions are ints (checked before): a hit
    is an equal shape.
    """

    def __missing__(self, shape: tuple[Any, ...]) -> int:
        if len(shape) > MAX_DIMS or (shape and not (min(shape) >= 0 and max(shape) <= MAX_STREAM_BYTES)):
            raise _BadShape
        if _too_many_elements(shape):
            raise _BadShape
        out = self[shape] = len(self)
        return out


_Records = tuple[tuple[ObjectRecord, ...], tuple[StorageRecord, ...], tuple[LeafRecord, ...]]
_RecordsAndColumns = tuple[tuple[ObjectRecord, ...], "StorageColumns", "LeafColumns", "ParsedColumns"]


def _too_many_elements(shape: Sequence[int]) -> bool:
    """Whether a shape (ints in bounds) holds more than :data:`MAX_STREAM_BYTES` elements. No
    leaf can: a C-contiguous one lies inside its storage (an element takes at least a byte), an
    expanded one holds at most ``MAX_EXPANDED_ELEMENTS``. Refused while parsing, because element
    counts and extents are computed per leaf later, and a shape table (version 5) lets every leaf
    point at one huge shape for the price of an int: 900,000 leaves of 2^2560 elements took 841
    MiB to check, past the memory the limit allows."""
    return bool(shape) and 0 not in shape and math.prod(shape) > MAX_STREAM_BYTES


def _check_shape(sh: Any, f: _Fields, path: str) -> list[int]:
    """One shape: a list of at most :data:`MAX_DIMS` ints in ``[0, MAX_STREAM_BYTES]``, with at
    most :data:`MAX_STREAM_BYTES` elements."""
    f.list(sh, path)
    if len(sh) > MAX_DIMS:
        raise f.err(path, "too many dimensions")
    dims = f.int_column(sh, path, 0, MAX_STREAM_BYTES)
    if _too_many_elements(dims):
        raise f.err(path, f"about 2^{math.prod(dims).bit_length() - 1} elements, more than any leaf can hold (2^50)")
    return dims


def _shape_list(raw_shapes: list[Any], f: _Fields) -> tuple[list[tuple[int, ...]], list[int]]:
    """A column of one shape per leaf (versions 2-4; version 5 where shapes do not repeat):
    (each distinct shape once, in first appearance order; each leaf's index into them)."""
    if not _all_of_type(raw_shapes, list):
        for i, sh in enumerate(raw_shapes):
            f.list(sh, f"leaves.shape[{i}]")
    # The type of every dimension is checked in one pass (2.0 and True equal 2 and 1: the lookup
    # below cannot tell them apart); then each distinct shape is checked (length, bounds) and
    # numbered on its first leaf. A shape that fails names its leaf.
    index_of = _ShapeIndex()
    try:
        if not set(map(type, chain.from_iterable(raw_shapes))) <= {int}:
            raise _BadShape
        shape_index = list(map(index_of.__getitem__, map(tuple, raw_shapes)))
    except _BadShape:
        for i, sh in enumerate(raw_shapes):
            _check_shape(sh, f, f"leaves.shape[{i}]")
        raise AssertionError("unreachable: a bad shape was found") from None
    # Leaves of one shape share one shape tuple and one strides tuple: fewer objects to build,
    # and for the collector to scan later.
    return list(index_of), shape_index


def _parse_v1_records(doc: dict[str, Any], f: _Fields) -> _Records:
    """Version 1: rows (``[key, size, checksum]``, ``[offset, nbytes]``, one object per leaf)."""
    objects = []
    total = 0
    for i, item in enumerate(f.list(doc.get("objects"), "objects")):
        okey, size, csum = f.list(item, f"objects[{i}]", 3)
        rec = ObjectRecord(
            f.object_key(okey, f"objects[{i}][0]"),
            f.int(size, f"objects[{i}][1]", 0, MAX_OBJECT_BYTES),
            f.checksum(csum, f"objects[{i}][2]"),
        )
        objects.append(rec)
        total += rec.size
    if total > MAX_STREAM_BYTES:
        raise f.err("objects", f"total size {total} is implausible")
    storages = []
    for i, item in enumerate(f.list(doc.get("storages"), "storages")):
        off, nbytes = f.list(item, f"storages[{i}]", 2)
        off = f.int(off, f"storages[{i}][0]", 0, total)
        nbytes = f.int(nbytes, f"storages[{i}][1]", 0, total - off)
        storages.append(StorageRecord(off, nbytes))
    leaves = []
    for i, item in enumerate(f.list(doc.get("leaves"), "leaves")):
        p = f"leaves[{i}]"
        if not isinstance(item, dict):
            raise f.err(p, "expected an object")
        kind = item.get("kind")
        if kind not in ("tensor", "ndarray"):
            raise f.err(p + ".kind", f"unknown leaf kind {kind!r}")
        sidx = f.int(item.get("storage"), p + ".storage", 0, len(storages) - 1)
        raw_shape = f.list(item.get("shape"), p + ".shape")
        if len(raw_shape) > MAX_DIMS:
            raise f.err(p + ".shape", "too many dimensions")
        shape = tuple(f.int(d, f"{p}.shape[{j}]", 0, MAX_STREAM_BYTES) for j, d in enumerate(raw_shape))
        stride = tuple(
            f.int(d, f"{p}.stride[{j}]", 0, MAX_STREAM_BYTES)
            for j, d in enumerate(f.list(item.get("stride"), p + ".stride", len(shape)))
        )
        leaves.append(
            LeafRecord(
                kind=kind,
                storage=sidx,
                dtype=f.str(item.get("dtype"), p + ".dtype", 64),
                shape=shape,
                stride=stride,
                offset=f.int(item.get("offset"), p + ".offset", 0, MAX_STREAM_BYTES),
                requires_grad=f.bool(item.get("requires_grad", False), p + ".requires_grad"),
                parameter=f.bool(item.get("parameter", False), p + ".parameter"),
            )
        )
    return tuple(objects), tuple(storages), tuple(leaves)


def _parse_v2_records(doc: dict[str, Any], f: _Fields, step: int) -> _RecordsAndColumns:
    """Version 2: columns; records are built by ``tuple.__new__`` over zipped columns, in C."""
    sec = f.section(doc, "objects")
    keys = f.list(sec.get("key"), "objects.key")
    n_obj = len(keys)
    # Object keys of this step only: a manifest never names another step's objects.
    f.str_column(keys, "objects.key", re.compile(step_dir(step) + "/" + _OBJECT_NAME_RE), n_obj)
    sizes = f.int_column(sec.get("size"), "objects.size", 0, MAX_OBJECT_BYTES, n_obj)
    sums = f.str_column(sec.get("checksum"), "objects.checksum", _CHECKSUM_RE, n_obj)
    total = sum(sizes)
    if total > MAX_STREAM_BYTES:
        raise f.err("objects.size", f"total size {total} is implausible")
    objects = _records(ObjectRecord, keys, sizes, sums)

    # Sizes that are ints, none negative, and add up to ``total``: then none exceeds ``total``,
    # which is only looked for (to name the item) when they do not add up.
    nbytes = f.list(f.ints(f.section(doc, "storages").get("nbytes"), "storages.nbytes", 0, total), "storages.nbytes")
    if nbytes and not (_all_of_type(nbytes, int) and min(nbytes) >= 0):
        f.first_bad_int(nbytes, "storages.nbytes", 0, total)
    offsets = list(accumulate(nbytes, initial=0))
    if offsets[-1] != total:
        f.first_bad_int(nbytes, "storages.nbytes", 0, total)
        raise f.err(
            "storages.nbytes", f"storages cover {offsets[-1]} bytes, the objects {total}: they must tile the stream"
        )
    offsets.pop()  # the end of the stream
    storages = StorageColumns(offsets, nbytes)

    sec = f.section(doc, "leaves")
    table = []
    for j, item in enumerate(f.list(sec.get("types"), "leaves.types")):
        kind, dtype = f.list(item, f"leaves.types[{j}]", 2)
        if kind not in ("tensor", "ndarray"):
            raise f.err(f"leaves.types[{j}][0]", f"unknown leaf kind {kind!r}")
        table.append((kind, f.str(dtype, f"leaves.types[{j}][1]", 64)))
    types = f.int_column(sec.get("type"), "leaves.type", 0, len(table) - 1)
    n = len(types)
    sidx = f.int_column(sec.get("storage"), "leaves.storage", 0, len(storages) - 1, n)
    elem_offsets = f.int_column(sec.get("offset"), "leaves.offset", 0, MAX_STREAM_BYTES, n)
    flags = f.int_column(sec.get("flags"), "leaves.flags", 0, 3, n)
    if f.runs_ok and "shapes" in sec:
        # Version 5: a table of shapes (each checked here) and each leaf's index into it.
        shape_table = [
            tuple(_check_shape(sh, f, f"leaves.shapes[{j}]"))
            for j, sh in enumerate(f.list(sec["shapes"], "leaves.shapes"))
        ]
        shape_index = f.int_column(sec.get("shape"), "leaves.shape", 0, len(shape_table) - 1, n)
    else:
        shape_table, shape_index = _shape_list(f.list(sec.get("shape"), "leaves.shape", n), f)
    strides = list(map(list(map(contiguous_strides, shape_table)).__getitem__, shape_index))
    irregular = []
    last = -1
    for j, item in enumerate(f.list(sec.get("strides"), "leaves.strides")):
        p = f"leaves.strides[{j}]"
        i, st = f.list(item, p, 2)
        i = last = f.int(i, p + "[0]", last + 1, n - 1)  # ascending: each leaf at most once
        # A plain list (runs are for columns): f.list first, as int_column would take runs.
        st = tuple(
            f.int_column(f.list(st, p + "[1]"), p + "[1]", 0, MAX_STREAM_BYTES, len(shape_table[shape_index[i]]))
        )
        if st != strides[i]:
            strides[i] = st
            irregular.append(i)
    if len(table) == 1:  # one (kind, dtype) for every leaf: no lookup per leaf
        kinds, dtypes = [table[0][0]] * n, [table[0][1]] * n
    else:
        kinds = list(map([k for k, _ in table].__getitem__, types))
        dtypes = list(map([d for _, d in table].__getitem__, types))
    # Columns, not records: see LeafColumns.
    leaves = LeafColumns(
        kinds, sidx, dtypes, list(map(shape_table.__getitem__, shape_index)), strides, elem_offsets, flags
    )
    columns = ParsedColumns(
        table=table,
        type_index=types,
        kinds=kinds,
        dtypes=dtypes,
        shapes=shape_table,
        shape_index=shape_index,
        irregular=irregular,
        storage_index=sidx,
        offsets=elem_offsets,
        nbytes=nbytes,
    )
    return objects, storages, leaves, columns
