"""State tree <-> JSON structure plus a flat list of arrays.

A training state is a tree of dicts, lists and tuples whose leaves are tensors and plain
values. ``flatten`` turns it into a JSON-safe *structure* in which every tensor (or NumPy
array) is replaced by a reference ``{"t": "tensor", "i": n}`` into a flat list. ``unflatten``
does the reverse. Nothing here ever pickles or evaluates anything: the structure is data.

Encoding (a closed set; anything else is an :class:`UnsupportedTypeError` naming its key path):

======================  ============================================================
value                   JSON
======================  ============================================================
None, bool, str         themselves
int                     itself (exact, any size)
int beyond int64        ``{"t": "int", "v": hex string}`` (no digit limit)
float                   itself, or ``{"t": "float", "v": "nan"|"-nan"|"inf"|"-inf"}``
dict                    ``{"t": "dict", "items": [[key, value], ...]}`` (keys: str/int/float/bool/None)
list / tuple            ``{"t": "list"|"tuple", "v": [...]}``
torch.Size              ``{"t": "size", "v": [ints]}``
torch.dtype / device    ``{"t": "dtype", "v": "bfloat16"}`` / ``{"t": "device", "v": "cuda:0"}``
bytes                   ``{"t": "bytes", "v": base64}``
tensor / ndarray        ``{"t": "tensor", "i": index}`` / ``{"t": "ndarray", "i": index}``
DTensor (FSDP2, TP)     ``{"t": "dtensor", "i": index, "gshape": [..], "goffset": [..]}``: the local shard
numpy scalar            ``{"t": "npscalar", "dtype": "<f8", "v": base64 of its bytes}``
large dict of tensors   ``{"t": "tensors", "keys": [k, ...], "i": first}`` (version 4): ``{k_j: tensor first + j}``
large dict of records   ``{"t": "tensors", "keys": [k, ...], "fields": [f, ...], "i": first}`` (version 4):
                        ``{k_j: {f_c: tensor first + j * len(fields) + c}}`` (an optimizer's per-parameter state)
======================  ============================================================

The two ``tensors`` forms (keys: str or int64 ints, distinct; fields: distinct str) are what a
state dict and an optimizer state are mostly made of: written as one node with no JSON object
per tensor, they are read in bulk (a few C passes) instead of one generic node at a time.
"""

from __future__ import annotations

import base64
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain, product
from operator import attrgetter
from typing import Any

import torch

from ..errors import ManifestError, UnsupportedTypeError
from .decode import _I64_MAX, _I64_MIN, _KEY_TYPES, _STR_ONLY, JSON, MAX_DEPTH, key_path, unflatten

# ``unflatten`` and ``key_path`` live in the torch-free :mod:`.decode` (the operator commands
# read manifests without torch); they are re-exported here, next to ``flatten``.
__all__ = [
    "DTYPES_BY_NAME",
    "JSON",
    "MAX_DEPTH",
    "Flattened",
    "dtype_from_name",
    "dtype_name",
    "flatten",
    "key_path",
    "unflatten",
]


@dataclass(frozen=True)
class Flattened:
    """The result of :func:`flatten`."""

    structure: JSON
    leaves: list[Any]  # torch.Tensor or numpy.ndarray, in reference order
    paths: list[tuple[Any, ...]]  # key path of each leaf
    #: The :class:`TensorLayout` of ``leaves`` when flatten() found or made one on its way (every
    #: leaf a plain tensor, none lazily conjugated or negated), for the plan cache's key; else None.
    layout: TensorLayout | None = field(default=None, compare=False, repr=False)
    #: The first ``plain`` leaves are recorded as plain tensors (not parameters, no
    #: ``requires_grad``) whatever they are: a module's own tensors, taken with
    #: ``state_dict(keep_vars=True)`` instead of the ``detach()``ed alias ``state_dict()`` makes of
    #: each (see :func:`~ckptmirror.state.targets.module_state`). Part of the plan cache's key.
    plain: int = 0


def _is_numpy(obj: Any, attr: str) -> bool:
    mod = type(obj).__module__
    if not mod.startswith("numpy"):
        return False
    import numpy as np

    return isinstance(obj, getattr(np, attr))


def flatten(state: Any, root: str = "state", *, _fast: bool = True) -> Flattened:
    """Encode ``state``; raise :class:`UnsupportedTypeError` naming the first bad key path."""
    leaves: list[Any] = []
    paths: list[tuple[Any, ...]] = []
    fast: list[torch.Tensor] | None = [] if _fast else None  # tensors the dict fast path took unchecked

    def enc(obj: Any, path: tuple[Any, ...]) -> JSON:
        if len(path) > MAX_DEPTH:
            raise UnsupportedTypeError(key_path(root, path), type(obj), f"nested deeper than {MAX_DEPTH}")
        if _is_numpy(obj, "generic"):
            # Before the builtin checks: np.float64 is a float, np.str_ a str.
            if obj.dtype.hasobject:
                raise UnsupportedTypeError(key_path(root, path), type(obj))
            return {"t": "npscalar", "dtype": obj.dtype.str, "v": base64.b64encode(obj.tobytes()).decode("ascii")}
        if obj is None or isinstance(obj, bool):
            return obj
        if isinstance(obj, str):
            return str(obj)  # str subclasses (StrEnum) become plain strings
        if isinstance(obj, int):
            if -(1 << 63) <= obj < (1 << 63):
                return int(obj)  # IntEnum and friends become plain ints
            # Python's int<->str conversion refuses > 4300 digits; hex has no such limit.
            return {"t": "int", "v": hex(obj)}
        if isinstance(obj, float):
            if math.isfinite(obj):
                return float(obj)
            if math.isnan(obj):
                return {"t": "float", "v": "-nan" if math.copysign(1.0, obj) < 0 else "nan"}
            return {"t": "float", "v": "inf" if obj > 0 else "-inf"}
        if isinstance(obj, torch.Tensor):
            if is_dtensor(obj):
                # A sharded tensor: this rank stores its local shard and where it sits in the
                # global tensor; readers reassemble or reshard from every rank's shards.
                try:
                    local, gshape, goffset = dtensor_local(obj)
                except ValueError as exc:
                    raise UnsupportedTypeError(key_path(root, path), type(obj), str(exc)) from None
                _check_tensor(local, root, path)
                leaves.append(local)
                paths.append(path)
                return {"t": "dtensor", "i": len(leaves) - 1, "gshape": gshape, "goffset": goffset}
            _check_tensor(obj, root, path)
            leaves.append(obj)
            paths.append(path)
            return {"t": "tensor", "i": len(leaves) - 1}
        if isinstance(obj, torch.Size):
            return {"t": "size", "v": [int(d) for d in obj]}
        if isinstance(obj, dict):
            if fast is not None and len(obj) >= _BULK_MIN and len(path) < MAX_DEPTH:
                # A state dict: str keys, plain tensors. Encoded in bulk (comprehensions, no
                # per-entry branching: ~0.3 us a tensor, was ~1.3 us), checked in bulk below.
                keys = list(obj)
                vals = list(obj.values())
                bulk = _bulk_node(path, len(leaves), keys, vals)
                if bulk is not None:
                    node, tensors, kpaths = bulk
                    leaves.extend(tensors)
                    fast.extend(tensors)
                    paths.extend(kpaths)
                    return node
            items = []
            for k, v in obj.items():
                tk = type(k)
                if tk is str or (tk is int and _I64_MIN <= k <= _I64_MAX):
                    ek = k
                else:
                    if not (k is None or isinstance(k, (str, int, float, bool))):
                        raise UnsupportedTypeError(
                            key_path(root, path) + f" key {k!r}",
                            type(k),
                            "dict keys must be str, int, float, bool or None",
                        )
                    ek = enc(k, path)
                tv = type(v)
                # The fast path for what states are mostly made of (a state dict's plain
                # tensors): checked in bulk at the end (see below). At 50,000 tensors the
                # generic path cost ~3.5 us a tensor, all of it in save()'s stall.
                if fast is not None and (tv is _Tensor or tv is _Parameter) and len(path) < MAX_DEPTH:
                    fast.append(v)
                    leaves.append(v)
                    paths.append(path + (k,))
                    items.append([ek, {"t": "tensor", "i": len(leaves) - 1}])
                    continue
                items.append([ek, enc(v, path + (k,))])
            return {"t": "dict", "items": items}
        if type(obj) in (list, tuple):
            out = []
            for i, v in enumerate(obj):
                tv = type(v)
                # plain ints and strings (an optimizer's param_groups list every parameter's index)
                if tv is str or (tv is int and _I64_MIN <= v <= _I64_MAX):
                    out.append(v)
                else:
                    out.append(enc(v, path + (i,)))
            return {"t": type(obj).__name__, "v": out}
        if isinstance(obj, torch.dtype):
            return {"t": "dtype", "v": dtype_name(obj)}
        if isinstance(obj, torch.device):
            return {"t": "device", "v": str(obj)}
        if isinstance(obj, (bytes, bytearray)):
            return {"t": "bytes", "v": base64.b64encode(bytes(obj)).decode("ascii")}
        if _is_numpy(obj, "ndarray"):
            if obj.dtype.hasobject or obj.dtype.fields is not None:
                raise UnsupportedTypeError(
                    key_path(root, path), type(obj), f"numpy dtype {obj.dtype} holds Python objects or fields"
                )
            leaves.append(obj)
            paths.append(path)
            return {"t": "ndarray", "i": len(leaves) - 1}
        hint = ""
        if isinstance(obj, tuple):
            hint = "named tuples and tuple subclasses are not stored; convert to a tuple or dict"
        elif hasattr(obj, "state_dict"):
            hint = "call .state_dict() on it first"
        raise UnsupportedTypeError(key_path(root, path), type(obj), hint)

    structure = enc(state, ())
    layout = None
    if fast:
        # The tensors the fast path took unchecked: one C++ pass when they are laid out like a
        # list checked before (the steady state: every save of the same model), else the
        # column checks, and a layout made for the next save.
        layout = find_layout(fast)
        if layout is None:
            if not _all_plain(fast):
                # Some tensor the fast path took is not storable: encode again on the general
                # path, whose error names the first bad key path (rare: only the failing call).
                return flatten(state, root, _fast=False)
            layout = make_layout(fast, checked=True)
    return Flattened(structure, leaves, paths, layout if fast is not None and len(fast) == len(leaves) else None)


def _bulk_node(
    path: tuple[Any, ...], base: int, keys: list[Any], vals: list[Any]
) -> tuple[JSON, list[Any], list[tuple[Any, ...]]] | None:
    """The ``tensors`` node of a large dict (leaf indices from ``base``), its tensors in reference
    order and their key paths; None when the dict is not one (then it is encoded entry by entry).

    Two shapes qualify, both checked a whole column at a time: str or int64 keys to plain tensors
    (a state dict), and str or int64 keys to dicts that all have the same str keys, in the same
    order, to plain tensors (an optimizer's per-parameter state: ``{0: {"step": t, "exp_avg": t,
    ...}, ...}``).

    A large dict's node and key paths are kept and handed out again while its keys stay the same
    (a model's state dict, save after save): building the key paths is ~0.1 us a tensor of
    save()'s stall, comparing the keys ~0.02 us. So structures of successive saves share these
    nodes: like every structure, they are never modified once made.
    """
    key_types = set(map(type, keys))
    if not key_types <= _KEY_TYPES:
        return None
    if int in key_types:
        ints = [k for k in keys if type(k) is int]
        if min(ints) < _I64_MIN or max(ints) > _I64_MAX:
            return None
    val_types = set(map(type, vals))
    fields: list[str] | None = None
    if val_types <= _PLAIN_TYPES:
        tensors = vals
    elif val_types == _DICT_ONLY and len(path) + 1 < MAX_DEPTH:
        fields = list(vals[0])
        if not fields or set(map(type, fields)) != _STR_ONLY or not all(map(fields.__eq__, map(list, vals))):
            return None
        tensors = list(chain.from_iterable(map(dict.values, vals)))
        if not set(map(type, tensors)) <= _PLAIN_TYPES:
            return None
    else:
        return None
    cache_key = (path, base)
    if len(tensors) >= _BULK_CACHE_MIN:
        hit = _BULK_CACHE.get(cache_key)
        if hit is not None and hit[0] == keys and hit[1] == fields:
            return hit[2], tensors, hit[3]
    node: dict[str, Any] = {"t": "tensors", "keys": keys, "i": base}
    if fields is None:
        kpaths = list(map(path.__add__, zip(keys)))
    else:
        node = {"t": "tensors", "keys": keys, "fields": fields, "i": base}
        kpaths = list(map(path.__add__, product(keys, fields)))
    if len(tensors) >= _BULK_CACHE_MIN:
        if len(_BULK_CACHE) >= _BULK_CACHE_MAX:
            _BULK_CACHE.clear()
        _BULK_CACHE[cache_key] = (keys, fields, node, kpaths)
    return node, tensors, kpaths


#: (key path, first leaf index) -> (keys, fields, node, key paths) of large dicts of tensors (see above).
_BULK_CACHE: dict[tuple[tuple[Any, ...], int], tuple[list[Any], list[str] | None, JSON, list[tuple[Any, ...]]]] = {}
_BULK_CACHE_MIN = 512
_BULK_CACHE_MAX = 16


def _all_plain(tensors: Sequence[torch.Tensor]) -> bool:
    """What :func:`_check_tensor` checks, column by column (C loops, ~0.1 us a tensor each):
    strided, a supported dtype (no quantized dtype is one), not on the meta device."""
    return (
        set(map(_layout, tensors)) <= {_strided}
        and set(map(_dtype, tensors)) <= _DTYPE_SET
        and not any(map(_is_meta, tensors))
    )


# ------------------------------------------------------------------ layouts (the save's stall)
# Every save checks every tensor of the state (storable here, unchanged layout for the plan
# cache of ckptmirror.save.snapshot). Attribute by attribute that is ~0.3 us a tensor and an
# attribute, eight or more attributes: 0.2 s of save()'s stall at 50,000 tensors. A layout
# checks them all in one C++ pass (torch's TensorGuards, what torch.compile's guards were built
# on), ~0.2 us a tensor.

_TensorGuards: Any
try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except Exception:  # noqa: BLE001 - private API: without it, layouts are off and callers check by column
    _TensorGuards = None


class TensorLayout:
    """What each tensor of a list was like when the list was checked: its Python type, dtype,
    device, shape, strides, ``requires_grad`` and dispatch keys (which carry the layout, the meta
    device, and the lazy conjugate and negative bits). Data pointers are not part of it.

    Made only for lists of plain tensors (what :func:`_check_tensor` accepts, none lazily
    conjugated or negated): a list that :meth:`matches` a layout is such a list, laid out the
    same, position by position. Compares by identity: two lists with the same layout object
    are laid out alike.
    """

    __slots__ = ("_guard", "count")

    def __init__(self, guard: Any, count: int) -> None:
        self._guard = guard
        self.count = count

    def matches(self, tensors: Sequence[Any]) -> bool:
        """Whether ``tensors`` are laid out as the list this was made of (one C++ pass)."""
        if len(tensors) != self.count:
            return False
        try:
            return bool(self._guard.check(*tensors))
        except Exception:  # noqa: BLE001 - e.g. a non-tensor: not this layout
            return False


#: Layouts made lately, most recently used first; a few: one per state a process saves.
_LAYOUTS: list[TensorLayout] = []
_LAYOUTS_MAX = 4
_LAYOUTS_LOCK = threading.Lock()
_guards_ok: bool | None = None  # whether TensorGuards behaves as TensorLayout needs (checked once)


def find_layout(tensors: Sequence[Any]) -> TensorLayout | None:
    """A layout made lately that ``tensors`` match, or None."""
    for lay in tuple(_LAYOUTS):
        if lay.matches(tensors):
            if _LAYOUTS[0] is not lay:
                with _LAYOUTS_LOCK:
                    if lay in _LAYOUTS:
                        _LAYOUTS.remove(lay)
                    _LAYOUTS.insert(0, lay)
            return lay
    return None


def make_layout(tensors: Sequence[Any], checked: bool = False) -> TensorLayout | None:
    """A new layout of ``tensors`` (kept for :func:`find_layout`), after checking every one
    column by column (``checked``: :func:`_all_plain` passed already); None when one is not a
    plain tensor, is lazily conjugated or negated, or without a working TensorGuards (then
    callers check column by column every time)."""
    if not _layouts_work():
        return None
    ts = list(tensors)
    if not (
        set(map(type, ts)) <= _PLAIN_TYPES
        and (checked or _all_plain(ts))
        and not any(map(_Tensor.is_conj, ts))
        and not any(map(_Tensor.is_neg, ts))
    ):
        return None
    lay = _new_layout(ts)
    if lay is None:
        return None
    with _LAYOUTS_LOCK:
        _LAYOUTS.insert(0, lay)
        del _LAYOUTS[_LAYOUTS_MAX:]
    return lay


def _new_layout(tensors: list[torch.Tensor]) -> TensorLayout | None:
    if _TensorGuards is None:
        return None
    try:
        guard = _TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    except Exception:  # noqa: BLE001 - a torch whose TensorGuards takes other arguments
        return None
    return TensorLayout(guard, len(tensors))


def _layouts_work() -> bool:
    """Whether this torch's TensorGuards tells apart everything a layout must (checked once, on
    small tensors): a private API, so its behaviour is tested, not assumed."""
    global _guards_ok
    if _guards_ok is None:
        _guards_ok = _check_guards()
    return _guards_ok


def _check_guards() -> bool:
    try:
        f = torch.arange(12.0).view(3, 4)
        c = torch.zeros(4, dtype=torch.complex64)
        p = torch.nn.Parameter(torch.zeros(2))
        lay = _new_layout([f, c, p])
        if lay is None or not lay.matches([f, c, p]) or not lay.matches([f.clone(), c.clone(), p]):
            return False
        different: list[list[Any]] = [
            [f.view(4, 3), c, p],  # shape
            [f.t().contiguous().t(), c, p],  # strides
            [f.view(torch.int32), c, p],  # dtype
            [f.requires_grad_(True), c, p],  # requires_grad (the same tensor, changed in place)
            [f.detach(), c.conj(), p],  # lazy conjugate: same bytes, other values
            [f.detach(), c._neg_view(), p],  # lazy negative
            [f.detach(), c, p.detach()],  # a Parameter no more
            [f.detach(), c, torch.empty(2, device="meta")],  # meta
            [f.detach(), c],  # fewer tensors
            [f.detach(), c, p, p],  # more
            [f.detach(), c, p.detach().numpy()],  # not a tensor
        ]
        return not any(lay.matches(d) for d in different)
    except Exception:  # noqa: BLE001 - anything unexpected: layouts stay off
        return False


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (checked by name: torch.distributed may not be importable)."""
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def dtensor_local(t: Any) -> tuple[torch.Tensor, list[int], list[int]]:
    """(local shard, global shape, global offset of the shard) of a DTensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = t.to_local()
    lshape, goffset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(lshape) != tuple(local.shape):
        raise ValueError(
            f"local shard shape {tuple(local.shape)} is not the expected {tuple(lshape)} (padded sharding)"
        )
    return local, [int(d) for d in t.shape], [int(o) for o in goffset]


_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_strided = torch.strided
_layout = attrgetter("layout")
_dtype = attrgetter("dtype")
_is_meta = attrgetter("is_meta")
_PLAIN_TYPES = frozenset({_Tensor, _Parameter})
_DICT_ONLY = {dict}
#: Dicts of at least this many entries are tried for the bulk path (below it the per-entry loop is as fast).
_BULK_MIN = 8


def _check_tensor(t: torch.Tensor, root: str, path: tuple[Any, ...]) -> None:
    if (
        t.layout == torch.strided
        and not t.is_quantized
        and not t.is_meta
        and type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.dtype in _DTYPE_SET
    ):
        return  # the common case, without building the key path string
    where = key_path(root, path)
    if t.layout != torch.strided:
        raise UnsupportedTypeError(where, type(t), f"layout {t.layout} is not supported; convert with .to_dense()")
    if t.is_quantized:
        raise UnsupportedTypeError(where, type(t), "quantized tensors are not supported")
    if t.is_meta:
        raise UnsupportedTypeError(where, type(t), "meta tensors have no data")
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        # Other subclasses (FakeTensor, ...) need their own handling: raw bytes of their
        # storage would silently drop their metadata. DTensor is handled by flatten().
        raise UnsupportedTypeError(where, type(t), "tensor subclasses other than DTensor are not supported")
    if t.dtype not in DTYPES_BY_NAME.values():
        raise UnsupportedTypeError(where, type(t), f"dtype {t.dtype} is not supported")


def _all_dtypes() -> dict[str, torch.dtype]:
    out: dict[str, torch.dtype] = {}
    for name in dir(torch):
        d = getattr(torch, name)
        # Quantized dtypes are left out: their storage is not plain element bytes.
        if isinstance(d, torch.dtype) and not str(d).startswith(("torch.qint", "torch.quint")):
            out[str(d).removeprefix("torch.")] = d
    return out


#: Every dtype ckptmirror stores, by canonical name (``str(dtype)`` without ``torch.``).
DTYPES_BY_NAME: dict[str, torch.dtype] = _all_dtypes()
_DTYPE_SET = frozenset(DTYPES_BY_NAME.values())


def dtype_name(d: torch.dtype) -> str:
    """Canonical name of a dtype, as written in manifests."""
    return str(d).removeprefix("torch.")


def dtype_from_name(name: str, where: str = "") -> torch.dtype:
    """Inverse of :func:`dtype_name`; a :class:`ManifestError` for unknown names."""
    d = DTYPES_BY_NAME.get(name) if isinstance(name, str) else None
    if d is None:
        raise ManifestError(f"unknown dtype {name!r}", key=where)
    return d
