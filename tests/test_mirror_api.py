"""Library pieces the framework integrations need: delete, pin, distributed=False, done callbacks."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import torch
from _helpers import REPO, torchrun, wait_until

from ckptmirror import Mirror, StepNotFoundError


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(16, 16)


def committed_dirs(root: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in root.glob("step-*/COMMIT.json"))


def test_replicas_given_as_paths_are_local_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    # storage_options by the path's string, as for a string URL: zstd on b only.
    with Mirror([a, b], storage_options={str(b): {"compression": "zstd"}}) as m:
        m.save(1, model(1)).result(timeout=30)
        assert [r.url for r in m.replicas] == [str(a), str(b)]
    assert committed_dirs(a) == committed_dirs(b) == [1]
    assert list(a.glob("step-*/rank-*/*.bin")) and not list(a.glob("step-*/rank-*/*.zst"))
    assert list(b.glob("step-*/rank-*/*.zst")) and not list(b.glob("step-*/rank-*/*.bin"))
    fresh = model(2)
    with Mirror(b) as m:  # one Path, not in a list
        result = m.restore(fresh)
        assert result is not None and result.step == 1
    assert torch.equal(fresh.weight, model(1).weight)


def test_delete_removes_a_step_from_every_replica(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with Mirror([str(a), str(b)]) as m:
        for s in (1, 2, 3):
            m.save(s, model(s)).result(timeout=30)
        m.delete(2)
        assert m.steps() == [1, 3]
        assert committed_dirs(a) == committed_dirs(b) == [1, 3]
        assert not (a / "step-000000000002").exists() and not (b / "step-000000000002").exists()
        m.save(2, model(9)).result(timeout=30)  # the number is free again
        assert m.steps() == [1, 2, 3]


def test_delete_refuses_the_newest_step_unless_forced_and_unknown_steps(tmp_path: Path) -> None:
    with Mirror([str(tmp_path)]) as m:
        m.save(1, model(1)).result(timeout=30)
        m.save(2, model(2)).result(timeout=30)
        with pytest.raises(ValueError, match="newest"):
            m.delete(2)
        assert m.steps() == [1, 2]
        with pytest.raises(StepNotFoundError):
            m.delete(7)
        m.delete(2, force=True)
        assert m.steps() == [1]
        fresh = model(5)
        res = m.restore(fresh)
        assert res is not None and res.step == 1 and torch.equal(fresh.weight, model(1).weight)


def test_pinned_step_survives_retention_and_does_not_count(tmp_path: Path) -> None:
    with Mirror([str(tmp_path)], keep_last=2) as m:
        m.save(1, model(1)).result(timeout=30)
        m.pin(1)
        for s in (2, 3, 4, 5):
            m.save(s, model(s)).result(timeout=30)
        m.wait()
        assert committed_dirs(tmp_path) == [1, 4, 5]
        m.unpin(1)
        m.save(6, model(6)).result(timeout=30)
        m.wait()
        assert committed_dirs(tmp_path) == [5, 6]


def test_done_callback_runs_once_with_the_outcome(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[int, float | None]] = []
    called = threading.Event()

    def record(h) -> None:  # type: ignore[no-untyped-def]
        seen.append((h.step, h.committed_s))
        called.set()

    with Mirror([str(tmp_path)]) as m:
        h = m.save(1, model(1))
        h.add_done_callback(record)
        h.result(timeout=30)
        wait_until(called.is_set, timeout=10)
        late: list[int] = []
        h.add_done_callback(lambda h: late.append(h.step))  # already done: called at once
        assert late == [1]

        def boom(h) -> None:  # type: ignore[no-untyped-def]
            raise RuntimeError("tracker down")

        with caplog.at_level(logging.ERROR, logger="ckptmirror"):
            h2 = m.save(2, model(2))
            h2.add_done_callback(boom)
            h2.result(timeout=30)
            wait_until(lambda: any("done callback" in r.getMessage() for r in caplog.records), timeout=10)
    assert len(seen) == 1 and seen[0][0] == 1 and seen[0][1] is not None and seen[0][1] > 0


def test_private_mirror_on_one_rank_does_not_wait_for_the_others(tmp_path: Path) -> None:
    torchrun(str(REPO / "tests" / "_private_child.py"), str(tmp_path), timeout=120)
    out = json.loads((tmp_path / "private.json").read_text())
    assert out == {"step": 1, "equal": True}
