"""Background write path: cut the data stream into objects, hash once, fan out, commit last.

One :class:`StepWrite` is one rank's save of one step. It runs on the mirror's background
thread: objects are hashed once (xxh3, GIL released), then every replica gets its own task
that puts the objects (several at a time), then the rank manifest, then the commit record.
Replicas proceed independently, so a slow replica does not hold up a fast one's commit; each
reports its own outcome on the :class:`~ckptmirror.handle.SaveHandle`.
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from .checksum import checksum
from .errors import CkptMirrorError, StepExistsError
from .format import (
    CommitRecord,
    ObjectRecord,
    RankManifest,
    RankRef,
    commit_key,
    new_token,
    object_key,
    parse_step_dir,
    rank_manifest_key,
    step_dir,
)
from .replicas.base import Replica
from .staging import Plan

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


def encode(step: int, rank: int, world_size: int, p: Plan, stream: torch.Tensor, object_bytes: int, pool: ThreadPoolExecutor) -> EncodedStep:
    """Cut ``stream`` into objects of ``object_bytes`` and checksum each one (in parallel)."""
    total = p.total_bytes
    token = new_token()
    windows = tuple((off, min(object_bytes, total - off)) for off in range(0, total, object_bytes))
    view = memoryview(stream.numpy()) if total else memoryview(b"")
    sums = list(pool.map(lambda w: checksum(view[w[0] : w[0] + w[1]]), windows))
    objects = tuple(ObjectRecord(object_key(step, rank, i, token), size, s) for i, ((_, size), s) in enumerate(zip(windows, sums)))
    manifest = RankManifest(step, rank, world_size, objects, p.storages, p.leaves, p.structure)
    mbytes = manifest.to_json()
    mkey = rank_manifest_key(step, rank, token)
    ref = RankRef(rank, mkey, len(mbytes), checksum(mbytes))
    commit = CommitRecord(step, world_size, (ref,))
    return EncodedStep(step, windows, manifest, mkey, mbytes, commit.to_json())


def is_committed(replica: Replica, step: int) -> bool:
    """Whether ``step`` has a commit record on ``replica`` (presence only; readers verify)."""
    return replica.size(commit_key(step)) is not None


def remove_step(replica: Replica, step: int) -> None:
    """Delete a step: the commit first, so that the step stops existing before its objects go."""
    replica.delete(commit_key(step))
    replica.delete_prefix(step_dir(step))


def write_step(replica: Replica, enc: EncodedStep, stream: torch.Tensor, pool: ThreadPoolExecutor, overwrite: bool) -> None:
    """Write one encoded step to one replica and commit it there. Raises on any failure.

    Names carry this save's token, so nothing here can overwrite another writer's files.
    Leftovers of an earlier, torn attempt at this step are removed only after our commit
    (before it, they might belong to a writer that is still running and may yet win).
    """
    step = enc.step
    if is_committed(replica, step):
        if not overwrite:
            raise StepExistsError(step, replica.url)
        log.warning("overwriting committed step %d on %s", step, replica.url)
        remove_step(replica, step)
    leftovers = replica.list_prefix(step_dir(step))
    mine = [rec.key for rec in enc.manifest.objects] + [enc.manifest_key]
    view = memoryview(stream.numpy()) if enc.windows else memoryview(b"")
    try:
        futures: list[Future[None]] = [
            pool.submit(replica.put, rec.key, view[off : off + size]) for rec, (off, size) in zip(enc.manifest.objects, enc.windows)
        ]
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            f.cancel()  # not started yet: dropped once one put has failed
        wait(futures)
        for f in futures:
            if not f.cancelled():
                f.result()  # first failure wins
        replica.put(enc.manifest_key, enc.manifest_bytes)
        replica.commit(commit_key(step), enc.commit_bytes)
    except StepExistsError:
        # Another writer committed this step first: our objects are garbage; take them back.
        _delete_quietly(replica, mine)
        raise
    if leftovers:
        log.info("removing %d leftover file(s) of an interrupted save of step %d on %s", len(leftovers), step, replica.url)
        _delete_quietly(replica, [k for k in leftovers if k != commit_key(step)])


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
