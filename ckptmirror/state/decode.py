"""Decoding a stored state tree (``unflatten``) and the dtype sizes, without torch.

The other half of :mod:`ckptmirror.state.tree` (whose docstring describes the encoding). Kept
apart because the operator commands (``ckptmirror verify``, ``ls``, ``repair``, ``prune``,
``inspect``) check manifests, which takes decoding the structure and every leaf's element
size, but never build a tensor: without torch they start in a fraction of a second instead of
~3 CPU-seconds, and run on a machine that has no torch at all. Torch values inside the state
(``torch.Size``, dtypes, devices) become torch's objects where torch is loaded (a restore) and
checked stand-ins elsewhere; torch is imported here only to ask about a dtype name that the
table below does not know.
"""

from __future__ import annotations

import base64
import operator
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from itertools import product, repeat
from typing import TYPE_CHECKING, Any

from ..errors import ManifestError

if TYPE_CHECKING:
    import torch

JSON = Any  # a JSON-compatible value

#: Nesting deeper than this is refused on save and on load (a hostile manifest could
#: otherwise exhaust the interpreter stack).
MAX_DEPTH = 200

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_STR_ONLY = {str}
_KEY_TYPES = frozenset({str, int})
#: What :meth:`_Decoder.decode` returns as it is (JSON scalars).
_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})

#: Element size in bytes of every torch dtype ckptmirror stores (torch 2.13's, quantized ones
#: left out, as :data:`ckptmirror.state.tree.DTYPES_BY_NAME`), by the name manifests use. A test
#: holds it equal to torch's own table; a name a later torch adds is looked up in torch.
DTYPE_ITEMSIZES: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "bits8": 1,
    "bits16": 2,
    "bits1x8": 1,
    "bits2x4": 1,
    "bits4x2": 1,
    **{f"int{b}": 1 for b in range(1, 8)},
    **{f"uint{b}": 1 for b in range(1, 8)},
}


def dtype_itemsize(name: str, where: str = "") -> int:
    """Element size of the torch dtype called ``name`` in a manifest; a :class:`ManifestError`
    naming ``where`` for a name that is not a dtype.

    Torch's own table decides once torch is loaded (a restore, whose tensors take torch's
    dtypes: a name this torch lacks must fail here, not when the tensor is built); the table
    above serves a process without torch, and hands a name it lacks to torch.
    """
    size = DTYPE_ITEMSIZES.get(name) if isinstance(name, str) and "torch" not in sys.modules else None
    if size is None:
        try:
            from .tree import dtype_from_name
        except ImportError:  # no torch here at all: the table is all there is
            raise ManifestError(f"unknown dtype {name!r}", key=where) from None
        size = dtype_from_name(name, where).itemsize
    return size


# Torch-typed values of the state, decoded in a process that has not loaded torch (the operator
# commands): checked as a restore checks them, and shown as torch shows them, without torch.


class SizeValue(tuple[int, ...]):
    """A ``torch.Size`` of the state, decoded without torch (a tuple subclass, as it is)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"torch.Size({list(self)})"


class DtypeValue(str):
    """A ``torch.dtype`` of the state, decoded without torch: its ``str()``, ``torch.bfloat16``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str.__str__(self)


class DeviceValue(str):
    """A ``torch.device`` of the state, decoded without torch: its ``str()``, ``cuda:0``."""

    __slots__ = ()

    def __repr__(self) -> str:
        kind, _, index = str.__str__(self).partition(":")
        return f"device(type={kind!r}, index={index})" if index else f"device(type={kind!r})"


#: What ``torch.device`` accepts, by shape (a device type, then an optional index).
_DEVICE_RE = re.compile(r"[a-z][a-z0-9_]*(:[0-9]+)?\Z")


def key_path(root: str, keys: tuple[Any, ...]) -> str:
    """Render a key path the way a user would index the state: ``state['optim'][0]``."""
    return root + "".join(f"[{k!r}]" for k in keys)


#: ``bulk(start, stop, path, keys, fields)``: the values of a ``tensors`` node's leaves (see :func:`unflatten`).
BulkLeaves = Callable[[int, int, tuple[Any, ...], list[Any], "list[str] | None"], Sequence[Any]]


def node_paths(path: tuple[Any, ...], keys: list[Any], fields: list[str] | None) -> Iterator[tuple[Any, ...]]:
    """The key path of each leaf of a ``tensors`` node at ``path``, in leaf order, one at a time
    (a caller that stops at the first bad leaf builds no more: a hostile node may claim far more
    leaves than the manifest holds)."""
    return map(path.__add__, zip(keys) if fields is None else product(keys, fields))


def unflatten(
    structure: JSON,
    leaf: Callable[[str, int, tuple[Any, ...]], Any],
    where: str = "",
    dtensors: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    *,
    bulk: BulkLeaves | None = None,
    compact: bool = True,
) -> Any:
    """Rebuild a tree from ``structure``; ``leaf(kind, index, path)`` supplies tensors/arrays.

    ``kind`` is ``"tensor"``, ``"ndarray"`` or ``"dtensor"`` (a shard of a sharded tensor; its
    global shape and offset are put in ``dtensors[index]`` when that dict is given).
    ``bulk(start, stop, path, keys, fields)``, when given, supplies the tensors of a
    ``tensors`` node at once (leaves ``start`` to ``stop - 1`` of the dict at ``path``: their
    key paths are ``path + (k,)`` for each of ``keys``, or ``path + (k, f)`` for each of
    ``keys`` and, inside it, each of ``fields`` where that is not None), in place of a ``leaf``
    call each: no key path is built per leaf. ``compact=False`` refuses ``tensors`` nodes
    (manifests before format version 4).
    Everything is validated: a structure that is not of the closed encoding above raises
    :class:`ManifestError` naming ``where`` (the manifest) and the key path inside it.
    """
    try:
        return _Decoder(leaf, where, dtensors, bulk, compact).decode(structure, ())
    except RecursionError as exc:
        raise ManifestError("structure nested too deeply", key=where) from exc


class _Decoder:
    """One :func:`unflatten` call: :meth:`decode` checks a node and hands it to its type's method."""

    def __init__(
        self,
        leaf: Callable[[str, int, tuple[Any, ...]], Any],
        where: str,
        dtensors: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] | None,
        bulk: BulkLeaves | None = None,
        compact: bool = True,
    ) -> None:
        self.leaf = leaf
        self.where = where
        self.dtensors = dtensors
        self.bulk = bulk
        self.compact = compact

    def bad(self, msg: str, path: tuple[Any, ...]) -> ManifestError:
        return ManifestError(f"{msg} at {key_path('state', path)}", key=self.where)

    def decode(self, node: JSON, path: tuple[Any, ...]) -> Any:
        if len(path) > MAX_DEPTH:
            raise self.bad(f"structure nested deeper than {MAX_DEPTH}", path)
        if node is None or isinstance(node, (bool, str, int, float)):
            return node
        if not isinstance(node, dict):
            raise self.bad(f"unexpected JSON {type(node).__name__}", path)
        t = node.get("t")
        if not isinstance(t, str) or t not in _NODE_DECODERS:  # isinstance first: a list "t" is unhashable
            raise self.bad(f"unknown node type {t!r}", path)
        try:
            return _NODE_DECODERS[t](self, node, path, t)
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            # A node of a known type with missing or ill-typed fields: one error naming the node.
            raise self.bad(f"malformed {t!r} node ({type(exc).__name__}: {exc})", path) from exc

    def dict_node(self, node: dict[str, Any], path: tuple[Any, ...], t: str) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        items = node["items"]
        if not isinstance(items, list):
            raise self.bad("dict items must be a list", path)
        children_fit = len(path) < MAX_DEPTH
        for pair in items:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise self.bad("dict item must be a [key, value] pair", path)
            k, v = pair
            if type(k) is not str:
                k = self.decode(k, path)
                if not (k is None or isinstance(k, (str, int, float, bool))):
                    raise self.bad("dict key of unsupported type", path)
            if k in out:
                raise self.bad(f"duplicate dict key {k!r}", path)
            if children_fit and type(v) is dict and v.get("t") == "tensor":
                # The common leaf (a state dict's entry), without the generic dispatch: this
                # loop runs once per tensor, 50k times for a large model's state.
                i = v.get("i")
                if type(i) is not int:
                    raise self.bad("leaf index must be an int", path + (k,))
                out[k] = self.leaf("tensor", i, path + (k,))
            else:
                out[k] = self.decode(v, path + (k,))
        return out

    def tensors_node(self, node: dict[str, Any], path: tuple[Any, ...], t: str) -> dict[Any, Any]:
        """A large dict of tensors, or of same-keyed dicts of tensors, as one node (version 4)."""
        if not self.compact:
            raise self.bad(f"unknown node type {t!r}", path)  # what readers of versions 1-3 always said
        if set(node) - _TENSORS_FIELDS:
            raise self.bad(f"tensors node with unknown fields {sorted(set(node) - _TENSORS_FIELDS)}", path)
        keys, base, fields = node["keys"], node["i"], node.get("fields")
        if not isinstance(keys, list):
            raise self.bad("tensors keys must be a list", path)
        if type(base) is not int or base < 0:
            raise self.bad("tensors first leaf index must be a non-negative int", path)
        key_types = set(map(type, keys))
        if not key_types <= _KEY_TYPES:
            bad = next(k for k in keys if type(k) not in _KEY_TYPES)
            raise self.bad(f"tensors key {bad!r} is not a str or an int", path)
        if int in key_types:
            ints = keys if len(key_types) == 1 else [k for k in keys if type(k) is int]
            if min(ints) < _I64_MIN or max(ints) > _I64_MAX:
                raise self.bad("tensors int key beyond int64", path)
        width = 1
        if fields is not None:
            if not (isinstance(fields, list) and fields and set(map(type, fields)) == _STR_ONLY):
                raise self.bad("tensors fields must be a non-empty list of str", path)
            if len(set(fields)) != len(fields):
                raise self.bad("duplicate tensors field", path)
            width = len(fields)
        if len(path) + (1 if fields is None else 2) > MAX_DEPTH:
            raise self.bad(f"structure nested deeper than {MAX_DEPTH}", path)
        n = len(keys) * width
        if self.bulk is not None:
            values = self.bulk(base, base + n, path, keys, fields)
        else:
            values = list(map(self.leaf, repeat("tensor"), range(base, base + n), node_paths(path, keys, fields)))
        if fields is None:
            out = dict(zip(keys, values))
        else:
            # Each key's dict: a copy of one template (its keys in field order), then one column
            # of values set at a time, in C (3x faster than dict(zip(fields, row)) per key).
            rows = list(map(dict.copy, repeat(dict.fromkeys(fields), len(keys))))
            for c, fname in enumerate(fields):
                any(map(operator.setitem, rows, repeat(fname), values[c::width]))  # setitem returns None
            out = dict(zip(keys, rows))
        # Duplicate keys: the dict is shorter than the list (a set of the keys first cost as much
        # as the dict itself, ~15 ms at 50,000 keys). Before any value is handed out: the caller
        # raises on the error, and the leaves the bulk callback saw are dropped with the node.
        if len(out) != len(keys):
            seen: set[Any] = set()
            for k in keys:
                if k in seen:
                    raise self.bad(f"duplicate dict key {k!r}", path)
                seen.add(k)
        return out

    def seq_node(self, node: dict[str, Any], path: tuple[Any, ...], t: str) -> list[Any] | tuple[Any, ...]:
        v = node["v"]
        if not isinstance(v, list):
            raise self.bad(f"{t} payload must be a list", path)
        if len(path) < MAX_DEPTH and set(map(type, v)) <= _SCALAR_TYPES:
            seq = list(v)  # scalars only (an optimizer's parameter indices): nothing to decode
        else:
            seq = [self.decode(x, path + (i,)) for i, x in enumerate(v)]
        return seq if t == "list" else tuple(seq)

    def float_node(self, node: dict[str, Any], path: tuple[Any, ...], t: str) -> float:
        v = node["v"]
        if v not in ("nan", "-nan", "inf", "-inf"):
            raise self.bad(f"bad float {v!r}", path)
        return float(v)

    def int_node(self, node: dict[str, Any], path: tuple[Any, ...], t: str) -> int:
        v = node["v"]
        if not isinstance(v, str) or len(v) > (1 << 20):
            raise self.bad("bad big int", path)
        return int(v, 16)

    # The three torch-typed values: torch's own objects where torch is loaded (every restore:
    # they go into the caller's state), else stand-ins (the operator commands, which only check
    # and show them). Decoding imports torch only to ask it about a dtype name the table lacks.

    def size_node(self, node: dict[str, Any], path: tuple[Any, ...], t: str) -> torch.Size | SizeValue:
        v = node["v"]
        if not (isinstance(v, list) and all(type(d) is int and d >= 0 for d in v)):
            raise self.bad("torch.Size must be a list of non-negative ints", path)
        torch = sys.modules.get("torch")
        return SizeValue(v) if torch is None else torch.Size(v)

    def dtype_node(self, node: dict[str, Any], path: tuple[Any, ...], t: str) -> torch.dtype | DtypeValue:
        v = node["v"]
        if "torch" not in sys.modules:
            dtype_itemsize(v, self.where)  # a known name, or a ManifestError
            return DtypeValue("torch." + v)
        from .tree import dtype_from_name

        return dtype_from_name(v, self.where)

    def device_node(self, node: dict[str, Any], path: tuple[Any, ...], t: str) -> torch.device | DeviceValue:
        v = node["v"]
        if not isinstance(v, str) or len(v) > 64:
            raise self.bad("bad device", path)
        torch = sys.modules.get("torch")
        if torch is None:
            if not _DEVICE_RE.match(v):
                raise self.bad(f"bad device {v!r}", path)
            return DeviceValue(v)
        return torch.device(v)

    def bytes_node(self, node: dict[str, Any], path: tuple[Any, ...], t: str) -> bytes:
        return base64.b64decode(node["v"], validate=True)

    def leaf_node(self, node: dict[str, Any], path: tuple[Any, ...], t: str) -> Any:
        i = node["i"]
        if type(i) is not int:
            raise self.bad("leaf index must be an int", path)
        if t == "dtensor":
            gshape, goffset = node["gshape"], node["goffset"]
            if not (
                isinstance(gshape, list)
                and isinstance(goffset, list)
                and len(gshape) == len(goffset) <= 64
                and all(type(d) is int and 0 <= d < (1 << 50) for d in gshape + goffset)
            ):
                raise self.bad("dtensor needs gshape and goffset: equal-length lists of non-negative ints", path)
            if self.dtensors is not None:
                self.dtensors[i] = (tuple(gshape), tuple(goffset))
        return self.leaf(t, i, path)

    def npscalar_node(self, node: dict[str, Any], path: tuple[Any, ...], t: str) -> Any:
        import numpy as np

        dt = np.dtype(node["dtype"])
        if dt.hasobject:
            raise self.bad("object numpy scalar", path)
        raw = base64.b64decode(node["v"], validate=True)
        if len(raw) != dt.itemsize:
            raise self.bad("numpy scalar size mismatch", path)
        return np.frombuffer(raw, dtype=dt)[0]


#: Node type (``"t"``) -> the :class:`_Decoder` method that decodes it; any other type is refused.
_NODE_DECODERS: dict[str, Callable[[_Decoder, dict[str, Any], tuple[Any, ...], str], Any]] = {
    "dict": _Decoder.dict_node,
    "list": _Decoder.seq_node,
    "tuple": _Decoder.seq_node,
    "float": _Decoder.float_node,
    "int": _Decoder.int_node,
    "size": _Decoder.size_node,
    "dtype": _Decoder.dtype_node,
    "device": _Decoder.device_node,
    "bytes": _Decoder.bytes_node,
    "tensor": _Decoder.leaf_node,
    "ndarray": _Decoder.leaf_node,
    "dtensor": _Decoder.leaf_node,
    "npscalar": _Decoder.npscalar_node,
    "tensors": _Decoder.tensors_node,
}
_TENSORS_FIELDS = frozenset({"t", "keys", "fields", "i"})
