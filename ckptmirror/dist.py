"""Many ranks: who am I, where do my replicas live, and how a step commits across ranks.

Coordination goes through the c10d key-value store of the process group (the launcher's
store under torchrun), through a *cloned* client connection owned by the background writer.
Nothing here runs a collective on the training process group from a background thread, and
every wait has a timeout: a rank that dies mid-save means the step never commits, and nobody
hangs longer than ``commit_timeout_s``.

Commit protocol, per save and per replica position ``p`` (replica lists are per rank and are
matched by position; URLs may differ between ranks, e.g. node-local paths):

1. every rank writes its objects and rank manifest to its replica ``p``, then reports
   ``ok`` (with the manifest's key, size and checksum) or ``failed``/``skipped`` to the store;
2. rank 0 waits for every rank's report; if all are ``ok`` it builds the commit record (which
   pins every rank manifest) and publishes it, otherwise it publishes an abort with the reasons;
3. every rank that wrote to ``p`` writes that same commit record to its replica ``p``.
   On a shared replica (S3, a shared filesystem) several ranks write identical bytes: the first
   creates it, the others find it identical, which the Replica contract defines as success.

Two optional moves, for callers whose ranks can fail before rank 0 gets to decide (the DCP
adapter: DCP never calls the coordinator's ``finish`` after a rank's ``write_data`` raised):

* :meth:`Coordinator.abort`: a rank that reported ``failed`` publishes the abort itself, so
  that nobody waits ``commit_timeout_s`` for a decision that will never come. It cannot race
  with a commit: rank 0 publishes one only after every report is ``ok``;
* :meth:`Coordinator.ack` / :meth:`Coordinator.acks`: after step 3 each rank acknowledges its
  commit record and rank 0 waits for every acknowledgement, so that rank 0 returns only once
  every rank's (possibly node-local) commit record is written.

So a step is committed at position ``p`` only after every rank's shard is durable at ``p``.
A node-local replica holds only its node's shards; a reader takes the commit record from any
replica and each object from any replica where it verifies against the pinned checksums, so
"consistent" means: for every rank, some replica holds that rank's objects.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .errors import CoordinationError, ReplicaURLError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. Single-process runs get rank 0 of 1 and no store."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    nnodes: int = 1
    store: Any = None  # the group's c10d Store (Coordinator clones its own connection), or None
    group: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect(process_group: Any = None) -> DistInfo:
    """Rank and world from ``process_group`` (or the default group, if initialised)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return DistInfo()
    if not (dist.is_available() and dist.is_initialized()) and process_group is None:
        return DistInfo()
    group = process_group
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    if world == 1:
        return DistInfo()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or world
    local_rank = int(os.environ.get("LOCAL_RANK", rank % local_world))
    node_rank = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", rank // local_world)))
    from torch.distributed import distributed_c10d as c10d

    store = c10d._get_default_store() if group is None else c10d._get_process_group_store(group)
    return DistInfo(rank, world, local_rank, local_world, node_rank, max(1, world // local_world), store, group)


def expand_url(url: str, info: DistInfo) -> str:
    """Fill ``{rank}``, ``{local_rank}``, ``{node_rank}``, ``{world_size}`` in a replica URL."""
    if "{" not in url:
        return url
    try:
        return url.format(
            rank=info.rank, local_rank=info.local_rank, node_rank=info.node_rank, world_size=info.world_size
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise ReplicaURLError(
            f"bad placeholder in replica URL {url!r}: {exc} (allowed: rank, local_rank, node_rank, world_size)"
        ) from None


def ring_peer(agents: Sequence[str], namespace: str = "ckpt", node_rank: int | None = None) -> str:
    """The peer URL for this node in a ring: node ``i`` keeps its copy on node ``i+1``'s agent.

    ``agents`` lists every node's agent as ``host:port``, in node-rank order. The namespace
    gets ``/node{i}`` appended so one agent can hold several nodes' copies apart::

        ring_peer(["n0:7070", "n1:7070", "n2:7070"], "run1", node_rank=2)  # 'peer://n0:7070/run1/node2'
    """
    if not agents:
        raise ValueError("ring_peer needs at least one agent address")
    if node_rank is None:
        node_rank = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))
    target = agents[(node_rank + 1) % len(agents)]
    target = target.split("://", 1)[-1]
    return f"peer://{target}/{namespace.strip('/')}/node{node_rank}"


class GiveBackAbortError(CoordinationError):
    """The step was not committed at a replica position, and every rank that wrote there deletes
    what it put (not only the rank whose write failed): that replica is full
    (:class:`SpaceAbortError`), or a rank dropped its slow write there (``slow_replica_timeout_s``),
    and a replica that keeps lagging would otherwise fill up with the other ranks' parts of saves
    that never commit there."""


class SpaceAbortError(GiveBackAbortError):
    """The step was not committed at a replica position because a rank found that replica full
    (``ENOSPC``/``EDQUOT``): every rank that wrote there deletes what it put, not only the one
    whose write failed, or a full shared replica never gets the room back (it stays degraded
    until a write probe finds room, and no save reaches it to clean up)."""


class Coordinator:
    """The store protocol above, for one Mirror. Keys live under a per-mirror prefix."""

    def __init__(self, info: DistInfo, prefix: str, timeout_s: float) -> None:
        self.info = info
        self._local = threading.local()
        self._clones: list[Any] = []
        self.prefix = prefix
        self.timeout = timedelta(seconds=timeout_s)
        self.host = socket.gethostname()

    @property
    def store(self) -> Any:
        """This thread's own store connection. A c10d client is one socket: a blocking ``wait``
        in one thread would stall every other thread's ``set`` (and the training loop's)."""
        st = getattr(self._local, "store", None)
        if st is None:
            st = self.info.store.clone() if hasattr(self.info.store, "clone") else self.info.store
            self._local.store = st
            self._clones.append(st)
        return st

    def close(self) -> None:
        """Drop every store connection this coordinator opened, now rather than whenever the
        garbage collector gets to them (possibly after the process group is destroyed)."""
        self._clones.clear()
        self._local = threading.local()

    def _k(self, *parts: object) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def _wait(self, keys: list[str], what: str) -> None:
        try:
            self.store.wait(keys, self.timeout)
        except Exception as exc:  # c10d raises RuntimeError/DistStoreError on timeout
            raise CoordinationError(
                f"timed out after {self.timeout.total_seconds():.0f} s waiting for {what}: {exc}"
            ) from exc

    def report(self, save: str, pos: int, payload: dict[str, Any]) -> None:
        """This rank's outcome at replica position ``pos``."""
        self.store.set(self._k(save, pos, "rank", self.info.rank), json.dumps(payload))

    def decide(self, save: str, pos: int, build_commit: Any) -> None:
        """Rank 0: wait for every rank's report, publish the commit record or an abort."""
        keys = [self._k(save, pos, "rank", r) for r in range(self.info.world_size)]
        try:
            self._wait(keys, f"every rank's report for replica position {pos}")
            reports = [json.loads(self.store.get(k)) for k in keys]
        except CoordinationError as exc:
            self._decision(save, pos, {"abort": str(exc)})
            return
        bad = {r: rep for r, rep in enumerate(reports) if rep.get("state") != "ok"}
        if bad:
            why = "; ".join(f"rank {r}: {rep.get('state')}: {rep.get('error', '')}" for r, rep in bad.items())
            doc: dict[str, Any] = {"abort": why}
            if any(rep.get("space") for rep in bad.values()):
                doc["space"] = True  # the replica is full: the ranks that wrote there give it back
            elif any(rep.get("give_back") for rep in bad.values()):
                doc["give_back"] = True  # a rank dropped its slow write there: the same
            self._decision(save, pos, doc)
            return
        commit = build_commit(reports)
        self._decision(save, pos, {"commit": commit.decode()})

    def _decision(self, save: str, pos: int, doc: dict[str, Any]) -> None:
        """The one key that holds ``pos``'s decision, whoever publishes it (rank 0, or a failing rank)."""
        self.store.set(self._k(save, pos, "commit"), json.dumps(doc))

    def abort(self, save: str, pos: int, why: str, space: bool = False, give_back: bool = False) -> None:
        """Any rank: publish that nothing commits at ``pos``; :meth:`outcome` then raises ``why``.

        Only after this rank reported a state other than ``ok`` at ``pos`` (or never will
        report ``ok`` there): rank 0 commits only when every report is ``ok``, so the abort
        cannot overwrite a commit that some rank already acted on. ``space``: the replica is
        full; :meth:`outcome` raises :class:`SpaceAbortError` so that every rank gives its files back.
        ``give_back``: the same for another reason (a dropped slow write): :class:`GiveBackAbortError`.
        """
        doc: dict[str, Any] = {"abort": why}
        if space:
            doc["space"] = True
        elif give_back:
            doc["give_back"] = True
        self._decision(save, pos, doc)

    def ready(self, save: str, pos: int) -> None:
        """This rank's part of the save is written at ``pos`` (not yet reported: see
        :meth:`ready_everywhere`)."""
        self.store.set(self._k(save, pos, "ready", self.info.rank), "1")

    def ready_everywhere(self, save: str, pos: int) -> bool:
        """Whether every rank has said :meth:`ready` at ``pos`` (no wait). A rank may drop its
        slow write at another position only then: each rank deciding on its own could drop a
        different position on each rank, and then no position commits."""
        return bool(self.store.check([self._k(save, pos, "ready", r) for r in range(self.info.world_size)]))

    def outcome(self, save: str, pos: int) -> bytes:
        """The commit record rank 0 published for ``pos``; CoordinationError on abort/timeout."""
        key = self._k(save, pos, "commit")
        self._wait([key], f"rank 0's decision for replica position {pos}")
        doc = json.loads(self.store.get(key))
        if "abort" in doc:
            cls = (
                SpaceAbortError
                if doc.get("space")
                else GiveBackAbortError
                if doc.get("give_back")
                else CoordinationError
            )
            raise cls(f"step not committed at replica position {pos}: {doc['abort']}")
        return str(doc["commit"]).encode()

    def ack(self, save: str, pos: int, payload: dict[str, Any]) -> None:
        """This rank's outcome of writing the commit record at ``pos``: ``{"state": "committed"}``
        or ``{"state": "failed", "error": ...}`` (any JSON the waiting rank understands)."""
        self.store.set(self._k(save, pos, "ack", self.info.rank), json.dumps(payload))

    def acks(self, save: str, pos: int) -> list[dict[str, Any]]:
        """Every other rank's :meth:`ack` at ``pos``, in rank order (CoordinationError after the timeout)."""
        keys = [self._k(save, pos, "ack", r) for r in range(self.info.world_size) if r != self.info.rank]
        self._wait(keys, f"every rank's commit record at replica position {pos}")
        return [json.loads(self.store.get(k)) for k in keys]

    # -- restore agreement ---------------------------------------------------------------
    def exchange(self, round_key: str, value: Any) -> list[Any]:
        """Every rank publishes ``value`` (JSON); returns all ranks' values, in rank order."""
        self.store.set(self._k("x", round_key, self.info.rank), json.dumps(value))
        keys = [self._k("x", round_key, r) for r in range(self.info.world_size)]
        self._wait(keys, f"every rank in restore round {round_key}")
        return [json.loads(self.store.get(k)) for k in keys]
