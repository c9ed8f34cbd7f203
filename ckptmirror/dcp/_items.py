"""A rank's DCP write items, resolved and encoded: the objects and manifest of a DCP step.

Part of :class:`~ckptmirror.dcp.writer.MirrorStorageWriter`'s ``write_data`` and ``finish``
(see :mod:`ckptmirror.dcp.writer` for the call order and the commit protocol): each write item
resolved by the planner and checked (:func:`resolve_items`, :func:`refuse_pickles`), the placed
bytes cut into objects by the format's rule and hashed, and the rank manifest built
(:func:`encode_items`; rank 0's gets DCP's metadata in :func:`with_metadata`).
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType

from ..buffers import host_bytes
from ..checksum import checksum
from ..dist import Coordinator
from ..errors import CkptMirrorError, UnsupportedTypeError
from ..format import (
    CommitRecord,
    LeafRecord,
    ObjectRecord,
    RankManifest,
    RankRef,
    StorageRecord,
    cut_objects,
    new_token,
    object_key,
    rank_manifest_key,
    serialise,
)
from ..restore.check import contiguous_strides
from ..save.encode import EncodedStep
from ..state.tree import JSON, dtype_name, flatten
from ._codec import Chunk, looks_pickled, parse_value_bytes, rank_index_tree
from ._staging import check_tensor
from .planners import MirrorSavePlanner


def is_plain(e: Entry) -> bool:
    """A tensor that is not a shard of a sharded one: replicated, and read by every rank."""
    return e.item.type != WriteItemType.SHARD


def window_bytes(starts: list[int], spans: list[memoryview], off: int, size: int) -> memoryview:
    """The bytes of stream window ``[off, off + size)``; run ``i`` holds ``spans[i]`` from ``starts[i]``.

    A window inside one run is a view of its buffer (no copy: every large tensor's objects are).
    Only a group of small storages that straddles runs (buffers of their own, or a staged arena
    with other ranks' deduplicated items between) is joined into a copy, at most one object's
    worth per run boundary.
    """
    i = bisect.bisect_right(starts, off) - 1
    start, mv = starts[i], spans[i]
    if off + size <= start + len(mv):
        return mv[off - start : off - start + size]
    parts = []
    end = off + size
    while off < end:
        start, mv = starts[i], spans[i]
        take = min(end, start + len(mv)) - off
        parts.append(mv[off - start : off - start + take])
        off += take
        i += 1
    return memoryview(b"".join(parts))


@dataclass(frozen=True)
class LocalInfo:
    """``SavePlan.storage_data`` from :meth:`MirrorStorageWriter.prepare_local_plan`."""

    step: int
    world_size: int
    places: tuple[str, ...]  # "host|url" per replica position, to elect who prunes where
    #: per position, which store the replica is (:func:`~ckptmirror.save.fanout.replica_identity`):
    #: the ranks with the same one write to one replica (a node-local one holds their share only)
    identities: tuple[str, ...] = ()


@dataclass(frozen=True)
class GlobalInfo:
    """``SavePlan.storage_data`` from :meth:`MirrorStorageWriter.prepare_global_plan`."""

    save_id: str
    step: int
    rank: int
    world_size: int
    prune: tuple[bool, ...]  # per position: this rank applies keep_last there
    #: per position, the ranks that write to the same replica as this one (its share record)
    groups: tuple[tuple[int, ...], ...] = ()


@dataclass
class Entry:
    """One write item of this rank: a tensor chunk (bytes somewhere in a buffer) or a value."""

    item: WriteItem
    key: str
    tensor: torch.Tensor | None = None
    node: JSON = None
    buf: torch.Tensor | None = None  # the uint8 buffer that holds the tensor's bytes
    start: int = 0
    nbytes: int = 0
    stream_offset: int = 0


@dataclass
class DcpSave:
    """One save, as this rank runs it (DCP calls every method of a save on one thread)."""

    step: int
    rank: int
    coordinator: bool
    run: Any
    skipped: dict[str, str]
    #: the skipped replicas whose write of an earlier save was dropped and still runs (dcp/_lag.py)
    lagging: set[str] = field(default_factory=set)
    bytes_fqns: list[str] = field(default_factory=list)
    info: GlobalInfo | None = None
    votes: Coordinator | None = None
    enc: EncodedStep | None = None
    chunks: list[Chunk] = field(default_factory=list)
    state_items: list[list[Any]] = field(default_factory=list)
    failed: dict[int, BaseException] = field(default_factory=dict)  # positions failed in write_data
    given_back: set[int] = field(default_factory=set)  # positions whose files this rank deletes (full)
    t0: float = field(default_factory=time.perf_counter)


def refuse_pickles(s: DcpSave, plan: SavePlan, planner: SavePlanner) -> None:
    """Before anything is resolved or written: DCP's default planner would pickle the values."""
    if isinstance(planner, MirrorSavePlanner) or not s.bytes_fqns:
        return
    fqn = s.bytes_fqns[0]
    lookup = getattr(planner, "lookup_object", None)
    value_type: type = object
    if lookup is not None:
        try:
            value_type = type(lookup(next(i.index for i in plan.items if i.index.fqn == fqn)))
        except (StopIteration, ValueError, KeyError):
            pass  # deduplicated to another rank: the name is what matters
    raise UnsupportedTypeError(
        f"state_dict[{fqn!r}]",
        value_type,
        f"{type(planner).__name__} stores non-tensor values as torch.save (pickle) bytes, and ckptmirror "
        "stores no pickles: pass planner=MirrorSavePlanner() to dcp.save / dcp.async_save",
    )


def resolve_items(s: DcpSave, plan: SavePlan, planner: SavePlanner) -> list[Entry]:
    """Every item of the plan, resolved by the planner and checked."""
    entries: list[Entry] = []
    used: dict[str, int] = {}
    for item in plan.items:
        fqn = item.index.fqn
        n = used.get(fqn, 0)
        used[fqn] = n + 1
        key = fqn if n == 0 else f"{fqn}#{n}"  # several chunks of one tensor on this rank
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            raw = data.getvalue() if isinstance(data, io.BytesIO) else None
            try:
                if raw is None:
                    raise ValueError("not a BytesIO")
                node = parse_value_bytes(raw, fqn)
            except (ValueError, CkptMirrorError) as exc:
                what = "torch.save (pickle) bytes" if raw is not None and looks_pickled(raw) else "not ckptmirror JSON"
                raise UnsupportedTypeError(
                    f"state_dict[{fqn!r}]",
                    type(data),
                    f"the planner resolved it to {what}; ckptmirror stores no pickles: pass "
                    "planner=MirrorSavePlanner() to dcp.save / dcp.async_save",
                ) from exc
            entries.append(Entry(item, key, node=node))
            continue
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"{fqn}: the planner resolved a tensor item to {type(data).__name__}")
        t = data.detach()
        check_tensor(t, f"state_dict[{fqn!r}]")
        td = item.tensor_data
        if td is not None and tuple(t.shape) != tuple(td.chunk.sizes):
            raise ValueError(f"{fqn}: resolved shape {tuple(t.shape)} is not the chunk's {tuple(td.chunk.sizes)}")
        if td is not None and t.dtype != td.properties.dtype:
            raise ValueError(f"{fqn}: resolved dtype {t.dtype} is not the planned {td.properties.dtype}")
        entries.append(Entry(item, key, tensor=t, nbytes=t.numel() * t.element_size()))
    return entries


def encode_items(s: DcpSave, entries: list[Entry], object_bytes: int) -> list[memoryview]:
    """Cut the placed bytes into objects, hash them, build this rank's manifest (rank 0: without metadata)."""
    assert s.info is not None
    # Runs: tensors whose bytes lie back to back in one buffer. The data stream is the runs
    # one after the other (storages tile it, as the format requires); bytes between runs
    # (other ranks' deduplicated items in a staging arena) are not written. Plain tensors
    # come first: DCP stores each replicated one on one rank only, so every other rank
    # reads it from there, and each object it lies in is read whole (to verify it). Kept
    # together, they share as few objects as the cut allows: objects of their own when a
    # large storage follows them.
    placed = sorted(
        (e for e in entries if e.buf is not None and e.nbytes),
        key=lambda e: (not is_plain(e), _buf_order(e.buf), e.start),
    )
    runs: list[list[Entry]] = []
    for e in placed:
        if runs and runs[-1][-1].buf is e.buf and runs[-1][-1].start + runs[-1][-1].nbytes == e.start:
            runs[-1].append(e)
        else:
            runs.append([e])
    pos = 0
    starts: list[int] = []  # stream offset of each run
    spans: list[memoryview] = []  # its bytes
    for run in runs:
        assert run[0].buf is not None
        base = run[0].start
        for e in run:
            e.stream_offset = pos + e.start - base
        size = run[-1].start + run[-1].nbytes - base
        starts.append(pos)
        spans.append(host_bytes(run[0].buf)[base : base + size])
        pos += size
    # The format's cut over the whole stream, as the main save path cuts it (encode.py).
    windows = cut_objects([StorageRecord(e.stream_offset, e.nbytes) for e in placed], object_bytes)
    views = [window_bytes(starts, spans, off, size) for off, size in windows]
    with ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="ckptmirror-hash") as pool:
        sums = list(pool.map(checksum, views))
    token = new_token()
    info = s.info
    objects = tuple(
        ObjectRecord(object_key(info.step, info.rank, i, token), w[1], c) for i, (w, c) in enumerate(zip(windows, sums))
    )
    # Storages in stream order (zero-byte ones at the end); leaves in the plan's order.
    in_stream = placed + [e for e in entries if e.tensor is not None and not (e.buf is not None and e.nbytes)]
    storage_of = {id(e): i for i, e in enumerate(in_stream)}
    storages = tuple(StorageRecord(e.stream_offset if e.nbytes else pos, e.nbytes) for e in in_stream)
    leaves: list[LeafRecord] = []
    for e in entries:
        if e.tensor is None:
            s.state_items.append([e.key, e.node])
            s.chunks.append(Chunk(e.item.index.fqn, None, e.key))
            continue
        shape = tuple(e.tensor.shape)
        leaves.append(
            LeafRecord("tensor", storage_of[id(e)], dtype_name(e.tensor.dtype), shape, contiguous_strides(shape), 0)
        )
        node: dict[str, Any] = {"t": "tensor", "i": len(leaves) - 1}
        td = e.item.tensor_data
        if e.item.type == WriteItemType.SHARD and td is not None:
            # A shard of a sharded tensor (DTensor): where it sits in the global tensor, in
            # ckptmirror's own terms, so that Mirror.load_state and export can gather it.
            node = {"t": "dtensor", "i": node["i"], "gshape": list(td.size), "goffset": list(td.chunk.offsets)}
        s.state_items.append([e.key, node])
        offsets = tuple(int(o) for o in e.item.index.offset) if e.item.index.offset is not None else None
        s.chunks.append(Chunk(e.item.index.fqn, offsets, e.key))
    manifest = RankManifest(info.step, info.rank, info.world_size, objects, storages, tuple(leaves), structure(s, None))
    mkey = rank_manifest_key(info.step, info.rank, token)
    mbytes = serialise(manifest, mkey)  # fails the save rather than write a manifest no reader accepts
    commit = CommitRecord(info.step, info.world_size, (RankRef(info.rank, mkey, len(mbytes), checksum(mbytes)),))
    s.enc = EncodedStep(info.step, tuple(windows), manifest, mkey, mbytes, commit.to_json())
    return views


def _buf_order(buf: torch.Tensor | None) -> int:
    """Buffers in a fixed order (by address), so that runs of one buffer stay together."""
    return 0 if buf is None else buf.data_ptr()


def structure(s: DcpSave, metadata: dict[str, Any] | None) -> JSON:
    """The rank's tree: ``{"dcp": index (+ DCP's metadata on rank 0), "state": {key: node}}``."""
    assert s.info is not None
    index = rank_index_tree(s.info.rank, s.info.world_size, s.info.step, s.chunks, metadata)
    return {
        "t": "dict",
        "items": [["dcp", flatten(index, root="dcp").structure], ["state", {"t": "dict", "items": s.state_items}]],
    }


def with_metadata(s: DcpSave, metadata: dict[str, Any]) -> EncodedStep:
    """Rank 0's manifest, now with DCP's metadata (and the single-rank commit that pins it)."""
    assert s.enc is not None and s.info is not None
    manifest = dataclasses.replace(s.enc.manifest, structure=structure(s, metadata))
    mbytes = serialise(manifest, s.enc.manifest_key)  # the metadata makes it larger: checked again
    ref = RankRef(0, s.enc.manifest_key, len(mbytes), checksum(mbytes))
    commit = CommitRecord(s.info.step, s.info.world_size, (ref,))
    return dataclasses.replace(s.enc, manifest=manifest, manifest_bytes=mbytes, commit_bytes=commit.to_json())
