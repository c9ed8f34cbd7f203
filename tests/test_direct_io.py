"""The local replica's ``direct_io`` option: objects written with ``O_DIRECT``, past the page cache.

Real files on the test machine's disk throughout; the refusals a filesystem can make
(``EINVAL`` at open or at a write, a short write) are injected around the real calls.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _helpers import takes_o_direct

from ckptmirror import Mirror
from ckptmirror.errors import ReplicaError
from ckptmirror.format import TMP_PREFIX
from ckptmirror.replicas import _direct, local
from ckptmirror.replicas.local import LocalReplica

pytestmark = pytest.mark.skipif(not _direct.supported(), reason="O_DIRECT is Linux-only")

KEY = "step-000000000001/rank-00000/o{}.bin"
A = _direct.ALIGN


@pytest.fixture(autouse=True)
def _checked_writes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every write to a descriptor in O_DIRECT mode is checked for what the strictest device
    wants (address, file offset and length multiples of 4 KiB), so that a misaligned write is a
    test failure here rather than an EINVAL that quietly turns the option off, or passes on a
    disk with 512-byte blocks. And the tests that expect O_DIRECT need a filesystem that takes it."""
    if not takes_o_direct(tmp_path):
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        if _direct_flag(fd):
            view = memoryview(data).cast("B")
            addr = np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0
            offset = os.lseek(fd, 0, os.SEEK_CUR)
            assert addr % A == 0 and offset % A == 0 and len(view) % A == 0, (addr % A, offset, len(view))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def _direct_flag(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & _direct.O_DIRECT)


def _aligned(nbytes: int, seed: int = 0) -> np.ndarray:
    """Random bytes in a page-aligned buffer (a fresh anonymous map)."""
    a = np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8)[:nbytes]
    a[:] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return a


def _read(root: Path, key: str) -> bytes:
    return (root / key).read_bytes()


def _fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    best, kind = "", ""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mnt = left.split()[4]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, right.split()[0]
    return kind


def _cached_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all), by ``mincore``."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    try:
        view = np.frombuffer(mm, dtype=np.uint8)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
        assert rc == 0, os.strerror(ctypes.get_errno())
        del view
        return sum(v & 1 for v in vec), pages
    finally:
        mm.close()


# ------------------------------------------------------------------ bytes, every alignment
@pytest.mark.parametrize(
    ("offset", "nbytes"),
    [
        (0, 0),
        (0, 1),
        (0, A),
        (0, A + 1),
        (0, 3 * _direct.CHUNK + 5 * A),  # aligned source: written straight from it, several chunks
        (0, 2 * _direct.CHUNK + 77),  # aligned source, a partial last block
        (3, 2 * _direct.CHUNK + 4 * A),  # unaligned source: through the bounce buffer
        (16, A - 1),
        (512, 2 * _direct.CHUNK + 3 * A),  # aligned for a 512-byte-block disk, not for 4 KiB ones
        (A, 10 * A + 9),
    ],
)
def test_put_writes_every_byte(tmp_path: Path, offset: int, nbytes: int) -> None:
    r = LocalReplica(str(tmp_path), direct_io=True, create=True)
    src = _aligned(offset + nbytes, seed=nbytes)
    r.put(KEY.format(0), memoryview(src[offset:]))
    assert _read(tmp_path, KEY.format(0)) == src[offset:].tobytes()
    assert r.direct_io  # nothing refused it here
    assert r.get(KEY.format(0), max_bytes=nbytes + 1) == src[offset:].tobytes()


@pytest.mark.parametrize("seed", range(6))
def test_streamed_writes_in_odd_pieces(tmp_path: Path, seed: int) -> None:
    """The peer agent streams a body in pieces of any size: held-back partial blocks join the
    next piece, whatever the cuts (fixed ones, then random ones, many shorter than a block)."""
    r = LocalReplica(str(tmp_path), direct_io=True, create=True)
    src = _aligned(3 * _direct.CHUNK + 1234, seed=5)
    if seed == 0:
        cuts = [0, 1, 100, A - 1, A + 7, 3 * A, _direct.CHUNK + 3, 2 * _direct.CHUNK + A, len(src)]
    else:
        rng = np.random.default_rng(seed)
        small = rng.integers(1, 3 * A, 40)  # held-back bytes + piece < a block, and more
        big = rng.integers(1, _direct.CHUNK, 6)
        cuts = sorted({0, len(src), *np.cumsum(small).tolist(), *(int(x) for x in rng.choice(len(src), 6)), *big})
    w = r.open_writer(KEY.format(1))
    for lo, hi in zip(cuts, cuts[1:]):
        w.write(memoryview(src[lo:hi]))
    w.finish()
    assert _read(tmp_path, KEY.format(1)) == src.tobytes()
    assert r.direct_io  # no write was refused: every direct one was aligned (see _checked_writes)


def test_direct_io_leaves_the_page_cache_alone(tmp_path: Path) -> None:
    """What the option is for: a buffered put leaves the file in the page cache, a direct one
    does not (all but the last partial page, which is written the ordinary way)."""
    kind = _fs_type(tmp_path)
    if kind in ("tmpfs", "ramfs", "overlay"):
        pytest.skip(f"{tmp_path} is on {kind}: its files live in memory either way")
    src = _aligned(8 << 20, seed=2)
    view = memoryview(src[5:])  # unaligned: the bounce path
    buffered = LocalReplica(str(tmp_path / "buffered"), create=True)
    direct = LocalReplica(str(tmp_path / "direct"), direct_io=True, create=True)
    buffered.put(KEY.format(0), view)
    direct.put(KEY.format(0), view)
    direct.put(KEY.format(1), memoryview(src))  # aligned: straight from the buffer
    cached, pages = _cached_pages(tmp_path / "buffered" / KEY.format(0))
    assert cached > pages * 0.9, f"the buffered file should be cached: {cached}/{pages}"
    for i in (0, 1):
        cached, pages = _cached_pages(tmp_path / "direct" / KEY.format(i))
        assert cached <= 1, f"direct file {i}: {cached} of {pages} pages in the page cache"
        assert _read(tmp_path / "direct", KEY.format(i)) == (view if i == 0 else src).tobytes()


# ------------------------------------------------------------------ refusals and failures
def test_open_refused_falls_back_once_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A filesystem that refuses O_DIRECT at open (Linux may create the file first): the put
    succeeds through the page cache, one warning names the replica, later puts do not try again."""
    real_open = os.open
    tries: list[str] = []

    def fake_open(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if flags & _direct.O_DIRECT:
            tries.append(str(path))
            fd = real_open(path, flags & ~_direct.O_DIRECT, *a, **k)  # created, as Linux may do
            os.close(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(local.os, "open", fake_open)
    r = LocalReplica(str(tmp_path), direct_io=True, create=True)
    src = _aligned(3 * A + 5)
    with caplog.at_level(logging.WARNING, logger="ckptmirror"):
        r.put(KEY.format(0), memoryview(src))
        r.put(KEY.format(1), memoryview(src))
    monkeypatch.undo()
    assert len(tries) == 1 and not r.direct_io
    warnings = [rec.getMessage() for rec in caplog.records if "O_DIRECT" in rec.getMessage()]
    assert len(warnings) == 1 and str(tmp_path) in warnings[0]
    for i in (0, 1):
        assert _read(tmp_path, KEY.format(i)) == src.tobytes()
    assert sorted(p.name for p in (tmp_path / "step-000000000001" / "rank-00000").iterdir()) == ["o0.bin", "o1.bin"]


def test_write_refused_midway_goes_on_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EINVAL from a direct write (an alignment the device wants larger): that chunk and the rest
    of the file are written through the page cache, bytes intact; the replica stops trying."""
    real_write = os.write
    direct_writes: list[int] = []

    def fake_write(fd: int, data: Any) -> int:
        if _direct_flag(fd):
            direct_writes.append(len(data))
            if len(direct_writes) == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    r = LocalReplica(str(tmp_path), direct_io=True, create=True)
    src = _aligned(3 * _direct.CHUNK + 9, seed=3)
    monkeypatch.setattr(os, "write", fake_write)
    with caplog.at_level(logging.WARNING, logger="ckptmirror"):
        r.put(KEY.format(0), memoryview(src[1:]))
        r.put(KEY.format(1), memoryview(src))
    monkeypatch.undo()
    assert len(direct_writes) == 2  # the first went direct, the second was refused, none after
    assert not r.direct_io
    assert any("O_DIRECT" in rec.getMessage() for rec in caplog.records)
    assert _read(tmp_path, KEY.format(0)) == src[1:].tobytes()
    assert _read(tmp_path, KEY.format(1)) == src.tobytes()


def test_short_aligned_write_goes_on_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct write that stops after whole blocks: the rest follows from where it stopped."""
    real_write = os.write
    shorted: list[int] = []

    def fake_write(fd: int, data: Any) -> int:
        if _direct_flag(fd) and len(data) > A and len(shorted) < 3:
            shorted.append(fd)
            return real_write(fd, memoryview(data)[:A])
        return real_write(fd, data)

    r = LocalReplica(str(tmp_path), direct_io=True, create=True)
    src = _aligned(2 * _direct.CHUNK + 3, seed=6)
    monkeypatch.setattr(os, "write", fake_write)
    r.put(KEY.format(0), memoryview(src[7:]))  # through the bounce buffer
    r.put(KEY.format(1), memoryview(src))  # straight from the buffer
    monkeypatch.undo()
    assert len(shorted) == 3
    assert _read(tmp_path, KEY.format(0)) == src[7:].tobytes()
    assert _read(tmp_path, KEY.format(1)) == src.tobytes()
    assert r.direct_io


def test_short_unaligned_write_goes_on_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct write that stops mid-block leaves the offset unaligned: the rest goes buffered."""
    real_write = os.write
    shorted: list[int] = []

    def fake_write(fd: int, data: Any) -> int:
        if _direct_flag(fd) and not shorted:
            shorted.append(fd)  # one block direct, then 100 bytes more (the kernel's short write)
            n = real_write(fd, memoryview(data)[:A])
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~_direct.O_DIRECT)
            n += real_write(fd, memoryview(data)[A : A + 100])
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            return n
        return real_write(fd, data)

    r = LocalReplica(str(tmp_path), direct_io=True, create=True)
    src = _aligned(2 * _direct.CHUNK + 3, seed=4)
    monkeypatch.setattr(os, "write", fake_write)
    r.put(KEY.format(0), memoryview(src))
    monkeypatch.undo()
    assert shorted
    assert _read(tmp_path, KEY.format(0)) == src.tobytes()
    assert r.direct_io  # a short write is not a refusal


def test_write_error_removes_the_temp_file_and_names_the_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def fake_write(fd: int, data: Any) -> int:
        if _direct_flag(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    r = LocalReplica(str(tmp_path), direct_io=True, create=True)
    monkeypatch.setattr(os, "write", fake_write)
    with pytest.raises(ReplicaError, match="ENOSPC") as info:
        r.put(KEY.format(0), memoryview(_aligned(4 * A)))
    monkeypatch.undo()
    assert str(tmp_path) in str(info.value) and KEY.format(0) in str(info.value)
    assert r.direct_io  # an I/O error is not a refusal: nothing is turned off
    assert list((tmp_path / "step-000000000001" / "rank-00000").iterdir()) == []


def test_tail_write_error_fails_the_put(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last partial block is written buffered at the end: its failure fails the put too."""
    real_write = os.write

    def fake_write(fd: int, data: Any) -> int:
        if not _direct_flag(fd) and len(data) == 77:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    r = LocalReplica(str(tmp_path), direct_io=True, create=True)
    monkeypatch.setattr(os, "write", fake_write)
    with pytest.raises(ReplicaError, match="ENOSPC") as info:
        r.put(KEY.format(0), memoryview(_aligned(4 * A + 77)))
    monkeypatch.undo()
    assert KEY.format(0) in str(info.value)
    assert list((tmp_path / "step-000000000001" / "rank-00000").iterdir()) == []


def test_option_is_checked() -> None:
    with pytest.raises(ValueError, match="direct_io='yes'"):
        LocalReplica("/tmp/ckptmirror-never-created", direct_io="yes")  # type: ignore[arg-type]


# ------------------------------------------------------------------ through a Mirror
def test_mirror_saves_and_restores_with_direct_io(tmp_path: Path) -> None:
    """Saves of a real module + optimizer through ``storage_options``: every step restores
    bit-exact, ``verify`` passes, and the objects did not go through the page cache."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 700), torch.nn.ReLU(), torch.nn.Linear(700, 5))
    model[0].weight.data = model[0].weight.data.to(torch.bfloat16).float()
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "ckpt"
    saved: dict[int, dict[str, torch.Tensor]] = {}
    opts = {"file": {"direct_io": True, "incremental": False}}
    with Mirror([str(root)], storage_options=opts, object_bytes=1 << 20) as m:
        for step in (1, 2):
            model(torch.randn(8, 300)).sum().backward()
            opt.step()
            saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
            m.save(step, model, opt).result(timeout=60)
        assert m.replicas[0].direct_io  # type: ignore[attr-defined]
    if _fs_type(tmp_path) not in ("tmpfs", "ramfs", "overlay"):
        big = max((p for p in root.rglob("o*.bin")), key=lambda p: p.stat().st_size)
        cached, pages = _cached_pages(big)
        assert pages > 10 and cached <= 1, f"{big.name}: {cached}/{pages} pages cached"
    for step in (1, 2):
        fresh = torch.nn.Sequential(torch.nn.Linear(300, 700), torch.nn.ReLU(), torch.nn.Linear(700, 5))
        fresh_opt = torch.optim.AdamW(fresh.parameters())
        with Mirror([str(root)]) as m:
            res = m.restore(fresh, fresh_opt, step=step)
        assert res is not None and res.step == step
        for k, v in saved[step].items():
            assert torch.equal(fresh.state_dict()[k], v), k
    from ckptmirror.ops import verify

    report = verify([str(root)])
    assert report.problems == () and len(report.steps) == 2, report


# ------------------------------------------------------------------ a real agent
def test_agent_with_direct_io(tmp_path: Path, peer_token_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ckptmirror serve --direct-io``: a save streamed to a real agent process lands in its
    files past the page cache, and restores from the peer alone bit-exact."""
    from _agent import TOKEN, agent

    from ckptmirror.replicas.peer import TOKEN_ENV

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    torch.manual_seed(1)
    state = {"w": torch.randn(1500, 1000), "b": torch.randn(77).to(torch.bfloat16)}
    with agent(tmp_path / "root", token_file=peer_token_file, args=["--direct-io"]) as a:
        url = a.url("direct")
        with Mirror([url], object_bytes=1 << 20) as m:
            m.save_state(1, state).result(timeout=60)
        objects = [p for p in (tmp_path / "root" / "direct").rglob("o*.bin") if p.stat().st_size >= 1 << 20]
        assert objects
        if _fs_type(tmp_path) not in ("tmpfs", "ramfs", "overlay"):
            for p in objects:
                cached, pages = _cached_pages(p)
                assert cached <= 1, f"{p.name}: {cached}/{pages} pages cached"
        with Mirror([url]) as m:
            got = m.load_state()
    assert got is not None and got[0] == 1
    for k, v in state.items():
        assert torch.equal(got[1][k], v), k


# ------------------------------------------------------------------ SIGKILL mid-save
_KILL_CHILD = """
import sys, torch, ckptmirror
root, start = sys.argv[1], int(sys.argv[2])
m = ckptmirror.Mirror(
    [root], storage_options={"file": {"direct_io": True, "incremental": False}}, object_bytes=1 << 20, keep_last=3
)
for step in range(start, start + 100000):
    w = torch.arange(3_000_000, dtype=torch.float32) + step
    st = {"w": w, "b": torch.full((4099,), float(step)).to(torch.bfloat16)}
    m.save_state(step, st).result()
    print(step, flush=True)
"""


def _expected(step: int) -> dict[str, torch.Tensor]:
    return {
        "w": torch.arange(3_000_000, dtype=torch.float32) + step,
        "b": torch.full((4099,), float(step)).to(torch.bfloat16),
    }


def test_sigkill_mid_save_loses_nothing_durable(tmp_path: Path) -> None:
    """A writer saving with direct_io in a loop is SIGKILLed at random moments: each time the
    newest committed step is at least the last one reported durable and restores bit-exact,
    and ``verify`` finds no damage (a torn step is garbage, never a step). A process kill, not
    a power cut: the page cache survives it, so this checks the commit protocol with O_DIRECT
    files and temp files left mid-write, not the fsyncs."""
    import random
    import select
    import signal
    import subprocess
    import sys
    import time

    from ckptmirror.ops import verify

    root = tmp_path / "ckpt"
    rng = random.Random(7)
    start, interrupted = 1, 0
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_CHILD, str(root), str(start)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        durable = []
        first = proc.stdout.readline()  # the first step is durable: the run is under way
        assert first.strip(), "the writer printed nothing"
        durable.append(int(first))
        deadline = time.monotonic() + rng.uniform(0.05, 1.0)
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                line = proc.stdout.readline()
                if line.strip():
                    durable.append(int(line))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        durable += [int(x) for x in proc.stdout.read().split()]  # printed before the kill
        # Did this kill land inside a save? Then it left a temp file or a step without a commit.
        steps = [d for d in root.iterdir() if d.name.startswith("step-")]
        interrupted += any(p.name.startswith(TMP_PREFIX) for p in root.rglob("*")) or any(
            not (d / "COMMIT.json").exists() for d in steps
        )
        with Mirror([str(root)]) as m:
            got = m.load_state()
        assert got is not None and got[0] >= durable[-1], (got and got[0], durable[-1])
        for k, v in _expected(got[0]).items():
            assert torch.equal(got[1][k], v), (got[0], k)
        report = verify([str(root)])
        assert report.damage == (), report.damage
        start = got[0] + 1
    assert interrupted >= 2, f"only {interrupted} of 4 kills landed inside a save"


# ------------------------------------------------------------------ straight from the staging buffer
def test_staging_arena_starts_on_a_page() -> None:
    from ckptmirror.save.snapshot import Arena

    a = Arena()
    for n in (1, 4097, 10 << 20, 3 << 20):
        assert a.reserve(n, pinned=False).data_ptr() % mmap.PAGESIZE == 0, n


@pytest.mark.parametrize("first", [1 << 20, (1 << 20) + 3])
def test_saved_objects_skip_the_bounce_buffer_when_aligned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: int
) -> None:
    """Tensors of whole pages (as in most models) put every object at a page multiple of the
    page-aligned staging buffer: O_DIRECT writes them from there, with no bounce copy. A tensor
    of an odd size shifts the objects after it: those go through the bounce buffer."""
    bounced: list[int] = []
    real = _direct._bounce

    def counting() -> np.ndarray:
        bounced.append(1)
        return real()

    monkeypatch.setattr(_direct, "_bounce", counting)
    state = {"a": torch.randn(first), "b": torch.randn(3 << 20), "c": torch.randn(4096 * 5)}
    opts = {"file": {"direct_io": True, "incremental": False}}
    with Mirror([str(tmp_path / "ckpt")], storage_options=opts, object_bytes=4 << 20) as m:
        m.save_state(1, state).result(timeout=60)
        got = m.load_state(1)
    assert got is not None
    for k, v in state.items():
        assert torch.equal(got[1][k], v), k
    if first % 1024 == 0:
        assert bounced == [], f"{len(bounced)} bounce copies for page-aligned objects"
    else:
        assert bounced, "objects after an odd-sized tensor cannot be aligned: expected bounce copies"
