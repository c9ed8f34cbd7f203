"""The on-replica format: key layout, manifest records, JSON (de)serialisation and validation.

See ``docs/FORMAT.md`` for the byte-level description. In short, per step::

    step-000000000042/rank-00000/o000000-1f2e3d4c.bin   object: raw bytes, a window of the rank's data stream
    step-000000000042/rank-00000-1f2e3d4c.json          rank manifest: objects (size, checksum), tensors, structure
    step-000000000042/COMMIT.json                       written last: pins every rank manifest by size+checksum

``1f2e3d4c`` is a random token drawn for each save of each rank, so two writers of the same
step (or a retry after a crash) never write the same name: a losing writer cannot damage the
winner's objects, and leftovers of a torn save never collide with the next attempt.

A rank's *data stream* is the concatenation of its objects in order; every storage lives at
an offset in that stream, and :func:`cut_objects` is the rule that cuts it into objects.
Everything read from a replica is validated here before use: a manifest is untrusted input
(wrong types, huge numbers, ``../`` names, duplicate keys, documents built to exhaust memory).

Version 2 (written today) stores the per-object, per-storage and per-leaf fields as columns
(parallel JSON arrays) so that a reader builds its records without a Python step per item;
version-1 manifests (one JSON object per leaf) are still read. Version 3 added placement
records; version 4 the state tree's ``tensors`` node (:mod:`ckptmirror.state.tree`), so that
large state dicts and optimizer states are not one JSON object per tensor.
"""

from __future__ import annotations

import builtins
import gc
import json
import math
import operator
import re
import secrets
import sys
import sysconfig
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate, chain, compress, islice, repeat, starmap
from operator import countOf
from typing import Any, NamedTuple, TypeVar, overload

from .checksum import is_checksum
from .errors import ManifestError

#: The version written; every version from 1 up to it is read.
FORMAT_VERSION = 5
#: The first version whose state tree may hold ``tensors`` nodes (see :mod:`ckptmirror.state.tree`).
COMPACT_TREE_VERSION = 4
#: The first version whose int columns may be runs and whose leaf shapes may be a table plus an
#: index column (see :func:`encode_ints` and docs/FORMAT.md, "Int columns").
RUNS_VERSION = 5
#: A column shorter than this is written as a plain list (runs would save nothing worth it).
RUNS_MIN_ITEMS = 64
MAX_STEP = 10**12 - 1
MAX_RANKS = 100_000
MAX_OBJECT_BYTES = 1 << 40  # 1 TiB: anything larger in a manifest is hostile or corrupt
MAX_STREAM_BYTES = 1 << 50
MAX_MANIFEST_BYTES = 256 << 20
#: Upper bound on the memory that parsing one manifest or commit record may take, as estimated
#: by :func:`parse_cost` before any Python object is built (see docs/FORMAT.md, "Parsing bounds").
MAX_PARSE_MEMORY = 512 << 20
MAX_DIMS = 64
#: At least this many records are built with ``paused_gc(promote=True)`` (see :class:`LeafColumns`).
_PROMOTE_RECORDS = 4096
#: A manifest of at least this many bytes (a few thousand leaves) is parsed with ``paused_gc(promote=True)``.
_PROMOTE_BYTES = 64 << 10  # ~25 bytes a leaf in version 5 (runs, a shape table)
COMMIT_NAME = "COMMIT.json"

# [0-9] and \Z, not \d and $: \d matches non-ASCII digits and $ accepts a trailing newline.
_STEP_DIR_RE = re.compile(r"step-([0-9]{12})\Z")
_OBJECT_NAME_RE = r"rank-[0-9]{5}/o[0-9]{6}-[0-9a-f]{8}\.bin\Z"  # inside a step directory
_OBJECT_KEY_RE = re.compile(r"step-[0-9]{12}/" + _OBJECT_NAME_RE)
_MANIFEST_KEY_RE = re.compile(r"step-([0-9]{12})/rank-([0-9]{5})-[0-9a-f]{8}\.json\Z")
_TOKEN_RE = re.compile(r"[0-9a-f]{8}\Z")


def new_token() -> str:
    """A fresh writer token: 8 random hex digits, drawn for each save of each rank."""
    return secrets.token_hex(4)


def step_dir(step: int) -> str:
    """Key prefix of a step: ``step-000000000042``."""
    return f"step-{step:012d}"


def parse_step_dir(name: str) -> int | None:
    """Step number of a step directory name, or None if the name is not one."""
    m = _STEP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def _check_token(token: str) -> str:
    if not _TOKEN_RE.match(token):
        raise ValueError(f"bad writer token {token!r}")
    return token


def object_key(step: int, rank: int, index: int, token: str) -> str:
    """Key of object ``index`` of ``rank`` at ``step``, written by the save with ``token``."""
    return f"{step_dir(step)}/rank-{rank:05d}/o{index:06d}-{_check_token(token)}.bin"


def rank_manifest_key(step: int, rank: int, token: str) -> str:
    """Key of a rank manifest written by the save with ``token``."""
    return f"{step_dir(step)}/rank-{rank:05d}-{_check_token(token)}.json"


_WRITER_RE = re.compile(
    r"step-[0-9]{12}/rank-([0-9]{5})(?:/o[0-9]{6}-([0-9a-f]{8})\.(?:bin|zst)|-([0-9a-f]{8})\.(?:json|place\.json))\Z"
)
#: Stored object names (format version 3): ``.bin`` raw bytes, ``.zst`` the zstd byte-plane codec.
STORED_OBJECT_RE = re.compile(r"step-([0-9]{12})/rank-[0-9]{5}/o[0-9]{6}-[0-9a-f]{8}\.(bin|zst)\Z")
#: File name suffix of each codec's stored objects.
CODEC_SUFFIX = {"none": ".bin", "zstd": ".zst"}


def stored_object_key(home: str, codec: str) -> str:
    """Where an object whose manifest key is ``home`` is stored when encoded with ``codec``."""
    return home if codec == "none" else home[: -len(".bin")] + CODEC_SUFFIX[codec]


def placement_key(step: int, rank: int, token: str) -> str:
    """Key of the placement record of writer ``(rank, token)`` at ``step`` (format version 3)."""
    return f"{step_dir(step)}/rank-{rank:05d}-{_check_token(token)}.place.json"


#: Name prefix of a file being written (``.tmp-<uuid32>-<name>``): never a committed object.
TMP_PREFIX = ".tmp-"
_TMP_RE = re.compile(re.escape(TMP_PREFIX) + r"[0-9a-f]{32}-")


def writer_of(key: str) -> tuple[int, str] | None:
    """``(rank, token)`` of an object or rank manifest key, or of a local temp file of one
    (``.tmp-<uuid>-<name>``); None for anything else (commit records and their temp files)."""
    head, _, name = key.rpartition("/")
    m = _WRITER_RE.match(f"{head}/{_TMP_RE.sub('', name, count=1)}" if name.startswith(TMP_PREFIX) else key)
    return (int(m.group(1)), m.group(2) or m.group(3)) if m else None


def is_rank_manifest_key(key: str, step: int, rank: int) -> bool:
    """Whether ``key`` is a well-formed rank manifest name for ``step`` and ``rank``."""
    m = _MANIFEST_KEY_RE.match(key)
    return m is not None and int(m.group(1)) == step and int(m.group(2)) == rank


def commit_key(step: int) -> str:
    """Key of a step's commit record, the object written last."""
    return f"{step_dir(step)}/{COMMIT_NAME}"


# The three per-item records are named tuples, not dataclasses: a manifest holds one per object,
# storage and tensor (tens of thousands), and a reader builds them with ``tuple.__new__`` over
# parsed columns without a Python call per item (a frozen dataclass costs ~1.5 us each to build).


class ObjectRecord(NamedTuple):
    """One stored object: its key, exact size and checksum."""

    key: str
    size: int
    checksum: str


class StorageRecord(NamedTuple):
    """A byte span of the data stream that backs one or more tensors (shared storage is stored once)."""

    offset: int
    nbytes: int


class LeafRecord(NamedTuple):
    """A tensor or NumPy array: a strided view of a storage span."""

    kind: str  # "tensor" | "ndarray"
    storage: int
    dtype: str  # torch dtype name for tensors; numpy dtype.str for arrays
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements
    offset: int  # in elements, from the start of the storage span
    requires_grad: bool = False
    parameter: bool = False


#: Column getters of the records, for ``map`` over many records in C (no Python call a record).
LEAF_KIND, LEAF_STORAGE, LEAF_DTYPE, LEAF_SHAPE, LEAF_STRIDE, LEAF_OFFSET = map(operator.itemgetter, range(6))
_LEAF_GRAD, _LEAF_PARAMETER = operator.itemgetter(6), operator.itemgetter(7)
STORAGE_OFFSET, STORAGE_NBYTES = map(operator.itemgetter, range(2))
OBJECT_SIZE = operator.itemgetter(1)


#: Leaf flags (bit 0: requires_grad, bit 1: parameter) -> each bool, by table lookup.
_GRAD_OF_FLAGS = (False, True, False, True)
_PARAMETER_OF_FLAGS = (False, False, True, True)

_R = TypeVar("_R", bound=tuple[Any, ...])


def _records(cls: type[_R], *columns: Iterable[Any]) -> tuple[_R, ...]:
    """One ``cls`` (a named tuple) per row of ``columns``, by ``tuple.__new__`` in C (``starmap``
    passes each ``(cls, row)`` pair as the call's arguments, with no tuple built per call)."""
    return tuple(starmap(tuple.__new__, zip(repeat(cls), zip(*columns))))


class _LazyRecords(Sequence[_R]):
    """A read-only sequence of records kept as columns, each record built only when asked for.

    A reader of a 50,000-leaf manifest built a named tuple per leaf and per storage (~30 ms on
    a 2-core VM) that the common restore never looks at: it reads whole columns
    (:func:`leaf_columns`, :func:`storage_columns`). Indexing builds the one record asked for;
    iterating, slicing, comparing or hashing builds every record once (in C, :func:`_records`)
    and keeps them. Equal to a tuple of equal records. The columns are the manifest's: read them,
    never change them (a parsed manifest's checks vouch for them as parsed).
    """

    __slots__ = ("_built",)
    _cls: type[_R]

    def __init__(self) -> None:
        self._built: tuple[_R, ...] | None = None

    def _columns(self) -> tuple[Iterable[Any], ...]:
        raise NotImplementedError

    def _row(self, i: int) -> _R:
        raise NotImplementedError

    @property
    def records(self) -> tuple[_R, ...]:
        """Every record, built on first use (once: concurrent first users wait for one build)."""
        built = self._built
        if built is None:
            # The pause first, then the lock: the pause may collect (and run finalizers, which
            # may read records too) as it starts; while the lock is held nothing collects.
            with paused_gc(promote=len(self) >= _PROMOTE_RECORDS), _RECORDS_LOCK:  # acyclic: see paused_gc
                built = self._built
                if built is None:
                    built = self._built = _records(self._cls, *self._columns())
        return built

    def __len__(self) -> int:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> _R: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[_R, ...]: ...
    def __getitem__(self, i: int | slice) -> _R | tuple[_R, ...]:
        if self._built is None and not isinstance(i, slice):
            return self._row(i)  # one record (IndexError as a tuple raises it)
        return self.records[i]

    def __iter__(self) -> Iterator[_R]:
        return iter(self.records)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _LazyRecords):
            other = other.records
        return isinstance(other, tuple) and self.records == other

    def __hash__(self) -> int:
        return hash(self.records)

    def __repr__(self) -> str:
        return repr(self.records)


#: Held while a manifest's records are built (rarely: off restore's common path).
_RECORDS_LOCK = threading.Lock()


class LeafColumns(_LazyRecords[LeafRecord]):
    """The leaves of a manifest as columns (one list per field, one entry per leaf): what
    :func:`parse_rank_manifest` returns as :attr:`RankManifest.leaves`, and what
    :func:`leaf_columns` makes of any other manifest's records."""

    __slots__ = ("dtypes", "flags", "kinds", "offsets", "shapes", "storage", "strides")
    _cls = LeafRecord

    def __init__(
        self,
        kinds: list[str],
        storage: list[int],
        dtypes: list[str],
        shapes: list[tuple[int, ...]],
        strides: list[tuple[int, ...]],
        offsets: list[int],
        flags: list[int],
    ) -> None:
        super().__init__()
        self.kinds, self.storage, self.dtypes, self.shapes = kinds, storage, dtypes, shapes
        self.strides, self.offsets, self.flags = strides, offsets, flags  # flags: bit 0 requires_grad, 1 parameter

    @classmethod
    def of(cls, leaves: Sequence[LeafRecord]) -> LeafColumns:
        """The columns of ``leaves`` (records built elsewhere: a writer's), a ``map`` in C each."""
        if isinstance(leaves, LeafColumns):
            return leaves
        kinds, storage, dtypes, shapes, strides, offsets = (
            list(map(get, leaves))
            for get in (LEAF_KIND, LEAF_STORAGE, LEAF_DTYPE, LEAF_SHAPE, LEAF_STRIDE, LEAF_OFFSET)
        )
        params = map(operator.lshift, map(_LEAF_PARAMETER, leaves), repeat(1))
        out = cls(
            kinds, storage, dtypes, shapes, strides, offsets, list(map(operator.or_, map(_LEAF_GRAD, leaves), params))
        )
        out._built = tuple(leaves)
        return out

    def __len__(self) -> int:
        return len(self.kinds)

    def _row(self, i: int) -> LeafRecord:
        f = self.flags[i]
        return LeafRecord(
            self.kinds[i],
            self.storage[i],
            self.dtypes[i],
            self.shapes[i],
            self.strides[i],
            self.offsets[i],
            _GRAD_OF_FLAGS[f],
            _PARAMETER_OF_FLAGS[f],
        )

    def _columns(self) -> tuple[Iterable[Any], ...]:
        flags = self.flags
        grads: Iterable[bool]
        params: Iterable[bool]
        if flags and flags.count(flags[0]) == len(flags):  # one value for every leaf (common): no lookup each
            grads, params = repeat(_GRAD_OF_FLAGS[flags[0]]), repeat(_PARAMETER_OF_FLAGS[flags[0]])
        else:
            grads, params = map(_GRAD_OF_FLAGS.__getitem__, flags), map(_PARAMETER_OF_FLAGS.__getitem__, flags)
        return self.kinds, self.storage, self.dtypes, self.shapes, self.strides, self.offsets, grads, params


class StorageColumns(_LazyRecords[StorageRecord]):
    """The storages of a manifest as columns: see :class:`LeafColumns`."""

    __slots__ = ("nbytes", "offsets")
    _cls = StorageRecord

    def __init__(self, offsets: list[int], nbytes: list[int]) -> None:
        super().__init__()
        self.offsets, self.nbytes = offsets, nbytes

    @classmethod
    def of(cls, storages: Sequence[StorageRecord]) -> StorageColumns:
        """The columns of ``storages``."""
        if isinstance(storages, StorageColumns):
            return storages
        out = cls(list(map(STORAGE_OFFSET, storages)), list(map(STORAGE_NBYTES, storages)))
        out._built = tuple(storages)
        return out

    def __len__(self) -> int:
        return len(self.nbytes)

    def _row(self, i: int) -> StorageRecord:
        return StorageRecord(self.offsets[i], self.nbytes[i])

    def _columns(self) -> tuple[Iterable[Any], ...]:
        return self.offsets, self.nbytes


def leaf_columns(m: RankManifest) -> LeafColumns:
    """``m``'s leaves as columns: a parsed manifest's own (nothing built), else from its records."""
    return LeafColumns.of(m.leaves)


def storage_columns(m: RankManifest) -> StorageColumns:
    """``m``'s storages as columns: see :func:`leaf_columns`."""
    return StorageColumns.of(m.storages)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a C-contiguous tensor of ``shape`` (a 0-sized dimension counts as 1)."""
    out = []
    acc = 1
    for d in reversed(shape):
        out.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(out))


#: A storage of at least ``object_bytes // LARGE_STORAGE_DIVISOR`` bytes starts its own object(s).
LARGE_STORAGE_DIVISOR = 4


def encode_ints(col: list[int]) -> list[int] | dict[str, list[int]]:
    """An int column as written from format version 5: ``col`` itself, or ``{"runs": [first,
    step, count, ...]}`` (each triple the ints ``first, first + step, ..., first + (count - 1) *
    step``; the runs in order) where that takes at most half as many numbers, and the column
    has at least :data:`RUNS_MIN_ITEMS` items.

    Greedy, each run as long as it goes. The run boundaries (where the difference between
    neighbours changes) are found in C; the Python loop then takes one step per run, and gives
    up as soon as runs stop paying.
    """
    n = len(col)
    if n < RUNS_MIN_ITEMS:
        return col
    if col.count(col[0]) == n:  # one value (offsets, flags, the type of one dtype): one run
        return {"runs": [col[0], 0, n]}
    diffs = list(map(operator.sub, islice(col, 1, None), col))  # diffs[k] = col[k + 1] - col[k]
    # Where a new difference starts: diffs[k] != diffs[k - 1].
    bounds = list(compress(range(1, n - 1), map(operator.ne, islice(diffs, 1, None), diffs)))
    limit = n // 2  # numbers in the runs, at most
    if len(bounds) > limit:  # every run takes at least one boundary
        return col
    runs: list[int] = []
    i = b = 0
    while i < n:
        if i == n - 1:
            runs += (col[i], 0, 1)
            break
        while b < len(bounds) and bounds[b] <= i:
            b += 1
        end = bounds[b] if b < len(bounds) else n - 1  # diffs[i:end] are all diffs[i]: items i..end
        runs += (col[i], diffs[i], end - i + 1)
        if len(runs) > limit:
            return col
        i = end + 1
    return {"runs": runs}


def cut_objects(
    storages: Sequence[StorageRecord], object_bytes: int, frozen: Sequence[bool] | None = None
) -> tuple[tuple[int, int], ...]:
    """The format's object cut: ``(offset, size)`` of each object of a data stream, in order.

    ``storages`` tile the stream back to back (the writer lays them out so). A storage of at
    least ``object_bytes // 4`` bytes (a *large* storage) starts a new object and is cut into
    objects of ``object_bytes`` (the last one shorter) that hold no other storage's bytes; the
    storages between two large ones are grouped, in order, into objects of at most
    ``object_bytes``. ``frozen`` (one flag per storage, optional) keeps frozen and changing
    small storages apart: a group also ends where the flag changes (empty storages take
    either side). The objects tile the stream, as readers require.

    Why: an object that lies inside one tensor is read straight into it on restore (no bounce
    copy), and an unchanged large tensor maps to the same objects from one save to the next
    whatever changed before it in the stream (incremental saves rely on this). The flags do the
    same for small tensors: a frozen layer norm that shares an object with a trainable bias is
    written again on every save, one that does not is referenced.
    """
    if object_bytes < 1:
        raise ValueError(f"object_bytes must be positive, got {object_bytes}")
    if frozen is not None and len(frozen) != len(storages):
        raise ValueError(f"{len(frozen)} frozen flags for {len(storages)} storages")
    large = max(1, object_bytes // LARGE_STORAGE_DIVISOR)
    out: list[tuple[int, int]] = []
    group = pos = 0  # start of the open group of small storages; end of the stream so far
    side: bool | None = None  # the frozen flag of the open group's non-empty storages
    for i, (off, nbytes) in enumerate(storages):
        if off != pos:
            raise ValueError(f"storages do not tile the stream: one starts at {off}, the previous ends at {pos}")
        end = off + nbytes
        flag = frozen[i] if frozen is not None and nbytes else None
        if nbytes >= large:
            if pos > group:
                out.append((group, pos - group))
            out.extend((o, min(object_bytes, end - o)) for o in range(off, end, object_bytes))
            group, side = end, None
        elif end - group > object_bytes or (flag is not None and side is not None and flag != side):
            out.append((group, pos - group))  # pos > group: a small storage alone always fits
            group, side = off, flag
        elif side is None:
            side = flag
        pos = end
    if pos > group:
        out.append((group, pos - group))
    return tuple(out)


@dataclass(frozen=True)
class RankManifest:
    """Everything needed to rebuild one rank's state from its objects."""

    step: int
    rank: int
    world_size: int
    objects: tuple[ObjectRecord, ...]
    #: A tuple, or (from :func:`parse_rank_manifest`) the same as columns: read whole columns
    #: with :func:`storage_columns` and :func:`leaf_columns`.
    storages: Sequence[StorageRecord]
    leaves: Sequence[LeafRecord]
    structure: Any
    created_unix: float = field(default_factory=time.time)
    #: The version this manifest was read as (or is written as). From version 3 on, a replica
    #: may hold an object compressed or under an earlier step's name: see :mod:`ckptmirror.placement`.
    format_version: int = FORMAT_VERSION

    @property
    def stream_bytes(self) -> int:
        """Total size of the rank's data stream."""
        return sum(o.size for o in self.objects)

    def to_json(self, version: int = FORMAT_VERSION) -> bytes:
        """Serialise as format ``version`` (the current one, or 4 for tests and benchmarks that
        compare layouts; deterministic key order): columns, not rows.

        Strides are written only for the leaves whose strides are not the C-contiguous ones of
        their shape (views, transposes, expanded tensors), as ``[leaf, [strides]]`` pairs. From
        version 5, an int column is written as runs where that is much shorter (a column of one
        value, or ``0, 1, 2, ...``), and the shapes as a table of the distinct ones plus each
        leaf's index into it where shapes repeat (see docs/FORMAT.md, "Int columns"): a 50,000-leaf
        manifest is about half the bytes and parses in about half the time.
        """
        return self.encode(version)[0]

    def encode(self, version: int = FORMAT_VERSION, runs: bool = True) -> tuple[bytes, int]:
        """:meth:`to_json`, and how many items its int columns hold as runs: what a reader charges
        on top of the document's :func:`parse_cost` (see :func:`check_parse_cost`).
        ``runs=False``: every int column a plain list (version 5 still; see :func:`serialise`)."""
        if version not in (4, FORMAT_VERSION):
            raise ValueError(f"can write format version 4 or {FORMAT_VERSION}, not {version}")
        if any(s.offset != o for s, o in zip(self.storages, accumulate((s.nbytes for s in self.storages), initial=0))):
            raise ValueError("storages must tile the data stream back to back (format version 2 stores no offsets)")
        run_items = 0

        def ints(col: list[int]) -> Any:
            nonlocal run_items
            out = encode_ints(col) if runs and version >= RUNS_VERSION else col
            if out is not col:
                run_items += len(col)
            return out

        types: dict[tuple[str, str], int] = {}
        type_col = [types.setdefault((lf.kind, lf.dtype), len(types)) for lf in self.leaves]
        contiguous: dict[tuple[int, ...], tuple[int, ...]] = {}
        strides = []
        for i, lf in enumerate(self.leaves):
            c = contiguous.get(lf.shape)
            if c is None:
                c = contiguous[lf.shape] = contiguous_strides(lf.shape)
            if lf.stride != c:
                strides.append([i, list(lf.stride)])
        leaves: dict[str, Any] = {
            "types": [list(t) for t in types],
            "type": ints(type_col),
            "storage": ints([lf.storage for lf in self.leaves]),
            "offset": ints([lf.offset for lf in self.leaves]),
            "flags": ints([int(lf.requires_grad) | int(lf.parameter) << 1 for lf in self.leaves]),
        }
        n = len(self.leaves)
        # ``contiguous`` holds each distinct shape once, in first appearance order.
        if version >= RUNS_VERSION and n >= RUNS_MIN_ITEMS and 2 * len(contiguous) <= n:
            shape_of = {shape: j for j, shape in enumerate(contiguous)}
            leaves["shapes"] = [list(shape) for shape in contiguous]
            leaves["shape"] = ints([shape_of[lf.shape] for lf in self.leaves])
        else:
            leaves["shape"] = [list(lf.shape) for lf in self.leaves]
        leaves["strides"] = strides
        doc = {
            "format_version": version,
            "kind": "ckptmirror.rank",
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "created_unix": self.created_unix,
            "objects": {
                "key": [o.key for o in self.objects],
                "size": ints([o.size for o in self.objects]),
                "checksum": [o.checksum for o in self.objects],
            },
            "storages": {"nbytes": ints([s.nbytes for s in self.storages])},
            "leaves": leaves,
            "structure": self.structure,
        }
        return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode(), run_items


@dataclass(frozen=True)
class RankRef:
    """A commit's pin on one rank manifest."""

    rank: int
    key: str
    size: int
    checksum: str


@dataclass(frozen=True)
class CommitRecord:
    """The commit of one step: written last, it makes the step exist for readers."""

    step: int
    world_size: int
    ranks: tuple[RankRef, ...]
    created_unix: float = field(default_factory=time.time)
    #: The whole state was identical on every rank and is stored once: ``ranks`` holds one
    #: manifest (rank 0's), whose objects were written by all ranks; it restores on any world size.
    replicated: bool = False

    def to_json(self) -> bytes:
        """Serialise (deterministic key order)."""
        doc: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": "ckptmirror.commit",
            "step": self.step,
            "world_size": self.world_size,
            "created_unix": self.created_unix,
            "ranks": [[r.rank, r.key, r.size, r.checksum] for r in self.ranks],
        }
        if self.replicated:
            doc["replicated"] = True
        return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()

    def manifest_ref(self, rank: int) -> RankRef:
        """The manifest that holds ``rank``'s state."""
        return self.ranks[0] if self.replicated else self.ranks[rank]


# ---------------------------------------------------------------- parsing (untrusted input)

# What parsing costs in Python memory, on 64-bit CPython (3.10-3.13), as upper bounds checked by
# tests/test_format_v2.py against what documents built to be expensive really take (tracemalloc):
#: per JSON value: the object (an int, a float, a short str: 107 bytes at worst, a one-character
#: astral string), the slot that points at it, and its share of the records built from it
_COST_PER_VALUE = 112
#: per JSON object, on top of its values: the list of (key, value) pairs the duplicate check gets
_COST_PER_OBJECT = 64
#: per item expanded from runs (format version 5), which the document's bytes do not count: the
#: int in its column and its share of the records and checks built per leaf, as a JSON value
#: for each column a leaf has in version 4 would have been charged (tests/test_format_v5.py)
_COST_PER_RUN_ITEM = 2 * _COST_PER_VALUE


def parse_cost(data: bytes, run_items: int = 0) -> int:
    """Estimated peak memory (bytes) of parsing ``data`` into records: an upper bound, in O(n) C time.

    Every JSON value follows a ``[``, ``{``, ``,`` or ``:`` (or starts the document), so counting
    those bytes bounds the number of values without parsing anything; the same bytes inside
    strings only make the bound looser. The text itself is counted twice (the decoded document
    and the strings cut from it), at four bytes a character unless it is all ASCII.
    ``run_items``: items the document's int columns hold as runs (format version 5), which its
    bytes do not show, at :data:`_COST_PER_RUN_ITEM` each.
    """
    objects = data.count(b"{")
    values = data.count(b",") + data.count(b":") + data.count(b"[") + objects + 1
    per_char = 1 if data.isascii() else 4
    return (
        2 * per_char * len(data)
        + _COST_PER_VALUE * values
        + _COST_PER_OBJECT * objects
        + _COST_PER_RUN_ITEM * run_items
    )


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_resume = False
_gc_promote_now = False
#: Whether :func:`paused_gc` may hand what a pause built to the oldest generation (see there):
#: CPython with a GIL only, where ``gc.freeze()`` and ``gc.unfreeze()`` splice the generations'
#: lists in constant time (the free-threaded build walks the heap). Cleared for good once the
#: process is seen to keep objects frozen itself.
_gc_can_promote = (
    sys.implementation.name == "cpython" and hasattr(gc, "freeze") and not sysconfig.get_config_var("Py_GIL_DISABLED")
)


@contextmanager
def paused_gc(promote: bool = False) -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a manifest is parsed or checked, or while a
    save builds per-leaf objects (``flatten``, ``plan_key``: at 50,000 tensors ``plan_key``
    took 0.05 s paused, 0.06-0.14 s not).

    Parsing builds hundreds of thousands of containers in a burst, and each burst of
    allocations triggers collections that scan every tracked object of the process (the
    model, the optimizer, torch itself): measured 2.6x the parse time at 50k leaves. What is
    built here is acyclic (JSON trees, tuples), so those scans find nothing to free; memory is
    bounded by :data:`MAX_PARSE_MEMORY` instead. Nested and concurrent users share one pause; the
    collector is re-enabled when the last one leaves, if it was enabled when the first came.

    ``promote`` (for a large manifest; decided by the first user): re-enabled as is, the
    collector would scan everything the pause left behind at its next allocation (the records
    of every leaf: 15-20 ms at 50k leaves, a sixth of parse and validation), again one
    generation up later, and find nothing. So the young generations are collected when the
    pause starts (a few thousand objects at most), and what they hold when it ends, the pause's
    survivors, joins the oldest generation unscanned (``gc.freeze()`` then ``gc.unfreeze()``:
    two list splices), where full collections see it like any other long-lived object. Not in a
    process that keeps objects frozen itself (``gc.get_freeze_count()``): that would release them.
    """
    global _gc_depth, _gc_resume, _gc_promote_now
    with _gc_lock:
        first = _gc_depth == 0
        if first:
            _gc_resume = gc.isenabled()
            _gc_promote_now = promote and _gc_resume and _gc_can_promote
            gc.disable()
        _gc_depth += 1
        collect = first and _gc_promote_now
    try:
        if collect:  # outside the lock: finalizers run here
            gc.collect(1)
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_resume:
                if _gc_promote_now:
                    _promote_young()
                gc.enable()


def _promote_young() -> None:
    """Move the young generations' objects to the oldest one without scanning them (see
    :func:`paused_gc`); nothing where the process keeps objects frozen."""
    global _gc_can_promote
    if gc.get_freeze_count():  # walks the frozen objects: once, never again after
        _gc_can_promote = False
        return
    gc.freeze()
    gc.unfreeze()


#: The most :func:`parse_cost` can charge a byte of a document: four bytes a character, counted
#: twice, and a JSON object (a value and an object) at every byte.
_MAX_COST_PER_BYTE = 2 * 4 + _COST_PER_VALUE + _COST_PER_OBJECT


def check_parse_cost(data: bytes, key: str, run_items: int = 0) -> None:
    """Refuse (:class:`ManifestError` naming ``key``) a document whose :func:`parse_cost`, plus
    ``run_items`` items its int columns hold as runs (format version 5: what
    :meth:`RankManifest.encode` returns), exceeds :data:`MAX_PARSE_MEMORY`. Readers call it
    before parsing (and charge runs as they meet them); the writer calls it on every manifest
    it serialises, so that no save writes a manifest that readers would refuse.

    A document too short to exceed the limit whatever its bytes (under 2.9 MB) is not counted."""
    cost = _cost_over_limit(data, run_items)
    if cost is not None:
        raise ManifestError(
            f"manifest of {len(data)} bytes holds too many JSON values for its size"
            + (f" ({run_items} of them as runs)" if run_items else "")
            + f": parsing it would take about {cost >> 20} MiB, over the {MAX_PARSE_MEMORY >> 20} MiB limit",
            key=key,
        )


def serialise(manifest: RankManifest, key: str) -> bytes:
    """What a writer stores for ``manifest`` (at ``key``): its JSON, refused
    (:class:`ManifestError`) if readers would refuse it (:func:`check_parse_cost`).

    Runs are charged at :data:`_COST_PER_RUN_ITEM` an item, more than the plain int they stand
    for costs (:data:`_COST_PER_VALUE`), so near the limit runs can make a manifest cost more than
    its plain form: then it is written with plain columns, and any manifest that version 4 could
    write, version 5 can too."""
    data, run_items = manifest.encode()
    if run_items and _cost_over_limit(data, run_items) is not None:
        data, run_items = manifest.encode(runs=False)
    check_parse_cost(data, key, run_items)
    return data


def _cost_over_limit(data: bytes, run_items: int) -> int | None:
    """The estimated cost of parsing ``data`` with ``run_items`` items expanded from runs, if it
    exceeds :data:`MAX_PARSE_MEMORY`; None if it does not (counted only when it might)."""
    extra = run_items * _COST_PER_RUN_ITEM
    if len(data) * _MAX_COST_PER_BYTE + _COST_PER_VALUE + extra <= MAX_PARSE_MEMORY:
        return None
    cost = parse_cost(data, run_items)
    return cost if cost > MAX_PARSE_MEMORY else None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # in C; only a document with a duplicate takes the slow path below
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate JSON key {k!r}")
            seen.add(k)
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    # A literal such as 1e400 is valid JSON grammar but no double: float() makes it inf, which
    # the format excludes as it excludes the Infinity constant (verify and inspect would choke on it).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is beyond the range of a double")
    return value


def load_json(data: bytes, key: str) -> dict[str, Any]:
    """Parse a manifest document strictly; any problem is a :class:`ManifestError` naming ``key``.

    Bounded before any Python object is built: at most :data:`MAX_MANIFEST_BYTES` bytes and an
    estimated parse memory (:func:`parse_cost`) of at most :data:`MAX_PARSE_MEMORY`. UTF-8 only
    (``json.loads`` would otherwise guess UTF-16 or UTF-32 from the first bytes).
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of {len(data)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit", key=key)
    check_parse_cost(data, key)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not UTF-8: {exc}", key=key) from exc
    try:
        with paused_gc():
            doc = json.loads(
                text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
            )
    except RecursionError as exc:
        raise ManifestError("JSON nested too deeply", key=key) from exc
    except ValueError as exc:
        raise ManifestError(f"not valid JSON: {exc}", key=key) from exc
    if not isinstance(doc, dict):
        raise ManifestError("top level is not a JSON object", key=key)
    version = doc.get("format_version")
    if type(version) is not int:
        raise ManifestError("format_version missing or not an int", key=key)
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"format_version {version} is newer than this ckptmirror understands ({FORMAT_VERSION}); "
            "upgrade ckptmirror",
            key=key,
        )
    if version < 1:
        raise ManifestError(f"bad format_version {version}", key=key)
    return doc


_CHECKSUM_RE = re.compile(r"xxh3_64:[0-9a-f]{16}\Z")


class _Fields:
    """Typed field access that reports the manifest key and the field path on failure."""

    # The methods are named after the builtins they check, and in the class body those names
    # shadow the builtins: annotations spell them ``builtins.int`` etc.

    def __init__(self, key: builtins.str, data: bytes | None = None, runs: builtins.bool = False) -> None:
        self.key = key
        #: The document (for the memory bound of what runs expand to) and whether its int
        #: columns may be runs (format version 5 on).
        self.data = data
        self.runs_ok = runs
        self.expanded = 0  # items expanded from runs so far

    def err(self, path: builtins.str, msg: builtins.str) -> ManifestError:
        return ManifestError(f"field {path}: {msg}", key=self.key)

    def int(self, value: Any, path: builtins.str, lo: builtins.int, hi: builtins.int) -> builtins.int:
        if type(value) is not int:
            raise self.err(path, f"expected an int, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise self.err(path, f"{value} is outside [{lo}, {hi}]")
        return value

    def list(self, value: Any, path: builtins.str, length: builtins.int | None = None) -> builtins.list[Any]:
        if not isinstance(value, list):
            raise self.err(path, f"expected a list, got {type(value).__name__}")
        if length is not None and len(value) != length:
            raise self.err(path, f"expected {length} items, got {len(value)}")
        return value

    def str(self, value: Any, path: builtins.str, max_len: builtins.int = 4096) -> builtins.str:
        if not isinstance(value, str) or len(value) > max_len:
            raise self.err(path, "expected a short string")
        return value

    def bool(self, value: Any, path: builtins.str) -> builtins.bool:
        if type(value) is not bool:
            raise self.err(path, "expected a bool")
        return value

    def number(self, value: Any, path: builtins.str) -> float:
        if type(value) not in (int, float):
            raise self.err(path, "expected a number")
        try:
            out = float(value)
        except OverflowError:  # an int of hundreds of digits
            out = math.inf
        if not math.isfinite(out):
            raise self.err(path, "expected a finite number")
        return out

    def checksum(self, value: Any, path: builtins.str) -> builtins.str:
        if not is_checksum(value):
            raise self.err(path, f"malformed checksum {value!r}")
        return value

    def object_key(self, value: Any, path: builtins.str) -> builtins.str:
        k = self.str(value, path)
        # Keys are resolved by the replicas, but a manifest is untrusted: only the exact shape
        # the writer produces is accepted, so "../x", "/etc/passwd" or "a\x00b" never get that far.
        if not _OBJECT_KEY_RE.match(k):
            raise self.err(path, f"object name {k!r} is not a valid object key")
        return k

    def section(self, doc: dict[builtins.str, Any], name: builtins.str) -> dict[builtins.str, Any]:
        value = doc.get(name)
        if not isinstance(value, dict):
            raise self.err(name, "expected an object of columns")
        return value

    # Columns are checked a whole list at a time, in C (map, set, min, max): a manifest has
    # tens of thousands of leaves, and a Python step per item would be most of the parse time.
    # Only on failure does a Python loop look for the first bad item, to name it.

    def int_column(
        self,
        value: Any,
        path: builtins.str,
        lo: builtins.int,
        hi: builtins.int,
        length: builtins.int | None = None,
    ) -> builtins.list[builtins.int]:
        if self.runs_ok and isinstance(value, dict):
            return self.runs(value, path, lo, hi, length)
        col = self.list(value, path, length)
        if col and not (_all_of_type(col, int) and _ints_within(col, lo, hi)):
            self.first_bad_int(col, path, lo, hi)
        return col

    def ints(self, value: Any, path: builtins.str, lo: builtins.int, hi: builtins.int) -> Any:
        """``value`` with its runs expanded (ints in ``[lo, hi]``) if it is runs; else as it is,
        for the caller's own checks."""
        if self.runs_ok and isinstance(value, dict):
            return self.runs(value, path, lo, hi, None)
        return value

    def runs(
        self, value: dict[builtins.str, Any], path: builtins.str, lo: builtins.int, hi: builtins.int, length: Any
    ) -> builtins.list[builtins.int]:
        """Expand ``{"runs": [first, step, count, ...]}`` (format version 5): every item an int
        in ``[lo, hi]``, ``length`` items in all if given. Checked per run (the ends of a run
        bound its items), and the memory its items take is charged before they are built."""
        if builtins.list(value) != ["runs"]:
            raise self.err(path, 'expected a list, or an object {"runs": [...]}')
        p = path + ".runs"
        flat = self.list(value["runs"], p)
        if len(flat) % 3:
            raise self.err(p, f"expected (first, step, count) triples, got {len(flat)} numbers")
        if flat and not _all_of_type(flat, builtins.int):
            self.first_bad_int(flat, p, -MAX_STREAM_BYTES, MAX_STREAM_BYTES)
        firsts, steps, counts = flat[0::3], flat[1::3], flat[2::3]
        if counts and min(counts) < 1:
            j = next(j for j, c in enumerate(counts) if c < 1)
            raise self.err(f"{p}[{3 * j + 2}]", f"a run holds at least 1 item, got {counts[j]}")
        total = sum(counts)
        if length is not None and total != length:
            raise self.err(path, f"the runs hold {total} items, expected {length}")
        self.charge(total, path)
        lasts = builtins.list(map(operator.add, firsts, map(operator.mul, steps, map(operator.sub, counts, repeat(1)))))
        if firsts and not (lo <= min(min(firsts), min(lasts)) and max(max(firsts), max(lasts)) <= hi):
            for j, (a, z) in enumerate(zip(firsts, lasts)):
                for v in (a, z):
                    if not lo <= v <= hi:
                        raise self.err(
                            f"{p}[{3 * j}]",
                            f"run of {counts[j]} from {a} by {steps[j]} reaches {v}, outside [{lo}, {hi}]",
                        )
        out: builtins.list[builtins.int] = []
        for a, step, c in zip(firsts, steps, counts):
            out += repeat(a, c) if step == 0 else range(a, a + step * c, step)
        return out

    def charge(self, items: builtins.int, path: builtins.str) -> None:
        """Count ``items`` more ints expanded from runs against :data:`MAX_PARSE_MEMORY`, on top
        of the document's :func:`parse_cost`: a few bytes of runs may stand for millions of items."""
        self.expanded += items
        cost = _cost_over_limit(self.data if self.data is not None else b"", self.expanded)
        if cost is not None:
            raise self.err(
                path,
                f"runs of {self.expanded} items in all: reading the manifest would take about "
                f"{cost >> 20} MiB, over the {MAX_PARSE_MEMORY >> 20} MiB limit",
            )

    def first_bad_int(self, col: builtins.list[Any], path: builtins.str, lo: builtins.int, hi: builtins.int) -> None:
        """Raise naming the first item of ``col`` that is not an int in ``[lo, hi]``, if any."""
        for i, v in enumerate(col):
            self.int(v, f"{path}[{i}]", lo, hi)

    def str_column(
        self, value: Any, path: builtins.str, pattern: re.Pattern[builtins.str], length: builtins.int
    ) -> builtins.list[builtins.str]:
        col = self.list(value, path, length)
        if col and not (set(map(type, col)) <= {str} and all(map(pattern.match, col))):
            for i, v in enumerate(col):
                if not isinstance(v, str) or not pattern.match(v):
                    raise self.err(f"{path}[{i}]", f"{v!r} does not match {pattern.pattern!r}")
        return col


def _all_of_type(col: list[Any], t: type) -> bool:
    """Whether every item of ``col`` is exactly a ``t`` (a bool is not an int, nor a float),
    counted in C (a third cheaper than the set of their types)."""
    return countOf(map(type, col), t) == len(col)


def _ints_within(col: list[int], lo: int, hi: int) -> bool:
    """Whether every item of ``col`` (ints, checked before) lies in ``[lo, hi]``, in C.

    A column of one value (the element offsets, the type of a one-dtype manifest) is recognised
    by ``list.count`` (mostly an identity compare: JSON decodes small ints to shared objects), a
    column of a few possible values (flags, types) by its set, any other by ``min`` and ``max``.
    """
    if col[0] == col[-1] and col.count(col[0]) == len(col):
        return lo <= col[0] <= hi
    if hi - lo < 16:
        return set(col) <= set(range(lo, hi + 1))
    return lo <= min(col) and max(col) <= hi


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
