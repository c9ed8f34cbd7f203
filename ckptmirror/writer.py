"""Background write path: cut the data stream into objects, hash once, fan out, commit last.

One :class:`StepWrite` is one rank's save of one step. It runs on the mirror's background
thread: objects are hashed once (xxh3, GIL released), then every replica gets its own task
that puts the objects (several at a time), then the rank manifest, then the commit record.
Replicas proceed independently, so a slow replica does not hold up a fast one's commit; each
reports its own outcome on the :class:`~ckptmirror.handle.SaveHandle`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .checksum import checksum
from .errors import CkptMirrorError, StateMismatchError, StepExistsError
from .format import (
    CommitRecord,
    ObjectRecord,
    RankManifest,
    RankRef,
    commit_key,
    new_token,
    object_key,
    parse_commit,
    parse_step_dir,
    rank_manifest_key,
    step_dir,
    writer_of,
)
from .replicas.base import Replica
from .staging import Plan, host_bytes

log = logging.getLogger("ckptmirror")


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


def _cut_and_hash(p: Plan, stream: torch.Tensor, object_bytes: int, pool: ThreadPoolExecutor) -> tuple[tuple[tuple[int, int], ...], list[str]]:
    """The stream's object windows ``(offset, size)`` and the checksum of each (in parallel)."""
    total = p.total_bytes
    windows = tuple((off, min(object_bytes, total - off)) for off in range(0, total, object_bytes))
    view = host_bytes(stream) if total else memoryview(b"")
    return windows, list(pool.map(lambda w: checksum(view[w[0] : w[0] + w[1]]), windows))


def encode(step: int, rank: int, world_size: int, p: Plan, stream: torch.Tensor, object_bytes: int, pool: ThreadPoolExecutor) -> EncodedStep:
    """Cut ``stream`` into objects of ``object_bytes`` and checksum each one (in parallel)."""
    token = new_token()
    windows, sums = _cut_and_hash(p, stream, object_bytes, pool)
    objects = tuple(ObjectRecord(object_key(step, rank, i, token), size, s) for i, ((_, size), s) in enumerate(zip(windows, sums)))
    manifest = RankManifest(step, rank, world_size, objects, p.storages, p.leaves, p.structure)
    mbytes = manifest.to_json()
    mkey = rank_manifest_key(step, rank, token)
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
    probe = RankManifest(step, 0, world_size, tuple(ObjectRecord(object_key(step, 0, i, "00000000"), w[1], c) for i, (w, c) in enumerate(zip(windows, sums))), p.storages, p.leaves, p.structure, 0.0)
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
    objects = tuple(ObjectRecord(object_key(step, i % world_size, i, tokens[i % world_size]), w[1], c) for i, (w, c) in enumerate(zip(windows, sums)))
    manifest = RankManifest(step, 0, world_size, objects, p.storages, p.leaves, p.structure, votes[0]["created"])
    mbytes = manifest.to_json()
    mkey = rank_manifest_key(step, 0, tokens[0])
    commit = CommitRecord(step, world_size, (RankRef(0, mkey, len(mbytes), checksum(mbytes)),), replicated=True)
    owned = tuple(i for i in range(len(objects)) if i % world_size == rank)
    return EncodedStep(step, windows, manifest, mkey, mbytes, commit.to_json(), owned)


def is_committed(replica: Replica, step: int) -> bool:
    """Whether ``step`` has a commit record on ``replica`` (presence only; readers verify)."""
    return replica.size(commit_key(step)) is not None


def remove_step(replica: Replica, step: int) -> None:
    """Delete a step: the commit first, so that the step stops existing before its objects go."""
    replica.delete(commit_key(step))
    replica.delete_prefix(step_dir(step))


def write_objects(replica: Replica, enc: EncodedStep, stream: torch.Tensor, pool: ThreadPoolExecutor, overwrite: bool) -> None:
    """Phase 1 on one replica: every object, then the rank manifest. Nothing is committed.

    Names carry this save's token, so nothing here can overwrite another writer's files.
    """
    step = enc.step
    if is_committed(replica, step):
        if not overwrite:
            raise StepExistsError(step, replica.url)
        log.warning("overwriting committed step %d on %s", step, replica.url)
        remove_step(replica, step)
    view = host_bytes(stream) if enc.windows else memoryview(b"")
    mine = range(len(enc.windows)) if enc.owned is None else enc.owned
    futures: list[Future[None]] = [
        pool.submit(replica.put, enc.manifest.objects[i].key, view[enc.windows[i][0] : enc.windows[i][0] + enc.windows[i][1]]) for i in mine
    ]
    wait(futures, return_when=FIRST_EXCEPTION)
    for f in futures:
        f.cancel()  # not started yet: dropped once one put has failed
    wait(futures)
    for f in futures:
        if not f.cancelled():
            f.result()  # first failure wins
    replica.put(enc.manifest_key, enc.manifest_bytes)


def commit_objects(replica: Replica, enc: EncodedStep, commit_bytes: bytes) -> None:
    """Phase 2 on one replica: write the commit record, then drop what it does not reference.

    Leftovers are recognised by their writer token: files of the step whose (rank, token) is
    not pinned by the commit belong to a torn or losing attempt. Deciding this only after the
    commit matters on shared replicas, where other ranks' files are being written meanwhile.
    """
    step = enc.step
    try:
        replica.commit(commit_key(step), commit_bytes)
    except StepExistsError:
        # Another writer committed this step first: our objects are garbage; take them back.
        mine = range(len(enc.windows)) if enc.owned is None else enc.owned
        _delete_quietly(replica, [enc.manifest.objects[i].key for i in mine] + [enc.manifest_key])
        raise
    pinned = {writer_of(ref.key) for ref in parse_commit(commit_bytes, commit_key(step)).ranks}
    pinned |= {writer_of(rec.key) for rec in enc.manifest.objects}  # replicated: objects of every rank
    # Only files that name their writer: a commit record's temp file may be another rank's
    # commit of these same bytes, in flight right now on a shared replica.
    stale = [k for k in replica.list_prefix(step_dir(step)) if (w := writer_of(k)) is not None and w not in pinned]
    if stale:
        log.info("removing %d leftover file(s) of interrupted saves of step %d on %s", len(stale), step, replica.url)
        _delete_quietly(replica, stale)


def write_step(replica: Replica, enc: EncodedStep, stream: torch.Tensor, pool: ThreadPoolExecutor, overwrite: bool) -> None:
    """Write one single-rank step to one replica and commit it there. Raises on any failure."""
    write_objects(replica, enc, stream, pool, overwrite)
    commit_objects(replica, enc, enc.commit_bytes)


def _delete_quietly(replica: Replica, keys: list[str]) -> None:
    for k in keys:
        try:
            replica.delete(k)
        except (CkptMirrorError, OSError) as exc:
            log.warning("could not delete %s on %s: %s (prune removes it later)", k, replica.url, exc)


def apply_retention(replica: Replica, newest: int, keep_last: int | None) -> list[int]:
    """After ``newest`` committed on ``replica``: drop committed steps beyond ``keep_last`` and
    torn leftovers of older steps. Never touches ``newest`` or anything newer. Returns deleted steps."""
    removed: list[int] = []
    committed: list[int] = []
    for name in replica.list_steps():
        s = parse_step_dir(name)
        if s is None or s >= newest:
            continue
        if is_committed(replica, s):
            committed.append(s)
        else:
            replica.delete_prefix(step_dir(s))  # torn save of an older step
            removed.append(s)
    if keep_last is not None:
        # `newest` itself counts as one of the kept steps.
        for s in sorted(committed)[: max(0, len(committed) - (keep_last - 1))]:
            remove_step(replica, s)
            removed.append(s)
    return sorted(removed)
