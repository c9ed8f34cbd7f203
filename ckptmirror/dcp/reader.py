"""``MirrorStorageReader``: ``dcp.load`` from ckptmirror replicas, verified, without pickle.

Call order (DCP's ``StorageReader`` protocol; "all" = every rank)::

    reset(checkpoint_id)           all, only when dcp.load got a checkpoint_id
    read_metadata()                all: choose the step (newest that every rank can recover, or the
                                   one asked for), read and verify every rank manifest, rebuild
                                   DCP's Metadata from JSON
    set_up_storage_reader(md)      all
    prepare_local_plan(plan)       all (unchanged)
    prepare_global_plan(plans)     coordinator (unchanged)
    read_data(plan, planner)       all: read the objects this rank's plan needs, each from the first
                                   replica where it verifies; copy the requested regions into the
                                   planner's tensors; values go to planner.load_bytes as JSON

Choosing the step happens in ``read_metadata``, the only place DCP lets a reader decide before
it plans: each rank probes steps newest first (commit record, every rank manifest verified
against the commit, DCP's metadata parsed, and the objects it will most likely read present
with their size somewhere), and the ranks vote through the store, as
:class:`~ckptmirror.Mirror` does, until they agree on the newest step all of them can recover.
An object that verifies on no replica, found only in ``read_data``, fails the load (DCP cannot
switch steps once planned); the step is remembered as bad, and the next load falls back.

Nothing here calls ``pickle`` or ``torch.load``: manifests and metadata are JSON, tensors raw
bytes, and non-tensor values are handed to :class:`~ckptmirror.dcp.MirrorLoadPlanner` (required
when the step holds any) as ckptmirror JSON.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import logging
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future as TorchFuture

from ..buffers import byte_view, copy_bytes, host_array
from ..dist import Coordinator, DistInfo, detect
from ..errors import (
    CorruptObjectError,
    ManifestError,
    NoValidCheckpointError,
    ReplicaUnavailableError,
    StepNotFoundError,
)
from ..format import CommitRecord, RankManifest, commit_key
from ..replicas import Replica
from ..restore.check import ManifestCheck, contiguous_strides, validate_manifest
from ..restore.discover import list_steps
from ..restore.fetch import STEP_FAILURES, Fetcher, ObjectPlan, is_damage
from ..state.tree import JSON
from ._codec import Location, RankIndex, decode_plain, parse_rank_index, tree_to_metadata, value_bytes_of_node
from ._common import check_step, is_bad, mark_bad, next_load_prefix, open_for, step_from_checkpoint_id
from .planners import MirrorLoadPlanner

log = logging.getLogger("ckptmirror")


@dataclass
class _Step:
    """A step probed and chosen: what reading it needs."""

    step: int
    commit: CommitRecord
    manifests: list[RankManifest]
    checks: list[ManifestCheck]
    indexes: list[RankIndex]
    raw_state: list[dict[str, JSON]]  # per rank: state key -> its JSON node as stored
    metadata: Metadata
    plans: dict[int, ObjectPlan] = field(default_factory=dict)  # rank -> preflighted objects
    _leaf_of: dict[int, dict[str, int]] = field(default_factory=dict)
    _object_starts: dict[int, list[int]] = field(default_factory=dict)

    def leaf_of(self, rank: int) -> dict[str, int]:
        """State key -> leaf index of ``rank``'s tensors (computed once per rank and step)."""
        out = self._leaf_of.get(rank)
        if out is None:
            paths = self.checks[rank].paths.items()
            out = {path[1]: i for i, path in paths if len(path) == 2 and path[0] == "state"}
            self._leaf_of[rank] = out
        return out

    def object_starts(self, rank: int) -> list[int]:
        """Stream offset of each object of ``rank``."""
        out = self._object_starts.get(rank)
        if out is None:
            out = list(accumulate((o.size for o in self.manifests[rank].objects), initial=0))[:-1]
            self._object_starts[rank] = out
        return out


@dataclass
class _RankRead:
    """What one load reads of one stored rank: the storages it needs and the objects that hold them."""

    rank: int
    users: dict[int, list[tuple[ReadItem, int, torch.Tensor]]] = field(default_factory=dict)  # storage -> requests
    buffers: dict[int, torch.Tensor] = field(default_factory=dict)  # storage -> its bytes' destination (uint8)
    direct: set[int] = field(default_factory=set)  # storages whose destination is the target itself
    objects: dict[int, list[tuple[int, np.ndarray]]] = field(default_factory=dict)  # object -> (offset, dst)
    into: dict[int, torch.Tensor] = field(default_factory=dict)  # object -> where it is read whole
    plan: ObjectPlan = field(default_factory=dict)
    manifest: RankManifest | None = None


class MirrorStorageReader(StorageReader):
    """A DCP ``StorageReader`` that loads a step from ckptmirror replicas.

    Args:
        replicas: this rank's replica URLs or :class:`~ckptmirror.replicas.Replica` objects (as
            for :class:`~ckptmirror.Mirror`); each object is read from the first one where its
            size and checksum verify, falling back replica by replica.
        step: the step to load. None: the step named by ``dcp.load``'s ``checkpoint_id`` (its
            trailing integer) if given, else the newest step every rank can recover, falling
            back to older steps (all ranks agree).
        io_threads: concurrent object reads.
        storage_options, process_group, commit_timeout_s: as for :class:`~ckptmirror.Mirror`
            (``commit_timeout_s`` bounds how long the ranks wait for each other's vote).
        no_dist: load in this process alone even when torch.distributed is initialised (as
            ``dcp.load(no_dist=True)``).

    After a load, :attr:`step` is the step loaded and :attr:`sources` says which replica
    served each object. Loading on another world size or layout works as far as DCP's
    resharding does (each rank reads the parts of every stored rank's chunks it needs).
    """

    def __init__(
        self,
        replicas: Sequence[str | Replica] | str | Replica,
        step: int | None = None,
        *,
        io_threads: int = 4,
        storage_options: Mapping[str, Mapping[str, Any]] | None = None,
        process_group: Any = None,
        no_dist: bool = False,
        commit_timeout_s: float = 300.0,
    ) -> None:
        super().__init__()
        if step is not None:
            check_step(step)
        self.requested = step
        self.io_threads = io_threads
        self.commit_timeout_s = commit_timeout_s
        self.dist: DistInfo = DistInfo() if no_dist else detect(process_group)
        self.replicas, self._closer = open_for(replicas, self.dist, storage_options, self)
        self._checkpoint_id: str | os.PathLike[str] | None = None
        self._chosen: _Step | None = None
        self._error: BaseException | None = None
        self._pool: ThreadPoolExecutor | None = None
        #: The step loaded by the last read_metadata().
        self.step: int | None = None
        #: Object key -> URL of the replica that served it, for the last load.
        self.sources: dict[str, str] = {}

    # ------------------------------------------------------------------ StorageReader
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Remember ``checkpoint_id``: its trailing integer names the step when ``step`` is None."""
        self._checkpoint_id = checkpoint_id

    @property
    def checkpoint_id(self) -> str | os.PathLike[str] | None:
        """The ``checkpoint_id`` DCP gave, or None."""
        return self._checkpoint_id

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Never chosen automatically from a ``checkpoint_id``: pass the reader explicitly."""
        return False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Choose the step (all ranks agree) and rebuild its DCP ``Metadata`` from JSON.

        Raises :class:`StepNotFoundError` when no step is committed (or not the one asked for),
        :class:`NoValidCheckpointError` when steps exist but none is recoverable by every rank.
        """
        if "rank" in kwargs:
            # DCP retries with rank-local metadata after a failure; there is none, and probing
            # again would start a second vote the other ranks are not part of.
            raise RuntimeError("ckptmirror steps have no rank-local DCP metadata") from self._error
        try:
            chosen = self._choose()
        except BaseException as exc:
            self._error = exc
            raise
        self._chosen = chosen
        self.step = chosen.step
        self.sources = {}
        md = chosen.metadata
        cid = self._checkpoint_id
        sm = md.storage_meta or StorageMeta()
        md.storage_meta = StorageMeta(
            checkpoint_id=sm.checkpoint_id if cid is None else os.fspath(cid),
            save_id=sm.save_id,
            load_id=uuid.uuid4().hex,
            modules=list(sm.modules),
        )
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Check that DCP loads with the ranks this reader voted with."""
        rank = kwargs.get("rank", self.dist.rank)
        if rank != self.dist.rank:
            raise ValueError(
                f"DCP runs this rank as rank {rank}, MirrorStorageReader's process group as rank {self.dist.rank}: "
                "pass MirrorStorageReader(process_group=...) the group DCP loads with (or no_dist=True)"
            )
        if self._chosen is None:
            raise RuntimeError("MirrorStorageReader: read_metadata was not called")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Unchanged: DCP's planner decides what this rank reads."""
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Unchanged."""
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> TorchFuture[None]:
        """Read what ``plan`` asks for, verified, into the planner's tensors and values."""
        chosen = self._chosen
        if chosen is None:
            raise RuntimeError("MirrorStorageReader: read_metadata was not called")
        storage: dict[MetadataIndex, Location] = chosen.metadata.storage_data
        values = [r for r in plan.items if r.type == LoadItemType.BYTE_IO]
        if values and not isinstance(planner, MirrorLoadPlanner):
            raise TypeError(
                f"step {chosen.step} holds non-tensor values ({values[0].dest_index.fqn!r}, ...) and "
                f"{type(planner).__name__} would unpickle them with torch.load: pass planner=MirrorLoadPlanner() "
                "to dcp.load"
            )
        by_rank: dict[int, list[ReadItem]] = {}
        for req in plan.items:
            if req.type != LoadItemType.BYTE_IO:
                by_rank.setdefault(storage[req.storage_index].rank, []).append(req)
        try:
            # A new Fetcher per load: its per-thread bounce buffers are freed with it.
            fetcher = Fetcher(self.replicas, self._executor(), skip_unavailable=True)
            ranks = [self._plan_rank(fetcher, chosen, rank, by_rank[rank], planner) for rank in sorted(by_rank)]
            self._read_objects(fetcher, ranks)
            for rr in ranks:
                self._finish_rank(chosen, rr, planner)
        except STEP_FAILURES as exc:
            if not is_damage(exc):  # no replica could be reached or read: the step may be intact
                raise ReplicaUnavailableError(
                    f"step {chosen.step} could not be read: {exc}. DCP loads into the state_dict's tensors in "
                    f"place, so some of them may now hold part of step {chosen.step}: do not train on this "
                    "state_dict; load again once the replicas answer"
                ) from exc
            mark_bad([r.url for r in self.replicas], chosen.step)
            raise CorruptObjectError(
                f"step {chosen.step} cannot be read: {exc}. DCP loads into the state_dict's tensors in place, "
                f"so some of them may now hold part of step {chosen.step} (its non-tensor values were not "
                "loaded): do not train on this state_dict. The step is marked bad in this process: loading "
                "again falls back to an older step on every rank"
            ) from exc
        # The values last: a load that failed above left them as they were.
        for req in values:
            loc = storage[req.storage_index]
            planner.load_bytes(req, io.BytesIO(value_bytes_of_node(chosen.raw_state[loc.rank][loc.key])))
        fut: TorchFuture[None] = TorchFuture()
        fut.set_result(None)
        return fut

    # ------------------------------------------------------------------ choosing the step
    def _choose(self) -> _Step:
        listing = list_steps(self.replicas)
        urls = [r.url for r in self.replicas]
        wanted = self.requested if self.requested is not None else step_from_checkpoint_id(self._checkpoint_id)
        agree = None
        coord: Coordinator | None = None
        prefix = next_load_prefix()  # taken by every load, so that the ranks' counters stay in step
        if self.dist.distributed and wanted is None:
            # Only "the newest step every rank can recover" needs a vote. A step named by the
            # caller is the same on every rank, and a rank that cannot load it raises here,
            # inside DCP's planning collective, which fails the load on every rank.
            coord = Coordinator(self.dist, prefix, self.commit_timeout_s)
            agree = coord.exchange
        candidates = [wanted] if wanted is not None else sorted(listing.committed, reverse=True)
        candidates = [s for s in candidates if s in listing.committed]
        problems: dict[int, str] = {}
        fetcher = Fetcher(self.replicas, self._executor(), skip_unavailable=True)

        def probe(s: int) -> _Step:
            if is_bad(urls, s):
                raise CorruptObjectError("an object failed to verify anywhere in an earlier load", key=commit_key(s))
            return self._probe(fetcher, s, listing.committed[s])

        try:
            if agree is None:
                for s in candidates:
                    try:
                        return probe(s)
                    except STEP_FAILURES as exc:
                        if wanted is not None:
                            raise
                        log.warning("step %d cannot be loaded, falling back to an older step: %s", s, exc)
                        problems[s] = f"{type(exc).__name__}: {exc}"
                if problems:
                    raise NoValidCheckpointError(problems)
                raise StepNotFoundError(wanted, list(listing.committed), urls)
            return self._agree(candidates, probe, agree, problems, wanted, listing.committed, urls)
        finally:
            if coord is not None:
                coord.close()

    def _agree(
        self,
        candidates: list[int],
        probe: Any,
        agree: Any,
        problems: dict[int, str],
        wanted: int | None,
        committed: Mapping[int, list[str]],
        urls: list[str],
    ) -> _Step:
        """The ranks vote until they name the same step: the newest that every one can recover."""
        bound = candidates[0] if candidates else -1
        for rnd in range(len(candidates) * 2 + 2):
            mine, found = -1, None
            for s in (c for c in candidates if c <= bound):
                try:
                    found = probe(s)
                    mine = s
                    break
                except STEP_FAILURES as exc:
                    log.warning("step %d cannot be loaded on rank %d: %s", s, self.dist.rank, exc)
                    problems[s] = f"rank {self.dist.rank}: {type(exc).__name__}: {exc}"
            votes = agree(f"probe{rnd}", {"step": mine, "any": bool(candidates)})
            if not any(v["any"] for v in votes):
                raise StepNotFoundError(wanted, list(committed), urls)
            steps = [v["step"] for v in votes]
            lo = min(steps)
            if lo < 0:
                lost = [r for r, v in enumerate(votes) if v["step"] < 0]
                raise NoValidCheckpointError(
                    problems, replicas=urls, note=f"rank(s) {lost} cannot recover a step the others can"
                )
            if lo == max(steps):
                assert found is not None
                if lo != candidates[0]:
                    log.warning("all ranks load step %d (newer steps cannot be loaded everywhere)", lo)
                return found
            bound = lo
        raise NoValidCheckpointError(problems)

    def _probe(self, fetcher: Fetcher, s: int, urls: Sequence[str]) -> _Step:
        """Everything that can be checked before planning: records, metadata, objects present.
        Another replica's commit record of the step is tried when the first one read does not
        verify (a damaged record still parses: see ``Fetcher.other_commits``)."""
        return fetcher.probe_commits(fetcher.read_commit(s, urls), urls, partial(self._probe_commit, fetcher))

    def _probe_commit(self, fetcher: Fetcher, commit: CommitRecord) -> _Step:
        s = commit.step
        if commit.replicated:
            raise ManifestError("a replicated Mirror step, not written through DCP", key=commit_key(s))
        manifests, checks, indexes, raw = [], [], [], []
        for r in range(commit.world_size):
            m = fetcher.read_manifest(commit, r)
            key = commit.manifest_ref(r).key
            check = validate_manifest(m, key)  # the whole tree, the index included, is valid
            top = _items(m.structure) or {}
            state = _items(top.get("state"))
            # Only the index is decoded again (the fast way: it is most of the tree on rank 0,
            # DCP's metadata); the state's nodes are handed on as stored.
            dcp = decode_plain(top["dcp"], key) if "dcp" in top else None
            index = parse_rank_index({"dcp": dcp, "state": state}, key, commit.world_size, r, s)
            assert state is not None  # parse_rank_index refuses a tree without a state dict
            manifests.append(m)
            checks.append(check)
            indexes.append(index)
            raw.append(state)
        if indexes[0].metadata is None:
            raise ManifestError("rank 0's manifest holds no DCP metadata", key=commit.manifest_ref(0).key)
        md = tree_to_metadata(indexes[0].metadata, commit.manifest_ref(0).key, commit.world_size)
        _check_locations(md, manifests, checks, raw, commit)
        chosen = _Step(s, commit, manifests, checks, indexes, raw, md)
        # The objects this rank will most likely read: its own on the same world size (DCP
        # reads replicated items from whichever rank stored them: those are fetched with
        # fallback over every replica), every rank's when resharding.
        own = self.dist.rank if commit.world_size == self.dist.world_size else None
        for r in range(commit.world_size) if own is None else [own]:
            chosen.plans[r] = fetcher.preflight(manifests[r])
        return chosen

    # ------------------------------------------------------------------ reading
    def _plan_rank(
        self, fetcher: Fetcher, chosen: _Step, rank: int, reqs: list[ReadItem], planner: LoadPlanner
    ) -> _RankRead:
        """Where each stored storage of ``rank`` that ``reqs`` need goes, and the objects that hold them.

        A storage requested whole into a contiguous CPU tensor of its dtype is read straight into
        that tensor; anything else (part of a chunk when resharding, another dtype or device) goes
        through a buffer of the storage's size, copied into the targets afterwards.
        """
        m, check = chosen.manifests[rank], chosen.checks[rank]
        leaf_of = chosen.leaf_of(rank)
        storage_data: dict[MetadataIndex, Location] = chosen.metadata.storage_data
        rr = _RankRead(rank)
        for req in reqs:
            leaf = leaf_of[storage_data[req.storage_index].key]
            target = planner.resolve_tensor(req).detach()
            rr.users.setdefault(m.leaves[leaf].storage, []).append((req, leaf, target))
        for sidx, users in rr.users.items():
            rec = m.storages[sidx]
            req, leaf, target = users[0]
            lf = m.leaves[leaf]
            if (
                rec.nbytes
                and len(users) == 1
                and lf.offset == 0
                and lf.stride == contiguous_strides(lf.shape)
                and not any(req.storage_offsets)
                and tuple(req.lengths) == lf.shape
                and target.device.type == "cpu"
                and target.is_contiguous()
                and target.dtype == check.dtypes[leaf]
                and target.numel() * target.element_size() == rec.nbytes
            ):
                buf = byte_view(
                    target.untyped_storage(), int(target.storage_offset()) * target.element_size(), rec.nbytes
                )
                rr.direct.add(sidx)
            else:
                buf = torch.empty(rec.nbytes, dtype=torch.uint8)
            rr.buffers[sidx] = buf
        # The objects overlapping the wanted storages, each with the pieces it fills.
        order = sorted((i for i in rr.buffers if m.storages[i].nbytes), key=lambda i: m.storages[i].offset)
        obj_start = chosen.object_starts(rank)
        for sidx in order:
            rec = m.storages[sidx]
            dst = host_array(rr.buffers[sidx])
            j = max(0, bisect.bisect_right(obj_start, rec.offset) - 1)
            while j < len(m.objects) and obj_start[j] < rec.offset + rec.nbytes:
                lo, hi = obj_start[j], obj_start[j] + m.objects[j].size
                a, b = max(lo, rec.offset), min(hi, rec.offset + rec.nbytes)
                if a < b:
                    pieces = rr.objects.setdefault(j, [])
                    pieces.append((a - lo, dst[a - rec.offset : b - rec.offset]))
                    if a == lo and b == hi and len(pieces) == 1:
                        # The whole object lies in this storage: read it straight into place.
                        rr.into[j] = rr.buffers[sidx][a - rec.offset : b - rec.offset]
                    else:
                        rr.into.pop(j, None)
                j += 1
        # Objects of a rank probed without a preflight (DCP reads another rank's deduplicated
        # items): find the replica that holds each one now, as for the own rank's, so that a
        # node-local replica that holds only its own node's ranks is not tried (and warned about).
        plan = chosen.plans.setdefault(rank, {})
        missing = [m.objects[j] for j in rr.objects if m.objects[j].key not in plan]
        if missing:
            plan.update(fetcher.preflight(dataclasses.replace(m, objects=tuple(missing))))
        rr.plan = plan
        rr.manifest = m
        return rr

    def _read_objects(self, fetcher: Fetcher, ranks: list[_RankRead]) -> None:
        """Read every needed object once, verified: straight into its storage when it lies in one,
        else into a per-thread buffer whose pieces are copied out (NumPy: no OpenMP region)."""
        jobs = [(rr, j) for rr in ranks for j in sorted(rr.objects)]
        lock = threading.Lock()

        def work(job: tuple[_RankRead, int]) -> None:
            rr, j = job
            assert rr.manifest is not None
            obj = rr.manifest.objects[j]
            into = rr.into.get(j)
            buf, url = fetcher.fetch(obj.key, obj.size, obj.checksum, rr.plan.get(obj.key, fetcher.replicas), into=into)
            with lock:
                self.sources[obj.key] = url
            if into is None:
                src = host_array(buf)
                for off, dst in rr.objects[j]:
                    copy_bytes(dst, src[off : off + len(dst)])

        if len(jobs) == 1:
            work(jobs[0])  # nothing to overlap with: no hand-off to a pool thread
            return
        futures = [fetcher.pool.submit(work, job) for job in jobs]
        wait(futures)
        for f in futures:
            f.result()

    def _finish_rank(self, chosen: _Step, rr: _RankRead, planner: LoadPlanner) -> None:
        """Copy the buffered storages' requested regions into their targets; hand every target back."""
        m, check = chosen.manifests[rr.rank], chosen.checks[rr.rank]
        for sidx, users in rr.users.items():
            for req, leaf, target in users:
                if sidx not in rr.direct:
                    lf = m.leaves[leaf]
                    dtype = check.dtypes[leaf]
                    assert dtype is not None
                    src = torch.empty(0, dtype=dtype).set_(
                        rr.buffers[sidx].untyped_storage(), lf.offset, lf.shape, lf.stride
                    )
                    for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                        src = src.narrow(dim, start, length)
                    if tuple(target.shape) != tuple(src.shape):
                        raise ManifestError(
                            f"{req.storage_index.fqn}: stored region {tuple(src.shape)}, target {tuple(target.shape)}",
                            key=chosen.commit.manifest_ref(rr.rank).key,
                        )
                    with torch.no_grad():
                        target.copy_(src)
                planner.commit_tensor(req, target)

    def _executor(self) -> ThreadPoolExecutor:
        """This reader's object-reading threads, started once for the probe and every read."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="ckptmirror-read")
        return self._pool

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the reading threads; close the replicas opened from URLs."""
        self._chosen = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._closer()

    def __enter__(self) -> MirrorStorageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _items(node: JSON) -> dict[str, JSON] | None:
    """The entries of a dict node as stored (key -> JSON node), or None when it is no such node.

    Used on trees that :func:`validate_manifest` accepted: a dict node's items are pairs there.
    """
    if not (isinstance(node, dict) and node.get("t") == "dict"):
        return None
    return {k: v for k, v in node["items"] if isinstance(k, str)}


def _check_locations(
    md: Metadata, manifests: list[RankManifest], checks: list[ManifestCheck], raw: list[dict[str, JSON]], commit: Any
) -> None:
    """Every stored location the metadata names exists, holds the right kind, dtype and shape."""
    for idx, loc in md.storage_data.items():
        where = commit.manifest_ref(loc.rank).key
        meta = md.state_dict_metadata[idx.fqn]
        node = raw[loc.rank].get(loc.key)
        is_tensor = isinstance(node, dict) and node.get("t") in ("tensor", "dtensor")
        if loc.key not in raw[loc.rank] or is_tensor != isinstance(meta, TensorStorageMetadata):
            raise ManifestError(f"{idx.fqn!r} is not stored as the metadata describes it", key=where)
        if not isinstance(meta, TensorStorageMetadata):
            continue
        assert isinstance(node, dict)
        leaf = node["i"]
        lf = manifests[loc.rank].leaves[leaf]
        chunk = next((c for c in meta.chunks if tuple(c.offsets) == tuple(idx.offset or ())), None)
        if chunk is None or tuple(chunk.sizes) != lf.shape or checks[loc.rank].dtypes[leaf] != meta.properties.dtype:
            raise ManifestError(
                f"{idx.fqn!r}: stored {lf.dtype}{list(lf.shape)} does not match the metadata's chunk", key=where
            )
