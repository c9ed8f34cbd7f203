"""``prune``: remove old committed steps beyond ``keep``, torn saves and leftovers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from ..format import step_dir
from ..replicas import Replica
from ..save.retention import OUTAGES, plan_retention, protected_keys, remove_step, remove_torn
from ._common import FAILURES, UsageError, list_reachable, opened
from ._engine import Engine, garbage_keys, recoverable, referenced

T = TypeVar("T")


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
    urls: Sequence[str | Replica],
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

    A directory without a commit record that holds objects a step staying on that replica
    references (incremental saves: what retention leaves of a dropped step) is no torn save:
    those objects stay, its other files are removed as leftovers, and the step is listed in
    ``kept_for_references``. A replica that stops answering (an outage, a missed time budget)
    is left at once: the rest of its removals are reported as not done.
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
        policy = {u: plan_retention(per[u], listing.torn.get(u, []), keep, all_torn=all_torn) for u in per}
        kept = {u: [s for s in sorted(per[u]) if s not in policy[u].drop] for u in per}
        eng = Engine(reachable, 4, True, None)
        refused: str | None = None
        try:
            # Safeguard: some step that stays must be recoverable (quick check, newest first).
            if any(len(v) > keep for v in per.values()):
                refused = "no step that would be kept passes a quick verification"
                for s in sorted({s for v in kept.values() for s in v}, reverse=True):
                    plans = [eng.replica_plan(r, s) for r in reachable if r.url in listing.committed.get(s, [])]
                    plans = [p for p in plans if p.commit is not None]
                    eng.run([j for p in plans for j in p.jobs()])
                    eng.complete(plans, "prune: check")
                    if recoverable(eng, plans):
                        refused = None
                        break
                if refused:
                    refused += "; run 'ckptmirror verify' and 'ckptmirror repair' first (only garbage is removed)"
            results: list[PruneResult] = []
            for r in reachable:
                u = r.url
                committed = sorted(per[u])
                drop = [] if refused else list(policy[u].drop)
                torn_old, skipped = list(policy[u].torn), list(policy[u].torn_kept)
                errors: list[str] = []
                garbage: list[str] = []
                for s in kept[u]:
                    try:
                        commit, ms, _err = referenced(eng, r, s, [u])
                        garbage.extend(garbage_keys(r, s, commit, ms))
                    except FAILURES as exc:
                        errors.append(f"listing step {s}: {exc}")
                torn_old, for_refs = _split_torn(r, torn_old, [s for s in committed if s not in drop] + skipped, errors)
                for leftovers in for_refs.values():
                    garbage.extend(leftovers)
                if dry_run:
                    removed_steps, removed_torn, removed_garbage = drop, torn_old, garbage
                else:
                    # Oldest first; remove_step deletes the commit first, then the objects.
                    rm = _Remover(errors)
                    removed_steps = rm.each(drop, partial(remove_step, r), "removing step {}")
                    # Newest first: a torn save's placement may reference an older torn directory's files.
                    removed_torn = sorted(rm.each(torn_old[::-1], partial(remove_torn, r), "removing torn step {}"))
                    removed_garbage = rm.each(garbage, r.delete, "removing {}")
                results.append(
                    PruneResult(
                        u,
                        tuple(s for s in committed if s not in drop),
                        tuple(removed_steps),
                        tuple(removed_torn),
                        tuple(removed_garbage),
                        tuple(skipped),
                        tuple(errors),
                        tuple(sorted(for_refs)),
                    )
                )
        finally:
            eng.close()
        return PruneReport(keep, dry_run, tuple(results), refused, dict(listing.unreachable))


def _split_torn(
    r: Replica, torn: Sequence[int], stay: Sequence[int], errors: list[str]
) -> tuple[list[int], dict[int, list[str]]]:
    """Split ``torn`` (steps without a commit record on ``r`` that this prune removes) into the
    torn saves indeed, and the directories that keep objects steps ``stay`` reference (step ->
    its other files: leftovers). When a placement record of a step that stays cannot be read,
    nothing is known to be unreferenced: those steps are kept whole and an error says so."""
    if not torn:
        return [], {}
    try:
        refs = protected_keys(r, stay, raise_outage=True)
    except FAILURES as exc:
        errors.append(f"reading the placement records of the kept steps: {exc}; torn steps {list(torn)} kept")
        return [], {}
    if refs is None:
        errors.append(
            f"a placement record of a kept step is unreadable (see the log): torn steps {list(torn)} kept, "
            "since any of their files may be referenced; run 'ckptmirror verify'"
        )
        return [], {}
    really: list[int] = []
    for_refs: dict[int, list[str]] = {}
    for s in torn:
        try:
            keys = r.list_prefix(step_dir(s))
        except FAILURES as exc:
            errors.append(f"listing torn step {s}: {exc}")
            continue
        if any(k in refs for k in keys):
            for_refs[s] = [k for k in keys if k not in refs]
        else:
            really.append(s)
    return really, for_refs


class _Remover:
    """Removals on one replica, in order; a failure is noted in ``errors`` as
    ``"<what, formatted with the item>: <error>"`` and the next item is still tried (one
    undeletable key must not keep the others), but after an outage (:data:`OUTAGES`: the replica
    does not answer) nothing more is tried there: each try would wait a whole time budget."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        self.halted = False

    def each(self, items: Sequence[T], remove: Callable[[T], object], what: str) -> list[T]:
        """Call ``remove`` on each item in order; return the items it removed."""
        done: list[T] = []
        untried: list[T] = []
        for item in items:
            if self.halted:
                untried.append(item)
                continue
            try:
                remove(item)
                done.append(item)
            except OUTAGES as exc:
                self.halted = True
                self.errors.append(f"{what.format(item)}: {exc}")
            except FAILURES as exc:
                self.errors.append(f"{what.format(item)}: {exc}")
        if untried:
            self.errors.append(
                f"{what.format(untried[0])}"
                + (f" and {len(untried) - 1} more" if len(untried) > 1 else "")
                + ": not tried, the replica stopped answering"
            )
        return done
