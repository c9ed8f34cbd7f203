"""JSON for what DCP would pickle: non-tensor values, DCP's ``Metadata``, and a rank's index.

Three things that ``torch.distributed.checkpoint`` stores with pickle (``torch.save`` bytes for
non-tensor values, a pickled ``.metadata`` file) are written here as JSON instead, in
ckptmirror's own tree encoding (:mod:`ckptmirror.state.tree`), and read back without
unpickling anything:

- a non-tensor value (a learning rate, ``param_groups`` entries, a step count kept as an int):
  :func:`encode_value` / :func:`decode_value`, framed by :data:`VALUE_MAGIC` so that bytes that
  did not come from here (DCP's default planner's ``torch.save`` output) are refused by name;
- DCP's ``Metadata`` (tensor sizes, dtypes and chunks, the planner's data, where each chunk is
  stored): :func:`metadata_to_tree` / :func:`tree_to_metadata`;
- a rank's part of a step (which DCP items it stored, under which keys):
  :func:`rank_index_tree` / :func:`parse_rank_index`.

Everything read back is untrusted input: every field is type- and bound-checked, and any
problem is a :class:`~ckptmirror.errors.ManifestError` naming where it was found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ..errors import ManifestError, UnsupportedTypeError
from ..state.tree import JSON, dtype_from_name, dtype_name, flatten, key_path, unflatten

#: The first bytes of every value :func:`encode_value` writes (and :func:`decode_value` requires).
VALUE_MAGIC = b"ckptmirror-json-tree/1\n"
#: ``dcp.format`` of a rank manifest written through :class:`~ckptmirror.dcp.MirrorStorageWriter`.
DCP_FORMAT = "ckptmirror.dcp/1"
#: ``Metadata.version`` of the steps this module writes (DCP's own current version string).
DCP_VERSION = "1.0.0"

_MAX_DIMS = 64
_MAX_DIM = 1 << 50

_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo, "sparse_csr": torch.sparse_csr}
_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve_format": torch.preserve_format,
}


def looks_pickled(data: bytes | memoryview) -> bool:
    """Whether ``data`` starts like ``torch.save`` output (a zip archive) or a raw pickle stream."""
    head = bytes(data[:4])
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


# ------------------------------------------------------------------------------ values


def encode_value(value: Any, fqn: str) -> bytes:
    """A non-tensor state value as :data:`VALUE_MAGIC` + its JSON tree.

    Raises :class:`UnsupportedTypeError` naming the key path of anything the tree encoding
    does not cover, including tensors nested in a value DCP treats as opaque (a tuple): DCP
    would pickle those, and they have no place in a JSON document.
    """
    root = f"state_dict[{fqn!r}]"
    flat = flatten(value, root=root)
    if flat.leaves:
        raise UnsupportedTypeError(
            key_path(root, flat.paths[0]),
            type(flat.leaves[0]),
            "DCP stores a tensor inside a tuple (or any value it does not traverse) as pickled bytes; "
            "keep tensors in dicts or lists so that DCP saves them as tensors",
        )
    return VALUE_MAGIC + json.dumps(flat.structure, allow_nan=False, separators=(",", ":")).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _no_leaves(where: str) -> Any:
    def leaf(kind: str, i: int, path: tuple[Any, ...]) -> Any:
        raise ManifestError(f"a stored value holds a {kind} reference at {key_path('value', path)}", key=where)

    return leaf


def decode_value_node(node: JSON, where: str) -> Any:
    """The Python value of a JSON tree node that holds no tensors (validated by unflatten)."""
    return unflatten(node, _no_leaves(where), where)


_SCALARS = (type(None), bool, int, float, str)
#: Nesting handled by :func:`decode_plain`'s fast path; deeper subtrees go to ``unflatten``.
_FAST_DEPTH = 32


def decode_plain(node: JSON, where: str) -> Any:
    """What ``unflatten`` makes of a tree that holds no tensors, faster for the common nodes.

    DCP's metadata in rank 0's index is tens of thousands of small lists (every chunk's offsets
    and sizes): ``unflatten`` checks and dispatches each node through a generic method, several
    times the cost of reading the manifest. Here dicts with string keys, lists and JSON
    scalars are decoded directly; any other node (tuples, big ints, non-finite floats) and
    anything malformed goes to ``unflatten``, so the result and the errors are its own.
    """
    slow = _no_leaves(where)

    def dec(n: Any, depth: int) -> Any:
        if type(n) is not dict:
            return n if isinstance(n, _SCALARS) else unflatten(n, slow, where)
        t = n.get("t")
        if depth < _FAST_DEPTH:
            if t == "list":
                v = n.get("v")
                if type(v) is list:
                    return [x if type(x) in _SCALARS else dec(x, depth + 1) for x in v]
            elif t == "dict":
                items = n.get("items")
                if type(items) is list:
                    out: dict[str, Any] = {}
                    for pair in items:
                        if not (type(pair) is list and len(pair) == 2 and type(pair[0]) is str and pair[0] not in out):
                            return unflatten(n, slow, where)
                        x = pair[1]
                        out[pair[0]] = x if type(x) in _SCALARS else dec(x, depth + 1)
                    return out
        return unflatten(n, slow, where)

    return dec(node, 0)


def decode_value(data: bytes, fqn: str) -> Any:
    """Inverse of :func:`encode_value`. Never unpickles: anything else is a :class:`ManifestError`."""
    if not data.startswith(VALUE_MAGIC):
        what = "pickled (torch.save) bytes" if looks_pickled(data) else "bytes of an unknown encoding"
        raise ManifestError(
            f"value {fqn!r} holds {what}; ckptmirror reads only its own JSON encoding and never unpickles",
            key=fqn,
        )
    try:
        node = json.loads(data[len(VALUE_MAGIC) :], object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ManifestError("value nested too deeply", key=fqn) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"value is not valid JSON: {exc}", key=fqn) from exc
    return decode_value_node(node, fqn)


def value_bytes_of_node(node: JSON) -> bytes:
    """The :func:`encode_value` framing of a node that is already a JSON tree (as stored in a manifest)."""
    return VALUE_MAGIC + json.dumps(node, allow_nan=False, separators=(",", ":")).encode()


def parse_value_bytes(data: bytes, fqn: str) -> JSON:
    """The JSON tree inside :func:`encode_value` bytes, checked to be a valid value (no tensors)."""
    if not data.startswith(VALUE_MAGIC):
        raise ValueError(f"{fqn!r}: not ckptmirror's JSON encoding")
    node = json.loads(data[len(VALUE_MAGIC) :], object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    decode_value_node(node, fqn)  # validates: a closed set of node types, no tensor references
    return node


# ------------------------------------------------------------------------ the rank index


@dataclass(frozen=True)
class Chunk:
    """One DCP write item as a rank stored it: ``(fqn, offsets)`` is DCP's ``MetadataIndex``,
    ``key`` the entry under ``state`` in the rank's tree."""

    fqn: str
    offsets: tuple[int, ...] | None  # None for a non-tensor value
    key: str


@dataclass(frozen=True)
class RankIndex:
    """The ``dcp`` part of a rank manifest's tree."""

    rank: int
    world_size: int
    step: int
    chunks: tuple[Chunk, ...]
    metadata: Any  # rank 0: the decoded metadata tree (see :func:`tree_to_metadata`); else None


def rank_index_tree(
    rank: int, world_size: int, step: int, chunks: list[Chunk], metadata: dict[str, Any] | None
) -> dict[str, Any]:
    """The plain-Python ``dcp`` tree of a rank manifest (encoded with the tree encoding by the caller)."""
    doc: dict[str, Any] = {
        "format": DCP_FORMAT,
        "rank": rank,
        "world_size": world_size,
        "step": step,
        "chunks": [[c.fqn, None if c.offsets is None else list(c.offsets), c.key] for c in chunks],
    }
    if metadata is not None:
        doc["metadata"] = metadata
    return doc


class _Check:
    """Typed access to a decoded tree, reporting the manifest key and the field on failure."""

    def __init__(self, where: str) -> None:
        self.where = where

    def err(self, path: str, msg: str) -> ManifestError:
        return ManifestError(f"DCP field {path}: {msg}", key=self.where)

    def as_dict(self, v: Any, path: str) -> dict[Any, Any]:
        if not isinstance(v, dict):
            raise self.err(path, f"expected a dict, got {type(v).__name__}")
        return v

    def as_list(self, v: Any, path: str) -> list[Any]:
        if not isinstance(v, list):
            raise self.err(path, f"expected a list, got {type(v).__name__}")
        return v

    def as_str(self, v: Any, path: str) -> str:
        if not isinstance(v, str) or len(v) > 1 << 16:
            raise self.err(path, "expected a string")
        return v

    def as_int(self, v: Any, path: str, lo: int = 0, hi: int = _MAX_DIM) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise self.err(path, f"expected an int in [{lo}, {hi}], got {v!r}")
        return v

    def as_bool(self, v: Any, path: str) -> bool:
        if type(v) is not bool:
            raise self.err(path, "expected a bool")
        return v

    def dims(self, v: Any, path: str) -> tuple[int, ...]:
        if type(v) is list and len(v) <= _MAX_DIMS and all(type(d) is int and 0 <= d <= _MAX_DIM for d in v):
            return tuple(v)  # the common case, checked in one pass; the loop below names what is wrong
        items = self.as_list(v, path)
        if len(items) > _MAX_DIMS:
            raise self.err(path, "too many dimensions")
        return tuple(self.as_int(d, f"{path}[{i}]") for i, d in enumerate(items))

    def opt_str(self, v: Any, path: str) -> str | None:
        return None if v is None else self.as_str(v, path)


def parse_rank_index(tree: Any, where: str, world_size: int, rank: int, step: int) -> RankIndex:
    """The ``dcp`` part of a decoded rank tree, validated against the commit it belongs to.

    Raises :class:`ManifestError` when the step was not written through DCP (a plain
    :class:`~ckptmirror.Mirror` step) or the index does not fit.
    """
    c = _Check(where)
    if not isinstance(tree, dict) or not isinstance(tree.get("dcp"), dict) or not isinstance(tree.get("state"), dict):
        raise ManifestError(
            "this step was not written through torch.distributed.checkpoint (no 'dcp' index): "
            "read it with ckptmirror.Mirror.restore / load_state",
            key=where,
        )
    doc = tree["dcp"]
    if doc.get("format") != DCP_FORMAT:
        raise c.err("format", f"unknown DCP format {doc.get('format')!r} (this ckptmirror reads {DCP_FORMAT!r})")
    got = (
        c.as_int(doc.get("rank"), "rank"),
        c.as_int(doc.get("world_size"), "world_size", 1),
        c.as_int(doc.get("step"), "step"),
    )
    if got != (rank, world_size, step):
        raise c.err(
            "rank", f"index says rank {got[0]} of {got[1]} at step {got[2]}, commit says {rank}/{world_size}/{step}"
        )
    chunks = []
    seen: set[str] = set()
    for i, item in enumerate(c.as_list(doc.get("chunks"), "chunks")):
        p = f"chunks[{i}]"
        row = c.as_list(item, p)
        if len(row) != 3:
            raise c.err(p, "expected [fqn, offsets, key]")
        fqn = c.as_str(row[0], p + "[0]")
        offsets = None if row[1] is None else c.dims(row[1], p + "[1]")
        key = c.as_str(row[2], p + "[2]")
        if key in seen or key not in tree["state"]:
            raise c.err(p, f"state key {key!r} is repeated or missing")
        seen.add(key)
        chunks.append(Chunk(fqn, offsets, key))
    return RankIndex(rank, world_size, step, tuple(chunks), doc.get("metadata"))


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class Location:
    """Where one DCP item is stored: the rank whose manifest holds it, and its key there.

    This is ``WriteResult.storage_data`` and ``Metadata.storage_data[index]``.
    """

    rank: int
    key: str


def _name(table: dict[str, Any], value: Any, what: str) -> str:
    for k, v in table.items():
        if v == value:
            return k
    raise UnsupportedTypeError(f"metadata {what}", type(value), f"{value!r} cannot be stored")


def metadata_to_tree(md: Metadata) -> dict[str, Any]:
    """DCP's ``Metadata`` (with ``storage_data`` holding :class:`Location` values) as a plain tree.

    The tree is stored with ckptmirror's tree encoding, so ``planner_data`` may hold whatever
    that encoding covers (DCP's own: a dict of fqn -> tuple path); anything else raises
    :class:`UnsupportedTypeError` naming where it is.
    """
    tensors = []
    values = []
    for fqn, v in md.state_dict_metadata.items():
        if isinstance(v, TensorStorageMetadata):
            p = v.properties
            tensors.append(
                {
                    "fqn": fqn,
                    "dtype": dtype_name(p.dtype),
                    "size": [int(d) for d in v.size],
                    "requires_grad": bool(p.requires_grad),
                    "layout": _name(_LAYOUTS, p.layout, "layout"),
                    "memory_format": _name(_MEMORY_FORMATS, p.memory_format, "memory_format"),
                    "pin_memory": bool(p.pin_memory),
                    "chunks": [[[int(o) for o in ch.offsets], [int(s) for s in ch.sizes]] for ch in v.chunks],
                }
            )
        elif isinstance(v, BytesStorageMetadata):
            values.append(fqn)
        else:
            raise UnsupportedTypeError(f"metadata[{fqn!r}]", type(v), "unknown DCP storage metadata")
    storage = []
    for idx, loc in (md.storage_data or {}).items():
        if not isinstance(idx, MetadataIndex) or not isinstance(loc, Location):
            raise TypeError(f"storage_data entry {idx!r} -> {loc!r} was not written by MirrorStorageWriter")
        storage.append([idx.fqn, None if idx.offset is None else [int(o) for o in idx.offset], loc.rank, loc.key])
    sm = md.storage_meta
    return {
        "version": md.version,
        "tensors": tensors,
        "values": values,
        "planner_data": md.planner_data,
        "storage": storage,
        "storage_meta": None
        if sm is None
        else {
            "checkpoint_id": None if sm.checkpoint_id is None else str(sm.checkpoint_id),
            "save_id": sm.save_id,
            "modules": list(sm.modules),
        },
    }


def tree_to_metadata(tree: Any, where: str, world_size: int) -> Metadata:
    """Rebuild DCP's ``Metadata`` from :func:`metadata_to_tree`'s tree, checking every field.

    ``storage_data`` maps each ``MetadataIndex`` to a :class:`Location`; every chunk the
    metadata names must be stored somewhere, by a rank below ``world_size``.
    """
    c = _Check(where)
    doc = c.as_dict(tree, "metadata")
    sdm: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for i, t in enumerate(c.as_list(doc.get("tensors"), "tensors")):
        p = f"tensors[{i}]"
        t = c.as_dict(t, p)
        fqn = c.as_str(t.get("fqn"), p + ".fqn")
        size = c.dims(t.get("size"), p + ".size")
        layout, fmt = t.get("layout"), t.get("memory_format")
        if layout not in _LAYOUTS or fmt not in _MEMORY_FORMATS:
            raise c.err(p, f"unknown layout {layout!r} or memory format {fmt!r}")
        props = TensorProperties(
            dtype=dtype_from_name(c.as_str(t.get("dtype"), p + ".dtype"), where),
            layout=_LAYOUTS[layout],
            requires_grad=c.as_bool(t.get("requires_grad"), p + ".requires_grad"),
            memory_format=_MEMORY_FORMATS[fmt],
            pin_memory=c.as_bool(t.get("pin_memory"), p + ".pin_memory"),
        )
        chunks = []
        for j, ch in enumerate(c.as_list(t.get("chunks"), p + ".chunks")):
            q = f"{p}.chunks[{j}]"
            pair = c.as_list(ch, q)
            if len(pair) != 2:
                raise c.err(q, "expected [offsets, sizes]")
            off, sz = c.dims(pair[0], q + "[0]"), c.dims(pair[1], q + "[1]")
            if len(off) != len(size) or len(sz) != len(size) or any(a + b > g for a, b, g in zip(off, sz, size)):
                raise c.err(q, f"chunk {list(sz)} at {list(off)} does not fit the tensor size {list(size)}")
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(sz)))
        if fqn in sdm:
            raise c.err(p, f"{fqn!r} is described twice")
        sdm[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(size), chunks=chunks)
    for i, fqn in enumerate(c.as_list(doc.get("values"), "values")):
        fqn = c.as_str(fqn, f"values[{i}]")
        if fqn in sdm:
            raise c.err(f"values[{i}]", f"{fqn!r} is described twice")
        sdm[fqn] = BytesStorageMetadata()
    storage: dict[MetadataIndex, Location] = {}
    for i, row in enumerate(c.as_list(doc.get("storage"), "storage")):
        p = f"storage[{i}]"
        row = c.as_list(row, p)
        if len(row) != 4:
            raise c.err(p, "expected [fqn, offsets, rank, key]")
        fqn = c.as_str(row[0], p + "[0]")
        offsets = None if row[1] is None else c.dims(row[1], p + "[1]")
        idx = MetadataIndex(fqn, offsets)
        if idx in storage:
            raise c.err(p, f"{fqn!r} at {offsets} is stored twice")
        storage[idx] = Location(c.as_int(row[2], p + "[2]", 0, world_size - 1), c.as_str(row[3], p + "[3]"))
    _check_covered(c, sdm, storage)
    sm_doc = doc.get("storage_meta")
    sm = None
    if sm_doc is not None:
        sm_doc = c.as_dict(sm_doc, "storage_meta")
        sm = StorageMeta(
            checkpoint_id=c.opt_str(sm_doc.get("checkpoint_id"), "storage_meta.checkpoint_id"),
            save_id=c.opt_str(sm_doc.get("save_id"), "storage_meta.save_id"),
            modules=[c.as_str(m, "storage_meta.modules[]") for m in c.as_list(sm_doc.get("modules", []), "modules")],
        )
    version = c.opt_str(doc.get("version"), "version")
    return Metadata(
        state_dict_metadata=sdm,
        planner_data=doc.get("planner_data"),
        storage_data=storage,
        storage_meta=sm,
        version=version,
    )


def _check_covered(
    c: _Check, sdm: dict[str, TensorStorageMetadata | BytesStorageMetadata], storage: dict[MetadataIndex, Location]
) -> None:
    """Every value and every tensor chunk the metadata names has a stored location, and nothing more."""
    wanted: set[MetadataIndex] = set()
    for fqn, v in sdm.items():
        if isinstance(v, TensorStorageMetadata):
            wanted.update(MetadataIndex(fqn, ch.offsets) for ch in v.chunks)
        else:
            wanted.add(MetadataIndex(fqn))
    missing = wanted - set(storage)
    extra = set(storage) - wanted
    if missing or extra:
        what = sorted(f"{i.fqn}@{list(i.offset) if i.offset is not None else '-'}" for i in (missing or extra))[:5]
        raise c.err("storage", f"{'not stored' if missing else 'stored but not described'}: {', '.join(what)}")
