"""Fetch: read commit records, manifests and objects from replicas, verifying every byte.

The replica-facing half of the read path. For a step chosen by
:mod:`~ckptmirror.restore.choose`, :class:`Fetcher`:

1. reads the commit record from the first replica (in preference order) where it parses;
2. fetches a rank manifest from any replica where it matches the size and checksum the commit
   pins, so a manifest can be taken from a replica other than the commit's;
3. preflights the manifest's objects (:meth:`Fetcher.preflight`): each must be present with its
   recorded size on some replica, which gives the replicas to read it from, preferred first;
4. reads one object (:meth:`Fetcher.fetch`) from the first replica where its size and xxh3
   checksum match, into a given buffer or a per-thread one.

Only if an object verifies nowhere does the step fail (with one of :data:`STEP_FAILURES`), and
the caller falls back to the previous step. Filling the caller's tensors is
:mod:`~ckptmirror.restore.fill`'s job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ..buffers import host_bytes
from ..checksum import checksum
from ..errors import CorruptObjectError, ManifestError, ObjectMissingError, ReplicaError
from ..format import MAX_MANIFEST_BYTES, CommitRecord, RankManifest, commit_key, parse_commit, parse_rank_manifest
from ..replicas.base import Replica

log = logging.getLogger("ckptmirror")

#: Failures that make one step unrecoverable but let the reader fall back to an older one.
STEP_FAILURES = (CorruptObjectError, ObjectMissingError, ManifestError, ReplicaError)

#: Object key -> the replicas to read it from, preferred first (see :meth:`Fetcher.preflight`).
ObjectPlan = dict[str, list[Replica]]


class Fetcher:
    """Reads the records and objects of steps from a list of replicas, with per-object fallback.

    Replicas are tried in ``read_priority`` order (local disk first). ``pool`` runs the object
    reads of :func:`~ckptmirror.restore.fill.fill_step`.
    """

    def __init__(self, replicas: Sequence[Replica], pool: ThreadPoolExecutor) -> None:
        self.replicas = sorted(replicas, key=lambda r: r.read_priority)
        self.pool = pool
        self._local = threading.local()

    # -- manifests -----------------------------------------------------------------------
    def read_commit(self, step: int, urls: Sequence[str] | None = None) -> CommitRecord:
        """The commit record of ``step`` from the first replica where it parses."""
        errors = []
        for r in self.replicas:
            if urls is not None and r.url not in urls:
                continue
            key = commit_key(step)
            try:
                return parse_commit(r.get(key, MAX_MANIFEST_BYTES), key)
            except STEP_FAILURES as exc:
                if isinstance(exc, ManifestError) and not exc.replica:
                    exc = ManifestError(str(exc).split(": ", 1)[-1], replica=r.url, key=key)
                errors.append(exc)
        raise (
            errors[0]
            if len(errors) == 1
            else ManifestError(
                "no replica holds a valid commit: " + "; ".join(str(e) for e in errors), key=commit_key(step)
            )
        )

    def read_manifest(self, commit: CommitRecord, rank: int) -> RankManifest:
        """The rank manifest, verified against the commit's pin, from any replica."""
        ref = commit.manifest_ref(rank)
        errors: list[str] = []
        parse_failures = 0
        for r in self.replicas:
            try:
                data = r.get(ref.key, MAX_MANIFEST_BYTES)
                if len(data) != ref.size or checksum(data) != ref.checksum:
                    raise CorruptObjectError(
                        f"rank manifest does not match the commit (size {len(data)} vs {ref.size}, checksum)",
                        replica=r.url,
                        key=ref.key,
                    )
                m = parse_rank_manifest(data, ref.key)
                if (m.step, m.rank, m.world_size) != (commit.step, ref.rank, commit.world_size):
                    raise ManifestError(
                        "rank manifest belongs to another step, rank or world size", replica=r.url, key=ref.key
                    )
                return m
            except ManifestError as exc:
                parse_failures += 1
                errors.append(f"{r.url}: {exc}")
            except STEP_FAILURES as exc:
                errors.append(str(exc))
        cls = ManifestError if parse_failures == len(errors) else CorruptObjectError
        raise cls("no replica holds a valid, verifying copy: " + "; ".join(errors), key=ref.key)

    # -- objects -------------------------------------------------------------------------
    def _buffer(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self._local.buf = buf
        return buf[:nbytes]

    def preflight(self, m: RankManifest) -> ObjectPlan:
        """For each object, the replicas to read it from, preferred first.

        Run before any tensor is modified, so a step that is missing objects everywhere is
        rejected without touching the caller's state. Replicas are asked in preference order
        until one holds the object with its recorded size; the ones after it stay as fallbacks
        without being asked (a read checks size and checksum anyway), so a local copy spares
        a HEAD request per object to every remote replica.
        """
        plan: ObjectPlan = {}
        for obj in m.objects:
            problems = []
            for idx, r in enumerate(self.replicas):
                try:
                    size = r.size(obj.key)
                except STEP_FAILURES as exc:
                    problems.append(f"{r.url}: {exc}")
                    continue
                if size == obj.size:
                    plan[obj.key] = [r, *self.replicas[idx + 1 :]]
                    break
                problems.append(f"{r.url}: " + ("missing" if size is None else f"size {size}, expected {obj.size}"))
            else:
                # Truncated somewhere is corruption; absent everywhere is a missing object.
                cls = ObjectMissingError if all(p.endswith(": missing") for p in problems) else CorruptObjectError
                raise cls("no replica holds it with the recorded size (" + "; ".join(problems) + ")", key=obj.key)
        return plan

    def fetch(
        self, key: str, size: int, csum: str, candidates: Sequence[Replica], into: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, str]:
        """Read one object from the first replica where it verifies: into ``into`` (a CPU uint8
        tensor of ``size`` bytes) when given, else into this thread's reusable buffer."""
        buf = into if into is not None else self._buffer(size)
        return buf, self.fetch_into(key, csum, candidates, host_bytes(buf))

    def fetch_into(self, key: str, csum: str, candidates: Sequence[Replica], out: memoryview) -> str:
        """Read one object into ``out`` (exactly its size) from the first replica where it
        verifies; return that replica's URL. ``out`` may hold garbage after a failure."""
        problems = []
        for r in candidates:
            try:
                r.read_into(key, out)
                got = checksum(out)
                if got != csum:
                    raise CorruptObjectError(
                        f"checksum mismatch: stored {got}, manifest {csum}", replica=r.url, key=key
                    )
                return r.url
            except STEP_FAILURES as exc:
                log.warning("object %s failed on %s, trying the next replica: %s", key, r.url, exc)
                problems.append(str(exc))
        raise CorruptObjectError("no replica holds a verifying copy: " + "; ".join(problems), key=key)
