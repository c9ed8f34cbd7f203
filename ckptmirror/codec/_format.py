"""The container's bytes: codec names, header and table layouts, frame methods; writing and parsing tables.

Apart from the encoder and the decoder because both must agree on it to the byte: the fixed
header, the segment and frame tables (written by :func:`_tables`, validated by :func:`_parse`
before a decoder touches its output) and the constants the format fixes. No zstd here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import xxhash

from ..errors import CorruptObjectError
from ._planes import _LAYOUTS

#: Codec name of an object stored as its raw bytes.
NONE: Final = "none"
#: Codec name of an object stored in this module's container (byte planes + zstd).
ZSTD: Final = "zstd"
#: Every codec name an object may be stored with.
CODECS: Final = frozenset({NONE, ZSTD})

MAGIC: Final = b"CKMZ"
VERSION: Final = 1

_PREFIX = struct.Struct("<4sBBHQ")  # magic, version, flags, reserved, checksum
_HEADER = struct.Struct("<4sBBHQQIII")  # the prefix, then raw_size, chunk_elems, n_segments, n_frames
#: Size of the fixed header; a blob is at least this long.
HEADER_SIZE: Final = _HEADER.size
_SEGMENT_DTYPE = np.dtype([("nbytes", "<u8"), ("layout", "u1")])  # packed: 9 bytes
_FRAME_DTYPE = np.dtype([("method", "u1"), ("length", "<u4")])  # packed: 5 bytes

# Frame methods. A lane whose two byte planes would both be stored raw is stored as it is (its
# 16-bit values, unrotated), which saves the split and the join: LANE is that frame (2m bytes)
# in place of the low plane's, and IN_LANE the empty frame in place of the high plane's.
METHOD_RAW: Final = 0
METHOD_ZSTD: Final = 1
METHOD_LANE: Final = 2
METHOD_IN_LANE: Final = 3

#: Elements per chunk: each plane frame holds 256 KiB, and a chunk's numpy passes (16-bit
#: lanes, 512 KiB each) stay in the L2 cache.
CHUNK_ELEMS: Final = 1 << 18
#: The largest chunk a decoder accepts (bounds its per-chunk scratch memory).
MAX_CHUNK_ELEMS: Final = 1 << 20


def is_codec(name: object) -> bool:
    """Whether ``name`` names a codec this version reads (an element of :data:`CODECS`)."""
    return isinstance(name, str) and name in CODECS


def _tables(size: int, runs: list[tuple[int, int, int]], methods: list[int], lengths: list[int]) -> bytes:
    """The header after the prefix, the segment table and the frame table."""
    seg_table = np.empty(len(runs), _SEGMENT_DTYPE)
    seg_table["nbytes"] = [n for _, n, _ in runs]
    seg_table["layout"] = [c for _, _, c in runs]
    frame_table = np.empty(len(methods), _FRAME_DTYPE)
    frame_table["method"] = methods
    frame_table["length"] = lengths
    head = _HEADER.pack(MAGIC, VERSION, 0, 0, 0, size, CHUNK_ELEMS, len(runs), len(methods))[_PREFIX.size :]
    return head + seg_table.tobytes() + frame_table.tobytes()


def _corrupt(message: str) -> CorruptObjectError:
    return CorruptObjectError(f"compressed object: {message}")


def _byte_view(buf: Any, what: str) -> memoryview:
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError(f"{what} must be a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _read_header(view: memoryview) -> tuple[int, int, int, int, int]:
    """(checksum, raw_size, chunk_elems, n_segments, n_frames), after checking magic and version."""
    if len(view) < HEADER_SIZE:
        raise _corrupt(f"truncated: {len(view)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, flags, reserved, checksum, raw_size, chunk, n_seg, n_frames = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise _corrupt(f"bad magic {magic!r} (expected {MAGIC!r}): not a ckptmirror zstd object")
    if version != VERSION:
        raise _corrupt(f"format version {version} is not supported (this ckptmirror reads version {VERSION})")
    if flags or reserved:
        raise _corrupt(f"unknown flags {flags:#x}/{reserved:#x} in the header")
    return checksum, raw_size, chunk, n_seg, n_frames


def decoded_size(blob: Any) -> int:
    """The size of the object that ``blob`` decodes to, read from its header.

    Checks only the magic and version (CorruptObjectError if wrong); :func:`decode` checks the rest.
    """
    return _read_header(_byte_view(blob, "blob"))[1]


@dataclass(frozen=True)
class _Parsed:
    chunk: int
    segments: list[tuple[int, int]]  # (nbytes, layout)
    methods: list[int]
    lengths: list[int]
    payload_start: int


def _parse(view: memoryview, out_size: int, verify: bool) -> _Parsed:
    """Validate everything but the frames' contents, allocating nothing a lying header asks for."""
    checksum, raw_size, chunk, n_seg, n_frames = _read_header(view)
    if raw_size != out_size:
        raise _corrupt(f"raw size {raw_size} does not match the {out_size}-byte output buffer")
    if verify and xxhash.xxh3_64_intdigest(view[_PREFIX.size :]) != checksum:
        raise _corrupt("checksum mismatch: the blob is damaged, truncated or extended")
    # Past the checksum, a bad field means a forged blob or an encoder bug: still checked.
    if not 1 <= chunk <= MAX_CHUNK_ELEMS:
        raise _corrupt(f"chunk size of {chunk} elements is out of range")
    pos = HEADER_SIZE
    tables = n_seg * _SEGMENT_DTYPE.itemsize + n_frames * _FRAME_DTYPE.itemsize
    if tables > len(view) - pos:
        raise _corrupt(f"tables of {n_seg} segments and {n_frames} frames do not fit in {len(view)} bytes")
    seg = np.frombuffer(view, _SEGMENT_DTYPE, count=n_seg, offset=pos)
    pos += n_seg * _SEGMENT_DTYPE.itemsize
    frames = np.frombuffer(view, _FRAME_DTYPE, count=n_frames, offset=pos)
    pos += n_frames * _FRAME_DTYPE.itemsize
    segments: list[tuple[int, int]] = []
    total = 0
    expected_frames = 0
    for nbytes, code in zip(seg["nbytes"].tolist(), seg["layout"].tolist()):
        lay = _LAYOUTS.get(code)
        if lay is None:
            raise _corrupt(f"unknown segment layout {code}")
        if nbytes == 0 or nbytes % lay.itemsize:
            raise _corrupt(f"a segment of {nbytes} bytes does not hold whole {lay.itemsize}-byte elements")
        total += nbytes
        if total > raw_size:
            raise _corrupt(f"segments cover more than the raw size {raw_size}")
        expected_frames += -(-(nbytes // lay.itemsize) // chunk) * lay.itemsize
        segments.append((nbytes, code))
    if total != raw_size:
        raise _corrupt(f"segments cover {total} bytes, not the raw size {raw_size}")
    if expected_frames != n_frames:
        raise _corrupt(f"the frame table has {n_frames} frames, the segments need {expected_frames}")
    methods: list[int] = frames["method"].tolist()
    lengths: list[int] = frames["length"].tolist()
    if n_frames and int(frames["method"].max()) > METHOD_IN_LANE:
        raise _corrupt("unknown frame method")
    if sum(lengths) != len(view) - pos:
        raise _corrupt(f"the frames hold {sum(lengths)} bytes, the payload is {len(view) - pos}")
    return _Parsed(chunk, segments, methods, lengths, pos)
