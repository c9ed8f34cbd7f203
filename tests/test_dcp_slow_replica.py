"""A slow replica does not hold a DCP save (``MirrorStorageWriter(slow_replica_timeout_s=...)``).

``dcp.save`` and ``dcp.async_save`` end only when the writer's ``write_data`` returns, and
callers of ``async_save`` wait for the previous save's future before the next one. Before, one
replica whose uploads hung held every save for its whole time budget. Now, once another replica
holds every object of the rank's part of the step, the writer waits ``slow_replica_timeout_s``
and drops the laggard's write of that step (it does not commit there); later saves skip the
replica until the dropped write has returned, then use it again. The hung replica is a
:class:`FaultyReplica` over a real local directory whose object puts of one step wait on a gate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import Gate, wait_until

from ckptmirror.format import step_dir
from ckptmirror.replicas import FaultyReplica, LocalReplica

dcp = pytest.importorskip("torch.distributed.checkpoint")

from ckptmirror.dcp import (  # noqa: E402 - after the skip
    MirrorLoadPlanner,
    MirrorSavePlanner,
    MirrorStorageReader,
    MirrorStorageWriter,
    committed_steps,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

OBJ = 64 << 10  # small objects: a dropped write has several left to skip


def state(step: int, n: int = 16) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"model": {f"t{i}": torch.randn(16384, generator=g) for i in range(n)}}


def save(w: MirrorStorageWriter, step: int) -> float:
    t0 = time.monotonic()
    dcp.save(state(step), storage_writer=w, checkpoint_id=f"run/step-{step}", planner=MirrorSavePlanner())
    return time.monotonic() - t0


def test_a_hanging_replica_does_not_hold_dcp_saves(tmp_path: Path) -> None:
    fast, hung = tmp_path / "fast", tmp_path / "hung"
    gate = Gate(2)
    far = FaultyReplica(LocalReplica(str(hung)), on_phase=gate)
    # 3 s: far below the 20 s hang, and far above how far apart two healthy local disks finish
    w = MirrorStorageWriter([str(fast), far], object_bytes=OBJ, io_threads=2, slow_replica_timeout_s=3)
    try:
        save(w, 1)
        assert w.last_outcome == {str(fast): "committed", far.url: "committed"}
        t0 = time.monotonic()
        fut = dcp.async_save(state(2), storage_writer=w, checkpoint_id="run/step-2", planner=MirrorSavePlanner())
        fut.result(timeout=60)
        took = time.monotonic() - t0
        gate.dropped_at = time.monotonic()
        # Without the drop, the save's future waits for the hung uploads (20 s here).
        assert took < 10, f"async_save of step 2 took {took:.1f} s behind a hung replica"
        assert gate.waiting > 0
        assert w.last_outcome[str(fast)] == "committed"
        why = w.last_outcome[far.url]
        assert "ReplicaLaggingError" in why and str(fast) in why and "slow_replica_timeout_s" in why, why
        assert committed_steps([str(fast)]) == [1, 2] and committed_steps([far]) == [1]
        # The dropped write still hangs: the next save skips the replica rather than queue behind it.
        assert save(w, 3) < 10
        assert w.last_outcome[str(fast)] == "committed"
        assert "ReplicaLaggingError" in w.last_outcome[far.url] and "still running" in w.last_outcome[far.url]
        gate.open()  # the hung uploads return: the dropped write ends and gives its files back
        w.wait(timeout=30)
        wait_until(lambda: LocalReplica(str(hung)).list_prefix(step_dir(2)) == [], 30, what="step 2's files gone")
        save(w, 4)
        assert w.last_outcome == {str(fast): "committed", far.url: "committed"}
    finally:
        w.close()
    # It stopped at its next object: only the puts in flight (at most io_threads) were made.
    assert gate.after_drop == 0 and gate.waiting <= 2, (gate.after_drop, gate.waiting)
    assert committed_steps([str(hung)]) == [1, 4]
    target = {"model": {k: torch.zeros_like(v) for k, v in state(4)["model"].items()}}
    r = MirrorStorageReader([str(hung)])
    dcp.load(target, storage_reader=r, planner=MirrorLoadPlanner())
    assert r.step == 4
    assert all(torch.equal(target["model"][k], v) for k, v in state(4)["model"].items())


@pytest.mark.parametrize("kw", [{"slow_replica_timeout_s": None}, {"on_replica_error": "raise"}])
def test_without_a_timeout_or_with_raise_the_save_waits_for_every_replica(tmp_path: Path, kw: dict[str, Any]) -> None:
    gate = Gate(1, hold_s=1.5)
    far = FaultyReplica(LocalReplica(str(tmp_path / "slow")), on_phase=gate)
    opts: dict[str, Any] = {"slow_replica_timeout_s": 0.1, **kw}
    with MirrorStorageWriter([str(tmp_path / "fast"), far], object_bytes=OBJ, io_threads=2, **opts) as w:
        took = save(w, 1)
        assert took >= 1.4, took
        assert w.last_outcome == {str(tmp_path / "fast"): "committed", far.url: "committed"}


@pytest.mark.parametrize("bad", [-1, "3"])
def test_the_option_is_checked(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="slow_replica_timeout_s"):
        MirrorStorageWriter([str(tmp_path)], slow_replica_timeout_s=bad)


def test_two_ranks_one_ranks_upload_hangs(tmp_path: Path) -> None:
    # Rank 0's uploads of step 2 to the shared replica hang (20 s). Both ranks' dcp.save of step
    # 2 return in seconds; rank 0's dropped position votes "failed", so step 2 commits on the
    # node-local replicas and not on the shared one, on every rank alike; step 3 the same (rank
    # 0's dropped write still runs, so it skips the shared replica).
    import json

    from _helpers import REPO, torchrun

    torchrun(str(REPO / "tests" / "_dcp_slow_child.py"), str(tmp_path), timeout=240)
    res = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1)]
    for r in res:
        assert r["seconds2"] < 10, r  # 20 s or more without the drop
        assert r["outcome1"] == {"local": "committed", "shared": "committed"}, r
        assert r["outcome2"]["local"] == "committed" and r["outcome2"]["shared"] != "committed", r
    assert "ReplicaLaggingError" in res[0]["outcome2"]["shared"], res[0]
    assert "still running" in res[0]["outcome3"]["shared"], res[0]
    assert all(r["outcome3"]["shared"] != "committed" for r in res), res
    assert committed_steps([str(tmp_path / "shared")]) == [1]
    assert committed_steps([str(tmp_path / "local-0")]) == [1, 2, 3]
    assert committed_steps([str(tmp_path / "local-1")]) == [1, 2, 3]
    # Every rank gave its part of steps 2 and 3 on the shared replica back (rank 1's too: the
    # abort said so), not only the rank that dropped its write there; the writers are closed.
    for step in (2, 3):
        left = sorted(p.name for p in (tmp_path / "shared" / step_dir(step)).rglob("*") if p.is_file())
        assert left == [], (step, left)


def test_two_ranks_each_with_another_slow_replica_drop_nothing(tmp_path: Path) -> None:
    # Rank 0's shared replica and rank 1's local one are each 2 s slow. A rank may drop a write
    # only once another position holds every rank's part: deciding alone, rank 0 dropped the
    # shared position and rank 1 the local one, and the save then failed on both (a review
    # found it). Now no position is ready on every rank before the slow ones end: nothing is
    # dropped, and the step commits at both positions.
    import json

    from _helpers import REPO, torchrun

    torchrun(str(REPO / "tests" / "_dcp_slow_child.py"), str(tmp_path), "cross", timeout=240)
    res = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1)]
    for r in res:
        assert r["outcome1"] == {"local": "committed", "shared": "committed"}, r
    for replica in ("local-0", "local-1", "shared"):
        assert committed_steps([str(tmp_path / replica)]) == [1], replica
