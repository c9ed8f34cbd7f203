"""Phase 2 of a save on one replica: the share and commit records, and cleaning up after.

Split from :mod:`~ckptmirror.save.fanout`: the commit record, written last, makes a step
exist (:func:`commit_step`; rank 0 builds it from every rank's report with
:func:`commit_from_reports`); a share record says which ranks a partial replica holds
(:func:`share_record`); what a losing, torn or failed save left in the step's directory is
removed by its writer token (:func:`commit_step`, :func:`discard_failed_save`). The DCP
writer (:mod:`ckptmirror.dcp.writer`) commits through the same functions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from typing import Any

from ..checksum import checksum
from ..errors import CkptMirrorError, ManifestError, StepExistsError
from ..format import (
    CommitRecord,
    RankRef,
    ShareRecord,
    commit_key,
    parse_commit,
    parse_step_dir,
    share_key,
    step_dir,
    writer_of,
)
from ..placement import MAX_PLACEMENT_BYTES, is_placement_key, parse_placement
from ..replicas._peer_protocol import LOOPBACK_HOSTS
from ..replicas.base import Replica
from ..replicas.local import LocalReplica
from .encode import EncodedStep
from .retention import (
    delete_quietly,
    protected_keys,
)

log = logging.getLogger("ckptmirror")


def replica_identity(replica: Replica, host: str, rank: int) -> str:
    """What makes two ranks' replicas at one position the same store (:meth:`~ckptmirror.save.fanout.Fanout._owned_at`).

    A network store (S3, a peer agent, fsspec) is its URL, whoever writes it. A local directory
    is its URL on one host: the same path on two nodes is two disks (a shared filesystem
    mounted at the same path on both is then counted twice: each node writes a whole copy of
    a replicated state, identical files, which is correct if wasteful). Anything else (an
    in-memory replica, a wrapper) is private to its process.
    """
    url = replica.url
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if isinstance(replica, LocalReplica) or scheme in ("", "file"):
        return f"{host}|{url}"
    if scheme == "memory":
        return f"{host}|{os.getpid()}|{rank}|{url}"
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    hostname = netloc.rsplit(":", 1)[0].strip("[]").lower() if netloc else ""
    if hostname in LOOPBACK_HOSTS:  # an agent (or an S3 endpoint) on each node's own loopback
        return f"{host}|{url}"
    return url  # s3://, peer://, peers://, an fsspec protocol: one store, reached over the network


def share_record(
    step: int, group: Sequence[int], world_size: int, replicated: bool, commit_bytes: bytes
) -> tuple[str, bytes] | None:
    """The share record (key, bytes) a rank of ``group`` (the ranks that write to one replica)
    puts there before the commit record ``commit_bytes`` (:mod:`ckptmirror.format.share`): None
    where the replica is to hold the whole step (every rank writes there, or the state is
    replicated). Every rank of the group puts the same bytes."""
    if replicated or len(group) >= world_size:
        return None
    csum = checksum(commit_bytes)
    return share_key(step, csum, min(group)), ShareRecord(step, csum, tuple(group)).to_json()


def discard_failed_save(replica: Replica, step: int, writers: Collection[tuple[int, str] | None]) -> None:
    """Delete what the failed save by ``writers`` ((rank, token) pairs) put in ``step``'s
    directory on ``replica``, temp files included (background; failures are logged). The
    tokens are that save's own, so no other writer's file, nor any committed one, matches."""
    try:
        keys = [k for k in replica.list_prefix(step_dir(step)) if writer_of(k) in writers]
    except (CkptMirrorError, OSError) as exc:
        log.warning("could not list what the failed save of step %d left on %s: %s", step, replica.url, exc)
        return
    if keys:
        log.info("removing %d file(s) the failed save of step %d left on %s", len(keys), step, replica.url)
        delete_quietly(replica, keys)


def commit_step(
    replica: Replica,
    enc: EncodedStep,
    commit_bytes: bytes,
    written: Sequence[str] | None = None,
    live: Collection[str] = (),
) -> None:
    """Phase 2 on one replica: write the commit record, then drop what it does not reference.

    Leftovers are recognised by their writer token: files of the step whose (rank, token) is
    not pinned by the commit belong to a torn or losing attempt, or to an earlier save of this
    step number (overwritten, or dropped by retention) whose objects later steps still
    reference (incremental saves). Those stay: no file that a placement record in another step
    directory references, nor one a save of this process has in flight (``live``), is deleted
    (:func:`~ckptmirror.save.retention.protected_keys`, as retention decides). Deciding this only
    after the commit matters on shared replicas, where other ranks' files are being written
    meanwhile. ``written``: the files this save put in the step's directory (default: the
    objects raw under their own names and the manifest), taken back if another writer won.
    """
    step = enc.step
    try:
        replica.commit(commit_key(step), commit_bytes)
    except StepExistsError:
        # Another writer committed this step first: our objects are garbage; take them back.
        if written is None:
            mine = range(len(enc.windows)) if enc.owned is None else enc.owned
            written = [enc.manifest.objects[i].key for i in mine] + [enc.manifest_key]
        delete_quietly(replica, list(written))
        raise
    pinned = {writer_of(ref.key) for ref in parse_commit(commit_bytes, commit_key(step)).ranks}
    pinned |= {writer_of(rec.key) for rec in enc.manifest.objects}  # replicated: objects of every rank
    # Only files that name their writer: a commit record's temp file may be another rank's
    # commit of these same bytes, in flight right now on a shared replica.
    stale = [k for k in replica.list_prefix(step_dir(step)) if (w := writer_of(k)) is not None and w not in pinned]
    if stale:
        others = [n for name in replica.list_steps() if (n := parse_step_dir(name)) is not None and n != step]
        protected = protected_keys(replica, others)
        own = _own_references(replica, step, pinned)
        if protected is None or own is None:  # an unreadable placement (logged): any may be referenced
            return
        protected |= own | set(live)
        stale = [k for k in stale if k not in protected]
    if stale:
        log.info("removing %d leftover file(s) of interrupted saves of step %d on %s", len(stale), step, replica.url)
        delete_quietly(replica, stale)


def _own_references(replica: Replica, step: int, pinned: Collection[Any]) -> set[str] | None:
    """The stored keys the committed step's own placement records (of the writers its commit
    pins) name: on a shared replica another rank of this save may reference a file an earlier
    save of this step number left in this directory, which ``protected_keys`` (references
    across steps) does not cover. None if one of those records cannot be read."""
    out: set[str] = set()
    for k in replica.list_prefix(step_dir(step)):
        if not is_placement_key(k) or writer_of(k) not in pinned:
            continue
        try:
            out |= {st.key for st in parse_placement(replica.get(k, MAX_PLACEMENT_BYTES), k).entries.values()}
        except (ManifestError, OSError) as exc:
            log.warning("placement %s on %s is unreadable (%s): keeping the step's other files", k, replica.url, exc)
            return None
    return out


def commit_from_reports(step: int, world_size: int, replicated: bool, reports: list[dict[str, Any]]) -> bytes:
    """The commit record rank 0 publishes, built from every rank's ``ok`` report."""
    if replicated:  # one manifest, the same on every rank
        rep = reports[0]
        return CommitRecord(
            step, world_size, (RankRef(0, rep["key"], int(rep["size"]), rep["checksum"]),), replicated=True
        ).to_json()
    refs = tuple(RankRef(r, rep["key"], int(rep["size"]), rep["checksum"]) for r, rep in enumerate(reports))
    return CommitRecord(step, world_size, refs).to_json()
