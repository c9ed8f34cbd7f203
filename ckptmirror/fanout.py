"""Background fan-out of one save to every replica: encode, commit per position, retention.

:class:`~ckptmirror.mirror.Mirror` queues one :class:`SaveJob` per save; its background
thread hands each to :meth:`Fanout.write`, which hashes the objects (a small pool) and runs
one task per replica, each with its own pool of ``io_threads`` workers for object puts.

Per replica position, with several ranks, this is the commit protocol of
:mod:`ckptmirror.dist`: every rank writes its objects and manifest, reports ``ok`` (with the
manifest's key, size and checksum), ``failed`` or ``skipped``, rank 0 decides (building the
commit record with :func:`commit_from_reports`), and every rank writes the commit record it
published. A rank that cannot take part (encoding failed, replica degraded) still reports, so
that no other rank waits for its vote. A single process commits its own record directly.

After a step committed on a replica, older steps beyond ``keep_last`` are deleted there, by
one rank per place: the lowest rank with the same host and replica URL
(:meth:`Fanout.elect_retention_owners`), so that ranks sharing a directory do not prune it
together.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from .checksum import checksum
from .dist import Coordinator, DistInfo
from .errors import CkptMirrorError
from .format import CommitRecord, RankRef
from .handle import SaveHandle
from .replicas import Replica
from .staging import Arena
from .writer import apply_retention, commit_objects, encode, encode_replicated, is_committed, write_objects

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

    ``committed`` is the mirror's set of committed steps and ``lock`` guards it: a step is
    added once it commits on some replica, and removed when retention deleted it and no
    replica holds its commit record any more.
    ``mark_degraded`` is called with a replica that failed with an ``OSError``.
    """

    def __init__(
        self,
        replicas: list[Replica],
        dist: DistInfo,
        coord: Coordinator | None,
        io_threads: int,
        lock: threading.Lock,
        committed: set[int],
        mark_degraded: Callable[[Replica, BaseException], None],
    ) -> None:
        self.replicas = replicas
        self.dist = dist
        self._coord = coord
        self._lock = lock
        self._committed = committed
        self._mark_degraded = mark_degraded
        self._hash_pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="ckptmirror-hash")
        self._io_pools = {r.url: ThreadPoolExecutor(io_threads, thread_name_prefix="ckptmirror-io") for r in self.replicas}
        self._replica_pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="ckptmirror-replica")
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
                enc = encode_replicated(job.step, info.rank, info.world_size, job.plan, job.stream, object_bytes, self._hash_pool, exchange)
            else:
                enc = encode(job.step, info.rank, info.world_size, job.plan, job.stream, object_bytes, self._hash_pool)
        except BaseException as exc:
            for pos in range(len(self.replicas)):  # the other ranks are waiting for our vote
                self._vote(save_key, pos, {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}, decide)
            raise

        def one(pos: int, replica: Replica) -> None:
            if replica not in job.replicas:  # skipped (degraded): still take part in the vote
                self._vote(save_key, pos, {"state": "skipped", "error": f"replica {replica.url} is degraded on rank {info.rank}"}, decide)
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
                    ref = {"state": "ok", "key": enc.manifest_key, "size": len(enc.manifest_bytes), "checksum": checksum(enc.manifest_bytes)}
                    self._vote(save_key, pos, ref, decide)
                    commit_bytes = self._coord.outcome(save_key, pos)
                commit_objects(replica, enc, commit_bytes)
            except BaseException as exc:  # noqa: BLE001 - recorded per replica
                log.warning("replica %s failed to save step %d: %s", replica.url, job.step, exc)
                if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):
                    self._mark_degraded(replica, exc)
                job.handle._set_replica(replica.url, "failed", exc)
                return
            with self._lock:
                self._committed.add(job.step)
            job.handle._set_replica(replica.url, "committed")
            if not self._retention_owner[pos]:
                return  # a lower rank on this host prunes the same place
            try:
                removed = apply_retention(replica, job.step, keep_last)
                if removed:
                    log.info("retention on %s removed steps %s", replica.url, removed)
                    with self._lock:
                        self._committed.difference_update(s for s in removed if not self._committed_anywhere(s))
            except (CkptMirrorError, OSError) as exc:
                # The new step is committed; failing to delete old ones loses nothing.
                log.warning("retention on %s failed after step %d: %s", replica.url, job.step, exc)

        for f in [self._replica_pool.submit(one, pos, r) for pos, r in enumerate(self.replicas)]:
            f.result()

    def _vote(self, save_key: str, pos: int, report: dict[str, Any], decide: Callable[[list[dict[str, Any]]], bytes]) -> None:
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

    def _committed_anywhere(self, step: int) -> bool:
        return any(is_committed(r, step) for r in self.replicas)

    def close(self) -> None:
        """Shut the pools down, waiting for the transfers in flight."""
        self._replica_pool.shutdown(wait=True)
        for p in self._io_pools.values():
            p.shutdown(wait=True)
        self._hash_pool.shutdown(wait=True)


def commit_from_reports(step: int, world_size: int, replicated: bool, reports: list[dict[str, Any]]) -> bytes:
    """The commit record rank 0 publishes, built from every rank's ``ok`` report."""
    if replicated:  # one manifest, the same on every rank
        rep = reports[0]
        return CommitRecord(step, world_size, (RankRef(0, rep["key"], int(rep["size"]), rep["checksum"]),), replicated=True).to_json()
    refs = tuple(RankRef(r, rep["key"], int(rep["size"]), rep["checksum"]) for r, rep in enumerate(reports))
    return CommitRecord(step, world_size, refs).to_json()


def _prefixed(exchange: Any, prefix: str, key: str, value: Any) -> list[Any]:
    return exchange(f"{prefix}/{key}", value)
