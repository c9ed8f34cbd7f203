"""Manifest validation: every check made on a rank manifest before a byte of data is read.

A manifest that parsed (:mod:`ckptmirror.format`) can still describe data that does not fit
together: storages that overlap, a leaf that reaches past the end of its storage, an
implausible element count, a dtype that is unknown or holds Python objects, a structure that
references a leaf twice or never, a shard that does not fit its global shape.
:func:`validate_manifest` rejects all of these with :class:`ManifestError`, so that a step is
refused before any target tensor is touched. Restore (:mod:`ckptmirror.restore.fill`) and
``ckptmirror verify`` (:mod:`ckptmirror.ops`) use the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ManifestError
from ..format import RankManifest
from ..state.reshard import Box
from ..state.tree import dtype_from_name, key_path, unflatten


@dataclass(frozen=True)
class LeafSpec:
    """Placeholder for a stored tensor or array, before its bytes are read."""

    kind: str
    dtype: str
    shape: tuple[int, ...]


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a C-contiguous tensor of ``shape`` (a 0-sized dimension counts as 1)."""
    out = []
    acc = 1
    for d in reversed(shape):
        out.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(out))


def _elem_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _check_leaf_bounds(m: RankManifest, key: str) -> list[int]:
    """Storages must not overlap and every leaf must lie inside its storage span.

    Returns each leaf's element size. A manifest that fails is rejected before any read.
    """
    end = 0
    for i in sorted((i for i, s in enumerate(m.storages) if s.nbytes), key=lambda i: m.storages[i].offset):
        if m.storages[i].offset < end:
            raise ManifestError(f"storages[{i}] overlaps another storage", key=key)
        end = m.storages[i].offset + m.storages[i].nbytes
    sizes = []
    for i, lf in enumerate(m.leaves):
        if lf.kind == "tensor":
            esize = _elem_size(dtype_from_name(lf.dtype, key))
        else:
            import numpy as np

            try:
                dt = np.dtype(lf.dtype)
            except (TypeError, ValueError) as exc:
                raise ManifestError(f"leaves[{i}]: bad numpy dtype {lf.dtype!r}", key=key) from exc
            if dt.hasobject or dt.fields is not None:
                raise ManifestError(f"leaves[{i}]: numpy dtype {lf.dtype!r} holds objects", key=key)
            esize = dt.itemsize
        nbytes = m.storages[lf.storage].nbytes
        numel = 1
        for d in lf.shape:
            numel *= d
        if numel >= 1 << 62:
            raise ManifestError(f"leaves[{i}] has an implausible number of elements ({numel})", key=key)
        if lf.kind == "ndarray" and numel and lf.stride != contiguous_strides(lf.shape):
            raise ManifestError(f"leaves[{i}]: ndarray strides must be C-contiguous", key=key)
        if numel:
            last = lf.offset + sum((d - 1) * s for d, s in zip(lf.shape, lf.stride))
            if (last + 1) * esize > nbytes:
                raise ManifestError(
                    f"leaves[{i}] reaches byte {(last + 1) * esize} of a {nbytes}-byte storage", key=key
                )
        sizes.append(esize)
    return sizes


@dataclass(frozen=True)
class ManifestCheck:
    """What :func:`validate_manifest` learned about a manifest that passed every check."""

    esizes: list[int]  # element size of each leaf
    dtypes: list[torch.dtype | None]  # torch dtype of each tensor leaf (None for arrays)
    paths: dict[int, tuple[Any, ...]]  # key path of each leaf
    skeleton: Any  # the state tree with LeafSpec placeholders
    dtensors: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]  # leaf -> (global shape, offset)

    def boxes(self, m: RankManifest) -> dict[tuple[Any, ...], tuple[int, tuple[int, ...], Box]]:
        """path -> (leaf, global shape, box) of every tensor leaf; a plain tensor is one box
        at offset 0 covering its whole shape."""
        out = {}
        for i, path in self.paths.items():
            lf = m.leaves[i]
            if lf.kind != "tensor":
                continue
            gshape, goffset = self.dtensors.get(i, (lf.shape, (0,) * len(lf.shape)))
            out[path] = (i, gshape, (goffset, lf.shape))
        return out


def validate_manifest(m: RankManifest, key: str) -> ManifestCheck:
    """Every check the reader makes on a manifest before reading a byte of data.

    Storage and leaf bounds, dtypes, and the structure: each leaf referenced exactly once.
    Used by restore and by ``ckptmirror verify`` alike. Raises :class:`ManifestError`.
    """
    esizes = _check_leaf_bounds(m, key)
    dtypes = [dtype_from_name(lf.dtype, key) if lf.kind == "tensor" else None for lf in m.leaves]
    paths: dict[int, tuple[Any, ...]] = {}
    dtensors: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def collect(kind: str, i: int, path: tuple[Any, ...]) -> Any:
        leaf_kind = "tensor" if kind == "dtensor" else kind
        if not 0 <= i < len(m.leaves) or m.leaves[i].kind != leaf_kind or i in paths:
            raise ManifestError(f"bad or repeated {kind} reference {i} at {key_path('state', path)}", key=key)
        paths[i] = path
        lf = m.leaves[i]
        return LeafSpec(lf.kind, lf.dtype, lf.shape)

    skeleton = unflatten(m.structure, collect, key, dtensors)
    if len(paths) != len(m.leaves):
        raise ManifestError(f"{len(m.leaves) - len(paths)} leaves are never referenced by the structure", key=key)
    for i, (gshape, goffset) in dtensors.items():
        shape = m.leaves[i].shape
        if len(gshape) != len(shape) or any(o + n > g for o, n, g in zip(goffset, shape, gshape)):
            raise ManifestError(
                f"leaves[{i}]: shard {list(shape)} at {list(goffset)} does not fit the global shape {list(gshape)}",
                key=key,
            )
    return ManifestCheck(esizes, dtypes, paths, skeleton, dtensors)
