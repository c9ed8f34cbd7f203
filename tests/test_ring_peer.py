"""``ckptmirror.ring_peer`` end to end: real ``ckptmirror serve`` agents and a real 2-process
gloo job (``tests/_ring_child.py``), each rank playing one node with the replicas of
docs/distributed.md, ``[node-local dir, ring_peer([agent0, agent1], ns, node_rank=rank)]``.

Each node's peer namespace holds only that node's ranks while the commit record names every
rank, as a node-local disk does; the agent accepts that because the client names the writers
whose files it put (``X-Ckptmirror-Commit-Writers``), and still refuses a commit whose own
manifest or objects are missing or corrupt, a commit of which nothing is here, and a partial
commit from a client that does not name its writers (the strict rule of older clients).

- The save (per-rank state, steps 1 and 2 with an unchanged tensor referenced by step 2; then a
  replicated state written round-robin) commits on both replica positions on both ranks.
- The scrubber reports the ranks and objects a namespace never held as ``not_held``, not as
  damage; a manifest or object of the held share that is lost or corrupt is still damage.
- ``ckptmirror verify`` on a partial namespace or node-local directory alone: the held rank
  verifies (from the agent's scrub results on a peer), the other node's rank is "not held here"
  (the share records written with the commit), not damage; a lost own rank, a removed or foreign
  record, or two groups' records in one directory keep the full-copy rule; prune keeps the
  records.
- Node 1 is replaced (its local directory deleted): a fresh 2-rank job restores every rank's state
  bit-exact, rank 1 reading its shard from the peer, rank 0 from its own disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from _agent import HOST, TOKEN, AgentProc, agent, raw_request, serve_command, wait_until, write_token
from _helpers import REPO, assert_bit_exact, torchrun
from _ring_child import replicated_state

import ckptmirror
from ckptmirror.errors import ReplicaError
from ckptmirror.format import commit_key, is_rank_manifest_key, parse_rank_manifest, step_dir
from ckptmirror.replicas import _peer_protocol as wire
from ckptmirror.replicas.peer import PeerReplica

CHILD = REPO / "tests" / "_ring_child.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@dataclass
class Ring:
    root: Path
    agents: list[AgentProc]
    saved: list[dict[str, Any]]  # each rank's save-<rank>.json
    shares: list[dict[str, bytes]]  # each node-local dir's files of step 1 (key -> bytes), read before any test

    def ns_root(self, node: int, ns: str = "run1") -> Path:
        """Where node ``node``'s copy lives: on the next node's agent."""
        return Path(self.agents[(node + 1) % 2].root) / ns / f"node{node}"

    def url(self, node: int, ns: str = "run1") -> str:
        return ckptmirror.ring_peer([f"{HOST}:{a.port}" for a in self.agents], ns, node_rank=node)

    def peer(self, url: str) -> PeerReplica:
        return PeerReplica(url, token=TOKEN, timeout_s=10)


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d.parent).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ring]:
    root = tmp_path_factory.mktemp("ring")
    token_file = write_token(root / "token")
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
        mp.setenv(wire.TOKEN_ENV, TOKEN)  # for the torchrun children
        agents = [
            stack.enter_context(agent(root / f"agent{i}", token_file=token_file, args=["--scrub-interval", "0.3"]))
            for i in (0, 1)
        ]
        torchrun(str(CHILD), "save", str(root), *(f"{HOST}:{a.port}" for a in agents), timeout=120)
        saved = [json.loads((root / f"save-{r}.json").read_text()) for r in (0, 1)]
        shares = [_files(root / f"local-{r}" / step_dir(1)) for r in (0, 1)]
        yield Ring(root, agents, saved, shares)


# ------------------------------------------------------------------------------------ the save
def test_save_commits_on_both_replicas_of_both_ranks(ring: Ring) -> None:
    for r, res in enumerate(ring.saved):
        assert (res["step1"], res["step2"], res["replicated"]) == ("ok", "ok", "ok"), res
        for key in ("states1", "states2", "replicated_states"):
            assert {u: s[0] for u, s in res[key].items()} == dict.fromkeys(res[key], "committed"), res[key]
            assert any(u.startswith(f"peer://{HOST}:{ring.agents[1 - r].port}/") for u in res[key]), "the next node"
    for node in (0, 1):
        step = ring.ns_root(node) / step_dir(2)
        assert (step / "COMMIT.json").exists()
        manifests = sorted(p.name[:10] for p in step.glob("rank-*.json") if not p.name.endswith(".place.json"))
        assert manifests == [f"rank-0000{node}"], "only this node's rank"
        # The replicated step: the one manifest and every object, whichever rank's key names it
        # (a namespace only this node writes to is a whole copy: a restore reads all objects).
        rep = ring.ns_root(node, "run2") / step_dir(1)
        [mpath] = [p for p in rep.glob("rank-00000-*.json") if not p.name.endswith(".place.json")]
        manifest = parse_rank_manifest(mpath.read_bytes(), f"{step_dir(1)}/{mpath.name}")
        assert {p.parent.name for p in rep.rglob("o*.bin")} == {"rank-00000", "rank-00001"}
        assert sorted(f"{step_dir(1)}/{p.parent.name}/{p.name}" for p in rep.rglob("o*.bin")) == sorted(
            o.key for o in manifest.objects
        )
        # What the namespace held is kept next to the commit, hidden from clients.
        assert len(list(step.glob(".held-*.json"))) == 1
        listed = ring.peer(ring.url(node)).list_prefix(step_dir(2))
        assert listed and not any("/." in k for k in listed)


def test_each_replica_alone_holds_the_replicated_state(ring: Ring) -> None:
    # A DDP state kept on node-local disks and ring peers only: each node's disk and each peer
    # namespace is a whole copy (before, each held one rank's round-robin share, and no rank
    # could restore without a shared replica). A replaced node restores from its peer alone.
    for url in (str(ring.root / "replocal-0"), str(ring.root / "replocal-1"), ring.url(0, "run2"), ring.url(1, "run2")):
        for step in (1, 2):  # step 2 references step 1's objects through one placement record per writer
            with ckptmirror.Mirror([url], storage_options={"peer": {"token": TOKEN}}) as m:
                res = m.load_state(step, require=True)
            assert res is not None and res[0] == step
            assert_bit_exact(res[1], replicated_state())
        rc, v = _verify(url) if url.startswith("peer") else (None, None)
        assert rc in (None, 0), v
    for r in (0, 1):
        assert ring.saved[r]["replicated2"] == "ok", ring.saved[r]
        places = sorted(p.name for p in (ring.root / f"replocal-{r}" / step_dir(2)).glob("*.place.json"))
        assert [n[:10] for n in places] == ["rank-00000", "rank-00001"], places


# -------------------------------------------------------------------------- the commit check
def _share(ring: Ring, node: int) -> tuple[str, str, list[str], dict[str, bytes]]:
    """(commit key, this node's manifest key, its object keys, the files) of step 1 of ``node``'s disk."""
    files = ring.shares[node]
    ckey = commit_key(1)
    mkey = next(k for k in files if is_rank_manifest_key(k, 1, node))
    return ckey, mkey, sorted(k for k in files if k.endswith(".bin")), files


def _put_share(r: PeerReplica, files: dict[str, bytes], skip: tuple[str, ...] = ()) -> None:
    for k, data in files.items():
        if k != commit_key(1) and k not in skip:
            r.put(k, data)


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x01
    return bytes(b)


def test_partial_commit_is_accepted_but_not_a_damaged_or_empty_one(ring: Ring) -> None:
    a = ring.agents[0]
    ckey, mkey, objects, files = _share(ring, 0)
    record = files[ckey]
    assert len(json.loads(record)["ranks"]) == 2 and len(objects) >= 2

    def fresh(ns: str) -> PeerReplica:
        return ring.peer(a.url(ns))

    # Nothing of the step here (a client that put nothing sends no writers): refused.
    r = fresh("neg/empty")
    with pytest.raises(ReplicaError, match="409"):
        r.commit(ckey, record)

    # This node's share, complete: accepted although rank 1's manifest is not here.
    r = fresh("neg/ok")
    _put_share(r, files)
    r.commit(ckey, record)
    assert r.list_steps() == [step_dir(1)]

    # The rank manifest this client wrote is gone by commit time: refused, the replica fails.
    r = fresh("neg/manifest-gone")
    _put_share(r, files)
    os.unlink(Path(a.root, "neg", "manifest-gone", mkey))
    with pytest.raises(ReplicaError, match=r"409.*rank-00000-[0-9a-f]{8}\.json is missing"):
        r.commit(ckey, record)

    # Its manifest stored with other bytes than the commit pins: refused.
    r = fresh("neg/manifest-corrupt")
    _put_share(r, files, skip=(mkey,))
    r.put(mkey, _flip(files[mkey]))
    with pytest.raises(ReplicaError, match=r"409.*does not match its checksum"):
        r.commit(ckey, record)

    # One of its objects missing, or corrupt: refused.
    r = fresh("neg/object-missing")
    _put_share(r, files, skip=(objects[-1],))
    with pytest.raises(ReplicaError, match=r"409.*\.bin is missing"):
        r.commit(ckey, record)
    r = fresh("neg/object-corrupt")
    _put_share(r, files, skip=(objects[0],))
    r.put(objects[0], _flip(files[objects[0]]))
    with pytest.raises(ReplicaError, match=r"409.*does not match its checksum"):
        r.commit(ckey, record)

    # The other node's manifest is here (put by another client) but damaged: what is here must verify.
    _, other_mkey, _, other_files = _share(ring, 1)
    r = fresh("neg/other-corrupt")
    _put_share(r, files)
    fresh("neg/other-corrupt").put(other_mkey, _flip(other_files[other_mkey]))
    with pytest.raises(ReplicaError, match=r"409.*rank-00001-[0-9a-f]{8}\.json does not match"):
        r.commit(ckey, record)

    for ns in ("empty", "manifest-gone", "manifest-corrupt", "object-missing", "object-corrupt", "other-corrupt"):
        assert not Path(a.root, "neg", ns, ckey).exists(), ns


def test_commit_without_the_writers_header_needs_the_whole_step(ring: Ring) -> None:
    a = ring.agents[0]
    ckey, mkey, _, files = _share(ring, 0)
    r = ring.peer(a.url("hdr-strict"))
    _put_share(r, files)
    # An older client: no header, so every rank manifest the record names must be here.
    status, _, body = raw_request(a.port, "PUT", f"/v1/commit/hdr-strict/{ckey}", files[ckey])
    assert status == 409 and b"rank-00001" in body and b"is missing" in body, body
    # Naming a writer whose manifest is not here (rank 1's): refused, that manifest is required.
    other = json.loads(files[ckey])["ranks"][1][1]
    rank1 = f"1-{other.rsplit('-', 1)[1][:8]}"
    status, _, body = raw_request(
        a.port, "PUT", f"/v1/commit/hdr-strict/{ckey}", files[ckey], headers={wire.WRITERS_HEADER: rank1}
    )
    assert status == 409 and b"rank-00001" in body, body
    # Naming no writer of the record: nothing of it was written by this client.
    status, _, body = raw_request(
        a.port, "PUT", f"/v1/commit/hdr-strict/{ckey}", files[ckey], headers={wire.WRITERS_HEADER: "none"}
    )
    assert status == 409 and b"names none of the rank manifests" in body, body
    status, _, body = raw_request(
        a.port, "PUT", f"/v1/commit/hdr-strict/{ckey}", files[ckey], headers={wire.WRITERS_HEADER: "0-xyz"}
    )
    assert status == 400, body
    assert not Path(a.root, "hdr-strict", ckey).exists()
    # The writer of this node's manifest: accepted.
    mine = f"0-{mkey.rsplit('-', 1)[1][:8]}"
    status, _, body = raw_request(
        a.port, "PUT", f"/v1/commit/hdr-strict/{ckey}", files[ckey], headers={wire.WRITERS_HEADER: mine}
    )
    assert status == 201, body


def test_the_writers_header_names_only_what_this_client_wrote() -> None:
    from ckptmirror.format import CommitRecord, RankRef, object_key, placement_key, rank_manifest_key

    csum = "xxh3_64:0123456789abcdef"
    m0, m1 = rank_manifest_key(3, 0, "0000000a"), rank_manifest_key(3, 1, "0000000b")
    per_rank = CommitRecord(3, 2, (RankRef(0, m0, 10, csum), RankRef(1, m1, 10, csum))).to_json()
    replicated = CommitRecord(3, 2, (RankRef(0, m0, 10, csum),), replicated=True).to_json()
    log = wire.WriteLog()
    assert log.header(commit_key(3), per_rank) is None  # nothing put: the whole step is needed
    log.wrote(object_key(3, 1, 0, "0000000b"))
    log.wrote(placement_key(3, 1, "0000000b"))
    assert log.header(commit_key(3), per_rank) is None  # objects but no manifest of the record
    log.wrote(m1)
    assert log.header(commit_key(3), per_rank) == "1-0000000b"
    log.wrote(m0)
    assert log.header(commit_key(3), per_rank) is None  # every manifest: a full copy, no header
    # Replicated: the one manifest (written by every rank) and this rank's own objects only.
    assert log.header(commit_key(3), replicated) == "1-0000000b"
    only_manifest = wire.WriteLog()
    only_manifest.wrote(m0)
    assert only_manifest.header(commit_key(3), replicated) == wire.NO_WRITERS
    log.forget(step_dir(3))
    assert log.header(commit_key(3), per_rank) is None
    assert wire.parse_writers("1-0000000b, 0-0000000a") == {(1, "0000000b"), (0, "0000000a")}
    assert wire.parse_writers(wire.NO_WRITERS) == frozenset()
    for bad in ("", "1", "x-0000000b", "1-0000000B", "1-0000000b,"):
        with pytest.raises(ValueError):
            wire.parse_writers(bad)


# ---------------------------------------------------------------------------------- scrubbing
def _scrubbed(r: PeerReplica, steps: list[int]) -> dict[int, dict[str, Any]]:
    """The agent's results for ``steps`` of ``r``'s namespace, once it has them all."""

    def ready() -> dict[int, dict[str, Any]] | None:
        doc = r.scrub_report()
        got = {s["step"]: s for s in doc["steps"]}
        return got if set(steps) <= set(got) else None

    found = wait_until(ready, 20, 0.1, f"scrub results for steps {steps} of {r.url}")
    assert found is not None
    return found


def test_scrubber_reports_what_a_namespace_never_held_as_not_held(ring: Ring) -> None:
    for node in (0, 1):
        r = ring.peer(ring.url(node))
        for step, res in _scrubbed(r, [1, 2]).items():
            assert res["status"] == "ok" and res["problems"] == [], res
            assert res["not_held_ranks"] == [1 - node], res
            [rank] = res["ranks"]
            assert rank["rank"] == node and rank["manifest_ok"] and rank["not_held"] == 0, (step, rank)
            assert rank["verified"] == rank["objects"] >= 2, (step, rank)
        rep = _scrubbed(ring.peer(ring.url(node, "run2")), [1])[1]
        assert rep["status"] == "ok" and rep["problems"] == [] and rep["not_held_ranks"] == [], rep
        [rank] = rep["ranks"]
        assert rank["verified"] == rank["objects"] >= 2 and rank["not_held"] == 0, rank  # a whole copy
    for a in ring.agents:
        assert ring.peer(f"{a.url_base}/x").health()["scrub"]["damaged_count"] == 0


def test_scrubber_reports_damage_in_the_share_a_namespace_holds(ring: Ring) -> None:
    a = ring.agents[1]  # holds node 0's copies
    run1, run2 = ring.ns_root(0), ring.ns_root(0, "run2")
    # Damaged copies of node 0's namespaces, made outside the agent's root and moved in whole:
    # the scrubber must never see one before it is damaged.
    damaged = {}
    for name, src in (("manifest-lost", run1), ("object-corrupt", run1), ("share-object-lost", run2)):
        dst = ring.root / "staging" / name
        shutil.copytree(src, dst)  # the Held record comes along
        damaged[name] = dst
    step1 = damaged["manifest-lost"] / step_dir(1)
    lost_manifest = next(p for p in step1.glob("rank-00000-*.json") if not p.name.endswith(".place.json"))
    lost_manifest.unlink()
    obj = sorted((damaged["object-corrupt"] / step_dir(1) / "rank-00000").glob("o*.bin"))[0]
    obj.write_bytes(_flip(obj.read_bytes()))
    share = sorted((damaged["share-object-lost"] / step_dir(1) / "rank-00000").glob("o*.bin"))[0]
    share.unlink()
    Path(a.root, "dmg").mkdir()
    for name, d in damaged.items():
        os.rename(d, Path(a.root, "dmg", name))

    def problems(name: str) -> list[tuple[str, str]]:
        res = _scrubbed(ring.peer(a.url(f"dmg/{name}")), [1])[1]
        return [(p["kind"], p["key"].rsplit("/", 1)[-1]) for p in res["problems"]]

    assert problems("manifest-lost") == [("missing", lost_manifest.name)]
    assert problems("object-corrupt") == [("corrupt", obj.name)]
    assert problems("share-object-lost") == [("missing", share.name)]


# ------------------------------------------------------------------------------------- verify
def _verify(*urls: str) -> tuple[int, dict[str, Any]]:
    env = dict(os.environ, **{wire.TOKEN_ENV: TOKEN})
    p = subprocess.run(
        [*serve_command(), "verify", "--json", "--no-progress", *urls],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    return p.returncode, json.loads(p.stdout)


def test_verify_checks_the_held_share_from_the_scrub_results(ring: Ring) -> None:
    for node in (0, 1):
        url = ring.url(node)
        _scrubbed(ring.peer(url), [1, 2])
        _, doc = _verify(url)
        # The held rank: every object verified, taken from the agent's scrub results.
        for step in doc["steps"]:
            [check] = step["replicas"]
            held = [rk for rk in check["ranks"] if rk["rank"] == node]
            assert held and held[0]["manifest_ok"] and held[0]["verified"] == held[0]["objects"] >= 2, held
            assert held[0]["scrubbed"] == held[0]["objects"], held
        # Whatever verify says, it says nothing against the held rank's manifest or objects.
        against = [p for p in doc["damage"] if f"rank-0000{node}" in p["key"]]
        assert against == [], against


def test_verify_accepts_a_partial_replica_alone(ring: Ring) -> None:
    # Each node's disk and ring namespace holds its own rank only: the share record written
    # with the commit says so, and verify checks that rank and leaves the other node's alone.
    for node in (0, 1):
        for url in (ring.url(node), str(ring.root / f"local-{node}")):
            code, doc = _verify(url)
            assert code == 0 and doc["damage"] == [] and doc["status"] == "ok", (url, doc["damage"])
            assert [s["step"] for s in doc["steps"]] == [1, 2]
            for step in doc["steps"]:
                assert step["unchecked_ranks"] == [1 - node] and step["recoverable"], step
                [check] = step["replicas"]
                held = {rk["rank"]: rk["held"] for rk in check["ranks"]}
                assert held == {node: True, 1 - node: False}, check
                mine = next(rk for rk in check["ranks"] if rk["rank"] == node)
                assert mine["verified"] == mine["objects"] >= 2 and mine["manifest_ok"], mine
    # Both nodes' replicas together: every rank checked, none left unchecked.
    code, doc = _verify(ring.url(0), ring.url(1), str(ring.root / "local-0"), str(ring.root / "local-1"))
    assert code == 0, doc["damage"]
    assert all(s["unchecked_ranks"] == [] and s["recoverable"] for s in doc["steps"]), doc["steps"]
    # The text says which ranks were not checked.
    env = dict(os.environ, **{wire.TOKEN_ENV: TOKEN})
    out = subprocess.run(
        [*serve_command(), "verify", "--no-progress", str(ring.root / "local-0")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    ).stdout
    assert "not held here (partial replica)" in out and "rank(s) 1 not checked" in out, out


def test_ls_of_a_partial_replica_alone_sizes_the_ranks_it_holds(ring: Ring, monkeypatch: pytest.MonkeyPatch) -> None:
    """ls of one node's disk or ring namespace: the other node's rank is not held there (its
    share record says so), not "verifies on no replica" with no size."""
    from ckptmirror import ops

    monkeypatch.setenv(wire.TOKEN_ENV, TOKEN)
    for node in (0, 1):
        for url in (ring.url(node), str(ring.root / f"local-{node}")):
            listing = ops.ls([url])
            assert [s.step for s in listing.steps] == [1, 2], listing
            for s in listing.steps:
                assert s.error is None and s.ranks_not_held == (1 - node,), (url, s)
                assert s.objects is not None and s.objects >= 2 and s.bytes, (url, s)
    both = ops.ls([str(ring.root / "local-0"), str(ring.root / "local-1")])
    assert all(s.ranks_not_held == () and s.error is None for s in both.steps), both
    alone, whole = ops.ls([str(ring.root / "local-0")]).steps[0], both.steps[0]
    assert alone.objects is not None and whole.objects is not None and alone.objects < whole.objects
    env = dict(os.environ, **{wire.TOKEN_ENV: TOKEN})
    out = subprocess.run(
        [*serve_command(), "ls", str(ring.root / "local-0")], capture_output=True, text=True, timeout=60, env=env
    ).stdout
    assert "rank(s) 1 not held by these replicas" in out and "verifies on no replica" not in out, out


def test_a_partial_replica_still_answers_for_the_ranks_it_holds(ring: Ring, tmp_path: Path) -> None:
    src = ring.root / "local-0"
    shares = sorted((src / step_dir(2)).glob("share-*.json"))
    assert len(shares) == 1 and json.loads(shares[0].read_bytes())["ranks"] == [0]
    # Its own rank's manifest lost: damage, as on any replica (the share record lists rank 0).
    lost = tmp_path / "lost"
    shutil.copytree(src, lost)
    mine = next(p for p in (lost / step_dir(2)).glob("rank-00000-*.json") if not p.name.endswith(".place.json"))
    mine.unlink()
    code, doc = _verify(str(lost))
    assert code == 1 and any(p["key"].endswith(mine.name) and p["kind"] == "missing" for p in doc["damage"]), doc
    # Without its share record, the replica is held to the rule of a full copy: rank 1 is missing.
    strict = tmp_path / "strict"
    shutil.copytree(src, strict)
    for p in strict.glob("step-*/share-*.json"):
        p.unlink()
    code, doc = _verify(str(strict))
    assert code == 1 and any("rank-00001" in p["key"] and p["kind"] == "missing" for p in doc["damage"]), doc
    # A share record about another commit (the step saved again under its number) is not read.
    other = tmp_path / "other"
    shutil.copytree(src, other)
    rec = next((other / step_dir(2)).glob("share-*.json"))
    rec.rename(rec.with_name("share-0123456789abcdef-00000.json"))
    code, doc = _verify(str(other), "--step", "2")
    assert code == 1 and any("rank-00001" in p["key"] for p in doc["damage"]), doc
    # A directory both nodes' groups wrote to (a shared filesystem mounted at the same path on
    # every node looks node-local): each group's record is kept, their union is every rank, and
    # a lost rank is damage. (One name for all of them: the last writer's record said "[1]" and
    # verify passed the loss of rank 0.)
    both = tmp_path / "both"
    shutil.copytree(src, both)
    [theirs] = (ring.root / "local-1" / step_dir(2)).glob("share-*.json")
    shutil.copy(theirs, both / step_dir(2) / theirs.name)
    assert len(list((both / step_dir(2)).glob("share-*.json"))) == 2
    code, doc = _verify(str(both), "--step", "2")
    assert code == 1 and any("rank-00001" in p["key"] and p["kind"] == "missing" for p in doc["damage"]), doc
    # prune leaves share records alone (they are the commit's), repair copies nothing for rank 1.
    from ckptmirror import ops

    both = [str(src), str(ring.root / "local-1")]
    listing = ops.ls(both)
    assert [s.step for s in listing.steps] == [1, 2] and all(s.error is None for s in listing.steps), listing
    assert all(not s.garbage for s in listing.steps), [s.garbage for s in listing.steps]
    rep = ops.repair([str(src)], dry_run=True)
    assert rep.exit_code == 0 and rep.actions == () and rep.unrecoverable == (), rep


def test_repair_rebuilds_a_replaced_node_disk_from_its_ring_namespace(
    ring: Ring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/operations.md's runbook: node 1's disk replaced (an empty directory), repaired from
    node 1's ring namespace alone with ``--partial``. It is to hold what that partial copy holds:
    rank 1, and a share record that says so (before, repair demanded rank 0's manifest of the
    empty disk and copied nothing; without the flag it still does)."""
    from ckptmirror import ops

    monkeypatch.setenv(wire.TOKEN_ENV, TOKEN)
    disk = tmp_path / "node1"
    disk.mkdir()
    # Without --partial, the rule of a full copy: rank 0 cannot come from node 1's namespace, and
    # nothing is committed (a full replica that missed a step must never be made partial).
    rep = ops.repair([str(disk), ring.url(1)])
    assert rep.exit_code == 1 and not any(a.action == "commit" for a in rep.actions), rep
    assert any("rank-00000" in p.key and "--partial" in p.detail for p in rep.unrecoverable), rep.unrecoverable
    assert not list(disk.rglob("share-*.json")) and not list(disk.rglob("COMMIT.json"))
    rep = ops.repair([str(disk), ring.url(1)], partial=True)
    assert rep.exit_code == 0 and rep.unrecoverable == (), rep
    commits = [a for a in rep.actions if a.action == "commit"]
    assert [a.step for a in commits] == [1, 2] and all(a.done and "holds rank(s) 1 as" in a.reason for a in commits)
    assert rep.actions and not any("rank-00000" in a.key for a in rep.actions), rep.actions
    assert not any("rank-00000" in a.key for a in rep.actions), rep.actions
    # Node 1's own files of its rank, and the namespace's commit and share records (a commit
    # record differs by replica, and a share record is named after its commit's checksum).
    got = _files(disk / step_dir(1))
    ns = {k: v for k, v in _files(ring.ns_root(1) / step_dir(1)).items() if "/COMMIT" in k or "/share-" in k}
    own = {k: v for k, v in ring.shares[1].items() if "/COMMIT" not in k and "/share-" not in k}
    assert len(ns) == 2 and got == {**own, **ns}, (sorted(got), sorted(own), sorted(ns))
    code, doc = _verify(str(disk))
    assert code == 0 and doc["damage"] == [], doc["damage"]
    for step in doc["steps"]:
        assert step["unchecked_ranks"] == [0] and step["recoverable"], step
    # Both nodes' namespaces given: the new directory holds the union, every rank.
    both = tmp_path / "both"
    both.mkdir()
    rep = ops.repair([str(both), ring.url(0), ring.url(1)], partial=True)
    assert rep.exit_code == 0, rep
    code, doc = _verify(str(both))
    assert code == 0 and all(s["unchecked_ranks"] == [] for s in doc["steps"]), doc
    # A full copy given among the sources (here: both node disks merged into one directory
    # without share records): the rule of a full copy, every rank is copied.
    full = tmp_path / "full"
    shutil.copytree(ring.root / "local-0", full)
    for p in (ring.root / "local-1").rglob("*"):
        if (
            p.is_file()
            and not p.name.startswith("share-")
            and not (full / p.relative_to(ring.root / "local-1")).exists()
        ):
            (full / p.relative_to(ring.root / "local-1")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, full / p.relative_to(ring.root / "local-1"))
    for p in full.rglob("share-*.json"):
        p.unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    rep = ops.repair([str(empty), str(full), ring.url(1)], partial=True)
    assert rep.exit_code == 0, rep
    assert any("rank-00000" in a.key for a in rep.actions) and not list(empty.rglob("share-*.json"))


def test_prune_of_an_agents_directory_keeps_what_the_agent_held(ring: Ring, tmp_path: Path) -> None:
    # An operator runs prune on an agent's namespace as a local path: the agent's hidden records
    # of what the namespace held (its scrubber needs them) and the share records are no garbage.
    from ckptmirror import ops

    # Both nodes' namespaces together: every rank manifest is found, so the files no commit
    # names are known (alone, a partial namespace lacks the other rank's manifest to tell).
    dirs = [tmp_path / f"node{n}" for n in (0, 1)]
    before: dict[Path, tuple[list[str], list[str]]] = {}
    for n, d in enumerate(dirs):
        shutil.copytree(ring.ns_root(n), d)
        held = sorted(p.relative_to(d).as_posix() for p in d.glob("step-*/.held-*.json"))
        shares = sorted(p.relative_to(d).as_posix() for p in d.glob("step-*/share-*.json"))
        assert len(held) == 2 and len(shares) == 2, (held, shares)
        before[d] = (held, shares)
    rep = ops.prune([str(d) for d in dirs], keep=5)
    assert rep.exit_code == 0 and rep.refused is None, rep
    assert all(r.removed_garbage == () for r in rep.replicas), rep.replicas
    for d, (held, shares) in before.items():
        assert sorted(p.relative_to(d).as_posix() for p in d.glob("step-*/.held-*.json")) == held
        assert sorted(p.relative_to(d).as_posix() for p in d.glob("step-*/share-*.json")) == shares


# -------------------------------------------------------------------------- the replaced node
@pytest.fixture(scope="module")
def restored(ring: Ring) -> list[dict[str, Any]]:
    """Node 1 replaced: its local disk is gone; a fresh 2-rank job restores."""
    shutil.rmtree(ring.root / "local-1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(wire.TOKEN_ENV, TOKEN)
        torchrun(str(CHILD), "restore", str(ring.root), *(f"{HOST}:{a.port}" for a in ring.agents), timeout=120)
    return [json.loads((ring.root / f"restore-{r}.json").read_text()) for r in (0, 1)]


def test_replaced_node_restores_its_shard_from_the_peer(ring: Ring, restored: list[dict[str, Any]]) -> None:
    for res in restored:
        assert res["step"] == 2 and res["equal"], res
    assert str(ring.root / "local-0") in " ".join(restored[0]["served"]), restored[0]["served"]
    assert ring.url(1) in " ".join(restored[1]["served"]), restored[1]["served"]
    assert "local-1" not in " ".join(restored[1]["served"])
