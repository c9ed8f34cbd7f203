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
import math
import operator
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from itertools import accumulate, compress, islice, repeat
from typing import Any, NoReturn

import torch

from ..buffers import byte_view
from ..errors import StateMismatchError
from ..format import ObjectRecord, RankManifest
from ..replicas.base import Replica
from ..state.reshard import Piece, StoredShard, Want, copy_piece, plan_pieces
from ..state.tree import dtensor_local, is_dtensor, key_path, unflatten
from .check import LeafSpec, ManifestCheck, contiguous_strides, validate_manifest
from .fetch import Fetcher, Mapped, ObjectPlan
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


class _Targets:
    """Where the bytes of each storage go, as columns (one entry per storage).

    Columns, not an object per storage: at 50k tensors, building and walking 50k Python
    objects cost a tenth of a second; lists built with ``map`` in C cost a few milliseconds.

    * ``read[s]``: whether storage ``s`` is read at all (False: only resharded leaves use it);
    * ``is_direct[s]``: whether the bytes land straight in the caller's tensor;
    * ``dest[s]``: a fresh uint8 buffer, or a CUDA target's byte view; None for a host target;
    * ``ptr[s]``: the host address of the first byte, so that bytes land with a plain memmove
      (per-storage torch views and copies cost microseconds each); 0 for a CUDA target, whose
      bytes go through ``dest``.
    """

    __slots__ = ("dest", "is_direct", "ptr", "read")

    def __init__(self, n: int) -> None:
        self.read = [True] * n
        self.is_direct = [False] * n
        self.dest: list[torch.Tensor | None] = [None] * n
        self.ptr = [0] * n

    def fresh(self, s: int, nbytes: int) -> None:
        """Storage ``s`` goes to a new buffer (not the caller's tensor)."""
        dest = self.dest[s] = torch.empty(nbytes, dtype=torch.uint8)
        self.ptr[s] = dest.data_ptr()


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
    undo) as before. The verifying starts on the fetcher's pool before the manifest is checked and
    the targets are matched (:class:`_Ahead`), and runs meanwhile.

    ``object_plan`` is ``fetcher.preflight(m)``, taken once by the caller when it chose the step.
    ``validate`` receives the state tree with :class:`~ckptmirror.restore.check.LeafSpec` placeholders for the
    tensors; it runs, like every other check, before any target tensor is written.
    ``shards`` lists every stored rank's manifest; it is needed only when a sharded target
    (DTensor) has another layout than the one stored, and is then resharded from them.

    The per-tensor work is done a column at a time (``map``, ``compress``, ``zip`` over the
    manifest's columns and the targets), not with a Python step and objects per tensor: at 50k
    tensors each Python step per tensor costs tens of milliseconds. The one exception reads the
    target tensors' attributes, where memory, not Python, sets the cost (:class:`_TargetCols`).
    """
    # Local objects verified on the pool while the manifest is checked and the targets are
    # matched here (see _Ahead): the objects' records were checked when the manifest was parsed.
    ahead = _Ahead(fetcher, m, object_plan) if defer and targets is not None and _host_first(targets) else None
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
    ahead: _Ahead | None,
) -> Loaded:
    """:func:`fill_step` once the manifest is checked (and its objects are verified ahead)."""
    paths = check.paths
    leaf_targets, wants, values, target_cols = _match_targets(m, check, targets, strict_paths)
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
        skip = {i for i, p in paths.items() if p in want_paths}
    storage_targets = _storage_targets(m, leaf_targets, check.dtypes, check.esizes, skip, target_cols)
    loaded = Loaded(m.step, None)
    if targets is not None:
        regions = [*leaf_targets.values(), *(w.local for w in wants)]
        # Sized when first used: a restore whose bytes all wait in the landing never needs it.
        loaded.undo = UndoLog(lambda: sum(map(_nbytes, regions)), undo)
        if defer:
            loaded.landing = Landing()
    try:
        _fill(fetcher, m, key, check, object_plan, storage_targets, leaf_targets, values, stored, pieces, loaded, ahead)
    except BaseException:
        loaded.abandon()
        raise
    return loaded


#: What :meth:`Fetcher.verify_mapped` returns: the verified mapping (or None), its replica's URL,
#: the replicas to read the object from otherwise.
_Verified = tuple[Mapped | None, str, Sequence[Replica]]


class _Ahead:
    """The objects of a step verified ahead, where they lie (``Fetcher.verify_mapped``), on the
    fetcher's pool while the main thread checks the manifest and matches the targets.

    Only for restores whose local objects wait in a :class:`Landing` (``defer``): verifying
    touches no tensor, and mapping and checksumming the objects (~30 ms of a core for 0.26 GB
    here) and checking the manifest and matching 10k targets (~30 ms of Python) then run side
    by side, not one after the other.
    :func:`_read_objects` takes each result once, for the object's own read; :meth:`drop`
    closes what nobody took (the step failed before its reads, or an object held only
    resharded storages).

    No deadlock on the shared pool: every verification is queued before any read, and a read
    that waits for one only starts once all of them have started; they wait for nothing.
    """

    def __init__(self, fetcher: Fetcher, m: RankManifest, plan: ObjectPlan) -> None:
        self._futures: list[Future[_Verified] | None] = [
            fetcher.pool.submit(fetcher.verify_mapped, o.key, o.size, o.checksum, plan[o.key]) for o in m.objects
        ]

    def take(self, j: int) -> _Verified:
        """Object ``j``'s result (waits for it); raises what verifying it raised."""
        f = self._futures[j]
        self._futures[j] = None
        assert f is not None, "each object's result is taken once"
        return f.result()

    def drop(self) -> None:
        """Close the mappings nobody took, after the verifications under way (idempotent)."""
        futures, self._futures = self._futures, []
        for f in futures:
            if f is not None:
                f.cancel()  # not started yet: never will
        for f in futures:
            if f is None or f.cancelled():
                continue
            try:
                mo = f.result()[0]
            except BaseException:  # the step failed already, or never needed this object
                continue
            if mo is not None:
                mo.close()


def _host_first(tree: Any) -> bool:
    """Whether the first tensor in ``tree`` is in host memory (or there is none): the guess,
    made before the targets are matched, that verifying objects ahead pays. An object that then
    meets a CUDA target is read again the usual way (see :func:`_deferred`)."""
    t = _first_tensor(tree, 0)
    return t is None or t.device.type == "cpu"


def _first_tensor(node: Any, depth: int) -> torch.Tensor | None:
    if isinstance(node, torch.Tensor):
        return node
    if depth > 64 or not isinstance(node, (dict, list, tuple)):
        return None
    for v in node.values() if isinstance(node, dict) else node:
        if isinstance(v, torch.Tensor):
            return v
        if isinstance(v, (dict, list, tuple)):
            t = _first_tensor(v, depth + 1)
            if t is not None:
                return t
    return None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


#: Columns of the manifest's records (NamedTuples), read with itemgetter in C.
_KIND, _STORAGE, _SHAPE, _STRIDE, _OFFSET = (operator.itemgetter(k) for k in (0, 1, 3, 4, 5))  # LeafRecord
_START, _NBYTES = operator.itemgetter(0), operator.itemgetter(1)  # StorageRecord
_SIZE = operator.itemgetter(1)  # ObjectRecord
_PARENT, _LAST = operator.itemgetter(slice(None, -1)), operator.itemgetter(-1)  # of a key path
#: The tensor types filled byte for byte; other tensor types (DTensor, subclasses) take the general path.
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_PLAIN_DICTS = (dict, OrderedDict)


def _scatter(column: list[Any], at: list[int], values: Iterable[Any]) -> None:
    """``column[i] = v`` for each ``i`` of ``at`` and ``v`` of ``values``, in C."""
    if len(at) == len(column) and at == list(range(len(column))):
        column[:] = values  # the common case: every entry, in order
    else:
        deque(map(column.__setitem__, at, values), maxlen=0)


def _fill(
    fetcher: Fetcher,
    m: RankManifest,
    key: str,
    check: ManifestCheck,
    object_plan: ObjectPlan,
    storage_targets: _Targets,
    leaf_targets: dict[int, torch.Tensor],
    values: dict[int, Any],
    stored: list[tuple[RankManifest, ManifestCheck, ObjectPlan]],
    pieces: list[Piece],
    loaded: Loaded,
    ahead: _Ahead | None = None,
) -> None:
    """The writing half of :func:`fill_step`: read objects, reshard, build the state tree."""
    undo = loaded.undo
    _read_objects(fetcher, m, object_plan, storage_targets, loaded, ahead)
    saved_wants: set[int] = set()
    for src in sorted({p.source for p in pieces}):
        sm, sc, splan = stored[src]
        needed = {sm.leaves[p.leaf].storage for p in pieces if p.source == src}
        bufs = _Targets(len(sm.storages))
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
    leaves = _build_leaves(m, storage_targets, leaf_targets, check.dtypes, values, undo, loaded.landing)
    loaded.state = _state_tree(m, check, leaves, key)


def _state_tree(m: RankManifest, check: ManifestCheck, leaves: list[Any], key: str) -> Any:
    """The state tree with ``leaves`` in it.

    The validated skeleton holds a placeholder per leaf, in the order of ``check.paths``: its
    containers (dicts, lists, tuples: all the structure decodes to) are rebuilt around the
    leaves, a dict of leaves in one C call. Should the skeleton not hold exactly one
    placeholder per leaf, the structure is decoded again instead.
    """
    it = iter(list(map(leaves.__getitem__, check.paths)))
    try:
        tree = _refill(check.skeleton, it)
        if next(it, _END) is _END:
            return tree
    except _ShortSkeleton:
        pass
    return unflatten(m.structure, lambda kind, i, path: leaves[i], key)


class _ShortSkeleton(Exception):
    """The skeleton holds more placeholders than there are leaves."""


_END = object()
_WALKED = frozenset((dict, list, tuple, LeafSpec))


def _refill(node: Any, it: Iterator[Any]) -> Any:
    t = type(node)
    if t is LeafSpec:
        v = next(it, _END)
        if v is _END:
            raise _ShortSkeleton
        return v
    if t is dict:
        if node and set(map(type, node.values())) == {LeafSpec}:  # a state dict: all leaves
            vals = list(islice(it, len(node)))
            if len(vals) != len(node):
                raise _ShortSkeleton
            return dict(zip(node, vals))
        return {k: _refill(v, it) for k, v in node.items()}
    if t is list or t is tuple:
        if _WALKED.isdisjoint(map(type, node)):  # scalars only (parameter ids, betas)
            return list(node) if t is list else node
        seq = [_refill(v, it) for v in node]
        return seq if t is list else tuple(seq)
    return node  # a scalar, a torch.Size, a dtype: immutable


class _Paths:
    """The key paths of the leaves as columns: each one's parent path and last key (None and
    None for the root), and ``cuts``, where the runs of siblings start (and the end): leaves
    come in tree order, so the children of one parent are a run."""

    __slots__ = ("cuts", "lasts", "parents")

    def __init__(self, paths: list[tuple[Any, ...]]) -> None:
        n = len(paths)
        if n and all(paths):
            p0 = paths[0]
            depth = len(p0)
            if all(map(operator.eq, map(len, paths), repeat(depth))) and all(
                all(map(operator.eq, map(operator.itemgetter(j), paths), repeat(p0[j]))) for j in range(depth - 1)
            ):  # one parent (a state dict): compared a key position at a time, no tuple per path
                self.parents: list[Any] = [p0[:-1]] * n
                self.lasts: list[Any] = list(map(_LAST, paths))
                self.cuts = [0, n]
                return
            self.parents, self.lasts = list(map(_PARENT, paths)), list(map(_LAST, paths))
        else:
            self.parents = [p[:-1] if p else None for p in paths]
            self.lasts = [p[-1] if p else None for p in paths]
        self.cuts = [0, *compress(range(1, n), map(operator.ne, self.parents[1:], self.parents)), n] if n else [0]

    def runs(self) -> Iterator[tuple[Any, int, int]]:
        """(parent path, start, end) of each run of siblings."""
        cuts = self.cuts
        return zip(map(self.parents.__getitem__, cuts[:-1]), cuts, cuts[1:])


def _gather(targets: Any, cols: _Paths) -> list[Any]:
    """The target at each key path (None where it has none), looked up once per parent and
    its children read in one ``map`` (50k lookups of ("model", key) would otherwise walk the
    tree from the root each time)."""
    out: list[Any] = []
    lasts = cols.lasts
    up_path: Any = None  # the last run's grandparent, and what it is in the targets
    up: Any = None
    for parent_path, a, b in cols.runs():
        if parent_path is None:  # a leaf at the root: the target itself
            out += [targets] * (b - a)
            continue
        if parent_path and parent_path[:-1] == up_path:  # a sibling of the last run's parent
            parent = _lookup(up, parent_path[-1:])  # (an optimizer's state: one run per parameter)
        else:
            parent = _lookup(targets, parent_path)
            if parent_path:
                up_path = parent_path[:-1]
                up = _lookup(targets, up_path)
        if type(parent) in _PLAIN_DICTS:
            out += map(parent.get, lasts[a:b])
        else:
            out += [_lookup(parent, (k,)) for k in lasts[a:b]]
    return out


class _TargetCols:
    """What restore needs to know of each target tensor, as columns, read in one pass.

    * ``shapes``, ``dtypes``: each tensor's;
    * ``ptrs``: the address of the first byte of a contiguous CPU tensor, else 0 (not filled
      byte for byte from host memory);
    * ``cuda``: whether it is a contiguous CUDA tensor (filled through a byte view).

    Entries for tensors of other types (subclasses) are None, None, 0, False: such a tensor is
    never filled byte for byte, and none of its attributes is read here.

    One Python step per tensor that reads all of them, not a ``map`` per attribute: each read
    chases the tensor's Python object, its TensorImpl and its storage, which lie far apart (next
    to each tensor's data), and at 10k-50k tensors they no longer stay in the CPU caches and TLB
    from one pass to the next. Measured at 50k parameters on a 2-core VM: this one pass takes
    about half the time of five ``map`` passes (~90 ms against ~180 ms, the machine busy);
    reading them in blocks of a few hundred tensors, a ``map`` each, is no faster.
    """

    __slots__ = ("cuda", "dtypes", "ptrs", "shapes")

    def __init__(self, ts: Iterable[Any]) -> None:
        shapes: list[torch.Size | None] = []
        dtypes: list[torch.dtype | None] = []
        ptrs: list[int] = []
        cuda: list[bool] = []
        plain = _PLAIN
        for t in ts:
            if type(t) not in plain:
                shapes.append(None)
                dtypes.append(None)
                ptrs.append(0)
                cuda.append(False)
                continue
            shapes.append(t.shape)
            dtypes.append(t.dtype)
            if not t.is_contiguous():
                ptrs.append(0)
                cuda.append(False)
            elif t.is_cpu:
                ptrs.append(t.data_ptr())
                cuda.append(False)
            else:  # a CUDA tensor, or another device's (filled through a fresh buffer and copy_)
                ptrs.append(0)
                cuda.append(t.is_cuda)
        self.shapes, self.dtypes, self.ptrs, self.cuda = shapes, dtypes, ptrs, cuda


def _match_targets(
    m: RankManifest, check: ManifestCheck, targets: Any, strict_paths: Sequence[tuple[Any, ...]]
) -> tuple[dict[int, torch.Tensor], list[Want], dict[int, Any], _TargetCols | None]:
    """Map stored leaves onto the caller's tensors.

    Returns the tensors to fill in place (for a DTensor: its local shard), the targets that
    need resharding, what to put in the returned tree instead of a new tensor, and, where the
    common case read them, the :class:`_TargetCols` of the tensors to fill (in their order).
    """
    out: dict[int, torch.Tensor] = {}
    wants: list[Want] = []
    values: dict[int, Any] = {}
    paths = check.paths
    if targets is None:
        _consolidate(m, check, set(), wants, values)
        return out, wants, values, None
    idx = list(paths)
    pl = list(paths.values())
    cols = _Paths(pl)
    ts = _gather(targets, cols)
    problems = []
    hints: list[str] = []
    for prefix in strict_paths:
        sub = _lookup(targets, prefix)
        if not isinstance(sub, dict):
            continue
        runs, deep_keys = _under(cols, prefix)
        if not deep_keys and len(runs) == 1:
            a, b = runs[0]
            if len(sub) == b - a and not any(map(operator.is_, ts[a:b], repeat(None))):
                continue  # every stored key found in it (dict keys are unique), and no other
        leaf_keys = set().union(*(cols.lasts[a:b] for a, b in runs))
        stored_keys = leaf_keys | deep_keys
        only_target = [k for k, v in sub.items() if isinstance(v, torch.Tensor) and k not in leaf_keys]
        only_stored = [k for k in stored_keys if k not in sub]
        problems += [
            f"{key_path('state', prefix + (k,))} is in the target but not in the checkpoint" for k in only_target
        ]
        problems += [
            f"{key_path('state', prefix + (k,))} is in the checkpoint but not in the target" for k in only_stored
        ]
        hints += _key_hints(only_target, only_stored)
    kinds = set(map(type, ts))
    if not check.dtensors and not any(k not in _PLAIN and issubclass(k, torch.Tensor) for k in kinds):
        # The common case, a column at a time: plain tensors (and non-tensors, which are left
        # alone), stored as tensors of the same shapes. Anything else takes the general loop,
        # which names every problem.
        if kinds <= _PLAIN:
            il, tl = idx, ts
        else:
            sel = list(compress(range(len(ts)), map(_PLAIN.__contains__, map(type, ts))))
            il, tl = list(map(idx.__getitem__, sel)), list(map(ts.__getitem__, sel))
        lfs = m.leaves if il == list(range(len(m.leaves))) else list(map(m.leaves.__getitem__, il))
        if all(map(operator.eq, map(_KIND, lfs), repeat("tensor"))):
            tcols = _TargetCols(tl)  # everything restore reads of the targets, while they are in cache
            if all(map(operator.eq, tcols.shapes, map(_SHAPE, lfs))):
                if problems:
                    _mismatch(m, problems, hints)
                return dict(zip(il, tl)), wants, values, tcols
    for i, path, t in zip(idx, pl, ts):
        if not isinstance(t, torch.Tensor):
            continue
        lf = m.leaves[i]
        if lf.kind != "tensor":
            problems.append(f"{key_path('state', path)}: checkpoint holds a numpy array, target a tensor")
            continue
        if type(t) in _PLAIN and i not in check.dtensors:  # the common case: one shape compare
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
        _mismatch(m, problems, hints)
    _consolidate(m, check, (set(values) | set(out)) if check.dtensors else set(), wants, values)
    return out, wants, values, None


def _mismatch(m: RankManifest, problems: list[str], hints: list[str]) -> NoReturn:
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    raise StateMismatchError(
        f"step {m.step} does not fit the restore target:\n  " + "\n  ".join(problems[:50]) + more + "".join(hints)
    )


def _under(cols: _Paths, prefix: tuple[Any, ...]) -> tuple[list[tuple[int, int]], set[Any]]:
    """Where the stored leaves right under ``prefix`` are (runs of ``cols``), and the keys
    under ``prefix`` of deeper subtrees."""
    n = len(prefix)
    runs = []
    deep = set()
    for parent, a, b in cols.runs():
        if parent is None:
            continue
        if parent == prefix:
            runs.append((a, b))
        elif len(parent) > n and parent[:n] == prefix:
            deep.add(parent[n])
    return runs, deep


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
    cols: _TargetCols | None = None,
) -> _Targets:
    """Where each storage's bytes go; not read: storages only resharded leaves use.

    A storage lands straight in the caller's tensor when it is the only leaf's, stored
    C-contiguous from its start, and the tensor is a plain contiguous one (on the CPU or a
    CUDA device) of the same dtype and byte size; the stored layout is checked first, then the
    target's, each a column at a time. ``cols``: the targets' :class:`_TargetCols`, in the
    order of ``leaf_targets``, where :func:`_match_targets` read them already.
    """
    ns, nl = len(m.storages), len(m.leaves)
    out = _Targets(ns)
    sidx = list(map(_STORAGE, m.leaves))
    iota = list(range(max(ns, nl)))
    one_each = sidx == iota[:nl] and ns == nl  # leaf i is storage i's only leaf (the writer's usual layout)
    users = Counter() if one_each else Counter(sidx)
    if skip:
        for s, c in Counter(map(sidx.__getitem__, skip)).items():
            if one_each or c == users[s]:
                out.read[s] = False  # every leaf of it is resharded
    nbytes = list(map(_NBYTES, m.storages))
    if leaf_targets:
        li = list(leaf_targets)
        if cols is None:
            cols = _TargetCols(leaf_targets.values())
        every = li == iota[:nl]  # every leaf has a target, in order
        sl = sidx if every else list(map(sidx.__getitem__, li))
        lfs = m.leaves if every else list(map(m.leaves.__getitem__, li))
        shapes = list(map(_SHAPE, lfs))
        contiguous = {sh: contiguous_strides(sh) for sh in set(shapes)}
        # The candidates as columns: leaf, storage, leaf record, stored shape, then the target's
        # dtype, host address and CUDA flag (read already: no torch call here).
        cand: list[list[Any]] = [li, sl, list(lfs), shapes, cols.dtypes, cols.ptrs, cols.cuda]
        # Each check over all candidates at once, short-circuiting (all() over a map, no list);
        # only where one fails somewhere is it made a mask, and the candidates narrowed down.
        # Every target's shape is its leaf's (_match_targets): a C-contiguous leaf from the
        # start of its storage, of the same dtype, fills the storage iff their sizes agree.
        checks: list[Callable[[list[list[Any]]], Iterable[Any]]] = [
            lambda c: map(bool, map(nbytes.__getitem__, c[1])),
            lambda c: map(operator.not_, map(_OFFSET, c[2])),
            lambda c: map(operator.eq, map(_STRIDE, c[2]), map(contiguous.__getitem__, c[3])),
            lambda c: map(
                operator.eq,
                map(operator.mul, map(math.prod, c[3]), map(esizes.__getitem__, c[0])),
                map(nbytes.__getitem__, c[1]),
            ),
            # then the target's: the stored dtype, and in host memory or on a CUDA device
            lambda c: map(operator.is_, c[4], map(dtypes.__getitem__, c[0])),
            lambda c: map(operator.or_, map(bool, c[5]), c[6]),
        ]
        if skip:  # else every storage is read
            checks.insert(0, lambda c: map(out.read.__getitem__, c[1]))
        if not one_each:
            checks.insert(0, lambda c: map(operator.eq, map(users.__getitem__, c[1]), repeat(1)))
        for chk in checks:
            if not all(chk(cand)):
                mask = list(chk(cand))
                cand = [list(compress(col, mask)) for col in cand]
        ds, ptrs, cuda = cand[1], cand[5], cand[6]
        _scatter(out.is_direct, ds, [True] * len(ds))
        if any(cuda):  # bytes go through a byte view of the tensor (ptr stays 0)
            for s, i in zip(compress(ds, cuda), compress(cand[0], cuda)):
                t = leaf_targets[i]
                out.dest[s] = byte_view(t.untyped_storage(), int(t.storage_offset()) * t.element_size(), nbytes[s])
            host = list(map(operator.not_, cuda))
            ds, ptrs = list(compress(ds, host)), list(compress(ptrs, host))
        _scatter(out.ptr, ds, ptrs)
    for s in compress(range(ns), map(operator.gt, out.read, out.is_direct)):  # read, not direct
        out.fresh(s, nbytes[s])
    return out


def _read_objects(
    fetcher: Fetcher, m: RankManifest, plan: ObjectPlan, targets: _Targets, loaded: Loaded, ahead: _Ahead | None = None
) -> None:
    # Storages with bytes that are read, by offset; the manifest check guarantees they do not
    # overlap, so the storages an object touches are a contiguous run found by bisection.
    # Objects that hold none of them are not read.
    offsets = list(map(_START, m.storages))
    sizes = list(map(_NBYTES, m.storages))
    read = list(map(operator.and_, map(bool, sizes), targets.read))
    starts: list[int]
    ptrs: list[int]
    direct: list[bool]
    if all(read) and all(map(operator.le, offsets, offsets[1:])):
        # Every storage read, in stream order (the writer's usual layout): the columns as they are.
        order: Sequence[int] = range(len(offsets))
        starts, ptrs, direct = offsets, targets.ptr, targets.is_direct
        ends = list(map(operator.add, offsets, sizes))
    else:
        order = list(compress(range(len(offsets)), read))
        starts = list(map(offsets.__getitem__, order))
        if not all(map(operator.le, starts, starts[1:])):  # the writer lays them out in order: sorted already
            order.sort(key=offsets.__getitem__)
            starts = list(map(offsets.__getitem__, order))
        ends = list(map(operator.add, starts, map(sizes.__getitem__, order)))
        # Per position in ``order``: where its bytes go.
        ptrs = list(map(targets.ptr.__getitem__, order))
        direct = list(map(targets.is_direct.__getitem__, order))
    obj_offsets = list(accumulate(map(_SIZE, m.objects), initial=0))
    lock = threading.Lock()
    failed = threading.Event()
    landing = loaded.landing

    def work(j: int) -> None:
        if failed.is_set():
            return  # the step is lost already; do not write more of it into the targets
        obj = m.objects[j]
        lo, hi = obj_offsets[j], obj_offsets[j + 1]
        k = bisect.bisect_right(ends, lo)  # storages [k, k1) overlap [lo, hi)
        k1 = bisect.bisect_left(starts, hi, k)
        undo = loaded.undo
        cands: Sequence[Replica] = plan[obj.key]
        try:
            if landing is not None:
                verified = ahead.take(j) if ahead is not None else None
                rest = _deferred(
                    fetcher, obj, cands, lo, hi, starts[k:k1], ends[k:k1], ptrs[k:k1], direct[k:k1], landing, verified
                )
                if isinstance(rest, str):
                    with lock:
                        loaded.sources[obj.key] = rest
                    return
                cands = rest
            # An object that lies inside one storage filled in place on the CPU is read straight
            # into it (verified there; a mismatch is read again from the next replica): no copy.
            if k < k1 and direct[k] and ptrs[k] and starts[k] <= lo and hi <= ends[k]:
                addr = ptrs[k] + lo - starts[k]
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
        for p in range(k, k1):
            a, b = max(lo, starts[p]), min(hi, ends[p])
            if a >= b:
                continue
            if ptrs[p]:
                dst = ptrs[p] + a - starts[p]
                if direct[p] and undo is not None:
                    undo.save_raw(dst, b - a)  # the caller's tensor
                ctypes.memmove(dst, buf_ptr + a - lo, b - a)
            else:
                dest = targets.dest[order[p]]
                assert dest is not None  # a CUDA target: copied by torch
                region = dest[a - starts[p] : b - starts[p]]
                if undo is not None:
                    undo.save(region)
                region.copy_(buf[a - lo : b - lo], non_blocking=False)
        with lock:
            loaded.sources[obj.key] = url

    wanted = []  # the objects that overlap a storage that is read
    for j in range(len(m.objects)):
        k = bisect.bisect_right(ends, obj_offsets[j])
        if k < len(starts) and starts[k] < obj_offsets[j + 1]:
            wanted.append(j)
    futures = [fetcher.pool.submit(work, j) for j in wanted]
    # Every read must be over before we return or raise: a straggler writing into the
    # targets after a fallback to an older step would mix two steps.
    wait(futures)
    for f in futures:
        f.result()


def _deferred(
    fetcher: Fetcher,
    obj: ObjectRecord,
    cands: Sequence[Replica],
    lo: int,
    hi: int,
    starts: list[int],
    ends: list[int],
    ptrs: list[int],
    direct: list[bool],
    landing: Landing,
    verified: _Verified | None = None,
) -> str | Sequence[Replica]:
    """Verify object ``obj`` (stream bytes ``[lo, hi)``) where it lies and queue its bytes for
    the caller's tensors in ``landing``; returns the replica's URL when done, else the replicas
    to read it from the usual way (not mappable, or this copy failed).

    ``starts``, ``ends``, ``ptrs`` and ``direct`` describe the storages the object overlaps
    (fresh lists: they may be changed). Applies when every one is in host memory and at least
    one is the caller's: the bytes for fresh buffers are copied at once (nothing of the
    caller's to protect), those for the caller's tensors wait. ``verified``: the object's
    :meth:`Fetcher.verify_mapped` result, where it was verified ahead (:class:`_Ahead`); then
    an object of fresh buffers only is copied out of the verified mapping too.
    """
    if verified is None:
        if not all(ptrs):
            return cands  # a CUDA target: copied by torch, the usual way
        if not any(direct):
            return cands  # nothing of the caller's: the usual read lands it at once, with no undo
        verified = fetcher.verify_mapped(obj.key, obj.size, obj.checksum, cands)
    mo, url, rest = verified
    if mo is None:
        return rest
    if not all(ptrs):  # a CUDA target (the guess of _host_first was wrong): verified again the usual way
        mo.close()
        return cands
    first = starts[:]  # the part of each storage inside the object: only the ends can be cut
    if first[0] < lo:
        first[0] = lo
    if ends[-1] > hi:
        ends[-1] = hi
    dst = list(map(operator.add, ptrs, map(operator.sub, first, starts)))
    src = list(map(operator.add, first, repeat(mo.addr - lo)))
    n = list(map(operator.sub, ends, first))
    if not all(direct):
        for d, s, c in zip(
            compress(dst, map(operator.not_, direct)),
            compress(src, map(operator.not_, direct)),
            compress(n, map(operator.not_, direct)),
        ):
            ctypes.memmove(d, s, c)
        dst, src, n = list(compress(dst, direct)), list(compress(src, direct)), list(compress(n, direct))
    if dst:
        landing.add_columns(mo, dst, src, n)
    else:
        mo.close()  # fresh buffers only: copied already
    return url


def _build_leaves(
    m: RankManifest,
    targets: _Targets,
    leaf_targets: dict[int, torch.Tensor],
    dtypes: list[torch.dtype | None],
    values: dict[int, Any],
    undo: UndoLog | None,
    landing: Landing | None,
) -> list[Any]:
    nl = len(m.leaves)
    sidx = list(map(_STORAGE, m.leaves))
    on_direct = list(map(targets.is_direct.__getitem__, sidx))  # filled in place: the target itself
    di = list(compress(range(nl), on_direct))
    direct_values: Iterable[Any] = map(leaf_targets.__getitem__, di)
    if values:
        direct_values = map(values.get, di, direct_values)
    if len(di) == nl:
        return list(direct_values)
    out: list[Any] = [None] * nl
    _scatter(out, di, direct_values)
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
