"""What ``verify``, ``ls`` and ``prune`` say about two situations that used to be misreported.

* Incremental saves with ``keep_last``: retention drops a step whose objects later steps still
  reference, and its directory stays with those objects only (no commit record). That is no
  interrupted save: ``verify`` used to list it under "torn steps" (see 'ckptmirror prune') and
  ``prune`` said "removed torn saves 1" while (rightly) keeping every file, forever.
* Two replicas that hold different checkpoints under one step number (a step directory copied
  from another run): each verifies on its own, and ``verify`` said OK. A save writes the same
  commit record to every replica, so differing records are damage of kind ``disagree``.

Real saves with :class:`ckptmirror.Mirror`, the real command line in a subprocess.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
from _agent import serve_command
from _helpers import assert_bit_exact, files_under
from torch import nn

from ckptmirror import Mirror
from ckptmirror.format import commit_key, step_dir

CLI = serve_command()
OBJ = 64 << 10


def cli(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def cli_json(*args: Any) -> tuple[int, dict[str, Any]]:
    p = cli(*args, "--json")
    try:
        return p.returncode, json.loads(p.stdout)
    except ValueError as exc:
        raise AssertionError(f"rc {p.returncode}: {p.stdout}{p.stderr}") from exc


def frozen_model() -> nn.Module:
    torch.manual_seed(0)
    frozen = nn.Linear(256, 256, bias=False)
    frozen.weight.requires_grad_(False)
    return nn.Sequential(frozen, nn.Linear(64, 64))


def save_with_keep_last_1(root: Path, steps: range) -> dict[str, torch.Tensor]:
    """Incremental saves (the local default) with keep_last=1; returns the last step's state."""
    model = frozen_model()
    with Mirror([str(root)], keep_last=1, object_bytes=OBJ) as m:
        for s in steps:
            with torch.no_grad():
                model[1].weight.add_(1)
            m.save(s, model).result(timeout=60)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_dropped_step_kept_for_references_is_not_a_torn_save(tmp_path: Path) -> None:
    root = tmp_path / "run"
    expected = save_with_keep_last_1(root, range(1, 5))
    kept = files_under(root / step_dir(1))
    assert kept and "COMMIT.json" not in kept  # step 1 was dropped; its frozen objects stay

    rc, v = cli_json("verify", root)
    assert rc == 0 and v["status"] == "ok", v
    assert v["torn"] == {} and v["kept_for_references"] == {str(root): [1]}, v
    text = cli("verify", root)
    assert text.returncode == 0 and "torn" not in text.stdout and "garbage" not in text.stdout, text.stdout

    rc, listing = cli_json("ls", root)
    (one,) = [s for s in listing["steps"] if s["step"] == 1]
    assert one["torn_on"] == [] and one["kept_for_references_on"] == [str(root)] and one["garbage"] == {}

    for dry in (True, False):
        rc, pr = cli_json("prune", root, "--keep", "1", *(["--dry-run"] if dry else []))
        assert rc == 0, pr
        (res,) = pr["replicas"]
        assert res["removed_torn"] == [] and res["kept_for_references"] == [1], res
        assert res["removed_garbage"] == [] and res["removed_steps"] == [], res
    text = cli("prune", root, "--keep", "1")
    assert text.returncode == 0 and re.search(r"removed torn saves\s+none", text.stdout), text.stdout
    assert "kept for references" in text.stdout, text.stdout
    assert files_under(root / step_dir(1)) == kept  # nothing referenced was removed

    with Mirror([str(root)]) as m:
        got = frozen_model()
        res = m.restore(got, require=True)
    assert res is not None and res.step == 4
    assert_bit_exact(got.state_dict(), expected)


def test_leftovers_beside_referenced_objects_are_removed_as_leftovers(tmp_path: Path) -> None:
    """What a retention pass stopped by an outage leaves: referenced objects and files nobody
    references, in a directory without a commit record. verify calls it garbage; prune removes
    the unreferenced files (as leftovers), keeps the others, and claims no torn save."""
    root = tmp_path / "run"
    save_with_keep_last_1(root, range(1, 4))
    kept = files_under(root / step_dir(1))
    stray = root / step_dir(1) / "rank-00000" / "o000099-0badf00d.bin"
    stray.write_bytes(b"x" * 100)

    rc, v = cli_json("verify", root)
    assert rc == 0 and v["torn"] == {str(root): [1]} and v["kept_for_references"] == {}, v
    rc, pr = cli_json("prune", root, "--keep", "1")
    assert rc == 0, pr
    (res,) = pr["replicas"]
    assert res["removed_torn"] == [] and res["kept_for_references"] == [1], res
    assert res["removed_garbage"] == [f"{step_dir(1)}/rank-00000/o000099-0badf00d.bin"], res
    assert files_under(root / step_dir(1)) == kept
    rc, v = cli_json("verify", root)
    assert rc == 0 and v["torn"] == {} and v["kept_for_references"] == {str(root): [1]}, v


# ------------------------------------------------------------------ replicas that disagree on a step


def linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(16, 16)


def test_replicas_holding_different_checkpoints_under_one_step_fail_verify(tmp_path: Path) -> None:
    l1, l2, other = tmp_path / "l1", tmp_path / "l2", tmp_path / "other_run"
    ours, theirs = linear(0), linear(1)
    with Mirror([str(l1), str(l2)]) as m:
        m.save(3, ours).result(timeout=60)
    with Mirror([str(other)]) as m:
        m.save(3, theirs).result(timeout=60)
    rc, v = cli_json("verify", l1, l2)
    assert rc == 0, v  # the same save on both: one commit record
    shutil.rmtree(l1 / step_dir(3))
    shutil.copytree(other / step_dir(3), l1 / step_dir(3))

    rc, v = cli_json("verify", l1, l2)
    assert rc == 1 and v["status"] == "damaged", v
    (p,) = v["damage"]
    assert p["kind"] == "disagree" and p["step"] == 3 and p["key"] == commit_key(3), p
    # The restore reads the first replica whose commit is valid (l1 here); the other one is flagged.
    assert p["replica"] == str(l2) and f"reads the one on {l1}" in p["detail"], p
    assert "'ckptmirror repair'" in p["detail"] and "Delete step 3" in p["detail"], p

    text = cli("verify", l1, l2)
    assert text.returncode == 1, text.stdout
    assert "disagree" in text.stdout and str(l1) in text.stdout and str(l2) in text.stdout, text.stdout
    assert "ANOTHER CHECKPOINT" in text.stdout and "can fix them from the good copies" not in text.stdout

    # In the other order the other replica is the one a restore reads.
    rc, v = cli_json("verify", l2, l1)
    assert rc == 1 and [(p["replica"], p["kind"]) for p in v["damage"]] == [(str(l1), "disagree")], v

    # repair does not pick one: it reports the disagreement and fails, changing nothing.
    before = sorted(p.name for p in (l1 / step_dir(3)).rglob("*"))
    l3 = tmp_path / "l3"  # a third replica without the step: repair must not copy either version there
    l3.mkdir()
    r = cli("repair", l2, l1, l3)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "CANNOT REPAIR" in r.stdout and "disagree" in r.stdout and "Delete step 3" in r.stdout, r.stdout
    assert sorted(p.name for p in (l1 / step_dir(3)).rglob("*")) == before
    assert not (l3 / step_dir(3)).exists(), "repair chose one of the two checkpoints"

    # What the message says to do: delete the foreign copy, then repair copies the other one there.
    shutil.rmtree(l1 / step_dir(3))
    r = cli("repair", l1, l2)
    assert r.returncode == 0, r.stdout + r.stderr
    rc, v = cli_json("verify", l1, l2)
    assert rc == 0, v
    got = linear(7)
    with Mirror([str(l1)]) as m:
        m.restore(got, require=True)
    assert_bit_exact(got.state_dict(), ours.state_dict())


def test_a_step_missing_on_one_replica_is_no_disagreement(tmp_path: Path) -> None:
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    with Mirror([str(l1), str(l2)]) as m:
        m.save(1, linear(0)).result(timeout=60)
        m.save(2, linear(1)).result(timeout=60)
    shutil.rmtree(l2 / step_dir(2))
    rc, v = cli_json("verify", l1, l2)
    assert rc == 3 and v["status"] == "lagging" and v["damage"] == [], v


def _flip_a_pinned_checksum(commit: Path) -> None:
    """One bit of the first pinned manifest checksum flipped: the record still parses."""
    data = bytearray(commit.read_bytes())
    at = data.index(b'"xxh3_64:') + len(b'"xxh3_64:')
    while chr(data[at]) not in "0123456789bcde":  # a hex digit whose low bit flip is one too
        at += 1
    data[at] ^= 1
    commit.write_bytes(bytes(data))
    json.loads(data)  # still valid JSON


def test_a_damaged_commit_record_is_not_another_checkpoint(tmp_path: Path) -> None:
    """The first replica's commit record of the newest step has one bit flipped in a pinned
    checksum; the second replica's record of that save is whole. Restore used to read the first
    record, find its manifest nowhere and fall back a step; verify called the good copy foreign
    ("delete step 2 on the replica holding the foreign copy") and repair refused."""
    a, b = tmp_path / "a", tmp_path / "b"
    model = nn.Linear(64, 64)
    saved: dict[int, torch.Tensor] = {}
    with Mirror([str(a), str(b)]) as m:
        for s in (1, 2):
            with torch.no_grad():
                model.weight.add_(1)
            m.save(s, model).result()
            saved[s] = model.weight.detach().clone()
    _flip_a_pinned_checksum(a / commit_key(2))

    target = nn.Linear(64, 64)
    with Mirror([str(a), str(b)]) as m:
        res = m.restore(target, require=True)
    assert res is not None and res.step == 2 and torch.equal(target.weight, saved[2])

    code, doc = cli_json("verify", a, b)
    assert code == 1 and not [p for p in doc["problems"] if p["kind"] == "disagree"], doc["problems"]
    bad = [p for p in doc["damage"] if p["key"] == commit_key(2)]
    assert [(p["replica"], p["kind"]) for p in bad] == [(str(a), "invalid")], doc["damage"]
    assert str(b) in bad[0]["detail"] and "repair" in bad[0]["detail"]

    code, rep = cli_json("repair", a, b)
    assert code == 0, rep
    assert [(x["replica"], x["action"], x["done"]) for x in rep["actions"]] == [(str(a), "replace-commit", True)]
    assert (a / commit_key(2)).read_bytes() == (b / commit_key(2)).read_bytes()
    assert cli("verify", a, b).returncode == 0
    target = nn.Linear(64, 64)
    with Mirror([str(a)]) as m:  # the repaired replica alone
        res = m.restore(target, require=True)
    assert res is not None and res.step == 2 and torch.equal(target.weight, saved[2])


def test_a_restore_never_switches_to_another_save_of_the_step(tmp_path: Path) -> None:
    """Replica a holds save X of step 2 with its rank manifest lost; replica b holds another save
    Y of step 2 (whole). A restore falls back to step 1 rather than take Y's record: the ranks of
    a restore vote on step numbers only, so a rank that switched saves could mix X and Y."""
    a, b = tmp_path / "a", tmp_path / "b"
    model = nn.Linear(16, 16)
    with Mirror([str(a), str(b)]) as m:
        m.save(1, model).result()
    one = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1)
    with Mirror([str(a)]) as m:
        m.save(2, model).result()  # save X, on a
    with torch.no_grad():
        model.weight.add_(1)
    with Mirror([str(b)]) as m:
        m.save(2, model).result()  # save Y, on b
    for p in (a / step_dir(2)).glob("rank-00000-*.json"):
        p.unlink()
    target = nn.Linear(16, 16)
    with Mirror([str(a), str(b)]) as m:
        res = m.restore(target, require=True)
    assert res is not None and res.step == 1 and torch.equal(target.weight, one)
