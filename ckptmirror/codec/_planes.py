"""Byte planes: the layout of each dtype (its item size, whether it is a float) and the numpy kernels.

The kernels split blocks of 16-bit lanes into a low and a high byte plane (rotating a float's
top lane so that its exponent sits alone in the high byte) and join them back. Apart because
the encoder and the decoder share them and the layout codes, and because this is all the bit
twiddling of the codec: each kernel here must stay the exact inverse of the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from ._contexts import _scratch

#: Elements per numpy pass: a pass's arrays (256 KiB per uint16 array) stay in L2. Measured
#: against 64 Ki and 256 Ki: as fast or faster, with half the Python calls of 64 Ki.
_BLOCK: Final = 1 << 17

# Layout codes (part of the format): how a segment's elements are split into planes.
_BYTES = 0  # 1-byte elements: one plane, zstd at the caller's level
_INT16 = 1  # integers: one plane per byte, no rotation
_INT32 = 2
_INT64 = 3
_FLOAT16 = 4  # float16 and bfloat16 (and each half of complex32)
_FLOAT32 = 5  # float32 (and each half of complex64)
_FLOAT64 = 6  # float64 (and each half of complex128)
_FLOAT8 = 7  # 1-byte floats: one plane, entropy-coded


@dataclass(frozen=True)
class _Layout:
    """Elements of ``itemsize`` bytes, split into ``itemsize`` byte planes.

    The split works on the 16-bit lanes of each element (bytes 2j and 2j+1 give planes 2j and
    2j+1). For floats the top lane is first rotated left by one bit. Lanes rather than whole
    words halve the bytes each numpy pass touches for fp32/fp64 and confine the rotation to one
    lane; truncating casts (u16 -> u8) are vectorised where strided byte copies are not.
    """

    itemsize: int
    is_float: bool


_LAYOUTS: Final[dict[int, _Layout]] = {
    _BYTES: _Layout(1, False),
    _INT16: _Layout(2, False),
    _INT32: _Layout(4, False),
    _INT64: _Layout(8, False),
    _FLOAT16: _Layout(2, True),
    _FLOAT32: _Layout(4, True),
    _FLOAT64: _Layout(8, True),
    _FLOAT8: _Layout(1, True),
}

_DTYPE_LAYOUT: Final[dict[str, int]] = {
    "float32": _FLOAT32,
    "float": _FLOAT32,
    "complex64": _FLOAT32,
    "cfloat": _FLOAT32,
    "bfloat16": _FLOAT16,
    "float16": _FLOAT16,
    "half": _FLOAT16,
    "complex32": _FLOAT16,
    "chalf": _FLOAT16,
    "float64": _FLOAT64,
    "double": _FLOAT64,
    "complex128": _FLOAT64,
    "cdouble": _FLOAT64,
    "float8_e4m3fn": _FLOAT8,
    "float8_e5m2": _FLOAT8,
    "float8_e4m3fnuz": _FLOAT8,
    "float8_e5m2fnuz": _FLOAT8,
    "float8_e8m0fnu": _FLOAT8,
    "int8": _BYTES,
    "uint8": _BYTES,
    "bool": _BYTES,
    "qint8": _BYTES,
    "quint8": _BYTES,
    "int16": _INT16,
    "short": _INT16,
    "uint16": _INT16,
    "int32": _INT32,
    "int": _INT32,
    "uint32": _INT32,
    "qint32": _INT32,
    "int64": _INT64,
    "long": _INT64,
    "uint64": _INT64,
}


def _layout_of(dtype: str) -> int:
    name = dtype[6:] if dtype.startswith("torch.") else dtype
    # An unknown name (a dtype a later torch adds) still round-trips: as plain bytes.
    return _DTYPE_LAYOUT.get(name, _BYTES)


def _split_block(x: np.ndarray[Any, Any], lo: np.ndarray[Any, Any], hi: np.ndarray[Any, Any], rotate: bool) -> None:
    """Write the low and high byte planes of the contiguous 16-bit values ``x`` into ``lo`` and ``hi``.

    With ``rotate``, the values are first rotated left by one bit: x << 1 | x >> 15, whose low
    byte is (7 mantissa bits, sign) and whose high byte is the low byte of x >> 7 (the exponent).
    np.multiply is ~2x faster than np.left_shift, and truncating into the uint8 output within
    the ufunc saves a pass.
    """
    if rotate:
        t = _scratch("t", len(x))
        w = _scratch("w", len(x))
        np.right_shift(x, 15, out=t)
        np.multiply(x, 2, out=w)
        np.add(w, t, out=lo, casting="unsafe")
        np.right_shift(x, 7, out=hi, casting="unsafe")
    else:
        np.copyto(lo, x, casting="unsafe")
        np.right_shift(x, 8, out=hi, casting="unsafe")


def _join_block(lo: np.ndarray[Any, Any], hi: np.ndarray[Any, Any], y: np.ndarray[Any, Any], rotate: bool) -> None:
    """Inverse of :func:`_split_block`: write the 16-bit values rebuilt from ``lo`` and ``hi`` into ``y``."""
    if rotate:
        w = _scratch("w", len(y))
        np.copyto(w, hi)
        np.multiply(w, 256, out=w)
        np.bitwise_or(w, lo, out=w)
        t = _scratch("t", len(y))
        np.right_shift(w, 1, out=t)  # rotr(w, 1) = w >> 1 | w << 15
        np.multiply(w, 1 << 15, out=w)
        np.bitwise_or(w, t, out=y)
    else:
        np.copyto(y, hi)
        np.multiply(y, 256, out=y)
        np.bitwise_or(y, lo, out=y)


def _lane_block(words: np.ndarray[Any, Any], j: int, lanes: int, name: str) -> np.ndarray[Any, Any]:
    """Lane ``j`` (bits 16j..16j+15) of a block of words, as contiguous uint16 values.

    A truncating cast of the shifted words runs ~2x faster than a strided copy of the lane.
    """
    if lanes == 1:
        return words
    out = _scratch(name, len(words))
    if j == 0:
        np.copyto(out, words, casting="unsafe")
    else:
        np.right_shift(words, 16 * j, out=out, casting="unsafe")
    return out
