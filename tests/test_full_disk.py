"""A replica on a disk that fills up: on a real (small, tmpfs) filesystem.

What a full disk must not do: bring the replica back every health interval only for the next
save to fail at the same point (a flapping health log, and a save's worth of I/O wasted each
time), or keep the failed save's objects, which hold the space a later save needs.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from _helpers import fill_disk, small_tmpfs

from ckptmirror import Mirror
from ckptmirror.errors import ReplicaError
from ckptmirror.format import writer_of
from ckptmirror.health import ReplicaHealth
from ckptmirror.replicas import LocalReplica
from ckptmirror.replicas.faulty import FaultyReplica

MIB = 1 << 20


@pytest.fixture
def small_disk(tmp_path: os.PathLike[str]) -> Iterator[str]:
    """A 12 MiB tmpfs, mounted for this test (skipped where this process may not mount)."""
    with small_tmpfs(os.path.join(os.fspath(tmp_path), "small"), 12) as mnt:
        yield mnt


def _state(mib: int, step: int) -> dict[str, torch.Tensor]:
    """``mib`` MiB in 1 MiB tensors, new values each step (nothing an incremental save could reuse)."""
    return {f"w{i}": torch.full((MIB // 4,), float(100 * step + i)) for i in range(mib)}


def _wait_for(cond: object, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_a_full_disk_stays_degraded_gives_back_the_failed_save_and_returns_once_freed(
    small_disk: str, tmp_path: os.PathLike[str]
) -> None:
    other = os.path.join(os.fspath(tmp_path), "other")
    small = LocalReplica(small_disk)
    with Mirror([small, other], keep_last=None, min_replicas=1, health_interval_s=0.1, object_bytes=MIB) as m:
        m.save_state(1, _state(3, 1)).result(timeout=60)
        filler = fill_disk(small_disk, 2 * MIB)  # room for part of a 4 MiB save, not all of it

        h = m.save_state(2, _state(4, 2))
        h.result(timeout=60)  # committed on the other replica: the save as a whole succeeded
        failed = h.replicas[small.url]
        assert failed.state == "failed", h.replicas
        assert isinstance(failed.error, ReplicaError) and failed.error.errno == errno.ENOSPC, failed.error

        # The failed save's files are given back (in the background), temp files included.
        assert m._fanout.drain_retention(timeout=30)
        left = [k for k in small.list_prefix("step-000000000002") if writer_of(k) is not None]
        assert left == [], left

        # It answers a listing all along, but stays degraded while a save does not fit ...
        time.sleep(1.0)  # ten probe intervals
        health = m.health()[small.url]
        assert health.startswith("degraded"), health
        assert "bytes free" in health, health  # the reason names the space, not an old write error
        h = m.save_state(3, _state(4, 3))
        h.result(timeout=60)
        assert h.replicas[small.url].state == "skipped", h.replicas

        # ... and comes back once there is room again.
        os.unlink(filler)
        assert _wait_for(lambda: m.health()[small.url] == "ok", 10), m.health()
        m.save_state(4, _state(4, 4)).result(timeout=60)
    assert "step-000000000004" in LocalReplica(small_disk).list_steps()
    with Mirror(small_disk) as back:
        loaded = back.load_state(4, require=True)
    assert loaded is not None and loaded[1]["w3"][0].item() == 403.0


def test_probe_write_refuses_a_read_only_root(small_disk: str) -> None:
    r = LocalReplica(small_disk)
    r.probe_write(MIB)  # room and writable
    subprocess.run(["mount", "-o", "remount,ro", small_disk], check=True)
    try:
        with pytest.raises(ReplicaError) as got:
            r.probe_write(MIB)
        assert got.value.errno == errno.EROFS and small_disk in str(got.value), got.value
    finally:
        subprocess.run(["mount", "-o", "remount,rw", small_disk], check=True)
    with pytest.raises(ReplicaError) as got:
        r.probe_write(64 * MIB)  # more than the whole disk
    assert got.value.errno == errno.ENOSPC and "bytes free" in str(got.value), got.value
    assert [e for e in os.listdir(small_disk) if e.startswith(".ckptmirror-probe")] == []


def test_a_replica_degraded_by_an_outage_comes_back_on_a_ping_alone(tmp_path: os.PathLike[str]) -> None:
    """The write probe is asked only after a write error: an outage ends when it answers."""
    probed: list[int] = []

    class Counting(FaultyReplica):
        def probe_write(self, need_bytes: int) -> None:
            probed.append(need_bytes)
            raise ReplicaError("still full", replica=self.url, errno=errno.ENOSPC)

    r = Counting(LocalReplica(os.path.join(os.fspath(tmp_path), "r")))
    health = ReplicaHealth([r], interval_s=0.05)
    health.start()
    try:
        health.mark(r, ReplicaError("connection refused", replica=r.url))
        assert _wait_for(lambda: not health.degraded(), 5), health.degraded()
        assert probed == []
        health.mark(r, ReplicaError("disk full", replica=r.url, errno=errno.ENOSPC), need_bytes=123)
        assert _wait_for(lambda: len(probed) >= 3, 5), probed
        assert set(probed) == {123} and "still full" in health.degraded()[r.url]
    finally:
        health.stop(timeout=5)


def test_a_failure_marked_while_the_write_probe_runs_is_not_erased_by_its_success(tmp_path: os.PathLike[str]) -> None:
    """A review found: a save failing (needing more) while the prober's probe for an older
    failure ran was erased when that probe passed, and the replica came back at once."""
    in_probe, release = threading.Event(), threading.Event()
    probed: list[int] = []

    class Gated(FaultyReplica):
        def probe_write(self, need_bytes: int) -> None:
            probed.append(need_bytes)
            in_probe.set()
            release.wait(5)
            if need_bytes >= 10_000:
                raise ReplicaError("1000 bytes free", replica=self.url, errno=errno.ENOSPC)

    r = Gated(LocalReplica(os.path.join(os.fspath(tmp_path), "r")))
    health = ReplicaHealth([r], interval_s=0.05)
    health.start()
    try:
        health.mark(r, ReplicaError("disk full", replica=r.url, errno=errno.ENOSPC), need_bytes=100)
        assert in_probe.wait(5)
        health.mark(r, ReplicaError("disk full again", replica=r.url, errno=errno.ENOSPC), need_bytes=10_000)
        release.set()
        assert _wait_for(lambda: 10_000 in probed, 5), probed
        time.sleep(0.3)
        assert "1000 bytes free" in health.degraded().get(r.url, ""), health.degraded()
    finally:
        release.set()
        health.stop(timeout=5)


def test_a_dcp_save_to_a_full_disk_gives_back_its_files_and_waits_for_room(
    small_disk: str, tmp_path: os.PathLike[str]
) -> None:
    """The DCP writer, like ``Mirror``: the failed save's files go, the full replica is skipped
    (not written again and again: a ping alone passes on a full disk) until there is room."""
    import torch.distributed.checkpoint as dcp

    from ckptmirror.dcp import MirrorSavePlanner, MirrorStorageWriter

    other = os.path.join(os.fspath(tmp_path), "other")
    with MirrorStorageWriter([small_disk, other], object_bytes=MIB, min_replicas=1) as w:
        url = w.replicas[0].url

        def save(step: int, mib: int) -> str:
            dcp.save(_state(mib, step), checkpoint_id=f"step-{step}", storage_writer=w, planner=MirrorSavePlanner())
            w.wait(30)
            return w.last_outcome[url]

        assert save(1, 3) == "committed"
        filler = fill_disk(small_disk, 2 * MIB)  # room for part of a 4 MiB save, not all of it
        failed = save(2, 4)
        assert "No space left" in failed or "ENOSPC" in failed, failed
        small = LocalReplica(small_disk)
        left = [k for k in small.list_prefix("step-000000000002") if writer_of(k) is not None]
        assert left == [], f"the failed save's files stayed on the full disk: {left}"

        skipped = save(3, 4)  # still full: skipped, not written into ENOSPC once more
        assert "skipped" in skipped and "degraded" in skipped, skipped
        assert small.list_prefix("step-000000000003") == []

        os.unlink(filler)
        assert save(4, 4) == "committed"
    assert "step-000000000004" in LocalReplica(small_disk).list_steps()
