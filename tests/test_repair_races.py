"""``repair`` where its own threads, a damaged placement record, or another command get in the way.

* many compressed objects of one writer repaired on several threads: every one ends up raw
  under its own name and out of the placement record (the threads once rewrote the record
  without a lock and lost each other's changes: repair said done, the objects stayed corrupt);
* a damaged placement record: ``verify`` names it (``invalid``, not "missing"), ``repair``
  stores the writer's objects raw from the other replica and removes the record;
* a torn save whose files something else deletes while repair copies the rest (``prune``):
  repair does not write the commit record over the hole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from _helpers import assert_bit_exact, files_under

from ckptmirror import Mirror
from ckptmirror.format import commit_key
from ckptmirror.ops import repair, verify
from ckptmirror.placement import Placement, parse_placement
from ckptmirror.replicas.local import LocalReplica


def _state(seed: int, n: int = 24) -> dict[str, Any]:
    """bf16 weights that compress, each a few 8 KiB objects: many compressed objects, one writer."""
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": (torch.randn(16384, generator=g) * 0.02).to(torch.bfloat16) for i in range(n)}


def _save(urls: list[str], state: dict[str, Any], comp: Path, step: int = 1) -> None:
    opts = {str(comp): {"compression": "zstd"}}
    with Mirror(urls, object_bytes=8 << 10, storage_options=opts) as m:
        m.save_state(step, state).result(timeout=60)


def _placement(root: Path, step: int = 1) -> Placement | None:
    found = [f for f in files_under(root) if f.endswith(".place.json") and f.startswith(f"step-{step:012d}/")]
    assert len(found) <= 1, found
    return parse_placement((root / found[0]).read_bytes(), found[0]) if found else None


def _load(urls: list[str]) -> Any:
    with Mirror(urls) as m:
        got = m.load_state(require=True)
    assert got is not None
    return got[1]


def test_parallel_repair_of_many_compressed_objects_leaves_none_behind(tmp_path: Path) -> None:
    raw, comp = tmp_path / "raw", tmp_path / "zstd"
    state = _state(1)
    _save([str(comp), str(raw)], state, comp)
    p = _placement(comp)
    assert p is not None and len(p.entries) >= 40, "the state should give many compressed objects"
    for st in p.entries.values():
        (comp / st.key).write_bytes(b"\x00" * st.size)  # same size, wrong bytes
    assert len(verify([str(comp)]).damage) == len(p.entries)

    report = repair([str(raw), str(comp)], threads=8)
    assert report.exit_code == 0, report
    assert sum(a.done for a in report.actions) == len(p.entries)
    # Every repaired object left the record (the record is gone once it is empty).
    left = _placement(comp)
    assert left is None or not set(left.entries) & set(p.entries), sorted(left.entries)
    assert verify([str(comp)]).exit_code == 0
    assert_bit_exact(_load([str(comp)]), state, "from the repaired replica: ")


def test_a_damaged_placement_record_is_named_and_repair_replaces_it(tmp_path: Path) -> None:
    raw, comp = tmp_path / "raw", tmp_path / "zstd"
    state = _state(2, n=6)
    _save([str(comp), str(raw)], state, comp)
    p = _placement(comp)
    assert p is not None
    path = comp / p.key
    path.write_bytes(path.read_bytes().replace(b'"zstd"', b'"zstf"', 1))  # fails its self-checksum

    damage = verify([str(comp), str(raw)]).damage
    assert damage, "a damaged placement record went unreported"
    # Named as what it is: the record is damaged, the objects are not "missing: not found".
    assert {d.kind for d in damage} == {"invalid"}, damage
    assert all(p.key in d.detail and d.replica == str(comp) for d in damage), damage

    before = {f: (comp / f).read_bytes() for f in files_under(comp)}
    dry = repair([str(raw), str(comp)], dry_run=True)
    assert [(a.action, a.key, a.done) for a in dry.actions if a.action == "delete-placement"] == [
        ("delete-placement", p.key, False)
    ], dry.actions
    assert {f: (comp / f).read_bytes() for f in files_under(comp)} == before, "a dry run wrote"

    report = repair([str(raw), str(comp)])
    assert report.exit_code == 0, report
    deleted = [a for a in report.actions if a.action == "delete-placement"]
    assert [(a.key, a.done) for a in deleted] == [(p.key, True)], report.actions
    assert not path.exists()
    assert verify([str(comp)]).exit_code == 0
    assert_bit_exact(_load([str(comp)]), state, "from the repaired replica alone: ")
    again = repair([str(raw), str(comp)])
    assert (again.exit_code, again.actions) == (0, ())


def _torn_on_a(tmp_path: Path, seed: int) -> tuple[Path, Path, dict[str, Any], list[str]]:
    """Step 1 saved to ``a`` and ``b``, then torn on ``a``: no commit record, its first object
    missing (repair copies it), the rest there. Returns a, b, the state, a's object keys."""
    a, b = tmp_path / "a", tmp_path / "b"
    state = _state(seed, n=4)
    with Mirror([str(a), str(b)], object_bytes=8 << 10) as m:
        m.save_state(1, state).result(timeout=60)
    objs = sorted(f for f in files_under(a) if f.endswith(".bin") and "/rank-00000/" in f)
    assert len(objs) >= 3
    (a / commit_key(1)).unlink()
    (a / objs[0]).unlink()
    return a, b, state, objs


class _PruneMeanwhile(LocalReplica):
    """A local replica where, at repair's first write, "someone else" (``prune`` removing a torn
    save) deletes a file of the step that repair had already verified."""

    victim: Path | None = None

    def put(self, key: str, data: Any) -> None:
        if self.victim is not None and self.victim.exists():
            self.victim.unlink()
        super().put(key, data)


def test_repair_does_not_commit_over_a_file_deleted_while_it_copied(tmp_path: Path) -> None:
    a, b, state, objs = _torn_on_a(tmp_path, 3)
    victim = _PruneMeanwhile(str(a))
    victim.victim = a / objs[-1]

    report = repair([str(b), victim])
    commits = [x for x in report.actions if x.action == "commit"]
    assert len(commits) == 1 and not commits[0].done, report.actions
    assert commits[0].error is not None and objs[-1] in commits[0].error, commits[0].error
    assert report.exit_code == 1
    assert not (a / commit_key(1)).exists(), "a commit record over a missing object"

    # Once nothing else deletes, a second run completes the step there.
    again = repair([str(b), str(a)])
    assert again.exit_code == 0, again
    assert verify([str(a)]).exit_code == 0
    assert_bit_exact(_load([str(a)]), state, "from the repaired replica alone: ")


class _PruneRightAfterCommit(LocalReplica):
    """A local replica where "someone else" (a prune that listed the torn save before repair
    committed it) deletes one of the step's files right after repair's commit record lands."""

    victim: Path | None = None

    def commit(self, key: str, data: bytes) -> None:
        super().commit(key, data)
        if self.victim is not None and self.victim.exists():
            self.victim.unlink()


def test_repair_takes_its_commit_back_when_a_file_goes_right_after(tmp_path: Path) -> None:
    a, b, state, objs = _torn_on_a(tmp_path, 4)
    target = _PruneRightAfterCommit(str(a))
    target.victim = a / objs[-1]

    report = repair([str(b), target])
    (commit,) = [x for x in report.actions if x.action == "commit"]
    assert not commit.done and commit.error is not None and "taken back" in commit.error, commit
    assert not (a / commit_key(1)).exists(), "a commit record stayed over a missing object"
    assert repair([str(b), str(a)]).exit_code == 0
    assert_bit_exact(_load([str(a)]), state, "from the repaired replica alone: ")


def test_one_run_repairs_a_manifest_whose_only_good_copy_is_beside_a_damaged_placement_record(
    tmp_path: Path,
) -> None:
    """Replica a (raw) lost its rank manifest to a flipped byte; replica b (compressed) holds the
    good manifest and a damaged placement record. The manifest was fetched through b's placement
    record (a manifest is never placed): the first repair failed its copy, exit 1, and only a
    second run finished. One run now copies it raw and stores b's objects raw."""
    a, b = tmp_path / "a", tmp_path / "b"
    state = _state(3, n=4)
    _save([str(a), str(b)], state, b)
    manifest = next(
        p for p in (a / "step-000000000001").glob("rank-00000-*.json") if not p.name.endswith(".place.json")
    )
    data = bytearray(manifest.read_bytes())
    data[40] ^= 1
    manifest.write_bytes(bytes(data))
    record = next((b / "step-000000000001").glob("*.place.json"))
    data = bytearray(record.read_bytes())
    data[40] ^= 1
    record.write_bytes(bytes(data))
    rep = repair([str(a), str(b)])
    assert rep.exit_code == 0 and all(x.done for x in rep.actions), rep
    assert verify([str(a), str(b)]).exit_code == 0
    for root in (a, b):
        with Mirror([str(root)]) as m:
            loaded = m.load_state(require=True)
        assert loaded is not None and loaded[0] == 1
        assert_bit_exact(loaded[1], state)


def test_one_run_completes_a_compressed_replica_that_lost_an_object_and_its_commit(tmp_path: Path) -> None:
    """Replica b (zstd) lost one stored ``.zst`` and its commit record. Repair copied the object
    raw, then its check for files deleted meanwhile looked for the ``.zst`` the placement record
    read before the copy still named, reported a concurrent delete (nothing else ran) and
    committed nothing; a second run finished. One run commits now."""
    a, b = tmp_path / "a", tmp_path / "b"
    state = _state(5, n=4)
    _save([str(a), str(b)], state, b)
    victim = sorted((b / "step-000000000001" / "rank-00000").glob("*.zst"))[0]
    victim.unlink()
    (b / commit_key(1)).unlink()
    rep = repair([str(a), str(b)])
    assert rep.exit_code == 0 and all(x.done for x in rep.actions), rep
    assert [x.action for x in rep.actions if x.action.endswith("commit")] == ["commit"]
    assert verify([str(b)]).exit_code == 0
    with Mirror([str(b)]) as m:
        loaded = m.load_state(require=True)
    assert loaded is not None and loaded[0] == 1
    assert_bit_exact(loaded[1], state)
