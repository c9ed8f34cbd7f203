"""``MirrorStorageWriter``: ``dcp.save`` / ``dcp.async_save`` onto ckptmirror replicas.

Call order (DCP's ``StorageWriter`` and ``AsyncStager`` protocols; "all" = every rank)::

    stage(state_dict)            async_save only, training thread: one memcpy into a reused arena
    reset(checkpoint_id)         all, only when dcp.save/async_save got a checkpoint_id
    set_up_storage_writer()      all: the step is fixed; degraded replicas are pinged
    prepare_local_plan(plan)     all: the step must not be committed yet; placement facts go out
    prepare_global_plan(plans)   coordinator: one save id, world size, who prunes where
    write_data(plan, planner)    all: encode, write objects (+ the rank manifest), report, return
    finish(metadata, results)    coordinator only: DCP's metadata into rank 0's manifest, decide,
                                 commit, wait until every rank wrote its commit record

A DCP step is an ordinary ckptmirror step (``docs/FORMAT.md``): each rank's DCP write items
are that rank's objects and rank manifest, whose tree is ``{"dcp": index, "state": {key:
node}}`` (a tensor, a ``dtensor`` shard with its global shape and offset, or a non-tensor
value as a JSON tree), and rank 0's index also holds DCP's ``Metadata`` as JSON. ``COMMIT.json``
pins every rank manifest, so ``ckptmirror ls/verify/repair/prune/inspect`` work unchanged.

Commit protocol, per replica position (as :class:`~ckptmirror.Mirror`, see ``dist.py``):
ranks other than 0 write objects and manifest in ``write_data``, report to the store, and a
background thread waits for the decision and writes their commit record. Rank 0 writes its
objects in ``write_data`` and its manifest in ``finish`` (DCP's metadata exists only there),
then decides: a commit record pinning every manifest when every rank reported its part
durable, an abort otherwise. A rank whose ``write_data`` fails publishes the abort itself, as
DCP then never calls ``finish``. ``finish`` returns after every rank acknowledged its commit
record, so when ``dcp.save`` returns anywhere, every rank's commit records are written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from functools import partial
from typing import Any, Literal

import torch
from torch.distributed.checkpoint.metadata import STATE_DICT_TYPE, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future as TorchFuture

from ..checksum import checksum
from ..dist import Coordinator, DistInfo, GiveBackAbortError, detect
from ..errors import (
    CkptMirrorError,
    ReplicaConfigError,
    ReplicaLaggingError,
    ReplicaUnavailableError,
    SaveFailedError,
    StepExistsError,
)
from ..format import (
    LARGE_STORAGE_DIVISOR,
    MAX_OBJECT_BYTES,
    writer_of,
)
from ..replicas import Replica
from ..replicas.base import SPACE_ERRNOS, WRITE_ERRNOS
from ..save.commit import commit_from_reports, commit_step, discard_failed_save, replica_identity, share_record
from ..save.lag import Laggards, check_slow_replica_timeout
from ..save.retention import apply_retention, is_committed
from ._codec import DCP_VERSION, Location, metadata_to_tree
from ._common import check_step, open_for, step_from_checkpoint_id
from ._items import (
    DcpSave,
    Entry,
    GlobalInfo,
    LocalInfo,
    encode_items,
    is_plain,
    refuse_pickles,
    resolve_items,
    with_metadata,
)
from ._lag import dropped_error, write_positions
from ._staging import Staging, Ticket, copy_into, pack

log = logging.getLogger("ckptmirror")

#: Smaller than :class:`~ckptmirror.Mirror`'s 64 MiB, for how DCP reads: a rank reads the
#: replicated items that DCP had another rank store, and when resharding, parts of every rank's
#: chunks, and each object it touches is read whole to verify its checksum. With 16 MiB objects
#: that costs at most 16 MiB per object touched, and every storage of at least 4 MiB (the cut's
#: large storages: FSDP shards of most layers) gets objects of its own, read straight into the
#: target tensor. Measured (benchmarks/bench_dcp.py, 2 ranks, 20M parameters, 10 MB shards,
#: idle machine): dcp.load 0.05 s, 0.19 s with 64 MiB objects (FileSystemReader: 0.06-0.10 s);
#: saves no slower (more objects, written in parallel). See benchmarks/results/dcp_2026-12-01.txt.
DEFAULT_OBJECT_BYTES = 16 << 20
#: The ``save`` name of every vote key: each save votes under its own store prefix (its save id),
#: so the name itself needs to tell nothing apart. Keys per replica position ``pos``::
#:
#:     s/pos/rank/R   R's report: {"state": "ok", key, size, checksum} or {"state": "failed", error}
#:     s/pos/commit   the decision: {"commit": record} from rank 0, or {"abort": why} from anyone
#:     s/pos/ack/R    R's commit record written (or why not): {"state": "committed" | "failed", ...}
_SAVE = "s"


class MirrorStorageWriter(StorageWriter, AsyncStager):
    """A DCP ``StorageWriter`` (and ``AsyncStager``) that saves each step to ckptmirror replicas.

    Args:
        replicas: this rank's replica URLs or :class:`~ckptmirror.replicas.Replica` objects, as
            for :class:`~ckptmirror.Mirror` (``{rank}``, ``{node_rank}``... placeholders; lists
            are per rank and matched by position).
        step: the step to save. None: taken from the ``checkpoint_id`` given to
            ``dcp.save``/``dcp.async_save`` (its trailing integer, e.g. ``.../step-400``), so
            one writer can be reused for every save.
        object_bytes: size of the objects each rank's bytes are cut into (the format's cut,
            ``format.cut_objects``); default 16 MiB, a quarter of ``Mirror``'s, see
            :data:`DEFAULT_OBJECT_BYTES`.
        keep_last, io_threads, max_inflight, min_replicas, on_replica_error,
            storage_options, process_group, commit_timeout_s: as for :class:`~ckptmirror.Mirror`.
            ``process_group`` must have the ranks and rank numbers of the group DCP saves with
            (``async_save(process_group=...)`` may be another group over the same ranks).
            With ``on_replica_error="warn"`` a save fails only when it committed on fewer than
            ``min_replicas`` positions (default 1); with ``"raise"``, on any replica failure.
        slow_replica_timeout_s: once ``min_replicas`` positions (at least one) hold every
            rank's part of a step, how long ``write_data`` waits for the others
            before it drops their writes of that step (:class:`~ckptmirror.ReplicaLaggingError`
            in :attr:`last_outcome`; the step does not commit there; later saves skip the
            replica until the dropped write has returned). A DCP save ends only when
            ``write_data`` returns, and ``dcp.async_save`` callers wait for the previous save's
            future, so a crawling upload would hold training (``dcp/_lag.py``). None: wait for
            every replica; never with ``on_replica_error="raise"``.

    As a stager (``dcp.async_save`` uses the writer as one), ``stage()`` copies the state into
    a reused host arena: the training thread stalls for that one memcpy, and steady-state saves
    allocate nothing (:attr:`staging_allocations`). Objects are then written straight from it.

    Non-tensor values must come from :class:`~ckptmirror.dcp.MirrorSavePlanner`: DCP's default
    planner pickles them, and such a save is refused before anything is written.
    Thread-based ``async_save`` only (``AsyncCheckpointerType.PROCESS`` would copy the writer
    into another process). Call :meth:`close` (or let the writer be collected) when done.
    """

    # DCP's async_save calls synchronize_staging() after execute when this is True; stage()
    # is synchronous (the copy is complete when it returns), so there is nothing to wait for.
    _synchronize_after_execute: bool = False

    def __init__(
        self,
        replicas: Sequence[str | Replica] | str | Replica,
        step: int | None = None,
        *,
        keep_last: int | None = None,
        object_bytes: int = DEFAULT_OBJECT_BYTES,
        io_threads: int = 4,
        max_inflight: int = 1,
        min_replicas: int | None = None,
        on_replica_error: Literal["warn", "raise"] = "warn",
        storage_options: Mapping[str, Mapping[str, Any]] | None = None,
        process_group: Any = None,
        commit_timeout_s: float = 300.0,
        slow_replica_timeout_s: float | None = 10.0,
    ) -> None:
        super().__init__()
        if step is not None:
            check_step(step)
        if keep_last is not None and keep_last < 1:
            raise ValueError("keep_last must be >= 1 (the newest committed step is never deleted) or None")
        if not 1 <= object_bytes <= MAX_OBJECT_BYTES:
            raise ValueError(f"object_bytes must be in [1, {MAX_OBJECT_BYTES}]")
        if io_threads < 1:
            raise ValueError("io_threads must be >= 1")
        if on_replica_error not in ("warn", "raise"):
            raise ValueError("on_replica_error must be 'warn' or 'raise'")
        check_slow_replica_timeout(slow_replica_timeout_s)
        self.step = step
        self.keep_last = keep_last
        self.object_bytes = object_bytes
        self.io_threads = io_threads
        self.on_replica_error = on_replica_error
        self.commit_timeout_s = commit_timeout_s
        self.slow_replica_timeout_s = slow_replica_timeout_s
        self.dist: DistInfo = detect(process_group)
        self.replicas, self._closer = open_for(replicas, self.dist, storage_options, self)
        if min_replicas is not None and not 1 <= min_replicas <= len(self.replicas):
            raise ValueError(f"min_replicas must be between 1 and {len(self.replicas)}")
        self.min_replicas = min_replicas
        self._staging = Staging(max_inflight)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._down: dict[str, str] = {}  # replica URL -> why it is skipped (pinged at each save)
        #: replica URL -> bytes the save that found it full or read-only wrote there: it comes
        #: back when a write probe shows that much room (a ping alone passes on a full disk)
        self._need_write: dict[str, int] = {}
        self._threads: list[threading.Thread] = []
        #: dropped writes still running (see dcp/_lag.py): later saves skip their replicas, and
        #: wait()/close() wait for them (they may still read a staging arena)
        self._laggards = Laggards()
        self._dropped: list[Future[BaseException | None]] = []
        self._checkpoint_id: str | os.PathLike[str] | None = None
        #: Per replica URL, the outcome of this rank's part of the last save: "committed" or why not.
        self.last_outcome: dict[str, str] = {}
        #: Seconds the last :meth:`stage` call took (the training thread's stall in async_save).
        self.last_stage_s: float = 0.0
        #: Bytes the last ``write_data`` copied into a buffer (0: written straight from the staged
        #: arena, or from the tensors themselves, as every tensor of at least ``object_bytes // 4``).
        self.last_copied_bytes: int = 0

    # ------------------------------------------------------------------ AsyncStager
    def stage(self, state_dict: STATE_DICT_TYPE) -> STATE_DICT_TYPE:
        """Copy ``state_dict`` into a reused staging arena; return the same tree over the copy.

        Called by ``dcp.async_save`` on the training thread. Waits while every arena is still
        being written by earlier saves (``max_inflight``). The caller may change its tensors
        as soon as this returns.
        """
        t0 = time.perf_counter()
        staged = self._staging.stage(state_dict)
        self.last_stage_s = time.perf_counter() - t0
        return staged

    def synchronize_staging(self) -> None:
        """Nothing to wait for: :meth:`stage` returns once the copy is complete."""

    @property
    def staging_allocations(self) -> int:
        """Staging buffers allocated so far (constant in steady state)."""
        return self._staging.pool.allocations

    # ------------------------------------------------------------------ StorageWriter
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Remember ``checkpoint_id``: its trailing integer is the step when ``step`` is None."""
        self._checkpoint_id = checkpoint_id

    @property
    def checkpoint_id(self) -> str | os.PathLike[str] | None:
        """The ``checkpoint_id`` of the current save (DCP logs it), or None."""
        return self._checkpoint_id

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Never chosen automatically from a ``checkpoint_id``: pass the writer explicitly."""
        return False

    def storage_meta(self) -> StorageMeta | None:
        """The ``checkpoint_id`` of this save, as DCP records it in ``Metadata.storage_meta``."""
        cid = self._checkpoint_id
        return StorageMeta(checkpoint_id=None if cid is None else os.fspath(cid))

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Start a save on this rank: fix its step, ping degraded replicas, register for staging."""
        if not kwargs.get("use_collectives", True):
            raise ValueError("MirrorStorageWriter needs dcp.save(use_collectives=True): the ranks commit together")
        rank = kwargs.get("rank", self.dist.rank)
        if rank != self.dist.rank:
            raise ValueError(
                f"DCP runs this rank as rank {rank}, MirrorStorageWriter's process group as rank {self.dist.rank}: "
                "pass MirrorStorageWriter(process_group=...) the group DCP saves with (and no no_dist=True "
                "with several ranks)"
            )
        step = self.step if self.step is not None else step_from_checkpoint_id(self._checkpoint_id)
        if step is None:
            raise ValueError(
                "MirrorStorageWriter does not know which step this is: pass MirrorStorageWriter(replicas, step=N) "
                f"or a checkpoint_id ending in the step number (e.g. '.../step-400'); got {self._checkpoint_id!r}"
            )
        self._ping_degraded()
        with self._lock:
            skipped = dict(self._down)
        lagging = self._laggards.lagging() - set(skipped)
        for url in lagging:
            skipped[url] = "its dropped write of an earlier step is still running"
        save = DcpSave(check_step(step), rank, is_coordinator, self._staging.start_save(), skipped)
        save.lagging = lagging
        self._local.save = save

    def _save_state(self) -> DcpSave:
        s: DcpSave | None = getattr(self._local, "save", None)
        if s is None:
            raise RuntimeError("MirrorStorageWriter: set_up_storage_writer was not called on this thread")
        return s

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Refuse a step that is committed already; send the facts the coordinator plans with."""
        s = self._save_state()
        for r in self.replicas:
            if r.url in s.skipped:
                continue
            try:
                committed = is_committed(r, s.step)
            except ReplicaConfigError:
                raise
            except (CkptMirrorError, OSError) as exc:  # unreachable: this save skips it
                self._mark_down(r, exc)
                s.skipped[r.url] = f"{type(exc).__name__}: {exc}"
                continue
            if committed:
                raise StepExistsError(s.step, r.url)
        s.bytes_fqns = [item.index.fqn for item in plan.items if item.type == WriteItemType.BYTE_IO]
        host = socket.gethostname()
        info = LocalInfo(
            s.step,
            self.dist.world_size,
            tuple(f"{host}|{r.url}" for r in self.replicas),
            tuple(replica_identity(r, host, self.dist.rank) for r in self.replicas),
        )
        return dataclasses.replace(plan, storage_data=info)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator: check that the ranks agree, draw the save id, elect who prunes where."""
        infos = [p.storage_data for p in plans]
        if not all(isinstance(i, LocalInfo) for i in infos):
            raise ValueError(
                "MirrorStorageWriter got plans it did not prepare (a planner with enable_plan_caching=True?)"
            )
        first: LocalInfo = infos[0]
        if any(i.step != first.step for i in infos):
            raise ValueError(f"the ranks save different steps: {[i.step for i in infos]}")
        if any(i.world_size != len(plans) for i in infos):
            raise ValueError(
                f"DCP saves with {len(plans)} rank(s) but MirrorStorageWriter's process group has "
                f"{first.world_size}: pass MirrorStorageWriter(process_group=...) the group DCP saves with"
            )
        if any(len(i.places) != len(first.places) for i in infos):
            raise ValueError(
                f"every rank needs the same number of replicas (matched by position): {[len(i.places) for i in infos]}"
            )
        save_id = uuid.uuid4().hex
        out = []
        for rank, (p, info) in enumerate(zip(plans, infos)):
            prune = tuple(
                all(infos[lower].places[pos] != info.places[pos] for lower in range(rank))
                for pos in range(len(info.places))
            )
            groups = tuple(
                tuple(r for r, other in enumerate(infos) if other.identities[pos] == info.identities[pos])
                for pos in range(len(info.identities))
            )
            out.append(
                dataclasses.replace(p, storage_data=GlobalInfo(save_id, first.step, rank, len(plans), prune, groups))
            )
        return out

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> TorchFuture[list[WriteResult]]:
        """Encode this rank's items, write its objects to every replica, report; see the module docstring."""
        s = self._save_state()
        info = plan.storage_data
        if not isinstance(info, GlobalInfo) or info.rank != s.rank:
            raise ValueError("MirrorStorageWriter.write_data got a plan its prepare_global_plan did not make")
        s.info = info
        if self.dist.distributed:
            s.votes = Coordinator(self.dist, f"ckptmirror/dcp/{info.save_id}", self.commit_timeout_s)
        ticket: Ticket | None = None
        try:
            refuse_pickles(s, plan, planner)
            entries = resolve_items(s, plan, planner)
            ticket, arena = self._place(s, entries)
            try:
                views = encode_items(s, entries, self.object_bytes)
                assert s.enc is not None
                manifest_now = not s.coordinator  # rank 0's manifest waits for DCP's metadata (finish)
                results = self._write_all(s, views, manifest_now)
            finally:
                if ticket is not None:
                    self._staging.release(ticket)
                if arena is not None:
                    self._staging.pool.release(arena)
        except BaseException as exc:
            self._abort_everywhere(s, exc)
            self._staging.end_save(s.run)
            raise
        self._staging.end_save(s.run)
        s.failed.update(results)
        for pos, failure in results.items():
            if _full(failure):
                self._give_back(s, pos)  # this rank's failed vote: nobody commits the step there
        if len(s.failed) == len(self.replicas):
            why = {self.replicas[p].url: e for p, e in s.failed.items()}
            self._abort_everywhere(s, SaveFailedError(s.step, why))
            raise SaveFailedError(s.step, why, f"rank {s.rank} could not write step {s.step} to any replica")
        if not s.coordinator:
            self._report_and_commit_later(s)
        out = [
            WriteResult(index=e.item.index, size_in_bytes=e.nbytes, storage_data=Location(s.rank, e.key))
            for e in entries
        ]
        fut: TorchFuture[list[WriteResult]] = TorchFuture()
        fut.set_result(out)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator: store DCP's metadata in rank 0's manifest, decide, commit, wait for every rank."""
        s = self._save_state()
        assert s.info is not None and s.enc is not None
        try:
            metadata.version = DCP_VERSION
            metadata.storage_data = {wr.index: wr.storage_data for rank in results for wr in rank}
            metadata.storage_meta = StorageMeta(
                checkpoint_id=None if self._checkpoint_id is None else os.fspath(self._checkpoint_id),
                save_id=s.info.save_id,
            )
            enc = with_metadata(s, metadata_to_tree(metadata))
        except BaseException as exc:
            self._abort_everywhere(s, exc)
            raise
        s.enc = enc
        outcome: dict[int, BaseException | None] = {}
        with ThreadPoolExecutor(len(self.replicas), thread_name_prefix="ckptmirror-dcp-commit") as pool:
            for pos, res in zip(
                range(len(self.replicas)), pool.map(lambda p: self._commit_coordinator(s, p), range(len(self.replicas)))
            ):
                outcome[pos] = res
        if s.votes is not None:
            s.votes.close()
        self._record(s, outcome)
        self._prune_later(s, [p for p, e in outcome.items() if e is None])
        committed = [p for p, e in outcome.items() if e is None]
        failures = {self.replicas[p].url: e for p, e in outcome.items() if e is not None}
        need = len(self.replicas) if self.on_replica_error == "raise" else (self.min_replicas or 1)
        if len(committed) < need:
            raise SaveFailedError(
                s.step,
                failures,
                f"step {s.step} committed on {len(committed)} of {len(self.replicas)} replica position(s), "
                f"{need} required: " + "; ".join(f"{u}: {type(e).__name__}: {e}" for u, e in failures.items()),
            )
        if failures:
            log.warning(
                "step %d committed on %d of %d replica position(s); failed: %s",
                s.step,
                len(committed),
                len(self.replicas),
                "; ".join(f"{u}: {e}" for u, e in failures.items()),
            )
        log.info("step %d committed by every rank (%.3f s)", s.step, time.perf_counter() - s.t0)

    # ------------------------------------------------------------------ the write phase
    def _place(self, s: DcpSave, entries: list[Entry]) -> tuple[Ticket | None, Any]:
        """Find each tensor's bytes: in a staged arena (async_save), in the tensor itself (a large
        one), or copied into an arena now."""
        with_bytes = [e for e in entries if e.tensor is not None and e.nbytes]
        ticket: Ticket | None = None
        rest: list[Entry] = []
        for e in with_bytes:
            assert e.tensor is not None
            hit = self._staging.find(e.tensor)
            if hit is not None and (ticket is None or hit[0] is ticket):
                ticket = hit[0]
                e.buf, e.start = ticket.stream, hit[1]
            else:
                rest.append(e)
        # Two items viewing the same staged bytes would give overlapping storages: copy the later.
        if ticket is not None:
            last = -1
            for e in sorted((e for e in with_bytes if e.buf is not None), key=lambda e: e.start):
                if e.start < last:
                    e.buf = None
                    rest.append(e)
                else:
                    last = e.start + e.nbytes
        # A large tensor's bytes are written from where they are: the cut gives it objects of its
        # own (views, no copy), and it cannot change while they are written (dcp.save blocks its
        # caller; async_save hands over staged copies). Small ones are packed into the reused
        # arena, so that their shared objects are views too; device and strided tensors are
        # copied, as their bytes must be on the host and back to back.
        large = max(1, self.object_bytes // LARGE_STORAGE_DIVISOR)
        copied: list[Entry] = []
        for e in rest:
            t = e.tensor
            assert t is not None
            if e.nbytes >= large and t.device.type == "cpu" and t.is_contiguous():
                e.buf, e.start = t.reshape(-1).view(torch.uint8), 0
            else:
                copied.append(e)
        rest = copied
        arena = None
        self.last_copied_bytes = sum(e.nbytes for e in rest)
        if rest:
            tensors = [e.tensor for e in rest if e.tensor is not None]
            offsets, total = pack(tensors, [0 if is_plain(e) else 1 for e in rest])
            pinned = any(t.is_cuda for t in tensors)
            if ticket is None:
                arena = self._staging.acquire()  # dcp.save: this copy is the snapshot; the arena is reused
                buf = arena.reserve(total, pinned=pinned)
            else:  # a planner changed some staged tensors: a one-off buffer (the arena is in use)
                buf = torch.empty(total, dtype=torch.uint8, pin_memory=pinned)
            try:
                copy_into(buf, tensors, offsets)
            except BaseException:
                if arena is not None:
                    self._staging.pool.release(arena)
                raise
            for e, off in zip(rest, offsets):
                e.buf, e.start = buf, off
        return ticket, arena

    def _write_all(self, s: DcpSave, views: list[memoryview], manifest_now: bool) -> dict[int, BaseException]:
        """Every object (and, except on rank 0, the manifest) to every replica position at once."""
        enc = s.enc
        assert enc is not None

        votes = s.votes

        def write(pos: int, stop: threading.Event) -> BaseException | None:
            r = self.replicas[pos]
            if r.url in s.lagging:
                return ReplicaLaggingError(f"skipped: {s.skipped[r.url]}", replica=r.url)
            if r.url in s.skipped:
                return ReplicaUnavailableError(f"skipped: degraded ({s.skipped[r.url]})", replica=r.url)

            def put(key: str, data: Any) -> None:
                if stop.is_set():  # dropped (dcp/_lag.py): no further object
                    raise ReplicaLaggingError(f"write of step {s.step} dropped", replica=r.url)
                r.put(key, data)

            try:
                with ThreadPoolExecutor(self.io_threads, thread_name_prefix="ckptmirror-io") as io_pool:
                    futures: list[Future[None]] = [
                        io_pool.submit(put, rec.key, view) for rec, view in zip(enc.manifest.objects, views)
                    ]
                    wait(futures, return_when=FIRST_EXCEPTION)
                    for f in futures:
                        f.cancel()  # not started yet: dropped once one put has failed
                    wait(futures)
                    for f in futures:
                        if not f.cancelled():
                            f.result()
                if manifest_now:
                    put(enc.manifest_key, enc.manifest_bytes)
            except BaseException as exc:  # noqa: BLE001 - recorded per replica
                if stop.is_set():
                    return exc  # dropped: recorded then; _dropped_ended cleans up
                log.warning("replica %s failed to write rank %d of step %d: %s", r.url, s.rank, s.step, exc)
                self._mark_down(r, exc, enc.manifest.stream_bytes)
                return exc
            return None

        def written(pos: int) -> None:
            if votes is not None:
                votes.ready(_SAVE, pos)  # the other ranks may drop their slow writes elsewhere now

        def enough(outcome: Mapping[int, BaseException | None]) -> bool:
            ok = [p for p, e in outcome.items() if e is None]
            if votes is not None:  # written there by every rank, not only this one (dcp/_lag.py)
                ok = [p for p in ok if votes.ready_everywhere(_SAVE, p)]
            return len(ok) >= (self.min_replicas or 1)

        timeout = self.slow_replica_timeout_s if self.on_replica_error == "warn" else None

        def drop(pos: int, done: list[int]) -> BaseException:
            urls = [self.replicas[p].url for p in done]
            err = dropped_error(self.replicas[pos].url, s.step, s.rank, urls, timeout or 0.0)
            self._laggards.dropped(err)
            return err

        outcome, gone = write_positions(
            len(self.replicas), write, enough, timeout, written, drop, partial(self._dropped_ended, s)
        )
        if gone:
            with self._lock:
                self._dropped = [f for f in self._dropped if not f.done()] + gone
        return {pos: e for pos, e in outcome.items() if e is not None}

    def _dropped_ended(self, s: DcpSave, pos: int, cause: BaseException | None) -> None:
        """A dropped write's call returned (on its thread): after an outage the replica is marked
        down and its leftovers wait for ``prune``, as any failed save's; else its files go."""
        r = self.replicas[pos]
        try:
            if isinstance(cause, OSError) and not isinstance(cause, ReplicaLaggingError):
                self._mark_down(r, cause, s.enc.manifest.stream_bytes if s.enc is not None else 0)
            else:
                self._give_back(s, pos)
        finally:
            self._laggards.ended(r.url)  # whatever happened: else the replica is skipped for good

    # ------------------------------------------------------------------ the vote
    def _abort_everywhere(self, s: DcpSave, exc: BaseException) -> None:
        """This rank's save failed: nothing may commit, and nobody should wait for ``finish``."""
        if s.votes is None:
            return
        why = f"rank {s.rank}: {type(exc).__name__}: {exc}"
        for pos in range(len(self.replicas)):
            try:
                _vote_failed(s.votes, pos, why, s.failed.get(pos))
            except Exception as err:  # noqa: BLE001 - the store is gone too: the others time out
                log.warning("could not publish the abort of step %d: %s", s.step, err)
                break
        s.votes.close()

    def _report(self, s: DcpSave, pos: int) -> None:
        assert s.votes is not None and s.enc is not None
        if pos in s.failed:
            exc = s.failed[pos]
            _vote_failed(s.votes, pos, f"rank {s.rank}: {type(exc).__name__}: {exc}", exc)
            return
        s.votes.report(
            _SAVE,
            pos,
            {
                "state": "ok",
                "key": s.enc.manifest_key,
                "size": len(s.enc.manifest_bytes),
                "checksum": checksum(s.enc.manifest_bytes),
            },
        )

    def _report_and_commit_later(self, s: DcpSave) -> None:
        """A rank other than 0: report now; a thread writes the commit records once rank 0 decides."""
        assert s.votes is not None and s.enc is not None
        for pos in range(len(self.replicas)):
            self._report(s, pos)

        votes = s.votes

        def commit_all() -> None:
            outcome: dict[int, BaseException | None] = {}
            try:
                for pos, r in enumerate(self.replicas):
                    if pos in s.failed:
                        outcome[pos] = s.failed[pos]
                        continue
                    try:
                        self._commit(s, pos, votes.outcome(_SAVE, pos))
                        votes.ack(_SAVE, pos, {"state": "committed"})
                        outcome[pos] = None
                    except BaseException as exc:  # noqa: BLE001 - reported to rank 0 and logged
                        log.warning("step %d not committed on %s: %s", s.step, r.url, exc)
                        outcome[pos] = exc
                        if isinstance(exc, GiveBackAbortError):
                            self._give_back(s, pos)  # another rank found it full or dropped it: ours are orphans
                        try:
                            votes.ack(_SAVE, pos, {"state": "failed", "error": f"{type(exc).__name__}: {exc}"})
                        except Exception:  # noqa: BLE001 - rank 0 times out instead
                            pass
            finally:
                votes.close()
            self._record(s, outcome)
            self._prune(s, [p for p, e in outcome.items() if e is None])

        t = threading.Thread(target=commit_all, name="ckptmirror-dcp-commit", daemon=True)
        with self._lock:  # started under the lock: wait() must not join it before it starts
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _commit(self, s: DcpSave, pos: int, record: bytes) -> None:
        """Write the commit record ``record`` at ``pos``, after the share record that says which
        ranks the replica holds where only some ranks write to it (a node-local directory)."""
        assert s.enc is not None and s.info is not None
        r = self.replicas[pos]
        group = s.info.groups[pos] if s.info.groups else range(s.info.world_size)
        share = share_record(s.step, tuple(group), s.info.world_size, False, record)
        if share is not None:
            r.put(*share)
        commit_step(r, s.enc, record)

    def _commit_coordinator(self, s: DcpSave, pos: int) -> BaseException | None:
        """Rank 0 at one position: manifest, report, decide, commit record, every rank's acknowledgement."""
        r = self.replicas[pos]
        enc = s.enc
        assert enc is not None and s.info is not None
        try:
            if pos not in s.failed:
                try:
                    r.put(enc.manifest_key, enc.manifest_bytes)
                except BaseException as exc:  # noqa: BLE001 - this position fails; the others go on
                    self._mark_down(r, exc, enc.manifest.stream_bytes)
                    s.failed[pos] = exc
            if s.votes is None:
                if pos in s.failed:
                    if _full(s.failed[pos]):
                        self._give_back(s, pos)  # the manifest's write found it full
                    return s.failed[pos]
                commit_step(r, enc, enc.commit_bytes)
                return None
            self._report(s, pos)
            s.votes.decide(_SAVE, pos, partial(commit_from_reports, s.step, s.info.world_size, False))
            record = s.votes.outcome(_SAVE, pos)  # CoordinationError when aborted
            self._commit(s, pos, record)
            bad = [a for a in s.votes.acks(_SAVE, pos) if a.get("state") != "committed"]
            if bad:
                raise SaveFailedError(
                    s.step, {}, f"other ranks could not write the commit record at position {pos}: {bad}"
                )
            return None
        except BaseException as exc:  # noqa: BLE001 - recorded per position
            if pos in s.failed:
                return s.failed[pos]
            if isinstance(exc, GiveBackAbortError):
                self._give_back(s, pos)  # another rank found it full or dropped it: ours are orphans
            log.warning("step %d not committed at replica position %d (%s): %s", s.step, pos, r.url, exc)
            return exc

    def _record(self, s: DcpSave, outcome: Mapping[int, BaseException | None]) -> None:
        self.last_outcome = {
            self.replicas[p].url: "committed" if e is None else f"failed: {type(e).__name__}: {e}"
            for p, e in sorted(outcome.items())
        }
        for p, e in outcome.items():
            if e is None:
                self._laggards.committed(self.replicas[p].url)  # drops "in a row" start again

    # ------------------------------------------------------------------ replicas
    def _give_back(self, s: DcpSave, pos: int) -> None:
        """Nobody commits ``s``'s step at ``pos`` (the replica is full, or this rank's write
        there was dropped): delete what this rank put there, by its own writer token, in the
        background, once per save and position.
        Without it the failed save's files hold the space the next save needs, and a full
        replica that no save reaches is never cleaned up."""
        if pos in s.given_back or s.enc is None:
            return
        s.given_back.add(pos)
        enc = s.enc
        writers = {writer_of(o.key) for o in enc.manifest.objects} | {writer_of(enc.manifest_key)}
        t = threading.Thread(
            target=discard_failed_save,
            args=(self.replicas[pos], s.step, writers),
            name="ckptmirror-dcp-discard",
            daemon=True,
        )
        with self._lock:  # started under the lock: wait() must not join it before it starts
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _mark_down(self, r: Replica, exc: BaseException, need_bytes: int = 0) -> None:
        """A replica that failed with an OSError is skipped by later saves until it answers a
        ping; one that refused a write (full, read-only: ``WRITE_ERRNOS``) until a write probe
        for ``need_bytes`` passes too."""
        if isinstance(exc, OSError) and not isinstance(exc, (FileExistsError, ReplicaConfigError)):
            with self._lock:
                self._down[r.url] = f"{type(exc).__name__}: {exc}"
                if exc.errno in WRITE_ERRNOS:
                    self._need_write[r.url] = max(need_bytes, self._need_write.get(r.url, 0))

    def _ping_degraded(self) -> None:
        with self._lock:
            down = [(r, self._need_write.get(r.url)) for r in self.replicas if r.url in self._down]
        for r, need in down:
            try:
                if need is None:
                    r.ping()
                else:
                    r.probe_write(need)  # a full or read-only disk still answers a ping
            except ReplicaConfigError:
                raise
            except (CkptMirrorError, OSError) as exc:
                log.info("replica %s still unusable, skipped by this save: %s", r.url, exc)
                continue
            with self._lock:
                self._down.pop(r.url, None)
                self._need_write.pop(r.url, None)
            log.info("replica %s answers again", r.url)

    def _prune(self, s: DcpSave, committed: list[int]) -> None:
        """``keep_last`` where this rank committed and was elected to prune."""
        if self.keep_last is None or s.info is None:
            return
        for pos in committed:
            if not s.info.prune[pos]:
                continue
            r = self.replicas[pos]
            try:
                removed = apply_retention(r, s.step, self.keep_last)
                if removed:
                    log.info("retention on %s removed steps %s", r.url, removed)
            except (CkptMirrorError, OSError) as exc:
                log.warning("retention on %s failed after step %d: %s", r.url, s.step, exc)

    def _prune_later(self, s: DcpSave, committed: list[int]) -> None:
        if self.keep_last is None or not committed:
            return
        t = threading.Thread(target=self._prune, args=(s, committed), name="ckptmirror-dcp-retention", daemon=True)
        with self._lock:  # started under the lock: wait() must not join it before it starts
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for this rank's background commit-record and retention threads of earlier
        saves, and for the writes it dropped (each ends at its next object or its deadline)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            dropped = list(self._dropped)
        wait(dropped, timeout=timeout)
        with self._lock:
            threads = list(self._threads)  # after the dropped writes: their clean-up threads too
        for t in threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Wait for background threads, free the staging buffers, close the replicas opened from URLs."""
        self.wait(self.commit_timeout_s)
        self._staging.pool.release_memory()
        self._closer()

    def __enter__(self) -> MirrorStorageWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _vote_failed(votes: Coordinator, pos: int, why: str, exc: BaseException | None) -> None:
    """This rank's part at ``pos`` failed (``exc``, if it failed there): report it and publish
    the abort. Every rank gives its part there back when the replica is full, or when it
    answers but lags (a dropped write, a skip while one runs)."""
    space, back = _full(exc), isinstance(exc, ReplicaLaggingError)
    votes.report(_SAVE, pos, {"state": "failed", "error": why, "space": space, "give_back": back})
    votes.abort(_SAVE, pos, why, space=space, give_back=back)


def _full(exc: BaseException | None) -> bool:
    """Whether ``exc`` says the replica is full (``ENOSPC``, ``EDQUOT``)."""
    return isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS
