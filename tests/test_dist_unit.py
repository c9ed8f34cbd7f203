"""Unit tests of the distributed helpers that need no process group."""

from __future__ import annotations

import pytest

from ckptmirror.dist import DistInfo, expand_url, ring_peer


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
