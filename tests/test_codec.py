"""ckptmirror.codec: bit-exact round trips, the container format, hints, and hostile blobs."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptmirror import codec
from ckptmirror.errors import CorruptObjectError

RNG = np.random.default_rng(20241201)
CHUNK = codec.CHUNK_ELEMS
HEADER = codec.HEADER_SIZE
GUARD = 64

# Bit patterns that must survive exactly: NaNs with payloads (quiet, signalling, negative),
# infinities, -0.0, the smallest and largest denormals, the largest finite value.
SPECIAL_BITS = {
    "float32": [0x7FC00000, 0x7FC00001, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF, 0x7F800000, 0xFF800000,
                0x80000000, 0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0x3F800000],
    "bfloat16": [0x7FC0, 0x7FC1, 0x7F81, 0xFFFF, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x807F, 0x7F7F, 0x3F80],
    "float16": [0x7E00, 0x7E01, 0x7C01, 0xFFFF, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x83FF, 0x7BFF, 0x3C00],
    "float64": [0x7FF8000000000000, 0x7FF8000000000001, 0x7FF0000000000001, 0xFFFFFFFFFFFFFFFF,
                0x7FF0000000000000, 0xFFF0000000000000, 0x8000000000000000, 0x0000000000000001,
                0x800FFFFFFFFFFFFF, 0x7FEFFFFFFFFFFFFF],
}  # fmt: skip
ITEMSIZE = {
    "float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int8": 1, "uint8": 1, "bool": 1, "int16": 2, "int32": 4, "int64": 8, "complex64": 8,
    "complex128": 16, "complex32": 4, "uint16": 2, "uint32": 4, "uint64": 8,
}  # fmt: skip


def roundtrip(data: bytes | memoryview, segments: list[tuple[int, int, str]], **kw: object) -> bytes:
    """Encode, decode into a guarded buffer, check the guards and the bytes; return the blob."""
    blob = codec.encode(data, segments, **kw)  # type: ignore[arg-type]
    assert codec.decoded_size(blob) == len(data)
    n = len(data)
    buf = bytearray(b"\xa5" * (GUARD + n + GUARD))
    codec.decode(blob, memoryview(buf)[GUARD : GUARD + n])
    assert buf[:GUARD] == b"\xa5" * GUARD and buf[GUARD + n :] == b"\xa5" * GUARD, "decode wrote outside out"
    assert bytes(buf[GUARD : GUARD + n]) == bytes(data)
    return blob


def tables(blob: bytes) -> tuple[int, int, list[tuple[int, int]], list[tuple[int, int]], int]:
    """Parse the documented container: (raw_size, chunk, segments, frames, payload offset)."""
    raw_size, chunk, n_seg, n_frames = struct.unpack_from("<QIII", blob, 16)
    pos = HEADER
    segments = [struct.unpack_from("<QB", blob, pos + 9 * i) for i in range(n_seg)]
    pos += 9 * n_seg
    frames = [struct.unpack_from("<BI", blob, pos + 5 * i) for i in range(n_frames)]
    return raw_size, chunk, segments, frames, pos + 5 * n_frames


def reseal(blob: bytearray) -> bytes:
    """Recompute the checksum, so that a forged change reaches the structural checks."""
    blob[8:16] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(blob[16:])))
    return bytes(blob)


def assert_corrupt(blob: bytes | bytearray, n: int, **kw: object) -> None:
    buf = bytearray(b"\x5a" * (GUARD + n + GUARD))
    with pytest.raises(CorruptObjectError):
        codec.decode(blob, memoryview(buf)[GUARD : GUARD + n], **kw)  # type: ignore[arg-type]
    assert buf[:GUARD] == b"\x5a" * GUARD and buf[GUARD + n :] == b"\x5a" * GUARD


def weights(n: int, dtype: torch.dtype, scale: float = 0.02) -> bytes:
    """Gaussian 'trained weights' of a dtype, as bytes (compressible exponents)."""
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, generator=g).mul_(scale).to(dtype).view(torch.uint8).numpy().tobytes()


def random_bits(nbytes: int) -> bytes:
    return RNG.integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def with_specials(dtype: str, n: int) -> bytes:
    """Random bit patterns (every class of value, NaN payloads included) with the specials spliced in."""
    data = bytearray(random_bits(n * ITEMSIZE[dtype]))
    k = ITEMSIZE[dtype]
    for i, bits in enumerate(SPECIAL_BITS.get(dtype, [])):
        data[i * 7 * k : i * 7 * k + k] = bits.to_bytes(k, "little")
    return bytes(data)


# ------------------------------------------------------------------------------- registry
def test_registry() -> None:
    assert codec.ZSTD == "zstd" and codec.NONE == "none"
    assert codec.CODECS == {"none", "zstd"}
    assert codec.is_codec("zstd") and codec.is_codec("none")
    assert not codec.is_codec("gzip") and not codec.is_codec(None) and not codec.is_codec(b"zstd")


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", sorted(ITEMSIZE))
@pytest.mark.parametrize("n", [1, 3, 1000, CHUNK + 1001])
def test_roundtrip_random_bits(dtype: str, n: int) -> None:
    """Random bits viewed as the dtype: NaN payloads, infinities, -0.0, denormals, all of it."""
    if n > CHUNK and ITEMSIZE[dtype] > 4:
        n = CHUNK // 2 + 17  # 8/16-byte types: a big chunk is enough
    roundtrip(with_specials(dtype, n), [(0, n * ITEMSIZE[dtype], dtype)])


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_roundtrip_weights(dtype: torch.dtype) -> None:
    """Realistic values, where the exponent planes are compressed: still bit-exact, and smaller."""
    n = 2 * CHUNK + 12345
    data = bytearray(weights(n, dtype))
    k = dtype.itemsize
    name = str(dtype).removeprefix("torch.")
    for i, bits in enumerate(SPECIAL_BITS.get(name, [])):  # a few specials among the weights
        data[i * 1001 * k : i * 1001 * k + k] = bits.to_bytes(k, "little")
    blob = roundtrip(bytes(data), [(0, len(data), name)])
    assert len(blob) < 0.9 * len(data)


def test_float_layout_beats_plain_zstd() -> None:
    """The byte planes are what compresses: a broken split would fall back to ~plain zstd."""
    for dtype, name, target in [(torch.bfloat16, "bfloat16", 1.4), (torch.float32, "float32", 1.18)]:
        data = weights(1 << 19, dtype)
        ratio = len(data) / len(codec.encode(data, [(0, len(data), name)]))
        plain = len(data) / len(zstandard.ZstdCompressor(level=1).compress(data))
        assert ratio > target and ratio > plain + 0.1, (name, ratio, plain)


def test_torch_prefix_and_unknown_names() -> None:
    data = weights(50_000, torch.bfloat16)
    a = codec.encode(data, [(0, len(data), "bfloat16")])
    assert codec.encode(data, [(0, len(data), "torch.bfloat16")]) == a
    roundtrip(data, [(0, len(data), "no_such_dtype")])  # unknown: stored as bytes, still exact


def test_empty() -> None:
    blob = roundtrip(b"", [])
    assert codec.decoded_size(blob) == 0
    assert len(blob) == HEADER
    roundtrip(b"", [(0, 0, "float32")])


def test_mixed_segments_gaps_and_odd_sizes() -> None:
    parts: list[tuple[bytes, str | None]] = [
        (weights(70_001, torch.float32), "float32"),
        (random_bits(3), None),  # a gap no segment covers
        (weights(40_003, torch.bfloat16), "bfloat16"),
        (np.arange(9_999, dtype=np.int64).tobytes(), "int64"),
        (random_bits(7), "float32"),  # not whole elements: stored as bytes
        (weights(5, torch.float16), "float16"),  # tiny, absorbed by a neighbour
        (RNG.integers(0, 2, 10_001, dtype=np.uint8).tobytes(), "bool"),
        (with_specials("float64", 3_001), "float64"),  # at an odd offset: unaligned views
        (np.arange(-500, 500, dtype=np.int16).tobytes(), "int16"),
        (weights(300_000, torch.float8_e4m3fn), "float8_e4m3fn"),
        (random_bits(11), None),
    ]
    data = b"".join(p for p, _ in parts)
    segments = []
    off = 0
    for p, name in parts:
        if name is not None:
            segments.append((off, len(p), name))
        off += len(p)
    blob = roundtrip(data, list(reversed(segments)))  # order does not matter
    assert len(blob) < len(data)
    # Any memoryview works, also a non-byte one and a slice of a larger buffer.
    roundtrip(memoryview(b"xx" + data)[2:], segments)
    arr = np.frombuffer(data[: len(data) // 4 * 4], np.float32)
    assert codec.encode(arr.data, [(0, arr.nbytes, "float32")]) == codec.encode(
        data[: arr.nbytes], [(0, arr.nbytes, "float32")]
    )


def test_many_small_tensors_become_few_segments() -> None:
    """10k tiny tensors of alternating dtypes: merged, so the per-object Python work stays small."""
    pieces = []
    segments = []
    off = 0
    for i in range(10_000):
        name, p = (
            ("float32", weights(37, torch.float32)) if i % 2 else ("int64", np.arange(3, dtype=np.int64).tobytes())
        )
        segments.append((off, len(p), name))
        pieces.append(p)
        off += len(p)
    data = b"".join(pieces)
    t0 = time.perf_counter()
    blob = roundtrip(data, segments)
    elapsed = time.perf_counter() - t0
    _, _, segs, frames, _ = tables(blob)
    assert len(segs) <= 4 and len(frames) <= 64, (len(segs), len(frames))
    assert elapsed < 5  # generous: ~0.05 s idle; the Python loop over 10k segments is the cost


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(0, 5000),
    cuts=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 600), st.sampled_from(sorted(ITEMSIZE))), max_size=8),
    seed=st.integers(0, 2**32 - 1),
    zeros=st.booleans(),
)
def test_roundtrip_property(size: int, cuts: list[tuple[int, int, str]], seed: int, zeros: bool) -> None:
    """Arbitrary non-overlapping segments of arbitrary dtypes over arbitrary bytes."""
    rng = np.random.default_rng(seed)
    data = (np.zeros if zeros else lambda n, dtype: rng.integers(0, 256, n, dtype=dtype))(size, np.uint8).tobytes()
    segments = []
    pos = 0
    for start, n, name in sorted(cuts):
        start = max(start, pos)
        n = min(n, size - start)
        if n <= 0:
            continue
        segments.append((start, n, name))
        pos = start + n
    roundtrip(data, segments)


def test_level_and_segment_errors() -> None:
    data = bytes(100)
    for bad in ([(0, 101, "uint8")], [(0, 50, "uint8"), (40, 20, "uint8")], [(-1, 10, "uint8")]):
        with pytest.raises(ValueError):
            codec.encode(data, bad)
    with pytest.raises(ValueError):
        codec.encode(data, [], level=99)
    roundtrip(data, [], level=19)
    roundtrip(data, [], level=-5)
    with pytest.raises(ValueError):
        codec.decode(codec.encode(data, []), bytes(100))  # read-only out


def test_encode_into_matches_encode() -> None:
    data = weights(CHUNK + 777, torch.float32) + random_bits(1001)
    segments = [(0, (CHUNK + 777) * 4, "float32")]
    bound = codec.max_encoded_size(len(data), len(segments))
    out = bytearray(bound + 10)
    n = codec.encode_into(data, segments, out)
    assert bytes(out[:n]) == codec.encode(data, segments)
    with pytest.raises(ValueError):
        codec.encode_into(data, segments, bytearray(len(data) // 2))
    incompressible = random_bits(3 * CHUNK + 5)
    many = [(i * 1000, 999, "float32") for i in range(300)]
    assert len(codec.encode(incompressible, many)) <= codec.max_encoded_size(len(incompressible), len(many))


# ------------------------------------------------------------------------------- raw planes
def test_incompressible_is_stored_raw() -> None:
    n = 3 * CHUNK + 5
    data = random_bits(n * 4)
    stats: dict[str, int] = {}
    blob = roundtrip(data, [(0, len(data), "float32")], stats=stats)
    raw_size, chunk, segs, frames, payload = tables(blob)
    assert raw_size == len(data) and chunk == CHUNK and segs == [(len(data), 5)]
    methods = [method for method, _ in frames]
    assert methods.count(codec.METHOD_ZSTD) == 0 and methods.count(codec.METHOD_LANE) == 3 * 2
    assert stats["raw_frames"] == len(frames) - 3 * 2 and stats["samples"] > 0
    assert len(blob) - len(data) == payload and payload < 200  # raw + a small header
    # Exponents compress, the rest is kept raw: frames of both kinds.
    w = weights(n, torch.float32)
    kinds = {m for m, _ in tables(codec.encode(w, [(0, len(w), "float32")]))[3]}
    assert codec.METHOD_ZSTD in kinds and (codec.METHOD_RAW in kinds or codec.METHOD_LANE in kinds)


def test_hints_skip_sampling() -> None:
    n = 3 * CHUNK  # elements of each segment: random int16, then bf16 weights
    data = random_bits(2 * n) + weights(n, torch.bfloat16)
    segments = [(0, 2 * n, "int16"), (2 * n, 2 * n, "bfloat16")]
    hints = codec.CompressionHints(recheck_every=3)
    first: dict[str, int] = {}
    roundtrip(data, segments, hints=hints, slot=7, stats=first)
    assert first["samples"] > 0 and hints.sampled > 0 and hints.skipped == 0
    assert len(hints) == 3  # the random segment's two planes, the weights' mantissa plane
    second: dict[str, int] = {}
    blob2 = roundtrip(data, segments, hints=hints, slot=7, stats=second)
    # Only the exponent plane (compressible, so never hinted) is sampled, at its first chunk.
    assert first["samples"] >= 8 and second["samples"] == 1 and hints.skipped == 3
    assert blob2 == codec.encode(data, segments)  # hints change the work, not the result here
    # Another slot has no hints; every recheck_every-th save samples again.
    other: dict[str, int] = {}
    codec.encode(data, segments, hints=hints, slot=8, stats=other)
    assert other["samples"] == first["samples"]
    third: dict[str, int] = {}
    codec.encode(data, segments, hints=hints, slot=7, stats=third)
    assert third["samples"] < first["samples"]
    fourth: dict[str, int] = {}
    codec.encode(data, segments, hints=hints, slot=7, stats=fourth)
    assert fourth["samples"] == first["samples"]  # the recheck


def test_hints_notice_changed_data() -> None:
    """A plane hinted incompressible that becomes compressible is compressed again at the recheck."""
    n = 3 * CHUNK
    hints = codec.CompressionHints(recheck_every=2)
    noisy = random_bits(n * 2)
    codec.encode(noisy, [(0, len(noisy), "int16")], hints=hints, slot=0)
    zeros = bytes(n * 2)
    blob = codec.encode(zeros, [(0, len(zeros), "int16")], hints=hints, slot=0)
    assert len(blob) > len(zeros)  # hinted raw: not even sampled
    blob = codec.encode(zeros, [(0, len(zeros), "int16")], hints=hints, slot=0)
    assert len(blob) < len(zeros) // 100  # rechecked


def test_hints_bounded_and_thread_safe() -> None:
    hints = codec.CompressionHints(max_entries=10)
    for i in range(100):
        hints.record(("k", i), False)
    assert len(hints) == 10
    with pytest.raises(ValueError):
        codec.CompressionHints(recheck_every=0)


def test_threads() -> None:
    objs = [weights(CHUNK + i * 1000, torch.bfloat16) + random_bits(5000 + i) for i in range(6)]
    hints = codec.CompressionHints()
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                data = objs[i]
                roundtrip(data, [(0, len(data) - 5000 - i, "bfloat16")], hints=hints, slot=i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(objs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# --------------------------------------------------------------------------- hostile blobs
def sample_blob() -> tuple[bytes, int]:
    """A small blob with raw, zstd and lane frames in several segments."""
    data = (
        weights(3 * CHUNK // 2, torch.bfloat16)
        + random_bits(4 * 1000)
        + np.arange(5000, dtype=np.int32).tobytes()
        + random_bits(333)
    )
    n1 = 3 * CHUNK // 2 * 2
    segments = [(0, n1, "bfloat16"), (n1, 4000, "float32"), (n1 + 4000, 20000, "int32")]
    blob = codec.encode(data, segments)
    methods = {m for m, _ in tables(blob)[3]}
    assert {codec.METHOD_RAW, codec.METHOD_ZSTD} <= methods
    return blob, len(data)


def test_every_header_and_table_byte_flip_is_caught() -> None:
    blob, n = sample_blob()
    payload = tables(blob)[4]
    for i in range(payload):
        for mask in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= mask
            assert_corrupt(bad, n)


def test_payload_flips_are_caught() -> None:
    blob, n = sample_blob()
    payload = tables(blob)[4]
    for i in np.linspace(payload, len(blob) - 1, 200).astype(int):
        bad = bytearray(blob)
        bad[i] ^= 0x10
        assert_corrupt(bad, n)


def test_truncated_and_extended() -> None:
    blob, n = sample_blob()
    payload = tables(blob)[4]
    for cut in (0, 1, 4, 15, HEADER - 1, HEADER, HEADER + 5, payload - 1, payload, payload + 100, len(blob) - 1):
        assert_corrupt(blob[:cut], n)
    assert_corrupt(blob + b"\0", n)
    assert_corrupt(blob + blob, n)
    with pytest.raises(CorruptObjectError):
        codec.decoded_size(blob[:10])


def test_wrong_magic_version_flags() -> None:
    blob, n = sample_blob()
    for pos, value in ((0, ord("X")), (4, 2), (5, 1), (6, 1)):
        bad = bytearray(blob)
        bad[pos] = value
        with pytest.raises(CorruptObjectError, match="magic|version|flags"):
            codec.decode(reseal(bad), bytearray(n))
    with pytest.raises(CorruptObjectError, match="magic"):
        codec.decoded_size(b"PK\x03\x04" + bytes(40))


def test_raw_size_must_match_out() -> None:
    blob, n = sample_blob()
    for size in (n - 1, n + 1, 0):
        assert_corrupt(blob, size)
    bad = bytearray(blob)
    bad[16:24] = struct.pack("<Q", 1 << 60)  # a lying raw size: refused before any allocation
    assert_corrupt(reseal(bad), n)


Edit = Callable[[list[Any]], None]


def forge(blob: bytes, edit: Edit) -> bytes:
    """Apply ``edit([raw_size, chunk, segments, frames, payload])`` and rebuild a sealed blob."""
    raw_size, chunk, segs, frames, payload = tables(blob)
    parts: list[Any] = [raw_size, chunk, list(segs), list(frames), bytearray(blob[payload:])]
    edit(parts)
    raw_size, chunk, segs, frames, body = parts
    out = bytearray(blob[:16])
    out += struct.pack("<QIII", raw_size, chunk, len(segs), len(frames))
    for s in segs:
        out += struct.pack("<QB", *s)
    for f in frames:
        out += struct.pack("<BI", *f)
    out += body
    return reseal(out)


def test_forged_blobs_with_valid_checksums() -> None:
    """Structural lies behind a valid checksum: each one raises, never writes outside out."""
    blob, n = sample_blob()
    _, _, segs, frames, _ = tables(blob)
    assert forge(blob, lambda p: None) == blob  # the forger itself is faithful
    zi = next(i for i, (m, _) in enumerate(frames) if m == codec.METHOD_ZSTD)
    ri = next(i for i, (m, _) in enumerate(frames) if m == codec.METHOD_RAW)
    zstart = sum(length for _, length in frames[:zi])

    def set_seg(i: int, value: tuple[int, int]) -> Edit:
        return lambda p: p[2].__setitem__(i, value)

    def set_frame(i: int, value: tuple[int, int]) -> Edit:
        return lambda p: p[3].__setitem__(i, value)

    def swap_zstd_frame(data: bytes) -> Edit:
        def edit(p: list[Any]) -> None:
            body, length = p[4], p[3][zi][1]
            p[4] = body[:zstart] + data + body[zstart + length :]
            p[3][zi] = (codec.METHOD_ZSTD, len(data))

        return edit

    m = frames[zi][1]
    edits: dict[str, Edit] = {
        "chunk 0": lambda p: p.__setitem__(1, 0),
        "huge chunk": lambda p: p.__setitem__(1, 1 << 30),
        "other chunk": lambda p: p.__setitem__(1, CHUNK // 2),
        "raw size off": lambda p: p.__setitem__(0, n + 2),
        "segment sizes": set_seg(0, (segs[0][0] - 2, segs[0][1])),
        "segment not whole elements": set_seg(1, (segs[1][0] + 1, segs[1][1])),
        "segment empty": lambda p: p[2].insert(1, (0, 0)),
        "unknown layout": set_seg(0, (segs[0][0], 99)),
        "other layout": set_seg(0, (segs[0][0], 5)),
        "missing frame": lambda p: p[3].pop(),
        "extra frame": lambda p: p[3].append((codec.METHOD_RAW, 0)),
        "unknown method": set_frame(ri, (9, frames[ri][1])),
        "raw frame length": set_frame(ri, (codec.METHOD_RAW, frames[ri][1] - 1)),
        "zstd frame read as raw": set_frame(zi, (codec.METHOD_RAW, frames[zi][1])),
        "raw frame read as zstd": set_frame(ri, (codec.METHOD_ZSTD, frames[ri][1])),
        "lane without its pair": set_frame(ri, (codec.METHOD_LANE, frames[ri][1])),
        "stray in-lane": set_frame(ri, (codec.METHOD_IN_LANE, frames[ri][1])),
        "lengths do not add up": set_frame(zi, (codec.METHOD_ZSTD, frames[zi][1] + 1)),
        "zstd decodes short": swap_zstd_frame(zstandard.ZstdCompressor().compress(bytes(10))),
        "zstd decodes long": swap_zstd_frame(zstandard.ZstdCompressor().compress(bytes(CHUNK * 4))),
        "zstd without size": swap_zstd_frame(zstandard.ZstdCompressor(write_content_size=False).compress(bytes(m))),
        "zstd claims 1 TiB": swap_zstd_frame(b"\x28\xb5\x2f\xfd\xe0" + struct.pack("<Q", 1 << 40) + bytes(20)),
        "zstd garbage": swap_zstd_frame(b"\x28\xb5\x2f\xfd" + random_bits(100)),
        "zstd trailing data": lambda p: None,  # replaced below
        "huge frame count": lambda p: p[3].extend([(0, 0)] * 3),
    }
    trailing = zstandard.ZstdCompressor().compress(bytes(CHUNK)) + b"\0\0\0"
    edits["zstd trailing data"] = swap_zstd_frame(trailing)
    for name, edit in edits.items():
        forged = forge(blob, edit)
        assert forged != blob, name
        assert_corrupt(forged, n)
        assert_corrupt(forged, n, verify=False)
    # A lying frame count that would not fit in the blob.
    bad = bytearray(blob)
    bad[32:36] = struct.pack("<I", 0xFFFFFFFF)
    assert_corrupt(reseal(bad), n)


def test_unverified_damage_stays_inside_out() -> None:
    """verify=False: payload damage may decode to wrong bytes, but only inside out."""
    blob, n = sample_blob()
    payload = tables(blob)[4]
    for i in np.linspace(payload, len(blob) - 1, 60).astype(int):
        bad = bytearray(blob)
        bad[i] ^= 0xFF
        buf = bytearray(b"\x5a" * (GUARD + n + GUARD))
        try:
            codec.decode(bad, memoryview(buf)[GUARD : GUARD + n], verify=False)
        except CorruptObjectError:
            pass
        assert buf[:GUARD] == b"\x5a" * GUARD and buf[GUARD + n :] == b"\x5a" * GUARD
