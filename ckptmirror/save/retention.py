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
early would be a committed step's missing object (``prune`` checks those records before it
deletes anything, and keeps the commit records too then: :class:`PlacementUnreadable`). The
order, and the kill tests behind it, are in docs/FORMAT.md ("Incremental saves").

The plan is made from a listing that can be old by the time files go: right before a step
directory's files are deleted its commit record is looked for once more, and a step that has one
now (a ``ckptmirror repair`` completing a lagging replica, a save) is left alone. Pinned steps
(``Mirror.pin``; their pin records, :func:`pinned_steps`, for ``prune``) are never planned for removal.

A pass stops at the first sign that the replica is out (:data:`OUTAGES`: an outage or a missed
time budget), or when the caller's ``stop`` says so (the mirror: the replica was marked degraded
meanwhile), and raises :class:`RetentionStopped` naming what it left: going on would cost a
full time budget per file, for deletes that lose nothing by waiting. What is left is garbage
that a later pass or ``ckptmirror prune`` removes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from ..errors import CkptMirrorError, ManifestError, ReplicaUnavailableError
from ..format import PINS_PREFIX, commit_key, parse_step_dir, pin_step, step_dir
from ..placement import MAX_PLACEMENT_BYTES, is_placement_key, parse_placement
from ..replicas.base import Replica

log = logging.getLogger("ckptmirror")

#: Errors that mean the replica is out (an outage, a missed time budget), not that one key is
#: bad: a removal pass stops at the first one instead of paying a budget for every file left.
OUTAGES: tuple[type[BaseException], ...] = (ReplicaUnavailableError, TimeoutError)

#: ``stop()`` of a removal pass: None to go on, or why to stop (asked before every delete).
Stop = Callable[[], str | None]


class RetentionStopped(ReplicaUnavailableError):
    """A removal pass stopped before it was done: the replica stopped answering (``cause``: the
    error), or the caller's ``stop`` said so (``cause``: its reason). ``left`` says what stays
    (garbage a later pass or ``ckptmirror prune`` removes); nothing that stays committed is touched."""

    def __init__(self, replica: str, left: str, cause: BaseException | str) -> None:
        self.left = left
        self.cause = cause
        if isinstance(cause, BaseException):
            why = f"{type(cause).__name__}: {_unprefixed(str(cause), replica)}"
        else:
            why = cause
        super().__init__(
            f"stopped removing old steps ({why}); left for a later pass or 'ckptmirror prune': {left}", replica=replica
        )


def _unprefixed(msg: str, url: str) -> str:
    """``msg`` without the ``replica URL, `` / ``replica URL: `` an error of that replica starts with."""
    for prefix in (f"replica {url}, ", f"replica {url}: "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _steps(steps: Sequence[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else "steps " + ", ".join(map(str, steps))


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


class PlacementUnreadable(CkptMirrorError):
    """A placement record of a step that stays (``key``, on ``replica``) cannot be read or
    parsed (``cause``): which files it references is unknown, so a removal kept every file but
    commit records. ``ckptmirror verify`` names the damage and ``ckptmirror repair`` mends it;
    the next pass removes what was kept."""

    def __init__(self, replica: str, key: str, cause: BaseException, kept: str = "") -> None:
        self.replica = replica
        self.key = key
        self.cause = cause
        what = f"{kept} kept: " if kept else ""
        super().__init__(
            f"{what}the placement record {key} on {replica} is unreadable "
            f"({type(cause).__name__}: {_unprefixed(str(cause), replica)}), so any file may be one it references; "
            f"run 'ckptmirror verify' and 'ckptmirror repair', then prune again"
        )


def placement_refs(
    replica: Replica, keep: Collection[int], *, raise_outage: bool = True
) -> set[str] | PlacementUnreadable:
    """Keys in other steps' directories that the placement records of steps ``keep`` reference,
    or the :class:`PlacementUnreadable` error of the first record that cannot be read or parsed
    (returned, not raised: the caller says what it kept). ``raise_outage``: an :data:`OUTAGES`
    error while reading a record is raised (the replica is out, not the record); an error of
    listing a directory always is."""
    out: set[str] = set()
    for s in keep:
        for k in replica.list_prefix(step_dir(s)):
            if not is_placement_key(k):
                continue
            try:
                out |= parse_placement(replica.get(k, MAX_PLACEMENT_BYTES), k).references()
            except (ManifestError, OSError) as exc:
                if raise_outage and isinstance(exc, OUTAGES):
                    raise
                return PlacementUnreadable(replica.url, k, exc)
    return out


def protected_keys(replica: Replica, keep: Collection[int], *, raise_outage: bool = False) -> set[str] | None:
    """Keys in other steps' directories that the placement records of steps ``keep`` reference.

    None when one of those placement records cannot be read or parsed (logged as a WARNING): the
    caller must then delete nothing that could be referenced (every file but commit records).
    ``raise_outage``: raise an :data:`OUTAGES` error while reading one instead (the replica is
    out, not the record).
    """
    refs = placement_refs(replica, keep, raise_outage=raise_outage)
    if isinstance(refs, PlacementUnreadable):
        log.warning(
            "placement %s on %s is unreadable (%s): keeping every object this pass", refs.key, replica.url, refs.cause
        )
        return None
    return refs


def pinned_steps(replica: Replica) -> set[int]:
    """Steps pinned on ``replica`` (``Mirror.pin``): the names of its pin records
    (:func:`~ckptmirror.format.pin_key`); their contents are not needed (a record that does not
    parse still pins its step: keeping a step by mistake loses nothing). Raises what listing raises."""
    return {s for k in replica.list_prefix(PINS_PREFIX) if (s := pin_step(k)) is not None}


def remove_steps(
    replica: Replica,
    drop: Collection[int],
    torn: Collection[int] = (),
    live: Collection[str] = (),
    stop: Stop | None = None,
    *,
    raise_unreadable: bool = False,
) -> list[int]:
    """Remove committed steps ``drop`` and torn steps ``torn`` from ``replica``.

    Commit records go first (each step stops existing before any of its files go); then every
    file of those step directories that no remaining step references (:func:`placement_refs`)
    and no save in flight uses (``live``: stored keys).

    Right before a directory's files go, its commit record is looked for once more: a step that
    has one now was committed since the caller listed it (a ``ckptmirror repair`` completing a
    lagging replica, a save) and is left alone. Returns those steps (usually none).

    When a placement record of a step that stays cannot be read, every file of ``drop`` and
    ``torn`` but the commit records is kept (any of them may be one it references): a WARNING
    names the record, or with ``raise_unreadable`` (``prune``, which must not report those steps
    removed) :class:`PlacementUnreadable` is raised.

    Raises :class:`RetentionStopped` at the first :data:`OUTAGES` error, or as soon as ``stop()``
    gives a reason (asked before every delete), naming what is left; a single file that cannot be
    deleted for another reason is logged and the pass goes on.
    """
    gone = sorted(set(drop) | set(torn))
    if not gone:
        return []
    commits = sorted(drop)
    state = {"commits": 0, "dirs": 0, "files": -1}  # progress, for what a stop leaves

    def left() -> str:
        parts: list[str] = []
        if state["commits"] < len(commits):
            parts.append(f"the commit record of {_steps(commits[state['commits'] :])} (still committed)")
        rest = gone[state["dirs"] :]
        if rest and state["files"] >= 0:
            parts.append(f"{state['files']} file(s) of step {rest[0]}")
            rest = rest[1:]
        if rest:
            parts.append(f"the files of {_steps(rest)}")
        return ", ".join(parts) or "nothing"

    def check_stop() -> None:
        why = stop() if stop is not None else None
        if why is not None:
            raise RetentionStopped(replica.url, left(), why)

    try:
        for s in commits:
            check_stop()
            replica.delete(commit_key(s))
            state["commits"] += 1
        remaining = [n for name in replica.list_steps() if (n := parse_step_dir(name)) is not None and n not in gone]
        refs = placement_refs(replica, remaining)
        if isinstance(refs, PlacementUnreadable):
            unreadable = PlacementUnreadable(replica.url, refs.key, refs.cause, kept=f"the files of {_steps(gone)}")
            if raise_unreadable:
                raise unreadable
            log.warning("%s", unreadable)  # what a later pass removes once the record is repaired
            return []
        protected = refs | set(live)
        meanwhile: list[int] = []
        for s in gone:
            check_stop()
            if is_committed(replica, s):
                # Committed since the caller listed it (a repair, a save): a step now, not ours.
                log.info("step %d on %s has a commit record now (a repair or a save): left alone", s, replica.url)
                meanwhile.append(s)
                state["dirs"] += 1
                continue
            prefix = step_dir(s) + "/"
            if not any(k.startswith(prefix) for k in protected):
                replica.delete_prefix(step_dir(s))  # nothing of it is referenced: one call (a batch on S3)
                state["dirs"] += 1
                continue
            keys = replica.list_prefix(step_dir(s))
            doomed = [k for k in keys if k not in protected]
            state["files"] = len(doomed)
            n_left, outage = _delete_each(replica, doomed, stop)
            if outage is not None:
                state["files"] = n_left
                raise RetentionStopped(replica.url, left(), outage)
            state["dirs"] += 1
            state["files"] = -1
            log.debug("step %d on %s: kept %d object(s) later steps reference", s, replica.url, len(keys) - len(doomed))
    except OUTAGES as exc:
        if isinstance(exc, RetentionStopped):
            raise
        raise RetentionStopped(replica.url, left(), exc) from exc
    return meanwhile


def remove_step(
    replica: Replica,
    step: int,
    live: Collection[str] = (),
    stop: Stop | None = None,
    *,
    raise_unreadable: bool = False,
) -> bool:
    """Delete a step: the commit first, then its files that no other step references. False
    if it was left alone: committed again meanwhile (:func:`remove_steps`)."""
    return not remove_steps(replica, [step], (), live, stop, raise_unreadable=raise_unreadable)


def remove_torn(
    replica: Replica,
    step: int,
    live: Collection[str] = (),
    stop: Stop | None = None,
    *,
    raise_unreadable: bool = False,
) -> bool:
    """Delete what an interrupted save of ``step`` left (it has no commit record), but what
    other steps reference: a dropped step's directory keeps referenced objects and looks torn.
    False if it was left alone: it has a commit record now (a repair or a save committed it)."""
    return not remove_steps(replica, (), [step], live, stop, raise_unreadable=raise_unreadable)


def _delete_each(replica: Replica, keys: Sequence[str], stop: Stop | None) -> tuple[int, BaseException | str | None]:
    """Delete ``keys`` one by one. A key that fails for its own reasons is logged and skipped; an
    :data:`OUTAGES` error, or a reason from ``stop()``, ends the loop at once.

    Returns ``(0, None)`` when every key was tried, else (how many keys are left, the outage or reason).
    """
    for i, k in enumerate(keys):
        why = stop() if stop is not None else None
        if why is not None:
            return len(keys) - i, why
        try:
            replica.delete(k)
        except OUTAGES as exc:
            return len(keys) - i, exc
        except (CkptMirrorError, OSError) as exc:
            log.warning("could not delete %s on %s: %s (prune removes it later)", k, replica.url, exc)
    return 0, None


def delete_quietly(replica: Replica, keys: list[str]) -> int:
    """Delete ``keys``, logging (not raising) failures: what stays is garbage ``prune`` removes.

    Stops at the first :data:`OUTAGES` error (one log line says how many files it left) instead of
    waiting a time budget per file. Returns the number of keys left undeleted by such a stop.
    """
    n_left, outage = _delete_each(replica, keys, None)
    if outage is not None:
        msg = _unprefixed(str(outage), replica.url)
        log.warning(
            "stopped deleting on %s: %s: %s; %d of %d file(s) left for a later pass or 'ckptmirror prune'",
            replica.url,
            type(outage).__name__,
            msg,
            n_left,
            len(keys),
        )
    return n_left


def apply_retention(
    replica: Replica,
    newest: int,
    keep_last: int | None,
    pinned: Collection[int] = (),
    live: Collection[str] = (),
    stop: Stop | None = None,
) -> list[int]:
    """After ``newest`` committed on ``replica``: apply :func:`plan_retention` to what is below
    it. Returns the steps deleted (committed and torn), ascending. Raises
    :class:`RetentionStopped` when the replica stops answering or ``stop()`` gives a reason
    (:func:`remove_steps`)."""
    committed: list[int] = []
    torn: list[int] = []
    try:
        for name in replica.list_steps():
            s = parse_step_dir(name)
            if s is None or s >= newest:
                continue  # newer steps are not ours to judge (and are kept by the policy anyway)
            (committed if is_committed(replica, s) else torn).append(s)
    except OUTAGES as exc:
        raise RetentionStopped(replica.url, "every old step (nothing was deleted)", exc) from exc
    plan = plan_retention(committed, torn, keep_last, newest=newest, pinned=pinned)
    meanwhile = remove_steps(replica, plan.drop, plan.torn, live, stop)
    return sorted(s for s in plan.torn + plan.drop if s not in meanwhile)
