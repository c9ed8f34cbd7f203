"""Retention on a replica that stops answering: the pass stops at once, it does not hold close().

With incremental saves, dropping the step that stored a frozen base deletes its other files one
by one (the base stays: later steps reference it). Before the fix, each delete on a stalled peer
waited its whole time budget and the failure was swallowed, so ``Mirror.wait()`` and ``close()``
waited one budget per file (95 s measured with 20 files and the default 5 s budget). Now a
removal pass stops at the first outage (or as soon as the replica is marked degraded), logs once
what it left, marks the replica degraded, and a later pass or ``ckptmirror prune`` removes the
rest.

The stall is real: a ``ckptmirror serve`` agent SIGSTOPped (by the replica object, at the first
delete of an object file, so that it happens in the middle of the pass) and SIGCONTed later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _agent import TOKEN, AgentProc, agent, serve_command
from _helpers import assert_bit_exact, ck_warnings, files_under
from torch import nn

from ckptmirror import Mirror, ops
from ckptmirror.errors import ReplicaUnavailableError
from ckptmirror.format import commit_key, step_dir
from ckptmirror.replicas import LocalReplica
from ckptmirror.replicas.peer import PeerReplica
from ckptmirror.save.retention import RetentionStopped, delete_quietly, remove_steps

OBJ = 64 << 10
TRAINABLE = 16  # 128 x 128 float32 = one 64 KiB object each: the files retention deletes one by one
BUDGET_S = 1.5  # connect_timeout_s of the peer: each stalled operation fails after this long
CLI = serve_command()


class StallOnDelete(PeerReplica):
    """A peer client that, once ``armed``, SIGSTOPs its agent just before the first delete of an
    object file: the agent stops answering in the middle of a retention pass. Counts the deletes
    asked for after that."""

    def __init__(self, url: str, pid: int, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.pid = pid
        self.armed = False
        self.stopped = threading.Event()
        self.deletes_after_stop = 0

    def delete(self, key: str) -> None:
        if self.stopped.is_set():
            self.deletes_after_stop += 1
        elif self.armed and key.endswith(".bin"):
            os.kill(self.pid, signal.SIGSTOP)
            self.stopped.set()
        super().delete(key)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    frozen = nn.Linear(256, 256, bias=False)
    frozen.weight.requires_grad_(False)
    train = nn.Sequential(*[nn.Linear(128, 128, bias=False) for _ in range(TRAINABLE)])
    return nn.Sequential(frozen, train)


def bump(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1)


def cli(*args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


@contextlib.contextmanager
def resumed_at_exit(proc: subprocess.Popen[str]) -> Iterator[None]:
    """SIGCONT the agent whatever happens, so that its SIGTERM at teardown can work."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)


def test_close_returns_within_a_budget_when_the_peer_stalls_during_retention(
    tmp_path: Path, peer_token_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ckptmirror")
    local = tmp_path / "local"
    with agent(tmp_path / "agent", token_file=peer_token_file, args=["--reserve-free-bytes", "0"]) as a:
        assert isinstance(a, AgentProc)
        peer = StallOnDelete(a.url("run"), a.proc.pid, token=TOKEN, connect_timeout_s=BUDGET_S)
        ns = Path(a.root) / "run"
        model = make_model()
        with resumed_at_exit(a.proc):
            # health_interval_s: no heartbeat during the test; the pass itself must notice the stall.
            m = Mirror([str(local), peer], keep_last=1, object_bytes=OBJ, health_interval_s=3600)
            m.save(1, model).result(timeout=60)
            m.wait()
            assert len(files_under(ns / step_dir(1))) >= TRAINABLE + 2
            bump(model)
            expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
            peer.armed = True
            h = m.save(2, model)
            h.result(timeout=60)
            assert {u: s.state for u, s in h.replicas.items()} == {str(local): "committed", peer.url: "committed"}

            t0 = time.monotonic()
            m.wait()
            waited = time.monotonic() - t0
            health = m.health()[peer.url]
            m.close()
            took = time.monotonic() - t0

            assert peer.stopped.is_set(), "the agent was never stopped: retention deleted no object file"
            # The old behaviour: one budget per file left (>= 10 here); now the one delete in flight.
            assert took < 3 * BUDGET_S, f"wait() {waited:.1f} s, wait()+close() {took:.1f} s (budget {BUDGET_S} s)"
            assert peer.deletes_after_stop == 0
            assert health.startswith("degraded"), health
            left_on_peer = set(files_under(ns / step_dir(1))) - set(files_under(local / step_dir(1)))
            assert len(left_on_peer) >= 10, left_on_peer  # what the old pass would have paid a budget each for

            warnings = ck_warnings(caplog)
            stopped = [w for w in warnings if "stopped removing old steps" in w]
            assert len(stopped) == 1, warnings
            assert peer.url in stopped[0] and "file(s) of step 1" in stopped[0], stopped[0]
            assert not [w for w in warnings if "could not delete" in w], warnings

            # Nothing committed on the local replica is lost: step 2 restores bit-exact from it alone.
            with Mirror([str(local)]) as lm:
                got = make_model()
                res = lm.restore(got, require=True)
                assert res is not None and res.step == 2
                assert_bit_exact(got.state_dict(), expected)

            os.kill(a.proc.pid, signal.SIGCONT)
            env = {"CKPTMIRROR_PEER_TOKEN": TOKEN}
            # The step stayed committed on the peer; its leftovers are garbage that prune removes.
            assert (ns / commit_key(2)).exists()
            pr = cli("prune", peer.url, "--keep", "1", "--json", env=env)
            assert pr.returncode == 0, pr.stdout + pr.stderr
            # Only the objects step 2 references are left of step 1, on both replicas.
            assert files_under(ns / step_dir(1)) == files_under(local / step_dir(1))
            assert files_under(local / step_dir(1)), "step 2 references step 1's frozen objects"
            v = cli("verify", str(local), peer.url, env=env)
            assert v.returncode == 0, v.stdout + v.stderr
            assert "torn" not in v.stdout, v.stdout
            peer.close()


# ------------------------------------------------------------------ the pass itself, without an agent


class DownAfter(LocalReplica):
    """A local replica whose deletes of object files fail as an outage from the ``n``-th on.
    ``deletes``: object file deletes asked for; ``calls``: every delete asked for."""

    def __init__(self, root: str, n: int) -> None:
        super().__init__(root)
        self.n = n
        self.deletes = 0
        self.calls = 0

    def delete(self, key: str) -> None:
        self.calls += 1
        if key.endswith(".bin"):
            self.deletes += 1
            if self.deletes >= self.n:
                raise ReplicaUnavailableError("injected: no answer within its time budget", replica=self.url, key=key)
        super().delete(key)


def save_two(root: Path) -> None:
    model = make_model()
    with Mirror([str(root)], object_bytes=OBJ) as m:
        m.save(1, model).result(timeout=60)
        bump(model)
        m.save(2, model).result(timeout=60)


def test_remove_steps_stops_at_the_first_outage_and_says_what_it_left(tmp_path: Path) -> None:
    save_two(tmp_path)
    r = DownAfter(str(tmp_path), 3)
    with pytest.raises(RetentionStopped) as info:
        remove_steps(r, [1])
    assert r.deletes == 3  # two deleted, the third failed, none tried after it
    assert isinstance(info.value.cause, ReplicaUnavailableError)
    left = len(files_under(tmp_path / step_dir(1)))
    assert "file(s) of step 1" in str(info.value) and str(tmp_path) in str(info.value)
    assert not (tmp_path / commit_key(1)).exists()  # the commit record went first
    assert left >= TRAINABLE - 2
    # A later pass removes the rest (step 1 is torn-looking now; step 2 still references its base).
    remove_steps(LocalReplica(str(tmp_path)), [], [1])
    refs = ops.ls([str(tmp_path)]).steps[0]
    assert refs.step == 1 and refs.kept_for_references_on == (str(tmp_path),) and not refs.torn_on


def test_remove_steps_stops_when_told_to(tmp_path: Path) -> None:
    save_two(tmp_path)
    r = DownAfter(str(tmp_path), 10**9)
    calls = iter(range(100))

    def stop() -> str | None:
        return "the replica was marked degraded meanwhile" if next(calls) >= 4 else None

    with pytest.raises(RetentionStopped, match="marked degraded meanwhile"):
        remove_steps(r, [1], stop=stop)
    # Asked before the commit record, before the directory and before each file: the commit
    # record and two files went, then the fifth answer stopped the pass.
    assert r.calls == 3


def test_delete_quietly_gives_up_at_an_outage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_two(tmp_path)
    keys = [f"{step_dir(2)}/{k}" for k in files_under(tmp_path / step_dir(2)) if k.endswith(".bin")]
    r = DownAfter(str(tmp_path), 1)
    assert delete_quietly(r, keys) == len(keys)
    assert r.deletes == 1
    (line,) = [w for w in ck_warnings(caplog) if "stopped deleting" in w]
    assert f"{len(keys)} of {len(keys)} file(s) left" in line


def test_prune_stops_on_a_replica_that_stops_answering(tmp_path: Path) -> None:
    model = make_model()
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        for s in (1, 2, 3):
            m.save(s, model).result(timeout=60)
            bump(model)
    r = DownAfter(str(tmp_path), 1)
    res = ops.prune([r], keep=1)
    assert res.exit_code == 2  # an outage: what it holds is unknown
    (p,) = res.replicas
    assert r.deletes == 1 and p.removed_steps == ()
    assert any("not tried, the replica stopped answering" in e for e in p.errors), p.errors
    assert sum("injected" in e for e in p.errors) == 1, p.errors


def test_mirror_delete_marks_a_stalled_replica_degraded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_two(tmp_path)
    r = DownAfter(str(tmp_path), 1)
    with Mirror([r], object_bytes=OBJ, health_interval_s=3600) as m:
        m.delete(1)  # an outage is logged, not raised (as for a replica degraded beforehand)
        assert r.deletes == 1
        assert m.health()[r.url].startswith("degraded")
    assert any("could not delete step 1" in w and "stopped removing old steps" in w for w in ck_warnings(caplog))
