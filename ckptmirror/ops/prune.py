"""``prune``: remove old committed steps beyond ``keep``, torn saves and leftovers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..replicas import Replica
from ..save.retention import PlacementUnreadable, pinned_steps, placement_refs, plan_retention
from ._common import FAILURES, UsageError, list_reachable, opened
from ._engine import Engine, garbage_keys, plan_problems, recoverable, referenced, temp_keys
from ._prune_steps import Down, Remover, is_outage, outage_text, removals, split_torn


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
    #: directories without a commit record that keep objects steps staying here reference
    #: (incremental saves: a step retention dropped): not torn saves, kept; whatever else they
    #: hold is in ``removed_garbage``
    kept_for_references: tuple[int, ...] = ()
    #: committed steps here that a job pinned (``Mirror.pin``; a pin record on any replica):
    #: kept, and not counted towards ``keep`` (removed only with ``ignore_pins``)
    pinned: tuple[int, ...] = ()
    #: steps planned for removal that had a commit record again right before their files would
    #: go (a ``repair`` or a save committed them meanwhile): left alone
    committed_meanwhile: tuple[int, ...] = ()
    #: the outage that made prune stop asking this replica (None: it answered throughout); what
    #: was left is in ``errors`` as not done
    stopped: str | None = None


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune` did. ``exit_code``: 0, 1 (refused or a delete failed), 2 (unreachable)."""

    keep: int
    dry_run: bool
    replicas: tuple[PruneResult, ...]
    refused: str | None  # why committed steps were kept (none of the kept steps verifies)
    unreachable: Mapping[str, str]
    ignore_pins: bool = False
    #: the refusal rests on damage a replica that answered showed (not only on an outage)
    refused_for_damage: bool = False

    @property
    def exit_code(self) -> int:
        """0: done; 1: committed steps were not pruned (refused) or a delete failed; 2: a replica
        unreachable, or one that stopped answering during the run (its work was left undone),
        unless the refusal rests on damage a replica that answered showed (1: act on it)."""
        if self.refused and self.refused_for_damage:
            return 1
        if self.unreachable or any(p.stopped for p in self.replicas):
            return 2
        return 1 if self.refused or any(p.errors for p in self.replicas) else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``ckptmirror prune --json``)."""
        d = dataclasses.asdict(self)
        d["exit_code"] = self.exit_code
        return d


@dataclass
class _Plan:
    """One replica's share of a prune, as it is planned and then carried out."""

    r: Replica
    committed: list[int]
    drop: list[int]
    torn: list[int]  # torn saves to remove
    skipped: list[int]  # torn saves left (newer than the newest commit)
    pinned: list[int]
    errors: list[str] = field(default_factory=list)
    garbage: list[str] = field(default_factory=list)
    for_refs: dict[int, list[str]] = field(default_factory=dict)
    stopped: str | None = None

    def stop(self, what: str, exc: BaseException) -> None:
        """The replica stopped answering while ``what``: ask it nothing more; nothing is removed."""
        self.stopped = outage_text(self.r, exc)
        undone = [f"removing steps {_listed(self.drop)}"] if self.drop else []
        undone += [f"torn saves {_listed(self.torn)}"] if self.torn else []
        undone += [f"{len(self.garbage)} leftover key(s)"] if self.garbage else []
        left = (", ".join(undone) if undone else "the rest of the pass") + " not tried"
        self.errors.append(f"{what}: {self.stopped}; the replica stopped answering: {left}")
        self.drop, self.torn, self.garbage, self.for_refs = [], [], [], {}


def _listed(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps))


def prune(
    urls: Sequence[str | Replica],
    *,
    keep: int,
    dry_run: bool = False,
    all_torn: bool = False,
    ignore_pins: bool = False,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> PruneReport:
    """Keep the newest ``keep`` committed steps on each replica; remove older ones and garbage.

    The newest committed step of a replica is never removed, nor a step a job pinned
    (``Mirror.pin``: a pin record on any of the replicas; pinned steps do not count towards
    ``keep``) unless ``ignore_pins``. Torn saves older than a replica's newest committed step are
    removed; newer ones may be a save in progress and are kept unless ``all_torn``. Leftovers
    inside kept steps (temp files, objects no commit names) are removed.

    As a safeguard, committed steps are removed only if at least one step that stays verifies
    in full: its commit, manifests and every object's checksum, read across the replicas (one
    step, newest first; an older one is tried when it fails); otherwise only garbage goes and
    ``refused`` says why. On a replica where a placement record of a step that stays cannot be
    read, nothing but garbage goes either (any file may be one it references), and an error
    names the record.

    A directory without a commit record that holds objects a step staying on that replica
    references (incremental saves: what retention leaves of a dropped step) is no torn save:
    those objects stay, its other files are removed as leftovers, and the step is listed in
    ``kept_for_references``. A step that has a commit record again right before its files go (a
    ``repair`` committed it meanwhile) is left alone (``committed_meanwhile``). A replica that
    stops answering (an outage, a missed time budget) is asked nothing more: the rest of its work
    is reported as not done, in ``stopped`` and ``errors`` (exit code 2).
    """
    if type(keep) is not int or keep < 1:
        raise UsageError(f"--keep must be at least 1 (the newest committed step is never removed), got {keep!r}")
    with opened(urls, storage_options) as replicas:
        listing, reachable = list_reachable(replicas)
        per: dict[str, list[int]] = {r.url: [] for r in reachable}
        for s, holders in listing.committed.items():
            for u in holders:
                if u in per:
                    per[u].append(s)
        pins, pin_errors, down = _read_pins(reachable)
        plans: list[_Plan] = []
        for r in reachable:
            u = r.url
            pinned = () if ignore_pins else pins
            policy = plan_retention(per[u], listing.torn.get(u, []), keep, all_torn=all_torn, pinned=pinned)
            # Pins that could not be read may name any step: keep the committed ones.
            drop = [] if u in pin_errors and not ignore_pins else list(policy.drop)
            p = _Plan(r, sorted(per[u]), drop, list(policy.torn), list(policy.torn_kept), sorted(pins & set(per[u])))
            if u in pin_errors:
                p.errors.append(pin_errors[u])
            if u in down:
                p.stop("listing its pin records", down[u])
            plans.append(p)
        # quick=False: the guard reads the step that justifies removals in full (_guard).
        eng = Engine([p.r for p in plans if p.stopped is None], 4, False, None)
        try:
            refused, damage = _guard(eng, plans, listing.committed)
            for p in plans:
                if p.stopped is None and eng.down.get(p.r.url) is not None:
                    p.stop("verifying the step that justifies removals", Down(eng.down[p.r.url]))
                if refused:
                    p.drop = []
                if p.stopped is None:
                    _plan_replica(eng, p)
            results = [_carry_out(p, dry_run) for p in plans]
        finally:
            eng.close()
        return PruneReport(keep, dry_run, tuple(results), refused, dict(listing.unreachable), ignore_pins, damage)


def _read_pins(reachable: Sequence[Replica]) -> tuple[set[int], dict[str, str], dict[str, BaseException]]:
    """The steps pinned on any of ``reachable`` (pin records), the replicas whose records could
    not be listed (URL -> error: their committed steps stay, since their pins are unknown), and
    those that did not answer (URL -> the outage)."""
    pins: set[int] = set()
    errors: dict[str, str] = {}
    down: dict[str, BaseException] = {}
    for r in reachable:
        try:
            pins |= pinned_steps(r)
        except FAILURES as exc:
            if is_outage(exc):
                down[r.url] = exc
            else:
                errors[r.url] = (
                    f"listing the pin records (pins/): {exc}; committed steps kept, since any may be pinned "
                    "(--ignore-pins removes them anyway)"
                )
    return pins, errors, down


def _guard(eng: Engine, plans: Sequence[_Plan], committed: Mapping[int, Sequence[str]]) -> tuple[str | None, bool]:
    """Why no committed step may be removed (None: some step that stays verifies in full), and
    whether a replica that answered showed damage in the steps checked (an outage alone leaves
    it unknown: exit 2; damage wins over an outage, as in ``verify``: exit 1).

    The step that justifies the removals is read in full (every object's checksum, on the
    replicas that hold it): a presence and size check passes bit rot of the same size, and
    removing every older step then leaves nothing that restores. Newest first; an older kept
    step is tried when one fails. Cost: one step's bytes, read once (more only when it fails).
    """
    if not any(p.drop for p in plans):
        return None, False
    urls = {p.r.url for p in plans if p.stopped is None}
    stay = sorted({s for p in plans for s in p.committed if s not in p.drop}, reverse=True)
    damage = False
    for s in stay:
        rplans = [eng.replica_plan(r, s) for r in eng.replicas if r.url in urls and r.url in committed.get(s, ())]
        damage = damage or any(
            rp.commit_problem is not None and rp.commit_problem.kind not in ("unavailable", "missing") for rp in rplans
        )
        rplans = [rp for rp in rplans if rp.commit is not None]
        eng.run([j for rp in rplans for j in rp.jobs()], "prune: verify")
        eng.complete(rplans, "prune: verify")
        if recoverable(eng, rplans):
            return None, False
        damage = damage or any(p.kind != "unavailable" for rp in rplans for p in plan_problems(rp))
    return (
        "no step that would be kept verifies (commit, manifests and object checksums); "
        "run 'ckptmirror verify' and 'ckptmirror repair' first (only garbage is removed)"
    ), damage


def _plan_replica(eng: Engine, p: _Plan) -> None:
    """Find ``p``'s garbage, and check that the placement records of the steps that stay can be
    read (else nothing that may be referenced goes: committed steps and torn saves stay)."""
    r, u = p.r, p.r.url
    for s in [s for s in p.committed if s not in p.drop]:
        try:
            commit, ms, _err = referenced(eng, r, s, [u])
            p.garbage.extend(garbage_keys(r, s, commit, ms))
        except FAILURES as exc:
            if is_outage(exc):
                p.stop(f"listing step {s}", exc)
                return
            p.errors.append(f"listing step {s}: {exc}")
        if eng.down.get(u) is not None:
            p.stop(f"reading step {s}", Down(eng.down[u]))
            return
    if not (p.drop or p.torn or p.garbage):
        return
    stay = [s for s in p.committed if s not in p.drop] + p.skipped
    try:
        refs = placement_refs(r, stay)
    except FAILURES as exc:
        if is_outage(exc):
            p.stop("reading the placement records of the kept steps", exc)
            return
        p.errors.append(
            f"reading the placement records of the kept steps: {exc}; steps [{_listed(p.drop)}], "
            f"torn steps [{_listed(p.torn)}] and leftovers that may be referenced kept"
        )
        p.drop, p.torn, p.garbage = [], [], temp_keys(p.garbage)
        return
    if isinstance(refs, PlacementUnreadable):
        what = [f"steps {_listed(p.drop)} (still committed)"] if p.drop else []
        what += [f"torn steps {_listed(p.torn)}"] if p.torn else []
        what += ["leftovers of kept steps"] if len(temp_keys(p.garbage)) < len(p.garbage) else []
        p.errors.append(str(PlacementUnreadable(u, refs.key, refs.cause, kept=" and ".join(what))))
        p.drop, p.torn, p.garbage = [], [], temp_keys(p.garbage)
        return
    # A kept step's directory may hold files its own commit does not name that a later step
    # references (that step number saved again with overwrite=True after an incremental save
    # referenced the first save's objects): not garbage.
    p.garbage = [k for k in p.garbage if k not in refs]
    try:
        p.torn, p.for_refs = split_torn(r, p.torn, refs, p.errors)
    except FAILURES as exc:
        if not is_outage(exc):
            raise
        p.stop("listing the torn steps", exc)
        return
    for leftovers in p.for_refs.values():
        p.garbage.extend(leftovers)


def _carry_out(p: _Plan, dry_run: bool) -> PruneResult:
    """Remove what ``p`` planned (nothing when ``dry_run``) and say what happened."""
    meanwhile: list[int] = []
    if dry_run or p.stopped is not None:  # a stopped plan was emptied (_Plan.stop)
        removed_steps, removed_torn, removed_garbage = list(p.drop), list(p.torn), list(p.garbage)
    else:
        rm = Remover(p.errors)
        removed_steps, removed_torn, removed_garbage, meanwhile = removals(rm, p.r, p.drop, p.torn, p.garbage)
        if rm.halted is not None:
            p.stopped = rm.halted
    gone = set(removed_steps)
    return PruneResult(
        p.r.url,
        tuple(s for s in p.committed if s not in gone),
        tuple(removed_steps),
        tuple(removed_torn),
        tuple(removed_garbage),
        tuple(p.skipped),
        tuple(p.errors),
        tuple(sorted(p.for_refs)),
        tuple(p.pinned),
        tuple(meanwhile),
        p.stopped,
    )
