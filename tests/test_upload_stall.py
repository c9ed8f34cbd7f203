"""An upload to a peer agent that stops answering does not hold the next save for its budget.

A 32 MiB object's time budget is ``connect_timeout_s + 32 MiB at min_bytes_per_s``: 33 s here
(69 s for 64 MiB with the defaults). Before the fix, an upload whose agent was SIGSTOPped waited
out all of it, holding the staging buffer the next ``save()`` needs: measured 68.9 s of stall.
Now:

* an agent that takes no data: each 1 MiB piece of the body must go within ``connect_timeout_s``
  plus the piece at ``min_bytes_per_s`` (the upload fails in about 2 s here, not 33);
* an agent that took the whole body and never answers: the heartbeat finds it unresponsive,
  marks it degraded and cuts the replica's connections (``Replica.abort_inflight``), so the
  upload fails at the next health check (about ``health_interval_s`` + one ping budget).

Real ``ckptmirror serve`` agents, really SIGSTOPped (by the replica object, at the chosen moment
of the upload) and SIGCONTed; afterwards saves commit on the peer again and restore from it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from _agent import TOKEN, AgentProc, agent
from _helpers import assert_bit_exact, wait_until
from torch import nn

from ckptmirror import Mirror, SaveFailedError
from ckptmirror.replicas.base import Deadline
from ckptmirror.replicas.peer import PeerReplica, _DeadlineMixin

BUDGET_S = 1.0  # connect_timeout_s
MIN_RATE = 1 << 20  # min_bytes_per_s: a 32 MiB object's budget is 33 s


def make_model(mib: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, mib * 256, bias=False))  # one object of ``mib`` MiB


def bump(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)


class StopDuringUpload(PeerReplica):
    """A peer client that, once ``armed``, SIGSTOPs its agent during the next object upload:
    before the body is sent (``when="before"``) or once it is sent, before the answer is read
    (``when="answer"``)."""

    def __init__(self, url: str, pid: int, when: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.pid, self.when = pid, when
        self.armed = False
        self.stopped = threading.Event()

    def _stop(self) -> None:
        if self.armed and not self.stopped.is_set():
            os.kill(self.pid, signal.SIGSTOP)
            self.stopped.set()

    def put(self, key: str, data: Any) -> None:
        if self.when == "before" and key.endswith(".bin"):
            self._stop()
        super().put(key, data)

    def _conn(self, deadline: Deadline) -> _DeadlineMixin:
        conn = super()._conn(deadline)
        if self.when == "answer" and deadline.op == "put" and deadline.key.endswith(".bin"):
            cls = type(conn)
            stop = self._stop

            class Stopping(cls):  # type: ignore[valid-type, misc]
                def getresponse(self, *a: Any, **k: Any) -> Any:
                    stop()  # the body is sent: the agent stops before it answers
                    return super().getresponse(*a, **k)

            conn.__class__ = Stopping
        return conn


@contextlib.contextmanager
def resumed_at_exit(proc: Any) -> Iterator[None]:
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)


def _run(tmp_path: Path, token_file: str, when: str, health_interval_s: float, mib: int) -> tuple[float, float, str]:
    """Save 1 (both replicas), then save 2 with the agent stopped during its upload, then save 3
    (which needs save 2's staging buffer); SIGCONT; save 4 commits on the peer and restores from
    it. Returns (save 2's time to its result, save 3's stall, save 2's error on the peer)."""
    local = tmp_path / "local"
    with agent(tmp_path / "agent", token_file=token_file, args=["--reserve-free-bytes", "0"]) as a:
        assert isinstance(a, AgentProc)
        peer = StopDuringUpload(
            a.url("run"), a.proc.pid, when, token=TOKEN, connect_timeout_s=BUDGET_S, min_bytes_per_s=MIN_RATE
        )
        model = make_model(mib)
        with (
            resumed_at_exit(a.proc),
            Mirror(
                [str(local), peer],
                object_bytes=mib << 20,
                health_interval_s=health_interval_s,
                keep_last=None,
                slow_replica_timeout_s=None,  # the upload's own deadline is tested here (see test_slow_replica.py)
            ) as m,
        ):
            m.save(1, model).result(timeout=120)
            bump(model)
            peer.armed = True
            t0 = time.monotonic()
            h2 = m.save(2, model)
            bump(model)
            t1 = time.monotonic()
            h3 = m.save(3, model)  # max_inflight=1: waits for save 2's staging buffer
            stall = time.monotonic() - t1
            with contextlib.suppress(SaveFailedError):  # committed on the local replica only
                h2.result(timeout=120)
            took = time.monotonic() - t0
            assert peer.stopped.is_set()
            states = {u: s.state for u, s in h2.replicas.items()}
            assert states == {str(local): "committed", peer.url: "failed"}, states
            err = str(h2.replicas[peer.url].error)
            with contextlib.suppress(SaveFailedError):
                h3.result(timeout=120)
            os.kill(a.proc.pid, signal.SIGCONT)
            wait_until(lambda: m.health()[peer.url] == "ok", timeout=30)
            bump(model)
            expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
            h4 = m.save(4, model)
            h4.result(timeout=120)
            assert {u: s.state for u, s in h4.replicas.items()} == {str(local): "committed", peer.url: "committed"}
        with Mirror([peer.url], storage_options={"peer": {"token": TOKEN}}) as pm:
            got = make_model(mib)
            res = pm.restore(got, require=True)
            assert res is not None and res.step == 4
            assert_bit_exact(got.state_dict(), expected)
        peer.close()
    return took, stall, err


def test_an_agent_that_takes_no_data_fails_the_upload_in_seconds(tmp_path: Path, peer_token_file: str) -> None:
    # No heartbeat before the upload fails (the first comes after 8 s): the upload itself must
    # notice that nothing moves. The heartbeat brings the peer back after SIGCONT.
    # 64 MiB: more than loopback's socket buffers take in (up to 32 MiB received + 4 MiB sent
    # here), so the upload really blocks rather than sit in the kernel's buffers.
    took, stall, err = _run(tmp_path, peer_token_file, "before", health_interval_s=8, mib=64)
    budget = BUDGET_S + (64 << 20) / MIN_RATE  # 65 s: what the upload waited before
    assert took < 8, f"save 2 took {took:.1f} s (its budget {budget:.0f} s; the heartbeat comes at 8 s)"
    assert stall < 8, f"save 3 stalled {stall:.1f} s"
    assert "the agent took no data for" in err and "min_bytes_per_s" in err, err


def test_an_agent_that_never_answers_is_cut_by_the_heartbeat(tmp_path: Path, peer_token_file: str) -> None:
    took, stall, err = _run(tmp_path, peer_token_file, "answer", health_interval_s=0.5, mib=32)
    budget = BUDGET_S + (32 << 20) / MIN_RATE  # 33 s
    # One heartbeat interval and one ping budget, not the upload's 33 s.
    assert took < budget / 3, f"save 2 took {took:.1f} s (its budget {budget:.0f} s)"
    assert stall < budget / 3, f"save 3 stalled {stall:.1f} s"
    assert "stopped answering its health checks" in err, err


def test_an_upload_that_keeps_moving_is_not_cut(peer_agent: AgentProc) -> None:
    # A failed health check cuts only connections that moved nothing for connect_timeout_s: an
    # upload still flowing (a slow link, an agent whose disk is busy) is left to finish.
    from _agent import TcpProxy

    with TcpProxy(peer_agent.port, mode="delay", delay_s=0.02) as proxy:  # ~3 MB/s, 64 KiB pieces
        peer = PeerReplica(proxy.url("moving"), token=TOKEN, connect_timeout_s=BUDGET_S)
        data = os.urandom(8 << 20)
        errors: list[BaseException] = []

        def put() -> None:
            try:
                peer.put("step-000000000001/rank-00000/o000000-0000abcd.bin", data)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        t = threading.Thread(target=put)
        t.start()
        time.sleep(1.5)
        assert t.is_alive(), "the upload finished before the check: slow the proxy down"
        peer.abort_inflight("a health check failed (test)")
        t.join(60)
        assert not errors, errors
        assert peer.size("step-000000000001/rank-00000/o000000-0000abcd.bin") == len(data)
        peer.close()


def test_a_peer_stopped_while_idle_is_used_again_once_it_answers(tmp_path: Path, peer_token_file: str) -> None:
    """The agent stopped between saves: the heartbeat fails and cuts this replica's connections,
    the idle ones kept alive between operations too. Once it answers again, every save commits
    there (the cut idle connections were reused: one save after another failed on the peer,
    "cut after 0.0 s", each thread's connection in turn)."""
    local = tmp_path / "local"
    with agent(tmp_path / "agent", token_file=peer_token_file, args=["--reserve-free-bytes", "0"]) as a:
        assert isinstance(a, AgentProc)
        peer_url = a.url("idle")
        so = {"peer": {"token": TOKEN, "connect_timeout_s": BUDGET_S}}
        model = make_model(1)
        with (
            resumed_at_exit(a.proc),
            Mirror(
                [str(local), peer_url], object_bytes=64 << 10, health_interval_s=0.2, storage_options=so, keep_last=None
            ) as m,
        ):
            m.save(1, model).result(timeout=120)  # every I/O thread now holds a kept-alive connection
            m.wait()  # and its retention pass is done: the heartbeat is what finds the agent stopped
            os.kill(a.proc.pid, signal.SIGSTOP)
            wait_until(lambda: m.health()[peer_url] != "ok", timeout=30)
            os.kill(a.proc.pid, signal.SIGCONT)
            wait_until(lambda: m.health()[peer_url] == "ok", timeout=30)
            for step in (2, 3, 4):
                bump(model)
                h = m.save(step, model)
                with contextlib.suppress(SaveFailedError):
                    h.result(timeout=120)
                states = {u: s.state for u, s in h.replicas.items()}
                assert states == {str(local): "committed", peer_url: "committed"}, (step, h.replicas[peer_url])
