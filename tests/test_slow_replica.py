"""A slow or stalled replica does not hold the next save: its write of the previous step is dropped.

A fault-proxy campaign measured it (F1): a replica whose link crawls (health pings pass, each
upload moves too slowly to finish) held the staging buffer until its upload ran out of its time
budget, and with ``max_inflight=1`` the next ``save()`` waited for that buffer: 58 s (S3) and
67 s (peer) of stall with the defaults, while the step had been on local disk for a second.
Now, once another replica has committed the step, a save that waited ``slow_replica_timeout_s``
for the buffer drops the laggard's write (:mod:`ckptmirror.save.lag`): the handle says so
(:class:`ReplicaLaggingError`), nothing of that step is committed there, the replica is skipped
while the dropped upload still runs and gets the first save after it.

The real-link tests put a :class:`_proxy.FaultProxy` in ``trickle`` mode in front of a real moto
server and a real ``ckptmirror serve`` agent; the others gate a :class:`FaultyReplica` so that
what is in flight at each moment is certain.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _agent import TOKEN, AgentProc
from _helpers import Gate, assert_bit_exact, torchrun, wait_until
from _proxy import FaultProxy

from ckptmirror import Mirror, ReplicaLaggingError, SaveFailedError, SaveHandle
from ckptmirror.format import step_dir
from ckptmirror.replicas import FaultyReplica, LocalReplica, Replica
from ckptmirror.replicas.peer import PeerReplica
from ckptmirror.replicas.s3 import S3Replica

MiB = 1 << 20
CHILD = Path(__file__).resolve().parent / "_slow_replica_child.py"
OBJ = 64 << 10  # small objects: a dropped write has several left to skip


def state(step: int, n: int = 16) -> dict[str, torch.Tensor]:
    """``n`` tensors of 64 KiB whose values say which step they are."""
    g = torch.Generator().manual_seed(step)
    return {f"t{i}": torch.randn(16384, generator=g) for i in range(n)}


def settled(h: SaveHandle, timeout: float = 60) -> dict[str, str]:
    wait_until(lambda: all(s.state != "pending" for s in h.replicas.values()), timeout, 0.01, "the save to settle")
    return {u: s.state for u, s in h.replicas.items()}


def slow(root: Path, gate: Gate) -> FaultyReplica:
    return FaultyReplica(LocalReplica(str(root)), on_phase=gate)


def test_a_hanging_replica_does_not_hold_the_next_save(tmp_path: Path) -> None:
    fast, hung = tmp_path / "fast", tmp_path / "hung"
    gate = Gate(2)
    far = slow(hung, gate)
    with Mirror(
        [str(fast), far], object_bytes=OBJ, io_threads=2, slow_replica_timeout_s=0.3, keep_last=None, min_replicas=1
    ) as m:
        assert settled(m.save_state(1, state(1))) == {str(fast): "committed", far.url: "committed"}
        h2 = m.save_state(2, state(2))
        wait_until(lambda: h2.replicas[str(fast)].state == "committed" and gate.waiting > 0, 30)
        t0 = time.monotonic()
        h3 = m.save_state(3, state(3))  # needs step 2's buffer, which the hung replica still reads
        stall = time.monotonic() - t0
        gate.dropped_at = time.monotonic()
        # Without the drop, this save waits for the hung upload (60 s here, a budget in real life).
        assert stall < 10, f"save 3 stalled {stall:.1f} s behind a hung replica"
        assert h3.wait_s >= 0.3 - 0.05, h3.wait_s  # it did wait slow_replica_timeout_s first
        st2 = h2.replicas[far.url]
        assert st2.state == "failed" and isinstance(st2.error, ReplicaLaggingError), st2
        assert str(fast) in str(st2.error) and "slow_replica_timeout_s" in str(st2.error)
        assert h2.result(timeout=10) is h2  # min_replicas=1: committed on the fast replica
        # The dropped upload still hangs: save 3 skips that replica rather than queue behind it.
        assert settled(h3) == {str(fast): "committed", far.url: "skipped"}
        assert isinstance(h3.replicas[far.url].error, ReplicaLaggingError)
        metrics = m.metrics()["replicas"][far.url]
        assert metrics["lagging"] and metrics["saves_dropped"] == 1, metrics
        gate.open()  # the hung upload returns: the replica is used again
        wait_until(lambda: not m.metrics()["replicas"][far.url]["lagging"], 30)
        h4 = m.save_state(4, state(4))
        assert settled(h4) == {str(fast): "committed", far.url: "committed"}
    # The dropped write stopped at its next object (only those in flight were written: at
    # most io_threads), never committed, and what it wrote was removed.
    assert gate.after_drop == 0, gate.after_drop
    assert gate.waiting <= 2, gate.waiting
    hung_replica = LocalReplica(str(hung))
    assert hung_replica.list_prefix(step_dir(2)) == []
    assert hung_replica.list_prefix(step_dir(3)) == []
    with Mirror([str(hung)]) as back:
        assert back.steps() == [1, 4]
        loaded = back.load_state()
        assert loaded is not None and loaded[0] == 4
        assert_bit_exact(loaded[1], state(4))


def test_nothing_is_dropped_until_another_replica_has_written_the_step(tmp_path: Path) -> None:
    gates = [Gate(2), Gate(2)]
    a, b = slow(tmp_path / "a", gates[0]), slow(tmp_path / "b", gates[1])
    with Mirror([a, b], object_bytes=OBJ, slow_replica_timeout_s=0.1, keep_last=None) as m:
        m.save_state(1, state(1)).result(timeout=60)
        h2 = m.save_state(2, state(2))
        wait_until(lambda: gates[0].waiting > 0 and gates[1].waiting > 0, 30)
        threading.Timer(1.5, gates[0].open).start()  # a finishes step 2 after 1.5 s; b never does
        t0 = time.monotonic()
        h3 = m.save_state(3, state(3))
        stall = time.monotonic() - t0
        # Step 2 was durable nowhere for 1.5 s: the save waited for that, then dropped b alone.
        assert 1.4 < stall < 10, stall
        assert h2.replicas[a.url].state == "committed"
        assert isinstance(h2.replicas[b.url].error, ReplicaLaggingError)
        # The default min_replicas (every replica) was not reached: the handle says why. The
        # next save does not raise it (on_replica_error="warn": the step committed on a).
        with pytest.raises(SaveFailedError, match="dropped its write of step 2"):
            h2.result(timeout=1)
        gates[1].open()
        settled(h3)
        m.save_state(4, state(4)).result(timeout=30)


@pytest.mark.parametrize("how", ["raise", "none", "min_replicas"])
def test_the_save_waits_for_every_replica_when_asked_to(tmp_path: Path, how: str) -> None:
    gate = Gate(2)
    urls: list[str | Replica] = [str(tmp_path / "fast"), slow(tmp_path / "hung", gate)]
    kw: dict[str, Any] = {"slow_replica_timeout_s": 0.1}
    if how == "raise":
        kw["on_replica_error"] = "raise"  # a dropped write would be a failed save
    elif how == "none":
        kw["slow_replica_timeout_s"] = None
    else:
        kw["min_replicas"] = 2  # the user wants the step on both
    with Mirror(urls, object_bytes=OBJ, keep_last=None, **kw) as m:
        m.save_state(1, state(1)).result(timeout=60)
        h2 = m.save_state(2, state(2))
        wait_until(lambda: gate.waiting > 0, 30)
        threading.Timer(1.5, gate.open).start()
        t0 = time.monotonic()
        h3 = m.save_state(3, state(3))
        assert time.monotonic() - t0 > 1.4  # it waited for the slow replica
        h2.result(timeout=30)
        h3.result(timeout=30)
        assert m.metrics()["replicas"][urls[1].url]["saves_dropped"] == 0  # type: ignore[union-attr]


def test_the_option_is_checked(tmp_path: Path) -> None:
    for bad in (-1, "2", float("nan")):
        with pytest.raises(ValueError, match="slow_replica_timeout_s"):
            Mirror([str(tmp_path)], slow_replica_timeout_s=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- real links
@pytest.fixture(params=["s3", "peer"])
def crawling(request: pytest.FixtureRequest) -> Iterator[Callable[[], tuple[FaultProxy, Replica]]]:
    """``make()``: a replica of a real backend behind a FaultProxy, with budgets long enough that a
    crawling upload does not run out of its own (the F1 case: nothing times out for a minute)."""
    made: list[tuple[FaultProxy, Replica]] = []

    def make() -> tuple[FaultProxy, Replica]:
        replica: Replica
        opts = {"connect_timeout_s": 2.0, "min_bytes_per_s": 16 << 10}  # a 4 MiB object: 258 s of budget
        if request.param == "s3":
            bucket = request.getfixturevalue("make_bucket")("slowrep")
            upstream = int(request.getfixturevalue("moto_server").rsplit(":", 1)[1])
            proxy = FaultProxy(upstream)
            url = f"s3://{bucket}/run-{uuid.uuid4().hex[:8]}"
            replica = S3Replica(url, endpoint_url=proxy.endpoint, part_bytes=5 * MiB, **opts)
            replica.compression = "none"
        else:
            agent: AgentProc = request.getfixturevalue("peer_agent")
            proxy = FaultProxy(agent.port)
            replica = PeerReplica(proxy.url(f"ns-{uuid.uuid4().hex[:8]}"), token=TOKEN, **opts)
        made.append((proxy, replica))
        return proxy, replica

    yield make
    for proxy, replica in made:
        proxy.mode = "reset"  # whatever the replica still waits for fails now
        replica.close()
        proxy.close()


def test_a_crawling_link_does_not_hold_the_next_save(tmp_path: Path, crawling: Any) -> None:
    proxy, far = crawling()
    local = str(tmp_path / "local")
    big = {"w": torch.randn(1024, 1024)}  # one object of 4 MiB
    with Mirror([local, far], object_bytes=4 * MiB, slow_replica_timeout_s=0.5, keep_last=None, min_replicas=1) as m:
        assert settled(m.save_state(1, big)) == {local: "committed", far.url: "committed"}
        # Pings of a few hundred bytes pass; a 4 MiB upload takes ~40 s (above the agent's own
        # minimum upload rate, 64 KiB/s, which would cut it after 10 s).
        proxy.bytes_per_s = 100_000
        proxy.mode = "trickle"
        big["w"].add_(1)
        h2 = m.save_state(2, big)
        wait_until(lambda: h2.replicas[local].state == "committed", 30)
        big["w"].add_(1)
        t0 = time.monotonic()
        h3 = m.save_state(3, big)
        stall = time.monotonic() - t0
        print(f"save 3 stalled {stall:.2f} s (wait {h3.wait_s:.2f} s) behind a crawling {type(far).__name__}")
        assert stall < 15, f"save 3 stalled {stall:.1f} s behind a crawling {type(far).__name__}"
        assert isinstance(h2.replicas[far.url].error, ReplicaLaggingError), h2.replicas[far.url]
        assert settled(h3)[local] == "committed"
        proxy.mode = "forward"  # the dropped upload finishes (garbage, never committed) or fails
        wait_until(lambda: not m.metrics()["replicas"][far.url]["lagging"], 90)
        wait_until(lambda: m.health()[far.url] == "ok", 60)
        big["w"].add_(1)
        want = {"w": big["w"].clone()}
        h4 = m.save_state(4, big)
        assert settled(h4) == {local: "committed", far.url: "committed"}, h4.replicas
    with Mirror([far]) as back:
        assert back.steps() == [1, 4]
        loaded = back.load_state()
        assert loaded is not None and loaded[0] == 4
        assert_bit_exact(loaded[1], want)


def test_a_replica_that_is_committing_is_waited_for_not_dropped(tmp_path: Path) -> None:
    # Its objects are written: dropping it would free nothing it reads. The next save waits for
    # its commit, so that with max_inflight=1 a save() that returned still means the previous
    # save has an outcome on every replica (a job killed right after it loses at most that save).
    gate, entered = threading.Event(), threading.Event()

    def hold(phase: str, key: str) -> None:
        if phase == "commit" and key.startswith(step_dir(2)):
            entered.set()
            gate.wait(30)

    fast = str(tmp_path / "fast")
    committing = FaultyReplica(LocalReplica(str(tmp_path / "y")), on_phase=hold)
    with Mirror([fast, committing], object_bytes=OBJ, slow_replica_timeout_s=0.1, keep_last=None) as m:
        m.save_state(1, state(1)).result(timeout=30)
        h2 = m.save_state(2, state(2))
        assert entered.wait(30)
        threading.Timer(1.5, gate.set).start()
        t0 = time.monotonic()
        m.save_state(3, state(3))
        assert time.monotonic() - t0 > 1.4
        assert settled(h2) == {fast: "committed", committing.url: "committed"}


def test_one_rank_drops_its_stalled_write_and_the_other_rank_is_told_at_once(tmp_path: Path) -> None:
    # 2 ranks (torchrun, gloo); on rank 0 only, the shared replica hangs step 2's uploads. Rank 0
    # drops that write and votes "failed" for it at once: rank 1, which wrote its part, learns
    # that step 2 does not commit there without waiting for rank 0's hung upload (nor for
    # commit_timeout_s), and both ranks save on; once the upload returns, both commit there again.
    out = torchrun(str(CHILD), str(tmp_path), timeout=240).stdout
    for rank in (0, 1):
        stall = float(out.split(f"rank {rank}: stall3 ")[1].split()[0])
        assert stall < 15, f"rank {rank}: save 3 stalled {stall:.1f} s behind rank 0's hung upload\n{out}"
        assert f"rank {rank}: step 2 local committed" in out, out
        assert f"rank {rank}: step 3 local committed" in out, out
        assert f"rank {rank}: step 4 ['committed', 'committed']" in out, out
        assert f"rank {rank}: shared steps [1, 4] restored 4 exact True" in out, out
    assert "rank 0: step 2 shared failed ReplicaLaggingError" in out, out
    # Rank 0's vote said why, and that every rank gives its part there back (GiveBackAbortError):
    # rank 1's part of steps 2 and 3 on the shared replica is deleted too, not left to prune.
    assert "rank 1: step 2 shared failed GiveBackAbortError" in out, out
    assert "rank 0: step 3 shared skipped ReplicaLaggingError" in out, out  # still finishing step 2
    assert "rank 1: step 3 shared failed GiveBackAbortError" in out, out
    assert "rank 0: shared leftovers of steps 2-3 []" in out, out


def test_a_replica_slower_than_every_save_is_reported_louder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Each save's write there takes ~2 s; the next save comes as soon as the fast replica has the
    # last one: each write there is dropped. From the third in a row the log says ERROR, with the
    # count: the replica never gets a checkpoint.
    slow_one = FaultyReplica(LocalReplica(str(tmp_path / "slow")), delay_s=0.25)
    fast = str(tmp_path / "fast")
    with (
        caplog.at_level(logging.WARNING, logger="ckptmirror"),
        Mirror([fast, slow_one], object_bytes=OBJ, io_threads=2, slow_replica_timeout_s=0.1, keep_last=None) as m,
    ):
        step = 0
        while m.metrics()["replicas"][slow_one.url]["saves_dropped"] < 3 and step < 40:
            step += 1
            wait_until(lambda: not m.metrics()["replicas"][slow_one.url]["lagging"], 30)
            h = m.save_state(step, state(step))
            wait_until(lambda h=h: h.replicas[fast].state == "committed", 30)
        dropped = m.metrics()["replicas"][slow_one.url]["saves_dropped"]
        last = step
    assert dropped >= 3, dropped
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "saves in a row dropped" in r.getMessage()]
    assert errors and "3 saves in a row" in errors[0].getMessage(), [r.getMessage() for r in caplog.records]
    # It never got a checkpoint: every other save was dropped there, and the saves that dropped
    # one skipped it (the dropped write was still finishing its object), the last one included.
    with Mirror([str(tmp_path / "slow")]) as back:
        assert back.steps() == [], last
