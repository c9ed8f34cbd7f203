"""Unit tests of the distributed helpers that need no process group."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from ckptmirror.dist import Coordinator, DistInfo, expand_url, ring_peer
from ckptmirror.errors import CoordinationError


def test_ring_peer_places_each_node_on_the_next() -> None:
    agents = ["n0:7070", "n1:7070", "peer://n2:7071"]
    assert ring_peer(agents, "run1", node_rank=0) == "peer://n1:7070/run1/node0"
    assert ring_peer(agents, "run1", node_rank=1) == "peer://n2:7071/run1/node1"
    assert ring_peer(agents, "/run1/", node_rank=2) == "peer://n0:7070/run1/node2"  # wraps around


def test_ring_peer_reads_the_node_rank_from_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROUP_RANK", "1")
    assert ring_peer(["a:1", "b:2"], "x") == "peer://a:1/x/node1"
    with pytest.raises(ValueError):
        ring_peer([], "x")


def test_expand_url_placeholders() -> None:
    info = DistInfo(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1, nnodes=2)
    assert expand_url("/nvme/ckpt/node{node_rank}/r{local_rank}-of-{world_size}", info) == "/nvme/ckpt/node1/r1-of-8"
    assert expand_url("s3://b/run/{rank}", info) == "s3://b/run/5"
    assert expand_url("/plain/path", info) == "/plain/path"
    with pytest.raises(ValueError, match="placeholder"):
        expand_url("/x/{host}", info)


# ----------------------------------------------------------------------------- Coordinator
# Two ranks in one process: a Coordinator per rank over one in-memory c10d store, as two
# processes would share the launcher's store.
def coordinators(world: int = 2, timeout_s: float = 5.0, prefix: str = "t") -> list[Coordinator]:
    from torch.distributed import HashStore

    store = HashStore()
    return [Coordinator(DistInfo(rank=r, world_size=world, store=store), prefix, timeout_s) for r in range(world)]


def commit_of(reports: list[dict[str, Any]]) -> bytes:
    return json.dumps([r["key"] for r in reports]).encode()


def test_coordinator_commits_when_every_rank_reports_ok() -> None:
    c0, c1 = coordinators()
    c1.report("s", 0, {"state": "ok", "key": "k1"})
    c0.report("s", 0, {"state": "ok", "key": "k0"})
    c0.decide("s", 0, commit_of)
    assert c1.outcome("s", 0) == c0.outcome("s", 0) == b'["k0", "k1"]'


def test_coordinator_a_failed_report_aborts() -> None:
    c0, c1 = coordinators()
    c1.report("s", 0, {"state": "failed", "error": "disk full"})
    c0.report("s", 0, {"state": "ok", "key": "k0"})
    c0.decide("s", 0, commit_of)
    with pytest.raises(CoordinationError, match="rank 1: failed: disk full"):
        c1.outcome("s", 0)


def test_coordinator_abort_by_any_rank_ends_the_wait_at_once() -> None:
    # A rank whose write failed publishes the abort itself: rank 0 may never get to decide
    # (DCP skips finish()), and nobody waits out the timeout.
    c0, c1 = coordinators(timeout_s=30.0)
    c1.report("s", 0, {"state": "failed", "error": "boom"})
    c1.abort("s", 0, "rank 1: OSError: boom")
    t0 = time.monotonic()
    for c in (c0, c1):
        with pytest.raises(CoordinationError, match="rank 1: OSError: boom"):
            c.outcome("s", 0)
    assert time.monotonic() - t0 < 5.0
    # Positions are independent: position 1 still commits.
    for c in (c0, c1):
        c.report("s", 1, {"state": "ok", "key": f"k{c.info.rank}"})
    c0.decide("s", 1, commit_of)
    assert c1.outcome("s", 1) == b'["k0", "k1"]'


def test_coordinator_acks_are_every_other_ranks() -> None:
    c0, c1, c2 = coordinators(world=3)
    c1.ack("s", 0, {"state": "committed"})
    c2.ack("s", 0, {"state": "failed", "error": "EIO"})
    assert c0.acks("s", 0) == [{"state": "committed"}, {"state": "failed", "error": "EIO"}]
    c0.ack("s", 0, {"state": "committed"})
    assert c1.acks("s", 0) == [{"state": "committed"}, {"state": "failed", "error": "EIO"}]  # ranks 0 and 2


def test_coordinator_waits_time_out_as_coordination_errors() -> None:
    c0, c1 = coordinators(timeout_s=0.2)
    c1.ack("s", 0, {"state": "committed"})
    with pytest.raises(CoordinationError, match="commit record"):
        c1.acks("s", 0)  # rank 0 never acknowledged
    with pytest.raises(CoordinationError, match="decision"):
        c1.outcome("s", 0)
    c1.report("s", 0, {"state": "ok", "key": "k1"})
    c0.decide("s", 0, commit_of)  # rank 0 never reported: the decision is an abort
    with pytest.raises(CoordinationError, match="timed out"):
        c1.outcome("s", 0)


def test_coordinator_prefixes_keep_saves_apart() -> None:
    from torch.distributed import HashStore

    store = HashStore()
    a = [Coordinator(DistInfo(rank=r, world_size=2, store=store), "save-a", 0.2) for r in range(2)]
    b = [Coordinator(DistInfo(rank=r, world_size=2, store=store), "save-b", 0.2) for r in range(2)]
    a[1].abort("s", 0, "a failed")
    b[1].ack("s", 0, {"state": "committed"})
    with pytest.raises(CoordinationError, match="a failed"):
        a[0].outcome("s", 0)
    with pytest.raises(CoordinationError, match="timed out"):
        b[0].outcome("s", 0)
    with pytest.raises(CoordinationError, match="timed out"):
        a[0].acks("s", 0)
    assert b[0].acks("s", 0) == [{"state": "committed"}]


def test_coordinator_exchange_returns_every_rank_in_order() -> None:
    c0, c1 = coordinators()
    done: list[list[Any]] = []
    t = threading.Thread(target=lambda: done.append(c1.exchange("r0", {"step": 7})))
    t.start()
    assert c0.exchange("r0", {"step": 5}) == [{"step": 5}, {"step": 7}]
    t.join(5)
    assert done == [[{"step": 5}, {"step": 7}]]


def test_replica_identity_groups_ranks_that_write_the_same_store(tmp_path) -> None:
    # What a replicated (DDP) state's objects are spread over: ranks whose identity is equal.
    from ckptmirror.replicas import LocalReplica, MemoryReplica
    from ckptmirror.replicas.peer import PeerReplica
    from ckptmirror.save.commit import replica_identity

    net = PeerReplica("peer://n1:7070/run1")
    assert replica_identity(net, "hostA", 0) == replica_identity(net, "hostB", 1)  # one agent, every node
    loop = PeerReplica("peer://127.0.0.1:7070/run1")  # each node's own agent on its loopback
    assert replica_identity(loop, "hostA", 0) != replica_identity(loop, "hostB", 1)
    assert replica_identity(loop, "hostA", 0) == replica_identity(loop, "hostA", 1)
    disk = LocalReplica(str(tmp_path))  # the same path on two nodes is two disks
    assert replica_identity(disk, "hostA", 0) != replica_identity(disk, "hostB", 1)
    assert replica_identity(disk, "hostA", 0) == replica_identity(disk, "hostA", 1)
    mem = MemoryReplica("memory://x")  # private to its process
    assert replica_identity(mem, "hostA", 0) != replica_identity(mem, "hostA", 1)
