"""Many ranks under real torchrun (gloo, CPU): replicated DDP state written once, per-rank
shards with node-local and shared replicas, a rank killed mid-save, a lost node's replica,
and torchrun --max-restarts resuming with identical losses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import REPO, free_port, read_losses, torchrun

import ckptmirror
from ckptmirror.format import commit_key, parse_commit, parse_rank_manifest, step_dir

EXAMPLE = REPO / "examples" / "torchrun_ddp.py"
CHILD = REPO / "tests" / "_dist_child.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def uninterrupted(ddp_reference: Path) -> Path:
    """The reference: 2-rank DDP, 20 steps, saving every 5, never interrupted (conftest.py's
    ``ddp_reference``, which tests/test_distributed_s3.py compares with too)."""
    return ddp_reference


def test_ddp_state_is_written_once_spread_over_ranks(uninterrupted: Path) -> None:
    shared = uninterrupted / "shared"
    commit = parse_commit((shared / commit_key(20)).read_bytes(), commit_key(20))
    assert commit.replicated and commit.world_size == 2 and len(commit.ranks) == 1
    manifest = parse_rank_manifest((shared / commit.ranks[0].key).read_bytes(), commit.ranks[0].key)
    writers = {o.key.split("/")[1] for o in manifest.objects}
    assert writers == {"rank-00000", "rank-00001"}, "both ranks write a share"
    on_disk = sum(f.stat().st_size for f in (shared / step_dir(20)).rglob("o*.bin"))
    assert on_disk == manifest.stream_bytes, "one copy in total, not one per rank"
    per_rank = [sum(o.size for o in manifest.objects if f"rank-0000{r}/" in o.key) for r in (0, 1)]
    assert abs(per_rank[0] - per_rank[1]) <= max(o.size for o in manifest.objects), f"fair share: {per_rank}"


def test_replicated_state_restores_on_another_world_size(uninterrupted: Path) -> None:
    # Saved by 2 ranks, restored here by a single process: the same bytes as every rank had.
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import torchrun_ddp as ex
    finally:
        sys.path.pop(0)
    model = ex.build()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with ckptmirror.Mirror([str(uninterrupted / "shared")]) as m:
        step, state = m.load_state()  # type: ignore[misc]
    assert step == 20
    model.load_state_dict({k.removeprefix("module."): v for k, v in state["model"].items()})
    optim.load_state_dict(state["optim"])
    _, events = read_losses(uninterrupted / "losses-rank0.jsonl")
    digest = [e["final_digest"] for e in events if "final_digest" in e][-1]
    assert ex.state_digest(model.state_dict(), optim.state_dict()) == digest


def test_killed_rank_and_max_restarts_resume_with_identical_losses(uninterrupted: Path, tmp_path: Path) -> None:
    # Rank 1 SIGKILLs itself while step 10 is being saved; torchrun restarts the job once.
    torchrun(str(EXAMPLE), "--ckpt", str(tmp_path), "--steps", "20", "--crash-at-step", "10", restarts=1)
    assert (tmp_path / "crashed-once").exists()
    for rank in (0, 1):
        ref, _ = read_losses(uninterrupted / f"losses-rank{rank}.jsonl")
        got, events = read_losses(tmp_path / f"losses-rank{rank}.jsonl")
        resumed = [e["resumed_from"] for e in events if "resumed_from" in e]
        assert resumed and resumed[-1] < 10, f"step 10 must not have committed: {events}"
        assert got == ref, f"rank {rank}: losses differ after the restart"
    assert (
        not (tmp_path / "shared" / commit_key(10)).exists()
        or parse_commit((tmp_path / "shared" / commit_key(10)).read_bytes(), commit_key(10)).step == 10
    )  # if present it was written by the second attempt, after the restart


def test_lost_node_replica_resumes_from_the_shared_copy(uninterrupted: Path, tmp_path: Path) -> None:
    torchrun(str(EXAMPLE), "--ckpt", str(tmp_path), "--steps", "10")
    shutil.rmtree(tmp_path / "node0-local")  # the node's disk is gone; the shared copy survives
    for r in (0, 1):
        os.unlink(tmp_path / f"losses-rank{r}.jsonl")
    torchrun(str(EXAMPLE), "--ckpt", str(tmp_path), "--steps", "20")
    for rank in (0, 1):
        ref, _ = read_losses(uninterrupted / f"losses-rank{rank}.jsonl")
        got, events = read_losses(tmp_path / f"losses-rank{rank}.jsonl")
        assert events[0]["resumed_from"] == 10
        assert events[0]["sources"] == [str(tmp_path / "shared")]
        assert all(got[s] == ref[s] for s in got), f"rank {rank}: losses differ after resuming from the shared copy"


def _results(root: Path, n: int = 2) -> list[dict[str, Any]]:
    return [json.loads((root / f"result-{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def per_rank_saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-rank job of ``_dist_child.py save``: per-rank state, steps 1 and 2, to node-local
    replicas ``local-{rank}`` and a ``shared`` one under the returned directory, with each rank's
    result-<rank>.json. Tests read it; one that changes it works on a copy."""
    root = tmp_path_factory.mktemp("per-rank")
    torchrun(str(CHILD), "save", str(root), str(root / "local-{rank}"), str(root / "shared"))
    return root


def test_per_rank_shards_node_local_and_shared(per_rank_saved: Path, tmp_path: Path) -> None:
    tmp_path = tmp_path / "job"
    shutil.copytree(per_rank_saved, tmp_path)  # this test deletes a replica: a copy of its own
    local, shared = str(tmp_path / "local-{rank}"), str(tmp_path / "shared")
    assert all(r["steps"] == [1, 2] for r in _results(tmp_path))
    for r in (0, 1):
        keys = {p.name for p in (tmp_path / f"local-{r}" / step_dir(2)).iterdir()}
        assert f"rank-0000{r}" in keys and f"rank-0000{1 - r}" not in keys, "node-local: only this rank's shard"
        assert (tmp_path / f"local-{r}" / commit_key(2)).exists()
    commit = parse_commit((tmp_path / "shared" / commit_key(2)).read_bytes(), commit_key(2))
    assert not commit.replicated and [ref.rank for ref in commit.ranks] == [0, 1]
    # Rank 1's node is replaced: its local replica is empty; it restores from the shared copy.
    shutil.rmtree(tmp_path / "local-1")
    torchrun(str(CHILD), "restore", str(tmp_path), local, shared)
    res = _results(tmp_path)
    assert all(r["step"] == 2 and r["equal"] for r in res)
    assert str(tmp_path / "local-0") in res[0]["served"][0] and str(tmp_path / "shared") not in res[0]["served"][0]
    assert str(tmp_path / "shared") in res[1]["served"][0]


def test_a_step_one_rank_cannot_read_makes_every_rank_raise_not_rewind(per_rank_saved: Path, tmp_path: Path) -> None:
    # Rank 1 cannot open step 2's objects (EACCES, not damage). Before, the ranks fell back to
    # step 1 together, silently rewinding the run; now every rank raises and restores nothing.
    tmp_path = tmp_path / "job"
    shutil.copytree(per_rank_saved, tmp_path)
    torchrun(str(CHILD), "restore-denied", str(tmp_path), str(tmp_path / "local-{rank}"), str(tmp_path / "shared"))
    res = _results(tmp_path)
    assert [r.get("error") for r in res] == ["ReplicaUnavailableError", "ReplicaUnavailableError"], res
    assert all("step" not in r for r in res), res


def test_a_step_one_rank_cannot_read_and_another_finds_damaged_falls_back(per_rank_saved: Path, tmp_path: Path) -> None:
    # Rank 0 finds step 2 corrupt on every replica: no rank can restore it, whatever rank 1's
    # outage on it; both go back to step 1 together (rank 1's outage does not stop them).
    tmp_path = tmp_path / "job"
    shutil.copytree(per_rank_saved, tmp_path)
    torchrun(
        str(CHILD), "restore-damaged-denied", str(tmp_path), str(tmp_path / "local-{rank}"), str(tmp_path / "shared")
    )
    res = _results(tmp_path)
    assert [(r.get("step"), r.get("error")) for r in res] == [(1, None), (1, None)], res


@pytest.mark.parametrize("mode", ["restore-oom", "restore-oom-probe", "restore-oom-bare"])
def test_a_rank_out_of_memory_makes_every_rank_raise_not_fall_back(
    per_rank_saved: Path, tmp_path: Path, mode: str
) -> None:
    # Rank 1 gets ENOMEM reading step 2 (objects, or its manifest). One process raises for
    # that (an older step would be a worse answer); several fell back to step 1 together.
    tmp_path = tmp_path / "job"
    shutil.copytree(per_rank_saved, tmp_path)
    torchrun(str(CHILD), mode, str(tmp_path), str(tmp_path / "local-{rank}"), str(tmp_path / "shared"))
    res = _results(tmp_path)
    own = "MemoryError" if mode == "restore-oom-bare" else "ReplicaError"  # rank 1 raises its own error
    assert [(r.get("step"), r.get("error")) for r in res] == [(None, "MemoryError"), (None, own)], res


def test_per_rank_state_refuses_another_world_size(per_rank_saved: Path) -> None:
    with ckptmirror.Mirror([str(per_rank_saved / "shared")]) as m:
        with pytest.raises(ckptmirror.StateMismatchError, match="2 rank"):
            m.load_state()


def test_rank_killed_mid_save_never_commits_and_nobody_hangs(tmp_path: Path) -> None:
    # Launched by hand, not by torchrun: torchrun would tear rank 0 down as soon as rank 1
    # dies, and the point here is what rank 0's save reports when a peer rank vanishes.
    shared = str(tmp_path / "shared")
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen([sys.executable, str(CHILD), "kill-mid-save", str(tmp_path), shared], env=env, cwd=REPO)
        )
    t0 = time.monotonic()
    codes = [p.wait(timeout=120) for p in procs]
    assert time.monotonic() - t0 < 100, "rank 0 must give up after commit_timeout_s, not hang"
    assert codes[1] == -9 and codes[0] == 0, codes
    res0 = json.loads((tmp_path / "result-0.json").read_text())
    assert res0["step2"].startswith("failed"), res0
    assert not (tmp_path / "shared" / commit_key(2)).exists()
    with ckptmirror.Mirror([shared]) as m:
        assert m.steps() == [1]


def test_a_replica_one_rank_finds_full_is_given_back_by_every_rank(tmp_path: Path) -> None:
    # Rank 1's writes of step 2 hit ENOSPC on the shared replica; rank 0 wrote its shard there.
    # Nobody commits step 2 there, so both ranks delete what they put (rank 0's shard stayed,
    # and the full replica never got the room back: no save reaches a degraded replica).
    shared = tmp_path / "shared"
    torchrun(str(CHILD), "save-full", str(tmp_path), str(shared))
    res = _results(tmp_path)
    assert all(r["step2"].startswith("failed") for r in res), res
    assert not (shared / commit_key(2)).exists()
    d = shared / step_dir(2)
    left = sorted(str(p.relative_to(shared)) for p in d.rglob("*") if p.is_file()) if d.exists() else []
    assert left == [], f"files of the failed save stayed on the full replica: {left}"
    with ckptmirror.Mirror([str(shared)]) as m:
        assert m.steps() == [1]


def test_export_one_rank_of_a_per_rank_checkpoint(per_rank_saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "rank1.safetensors"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptmirror",
            "export",
            str(per_rank_saved / "shared"),
            "--rank",
            "1",
            "--format",
            "safetensors",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert p.returncode == 0, p.stderr
    from safetensors.torch import load_file

    sys.path.insert(0, str(CHILD.parent))
    try:
        import _dist_child as child
    finally:
        sys.path.pop(0)
    assert torch.equal(load_file(str(out))["w"], child.rank_state(1, 2)["w"])
