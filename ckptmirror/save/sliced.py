"""Sliced snapshot: save a state larger than the staging cap (``Mirror(staging_bytes=...)``).

Every slice but the last is copied into the arena and written to the replicas on the caller's
thread (:meth:`~ckptmirror.save.fanout.Fanout.prewrite`); the last one, at most the cap, is
staged and handed to the background writer like any save. Host memory stays at the cap
whatever the state's size; the price is a stall for writing what did not fit.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..format import cut_objects, new_token
from ..replicas.base import Replica
from .arena import Arena
from .encode import PreWritten
from .fanout import Fanout
from .snapshot import Plan, copy_range, frozen_flags

log = logging.getLogger("ckptmirror")


def sliced_snapshot(
    fanout: Fanout,
    step: int,
    p: Plan,
    arena: Arena,
    targets: list[Replica],
    cap: int,
    object_bytes: int,
    model: Any = None,
) -> tuple[torch.Tensor, PreWritten]:
    """Write all but the last ``cap`` bytes of ``p``'s stream now; return the staged rest
    (the stream the background writer writes) and what was written (``pre``)."""
    # The slices are written now, so the cut (and the frozen flags it keeps apart) is made
    # here, on the caller's thread; the background encoder reuses it through ``pre``.
    frozen = frozen_flags(p, model) if model is not None and fanout.incremental else None
    windows = cut_objects(p.storages, object_bytes, frozen)
    total = p.total_bytes
    tail = next(i for i, (off, _) in enumerate(windows) if total - off <= cap)
    buf = arena.reserve(cap, p.needs_pinned)
    pre = PreWritten(new_token(), frozen=frozen)
    i = 0
    while i < tail:
        lo = windows[i][0]
        j = i + 1  # every object fits: object_bytes <= staging_bytes
        while j < tail and windows[j][0] + windows[j][1] - lo <= cap:
            j += 1
        hi = windows[j - 1][0] + windows[j - 1][1]
        chunk = buf[: hi - lo]
        copy_range(p, chunk, lo, hi)
        fanout.prewrite(step, pre, p, windows, j, chunk, targets)
        i = j
    pre.base = windows[tail][0]
    stream = buf[: total - pre.base]
    copy_range(p, stream, pre.base, total)
    log.info("step %d: %d of %d bytes written before save() returned (staging_bytes=%d)", step, pre.base, total, cap)
    return stream, pre
