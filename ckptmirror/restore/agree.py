"""The several-ranks half of a restore: share commit records, vote on a step, fall back together.

With several ranks, :func:`~ckptmirror.restore.choose.load_newest` settles with the other ranks
on the newest step every one of them can recover (:func:`load_agreed`), after sharing the commit
records that only some ranks' replicas hold (:func:`pool_commits`); if any rank's load fails,
they all move on to an older step together, so that no two ranks resume from different steps.
Every vote carries what the rank saw (damage, an outage, running out of memory), so that every
rank reaches the same conclusion and raises the same kind of error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import ManifestError, NoValidCheckpointError, ReplicaUnavailableError, StateMismatchError
from ..format import CommitRecord, RankManifest, commit_key, parse_commit
from .fetch import STEP_FAILURES, Fetcher, ObjectPlan, is_damage, out_of_memory
from .fill import Loaded
from .outcome import OUTAGE_FIX, out_of_memory_error, unreadable_steps

log = logging.getLogger("ckptmirror")

#: What probing a step yields: its commit record, this rank's manifest and where each object is.
Probed = tuple[CommitRecord, RankManifest, ObjectPlan]


#: At most this many steps that some rank's replicas hold a commit record of and another's do
#: not are shared between the ranks of a restore (newest first).
POOLED_STEPS = 8


def pool_commits(
    reader: Fetcher,
    committed: Mapping[int, Sequence[str]],
    candidates: list[int],
    agree: Callable[[str, Any], list[Any]],
    rank: int,
    step: int | None,
    given: dict[int, CommitRecord],
) -> list[int]:
    """The candidate steps of a several-ranks restore, with the steps that only other ranks'
    replicas hold a commit record of; their records go into ``given``.

    With node-local replicas each rank lists its own node's disk: a rank killed between the
    commit decision and writing its copy of the record leaves the step committed on the other
    nodes only, while its own manifest and objects are durable. The step is recoverable (the
    record pins every rank's manifest by checksum, and a rank reads its own from any replica),
    so the ranks share those records instead of each voting from its own listing; the restore
    used to settle on the step before, and the next save of that step was refused on some ranks
    only. The lowest rank that holds a record sends it, so every rank that lacks it takes the
    same one.
    """
    held = [set(h) for h in agree("steps", candidates)]
    everyone = set().union(*held)
    if step is not None:
        everyone &= {step}
    lacking = sorted((s for s in everyone if any(s not in h for h in held)), reverse=True)[:POOLED_STEPS]
    mine: dict[str, str] = {}
    for s in lacking:
        first = next(i for i, h in enumerate(held) if s in h)
        if s in committed and first == rank:
            try:
                mine[str(s)] = reader.read_commit(s, committed[s]).to_json().decode()
            except STEP_FAILURES as exc:
                log.warning("step %d: could not read its commit record for the other ranks: %s", s, exc)
    for records in agree("commits", mine):
        for key, text in records.items():
            s = int(key)
            if s in committed or s in given:
                continue
            try:
                given[s] = parse_commit(text.encode(), commit_key(s))
            except ManifestError as exc:
                log.warning("step %d: the commit record another rank sent does not parse: %s", s, exc)
    if given:
        log.info("steps %s are committed only on other ranks' replicas; this rank reads them too", sorted(given))
    return sorted(set(candidates) | set(given), reverse=True)


def _voted(exc: BaseException) -> bool:
    """Whether a rank takes ``exc`` to the ranks' vote rather than raising it alone: a step that
    failed (:data:`STEP_FAILURES`) or out of memory of any kind (the other ranks wait for the vote)."""
    return isinstance(exc, STEP_FAILURES) or out_of_memory(exc)


def load_agreed(
    candidates: list[int],
    problems: dict[int, str],
    probe: Callable[[int], Probed],
    load: Callable[[Probed], Loaded],
    rank: int,
    step: int | None,
    agree: Callable[[str, Any], list[Any]],
    some_down: bool = False,
    unreachable: dict[str, str] | None = None,
    urls: Sequence[str] = (),
) -> Loaded | None:
    """The several-ranks half of :func:`load_newest`: vote on a step, load it, fall back together.

    ``probe(step)`` checks a step on this rank; ``load(probed)`` fills it (as one rank does).
    Every vote carries whether the rank saw damage (a copy that failed its checks) and whether
    it could not list some of its replicas (``some_down``), so that every rank raises the same kind of error: damage
    anywhere gives :class:`NoValidCheckpointError`, outages alone :class:`ReplicaUnavailableError`.
    """
    bound = candidates[0] if candidates else -1
    failures: list[BaseException] = []
    damaged = False  # some rank saw damage (from the votes: the same on every rank)

    def give_up(note: str = "") -> BaseException:
        if damaged:
            return NoValidCheckpointError(problems, replicas=urls, note=note)
        if note:
            problems[-1] = note
        return unreadable_steps(problems, failures)

    damaged_at: set[int] = set()  # steps this rank found damaged (a copy failed its checks)
    # Steps some rank found damaged, from the votes: the same set on every rank. Those newer
    # than the step restored go on ``Loaded.skipped``: the job trains them again, and every rank
    # may save them again (the mirror replaces the damaged copies, see Fanout.write).
    agreed_damaged: set[int] = set()
    for rnd in range(len(candidates) * 2 + 2):
        mine, error = -1, None
        outage_at: int | None = None  # the step this rank could not read this round (not damage)
        oom_at: int | None = None  # the step this rank ran out of memory reading this round
        found: tuple[int, CommitRecord, RankManifest, ObjectPlan] | None = None
        for s in (c for c in candidates if c <= bound):
            try:
                found = (s, *probe(s))
                mine = s
                break
            except StateMismatchError as exc:
                error = str(exc)
                break
            except Exception as exc:  # noqa: BLE001 - see _voted
                if not _voted(exc):
                    raise
                log.warning("step %d cannot be restored on rank %d: %s", s, rank, exc)
                problems[s] = f"rank {rank}: {type(exc).__name__}: {exc}"
                failures.append(exc)
                if is_damage(exc):
                    damaged_at.add(s)
                elif out_of_memory(exc):
                    oom_at = s
                    break  # no older step either: see the load's vote below
                else:
                    outage_at = s
                    break  # could not be read (not damage): no older step, see load_newest
        vote = {
            "step": mine,
            "any": bool(candidates),
            "error": error,
            "down": some_down,
            "damage": any(is_damage(e) for e in failures),
            "outage_at": outage_at,
            "damaged_at": sorted(damaged_at),
            "oom_at": oom_at,
        }
        votes = agree(f"probe{rnd}", vote)
        errors = [f"rank {r}: {v['error']}" for r, v in enumerate(votes) if v["error"]]
        if errors:
            raise StateMismatchError("; ".join(errors))
        oom = {r: v["oom_at"] for r, v in enumerate(votes) if v.get("oom_at") is not None}
        if oom:
            raise out_of_memory_error(sorted(oom), max(oom.values()), failures[-1] if oom_at is not None else None)
        damaged = damaged or any(v.get("damage") for v in votes)
        # A step some rank could not read (not damage) may be intact: every rank raises rather
        # than rewind, unless another rank found that step damaged (then no rank can restore
        # it whatever the outage, and the ranks look below it).
        seen_damaged = {s for v in votes for s in v.get("damaged_at", ())}
        agreed_damaged |= seen_damaged
        stuck = {r: v["outage_at"] for r, v in enumerate(votes) if v.get("outage_at") is not None}
        blocking = sorted(r for r, s in stuck.items() if s not in seen_damaged)
        if blocking:
            raise unreadable_steps(problems, failures, f"rank(s) {blocking} could not read their replicas")
        if stuck:
            bound = min(stuck.values()) - 1
            continue
        if not any(v["any"] for v in votes):
            down = [r for r, v in enumerate(votes) if v.get("down")]
            if down:  # not "no checkpoint": some rank could not look
                raise ReplicaUnavailableError(
                    f"rank(s) {down} could not list some of their replicas and no rank found a committed step "
                    "on the others, so it is not known whether a checkpoint exists"
                    + (
                        f" ({'; '.join(f'{u}: {e}' for u, e in unreachable.items())})"
                        if some_down and unreachable
                        else ""
                    )
                    + f"; restore does not start from scratch when it cannot look: {OUTAGE_FIX}"
                )
            return None  # no rank sees any committed step: a fresh start
        steps = [v["step"] for v in votes]
        lo, hi = min(steps), max(steps)
        if lo < 0:
            lost = [r for r, v in enumerate(votes) if v["step"] < 0]
            why = "could not list some of their replicas" if all(votes[r].get("down") for r in lost) else ""
            raise give_up(f"rank(s) {lost} {why or 'cannot recover any step that the others can'}")
        if lo != hi:
            bound = lo  # someone cannot go that far: everyone looks at or below the lowest
            continue
        ok, why = True, ""
        assert found is not None and found[0] == lo
        try:
            loaded = load(found[1:])
        except Exception as exc:  # noqa: BLE001 - see _voted
            if not _voted(exc):
                raise
            ok, why = False, f"{type(exc).__name__}: {exc}"
            problems[lo] = f"rank {rank}: {why}"
            failures.append(exc)
        try:
            results = agree(
                f"load{rnd}",
                {
                    "ok": ok,
                    "why": why,
                    "damage": any(is_damage(e) for e in failures),
                    "damaged_now": not ok and is_damage(failures[-1]),
                    "outage": not ok and not is_damage(failures[-1]) and not out_of_memory(failures[-1]),
                    "oom": not ok and out_of_memory(failures[-1]),
                },
            )
        except BaseException:
            if ok:
                loaded.abandon()  # the ranks cannot agree (a peer died): this rank keeps its tensors
            raise
        oom_ranks = [r for r, v in enumerate(results) if v.get("oom")]
        if oom_ranks:
            if ok:
                loaded.abandon()
            raise out_of_memory_error(oom_ranks, lo, failures[-1] if not ok and out_of_memory(failures[-1]) else None)
        damaged = damaged or any(v.get("damage") for v in results)
        outage = [r for r, v in enumerate(results) if v.get("outage")]
        if outage and not any(v.get("damaged_now") for v in results):  # see the probe's vote
            if ok:
                loaded.abandon()
            raise unreadable_steps(problems, failures, f"rank(s) {outage} could not read their replicas")
        if all(v["ok"] for v in results):
            if lo != candidates[0]:
                log.warning("all ranks restored step %d (newer steps could not be restored everywhere)", lo)
            loaded.skipped = tuple(sorted((s for s in agreed_damaged if s > lo), reverse=True))
            return loaded
        if any(v.get("damaged_now") for v in results):
            agreed_damaged.add(lo)
        failed = {r: v["why"] for r, v in enumerate(results) if not v["ok"]}
        log.warning("step %d failed to load on rank(s) %s; all ranks fall back together", lo, sorted(failed))
        if ok:
            loaded.abandon()  # this rank's load worked, but the ranks must not mix steps
        for r, w in failed.items():
            problems.setdefault(lo, f"rank {r}: {w}")
        if step is not None:
            raise give_up()
        bound = lo - 1
    raise give_up()
