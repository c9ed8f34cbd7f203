"""``verify`` beside a job that saves: steps that retention removed, or that committed, during the check.

:func:`~ckptmirror.ops.verify.verify` lists the steps once, then checks them for seconds or
minutes. A training job that saves meanwhile changes what is there: its ``keep_last`` retention
(or a ``prune``) deletes old steps, commit record first, then their objects; a save commits a new
step on one replica after another. Judged by the listing alone, a deleted step looks damaged
(objects missing) and a step that committed on a replica after the listing looks lagging there.

So, before any of that is reported, the replicas concerned are asked once more whether the step
is committed there now (one small request per replica and step with a problem):

- its commit record is gone where a problem was found: the step was removed during the check,
  which is not damage (its problems there are dropped), but for damaged bytes of a file that
  outlives the step (an object it referenced in an older step's directory, which the steps that
  stay reference too: still reported); when no replica holds it any more, the step leaves the
  report;
- a replica that lacked the step (lagging) holds its commit record now: the step committed
  there during the check, and that copy is checked once, like the others;
- a lagging replica of a step that no replica holds committed any more is not behind: the step
  was removed;
- a replica that lacks the step while another still holds it committed is not behind either if
  its copy is what retention leaves (it deletes the commit record first, then the files no other
  step there references, one replica after another): files gone since the listing and none
  added. Its copy was removed. Nor if files were added to its copy since the listing: a save
  is writing it there (the commit record comes last), ``saving``. A copy that did not change
  during the check lags, also where what is left is only files later steps reference (a prune
  of that replica alone): ``repair`` completes it, and verify says so (exit 3).

Where a replica lags, the second look comes at least :data:`FIRST_SAVE_SETTLE_S` after the
listing: a check shorter than that would see too little of what a save or a retention does.

A first save (nothing committed anywhere at the listing) that commits during the check is
checked too (:func:`committed_since`), and one that gains files during the check without a
commit yet is a save in progress (:func:`files_of`), not an interrupted one.

A replica that stopped answering is not asked (what it holds stays unavailable), and one that
cannot answer this question keeps what was found.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import ReplicaUnavailableError
from ..format import commit_key, step_dir
from ..replicas import Replica
from ._common import FAILURES, strip_where
from ._engine import Engine, ReplicaPlan, plan_problems

#: With nothing committed anywhere, how long after the listing verify looks again at the torn
#: saves (:func:`first_save`): a save in progress writes files or commits within it.
FIRST_SAVE_SETTLE_S = 1.0


@dataclass
class Recheck:
    """What asking again changed for one step."""

    #: the plans that still stand (the replicas that hold the step's commit now, re-checked ones included)
    plans: list[ReplicaPlan]
    #: replicas whose commit record of the step went away during the check (retention, prune)
    removed: list[str] = field(default_factory=list)
    #: replicas that lacked the step at the listing and hold its commit now (their plans are in ``plans``)
    committed: list[str] = field(default_factory=list)
    #: replicas whose copy (no commit record yet) gained files during the check: a save writing it
    saving: list[str] = field(default_factory=list)

    @property
    def gone(self) -> bool:
        """The step was removed from every replica that held it: nothing of it to report."""
        return bool(self.removed) and not self.plans


def committed_now(eng: Engine, r: Replica, step: int) -> bool | None:
    """Whether ``r`` holds the commit record of ``step`` now; None if it could not tell. A
    replica that stopped answering is noted down on ``eng`` (not asked again in this run)."""
    if r.url in eng.down:
        return None
    try:
        return r.size(commit_key(step)) is not None
    except ReplicaUnavailableError as exc:
        eng.down.setdefault(r.url, strip_where(str(exc), r.url, commit_key(step))[:300])
        return None
    except FAILURES:
        return None


def _suspect(plan: ReplicaPlan) -> bool:
    """Whether ``plan`` found something that a step removed during the check would explain."""
    return any(p.kind != "unavailable" for p in plan_problems(plan))


def _torn_copy(r: Replica, step: int, before: frozenset[str] | None) -> str | None:
    """What ``r``'s copy of ``step``, without a commit record now, is becoming: ``removed``
    (retention, which deletes the commit record first: files gone since the listing and none
    added), ``saving`` (a save writing it: files added since the listing, ``before``), or None
    (unchanged: lagging, also where what is left is only files later steps reference: a prune
    of this replica alone leaves it behind the others, and ``repair`` completes it). None too
    when ``r`` cannot tell."""
    try:
        now = frozenset(r.list_prefix(step_dir(step)))
        if before is not None and now != before:
            return "saving" if now - before else "removed"
        return None
    except FAILURES:
        return None


#: Problems that say what a file holds is wrong (not that it is absent or unreadable).
_CONTENT_DAMAGE = ("corrupt", "truncated", "wrong-size")


def _lasting_damage(eng: Engine, plan: ReplicaPlan) -> bool:
    """Keep only the problems of ``plan`` (a step removed during the check) that outlive it:
    damaged bytes of a file in an older step's directory that is still there, an object the
    removed step referenced (incremental saves) and the steps that stay reference too. Returns
    whether any is left. A file the step's removal deleted explains its problem; this one
    does not, and verify must not call the run "ok" for having found it through a step that
    went (a verify slower than the saves finds every damage that way)."""
    r, own = plan.replica, step_dir(plan.step) + "/"
    lasting = False
    for rp in plan.ranks:
        rp.manifest_problem = rp.invalid = None
        for j in rp.jobs:
            if j.problem is None:
                continue
            keep = False
            if j.problem.kind in _CONTENT_DAMAGE:
                try:
                    st = eng.single[r.url].stored(r, j.obj)
                    keep = not st.key.startswith(own) and r.size(st.key) is not None
                except FAILURES:
                    keep = False
            if keep:
                lasting = True
            else:
                j.problem = None
    plan.commit_problem = None
    return lasting


def recheck(
    eng: Engine,
    step: int,
    plans: Sequence[ReplicaPlan],
    lagging: Sequence[str],
    before: Mapping[tuple[str, int], frozenset[str]],
) -> Recheck:
    """Ask again whether ``step`` is committed where ``plans`` found problems, and, where some
    replicas lag (``lagging``: their URLs), on every replica; see the module docstring.
    ``before``: the keys of the lagging torn copies at the listing (:func:`files_of`).
    Replicas that now hold a commit they lacked are checked here (objects read on ``eng``)."""
    suspects = [p for p in plans if _suspect(p)]
    if not suspects and not lagging:
        return Recheck(list(plans))
    by_url = {r.url: r for r in eng.replicas}
    asked = plans if lagging else suspects
    now = {p.replica.url: committed_now(eng, p.replica, step) for p in asked if p.replica.url not in eng.down}
    removed = [u for u, held in now.items() if held is False]
    # Damage that outlives the removed step is still reported, under that step.
    removed = [u for u in removed if not any(p.replica.url == u and _lasting_damage(eng, p) for p in plans)]
    out = Recheck([p for p in plans if p.replica.url not in removed], removed)
    if not out.plans:
        return out  # removed everywhere: a lagging copy of it is nothing to complete
    for url in lagging:
        r = by_url.get(url)
        if r is None or url in eng.down:
            continue
        held = committed_now(eng, r, step)
        if held is False:
            becoming = _torn_copy(r, step, before.get((url, step)))
            if becoming == "removed":
                out.removed.append(url)  # retention got there first; the others will follow
            elif becoming == "saving":
                out.saving.append(url)  # its commit record comes once its files are written
        if held is not True:
            continue
        plan = eng.replica_plan(r, step)
        eng.run(plan.jobs(), "verify: steps committed during the check")
        if _suspect(plan) and committed_now(eng, r, step) is False:
            out.removed.append(url)  # committed, then removed by retention before it was read
            continue
        out.plans.append(plan)
        out.committed.append(url)
    return out


def settle(listed_at: float) -> None:
    """Wait until :data:`FIRST_SAVE_SETTLE_S` after the listing (``listed_at``, monotonic): a
    check shorter than that would see too little of what a save or a retention is doing."""
    wait = FIRST_SAVE_SETTLE_S - (time.monotonic() - listed_at)
    if wait > 0:
        time.sleep(wait)


def committed_since(eng: Engine, steps: Sequence[int]) -> dict[int, list[ReplicaPlan]]:
    """Of ``steps`` (torn everywhere at the listing), those committed on some replica now, each
    with its plans there, checked: a save that committed during the check."""
    out: dict[int, list[ReplicaPlan]] = {}
    for s in steps:
        holders = [r for r in eng.replicas if r.url not in eng.down and committed_now(eng, r, s) is True]
        if not holders:
            continue
        plans = [eng.replica_plan(r, s) for r in holders]
        eng.run([j for p in plans for j in p.jobs()], "verify: steps committed during the check")
        out[s] = plans
    return out


def files_of(replicas: Sequence[Replica], steps: Mapping[str, Sequence[int]]) -> dict[tuple[str, int], frozenset[str]]:
    """(replica URL, step) -> the keys under the step there, for the ``steps`` of each replica;
    a replica that cannot list one is left out. Compared before and after a check, a change
    tells a save in progress from an interrupted one."""
    out: dict[tuple[str, int], frozenset[str]] = {}
    for r in replicas:
        for s in steps.get(r.url, ()):
            try:
                out[(r.url, s)] = frozenset(r.list_prefix(step_dir(s)))
            except FAILURES:
                continue
    return out


def first_save(
    eng: Engine,
    torn: Mapping[str, Sequence[int]],
    before: Mapping[tuple[str, int], frozenset[str]],
    listed_at: float,
) -> tuple[dict[int, list[ReplicaPlan]], dict[str, list[int]]]:
    """Nothing was committed anywhere at the listing, only ``torn`` saves (replica URL -> steps)
    whose keys were ``before`` (:func:`files_of`, at ``listed_at``, a monotonic time). At least
    :data:`FIRST_SAVE_SETTLE_S` after the listing, look again: the steps committed since (each
    with its plans, checked: :func:`committed_since`), else replica URL -> the torn steps that
    gained files (a save in progress, not an interrupted one; files only removed are a torn save
    being deleted: ``prune --all-torn``, a failed save's cleanup)."""
    settle(listed_at)
    since = committed_since(eng, sorted({s for v in torn.values() for s in v}))
    if since:
        return since, {}
    moving: dict[str, list[int]] = {}
    for (url, s), keys in sorted(files_of(eng.replicas, torn).items()):
        if (url, s) in before and keys - before[(url, s)]:
            moving.setdefault(url, []).append(s)
    return {}, moving
