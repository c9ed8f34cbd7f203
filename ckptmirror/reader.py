"""Reading one step of one rank: fetch and verify objects, rebuild the state in place.

This is the middle of the read path: steps are found by :mod:`ckptmirror.discover`, and which
step is read, and what happens when it fails, is decided by :mod:`ckptmirror.choose`. For the
step it is given, :class:`StepReader`:

1. reads the commit record from the first replica (in preference order) where it parses;
2. fetches the rank manifest from any replica where it matches the size and checksum the
   commit pins, so a manifest can be taken from a replica other than the commit's;
3. checks the manifest (:func:`~ckptmirror.validate.validate_manifest`) and the restore
   targets (keys, shapes) *before* any tensor is touched; every object must be present with
   its recorded size on at least one replica;
4. reads objects in parallel into bounded buffers, verifies them (size, xxh3), and scatters
   them into the target tensors in place; an object that fails on one replica is fetched
   from the next. Only if an object verifies nowhere does the step fail (with one of
   :data:`STEP_FAILURES`), and the caller falls back to the previous step.

A sharded target (DTensor) whose layout differs from the stored one is resharded from every
stored rank's shards (:mod:`ckptmirror.reshard`).
"""

from __future__ import annotations

import bisect
import logging
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .checksum import checksum
from .errors import (
    CorruptObjectError,
    ManifestError,
    ObjectMissingError,
    ReplicaError,
    StateMismatchError,
)
from .format import (
    MAX_MANIFEST_BYTES,
    CommitRecord,
    RankManifest,
    commit_key,
    parse_commit,
    parse_rank_manifest,
)
from .replicas.base import Replica
from .staging import byte_view, host_bytes
from .reshard import Piece, StoredShard, Want, copy_piece, plan_pieces
from .tree import dtensor_local, is_dtensor, key_path, unflatten
from .validate import ManifestCheck, contiguous_strides, validate_manifest

log = logging.getLogger("ckptmirror")

#: Failures that make one step unrecoverable but let the reader fall back to an older one.
STEP_FAILURES = (CorruptObjectError, ObjectMissingError, ManifestError, ReplicaError)


@dataclass
class Loaded:
    """A step read back: the state tree, and which replica served each object."""

    step: int
    state: Any
    sources: dict[str, str] = field(default_factory=dict)  # object key -> replica URL


class _Target:
    """Where the bytes of one storage go: straight into a target tensor, or a fresh buffer."""

    def __init__(self, dest: torch.Tensor, direct: torch.Tensor | None) -> None:
        self.dest = dest  # uint8 view the bytes are copied into
        self.direct = direct  # the target tensor, when dest aliases it


def _lookup(tree: Any, path: tuple[Any, ...]) -> Any:
    node = tree
    for k in path:
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            return None
    return node


class StepReader:
    """Reads one step of one rank from a list of replicas, with per-object fallback."""

    def __init__(self, replicas: Sequence[Replica], pool: ThreadPoolExecutor, max_buffer_bytes: int) -> None:
        self.replicas = sorted(replicas, key=lambda r: r.read_priority)
        self.pool = pool
        self.max_buffer_bytes = max_buffer_bytes
        self._local = threading.local()

    # -- manifests -----------------------------------------------------------------------
    def read_commit(self, step: int, urls: Sequence[str] | None = None) -> CommitRecord:
        """The commit record of ``step`` from the first replica where it parses."""
        errors = []
        for r in self.replicas:
            if urls is not None and r.url not in urls:
                continue
            key = commit_key(step)
            try:
                return parse_commit(r.get(key, MAX_MANIFEST_BYTES), key)
            except STEP_FAILURES as exc:
                if isinstance(exc, ManifestError) and not exc.replica:
                    exc = ManifestError(str(exc).split(": ", 1)[-1], replica=r.url, key=key)
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ManifestError(
            "no replica holds a valid commit: " + "; ".join(str(e) for e in errors), key=commit_key(step)
        )

    def read_manifest(self, commit: CommitRecord, rank: int) -> RankManifest:
        """The rank manifest, verified against the commit's pin, from any replica."""
        ref = commit.manifest_ref(rank)
        errors: list[str] = []
        parse_failures = 0
        for r in self.replicas:
            try:
                data = r.get(ref.key, MAX_MANIFEST_BYTES)
                if len(data) != ref.size or checksum(data) != ref.checksum:
                    raise CorruptObjectError(f"rank manifest does not match the commit (size {len(data)} vs {ref.size}, checksum)", replica=r.url, key=ref.key)
                m = parse_rank_manifest(data, ref.key)
                if (m.step, m.rank, m.world_size) != (commit.step, ref.rank, commit.world_size):
                    raise ManifestError("rank manifest belongs to another step, rank or world size", replica=r.url, key=ref.key)
                return m
            except ManifestError as exc:
                parse_failures += 1
                errors.append(f"{r.url}: {exc}")
            except STEP_FAILURES as exc:
                errors.append(str(exc))
        cls = ManifestError if parse_failures == len(errors) else CorruptObjectError
        raise cls("no replica holds a valid, verifying copy: " + "; ".join(errors), key=ref.key)

    # -- objects -------------------------------------------------------------------------
    def _buffer(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self._local.buf = buf
        return buf[:nbytes]

    def preflight(self, m: RankManifest) -> dict[str, list[Replica]]:
        """For each object, the replicas to read it from, preferred first.

        Run before any tensor is modified, so a step that is missing objects everywhere is
        rejected without touching the caller's state. Replicas are asked in preference order
        until one holds the object with its recorded size; the ones after it stay as fallbacks
        without being asked (a read checks size and checksum anyway), so a local copy spares
        a HEAD request per object to every remote replica.
        """
        plan: dict[str, list[Replica]] = {}
        for obj in m.objects:
            problems = []
            for idx, r in enumerate(self.replicas):
                try:
                    size = r.size(obj.key)
                except STEP_FAILURES as exc:
                    problems.append(f"{r.url}: {exc}")
                    continue
                if size == obj.size:
                    plan[obj.key] = [r, *self.replicas[idx + 1 :]]
                    break
                problems.append(f"{r.url}: " + ("missing" if size is None else f"size {size}, expected {obj.size}"))
            else:
                # Truncated somewhere is corruption; absent everywhere is a missing object.
                cls = ObjectMissingError if all(p.endswith(": missing") for p in problems) else CorruptObjectError
                raise cls("no replica holds it with the recorded size (" + "; ".join(problems) + ")", key=obj.key)
        return plan

    def fetch(self, key: str, size: int, csum: str, candidates: Sequence[Replica], into: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        """Read one object from the first replica where it verifies: into ``into`` (a CPU uint8
        tensor of ``size`` bytes) when given, else into this thread's reusable buffer."""
        problems = []
        for r in candidates:
            buf = into if into is not None else self._buffer(size)
            try:
                r.read_into(key, host_bytes(buf))
                got = checksum(host_bytes(buf))
                if got != csum:
                    raise CorruptObjectError(f"checksum mismatch: stored {got}, manifest {csum}", replica=r.url, key=key)
                return buf, r.url
            except STEP_FAILURES as exc:
                log.warning("object %s failed on %s, trying the next replica: %s", key, r.url, exc)
                problems.append(str(exc))
        raise CorruptObjectError("no replica holds a verifying copy: " + "; ".join(problems), key=key)

    # -- the whole step ------------------------------------------------------------------
    def load(
        self,
        m: RankManifest,
        key: str,
        targets: Any = None,
        strict_paths: Sequence[tuple[Any, ...]] = (),
        validate: Callable[[Any], None] | None = None,
        shards: Callable[[], list[tuple[RankManifest, str]]] | None = None,
    ) -> Loaded:
        """Rebuild the state of ``m``; fill tensors of ``targets`` (same tree shape) in place.

        ``validate`` receives the state tree with :class:`~ckptmirror.validate.LeafSpec` placeholders for the
        tensors; it runs, like every other check, before any target tensor is written.
        ``shards`` lists every stored rank's manifest; it is needed only when a sharded target
        (DTensor) has another layout than the one stored, and is then resharded from them.
        """
        check = validate_manifest(m, key)
        esizes, dtypes, paths = check.esizes, check.dtypes, check.paths
        leaf_targets, wants, values = self._match_targets(m, check, targets, strict_paths)
        if validate is not None:
            validate(check.skeleton)
        pieces: list[Piece] = []
        stored: list[tuple[RankManifest, ManifestCheck, dict[str, list[Replica]]]] = []
        if wants:
            if shards is None:
                raise StateMismatchError("the target's sharding differs from the stored one, and no other rank's shards are available")
            for sm, skey in shards():
                sc = validate_manifest(sm, skey)
                stored.append((sm, sc, {}))
            pieces = plan_pieces(wants, [StoredShard(i, sc.boxes(sm)) for i, (sm, sc, _) in enumerate(stored)])
            for src in {p.source for p in pieces}:
                stored[src][2].update(self.preflight(stored[src][0]))
        skip = {i for i in range(len(m.leaves)) if paths.get(i) in {w.path for w in wants}}
        object_plan = self.preflight(m)
        storage_targets = self._storage_targets(m, leaf_targets, dtypes, esizes, skip)
        loaded = Loaded(m.step, None)
        self._read_objects(m, object_plan, storage_targets, loaded)
        for src in sorted({p.source for p in pieces}):
            sm, sc, splan = stored[src]
            needed = {sm.leaves[p.leaf].storage for p in pieces if p.source == src}
            bufs = [_Target(torch.empty(r.nbytes, dtype=torch.uint8), None) if j in needed else None for j, r in enumerate(sm.storages)]
            self._read_objects(sm, splan, bufs, loaded)
            for p in (p for p in pieces if p.source == src):
                lf = sm.leaves[p.leaf]
                buf = bufs[lf.storage]
                assert buf is not None and sc.dtypes[p.leaf] is not None
                leaf = torch.empty(0, dtype=sc.dtypes[p.leaf]).set_(buf.dest.untyped_storage(), lf.offset, lf.shape, lf.stride)
                copy_piece(p, leaf)
        leaves = self._build_leaves(m, storage_targets, leaf_targets, dtypes, values)
        loaded.state = unflatten(m.structure, lambda kind, i, path: leaves[i], key)
        return loaded

    def _match_targets(
        self, m: RankManifest, check: ManifestCheck, targets: Any, strict_paths: Sequence[tuple[Any, ...]]
    ) -> tuple[dict[int, torch.Tensor], list[Want], dict[int, Any]]:
        """Map stored leaves onto the caller's tensors.

        Returns the tensors to fill in place (for a DTensor: its local shard), the targets that
        need resharding, and what to put in the returned tree instead of a new tensor.
        """
        out: dict[int, torch.Tensor] = {}
        wants: list[Want] = []
        values: dict[int, Any] = {}
        paths = check.paths
        if targets is None:
            self._consolidate(m, check, set(), wants, values)
            return out, wants, values
        stored_paths = {p: i for i, p in paths.items()}
        problems = []
        for prefix in strict_paths:
            sub = _lookup(targets, prefix)
            if not isinstance(sub, dict):
                continue
            for k, v in sub.items():
                if isinstance(v, torch.Tensor) and prefix + (k,) not in stored_paths:
                    problems.append(f"{key_path('state', prefix + (k,))} is in the target but not in the checkpoint")
            stored_sub = _lookup_stored_keys(paths, prefix)
            for k in stored_sub:
                if k not in sub:
                    problems.append(f"{key_path('state', prefix + (k,))} is in the checkpoint but not in the target")
        for i, path in paths.items():
            t = _lookup(targets, path)
            if not isinstance(t, torch.Tensor):
                continue
            lf = m.leaves[i]
            if lf.kind != "tensor":
                problems.append(f"{key_path('state', path)}: checkpoint holds a numpy array, target a tensor")
                continue
            stored_g, stored_off = check.dtensors.get(i, (lf.shape, (0,) * len(lf.shape)))
            if is_dtensor(t) or i in check.dtensors:
                local, gshape, offset = dtensor_local(t) if is_dtensor(t) else (t, tuple(t.shape), (0,) * t.dim())
                if tuple(gshape) != tuple(stored_g):
                    problems.append(f"{key_path('state', path)}: checkpoint global shape {list(stored_g)}, target {list(gshape)}")
                    continue
                values[i] = t
                if tuple(local.shape) == lf.shape and tuple(offset) == tuple(stored_off):
                    out[i] = local  # same layout: fill this rank's shard in place
                else:
                    wants.append(Want(path, local, tuple(offset), tuple(gshape)))
            elif tuple(t.shape) != lf.shape:
                problems.append(f"{key_path('state', path)}: checkpoint shape {list(lf.shape)}, target shape {list(t.shape)}")
            else:
                out[i] = t
        if problems:
            raise StateMismatchError(f"step {m.step} does not fit the restore target:\n  " + "\n  ".join(problems[:50]))
        self._consolidate(m, check, set(values) | set(out), wants, values)
        return out, wants, values

    @staticmethod
    def _consolidate(m: RankManifest, check: ManifestCheck, handled: set[int], wants: list[Want], values: dict[int, Any]) -> None:
        """A stored shard with nothing to fill becomes a new, whole tensor (gathered from every
        rank's shards): a plain process reading a sharded checkpoint gets full tensors."""
        for i, (gshape, _) in check.dtensors.items():
            if i in handled:
                continue
            dtype = check.dtypes[i]
            assert dtype is not None
            whole = torch.empty(gshape, dtype=dtype)
            values[i] = whole
            wants.append(Want(check.paths[i], whole, (0,) * len(gshape), tuple(gshape)))

    def _storage_targets(
        self, m: RankManifest, leaf_targets: dict[int, torch.Tensor], dtypes: list[torch.dtype | None], esizes: list[int], skip: set[int]
    ) -> list[_Target | None]:
        """Where each storage's bytes go; None for storages only resharded leaves use (not read)."""
        users: dict[int, list[int]] = {}
        for i, lf in enumerate(m.leaves):
            users.setdefault(lf.storage, []).append(i)
        out: list[_Target | None] = []
        for s, rec in enumerate(m.storages):
            direct = None
            members = users.get(s, [])
            if members and all(i in skip for i in members):
                out.append(None)
                continue
            if len(members) == 1 and members[0] in leaf_targets:
                i = members[0]
                lf, t = m.leaves[i], leaf_targets[i]
                if (
                    lf.offset == 0
                    and lf.stride == contiguous_strides(lf.shape)
                    and t.dtype == dtypes[i]
                    and t.is_contiguous()
                    and t.numel() * esizes[i] == rec.nbytes
                    and type(t) in (torch.Tensor, torch.nn.Parameter)
                ):
                    direct = t
            if direct is not None and rec.nbytes:
                dest = byte_view(direct.untyped_storage(), int(direct.storage_offset()) * direct.element_size(), rec.nbytes)
            else:
                direct = None
                dest = torch.empty(rec.nbytes, dtype=torch.uint8)
            out.append(_Target(dest, direct))
        return out

    def _read_objects(self, m: RankManifest, plan: dict[str, list[Replica]], targets: Sequence[_Target | None], loaded: Loaded) -> None:
        # Storages with bytes, by offset; the manifest check guarantees they do not overlap,
        # so the storages an object touches are a contiguous run found by bisection. Storages
        # without a target are not wanted, and objects that hold none that are, are not read.
        order = sorted((i for i, s in enumerate(m.storages) if s.nbytes and targets[i] is not None), key=lambda i: m.storages[i].offset)
        sorted_starts = [m.storages[i].offset for i in order]
        obj_offsets = []
        acc = 0
        for o in m.objects:
            obj_offsets.append(acc)
            acc += o.size
        lock = threading.Lock()
        failed = threading.Event()

        def work(j: int) -> None:
            if failed.is_set():
                return  # the step is lost already; do not write more of it into the targets
            obj = m.objects[j]
            lo, hi = obj_offsets[j], obj_offsets[j] + obj.size
            # An object that lies inside one storage filled in place on the CPU is read straight
            # into it (verified there; a mismatch is read again from the next replica): no copy.
            k = max(0, bisect.bisect_right(sorted_starts, lo) - 1)
            rec0 = m.storages[order[k]] if order else None
            tgt0 = targets[order[k]] if order else None
            direct = None
            if rec0 is not None and tgt0 is not None and tgt0.direct is not None and not tgt0.dest.is_cuda:
                if rec0.offset <= lo and hi <= rec0.offset + rec0.nbytes:
                    direct = tgt0.dest[lo - rec0.offset : hi - rec0.offset]
            try:
                buf, url = self.fetch(obj.key, obj.size, obj.checksum, plan[obj.key], into=direct)
            except BaseException:
                failed.set()
                raise
            if direct is not None:
                with lock:
                    loaded.sources[obj.key] = url
                return
            # Storages overlapping [lo, hi): those starting before hi, minus those ending before lo.
            k = max(0, bisect.bisect_right(sorted_starts, lo) - 1)
            while k < len(order) and sorted_starts[k] < hi:
                rec = m.storages[order[k]]
                a, b = max(lo, rec.offset), min(hi, rec.offset + rec.nbytes)
                tgt = targets[order[k]]
                if a < b and tgt is not None:
                    tgt.dest[a - rec.offset : b - rec.offset].copy_(buf[a - lo : b - lo])
                k += 1
            with lock:
                loaded.sources[obj.key] = url

        wanted: set[int] = set()
        for idx in order:  # the objects that overlap a wanted storage
            rec = m.storages[idx]
            first = max(0, bisect.bisect_right(obj_offsets, rec.offset) - 1)
            wanted.update(range(first, bisect.bisect_left(obj_offsets, rec.offset + rec.nbytes)))
        futures = [self.pool.submit(work, j) for j in sorted(wanted)]
        # Every read must be over before we return or raise: a straggler writing into the
        # targets after a fallback to an older step would mix two steps.
        wait(futures)
        for f in futures:
            f.result()

    def _build_leaves(
        self, m: RankManifest, targets: list[_Target | None], leaf_targets: dict[int, torch.Tensor], dtypes: list[torch.dtype | None], values: dict[int, Any]
    ) -> list[Any]:
        out: list[Any] = []
        for i, lf in enumerate(m.leaves):
            tgt = targets[lf.storage]
            if tgt is None:  # filled by resharding
                out.append(values[i])
                continue
            if lf.kind == "ndarray":
                import numpy as np

                dt = np.dtype(lf.dtype)
                arr = np.empty(lf.shape, dtype=dt)
                n = arr.nbytes
                arr.reshape(-1).view(np.uint8)[:] = tgt.dest.numpy()[lf.offset * dt.itemsize : lf.offset * dt.itemsize + n]
                out.append(arr)
                continue
            if tgt.direct is not None:
                out.append(values.get(i, leaf_targets[i]))
                continue
            dtype = dtypes[i]
            assert dtype is not None
            t = torch.empty(0, dtype=dtype).set_(tgt.dest.untyped_storage(), lf.offset, lf.shape, lf.stride)
            if i in leaf_targets:
                target = leaf_targets[i]
                with torch.no_grad():
                    target.copy_(t)
                out.append(values.get(i, target))
                continue
            if lf.parameter:
                t = torch.nn.Parameter(t, requires_grad=lf.requires_grad)
            elif lf.requires_grad and t.is_floating_point():
                t.requires_grad_(True)
            out.append(t)
        return out


def _lookup_stored_keys(paths: dict[int, tuple[Any, ...]], prefix: tuple[Any, ...]) -> set[Any]:
    n = len(prefix)
    return {p[n] for p in paths.values() if len(p) > n and p[:n] == prefix}
