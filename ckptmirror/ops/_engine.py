"""The checking engine behind ``verify``, ``repair``, ``prune`` and ``ls``.

It checks each replica on its own with the reader's functions (commit, rank manifests,
:func:`~ckptmirror.restore.check.validate_manifest`, preflight, fetch) and reads objects on a thread
pool; see :mod:`ckptmirror.ops` for why. Nothing here writes to a replica.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..checksum import checksum
from ..errors import CorruptObjectError, ManifestError, ObjectMissingError, ReplicaError, ReplicaUnavailableError
from ..format import (
    MAX_MANIFEST_BYTES,
    MAX_SHARE_BYTES,
    TMP_PREFIX,
    CommitRecord,
    ObjectRecord,
    RankManifest,
    ShareRecord,
    commit_key,
    is_share_key,
    parse_commit,
    step_dir,
    writer_of,
)
from ..placement import is_placement_key
from ..replicas import Replica
from ..replicas._scrub import HELD_PREFIX
from ..restore.check import validate_manifest
from ..restore.discover import StepListing
from ..restore.fetch import Fetcher
from ..save.retention import protected_keys
from ._common import FAILURES, Problem, ProgressFactory, strip_where

#: Name prefix of a replica's temporary files (an upload that has not been renamed yet).


@dataclass
class ObjJob:
    """Check one object (or rank manifest: same size + checksum rules) on one replica."""

    replica: Replica
    step: int
    rank: int
    obj: ObjectRecord
    problem: Problem | None = None


@dataclass
class RankPlan:
    """One rank of one step on one replica: its manifest, what is wrong with it, its object checks."""

    rank: int
    key: str
    size: int
    checksum: str
    manifest: RankManifest | None
    manifest_problem: Problem | None
    invalid: Problem | None
    jobs: list[ObjJob]
    #: False: the rank is not meant to be on this replica (a partial replica: its share record
    #: leaves the rank out and the rank's manifest is absent); nothing of it is checked here.
    held: bool = True

    def problems(self) -> list[Problem]:
        """The manifest's problems, then those of its objects (once they have been checked)."""
        return [p for p in (self.manifest_problem, self.invalid) if p is not None] + [
            j.problem for j in self.jobs if j.problem is not None
        ]


@dataclass
class ReplicaPlan:
    """One step on one replica; ``commit`` is None when the replica has no usable commit record."""

    replica: Replica
    step: int
    commit: CommitRecord | None
    commit_problem: Problem | None
    ranks: list[RankPlan] = field(default_factory=list)

    def jobs(self) -> list[ObjJob]:
        """Every object check of every rank."""
        return [j for rp in self.ranks for j in rp.jobs]


class Engine:
    """Per-replica checks of steps with the reader's own functions, objects read in parallel."""

    def __init__(
        self, replicas: Sequence[Replica], threads: int, quick: bool, progress: ProgressFactory | None
    ) -> None:
        self.replicas = sorted(replicas, key=lambda r: r.read_priority)
        self.quick = quick
        self.progress = progress
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="ckptmirror-verify")
        # One reader over all replicas (its per-thread buffer serves every object read), and
        # one per replica for commits and manifests, so a replica is never judged by another's copy.
        # skip_unavailable: a replica that stopped answering is not asked again by that reader
        # (each ask would cost a time budget); its reads fail at once as unavailable.
        self.shared = Fetcher(self.replicas, self.pool, skip_unavailable=True)
        self.single = {r.url: Fetcher([r], self.pool, skip_unavailable=True) for r in self.replicas}
        self.good: set[tuple[str, str, str]] = set()  # (replica url, key, checksum) that verified
        #: (size, checksum) -> the (replica url, key) pairs where bytes of that size and checksum
        #: verified: where ``repair`` may copy an object from when no replica holds it under its
        #: own name (see :meth:`copy_sources`)
        self.content: dict[tuple[int, str], set[tuple[str, str]]] = {}
        self.checked: set[tuple[str, str, str]] = set()  # ... that were checked
        self._lock = threading.Lock()
        self._manifests: dict[tuple[str, str], RankManifest | None] = {}
        self._invalid: dict[tuple[str, str], str | None] = {}
        self._shares: dict[tuple[str, int], ShareRecord | None] = {}
        #: ``repair --partial``: a replica without a commit record of a step is to hold what the
        #: partial replicas given hold (see :meth:`_inherited_share`); off, the rule of a full copy
        self.inherit_shares = False
        #: (replica URL, step) -> the ranks it inherited: repair writes its share record
        self.inherited: dict[tuple[str, int], tuple[int, ...]] = {}
        #: replica URL -> the outage that stopped it answering in this run: what it holds is not
        #: asked again (each ask would cost its time budget) and is reported ``unavailable``
        self.down: dict[str, str] = {}

    def close(self) -> None:
        """Wait for the object reads in flight and stop the thread pool."""
        self.pool.shutdown(wait=True)

    # -- replicas that stop answering -------------------------------------------------------
    def unavailable(self, r: Replica, step: int, key: str, rank: int | None = None) -> Problem | None:
        """The ``unavailable`` problem standing for ``key`` if ``r`` stopped answering earlier in
        this run (then nothing is asked of it), else None."""
        why = self.down.get(r.url)
        if why is None:
            return None
        return Problem(step, r.url, key, "unavailable", f"not checked: the replica stopped answering ({why})", rank)

    def _outage(self, r: Replica, step: int, key: str, exc: BaseException, rank: int | None) -> Problem | None:
        """If ``exc`` is an outage (no answer within the time budget, refused, throttled
        throughout), note ``r`` as down for the rest of the run and return its ``unavailable``
        problem: what ``r`` holds is unknown, which is not damage. Else None."""
        text = self.mark_down(r, exc, key)
        return None if text is None else Problem(step, r.url, key, "unavailable", text, rank)

    def mark_down(self, r: Replica, exc: BaseException, key: str = "") -> str | None:
        """If ``exc`` is an outage of ``r``, note ``r`` as down for the rest of the run and return
        what it said (without the replica and key); else None."""
        if not isinstance(exc, ReplicaUnavailableError):
            return None
        text = strip_where(str(exc), r.url, key)
        with self._lock:
            self.down.setdefault(r.url, text if len(text) <= 300 else text[:297] + "...")
        return text

    # -- commits and manifests ------------------------------------------------------------
    def commit_on(self, r: Replica, step: int) -> tuple[CommitRecord | None, Problem | None]:
        """``r``'s own commit record of ``step``, parsed by the reader, or what is wrong with it."""
        key = commit_key(step)
        down = self.unavailable(r, step, key)
        if down is not None:
            return None, down
        try:
            return self.single[r.url].read_commit(step), None
        except FAILURES as exc:
            outage = self._outage(r, step, key, exc, None)
            if outage is not None:
                return None, outage
            kind = (
                "missing"
                if isinstance(exc, ObjectMissingError)
                else "invalid"
                if isinstance(exc, (ManifestError, CorruptObjectError))
                else "unreadable"
            )
            return None, Problem(step, r.url, key, kind, strip_where(str(exc), r.url, key))

    def replica_plan(self, r: Replica, step: int) -> ReplicaPlan:
        """:meth:`plan` against ``r``'s own commit; without ranks if that commit is unusable."""
        commit, problem = self.commit_on(r, step)
        return self.plan(r, step, commit) if commit is not None else ReplicaPlan(r, step, None, problem)

    def _describe(
        self,
        r: Replica,
        step: int,
        rank: int | None,
        key: str,
        size: int,
        exc: BaseException,
        obj: ObjectRecord | None = None,
    ) -> Problem:
        """The :class:`Problem` for a failed read of ``key``, named by its size on ``r``.

        The reader's errors say that a read failed; the size on the replica says how. For an
        object (``obj``, its record), the size looked at is that of what ``r`` stores for it,
        by its placement record: compressed (``.zst``), or an earlier step's object (incremental).
        """
        outage = self._outage(r, step, key, exc, rank)
        if outage is not None:
            return outage
        if r.url in self.down:
            # Another read found the replica down meanwhile: ask it nothing more, but this read
            # did get an answer, and what it says (a checksum mismatch, ...) is still damage.
            kind = (
                "missing"
                if isinstance(exc, ObjectMissingError)
                else "invalid"
                if isinstance(exc, ManifestError) and obj is None
                else "corrupt"
                if isinstance(exc, (CorruptObjectError, ManifestError))
                else "unreadable"
            )
            return Problem(step, r.url, key, kind, strip_where(str(exc), r.url, key), rank)
        stored_key, stored_size = key, size
        if obj is not None:
            try:
                st = self.single[r.url].stored(r, obj)
                stored_key, stored_size = st.key, st.size
            except ManifestError as bad:
                # A damaged placement record: where this replica stores the object is unknown.
                # Not "missing" (the size of its home key says nothing); ``repair`` stores it raw
                # from a replica where it verifies and then removes the record.
                return Problem(step, r.url, key, "invalid", strip_where(str(bad), r.url, key), rank)
            except FAILURES:  # the record could not be read: the read's own error says so
                pass
        as_ = "" if stored_key == key else f" (stored as {stored_key})"
        try:
            got = r.size(stored_key)
        except FAILURES as e2:
            outage = self._outage(r, step, key, e2, rank)
            if outage is not None:
                return outage
            return Problem(step, r.url, key, "unreadable", strip_where(str(e2), r.url, key) + as_, rank)
        if got is None:
            return Problem(step, r.url, key, "missing", "not found" + as_, rank)
        if got < stored_size:
            return Problem(step, r.url, key, "truncated", f"{got} bytes, recorded {stored_size}{as_}", rank)
        if got > stored_size:
            return Problem(step, r.url, key, "wrong-size", f"{got} bytes, recorded {stored_size}{as_}", rank)
        kind = "unreadable" if isinstance(exc, ReplicaError) else "corrupt"
        return Problem(step, r.url, key, kind, strip_where(str(exc), r.url, key), rank)

    def manifest_anywhere(self, commit: CommitRecord, rank: int) -> RankManifest | None:
        """The rank manifest from any replica where it matches the commit's pin (cached)."""
        ref = commit.ranks[rank]
        k = (ref.key, ref.checksum)
        if k not in self._manifests:
            try:
                self._manifests[k] = self.shared.read_manifest(commit, rank)
            except FAILURES:
                self._manifests[k] = None
        return self._manifests[k]

    def _validate(self, m: RankManifest, key: str, csum: str) -> str | None:
        """What the reader checks before it reads a byte (:func:`validate_manifest`), cached."""
        k = (key, csum)
        if k not in self._invalid:
            try:
                validate_manifest(m, key)
                self._invalid[k] = None
            except FAILURES as exc:
                self._invalid[k] = str(exc)
        return self._invalid[k]

    def share_on(self, r: Replica, step: int) -> ShareRecord | None:
        """``r``'s share record of the commit record of ``step`` stored there (which ranks it
        holds: :mod:`ckptmirror.format.share`), cached; None if it has none that is about that
        record (then ``r`` must hold every rank)."""
        k = (r.url, step)
        if r.url in self.down:
            return None
        if k not in self._shares:
            share = None
            try:
                csum = checksum(r.get(commit_key(step), MAX_MANIFEST_BYTES))
            except (ObjectMissingError, FileNotFoundError):
                # No commit here (a lagging or replaced replica): it is to hold what the partial
                # replicas given with it hold, when every copy of the step is partial.
                share = self._inherited_share(r, step) if self.inherit_shares else None
            except FAILURES:
                pass  # an unreadable commit record: the rule of a full copy
            else:
                share = self._records_on(r, step, csum)
            self._shares[k] = share
        return self._shares[k]

    def _records_on(self, r: Replica, step: int, csum: str) -> ShareRecord | None:
        """The union of ``r``'s share records of the commit record ``csum``, or None (none there,
        one that does not parse, or ``r`` cannot be read: the rule of a full copy)."""
        try:
            keys = [key for key in r.list_prefix(step_dir(step)) if is_share_key(key, csum)]
            # One record per group that writes here: their union is what the replica holds
            # (a directory every node writes to gets the whole world: a full copy).
            records = [ShareRecord.parse(r.get(key, MAX_SHARE_BYTES), step, csum) for key in keys]
        except FAILURES:
            return None
        if not records or any(rec is None for rec in records):
            return None
        return ShareRecord(step, csum, tuple(sorted({x for rec in records if rec is not None for x in rec.ranks})))

    def _inherited_share(self, r: Replica, step: int) -> ShareRecord | None:
        """With :attr:`inherit_shares` (``repair --partial``): what a replica without a commit
        record of ``step`` is to hold, the union of the ranks the other replicas given hold, when
        each that holds the step is partial and all hold records of the same save (a node-local
        disk rebuilt from its node's ``ring_peer`` namespace). None when any holds all of it or
        they hold other saves (the rule of a full copy). Only on request: a full replica that
        merely missed a step (an S3 bucket, a shared directory) must not be made partial."""
        holders: list[tuple[CommitRecord, ShareRecord]] = []
        for o in self.replicas:
            if o is r or o.url in self.down:
                continue
            try:
                raw = o.get(commit_key(step), MAX_MANIFEST_BYTES)
                commit = parse_commit(raw, commit_key(step))
            except FAILURES:
                continue  # not held there (or unreadable: not a source either)
            rec = self._records_on(o, step, checksum(raw))
            if rec is None:
                return None  # a full copy is given: the target gets every rank
            holders.append((commit, rec))
        if not holders or not all(holders[0][0].same_save(c) for c, _ in holders):
            return None
        ranks = tuple(sorted({x for _, rec in holders for x in rec.ranks}))
        with self._lock:
            self.inherited[(r.url, step)] = ranks
        return ShareRecord(step, "", ranks)

    def plan(self, r: Replica, step: int, commit: CommitRecord) -> ReplicaPlan:
        """Check ``r``'s rank manifests against ``commit`` and list its object checks."""
        plan = ReplicaPlan(r, step, commit, None)
        for ref in commit.ranks:
            mprob: Problem | None = None
            try:
                m: RankManifest | None = self.single[r.url].read_manifest(commit, ref.rank)
                self._mark_good(r.url, ref.key, ref.size, ref.checksum)
            except FAILURES as exc:
                mprob = self._describe(r, step, ref.rank, ref.key, ref.size, exc)
                m = self.manifest_anywhere(commit, ref.rank)  # still check this replica's objects
                share = self.share_on(r, step) if mprob.kind == "missing" else None
                if share is not None and ref.rank not in share.ranks:
                    # Another node's rank on a partial replica: never written here, nothing to check.
                    plan.ranks.append(RankPlan(ref.rank, ref.key, ref.size, ref.checksum, m, None, None, [], False))
                    continue
            invalid = None
            if m is not None:
                why = self._validate(m, ref.key, ref.checksum)
                if why is not None:
                    invalid = Problem(step, r.url, ref.key, "invalid", why, ref.rank)
            jobs = [ObjJob(r, step, ref.rank, o) for o in m.objects] if m is not None else []
            plan.ranks.append(RankPlan(ref.rank, ref.key, ref.size, ref.checksum, m, mprob, invalid, jobs))
        return plan

    # -- objects ---------------------------------------------------------------------------
    def _mark_good(self, url: str, key: str, size: int, csum: str) -> None:
        with self._lock:
            self._good_locked(url, key, size, csum)

    def _good_locked(self, url: str, key: str, size: int, csum: str) -> None:
        self.good.add((url, key, csum))
        self.content.setdefault((size, csum), set()).add((url, key))

    def good_anywhere(self, key: str, csum: str) -> bool:
        """Whether ``key`` verified with checksum ``csum`` on some replica."""
        return any((r.url, key, csum) in self.good for r in self.replicas)

    def content_anywhere(self, size: int, csum: str) -> bool:
        """Whether bytes of ``size`` and checksum ``csum`` verified anywhere, under any name."""
        return bool(self.content.get((size, csum)))

    def sources(self, key: str, csum: str, exclude: Replica) -> list[Replica]:
        """Replicas (preferred first) where ``key`` verified with checksum ``csum``."""
        return [r for r in self.replicas if r is not exclude and (r.url, key, csum) in self.good]

    def copy_sources(self, key: str, size: int, csum: str, exclude: Replica) -> list[tuple[str, list[Replica]]]:
        """Where ``repair`` can copy ``key`` (``size`` bytes, checksum ``csum``) to ``exclude``
        from: ``(key there, replicas)`` groups, ``key`` itself first (:meth:`sources`), then the
        same bytes under other names (preferred replicas first in each group), ``exclude``'s own
        included, last. A name may head two groups (other replicas', then the target's).

        Steps share bytes under different names: an incremental save keeps an unchanged object
        under the name of the step that first wrote it, a self-contained save (another replica's
        setting, a full save after a restart) under its own. When the only verifying copy of an
        object is such a twin, it is as good a source as the object itself: the copy is checked
        against ``size`` and ``csum`` while it is read, as every copy is. Without this, one repair
        run rebuilt the shared file through another step and still called the first step
        unrepairable, and a second run was needed to finish."""
        own = self.sources(key, csum, exclude)
        groups: list[tuple[str, list[Replica]]] = [(key, own)] if own else []
        order = {r.url: i for i, r in enumerate(self.replicas)}
        by_url = {r.url: r for r in self.replicas}
        with self._lock:
            twins = sorted((order[u], k) for u, k in self.content.get((size, csum), ()) if k != key and u in by_url)
        others: dict[str, list[Replica]] = {}
        for i, k in twins:
            others.setdefault(k, []).append(self.replicas[i])
        # The target's own twins after every other replica's: a slow read there would otherwise
        # count against the target (marked down for the rest of the run) although another
        # replica holds the same bytes.
        mine = exclude.url
        groups += [(k, rest) for k, reps in others.items() if (rest := [r for r in reps if r.url != mine])]
        groups += [(k, [r]) for k, reps in others.items() for r in reps if r.url == mine]
        return groups

    def _check(self, job: ObjJob) -> None:
        """Check one object on one replica (presence and size; contents unless quick)."""
        r, obj = job.replica, job.obj
        with self._lock:
            self.checked.add((r.url, obj.key, obj.checksum))
        down = self.unavailable(r, job.step, obj.key, job.rank)
        if down is not None:
            job.problem = down
            return
        reader = self.single[r.url]
        try:
            # Presence and size: exactly the reader's preflight, for this one object.
            reader.preflight(RankManifest(job.step, job.rank, job.rank + 1, (obj,), (), (), None))
        except FAILURES as exc:
            job.problem = self._describe(r, job.step, job.rank, obj.key, obj.size, exc, obj)
            return
        if not self.quick:
            try:
                # Size + xxh3 of what this replica stores (compressed bytes as the placement pins
                # them: nothing is decoded); the manifest's own check happens on every restore.
                reader.verify_stored(r, obj)
            except FAILURES as exc:
                job.problem = self._describe(r, job.step, job.rank, obj.key, obj.size, exc, obj)
                return
        self._mark_good(r.url, obj.key, obj.size, obj.checksum)

    def settle(self, job: ObjJob, problem: Problem | None) -> None:
        """Record the result of ``job`` known without reading it (a peer agent's scrub results,
        see :mod:`.verify`) exactly as :meth:`_check` records a read: checked, and good unless
        ``problem``. Such a job is then left out of :meth:`run` and :meth:`complete`."""
        with self._lock:
            self.checked.add((job.replica.url, job.obj.key, job.obj.checksum))
            if problem is None:
                self._good_locked(job.replica.url, job.obj.key, job.obj.size, job.obj.checksum)
        job.problem = problem

    def complete(self, plans: Sequence[ReplicaPlan], what: str) -> None:
        """Check, on every other replica, the items of ``plans`` that verified nowhere yet.

        The reader takes each object from any replica that holds it with the pinned size and
        checksum, a torn copy included; so does the judgement of whether a step is recoverable.
        """
        jobs: list[ObjJob] = []
        queued: set[tuple[str, str, str]] = set()
        for plan in plans:
            for rp in plan.ranks:
                items = [ObjectRecord(rp.key, rp.size, rp.checksum)] + (
                    list(rp.manifest.objects) if rp.manifest else []
                )
                for obj in items:
                    if self.good_anywhere(obj.key, obj.checksum):
                        continue
                    for r in self.replicas:
                        k = (r.url, obj.key, obj.checksum)
                        if k not in self.checked and k not in queued:
                            queued.add(k)
                            jobs.append(ObjJob(r, plan.step, rp.rank, obj))
        self.run(jobs, what)

    def run(self, jobs: Sequence[ObjJob], what: str = "verify") -> None:
        """Check every object of ``jobs`` in parallel; results land in ``job.problem``."""
        if not jobs:
            return
        unit = "obj" if self.quick else "B"
        bar = (
            self.progress(len(jobs) if self.quick else sum(j.obj.size for j in jobs), unit, what)
            if self.progress
            else None
        )

        def one(job: ObjJob) -> None:
            self._check(job)
            if bar is not None:
                with self._lock:
                    bar.update(1 if self.quick else job.obj.size)

        try:
            for f in [self.pool.submit(one, j) for j in jobs]:
                f.result()
        finally:
            if bar is not None:
                bar.close()


# ----------------------------------------------------------------------------- judgements


def plan_problems(plan: ReplicaPlan) -> list[Problem]:
    """Every problem of one step on one replica, in commit, rank, object order."""
    out: list[Problem] = []
    if plan.commit_problem is not None:
        out.append(plan.commit_problem)
    for rp in plan.ranks:
        out.extend(rp.problems())  # a rank without a manifest has no object jobs
        outage = rp.manifest_problem is not None and rp.manifest_problem.kind == "unavailable"
        if rp.manifest is None and rp.held and not outage:  # an outage says so already
            out.append(
                Problem(
                    plan.step,
                    plan.replica.url,
                    rp.key,
                    "unrecoverable",
                    "no replica holds a copy that matches the commit, so its objects cannot be checked",
                    rp.rank,
                )
            )
    return out


def unchecked_ranks(plans: Sequence[ReplicaPlan]) -> tuple[int, ...]:
    """The ranks of a step that no replica checked here holds: every replica with a commit is a
    partial one whose share record leaves them out (they are on other nodes' replicas)."""
    held: set[int] = set()
    seen: set[int] = set()
    for plan in plans:
        if plan.commit is None:
            continue
        for rp in plan.ranks:
            seen.add(rp.rank)
            if rp.held:
                held.add(rp.rank)
    return tuple(sorted(seen - held))


def recoverable(eng: Engine, plans: Sequence[ReplicaPlan], by_content: bool = False) -> bool:
    """Whether some commit of the step has every manifest and object verifying somewhere, but
    for the ranks no replica here holds (:func:`unchecked_ranks`: they cannot be judged here).

    ``by_content``: an object also counts when its bytes verified under another name (another
    step's, see :meth:`Engine.copy_sources`): whether ``repair`` can rebuild the step, not
    whether a restore can read it as it is (a restore reads each object by its own name)."""
    unchecked = set(unchecked_ranks(plans))
    # By content, the objects must also be writable where the step is rebuilt: repair never
    # overwrites a copy its backend could not read (``unreadable``) or that stopped answering
    # (``unavailable``), and a replica that went down in this run takes no copies. Some one
    # replica must be able to hold every object of the rank, by name or by a copy.
    blocked, not_taking, targets = set(), set(), []
    if by_content:
        blocked = {
            (p.replica.url, j.obj.key)
            for p in plans
            for rp in p.ranks
            for j in rp.jobs
            if j.problem is not None and j.problem.kind in ("unreadable", "unavailable")
        }
        # A partial replica takes only the ranks it holds (its share record): repair writes no other.
        not_taking = {(p.replica.url, rp.rank) for p in plans for rp in p.ranks if not rp.held}
        targets = [r.url for r in eng.replicas if r.url not in eng.down]

    def held(key: str, size: int, csum: str) -> bool:
        return eng.good_anywhere(key, csum) or (by_content and eng.content_anywhere(size, csum))

    def objects_held(rank: int, objects: Sequence[ObjectRecord]) -> bool:
        if all(eng.good_anywhere(o.key, o.checksum) for o in objects):
            return True  # by name (by content is never stricter: a replica down since counts too)
        return by_content and any(
            all(
                (url, o.key, o.checksum) in eng.good
                or ((url, o.key) not in blocked and held(o.key, o.size, o.checksum))
                for o in objects
            )
            for url in targets
            if (url, rank) not in not_taking
        )

    for plan in plans:
        if plan.commit is None:
            continue
        ok = True
        for rp in plan.ranks:
            if rp.rank in unchecked:
                continue
            if rp.manifest is None or rp.invalid is not None or not held(rp.key, rp.size, rp.checksum):
                ok = False
                break
            if not objects_held(rp.rank, rp.manifest.objects):
                ok = False
                break
        if ok:
            return True
    return False


def referenced(
    eng: Engine, r: Replica | None, step: int, urls: Sequence[str], unheld: list[int] | None = None
) -> tuple[CommitRecord | None, list[RankManifest] | None, str | None]:
    """Commit (from ``r`` if given, else any of ``urls``) and its rank manifests (from anywhere).

    A rank whose manifest is nowhere, but which the share records of every replica holding the
    step leave out (partial replicas: it is on other nodes' replicas), is skipped and appended
    to ``unheld``; the manifests are then those of the other ranks."""
    try:
        commit = eng.single[r.url].read_commit(step) if r is not None else eng.shared.read_commit(step, urls)
    except FAILURES as exc:
        return None, None, str(exc)
    holders = [r] if r is not None else [x for x in eng.replicas if x.url in urls]
    ms = []
    skipped = []
    for ref in commit.ranks:
        m = eng.manifest_anywhere(commit, ref.rank)
        if m is None:
            shares = [eng.share_on(x, step) for x in holders]
            if holders and all(sh is not None and ref.rank not in sh.ranks for sh in shares):
                skipped.append(ref.rank)
                continue
            return commit, None, f"rank manifest {ref.key} verifies on no replica"
        ms.append(m)
    if unheld is not None:
        unheld.extend(skipped)
    return commit, ms, None


def storage_of(eng: Engine, r: Replica, step: int, manifests: Sequence[RankManifest]) -> dict[str, Any]:
    """How ``r`` stores ``step``'s objects (format 3: placement records): decoded and stored bytes,
    how many objects are compressed, how many reference an earlier step's file (and their bytes).
    Only what ``r`` holds: objects of ranks it does not store are left out. Reads placement
    records and key sizes, never object data."""
    reader = eng.single[r.url]
    own = step_dir(step) + "/"
    out = {"raw_bytes": 0, "stored_bytes": 0, "objects": 0, "compressed": 0, "referenced": 0, "referenced_bytes": 0}
    listed: dict[str, set[str]] = {}  # step directory -> its keys: one listing each, not a HEAD per object
    for m in manifests:
        for obj in m.objects:
            try:
                st = reader.stored(r, obj)
                d = st.key.split("/", 1)[0]
                if d not in listed:
                    listed[d] = set(r.list_prefix(d))
                if st.key not in listed[d]:
                    continue  # not on this replica (another node's rank, or missing: verify says which)
            except FAILURES as exc:
                out["error"] = str(exc)  # type: ignore[assignment]
                if isinstance(exc, ReplicaUnavailableError):
                    # It stopped answering: asking again per object would cost a time budget each.
                    out["unavailable"] = True
                    return out
                continue
            out["objects"] += 1
            out["raw_bytes"] += obj.size
            out["stored_bytes"] += st.size
            out["compressed"] += st.codec != "none"
            if not st.key.startswith(own):
                out["referenced"] += 1
                out["referenced_bytes"] += st.size
    return out


def temp_keys(keys: Sequence[str]) -> list[str]:
    """The temporary files among ``keys`` (an upload never renamed): never referenced by anything."""
    return [k for k in keys if k.rsplit("/", 1)[-1].startswith(TMP_PREFIX)]


def garbage_keys(
    r: Replica, step: int, commit: CommitRecord | None, manifests: list[RankManifest] | None
) -> tuple[str, ...]:
    """Keys under ``step`` on ``r`` that the commit does not name (only temp files if unknown)."""
    keys = r.list_prefix(step_dir(step))
    if commit is None or manifests is None:
        # Without the commit's names nothing but temp files is known to be garbage.
        return tuple(temp_keys(keys))
    named = {commit_key(step)} | {ref.key for ref in commit.ranks} | {o.key for m in manifests for o in m.objects}
    # Format 3: a pinned writer's placement record and compressed objects (".zst") are its files too.
    writers = {writer_of(k) for k in named} - {None}
    return tuple(
        k
        for k in keys
        if k not in named
        and not (writer_of(k) in writers and (k.endswith(".zst") or is_placement_key(k)))
        and not is_share_key(k)  # which ranks the replica holds (tiny; one per commit of the step)
        # A peer agent's own record of what its namespace held at the commit (its scrubber needs
        # it), seen when the agent's directory is given as a local path.
        and not k.rsplit("/", 1)[-1].startswith(HELD_PREFIX)
    )


# ----------------------------------------------------------------- directories kept for references


def holds_only_referenced(r: Replica, step: int, refs: Collection[str] | None) -> bool:
    """Whether ``step``'s directory on ``r`` is not empty and holds only keys in ``refs``.

    ``refs``: the keys that the placement records of the steps that stay reference
    (:func:`~ckptmirror.save.retention.protected_keys`; None when one of them is unreadable: then
    nothing is known to be referenced). Such a directory, without a commit record, is what
    retention leaves of a step whose objects later steps reference (incremental saves): no
    interrupted save, no garbage. Raises what listing the directory raises.
    """
    if refs is None:
        return False
    keys = r.list_prefix(step_dir(step))
    return bool(keys) and all(k in refs for k in keys)


class KeptForReferences:
    """Which step directories without a commit record only keep objects that other steps on the
    same replica reference (:func:`holds_only_referenced`), for ``ls``, ``verify`` and ``prune``.

    The placement records of every step on a replica (committed or torn, as ``listing`` says)
    are read once per replica, on first use.
    """

    def __init__(self, listing: StepListing) -> None:
        self._listing = listing
        self._refs: dict[str, set[str] | None] = {}

    def steps_on(self, url: str) -> list[int]:
        """Every step with a directory on the replica ``url`` (committed or torn), ascending."""
        on = {c for c, urls in self._listing.committed.items() if url in urls}
        return sorted(on | set(self._listing.torn.get(url, [])))

    def refs(self, r: Replica) -> set[str] | None:
        """The keys the placement records of ``r``'s steps reference (None: one is unreadable)."""
        if r.url not in self._refs:
            self._refs[r.url] = protected_keys(r, self.steps_on(r.url))
        return self._refs[r.url]

    def __call__(self, r: Replica, step: int) -> bool:
        """Whether ``step``'s directory on ``r`` holds only files other steps there reference.
        Raises what reading ``r`` raises (the caller then judges the directory torn)."""
        return holds_only_referenced(r, step, self.refs(r))

    def split(
        self, replicas: Sequence[Replica], torn: Mapping[str, Sequence[int]]
    ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """``torn`` (replica URL -> steps without a commit there) split into the steps that are
        torn indeed and those only kept for references, per replica; a replica that cannot be
        read keeps its steps as torn."""
        really: dict[str, tuple[int, ...]] = {}
        kept: dict[str, tuple[int, ...]] = {}
        by_url = {r.url: r for r in replicas}
        for url, steps in torn.items():
            r = by_url.get(url)
            mine: list[int] = []
            for s in steps:
                try:
                    if r is not None and self(r, s):
                        mine.append(s)
                except FAILURES:
                    pass  # judged torn, as before: what is wrong with the replica shows elsewhere
            if mine:
                kept[url] = tuple(mine)
            left = tuple(s for s in steps if s not in mine)
            if left:
                really[url] = left
        return really, kept
