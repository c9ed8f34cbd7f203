"""Encoding: plan an object's segments, decide per plane chunk whether to compress, write the blob.

Apart from decoding because the two share only the format and the kernels: the encoder alone
samples planes, merges small segments, uses hints and holds the tuning constants below.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Final

import numpy as np
import xxhash
import zstandard

from ._contexts import _compressor
from ._format import (
    _FRAME_DTYPE,
    _PREFIX,
    _SEGMENT_DTYPE,
    CHUNK_ELEMS,
    HEADER_SIZE,
    MAGIC,
    METHOD_IN_LANE,
    METHOD_LANE,
    METHOD_RAW,
    METHOD_ZSTD,
    VERSION,
    _byte_view,
    _tables,
)
from ._hints import CompressionHints
from ._planes import _BLOCK, _BYTES, _LAYOUTS, _lane_block, _layout_of, _split_block

#: Bytes of a plane chunk compressed first to decide whether the whole chunk is worth it.
SAMPLE_BYTES: Final = 64 << 10
#: A sample or a frame that compresses to more than this fraction of its size is stored raw.
#: Not 0.95: some planes compress to 0.95-0.98 (the low mantissa bytes of embeddings with rows
#: of low-precision values, the sign+mantissa plane of exp_avg_sq), and keeping them gains
#: 0.04% (all-MiniLM fp32) to 0.12% (its AdamW state) of ratio at no measurable cost in speed:
#: zstd runs at >2 GB/s on such planes.
KEEP_RATIO: Final = 0.98
#: Segments smaller than this may be absorbed into a neighbour of another layout, so that an
#: object of thousands of small mixed-dtype tensors becomes a few segments: each segment costs
#: ~60 us of Python and zstd calls, which would dominate (3200 alternating fp32/bf16 tensors of
#: 20 KB: 0.30 GB/s encode as 3200 segments, 0.59 as one). Every layout is a bijection on
#: bytes, so this only costs a little ratio on those tensors (there: 1.29 instead of 1.33).
SMALL_SEGMENT: Final = 64 << 10


def _plan(size: int, segments: Sequence[tuple[int, int, str]]) -> list[tuple[int, int, int]]:
    """``(offset, nbytes, layout)`` runs that cover ``[0, size)`` exactly, adjacent ones merged."""
    items = sorted((int(o), int(n), str(d)) for o, n, d in segments if n)
    runs: list[list[int]] = []  # [offset, nbytes, layout]

    def push(off: int, nbytes: int, code: int) -> None:
        if runs:
            prev = runs[-1]
            total = prev[1] + nbytes
            # Merge into the previous run when the layouts agree or this run is small, as long
            # as the merged run holds whole elements (the layouts are bijections on any bytes).
            if (prev[2] == code or nbytes < SMALL_SEGMENT) and total % _LAYOUTS[prev[2]].itemsize == 0:
                prev[1] = total
                return
            if prev[1] < SMALL_SEGMENT and total % _LAYOUTS[code].itemsize == 0:
                prev[1] = total
                prev[2] = code
                return
        runs.append([off, nbytes, code])

    pos = 0
    last_name, last_code = "", _BYTES
    for off, nbytes, name in items:
        if off < pos or nbytes < 0 or off + nbytes > size:
            raise ValueError(f"segment ({off}, {nbytes}) overlaps another or lies outside the data ({size} bytes)")
        if off > pos:
            push(pos, off - pos, _BYTES)  # bytes that no segment covers
        if name != last_name:  # thousands of tensors, few distinct names
            last_name, last_code = name, _layout_of(name)
        push(off, nbytes, last_code if nbytes % _LAYOUTS[last_code].itemsize == 0 else _BYTES)
        pos = off + nbytes
    if pos < size:
        push(pos, size - pos, _BYTES)
    return [(o, n, c) for o, n, c in runs]


class _PlaneState:
    """The compress-or-store-raw decision for one plane of one segment."""

    __slots__ = ("compressing", "forced_raw", "any_compressed")

    def __init__(self, forced_raw: bool) -> None:
        self.compressing = False  # the last chunk compressed: compress the next without a sample
        self.forced_raw = forced_raw  # a hint said raw: no sampling at all
        self.any_compressed = False


def _try(state: _PlaneState, sample: Any, cctx: zstandard.ZstdCompressor, counts: list[int]) -> bool:
    """Whether to compress this chunk of a plane: by the hint, the last chunk, or a ``sample`` of it."""
    if state.forced_raw:
        return False
    if state.compressing or sample is None:
        return True
    counts[0] += 1
    return len(cctx.compress(sample)) <= KEEP_RATIO * len(sample)


def _finish(plane: Any, attempt: bool, state: _PlaneState, cctx: zstandard.ZstdCompressor) -> tuple[int, Any]:
    """``(method, frame)`` for one plane chunk."""
    if not attempt:
        return METHOD_RAW, plane
    packed = cctx.compress(plane)
    if len(packed) > KEEP_RATIO * len(plane):
        state.compressing = False
        return METHOD_RAW, plane
    state.compressing = True
    state.any_compressed = True
    return METHOD_ZSTD, packed


def _frame_count(runs: list[tuple[int, int, int]]) -> int:
    return sum(-(-(n // _LAYOUTS[c].itemsize) // CHUNK_ELEMS) * _LAYOUTS[c].itemsize for _, n, c in runs)


def _encode_frames(
    src: memoryview,
    runs: list[tuple[int, int, int]],
    level: int,
    hints: CompressionHints | None,
    slot: Hashable | None,
    counts: list[int],
    emit: Callable[[int, Any], None],
) -> None:
    """Call ``emit(method, frame)`` for every frame of the object, in order."""
    cctx_level = _compressor(level)
    cctx_float = _compressor(None)
    keyed = hints is not None and slot is not None
    for si, (off, nbytes, code) in enumerate(runs):
        lay = _LAYOUTS[code]
        k = lay.itemsize
        nelem = nbytes // k
        # The key names the data as well as its place, so a hint never outlives a change of tensors.
        keys = [(slot, si, off, nbytes, code, p) for p in range(k)]
        states = [_PlaneState(keyed and hints.skip(key)) for key in keys]  # type: ignore[union-attr]
        cctx = cctx_float if lay.is_float else cctx_level
        lanes = k // 2
        words = None if k == 1 else np.frombuffer(src, f"<u{k}", count=nelem, offset=off)
        for s in range(0, nelem, CHUNK_ELEMS):
            m = min(CHUNK_ELEMS, nelem - s)
            mid = (m - SAMPLE_BYTES) // 2  # samples come from the middle: a tensor's start is often unlike the rest
            big = m > 2 * SAMPLE_BYTES
            if words is None:
                plane = src[off + s : off + s + m]
                attempt = _try(states[0], plane[mid : mid + SAMPLE_BYTES] if big else None, cctx, counts)
                emit(*_finish(plane, attempt, states[0], cctx))
                continue
            chunk = words[s : s + m]
            # Per lane: whether to split it into planes now (one of them is being compressed) or
            # to decide from a sample first; a lane whose planes are both stored raw is stored as is.
            split = [
                any(st.compressing and not st.forced_raw for st in states[2 * j : 2 * j + 2]) for j in range(lanes)
            ]
            attempts: list[tuple[bool, bool] | None] = [None] * lanes
            for j in range(lanes):
                st_lo, st_hi = states[2 * j], states[2 * j + 1]
                if split[j]:
                    continue
                samples: tuple[Any, Any] = (None, None)
                if big and not (st_lo.forced_raw and st_hi.forced_raw):
                    x = _lane_block(chunk[mid : mid + SAMPLE_BYTES], j, lanes, "x")
                    samples = (np.empty(len(x), np.uint8), np.empty(len(x), np.uint8))
                    _split_block(x, samples[0], samples[1], lay.is_float and j == lanes - 1)
                try_lo = _try(st_lo, samples[0], cctx, counts)
                try_hi = _try(st_hi, samples[1], cctx, counts)
                attempts[j] = (try_lo, try_hi)
                split[j] = try_lo or try_hi
            # One pass over the chunk in cache-sized blocks: lanes to planes, or lanes kept whole.
            out: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any] | None]] = [
                (np.empty(m, np.uint8), np.empty(m, np.uint8)) if split[j] else (np.empty(m, "<u2"), None)
                for j in range(lanes)
            ]
            for a in range(0, m, _BLOCK):
                b = min(a + _BLOCK, m)
                block = chunk[a:b]
                for j, (first, second) in enumerate(out):
                    if second is None:  # the whole lane, stored raw
                        if lanes == 1:
                            np.copyto(first[a:b], block)
                        elif j == 0:
                            np.copyto(first[a:b], block, casting="unsafe")
                        else:
                            np.right_shift(block, 16 * j, out=first[a:b], casting="unsafe")
                    else:
                        x = _lane_block(block, j, lanes, "x")
                        _split_block(x, first[a:b], second[a:b], lay.is_float and j == lanes - 1)
            for j, (first, second) in enumerate(out):
                if second is None:
                    emit(METHOD_LANE, first.view(np.uint8))
                    emit(METHOD_IN_LANE, b"")
                    continue
                st_lo, st_hi = states[2 * j], states[2 * j + 1]
                decided = attempts[j]
                if decided is None:  # split unasked: sample from the planes themselves
                    decided = (
                        _try(st_lo, first[mid : mid + SAMPLE_BYTES] if big else None, cctx, counts),
                        _try(st_hi, second[mid : mid + SAMPLE_BYTES] if big else None, cctx, counts),
                    )
                emit(*_finish(first, decided[0], st_lo, cctx))
                emit(*_finish(second, decided[1], st_hi, cctx))
        if keyed:
            for key, state in zip(keys, states):
                if not state.forced_raw:
                    hints.record(key, state.any_compressed)  # type: ignore[union-attr]


def _source(data: Any, level: int) -> memoryview:
    src = memoryview(data)
    if not src.c_contiguous:
        raise ValueError("data must be a contiguous buffer")
    if src.format != "B" or src.ndim != 1:
        src = src.cast("B")
    if not -(1 << 17) <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise ValueError(f"zstd level must be in [-131072, {zstandard.MAX_COMPRESSION_LEVEL}], not {level}")
    return src


def _add_stats(stats: dict[str, int] | None, counts: list[int], methods: list[int]) -> None:
    if stats is not None:
        stats["samples"] = stats.get("samples", 0) + counts[0]
        stats["frames"] = stats.get("frames", 0) + len(methods)
        stats["raw_frames"] = stats.get("raw_frames", 0) + methods.count(METHOD_RAW) + methods.count(METHOD_LANE)


def encode(
    data: Any,
    segments: Sequence[tuple[int, int, str]],
    *,
    level: int = 1,
    hints: CompressionHints | None = None,
    slot: Hashable | None = None,
    stats: dict[str, int] | None = None,
) -> bytes:
    """Compress one object into a self-describing blob that :func:`decode` restores bit-exactly.

    ``data``: the object's bytes (any contiguous buffer). ``segments``: ``(offset, nbytes,
    dtype)`` of the tensors in it, the dtype a torch or numpy name such as ``"bfloat16"`` or
    ``"torch.float32"``. Bytes no segment covers, segments whose size is not a multiple of the
    item size and unknown dtype names are compressed as plain bytes; segments must not overlap.
    Adjacent segments of one layout (e.g. several fp32 tensors) are compressed as one.

    ``level``: the zstd level of byte and integer planes. Float planes are always coded with
    fixed fast parameters (Huffman coding, hardly any match search): higher levels find nothing
    more in them (level 19 codes exponents as level 1 does, levels 2-9 worse).

    ``hints`` and ``slot`` (a hashable id of this object, the same from save to save): see
    :class:`CompressionHints`; hints are used only with a slot. ``stats``, if given, gets
    counters added: ``samples`` (sample compressions), ``frames``, ``raw_frames``.

    Raises ValueError for a segment outside ``data`` or overlapping another, or a level zstd
    does not have. See :func:`encode_into` to write into a reused buffer instead.
    """
    src = _source(data, level)
    runs = _plan(len(src), segments)
    methods: list[int] = []
    lengths: list[int] = []
    payload: list[Any] = []

    def emit(method: int, frame: Any) -> None:
        methods.append(method)
        lengths.append(len(frame))
        payload.append(frame)

    counts = [0]
    _encode_frames(src, runs, level, hints, slot, counts, emit)
    rest = _tables(len(src), runs, methods, lengths)
    h = xxhash.xxh3_64(rest)
    for frame in payload:
        h.update(frame)
    _add_stats(stats, counts, methods)
    return b"".join([_PREFIX.pack(MAGIC, VERSION, 0, 0, h.intdigest()), rest, *payload])


def max_encoded_size(nbytes: int, n_segments: int) -> int:
    """An upper bound on the size of :func:`encode`'s blob for ``nbytes`` of data in ``n_segments`` segments."""
    runs = 2 * n_segments + 1  # each segment, and the gaps around them
    frames = nbytes // CHUNK_ELEMS + 8 * runs
    return HEADER_SIZE + runs * _SEGMENT_DTYPE.itemsize + frames * _FRAME_DTYPE.itemsize + nbytes


def encode_into(
    data: Any,
    segments: Sequence[tuple[int, int, str]],
    out: Any,
    *,
    level: int = 1,
    hints: CompressionHints | None = None,
    slot: Hashable | None = None,
    stats: dict[str, int] | None = None,
) -> int:
    """:func:`encode` into ``out``, a writable buffer of at least :func:`max_encoded_size` bytes; returns the size.

    The blob is ``out[:size]``. Writing into a buffer reused from save to save skips faulting
    in a fresh output and one copy of it: measured 5-30% faster than :func:`encode`.
    """
    src = _source(data, level)
    dst = memoryview(out)
    if dst.readonly:
        raise ValueError("out must be a writable buffer")
    dst = _byte_view(dst, "out")
    runs = _plan(len(src), segments)
    n_frames = _frame_count(runs)
    start = HEADER_SIZE + len(runs) * _SEGMENT_DTYPE.itemsize + n_frames * _FRAME_DTYPE.itemsize
    if len(dst) < start + len(src):
        raise ValueError(f"out holds {len(dst)} bytes; this object may need {start + len(src)}")
    methods: list[int] = []
    lengths: list[int] = []
    pos = start

    def emit(method: int, frame: Any) -> None:
        nonlocal pos
        n = len(frame)
        dst[pos : pos + n] = frame
        methods.append(method)
        lengths.append(n)
        pos += n

    counts = [0]
    _encode_frames(src, runs, level, hints, slot, counts, emit)
    rest = _tables(len(src), runs, methods, lengths)
    dst[_PREFIX.size : start] = rest
    checksum = xxhash.xxh3_64_intdigest(dst[_PREFIX.size : pos])
    dst[: _PREFIX.size] = _PREFIX.pack(MAGIC, VERSION, 0, 0, checksum)
    _add_stats(stats, counts, methods)
    return pos
