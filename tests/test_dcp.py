"""torch.distributed.checkpoint onto ckptmirror replicas, under real torchrun (gloo, CPU, FSDP2).

One 2-rank job saves steps 2 (dcp.save) and 3, 4 (dcp.async_save on a separate gloo group) to a
node-local replica per rank and a shared one; the tests load it back on 2 ranks, 4 ranks and
in this process, with pickle made to raise, after corrupting an object, after losing a node's
disk, and with the newest step unrecoverable on one rank; and run the operator commands on it.
A rank killed mid-save leaves no commit. Single-process tests cover the planners' refusals.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import REPO, free_port, torchrun

import ckptmirror
from ckptmirror.format import commit_key, parse_commit, step_dir

dcp = pytest.importorskip("torch.distributed.checkpoint")
safetensors_torch = pytest.importorskip("safetensors.torch")

from ckptmirror.dcp import (  # noqa: E402 - after the skips
    MirrorLoadPlanner,
    MirrorSavePlanner,
    MirrorStorageReader,
    MirrorStorageWriter,
    committed_steps,
    decode_value,
    encode_value,
)

CHILD = REPO / "tests" / "_dcp_child.py"

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def urls(root: Path) -> list[str]:
    """Per rank: its node's disk, then the shared replica."""
    return [str(root / "local-{rank}"), str(root / "shared")]


def job(nproc: int, *args: str) -> subprocess.CompletedProcess[str]:
    return torchrun(str(CHILD), *args, nproc=nproc, timeout=300)


def assert_same(ref_path: Path, got_path: Path) -> None:
    ref, got = safetensors_torch.load_file(str(ref_path)), safetensors_torch.load_file(str(got_path))
    assert ref.keys() == got.keys()
    assert any(k.endswith("exp_avg_sq") for k in ref) and any(k.endswith(".step") for k in ref), sorted(ref)
    for k in ref:
        assert ref[k].dtype == got[k].dtype and ref[k].shape == got[k].shape, k
        assert torch.equal(ref[k], got[k]), f"{k} differs after the load"


def result(root: Path, tag: str, n: int = 2) -> list[dict[str, Any]]:
    return [json.loads((root / f"result-{tag}-{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dcp")
    job(2, "save", str(root), *urls(root))
    return root


def copy_of(saved: Path, tmp_path: Path) -> Path:
    """A private copy of the saved replicas (and references), to damage."""
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptmirror", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


# ----------------------------------------------------------------------------- saving


def test_save_and_async_save_commit_on_every_replica(saved: Path) -> None:
    res = [json.loads((saved / f"result-save-{r}.json").read_text()) for r in (0, 1)]
    for out in res:
        assert set(out["sync_outcome"].values()) == {"committed"}, out
        assert set(out["last_outcome"].values()) == {"committed"}, out
        # async_save staged into one reused buffer: the second async save allocated nothing.
        first, second = out["allocations"]
        assert second == first, out
        assert out["copied"] == [0, 0], "objects were written straight from the staged arena"
    for place in ("local-0", "local-1", "shared"):
        assert committed_steps([str(saved / place)]) == [2, 3, 4], place
    commit = parse_commit((saved / "shared" / commit_key(4)).read_bytes(), commit_key(4))
    assert commit.world_size == 2 and [ref.rank for ref in commit.ranks] == [0, 1]
    # Node-local replicas hold only their rank's objects; nothing pickled anywhere.
    for r in (0, 1):
        names = {p.name for p in (saved / f"local-{r}" / step_dir(4)).iterdir()}
        assert f"rank-0000{r}" in names and f"rank-0000{1 - r}" not in names, names
        # ... and say so in a share record written with the commit (a shared one holds all: none).
        [share] = (saved / f"local-{r}" / step_dir(4)).glob("share-*.json")
        assert json.loads(share.read_bytes())["ranks"] == [r], share
    assert not list((saved / "shared").glob("step-*/share-*.json"))
    files = [p for p in saved.rglob("*") if p.is_file() and "local-" in str(p) or "shared" in str(p)]
    assert not [p for p in files if p.name.endswith((".metadata", ".distcp", ".pt"))]
    for p in (saved / "shared").rglob("*.bin"):
        head = p.read_bytes()[:4]
        assert head != b"PK\x03\x04" and head[:1] != b"\x80", f"{p} looks pickled"


def test_a_dcp_step_is_a_ckptmirror_step(saved: Path, tmp_path: Path) -> None:
    root = copy_of(saved, tmp_path)
    # The shared replica holds every rank's part (a node-local one holds only its rank's).
    p = cli("verify", str(root / "shared"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 step(s) verified" in p.stdout, p.stdout
    # A node-local replica alone verifies too: its rank checked, the other node's not its to hold.
    p = cli("verify", str(root / "local-0"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "rank(s) 1 not checked" in p.stdout and "not held here (partial replica)" in p.stdout, p.stdout
    p = cli("ls", str(root / "shared"), "--json")
    assert p.returncode == 0, p.stderr
    assert [s["step"] for s in json.loads(p.stdout)["steps"]] == [2, 3, 4], p.stdout
    p = cli("inspect", str(root / "shared"), "--step", "4", "--json")
    assert p.returncode == 0, p.stderr
    names = {e["name"] for rank in json.loads(p.stdout)["ranks"] for e in rank["entries"]}
    assert "state.model.0.weight" in names and "state.extra.note" in names, sorted(names)[:20]
    # repair: an object lost on the shared replica is copied back from the node that has it.
    lost = next((root / "shared" / step_dir(4) / "rank-00001").iterdir())
    lost.unlink()
    assert cli("verify", str(root / "shared"), "--step", "4").returncode == 1
    p = cli("repair", str(root / "shared"), str(root / "local-1"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert lost.exists() and cli("verify", str(root / "shared"), "--step", "4").returncode == 0
    # prune keeps the newest steps.
    p = cli("prune", str(root / "shared"), "--keep", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert committed_steps([str(root / "shared")]) == [3, 4]


def test_objects_are_cut_by_the_formats_rule(saved: Path) -> None:
    # As the main save path: format.cut_objects over the rank's whole stream (object_bytes=2048
    # in the child), also where the async_save arena holds other ranks' items between runs.
    from itertools import accumulate

    from ckptmirror.format import LARGE_STORAGE_DIVISOR, cut_objects, parse_rank_manifest

    for step in (2, 3, 4):
        commit = parse_commit((saved / "shared" / commit_key(step)).read_bytes(), commit_key(step))
        for ref in commit.ranks:
            m = parse_rank_manifest((saved / "shared" / ref.key).read_bytes(), ref.key)
            sizes = [o.size for o in m.objects]
            windows = tuple(zip(accumulate(sizes, initial=0), sizes))
            assert windows == cut_objects(m.storages, 2048), (step, ref.rank)
            large = [st for st in m.storages if st.nbytes >= 2048 // LARGE_STORAGE_DIVISOR]
            assert large and len(large) < len([st for st in m.storages if st.nbytes]), "both kinds are exercised"


def test_an_object_across_runs_is_joined_and_one_inside_a_run_is_a_view() -> None:
    from ckptmirror.dcp._items import window_bytes

    a, b, c = bytearray(b"0123456789"), bytearray(b"abc"), bytearray(b"XYZW")
    starts, spans = [0, 10, 13], [memoryview(a), memoryview(b), memoryview(c)]
    inside = window_bytes(starts, spans, 2, 5)
    assert bytes(inside) == b"23456" and inside.obj is a, "a view, no copy"
    assert bytes(window_bytes(starts, spans, 10, 3)) == b"abc"
    assert bytes(window_bytes(starts, spans, 8, 7)) == b"89abcXY"
    assert bytes(window_bytes(starts, spans, 0, 17)) == b"0123456789abcXYZW"


# ----------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def loaded_on_2(saved: Path) -> subprocess.CompletedProcess[str]:
    """One 2-rank job that loads ``saved`` three times, each into a model of its own: the newest
    step (tag "two"), step 3 ("step3") and step 2 ("step2"); its output covers all three."""
    return job(2, "load", str(saved), "two,step3,step2", "newest,3,2", *urls(saved))


def test_load_on_2_ranks_newest_without_pickle(saved: Path, loaded_on_2: subprocess.CompletedProcess[str]) -> None:
    p = loaded_on_2
    # Rank 1 reads what DCP had rank 0 store (and the other way round): from the shared
    # replica, without first trying its own node's disk, which cannot hold it, and warning.
    assert "trying the next replica" not in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    assert_same(saved / "reference-4.safetensors", saved / "restored-two.safetensors")
    expect = json.loads((saved / "values-4.json").read_text())
    for out in result(saved, "two"):
        assert out["step"] == 4 and out["blocked"], out
        assert out["values"] == expect, "param_groups and plain values come back exactly"
        # Each rank read its own objects from its node's disk (the first replica).
        mine = [k for k in out["sources"] if f"/rank-0000{out['rank']}/" in k]
        assert mine and all(out["sources"][k] == str(saved / f"local-{out['rank']}") for k in mine), out


def test_load_a_given_step(saved: Path, loaded_on_2: subprocess.CompletedProcess[str]) -> None:
    assert_same(saved / "reference-3.safetensors", saved / "restored-step3.safetensors")
    assert {out["step"] for out in result(saved, "step3")} == {3}
    # Step 2 came from dcp.save, which writes large tensors from where they are (no staging copy).
    assert_same(saved / "reference-2.safetensors", saved / "restored-step2.safetensors")
    assert {out["step"] for out in result(saved, "step2")} == {2}


def test_load_on_4_ranks_reshards(saved: Path) -> None:
    # Two more "nodes": ranks 2 and 3 have empty node-local disks and read from the shared copy.
    job(4, "load", str(saved), "four", "newest", *urls(saved))
    assert_same(saved / "reference-4.safetensors", saved / "restored-four.safetensors")
    assert {out["step"] for out in result(saved, "four", 4)} == {4}


def test_load_in_one_plain_process(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(CHILD.parent))
    try:
        import _dcp_child as child
    finally:
        sys.path.pop(0)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = child.build(seed=5)
    optim = torch.optim.AdamW(model.parameters(), lr=0.5)
    child.train_step(model, optim, 7)
    state = child.app_state(model, optim, -1)
    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, _refuse)
    monkeypatch.setattr(torch, "load", _refuse)
    reader = MirrorStorageReader([str(saved / "shared")])
    dcp.load(state, storage_reader=reader, planner=MirrorLoadPlanner())
    assert reader.step == 4
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optim, state["optim"])
    got = child.full({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)})
    ref = safetensors_torch.load_file(str(saved / "reference-4.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert state["extra"]["note"] == "ckpt" and state["extra"]["t"] == (1, None) and math.isnan(state["extra"]["nan"])
    # The same patches do stop DCP's own reader: they are not a no-op.
    plain = tmp_path / "plain-dcp"
    monkeypatch.undo()
    dcp.save({"x": torch.ones(3), "v": {"a": 1}}, checkpoint_id=str(plain))
    monkeypatch.setattr(pickle, "load", _refuse)
    with pytest.raises(BaseException, match="unpickling refused"):
        dcp.load({"x": torch.zeros(3), "v": {"a": 0}}, checkpoint_id=str(plain))


def _refuse(*a: Any, **k: Any) -> Any:
    raise AssertionError("unpickling refused by the test")


def test_corrupt_object_on_the_local_disk_is_read_from_the_shared_replica(saved: Path, tmp_path: Path) -> None:
    root = copy_of(saved, tmp_path)
    victim = sorted((root / "local-0" / step_dir(4) / "rank-00000").iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    victim.write_bytes(bytes(data))
    job(2, "load", str(root), "corrupt", "newest", *urls(root))
    assert_same(root / "reference-4.safetensors", root / "restored-corrupt.safetensors")
    out0 = result(root, "corrupt")[0]
    assert out0["step"] == 4
    key = f"{step_dir(4)}/rank-00000/{victim.name}"
    assert out0["sources"][key] == str(root / "shared"), out0["sources"]
    others = [k for k in out0["sources"] if "/rank-00000/" in k and k != key]
    assert others and all(out0["sources"][k] == str(root / "local-0") for k in others)


def test_lost_node_local_replica_loads_from_the_shared_copy(saved: Path, tmp_path: Path) -> None:
    root = copy_of(saved, tmp_path)
    shutil.rmtree(root / "local-1")  # rank 1's node was replaced: its disk is empty
    job(2, "load", str(root), "lost", "newest", *urls(root))
    assert_same(root / "reference-4.safetensors", root / "restored-lost.safetensors")
    out1 = result(root, "lost")[1]
    assert out1["step"] == 4 and set(out1["sources"].values()) == {str(root / "shared")}


def test_newest_step_unrecoverable_on_one_rank_all_ranks_load_the_previous(saved: Path, tmp_path: Path) -> None:
    root = copy_of(saved, tmp_path)
    name = sorted((root / "shared" / step_dir(4) / "rank-00001").iterdir())[0].name
    for place in ("local-1", "shared"):
        p = root / place / step_dir(4) / "rank-00001" / name
        p.write_bytes(p.read_bytes()[:-1])  # truncated everywhere: rank 1 cannot recover step 4
    job(2, "load", str(root), "fallback", "newest", *urls(root))
    assert {out["step"] for out in result(root, "fallback")} == {3}
    assert_same(root / "reference-3.safetensors", root / "restored-fallback.safetensors")


def test_a_given_step_unrecoverable_on_one_rank_fails_the_load_on_every_rank(saved: Path, tmp_path: Path) -> None:
    # No vote for a step the caller names: the rank that cannot load it raises while DCP plans,
    # and DCP's planning collective fails the load everywhere, at once (no wait for a vote).
    root = copy_of(saved, tmp_path)
    name = sorted((root / "shared" / step_dir(4) / "rank-00001").iterdir())[0].name
    for place in ("local-1", "shared"):
        p = root / place / step_dir(4) / "rank-00001" / name
        p.write_bytes(p.read_bytes()[:-1])
    t0 = time.monotonic()
    p = torchrun(str(CHILD), "load", str(root), "given", "4", *urls(root), nproc=2, timeout=300, check=False)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 50, "well under the 60 s commit_timeout_s of the child's reader"
    assert name in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    assert not list(root.glob("result-given-*.json")), "no rank finished the load"


def test_a_replica_one_rank_finds_full_is_given_back_by_every_rank(tmp_path: Path) -> None:
    # Rank 1's writes of step 2 hit ENOSPC on the shared replica; rank 0 wrote its shard there.
    # Step 2 commits on the node-local disks only, and both ranks delete their files of it from
    # the shared one (rank 0's stayed, holding the space the next save needs).
    shared = tmp_path / "shared"
    job(2, "full", str(tmp_path), str(tmp_path / "local-{rank}"), str(shared))
    for rank in (0, 1):
        out = json.loads((tmp_path / f"result-full-{rank}.json").read_text())
        assert set(out["step1"].values()) == {"committed"}, out
        assert out["step2"][str(tmp_path / f"local-{rank}")] == "committed", out
        assert out["step2"][str(shared)].startswith("failed"), out
    assert committed_steps([str(shared)]) == [1]
    assert committed_steps([str(tmp_path / "local-0")]) == [1, 2]
    d = shared / step_dir(2)
    left = sorted(str(p.relative_to(shared)) for p in d.rglob("*") if p.is_file()) if d.exists() else []
    assert left == [], f"files of the failed save stayed on the full replica: {left}"


def test_rank_killed_mid_save_leaves_no_commit(saved: Path, tmp_path: Path) -> None:
    # Launched by hand, not by torchrun: torchrun would tear rank 0 down as soon as rank 1
    # dies, and the point is what rank 0's dcp.save does when a peer vanishes mid-save.
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
        procs.append(subprocess.Popen([sys.executable, str(CHILD), "kill", str(tmp_path), shared], env=env, cwd=REPO))
    t0 = time.monotonic()
    codes = [p.wait(timeout=180) for p in procs]
    assert codes[1] == -9 and codes[0] == 0, codes
    assert time.monotonic() - t0 < 150
    out0 = json.loads((tmp_path / "result-kill-0.json").read_text())
    assert out0["step2"].startswith("failed"), out0
    assert out0["seconds"] < 60, "rank 0's dcp.save fails when the peer's connection drops, it does not hang"
    assert not (tmp_path / "shared" / commit_key(2)).exists()
    assert (tmp_path / "shared" / step_dir(2)).exists(), "the torn save left objects (cleaned up later)"
    assert committed_steps([shared]) == [1]
    p = cli("ls", shared, "--json")
    assert p.returncode == 0, p.stderr
    listed = {s["step"]: s for s in json.loads(p.stdout)["steps"]}
    assert listed[1]["committed_on"] == [shared] and listed[2]["committed_on"] == [], p.stdout
    assert listed[2]["torn_on"] == [shared], "ckptmirror ls shows the interrupted save as torn"


# ----------------------------------------------------------------------------- one process


def small_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 6)).sum().backward()
    optim.step()
    return {"model": model.state_dict(), "optim": optim.state_dict(), "extra": {"epoch": 3, "big": 2**80}}


def test_default_save_planner_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(BaseException, match=r"planner=MirrorSavePlanner\(\)") as info:
        dcp.save(small_state(), storage_writer=MirrorStorageWriter([str(tmp_path / "r")], step=1))
    assert "optim.param_groups.0.lr" in str(info.value) or "extra.epoch" in str(info.value), str(info.value)
    assert committed_steps([str(tmp_path / "r")]) == []
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").rglob("*.bin")), "nothing written"


def test_default_save_planner_is_refused_naming_the_key_on_every_rank_under_torchrun(tmp_path: Path) -> None:
    """Under a process group DCP pickles a rank's exception to the coordinator and back: the
    error must survive that, or the ranks see a TypeError from the unpickler (or a closed
    connection) instead of the key and the fix."""
    job(2, "default-planner", str(tmp_path), str(tmp_path / "r{rank}"))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"refused-{rank}.json").read_text())
        assert got["raised"] is not None, got
        assert "planner=MirrorSavePlanner()" in got["message"] and "meta.epoch" in got["message"], got
        assert "UnsupportedTypeError" in got["message"] and "missing 1 required" not in got["message"], got
    assert committed_steps([str(tmp_path / "r0")]) == [] and committed_steps([str(tmp_path / "r1")]) == []


def test_default_load_planner_is_refused(tmp_path: Path) -> None:
    dcp.save(small_state(), storage_writer=MirrorStorageWriter([str(tmp_path)], step=1), planner=MirrorSavePlanner())
    with pytest.raises(BaseException, match=r"planner=MirrorLoadPlanner\(\)"):
        dcp.load(small_state(), storage_reader=MirrorStorageReader([str(tmp_path)]))


def test_a_damaged_commit_record_on_the_first_replica_loads_from_the_second(tmp_path: Path) -> None:
    """One bit of a pinned checksum flipped in the first replica's commit record of the newest
    step (still valid JSON): the load takes the second replica's record of that save, not the
    step before."""
    a, b = tmp_path / "a", tmp_path / "b"
    states = {}
    for step in (1, 2):
        state = {"model": {"w": torch.full((8, 8), float(step))}}
        dcp.save(state, storage_writer=MirrorStorageWriter([str(a), str(b)], step=step), planner=MirrorSavePlanner())
        states[step] = state
    commit = a / commit_key(2)
    data = bytearray(commit.read_bytes())
    at = data.index(b'"xxh3_64:') + len(b'"xxh3_64:')
    while chr(data[at]) not in "0123456789bcde":
        at += 1
    data[at] ^= 1
    commit.write_bytes(bytes(data))
    target = {"model": {"w": torch.zeros(8, 8)}}
    r = MirrorStorageReader([str(a), str(b)])
    dcp.load(target, storage_reader=r, planner=MirrorLoadPlanner())
    assert r.step == 2 and torch.equal(target["model"]["w"], states[2]["model"]["w"])


def test_values_round_trip_and_plain_tensors(tmp_path: Path) -> None:
    state = small_state()
    state["extra"].update(nan=float("nan"), t=(1, "x", None), tensors=[torch.arange(5), torch.ones(2, 2)])
    w = MirrorStorageWriter([str(tmp_path / "a"), str(tmp_path / "b")], object_bytes=64)
    dcp.save(state, checkpoint_id="run1/step-000123", storage_writer=w, planner=MirrorSavePlanner())
    assert committed_steps([str(tmp_path / "a")]) == [123]
    target = small_state()
    target["extra"] = {
        "epoch": 0,
        "big": 0,
        "nan": 0.0,
        "t": None,
        "tensors": [torch.zeros(5, dtype=torch.long), torch.zeros(2, 2)],
    }
    with torch.no_grad():
        for v in target["model"].values():
            v.zero_()
    r = MirrorStorageReader([str(tmp_path / "a"), str(tmp_path / "b")])
    dcp.load(target, storage_reader=r, planner=MirrorLoadPlanner())
    assert r.step == 123
    for k, v in state["model"].items():
        assert torch.equal(v, target["model"][k]), k
    ex = target["extra"]
    assert ex["epoch"] == 3 and ex["big"] == 2**80 and math.isnan(ex["nan"]) and ex["t"] == (1, "x", None)
    assert torch.equal(ex["tensors"][0], torch.arange(5)) and torch.equal(ex["tensors"][1], torch.ones(2, 2))
    assert target["optim"]["param_groups"][0]["lr"] == 0.1
    # A Mirror sees an ordinary step; its tree is the DCP index and the flattened state.
    with ckptmirror.Mirror([str(tmp_path / "a")]) as m:
        step, tree = m.load_state()  # type: ignore[misc]
    assert step == 123 and torch.equal(tree["state"]["model.weight"], state["model"]["weight"])
    assert tree["dcp"]["format"] == "ckptmirror.dcp/1" and "metadata" in tree["dcp"]


def test_a_failed_load_says_the_tensors_may_hold_part_of_the_step_and_leaves_values(tmp_path: Path) -> None:
    state = small_state()
    w = MirrorStorageWriter([str(tmp_path / "a")], object_bytes=64)
    dcp.save(state, checkpoint_id="run1/step-000007", storage_writer=w, planner=MirrorSavePlanner())
    objects = sorted((tmp_path / "a" / step_dir(7)).rglob("o*.bin"))
    last = objects[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF  # the only replica's last object no longer matches its checksum
    last.write_bytes(bytes(data))
    target = small_state()
    target["extra"] = {"epoch": -1, "big": -1}
    r = MirrorStorageReader([str(tmp_path / "a")])
    with pytest.raises(BaseException) as exc:  # DCP's CheckpointException is a BaseException
        dcp.load(target, storage_reader=r, planner=MirrorLoadPlanner())
    msg = str(exc.value)
    assert "step 7 cannot be read" in msg and "may now hold part of step 7" in msg, msg
    assert "do not train on this state_dict" in msg
    assert target["extra"] == {"epoch": -1, "big": -1}  # the values are loaded last: untouched


def test_a_load_that_cannot_reach_the_replica_is_an_outage_not_damage(tmp_path: Path) -> None:
    from ckptmirror.errors import ReplicaUnavailableError
    from ckptmirror.replicas import FaultyReplica, LocalReplica

    state = small_state()
    w = MirrorStorageWriter([str(tmp_path / "a")], object_bytes=64)
    dcp.save(state, checkpoint_id="run1/step-000008", storage_writer=w, planner=MirrorSavePlanner())

    def down(phase: str, key: str) -> None:
        if phase == "get" and key.endswith(".bin"):
            raise ReplicaUnavailableError("injected: no answer within its time budget", replica="a", key=key)

    flaky = FaultyReplica(LocalReplica(str(tmp_path / "a")), on_phase=down)
    flaky.read_priority = 10**6  # read through the wrapper, not mapped in place
    with pytest.raises(BaseException) as exc:  # DCP's CheckpointException is a BaseException
        dcp.load(small_state(), storage_reader=MirrorStorageReader([flaky]), planner=MirrorLoadPlanner())
    msg = str(exc.value)
    assert "step 8 could not be read" in msg and "load again once the replicas answer" in msg, msg
    # Not marked bad: the next load (the replica back) reads step 8 itself.
    target = small_state()
    r = MirrorStorageReader([str(tmp_path / "a")])
    dcp.load(target, storage_reader=r, planner=MirrorLoadPlanner())
    assert r.step == 8


def test_step_comes_from_the_checkpoint_id_or_is_required(tmp_path: Path) -> None:
    w = MirrorStorageWriter([str(tmp_path)])
    with pytest.raises(BaseException, match="which step"):
        dcp.save({"x": torch.ones(2)}, storage_writer=w, planner=MirrorSavePlanner())
    dcp.save({"x": torch.ones(2)}, checkpoint_id="ckpt/step-7", storage_writer=w, planner=MirrorSavePlanner())
    with pytest.raises(BaseException, match="already committed"):
        dcp.save({"x": torch.ones(2)}, checkpoint_id="ckpt/step-7", storage_writer=w, planner=MirrorSavePlanner())
    dcp.save({"x": torch.ones(2) * 2}, checkpoint_id="ckpt/step-9", storage_writer=w, planner=MirrorSavePlanner())
    assert committed_steps([str(tmp_path)]) == [7, 9]
    x = {"x": torch.zeros(2)}
    dcp.load(x, checkpoint_id="ckpt/step-7", storage_reader=MirrorStorageReader([str(tmp_path)]))
    assert torch.equal(x["x"], torch.ones(2))


def test_async_save_in_one_process_reuses_its_staging_buffer(tmp_path: Path) -> None:
    w = MirrorStorageWriter([str(tmp_path)], keep_last=2)
    model = torch.nn.Linear(64, 64)
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.fill_(step)
        fut = dcp.async_save(
            {"model": model.state_dict()}, checkpoint_id=f"s/{step}", storage_writer=w, planner=MirrorSavePlanner()
        )
        with torch.no_grad():
            model.weight.fill_(-1.0)  # the save holds the values at the call
        fut.result(timeout=60)
        assert w.last_copied_bytes == 0, "objects are written straight from the staging buffer"
    w.wait(30)
    assert w.staging_allocations == 1
    assert committed_steps([str(tmp_path)]) == [3, 4], "keep_last=2"
    target = {"model": torch.nn.Linear(64, 64).state_dict()}
    dcp.load(target, storage_reader=MirrorStorageReader([str(tmp_path)]), planner=MirrorLoadPlanner())
    assert bool((target["model"]["weight"] == 4).all())


def test_dcp_save_writes_large_tensors_from_where_they_are(tmp_path: Path) -> None:
    # object_bytes=4096: tensors of at least 1024 bytes get objects of their own, written
    # straight from the caller's memory; the small ones are packed into the reused arena.
    state = {
        "big": torch.arange(1024, dtype=torch.float32),
        "bf16": torch.ones(600, dtype=torch.bfloat16),
        "small": torch.arange(10, dtype=torch.int64),
        "strided": torch.arange(2048, dtype=torch.float32).reshape(32, 64).t(),
    }
    w = MirrorStorageWriter([str(tmp_path)], step=1, object_bytes=4096)
    dcp.save(state, storage_writer=w, planner=MirrorSavePlanner())
    assert w.last_copied_bytes == 80 + 8192, "only the small and the non-contiguous tensor were copied"
    target = {k: torch.zeros_like(v).contiguous() if k != "strided" else torch.zeros(64, 32) for k, v in state.items()}
    dcp.load(target, storage_reader=MirrorStorageReader([str(tmp_path)]), planner=MirrorLoadPlanner())
    for k, v in state.items():
        assert torch.equal(target[k], v), k


def test_a_tensor_inside_a_tuple_is_refused() -> None:
    with pytest.raises(ckptmirror.UnsupportedTypeError, match=r"state_dict\['x'\]\[0\]"):
        encode_value((torch.ones(1), 2), "x")


def test_value_decoding_refuses_pickles() -> None:
    with pytest.raises(ckptmirror.ManifestError, match="pickled"):
        decode_value(pickle.dumps({"a": 1}), "v")
    buf = io.BytesIO()
    torch.save({"a": 1}, buf)
    with pytest.raises(ckptmirror.ManifestError, match="pickled"):
        decode_value(buf.getvalue(), "v")
    assert decode_value(encode_value({"a": (1, None)}, "v"), "v") == {"a": (1, None)}


def test_metadata_round_trips_through_json() -> None:
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    from ckptmirror.dcp._codec import Location, metadata_to_tree, tree_to_metadata
    from ckptmirror.state.tree import flatten, unflatten

    md = Metadata(
        state_dict_metadata={
            "w": TensorStorageMetadata(
                TensorProperties(dtype=torch.bfloat16),
                torch.Size([4, 3]),
                [
                    ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 3])),
                    ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([2, 3])),
                ],
            ),
            "v": BytesStorageMetadata(),
        },
        planner_data={"w": ("w",), "v": ("v",)},
        storage_data={
            MetadataIndex("w", [0, 0]): Location(0, "w"),
            MetadataIndex("w", [2, 0]): Location(1, "w"),
            MetadataIndex("v"): Location(0, "v"),
        },
        storage_meta=StorageMeta(checkpoint_id="x/1", save_id="s"),
        version="1.0.0",
    )
    node = json.loads(json.dumps(flatten(metadata_to_tree(md)).structure))
    back = tree_to_metadata(unflatten(node, lambda *a: None), "k", 2)
    assert back.state_dict_metadata == md.state_dict_metadata
    assert back.planner_data == md.planner_data and back.storage_data == md.storage_data
    assert back.storage_meta == md.storage_meta and back.version == md.version
    with pytest.raises(ckptmirror.ManifestError, match="not stored"):
        bad = metadata_to_tree(md)
        bad["storage"] = bad["storage"][1:]
        tree_to_metadata(bad, "k", 2)


def test_the_fast_index_decoder_agrees_with_unflatten() -> None:
    from ckptmirror.dcp._codec import decode_plain
    from ckptmirror.state.tree import flatten, unflatten

    def no_leaf(*a: Any) -> Any:
        raise AssertionError("no tensors here")

    trees: list[Any] = [
        {"a": [1, 2, [3, [4, None]]], "b": {"c": "x", "d": 1.5, "e": True}},
        {"t": (1, (2, "x")), "big": 2**80, "nan": float("nan"), "inf": [float("-inf")], 3: "int key"},
        [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],  # past the fast depth
        "plain",
        None,
    ]
    for tree in trees:
        node = flatten(tree).structure
        fast, slow = decode_plain(node, "k"), unflatten(node, no_leaf, "k")
        assert repr(fast) == repr(slow), (fast, slow)  # repr: nan == nan
    bad = [
        {"t": "dict", "items": [["a", 1], ["a", 2]]},
        {"t": "list", "v": [{"t": "nope"}]},
        {"t": "dict", "items": [["a", {"t": "tensor", "i": 0}]]},
    ]
    for node in bad:
        with pytest.raises(ckptmirror.ManifestError):
            decode_plain(node, "k")


def test_import_ckptmirror_does_not_import_dcp() -> None:
    code = (
        "import sys, ckptmirror; "
        "print(any(m.startswith(('ckptmirror.dcp', 'torch.distributed.checkpoint')) for m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == "False", p.stdout


def test_a_save_that_fails_before_writing_gives_its_staging_buffer_back(tmp_path: Path) -> None:
    # The second async_save of step 1 fails in planning (the step is committed): DCP never calls
    # write_data, and the writer is not told. The next async_save must still get the buffer.
    w = MirrorStorageWriter([str(tmp_path)])
    state = {"x": torch.ones(1000)}
    dcp.async_save(state, checkpoint_id="s/1", storage_writer=w, planner=MirrorSavePlanner()).result(timeout=60)
    with pytest.raises(BaseException, match="already committed"):
        dcp.async_save(state, checkpoint_id="s/1", storage_writer=w, planner=MirrorSavePlanner()).result(timeout=60)
    t0 = time.monotonic()
    dcp.async_save(state, checkpoint_id="s/2", storage_writer=w, planner=MirrorSavePlanner()).result(timeout=60)
    assert time.monotonic() - t0 < 30 and committed_steps([str(tmp_path)]) == [1, 2]
    assert w.staging_allocations == 1


def test_a_failing_replica_degrades_the_save_unless_asked_to_raise(tmp_path: Path) -> None:
    from ckptmirror.replicas import FaultyReplica, LocalReplica

    bad = FaultyReplica(LocalReplica(str(tmp_path / "bad")), fail_put_at=1)
    w = MirrorStorageWriter([str(tmp_path / "good"), bad], step=1)
    dcp.save({"x": torch.ones(10)}, storage_writer=w, planner=MirrorSavePlanner())
    assert w.last_outcome[str(tmp_path / "good")] == "committed"
    assert w.last_outcome[bad.url].startswith("failed"), w.last_outcome
    assert committed_steps([str(tmp_path / "good")]) == [1] and committed_steps([str(tmp_path / "bad")]) == []
    bad = FaultyReplica(LocalReplica(str(tmp_path / "bad2")), fail_put_at=1)
    w = MirrorStorageWriter([str(tmp_path / "good2"), bad], step=1, on_replica_error="raise")
    with pytest.raises(BaseException, match="committed on 1 of 2"):
        dcp.save({"x": torch.ones(10)}, storage_writer=w, planner=MirrorSavePlanner())
