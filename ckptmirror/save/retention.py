"""Retention: which steps a replica keeps, and removing the others safely.

The last stage of the save path, and the one policy shared by the automatic clean-up after
each save (``Mirror(keep_last=...)``) and by ``ckptmirror prune``:

- the newest committed step (or the step just committed, for a save) and anything newer are
  never touched: a newer step may be a save in progress;
- of the older committed steps, ``keep - 1`` are kept (the newest one counts as the first);
- torn saves (a step directory without a commit record) older than the newest committed step
  are leftovers of interrupted saves and go; newer ones may still be in progress and stay
  unless the caller says otherwise (``prune --all-torn``).

A step is removed commit record first, so it stops existing for readers before its objects go.

Incremental saves (format version 3) make a step's objects outlive its commit record: a later
step's placement record (:mod:`ckptmirror.placement`) may reference an object stored under an
earlier step's name. Removal therefore never deletes a file that a placement record in a step
directory that stays references (:func:`protected_keys`), nor one a save of this process has
in flight (``live``). If a placement that stays cannot be read, nothing but commit records is
deleted in that pass: a file left behind is garbage a later pass removes; a file deleted too
early would be a committed step's missing object. The order, and the kill tests behind it, are
in docs/FORMAT.md ("Incremental saves").
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ..errors import CkptMirrorError, ManifestError
from ..format import commit_key, parse_step_dir, step_dir
from ..placement import MAX_PLACEMENT_BYTES, is_placement_key, parse_placement
from ..replicas.base import Replica

log = logging.getLogger("ckptmirror")


@dataclass(frozen=True)
class RetentionPlan:
    """What retention does on one replica."""

    drop: tuple[int, ...]  # committed steps to remove, oldest first
    torn: tuple[int, ...]  # torn steps to remove
    torn_kept: tuple[int, ...]  # torn steps left alone (newer than the newest committed one)


def plan_retention(
    committed: Sequence[int],
    torn: Sequence[int],
    keep: int | None,
    *,
    newest: int | None = None,
    all_torn: bool = False,
    pinned: Collection[int] = (),
) -> RetentionPlan:
    """The retention policy, on step numbers alone (no I/O).

    ``newest`` is the step that counts as the newest committed one (default: the largest of
    ``committed``); it and every step above it are kept. ``keep=None`` keeps every committed step.
    ``pinned`` steps are kept too and do not count towards ``keep`` (a framework's "best" checkpoint).
    """
    if newest is None and committed:
        newest = max(committed)
    older = sorted(s for s in committed if newest is not None and s < newest and s not in pinned)
    drop = older[: max(0, len(older) - (keep - 1))] if keep is not None else []
    gone = [s for s in sorted(torn) if all_torn or (newest is not None and s < newest)]
    return RetentionPlan(tuple(drop), tuple(gone), tuple(s for s in sorted(torn) if s not in gone))


def is_committed(replica: Replica, step: int) -> bool:
    """Whether ``step`` has a commit record on ``replica`` (presence only; readers verify)."""
    return replica.size(commit_key(step)) is not None


def protected_keys(replica: Replica, keep: Collection[int]) -> set[str] | None:
    """Keys in other steps' directories that the placement records of steps ``keep`` reference.

    None when one of those placement records cannot be read or parsed: the caller must then
    delete nothing that could be referenced (every file but commit records).
    """
    out: set[str] = set()
    for s in keep:
        for k in replica.list_prefix(step_dir(s)):
            if not is_placement_key(k):
                continue
            try:
                out |= parse_placement(replica.get(k, MAX_PLACEMENT_BYTES), k).references()
            except (ManifestError, OSError) as exc:
                log.warning(
                    "placement %s on %s is unreadable (%s): keeping every object this pass", k, replica.url, exc
                )
                return None
    return out


def remove_steps(
    replica: Replica, drop: Collection[int], torn: Collection[int] = (), live: Collection[str] = ()
) -> None:
    """Remove committed steps ``drop`` and torn steps ``torn`` from ``replica``.

    Commit records go first (each step stops existing before any of its files go); then every
    file of those step directories that no remaining step references (:func:`protected_keys`)
    and no save in flight uses (``live``: stored keys).
    """
    gone = set(drop) | set(torn)
    if not gone:
        return
    for s in sorted(drop):
        replica.delete(commit_key(s))
    remaining = [n for name in replica.list_steps() if (n := parse_step_dir(name)) is not None and n not in gone]
    protected = protected_keys(replica, remaining)
    if protected is None:
        return
    protected |= set(live)
    for s in sorted(gone):
        prefix = step_dir(s) + "/"
        if not any(k.startswith(prefix) for k in protected):
            replica.delete_prefix(step_dir(s))  # nothing of it is referenced: one call (a batch on S3)
            continue
        keep = [k for k in replica.list_prefix(step_dir(s)) if k in protected]
        delete_quietly(replica, [k for k in replica.list_prefix(step_dir(s)) if k not in protected])
        log.debug("step %d on %s: kept %d object(s) later steps reference", s, replica.url, len(keep))


def remove_step(replica: Replica, step: int, live: Collection[str] = ()) -> None:
    """Delete a step: the commit first, then its files that no other step references."""
    remove_steps(replica, [step], (), live)


def remove_torn(replica: Replica, step: int, live: Collection[str] = ()) -> None:
    """Delete what an interrupted save of ``step`` left (it has no commit record), but what
    other steps reference: a dropped step's directory keeps referenced objects and looks torn."""
    remove_steps(replica, (), [step], live)


def delete_quietly(replica: Replica, keys: list[str]) -> None:
    """Delete ``keys``, logging (not raising) failures: what stays is garbage ``prune`` removes."""
    for k in keys:
        try:
            replica.delete(k)
        except (CkptMirrorError, OSError) as exc:
            log.warning("could not delete %s on %s: %s (prune removes it later)", k, replica.url, exc)


def apply_retention(
    replica: Replica, newest: int, keep_last: int | None, pinned: Collection[int] = (), live: Collection[str] = ()
) -> list[int]:
    """After ``newest`` committed on ``replica``: apply :func:`plan_retention` to what is below
    it. Returns the steps deleted (committed and torn), ascending."""
    committed: list[int] = []
    torn: list[int] = []
    for name in replica.list_steps():
        s = parse_step_dir(name)
        if s is None or s >= newest:
            continue  # newer steps are not ours to judge (and are kept by the policy anyway)
        (committed if is_committed(replica, s) else torn).append(s)
    plan = plan_retention(committed, torn, keep_last, newest=newest, pinned=pinned)
    remove_steps(replica, plan.drop, plan.torn, live)
    return sorted(plan.torn + plan.drop)
