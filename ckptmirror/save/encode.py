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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ..buffers import host_bytes
from ..checksum import checksum
from ..errors import StateMismatchError
from ..format import (
    CommitRecord,
    ObjectRecord,
    RankManifest,
    RankRef,
    check_parse_cost,
    cut_objects,
    new_token,
    object_key,
    rank_manifest_key,
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


def _cut_and_hash(
    p: Plan, stream: torch.Tensor, object_bytes: int, pool: ThreadPoolExecutor
) -> tuple[tuple[tuple[int, int], ...], list[str]]:
    """The stream's object windows ``(offset, size)``, cut at storage boundaries by the format's
    rule, and the checksum of each (in parallel)."""
    windows = cut_objects(p.storages, object_bytes)
    view = host_bytes(stream) if p.total_bytes else memoryview(b"")
    return windows, list(pool.map(lambda w: checksum(view[w[0] : w[0] + w[1]]), windows))


def encode(
    step: int, rank: int, world_size: int, p: Plan, stream: torch.Tensor, object_bytes: int, pool: ThreadPoolExecutor
) -> EncodedStep:
    """Cut ``stream`` into objects of at most ``object_bytes`` and checksum each one (in parallel)."""
    token = new_token()
    windows, sums = _cut_and_hash(p, stream, object_bytes, pool)
    objects = tuple(
        ObjectRecord(object_key(step, rank, i, token), size, s) for i, ((_, size), s) in enumerate(zip(windows, sums))
    )
    manifest = RankManifest(step, rank, world_size, objects, p.storages, p.leaves, p.structure)
    mbytes = manifest.to_json()
    mkey = rank_manifest_key(step, rank, token)
    check_parse_cost(mbytes, mkey)  # fail the save rather than write a manifest no reader accepts
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
) -> EncodedStep:
    """Encode a state that is identical on every rank (DDP) so that it is stored once in total.

    Every rank hashes every object (xxh3 is ~30x faster than the disk, so this costs little) and
    the ranks compare a digest of layout and checksums: a state marked replicated that differs
    between ranks is an error, not a silently inconsistent checkpoint. Object ``i`` is then
    written by rank ``i % world_size`` under that rank's token; one manifest (rank 0's name,
    identical bytes on every rank) describes them all.
    """
    windows, sums = _cut_and_hash(p, stream, object_bytes, pool)
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
    mbytes = manifest.to_json()
    mkey = rank_manifest_key(step, 0, tokens[0])
    check_parse_cost(mbytes, mkey)
    commit = CommitRecord(step, world_size, (RankRef(0, mkey, len(mbytes), checksum(mbytes)),), replicated=True)
    owned = tuple(i for i in range(len(objects)) if i % world_size == rank)
    return EncodedStep(step, windows, manifest, mkey, mbytes, commit.to_json(), owned)
