"""Match: where each stored leaf and storage goes in the caller's state (restore).

The checks half of :mod:`~ckptmirror.restore.fill`, run before any tensor is touched:
:func:`match_targets` finds each stored leaf's target tensor (by key path; keys, shapes and
dtypes checked, a mismatch named with hints for wrapper prefixes), and
:func:`storage_targets` decides where each stored storage's bytes land: straight in the
caller's tensor, or in a fresh buffer. Both work a column at a time over the manifest and the
targets (``map``, ``compress``, ``zip``): at 50k tensors a Python step per tensor costs tens
of milliseconds.
"""

from __future__ import annotations

import math
import operator
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from itertools import compress, repeat
from typing import Any, NoReturn

import numpy as np
import torch
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from ..buffers import byte_view
from ..errors import StateMismatchError
from ..format import RankManifest, leaf_columns, storage_columns
from ..state.reshard import Want
from ..state.tree import dtensor_local, is_dtensor, key_path
from .check import KeyPaths, ManifestCheck, contiguous_strides


class StorageTargets:
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

    __slots__ = ("dest", "is_direct", "ptr", "read", "untied")

    def __init__(self, n: int) -> None:
        self.read = [True] * n
        self.is_direct = [False] * n
        self.dest: list[torch.Tensor | None] = [None] * n
        self.ptr = [0] * n
        #: Storages that would have landed straight in targets sharing memory (see :func:`_untie`).
        self.untied: list[int] = []

    def fresh(self, s: int, nbytes: int) -> None:
        """Storage ``s`` goes to a new buffer (not the caller's tensor)."""
        dest = self.dest[s] = torch.empty(nbytes, dtype=torch.uint8)
        self.ptr[s] = dest.data_ptr()


def lookup(tree: Any, path: tuple[Any, ...]) -> Any:
    node = tree
    for k in path:
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            return None
    return node


#: The tensor types filled byte for byte; other tensor types (DTensor, subclasses) take the general path.
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_PLAIN_DICTS = (dict, OrderedDict)


def scatter(column: list[Any], at: list[int], values: Iterable[Any]) -> None:
    """``column[i] = v`` for each ``i`` of ``at`` and ``v`` of ``values``, in C."""
    if len(at) == len(column) and at == list(range(len(column))):
        column[:] = values  # the common case: every entry, in order
    else:
        deque(map(column.__setitem__, at, values), maxlen=0)


def _gather(targets: Any, cols: KeyPaths) -> list[Any]:
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
            parent = lookup(up, parent_path[-1:])  # (an optimizer's state: one run per parameter)
        else:
            parent = lookup(targets, parent_path)
            if parent_path:
                up_path = parent_path[:-1]
                up = lookup(targets, up_path)
        if type(parent) in _PLAIN_DICTS:
            out += map(parent.get, lasts[a:b])
        else:
            out += [lookup(parent, (k,)) for k in lasts[a:b]]
    return out


class TargetCols:
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


#: A dict of the targets under a strict path whose keys are exactly those of one run of stored
#: leaves: (its path, the run's start and end in ``check.keys``, the dict).
Whole = tuple[tuple[Any, ...], int, int, dict[Any, Any]]


def match_targets(
    m: RankManifest, check: ManifestCheck, targets: Any, strict_paths: Sequence[tuple[Any, ...]]
) -> tuple[dict[int, torch.Tensor], list[Want], dict[int, Any], TargetCols | None, list[Whole]]:
    """Map stored leaves onto the caller's tensors.

    Returns the tensors to fill in place (for a DTensor: its local shard), the targets that
    need resharding, what to put in the returned tree instead of a new tensor, where the
    common case read them, the :class:`TargetCols` of the tensors to fill (in their order),
    and the dicts under ``strict_paths`` that hold exactly the stored keys there (:data:`Whole`).
    """
    out: dict[int, torch.Tensor] = {}
    wants: list[Want] = []
    values: dict[int, Any] = {}
    whole: list[Whole] = []
    if targets is None:
        _consolidate(m, check, set(), wants, values)
        return out, wants, values, None, whole
    cols = check.keys
    idx = cols.order
    ts = _gather(targets, cols)
    problems = []
    hints: list[str] = []
    for prefix in strict_paths:
        sub = lookup(targets, prefix)
        if not isinstance(sub, dict):
            continue
        runs, deep_keys = _under(cols, prefix)
        if not deep_keys and len(runs) == 1:
            a, b = runs[0]
            if len(sub) == b - a and not any(map(operator.is_, ts[a:b], repeat(None))):
                whole.append((prefix, a, b, sub))
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
        lc = leaf_columns(m)
        every = il == list(range(len(lc)))
        if (lc.kinds.count("tensor") == len(lc)) if every else all(map("tensor".__eq__, map(lc.kinds.__getitem__, il))):
            tcols = TargetCols(tl)  # everything restore reads of the targets, while they are in cache
            # (list equality: one C loop, each torch.Size compared with its stored tuple)
            if tcols.shapes == (lc.shapes if every else list(map(lc.shapes.__getitem__, il))):
                # Not filled byte for byte (no host address): the few that need a closer look.
                odd = list(compress(range(len(tl)), map(operator.not_, tcols.ptrs)))
                problems += _unfillable(check, [il[k] for k in odd], [tl[k] for k in odd])
                if problems:
                    _mismatch(m, problems, hints)
                return dict(zip(il, tl)), wants, values, tcols, whole
    for i, path, t in zip(idx, cols.paths(), ts):
        if not isinstance(t, torch.Tensor):
            continue
        if isinstance(t, (UninitializedParameter, UninitializedBuffer)):  # a lazy module's: no shape, no data yet
            problems.append(
                f"{key_path('state', path)}: the target is an uninitialized lazy parameter or buffer "
                "(torch.nn.LazyLinear and the like): run one forward pass (or "
                "module.initialize_parameters(...)) to materialise it, then restore"
            )
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
    odd = [i for i, t in out.items() if not (type(t) in _PLAIN and t.is_cpu and t.is_contiguous())]
    problems += _unfillable(check, odd, [out[i] for i in odd])
    if problems:
        _mismatch(m, problems, hints or _shape_hint(problems))
    _consolidate(m, check, (set(values) | set(out)) if check.dtensors else set(), wants, values)
    return out, wants, values, None, whole


def _unfillable(check: ManifestCheck, leaves: Sequence[int], ts: Sequence[torch.Tensor]) -> list[str]:
    """Problems with targets that no restore can fill (checked before any is touched, so that
    the failure leaves every target as it was): on the meta device (no data: a copy into it does
    nothing), or whose elements share memory (an expanded, stride-0 tensor: the copy into it
    would fail half-way through the landing). ``leaves``: their leaf indices, ``ts``: the tensors;
    only targets not filled byte for byte from host memory need this look."""
    bad: list[tuple[int, str]] = []
    for i, t in zip(leaves, ts):
        if t.device.type == "meta":
            bad.append(
                (
                    i,
                    "the target is on the meta device (it holds no data, so nothing would be loaded): materialise "
                    "the module first, e.g. module.to_empty(device='cpu'), then restore",
                )
            )
        elif t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:
            bad.append(
                (
                    i,
                    f"the target's elements share memory (an expanded tensor: shape {list(t.shape)}, strides "
                    f"{list(t.stride())}), so it cannot be filled: give the module a tensor of its own there (e.g. "
                    "register the buffer as x.expand(...).clone())",
                )
            )
    if not bad:
        return []
    paths = check.paths  # every leaf's path: built once, only for the message
    return [f"{key_path('state', paths[i])}: {why}" for i, why in bad]


def _shape_hint(problems: list[str]) -> list[str]:
    """The fix for shape mismatches: the target was built with another configuration."""
    if not any(" shape " in p for p in problems):
        return []
    return [
        "\n  hint: build the target with the configuration the checkpoint was saved with (`ckptmirror inspect "
        "<replica> --step N` lists the stored shapes)"
    ]


def _mismatch(m: RankManifest, problems: list[str], hints: list[str]) -> NoReturn:
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    raise StateMismatchError(
        f"step {m.step} does not fit the restore target:\n  " + "\n  ".join(problems[:50]) + more + "".join(hints)
    )


def _under(cols: KeyPaths, prefix: tuple[Any, ...]) -> tuple[list[tuple[int, int]], set[Any]]:
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


def storage_targets(
    m: RankManifest,
    leaf_targets: dict[int, torch.Tensor],
    dtypes: list[torch.dtype | None],
    esizes: list[int],
    skip: set[int],
    cols: TargetCols | None = None,
    exact: bool = False,
) -> StorageTargets:
    """Where each storage's bytes go; not read: storages only resharded leaves use.

    A storage lands straight in the caller's tensor when it is the only leaf's, stored
    C-contiguous from its start, and the tensor is a plain contiguous one (on the CPU or a
    CUDA device) of the same dtype and byte size; the stored layout is checked first, then the
    target's, each a column at a time. ``cols``: the targets' :class:`TargetCols`, in the
    order of ``leaf_targets``, where :func:`match_targets` read them already. ``exact``: the
    manifest check proved every leaf C-contiguous from the start of its storage and as long as
    it (:attr:`ManifestCheck.exact`), so the stored layout is not checked leaf by leaf again.
    """
    lc = leaf_columns(m)
    ns, nl = len(m.storages), len(lc)
    out = StorageTargets(ns)
    sidx = lc.storage
    iota = list(range(max(ns, nl)))
    one_each = sidx == iota[:nl] and ns == nl  # leaf i is storage i's only leaf (the writer's usual layout)
    users = Counter() if one_each else Counter(sidx)
    if skip:
        for s, c in Counter(map(sidx.__getitem__, skip)).items():
            if one_each or c == users[s]:
                out.read[s] = False  # every leaf of it is resharded
    nbytes = storage_columns(m).nbytes
    if leaf_targets:
        li = list(leaf_targets)
        if cols is None:
            cols = TargetCols(leaf_targets.values())
        every = li == iota[:nl]  # every leaf has a target, in order
        if every and one_each and exact and not skip and 0 not in nbytes:
            # The common case (a state restored into the model and optimizer it came from):
            # every leaf fills its own storage, proven by the manifest check, so only the
            # targets remain to check, each in one C-level scan: the stored dtypes (dtypes are
            # singletons: equal means identical) and a host address each (no CUDA target).
            if cols.dtypes == dtypes and 0 not in cols.ptrs:
                out.is_direct = [True] * ns
                out.ptr = list(cols.ptrs)
                _untie(out, nbytes)
                return out
        sl = sidx if every else list(map(sidx.__getitem__, li))
        # The candidates as columns: leaf, storage, then the target's dtype, host address and
        # CUDA flag (read already: no torch call here).
        cand: list[list[Any]] = [li, sl, cols.dtypes, cols.ptrs, cols.cuda]
        # Each check over all candidates at once, short-circuiting (all() over a map, no list);
        # only where one fails somewhere is it made a mask, and the candidates narrowed down.
        checks: list[Callable[[list[list[Any]]], Iterable[Any]]] = []
        if 0 in nbytes:
            checks.append(lambda c: map(bool, map(nbytes.__getitem__, c[1])))
        if not exact:
            # Every target's shape is its leaf's (match_targets): a C-contiguous leaf from the
            # start of its storage, of the same dtype, fills the storage iff their sizes agree.
            offsets, strides, shapes = lc.offsets, lc.strides, lc.shapes
            contiguous = {sh: contiguous_strides(sh) for sh in set(shapes)}
            checks += [
                lambda c: map(operator.not_, map(offsets.__getitem__, c[0])),
                lambda c: map(
                    operator.eq,
                    map(strides.__getitem__, c[0]),
                    map(contiguous.__getitem__, map(shapes.__getitem__, c[0])),
                ),
                lambda c: map(
                    operator.eq,
                    map(operator.mul, map(math.prod, map(shapes.__getitem__, c[0])), map(esizes.__getitem__, c[0])),
                    map(nbytes.__getitem__, c[1]),
                ),
            ]
        checks += [
            # then the target's: the stored dtype, and in host memory or on a CUDA device
            lambda c: map(operator.is_, c[2], map(dtypes.__getitem__, c[0])),
            lambda c: map(operator.or_, map(bool, c[3]), c[4]),
        ]
        if skip:  # else every storage is read
            checks.insert(0, lambda c: map(out.read.__getitem__, c[1]))
        if not one_each:
            checks.insert(0, lambda c: map(operator.eq, map(users.__getitem__, c[1]), repeat(1)))
        for chk in checks:
            if not all(chk(cand)):
                mask = list(chk(cand))
                cand = [list(compress(col, mask)) for col in cand]
        ds, ptrs, cuda = cand[1], cand[3], cand[4]
        scatter(out.is_direct, ds, [True] * len(ds))
        if any(cuda):  # bytes go through a byte view of the tensor (ptr stays 0)
            for s, i in zip(compress(ds, cuda), compress(cand[0], cuda)):
                t = leaf_targets[i]
                out.dest[s] = byte_view(t.untyped_storage(), int(t.storage_offset()) * t.element_size(), nbytes[s])
            host = list(map(operator.not_, cuda))
            ds, ptrs = list(compress(ds, host)), list(compress(ptrs, host))
        scatter(out.ptr, ds, ptrs)
        _untie(out, nbytes)
    for s in compress(range(ns), map(operator.gt, out.read, out.is_direct)):  # read, not direct
        if out.dest[s] is None:
            out.fresh(s, nbytes[s])
    return out


def _untie(out: StorageTargets, nbytes: list[int]) -> None:
    """Storages that would land straight in memory another one lands in too go to fresh
    buffers instead (``out.untied``), and are copied into their targets one after the other.

    Such targets share memory (tied weights, e.g. an embedding and an output layer) where the
    checkpoint holds separate tensors: reads landing in parallel would leave a mix of both.
    Copied in leaf order, the last one wins, as with torch's ``load_state_dict``. One NumPy pass
    over the host addresses, which are usually ascending already (then no sort); CUDA targets
    (filled through byte views, ``dest``) by device, where there are any.
    """
    hit = _overlapping(out.ptr, nbytes, out.is_direct)
    cuda = [s for s, d in enumerate(out.dest) if out.is_direct[s] and d is not None and d.is_cuda]
    if cuda:
        dest = out.dest
        for dev in {dest[s].device for s in cuda}:  # type: ignore[union-attr]
            on = [s for s in cuda if dest[s].device == dev]  # type: ignore[union-attr]
            addr = [dest[s].data_ptr() for s in on]  # type: ignore[union-attr]
            found = _overlapping(addr, [nbytes[s] for s in on], [True] * len(on))
            hit += [on[i] for i in found]
    for s in hit:
        out.is_direct[s] = False
        out.ptr[s] = 0
        out.dest[s] = None
        out.fresh(s, nbytes[s])  # a host buffer: the target is filled by copy_ (CUDA too)
    out.untied = sorted(hit)


def _overlapping(ptr: Sequence[int], nbytes: Sequence[int], direct: Sequence[bool]) -> list[int]:
    """Indices of the ranges ``[ptr, ptr + nbytes)`` (those with ``direct`` set, a non-zero
    address and bytes) that overlap another one."""
    p = np.array(ptr, dtype=np.int64)
    n = np.array(nbytes, dtype=np.int64)
    sel = np.flatnonzero(np.array(direct, dtype=bool) & (p != 0) & (n > 0))
    if len(sel) < 2:
        return []
    ps, ns = p[sel], n[sel]
    if bool(np.all(ps[1:] >= ps[:-1] + ns[:-1])):
        return []  # ascending and disjoint: the usual case
    o = np.argsort(ps, kind="stable")
    ps, ns, sel = ps[o], ns[o], sel[o]
    reach = np.maximum.accumulate(ps + ns)  # the end of the furthest range so far
    starts = np.empty(len(ps), dtype=bool)
    starts[0] = True
    starts[1:] = ps[1:] >= reach[:-1]  # a range that starts a new group of overlapping ones
    group = np.cumsum(starts)
    return [int(s) for s in sel[np.bincount(group)[group] > 1]]


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
