"""Float-aware compression of checkpoint objects: byte planes + zstd, in a self-describing container.

An *object* is a byte range (up to 64 MiB) of a rank's data stream: one slice of a large
tensor, or several small tensors back to back. :func:`encode` compresses one object given the
dtype of each part of it (its *segments*); :func:`decode` restores it bit-exactly from the
blob alone; :func:`decoded_size` reads its size from the header.

How (the idea of ZipNN, Hershcovitch et al., 2024): the bytes of a float are not alike. The
exponent of trained weights takes a few dozen values (~2.6 bits of entropy in 8), while the
mantissa is close to random. A byte-oriented compressor sees them interleaved and finds little
(zstd -1 on fp32 weights: ~1.09). So the top 16 bits of each element are rotated left by one
bit, which moves the sign bit to the bottom and leaves the exponent alone in the high byte
(exactly for bf16 and fp32; fp64 gets its top 8 exponent bits, fp16 its 5 exponent and top 3
mantissa bits); then the elements are split into *byte planes* (plane ``p`` holds byte ``p`` of
every element) and each plane is compressed on its own: the exponent plane shrinks ~3x, the
mantissa planes are usually stored raw. Integer types are split into byte planes without the
rotation (the high bytes of small values compress well); 1-byte types are one plane.

Everything works on unsigned integer views of the data, so NaN payloads, signalling NaNs,
-0.0, infinities and denormals round-trip bit-exactly, and the dtype names given to
:func:`encode` only decide how well an object compresses, never whether it decodes: every
transform is a bijection on bytes.

Container (little-endian)::

    magic "CKMZ" | version u8 | flags u8 (0) | reserved u16 (0) | xxh3_64 of everything after it u64
    raw_size u64 | chunk_elems u32 | n_segments u32 | n_frames u32
    segment table: n_segments x (nbytes u64, layout u8)    contiguous, in order, sum = raw_size
    frame table:   n_frames x (method u8, stored_len u32)  per segment, per chunk, per plane
    payload:       the frames, back to back                sum of stored_len = the rest

A segment is cut into chunks of ``chunk_elems`` elements; each chunk gives one frame per plane,
``method`` saying how it is stored: 0 the plane's bytes as they are, 1 one zstd frame of them,
2 the whole 16-bit lane (both planes, unrotated; the next frame is then an empty 3). Chunks
keep the numpy passes on cache-sized arrays and bound the scratch memory of decoding, and cost
no ratio: zstd codes at most 64 KiB with one Huffman table anyway.

Threads: :func:`encode` and :func:`decode` may run in several threads at once (measured: 2
threads on 2 cores encode ~1.5x and decode ~1.6x as fast as one). Each thread has its own
single-threaded zstd contexts (``threads=0``; on two cores, two single-threaded contexts beat
one context with ``threads=2``); zstandard and numpy release the GIL while they work, and the
Python work is a few dozen calls per 256 Ki elements.

Memory: :func:`encode` holds the frames, then joins them: its peak is about twice the
compressed size, plus the input (:func:`encode_into` writes into the caller's buffer instead).
:func:`decode` writes into the caller's buffer; per thread it needs a chunk's frames and a few
blocks of scratch: at most ~3 MiB.
"""

from __future__ import annotations

from ._decode import decode
from ._encode import KEEP_RATIO as KEEP_RATIO
from ._encode import SAMPLE_BYTES as SAMPLE_BYTES
from ._encode import SMALL_SEGMENT as SMALL_SEGMENT
from ._encode import encode, encode_into, max_encoded_size
from ._format import CHUNK_ELEMS as CHUNK_ELEMS
from ._format import CODECS, NONE, ZSTD, decoded_size, is_codec
from ._format import HEADER_SIZE as HEADER_SIZE
from ._format import MAGIC as MAGIC
from ._format import MAX_CHUNK_ELEMS as MAX_CHUNK_ELEMS
from ._format import METHOD_IN_LANE as METHOD_IN_LANE
from ._format import METHOD_LANE as METHOD_LANE
from ._format import METHOD_RAW as METHOD_RAW
from ._format import METHOD_ZSTD as METHOD_ZSTD
from ._format import VERSION as VERSION
from ._hints import CompressionHints

__all__ = [
    "CODECS",
    "NONE",
    "ZSTD",
    "CompressionHints",
    "decode",
    "decoded_size",
    "encode",
    "encode_into",
    "is_codec",
    "max_encoded_size",
]
