"""The replica interface every backend implements.

A *replica* is one independent place that holds a full copy of (some ranks of) the
checkpoints: a local directory, an S3 prefix, a peer agent. Keys are relative, ``/``-separated
names produced by :mod:`ckptmirror.format`; every backend validates them again with
:func:`validate_key` because a key may come from an untrusted manifest.

Call order, writer side (one background thread per replica and step; objects may be put
concurrently from several threads)::

    put(object key, bytes)    * n     each object durable when put() returns
    put(rank manifest key)    * ranks after all of that rank's objects
    commit(COMMIT key)        once    last; atomic create-if-absent; durable on return

Reader side: ``list_steps()`` -> ``get(COMMIT)`` -> ``get(rank manifest)`` -> ``read_into(object)``.
Retention and repair: ``delete(COMMIT)`` first (the step stops existing atomically), then
``delete_prefix(step dir)``.

Commit semantics: a step exists on a replica exactly when its commit object exists and
verifies. ``commit`` must never replace an existing commit (raise :class:`StepExistsError`),
so two writers cannot both commit one step. Committing bytes *identical* to the existing
commit is success: a retried request whose answer was lost, or several ranks committing
the same record to a shared replica, must not report their own commit as a rival.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

from ..errors import ManifestError

#: What ``put`` accepts: any contiguous bytes-like object (staging arenas are passed as memoryviews).
Buffer = bytes | bytearray | memoryview

_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]{1,255}\Z")  # \Z: "$" would accept a trailing newline


def validate_key(key: str, replica: str = "") -> str:
    """Reject keys that could escape a replica's root: absolute, ``..``, NUL, backslash, odd characters."""
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise ManifestError("invalid object key", replica=replica, key=repr(key)[:80])
    for seg in key.split("/"):
        if seg in ("", ".", "..") or not _SEGMENT_RE.match(seg):
            raise ManifestError("object key contains an unsafe path segment", replica=replica, key=repr(key)[:200])
    return key


def step_of_key(key: str) -> int:
    """The step number a key belongs to (-1 if it is not under a step directory)."""
    from ..format import parse_step_dir

    step = parse_step_dir(key.split("/", 1)[0])
    return -1 if step is None else step


class Replica(ABC):
    """One storage target. Subclasses translate their backend's errors into ckptmirror's tree.

    Errors: :class:`~ckptmirror.errors.ObjectMissingError` for an absent key,
    :class:`~ckptmirror.errors.CorruptObjectError` for a size mismatch on read,
    :class:`~ckptmirror.errors.StepExistsError` when a commit already exists,
    :class:`~ckptmirror.errors.ReplicaError` for everything else the backend reports.
    """

    #: Preference order on restore: lower is tried first (local disk before network).
    read_priority: int = 50
    #: Whether the mirror pings this replica in the background even while it is healthy
    #: (a peer node can vanish between saves; a local disk cannot).
    heartbeat: bool = False

    def __init__(self, url: str) -> None:
        self.url = url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @abstractmethod
    def put(self, key: str, data: Buffer) -> None:
        """Store ``data`` under ``key``; durable when this returns. A reader never sees a partial object."""

    @abstractmethod
    def commit(self, key: str, data: bytes) -> None:
        """Create ``key`` atomically and durably, only if it does not exist.

        If it exists with exactly ``data``, succeed; with other bytes, raise StepExistsError.
        """

    @abstractmethod
    def get(self, key: str, max_bytes: int) -> bytes:
        """Read a whole small object (manifests); refuse objects larger than ``max_bytes``."""

    @abstractmethod
    def read_into(self, key: str, out: memoryview) -> None:
        """Fill ``out`` with the object; its size must equal ``len(out)`` exactly (else CorruptObjectError)."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Size of the object, or None if it does not exist."""

    @abstractmethod
    def list_steps(self) -> list[str]:
        """Names of the top-level step directories present (committed or not)."""

    @abstractmethod
    def list_prefix(self, prefix: str) -> list[str]:
        """All keys under ``prefix`` (recursively), including leftovers of interrupted writes."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object durably; absent objects are ignored."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete everything under ``prefix`` (a step directory), leftovers included."""

    def ping(self) -> None:
        """Raise if the replica cannot be reached; used to bring a degraded replica back."""
        self.list_steps()

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to release
        """Release connections and threads."""
