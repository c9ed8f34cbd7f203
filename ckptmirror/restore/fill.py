"""Fill: rebuild one rank's state of one step, in the caller's tensors where it has them.

The last stage of the read path. Given a manifest whose objects were preflighted
(:mod:`~ckptmirror.restore.fetch`), :func:`fill_step`:

1. checks the manifest (:func:`~ckptmirror.restore.check.validate_manifest`) and matches the
   stored leaves onto the restore targets (keys, shapes, dtypes) *before* any tensor is touched;
2. reads objects in parallel through the :class:`~ckptmirror.restore.fetch.Fetcher` (verified
   there) and scatters them into the target tensors in place; an object that lies inside one
   contiguous CPU target is read straight into it, with no copy;
3. builds the state tree: the caller's tensors where it gave them, new tensors elsewhere.

A sharded target (DTensor) whose layout differs from the stored one is resharded from every
stored rank's shards (:mod:`ckptmirror.state.reshard`).
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Any

import torch

from ..buffers import byte_view
from ..errors import StateMismatchError
from ..format import ObjectRecord, RankManifest
from ..replicas.base import Replica
from ..state.reshard import Piece, StoredShard, Want, copy_piece, plan_pieces
from ..state.tree import dtensor_local, is_dtensor, key_path, unflatten
from .check import ManifestCheck, contiguous_strides, validate_manifest
from .fetch import Fetcher, ObjectPlan
from .undo import BufferFactory, Landing, UndoLog

log = logging.getLogger("ckptmirror")


@dataclass
class Loaded:
    """A step read back: the state tree, and which replica served each object."""

    step: int
    state: Any
    sources: dict[str, str] = field(default_factory=dict)  # object key -> replica URL
    #: what was overwritten in the caller's tensors (None when nothing of theirs was written)
    undo: UndoLog | None = None
    #: verified bytes for the caller's tensors that have not landed yet (``defer=True``)
    landing: Landing | None = None

    def land(self, threads: int = 2) -> None:
        """Copy the verified bytes that wait in :attr:`landing` into the caller's tensors."""
        if self.landing is not None:
            self.landing.land(threads)

    def abandon(self) -> None:
        """The restore failed: put back what landed, drop what waits."""
        if self.undo is not None:
            self.undo.rollback()
        if self.landing is not None:
            self.landing.discard()


class _Target:
    """Where the bytes of one storage go: straight into the caller's tensor, or a fresh buffer.

    ``ptr`` is the host address of the first byte, so that bytes land with a plain memmove
    (per-storage torch views and copies cost microseconds each: seconds at 50k tensors);
    it is 0 for a CUDA tensor, whose bytes go through ``dest``, a uint8 view of it.
    """

    __slots__ = ("dest", "direct", "ptr")

    def __init__(self, dest: torch.Tensor | None, direct: torch.Tensor | None, ptr: int) -> None:
        self.dest = dest  # fresh uint8 buffer, or a CUDA target's byte view; None for a CPU target
        self.direct = direct  # the caller's tensor, when the bytes land in it
        self.ptr = ptr


def _host_memory(ptr: int, nbytes: int) -> memoryview:
    """A writable memoryview of ``nbytes`` at host address ``ptr`` (no copy, no torch call)."""
    return memoryview((ctypes.c_ubyte * nbytes).from_address(ptr)).cast("B")


def _lookup(tree: Any, path: tuple[Any, ...]) -> Any:
    node = tree
    for k in path:
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def fill_step(
    fetcher: Fetcher,
    m: RankManifest,
    key: str,
    object_plan: ObjectPlan,
    targets: Any = None,
    strict_paths: Sequence[tuple[Any, ...]] = (),
    validate: Callable[[Any], None] | None = None,
    shards: Callable[[], list[tuple[RankManifest, str]]] | None = None,
    undo: BufferFactory | None = None,
    defer: bool = False,
) -> Loaded:
    """Rebuild the state of ``m``; fill tensors of ``targets`` (same tree shape) in place.

    All or nothing for the caller's tensors: each region is copied into an
    :class:`~ckptmirror.restore.undo.UndoLog` before it is first overwritten (``undo`` provides
    its buffer), and if anything fails the log is rolled back before the error propagates. On
    success the log travels on :attr:`Loaded.undo`, so that the caller can still roll back
    (ranks that disagree, a ``load_state_dict`` that raises) or release it.

    ``defer=True``: objects on local disk are verified where they lie and do not land yet;
    they wait in :attr:`Loaded.landing` until the caller calls :meth:`Loaded.land` (after
    every check that can fail), and need no undo copy. Objects from other replicas land (with
    undo) as before.

    ``object_plan`` is ``fetcher.preflight(m)``, taken once by the caller when it chose the step.
    ``validate`` receives the state tree with :class:`~ckptmirror.restore.check.LeafSpec` placeholders for the
    tensors; it runs, like every other check, before any target tensor is written.
    ``shards`` lists every stored rank's manifest; it is needed only when a sharded target
    (DTensor) has another layout than the one stored, and is then resharded from them.
    """
    check = validate_manifest(m, key)
    esizes, dtypes, paths = check.esizes, check.dtypes, check.paths
    leaf_targets, wants, values = _match_targets(m, check, targets, strict_paths)
    if validate is not None:
        validate(check.skeleton)
    pieces: list[Piece] = []
    stored: list[tuple[RankManifest, ManifestCheck, ObjectPlan]] = []
    if wants:
        if shards is None:
            raise StateMismatchError(
                "the target's sharding differs from the stored one, and no other rank's shards are available"
            )
        for sm, skey in shards():
            sc = validate_manifest(sm, skey)
            stored.append((sm, sc, {}))
        pieces = plan_pieces(wants, [StoredShard(i, sc.boxes(sm)) for i, (sm, sc, _) in enumerate(stored)])
        for src in {p.source for p in pieces}:
            stored[src][2].update(fetcher.preflight(stored[src][0]))
    skip = {i for i in range(len(m.leaves)) if paths.get(i) in {w.path for w in wants}}
    storage_targets = _storage_targets(m, leaf_targets, dtypes, esizes, skip)
    loaded = Loaded(m.step, None)
    if targets is not None:
        planned = sum(_nbytes(t) for t in leaf_targets.values()) + sum(_nbytes(w.local) for w in wants)
        loaded.undo = UndoLog(planned, undo)
        if defer:
            loaded.landing = Landing()
    try:
        _fill(fetcher, m, key, object_plan, storage_targets, leaf_targets, dtypes, values, stored, pieces, loaded)
    except BaseException:
        loaded.abandon()
        raise
    return loaded


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _fill(
    fetcher: Fetcher,
    m: RankManifest,
    key: str,
    object_plan: ObjectPlan,
    storage_targets: list[_Target | None],
    leaf_targets: dict[int, torch.Tensor],
    dtypes: list[torch.dtype | None],
    values: dict[int, Any],
    stored: list[tuple[RankManifest, ManifestCheck, ObjectPlan]],
    pieces: list[Piece],
    loaded: Loaded,
) -> None:
    """The writing half of :func:`fill_step`: read objects, reshard, build the state tree."""
    undo = loaded.undo
    _read_objects(fetcher, m, object_plan, storage_targets, loaded)
    saved_wants: set[int] = set()
    for src in sorted({p.source for p in pieces}):
        sm, sc, splan = stored[src]
        needed = {sm.leaves[p.leaf].storage for p in pieces if p.source == src}
        bufs = [_fresh(r.nbytes) if j in needed else None for j, r in enumerate(sm.storages)]
        _read_objects(fetcher, sm, splan, bufs, loaded)
        for p in (p for p in pieces if p.source == src):
            lf = sm.leaves[p.leaf]
            buf = bufs[lf.storage]
            assert buf is not None and buf.dest is not None and sc.dtypes[p.leaf] is not None
            leaf = torch.empty(0, dtype=sc.dtypes[p.leaf]).set_(
                buf.dest.untyped_storage(), lf.offset, lf.shape, lf.stride
            )
            if undo is not None and id(p.want) not in saved_wants:
                saved_wants.add(id(p.want))
                undo.save(p.want.local)
            copy_piece(p, leaf)
    leaves = _build_leaves(m, storage_targets, leaf_targets, dtypes, values, undo, loaded.landing)
    loaded.state = unflatten(m.structure, lambda kind, i, path: leaves[i], key)


def _match_targets(
    m: RankManifest, check: ManifestCheck, targets: Any, strict_paths: Sequence[tuple[Any, ...]]
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
        _consolidate(m, check, set(), wants, values)
        return out, wants, values
    stored_paths = {p: i for i, p in paths.items()}
    problems = []
    hints: list[str] = []
    for prefix in strict_paths:
        sub = _lookup(targets, prefix)
        if not isinstance(sub, dict):
            continue
        only_target = [k for k, v in sub.items() if isinstance(v, torch.Tensor) and prefix + (k,) not in stored_paths]
        only_stored = [k for k in _lookup_stored_keys(paths, prefix) if k not in sub]
        problems += [
            f"{key_path('state', prefix + (k,))} is in the target but not in the checkpoint" for k in only_target
        ]
        problems += [
            f"{key_path('state', prefix + (k,))} is in the checkpoint but not in the target" for k in only_stored
        ]
        hints += _key_hints(only_target, only_stored)
    plain = (torch.Tensor, torch.nn.Parameter)
    parent_path: tuple[Any, ...] | None = None
    parent: Any = None
    for i, path in paths.items():
        # Leaves come in tree order: siblings share a parent, looked up once (50k lookups of
        # ("model", key) otherwise walk the tree from the root each time).
        if path[:-1] != parent_path:
            parent_path = path[:-1]
            parent = _lookup(targets, parent_path)
        t = _lookup(parent, path[-1:]) if path else targets
        if not isinstance(t, torch.Tensor):
            continue
        lf = m.leaves[i]
        if lf.kind != "tensor":
            problems.append(f"{key_path('state', path)}: checkpoint holds a numpy array, target a tensor")
            continue
        if type(t) in plain and i not in check.dtensors:  # the common case: one shape compare
            if t.shape != lf.shape:
                problems.append(
                    f"{key_path('state', path)}: checkpoint shape {list(lf.shape)}, target shape {list(t.shape)}"
                )
            else:
                out[i] = t
            continue
        stored_g, stored_off = check.dtensors.get(i, (lf.shape, (0,) * len(lf.shape)))
        if is_dtensor(t) or i in check.dtensors:
            local, gshape, offset = dtensor_local(t) if is_dtensor(t) else (t, tuple(t.shape), (0,) * t.dim())
            if tuple(gshape) != tuple(stored_g):
                problems.append(
                    f"{key_path('state', path)}: checkpoint global shape {list(stored_g)}, target {list(gshape)}"
                )
                continue
            values[i] = t
            if tuple(local.shape) == lf.shape and tuple(offset) == tuple(stored_off):
                out[i] = local  # same layout: fill this rank's shard in place
            else:
                wants.append(Want(path, local, tuple(offset), tuple(gshape)))
        elif tuple(t.shape) != lf.shape:
            problems.append(
                f"{key_path('state', path)}: checkpoint shape {list(lf.shape)}, target shape {list(t.shape)}"
            )
        else:
            out[i] = t
    if problems:
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise StateMismatchError(
            f"step {m.step} does not fit the restore target:\n  " + "\n  ".join(problems[:50]) + more + "".join(hints)
        )
    _consolidate(m, check, set(values) | set(out), wants, values)
    return out, wants, values


def _consolidate(
    m: RankManifest, check: ManifestCheck, handled: set[int], wants: list[Want], values: dict[int, Any]
) -> None:
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
    m: RankManifest,
    leaf_targets: dict[int, torch.Tensor],
    dtypes: list[torch.dtype | None],
    esizes: list[int],
    skip: set[int],
) -> list[_Target | None]:
    """Where each storage's bytes go; None for storages only resharded leaves use (not read)."""
    users: dict[int, list[int]] = {}
    for i, lf in enumerate(m.leaves):
        users.setdefault(lf.storage, []).append(i)
    out: list[_Target | None] = []
    contiguous: dict[tuple[int, ...], tuple[int, ...]] = {}  # shapes repeat: once per shape
    for s, rec in enumerate(m.storages):
        direct = None
        members = users.get(s, [])
        if skip and members and all(i in skip for i in members):
            out.append(None)
            continue
        if len(members) == 1 and members[0] in leaf_targets:
            i = members[0]
            lf, t = m.leaves[i], leaf_targets[i]
            cs = contiguous.get(lf.shape)
            if cs is None:
                cs = contiguous[lf.shape] = contiguous_strides(lf.shape)
            # The stored layout first (plain Python), then the target's (torch calls).
            if (
                lf.offset == 0
                and lf.stride == cs
                and type(t) in (torch.Tensor, torch.nn.Parameter)
                and t.dtype == dtypes[i]
                and t.numel() * esizes[i] == rec.nbytes
                and t.is_contiguous()
            ):
                direct = t
        if direct is not None and rec.nbytes and direct.is_cuda:
            dest = byte_view(direct.untyped_storage(), int(direct.storage_offset()) * direct.element_size(), rec.nbytes)
            out.append(_Target(dest, direct, 0))
        elif direct is not None and rec.nbytes:
            out.append(_Target(None, direct, direct.data_ptr()))
        else:
            out.append(_fresh(rec.nbytes))
    return out


def _fresh(nbytes: int) -> _Target:
    """A target for bytes that go to a new buffer (not the caller's tensor)."""
    dest = torch.empty(nbytes, dtype=torch.uint8)
    return _Target(dest, None, dest.data_ptr())


def _read_objects(
    fetcher: Fetcher, m: RankManifest, plan: ObjectPlan, targets: Sequence[_Target | None], loaded: Loaded
) -> None:
    # Storages with bytes, by offset; the manifest check guarantees they do not overlap,
    # so the storages an object touches are a contiguous run found by bisection. Storages
    # without a target are not wanted, and objects that hold none that are, are not read.
    order = sorted(
        (i for i, s in enumerate(m.storages) if s.nbytes and targets[i] is not None), key=lambda i: m.storages[i].offset
    )
    sorted_starts = [m.storages[i].offset for i in order]
    obj_offsets = []
    acc = 0
    for o in m.objects:
        obj_offsets.append(acc)
        acc += o.size
    lock = threading.Lock()
    failed = threading.Event()
    landing = loaded.landing

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
        undo = loaded.undo
        cands: Sequence[Replica] = plan[obj.key]
        try:
            if landing is not None:
                rest = _deferred(fetcher, m, obj, cands, order, targets, k, lo, hi, landing)
                if isinstance(rest, str):
                    with lock:
                        loaded.sources[obj.key] = rest
                    return
                cands = rest
            if (
                rec0 is not None
                and tgt0 is not None
                and tgt0.direct is not None
                and tgt0.ptr
                and rec0.offset <= lo
                and hi <= rec0.offset + rec0.nbytes
            ):
                addr = tgt0.ptr + lo - rec0.offset
                if undo is not None:
                    undo.save_raw(addr, hi - lo)  # before the first byte of the caller's tensor changes
                url = fetcher.fetch_into(obj.key, obj.checksum, cands, _host_memory(addr, hi - lo))
                with lock:
                    loaded.sources[obj.key] = url
                return
            buf, url = fetcher.fetch(obj.key, obj.size, obj.checksum, cands)
        except BaseException:
            failed.set()
            raise
        buf_ptr = buf.data_ptr()
        # Storages overlapping [lo, hi): those starting before hi, minus those ending before lo.
        while k < len(order) and sorted_starts[k] < hi:
            rec = m.storages[order[k]]
            a, b = max(lo, rec.offset), min(hi, rec.offset + rec.nbytes)
            tgt = targets[order[k]]
            k += 1
            if a >= b or tgt is None:
                continue
            if tgt.ptr:
                dst = tgt.ptr + a - rec.offset
                if tgt.direct is not None and undo is not None:
                    undo.save_raw(dst, b - a)  # the caller's tensor
                ctypes.memmove(dst, buf_ptr + a - lo, b - a)
            else:
                assert tgt.dest is not None  # a CUDA target: copied by torch
                region = tgt.dest[a - rec.offset : b - rec.offset]
                if undo is not None:
                    undo.save(region)
                region.copy_(buf[a - lo : b - lo], non_blocking=False)
        with lock:
            loaded.sources[obj.key] = url

    wanted: set[int] = set()
    for idx in order:  # the objects that overlap a wanted storage
        rec = m.storages[idx]
        first = max(0, bisect.bisect_right(obj_offsets, rec.offset) - 1)
        wanted.update(range(first, bisect.bisect_left(obj_offsets, rec.offset + rec.nbytes)))
    futures = [fetcher.pool.submit(work, j) for j in sorted(wanted)]
    # Every read must be over before we return or raise: a straggler writing into the
    # targets after a fallback to an older step would mix two steps.
    wait(futures)
    for f in futures:
        f.result()


def _deferred(
    fetcher: Fetcher,
    m: RankManifest,
    obj: ObjectRecord,
    cands: Sequence[Replica],
    order: list[int],
    targets: Sequence[_Target | None],
    k: int,
    lo: int,
    hi: int,
    landing: Landing,
) -> str | Sequence[Replica]:
    """Verify object ``obj`` (stream bytes ``[lo, hi)``) where it lies and queue its bytes for
    the caller's tensors in ``landing``; returns the replica's URL when done, else the replicas
    to read it from the usual way (not mappable, or this copy failed).

    Applies when every storage the object touches is in host memory and at least one is the
    caller's: the bytes for fresh buffers are copied at once (nothing of the caller's to
    protect), those for the caller's tensors wait.
    """
    parts: list[tuple[_Target, int, int, int]] = []  # target, its offset, offset in the object, bytes
    while k < len(order):
        rec = m.storages[order[k]]
        if rec.offset >= hi:
            break
        a, b = max(lo, rec.offset), min(hi, rec.offset + rec.nbytes)
        tgt = targets[order[k]]
        k += 1
        if a < b and tgt is not None:
            if not tgt.ptr:
                return cands  # a CUDA target: copied by torch, the usual way
            parts.append((tgt, a - rec.offset, a - lo, b - a))
    if not any(t.direct is not None for t, *_ in parts):
        return cands  # nothing of the caller's: the usual read lands it at once, with no undo
    mo, url, rest = fetcher.verify_mapped(obj.key, obj.size, obj.checksum, cands)
    if mo is None:
        return rest
    waiting = []
    for tgt, t_off, o_off, n in parts:
        if tgt.direct is not None:
            waiting.append((tgt.ptr + t_off, mo.addr + o_off, n))
        else:
            ctypes.memmove(tgt.ptr + t_off, mo.addr + o_off, n)
    landing.add(mo, waiting)
    return url


def _build_leaves(
    m: RankManifest,
    targets: list[_Target | None],
    leaf_targets: dict[int, torch.Tensor],
    dtypes: list[torch.dtype | None],
    values: dict[int, Any],
    undo: UndoLog | None,
    landing: Landing | None,
) -> list[Any]:
    out: list[Any] = []
    for i, lf in enumerate(m.leaves):
        tgt = targets[lf.storage]
        if tgt is None:  # filled by resharding
            out.append(values[i])
            continue
        if tgt.direct is not None:
            out.append(values.get(i, leaf_targets[i]))
            continue
        assert tgt.dest is not None  # not filled in place: a fresh buffer
        if lf.kind == "ndarray":
            import numpy as np

            dt = np.dtype(lf.dtype)
            arr = np.empty(lf.shape, dtype=dt)
            n = arr.nbytes
            arr.reshape(-1).view(np.uint8)[:] = tgt.dest.numpy()[lf.offset * dt.itemsize : lf.offset * dt.itemsize + n]
            out.append(arr)
            continue
        dtype = dtypes[i]
        assert dtype is not None
        t = torch.empty(0, dtype=dtype).set_(tgt.dest.untyped_storage(), lf.offset, lf.shape, lf.stride)
        if i in leaf_targets:
            target = leaf_targets[i]
            if landing is not None and not target.is_cuda:
                landing.add_tensor(target, t)  # lands with the rest, after every check
            else:
                if undo is not None:
                    undo.save(target)
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


#: Prefixes that wrappers add to every key: DDP/DataParallel, torch.compile, FSDP1, checkpoint wrappers.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "model.")


def _key_hints(only_target: list[Any], only_stored: list[Any]) -> list[str]:
    """Say how to fix a key mismatch when it looks like a wrapper's prefix on one side only."""
    if not only_target and not only_stored:
        return []
    tgt = [k for k in only_target if isinstance(k, str)]
    sto = [k for k in only_stored if isinstance(k, str)]
    out = []
    for extra, base, side in ((tgt, set(sto), "target"), (sto, set(tgt), "checkpoint")):
        for p in _common_prefixes(extra):
            if extra and base and all(k.startswith(p) and k[len(p) :] in base for k in extra):
                other = "checkpoint" if side == "target" else "target"
                out.append(
                    f"\n  hint: the {side}'s keys start with {p!r} and the {other}'s do not (a wrapper such as "
                    "DistributedDataParallel or torch.compile adds it): restore into the unwrapped model "
                    "(model.module, model._orig_mod) or save it unwrapped"
                )
                return out
    out.append("\n  hint: pass strict=False to restore only the keys both have (the others keep their values)")
    return out


def _common_prefixes(keys: list[str]) -> list[str]:
    """Candidate prefixes: the known wrapper prefixes, then the first dotted component of the keys."""
    firsts = {k.split(".", 1)[0] + "." for k in keys if "." in k}
    return [*_WRAPPER_PREFIXES, *sorted(firsts - set(_WRAPPER_PREFIXES))]
