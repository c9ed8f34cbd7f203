"""``prune``: remove old committed steps beyond ``keep``, torn saves and leftovers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from ..replicas import Replica
from ..save.retention import plan_retention, remove_step, remove_torn
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
                if dry_run:
                    removed_steps, removed_torn, removed_garbage = drop, torn_old, garbage
                else:
                    # Oldest first; remove_step deletes the commit first, then the objects.
                    removed_steps = _each(drop, partial(remove_step, r), "removing step {}", errors)
                    removed_torn = _each(torn_old, partial(remove_torn, r), "removing torn step {}", errors)
                    removed_garbage = _each(garbage, r.delete, "removing {}", errors)
                results.append(
                    PruneResult(
                        u,
                        tuple(s for s in committed if s not in drop),
                        tuple(removed_steps),
                        tuple(removed_torn),
                        tuple(removed_garbage),
                        tuple(skipped),
                        tuple(errors),
                    )
                )
        finally:
            eng.close()
        return PruneReport(keep, dry_run, tuple(results), refused, dict(listing.unreachable))


def _each(items: Sequence[T], remove: Callable[[T], object], what: str, errors: list[str]) -> list[T]:
    """Call ``remove`` on each item in order; return the items it removed.

    A failure is noted in ``errors`` as ``"<what, formatted with the item>: <error>"``, and the
    next item is still tried: one undeletable key must not keep the others.
    """
    done: list[T] = []
    for item in items:
        try:
            remove(item)
            done.append(item)
        except FAILURES as exc:
            errors.append(f"{what.format(item)}: {exc}")
    return done
