"""Resharding: fill a target shard from the stored shards of every rank.

A sharded tensor (DTensor: FSDP2, tensor parallel) is stored as one local shard per rank, each
with the global shape and the offset of its box in the global tensor. To restore onto another
layout (a different world size or mesh), a rank computes the box its target shard covers,
intersects it with every stored box, and copies the overlaps. A stored plain tensor of the
global shape counts as one box covering everything, so a checkpoint of an unsharded model
loads into a sharded one and the other way round.

Everything is planned and checked (global shapes agree, the stored boxes cover the target box
exactly) before a single element is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import StateMismatchError
from .tree import key_path

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, shape)


def intersect(a: Box, b: Box) -> Box | None:
    """The overlap of two boxes, or None."""
    lo = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    hi = tuple(min(x + dx, y + dy) for x, dx, y, dy in zip(a[0], a[1], b[0], b[1]))
    if any(end <= start for start, end in zip(lo, hi)) and len(lo):
        return None
    return lo, tuple(end - start for start, end in zip(lo, hi))


def _slices(box: Box, origin: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(o - b, o - b + n) for o, n, b in zip(box[0], box[1], origin))


@dataclass(frozen=True)
class Want:
    """A target shard to fill: its local tensor, where it sits, and the global shape."""

    path: tuple[Any, ...]
    local: torch.Tensor
    offset: tuple[int, ...]
    gshape: tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """Copy ``box`` (global coordinates) from leaf ``leaf`` of stored rank ``source``."""

    want: Want
    source: int
    leaf: int
    leaf_offset: tuple[int, ...]
    box: Box


@dataclass(frozen=True)
class StoredShard:
    """One stored rank's view: path -> (leaf index, box) for every tensor at that path."""

    rank: int
    boxes: dict[tuple[Any, ...], tuple[int, tuple[int, ...], Box]]  # path -> (leaf, gshape, box)


def plan_pieces(wants: Sequence[Want], stored: Sequence[StoredShard]) -> list[Piece]:
    """Which stored box parts fill which target; raises StateMismatchError if any target is
    not covered exactly (before anything is read or written)."""
    pieces: list[Piece] = []
    problems: list[str] = []
    for w in wants:
        target: Box = (w.offset, tuple(w.local.shape))
        need = math.prod(target[1])
        got = 0
        seen: set[Box] = set()
        for shard in stored:
            entry = shard.boxes.get(w.path)
            if entry is None:
                continue
            leaf, gshape, box = entry
            if gshape != w.gshape:
                problems.append(
                    f"{key_path('state', w.path)}: global shape {list(gshape)} in the checkpoint, "
                    f"{list(w.gshape)} in the target"
                )
                break
            if box in seen:  # the same shard held by several ranks (replicated mesh dimension)
                continue
            seen.add(box)
            part = intersect(target, box)
            if part is None:
                continue
            got += math.prod(part[1])
            pieces.append(Piece(w, shard.rank, leaf, box[0], part))
        else:
            if got != need:
                problems.append(
                    f"{key_path('state', w.path)}: the stored shards cover {got} of the {need} elements this rank needs"
                )
    if problems:
        raise StateMismatchError("cannot reshard the checkpoint onto this layout:\n  " + "\n  ".join(problems[:50]))
    return pieces


def copy_piece(piece: Piece, stored_leaf: torch.Tensor) -> None:
    """Copy the overlap from a materialised stored shard into the target shard."""
    src = stored_leaf[_slices(piece.box, piece.leaf_offset)]
    dst = piece.want.local[_slices(piece.box, piece.want.offset)]
    with torch.no_grad():
        dst.copy_(src)
