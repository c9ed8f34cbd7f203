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

Time budgets: every operation of a network backend (S3, peer, fsspec) must finish within a
deadline derived from its size, :class:`TimeBudget`: ``connect_timeout_s`` (the fixed part:
connecting, sending the request, the first byte of the answer) plus the body's bytes at a floor
throughput of ``min_bytes_per_s``. Retries happen only inside that budget, never as N times a
per-call timeout. An operation that misses its deadline raises
:class:`~ckptmirror.errors.ReplicaUnavailableError` (an ``OSError``: the mirror marks the
replica degraded at once) naming the replica, the operation, the key and the budget. Local
backends have no budget (``Replica.budget`` is None): a disk does not stall the way a link does.

Commit semantics: a step exists on a replica exactly when its commit object exists and
verifies. ``commit`` must never replace an existing commit (raise :class:`StepExistsError`),
so two writers cannot both commit one step. Committing bytes *identical* to the existing
commit is success: a retried request whose answer was lost, or several ranks committing
the same record to a shared replica, must not report their own commit as a rival.
"""

from __future__ import annotations

import errno
import math
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..errors import ManifestError, ReplicaUnavailableError

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


#: Default fixed part of every operation's budget (connect, send the request, first byte of the answer).
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: Default floor throughput for bodies: an operation on ``n`` bytes gets ``n / min_bytes_per_s`` more.
DEFAULT_MIN_BYTES_PER_S = 1 << 20  # 1 MiB/s: far below any link worth checkpointing over


#: Errors after which a replica that answers a ping can still refuse every write (disk full,
#: quota, read-only, permission): it stays degraded until :meth:`Replica.probe_write` passes.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
#: Of those, the ones where what a failed save left behind holds space worth giving back.
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class TimeBudget:
    """How long an operation on a network replica may take: ``connect_timeout_s + bytes / min_bytes_per_s``.

    The same two options, with the same names and defaults, for the S3, peer and fsspec
    backends (``storage_options={"s3": {"connect_timeout_s": 10}}``). A link slower than
    ``min_bytes_per_s`` counts as down: raise it for a slow WAN, never needed on a LAN or to S3.
    """

    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    min_bytes_per_s: float = DEFAULT_MIN_BYTES_PER_S

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "min_bytes_per_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive, finite number of seconds or bytes, got {value!r}")

    def seconds(self, nbytes: int = 0, requests: int = 1) -> float:
        """The budget of ``requests`` sequential requests moving ``nbytes`` of bodies in all."""
        return requests * self.connect_timeout_s + max(0, nbytes) / self.min_bytes_per_s

    def start(self, op: str, key: str = "", nbytes: int = 0) -> Deadline:
        """The deadline of operation ``op`` on ``key`` (``nbytes`` of body), starting now."""
        return Deadline(self, op, key, nbytes)


def _num(x: float) -> str:
    """A number as an operator would type it: ``5``, ``0.5``, ``1048576`` (not ``1.04858e+06``)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Deadline:
    """When one replica operation must be done: started from a :class:`TimeBudget`, extendable.

    An operation learns some of its size on the way (a GET learns its body's size from the
    answer's headers, a listing finds a next page): :meth:`extend` adds what the budget allows
    for that, so a large body is not cut, and a stalled endpoint still fails after
    ``connect_timeout_s``. Not thread-safe: one operation, one thread (or one event loop).
    """

    __slots__ = ("budget", "end", "key", "nbytes", "op", "requests", "started")

    def __init__(self, budget: TimeBudget, op: str, key: str = "", nbytes: int = 0) -> None:
        self.budget = budget
        self.op = op
        self.key = key
        self.nbytes = max(0, nbytes)
        self.requests = 1
        self.started = time.monotonic()
        self.end = self.started + budget.seconds(self.nbytes)

    def remaining(self) -> float:
        """Seconds left (negative once missed)."""
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def extend(self, nbytes: int = 0, requests: int = 0) -> None:
        """Allow for ``nbytes`` more of body and ``requests`` more sequential requests."""
        nbytes = max(0, nbytes)
        self.nbytes += nbytes
        self.requests += requests
        self.end += self.budget.seconds(nbytes, requests)

    def describe(self) -> str:
        """``6.0 s (connect_timeout_s=5 + 1048576 bytes at min_bytes_per_s=1048576)``."""
        b = self.budget
        num = _num
        fixed = f"connect_timeout_s={num(b.connect_timeout_s)}" + (
            f" x {self.requests} requests" if self.requests > 1 else ""
        )
        body = f" + {self.nbytes} bytes at min_bytes_per_s={num(b.min_bytes_per_s)}" if self.nbytes else ""
        return f"{self.end - self.started:.1f} s ({fixed}{body})"

    def missed(
        self,
        replica: str,
        *,
        where: str = "",
        attempts: int = 1,
        last: BaseException | str | None = None,
        fix: str = "",
    ) -> ReplicaUnavailableError:
        """The error of a missed deadline: names the replica, the operation, the key and the budget."""
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        if isinstance(last, BaseException):
            last = f"{type(last).__name__}: {last}" if str(last) else type(last).__name__
        cause = f"; last error: {last}" if last else ""
        advice = fix or "the replica is degraded and probed until it answers again"
        return ReplicaUnavailableError(
            f"{self.op} {where or self.key or ''}".rstrip()
            + f": no answer within its time budget of {self.describe()}{tries}{cause}; {advice}; "
            "if the link is just slow, raise connect_timeout_s or lower min_bytes_per_s (storage_options)",
            replica=replica,
            key=self.key,
        )


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
    #: The time budget of this replica's operations (see :class:`TimeBudget`); None for local
    #: backends, whose operations are bounded by the disk.
    budget: TimeBudget | None = None
    #: How saves store objects here (``storage_options`` ``"compression"``): ``"none"`` (raw
    #: bytes) or ``"zstd"`` (ckptmirror's float-aware zstd byte planes, :mod:`ckptmirror.codec`).
    #: Network backends that are usually slower than the codec (S3, fsspec) default to zstd.
    compression: str = "none"
    #: zstd level for ``compression="zstd"`` (``storage_options`` ``"compression_level"``).
    compression_level: int = 1
    #: Whether a save may reference an identical object an earlier committed step already
    #: stored here instead of writing it again (``storage_options`` ``"incremental"``).
    incremental: bool = True

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

    def probe_write(self, need_bytes: int) -> None:  # noqa: B027 - optional hook: most backends cannot fill up
        """Raise (:class:`~ckptmirror.errors.ReplicaError` with an ``errno``) unless a save of
        ``need_bytes`` could be written now. Called by the health check, after a ping answered,
        for a replica degraded by a write error in :data:`WRITE_ERRNOS` (full, read-only): a full
        disk still lists, and bringing it back at once would only fail the next save again.
        Default: nothing to check (an object store does not fill up)."""

    def abort_inflight(self, why: str) -> None:  # noqa: B027 - optional hook: backends without long waits
        """Make operations waiting on this replica now fail at once (``why`` goes into their
        error): called when its health check finds it unresponsive, so that an upload whose
        answer never comes does not hold a save for its whole time budget. Optional."""

    def release_thread(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing per thread
        """Release what the calling thread holds on this replica (a keep-alive connection), before
        a short-lived thread ends; the replica stays usable from every thread."""

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to release
        """Release connections and threads."""
