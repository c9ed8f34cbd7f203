"""Several ranks train a damaged step again and save it: the damaged copies are replaced.

Rank 0's copy of step 2 fails its checks on every replica, so a restarted job restores step 1
on every rank and trains step 2 again. Before, its ``save(2)`` raised ``StepExistsError`` on every
rank (a committed step, and ``overwrite=True`` is refused with several ranks): the job stopped at
the same step after every restart. One process could already re-save such a step; now several
ranks do too, agreeing on which steps were damaged in the restore's votes and erasing the old
copies everywhere before any rank writes the new one.
"""

from __future__ import annotations

import json
from pathlib import Path

from _helpers import torchrun

from ckptmirror.format import step_dir

CHILD = Path(__file__).resolve().parent / "_resave_child.py"


def _results(root: Path, mode: str) -> list[dict]:
    return [json.loads((root / f"{mode}-{r}.json").read_text()) for r in (0, 1)]


def _damage_rank0_step2(root: Path) -> int:
    """Flip a byte in every object of rank 0's copy of step 2, on every replica."""
    hit = 0
    for replica in ("local-0", "shared"):
        for f in sorted((root / replica / step_dir(2) / "rank-00000").glob("*.bin")):
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
            hit += 1
    return hit


def test_several_ranks_resave_a_step_the_restore_skipped_as_damaged(tmp_path: Path) -> None:
    root = tmp_path / "job"
    root.mkdir()
    torchrun(str(CHILD), "save", str(root), timeout=180)
    assert _damage_rank0_step2(root) >= 2
    torchrun(str(CHILD), "resume", str(root), timeout=180)
    res = _results(root, "resume")
    for r in res:
        assert r["restored"] == 1 and r["restored_exact"], r
        assert r["save2"] == ["committed"], r  # every replica of the rank committed the new copy
        assert r["save3"] == ["committed"], r
    # Nothing of the damaged copy is left: one manifest per rank in step 2 on each replica.
    for replica in ("local-0", "local-1", "shared"):
        manifests = sorted(p.name for p in (root / replica / step_dir(2)).glob("rank-*.json"))
        ranks = {n[: len("rank-00000")] for n in manifests}
        assert len(manifests) == len(ranks), (replica, manifests)
    torchrun(str(CHILD), "restore", str(root), timeout=180)
    for r in _results(root, "restore"):
        assert r["newest"] == 3 and r["newest_exact"] and r["step2_exact"], r


def test_a_replica_that_cannot_be_erased_is_reported_and_the_barrier_still_met(tmp_path: Path) -> None:
    # Unit level (one process): erase_for_resave on a replica whose deletes fail with an outage
    # and on one that answers. The first keeps its old step and is reported (the save must not
    # be written there), the second loses it; the barrier is met either way, after the erasing.
    import errno

    import torch

    import ckptmirror
    from ckptmirror.replicas import FaultyReplica, LocalReplica
    from ckptmirror.save.resave import erase_for_resave
    from ckptmirror.save.retention import is_committed

    a, b = tmp_path / "a", tmp_path / "b"
    with ckptmirror.Mirror([str(a), str(b)]) as m:
        m.save_state(2, {"w": torch.arange(10.0)}).result(timeout=30)
        m.wait(timeout=30)

    def down(phase: str, key: str) -> None:
        if phase == "delete":
            raise OSError(errno.EIO, "Input/output error (injected)")

    bad, good = FaultyReplica(LocalReplica(str(a)), on_phase=down), LocalReplica(str(b))
    met: list[bool] = []
    failed = erase_for_resave(
        [bad, good],
        2,
        lambda url: (),
        lambda r: lambda: None,
        lambda ok: met.append(ok and not is_committed(good, 2)) or [ok],
    )
    assert met == [True]
    assert list(failed) == [bad.url] and isinstance(failed[bad.url], OSError), failed
    assert is_committed(bad, 2) and not is_committed(good, 2)


def test_a_rank_that_gives_up_erasing_still_meets_the_barrier_and_every_rank_stops(tmp_path: Path) -> None:
    # Something unexpected raised while erasing: the barrier is still met (with "not done"), so
    # no other rank waits for this one, and a rank that hears of it raises instead of writing.
    import pytest

    from ckptmirror.errors import CoordinationError
    from ckptmirror.replicas import LocalReplica
    from ckptmirror.save.resave import erase_for_resave

    told: list[bool] = []

    def broken_live(url: str) -> tuple[str, ...]:
        raise RuntimeError("a bug")

    r = LocalReplica(str(tmp_path))
    r.commit("step-000000000002/COMMIT.json", b"{}")  # anything: is_committed looks for the name
    with pytest.raises(RuntimeError, match="a bug"):
        erase_for_resave([r], 2, broken_live, lambda r: lambda: None, lambda ok: told.append(ok) or [ok])
    assert told == [False]
    # The other ranks' view: one rank gave up, so nobody writes.
    with pytest.raises(CoordinationError, match=r"rank\(s\) \[1\]"):
        erase_for_resave([], 2, lambda u: (), lambda r: lambda: None, lambda ok: [ok, False])
