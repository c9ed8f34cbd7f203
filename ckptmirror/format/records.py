"""The per-item records of a manifest (objects, storages, leaves), kept as columns, and the object cut."""

from __future__ import annotations

import operator
import threading
from collections.abc import Iterable, Iterator, Sequence
from itertools import compress, islice, repeat, starmap
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, overload

from .gcpause import paused_gc
from .names import RUNS_MIN_ITEMS

if TYPE_CHECKING:
    from .manifest import RankManifest


#: At least this many records are built with ``paused_gc(promote=True)`` (see :class:`LeafColumns`).
_PROMOTE_RECORDS = 4096


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
