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

From format version 3 a replica may hold an object compressed or under an earlier step's name
(an incremental save): the Fetcher reads each replica's placement records
(:mod:`ckptmirror.placement`) when it first needs that replica for a manifest, checks the stored
bytes against the placement's size and checksum, decodes them (:mod:`ckptmirror.codec`) straight
into the destination, and checks the decoded bytes against the manifest. A mismatch of either
is a corrupt copy on that replica, and the next replica is tried.

Only if an object verifies nowhere does the step fail (with one of :data:`STEP_FAILURES`), and
the caller falls back to the previous step. Filling the caller's tensors is
:mod:`~ckptmirror.restore.fill`'s job.

Damage and outages are kept apart. A copy that fails its size, checksum or parse check is
damage (:class:`CorruptObjectError`, :class:`ManifestError`; absent everywhere:
:class:`ObjectMissingError`): that replica is still asked for the other objects. A replica that
cannot be reached or read (:class:`ReplicaError`, e.g. a missed time budget, or ``ENOMEM``
mapping a file) is not damage: when every copy failed that way the error raised is that
failure as it is (several: a :class:`ReplicaUnavailableError` naming each), never a
"corrupt" one (:func:`is_damage` tells them apart). With ``skip_unavailable`` (a restore), a
replica that raised :class:`ReplicaUnavailableError` once is not asked again by this Fetcher:
a stalled or too slow peer costs one time budget, not one per object; ``on_unavailable`` is
told (the mirror's replica health).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol, TypeVar

from ..checksum import checksum
from ..errors import (
    CorruptObjectError,
    ManifestError,
    ObjectMissingError,
    ReplicaConfigError,
    ReplicaError,
    ReplicaPermissionError,
    ReplicaUnavailableError,
)
from ..format import (
    MAX_MANIFEST_BYTES,
    CommitRecord,
    ObjectRecord,
    RankManifest,
    commit_key,
    parse_commit,
    parse_rank_manifest,
    placement_key,
    writer_of,
)
from ..placement import MAX_PLACEMENT_BYTES, Stored, parse_placement, writers
from ..replicas.base import Replica

if TYPE_CHECKING:  # verify, repair and ls read through a Fetcher without torch; restore has it loaded
    import torch

T = TypeVar("T")
log = logging.getLogger("ckptmirror")

#: Failures that make one step unrecoverable but let the reader fall back to an older one.
STEP_FAILURES = (CorruptObjectError, ObjectMissingError, ManifestError, ReplicaError)

#: Object key -> the replicas to read it from, preferred first (see :meth:`Fetcher.preflight`).
ObjectPlan = dict[str, list[Replica]]

#: Why a placement record cannot be used: the class to raise, its text, the original error.
_Unusable = tuple[type[ManifestError | ReplicaError], str, BaseException]

#: Told once per replica that a :class:`Fetcher` stops asking (``ReplicaHealth.mark`` fits).
OnUnavailable = Callable[[Replica, "BaseException | str"], None]


#: ``errno`` values of a read that failed because the medium is damaged (a bad sector, a
#: filesystem checksum error), not because the replica is out of reach.
_MEDIA_ERRNOS = frozenset(e for e in (errno.EIO, getattr(errno, "EBADMSG", None), getattr(errno, "EUCLEAN", None)) if e)


def is_damage(exc: BaseException) -> bool:
    """Whether a step failure is damage (a copy failed its checks, is missing everywhere it was
    looked for, or could not be read off a damaged disk: ``EIO``), as opposed to replicas that
    could not be reached or read for a passing reason."""
    if isinstance(exc, (CorruptObjectError, ManifestError, ObjectMissingError)):
        return True
    return _in_chain(exc, lambda e: isinstance(e, OSError) and e.errno in _MEDIA_ERRNOS)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is this process running out of memory (``ENOMEM``,
    :class:`MemoryError`, torch's ``OutOfMemoryError``, a ``RuntimeError``): nothing a replica
    or an older step can fix."""
    return _in_chain(exc, _is_oom)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
        return True
    return any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__)  # by name: no torch import here


def _in_chain(exc: BaseException, pred: Callable[[BaseException], bool]) -> bool:
    """Whether ``pred`` holds for ``exc`` or an exception that caused it (``__cause__``, else
    ``__context__``; a cycle is walked once)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if pred(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _kind(exc: BaseException) -> type[ManifestError | ReplicaError]:
    """The class to raise again for a placement record that could not be used: damage is a
    :class:`ManifestError`; a replica that could not be read keeps the kind of its failure."""
    for cls in (ReplicaPermissionError, ReplicaConfigError, ReplicaUnavailableError, ReplicaError):
        if isinstance(exc, cls):
            return cls
    return ManifestError


def _failed_check(exc: BaseException) -> bool:
    """A copy that was read and failed its size, checksum or parse check (not merely absent)."""
    return isinstance(exc, (CorruptObjectError, ManifestError))


def _unreadable(errors: Sequence[BaseException], key: str) -> BaseException:
    """What to raise when no replica gave a copy and none failed a check: the replicas' own
    failure when there is one (or one is running out of memory), else a
    :class:`ReplicaUnavailableError` naming each replica's."""
    unread = [e for e in errors if not is_damage(e)]
    oom = next((e for e in unread if out_of_memory(e)), None)
    if oom is not None:
        return oom
    if len(errors) == 1:
        return errors[0]
    urls = {getattr(e, "replica", "") for e in unread}
    exc = ReplicaUnavailableError(
        "no replica could be reached or read: " + "; ".join(str(e) for e in errors),
        replica=urls.pop() if len(urls) == 1 else "",
        key=key,
    )
    exc.__cause__ = unread[0]
    return exc


class Mapped(Protocol):
    """An object's stored bytes mapped into memory (:class:`~ckptmirror.replicas.local.MappedObject`)."""

    addr: int
    size: int

    @property
    def buffer(self) -> object: ...

    def close(self) -> None: ...


class Fetcher:
    """Reads the records and objects of steps from a list of replicas, with per-object fallback.

    Replicas are tried in ``read_priority`` order (local disk first). ``pool`` runs the object
    reads of :func:`~ckptmirror.restore.fill.fill_step`.

    ``skip_unavailable``: once a replica raises :class:`ReplicaUnavailableError` (it missed a
    time budget, refused the connection), it is not asked again by this Fetcher (the rest of
    one restore: later objects, preflights and steps), and ``on_unavailable(replica, exc)`` is
    called once for it. Off by default: the operator commands judge every replica on its own.
    """

    def __init__(
        self,
        replicas: Sequence[Replica],
        pool: ThreadPoolExecutor,
        *,
        skip_unavailable: bool = False,
        on_unavailable: OnUnavailable | None = None,
    ) -> None:
        self.replicas = sorted(replicas, key=lambda r: r.read_priority)
        self.pool = pool
        self.skip_unavailable = skip_unavailable
        self.on_unavailable = on_unavailable
        self._local = threading.local()
        self._lock = threading.Lock()
        #: (replica URL, home key) -> how that replica stores the object, where not raw at home
        self._stored: dict[tuple[str, str], Stored] = {}
        #: (replica URL, step, rank, token) -> None once resolved, or why that placement is
        #: unusable: the class to raise (see _kind), its text and the original error
        self._placements: dict[tuple[str, int, int, str], _Unusable | None] = {}
        #: replica URL -> the outage that took it out of this Fetcher's reads (skip_unavailable)
        self._down: dict[str, ReplicaUnavailableError] = {}

    # -- replicas that stopped answering -------------------------------------------------------
    def unavailable(self) -> dict[str, ReplicaUnavailableError]:
        """URL -> outage of the replicas this Fetcher no longer asks (``skip_unavailable``)."""
        with self._lock:
            return dict(self._down)

    def _failed(self, r: Replica, exc: BaseException) -> None:
        """Note that ``r`` failed with ``exc``: an outage takes it out of this Fetcher's reads."""
        if not self.skip_unavailable or not isinstance(exc, ReplicaUnavailableError):
            return
        with self._lock:
            first = r.url not in self._down
            if first:
                self._down[r.url] = exc
        if not first:
            return
        log.warning("replica %s is unavailable (%s); reading from the other replicas from now on", r.url, exc)
        if self.on_unavailable is not None:
            try:
                self.on_unavailable(r, exc)
            except Exception:  # noqa: BLE001 - reporting must not fail the read
                log.exception("reporting replica %s as unavailable failed", r.url)

    def _skip(self, r: Replica, key: str) -> ReplicaUnavailableError | None:
        """The error standing for ``r`` when this Fetcher no longer asks it, else None."""
        down = self._down.get(r.url)
        if down is None:
            return None
        why = str(down) if len(str(down)) <= 200 else str(down)[:197] + "..."  # in full where it happened
        return ReplicaUnavailableError(
            f"not asked: unavailable earlier in this restore ({why})", replica=r.url, key=key
        )

    # -- manifests -----------------------------------------------------------------------
    def read_commit(self, step: int, urls: Sequence[str] | None = None) -> CommitRecord:
        """The commit record of ``step`` from the first replica where it parses."""
        errors: list[BaseException] = []
        key = commit_key(step)
        for r in self.replicas:
            if urls is not None and r.url not in urls:
                continue
            skipped = self._skip(r, key)
            if skipped is not None:
                errors.append(skipped)
                continue
            try:
                return parse_commit(r.get(key, MAX_MANIFEST_BYTES), key)
            except STEP_FAILURES as exc:
                self._failed(r, exc)
                if isinstance(exc, ManifestError) and not exc.replica:
                    exc = ManifestError(str(exc).split(": ", 1)[-1], replica=r.url, key=key)
                errors.append(exc)
        if not errors:
            raise ObjectMissingError("no replica to read the commit record from", key=key)
        if len(errors) == 1:
            raise errors[0]
        if any(is_damage(e) for e in errors):
            raise ManifestError("no replica holds a valid commit: " + "; ".join(str(e) for e in errors), key=key)
        raise _unreadable(errors, key)

    def other_commits(self, first: CommitRecord, urls: Sequence[str] | None = None) -> Iterator[CommitRecord]:
        """The commit records of ``first``'s step on the other replicas (of ``urls``) that parse,
        record the same save (:meth:`CommitRecord.same_save`: the same manifest files) and pin
        other sizes or checksums for them, in read order, each once; a replica that fails is
        passed over. Read only when ``first`` failed its checks: one bit flipped in a commit
        record makes it pin a manifest no replica holds, while another replica's record of the
        same save is whole. Never another save: the ranks of a restore vote on a step number
        only, and each takes its record on its own, so another save could be mixed in."""
        key = commit_key(first.step)
        seen = {first.pins}
        for r in self.replicas:
            if (urls is not None and r.url not in urls) or self._skip(r, key) is not None:
                continue
            try:
                c = parse_commit(r.get(key, MAX_MANIFEST_BYTES), key)
            except STEP_FAILURES as exc:
                self._failed(r, exc)
                continue
            if c.pins not in seen and first.same_save(c):
                seen.add(c.pins)
                yield c

    def probe_commits(self, first: CommitRecord, urls: Sequence[str] | None, probe: Callable[[CommitRecord], T]) -> T:
        """``probe(first)``; when that fails with damage, ``probe`` of each of
        :meth:`other_commits` in turn, the first that passes (with a WARNING), else ``first``'s
        error. Other failures (an outage) are raised as they come."""
        try:
            return probe(first)
        except STEP_FAILURES as exc:
            if not is_damage(exc):
                raise
            for other in self.other_commits(first, urls):
                try:
                    found = probe(other)
                except STEP_FAILURES as exc2:
                    if not is_damage(exc2):
                        raise
                    continue
                log.warning(
                    "step %d: the commit record read first does not verify (%s); using another replica's "
                    "record of the same save, which does ('ckptmirror verify' names the damaged one, "
                    "'ckptmirror repair' replaces it)",
                    first.step,
                    exc,
                )
                return found
            raise

    def read_manifest(self, commit: CommitRecord, rank: int) -> RankManifest:
        """The rank manifest, verified against the commit's pin, from any replica."""
        ref = commit.manifest_ref(rank)
        errors: list[str] = []
        failures: list[BaseException] = []
        parse_failures = 0
        for r in self.replicas:
            skipped = self._skip(r, ref.key)
            if skipped is not None:
                errors.append(str(skipped))
                failures.append(skipped)
                continue
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
                failures.append(exc)
            except STEP_FAILURES as exc:
                self._failed(r, exc)
                errors.append(str(exc))
                failures.append(exc)
        if failures and not any(_failed_check(e) for e in failures) and not all(is_damage(e) for e in failures):
            raise _unreadable(failures, ref.key)  # nothing failed a check: not damage
        cls = ManifestError if parse_failures == len(errors) else CorruptObjectError
        raise cls("no replica holds a valid, verifying copy: " + "; ".join(errors), key=ref.key)

    # -- objects -------------------------------------------------------------------------
    def _buffer(self, nbytes: int) -> torch.Tensor:
        import torch

        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self._local.buf = buf
        return buf[:nbytes]

    def _bounce(self, nbytes: int) -> memoryview:
        """This thread's reusable buffer for stored (encoded) bytes."""
        buf = getattr(self._local, "enc", None)
        if buf is None or len(buf) < nbytes:
            buf = bytearray(nbytes)
            self._local.enc = buf
        return memoryview(buf)[:nbytes]

    def _resolve(self, r: Replica, m: RankManifest, objs: Sequence[ObjectRecord]) -> None:
        """Read ``r``'s placement records for the writers of ``objs`` (once per replica and writer)."""
        for rank, token in writers(objs):
            if m.format_version < 3:  # no placements before version 3: nothing to read
                with self._lock:
                    self._placements.setdefault((r.url, m.step, rank, token), None)
            else:
                self._resolve_writer(r, m.step, rank, token)

    def _resolve_writer(self, r: Replica, step: int, rank: int, token: str) -> None:
        slot = (r.url, step, rank, token)
        with self._lock:
            if slot in self._placements:
                return
        pkey = placement_key(step, rank, token)
        problem: _Unusable | None = None
        entries: dict[tuple[str, str], Stored] = {}
        try:
            p = parse_placement(r.get(pkey, MAX_PLACEMENT_BYTES), pkey)
            entries = {(r.url, home): s for home, s in p.entries.items()}
        except ObjectMissingError:
            pass  # no placement: every object of that writer is raw under its own name
        except STEP_FAILURES as exc:
            self._failed(r, exc)
            problem = (_kind(exc), f"placement record {pkey}: {exc}", exc)
        with self._lock:
            self._placements[slot] = problem
            self._stored.update(entries)

    def stored(self, r: Replica, obj: ObjectRecord) -> Stored:
        """How ``r`` holds ``obj``: reads ``r``'s placement record for it on first use.

        Raises :class:`ManifestError` when ``r``'s placement record for it is unusable, the
        replica's error (a :class:`ReplicaError`) when it could not be read.
        """
        w = writer_of(obj.key)
        if w is not None:
            step = int(obj.key[5:17])  # "step-NNNNNNNNNNNN/...": validated by the manifest's parser
            self._resolve_writer(r, step, *w)
            problem = self._placements.get((r.url, step, *w))
            if problem:
                raise problem[0](problem[1], replica=r.url, key=obj.key) from problem[2]
        s = self._stored.get((r.url, obj.key))
        if s is None:
            return Stored(obj.key, "none", obj.size, obj.checksum)
        if s.codec == "none" and (s.size, s.checksum) != (obj.size, obj.checksum):
            raise ManifestError("placement contradicts the manifest", replica=r.url, key=obj.key)
        return s

    def verify_stored(self, r: Replica, obj: ObjectRecord) -> Stored:
        """Check what ``r`` stores for ``obj`` against its pinned size and checksum, without
        decoding: the placement pins a compressed object's stored bytes (``verify``, ``scrub``).
        Returns how it is stored; raises one of :data:`STEP_FAILURES`."""
        st = self.stored(r, obj)
        buf = self._bounce(st.size)
        r.read_into(st.key, buf)
        got = checksum(buf)
        if got != st.checksum:
            where = "" if st.key == obj.key else f" (stored as {st.key})"
            raise CorruptObjectError(
                f"checksum mismatch{where}: stored {got}, expected {st.checksum}", replica=r.url, key=obj.key
            )
        return st

    def locate(self, m: RankManifest, objs: Sequence[ObjectRecord] | None = None) -> None:
        """Read every replica's placement records for ``objs`` (default: all of ``m``'s)."""
        for r in self.replicas:
            self._resolve(r, m, m.objects if objs is None else objs)

    def preflight(self, m: RankManifest) -> ObjectPlan:
        """For each object, the replicas to read it from, preferred first.

        Run before any tensor is modified, so a step that is missing objects everywhere is
        rejected without touching the caller's state. Replicas are asked in preference order
        until one holds the object with its recorded size; the ones after it stay as fallbacks
        without being asked (a read checks size and checksum anyway), so a local copy spares
        a HEAD request per object to every remote replica.
        """
        plan: ObjectPlan = {}
        resolved: set[str] = set()
        for obj in m.objects:
            problems = []
            unread: list[BaseException] = []  # replicas that could not be asked or read
            for idx, r in enumerate(self.replicas):
                skipped = self._skip(r, obj.key)
                if skipped is not None:
                    problems.append(f"{r.url}: {skipped}")
                    unread.append(skipped)
                    continue
                try:
                    if r.url not in resolved:
                        self._resolve(r, m, m.objects)  # placements only of replicas that are asked
                        resolved.add(r.url)
                    st = self.stored(r, obj)
                    size = r.size(st.key)
                except STEP_FAILURES as exc:
                    self._failed(r, exc)
                    problems.append(f"{r.url}: {exc}")
                    if not is_damage(exc):
                        unread.append(exc)
                    continue
                if size == st.size:
                    plan[obj.key] = [r, *self.replicas[idx + 1 :]]
                    break
                where = "" if st.key == obj.key else f" (stored as {st.key})"
                problems.append(
                    f"{r.url}: " + ("missing" if size is None else f"size {size}, expected {st.size}") + where
                )
            else:
                # Truncated somewhere is corruption; absent everywhere is a missing object;
                # absent or unreadable everywhere (nothing truncated) is an outage, not damage.
                missing = [p for p in problems if p.endswith(": missing")]
                if unread and len(missing) + len(unread) == len(problems):
                    if len(unread) == 1 and not missing:
                        raise unread[0]
                    gone = [ObjectMissingError("missing", replica=p[: -len(": missing")]) for p in missing]
                    raise _unreadable(gone + unread, obj.key)
                cls = ObjectMissingError if len(missing) == len(problems) else CorruptObjectError
                raise cls("no replica holds it with the recorded size (" + "; ".join(problems) + ")", key=obj.key)
        return plan

    def fetch(
        self, key: str, size: int, csum: str, candidates: Sequence[Replica], into: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, str]:
        """Read one object from the first replica where it verifies: into ``into`` (a CPU uint8
        tensor of ``size`` bytes) when given, else into this thread's reusable buffer."""
        from ..buffers import host_bytes

        buf = into if into is not None else self._buffer(size)
        return buf, self.fetch_into(key, csum, candidates, host_bytes(buf))

    def verify_mapped(
        self, key: str, size: int, csum: str, candidates: Sequence[Replica]
    ) -> tuple[Mapped | None, str, Sequence[Replica]]:
        """Verify one object where it lies, without copying it, when the first candidate can map
        its files (local disk) and stores it raw.

        Returns ``(mapping, url, candidates)``: the verified mapping (the caller copies from it
        and closes it) and its replica's URL; or ``None`` and the candidates to read it from
        instead: all of them when mapping does not apply, the others when this copy failed.
        """
        r = candidates[0] if candidates else None
        mapper = getattr(r, "map_object", None)
        if r is None or mapper is None:
            return None, "", candidates
        skipped = self._skip(r, key)
        if skipped is not None:
            if len(candidates) == 1:
                raise skipped
            return None, "", candidates[1:]
        try:
            st = self.stored(r, ObjectRecord(key, size, csum))
            if st.codec != "none":
                return None, "", candidates  # compressed: decoded through the usual read
            mo: Mapped | None = mapper(st.key, size)  # its own name or an earlier step's (incremental)
            if mo is None:
                return None, "", candidates
            got = checksum(mo.buffer)  # type: ignore[arg-type]  # a buffer: xxhash reads the mapped pages
            if got != csum:
                mo.close()
                raise CorruptObjectError(f"checksum mismatch: stored {got}, manifest {csum}", replica=r.url, key=key)
            return mo, r.url, candidates
        except STEP_FAILURES as exc:
            self._failed(r, exc)
            if len(candidates) == 1:
                if not is_damage(exc):
                    raise  # could not be read (an outage, ENOMEM): not a corrupt copy
                raise CorruptObjectError(f"no replica holds a verifying copy: {exc}", key=key) from exc
            log.warning("object %s failed on %s, trying the next replica: %s", key, r.url, exc)
            return None, "", candidates[1:]

    def fetch_into(self, key: str, csum: str, candidates: Sequence[Replica], out: memoryview) -> str:
        """Read one object into ``out`` (exactly its size) from the first replica where it
        verifies; return that replica's URL. ``out`` may hold garbage after a failure."""
        problems: list[BaseException] = []
        for r in candidates:
            skipped = self._skip(r, key)
            if skipped is not None:
                problems.append(skipped)
                continue
            try:
                st = self.stored(r, ObjectRecord(key, len(out), csum))
                if st.codec == "none":
                    r.read_into(st.key, out)
                else:
                    blob = self._bounce(st.size)
                    r.read_into(st.key, blob)
                    got = checksum(blob)
                    if got != st.checksum:
                        raise CorruptObjectError(
                            f"stored bytes {st.key} do not match their checksum: {got}, placement {st.checksum}",
                            replica=r.url,
                            key=key,
                        )
                    from .. import codec  # here: zstandard is imported only by reads that decode

                    codec.decode(blob, out)
                got = checksum(out)
                if got != csum:
                    what = "stored" if st.codec == "none" else f"decoded ({st.codec}, from {st.key})"
                    raise CorruptObjectError(
                        f"checksum mismatch: {what} {got}, manifest {csum}", replica=r.url, key=key
                    )
                return r.url
            except STEP_FAILURES as exc:
                self._failed(r, exc)
                log.warning("object %s failed on %s, trying the next replica: %s", key, r.url, exc)
                problems.append(exc)
        if problems and not any(_failed_check(e) for e in problems) and not all(is_damage(e) for e in problems):
            raise _unreadable(problems, key)  # not damage: an outage
        raise CorruptObjectError("no replica holds a verifying copy: " + "; ".join(map(str, problems)), key=key)
