"""Snapshot: copy the state's tensors into reusable host staging buffers ("arenas").

This is the only part of a save that runs on the training thread. It plans where every
storage goes, then does one memcpy per storage into an arena that is reused from one save
to the next, so steady-state saves of a same-shaped state allocate nothing (ANCHORS:
pytorch#170163 saw RSS grow with every async_save). A fresh allocation costs ~4x a copy into
existing pages here (page faults), which is why arenas are kept, not re-created, and why
:func:`prepare` (``Mirror.reserve``) can allocate and map them before the training loop.

The host copy never goes through torch's copy kernels: NumPy gathers the storages into the
arena in a few large pieces, on the calling thread plus one helper for large states, without
OpenMP (see :mod:`ckptmirror.buffers` for the 10,000-tensor stall that this avoids). Planning
is cached: :func:`plan_key` says whether the last plan still fits, :func:`replan` patches it
when only a few tensors moved (a fresh RNG state in every save's ``extra``).

Layout: storages are placed back to back in the arena; that byte range is the rank's *data
stream*, cut into objects of ``object_bytes`` by the writer. Tensors that share a storage
(tied weights, views) are stored once, as the smallest span of the storage that covers
them all, and restored sharing it.

CUDA tensors are copied with ``non_blocking=True`` into pinned arenas, and the copy is
synchronised before :func:`snapshot` returns: the caller may modify its tensors the moment
``save()`` returns, on any stream.

This module holds what the save path calls (:func:`prepare`, :func:`stage`, :func:`snapshot`,
:func:`reuse_staged`, :func:`copy_range`) and re-exports the rest, which lives in two modules:
:mod:`~ckptmirror.save.layout` (the plan: where every storage goes; cached) and
:mod:`~ckptmirror.save.copies` (the copy list of a plan and the copies it runs). The tuning
constants re-exported here are read where their code lives: patch them there, not here.
"""

from __future__ import annotations

import bisect
import gc
from collections.abc import Callable
from functools import partial

import numpy as np  # torch imports it anyway
import torch

from ..buffers import gather_bytes, host_array
from ..format import paused_gc
from ..state.tree import Flattened
from .arena import Arena, ArenaPool
from .copies import (
    COPY_THREADS,
    GIL_LIGHT_AVERAGE,
    PARALLEL_MIN_AVERAGE,
    PARALLEL_MIN_BYTES,
    PIECE_BYTES,
    _copy_staged,
    _span_source,
)
from .layout import (
    COALESCE_MIN,
    MAX_GAP,
    MAX_GAP_SHARE,
    SMALL_SPAN,
    Plan,
    frozen_flags,
    plan,
    plan_key,
    replan,
)

__all__ = [
    "COALESCE_MIN",
    "COPY_THREADS",
    "GIL_LIGHT_AVERAGE",
    "MAX_GAP",
    "MAX_GAP_SHARE",
    "PARALLEL_MIN_AVERAGE",
    "PARALLEL_MIN_BYTES",
    "PIECE_BYTES",
    "SMALL_SPAN",
    "Arena",
    "ArenaPool",
    "Plan",
    "copy_range",
    "frozen_flags",
    "paused_gc",
    "plan",
    "plan_key",
    "prepare",
    "replan",
    "reuse_staged",
    "snapshot",
    "stage",
    "staging_need",
]


def prepare(flat: Flattened, pool: ArenaPool, cap: int | None = None) -> tuple[tuple[object, ...] | None, Plan]:
    """Plan ``flat`` and grow and map every arena of ``pool`` for it: what :meth:`Mirror.reserve` does.

    Returns the plan's cache key (None: not reusable) and the plan. Ends with a full garbage
    collection: planning makes thousands of long-lived objects (one NumPy view per storage),
    and the collection they would trigger otherwise lands in the first save (measured: 0.06 s
    of a 0.07 s stall at 1,000 tensors).
    """
    key = plan_key(flat)
    p = plan(flat)
    pool.reserve(staging_need(p, cap), p.needs_pinned)
    gc.collect()
    return key, p


def staging_need(p: Plan, cap: int | None = None) -> int:
    """The bytes of staging buffer a save of ``p`` uses under a staging cap of ``cap`` bytes:
    the cap for a state larger than it (a sliced save), else the staging layout's size (the
    stream plus the gaps of a coalesced copy) when it fits, else the stream's."""
    staged = p.copies.staging_bytes
    if cap is None:
        return staged
    if p.total_bytes > cap:
        return cap
    return staged if staged <= cap else p.total_bytes


def snapshot(p: Plan, arena: Arena) -> torch.Tensor:
    """Copy every span into the arena; return the stream (a uint8 CPU tensor of ``total_bytes``)."""
    stream, finish = stage(p, arena)
    finish()
    return stream


def stage(p: Plan, arena: Arena, cap: int | None = None) -> tuple[torch.Tensor, Callable[[], None]]:
    """Copy every span into the arena: what ``save()`` waits for.

    Returns the stream (a uint8 CPU tensor of ``total_bytes``) and the work left before it may
    be read: closing the gaps of a coalesced copy (see :data:`COALESCE_MIN`), for the background
    writer; a no-op for other plans. A coalesced plan whose staging layout exceeds ``cap`` bytes
    is copied storage by storage instead, straight into the stream.

    Host bytes are copied by NumPy on this thread (plus one helper thread for large states),
    never by an OpenMP team: see :mod:`ckptmirror.buffers`. A cached plan's views hold the data
    pointers its tensors had when it was made; :func:`plan_key` (which includes every leaf's
    data pointer) is what makes reusing it safe.
    """
    c = p.copies
    if cap is not None and c.staging_bytes > cap:
        stream = arena.reserve(p.total_bytes, p.needs_pinned)
        copy_range(p, stream, 0, p.total_bytes)
        return stream, _nothing
    staged = arena.reserve(c.staging_bytes, p.needs_pinned)
    _copy_staged(c, staged)
    return staged[: p.total_bytes], partial(c.close_gaps, staged)


def _nothing() -> None:
    pass


def reuse_staged(p: Plan, copied: Plan, staged: torch.Tensor) -> bool:
    """Whether ``staged``, just staged by :func:`stage` for ``copied`` (uncapped), holds ``p``'s
    staging: ``p`` copies the same sources, or was patched from ``copied`` by :func:`replan`
    (then the patched spans are copied again here, from their new sources). False: stage anew."""
    c = p.copies
    if c is copied.copies:
        return True
    if c.base is None or c.base[0] is not copied.copies or c.device:
        return False
    dst, _ = c.destinations(staged)
    for j in c.base[1]:
        src = _span_source(p.spans[j])
        assert isinstance(src, np.ndarray)  # host spans only (no device copies)
        off = c.loose[j]
        gather_bytes(dst[off : off + src.nbytes], [src])
    return True


def copy_range(p: Plan, dst: torch.Tensor, lo: int, hi: int) -> None:
    """Copy bytes ``[lo, hi)`` of ``p``'s data stream into ``dst`` (a uint8 host tensor of
    ``hi - lo`` bytes): one slice of a snapshot, for a state larger than the staging cap
    (``Mirror(staging_bytes=...)``). Same copies as :func:`snapshot`, span by span."""
    if dst.numel() != hi - lo:
        raise ValueError(f"destination of {dst.numel()} bytes for a range of {hi - lo}")
    host = host_array(dst) if hi > lo else None
    offsets = [sp.offset for sp in p.spans]
    devices: set[torch.device] = set()
    i = max(0, bisect.bisect_right(offsets, lo) - 1)
    while i < len(p.spans) and p.spans[i].offset < hi:
        sp = p.spans[i]
        i += 1
        a, b = max(lo, sp.offset), min(hi, sp.offset + sp.nbytes)
        if a >= b:
            continue
        src = _span_source(sp)[a - sp.offset : b - sp.offset]
        if isinstance(src, torch.Tensor):  # a device tensor: DMA into the (pinned) staging buffer
            dst[a - lo : b - lo].copy_(src, non_blocking=src.is_cuda)
            devices.add(src.device)
        else:
            assert host is not None
            np.copyto(host[a - lo : b - lo], src, casting="no")
    for dev in devices:
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
