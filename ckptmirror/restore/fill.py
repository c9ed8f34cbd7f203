"""Fill: rebuild one rank's state of one step, in the caller's tensors where it has them.

The last stage of the read path. Given a manifest whose objects were preflighted
(:mod:`~ckptmirror.restore.fetch`), :func:`fill_step`:

1. checks the manifest (:func:`~ckptmirror.restore.check.validate_manifest`) and matches the
   stored leaves onto the restore targets (:mod:`~ckptmirror.restore.match`: keys, shapes,
   dtypes, where each storage lands) *before* any tensor is touched;
2. reads objects in parallel (:mod:`~ckptmirror.restore.reads`) through the
   :class:`~ckptmirror.restore.fetch.Fetcher` (verified there) and scatters them into the
   target tensors in place; an object that lies inside one contiguous CPU target is read
   straight into it, with no copy;
3. builds the state tree: the caller's tensors where it gave them, new tensors elsewhere.

A sharded target (DTensor) whose layout differs from the stored one is resharded from every
stored rank's shards (:mod:`ckptmirror.state.reshard`).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from itertools import compress, islice
from typing import Any

import torch

from ..errors import StateMismatchError
from ..format import RankManifest, leaf_columns
from ..state.reshard import Piece, StoredShard, copy_piece, plan_pieces
from ..state.tree import key_path, unflatten
from .ahead import Ahead, host_first
from .check import LeafSpec, ManifestCheck, validate_manifest
from .fetch import Fetcher, ObjectPlan
from .match import StorageTargets, Whole, lookup, match_targets, scatter, storage_targets
from .reads import _read_objects
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
    #: newer steps the restore skipped because no replica held a copy that passed its checks
    #: (damage, not an outage: an outage raises); with several ranks, those newer than the
    #: restored step that some rank found damaged (the same on every rank)
    skipped: tuple[int, ...] = ()

    def land(self, threads: int = 2, pool: Executor | None = None) -> None:
        """Copy the verified bytes that wait in :attr:`landing` into the caller's tensors
        (see :meth:`~ckptmirror.restore.undo.Landing.land`)."""
        if self.landing is not None:
            self.landing.land(threads, pool)

    def abandon(self) -> None:
        """The restore failed: put back what landed, drop what waits."""
        if self.undo is not None:
            self.undo.rollback()
        if self.landing is not None:
            self.landing.discard()


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
    undo) as before. The verifying starts on the fetcher's pool before the manifest is checked and
    the targets are matched (:class:`Ahead`), and runs meanwhile.

    ``object_plan`` is ``fetcher.preflight(m)``, taken once by the caller when it chose the step.
    ``validate`` receives the state tree with :class:`~ckptmirror.restore.check.LeafSpec` placeholders for the
    tensors; it runs, like every other check, before any target tensor is written.
    ``shards`` lists every stored rank's manifest; it is needed only when a sharded target
    (DTensor) has another layout than the one stored, and is then resharded from them.

    The per-tensor work is done a column at a time (``map``, ``compress``, ``zip`` over the
    manifest's columns and the targets), not with a Python step and objects per tensor: at 50k
    tensors each Python step per tensor costs tens of milliseconds. The one exception reads the
    target tensors' attributes, where memory, not Python, sets the cost (:class:`TargetCols`).
    """
    # Local objects verified on the pool while the manifest is checked and the targets are
    # matched here (see Ahead): the objects' records were checked when the manifest was parsed.
    ahead = Ahead(fetcher, m, object_plan) if defer and targets is not None and host_first(targets) else None
    try:
        check = validate_manifest(m, key)
        return _fill_step(
            fetcher, m, key, object_plan, check, targets, strict_paths, validate, shards, undo, defer, ahead
        )
    finally:
        if ahead is not None:
            ahead.drop()


def _fill_step(
    fetcher: Fetcher,
    m: RankManifest,
    key: str,
    object_plan: ObjectPlan,
    check: ManifestCheck,
    targets: Any,
    strict_paths: Sequence[tuple[Any, ...]],
    validate: Callable[[Any], None] | None,
    shards: Callable[[], list[tuple[RankManifest, str]]] | None,
    undo: BufferFactory | None,
    defer: bool,
    ahead: Ahead | None,
) -> Loaded:
    """:func:`fill_step` once the manifest is checked (and its objects are verified ahead)."""
    leaf_targets, wants, values, target_cols, whole = match_targets(m, check, targets, strict_paths)
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
    skip: set[int] = set()
    if wants:
        want_paths = {w.path for w in wants}
        skip = {i for i, p in check.paths.items() if p in want_paths}
    dests = storage_targets(m, leaf_targets, check.dtypes, check.esizes, skip, target_cols, check.exact)
    if dests.untied:
        sidx = leaf_columns(m).storage
        untied = set(dests.untied)
        paths = check.paths
        keys = [key_path("state", paths[i]) for i in leaf_targets if sidx[i] in untied]
        log.warning(
            "step %d: targets %s share memory (tied weights?) but the checkpoint holds them as separate tensors: "
            "each is copied in turn, so they hold the last one's values (as torch's load_state_dict does)",
            m.step,
            ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else ""),
        )
    loaded = Loaded(m.step, None)
    if targets is not None:
        regions = [*leaf_targets.values(), *(w.local for w in wants)]
        # Sized when first used: a restore whose bytes all wait in the landing never needs it.
        loaded.undo = UndoLog(lambda: sum(map(_nbytes, regions)), undo)
        if defer:
            loaded.landing = Landing()
    try:
        # The caller's own dicts in the loaded tree only where torch's own loading follows
        # (defer): a Stateful whose state_dict() is its live dict and whose loader clears it
        # first would otherwise load its own emptied dict.
        kept = whole if defer else ()
        _fill(fetcher, m, key, check, object_plan, dests, leaf_targets, values, stored, pieces, loaded, ahead, kept)
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
    check: ManifestCheck,
    object_plan: ObjectPlan,
    dests: StorageTargets,
    leaf_targets: dict[int, torch.Tensor],
    values: dict[int, Any],
    stored: list[tuple[RankManifest, ManifestCheck, ObjectPlan]],
    pieces: list[Piece],
    loaded: Loaded,
    ahead: Ahead | None = None,
    whole: Sequence[Whole] = (),
) -> None:
    """The writing half of :func:`fill_step`: read objects, reshard, build the state tree."""
    undo = loaded.undo
    _read_objects(fetcher, m, object_plan, dests, loaded, ahead)
    saved_wants: set[int] = set()
    for src in sorted({p.source for p in pieces}):
        sm, sc, splan = stored[src]
        needed = {sm.leaves[p.leaf].storage for p in pieces if p.source == src}
        bufs = StorageTargets(len(sm.storages))
        bufs.read = [j in needed for j in range(len(sm.storages))]
        for j in needed:
            bufs.fresh(j, sm.storages[j].nbytes)
        _read_objects(fetcher, sm, splan, bufs, loaded)
        for p in (p for p in pieces if p.source == src):
            lf = sm.leaves[p.leaf]
            dest = bufs.dest[lf.storage]
            assert dest is not None and sc.dtypes[p.leaf] is not None
            leaf = torch.empty(0, dtype=sc.dtypes[p.leaf]).set_(dest.untyped_storage(), lf.offset, lf.shape, lf.stride)
            if undo is not None and id(p.want) not in saved_wants:
                saved_wants.add(id(p.want))
                undo.save(p.want.local)
            copy_piece(p, leaf)
    leaves = _build_leaves(m, dests, leaf_targets, check.dtypes, values, undo, loaded.landing)
    loaded.state = _state_tree(m, check, leaves, key, _reused(check, leaf_targets, whole, values))


def _reused(
    check: ManifestCheck, leaf_targets: dict[int, torch.Tensor], whole: Sequence[Whole], values: dict[int, Any]
) -> dict[int, Any]:
    """The caller's dicts that the state tree may hold as they are: ``id(skeleton node) -> dict``.

    A dict of the targets that holds exactly the stored keys of one skeleton node
    (:data:`~ckptmirror.restore.match.Whole`), every one of them filled into the target's own
    tensor (straight, or copied in: :func:`_build_leaves` puts the target in the tree either
    way), is what rebuilding that node would make: the same keys, each with the target's
    tensor. Kept as it is, the state tree costs nothing for it, and the caller sees at once
    that it was filled in place (at 50k tensors, rebuilding the dict and then comparing it with
    the target's took ~30 ms).
    """
    if values or not whole:  # (values: DTensors, whose tree entry is not the tensor filled)
        return {}
    out: dict[int, Any] = {}
    order = check.keys.order
    every = len(leaf_targets) == len(order)
    for prefix, a, b, sub in whole:
        node = lookup(check.skeleton, prefix)
        if type(node) is dict and len(node) == b - a:  # the run's leaves, and nothing else
            if every or all(map(leaf_targets.__contains__, order[a:b])):
                out[id(node)] = sub
    return out


def _state_tree(
    m: RankManifest, check: ManifestCheck, leaves: list[Any], key: str, reuse: dict[int, Any] | None = None
) -> Any:
    """The state tree with ``leaves`` in it.

    The validated skeleton holds a placeholder per leaf, in the order of ``check.keys``: its
    containers (dicts, lists, tuples: all the structure decodes to) are rebuilt around the
    leaves, a dict of leaves in one C call. Should the skeleton not hold exactly one
    placeholder per leaf, the structure is decoded again instead. ``reuse``: skeleton nodes
    (by id) to put the given object in place of, its leaves skipped (see :func:`_reused`).
    """
    it = iter(list(map(leaves.__getitem__, check.keys.order)))
    try:
        tree = _refill(check.skeleton, it, reuse or {})
        if next(it, _END) is _END:
            return tree
    except _ShortSkeleton:
        pass
    return unflatten(m.structure, lambda kind, i, path: leaves[i], key)


class _ShortSkeleton(Exception):
    """The skeleton holds more placeholders than there are leaves."""


_END = object()
_WALKED = frozenset((dict, list, tuple, LeafSpec))


def _refill(node: Any, it: Iterator[Any], reuse: dict[int, Any]) -> Any:
    t = type(node)
    if t is LeafSpec:
        v = next(it, _END)
        if v is _END:
            raise _ShortSkeleton
        return v
    if t is dict:
        if reuse and id(node) in reuse:  # its leaves, in order: skipped
            if len(list(islice(it, len(node)))) != len(node):
                raise _ShortSkeleton
            return reuse[id(node)]
        if node and set(map(type, node.values())) == {LeafSpec}:  # a state dict: all leaves
            vals = list(islice(it, len(node)))
            if len(vals) != len(node):
                raise _ShortSkeleton
            return dict(zip(node, vals))
        return {k: _refill(v, it, reuse) for k, v in node.items()}
    if t is list or t is tuple:
        if _WALKED.isdisjoint(map(type, node)):  # scalars only (parameter ids, betas)
            return list(node) if t is list else node
        seq = [_refill(v, it, reuse) for v in node]
        return seq if t is list else tuple(seq)
    return node  # a scalar, a torch.Size, a dtype: immutable


def _build_leaves(
    m: RankManifest,
    targets: StorageTargets,
    leaf_targets: dict[int, torch.Tensor],
    dtypes: list[torch.dtype | None],
    values: dict[int, Any],
    undo: UndoLog | None,
    landing: Landing | None,
) -> list[Any]:
    nl = len(m.leaves)
    if not values and len(leaf_targets) == nl and False not in targets.is_direct:
        # Every storage filled in place, so every leaf (each has a target) is its target itself.
        return list(map(leaf_targets.__getitem__, range(nl)))
    sidx = leaf_columns(m).storage
    on_direct = list(map(targets.is_direct.__getitem__, sidx))  # filled in place: the target itself
    di = list(compress(range(nl), on_direct))
    direct_values: Iterable[Any] = map(leaf_targets.__getitem__, di)
    if values:
        direct_values = map(values.get, di, direct_values)
    if len(di) == nl:
        return list(direct_values)
    out: list[Any] = [None] * nl
    scatter(out, di, direct_values)
    for i in compress(range(nl), map(operator.not_, on_direct)):
        lf = m.leaves[i]
        if not targets.read[lf.storage]:  # filled by resharding
            out[i] = values[i]
            continue
        dest = targets.dest[lf.storage]
        assert dest is not None  # not filled in place: a fresh buffer
        if lf.kind == "ndarray":
            import numpy as np

            dt = np.dtype(lf.dtype)
            arr = np.empty(lf.shape, dtype=dt)
            n = arr.nbytes
            arr.reshape(-1).view(np.uint8)[:] = dest.numpy()[lf.offset * dt.itemsize : lf.offset * dt.itemsize + n]
            out[i] = arr
            continue
        dtype = dtypes[i]
        assert dtype is not None
        t = torch.empty(0, dtype=dtype).set_(dest.untyped_storage(), lf.offset, lf.shape, lf.stride)
        if i in leaf_targets:
            target = leaf_targets[i]
            if landing is not None and not target.is_cuda:
                landing.add_tensor(target, t)  # lands with the rest, after every check
            else:
                if undo is not None:
                    undo.save(target)
                with torch.no_grad():
                    target.copy_(t)
            out[i] = values.get(i, target)
            continue
        if lf.parameter:
            t = torch.nn.Parameter(t, requires_grad=lf.requires_grad)
        elif lf.requires_grad and t.is_floating_point():
            t.requires_grad_(True)
        out[i] = t
    return out


#: Prefixes that wrappers add to every key: DDP/DataParallel, torch.compile, FSDP1, checkpoint wrappers.
