"""``verify --keep N`` / ``repair --keep N``: what retention removed while a replica was down is
not "lagging".

A job with ``keep_last=2`` saves steps 1 and 2 to replicas A and B; B goes away, and the job
saves 3, 4 and 5 to A alone, whose retention removes 1 to 3. B comes back holding 1 and 2.
Before, verify called A lagging for steps 1 and 2 (exit 3) and repair copied them back onto A,
undoing its retention; B's lag (4 and 5) was reported correctly. With the job's ``keep_last``
given, steps older than the newest N (and not pinned) are retention's to remove: listed as not
kept, not lagging, and not copied. Real CLI runs (the installed entry point) on local replicas.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import ckptmirror
from ckptmirror.format import step_dir

CLI = [sys.executable, "-m", "ckptmirror"]


def cli(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def report(*args: Any) -> tuple[int, dict[str, Any]]:
    p = cli("verify", "--json", "--quick", *args)
    return p.returncode, json.loads(p.stdout)


def state(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64,), float(step)), "b": torch.arange(step, step + 8)}


def test_keep_tells_retention_from_lagging(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with ckptmirror.Mirror([str(a), str(b)], keep_last=2) as m:
        for s in (1, 2):
            m.save_state(s, state(s)).result(timeout=30)
    with ckptmirror.Mirror([str(a)], keep_last=2) as m:  # B is down meanwhile
        for s in (3, 4, 5):
            m.save_state(s, state(s)).result(timeout=30)
        m.wait(timeout=30)
    assert sorted(p.name for p in a.glob("step-*")) == [step_dir(4), step_dir(5)]

    # Without --keep (as before): A "lags" on the steps its retention removed; a hint says why.
    code, rep = report(a, b)
    assert code == 3 and rep["lagging"] == {str(a): [1, 2], str(b): [4, 5]}, rep["lagging"]
    text = cli("verify", "--quick", a, b).stdout
    assert "--keep N" in text, text
    # With --keep 2: only B lags; A's missing steps are listed as not kept.
    code, rep = report("--keep", 2, a, b)
    assert code == 3 and rep["lagging"] == {str(b): [4, 5]}, rep["lagging"]
    assert rep["not_kept"] == {str(a): [1, 2]} and rep["keep"] == 2, rep["not_kept"]
    assert "not kept (--keep 2)" in cli("verify", "--quick", "--keep", 2, a, b).stdout

    p = cli("repair", "--keep", 2, a, b)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "not copied to" in p.stdout and "1, 2" in p.stdout.replace("1-2", "1, 2"), p.stdout
    assert not (a / step_dir(1)).exists() and not (a / step_dir(2)).exists()  # retention not undone
    code, rep = report("--keep", 2, a, b)
    assert code == 0 and rep["lagging"] == {}, rep["lagging"]
    with ckptmirror.Mirror([str(b)]) as m:
        got = m.load_state()
    assert got is not None and got[0] == 5 and torch.equal(got[1]["w"], state(5)["w"])

    # A pinned step is kept by retention: still expected everywhere, so A lags on it.
    with ckptmirror.Mirror([str(b)], keep_last=None) as m:
        m.pin(2)
        m.wait(timeout=30)
    code, rep = report("--keep", 2, a, b)
    assert code == 3 and rep["lagging"] == {str(a): [2]} and rep["not_kept"] == {str(a): [1]}, rep
    assert cli("repair", "--keep", 2, a, b).returncode == 0
    assert (a / step_dir(2)).exists() and not (a / step_dir(1)).exists()


def test_keep_must_be_positive(tmp_path: Path) -> None:
    for cmd in ("verify", "repair"):
        p = cli(cmd, "--keep", 0, tmp_path)
        assert p.returncode == 2 and "--keep" in p.stderr, (cmd, p.stderr)
