"""Per-thread state: the zstd compression and decompression contexts and reused scratch arrays.

Apart because it is the one place that holds state between calls: each thread gets its own
single-threaded contexts (and the fast parameters float planes are coded with) and its own
scratch, so that :func:`~ckptmirror.codec.encode` and :func:`~ckptmirror.codec.decode` may
run in several threads at once.
"""

from __future__ import annotations

import threading
from typing import Any, Final

import numpy as np
import zstandard

# Float planes have no long repeats to find, only a skewed byte histogram (exponents) or next
# to none (mantissas): what pays is zstd's Huffman coding of literals. Match finding costs time
# and, at levels 2-9, ratio: each short match costs more than the literals it replaces. The
# fast strategy with the longest minimum match and a 64-entry hash table finds few matches.
# On the bf16 exponent plane of all-MiniLM-L6-v2 (256 KiB frames) it gives 2.65 bits at
# 0.61 GB/s, decoding at 1.33 GB/s; level 1: 3.08 bits, 0.20 and 0.59 GB/s; level 3: 3.38
# bits; level 19: 2.66 bits. A 64 KiB window makes zstd's blocks (one Huffman table each)
# 64 KiB, which adapts better to small tensors than 128 KiB blocks (the fp32 position
# embeddings' second mantissa plane: 4.50 bits vs 4.87; all-MiniLM fp32: ratio 1.2212 vs 1.2199).
_FLOAT_PARAMS: Final[dict[str, int]] = {
    "strategy": zstandard.STRATEGY_FAST,
    "window_log": 16,
    "hash_log": 6,
    "chain_log": 6,
    "search_log": 1,
    "min_match": 7,
    "target_length": 0,  # > 0 with the fast strategy would turn off the Huffman coding of literals
}

_tls = threading.local()


def _compressor(level: int | None) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level``, or for float planes (``None``)."""
    cache: dict[int | None, zstandard.ZstdCompressor] | None = getattr(_tls, "cctx", None)
    if cache is None:
        cache = _tls.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        if level is None:
            params = zstandard.ZstdCompressionParameters(
                **_FLOAT_PARAMS, threads=0, write_content_size=True, write_checksum=False
            )
            cctx = zstandard.ZstdCompressor(compression_params=params)
        else:
            cctx = zstandard.ZstdCompressor(level=level, threads=0, write_content_size=True, write_checksum=False)
        cache[level] = cctx
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_tls, "dctx", None)
    if dctx is None:
        dctx = _tls.dctx = zstandard.ZstdDecompressor()
    return dctx


def _scratch(name: str, n: int) -> np.ndarray[Any, np.dtype[np.uint16]]:
    """A reused per-thread uint16 array of ``n`` elements (fresh 512 KiB arrays would page-fault)."""
    cache: dict[str, np.ndarray[Any, np.dtype[np.uint16]]] | None = getattr(_tls, "scratch", None)
    if cache is None:
        cache = _tls.scratch = {}
    arr = cache.get(name)
    if arr is None or arr.size < n:
        arr = cache[name] = np.empty(max(n, 1), "<u2")
    return arr[:n]
