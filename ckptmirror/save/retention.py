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
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ..errors import CkptMirrorError
from ..format import commit_key, parse_step_dir, step_dir
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


def remove_step(replica: Replica, step: int) -> None:
    """Delete a step: the commit first, so that the step stops existing before its objects go."""
    replica.delete(commit_key(step))
    replica.delete_prefix(step_dir(step))


def remove_torn(replica: Replica, step: int) -> None:
    """Delete everything an interrupted save of ``step`` left (it has no commit record)."""
    replica.delete_prefix(step_dir(step))


def delete_quietly(replica: Replica, keys: list[str]) -> None:
    """Delete ``keys``, logging (not raising) failures: what stays is garbage ``prune`` removes."""
    for k in keys:
        try:
            replica.delete(k)
        except (CkptMirrorError, OSError) as exc:
            log.warning("could not delete %s on %s: %s (prune removes it later)", k, replica.url, exc)


def apply_retention(replica: Replica, newest: int, keep_last: int | None, pinned: Collection[int] = ()) -> list[int]:
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
    for s in plan.torn:
        remove_torn(replica, s)
    for s in plan.drop:
        remove_step(replica, s)
    return sorted(plan.torn + plan.drop)
