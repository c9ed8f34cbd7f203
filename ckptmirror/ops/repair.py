"""``repair``: copy missing or corrupt objects from replicas where they verify, then commit."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..checksum import checksum
from ..errors import CorruptObjectError, ManifestError, StepExistsError, StepNotFoundError
from ..format import (
    MAX_MANIFEST_BYTES,
    CommitRecord,
    ObjectRecord,
    ShareRecord,
    commit_key,
    parse_commit,
    share_key,
    step_dir,
)
from ..placement import MAX_PLACEMENT_BYTES, Stored, drop_placement_entry, parse_placement, placement_of
from ..replicas import Replica
from ..restore.fetch import _failed_check, _unreadable, is_damage
from ._common import FAILURES, Problem, Progress, ProgressFactory, UsageError, kept_steps, list_reachable, opened
from ._engine import Engine, ObjJob, ReplicaPlan, recoverable
from .verify import _disagreements


@dataclass(frozen=True)
class RepairAction:
    """One write repair makes (or would make, with ``dry_run``).

    ``action``: ``copy`` (an object or rank manifest, from ``source``), ``commit`` (write the
    commit record last), ``replace-commit`` (delete a commit record that does not parse, then
    commit) or ``delete-placement`` (remove a damaged placement record once every object it may
    list has been stored raw under its own name). ``done`` is False in a dry run and when the write failed (``error``).
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
    #: ``keep`` (``repair --keep N``): replica -> the steps it lacks that are neither among the
    #: newest N committed anywhere nor pinned: retention's to remove, so not copied there.
    not_kept: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0: nothing left to repair (or, in a dry run, everything repairable); 1: not; 2: a replica
        unreachable, or it stopped answering during the run (what it holds is unknown)."""
        if self.unreachable or any(p.kind == "unavailable" for p in self.unrecoverable):
            return 2
        if self.unrecoverable or any(a.error for a in self.actions):
            return 1
        return 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``ckptmirror repair --json``)."""
        d = dataclasses.asdict(self)
        d["exit_code"] = self.exit_code
        return d


#: One copy to make: key, size, checksum, and why (the problem it fixes).
_Copy = tuple[str, int, str, str]


@dataclass
class _Fix:
    """What one replica needs so that it holds a verifying, committed copy of one step."""

    plan: ReplicaPlan
    commit: CommitRecord
    needs_commit: bool  # the replica has no usable commit: write commit_raw last
    commit_raw: bytes | None
    replace_commit: bool
    copies: list[_Copy]  # objects; copied before any rank manifest
    manifests: list[_Copy]
    blocked: list[Problem]


def _raw_commit(eng: Engine, step: int, commit: CommitRecord) -> bytes | None:
    """The exact bytes of ``commit`` from a replica that holds it (copied as they are)."""
    key = commit_key(step)
    for r in eng.replicas:
        try:
            raw = r.get(key, MAX_MANIFEST_BYTES)
            if parse_commit(raw, key) == commit:
                return raw
        except FAILURES:
            continue
    return None


def _reason(p: Problem) -> str:
    """Why a write is made: the problem it fixes."""
    return f"{p.kind}: {p.detail}"


def _no_source(p: Problem) -> Problem:
    """``p`` as unrecoverable: no replica holds a verifying copy to repair it from."""
    return dataclasses.replace(
        p, kind="unrecoverable", detail=f"{p.kind} here and no other replica holds a verifying copy"
    )


def _needs(plan: ReplicaPlan, eng: Engine, late: bool = False) -> tuple[list[_Copy], list[_Copy], list[Problem]]:
    """Object copies, rank manifest copies, and what cannot be fixed, for one checked replica."""
    copies: list[_Copy] = []
    manifests: list[_Copy] = []
    blocked: list[Problem] = []
    r = plan.replica
    for rp in plan.ranks:
        if not rp.held:
            continue  # another node's rank on a partial replica: it never belonged here
        if rp.invalid is not None:
            blocked.append(rp.invalid)
        if rp.manifest_problem is not None and rp.manifest_problem.kind == "unavailable":
            blocked.append(rp.manifest_problem)  # stopped answering: nothing is written to it
            continue
        if rp.manifest is None:
            blocked.append(
                Problem(
                    plan.step,
                    r.url,
                    rp.key,
                    "unrecoverable",
                    "no replica holds a copy of this rank manifest that matches the commit"
                    + (
                        " (rebuilding a node-local replica from partial ones? 'ckptmirror repair --partial' "
                        "gives it only the ranks they hold)"
                        if late and not eng.inherit_shares
                        else ""
                    ),
                    rp.rank,
                )
            )
            continue
        if rp.manifest_problem is not None:
            if eng.copy_sources(rp.key, rp.size, rp.checksum, r):
                manifests.append((rp.key, rp.size, rp.checksum, _reason(rp.manifest_problem)))
            else:
                blocked.append(_no_source(rp.manifest_problem))
        for j in rp.jobs:
            if j.problem is None:
                continue
            if j.problem.kind in ("unreadable", "unavailable"):
                # The backend failed to read it, or stopped answering: the object may be fine;
                # never overwrite it blindly.
                blocked.append(j.problem)
            elif eng.copy_sources(j.obj.key, j.obj.size, j.obj.checksum, r):
                copies.append((j.obj.key, j.obj.size, j.obj.checksum, _reason(j.problem)))
            else:
                blocked.append(_no_source(j.problem))
    return copies, manifests, blocked


def repair(
    urls: Sequence[str | Replica],
    *,
    step: int | None = None,
    dry_run: bool = False,
    threads: int = 4,
    progress: ProgressFactory | None = None,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    partial: bool = False,
    keep: int | None = None,
) -> RepairReport:
    """Make every replica hold a verifying copy of every step committed on any of them.

    For each step (or ``step``): verify every replica in full (as :func:`verify`); copy each
    missing, truncated or corrupt object, then each bad rank manifest, from a replica where it
    verifies (re-verified while copying); then write the commit record last where it was
    missing (a torn save is completed this way) or did not parse. An object that verifies is
    never overwritten; one the backend could not read is left alone and reported. Running it
    twice changes nothing the second time. ``dry_run``: plan and report, write nothing.

    ``partial``: a replica without a commit record of a step gets only the ranks that the
    replicas holding the step hold when each of those is partial (a node-local disk rebuilt from
    that node's ``ring_peer`` namespace), and a share record saying so; without it, every rank
    (the rule of a full copy), which partial sources cannot give.

    ``keep``: the job's ``keep_last``. A step that is neither among the newest ``keep`` steps
    committed anywhere nor pinned is not copied to a replica that lacks it (its retention
    removed it while another replica was down; copying it back would undo that): listed in
    ``not_kept``. Its copies that exist are still repaired.
    """
    if keep is not None and keep < 1:
        raise UsageError(f"--keep must be at least 1, got {keep}")
    with opened(urls, storage_options) as replicas:
        listing, reachable = list_reachable(replicas)
        expected = kept_steps(reachable, listing.committed, keep)
        not_kept: dict[str, list[int]] = {}
        unrecoverable: list[Problem] = []
        if step is not None and step not in listing.committed:
            raise StepNotFoundError(step, list(listing.committed))
        steps = sorted(listing.committed) if step is None else [step]
        eng = Engine(reachable, threads, False, progress)
        eng.inherit_shares = partial
        fixes: list[_Fix] = []
        try:
            # 1. Verify every replica that holds a commit, against its own commit.
            per_step: dict[int, list[ReplicaPlan]] = {}
            jobs: list[ObjJob] = []
            for s in steps:
                plans: list[ReplicaPlan] = []
                for r in reachable:
                    held = r.url in listing.committed[s]
                    if not held and expected is not None and s not in expected:
                        # Retention's to remove there (a torn copy: a pass that stopped): not copied.
                        not_kept.setdefault(r.url, []).append(s)
                        continue
                    plan = eng.replica_plan(r, s) if held else ReplicaPlan(r, s, None, None)
                    plans.append(plan)
                    jobs.extend(plan.jobs())
                per_step[s] = plans
            eng.run(jobs, "repair: verify")
            eng.complete([p for plans in per_step.values() for p in plans], "repair: other copies")
            # Replicas that hold another checkpoint under the same step: not repair's to choose
            # which one is right (verify reports them too; its message says what to do).
            disputed = set()
            for s, plans in per_step.items():
                differ = _disagreements(eng, s, plans)
                if any(p.kind == "disagree" for found in differ.values() for p in found):
                    for found in differ.values():
                        unrecoverable.extend(found)
                    disputed.add(s)
                    continue
                for i, plan in enumerate(plans):
                    # A damaged record (its pins verify nowhere; another replica's does): the
                    # replica is treated as holding no usable commit, which step 2 replaces.
                    for p in differ.get(id(plan), ()):
                        plans[i] = ReplicaPlan(plan.replica, s, None, p)
            for s in disputed:  # nothing is copied or committed for it: which copy is right is the user's call
                del per_step[s]
            # 2. Replicas without a usable commit get the first commit that is recoverable;
            #    whatever they already hold of it (a torn save) is verified before anything is copied.
            late_ids: set[int] = set()
            jobs = []
            for s, plans in per_step.items():
                originals = list(plans)
                for i, plan in enumerate(originals):
                    if plan.commit is not None:
                        continue
                    if plan.commit_problem is not None and plan.commit_problem.kind in ("unreadable", "unavailable"):
                        unrecoverable.append(plan.commit_problem)
                        continue
                    # Rebuildable is enough (by content): the copies read each object from
                    # wherever its bytes verify, under its own name or another step's.
                    source = next(
                        (p for p in originals if p.commit is not None and recoverable(eng, [p], by_content=True)),
                        None,
                    )
                    if source is None:
                        unrecoverable.append(
                            Problem(
                                s,
                                plan.replica.url,
                                commit_key(s),
                                "unrecoverable",
                                "no replica holds a complete verifying copy of this step",
                            )
                        )
                        continue
                    assert source.commit is not None
                    target = eng.plan(plan.replica, s, source.commit)
                    target.commit_problem = plan.commit_problem
                    plans[i] = target
                    late_ids.add(id(target))
                    jobs.extend(target.jobs())
            eng.run(jobs, "repair: verify torn")
            for s, plans in per_step.items():
                for plan in plans:
                    if plan.commit is None:
                        continue
                    copies, manifests, blocked = _needs(plan, eng, id(plan) in late_ids)
                    needs_commit = id(plan) in late_ids
                    raw = None
                    if needs_commit:
                        raw = _raw_commit(eng, s, plan.commit)
                        if raw is None:
                            blocked.append(
                                Problem(
                                    s,
                                    plan.replica.url,
                                    commit_key(s),
                                    "unrecoverable",
                                    "the commit record could not be read again from any replica",
                                )
                            )
                    replace = needs_commit and plan.commit_problem is not None and plan.commit_problem.kind != "missing"
                    if copies or manifests or needs_commit or blocked:
                        fixes.append(_Fix(plan, plan.commit, needs_commit, raw, replace, copies, manifests, blocked))
            actions = _apply_fixes(eng, fixes, dry_run, unrecoverable)
        finally:
            eng.close()
        return RepairReport(
            tuple(r.url for r in replicas),
            dry_run,
            tuple(steps),
            tuple(actions),
            tuple(unrecoverable),
            {**eng.down, **listing.unreachable},  # with those that stopped answering during the run
            {u: tuple(v) for u, v in not_kept.items()},
        )


class _Records:
    """The placement records repair changes on one run.

    Copy threads that store compressed objects raw drop their entries from one writer's record:
    a read-modify-write of the whole record, so each record has its own lock (without it two
    threads each write back the record they read, and one entry stays: the object is reported
    repaired and is still read as the damaged ``.zst``). Records that do not parse are noted
    with the objects repair stored raw for them, to be removed once every object they may list
    is stored raw (:meth:`settle`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        #: (replica URL, placement key) -> the objects stored raw at home because of it
        self.damaged: dict[tuple[str, str], set[str]] = {}

    def lock(self, r: Replica, pkey: str) -> threading.Lock:
        """The lock of record ``pkey`` on ``r``."""
        with self._lock:
            return self._locks.setdefault((r.url, pkey), threading.Lock())

    def drop(self, r: Replica, home: str) -> None:
        """``home`` is now stored raw at its own name on ``r``: drop it from its record."""
        pkey = placement_of(home)
        if pkey is not None:
            with self.lock(r, pkey):
                drop_placement_entry(r, home)

    def stored_raw(self, r: Replica, home: str) -> None:
        """``home`` was stored raw on ``r`` because its placement record is unusable."""
        pkey = placement_of(home)
        if pkey is not None:
            with self._lock:
                self.damaged.setdefault((r.url, pkey), set()).add(home)

    def settle(self, fix: _Fix, dry_run: bool) -> list[RepairAction]:
        """Remove ``fix``'s replica's unusable placement records whose objects are all stored raw
        now (what is left of the record is then "every object raw at home", which is true), or,
        where the record parses after all (it contradicted the manifest for some objects), drop
        the entries of the objects stored raw. A record is left as it is while an object it may
        list was not stored raw (a failed copy): that object stays reported, never wrong.
        ``dry_run``: the records that would be removed, as actions not done."""
        r, s = fix.plan.replica, fix.plan.step
        out: list[RepairAction] = []
        homes = [o.key for rp in fix.plan.ranks if rp.held and rp.manifest for o in rp.manifest.objects]
        why = "invalid: damaged placement record"
        for (url, pkey), raw in sorted(self.damaged.items()):
            if url != r.url or not pkey.startswith(step_dir(s) + "/"):
                continue
            mine = [h for h in homes if placement_of(h) == pkey]
            if dry_run:
                if set(mine) <= raw:
                    out.append(RepairAction(s, r.url, pkey, "delete-placement", None, 0, why))
                continue
            with self.lock(r, pkey):
                try:
                    try:
                        parse_placement(r.get(pkey, MAX_PLACEMENT_BYTES), pkey)
                    except ManifestError:
                        if not set(mine) <= raw:
                            continue
                        r.delete(pkey)
                        out.append(RepairAction(s, r.url, pkey, "delete-placement", None, 0, why, True))
                        continue
                    for h in sorted(raw):
                        drop_placement_entry(r, h)
                except FAILURES as exc:
                    out.append(
                        RepairAction(
                            s,
                            r.url,
                            pkey,
                            "delete-placement",
                            None,
                            0,
                            why,
                            False,
                            f"{type(exc).__name__}: {exc}",
                        )
                    )
        return out


def _apply_fixes(eng: Engine, fixes: list[_Fix], dry_run: bool, unrecoverable: list[Problem]) -> list[RepairAction]:
    """Make the copies and commits of ``fixes`` (or list them, in a dry run); blocked items go to ``unrecoverable``."""
    actions: list[RepairAction] = []
    lock = threading.Lock()
    records = _Records()
    bar: Progress | None = None
    total = sum(size for f in fixes if not (f.blocked and f.needs_commit) for _, size, _, _ in f.copies + f.manifests)
    if eng.progress is not None and not dry_run and total:
        bar = eng.progress(total, "B", "repair: copy")

    #: (target URL, file written) -> (size, checksum, step, source URL) of what this run wrote there: steps
    #: that share a file (incremental saves) need it rewritten once, not once a step
    written: dict[tuple[str, str], tuple[int, str, int, str]] = {}
    dest_locks: dict[tuple[str, str], threading.Lock] = {}

    def copy(fix: _Fix, key: str, size: int, csum: str, reason: str, manifest: bool = False) -> RepairAction:
        r, s = fix.plan.replica, fix.plan.step
        groups = eng.copy_sources(key, size, csum, r)

        def action(
            src: str | None = groups[0][1][0].url if groups else None,
            error: str | None = None,
            twin: str = key,
            nbytes: int = size,
            why: str = reason,
        ) -> RepairAction:
            if twin != key:
                why += f"; copied from {twin}, the same bytes under another step's name"
            return RepairAction(s, r.url, key, "copy", src, nbytes, why, error is None and not dry_run, error)

        def again(dest: str, before: tuple[int, str, int, str]) -> RepairAction:
            """The action of a copy whose file this run wrote (or plans to write) already."""
            return action(before[3] or None, nbytes=0, why=f"{reason}; {dest} rewritten already for step {before[2]}")

        if dry_run:
            if manifest:
                return action(twin=groups[0][0] if groups else key)
            dest = key
            try:
                dest = _dest(eng.single[r.url].stored(r, ObjectRecord(key, size, csum)), key)
            except ManifestError:
                records.stored_raw(r, key)  # would be stored raw: its record would go
            except FAILURES:
                pass
            # The same dedupe as the real run below: a file that steps share is counted once.
            with lock:
                seen = written.get((r.url, dest))
                if seen is None:
                    written[(r.url, dest)] = (size, csum, s, groups[0][1][0].url if groups else "")
            if seen is not None and seen[:2] == (size, csum):
                return again(dest, seen)
            return action(twin=groups[0][0] if groups else key)
        moved = 0
        try:
            down = eng.down.get(r.url)
            if down is not None:
                # The target stopped answering earlier in this run: each further copy there would
                # wait out its own time budget (hours for a large state), to fail all the same.
                return action(error=f"skipped: {r.url} stopped answering during this run ({down})")
            if manifest:
                # A rank manifest is always stored raw under its name (restores read it so): a
                # source's damaged placement record does not concern it (it failed the copy, and
                # a second run then did what the first should have).
                raw, src, twin = _read_raw(key, size, csum, groups)
                r.put(key, raw)  # raw on the target too, never in a placement record
                moved = size
                return action(src, twin=twin)
            try:
                st: Stored | None = eng.single[r.url].stored(r, ObjectRecord(key, size, csum))
            except ManifestError:
                st = None  # its placement record is unusable (damaged): where it stores it is unknown
            # Raw under its own name, or (an incremental save) under an earlier step's name, which
            # holds these very bytes for every step that references it; compressed there: raw
            # under its own name instead (the placement's entry is dropped below).
            dest = _dest(st, key)
            # One copy of a file at a time: two objects of one step may resolve to one file (an
            # incremental save stores equal bytes once), and they are copied on the pool at once.
            # The second waits, then finds the file written, or (the first failed) copies it.
            with lock:
                one_at_a_time = dest_locks.setdefault((r.url, dest), threading.Lock())
            with one_at_a_time:
                with lock:
                    before = written.get((r.url, dest))
                if before is not None and before[:2] == (size, csum):
                    return again(dest, before)
                data = bytearray(size)  # not a tensor: repair runs without torch
                src, twin = _fetch_any(eng, key, csum, groups, memoryview(data))  # verified again while copying
                r.put(dest, data)
                moved = size
                if st is None:
                    # The unusable record goes once every object it may list is stored raw
                    # (records.settle), before the rank manifests and the commit.
                    records.stored_raw(r, key)
                elif st.codec != "none":
                    # (in that order: a crash in between leaves it damaged, not wrong)
                    records.drop(r, key)
                with lock:
                    written[(r.url, dest)] = (size, csum, s, src)
        except FAILURES as exc:
            if getattr(exc, "replica", "") == r.url:  # the target's own outage (not a source's)
                eng.mark_down(r, exc, key)
            return action(error=f"{type(exc).__name__}: {exc}")
        finally:
            if bar is not None:
                with lock:
                    bar.update(size)
        return action(src, twin=twin, nbytes=moved)

    try:
        for fix in fixes:
            unrecoverable.extend(fix.blocked)
            if fix.blocked and fix.needs_commit:
                continue  # cannot complete this replica's copy of the step: write nothing there
            done = [f.result() for f in [eng.pool.submit(copy, fix, *c) for c in fix.copies]]
            done += records.settle(fix, dry_run)
            done += [copy(fix, *c, manifest=True) for c in fix.manifests]  # rank manifests after every object
            actions.extend(done)
            if fix.needs_commit and fix.commit_raw is not None:
                actions.append(_commit(fix, dry_run, any(a.error for a in done), eng))
    finally:
        if bar is not None:
            bar.close()
    return actions


def _gone(fix: _Fix, eng: Engine) -> str | None:
    """The first file of ``fix``'s step that its replica does not list any more, or None.

    Repair verified what the replica held of a torn save before it copied the rest; something
    else may have deleted those files since (``prune`` removes torn saves, retention removes
    steps). Listed again right before the commit record is written, one listing per step
    directory: a commit over a missing file would make a step "restorable" that is not."""
    r = fix.plan.replica
    reader = eng.single[r.url]
    # Each file as alternatives: where the placement record read before the copies put it, or,
    # for an object this run copied, its own raw name (repair stores an object it copies raw and
    # drops its placement entry; the reader's cached record still names the compressed file
    # repair found missing).
    keys: list[tuple[str, ...]] = []
    copied = {c[0] for c in fix.copies}
    for rp in fix.plan.ranks:
        if not rp.held or rp.manifest is None:
            continue
        keys.append((rp.key,))
        for o in rp.manifest.objects:
            try:
                keys.append((reader.stored(r, o).key, o.key) if o.key in copied else (reader.stored(r, o).key,))
            except ManifestError:
                keys.append((o.key,))  # its placement record was damaged: repair stored it raw
    listed: dict[str, set[str]] = {}
    for alternatives in keys:
        for k in alternatives:
            d = k.split("/", 1)[0]
            if d not in listed:
                listed[d] = set(r.list_prefix(d))
        if not any(k in listed[k.split("/", 1)[0]] for k in alternatives):
            return alternatives[0]
    return None


def _dest(st: Stored | None, key: str) -> str:
    """The file a copy of ``key`` writes on its target: where the target stores it raw (under
    an earlier step's name, an incremental save), else its own name (stored raw there)."""
    return st.key if st is not None and st.codec == "none" else key


def _outage(errors: Sequence[BaseException]) -> bool:
    """Whether a copy that no source gave is an outage (a later run may get past it), by
    restore's rule: no copy was read and failed its check, and not every source was damaged
    (missing where it was looked for counts as damage)."""
    return bool(errors) and not any(_failed_check(e) for e in errors) and not all(is_damage(e) for e in errors)


def _read_raw(
    key: str, size: int, csum: str, groups: Sequence[tuple[str, Sequence[Replica]]]
) -> tuple[bytes, str, str]:
    """The bytes of ``key`` (raw, ``size`` long, checksum ``csum``) from the first source of
    ``groups`` (:meth:`~._engine.Engine.copy_sources`) where they verify, read again while
    copying; that source's URL and the name read there."""
    problems: list[str] = []
    errors: list[BaseException] = []
    mismatch = False  # a copy was read and failed its check: damage, whatever the others say
    for name, sources in groups:
        for src in sources:
            try:
                data = src.get(name, max(size, 1))
            except FAILURES as exc:
                problems.append(f"{src.url} ({name}): {exc}")
                errors.append(exc)
                continue
            if len(data) == size and checksum(data) == csum:
                return data, src.url, name
            problems.append(f"{src.url} ({name}): does not match the commit (size {len(data)} vs {size}, or checksum)")
            mismatch = True
    if not mismatch and _outage(errors):
        raise _unreadable(errors, key)
    raise CorruptObjectError("no replica holds a verifying copy: " + "; ".join(problems), key=key)


def _fetch_any(
    eng: Engine, key: str, csum: str, groups: Sequence[tuple[str, Sequence[Replica]]], out: memoryview
) -> tuple[str, str]:
    """Read ``key``'s bytes into ``out`` (verified against ``csum``) from the first source of
    ``groups`` where they verify (:meth:`~._engine.Engine.copy_sources`); that source's URL
    and the name read there. Raises the one group's error; when several failed, the outage
    (:func:`~ckptmirror.restore.fetch._unreadable`) where :func:`_outage` says so, else a
    :class:`CorruptObjectError` naming each."""
    errors: list[tuple[str, BaseException]] = []
    for name, sources in groups:
        try:
            return eng.shared.fetch_into(name, csum, sources, out), name
        except FAILURES as exc:
            errors.append((name, exc))
    if len(errors) == 1:
        raise errors[0][1]
    if _outage([e for _, e in errors]):
        raise _unreadable([e for _, e in errors], key)
    raise CorruptObjectError(
        "no replica holds a verifying copy under any name: " + "; ".join(f"{n}: {e}" for n, e in errors), key=key
    )


def _commit(fix: _Fix, dry_run: bool, copy_failed: bool, eng: Engine) -> RepairAction:
    """Write the commit record of ``fix`` (last, after its copies), or say why it was not written."""
    raw = fix.commit_raw
    assert raw is not None
    r, s = fix.plan.replica, fix.plan.step
    key = commit_key(s)
    kind = "replace-commit" if fix.replace_commit else "commit"
    reason = (
        _reason(fix.plan.commit_problem)
        if fix.plan.commit_problem
        else "step committed on another replica but not here"
    )
    ranks = eng.inherited.get((r.url, s), ())
    share = (share_key(s, checksum(raw), min(ranks)), ShareRecord(s, checksum(raw), ranks).to_json()) if ranks else None
    if share is not None:
        reason += (
            f"; holds rank(s) {', '.join(map(str, ranks))} as the partial replicas given do (--partial: "
            f"share record {share[0]} written first)"
        )

    def action(done: bool = False, error: str | None = None) -> RepairAction:
        return RepairAction(s, r.url, key, kind, None, len(raw), reason, done, error)

    if dry_run:
        return action()
    if copy_failed:
        # A commit record makes the step restorable here: never write it over a missing object.
        return action(error="not committed: a copy above failed")
    try:
        gone = _gone(fix, eng)
        if gone is not None:
            return action(
                error=f"not committed: {gone} is no longer there (deleted while repair ran: was "
                "'ckptmirror prune' or a training job's retention running?); run repair again"
            )
        # A partial copy's share records before its commit record, as a save writes them: without
        # them the replica would be held to the rule of a full copy (every other rank "missing").
        if share is not None:
            r.put(*share)
        if fix.replace_commit:
            r.delete(key)
        r.commit(key, raw)
        # Once more after the commit: a delete that listed the files before it may have removed
        # them since (prune checks for a commit before it deletes, and again after). A commit
        # over a hole is taken back: the step stays torn here, which the next repair completes.
        gone = _gone(fix, eng)
        if gone is not None:
            r.delete(key)
            return action(
                error=f"commit record taken back: {gone} was deleted right after it was written (was "
                "'ckptmirror prune' or a training job's retention running?); run repair again"
            )
        return action(done=True)
    except StepExistsError as exc:
        return action(error=f"someone committed step {s} here meanwhile: {exc}")
    except FAILURES as exc:
        return action(error=f"{type(exc).__name__}: {exc}")
