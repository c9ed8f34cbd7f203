"""Restore during outages: a replica that stalls, slows down or dies mid-restore.

Everything is real: a ``ckptmirror serve`` agent of the test's own (it gets SIGSTOPped and
SIGKILLed), a :class:`_proxy.FaultProxy` in front of it that goes silent or trickles, and a moto
S3 server as the second replica. What decides *when* the fault starts is the only thing not
real: the peer replica is wrapped in a :class:`FaultyReplica` whose ``on_phase`` hook breaks the
agent (or its link) as the first object read starts, after the listing, the commit, the manifest
and the preflight went through. The reads themselves then meet a stopped process or a dead
link, exactly as they would in production.

- A replica that stops answering mid-restore costs the restore one time budget, not one per
  object (before: 32 objects x 6 s / 4 threads, 49-52 s, for a restore that takes 1 s); the
  objects come from the next replica, bit-exact, and the replica is reported once.
- An outage of the only replica is an outage (:class:`ReplicaUnavailableError`, saying what to
  do), not a corrupt checkpoint (:class:`NoValidCheckpointError` / ``CorruptObjectError``); the
  caller's tensors are unchanged. "step -1" never shows.
- Real damage (a flipped object) is still :class:`NoValidCheckpointError`, and its message ends
  with the fix (``ckptmirror verify``, ``ckptmirror repair``, ``step=N``); a replica that served
  one bad copy is still read for the other objects.

Budgets are short (``connect_timeout_s=1``); every timed bound is several budgets wide, and
the old behaviour would exceed it several times over.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from _agent import TOKEN, AgentProc, start_agent, terminate
from _helpers import assert_bit_exact, fill, free_port, make_net, state_of
from _proxy import FaultProxy

from ckptmirror import Mirror, NoValidCheckpointError
from ckptmirror.errors import CorruptObjectError, ReplicaUnavailableError
from ckptmirror.format import step_dir
from ckptmirror.replicas import FaultyReplica, LocalReplica, Replica
from ckptmirror.replicas.peer import PeerReplica
from ckptmirror.restore.choose import load_newest

KiB = 1 << 10
#: 8 x Linear(256, 256): ~2 MiB of float32, 33 objects of 64 KiB.
SIZE = dict(width=256, layers=8)
OBJ = 64 * KiB
#: The fixed part of every peer operation's budget: short, so that a missed one is cheap here.
CONNECT_S = 1.0
#: An object's budget: CONNECT_S + 64 KiB at 1 MiB/s.
BUDGET_S = CONNECT_S + OBJ / (1 << 20)
PEER_OPTIONS = dict(token=TOKEN, connect_timeout_s=CONNECT_S, min_bytes_per_s=1 << 20)
#: The trickle of a "slow" link: a 64 KiB body would take half a minute.
TRICKLE_BPS = 2000.0


class Peer:
    """The test's own agent, a proxy in front of it, and how to break either."""

    def __init__(self, agent: AgentProc) -> None:
        self.agent = agent
        self.proxy = FaultProxy(agent.port)
        self.url = self.proxy.url(f"ns-{uuid.uuid4().hex[:8]}")
        self.broken = ""

    def replica(self) -> PeerReplica:
        return PeerReplica(self.url, **PEER_OPTIONS)  # type: ignore[arg-type]

    def break_(self, how: str) -> None:
        """Break the peer now: ``stopped`` (SIGSTOP), ``killed`` (SIGKILL, reaped), ``silent``
        or ``trickle`` (the link)."""
        self.broken = how
        if how == "stopped":
            os.kill(self.agent.proc.pid, signal.SIGSTOP)
        elif how == "killed":
            self.agent.proc.kill()
            self.agent.proc.wait(10)
        else:
            self.proxy.bytes_per_s = TRICKLE_BPS
            self.proxy.mode = how  # type: ignore[assignment]

    def at_first_object_read(self, inner: Replica, how: str) -> FaultyReplica:
        """``inner`` wrapped so that the peer breaks as the first object read starts."""

        def hook(phase: str, key: str) -> None:
            if phase == "get" and key.endswith(".bin") and not self.broken:
                self.break_(how)

        return FaultyReplica(inner, on_phase=hook)


@pytest.fixture
def peer(tmp_path: Path, peer_token_file: str) -> Iterator[Peer]:
    a = start_agent(tmp_path / "agent", token_file=peer_token_file, args=["--reserve-free-bytes", "0"])
    p = Peer(a)
    try:
        yield p
    finally:
        p.proxy.mode = "reset"  # whatever still waits on it fails now
        if a.proc.poll() is None:
            os.kill(a.proc.pid, signal.SIGCONT)
        terminate(a.proc, 5)
        p.proxy.close()


def save_steps(replicas: list[Any], steps: tuple[int, ...]) -> dict[int, dict[str, torch.Tensor]]:
    """Save ``steps`` (distinct values each) to ``replicas``; the state saved at each."""
    out = {}
    options = {"peer": {"token": TOKEN}}
    with Mirror(replicas, object_bytes=OBJ, health_interval_s=60, storage_options=options) as m:
        for s in steps:
            net = fill(make_net(**SIZE), s)
            h = m.save(s, net)
            h.result(timeout=120)
            assert all(r.state == "committed" for r in h.replicas.values()), h.replicas
            out[s] = state_of(net)
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def raises(fn: Callable[[], Any]) -> tuple[BaseException, float]:
    t0 = time.monotonic()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - returned for the test to check
        return exc, time.monotonic() - t0
    raise AssertionError("the restore did not fail")


# ------------------------------------------------------- 1. one budget, not one per object
@pytest.mark.parametrize("how", ["stopped", "silent", "trickle"])
def test_a_peer_that_stops_answering_mid_restore_costs_one_budget_not_one_per_object(
    peer: Peer, s3_url: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """[peer, S3]: the peer (preferred) answers the listing, the commit, the manifest and the
    preflight, then stops answering (SIGSTOP), goes silent or trickles far below
    ``min_bytes_per_s``. Before: every one of the 33 objects waited out its budget on the peer
    first (33 x ~1.1 s / 2 threads, ~18 s here); now the peer is dropped for the rest of the
    restore at its first missed budget."""
    inner = peer.replica()
    try:
        saved = save_steps([inner, s3_url], (5,))[5]
        net = fill(make_net(**SIZE), 999)
        wrapped = peer.at_first_object_read(inner, how)
        with Mirror([wrapped, s3_url], object_bytes=OBJ, io_threads=2, health_interval_s=60) as m:
            caplog.set_level(logging.WARNING, logger="ckptmirror")
            res, took = timed(lambda: m.restore(net))
        assert peer.broken == how, "the peer was never read: the test did not test anything"
        assert res is not None and res.step == 5
        assert_bit_exact(state_of(net), saved, "restored model")
        assert len(res.sources) >= 16, "the test needs many objects"
        by = {u: list(res.sources.values()).count(u) for u in set(res.sources.values())}
        assert by.get(inner.url, 0) == 0 and by.get(s3_url) == len(res.sources), by
        # One budget (the reads in flight when the peer broke wait it out together), plus the
        # S3 reads; the old behaviour took ~16 budgets.
        assert took < 6 * BUDGET_S + 2, f"restore took {took:.1f} s with the peer {how}; one budget is {BUDGET_S:.2f} s"
        dropped = [r.getMessage() for r in caplog.records if "reading from the other replicas" in r.getMessage()]
        assert len(dropped) == 1 and inner.url in dropped[0], dropped
    finally:
        inner.close()


def test_the_restore_reports_each_unavailable_replica_once(peer: Peer, s3_url: str) -> None:
    """``load_newest(on_unavailable=...)`` hears of the peer that stopped answering once (the
    hook the Mirror's replica health is fed from), with the outage that took it out."""
    inner = peer.replica()
    try:
        saved = save_steps([inner, s3_url], (5,))[5]
        from ckptmirror.replicas import open_replica

        s3 = open_replica(s3_url)
        heard: list[tuple[str, object]] = []
        try:
            with ThreadPoolExecutor(2) as pool:
                loaded = load_newest(
                    [peer.at_first_object_read(inner, "stopped"), s3],
                    pool,
                    on_unavailable=lambda r, exc: heard.append((r.url, exc)),
                )
        finally:
            s3.close()
        assert loaded is not None and loaded.step == 5
        assert_bit_exact(loaded.state["model"], saved, "loaded state")
        assert [u for u, _ in heard] == [inner.url], heard
        assert isinstance(heard[0][1], ReplicaUnavailableError)
    finally:
        inner.close()


# ---------------------------------------------------------- 2. an outage is not damage
@pytest.mark.parametrize("how", ["stopped", "killed", "down before the restore"])
def test_an_outage_of_the_only_replica_is_an_outage_not_a_corrupt_checkpoint(peer: Peer, how: str) -> None:
    """[peer] alone, two steps saved; the agent is stopped or killed as the first object read
    starts, or killed before the restore. Before: ``NoValidCheckpointError: checkpoints exist
    but none can be restored: step 3: CorruptObjectError ... no answer within its time budget``
    (or ``step -1: every replica is unreachable``). Now: a ReplicaUnavailableError that says no
    replica could be reached and what to do, with every tensor as it was."""
    inner = peer.replica()
    try:
        save_steps([inner], (2, 3))
        net = fill(make_net(**SIZE), 999)
        before = state_of(net)
        if how == "down before the restore":
            replicas: list[Any] = [inner]
        else:
            replicas = [peer.at_first_object_read(inner, how)]
        with Mirror(replicas, object_bytes=OBJ, io_threads=2, health_interval_s=60, open_timeout_s=5) as m:
            if how == "down before the restore":
                peer.break_("killed")
            exc, took = raises(lambda: m.restore(net))
        assert peer.broken, "the peer was never read: the test did not test anything"
        assert isinstance(exc, ReplicaUnavailableError), f"{type(exc).__name__}: {exc}"
        assert not isinstance(exc, (NoValidCheckpointError, CorruptObjectError))
        msg = str(exc)
        assert inner.url in msg and "could be reached" in msg, msg
        assert "ckptmirror serve" in msg and "restore again" in msg, msg
        assert "step -1" not in msg and "corrupt" not in msg.lower(), msg
        assert_bit_exact(state_of(net), before, f"the model after a restore that failed ({how})")
        # Step 3 fails at its first missed budget; step 2 then does not ask the peer again.
        assert took < 5 * BUDGET_S + 2, f"the restore failed only after {took:.1f} s"
    finally:
        inner.close()


# ---------------------------------------------------------------- 3. damage is damage
def test_a_corrupt_object_still_raises_no_valid_checkpoint_with_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save_steps([str(root)], (4,))
    objs = sorted(root.glob("step-000000000004/rank-*/o*.bin"))
    obj = objs[len(objs) // 2]
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: the preflight passes, the checksum does not
    obj.write_bytes(bytes(data))
    net = fill(make_net(**SIZE), 999)
    before = state_of(net)
    with Mirror([str(root)], object_bytes=OBJ) as m:
        exc, _ = raises(lambda: m.restore(net))
    assert isinstance(exc, NoValidCheckpointError), f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert "checksum mismatch" in msg and "step 4:" in msg, msg
    last = msg.rstrip().splitlines()[-1]
    assert f"ckptmirror verify {root}" in last and f"ckptmirror repair {root}" in last and "step=N" in last, last
    assert "step -1" not in msg
    assert_bit_exact(state_of(net), before, "the model after a restore that failed")


def test_a_replica_with_one_bad_copy_is_still_read_for_the_other_objects(tmp_path: Path, peer_url: str) -> None:
    """Damage is not an outage: the local replica that returned a bad copy of one object keeps
    serving every other object; only that one comes from the peer."""
    root = tmp_path / "ckpt"
    saved = save_steps([str(root), peer_url], (4,))[4]
    objs = sorted(root.glob("step-000000000004/rank-*/o*.bin"))
    bad = objs[len(objs) // 2]
    data = bytearray(bad.read_bytes())
    data[0] ^= 0x01
    bad.write_bytes(bytes(data))
    net = fill(make_net(**SIZE), 999)
    with Mirror([str(root), peer_url], object_bytes=OBJ, storage_options={"peer": {"token": TOKEN}}) as m:
        res = m.restore(net)
    assert res is not None and res.step == 4
    assert_bit_exact(state_of(net), saved, "restored model")
    key = bad.relative_to(root).as_posix()
    local = LocalReplica(str(root)).url
    assert res.sources[key] == peer_url, res.sources[key]
    assert all(u == local for k, u in res.sources.items() if k != key), sorted(set(res.sources.values()))


def test_a_disk_read_error_is_damage_not_an_outage(tmp_path: Path) -> None:
    # EIO reading an object off the only replica: a damaged medium, not a passing outage. The
    # restore reports damage (with what to run) and leaves the tensors as they were.
    import errno

    from ckptmirror.errors import ReplicaError

    torch.manual_seed(0)
    src = torch.nn.Linear(64, 64)
    with Mirror([str(tmp_path)]) as m:
        m.save(1, src).result(timeout=60)

    def eio(phase: str, key: str) -> None:
        if phase == "get" and key.endswith(".bin"):
            raise ReplicaError("read failed", replica=str(tmp_path), key=key) from OSError(
                errno.EIO, "Input/output error"
            )

    bad = FaultyReplica(LocalReplica(str(tmp_path)), on_phase=eio)
    bad.read_priority = 10**6  # not mapped in place: read through the wrapper
    torch.manual_seed(1)
    dst = torch.nn.Linear(64, 64)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with Mirror([bad]) as m, pytest.raises(NoValidCheckpointError) as exc:
        m.restore(dst)
    assert "ckptmirror verify" in str(exc.value), str(exc.value)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


# ------------------------------------------- 4. verify and repair: an outage is not damage
def test_verify_of_a_step_only_an_unreachable_replica_could_hold_is_an_outage(tmp_path: Path) -> None:
    # "not committed on any replica" is said only of the replicas that answered: with the one
    # that may hold it down, that is an outage (exit 2), not damage (a review found exit 1).
    from ckptmirror import ops

    local = str(tmp_path / "local")
    with Mirror([local]) as m:
        m.save_state(3, {"w": torch.zeros(4)}).result(timeout=30)
    dead = f"peer://127.0.0.1:{free_port()}/ns"
    report = ops.verify([local, dead], step=5)
    assert list(report.unreachable) == [dead]
    assert [p.kind for p in report.damage] == ["missing"] and "that answered" in report.damage[0].detail
    assert report.status == "unreachable" and report.exit_code == 2


def test_verify_reports_damage_found_beside_an_outage_as_damage(tmp_path: Path, peer: Peer) -> None:
    # The local copy of step 2 is corrupt and the peer stops answering: the damage is certain,
    # so the exit status is 1 (it was 2, which a script retrying on outages would sit on).
    from ckptmirror import ops

    local = str(tmp_path / "local")
    save_steps([local, peer.replica()], (1, 2))
    obj = sorted(p for p in (Path(local) / step_dir(2)).rglob("*.bin"))[0]
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    report = ops.verify([LocalReplica(local), peer.at_first_object_read(peer.replica(), "stopped")], threads=4)
    assert list(report.unavailable) == [peer.url], report.unavailable
    assert [p.replica for p in report.damage] == [local], report.damage
    assert report.status == "damaged" and report.exit_code == 1


@pytest.mark.parametrize("how", ["stopped", "silent"])
def test_verify_of_a_replica_that_stops_answering_is_an_outage_in_one_budget(
    tmp_path: Path, peer: Peer, how: str
) -> None:
    # Before: every object of the stopped peer cost a time budget (191 s for 64 objects of an
    # S3 replica behind a stalled proxy) and was reported as damage, the steps "NOT RECOVERABLE"
    # (exit 1), which invites an operator to delete good checkpoints.
    from ckptmirror import ops
    from ckptmirror.cli.render import _verify_lines

    local = str(tmp_path / "local")
    save_steps([local, peer.replica()], (1, 2))
    report, took = timed(
        lambda: ops.verify([LocalReplica(local), peer.at_first_object_read(peer.replica(), how)], threads=4)
    )
    assert took < 6 * BUDGET_S, took  # before: 2 steps x 33 objects x a budget / 4 threads
    assert report.damage == () and report.status == "unreachable" and report.exit_code == 2, report.damage
    assert list(report.unavailable) == [peer.url] and all(s.recoverable for s in report.steps)
    text = "\n".join(_verify_lines(report))
    assert "UNAVAILABLE (1 replica(s))" in text and "INCOMPLETE" in text, text
    assert "NOT RECOVERABLE" not in text and "DAMAGE" not in text, text

    # repair writes nothing to it and says why (exit 2, as for an unreachable replica).
    peer.broken = ""
    rep = ops.repair([LocalReplica(local), peer.at_first_object_read(peer.replica(), how)], dry_run=True)
    assert rep.exit_code == 2 and not [a for a in rep.actions if a.replica == peer.url], rep.actions


def test_a_newest_step_that_cannot_be_read_is_not_skipped_for_an_older_one(tmp_path: Path) -> None:
    # An object of the newest step cannot be opened (EACCES: a permission an operator can fix,
    # the bytes intact). Before, the restore fell back to step 1 with a WARNING: the run silently
    # rewound. It now raises, saying the checkpoints may be intact, and changes nothing.
    import errno

    from ckptmirror.errors import ReplicaPermissionError

    torch.manual_seed(0)
    src = torch.nn.Linear(64, 64)
    with Mirror([str(tmp_path)]) as m:
        m.save(1, src).result(timeout=60)
        with torch.no_grad():
            src.weight.add_(1.0)
        m.save(2, src).result(timeout=60)

    def denied(phase: str, key: str) -> None:
        if phase == "get" and key.startswith("step-000000000002/") and key.endswith(".bin"):
            raise ReplicaPermissionError("open failed", replica=str(tmp_path), key=key) from OSError(
                errno.EACCES, "Permission denied"
            )

    bad = FaultyReplica(LocalReplica(str(tmp_path)), on_phase=denied)
    bad.read_priority = 10**6  # read through the wrapper, not mapped in place
    dst = torch.nn.Linear(64, 64)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with Mirror([bad]) as m, pytest.raises(ReplicaPermissionError) as exc:
        m.restore(dst)
    assert "step 2 could not be read" in "".join(getattr(exc.value, "__notes__", [])), exc.value
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


def test_out_of_memory_is_recognised_in_every_form() -> None:
    import errno

    from ckptmirror.errors import ReplicaError
    from ckptmirror.restore.fetch import out_of_memory

    wrapped = ReplicaError("read failed", key="k")
    wrapped.__cause__ = OSError(errno.ENOMEM, "Cannot allocate memory")
    for exc in (MemoryError(), torch.OutOfMemoryError("CUDA out of memory"), wrapped):
        assert out_of_memory(exc), exc
    assert not out_of_memory(RuntimeError("shape mismatch")) and not out_of_memory(OSError(errno.EIO, "I/O"))


# ------------------------- 5. a replaced (empty) disk while the replica that holds the run is down
def test_an_empty_replica_beside_a_dead_one_is_no_fresh_start(tmp_path: Path, peer: Peer) -> None:
    # A replacement node's disk is empty and the peer agent that holds the run is down: the
    # restore used to return None ("starting from scratch"), and the job would have trained
    # from step 0 and saved under step numbers the peer holds already (a campaign found it).
    local = tmp_path / "local"
    with Mirror([str(local), peer.replica()], object_bytes=OBJ) as m:
        for s in (1, 2):
            m.save(s, fill(make_net(**SIZE), s)).result(timeout=60)
    for f in sorted(local.rglob("*"), reverse=True):  # the disk is replaced
        f.unlink() if f.is_file() else f.rmdir()
    peer.agent.proc.kill()
    peer.agent.proc.wait(10)
    net = fill(make_net(**SIZE), 999)
    before = state_of(net)
    with Mirror([str(local), peer.replica()], object_bytes=OBJ) as m:
        with pytest.raises(ReplicaUnavailableError) as exc:
            m.restore(net)
        assert peer.url in str(exc.value) and "does not start from scratch" in str(exc.value), str(exc.value)
        assert_bit_exact(state_of(net), before, "a restore that could not look changed the model: ")
    # Without the dead replica in the list it is a fresh start, as asked.
    with Mirror([str(local)]) as m:
        assert m.restore(net) is None


# ------------------------------ 6. a link that drops mid-body is an outage, not a damaged copy
@pytest.mark.parametrize("how", ["get", "read_into"])
def test_a_link_reset_mid_download_is_an_outage(tmp_path: Path, peer: Peer, how: str) -> None:
    # verify called intact objects "unreadable" damage (exit 1, "repair can fix them") when the
    # link to the agent was reset while their bytes came in; repair then said CANNOT REPAIR.
    r = peer.replica()
    body = os.urandom(256 * KiB)
    key = f"{step_dir(1)}/rank-00000/o000000-0123abcd.bin"
    r.put(key, body)
    peer.proxy.bytes_per_s = 20_000.0
    peer.proxy.mode = "trickle"
    timer = threading.Timer(0.5, lambda: setattr(peer.proxy, "mode", "reset"))
    timer.start()
    try:
        with pytest.raises(ReplicaUnavailableError) as exc:
            if how == "get":
                r.get(key, len(body))
            else:
                r.read_into(key, memoryview(bytearray(len(body))))
    finally:
        timer.cancel()
        peer.proxy.mode = "forward"
    assert "dropped" in str(exc.value) or "connection" in str(exc.value), str(exc.value)
    assert r.get(key, len(body)) == body  # the next read, over a working link, gets the bytes
