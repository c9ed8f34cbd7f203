"""Share records: which ranks of a committed step a partial replica holds.

A commit record names every rank's manifest, but not every replica holds every rank: a
node-local directory or one ``ring_peer`` namespace holds the ranks of its own node only (a
restore on a node reads its ranks from there and the others from their own replicas). Without
more, ``ckptmirror verify`` of such a replica cannot tell "this rank was never here" from "this
rank was lost here", and reports the other nodes' ranks as missing.

So before the commit record, the ranks that write a step to a replica shared by only some of
the world (the group of :meth:`~ckptmirror.save.fanout.Fanout.elect_retention_owners`) each put
the same small record next to it, named after the group's lowest rank::

    step-000000000042/share-<16 hex: the commit record's xxh3>-<lowest rank, 5 digits>.json
    {"kind": "ckptmirror.share", "version": 1, "step": 42,
     "commit_checksum": "xxh3_64:...", "ranks": [0, 1]}

Named after the commit record's checksum, a record is only ever read for the commit it was
written for (a step saved again under the same number has others). A reader takes the union of
the ranks of every record of that commit: a directory that several groups write to (a shared
filesystem mounted at the same path on every node, which :func:`replica_identity` cannot tell
from node-local disks) gets one record per group, and their union is the whole world, the rule
of a full copy. The records can only relax verify's rule for the ranks they leave out, and only
where their manifest is absent; a rank they list must be there as always. If none of them is
there, or one does not parse, the replica is held to the rule of a full copy. No record is
written where the whole world writes to the replica (a shared S3 bucket) or the state is
replicated (every replica holds all of it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .names import MAX_RANKS, step_dir

SHARE_PREFIX = "share-"
SHARE_KIND = "ckptmirror.share"
SHARE_VERSION = 1
#: A share record is a few hundred bytes; anything larger is not one.
MAX_SHARE_BYTES = 1 << 20
_SHARE_NAME_RE = re.compile(r"step-[0-9]{12}/share-([0-9a-f]{16})-[0-9]{5}\.json\Z")


def share_key(step: int, commit_checksum: str, first_rank: int) -> str:
    """Where the share record of the group whose lowest rank is ``first_rank`` is kept, for the
    commit record with checksum ``commit_checksum``."""
    return f"{step_dir(step)}/{SHARE_PREFIX}{commit_checksum.rsplit(':', 1)[-1]}-{first_rank:05d}.json"


def is_share_key(key: str, commit_checksum: str | None = None) -> bool:
    """Whether ``key`` names a share record (of the commit record ``commit_checksum``, or of any)."""
    m = _SHARE_NAME_RE.match(key)
    return m is not None and (commit_checksum is None or m.group(1) == commit_checksum.rsplit(":", 1)[-1])


@dataclass(frozen=True)
class ShareRecord:
    """The ranks of one committed step that one replica holds (see the module docstring)."""

    step: int
    commit_checksum: str
    ranks: tuple[int, ...]

    def to_json(self) -> bytes:
        doc = {
            "kind": SHARE_KIND,
            "version": SHARE_VERSION,
            "step": self.step,
            "commit_checksum": self.commit_checksum,
            "ranks": sorted(self.ranks),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, data: bytes, step: int, commit_checksum: str) -> ShareRecord | None:
        """The record in ``data`` if it is a share record of that step and commit record; else None
        (then the replica is held to the rule of a full copy)."""
        if len(data) > MAX_SHARE_BYTES:
            return None
        try:
            doc = json.loads(data)
            if (
                not isinstance(doc, dict)
                or doc.get("kind") != SHARE_KIND
                or doc.get("version") != SHARE_VERSION
                or doc.get("step") != step
                or doc.get("commit_checksum") != commit_checksum
            ):
                return None
            ranks = doc["ranks"]
            if not isinstance(ranks, list) or not all(
                type(r) is int and 0 <= r < MAX_RANKS
                for r in ranks  # noqa: E721 - bool is not a rank
            ):
                return None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None
        return cls(step, commit_checksum, tuple(sorted(set(ranks))))
