"""Landing verified bytes with preadv (restore/vread.py, issue #10): the plan of calls, short
reads, errors, and the landing of real restores through it, including the object file being
replaced or cut shorter between verifying and landing."""

from __future__ import annotations

import ctypes
import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from test_restore_fast import OBJ, many, raw, same

from ckptmirror import Mirror
from ckptmirror.errors import CorruptObjectError
from ckptmirror.replicas.local import LocalReplica
from ckptmirror.restore import vread
from ckptmirror.restore.undo import Landing

pytestmark = pytest.mark.skipif(not vread.AVAILABLE, reason="preadv through libc is Linux only")


def _layout(rng: random.Random, size: int) -> tuple[list[int], list[int]]:
    """Copies out of a file of ``size`` bytes: runs back to back, some gaps, a few large ones."""
    offs, lens = [], []
    pos = 0
    while pos < size:
        if rng.random() < 0.1:
            pos += rng.randrange(1, 50)  # a gap: the next copy starts a new call
        n = rng.choice([1, 3, 16, 100, 700, 5000]) if rng.random() < 0.95 else rng.randrange(1, 3000) * 10
        n = min(n, size - pos)
        if n <= 0:
            break
        offs.append(pos)
        lens.append(n)
        pos += n
    return offs, lens


@pytest.mark.parametrize("seed", range(6))
def test_plan_and_read_land_every_byte_where_it_belongs(tmp_path: Path, monkeypatch: Any, seed: int) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(vread, "IOV_MAX", rng.choice([1, 7, 64, 1024]))
    size = rng.randrange(50_000, 400_000)
    data = rng.randbytes(size)
    path = tmp_path / "obj"
    path.write_bytes(data)
    offs, lens = _layout(rng, size)
    # Destinations in a shuffled order inside one buffer, with room between them.
    order = list(range(len(lens)))
    rng.shuffle(order)
    out = torch.zeros(sum(lens) + 8 * len(lens), dtype=torch.uint8)
    dst = [0] * len(lens)
    at = 0
    for i in order:
        dst[i] = out.data_ptr() + at
        at += lens[i] + rng.randrange(0, 8)
    chunk = rng.choice([64, 1000, 4096, 1 << 20])
    p = vread.plan(dst, offs, lens, chunk)
    # The plan: calls of at most IOV_MAX copies, each contiguous in the file, about `chunk` bytes.
    rows = p.iov.tolist()
    assert sum(r[1] for r in rows) == sum(lens)
    assert all(0 < r[1] <= chunk for r in rows)
    assert sum(c[1] for c in p.calls) == len(rows)
    end = 0
    for first, count, off, nb in p.calls:
        assert 1 <= count <= vread.IOV_MAX
        assert nb == sum(r[1] for r in rows[first : first + count])
        assert nb <= 2 * chunk
        assert off >= end, "calls in file order, never overlapping"
        end = off + nb
    assert p.calls[0][2] == offs[0] and end == offs[-1] + lens[-1]
    fd = os.open(path, os.O_RDONLY)
    try:
        vread.read(fd, p, range(len(p.calls)))
    finally:
        os.close(fd)
    base = out.data_ptr()
    got = out.numpy().tobytes()
    for d, o, n in zip(dst, offs, lens):
        assert got[d - base : d - base + n] == data[o : o + n]


def test_copies_out_of_file_order_and_one_huge_copy_with_one_copy_a_call(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(vread, "IOV_MAX", 1)
    rng = random.Random(9)
    data = rng.randbytes(100_000)
    path = tmp_path / "obj"
    path.write_bytes(data)
    # One huge copy (cut into 37 pieces of 2,711 bytes and a rest), then small ones listed backwards.
    offs = [0] + [90_000 + 1000 * k for k in reversed(range(10))]
    lens = [90_000] + [1000] * 10
    out = torch.zeros(sum(lens), dtype=torch.uint8)
    dst = [out.data_ptr()] + [out.data_ptr() + 90_000 + 1000 * k for k in range(10)]
    p = vread.plan(dst, offs, lens, 2711)
    assert len(p.calls) == len(p.iov) == 34 + 10  # 90,000 / 2,711 = 33.2: 34 pieces
    fd = os.open(path, os.O_RDONLY)
    try:
        vread.read(fd, p, range(len(p.calls)))
    finally:
        os.close(fd)
    got = out.numpy().tobytes()
    assert got[:90_000] == data[:90_000]
    assert got[90_000:] == b"".join(data[o : o + 1000] for o in offs[1:])


def test_zero_length_copies_are_dropped_and_an_empty_plan_reads_nothing(tmp_path: Path) -> None:
    p = vread.plan([1, 2], [0, 0], [0, 0], 100)
    assert p.calls == [] and p.iov.shape == (0, 2)
    path = tmp_path / "obj"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    try:
        vread.read(fd, p, [])
    finally:
        os.close(fd)


def _file_and_plan(tmp_path: Path, n: int = 40, each: int = 300) -> tuple[Path, bytes, torch.Tensor, vread.Plan]:
    data = random.Random(1).randbytes(n * each)
    path = tmp_path / "obj"
    path.write_bytes(data)
    out = torch.zeros(n * each, dtype=torch.uint8)
    dst = [out.data_ptr() + (n - 1 - i) * each for i in range(n)]  # reversed: each copy its own place
    return path, data, out, vread.plan(dst, [i * each for i in range(n)], [each] * n, 1 << 20)


def _expected(data: bytes, n: int = 40, each: int = 300) -> bytes:
    return b"".join(data[i * each : (i + 1) * each] for i in reversed(range(n)))


def _read_all(path: Path, p: vread.Plan) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        vread.read(fd, p, range(len(p.calls)))
    finally:
        os.close(fd)


def test_a_short_read_continues_where_it_stopped(tmp_path: Path, monkeypatch: Any) -> None:
    path, data, out, p = _file_and_plan(tmp_path)
    real_preadv, real_pread = vread._FNS  # type: ignore[misc]
    calls = []

    def short_preadv(fd: int, iov: int, count: int, off: int) -> int:
        # The kernel may stop early: return after 2.5 copies' worth of bytes.
        calls.append(count)
        got = real_preadv(fd, iov, min(count, 2), off)
        extra = real_pread(fd, ctypes.c_uint64.from_address(iov + 32).value, 150, off + got)
        return got + extra

    monkeypatch.setattr(vread, "_FNS", (short_preadv, real_pread))
    _read_all(path, p)
    assert calls == [40]
    assert out.numpy().tobytes() == _expected(data)


def test_eintr_is_retried(tmp_path: Path, monkeypatch: Any) -> None:
    path, data, out, p = _file_and_plan(tmp_path)
    real_preadv, real_pread = vread._FNS  # type: ignore[misc]
    tries = []

    def interrupted(fd: int, iov: int, count: int, off: int) -> int:
        tries.append(off)
        if len(tries) == 1:
            ctypes.set_errno(errno.EINTR)
            return -1
        return real_preadv(fd, iov, count, off)

    monkeypatch.setattr(vread, "_FNS", (interrupted, real_pread))
    _read_all(path, p)
    assert len(tries) == 2
    assert out.numpy().tobytes() == _expected(data)


def test_a_file_shorter_than_planned_raises(tmp_path: Path) -> None:
    path, _, _, p = _file_and_plan(tmp_path)
    os.truncate(path, 40 * 300 - 1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="ended at offset"):
            vread.read(fd, p, range(len(p.calls)))
    finally:
        os.close(fd)


def test_a_bad_descriptor_raises_with_its_errno(tmp_path: Path) -> None:
    _, _, _, p = _file_and_plan(tmp_path)
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: preadv fails with EISDIR
    try:
        with pytest.raises(OSError) as err:
            vread.read(fd, p, [0])
    finally:
        os.close(fd)
    assert err.value.errno == errno.EISDIR


# ---- the landing, on real mapped objects -----------------------------------------------------


def _mapped(tmp_path: Path, data: bytes) -> tuple[LocalReplica, Any]:
    rep = LocalReplica(str(tmp_path / "rep"), create=True)
    rep.put("step-000000000001/rank-00000/o0.bin", data)
    mo = rep.map_object("step-000000000001/rank-00000/o0.bin", len(data))
    assert mo is not None
    return rep, mo


def _open_files() -> list[str]:
    """The files this process holds open (descriptors, mmap's own duplicate included)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the listing's own descriptor, closed already
    return out


def _land(mos: Any, n: int, each: int, monkeypatch: Any) -> tuple[torch.Tensor, list[int]]:
    """Land ``n`` copies of ``each`` bytes out of each mapping in ``mos``, one after the other."""
    mos = mos if isinstance(mos, list) else [mos]
    out = torch.zeros(len(mos) * n * each, dtype=torch.uint8)
    reads: list[int] = []
    real = vread.read
    monkeypatch.setattr(vread, "read", lambda fd, p, calls: (reads.append(len(calls)), real(fd, p, calls))[1])
    landing = Landing()
    for k, mo in enumerate(mos):
        base = out.data_ptr() + k * n * each
        landing.add_columns(mo, [base + i * each for i in range(n)], [mo.addr + i * each for i in range(n)], [each] * n)
    try:
        landing.land(threads=2)
    finally:
        # Landed or failed, the mappings are closed and no descriptor on an object file is left.
        assert not [f for f in _open_files() if "/rep/step-" in f], "a descriptor was left open"
    return out, reads


def test_landing_reads_the_mapped_objects_file_with_preadv(tmp_path: Path, monkeypatch: Any) -> None:
    data = random.Random(2).randbytes(3000 * 100)
    _, mo = _mapped(tmp_path, data)
    out, reads = _land(mo, 3000, 100, monkeypatch)
    assert out.numpy().tobytes() == data
    assert sum(reads) >= 3, "3000 copies take at least 3 preadv calls of 1024"


def test_a_replaced_object_file_lands_the_verified_bytes_from_the_mapping(tmp_path: Path, monkeypatch: Any) -> None:
    data = random.Random(3).randbytes(500 * 64)
    rep, mo = _mapped(tmp_path, data)
    # Another file under the object's name now (another inode): its bytes were never verified.
    path = Path(mo.path)
    other = path.with_name("other")
    other.write_bytes(bytes(len(data)))
    os.replace(other, path)
    out, reads = _land(mo, 500, 64, monkeypatch)
    assert reads == [], "the replaced file must not be read"
    assert out.numpy().tobytes() == data


@pytest.mark.parametrize("cut", [100, 500 * 64 - 10], ids=["early", "near-the-end"])
def test_an_object_file_cut_short_after_verifying_fails_loudly_naming_it(
    tmp_path: Path, monkeypatch: Any, cut: int
) -> None:
    monkeypatch.setattr(vread, "IOV_MAX", 7)  # many calls, on both threads: the failing one may be either
    data = random.Random(4).randbytes(500 * 64)
    rep, mo = _mapped(tmp_path, data)
    os.truncate(mo.path, cut)  # never happens to a committed object; copying from the mapping would SIGBUS
    with pytest.raises(CorruptObjectError) as err:
        _land(mo, 500, 64, monkeypatch)
    msg = str(err.value)
    assert "o0.bin" in msg and rep.url in msg and "restore again" in msg


def test_one_replaced_and_one_intact_object_each_land_their_verified_bytes(tmp_path: Path, monkeypatch: Any) -> None:
    rep = LocalReplica(str(tmp_path / "rep"), create=True)
    datas, mos = [], []
    for k in range(3):
        data = random.Random(10 + k).randbytes(700 * 48)
        key = f"step-000000000001/rank-00000/o{k}.bin"
        rep.put(key, data)
        mo = rep.map_object(key, len(data))
        assert mo is not None
        datas.append(data)
        mos.append(mo)
    other = tmp_path / "other"
    other.write_bytes(bytes(len(datas[1])))
    os.replace(other, mos[1].path)  # the middle one: copied out of its mapping, the others read
    out, reads = _land(mos, 700, 48, monkeypatch)
    assert out.numpy().tobytes() == b"".join(datas)
    assert sum(reads) == 2 * 1, "one call per intact file (700 copies of 48 bytes: one call each)"


@pytest.mark.parametrize("available", [True, False], ids=["preadv", "memmove"])
def test_restores_of_many_small_tensors_land_bit_exact_either_way(
    tmp_path: Path, monkeypatch: Any, available: bool
) -> None:
    monkeypatch.setattr(vread, "AVAILABLE", available)
    reads: list[int] = []
    real = vread.read
    monkeypatch.setattr(vread, "read", lambda fd, p, calls: (reads.append(len(calls)), real(fd, p, calls))[1])
    src = many(3000, 0)
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        m.save(1, src).result(timeout=60)
    dst = many(3000, 1)
    ptrs = [t.data_ptr() for t in dst.state_dict().values()]
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        res = m.restore(dst)
    assert res is not None and res.step == 1
    assert same(raw(dst.state_dict()), raw(src.state_dict()))
    assert [t.data_ptr() for t in dst.state_dict().values()] == ptrs
    assert (sum(reads) > 0) == available


def test_restore_reports_an_object_cut_short_between_verifying_and_landing(tmp_path: Path, monkeypatch: Any) -> None:
    """The whole path: Mirror.restore raises (no fallback to an older step, no silent success),
    the error names the object, and the process survives (a copy out of the mapping would SIGBUS)."""
    src = many(1500, 0)
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        m.save(1, src).result(timeout=60)
        with torch.no_grad():
            for t in src.parameters():
                t.add_(1)  # step 2 has objects of its own; step 1 stays intact (a fallback would succeed)
        m.save(2, src).result(timeout=60)
    real_land = Landing.land
    cut: list[str] = []

    def land_after_cutting(self: Landing, threads: int = 2, pool: Any = None) -> None:
        for source, *_ in self._spans:
            if not cut:
                cut.append(source.key)  # type: ignore[attr-defined]
                os.truncate(source.path, 10)  # type: ignore[attr-defined]
        real_land(self, threads, pool)

    monkeypatch.setattr(Landing, "land", land_after_cutting)
    dst = many(1500, 1)
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m, pytest.raises(CorruptObjectError) as err:
        m.restore(dst)
    assert cut and cut[0] in str(err.value) and "step-000000000002" in cut[0]
    assert "part of the restored step" in str(err.value)
