"""The on-replica format: key layout, manifest records, JSON (de)serialisation and validation.

See ``docs/FORMAT.md`` for the byte-level description. In short, per step::

    step-000000000042/rank-00000/o000000-1f2e3d4c.bin   object: raw bytes, a window of the rank's data stream
    step-000000000042/rank-00000-1f2e3d4c.json          rank manifest: objects (size, checksum), tensors, structure
    step-000000000042/COMMIT.json                       written last: pins every rank manifest by size+checksum

``1f2e3d4c`` is a random token drawn for each save of each rank, so two writers of the same
step (or a retry after a crash) never write the same name: a losing writer cannot damage the
winner's objects, and leftovers of a torn save never collide with the next attempt.

A rank's *data stream* is the concatenation of its objects in order; every storage lives at
an offset in that stream. Everything read from a replica is validated here before use: a
manifest is untrusted input (wrong types, huge numbers, ``../`` names, duplicate keys).
"""

from __future__ import annotations

import builtins
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .checksum import is_checksum
from .errors import ManifestError

FORMAT_VERSION = 1
MAX_STEP = 10**12 - 1
MAX_RANKS = 100_000
MAX_OBJECT_BYTES = 1 << 40  # 1 TiB: anything larger in a manifest is hostile or corrupt
MAX_STREAM_BYTES = 1 << 50
MAX_MANIFEST_BYTES = 256 << 20
MAX_DIMS = 64
COMMIT_NAME = "COMMIT.json"

# [0-9] and \Z, not \d and $: \d matches non-ASCII digits and $ accepts a trailing newline.
_STEP_DIR_RE = re.compile(r"step-([0-9]{12})\Z")
_OBJECT_KEY_RE = re.compile(r"step-[0-9]{12}/rank-[0-9]{5}/o[0-9]{6}-[0-9a-f]{8}\.bin\Z")
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


_WRITER_RE = re.compile(r"step-[0-9]{12}/rank-([0-9]{5})(?:/o[0-9]{6})?-([0-9a-f]{8})\.(?:bin|json)\Z")


#: Name prefix of a file being written (``.tmp-<uuid32>-<name>``): never a committed object.
TMP_PREFIX = ".tmp-"
_TMP_RE = re.compile(re.escape(TMP_PREFIX) + r"[0-9a-f]{32}-")


def writer_of(key: str) -> tuple[int, str] | None:
    """``(rank, token)`` of an object or rank manifest key, or of a local temp file of one
    (``.tmp-<uuid>-<name>``); None for anything else (commit records and their temp files)."""
    head, _, name = key.rpartition("/")
    m = _WRITER_RE.match(f"{head}/{_TMP_RE.sub('', name, count=1)}" if name.startswith(TMP_PREFIX) else key)
    return (int(m.group(1)), m.group(2)) if m else None


def is_rank_manifest_key(key: str, step: int, rank: int) -> bool:
    """Whether ``key`` is a well-formed rank manifest name for ``step`` and ``rank``."""
    m = _MANIFEST_KEY_RE.match(key)
    return m is not None and int(m.group(1)) == step and int(m.group(2)) == rank


def commit_key(step: int) -> str:
    """Key of a step's commit record, the object written last."""
    return f"{step_dir(step)}/{COMMIT_NAME}"


@dataclass(frozen=True)
class ObjectRecord:
    """One stored object: its key, exact size and checksum."""

    key: str
    size: int
    checksum: str


@dataclass(frozen=True)
class StorageRecord:
    """A byte span of the data stream that backs one or more tensors (shared storage is stored once)."""

    offset: int
    nbytes: int


@dataclass(frozen=True)
class LeafRecord:
    """A tensor or NumPy array: a strided view of a storage span."""

    kind: str  # "tensor" | "ndarray"
    storage: int
    dtype: str  # torch dtype name for tensors; numpy dtype.str for arrays
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements
    offset: int  # in elements, from the start of the storage span
    requires_grad: bool = False
    parameter: bool = False


@dataclass(frozen=True)
class RankManifest:
    """Everything needed to rebuild one rank's state from its objects."""

    step: int
    rank: int
    world_size: int
    objects: tuple[ObjectRecord, ...]
    storages: tuple[StorageRecord, ...]
    leaves: tuple[LeafRecord, ...]
    structure: Any
    created_unix: float = field(default_factory=time.time)

    @property
    def stream_bytes(self) -> int:
        """Total size of the rank's data stream."""
        return sum(o.size for o in self.objects)

    def to_json(self) -> bytes:
        """Serialise (deterministic key order)."""
        doc = {
            "format_version": FORMAT_VERSION,
            "kind": "ckptmirror.rank",
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "created_unix": self.created_unix,
            "objects": [[o.key, o.size, o.checksum] for o in self.objects],
            "storages": [[s.offset, s.nbytes] for s in self.storages],
            "leaves": [
                {
                    "kind": lf.kind,
                    "storage": lf.storage,
                    "dtype": lf.dtype,
                    "shape": list(lf.shape),
                    "stride": list(lf.stride),
                    "offset": lf.offset,
                    "requires_grad": lf.requires_grad,
                    "parameter": lf.parameter,
                }
                for lf in self.leaves
            ],
            "structure": self.structure,
        }
        return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()


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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def load_json(data: bytes, key: str) -> dict[str, Any]:
    """Parse a manifest document strictly; any problem is a :class:`ManifestError` naming ``key``."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of {len(data)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit", key=key)
    try:
        doc = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ManifestError("JSON nested too deeply", key=key) from exc
    except (ValueError, UnicodeDecodeError) as exc:
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


class _Fields:
    """Typed field access that reports the manifest key and the field path on failure."""

    # The methods are named after the builtins they check, and in the class body those names
    # shadow the builtins: annotations spell them ``builtins.int`` etc.

    def __init__(self, key: builtins.str) -> None:
        self.key = key

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
        return float(value)

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


def parse_commit(data: bytes, key: str) -> CommitRecord:
    """Parse and validate a commit record."""
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
    """Parse and validate a rank manifest, including every bound a reader relies on."""
    doc = load_json(data, key)
    f = _Fields(key)
    if doc.get("kind") != "ckptmirror.rank":
        raise f.err("kind", "not a ckptmirror rank manifest")
    step = f.int(doc.get("step"), "step", 0, MAX_STEP)
    world = f.int(doc.get("world_size"), "world_size", 1, MAX_RANKS)
    rank = f.int(doc.get("rank"), "rank", 0, world - 1)
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
        shape = tuple(
            f.int(d, f"{p}.shape[{j}]", 0, MAX_STREAM_BYTES)
            for j, d in enumerate(f.list(item.get("shape"), p + ".shape"))
        )
        stride = tuple(
            f.int(d, f"{p}.stride[{j}]", 0, MAX_STREAM_BYTES)
            for j, d in enumerate(f.list(item.get("stride"), p + ".stride", len(shape)))
        )
        if len(shape) > MAX_DIMS:
            raise f.err(p + ".shape", "too many dimensions")
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
    created = f.number(doc.get("created_unix", 0.0), "created_unix")
    if "structure" not in doc:
        raise f.err("structure", "missing")
    return RankManifest(step, rank, world, tuple(objects), tuple(storages), tuple(leaves), doc["structure"], created)
