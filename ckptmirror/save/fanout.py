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

How each replica stores the objects is its own policy (format version 3, see
:mod:`ckptmirror.placement`): ``compression="zstd"`` replicas get each object encoded by
:mod:`ckptmirror.codec` (once per save for all the replicas that want it, on the I/O threads,
never on the training thread: :class:`ObjectEncoder`), and ``incremental`` replicas get a
reference to an identical object the previous committed save already stored there instead of
a new copy (the fanout remembers, per replica, what its last committed save stored: the
*index*). Objects stored otherwise than raw under their own name are listed in the replica's
placement record, written after the objects and before the rank manifest.

After a step committed on a replica, :mod:`~ckptmirror.save.retention` deletes older steps
beyond ``keep_last`` there, by one rank per place: the lowest rank with the same host and replica URL
(:meth:`Fanout.elect_retention_owners`), so that ranks sharing a directory do not prune it
together.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .. import config
from ..buffers import host_bytes
from ..checksum import checksum
from ..dist import Coordinator, DistInfo
from ..errors import CkptMirrorError, ManifestError, ReplicaUnavailableError, StepExistsError
from ..format import (
    CommitRecord,
    RankRef,
    ShareRecord,
    commit_key,
    object_key,
    parse_commit,
    parse_step_dir,
    placement_key,
    share_key,
    step_dir,
    stored_object_key,
    writer_of,
)
from ..handle import SaveHandle
from ..health import ReplicaHealth
from ..placement import MAX_PLACEMENT_BYTES, Placement, Stored, is_placement_key, parse_placement
from ..replicas._peer_protocol import LOOPBACK_HOSTS
from ..replicas.base import SPACE_ERRNOS, Buffer, Replica
from ..replicas.local import LocalReplica
from .arena import Arena
from .encode import EncodedStep, PreWritten, Segments, encode, encode_replicated, object_segments
from .priority import lower_priority
from .retention import (
    RetentionStopped,
    apply_retention,
    delete_quietly,
    is_committed,
    protected_keys,
    remove_step,
)
from .snapshot import frozen_flags

#: Per replica: the content ``(checksum, size)`` of each object its last committed save stored
#: there -> how it is stored. What an incremental save may reference instead of writing.
Index = dict[tuple[str, int], Stored]

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
    #: a sliced save: what was written before save() returned (the stream holds the rest)
    pre: PreWritten | None = None
    #: the saved model, for its frozen parameters (see ``snapshot.frozen_flags``); a weak
    #: reference's call (None once the model is gone)
    model: Callable[[], Any] | None = None
    #: work left from the snapshot, done before anything reads ``stream`` (see ``snapshot.stage``)
    finish: Callable[[], None] | None = None


class ObjectEncoder:
    """Encodes a save's objects with a codec at most once, however many replicas store them so.

    ``users[(codec, i)]`` is how many replicas will ask for object ``i`` encoded with ``codec``;
    the encoded bytes are dropped once the last one has released them, so a save holds only
    the encoded objects some replica has not written yet. The first replica to ask encodes
    (on its I/O thread); the others wait for that result. An object that does not shrink is
    stored raw (``get`` returns None): decoding it would cost time and save nothing.
    """

    def __init__(
        self,
        view: memoryview,
        windows: Sequence[tuple[int, int]],
        segments: Sequence[Segments],
        users: Mapping[tuple[str, int], int],
        levels: Mapping[str, int],
        hints: Any,
        base: int = 0,
    ) -> None:
        self._base = base  # stream offset of view[0] (a sliced save stages part of the stream)
        self._view = view
        self._windows = windows
        self._segments = segments
        self._levels = levels
        self._hints = hints
        self._lock = threading.Lock()
        self._users = dict(users)
        self._locks: dict[tuple[str, int], threading.Lock] = {k: threading.Lock() for k in users}
        self._done: dict[tuple[str, int], tuple[bytes, str] | None] = {}
        self.encoded_bytes = 0  # what the encodes produced (stored bytes of encoded objects)
        self.raw_bytes = 0  # what they consumed

    def _encode(self, name: str, i: int) -> tuple[bytes, str] | None:
        from .. import codec  # here: zstandard is imported only by saves that compress

        off, size = self._windows[i]
        data = self._view[off - self._base : off - self._base + size]
        blob = codec.encode(data, self._segments[i], level=self._levels[name], hints=self._hints, slot=i)
        with self._lock:
            self.raw_bytes += size
            self.encoded_bytes += min(len(blob), size)
        if len(blob) >= size:
            return None
        return blob, checksum(blob)

    def get(self, name: str, i: int) -> tuple[bytes, str] | None:
        """Object ``i`` encoded with ``name`` and the checksum of the encoded bytes; None: store it raw."""
        key = (name, i)
        lock = self._locks.get(key)
        if lock is None:  # not planned (a reference that turned out to be gone): encode for this one use
            return self._encode(name, i)
        with lock:
            if key not in self._done:
                self._done[key] = self._encode(name, i)
            return self._done[key]

    def release(self, name: str, i: int) -> None:
        """One replica is done with object ``i`` as ``name``: drop it after the last one."""
        key = (name, i)
        with self._lock:
            left = self._users.get(key)
            if left is None:
                return
            if left <= 1:
                del self._users[key]
                self._done.pop(key, None)
            else:
                self._users[key] = left - 1


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
        self._index: dict[str, Index] = {}  # per replica URL: see Index
        self._index_step: dict[str, int] = {}  # the step each index was taken from
        self._live: dict[str, Counter[str]] = {r.url: Counter() for r in replicas}  # referenced by saves in flight
        self._hints: Any = None  # the codec's memory of incompressible planes, made on first use
        # Every worker of these pools runs at a lower CPU priority (save.priority): they are the
        # library's own threads, and the training loop should win the CPU over them.
        self.nice = config.background_nice()
        self._hash_pool = self._pool(max(2, os.cpu_count() or 2), "ckptmirror-hash")
        self._io_pools = {r.url: self._pool(io_threads, "ckptmirror-io") for r in self.replicas}
        self._replica_pool = self._pool(len(self.replicas), "ckptmirror-replica")
        # One thread: retention passes run in save order, never two on one replica at once.
        self._retention_pool = self._pool(1, "ckptmirror-retention")
        self._retention: list[Future[None]] = []
        self._retention_owner = [True] * len(self.replicas)
        # Per position: the ranks that write to the same replica there (this one's group): a
        # replicated (DDP) state's objects are spread over it, and its share record names it.
        self._groups: list[tuple[int, ...]] = [(dist.rank,)] * len(self.replicas)
        if coord is not None:
            self._retention_owner, self._groups = self.elect_retention_owners()

    def _pool(self, workers: int, name: str) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=lower_priority, initargs=(self.nice,))

    @property
    def incremental(self) -> bool:
        """Whether some replica takes incremental saves (then the cut keeps frozen tensors apart)."""
        return any(r.incremental for r in self.replicas)

    def write(self, job: SaveJob, object_bytes: int, keep_last: int | None) -> None:
        """Write ``job`` to every replica in parallel; each outcome is recorded on ``job.handle``.

        A replica that fails is marked failed on the handle and does not stop the others.
        Raises if the state cannot be encoded (then nothing is written anywhere).
        """
        info = self.dist
        save_key = f"{job.seq}-{job.step}"
        decide = partial(commit_from_reports, job.step, info.world_size, job.replicated)
        try:
            if job.finish is not None:
                job.finish()
            model = job.model() if job.model is not None and self.incremental else None
            frozen = frozen_flags(job.plan, model) if model is not None and job.pre is None else None
            common = (job.step, info.rank, info.world_size, job.plan, job.stream, object_bytes, self._hash_pool)
            if job.replicated:
                assert self._coord is not None
                exchange = partial(_prefixed, self._coord.exchange, save_key)
                enc = encode_replicated(*common, exchange, frozen)
            else:
                enc = encode(*common, job.pre, frozen)
        except BaseException as exc:
            for pos in range(len(self.replicas)):  # the other ranks are waiting for our vote
                self._vote(save_key, pos, {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}, decide)
            raise

        pre = job.pre
        owned_at = self._owned_at(enc)
        mine = tuple(range(len(enc.windows))) if owned_at is None else tuple(sorted(set().union(*owned_at)))
        if pre is not None:
            mine = tuple(i for i in mine if i >= pre.upto)  # the rest went out before save() returned
        by_url = None if owned_at is None else {r.url: owned_at[pos] for pos, r in enumerate(self.replicas)}
        refs, encoder = self._plan_storage(enc, job, mine, by_url)

        def one(pos: int, replica: Replica) -> None:
            if replica not in job.replicas:  # skipped (degraded): still take part in the vote
                self._vote(
                    save_key,
                    pos,
                    {"state": "skipped", "error": f"replica {replica.url} is degraded on rank {info.rank}"},
                    decide,
                )
                return
            stored: dict[str, Stored] = {}
            try:
                try:
                    if pre is not None and replica.url in pre.failed:
                        raise pre.failed[replica.url]
                    stored = write_objects(
                        replica,
                        enc,
                        job.stream,
                        self._io_pools[replica.url],
                        job.overwrite,
                        refs=refs.get(replica.url),
                        encoder=encoder,
                        live=self._live_keys(replica.url),
                        base=pre.base if pre is not None else 0,
                        done=pre.stored.get(replica.url) if pre is not None else None,
                        owned=owned_at[pos] if owned_at is not None else None,
                    )
                except BaseException as exc:
                    self._vote(save_key, pos, {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}, decide)
                    if isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS:
                        # Nobody commits this step here now (our vote failed it), so nothing will
                        # ever read what we put: give the space back before the next save needs it.
                        own = owned_at[pos] if owned_at is not None else range(len(enc.windows))
                        writers = {writer_of(enc.manifest.objects[i].key) for i in own}
                        if not job.replicated:
                            writers.add(writer_of(enc.manifest_key))
                        self._retention.append(self._retention_pool.submit(_discard, replica, enc.step, writers))
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
                share = share_record(job.step, self._groups[pos], info.world_size, job.replicated, commit_bytes)
                if share is not None:  # before the commit: verify reads it as soon as the step exists
                    replica.put(*share)
                commit_step(
                    replica,
                    enc,
                    commit_bytes,
                    written=_written_here(enc.step, stored, enc),
                    live=self._live_keys(replica.url),
                )
            except BaseException as exc:  # noqa: BLE001 - recorded per replica
                log.warning("replica %s failed to save step %d: %s", replica.url, job.step, exc)
                if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):
                    own = owned_at[pos] if owned_at is not None else range(len(enc.windows))
                    self._health.mark(replica, exc, need_bytes=sum(enc.windows[i][1] for i in own))
                job.handle._set_replica(replica.url, "failed", exc)
                return
            finally:
                self._unref(replica.url, refs.get(replica.url))
                if pre is not None:
                    self._unref(replica.url, pre.refs.get(replica.url))
            with self._lock:
                self._committed.add(job.step)
                if replica.incremental:
                    self._index[replica.url] = {
                        (o.checksum, o.size): stored[o.key] for o in enc.manifest.objects if o.key in stored
                    }
                    self._index_step[replica.url] = job.step
            written = _written_bytes(enc.step, stored, enc)
            job.handle._set_replica(replica.url, "committed", written_bytes=written)
            if self._retention_owner[pos]:
                # Off the write path: the staging buffer is released (and the next save can
                # start) while old steps are deleted, so a slow replica's deletes hold no one.
                self._retention.append(self._retention_pool.submit(self._retain, replica, job.step, keep_last))

        for f in [self._replica_pool.submit(one, pos, r) for pos, r in enumerate(self.replicas)]:
            f.result()

    def _plan_storage(
        self, enc: EncodedStep, job: SaveJob, mine: Sequence[int], by_url: Mapping[str, Sequence[int]] | None = None
    ) -> tuple[dict[str, dict[int, Stored]], ObjectEncoder | None]:
        """Per replica, the objects it may reference instead of writing (from its index), and
        the encoder shared by the replicas that compress. References are registered as live
        (kept out of retention) until the save is done on that replica. ``by_url``: the objects
        this rank writes to each replica, where they differ by replica (a replicated step)."""
        view = host_bytes(job.stream) if job.stream.numel() else memoryview(b"")
        contents = [(o.checksum, o.size) for o in enc.manifest.objects]
        base = job.pre.base if job.pre is not None else 0
        return self._storage_plan(contents, mine, job.replicas, job.plan, enc.windows, view, base, by_url)

    def _storage_plan(
        self,
        contents: Sequence[tuple[str, int]],
        mine: Sequence[int],
        replicas: Sequence[Replica],
        plan: Any,
        windows: Sequence[tuple[int, int]],
        view: memoryview,
        base: int,
        by_url: Mapping[str, Sequence[int]] | None = None,
    ) -> tuple[dict[str, dict[int, Stored]], ObjectEncoder | None]:
        refs: dict[str, dict[int, Stored]] = {}
        users: Counter[tuple[str, int]] = Counter()
        with self._lock:
            for r in replicas:
                index = self._index.get(r.url) if r.incremental else None
                got: dict[int, Stored] = {}
                ours = mine if by_url is None else by_url.get(r.url, mine)
                if index:
                    for i in ours:
                        s = index.get(contents[i])
                        if s is not None:
                            got[i] = s
                            self._live[r.url][s.key] += 1
                refs[r.url] = got
                if r.compression != "none":
                    users.update((r.compression, i) for i in ours if i not in got)
        if not users:
            return refs, None
        segments = object_segments(plan.storages, plan.leaves, tuple(windows))
        levels = {r.compression: r.compression_level for r in replicas if r.compression != "none"}
        if self._hints is None:
            from .. import codec

            self._hints = codec.CompressionHints()
        return refs, ObjectEncoder(view, windows, segments, users, levels, self._hints, base)

    def prewrite(
        self,
        step: int,
        pre: PreWritten,
        plan: Any,
        windows: Sequence[tuple[int, int]],
        hi: int,
        chunk: torch.Tensor,
        replicas: Sequence[Replica],
    ) -> None:
        """Write objects ``[pre.upto, hi)`` of a sliced save, whose bytes ``chunk`` holds, to every
        replica, and wait (the caller's thread: this is the stall a staging cap costs). Records
        checksums, how each replica stores them and failures in ``pre``; nothing is committed."""
        lo = pre.upto
        if lo >= hi:
            return
        base = windows[lo][0]
        view = host_bytes(chunk)
        pre.sums.extend(self._hash_pool.map(lambda w: checksum(view[w[0] - base : w[0] - base + w[1]]), windows[lo:hi]))
        homes = [object_key(step, self.dist.rank, i, pre.token) for i in range(hi)]
        contents = [(pre.sums[i], windows[i][1]) for i in range(hi)]
        idx = range(lo, hi)
        refs, encoder = self._storage_plan(contents, idx, replicas, plan, windows, view, base)

        def one(r: Replica) -> None:
            pre.refs.setdefault(r.url, {}).update(refs[r.url])
            if r.url in pre.failed:
                return
            try:
                got = put_objects(
                    r, homes, windows, pre.sums, view, base, self._io_pools[r.url], idx, refs[r.url], encoder
                )
            except BaseException as exc:  # noqa: BLE001 - the queued job reports it for this replica
                log.warning("replica %s failed to save step %d: %s", r.url, step, exc)
                if isinstance(exc, OSError):
                    self._health.mark(r, exc)
                pre.failed[r.url] = exc
                return
            pre.stored.setdefault(r.url, {}).update(got)

        for f in [self._replica_pool.submit(one, r) for r in replicas]:
            f.result()
        pre.upto = hi

    def _live_keys(self, url: str) -> frozenset[str]:
        with self._lock:
            return frozenset(k for k, n in self._live[url].items() if n > 0)

    def _unref(self, url: str, refs: Mapping[int, Stored] | None) -> None:
        if not refs:
            return
        with self._lock:
            live = self._live[url]
            for s in refs.values():
                live[s.key] -= 1
                if live[s.key] <= 0:
                    del live[s.key]

    def _forget(self, url: str, step: int) -> None:
        """Drop ``url``'s index if it came from ``step`` or references it (the step is being deleted)."""
        with self._lock:
            index = self._index.get(url)
            if index is None:
                return
            prefix = step_dir(step) + "/"
            if self._index_step.get(url) == step or any(s.key.startswith(prefix) for s in index.values()):
                self._index.pop(url, None)
                self._index_step.pop(url, None)

    def _retain(self, replica: Replica, newest: int, keep_last: int | None) -> None:
        """Apply retention on ``replica`` after ``newest`` committed there (background thread).

        The pass stops at the first sign of an outage, or as soon as the replica is marked
        degraded by anyone else (a failed save, the health probe): each further delete would
        cost a whole time budget, and ``wait()``/``close()`` wait for this pass. What it leaves
        is garbage the next pass or ``ckptmirror prune`` removes.
        """
        if replica.url in self._health.degraded():
            return  # it costs nothing while down; the next save's pass catches up once it is back
        try:
            with self._lock:
                pinned = frozenset(self._pinned)
            removed = apply_retention(
                replica, newest, keep_last, pinned, self._live_keys(replica.url), stop=self._stop_if_degraded(replica)
            )
        except (CkptMirrorError, OSError) as exc:
            # The new step is committed; failing to delete old ones loses nothing.
            log.warning("retention on %s after step %d: %s", replica.url, newest, exc)
            self._mark_after_removal(replica, exc)
            return
        if removed:
            log.info("retention on %s removed steps %s", replica.url, removed)
            gone = [s for s in removed if not self._committed_anywhere(s)]  # I/O: outside the lock
            with self._lock:
                self._committed.difference_update(gone)

    def _stop_if_degraded(self, replica: Replica) -> Callable[[], str | None]:
        """``stop`` of a removal pass on ``replica``: why to stop once it is marked degraded."""

        def stop() -> str | None:
            why = self._health.degraded().get(replica.url)
            return None if why is None else f"the replica was marked degraded meanwhile: {why}"

        return stop

    def _mark_after_removal(self, replica: Replica, exc: BaseException) -> None:
        """Mark ``replica`` degraded after a removal failed with ``exc`` (an ``OSError``), unless
        the pass stopped because it was marked already (that keeps the first error's text)."""
        cause: BaseException | str = exc.cause if isinstance(exc, RetentionStopped) else exc
        if isinstance(cause, OSError):
            self._health.mark(replica, cause)

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

    def elect_retention_owners(self) -> tuple[list[bool], list[tuple[int, ...]]]:
        """Per position: whether this rank prunes it (the lowest rank with the same host and
        URL), and the ranks that write to the same replica there (:func:`replica_identity`),
        in rank order: this rank's group, which shares a replicated state's objects out and,
        if it is not the whole world, says in a share record which ranks the replica holds."""
        assert self._coord is not None
        host = self._coord.host
        mine = [[f"{host}|{r.url}", replica_identity(r, host, self.dist.rank)] for r in self.replicas]
        everyone = self._coord.exchange("placement", mine)
        rank, n = self.dist.rank, len(mine)
        owners = [all(everyone[r][pos][0] != mine[pos][0] for r in range(rank)) for pos in range(n)]
        groups = [tuple(r for r in range(len(everyone)) if everyone[r][pos][1] == mine[pos][1]) for pos in range(n)]
        return owners, groups

    def _owned_at(self, enc: EncodedStep) -> list[tuple[int, ...]] | None:
        """Per position, the objects of a replicated step this rank writes there (None: not a
        replicated step; then every object is this rank's own).

        Each replica must end up with every object: a restore reads them all from the replicas
        it can reach, and a node-local disk or a ring peer is reachable from its node only.
        So the objects are spread over the ranks that write to the same replica (all ranks on
        a shared one: stored once in total), not over the world: before, object ``i`` went only
        to rank ``i mod world_size``'s replicas, and a DDP state kept on node-local disks alone
        could be restored by no rank. Object ``i``'s key names rank ``i mod world_size`` as its
        writer; a writer's objects all go to one member of each group (the member ``writer mod
        group size``), so that each member's placement record is its own.
        """
        if enc.owned is None:
            return None
        world = self.dist.world_size
        n = len(enc.windows)
        rank = self.dist.rank
        return [tuple(i for i in range(n) if (i % world) % len(g) == g.index(rank)) for g in self._groups]

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
            self._forget(r.url, step)
            try:
                remove_step(r, step, self._live_keys(r.url), stop=self._stop_if_degraded(r))
            except (CkptMirrorError, OSError) as exc:
                failures[r.url] = exc
                if isinstance(exc, ReplicaUnavailableError):
                    self._mark_after_removal(r, exc)
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
    replica: Replica,
    enc: EncodedStep,
    stream: torch.Tensor,
    pool: ThreadPoolExecutor,
    overwrite: bool,
    *,
    refs: Mapping[int, Stored] | None = None,
    encoder: ObjectEncoder | None = None,
    live: Collection[str] = (),
    base: int = 0,
    done: Mapping[str, Stored] | None = None,
    owned: Sequence[int] | None = None,
) -> dict[str, Stored]:
    """Phase 1 on one replica: every object, the placement record, then the rank manifest.
    Nothing is committed. Returns how each object this rank owns is stored there, by home key.

    ``refs``: objects an earlier committed step stores here with the same content; each is
    checked to still be there with its size (else written anew) and referenced, not written.
    ``encoder``: objects for a compressing replica come from it. Names carry this save's
    token, so nothing here can overwrite another writer's files. ``stream`` holds the data
    stream from byte ``base`` on; objects in ``done`` were written already (a sliced save,
    :meth:`Fanout.prewrite`). ``owned``: the objects this rank writes here (default: all, or
    ``enc.owned`` for a replicated step; see :meth:`Fanout._owned_at`).
    """
    step = enc.step
    if is_committed(replica, step):
        if not overwrite:
            raise StepExistsError(step, replica.url)
        log.warning("overwriting committed step %d on %s", step, replica.url)
        remove_step(replica, step, live)
    view = host_bytes(stream) if enc.windows else memoryview(b"")
    mine = owned if owned is not None else range(len(enc.windows)) if enc.owned is None else enc.owned
    done = done or {}
    homes = [o.key for o in enc.manifest.objects]
    todo = [i for i in mine if homes[i] not in done]
    stored = dict(done)
    sums = [o.checksum for o in enc.manifest.objects]
    # Local disk, when this save can need no placement record (nothing referenced, nothing
    # compressed): the manifest is written alongside the objects, and every name is made
    # durable by the one directory-fsync pass after them all. The commit still comes after.
    early = (
        isinstance(replica, LocalReplica)
        and not refs
        and (encoder is None or replica.compression == "none")
        and all(s.key == h for h, s in done.items())
    )
    extra = ((enc.manifest_key, enc.manifest_bytes),) if early else ()
    stored.update(put_objects(replica, homes, enc.windows, sums, view, base, pool, todo, refs or {}, encoder, extra))
    stored = {homes[i]: stored[homes[i]] for i in mine}
    if early:
        return stored
    records: list[tuple[str, bytes]] = [
        (placement_key(step, rank, token), Placement(step, rank, token, entries).to_json())
        for (rank, token), entries in _special_by_writer(stored).items()
    ]
    records.append((enc.manifest_key, enc.manifest_bytes))
    for key, data in records:  # the placement before the manifest (retention reads placements first)
        if isinstance(replica, LocalReplica):
            replica.put(key, data, sync_dir=False)
        else:
            replica.put(key, data)
    if isinstance(replica, LocalReplica):
        replica.sync_dirs([k for k, _ in records])
    return stored


def put_objects(
    replica: Replica,
    homes: Sequence[str],
    windows: Sequence[tuple[int, int]],
    sums: Sequence[str],
    view: memoryview,
    base: int,
    pool: ThreadPoolExecutor,
    indices: Sequence[int],
    refs: Mapping[int, Stored],
    encoder: ObjectEncoder | None,
    extra: Sequence[tuple[str, bytes]] = (),
) -> dict[str, Stored]:
    """Store objects ``indices`` on ``replica`` (in parallel on ``pool``): referenced, compressed
    or raw, by its policy. ``view`` holds the data stream from byte ``base`` on. Returns how each
    is stored, by home key; the first failure is raised once the puts in flight are done.
    ``extra``: (key, bytes) records put on the pool alongside (first).

    Every file is durable under its name on return. On local disk, each is fsynced by the
    thread that wrote it and renamed; the directories are fsynced once each, after them all
    (:meth:`LocalReplica.sync_dirs`), instead of once per file."""
    name = replica.compression
    local = replica if isinstance(replica, LocalReplica) else None
    written: list[str] = []

    def put(key: str, data: Buffer) -> None:
        if local is not None:
            local.put(key, data, sync_dir=False)
            written.append(key)  # list.append is atomic
        else:
            replica.put(key, data)

    def put_one(i: int) -> Stored:
        home = homes[i]
        ref = refs.get(i)
        if ref is not None and replica.size(ref.key) == ref.size:
            return ref  # unchanged since a committed step stored it here: reference it
        off, size = windows[i]
        if name != "none" and encoder is not None:
            try:
                got = encoder.get(name, i)
                if got is not None:
                    blob, blob_sum = got
                    key = stored_object_key(home, name)
                    put(key, blob)
                    return Stored(key, name, len(blob), blob_sum)
            finally:
                encoder.release(name, i)
        put(home, view[off - base : off - base + size])
        return Stored(home, "none", size, sums[i])

    side: list[Future[None]] = [pool.submit(put, key, data) for key, data in extra]
    futures: list[Future[Stored]] = [pool.submit(put_one, i) for i in indices]
    every: list[Future[Any]] = [*side, *futures]
    wait(every, return_when=FIRST_EXCEPTION)
    for f in every:
        f.cancel()  # not started yet: dropped once one put has failed
    wait(every)
    for f in every:
        if not f.cancelled():
            f.result()  # first failure wins
    if local is not None and written:
        local.sync_dirs(written)
    return {homes[i]: f.result() for i, f in zip(indices, futures)}


def _own_references(replica: Replica, step: int, pinned: Collection[Any]) -> set[str] | None:
    """The stored keys the committed step's own placement records (of the writers its commit
    pins) name: on a shared replica another rank of this save may reference a file an earlier
    save of this step number left in this directory, which ``protected_keys`` (references
    across steps) does not cover. None if one of those records cannot be read."""
    out: set[str] = set()
    for k in replica.list_prefix(step_dir(step)):
        if not is_placement_key(k) or writer_of(k) not in pinned:
            continue
        try:
            out |= {st.key for st in parse_placement(replica.get(k, MAX_PLACEMENT_BYTES), k).entries.values()}
        except (ManifestError, OSError) as exc:
            log.warning("placement %s on %s is unreadable (%s): keeping the step's other files", k, replica.url, exc)
            return None
    return out


def _special_by_writer(stored: Mapping[str, Stored]) -> dict[tuple[int, str], dict[str, Stored]]:
    """The objects stored other than raw under their own name (compressed, or an earlier step's
    object), grouped by the writer their home key names: one placement record each, as readers
    look a record up by its objects' writer. A rank writes for one writer unless it writes a
    replicated state's objects for several (:meth:`Fanout._owned_at`)."""
    out: dict[tuple[int, str], dict[str, Stored]] = {}
    for home, st in stored.items():
        if st.key != home:
            w = writer_of(home)
            assert w is not None  # object keys always name their writer
            out.setdefault(w, {})[home] = st
    return out


def _written_bytes(step: int, stored: Mapping[str, Stored], enc: EncodedStep) -> int:
    """Bytes this rank wrote for this save on one replica: objects as stored in this step's
    directory (referenced ones cost nothing), its placement record, the rank manifest."""
    prefix = step_dir(step) + "/"
    placement = sum(  # about their size
        len(Placement(step, 0, "00000000", entries).to_json()) for entries in _special_by_writer(stored).values()
    )
    return sum(s.size for s in stored.values() if s.key.startswith(prefix)) + placement + len(enc.manifest_bytes)


def _written_here(step: int, stored: Mapping[str, Stored], enc: EncodedStep) -> list[str]:
    """The files this save wrote into ``step``'s directory (references to older steps excluded)."""
    prefix = step_dir(step) + "/"
    keys = [s.key for s in stored.values() if s.key.startswith(prefix)]
    keys += [placement_key(step, *w) for w in _special_by_writer(stored)]
    return keys + [enc.manifest_key]


def replica_identity(replica: Replica, host: str, rank: int) -> str:
    """What makes two ranks' replicas at one position the same store (:meth:`Fanout._owned_at`).

    A network store (S3, a peer agent, fsspec) is its URL, whoever writes it. A local directory
    is its URL on one host: the same path on two nodes is two disks (a shared filesystem
    mounted at the same path on both is then counted twice: each node writes a whole copy of
    a replicated state, identical files, which is correct if wasteful). Anything else (an
    in-memory replica, a wrapper) is private to its process.
    """
    url = replica.url
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if isinstance(replica, LocalReplica) or scheme in ("", "file"):
        return f"{host}|{url}"
    if scheme == "memory":
        return f"{host}|{os.getpid()}|{rank}|{url}"
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    hostname = netloc.rsplit(":", 1)[0].strip("[]").lower() if netloc else ""
    if hostname in LOOPBACK_HOSTS:  # an agent (or an S3 endpoint) on each node's own loopback
        return f"{host}|{url}"
    return url  # s3://, peer://, peers://, an fsspec protocol: one store, reached over the network


def share_record(
    step: int, group: Sequence[int], world_size: int, replicated: bool, commit_bytes: bytes
) -> tuple[str, bytes] | None:
    """The share record (key, bytes) a rank of ``group`` (the ranks that write to one replica)
    puts there before the commit record ``commit_bytes`` (:mod:`ckptmirror.format.share`): None
    where the replica is to hold the whole step (every rank writes there, or the state is
    replicated). Every rank of the group puts the same bytes."""
    if replicated or len(group) >= world_size:
        return None
    csum = checksum(commit_bytes)
    return share_key(step, csum, min(group)), ShareRecord(step, csum, tuple(group)).to_json()


def _discard(replica: Replica, step: int, writers: Collection[tuple[int, str] | None]) -> None:
    """Delete what the failed save by ``writers`` ((rank, token) pairs) put in ``step``'s
    directory on ``replica``, temp files included (background; failures are logged). The
    tokens are that save's own, so no other writer's file, nor any committed one, matches."""
    try:
        keys = [k for k in replica.list_prefix(step_dir(step)) if writer_of(k) in writers]
    except (CkptMirrorError, OSError) as exc:
        log.warning("could not list what the failed save of step %d left on %s: %s", step, replica.url, exc)
        return
    if keys:
        log.info("removing %d file(s) the failed save of step %d left on %s", len(keys), step, replica.url)
        delete_quietly(replica, keys)


def commit_step(
    replica: Replica,
    enc: EncodedStep,
    commit_bytes: bytes,
    written: Sequence[str] | None = None,
    live: Collection[str] = (),
) -> None:
    """Phase 2 on one replica: write the commit record, then drop what it does not reference.

    Leftovers are recognised by their writer token: files of the step whose (rank, token) is
    not pinned by the commit belong to a torn or losing attempt, or to an earlier save of this
    step number (overwritten, or dropped by retention) whose objects later steps still
    reference (incremental saves). Those stay: no file that a placement record in another step
    directory references, nor one a save of this process has in flight (``live``), is deleted
    (:func:`~ckptmirror.save.retention.protected_keys`, as retention decides). Deciding this only
    after the commit matters on shared replicas, where other ranks' files are being written
    meanwhile. ``written``: the files this save put in the step's directory (default: the
    objects raw under their own names and the manifest), taken back if another writer won.
    """
    step = enc.step
    try:
        replica.commit(commit_key(step), commit_bytes)
    except StepExistsError:
        # Another writer committed this step first: our objects are garbage; take them back.
        if written is None:
            mine = range(len(enc.windows)) if enc.owned is None else enc.owned
            written = [enc.manifest.objects[i].key for i in mine] + [enc.manifest_key]
        delete_quietly(replica, list(written))
        raise
    pinned = {writer_of(ref.key) for ref in parse_commit(commit_bytes, commit_key(step)).ranks}
    pinned |= {writer_of(rec.key) for rec in enc.manifest.objects}  # replicated: objects of every rank
    # Only files that name their writer: a commit record's temp file may be another rank's
    # commit of these same bytes, in flight right now on a shared replica.
    stale = [k for k in replica.list_prefix(step_dir(step)) if (w := writer_of(k)) is not None and w not in pinned]
    if stale:
        others = [n for name in replica.list_steps() if (n := parse_step_dir(name)) is not None and n != step]
        protected = protected_keys(replica, others)
        own = _own_references(replica, step, pinned)
        if protected is None or own is None:  # an unreadable placement (logged): any may be referenced
            return
        protected |= own | set(live)
        stale = [k for k in stale if k not in protected]
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
