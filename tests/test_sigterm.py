"""Elastic shutdown: SIGTERM during a background save commits it, then the process exits."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import REPO

import ckptmirror

CHILD = str(REPO / "tests" / "_sigterm_child.py")


def expected(step: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    if step == 2:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    return model


def start(root: Path, delay_s: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, CHILD, str(root), str(delay_s)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "saving 2", line
    return proc


def restored(root: Path) -> tuple[int, torch.nn.Module]:
    model = expected(1)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with ckptmirror.Mirror([str(root)]) as m:
        res = m.restore(model, require=True)
    assert res is not None
    return res.step, model


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_sigterm_during_a_background_save_commits_it_then_exits(tmp_path: Path) -> None:
    # ~33 objects at 0.05 s each: the save takes ~1.7 s; SIGTERM arrives right after it started.
    proc = start(tmp_path, 0.05)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == -signal.SIGTERM, "the process exits by SIGTERM, as it would have without ckptmirror"
    assert time.monotonic() - t0 < 30
    step, model = restored(tmp_path)
    assert step == 2 and same(model, expected(2))


def test_sigterm_while_save_is_still_copying_commits_that_save(tmp_path: Path) -> None:
    # The SIGTERM lands inside save(2), before its job is queued: the flush used to find nothing
    # in flight, log "committed" and exit at once, and step 2 was lost (restored: step 1).
    proc = subprocess.Popen(
        [sys.executable, CHILD, str(tmp_path), "0.05", "in-save"], stdout=subprocess.PIPE, text=True
    )
    rc = proc.wait(timeout=60)
    assert rc == -signal.SIGTERM
    step, model = restored(tmp_path)
    assert step == 2 and same(model, expected(2))


def test_sigkill_after_the_grace_period_keeps_the_previous_step(tmp_path: Path) -> None:
    # A save far too slow for the grace period: the launcher's SIGKILL wins; step 1 is intact.
    proc = start(tmp_path, 1.0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    assert proc.poll() is None, "still committing"
    proc.kill()
    proc.wait(timeout=30)
    step, model = restored(tmp_path)
    assert step == 1 and same(model, expected(1))


def test_bad_policy_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="on_sigterm"):
        ckptmirror.Mirror([str(tmp_path)], on_sigterm="later")  # type: ignore[arg-type]
    monkeypatch.setenv("CKPTMIRROR_ON_SIGTERM", "flush")
    before = signal.getsignal(signal.SIGTERM)
    with ckptmirror.Mirror([str(tmp_path)]):
        assert signal.getsignal(signal.SIGTERM) != before  # installed from the environment
    assert signal.getsignal(signal.SIGTERM) == before  # and put back by close()
