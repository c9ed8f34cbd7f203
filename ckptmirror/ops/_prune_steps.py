"""``prune``'s removals on one replica: torn saves told from directories kept for references,
the removals in their order, and how a replica that stops answering ends them.

Apart from :mod:`.prune` (the plan and the report) to keep each module readable.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

from ..errors import CkptMirrorError
from ..format import step_dir
from ..replicas import Replica
from ..save.retention import OUTAGES, PlacementUnreadable, is_committed, placement_refs, remove_step, remove_torn
from ._common import FAILURES

T = TypeVar("T")


class CommittedMeanwhile(CkptMirrorError):
    """A torn step prune removed turned out committed right after (see :func:`removals`)."""


class Down(Exception):
    """An outage an earlier read noted (the engine's ``down``: its text): the replica is not
    asked again."""


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica is out (:data:`~ckptmirror.save.retention.OUTAGES`: no
    answer, a missed time budget), not that one key is bad: then it is asked nothing more."""
    return isinstance(exc, OUTAGES)


def outage_text(r: Replica, exc: BaseException) -> str:
    """One line for the outage ``exc`` of ``r``, without the replica's name (the report has it)."""
    text = str(exc)
    for prefix in (f"replica {r.url}, ", f"replica {r.url}: "):
        text = text[len(prefix) :] if text.startswith(prefix) else text
    return text if isinstance(exc, Down) else f"{type(exc).__name__}: {text}"


def split_torn(
    r: Replica, torn: Sequence[int], refs: Collection[str], errors: list[str]
) -> tuple[list[int], dict[int, list[str]]]:
    """Split ``torn`` (steps without a commit record on ``r`` that this prune removes) into the
    torn saves indeed, and the directories that keep objects the steps that stay reference
    (``refs``: :func:`~ckptmirror.save.retention.placement_refs`; step -> its other files:
    leftovers). A directory that cannot be listed is kept and noted in ``errors``; an outage is
    raised (the caller stops asking ``r``)."""
    really: list[int] = []
    for_refs: dict[int, list[str]] = {}
    for s in torn:
        try:
            keys = r.list_prefix(step_dir(s))
        except FAILURES as exc:
            if is_outage(exc):
                raise
            errors.append(f"listing torn step {s}: {exc}")
            continue
        if any(k in refs for k in keys):
            for_refs[s] = [k for k in keys if k not in refs]
        else:
            really.append(s)
    return really, for_refs


def removals(
    rm: Remover, r: Replica, drop: Sequence[int], torn: Sequence[int], garbage: Sequence[str]
) -> tuple[list[int], list[int], list[str], list[int]]:
    """Remove committed steps ``drop`` (oldest first; the commit record first, then the files),
    torn saves ``torn`` and the keys ``garbage`` from ``r``. Returns what went of each, and the
    steps left alone because they had a commit record again right before their files would go
    (a ``repair`` or a save committed them meanwhile)."""
    meanwhile: list[int] = []

    # raise_unreadable: a step whose files a placement record that cannot be read made stay is
    # not removed, and the report must say so (the plan checked those records; this is a race).
    def step(s: int) -> None:
        if not remove_step(r, s, raise_unreadable=True):
            meanwhile.append(s)

    def torn_one(s: int) -> None:
        if not remove_torn(r, s, raise_unreadable=True):
            meanwhile.append(s)
        elif is_committed(r, s):
            # Committed between the check before the delete and the delete (a repair): that
            # commit now stands over removed files. Repair looks again after its commit and
            # takes it back; should it have looked first, this says so.
            raise CommittedMeanwhile(
                f"step {s} got a commit record while its files were removed (a 'ckptmirror repair' "
                "at the same time?): run 'ckptmirror verify', then 'ckptmirror repair'"
            )

    steps = [s for s in rm.each(drop, step, "removing step {}") if s not in meanwhile]
    # Newest first: a torn save's placement may reference an older torn directory's files.
    torn_done = sorted(s for s in rm.each(list(torn)[::-1], torn_one, "removing torn step {}") if s not in meanwhile)
    if meanwhile and rm.halted is None:
        # A step committed meanwhile stays, and with it what its placement records reference:
        # the planned leftovers were judged without them (a directory kept for references).
        try:
            refs = placement_refs(r, meanwhile)
        except FAILURES as exc:
            refs = PlacementUnreadable(r.url, step_dir(meanwhile[0]), exc)
        if isinstance(refs, PlacementUnreadable):
            rm.errors.append(f"leftovers kept: steps {meanwhile} were committed meanwhile and {refs}")
            garbage = []
        else:
            garbage = [k for k in garbage if k not in refs]
    garbage_done = rm.each(garbage, r.delete, "removing {}")
    return steps, torn_done, garbage_done, sorted(meanwhile)


class Remover:
    """Removals on one replica, in order; a failure is noted in ``errors`` as
    ``"<what, formatted with the item>: <error>"`` and the next item is still tried (one
    undeletable key must not keep the others), but after an outage (:func:`is_outage`: the
    replica does not answer) nothing more is tried there: each try would wait a whole time
    budget. ``halted``: that outage, as one line (None while the replica answers)."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        self.halted: str | None = None

    def each(self, items: Sequence[T], remove: Callable[[T], object], what: str) -> list[T]:
        """Call ``remove`` on each item in order; return the items it removed."""
        done: list[T] = []
        untried: list[T] = []
        for item in items:
            if self.halted is not None:
                untried.append(item)
                continue
            try:
                remove(item)
                done.append(item)
            except FAILURES as exc:
                self.errors.append(f"{what.format(item)}: {exc}")
                if is_outage(exc):
                    self.halted = f"{type(exc).__name__}: {exc}"
        if untried:
            self.errors.append(
                f"{what.format(untried[0])}"
                + (f" and {len(untried) - 1} more" if len(untried) > 1 else "")
                + ": not tried, the replica stopped answering"
            )
        return done
