"""The background save threads run at a lower CPU priority (a raised nice value, Linux); the
thread that calls save() never does (an unprivileged process could not lower it back)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import torch

from ckptmirror import EnvConfigError, Mirror, config
from ckptmirror.save import priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")

POOLS = ("ckptmirror-hash", "ckptmirror-io", "ckptmirror-replica", "ckptmirror-retention")


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def _save_from_a_training_thread(tmp_path: Path) -> tuple[int, int, dict[str, int]]:
    """Save twice from a fresh (non-main) thread; its nice value before and after, and each
    pool thread's nice value (read before the mirror closes)."""
    model = torch.nn.Linear(64, 64)
    seen: dict[str, int] = {}
    out: list[int] = []

    def train() -> None:
        me = threading.get_native_id()
        out.append(_nice(me))
        with Mirror([str(tmp_path / "a"), str(tmp_path / "b")], keep_last=1, object_bytes=4096) as m:
            for step in (1, 2):  # the second save's retention pass uses the retention thread
                with torch.no_grad():
                    model.weight.add_(1.0)
                m.save(step, model).result()
            m.wait()
            out.append(_nice(me))
            for t in threading.enumerate():
                if t.name.startswith(POOLS) and t.native_id is not None:
                    seen[t.name] = _nice(t.native_id)

    t = threading.Thread(target=train, name="trainer")
    t.start()
    t.join()
    assert len(out) == 2
    return out[0], out[1], seen


def test_background_threads_are_lowered_and_the_caller_is_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.ENV_BACKGROUND_NICE, raising=False)
    main_before = _nice(threading.get_native_id())
    before, after, seen = _save_from_a_training_thread(tmp_path)
    assert after == before, "the thread that called save() must keep its priority"
    assert _nice(threading.get_native_id()) == main_before
    assert {name.rsplit("_", 1)[0] for name in seen} == set(POOLS), seen
    want = max(before, config.DEFAULT_BACKGROUND_NICE)
    assert all(n == want for n in seen.values()), seen


def test_background_nice_zero_leaves_every_thread_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_BACKGROUND_NICE, "0")
    before, after, seen = _save_from_a_training_thread(tmp_path)
    assert after == before
    assert seen and all(n == before for n in seen.values()), seen


def test_background_nice_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.ENV_BACKGROUND_NICE, raising=False)
    assert config.background_nice() == config.DEFAULT_BACKGROUND_NICE
    monkeypatch.setenv(config.ENV_BACKGROUND_NICE, " 19 ")
    assert config.background_nice() == 19
    for bad in ("-1", "20", "low", "1.5"):
        monkeypatch.setenv(config.ENV_BACKGROUND_NICE, bad)
        with pytest.raises(EnvConfigError, match="CKPTMIRROR_BACKGROUND_NICE"):
            config.background_nice()
        with pytest.raises(EnvConfigError, match="CKPTMIRROR_BACKGROUND_NICE"):
            Mirror([str(tmp_path / "r")])  # when the mirror is created, not at the first save


def test_lower_priority_never_touches_the_main_thread() -> None:
    me = threading.get_native_id()
    before = _nice(me)
    priority.lower_priority(19)
    assert _nice(me) == before
