"""Fan-out: write one save to every replica at once, and commit it on each.

The third stage of the save path. :class:`~ckptmirror.mirror.Mirror` queues one
:class:`SaveJob` per save; its background thread hands each to :meth:`Fanout.write`, which
encodes it (:mod:`~ckptmirror.save.encode`, once for all replicas) and runs one task per
replica, each with its own pool of ``io_threads`` workers for object puts. On each replica a
save has two phases: :func:`write_objects` (every object, then the rank manifest; nothing is
visible yet) and :func:`commit_step` (the commit record, written last, makes the step exist).
Replicas proceed independently, so a slow replica does not hold up a fast one's commit; each
reports its own outcome on the :class:`~ckptmirror.handle.SaveHandle`.

Per replica position, with several ranks, this is the commit protocol of
:mod:`ckptmirror.dist`: every rank writes its objects and manifest, reports ``ok`` (with the
manifest's key, size and checksum), ``failed`` or ``skipped``, rank 0 decides (building the
commit record with :func:`commit_from_reports`), and every rank writes the commit record it
published. A rank that cannot take part (encoding failed, replica degraded) still reports, so
that no other rank waits for its vote. A single process commits its own record directly.

After a step committed on a replica, :mod:`~ckptmirror.save.retention` deletes older steps
beyond ``keep_last`` there, by one rank per place: the lowest rank with the same host and replica URL
(:meth:`Fanout.elect_retention_owners`), so that ranks sharing a directory do not prune it
together.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..buffers import host_bytes
from ..checksum import checksum
from ..dist import Coordinator, DistInfo
from ..errors import CkptMirrorError, ReplicaUnavailableError, StepExistsError
from ..format import CommitRecord, RankRef, commit_key, parse_commit, step_dir, writer_of
from ..handle import SaveHandle
from ..health import ReplicaHealth
from ..replicas.base import Replica
from .encode import EncodedStep, encode, encode_replicated
from .retention import apply_retention, delete_quietly, is_committed, remove_step
from .snapshot import Arena

log = logging.getLogger("ckptmirror")


@dataclass
class SaveJob:
    """One save, snapshotted and queued for the background writer."""

    step: int
    handle: SaveHandle
    arena: Arena
    stream: torch.Tensor
    plan: Any
    overwrite: bool
    replicas: list[Replica]  # the replicas written to (the others are skipped: degraded)
    seq: int
    replicated: bool = False


class Fanout:
    """Writes saves to every replica of one mirror, and owns the thread pools that do it.

    It also owns the set of committed steps (:meth:`committed`): seeded with what the replicas
    held at start, a step is added once it commits on some replica, and removed when retention
    deleted it and no replica holds its commit record any more. A replica that fails with an
    ``OSError`` is marked degraded in ``health``.
    """

    def __init__(
        self,
        replicas: list[Replica],
        dist: DistInfo,
        coord: Coordinator | None,
        io_threads: int,
        health: ReplicaHealth,
        committed: set[int],
    ) -> None:
        self.replicas = replicas
        self.dist = dist
        self._coord = coord
        self._health = health
        self._lock = threading.Lock()
        self._committed = set(committed)
        self._pinned: set[int] = set()  # kept out of retention (Mirror.pin)
        self._hash_pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="ckptmirror-hash")
        self._io_pools = {
            r.url: ThreadPoolExecutor(io_threads, thread_name_prefix="ckptmirror-io") for r in self.replicas
        }
        self._replica_pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="ckptmirror-replica")
        # One thread: retention passes run in save order, never two on one replica at once.
        self._retention_pool = ThreadPoolExecutor(1, thread_name_prefix="ckptmirror-retention")
        self._retention: list[Future[None]] = []
        self._retention_owner = [True] * len(self.replicas)
        if coord is not None:
            self._retention_owner = self.elect_retention_owners()

    def write(self, job: SaveJob, object_bytes: int, keep_last: int | None) -> None:
        """Write ``job`` to every replica in parallel; each outcome is recorded on ``job.handle``.

        A replica that fails is marked failed on the handle and does not stop the others.
        Raises if the state cannot be encoded (then nothing is written anywhere).
        """
        info = self.dist
        save_key = f"{job.seq}-{job.step}"
        decide = partial(commit_from_reports, job.step, info.world_size, job.replicated)
        try:
            if job.replicated:
                assert self._coord is not None
                exchange = partial(_prefixed, self._coord.exchange, save_key)
                enc = encode_replicated(
                    job.step, info.rank, info.world_size, job.plan, job.stream, object_bytes, self._hash_pool, exchange
                )
            else:
                enc = encode(job.step, info.rank, info.world_size, job.plan, job.stream, object_bytes, self._hash_pool)
        except BaseException as exc:
            for pos in range(len(self.replicas)):  # the other ranks are waiting for our vote
                self._vote(save_key, pos, {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}, decide)
            raise

        def one(pos: int, replica: Replica) -> None:
            if replica not in job.replicas:  # skipped (degraded): still take part in the vote
                self._vote(
                    save_key,
                    pos,
                    {"state": "skipped", "error": f"replica {replica.url} is degraded on rank {info.rank}"},
                    decide,
                )
                return
            try:
                try:
                    write_objects(replica, enc, job.stream, self._io_pools[replica.url], job.overwrite)
                except BaseException as exc:
                    self._vote(save_key, pos, {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}, decide)
                    raise
                if self._coord is None:
                    commit_bytes = enc.commit_bytes
                else:
                    ref = {
                        "state": "ok",
                        "key": enc.manifest_key,
                        "size": len(enc.manifest_bytes),
                        "checksum": checksum(enc.manifest_bytes),
                    }
                    self._vote(save_key, pos, ref, decide)
                    commit_bytes = self._coord.outcome(save_key, pos)
                commit_step(replica, enc, commit_bytes)
            except BaseException as exc:  # noqa: BLE001 - recorded per replica
                log.warning("replica %s failed to save step %d: %s", replica.url, job.step, exc)
                if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):
                    self._health.mark(replica, exc)
                job.handle._set_replica(replica.url, "failed", exc)
                return
            with self._lock:
                self._committed.add(job.step)
            job.handle._set_replica(replica.url, "committed")
            if self._retention_owner[pos]:
                # Off the write path: the staging buffer is released (and the next save can
                # start) while old steps are deleted, so a slow replica's deletes hold no one.
                self._retention.append(self._retention_pool.submit(self._retain, replica, job.step, keep_last))

        for f in [self._replica_pool.submit(one, pos, r) for pos, r in enumerate(self.replicas)]:
            f.result()

    def _retain(self, replica: Replica, newest: int, keep_last: int | None) -> None:
        """Apply retention on ``replica`` after ``newest`` committed there (background thread)."""
        if replica.url in self._health.degraded():
            return  # it costs nothing while down; the next save's pass catches up once it is back
        try:
            with self._lock:
                pinned = frozenset(self._pinned)
            removed = apply_retention(replica, newest, keep_last, pinned)
        except (CkptMirrorError, OSError) as exc:
            # The new step is committed; failing to delete old ones loses nothing.
            log.warning("retention on %s failed after step %d: %s", replica.url, newest, exc)
            if isinstance(exc, OSError):
                self._health.mark(replica, exc)
            return
        if removed:
            log.info("retention on %s removed steps %s", replica.url, removed)
            gone = [s for s in removed if not self._committed_anywhere(s)]  # I/O: outside the lock
            with self._lock:
                self._committed.difference_update(gone)

    def drain_retention(self, timeout: float | None = None) -> bool:
        """Wait for the retention passes queued so far; False if ``timeout`` passed first."""
        pending = list(self._retention)
        done, not_done = wait(pending, timeout=timeout)
        self._retention = [f for f in self._retention if not f.done()]
        return not not_done

    def _vote(
        self, save_key: str, pos: int, report: dict[str, Any], decide: Callable[[list[dict[str, Any]]], bytes]
    ) -> None:
        """Report this rank's outcome at ``pos``; rank 0 then decides for everyone."""
        if self._coord is None:
            return
        self._coord.report(save_key, pos, report)
        if self.dist.rank == 0:
            self._coord.decide(save_key, pos, decide)

    def elect_retention_owners(self) -> list[bool]:
        """Per position: whether this rank prunes it (the lowest rank with the same host and URL)."""
        assert self._coord is not None
        mine = [f"{self._coord.host}|{r.url}" for r in self.replicas]
        everyone = self._coord.exchange("placement", mine)
        return [all(everyone[r][pos] != mine[pos] for r in range(self.dist.rank)) for pos in range(len(mine))]

    def pin(self, step: int, pinned: bool) -> None:
        """Keep ``step`` out of retention (``pinned=True``) or give it back to it."""
        with self._lock:
            if pinned:
                self._pinned.add(step)
            else:
                self._pinned.discard(step)

    def committed_steps(self) -> set[int]:
        """A copy of the steps committed on some replica, as far as this mirror knows."""
        with self._lock:
            return set(self._committed)

    def delete(self, step: int) -> dict[str, BaseException]:
        """Remove ``step`` from every replica this rank looks after; returns the failures by URL.

        Degraded replicas are not asked (they would stall the caller); the step stays there
        until ``ckptmirror prune`` or the next retention pass removes it.
        """
        self.drain_retention()
        failures: dict[str, BaseException] = {}
        down = self._health.degraded()
        for pos, r in enumerate(self.replicas):
            if not self._retention_owner[pos]:
                continue
            if r.url in down:
                why = f"degraded ({down[r.url]}); step {step} is left there"
                failures[r.url] = ReplicaUnavailableError(why, replica=r.url)
                continue
            try:
                remove_step(r, step)
            except (CkptMirrorError, OSError) as exc:
                failures[r.url] = exc
        with self._lock:
            self._pinned.discard(step)
            if not failures:
                self._committed.discard(step)
        return failures

    def has_committed(self, step: int) -> bool:
        """Whether ``step`` is committed on some replica, as far as this mirror knows."""
        with self._lock:
            return step in self._committed

    def _committed_anywhere(self, step: int) -> bool:
        # A degraded replica is not asked (it would stall us) and may still hold the step.
        down = self._health.degraded()
        return any(r.url in down or is_committed(r, step) for r in self.replicas)

    def close(self) -> None:
        """Shut the pools down, waiting for the transfers and retention passes in flight."""
        self._replica_pool.shutdown(wait=True)
        self._retention_pool.shutdown(wait=True)
        for p in self._io_pools.values():
            p.shutdown(wait=True)
        self._hash_pool.shutdown(wait=True)


def write_objects(
    replica: Replica, enc: EncodedStep, stream: torch.Tensor, pool: ThreadPoolExecutor, overwrite: bool
) -> None:
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
        pool.submit(
            replica.put, enc.manifest.objects[i].key, view[enc.windows[i][0] : enc.windows[i][0] + enc.windows[i][1]]
        )
        for i in mine
    ]
    wait(futures, return_when=FIRST_EXCEPTION)
    for f in futures:
        f.cancel()  # not started yet: dropped once one put has failed
    wait(futures)
    for f in futures:
        if not f.cancelled():
            f.result()  # first failure wins
    replica.put(enc.manifest_key, enc.manifest_bytes)


def commit_step(replica: Replica, enc: EncodedStep, commit_bytes: bytes) -> None:
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
        delete_quietly(replica, [enc.manifest.objects[i].key for i in mine] + [enc.manifest_key])
        raise
    pinned = {writer_of(ref.key) for ref in parse_commit(commit_bytes, commit_key(step)).ranks}
    pinned |= {writer_of(rec.key) for rec in enc.manifest.objects}  # replicated: objects of every rank
    # Only files that name their writer: a commit record's temp file may be another rank's
    # commit of these same bytes, in flight right now on a shared replica.
    stale = [k for k in replica.list_prefix(step_dir(step)) if (w := writer_of(k)) is not None and w not in pinned]
    if stale:
        log.info("removing %d leftover file(s) of interrupted saves of step %d on %s", len(stale), step, replica.url)
        delete_quietly(replica, stale)


def commit_from_reports(step: int, world_size: int, replicated: bool, reports: list[dict[str, Any]]) -> bytes:
    """The commit record rank 0 publishes, built from every rank's ``ok`` report."""
    if replicated:  # one manifest, the same on every rank
        rep = reports[0]
        return CommitRecord(
            step, world_size, (RankRef(0, rep["key"], int(rep["size"]), rep["checksum"]),), replicated=True
        ).to_json()
    refs = tuple(RankRef(r, rep["key"], int(rep["size"]), rep["checksum"]) for r, rep in enumerate(reports))
    return CommitRecord(step, world_size, refs).to_json()


def _prefixed(exchange: Any, prefix: str, key: str, value: Any) -> list[Any]:
    return exchange(f"{prefix}/{key}", value)
