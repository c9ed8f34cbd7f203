"""Decoding: a validated blob's frames back into the caller's buffer, plane by plane, chunk by chunk.

Apart from encoding because it is the side that meets hostile input: every frame is checked
against what the (already parsed) tables say it must decode to before it is written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zstandard

from ._contexts import _decompressor, _scratch
from ._format import METHOD_IN_LANE, METHOD_LANE, METHOD_RAW, METHOD_ZSTD, _byte_view, _corrupt, _parse
from ._planes import _BLOCK, _LAYOUTS, _join_block


def decode(blob: Any, out: Any, *, verify: bool = True) -> None:
    """Decode ``blob`` (from :func:`encode`) into ``out``, a writable buffer of exactly the raw size.

    The blob is validated before anything is written: a damaged, truncated, extended or forged
    blob, or one whose raw size is not ``len(out)``, raises
    :class:`~ckptmirror.errors.CorruptObjectError`. Decoding never writes outside ``out`` and
    allocates at most a few chunks of scratch whatever the header claims. Only a forged blob
    (one with a valid checksum) can fail after ``out`` was partly written.

    ``verify=False`` skips the blob's checksum (~10% of a decode) for a caller that has just
    checked the blob against its own checksum; everything else is still validated, so a damaged
    blob can then decode to wrong bytes but never writes outside ``out``.
    Raises ValueError if ``out`` is read-only or not contiguous.
    """
    view = _byte_view(blob, "blob")
    dst = memoryview(out)
    if dst.readonly:
        raise ValueError("out must be a writable buffer")
    dst = _byte_view(dst, "out")
    parsed = _parse(view, len(dst), verify)
    dctx = _decompressor()
    methods, lengths = parsed.methods, parsed.lengths
    fi = 0
    pos = parsed.payload_start

    def frame(m: int, lane_ok: bool = False) -> tuple[int, Any]:
        """``(method, bytes)`` of the next frame, which must decode to ``m`` bytes (``2m`` if a lane)."""
        nonlocal fi, pos
        method, length = methods[fi], lengths[fi]
        piece = view[pos : pos + length]
        fi += 1
        pos += length
        if method == METHOD_ZSTD:
            try:
                # The content size is what zstd would allocate: check it before decompressing.
                if zstandard.frame_content_size(piece) != m:
                    raise _corrupt(f"zstd frame {fi - 1} does not decode to {m} bytes")
                data = dctx.decompress(piece, allow_extra_data=False)
            except zstandard.ZstdError as exc:
                raise _corrupt(f"zstd frame {fi - 1} does not decode: {exc}") from None
            if len(data) != m:
                raise _corrupt(f"zstd frame {fi - 1} decoded to {len(data)} bytes, not {m}")
            return method, data
        if method == METHOD_LANE and lane_ok:
            m *= 2
        elif method != METHOD_RAW:
            raise _corrupt(f"frame {fi - 1} has method {method}, which cannot stand there")
        if length != m:
            raise _corrupt(f"frame {fi - 1} holds {length} bytes, not {m}")
        return method, piece

    chunk = parsed.chunk
    off = 0
    for nbytes, code in parsed.segments:
        lay = _LAYOUTS[code]
        k = lay.itemsize
        nelem = nbytes // k
        if k == 1:
            for s in range(off, off + nbytes, chunk):
                e = min(s + chunk, off + nbytes)
                dst[s:e] = frame(e - s)[1]
            off += nbytes
            continue
        lanes = k // 2
        words = np.frombuffer(dst, f"<u{k}", count=nelem, offset=off)
        for s in range(0, nelem, chunk):
            m = min(chunk, nelem - s)
            parts: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any] | None]] = []
            for _ in range(lanes):
                method, first = frame(m, lane_ok=True)
                if method == METHOD_LANE:
                    if methods[fi] != METHOD_IN_LANE or lengths[fi] != 0:
                        raise _corrupt(f"frame {fi} should be the empty second half of lane frame {fi - 1}")
                    fi += 1
                    parts.append((np.frombuffer(first, "<u2"), None))
                else:
                    parts.append((np.frombuffer(first, np.uint8), np.frombuffer(frame(m)[1], np.uint8)))
            # One pass over the chunk in cache-sized blocks: planes to lanes, lanes to words.
            for a in range(0, m, _BLOCK):
                b = min(a + _BLOCK, m)
                y = words[s + a : s + b]
                if lanes == 1:
                    first, second = parts[0]
                    if second is None:
                        np.copyto(y, first[a:b])
                    else:
                        _join_block(first[a:b], second[a:b], y, lay.is_float)
                    continue
                # Words from lanes, top lane first: widen, shift up 16 bits (as a multiply), or in
                # the next lane. Faster than one strided copy per lane.
                for j in range(lanes - 1, -1, -1):
                    first, second = parts[j]
                    if second is None:
                        x = first[a:b]
                    else:
                        x = _scratch("x", b - a)
                        _join_block(first[a:b], second[a:b], x, lay.is_float and j == lanes - 1)
                    if j == lanes - 1:
                        np.copyto(y, x)
                    else:
                        np.multiply(y, 1 << 16, out=y)
                        np.bitwise_or(y, x, out=y)
        off += nbytes
