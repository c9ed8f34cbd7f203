"""The GIL switch interval is short while a restore runs, and put back after."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmirror import Mirror, StateMismatchError
from ckptmirror.restore.switch import RESTORE_SWITCH_INTERVAL, brisk_switching


@pytest.fixture(autouse=True)
def _default_interval() -> Any:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(before)


def test_a_restore_runs_with_a_short_interval_and_puts_the_callers_back(tmp_path: Path, monkeypatch: Any) -> None:
    import ckptmirror.mirror as mirror_mod

    seen: list[float] = []
    real = mirror_mod.Mirror._restore

    def spy(self: Any, *args: Any) -> Any:
        seen.append(sys.getswitchinterval())
        return real(self, *args)

    monkeypatch.setattr(mirror_mod.Mirror, "_restore", spy)
    model = torch.nn.Linear(4, 3)
    with Mirror([str(tmp_path)]) as m:
        m.save(1, model).result(timeout=60)
        sys.setswitchinterval(0.002)
        m.restore(torch.nn.Linear(4, 3))
        assert seen == [pytest.approx(RESTORE_SWITCH_INTERVAL)]
        assert sys.getswitchinterval() == pytest.approx(0.002)
        with pytest.raises(StateMismatchError):  # a failed restore puts it back too
            m.restore(torch.nn.Linear(5, 3))
        assert sys.getswitchinterval() == pytest.approx(0.002)


def test_nested_and_concurrent_uses_share_one_change_and_a_callers_own_change_is_kept() -> None:
    with brisk_switching():
        assert sys.getswitchinterval() == pytest.approx(RESTORE_SWITCH_INTERVAL)
        with brisk_switching():
            pass
        assert sys.getswitchinterval() == pytest.approx(RESTORE_SWITCH_INTERVAL), "the inner exit kept it"
    assert sys.getswitchinterval() == pytest.approx(0.005)
    # Overlapping in two threads: the interval is back only once both are out.
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with brisk_switching():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert inside.wait(10)
        with brisk_switching():
            pass
        assert sys.getswitchinterval() == pytest.approx(RESTORE_SWITCH_INTERVAL), "the other thread is still inside"
    finally:  # (a failure above must not leave the other thread inside for the next tests)
        leave.set()
        t.join(10)
    assert sys.getswitchinterval() == pytest.approx(0.005)
    # A caller that sets its own interval meanwhile keeps it; one shorter already is left alone.
    with brisk_switching():
        sys.setswitchinterval(0.003)
    assert sys.getswitchinterval() == pytest.approx(0.003)
    sys.setswitchinterval(0.0001)
    with brisk_switching():
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    assert sys.getswitchinterval() == pytest.approx(0.0001)


def test_an_interval_the_interpreter_rounds_is_put_back_too() -> None:
    """The interpreter keeps whole microseconds: an interval it rounds is still recognised as
    ours at the end, and the caller's put back."""
    with brisk_switching(0.00012345):
        assert sys.getswitchinterval() < 0.000124
    assert sys.getswitchinterval() == pytest.approx(0.005)
