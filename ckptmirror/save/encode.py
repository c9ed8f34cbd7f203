"""Encode: cut a snapshot's data stream into objects, hash each once, build the manifests.

The second stage of the save path (after :mod:`~ckptmirror.save.snapshot`, before
:mod:`~ckptmirror.save.fanout`). It runs on the mirror's background thread: the stream is cut
by the format's rule (:func:`~ckptmirror.format.cut_objects`: a large tensor's storage gets
objects of its own, small ones are grouped), objects are hashed once (xxh3, GIL released, in
parallel), however many replicas they go to, and the rank manifest and the single-rank commit
record are serialised here. Object names carry a
fresh writer token, so nothing a save writes can overwrite another writer's files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..buffers import host_bytes
from ..checksum import checksum
from ..errors import StateMismatchError
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
from .snapshot import Plan


@dataclass(frozen=True)
class EncodedStep:
    """A snapshot made ready for the replicas: objects cut and hashed, manifests serialised."""

    step: int
    windows: tuple[tuple[int, int], ...]  # (offset, size) of each object in the stream
    manifest: RankManifest
    manifest_key: str
    manifest_bytes: bytes
    commit_bytes: bytes
    #: indices of the objects this rank writes (None: all of them)
    owned: tuple[int, ...] | None = None


@dataclass
class PreWritten:
    """The part of a sliced save (``Mirror(staging_bytes=...)``) written before ``save()``
    returned: objects ``[0, upto)`` under ``token``, on the caller's thread, slice by slice.
    The queued job stages the stream from byte ``base`` on."""

    token: str
    upto: int = 0
    base: int = 0
    sums: list[str] = field(default_factory=list)
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)  # url -> home key -> Stored
    failed: dict[str, BaseException] = field(default_factory=dict)  # url -> why it failed
    refs: dict[str, dict[int, Any]] = field(default_factory=dict)  # url -> live references taken
    frozen: tuple[bool, ...] | None = None  # the frozen flags the slices were cut with


def _cut_and_hash(
    p: Plan,
    stream: torch.Tensor,
    object_bytes: int,
    pool: ThreadPoolExecutor,
    pre: PreWritten | None = None,
    frozen: Sequence[bool] | None = None,
) -> tuple[tuple[tuple[int, int], ...], list[str]]:
    """The stream's object windows ``(offset, size)``, cut at storage boundaries by the format's
    rule (frozen storages kept apart), and the checksum of each (in parallel; those ``pre``
    wrote already are known)."""
    windows = cut_objects(p.storages, object_bytes, pre.frozen if pre is not None else frozen)
    view = host_bytes(stream) if stream.numel() else memoryview(b"")
    base, done = (pre.base, pre.upto) if pre is not None else (0, 0)
    sums = list(pool.map(lambda w: checksum(view[w[0] - base : w[0] - base + w[1]]), windows[done:]))
    return windows, (pre.sums[:done] if pre is not None else []) + sums


def encode(
    step: int,
    rank: int,
    world_size: int,
    p: Plan,
    stream: torch.Tensor,
    object_bytes: int,
    pool: ThreadPoolExecutor,
    pre: PreWritten | None = None,
    frozen: Sequence[bool] | None = None,
) -> EncodedStep:
    """Cut ``stream`` into objects of at most ``object_bytes`` and checksum each one (in parallel)."""
    token = pre.token if pre is not None else new_token()
    windows, sums = _cut_and_hash(p, stream, object_bytes, pool, pre, frozen)
    objects = tuple(
        ObjectRecord(object_key(step, rank, i, token), size, s) for i, ((_, size), s) in enumerate(zip(windows, sums))
    )
    manifest = RankManifest(step, rank, world_size, objects, p.storages, p.leaves, p.structure)
    mkey = rank_manifest_key(step, rank, token)
    mbytes = serialise(manifest, mkey)  # fails the save rather than write a manifest no reader accepts
    ref = RankRef(rank, mkey, len(mbytes), checksum(mbytes))
    commit = CommitRecord(step, world_size, (ref,))
    return EncodedStep(step, windows, manifest, mkey, mbytes, commit.to_json())


def encode_replicated(
    step: int,
    rank: int,
    world_size: int,
    p: Plan,
    stream: torch.Tensor,
    object_bytes: int,
    pool: ThreadPoolExecutor,
    exchange: Callable[[str, Any], list[Any]],
    frozen: Sequence[bool] | None = None,
) -> EncodedStep:
    """Encode a state that is identical on every rank (DDP) so that it is stored once per replica.

    Every rank hashes every object (xxh3 is ~30x faster than the disk, so this costs little) and
    the ranks compare a digest of layout and checksums: a state marked replicated that differs
    between ranks is an error, not a silently inconsistent checkpoint. Object ``i`` is then
    written by rank ``i % world_size`` under that rank's token; one manifest (rank 0's name,
    identical bytes on every rank) describes them all.
    """
    windows, sums = _cut_and_hash(p, stream, object_bytes, pool, None, frozen)
    probe = RankManifest(
        step,
        0,
        world_size,
        tuple(ObjectRecord(object_key(step, 0, i, "00000000"), w[1], c) for i, (w, c) in enumerate(zip(windows, sums))),
        p.storages,
        p.leaves,
        p.structure,
        0.0,
    )
    digest = checksum(probe.to_json())
    token = new_token()
    votes = exchange("encode", {"digest": digest, "token": token, "created": time.time()})
    differ = [r for r, v in enumerate(votes) if v["digest"] != votes[0]["digest"]]
    if differ:
        raise StateMismatchError(
            f"the state saved as replicated differs between ranks (rank(s) {differ} differ from rank 0): "
            "pass replicated=False if each rank holds its own state"
        )
    tokens = [v["token"] for v in votes]
    objects = tuple(
        ObjectRecord(object_key(step, i % world_size, i, tokens[i % world_size]), w[1], c)
        for i, (w, c) in enumerate(zip(windows, sums))
    )
    manifest = RankManifest(step, 0, world_size, objects, p.storages, p.leaves, p.structure, votes[0]["created"])
    mkey = rank_manifest_key(step, 0, tokens[0])
    mbytes = serialise(manifest, mkey)
    commit = CommitRecord(step, world_size, (RankRef(0, mkey, len(mbytes), checksum(mbytes)),), replicated=True)
    owned = tuple(i for i in range(len(objects)) if i % world_size == rank)
    return EncodedStep(step, windows, manifest, mkey, mbytes, commit.to_json(), owned)


#: One object's parts for the codec: ``(offset in the object, nbytes, dtype name)``.
Segments = list[tuple[int, int, str]]


def _leaf_dtype(lf: LeafRecord) -> str:
    """The codec's name for a leaf's element type: torch names, NumPy arrays by their NumPy name."""
    if lf.kind == "tensor":
        return lf.dtype
    try:
        import numpy as np

        return str(np.dtype(lf.dtype).name)
    except TypeError:
        return "uint8"


def object_segments(
    storages: tuple[StorageRecord, ...], leaves: tuple[LeafRecord, ...], windows: tuple[tuple[int, int], ...]
) -> list[Segments]:
    """For each object window, the element type of each byte range in it (for the float-aware codec).

    A storage's type is that of its first leaf (views of another dtype on the same storage are
    rare and only cost compression, never correctness: the codec is lossless on any bytes).
    Adjacent storages of one type are merged, so 10,000 small tensors are a handful of segments.
    """
    kind: list[str] = ["uint8"] * len(storages)
    seen = [False] * len(storages)
    for lf in leaves:
        if not seen[lf.storage]:
            seen[lf.storage] = True
            kind[lf.storage] = _leaf_dtype(lf)
    out: list[Segments] = []
    si = 0
    for off, size in windows:
        end = off + size
        segs: Segments = []
        while si < len(storages) and storages[si].offset + storages[si].nbytes <= off:
            si += 1
        j = si
        while j < len(storages) and storages[j].offset < end:
            lo = max(off, storages[j].offset) - off
            hi = min(end, storages[j].offset + storages[j].nbytes) - off
            if hi > lo:
                if segs and segs[-1][2] == kind[j] and segs[-1][0] + segs[-1][1] == lo:
                    segs[-1] = (segs[-1][0], segs[-1][1] + hi - lo, kind[j])
                else:
                    segs.append((lo, hi - lo, kind[j]))
            j += 1
        out.append(segs)
    return out
