"""Fan-out: write one save to every replica at once, and commit it on each.

The third stage of the save path. :class:`~ckptmirror.mirror.Mirror` queues one
:class:`SaveJob` per save; its background thread hands each to :meth:`Fanout.write`, which
encodes it (:mod:`~ckptmirror.save.encode`, once for all replicas) and runs one task per
replica, each with its own pool of ``io_threads`` workers for object puts. On each replica a
save has two phases, each in a module of its own: :func:`~ckptmirror.save.objects.write_objects`
(every object, then the rank manifest; nothing is visible yet) and
:func:`~ckptmirror.save.commit.commit_step` (the commit record, written last, makes the step exist).
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
never on the training thread: :class:`~ckptmirror.save.objects.ObjectEncoder`), and ``incremental`` replicas get a
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
import operator
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .. import config
from ..buffers import host_bytes
from ..checksum import checksum
from ..dist import Coordinator, DistInfo, GiveBackAbortError
from ..errors import CkptMirrorError, ReplicaLaggingError, ReplicaUnavailableError
from ..format import (
    MAX_STEP,
    object_key,
    step_dir,
    writer_of,
)
from ..handle import SaveHandle
from ..health import ReplicaHealth
from ..placement import Stored
from ..replicas.base import SPACE_ERRNOS, Replica
from .arena import Arena
from .commit import commit_from_reports, commit_step, discard_failed_save, replica_identity, share_record
from .encode import EncodedStep, PreWritten, encode, encode_replicated, object_segments
from .lag import Laggards, Readers, dropped_error
from .objects import ObjectEncoder, put_objects, write_objects, written_bytes_of, written_here
from .pins import PinRecords
from .priority import lower_priority
from .resave import erase_for_resave
from .retention import (
    RetentionStopped,
    apply_retention,
    is_committed,
    pinned_steps,
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
        max_inflight: int = 1,
        slow_replica_timeout_s: float | None = None,
        keep_written: int = 1,
    ) -> None:
        self.replicas = replicas
        self.dist = dist
        self._coord = coord
        self._health = health
        self._lock = threading.Lock()
        self._committed = set(committed)
        self._pinned: set[int] = set()  # kept out of retention (Mirror.pin)
        self._pin_records = PinRecords([r.url for r in replicas])  # ... recorded on the replicas, for prune
        self._index: dict[str, Index] = {}  # per replica URL: see Index
        self._index_step: dict[str, int] = {}  # the step each index was taken from
        self._live: dict[str, Counter[str]] = {r.url: Counter() for r in replicas}  # referenced by saves in flight
        self._hints: Any = None  # the codec's memory of incompressible planes, made on first use
        # Every worker of these pools runs at a lower CPU priority (save.priority): they are the
        # library's own threads, and the training loop should win the CPU over them.
        self.nice = config.background_nice()
        self._hash_pool = self._pool(max(2, os.cpu_count() or 2), "ckptmirror-hash")
        self._io_pools = {r.url: self._pool(io_threads, "ckptmirror-io") for r in self.replicas}
        # A dropped write (save.lag) keeps its replica thread until its upload returns; each
        # save in flight may leave one per replica, so that many more threads keep the next
        # save's replicas from queueing behind them.
        self._replica_pool = self._pool(len(self.replicas) * (max_inflight + 1), "ckptmirror-replica")
        # Votes of dropped writes, cast off the training thread (rank 0's decision waits for every rank).
        self._drop_pool = self._pool(len(self.replicas), "ckptmirror-drop")
        self.slow_replica_timeout_s = slow_replica_timeout_s
        self._keep_written = keep_written  # replicas that must have written a save before others are dropped
        self._readers: list[Readers] = []  # saves whose staging arena some replica still reads
        self._laggards = Laggards()
        # One thread: retention passes run in save order, never two on one replica at once.
        self._retention_pool = self._pool(1, "ckptmirror-retention")
        self._retention: list[Future[None]] = []
        self._retention_lock = threading.Lock()  # replica threads add passes while wait() drains
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

    def write(
        self, job: SaveJob, object_bytes: int, keep_last: int | None, release: Callable[[], None] | None = None
    ) -> None:
        """Write ``job`` to every replica in parallel; each outcome is recorded on ``job.handle``.

        A replica that fails is marked failed on the handle and does not stop the others.
        Raises if the state cannot be encoded (then nothing is written anywhere). ``release``
        gives the staging arena back: called once every replica has finished the save or had
        its write dropped (:meth:`drop_laggards`), possibly before this returns; the caller
        calls it (again) once this returns. Returns when every write that was not dropped has
        ended: a dropped one may still be running.
        """
        info = self.dist
        save_key = f"{job.seq}-{job.step}"
        decide = partial(commit_from_reports, job.step, info.world_size, job.replicated)
        overwrite = job.overwrite
        not_erased: dict[str, BaseException] = {}
        try:
            if overwrite and self._coord is not None:
                # Several ranks replace a damaged step (save.resave): erased everywhere first.
                coord = self._coord
                not_erased = erase_for_resave(
                    job.replicas,
                    job.step,
                    self._live_keys,
                    self._stop_if_degraded,
                    lambda ok: coord.exchange(f"erase-{save_key}", ok),
                )
                overwrite = False  # a replica that still holds the old step fails this save
                if not not_erased:  # committed nowhere here now: a failed save may be retried
                    with self._lock:
                        self._committed.discard(job.step)
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
        position = {r.url: pos for pos, r in enumerate(self.replicas)}

        def on_drop(url: str) -> None:
            err = dropped_error(url, job.step, reading.committed, self.slow_replica_timeout_s or 0.0)
            self._laggards.dropped(err)
            job.handle._set_replica(url, "failed", err)
            # give_back: every rank deletes its part there (nothing commits there; see dist.GiveBackAbortError)
            failed = {"state": "failed", "error": f"{type(err).__name__}: {err}", "give_back": True}
            self._drop_pool.submit(self._vote, save_key, position[url], failed, decide)

        reading = Readers([r.url for r in job.replicas], release or (lambda: None), on_drop, self._keep_written)

        def tracked(pos: int, replica: Replica) -> None:
            committed = False
            try:
                committed = one(pos, replica)
            finally:
                if replica in job.replicas:
                    reading.done(replica.url, committed)  # a dropped write's is ignored

        def one(pos: int, replica: Replica) -> bool:
            """Write and commit the save on ``replica``; True if it committed there."""
            if replica not in job.replicas:  # skipped (degraded, or lagging): still take part in the vote
                lags = replica.url in self._laggards.lagging()
                why = "lags (a dropped write still runs)" if lags else "is degraded"
                skip: dict[str, Any] = {"state": "skipped", "error": f"replica {replica.url} {why} on rank {info.rank}"}
                if lags:  # it answers: the other ranks' parts there are given back (dist.GiveBackAbortError)
                    skip["give_back"] = True
                self._vote(save_key, pos, skip, decide)
                return False
            if reading.dropped(replica.url):
                reading.wait_told(replica.url)
                self._dropped_ended(replica, None)  # dropped before it started: nothing was written
                return False
            stored: dict[str, Stored] = {}
            own = owned_at[pos] if owned_at is not None else range(len(enc.windows))  # what this rank writes here

            def give_back() -> None:
                # Nobody commits this step here now (the vote failed it), so nothing will ever
                # read what we put: give the space back before the next save needs it.
                writers = {writer_of(enc.manifest.objects[i].key) for i in own}
                if not job.replicated:
                    writers.add(writer_of(enc.manifest_key))
                self._queue_retention(discard_failed_save, replica, enc.step, writers)

            try:
                try:
                    if pre is not None and replica.url in pre.failed:
                        raise pre.failed[replica.url]
                    if replica.url in not_erased:
                        raise not_erased[replica.url]
                    stored = write_objects(
                        replica,
                        enc,
                        job.stream,
                        self._io_pools[replica.url],
                        overwrite,
                        refs=refs.get(replica.url),
                        encoder=encoder,
                        live=self._live_keys(replica.url),
                        base=pre.base if pre is not None else 0,
                        done=pre.stored.get(replica.url) if pre is not None else None,
                        owned=owned_at[pos] if owned_at is not None else None,
                        stop=reading.stop(replica.url),
                    )
                except BaseException as exc:
                    if not reading.read(replica.url):
                        raise _Dropped(exc) from exc
                    full = isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS
                    failed: dict[str, Any] = {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
                    if full:
                        failed["space"] = True  # every rank that wrote here gives its files back
                    self._vote(save_key, pos, failed, decide)
                    if full:
                        give_back()
                    raise
                if not reading.read(replica.url):
                    raise _Dropped(None)
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
                    try:
                        commit_bytes = self._coord.outcome(save_key, pos)
                    except GiveBackAbortError:
                        give_back()  # another rank found it full or dropped its write there: ours are orphans too
                        raise
                share = share_record(job.step, self._groups[pos], info.world_size, job.replicated, commit_bytes)
                if share is not None:  # before the commit: verify reads it as soon as the step exists
                    replica.put(*share)
                commit_step(
                    replica,
                    enc,
                    commit_bytes,
                    written=written_here(enc.step, stored, enc),
                    live=self._live_keys(replica.url),
                )
            except _Dropped as d:
                # Its vote and its handle entry were made when it was dropped: only clean up.
                reading.wait_told(replica.url)
                if not isinstance(d.cause, OSError) or isinstance(d.cause, ReplicaLaggingError):
                    give_back()  # after an outage, its leftovers wait for prune (as any failed save's)
                self._dropped_ended(replica, d.cause)
                return False
            except BaseException as exc:  # noqa: BLE001 - recorded per replica
                log.warning("replica %s failed to save step %d: %s", replica.url, job.step, exc)
                if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):
                    need = self._need_bytes(pos, replica, enc, own, refs.get(replica.url), encoder)
                    self._health.mark(replica, exc, need_bytes=need)
                job.handle._set_replica(replica.url, "failed", exc)
                return False
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
            self._laggards.committed(replica.url)
            written = written_bytes_of(enc.step, stored, enc)
            job.handle._set_replica(replica.url, "committed", written_bytes=written)
            if self._retention_owner[pos]:
                # Off the write path: the staging buffer is released (and the next save can
                # start) while old steps are deleted, so a slow replica's deletes hold no one.
                self._queue_retention(self._retain, replica, job.step, keep_last)
            return True

        futures = {self._replica_pool.submit(tracked, pos, r): r.url for pos, r in enumerate(self.replicas)}
        with self._lock:
            self._readers.append(reading)
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.1)
                for f in done:
                    f.result()
                pending = {f for f in pending if not reading.dropped(futures[f])}  # those run on alone
        finally:
            with self._lock:
                self._readers.remove(reading)

    def drop_laggards(self) -> bool:
        """Drop the writes that still read a staging arena after another replica wrote their
        step (see :mod:`~ckptmirror.save.lag`); True if some arena was given back."""
        with self._lock:
            readers = list(self._readers)
        return any([bool(r.drop_laggards()) for r in readers])

    def lagging(self) -> set[str]:
        """The replicas where a dropped write is still running (a new save skips them)."""
        return self._laggards.lagging()

    def _dropped_ended(self, replica: Replica, cause: BaseException | None) -> None:
        """A dropped write returned, with ``cause`` if it failed. A real failure (not the
        stop) still marks the replica: a stalled upload that ran out of its budget is an outage."""
        self._laggards.ended(replica.url)
        if isinstance(cause, OSError) and not isinstance(cause, ReplicaLaggingError | FileExistsError):
            log.warning("replica %s: the dropped write failed too: %s", replica.url, cause)
            self._health.mark(replica, cause)

    def _need_bytes(
        self,
        pos: int,
        replica: Replica,
        enc: EncodedStep,
        own: Sequence[int],
        refs: Mapping[int, Stored] | None,
        encoder: ObjectEncoder | None,
    ) -> int:
        """About what a save like ``enc`` writes to ``replica`` (the health check's bar for a
        replica that ran out of space): this rank's objects that are not references to earlier
        steps, shrunk by what compression achieved in this save, times the ranks that write
        there (each writes a share like this one). An estimate: too high and a replica that would
        take an incremental save stays degraded; too low and it comes back to fail again."""
        new = sum(enc.windows[i][1] for i in own if refs is None or i not in refs)
        if replica.compression != "none" and encoder is not None and encoder.raw_bytes:
            new = new * encoder.encoded_bytes // encoder.raw_bytes
        return new * len(self._groups[pos])

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
        self._write_pins(replica)  # a step just committed there: it answers again
        try:
            with self._lock:
                mine = frozenset(self._pinned)
            # With the replica's pin records: a pin from an earlier run of the job outlives it
            # (only unpin deletes a record), and retention must keep that step as prune does.
            # Without keep_last no committed step goes: no listing of them.
            pinned = mine | pinned_steps(replica) if keep_last is not None else mine
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

    def _queue_retention(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the retention thread (in order), where :meth:`drain_retention` waits for it."""
        with self._retention_lock:
            self._retention.append(self._retention_pool.submit(fn, *args))

    def drain_retention(self, timeout: float | None = None) -> bool:
        """Wait for the retention passes queued so far; False if ``timeout`` passed first."""
        with self._retention_lock:
            pending = list(self._retention)
        done, not_done = wait(pending, timeout=timeout)
        with self._retention_lock:  # a pass queued meanwhile stays listed for the next drain
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
        """Keep ``step`` out of retention (``pinned=True``) or give it back to it.

        The pin is also recorded on every replica this rank looks after (a pin record,
        :mod:`ckptmirror.format.pins`, written or deleted on the retention thread: never on the
        caller's, which is the training loop's), so that ``ckptmirror prune``, another process,
        keeps the step too.
        """
        try:
            step = operator.index(step)
        except TypeError:
            raise ValueError(f"pin/unpin: step must be an integer, got {step!r}") from None
        if not 0 <= step <= MAX_STEP:
            raise ValueError(f"pin/unpin: step must be in [0, {MAX_STEP}], got {step}")
        with self._lock:
            if pinned and step in self._pinned:
                return  # pinned already: its record is written or queued
            # An unpin always deletes the record: a pin may come from an earlier run of the job
            # (its record outlives the process that wrote it).
            if pinned:
                self._pinned.add(step)
            else:
                self._pinned.discard(step)
        for pos, r in enumerate(self.replicas):
            if self._retention_owner[pos]:
                self._pin_records.want(r.url, step, pinned)
                # Queued after the retention passes before it: in order with them and with
                # each other, and drain_retention() (wait, close, delete) waits for it.
                self._queue_retention(self._write_pins, r)

    def _write_pins(self, replica: Replica) -> None:
        """The pin records pending on ``replica`` (retention thread; a degraded replica is not
        asked: it would stall the thread). What fails is tried again after its next commit
        (:meth:`_retain`)."""
        if not self._pin_records.pending(replica.url):
            return
        why = self._health.degraded().get(replica.url)
        if why is not None:
            log.warning(
                "pin records not updated on %s, degraded (%s): written after its next commit there; until "
                "then 'ckptmirror prune' there does not know the change",
                replica.url,
                why,
            )
            return
        self._pin_records.write(replica)

    def committed_steps(self) -> set[int]:
        """A copy of the steps committed on some replica, as far as this mirror knows."""
        with self._lock:
            return set(self._committed)

    def delete(self, step: int) -> dict[str, BaseException]:
        """Remove ``step`` from every replica this rank looks after; returns the failures by URL.

        Degraded replicas are not asked (they would stall the caller); the step stays there
        until ``ckptmirror prune`` or the next retention pass removes it. A pin of ``step`` goes
        too, its pin records included (queued before the drain below, which waits for them).
        """
        self.pin(step, False)
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
        self._drop_pool.shutdown(wait=True)
        self._retention_pool.shutdown(wait=True)
        for r in self.replicas:
            if self._pin_records.pending(r.url):
                log.warning(
                    "pin records left unwritten on %s at close (it was down): 'ckptmirror prune' there does "
                    "not know those pins; pin the steps again from a job, or pass prune --keep high enough",
                    r.url,
                )
        for p in self._io_pools.values():
            p.shutdown(wait=True)
        self._hash_pool.shutdown(wait=True)


class _Dropped(Exception):
    """Raised inside a replica's task when its write turns out to have been dropped."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__("dropped")
        self.cause = cause


def _prefixed(exchange: Any, prefix: str, key: str, value: Any) -> list[Any]:
    return exchange(f"{prefix}/{key}", value)
