"""Incremental saves (format version 3): unchanged objects are referenced, not written again.

* a frozen base: after the first save, each save writes only the objects that changed, and its
  placement record references the earlier step's files; every step restores bit-exact;
* retention and ``Mirror.delete`` keep objects a retained step references, even though the step
  that stored them is gone (its commit record first), and delete them once nothing references them;
* a referenced file that vanished behind the mirror's back is written again, never referenced;
* ``{"incremental": False}`` keeps every step self-contained;
* ``verify``, ``repair`` and ``prune`` keep working with references; a save in flight keeps what it
  references alive through a concurrent retention pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import assert_bit_exact, files_under

from ckptmirror import Mirror
from ckptmirror.format import step_dir
from ckptmirror.ops import repair, verify
from ckptmirror.placement import parse_placement
from ckptmirror.replicas import LocalReplica
from ckptmirror.save.retention import apply_retention

OBJ = 64 << 10


def frozen_base_state(step: int) -> dict[str, Any]:
    """A 95% frozen base (identical in every step) and a small trainable head (new each step)."""
    g = torch.Generator().manual_seed(0)
    base = {f"base.{i}": torch.randn(64, 1024, generator=g) for i in range(8)}  # 8 x 256 KiB
    h = torch.Generator().manual_seed(step)
    head = {"head.weight": torch.randn(64, 64, generator=h), "head.bias": torch.randn(64, generator=h)}
    return {"model": {**base, **head}, "step": step}


def step_bytes(root: Path, step: int) -> int:
    d = root / step_dir(step)
    return sum((d / f).stat().st_size for f in files_under(d)) if d.exists() else 0


def save_steps(root: Path, steps: range, **kw: Any) -> None:
    with Mirror([str(root)], object_bytes=OBJ, **kw) as m:
        for s in steps:
            m.save_state(s, frozen_base_state(s)).result(timeout=60)
        m.wait()


def test_unchanged_objects_are_referenced_and_every_step_restores(tmp_path: Path) -> None:
    save_steps(tmp_path, range(1, 4))
    full, second, third = (step_bytes(tmp_path, s) for s in (1, 2, 3))
    head_bytes = (64 * 64 + 64) * 4
    # Only the head (and the manifest, commit and placement records) is written after the first save.
    assert second < head_bytes + 8 * 1024 + 0.05 * full, (full, second)
    assert third < head_bytes + 8 * 1024 + 0.05 * full
    (pkey,) = [f for f in files_under(tmp_path / step_dir(3)) if f.endswith(".place.json")]
    key = f"{step_dir(3)}/{pkey}"
    p = parse_placement((tmp_path / key).read_bytes(), key)
    assert p.references() and all(k.startswith(step_dir(1) + "/") for k in p.references())
    for s in (1, 2, 3):
        with Mirror([str(tmp_path)]) as m:
            got = m.load_state(s, require=True)
        assert got is not None
        assert_bit_exact(got[1], frozen_base_state(s), f"step {s}: ")
    assert verify([str(tmp_path)]).exit_code == 0


def test_incremental_false_keeps_every_step_self_contained(tmp_path: Path) -> None:
    save_steps(tmp_path, range(1, 3), storage_options={"file": {"incremental": False}})
    assert step_bytes(tmp_path, 2) >= step_bytes(tmp_path, 1) * 0.95
    assert not any(f.endswith(".place.json") for f in files_under(tmp_path))


def test_retention_keeps_referenced_objects_of_a_dropped_step_then_removes_them(tmp_path: Path) -> None:
    save_steps(tmp_path, range(1, 4), keep_last=1)
    # Step 1 and 2 are gone as steps (no commit record), but step 1's base objects stay: step 3 uses them.
    assert not (tmp_path / step_dir(1) / "COMMIT.json").exists()
    left = files_under(tmp_path / step_dir(1))
    assert left and all(f.endswith(".bin") for f in left)
    assert not (tmp_path / step_dir(2)).exists()  # nothing of step 2 is referenced
    with Mirror([str(tmp_path)]) as m:
        assert m.steps() == [3]
        got = m.load_state(require=True)
    assert got is not None
    assert_bit_exact(got[1], frozen_base_state(3))
    assert verify([str(tmp_path)]).exit_code == 0
    # A new base: nothing references step 1 any more, and the next retention pass removes it.
    with Mirror([str(tmp_path)], object_bytes=OBJ, keep_last=1) as m:
        new = frozen_base_state(4)
        new["model"] = {k: v + 1 for k, v in new["model"].items()}
        m.save_state(4, new).result(timeout=60)  # another process: writes everything
        m.save_state(5, frozen_base_state(5)).result(timeout=60)
        m.wait()
    assert not (tmp_path / step_dir(1)).exists()


def test_delete_of_the_step_holding_the_objects_keeps_them_for_later_steps(tmp_path: Path) -> None:
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        for s in (1, 2):
            m.save_state(s, frozen_base_state(s)).result(timeout=60)
        m.delete(1)
        assert m.steps() == [2]
        # The index came from step 2, which references step 1's files: still there.
        m.save_state(3, frozen_base_state(3)).result(timeout=60)
        m.wait()
    for s in (2, 3):
        with Mirror([str(tmp_path)]) as m:
            got = m.load_state(s, require=True)
        assert got is not None
        assert_bit_exact(got[1], frozen_base_state(s))


def test_overwriting_the_step_that_holds_the_objects_keeps_them_for_later_steps(tmp_path: Path) -> None:
    # Step 2 references step 1's base objects; step 1 is then saved again (overwrite=True, as a
    # run resumed from an older checkpoint does). The new step 1's commit drops the files of the
    # old attempt, but not those step 2 references.
    other = frozen_base_state(1)
    other["model"] = {k: v * 2 for k, v in other["model"].items()}
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        for s in (1, 2):
            m.save_state(s, frozen_base_state(s)).result(timeout=60)
        old = set(files_under(tmp_path / step_dir(1)))
        m.save_state(1, other, overwrite=True).result(timeout=60)
        m.wait()
        assert m.steps() == [1, 2]
    left = set(files_under(tmp_path / step_dir(1)))
    assert old & left, "the objects step 2 references were deleted"
    for s, want in ((1, other), (2, frozen_base_state(2))):
        with Mirror([str(tmp_path)]) as m:
            got = m.load_state(s, require=True)
        assert got is not None
        assert_bit_exact(got[1], want, f"step {s}: ")
    assert verify([str(tmp_path)]).exit_code == 0
    # Once step 2 goes, nothing references the old files; dropping step 1 then removes them all.
    with Mirror([str(tmp_path)]) as m:
        m.delete(2, force=True)
        m.delete(1, force=True)
    assert not (tmp_path / step_dir(1)).exists()


def test_a_step_saved_again_keeps_the_earlier_files_its_own_placements_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Step 1 saved again (overwrite=True) with the same base: its placement record references
    # the earlier save's files in its own directory. This process's in-flight references
    # (``live``) cover them here; on a shared replica another rank's need not, so they are
    # switched off: the commit must keep them by the step's own placement records.
    from ckptmirror.save import fanout

    original = fanout.commit_step

    def without_live(*a: Any, **k: Any) -> None:
        k["live"] = ()
        original(*a, **k)

    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        m.save_state(1, frozen_base_state(1)).result(timeout=60)
        monkeypatch.setattr(fanout, "commit_step", without_live)
        m.save_state(1, frozen_base_state(1), overwrite=True).result(timeout=60)
        m.wait()
    places = [f for f in files_under(tmp_path / step_dir(1)) if f.endswith(".place.json")]
    assert places, "the second save referenced the first one's files"
    with Mirror([str(tmp_path)]) as m:
        got = m.load_state(1, require=True)
    assert got is not None
    assert_bit_exact(got[1], frozen_base_state(1))
    assert verify([str(tmp_path)]).exit_code == 0


def test_a_step_saved_again_after_retention_dropped_it_keeps_what_later_steps_reference(tmp_path: Path) -> None:
    # keep_last=1: step 1 is dropped as a step, its base objects stay for step 2. A run resumed
    # from step 0 then saves step 1 again (no commit record: no overwrite needed); that commit
    # drops the dropped attempt's files, but not those step 2 references.
    save_steps(tmp_path, range(1, 3), keep_last=1)
    assert files_under(tmp_path / step_dir(1))
    other = frozen_base_state(1)
    other["model"] = {k: v - 1 for k, v in other["model"].items()}
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        m.save_state(1, other).result(timeout=60)
        m.wait()
        assert m.steps() == [1, 2]
    for s, want in ((1, other), (2, frozen_base_state(2))):
        with Mirror([str(tmp_path)]) as m:
            got = m.load_state(s, require=True)
        assert got is not None
        assert_bit_exact(got[1], want, f"step {s}: ")
    assert verify([str(tmp_path)]).exit_code == 0


def test_a_referenced_file_that_vanished_is_written_again(tmp_path: Path) -> None:
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        m.save_state(1, frozen_base_state(1)).result(timeout=60)
        victim = sorted(files_under(tmp_path / step_dir(1)))[0]
        (tmp_path / step_dir(1) / victim).unlink()  # behind the mirror's back
        m.save_state(2, frozen_base_state(2)).result(timeout=60)
    with Mirror([str(tmp_path)]) as m:
        got = m.load_state(2, require=True)
    assert got is not None
    assert_bit_exact(got[1], frozen_base_state(2))
    (pkey,) = [f for f in files_under(tmp_path / step_dir(2)) if f.endswith(".place.json")]
    key = f"{step_dir(2)}/{pkey}"
    refs = parse_placement((tmp_path / key).read_bytes(), key).references()
    assert refs and f"{step_dir(1)}/{victim}" not in refs  # the others are referenced, the lost one written


def test_live_references_survive_a_concurrent_retention_pass(tmp_path: Path) -> None:
    save_steps(tmp_path, range(1, 3), storage_options={"file": {"incremental": False}})
    r = LocalReplica(str(tmp_path))
    live = {f"{step_dir(1)}/{f}" for f in files_under(tmp_path / step_dir(1)) if f.endswith(".bin")}
    assert live
    removed = apply_retention(r, 2, keep_last=1, live=live)
    assert removed == [1]
    assert not (tmp_path / step_dir(1) / "COMMIT.json").exists()
    assert {f"{step_dir(1)}/{f}" for f in files_under(tmp_path / step_dir(1))} == live


def test_an_unreadable_placement_stops_retention_from_deleting_objects(tmp_path: Path) -> None:
    save_steps(tmp_path, range(1, 3))
    (pkey,) = [f for f in files_under(tmp_path / step_dir(2)) if f.endswith(".place.json")]
    (tmp_path / step_dir(2) / pkey).write_bytes(b"{damaged")
    before = files_under(tmp_path / step_dir(1))
    removed = apply_retention(LocalReplica(str(tmp_path)), 2, keep_last=1)
    assert removed == [1]
    # Only the commit record went: without step 2's placement nothing else can be ruled unreferenced.
    assert files_under(tmp_path / step_dir(1)) == [f for f in before if f != "COMMIT.json"]


def test_repair_copies_what_a_step_references(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with Mirror([str(a), str(b)], object_bytes=OBJ) as m:
        for s in (1, 2):
            m.save_state(s, frozen_base_state(s)).result(timeout=60)
    # Lose a referenced base object on b: step 2 there is damaged, a still holds it.
    (pkey,) = [f for f in files_under(b / step_dir(2)) if f.endswith(".place.json")]
    key = f"{step_dir(2)}/{pkey}"
    ref = sorted(parse_placement((b / key).read_bytes(), key).references())[0]
    (b / ref).unlink()
    # Missing for step 1, and for step 2, which keeps that object under step 1's name.
    damage = sorted(verify([str(b)]).damage, key=lambda p: p.step)
    assert [(p.step, p.kind) for p in damage] == [(1, "missing"), (2, "missing")], damage
    assert damage[0].key == ref and damage[0].detail == "not found", damage
    assert damage[1].key != ref and damage[1].detail == f"not found (stored as {ref})", damage
    repair([str(a), str(b)])
    assert verify([str(a), str(b)]).exit_code == 0
    with Mirror([str(b)]) as m:
        got = m.load_state(2, require=True)
    assert got is not None
    assert_bit_exact(got[1], frozen_base_state(2))


def test_prune_keeps_what_the_kept_steps_reference(tmp_path: Path) -> None:
    save_steps(tmp_path, range(1, 5))
    proc = subprocess.run(
        [sys.executable, "-m", "ckptmirror", "prune", str(tmp_path), "--keep", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with Mirror([str(tmp_path)]) as m:
        assert m.steps() == [4]
        got = m.load_state(require=True)
    assert got is not None
    assert_bit_exact(got[1], frozen_base_state(4))
    assert verify([str(tmp_path)]).exit_code == 0


@pytest.mark.parametrize("replicated", [False])
def test_a_restarted_writer_starts_with_a_full_save(tmp_path: Path, replicated: bool) -> None:
    """The index lives in the writing process: after a restart the first save writes everything
    (and so never references a file it has not checked), the following ones are incremental."""
    save_steps(tmp_path, range(1, 2))
    save_steps(tmp_path, range(2, 4))
    assert step_bytes(tmp_path, 2) >= step_bytes(tmp_path, 1) * 0.95
    assert step_bytes(tmp_path, 3) < step_bytes(tmp_path, 1) * 0.1


def test_ls_and_inspect_show_stored_and_raw_bytes_per_replica(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with Mirror(
        [str(a), str(b)], object_bytes=OBJ, keep_last=1, storage_options={str(b): {"compression": "zstd"}}
    ) as m:
        for s in (1, 2, 3):
            m.save_state(s, frozen_base_state(s)).result(timeout=60)
        m.wait()

    def cli(*args: str) -> Any:
        proc = subprocess.run(
            [sys.executable, "-m", "ckptmirror", *args, "--json", str(a), str(b)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    listing = cli("ls")
    by_step = {s["step"]: s for s in listing["steps"]}
    # Step 1 is gone as a step, but its directories keep the base objects step 3 references.
    assert by_step[1]["committed_on"] == [] and sorted(by_step[1]["kept_for_references_on"]) == sorted([str(a), str(b)])
    assert by_step[1]["garbage"] == {} and by_step[1]["torn_on"] == []
    st = by_step[3]["storage"]
    assert st[str(a)]["raw_bytes"] == st[str(b)]["raw_bytes"] == st[str(a)]["stored_bytes"]
    assert st[str(b)]["stored_bytes"] < st[str(b)]["raw_bytes"] and st[str(b)]["compressed"] > 0
    assert st[str(a)]["referenced"] == st[str(b)]["referenced"] > 0
    report = cli("inspect")
    assert report["step"] == 3 and report["storage"] == st


def test_handles_and_metrics_count_the_bytes_really_written(tmp_path: Path) -> None:
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        first = m.save_state(1, frozen_base_state(1)).result(timeout=60)
        second = m.save_state(2, frozen_base_state(2)).result(timeout=60)
        w1 = first.replicas[str(tmp_path)].written_bytes
        w2 = second.replicas[str(tmp_path)].written_bytes
        assert w1 is not None and w2 is not None
        assert w1 >= first.nbytes and w2 < 0.05 * w1, (w1, w2)
        # the handle's figure is what landed in the step's directory
        assert abs(w2 - step_bytes(tmp_path, 2)) < 1024
        assert m.metrics()["replicas"][str(tmp_path)]["written_bytes"] == w1 + w2


class _Frozen(torch.nn.Module):
    """A model whose small frozen tensors sit between trainable ones in the state dict: a
    frozen embedding and blocks, each with a small trainable adapter, then a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList()
        for _ in range(6):
            block = torch.nn.ModuleDict(
                {
                    "norm": torch.nn.LayerNorm(256),  # frozen, small
                    "proj": torch.nn.Linear(256, 256),  # frozen, 256 KiB: small at object_bytes 4 MiB
                    "adapter": torch.nn.Linear(256, 4, bias=False),  # trainable, small
                }
            )
            block["norm"].requires_grad_(False)
            block["proj"].requires_grad_(False)
            self.blocks.append(block)
        self.head = torch.nn.Linear(256, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b["proj"](b["norm"](x)) + b["adapter"](x).sum(-1, keepdim=True)
        return self.head(x)


def test_frozen_parameters_of_a_real_model_are_not_written_again(tmp_path: Path) -> None:
    """With Mirror.save(model, optim) the cut keeps frozen parameters (requires_grad False)
    out of the objects that hold trainable ones, so a save after the first writes about the
    trainable share (weights + AdamW state), not the groups they happen to share with frozen
    tensors. Without that, every group of small tensors holding an adapter is written again."""
    torch.manual_seed(0)
    model = _Frozen()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert trainable < 0.05 * total

    def train() -> None:
        optim.zero_grad()
        model(torch.randn(4, 256)).sum().backward()
        optim.step()

    train()
    with Mirror([str(tmp_path)], object_bytes=4 << 20) as m:
        first = m.save(1, model, optim).result(timeout=60)
        written = []
        for s in (2, 3):
            train()
            h = m.save(s, model, optim).result(timeout=60)
            w = h.replicas[str(tmp_path)].written_bytes
            assert w is not None
            written.append(w)
        w1 = first.replicas[str(tmp_path)].written_bytes
        assert w1 is not None and w1 > total
        # trainable weights + exp_avg + exp_avg_sq, plus metadata (manifest, placement, commit)
        # and AdamW's step counters: well under one frozen block (~260 KiB)
        for w in written:
            assert w < 3 * trainable + 64 * 1024, (w, trainable)
        got = m.load_state(3)
    flat = model.state_dict()
    for k, v in flat.items():
        assert torch.equal(got[1]["model"][k], v), k
    assert torch.equal(got[1]["optim"]["state"][0]["exp_avg"], optim.state_dict()["state"][0]["exp_avg"])
