"""A rank's manifest and a step's commit record, and how they are written."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from .names import FORMAT_VERSION, RUNS_MIN_ITEMS, RUNS_VERSION
from .records import LeafRecord, ObjectRecord, StorageRecord, contiguous_strides, encode_ints


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

    @property
    def pins(self) -> tuple[object, ...]:
        """What identifies the checkpoint this record commits: the rank manifests it pins (key,
        size, checksum: a save's own token is in every key), the world size, whether replicated.
        Not its creation time: the records one save writes at each replica position may differ
        there (a DCP save decides each position on its own)."""
        return (
            self.step,
            self.world_size,
            self.replicated,
            tuple((r.rank, r.key, r.size, r.checksum) for r in self.ranks),
        )

    def same_save(self, other: CommitRecord) -> bool:
        """Whether ``other`` commits the same save (the same rank manifest files: their names
        carry the save's token), whatever the sizes and checksums it pins for them: a record
        that differs only there is this one damaged, not another checkpoint."""
        return (self.step, self.world_size, self.replicated, [r.key for r in self.ranks]) == (
            other.step,
            other.world_size,
            other.replicated,
            [r.key for r in other.ranks],
        )

    def manifest_ref(self, rank: int) -> RankRef:
        """The manifest that holds ``rank``'s state."""
        return self.ranks[0] if self.replicated else self.ranks[rank]
