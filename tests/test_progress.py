"""Progress lines: the Progress counter itself, and the lines a restore of many objects logs."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmirror import EnvConfigError, Mirror
from ckptmirror.config import ENV_PROGRESS_INTERVAL_S
from ckptmirror.progress import Progress, format_bytes, format_seconds

LOG = logging.getLogger("ckptmirror.test-progress")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def progress_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if hasattr(r, "progress")]


def test_progress_logs_at_most_once_per_interval_with_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ckptmirror")
    clock = FakeClock()
    p = Progress(4 << 20, "copy of x", LOG, interval_s=2.0, clock=clock)
    clock.now += 1.0
    p.advance(1 << 20)
    assert not progress_records(caplog)  # within the first interval: quiet
    clock.now += 1.0
    p.advance(1 << 20)  # 2 MiB in 2 s
    p.advance(0)  # same instant: not a second line
    recs = progress_records(caplog)
    assert len(recs) == 1
    assert recs[0].levelno == logging.INFO
    assert recs[0].getMessage() == "copy of x: 2.0 MiB of 4.0 MiB (50%), 1.0 MiB/s, ETA 2.0 s"
    nums: Any = getattr(recs[0], "progress")  # noqa: B009 - set through `extra`
    assert nums["done_bytes"] == 2 << 20 and nums["total_bytes"] == 4 << 20 and not nums["final"]
    assert nums["bytes_per_s"] == pytest.approx(1 << 20) and nums["eta_s"] == pytest.approx(2.0)
    clock.now += 2.0
    p.advance(2 << 20)
    p.close()
    p.close()  # once only
    recs = progress_records(caplog)
    assert len(recs) == 3
    assert recs[-1].getMessage() == "copy of x: read 4.0 MiB in 4.0 s (1.0 MiB/s)"
    assert getattr(recs[-1], "progress")["final"]  # noqa: B009


def test_progress_counts_exactly_from_many_threads_and_reports_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ckptmirror")
    total = 8 * 1000 * 3
    with pytest.raises(RuntimeError):
        with Progress(total * 2, "restore of step 5", LOG, interval_s=1e-9) as p:
            threads = [threading.Thread(target=lambda: [p.advance(3) for _ in range(1000)]) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert p.done_bytes == total
            raise RuntimeError("boom")
    final = progress_records(caplog)[-1]
    msg = final.getMessage()
    assert msg.startswith(f"restore of step 5: failed after reading {format_bytes(total)} of {format_bytes(total * 2)}")
    assert getattr(final, "progress")["done_bytes"] == total  # noqa: B009
    assert len(progress_records(caplog)) > 2  # lines came from the reader threads too


def test_progress_beyond_its_total_raises_the_total() -> None:
    clock = FakeClock()
    p = Progress(10, "x", LOG, interval_s=1.0, clock=clock)
    p.advance(25)
    assert p.done_bytes == 25
    with pytest.raises(ValueError):
        Progress(10, "x", LOG, interval_s=0)


def test_formats() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 << 30) == "3.0 GiB"
    assert format_seconds(4.25) == "4.2 s" or format_seconds(4.25) == "4.3 s"
    assert format_seconds(42) == "42 s"
    assert format_seconds(185) == "3 min 05 s"
    assert format_seconds(7620) == "2 h 07 min"


def net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.ReLU(), torch.nn.Linear(96, 40))


def test_restore_of_many_objects_logs_progress_with_bytes_and_rate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PROGRESS_INTERVAL_S, "0.000001")
    src = net(1)
    with Mirror([str(tmp_path / "a"), str(tmp_path / "b")], object_bytes=4096) as m:
        h = m.save(3, src).result(timeout=30)
        caplog.clear()
        caplog.set_level(logging.INFO, logger="ckptmirror")
        dst = net(2)
        res = m.restore(dst)
        assert res is not None and res.step == 3 and len(res.sources) > 10  # many objects
        assert all(torch.equal(x, y) for x, y in zip(src.state_dict().values(), dst.state_dict().values()))
        recs = progress_records(caplog)
        lines = [r.getMessage() for r in recs]
        assert len(recs) >= 3, lines
        assert all(line.startswith("restore of step 3: ") for line in lines), lines
        assert all("/s" in line for line in lines), lines
        assert any(" of " in line and "ETA" in line for line in lines[:-1]), lines
        final = getattr(recs[-1], "progress")  # noqa: B009
        # every object counted once
        assert final["final"] and final["done_bytes"] == final["total_bytes"] == h.nbytes
        assert lines[-1].startswith(f"restore of step 3: read {format_bytes(h.nbytes)} in ")

        # load_state reads into fresh buffers through fetch(), which calls fetch_into(): counted once
        caplog.clear()
        loaded = m.load_state()
        assert loaded is not None and loaded[0] == 3
        assert getattr(progress_records(caplog)[-1], "progress")["done_bytes"] == h.nbytes  # noqa: B009


def test_restore_quiet_at_warning_and_bad_interval_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Mirror([str(tmp_path)], object_bytes=4096) as m:
        m.save(1, net(1)).result(timeout=30)
        caplog.set_level(logging.WARNING, logger="ckptmirror")
        assert m.restore(net(2)) is not None
        assert not progress_records(caplog)  # INFO lines only: an app at WARNING sees none
        monkeypatch.setenv(ENV_PROGRESS_INTERVAL_S, "soon")
        with pytest.raises(EnvConfigError, match=f"{ENV_PROGRESS_INTERVAL_S}.*'soon'.*positive number"):
            m.restore(net(2))
