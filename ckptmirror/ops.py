"""Operator commands as library functions: ``ls``, ``verify``, ``repair``, ``prune``, ``inspect``, ``export``.

The ``ckptmirror`` command line (:mod:`ckptmirror.cli`) is a thin layer over these functions;
they can be called from Python as well and return frozen dataclasses (each with ``to_dict()``
for JSON). Replicas are given as URLs (or :class:`~ckptmirror.replicas.Replica` objects),
opened with :func:`~ckptmirror.replicas.open_replica`, so every backend works here.

Verification is the reader's verification, not a second implementation: commit records are
read with :meth:`StepReader.read_commit`, rank manifests with :meth:`StepReader.read_manifest`
(size and checksum pinned by the commit), presence and sizes with :meth:`StepReader.preflight`
and object contents with :meth:`StepReader.fetch` (size + xxh3), restricted to one replica at a
time so that every replica is judged on its own. Object reads run on a small thread pool; each
thread reuses one buffer as large as the largest object it has read, so memory stays at
``threads x object size`` whatever the size of the checkpoint.

Nothing here unpickles or ``torch.load``s checkpoint data. :func:`export` writes files for other
tools (``safetensors`` or ``torch.save``); writing is not loading.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch

from .errors import (
    CkptMirrorError,
    CorruptObjectError,
    ManifestError,
    ObjectMissingError,
    ReplicaError,
    ReplicaUnavailableError,
    StepExistsError,
    StepNotFoundError,
)
from .format import (
    MAX_MANIFEST_BYTES,
    CommitRecord,
    ObjectRecord,
    RankManifest,
    commit_key,
    parse_commit,
    step_dir,
)
from .reader import StepReader, _check_leaf_bounds, list_steps, load_newest
from .replicas import Replica, open_replica
from .tree import key_path, unflatten
from .writer import remove_step

__all__ = [
    "ExportReport",
    "InspectReport",
    "LeafInfo",
    "Listing",
    "Problem",
    "PruneReport",
    "PruneResult",
    "RankCheck",
    "RankTree",
    "RepairAction",
    "RepairReport",
    "ReplicaCheck",
    "StepCheck",
    "StepInfo",
    "TreeEntry",
    "UsageError",
    "VerifyReport",
    "dotted",
    "export",
    "inspect",
    "ls",
    "open_replicas",
    "prune",
    "repair",
    "verify",
]

_TMP_PREFIX = ".tmp-"
#: Errors that concern one replica or object; anything else is a bug and propagates.
_FAILURES = (CkptMirrorError, OSError)


class UsageError(CkptMirrorError, ValueError):
    """Bad arguments: an unknown URL scheme, a ``memory://`` URL on the command line, ``--keep 0``."""


class Progress(Protocol):
    """What the progress callback factory returns (a ``tqdm`` bar fits)."""

    def update(self, n: int) -> Any: ...

    def close(self) -> Any: ...


#: ``progress(total, unit, description)`` -> a :class:`Progress`; called once per reading pass.
ProgressFactory = Callable[[int, str, str], Progress]


# ----------------------------------------------------------------------------- replicas


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def open_replicas(
    urls: Sequence["str | Replica"],
    *,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    allow_memory: bool = True,
) -> list[Replica]:
    """Open every URL with :func:`open_replica`; raise :class:`UsageError` for bad URLs.

    A local directory (``/path``, ``file://``) must exist: an operator command never creates
    one, so a mistyped path is reported instead of silently showing an empty replica.
    ``storage_options`` has the same shape as :class:`~ckptmirror.Mirror`'s (by URL or scheme).
    """
    from .replicas.local import path_from_url

    if not urls:
        raise UsageError("at least one replica URL is needed")
    opts = storage_options or {}
    out: list[Replica] = []
    try:
        for u in urls:
            if isinstance(u, Replica):
                out.append(u)
                continue
            if not isinstance(u, str) or not u:
                raise UsageError(f"replica URL must be a non-empty string, got {u!r}")
            scheme = _scheme(u)
            if scheme == "memory" and not allow_memory:
                raise UsageError(f"{u}: memory:// replicas live inside one Python process; the command line cannot see them")
            if scheme in ("", "file"):
                try:
                    path = path_from_url(u)
                except ValueError as exc:
                    raise UsageError(str(exc)) from exc
                if not os.path.isdir(path):
                    what = "is not a directory" if os.path.exists(path) else "does not exist"
                    raise ReplicaUnavailableError(f"{path} {what}", replica=u)
            o = opts.get(u, opts.get(scheme or "file"))
            try:
                out.append(open_replica(u, o))
            except ValueError as exc:
                raise UsageError(str(exc)) from exc
            except ImportError as exc:
                raise UsageError(f"{u}: {exc}") from exc
        seen = [r.url for r in out]
        dup = sorted({u for u in seen if seen.count(u) > 1})
        if dup:
            raise UsageError(f"replica given more than once: {', '.join(dup)}")
    except BaseException:
        for r in out:
            if not any(r is u for u in urls):
                r.close()
        raise
    return out


@contextmanager
def _opened(urls: Sequence["str | Replica"], storage_options: Mapping[str, Mapping[str, Any]] | None, allow_memory: bool = True) -> Iterator[list[Replica]]:
    replicas = open_replicas(urls, storage_options=storage_options, allow_memory=allow_memory)
    try:
        yield replicas
    finally:
        for r in replicas:
            if not any(r is u for u in urls):  # close only what we opened
                r.close()


# ----------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one object (or commit, or step) on one replica.

    ``kind`` is one of ``missing``, ``truncated`` (shorter than recorded, zero length included),
    ``wrong-size`` (longer), ``corrupt`` (checksum mismatch), ``invalid`` (a commit or manifest
    that does not parse or validate), ``unreadable`` (the backend failed to read it),
    ``lagging`` (the step is committed on another replica but not on this one) and
    ``unrecoverable`` (no replica holds a verifying copy).
    """

    step: int
    replica: str
    key: str
    kind: str
    detail: str
    rank: int | None = None

    def __str__(self) -> str:
        where = " ".join(p for p in (self.key, f"on {self.replica}" if self.replica else "") if p)
        return f"{self.kind}: {where}: {self.detail}" if where else f"{self.kind}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def _strip_where(msg: str, url: str, key: str) -> str:
    """Drop the "replica X, object K: " prefixes an error repeats, and the reader's wrapper."""
    prefixes = ("no replica holds a verifying copy: ", f"replica {url}, object {key}: ", f"object {key}: ", f"replica {url}: ")
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if msg.startswith(prefix):
                msg = msg[len(prefix) :]
                changed = True
    return msg


# ----------------------------------------------------------------------------- the engine


@dataclass
class _ObjJob:
    """Check one object (or rank manifest: same size + checksum rules) on one replica."""

    replica: Replica
    step: int
    rank: int
    obj: ObjectRecord
    problem: Problem | None = None


@dataclass
class _RankPlan:
    rank: int
    key: str
    size: int
    checksum: str
    manifest: RankManifest | None
    manifest_problem: Problem | None
    invalid: Problem | None
    jobs: list[_ObjJob]


@dataclass
class _ReplicaPlan:
    replica: Replica
    step: int
    commit: CommitRecord | None
    commit_problem: Problem | None
    ranks: list[_RankPlan] = field(default_factory=list)


class _Engine:
    """Per-replica checks of steps with the reader's own functions, objects read in parallel."""

    def __init__(self, replicas: Sequence[Replica], threads: int, quick: bool, progress: ProgressFactory | None) -> None:
        self.replicas = sorted(replicas, key=lambda r: r.read_priority)
        self.quick = quick
        self.progress = progress
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="ckptmirror-verify")
        # One reader over all replicas (its per-thread buffer serves every object read), and
        # one per replica for commits and manifests, so a replica is never judged by another's copy.
        self.shared = StepReader(self.replicas, self.pool, 0)
        self.single = {r.url: StepReader([r], self.pool, 0) for r in self.replicas}
        self.good: set[tuple[str, str, str]] = set()  # (replica url, key, checksum) that verified
        self.checked: set[tuple[str, str, str]] = set()  # ... that were checked
        self._lock = threading.Lock()
        self._manifests: dict[tuple[str, str], RankManifest | None] = {}
        self._invalid: dict[tuple[str, str], str | None] = {}

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    # -- commits and manifests ------------------------------------------------------------
    def commit_on(self, r: Replica, step: int) -> tuple[CommitRecord | None, Problem | None]:
        """``r``'s own commit record of ``step``, parsed by the reader, or what is wrong with it."""
        key = commit_key(step)
        try:
            return self.single[r.url].read_commit(step), None
        except _FAILURES as exc:
            kind = "missing" if isinstance(exc, ObjectMissingError) else "invalid" if isinstance(exc, (ManifestError, CorruptObjectError)) else "unreadable"
            return None, Problem(step, r.url, key, kind, _strip_where(str(exc), r.url, key))

    def _describe(self, r: Replica, step: int, rank: int | None, key: str, size: int, exc: BaseException) -> Problem:
        try:
            got = r.size(key)
        except _FAILURES as e2:
            return Problem(step, r.url, key, "unreadable", _strip_where(str(e2), r.url, key), rank)
        if got is None:
            return Problem(step, r.url, key, "missing", "not found", rank)
        if got < size:
            return Problem(step, r.url, key, "truncated", f"{got} bytes, recorded {size}", rank)
        if got > size:
            return Problem(step, r.url, key, "wrong-size", f"{got} bytes, recorded {size}", rank)
        kind = "unreadable" if isinstance(exc, ReplicaError) else "corrupt"
        return Problem(step, r.url, key, kind, _strip_where(str(exc), r.url, key), rank)

    def manifest_anywhere(self, commit: CommitRecord, rank: int) -> RankManifest | None:
        """The rank manifest from any replica where it matches the commit's pin (cached)."""
        ref = commit.ranks[rank]
        k = (ref.key, ref.checksum)
        if k not in self._manifests:
            try:
                self._manifests[k] = self.shared.read_manifest(commit, rank)
            except _FAILURES:
                self._manifests[k] = None
        return self._manifests[k]

    def _validate(self, m: RankManifest, key: str, csum: str) -> str | None:
        """What the reader checks before it reads a byte: leaf bounds, leaf references."""
        k = (key, csum)
        if k not in self._invalid:
            try:
                _validate_manifest(m, key)
                self._invalid[k] = None
            except _FAILURES as exc:
                self._invalid[k] = str(exc)
        return self._invalid[k]

    def plan(self, r: Replica, step: int, commit: CommitRecord) -> _ReplicaPlan:
        """Check ``r``'s rank manifests against ``commit`` and list its object checks."""
        plan = _ReplicaPlan(r, step, commit, None)
        for ref in commit.ranks:
            mprob: Problem | None = None
            try:
                m: RankManifest | None = self.single[r.url].read_manifest(commit, ref.rank)
                self._mark_good(r.url, ref.key, ref.checksum)
            except _FAILURES as exc:
                mprob = self._describe(r, step, ref.rank, ref.key, ref.size, exc)
                m = self.manifest_anywhere(commit, ref.rank)  # still check this replica's objects
            invalid = None
            if m is not None:
                why = self._validate(m, ref.key, ref.checksum)
                if why is not None:
                    invalid = Problem(step, r.url, ref.key, "invalid", why, ref.rank)
            jobs = [_ObjJob(r, step, ref.rank, o) for o in m.objects] if m is not None else []
            plan.ranks.append(_RankPlan(ref.rank, ref.key, ref.size, ref.checksum, m, mprob, invalid, jobs))
        return plan

    # -- objects ---------------------------------------------------------------------------
    def _mark_good(self, url: str, key: str, csum: str) -> None:
        with self._lock:
            self.good.add((url, key, csum))

    def is_good(self, url: str, key: str, csum: str) -> bool:
        return (url, key, csum) in self.good

    def sources(self, key: str, csum: str, exclude: Replica) -> list[Replica]:
        """Replicas (preferred first) where ``key`` verified with checksum ``csum``."""
        return [r for r in self.replicas if r is not exclude and (r.url, key, csum) in self.good]

    def _check(self, job: _ObjJob) -> None:
        r, obj = job.replica, job.obj
        with self._lock:
            self.checked.add((r.url, obj.key, obj.checksum))
        reader = self.single[r.url]
        try:
            # Presence and size: exactly the reader's preflight, for this one object.
            reader.preflight(RankManifest(job.step, job.rank, job.rank + 1, (obj,), (), (), None))
        except _FAILURES as exc:
            job.problem = self._describe(r, job.step, job.rank, obj.key, obj.size, exc)
            return
        if not self.quick:
            try:
                self.shared.fetch(obj.key, obj.size, obj.checksum, [r])  # size + xxh3, this replica only
            except _FAILURES as exc:
                job.problem = self._describe(r, job.step, job.rank, obj.key, obj.size, exc)
                return
        self._mark_good(r.url, obj.key, obj.checksum)

    def complete(self, plans: Sequence[_ReplicaPlan], what: str) -> None:
        """Check, on every other replica, the items of ``plans`` that verified nowhere yet.

        The reader takes each object from any replica that holds it with the pinned size and
        checksum, a torn copy included; so does the judgement of whether a step is recoverable.
        """
        jobs: list[_ObjJob] = []
        queued: set[tuple[str, str, str]] = set()
        for plan in plans:
            for rp in plan.ranks:
                items = [ObjectRecord(rp.key, rp.size, rp.checksum)] + (list(rp.manifest.objects) if rp.manifest else [])
                for obj in items:
                    if any(self.is_good(r.url, obj.key, obj.checksum) for r in self.replicas):
                        continue
                    for r in self.replicas:
                        k = (r.url, obj.key, obj.checksum)
                        if k not in self.checked and k not in queued:
                            queued.add(k)
                            jobs.append(_ObjJob(r, plan.step, rp.rank, obj))
        self.run(jobs, what)

    def run(self, jobs: Sequence[_ObjJob], what: str = "verify") -> None:
        """Check every object of ``jobs`` in parallel; results land in ``job.problem``."""
        if not jobs:
            return
        unit = "obj" if self.quick else "B"
        bar = self.progress(len(jobs) if self.quick else sum(j.obj.size for j in jobs), unit, what) if self.progress else None

        def one(job: _ObjJob) -> None:
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


def _validate_manifest(m: RankManifest, key: str) -> dict[int, tuple[Any, ...]]:
    """The checks :meth:`StepReader.load` makes before reading: bounds, one reference per leaf."""
    _check_leaf_bounds(m, key)
    paths: dict[int, tuple[Any, ...]] = {}

    def collect(kind: str, i: int, path: tuple[Any, ...]) -> None:
        if not 0 <= i < len(m.leaves) or m.leaves[i].kind != kind or i in paths:
            raise ManifestError(f"bad or repeated {kind} reference {i} at {key_path('state', path)}", key=key)
        paths[i] = path

    unflatten(m.structure, collect, key)
    return paths


def _plan_problems(plan: _ReplicaPlan) -> list[Problem]:
    out: list[Problem] = []
    if plan.commit_problem is not None:
        out.append(plan.commit_problem)
    for rp in plan.ranks:
        for p in (rp.manifest_problem, rp.invalid):
            if p is not None:
                out.append(p)
        if rp.manifest is None:
            out.append(Problem(plan.step, plan.replica.url, rp.key, "unrecoverable", "no replica holds a copy that matches the commit, so its objects cannot be checked", rp.rank))
        out.extend(j.problem for j in rp.jobs if j.problem is not None)
    return out


def _recoverable(eng: _Engine, plans: Sequence[_ReplicaPlan]) -> bool:
    """Whether some commit of the step has every manifest and object verifying somewhere."""
    for plan in plans:
        if plan.commit is None:
            continue
        ok = True
        for rp in plan.ranks:
            if rp.manifest is None or rp.invalid is not None or not any(eng.is_good(r.url, rp.key, rp.checksum) for r in eng.replicas):
                ok = False
                break
            if not all(any(eng.is_good(r.url, o.key, o.checksum) for r in eng.replicas) for o in rp.manifest.objects):
                ok = False
                break
        if ok:
            return True
    return False


# ----------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class RankCheck:
    """One rank of one step on one replica."""

    rank: int
    objects: int
    bytes: int
    verified: int  # objects that passed
    manifest_ok: bool
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        """No problem with this rank on this replica."""
        return not self.problems


@dataclass(frozen=True)
class ReplicaCheck:
    """One step on one replica. ``status``: ``ok``, ``bad``, ``absent`` or ``torn`` (not committed here)."""

    step: int
    replica: str
    status: str
    ranks: tuple[RankCheck, ...]
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        """Committed here and everything verified."""
        return self.status == "ok"


@dataclass(frozen=True)
class StepCheck:
    """One step on every replica, and whether it can be restored at all."""

    step: int
    world_size: int | None
    objects: int | None
    bytes: int | None
    created_unix: float | None
    recoverable: bool
    replicas: tuple[ReplicaCheck, ...]


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found. ``exit_code``: 0 all verified, 1 problems, 2 a replica unreachable."""

    replicas: tuple[str, ...]
    quick: bool
    steps: tuple[StepCheck, ...]
    torn: Mapping[str, tuple[int, ...]]  # replica -> steps with objects but no commit anywhere (garbage)
    unreachable: Mapping[str, str]
    notes: tuple[Problem, ...] = ()  # problems not tied to one replica (step not found, ...)

    @property
    def problems(self) -> tuple[Problem, ...]:
        """Every problem, in step and replica order."""
        out = list(self.notes)
        for s in self.steps:
            for rc in s.replicas:
                out.extend(rc.problems)
        return tuple(out)

    @property
    def exit_code(self) -> int:
        """0: everything verified; 1: problems; 2: a replica could not be reached."""
        if self.unreachable:
            return 2
        return 1 if self.problems else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``ckptmirror verify --json``)."""
        d = dataclasses.asdict(self)
        d["problems"] = [p.to_dict() for p in self.problems]
        d["exit_code"] = self.exit_code
        d["torn"] = {k: list(v) for k, v in self.torn.items()}
        return d


def _step_meta(plans: Sequence[_ReplicaPlan]) -> tuple[int | None, int | None, int | None, float | None]:
    for plan in plans:
        if plan.commit is not None and all(rp.manifest is not None for rp in plan.ranks):
            ms = [rp.manifest for rp in plan.ranks if rp.manifest is not None]
            return plan.commit.world_size, sum(len(m.objects) for m in ms), sum(m.stream_bytes for m in ms), plan.commit.created_unix
    for plan in plans:
        if plan.commit is not None:
            return plan.commit.world_size, None, None, plan.commit.created_unix
    return None, None, None, None


def _replica_check(plan: _ReplicaPlan) -> ReplicaCheck:
    ranks = []
    for rp in plan.ranks:
        probs = [p for p in (rp.manifest_problem, rp.invalid) if p is not None] + [j.problem for j in rp.jobs if j.problem is not None]
        m = rp.manifest
        ranks.append(
            RankCheck(
                rp.rank,
                len(m.objects) if m else 0,
                m.stream_bytes if m else 0,
                sum(1 for j in rp.jobs if j.problem is None),
                rp.manifest_problem is None and rp.invalid is None,
                tuple(probs),
            )
        )
    problems = tuple(_plan_problems(plan))
    return ReplicaCheck(plan.step, plan.replica.url, "bad" if problems else "ok", tuple(ranks), problems)


def verify(
    urls: Sequence["str | Replica"],
    *,
    step: int | None = None,
    quick: bool = False,
    threads: int = 4,
    progress: ProgressFactory | None = None,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> VerifyReport:
    """Check every committed step (or ``step``) on every replica, each replica on its own.

    Full mode reads every object and checks its size and checksum exactly as a restore would;
    ``quick`` checks commit records, rank manifests (they are small), and the presence and
    size of every object. A step committed on one replica but not on another is reported as
    ``lagging`` on the latter; torn saves (objects without a commit) are listed as garbage, not
    as problems. See :class:`VerifyReport` for the result and its exit code.
    """
    with _opened(urls, storage_options) as replicas:
        listing = list_steps(replicas)
        reachable = [r for r in replicas if r.url not in listing.unreachable]
        # Torn copies of a step committed elsewhere are "lagging" problems, not garbage.
        torn = {u: tuple(sorted(s for s in v if s not in listing.committed)) for u, v in listing.torn.items()}
        torn = {u: v for u, v in torn.items() if v}
        notes: list[Problem] = []
        if step is not None and step not in listing.committed:
            notes.append(Problem(step, "", commit_key(step), "missing", f"step {step} is not committed on any replica (committed: {sorted(listing.committed)})"))
            steps: list[int] = []
        else:
            steps = sorted(listing.committed) if step is None else [step]
        if not steps and step is None and any(listing.torn.values()):
            notes.append(Problem(-1, "", "", "unrecoverable", "the replicas hold interrupted saves but no committed step"))
        eng = _Engine(reachable, threads, quick, progress)
        try:
            per_step: list[tuple[int, list[_ReplicaPlan], list[ReplicaCheck]]] = []
            jobs: list[_ObjJob] = []
            for s in steps:
                holders = listing.committed[s]
                plans: list[_ReplicaPlan] = []
                absent: list[ReplicaCheck] = []
                for r in reachable:
                    if r.url in holders:
                        commit, cprob = eng.commit_on(r, s)
                        plan = eng.plan(r, s, commit) if commit is not None else _ReplicaPlan(r, s, None, cprob)
                        plans.append(plan)
                        jobs.extend(j for rp in plan.ranks for j in rp.jobs)
                    else:
                        is_torn = s in listing.torn.get(r.url, [])
                        status = "torn" if is_torn else "absent"
                        others = ", ".join(u for u in holders)
                        p = Problem(s, r.url, commit_key(s), "lagging", f"step {s} is committed on {others} but {'only partly written' if is_torn else 'absent'} here")
                        absent.append(ReplicaCheck(s, r.url, status, (), (p,)))
                per_step.append((s, plans, absent))
            eng.run(jobs, "verify --quick" if quick else "verify")
            eng.complete([p for _, plans, _ in per_step for p in plans], "verify: other copies")
            out_steps = []
            order = {r.url: i for i, r in enumerate(replicas)}
            for s, plans, absent in per_step:
                checks = sorted([_replica_check(p) for p in plans] + absent, key=lambda c: order[c.replica])
                ws, nobj, nbytes, created = _step_meta(plans)
                out_steps.append(StepCheck(s, ws, nobj, nbytes, created, _recoverable(eng, plans), tuple(checks)))
        finally:
            eng.close()
        return VerifyReport(tuple(r.url for r in replicas), quick, tuple(out_steps), torn, dict(listing.unreachable), tuple(notes))


# ----------------------------------------------------------------------------- repair


@dataclass(frozen=True)
class RepairAction:
    """One write repair makes (or would make, with ``dry_run``).

    ``action``: ``copy`` (an object or rank manifest, from ``source``), ``commit`` (write the
    commit record last) or ``replace-commit`` (delete a commit record that does not parse, then
    commit). ``done`` is False in a dry run and when the write failed (``error``).
    """

    step: int
    replica: str
    key: str
    action: str
    source: str | None
    bytes: int
    reason: str
    done: bool = False
    error: str | None = None


@dataclass(frozen=True)
class RepairReport:
    """What :func:`repair` did. ``exit_code``: 0 done, 1 something could not be repaired, 2 unreachable."""

    replicas: tuple[str, ...]
    dry_run: bool
    steps: tuple[int, ...]
    actions: tuple[RepairAction, ...]
    unrecoverable: tuple[Problem, ...]
    unreachable: Mapping[str, str]

    @property
    def exit_code(self) -> int:
        """0: nothing left to repair (or, in a dry run, everything repairable); 1: not; 2: unreachable."""
        if self.unreachable:
            return 2
        if self.unrecoverable or any(a.error for a in self.actions):
            return 1
        return 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``ckptmirror repair --json``)."""
        d = dataclasses.asdict(self)
        d["exit_code"] = self.exit_code
        return d


@dataclass
class _Fix:
    plan: _ReplicaPlan
    commit: CommitRecord
    needs_commit: bool  # the replica has no usable commit: write commit_raw last
    commit_raw: bytes | None
    replace_commit: bool
    copies: list[tuple[str, int, str, str]]  # key, size, checksum, reason (objects first, then manifests)
    manifests: list[tuple[str, int, str, str]]
    blocked: list[Problem]


def _raw_commit(eng: _Engine, step: int, commit: CommitRecord) -> bytes | None:
    """The exact bytes of ``commit`` from a replica that holds it (copied as they are)."""
    key = commit_key(step)
    for r in eng.replicas:
        try:
            raw = r.get(key, MAX_MANIFEST_BYTES)
            if parse_commit(raw, key) == commit:
                return raw
        except _FAILURES:
            continue
    return None


def _needs(plan: _ReplicaPlan, eng: _Engine) -> tuple[list[tuple[str, int, str, str]], list[tuple[str, int, str, str]], list[Problem]]:
    copies: list[tuple[str, int, str, str]] = []
    manifests: list[tuple[str, int, str, str]] = []
    blocked: list[Problem] = []
    r = plan.replica
    for rp in plan.ranks:
        if rp.invalid is not None:
            blocked.append(rp.invalid)
        if rp.manifest is None:
            blocked.append(Problem(plan.step, r.url, rp.key, "unrecoverable", "no replica holds a copy of this rank manifest that matches the commit", rp.rank))
            continue
        if rp.manifest_problem is not None:
            if eng.sources(rp.key, rp.checksum, r):
                manifests.append((rp.key, rp.size, rp.checksum, f"{rp.manifest_problem.kind}: {rp.manifest_problem.detail}"))
            else:
                blocked.append(dataclasses.replace(rp.manifest_problem, kind="unrecoverable", detail=f"{rp.manifest_problem.kind} here and no other replica holds a verifying copy"))
        for j in rp.jobs:
            if j.problem is None:
                continue
            if j.problem.kind == "unreadable":
                # The backend failed to read it: the object may be fine; never overwrite it blindly.
                blocked.append(j.problem)
            elif eng.sources(j.obj.key, j.obj.checksum, r):
                copies.append((j.obj.key, j.obj.size, j.obj.checksum, f"{j.problem.kind}: {j.problem.detail}"))
            else:
                blocked.append(dataclasses.replace(j.problem, kind="unrecoverable", detail=f"{j.problem.kind} here and no other replica holds a verifying copy"))
    return copies, manifests, blocked


def repair(
    urls: Sequence["str | Replica"],
    *,
    step: int | None = None,
    dry_run: bool = False,
    threads: int = 4,
    progress: ProgressFactory | None = None,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> RepairReport:
    """Make every replica hold a verifying copy of every step committed on any of them.

    For each step (or ``step``): verify every replica in full (as :func:`verify`); copy each
    missing, truncated or corrupt object, then each bad rank manifest, from a replica where it
    verifies (re-verified while copying); then write the commit record last where it was
    missing (a torn save is completed this way) or did not parse. An object that verifies is
    never overwritten; one the backend could not read is left alone and reported. Running it
    twice changes nothing the second time. ``dry_run``: plan and report, write nothing.
    """
    with _opened(urls, storage_options) as replicas:
        listing = list_steps(replicas)
        reachable = [r for r in replicas if r.url not in listing.unreachable]
        unrecoverable: list[Problem] = []
        if step is not None and step not in listing.committed:
            raise StepNotFoundError(step, list(listing.committed))
        steps = sorted(listing.committed) if step is None else [step]
        eng = _Engine(reachable, threads, False, progress)
        fixes: list[_Fix] = []
        try:
            # 1. Verify every replica that holds a commit, against its own commit.
            per_step: dict[int, list[_ReplicaPlan]] = {}
            jobs: list[_ObjJob] = []
            for s in steps:
                plans = []
                for r in reachable:
                    if r.url in listing.committed[s]:
                        commit, cprob = eng.commit_on(r, s)
                        plan = eng.plan(r, s, commit) if commit is not None else _ReplicaPlan(r, s, None, cprob)
                    else:
                        plan = _ReplicaPlan(r, s, None, None)
                    plans.append(plan)
                    jobs.extend(j for rp in plan.ranks for j in rp.jobs)
                per_step[s] = plans
            eng.run(jobs, "repair: verify")
            eng.complete([p for plans in per_step.values() for p in plans], "repair: other copies")
            # 2. Replicas without a usable commit get the first commit that is recoverable;
            #    whatever they already hold of it (a torn save) is verified before anything is copied.
            late_ids: set[int] = set()
            jobs = []
            for s, plans in per_step.items():
                originals = list(plans)
                for i, plan in enumerate(originals):
                    if plan.commit is not None:
                        continue
                    if plan.commit_problem is not None and plan.commit_problem.kind == "unreadable":
                        unrecoverable.append(plan.commit_problem)
                        continue
                    source = next((p for p in originals if p.commit is not None and _recoverable(eng, [p])), None)
                    if source is None:
                        unrecoverable.append(Problem(s, plan.replica.url, commit_key(s), "unrecoverable", "no replica holds a complete verifying copy of this step"))
                        continue
                    assert source.commit is not None
                    target = eng.plan(plan.replica, s, source.commit)
                    target.commit_problem = plan.commit_problem
                    plans[i] = target
                    late_ids.add(id(target))
                    jobs.extend(j for rp in target.ranks for j in rp.jobs)
            eng.run(jobs, "repair: verify torn")
            for s, plans in per_step.items():
                for plan in plans:
                    if plan.commit is None:
                        continue
                    copies, manifests, blocked = _needs(plan, eng)
                    needs_commit = id(plan) in late_ids
                    raw = None
                    if needs_commit:
                        raw = _raw_commit(eng, s, plan.commit)
                        if raw is None:
                            blocked.append(Problem(s, plan.replica.url, commit_key(s), "unrecoverable", "the commit record could not be read again from any replica"))
                    replace = needs_commit and plan.commit_problem is not None and plan.commit_problem.kind != "missing"
                    if copies or manifests or needs_commit or blocked:
                        fixes.append(_Fix(plan, plan.commit, needs_commit, raw, replace, copies, manifests, blocked))
            actions = _apply_fixes(eng, fixes, dry_run, unrecoverable)
        finally:
            eng.close()
        return RepairReport(tuple(r.url for r in replicas), dry_run, tuple(steps), tuple(actions), tuple(unrecoverable), dict(listing.unreachable))


def _apply_fixes(eng: _Engine, fixes: list[_Fix], dry_run: bool, unrecoverable: list[Problem]) -> list[RepairAction]:
    actions: list[RepairAction] = []
    lock = threading.Lock()
    bar = None
    total = sum(size for f in fixes if not (f.blocked and f.needs_commit) for _, size, _, _ in f.copies + f.manifests)
    if eng.progress is not None and not dry_run and total:
        bar = eng.progress(total, "B", "repair: copy")

    def copy(fix: _Fix, key: str, size: int, csum: str, reason: str) -> RepairAction:
        r, s = fix.plan.replica, fix.plan.step
        srcs = eng.sources(key, csum, r)
        if dry_run:
            return RepairAction(s, r.url, key, "copy", srcs[0].url if srcs else None, size, reason)
        try:
            buf, src = eng.shared.fetch(key, size, csum, srcs)  # verified again while copying
            r.put(key, memoryview(buf.numpy()) if size else b"")
        except _FAILURES as exc:
            return RepairAction(s, r.url, key, "copy", srcs[0].url if srcs else None, size, reason, False, f"{type(exc).__name__}: {exc}")
        finally:
            if bar is not None:
                with lock:
                    bar.update(size)
        return RepairAction(s, r.url, key, "copy", src, size, reason, True)

    try:
        for fix in fixes:
            unrecoverable.extend(fix.blocked)
            r, s = fix.plan.replica, fix.plan.step
            if fix.blocked and fix.needs_commit:
                continue  # cannot complete this replica's copy of the step: write nothing there
            done = [f.result() for f in [eng.pool.submit(copy, fix, *c) for c in fix.copies]]
            done += [copy(fix, *c) for c in fix.manifests]  # rank manifests after every object
            actions.extend(done)
            if not fix.needs_commit or fix.commit_raw is None:
                continue
            key = commit_key(s)
            kind = "replace-commit" if fix.replace_commit else "commit"
            reason = f"{fix.plan.commit_problem.kind}: {fix.plan.commit_problem.detail}" if fix.plan.commit_problem else "step committed on another replica but not here"
            if dry_run:
                actions.append(RepairAction(s, r.url, key, kind, None, len(fix.commit_raw), reason))
                continue
            if any(a.error for a in done):
                actions.append(RepairAction(s, r.url, key, kind, None, len(fix.commit_raw), reason, False, "not committed: a copy above failed"))
                continue
            try:
                if fix.replace_commit:
                    r.delete(key)
                r.commit(key, fix.commit_raw)
                actions.append(RepairAction(s, r.url, key, kind, None, len(fix.commit_raw), reason, True))
            except StepExistsError as exc:
                actions.append(RepairAction(s, r.url, key, kind, None, len(fix.commit_raw), reason, False, f"someone committed step {s} here meanwhile: {exc}"))
            except _FAILURES as exc:
                actions.append(RepairAction(s, r.url, key, kind, None, len(fix.commit_raw), reason, False, f"{type(exc).__name__}: {exc}"))
    finally:
        if bar is not None:
            bar.close()
    return actions


# ----------------------------------------------------------------------------- ls


@dataclass(frozen=True)
class StepInfo:
    """One step as :func:`ls` sees it."""

    step: int
    committed_on: tuple[str, ...]
    torn_on: tuple[str, ...]  # objects but no commit record there
    world_size: int | None
    objects: int | None
    bytes: int | None  # tensor bytes of all ranks (one copy)
    created_unix: float | None
    garbage: Mapping[str, tuple[str, ...]]  # replica -> keys under this step that no commit names
    error: str | None = None  # the commit or a manifest could not be read from any replica


@dataclass(frozen=True)
class Listing:
    """What :func:`ls` found."""

    replicas: tuple[str, ...]
    steps: tuple[StepInfo, ...]
    unreachable: Mapping[str, str]

    @property
    def exit_code(self) -> int:
        """0, or 2 when a replica could not be listed."""
        return 2 if self.unreachable else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``ckptmirror ls --json``)."""
        d = dataclasses.asdict(self)
        d["exit_code"] = self.exit_code
        return d


def _referenced(eng: _Engine, r: Replica | None, step: int, urls: Sequence[str]) -> tuple[CommitRecord | None, list[RankManifest] | None, str | None]:
    """Commit (from ``r`` if given, else any of ``urls``) and its rank manifests (from anywhere)."""
    try:
        commit = eng.single[r.url].read_commit(step) if r is not None else eng.shared.read_commit(step, urls)
    except _FAILURES as exc:
        return None, None, str(exc)
    ms = []
    for ref in commit.ranks:
        m = eng.manifest_anywhere(commit, ref.rank)
        if m is None:
            return commit, None, f"rank manifest {ref.key} verifies on no replica"
        ms.append(m)
    return commit, ms, None


def _garbage(r: Replica, step: int, commit: CommitRecord | None, manifests: list[RankManifest] | None) -> tuple[str, ...]:
    """Keys under ``step`` on ``r`` that the commit does not name (only temp files if unknown)."""
    keys = r.list_prefix(step_dir(step))
    if commit is None or manifests is None:
        return tuple(k for k in keys if k.rsplit("/", 1)[-1].startswith(_TMP_PREFIX))
    named = {commit_key(step)} | {ref.key for ref in commit.ranks} | {o.key for m in manifests for o in m.objects}
    return tuple(k for k in keys if k not in named)


def ls(urls: Sequence["str | Replica"], *, storage_options: Mapping[str, Mapping[str, Any]] | None = None) -> Listing:
    """List every step on the replicas: where it is committed, its size and age, what is garbage.

    Reads commit records and rank manifests (small JSON documents) and key listings, never
    object contents; use :func:`verify` to check those.
    """
    with _opened(urls, storage_options) as replicas:
        listing = list_steps(replicas)
        reachable = [r for r in replicas if r.url not in listing.unreachable]
        order = {r.url: i for i, r in enumerate(replicas)}
        all_steps = set(listing.committed) | {s for v in listing.torn.values() for s in v}
        eng = _Engine(reachable, 1, True, None)
        out = []
        try:
            for s in sorted(all_steps):
                holders = sorted(listing.committed.get(s, []), key=order.__getitem__)
                torn_on = tuple(u for u in order if s in listing.torn.get(u, []))
                garbage: dict[str, tuple[str, ...]] = {}
                commit, ms, err = _referenced(eng, None, s, holders) if holders else (None, None, None)
                for r in reachable:
                    if r.url in holders or r.url in torn_on:
                        try:
                            g = _garbage(r, s, commit, ms) if r.url in holders else tuple(r.list_prefix(step_dir(s)))
                        except _FAILURES as exc:
                            err = err or f"{r.url}: {exc}"
                            continue
                        if g:
                            garbage[r.url] = g
                out.append(
                    StepInfo(
                        s,
                        tuple(holders),
                        torn_on,
                        commit.world_size if commit else None,
                        sum(len(m.objects) for m in ms) if ms is not None else None,
                        sum(m.stream_bytes for m in ms) if ms is not None else None,
                        commit.created_unix if commit else None,
                        garbage,
                        err,
                    )
                )
        finally:
            eng.close()
        return Listing(tuple(r.url for r in replicas), tuple(out), dict(listing.unreachable))


# ----------------------------------------------------------------------------- prune


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune` removed (or would remove) on one replica."""

    replica: str
    kept: tuple[int, ...]
    removed_steps: tuple[int, ...]  # committed steps beyond --keep
    removed_torn: tuple[int, ...]  # interrupted saves older than the newest committed step
    removed_garbage: tuple[str, ...]  # leftover keys inside kept steps (temp files, unnamed objects)
    skipped_torn: tuple[int, ...]  # torn saves newer than the newest commit: maybe a save in progress
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune` did. ``exit_code``: 0, 1 (refused or a delete failed), 2 (unreachable)."""

    keep: int
    dry_run: bool
    replicas: tuple[PruneResult, ...]
    refused: str | None  # why committed steps were kept (none of the kept steps verifies)
    unreachable: Mapping[str, str]

    @property
    def exit_code(self) -> int:
        """0: done; 1: committed steps were not pruned (refused) or a delete failed; 2: unreachable."""
        if self.unreachable:
            return 2
        return 1 if self.refused or any(p.errors for p in self.replicas) else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``ckptmirror prune --json``)."""
        d = dataclasses.asdict(self)
        d["exit_code"] = self.exit_code
        return d


def prune(
    urls: Sequence["str | Replica"],
    *,
    keep: int,
    dry_run: bool = False,
    all_torn: bool = False,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> PruneReport:
    """Keep the newest ``keep`` committed steps on each replica; remove older ones and garbage.

    The newest committed step of a replica is never removed. Torn saves older than a
    replica's newest committed step are removed; newer ones may be a save in progress and are
    kept unless ``all_torn``. Leftovers inside kept steps (temp files, objects no commit names)
    are removed. As a safeguard, committed steps are removed only if at least one step that
    stays passes a quick verification (commit, manifests, presence and sizes) across the
    replicas; otherwise only garbage goes and ``refused`` says why.
    """
    if type(keep) is not int or keep < 1:
        raise UsageError(f"--keep must be at least 1 (the newest committed step is never removed), got {keep!r}")
    with _opened(urls, storage_options) as replicas:
        listing = list_steps(replicas)
        reachable = [r for r in replicas if r.url not in listing.unreachable]
        per: dict[str, list[int]] = {r.url: [] for r in reachable}
        for s, holders in listing.committed.items():
            for u in holders:
                if u in per:
                    per[u].append(s)
        kept = {u: sorted(v)[-keep:] for u, v in per.items()}
        eng = _Engine(reachable, 4, True, None)
        refused = None
        try:
            # Safeguard: some step that stays must be recoverable (quick check, newest first).
            if any(len(v) > keep for v in per.values()):
                refused = "no step that would be kept passes a quick verification"
                for s in sorted({s for v in kept.values() for s in v}, reverse=True):
                    plans = []
                    for r in reachable:
                        if r.url in listing.committed.get(s, []):
                            commit, cprob = eng.commit_on(r, s)
                            if commit is not None:
                                plans.append(eng.plan(r, s, commit))
                    eng.run([j for p in plans for rp in p.ranks for j in rp.jobs])
                    eng.complete(plans, "prune: check")
                    if _recoverable(eng, plans):
                        refused = None
                        break
                if refused:
                    refused += "; run 'ckptmirror verify' and 'ckptmirror repair' first (only garbage is removed)"
            results = []
            for r in reachable:
                u = r.url
                committed = sorted(per[u])
                newest = committed[-1] if committed else None
                drop = [] if refused else committed[: max(0, len(committed) - keep)]
                torn = sorted(listing.torn.get(u, []))
                torn_old = [s for s in torn if all_torn or (newest is not None and s < newest)]
                skipped = [s for s in torn if s not in torn_old]
                errors: list[str] = []
                garbage: list[str] = []
                for s in kept[u]:
                    try:
                        commit, ms, _err = _referenced(eng, r, s, [u])
                        garbage.extend(_garbage(r, s, commit, ms))
                    except _FAILURES as exc:
                        errors.append(f"listing step {s}: {exc}")
                removed_steps: list[int] = []
                removed_torn: list[int] = []
                removed_garbage: list[str] = []
                if dry_run:
                    removed_steps, removed_torn, removed_garbage = drop, torn_old, garbage
                else:
                    for s in drop:  # oldest first; the commit goes first, then the objects
                        try:
                            remove_step(r, s)
                            removed_steps.append(s)
                        except _FAILURES as exc:
                            errors.append(f"removing step {s}: {exc}")
                    for s in torn_old:
                        try:
                            r.delete_prefix(step_dir(s))
                            removed_torn.append(s)
                        except _FAILURES as exc:
                            errors.append(f"removing torn step {s}: {exc}")
                    for k in garbage:
                        try:
                            r.delete(k)
                            removed_garbage.append(k)
                        except _FAILURES as exc:
                            errors.append(f"removing {k}: {exc}")
                results.append(PruneResult(u, tuple(s for s in committed if s not in drop), tuple(removed_steps), tuple(removed_torn), tuple(removed_garbage), tuple(skipped), tuple(errors)))
        finally:
            eng.close()
        return PruneReport(keep, dry_run, tuple(results), refused, dict(listing.unreachable))


# ----------------------------------------------------------------------------- inspect


@dataclass(frozen=True)
class LeafInfo:
    """A tensor or array as its manifest describes it (no data is read)."""

    kind: str  # "tensor" | "ndarray"
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    nbytes: int  # numel x element size
    storage: int
    storage_bytes: int
    shared: bool  # its storage backs other leaves too (views, tied weights)
    requires_grad: bool
    parameter: bool


@dataclass(frozen=True)
class TreeEntry:
    """One leaf of the state tree: a tensor/array (``leaf``) or a plain value (``value``)."""

    path: tuple[Any, ...]
    name: str  # dotted: "model.fc1.weight", "optim.state.0.exp_avg"
    leaf: LeafInfo | None
    value: Any = None


@dataclass(frozen=True)
class RankTree:
    """The state of one rank."""

    rank: int
    objects: int
    stream_bytes: int
    entries: tuple[TreeEntry, ...]
    tree: Any  # the decoded structure, with LeafInfo in place of tensors


@dataclass(frozen=True)
class InspectReport:
    """What :func:`inspect` found."""

    step: int
    world_size: int
    created_unix: float
    ranks: tuple[RankTree, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``ckptmirror inspect --json``); the tree is given as entries."""
        return {
            "step": self.step,
            "world_size": self.world_size,
            "created_unix": self.created_unix,
            "ranks": [
                {
                    "rank": rt.rank,
                    "objects": rt.objects,
                    "stream_bytes": rt.stream_bytes,
                    "entries": [
                        {"path": [_jsonable(k) for k in e.path], "name": e.name, **({"leaf": dataclasses.asdict(e.leaf)} if e.leaf else {"value": _jsonable(e.value)})}
                        for e in rt.entries
                    ],
                }
                for rt in self.ranks
            ],
        }


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (bytes, bytearray)):
        return {"bytes_base64": base64.b64encode(bytes(v)).decode("ascii")}
    if hasattr(v, "item") and type(v).__module__.startswith("numpy"):
        return _jsonable(v.item())
    return str(v)


def _walk(node: Any, path: tuple[Any, ...], is_leaf: Callable[[Any], bool]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Yield (path, value) for every leaf and plain value; empty containers are values."""
    if is_leaf(node) or isinstance(node, torch.Size):
        yield path, node
    elif isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _walk(v, path + (k,), is_leaf)
    elif type(node) in (list, tuple) and node:
        for i, v in enumerate(node):
            yield from _walk(v, path + (i,), is_leaf)
    else:
        yield path, node


def dotted(path: tuple[Any, ...]) -> str:
    """A key path as a dotted name: ``("optim", "state", 0, "exp_avg")`` -> ``optim.state.0.exp_avg``."""
    return ".".join(str(k) for k in path)


def _choose_step(listing: Any, step: int | None) -> int:
    if step is not None:
        if step not in listing.committed:
            raise StepNotFoundError(step, list(listing.committed))
        return step
    if not listing.committed:
        if listing.unreachable:
            raise ReplicaUnavailableError("no replica could be listed: " + "; ".join(f"{u}: {e}" for u, e in listing.unreachable.items()))
        raise CkptMirrorError("no committed step on these replicas")
    return max(listing.committed)


def inspect(
    urls: Sequence["str | Replica"],
    *,
    step: int | None = None,
    rank: int | None = None,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> InspectReport:
    """The state tree of ``step`` (default: the newest committed): key paths, dtypes, shapes, bytes.

    Reads the commit record and rank manifests (verified against the commit's pins, from any
    replica), never object data. ``rank``: only that rank (default: every rank).
    """
    with _opened(urls, storage_options) as replicas:
        listing = list_steps(replicas)
        s = _choose_step(listing, step)
        pool = ThreadPoolExecutor(1)
        try:
            reader = StepReader(replicas, pool, 0)
            commit = reader.read_commit(s, listing.committed[s])
            if rank is not None and not 0 <= rank < commit.world_size:
                raise UsageError(f"step {s} has ranks 0..{commit.world_size - 1}; there is no rank {rank}")
            ranks = []
            for ref in commit.ranks:
                if rank is not None and ref.rank != rank:
                    continue
                m = reader.read_manifest(commit, ref.rank)
                _validate_manifest(m, ref.key)
                users: dict[int, int] = {}
                for lf in m.leaves:
                    users[lf.storage] = users.get(lf.storage, 0) + 1

                def leaf(kind: str, i: int, path: tuple[Any, ...], m: RankManifest = m, users: dict[int, int] = users) -> LeafInfo:
                    lf = m.leaves[i]
                    numel = math.prod(lf.shape)
                    esize = _itemsize(lf.kind, lf.dtype)
                    st = m.storages[lf.storage]
                    return LeafInfo(lf.kind, lf.dtype, lf.shape, lf.stride, numel * esize, lf.storage, st.nbytes, users[lf.storage] > 1, lf.requires_grad, lf.parameter)

                tree = unflatten(m.structure, leaf, ref.key)
                entries = tuple(
                    TreeEntry(p, dotted(p), v if isinstance(v, LeafInfo) else None, None if isinstance(v, LeafInfo) else v)
                    for p, v in _walk(tree, (), lambda x: isinstance(x, LeafInfo))
                )
                ranks.append(RankTree(ref.rank, len(m.objects), m.stream_bytes, entries, tree))
        finally:
            pool.shutdown()
        return InspectReport(s, commit.world_size, commit.created_unix, tuple(ranks))


def _itemsize(kind: str, dtype: str) -> int:
    if kind == "tensor":
        from .tree import dtype_from_name

        return torch.empty(0, dtype=dtype_from_name(dtype)).element_size()
    import numpy as np

    return np.dtype(dtype).itemsize


# ----------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export` wrote."""

    path: str
    format: str
    step: int
    rank: int
    tensors: int
    tensor_bytes: int
    values: tuple[str, ...]  # names of plain values stored (safetensors: as JSON metadata)
    dropped: tuple[str, ...]  # "name: why", for values the format cannot hold
    cloned: tuple[str, ...]  # tensors copied because they shared storage or were not contiguous

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def _plain(v: Any, name: str, fmt: str) -> tuple[bool, Any, str]:
    """(keep, converted value, note) for a non-tensor value."""
    if isinstance(v, torch.Size):
        return True, [int(d) for d in v], ""
    if isinstance(v, (torch.dtype, torch.device)):
        return True, str(v), ""
    if type(v).__module__.startswith("numpy") and hasattr(v, "item"):
        return True, v.item(), ""
    if isinstance(v, (bytes, bytearray)):
        if fmt == "torch":
            return True, bytes(v), ""
        return False, None, "bytes cannot be stored in safetensors metadata"
    if v is None or isinstance(v, (bool, int, float, str)) or v == {} or v == [] or v == ():
        return True, (list(v) if isinstance(v, tuple) else v), ""
    return False, None, f"unsupported value of type {type(v).__name__}"


def export(
    urls: Sequence["str | Replica"],
    out: str,
    *,
    format: str = "safetensors",
    step: int | None = None,
    rank: int = 0,
    overwrite: bool = False,
    threads: int = 4,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> ExportReport:
    """Write one rank of ``step`` (default: the newest that verifies) as one file for other tools.

    Nested key paths become dotted names (``model.fc1.weight``, ``optim.state.0.exp_avg``).
    ``safetensors``: tensors as tensors (ones that share storage are cloned, as the format
    requires); plain values as JSON strings in the metadata (``format: pt`` is added for
    Hugging Face loaders); ``bytes`` are dropped with a note. ``torch``: ``torch.save`` of a
    flat dict of plain tensors and plain values, loadable with ``torch.load(weights_only=True)``.
    The data is read and verified exactly as a restore reads it. The file is written to a
    temporary name and renamed, so a failed export leaves nothing half-written.
    """
    if format not in ("safetensors", "torch"):
        raise UsageError(f"--format must be safetensors or torch, got {format!r}")
    out = os.path.abspath(out)
    if os.path.isdir(out):
        raise UsageError(f"{out} is a directory; give a file name")
    if os.path.exists(out) and not overwrite:
        raise UsageError(f"{out} exists; pass --force to replace it")
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError(f"directory {os.path.dirname(out)} does not exist")
    with _opened(urls, storage_options) as replicas:
        pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="ckptmirror-export")
        try:
            loaded = load_newest(replicas, pool, rank=rank, step=step)
        finally:
            pool.shutdown(wait=True)
    if loaded is None:
        raise CkptMirrorError("no committed step on these replicas")
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    dropped: list[str] = []
    import numpy as np

    def is_leaf(x: Any) -> bool:
        return isinstance(x, (torch.Tensor, np.ndarray))

    for path, v in _walk(loaded.state, (), is_leaf):
        name = dotted(path) or "state"
        if name in tensors or name in values:
            raise CkptMirrorError(f"two entries of the state have the same dotted name {name!r}; the export would lose one")
        if isinstance(v, np.ndarray):
            try:
                v = torch.from_numpy(np.ascontiguousarray(v))
            except TypeError as exc:
                dropped.append(f"{name}: numpy dtype {v.dtype} has no torch equivalent ({exc})")
                continue
        if isinstance(v, torch.Tensor):
            tensors[name] = v.detach()
            continue
        keep, conv, note = _plain(v, name, format)
        if keep:
            values[name] = conv
        else:
            dropped.append(f"{name}: {note}")
    cloned: list[str] = []
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex}")
    try:
        if format == "safetensors":
            from safetensors.torch import save_file
            import safetensors.torch as st

            supported = set(getattr(st, "_TYPES", {}).values())
            by_storage: dict[int, int] = {}
            for t in tensors.values():
                if t.numel():
                    p = t.untyped_storage().data_ptr()
                    by_storage[p] = by_storage.get(p, 0) + 1
            final: dict[str, torch.Tensor] = {}
            for name, t in tensors.items():
                if supported and t.dtype not in supported:
                    dropped.append(f"{name}: dtype {t.dtype} is not supported by safetensors")
                    continue
                if t.numel() == 0 or by_storage[t.untyped_storage().data_ptr()] > 1 or not t.is_contiguous():
                    t = t.clone(memory_format=torch.contiguous_format)
                    cloned.append(name)
                final[name] = t
            metadata = {k: json.dumps(v) for k, v in values.items()}
            if "format" not in metadata and "format" not in final:
                metadata["format"] = "pt"
            save_file(final, tmp, metadata=metadata)
            ntensors, nbytes = len(final), sum(t.numel() * t.element_size() for t in final.values())
        else:
            obj: dict[str, Any] = dict(tensors)  # detached: plain tensors, no Parameter
            obj.update(values)
            torch.save(obj, tmp)
            ntensors, nbytes = len(tensors), sum(t.numel() * t.element_size() for t in tensors.values())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportReport(out, format, loaded.step, rank, ntensors, nbytes, tuple(values), tuple(dropped), tuple(cloned))

