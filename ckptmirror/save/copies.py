"""The copy list of a plan, and the copies it runs: the bytes-moving half of the snapshot.

Holds :class:`_Span` (one source storage's byte range and its place in the data stream), the
copy list built once per plan (:class:`_Copies`: host pieces, device views, coalesced runs, gap
closing) and the code that runs it (NumPy gathers on the caller plus helper threads, device
copies with ``non_blocking=True`` then a wait on each device's current stream).

Apart from :mod:`~ckptmirror.save.layout` (where every storage goes, decided once and cached)
because this is the part that runs on every save, and is tuned on its own (piece size, threads,
the GIL); :mod:`~ckptmirror.save.snapshot` puts the two together. The host copy never goes
through torch's copy kernels: see :mod:`ckptmirror.buffers`.
"""

from __future__ import annotations

import copy
import ctypes
import threading
from dataclasses import dataclass

import numpy as np  # torch imports it anyway
import torch

from ..buffers import byte_view, gather_bytes, host_array, host_bytes, usable_cpus

#: The unit of work of the host copy (see :class:`_Copies`). Large, because glibc's memmove
#: switches to non-temporal stores only above a size that depends on the cache (here between 16
#: and 32 MiB): measured on 256 MiB, pieces of <= 16 MiB copied at 6.4 GB/s, pieces of >= 32 MiB
#: at 10 GB/s. Small enough that a copy thread descheduled mid-piece costs the caller a few ms.
PIECE_BYTES = 64 << 20

#: Threads that share a host copy (the caller's included) once it holds at least
#: :data:`PARALLEL_MIN_BYTES`: one piece's worth, cut into one piece a thread (of at least 32 MiB,
#: still large enough for non-temporal stores).
COPY_THREADS = 2
PARALLEL_MIN_BYTES = PIECE_BYTES
#: ... and the average host span at least this large (see :class:`_Copies`).
PARALLEL_MIN_AVERAGE = 64 << 10

#: A host copy whose sources average at least this many bytes is mostly GIL-free (see ``gil_light``).
GIL_LIGHT_AVERAGE = 16 << 10


@dataclass
class _Span:
    storage: torch.UntypedStorage | None  # None for numpy arrays
    array: object  # numpy array (contiguous) when storage is None
    start: int  # byte offset in the source storage
    nbytes: int
    offset: int = 0  # byte offset in the data stream


@dataclass(frozen=True)
class _Piece:
    """A unit of work of the host copy: ``srcs`` back to back are ``stream[start:end]``."""

    start: int
    end: int
    srcs: list[np.ndarray]
    spans: list[int]  # the span each source belongs to (see :func:`~ckptmirror.save.layout.replan`)


class _Copies:
    """The copy list of a plan, built once: with a cached plan, a steady-state snapshot only
    copies bytes.

    Host sources (CPU storages, NumPy arrays, coalesced runs of small storages) are flat uint8
    NumPy views, cut into pieces of about :data:`PIECE_BYTES`: consecutive small sources are
    gathered into one piece (one C call for thousands of tensors), large spans are split (so
    that two threads can share them). Nothing goes through ``Tensor.copy_`` on the host: see
    :mod:`ckptmirror.buffers` for why. Device sources (CUDA) stay torch views, copied with
    ``non_blocking=True``.

    ``loose`` (one staging offset per span) and ``runs`` (lists of span indices, each copied as
    one range of memory) describe a coalesced plan (see
    :data:`~ckptmirror.save.layout.COALESCE_MIN`); without them the staging layout is the stream's.
    """

    def __init__(
        self,
        spans: tuple[_Span, ...],
        loose: list[int] | None = None,
        runs: list[list[int]] | None = None,
        moves: list[tuple[int, int, int]] | None = None,
    ) -> None:
        self.pieces: list[_Piece] = []
        self.device: list[tuple[int, int, torch.Tensor]] = []  # (span index, stream offset, view)
        #: (staging offset, source) of the spans of a run that moved since the run was made
        #: (see :meth:`patched`): copied after the pieces, over the run's stale bytes
        self.fixups: dict[int, tuple[int, np.ndarray]] = {}
        #: where each span is staged; the gap closing of :meth:`close_gaps`, (to, from, bytes)
        self.loose = loose if loose is not None else [sp.offset for sp in spans]
        self.moves = moves or []
        self.in_run: frozenset[int] = frozenset(j for r in runs or () for j in r)
        #: the storages a run's memory range covers, alive as long as these copies are (a run's
        #: array points into them without holding them)
        self.keep = tuple(spans[j].storage for j in self.in_run)
        self.staging_bytes = max((o + sp.nbytes for o, sp in zip(self.loose, spans)), default=0)
        run_at = {r[0]: r for r in runs or ()}
        # (span index or -1 for a run, staging offset, bytes, flat uint8 source)
        host: list[tuple[int, int, int, np.ndarray]] = []
        for j, sp in enumerate(spans):
            if sp.nbytes == 0 or (j in self.in_run and j not in run_at):
                continue
            if j in run_at:
                r = run_at[j]
                last = spans[r[-1]]
                first_addr = _address(sp)
                n = _address(last) + last.nbytes - first_addr
                host.append((-1, self.loose[j], n, _raw_bytes(first_addr, n)))
                continue
            src = _span_source(sp)
            if isinstance(src, torch.Tensor):
                self.device.append((j, sp.offset, src))
            else:
                host.append((j, self.loose[j], sp.nbytes, src))
        self.host_bytes = sum(n for _, _, n, _ in host)
        #: Whether copying these is mostly memmoves that NumPy runs without the GIL (so another
        #: thread may check the state meanwhile: see ``Mirror``'s speculative staging): the GIL is
        #: held ~1 us a source, a source of 16 KiB takes ~2 us to copy.
        self.gil_light = bool(host) and not self.device and self.host_bytes >= GIL_LIGHT_AVERAGE * len(host)
        #: (copies, spans) when these were patched from other copies (:meth:`patched`)
        self.base: tuple[_Copies, frozenset[int]] | None = None
        #: Threads for the host copy: one for small states, and for states of many small
        #: tensors, whose copy is mostly NumPy's per-array work under the GIL (50,000 tensors
        #: in 0.1 GB: 0.024 s on one thread, 0.04-0.05 s on two).
        self.threads = 1
        piece = PIECE_BYTES
        if (
            COPY_THREADS > 1
            and self.host_bytes >= PARALLEL_MIN_BYTES
            and self.host_bytes >= PARALLEL_MIN_AVERAGE * len(host)
        ):
            self.threads = COPY_THREADS
            # Pieces of about host_bytes / threads when that is under PIECE_BYTES, so that a
            # state of 64-128 MiB is shared too (0.1 GB in 6 tensors: 0.008 s, was 0.012 s).
            piece = max(1, min(PIECE_BYTES, -(-self.host_bytes // COPY_THREADS)))
        run: list[np.ndarray] = []
        run_spans: list[int] = []
        run_start = run_end = 0
        for j, off, nbytes, src in host:
            if run and run_end != off:  # a device span lies in between: close the run
                self.pieces.append(_Piece(run_start, run_end, run, run_spans))
                run, run_spans = [], []
            if not run:
                run_start = run_end = off
            if nbytes >= piece:
                if run:
                    self.pieces.append(_Piece(run_start, run_end, run, run_spans))
                    run, run_spans = [], []
                for lo in range(0, nbytes, piece):
                    hi = min(nbytes, lo + piece)
                    self.pieces.append(_Piece(off + lo, off + hi, [src[lo:hi]], [j]))
                run_start = run_end = off + nbytes
                continue
            run.append(src)
            run_spans.append(j)
            run_end += nbytes
            if run_end - run_start >= piece:
                self.pieces.append(_Piece(run_start, run_end, run, run_spans))
                run, run_spans = [], []
                run_start = run_end
        if run:
            self.pieces.append(_Piece(run_start, run_end, run, run_spans))
        self._dst_for: int | None = None
        self._dst_host: np.ndarray | None = None
        self._dst_device: list[torch.Tensor] = []

    def destinations(self, stream: torch.Tensor) -> tuple[np.ndarray, list[torch.Tensor]]:
        """The staging buffer as a NumPy array, and the destination view of each device span
        (cached per arena buffer)."""
        if self._dst_for != stream.data_ptr() or self._dst_host is None:
            self._dst_host = host_array(stream)
            self._dst_device = [stream[off : off + src.numel()] for _, off, src in self.device]
            self._dst_for = stream.data_ptr()
        return self._dst_host, self._dst_device

    def close_gaps(self, staged: torch.Tensor) -> None:
        """Move every coalesced storage down to its stream offset (in order, so no source is
        overwritten before it is moved: each one moves down by the gaps before it)."""
        if not self.moves:
            return
        # memoryview slice assignment is one memmove (overlap-safe) at ~0.8 us a call, about half
        # of a NumPy slice assignment's or ctypes.memmove's per-call cost
        mv = host_bytes(staged)
        for to, frm, n in self.moves:
            mv[to : to + n] = mv[frm : frm + n]

    def patched(self, spans: tuple[_Span, ...], changed: set[int]) -> _Copies:
        """These copies with the sources of spans ``changed`` taken anew from ``spans`` (same layout)."""
        new = copy.copy(self)
        new.base = (self, frozenset(changed))
        fresh = {j: _span_source(spans[j]) for j in changed}
        new.fixups = dict(self.fixups)
        for j in changed & self.in_run:
            # Copied as part of a run: the run still copies the old storage's bytes (kept alive
            # by ``keep``), and the new ones are copied over them afterwards.
            src = fresh.pop(j)
            assert isinstance(src, np.ndarray)  # a run holds host spans only
            new.fixups[j] = (self.loose[j], src)
        new.device = []
        for j, off, v in self.device:
            dsrc = fresh.get(j, v)
            assert isinstance(dsrc, torch.Tensor)  # a device span stays a device span
            new.device.append((j, off, dsrc))
        new.pieces = []
        for pc in self.pieces:
            if fresh.keys().isdisjoint(pc.spans):
                new.pieces.append(pc)
                continue
            srcs = list(pc.srcs)
            for k, j in enumerate(pc.spans):
                if j in fresh:
                    sp, hsrc, base = spans[j], fresh[j], self.loose[j]
                    assert isinstance(hsrc, np.ndarray)  # a host span stays a host span
                    srcs[k] = hsrc[max(pc.start, base) - base : min(pc.end, base + sp.nbytes) - base]
            new.pieces.append(_Piece(pc.start, pc.end, srcs, pc.spans))
        return new


def _address(sp: _Span) -> int:
    """Where a CPU storage span's bytes start in memory."""
    assert sp.storage is not None
    return int(sp.storage.data_ptr()) + sp.start


def _raw_bytes(address: int, nbytes: int) -> np.ndarray:
    """A flat uint8 NumPy array over ``nbytes`` of memory at ``address`` (no copy, no owner: the
    caller keeps the memory alive)."""
    return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(address))


def _span_source(sp: _Span) -> np.ndarray | torch.Tensor:
    """What a span is copied from: a flat uint8 NumPy view on the host, a torch view on a device."""
    if sp.storage is None:
        return _array_bytes(sp.array)
    view = byte_view(sp.storage, sp.start, sp.nbytes)
    return view if view.device.type != "cpu" else host_array(view)


def _array_bytes(a: object) -> np.ndarray:
    """The bytes of a contiguous NumPy array as a flat uint8 array (no copy)."""
    return np.asarray(a).reshape(-1).view(np.uint8)


def _copy_staged(c: _Copies, stream: torch.Tensor) -> None:
    dst, device_dst = c.destinations(stream)
    # Device copies first: they run on the device's DMA engines while the host copies below.
    devices: set[torch.device] = set()
    for (_, _, src), d in zip(c.device, device_dst):
        d.copy_(src, non_blocking=src.is_cuda)
        devices.add(src.device)
    if c.pieces:
        _copy_pieces(dst, c.pieces, c.threads)
    for off, fix in c.fixups.values():
        gather_bytes(dst[off : off + len(fix)], [fix])
    for dev in devices:
        if dev.type == "cuda":
            # The copies were queued on each device's current stream; wait for them so the caller
            # may change its tensors as soon as we return.
            torch.cuda.current_stream(dev).synchronize()


def _copy_pieces(dst: np.ndarray, pieces: list[_Piece], threads: int) -> None:
    """Copy every piece into ``dst``; with ``threads`` > 1, helper threads take pieces too.

    The caller works through the pieces itself and waits only for pieces a helper has taken:
    a helper that is slow to start (a busy machine) takes none and costs nothing; one that is
    descheduled mid-piece delays the caller by at most one piece.
    """
    threads = min(threads, len(pieces), usable_cpus())
    if threads <= 1:
        for pc in pieces:
            gather_bytes(dst[pc.start : pc.end], pc.srcs)
        return
    cond = threading.Condition()
    state = {"next": 0, "busy": 0}
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with cond:
                i = state["next"]
                if i >= len(pieces) or errors:
                    return
                state["next"] = i + 1
                state["busy"] += 1
            try:
                pc = pieces[i]
                gather_bytes(dst[pc.start : pc.end], pc.srcs)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller below
                errors.append(exc)
            finally:
                with cond:
                    state["busy"] -= 1
                    cond.notify_all()

    for _ in range(threads - 1):
        threading.Thread(target=work, name="ckptmirror-copy", daemon=True).start()
    work()
    with cond:
        cond.wait_for(lambda: state["busy"] == 0)
    if errors:
        raise errors[0]
