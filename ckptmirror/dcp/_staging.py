"""Staging for ``dcp.async_save``: one memcpy into reused host arenas, and who owns which arena.

:meth:`Staging.stage` copies every tensor of a state dict (a DTensor's local shard) into a
staging arena from :class:`~ckptmirror.save.snapshot.ArenaPool`, each at a 64-byte aligned
offset, and returns the same tree with views of the arena in their place (DTensors rebuilt
around their staged shard, plain values copied). The arena is reused from save to save, so
steady-state async saves allocate nothing. The writer later recognises the staged views by
address and writes objects straight from the arena, with no second copy.

Ownership. An arena staged for a save is released by that save's ``write_data`` once its
objects are durable. A save can also end before ``write_data`` (DCP's planning raised on some
rank) without telling the storage writer; its arena would then be held forever and the next
``stage()`` would wait forever. So every save registers its thread when it starts
(``set_up_storage_writer``), and a staged arena is given back as abandoned once some save
started after it was staged and every save started after it is over (finished, its thread
gone, or its thread started another save or is the one now staging): the save it was staged
for is among them.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from ..errors import UnsupportedTypeError
from ..save.arena import Arena, ArenaPool
from ..state.tree import DTYPES_BY_NAME

log = logging.getLogger("ckptmirror")

#: Alignment of every staged tensor in an arena: any dtype can be viewed there, and copies
#: start on a cache line.
ALIGN = 64

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def aligned(n: int) -> int:
    """``n`` rounded up to :data:`ALIGN`."""
    return -(-n // ALIGN) * ALIGN


@dataclass
class Ticket:
    """One staged state dict: the arena that holds it, until its save has written it."""

    seq: int
    arena: Arena
    stream: torch.Tensor  # uint8 view of the arena's used bytes

    def holds(self, t: torch.Tensor) -> int | None:
        """Byte offset of ``t`` in this stream when ``t`` is a contiguous CPU view of it, else None."""
        if t.device.type != "cpu" or not t.is_contiguous() or self.stream.numel() == 0:
            return None
        if t.untyped_storage().data_ptr() != self.stream.untyped_storage().data_ptr():
            return None
        off = t.data_ptr() - self.stream.data_ptr()
        nbytes = t.numel() * t.element_size()
        return off if 0 <= off and off + nbytes <= self.stream.numel() else None


@dataclass
class _Run:
    """A save in progress, as far as staging is concerned."""

    seq: int
    thread: threading.Thread
    over: bool = False


@dataclass
class _Collected:
    tensors: list[torch.Tensor] = field(default_factory=list)  # local data to stage, in traversal order
    groups: list[int] = field(default_factory=list)  # 0: a DTensor's shard, 1: a plain tensor


def check_tensor(t: torch.Tensor, where: str) -> None:
    """Refuse what cannot be staged or stored as raw bytes, naming the key."""
    if t.layout != torch.strided or t.is_quantized or t.is_meta or t.dtype not in DTYPES_BY_NAME.values():
        raise UnsupportedTypeError(where, type(t), f"{t.dtype} {t.layout} tensors cannot be stored as raw bytes")
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise UnsupportedTypeError(where, type(t), "tensor subclasses other than DTensor cannot be staged")


def _map(obj: Any, fn: Callable[[Any, str], Any], where: str, copy_values: bool) -> Any:
    """``obj`` with every tensor (and DTensor) replaced by ``fn(tensor, key path)``."""
    if isinstance(obj, torch.Tensor):
        return fn(obj, where)
    if isinstance(obj, Mapping):
        # A plain dict: what DCP does with the staged tree (flatten it, look keys up) needs no more.
        return {k: _map(v, fn, f"{where}[{k!r}]", copy_values) for k, v in obj.items()}
    if type(obj) is list:
        return [_map(v, fn, f"{where}[{i}]", copy_values) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return tuple(_map(v, fn, f"{where}[{i}]", copy_values) for i, v in enumerate(obj))
    if not copy_values or isinstance(obj, _PLAIN):
        return obj
    try:
        # Training goes on while the save writes: a mutable value (a dict inside a scheduler's
        # state, say) must not change under it.
        return copy.deepcopy(obj)
    except Exception:  # noqa: BLE001 - an object that cannot be copied is kept as it is
        return obj


class Staging:
    """The staging arenas of one :class:`~ckptmirror.dcp.MirrorStorageWriter` and their owners."""

    def __init__(self, max_inflight: int) -> None:
        self.pool = ArenaPool(max_inflight)
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.tickets: list[Ticket] = []
        self._runs: list[_Run] = []

    # -- ownership -------------------------------------------------------------------------
    def start_save(self) -> _Run:
        """Register the save that starts on this thread (``set_up_storage_writer``)."""
        me = threading.current_thread()
        with self._lock:
            for r in self._runs:
                if r.thread is me:
                    r.over = True  # a thread runs one save at a time: its earlier one is over
            run = _Run(next(self._seq), me)
            self._runs.append(run)
            return run

    def end_save(self, run: _Run) -> None:
        """The save has written its objects (or failed while doing so)."""
        with self._lock:
            run.over = True
            first = min((t.seq for t in self.tickets), default=None)
            self._runs = [r for r in self._runs if not r.over or (first is not None and r.seq > first)]

    def _reap(self) -> None:
        me = threading.current_thread()

        def over(r: _Run) -> bool:
            return r.over or r.thread is me or not r.thread.is_alive()

        with self._lock:
            gone = []
            for t in self.tickets:
                later = [r for r in self._runs if r.seq > t.seq]
                if later and all(over(r) for r in later):
                    gone.append(t)
            for t in gone:
                self.tickets.remove(t)
        for t in gone:
            log.info("releasing a staging buffer whose save ended before writing it (its planning failed)")
            self.pool.release(t.arena)

    def acquire(self) -> Arena:
        """A free arena; waits while every arena is held by a save in progress."""
        while True:
            self._reap()
            arena = self.pool.acquire(block=True, timeout=1.0)
            if arena is not None:
                return arena

    def release(self, ticket: Ticket) -> None:
        """Give a ticket's arena back (its save wrote the objects)."""
        with self._lock:
            if ticket not in self.tickets:
                return
            self.tickets.remove(ticket)
        self.pool.release(ticket.arena)

    def find(self, t: torch.Tensor) -> tuple[Ticket, int] | None:
        """The live ticket whose arena holds ``t``, and ``t``'s byte offset there."""
        with self._lock:
            tickets = list(self.tickets)
        for tk in tickets:
            off = tk.holds(t)
            if off is not None:
                return tk, off
        return None

    # -- staging ---------------------------------------------------------------------------
    def stage(self, state_dict: Any) -> Any:
        """A copy of ``state_dict`` whose tensors live in a staging arena (see the module docstring)."""
        found = _Collected()

        def collect(t: torch.Tensor, where: str) -> None:
            local = t.to_local() if isinstance(t, DTensor) else t
            check_tensor(local, where)
            found.tensors.append(local.detach())
            found.groups.append(0 if isinstance(t, DTensor) else 1)

        _map(state_dict, collect, "state_dict", copy_values=False)
        # Shards of sharded tensors first, plain tensors after: with several ranks, DCP has each
        # plain tensor written by one rank only, and the others then skip that whole block.
        offsets, total = pack(found.tensors, found.groups)
        pinned = any(t.is_cuda for t in found.tensors)
        arena = self.acquire()
        try:
            stream = arena.reserve(total, pinned=pinned)
            views = copy_into(stream, found.tensors, offsets)
        except BaseException:
            self.pool.release(arena)
            raise
        with self._lock:
            self.tickets.append(Ticket(next(self._seq), arena, stream))
        it = iter(views)

        def place(t: torch.Tensor, where: str) -> Any:
            view = next(it)
            if not isinstance(t, DTensor):
                return view
            if t.device_mesh.device_type == view.device.type:
                return DTensor.from_local(
                    view, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
                )
            # A CUDA mesh with a host shard: keep the spec, swap the local tensor (from_local
            # would move the shard back to the device). DCP's own CPU staging does the same.
            return DTensor(view, t._spec, requires_grad=False)

        return _map(state_dict, place, "state_dict", copy_values=True)


def pack(tensors: list[torch.Tensor], groups: list[int]) -> tuple[list[int], int]:
    """Byte offsets that lay ``tensors`` back to back in a buffer, and the bytes it needs.

    Tensors are laid out group by group (each group starting at a multiple of :data:`ALIGN`),
    and within a group by element size, largest first: every element size is a power of two,
    so each tensor then starts at a multiple of its own element size (it can be viewed in
    place) with no padding between tensors. The objects written from the buffer therefore hold
    no byte that is not some tensor's, as the format requires (storages tile the stream).
    """
    order = sorted(range(len(tensors)), key=lambda i: (groups[i], -tensors[i].element_size()))
    offsets = [0] * len(tensors)
    pos = 0
    group = None
    for i in order:
        if groups[i] != group:
            pos, group = aligned(pos), groups[i]
        offsets[i] = pos
        pos += tensors[i].numel() * tensors[i].element_size()
    return offsets, pos


def _flat_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a flat uint8 array (no copy; any dtype, bfloat16 too)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def copy_into(buf: torch.Tensor, tensors: list[torch.Tensor], offsets: list[int]) -> list[torch.Tensor]:
    """Copy each tensor into ``buf`` (uint8) at its offset, contiguously; returns the typed views.

    Host bytes are copied by NumPy, adjacent tensors in one call, never by ``Tensor.copy_``: on
    the CPU torch hands every large copy to its OpenMP team, which on a busy machine waits for
    descheduled threads (measured in :mod:`ckptmirror.buffers`). Device copies are queued
    non-blocking and synchronised before returning, so the caller may change its tensors as
    soon as this returns.
    """
    views: list[torch.Tensor] = []
    devices: set[torch.device] = set()
    dst = buf.numpy() if buf.numel() else None
    run: list[np.ndarray] = []
    run_start = run_end = 0

    def flush() -> None:
        if run:
            assert dst is not None
            if len(run) == 1:
                np.copyto(dst[run_start:run_end], run[0], casting="no")
            else:
                np.concatenate(run, out=dst[run_start:run_end], casting="no")
            run.clear()

    for t, off in sorted(zip(tensors, offsets), key=lambda p: p[1]):
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            continue
        if t.is_cuda or not t.is_contiguous():
            view = buf[off : off + nbytes].view(t.dtype).view(t.shape)
            view.copy_(t, non_blocking=t.is_cuda)
            if t.is_cuda:
                devices.add(t.device)
            continue
        if not run or off != run_end:
            flush()
            run_start = off
        run.append(_flat_bytes(t))
        run_end = off + nbytes
    flush()
    for dev in devices:
        torch.cuda.current_stream(dev).synchronize()
    for t, off in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        views.append(
            buf[off : off + nbytes].view(t.dtype).view(t.shape) if nbytes else torch.empty(t.shape, dtype=t.dtype)
        )
    return views
