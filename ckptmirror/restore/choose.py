"""Choosing the step to restore: newest first, falling back, and agreeing across ranks.

The orchestrator of the read path. The committed steps found by
:mod:`~ckptmirror.restore.discover` are tried newest first; each is probed through a
:class:`~ckptmirror.restore.fetch.Fetcher` (commit readable, this rank's manifest verified,
every object present somewhere with its size: one preflight per step) and loaded by
:func:`~ckptmirror.restore.fill.fill_step`.
A step that fails with damage (:func:`~ckptmirror.restore.fetch.is_damage`: a copy that failed
its checks, missing everywhere, ``EIO``) is skipped with a warning naming what was wrong, and the
previous step is tried; one that could not be read for another reason (an outage, a permission)
ends the restore instead: it may be intact, and an older step would rewind the run. Checkpoints that exist but
none of which verifies raise :class:`NoValidCheckpointError` (damage: some copy failed its
checks). When no step failed that way, only because no replica holding it could be reached or
read, the error is a :class:`ReplicaUnavailableError` that says so and what to do; the same when
no replica can even be listed. Running out of memory (``ENOMEM``) is raised as it is, at once:
an older step would not fix it.

Within one restore a replica that raised :class:`ReplicaUnavailableError` (a missed time
budget, a refused connection) is not asked again (``Fetcher(skip_unavailable=True)``): a
stalled or slow replica costs one time budget, not one per object, and ``on_unavailable`` hears
of it (the mirror's replica health).

With several ranks, the ranks settle on the newest step that every one of them can recover,
and if any rank's load fails they all move on to an older step together, so that no two
ranks resume from different steps.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import config
from ..errors import (
    ManifestError,
    NoValidCheckpointError,
    ReplicaConfigError,
    ReplicaUnavailableError,
    StateMismatchError,
    StepNotFoundError,
)
from ..format import CommitRecord, RankManifest, commit_key, parse_commit
from ..progress import Progress
from ..replicas.base import Replica
from .check import validate_manifest
from .discover import list_steps
from .fetch import STEP_FAILURES, Fetcher, ObjectPlan, OnUnavailable, is_damage, out_of_memory
from .fill import Loaded, fill_step
from .undo import BufferFactory

#: What probing a step yields: its commit record, this rank's manifest and where each object is.
Probed = tuple[CommitRecord, RankManifest, ObjectPlan]

log = logging.getLogger("ckptmirror")

#: The end of every error that says replicas could not be reached or read.
OUTAGE_FIX = (
    "nothing was changed: not the replicas, not a tensor of the model or optimizer. Start the peer "
    "agent ('ckptmirror serve') or bring the replica back, check the network, the endpoint and the "
    "credentials, then restore again"
)


def load_newest(
    replicas: Sequence[Replica],
    pool: ThreadPoolExecutor,
    *,
    rank: int = 0,
    world_size: int | None = 1,
    step: int | None = None,
    targets: Any = None,
    strict_paths: Sequence[tuple[Any, ...]] = (),
    validate: Callable[[Any], None] | None = None,
    undo: BufferFactory | None = None,
    list_timeout_s: float | None = None,
    agree: Callable[[str, Any], list[Any]] | None = None,
    defer: bool = False,
    on_unavailable: OnUnavailable | None = None,
) -> Loaded | None:
    """Load ``step`` (or the newest step that verifies) for ``rank``; None if no checkpoint exists.

    With ``agree`` (several ranks), ``agree(round, value)`` must return every rank's value:
    the ranks settle on the newest step that every one of them can recover (commit readable,
    own manifest verified, every own object present somewhere with its size), load it, and if
    any rank's load fails they all move on to an older step together.
    ``defer=True``: local objects are verified in place and wait in :attr:`Loaded.landing`;
    the caller lands them (:meth:`Loaded.land`) or drops them (:meth:`Loaded.abandon`).
    ``world_size=None`` (offline tools such as ``export``) reads ``rank`` of whatever world
    size the step was saved with.
    ``on_unavailable(replica, error)`` is called once for each replica that could not be listed
    or stopped answering during the restore (``ReplicaHealth.mark`` fits).

    Raises :class:`NoValidCheckpointError` when checkpoints exist and some copy of every one
    failed its checks; :class:`ReplicaUnavailableError` when none could be restored only because
    no replica holding it could be reached or read (or no replica could be listed at all).
    """
    listing = list_steps(replicas, timeout_s=list_timeout_s)
    all_down = bool(replicas) and len(listing.unreachable) == len(replicas)
    if on_unavailable is not None:
        for r in replicas:
            if r.url in listing.unreachable:
                _report(on_unavailable, r, listing.unreachable[r.url])
    if listing.unreachable and not all_down:
        # Read only from the replicas that answered: a stalled one would cost every object a
        # missed deadline before the next replica is tried.
        replicas = [r for r in replicas if r.url not in listing.unreachable]
    if all_down and agree is None:
        raise _nobody_listed(listing.unreachable)
    reader = _CountingFetcher(replicas, pool, skip_unavailable=True, on_unavailable=on_unavailable)
    reader.interval_s = config.progress_interval_s()  # a bad value fails here, before any read
    if step is not None and step not in listing.committed and agree is None:
        raise StepNotFoundError(step, list(listing.committed))
    candidates = [step] if step is not None else sorted(listing.committed, reverse=True)
    candidates = [s for s in candidates if s in listing.committed]
    problems: dict[int, str] = {}
    failures: dict[int, BaseException] = {}
    urls = [r.url for r in replicas]

    #: Steps committed only where other ranks look (several ranks): the record one of them read.
    given: dict[int, CommitRecord] = {}

    def probe(s: int) -> Probed:
        if s in given:
            return probe_commit(given[s])
        # The first replica's record may be the damaged one (a flipped bit in a pinned checksum
        # still parses): another replica's record of the same save is tried then.
        return reader.probe_commits(reader.read_commit(s, listing.committed[s]), listing.committed[s], probe_commit)

    def probe_commit(commit: CommitRecord) -> Probed:
        s = commit.step
        if world_size is None:  # offline: read ``rank`` of whatever world size was saved
            if rank >= commit.world_size and not commit.replicated:
                raise StateMismatchError(f"step {s} was saved by {commit.world_size} rank(s); there is no rank {rank}")
            source = rank
        else:
            # On another world size, ranks beyond the stored ones start from rank 0's tree; its
            # sharded tensors are resharded from every rank's shards (see reshard.py).
            source = rank if rank < commit.world_size else 0
        manifest = reader.read_manifest(commit, source)
        other_world = world_size is not None and commit.world_size != world_size and not commit.replicated
        if other_world and not validate_manifest(manifest, commit.manifest_ref(0).key).dtensors:
            raise StateMismatchError(
                f"step {s} was saved by {commit.world_size} rank(s), this job has {world_size}; "
                "per-rank state that is not sharded (DTensor) cannot be mapped onto another world size"
            )
        return commit, manifest, reader.preflight(manifest)

    def shards_of(commit: CommitRecord) -> Callable[[], list[tuple[RankManifest, str]]]:
        return lambda: [
            (reader.read_manifest(commit, r), commit.manifest_ref(r).key)
            for r in range(1 if commit.replicated else commit.world_size)
        ]

    if agree is None:
        if not candidates:
            if listing.unreachable:
                # The replicas that answered hold nothing (a replaced disk, say), and one that
                # did not may hold the run's checkpoints: a fresh start would rewind the run.
                raise _partly_listed(listing.unreachable)
            for url, steps in listing.torn.items():
                log.info("replica %s holds leftovers of interrupted saves (steps %s); no committed step", url, steps)
            return None
        for s in candidates:
            try:
                commit, manifest, objects = probe(s)
                with reader.progress_of(manifest, rank, world_size):
                    loaded = fill_step(
                        reader,
                        manifest,
                        manifest_key(commit, rank),
                        objects,
                        targets,
                        strict_paths,
                        validate,
                        shards_of(commit),
                        undo=undo,
                        defer=defer,
                    )
            except STEP_FAILURES as exc:
                if out_of_memory(exc):
                    # Not the checkpoint's fault, and an older step would only be a worse answer.
                    exc.add_note(
                        f"ckptmirror: out of memory while restoring step {s}; the model and optimizer are "
                        "unchanged. Free memory (or lower io_threads / object_bytes) and restore again"
                    )
                    raise
                if step is not None:
                    if not is_damage(exc):
                        exc.add_note(f"ckptmirror: step {s} could not be read; {OUTAGE_FIX}")
                    raise
                if not is_damage(exc):
                    # No replica holding it could be reached or read (an outage, a permission):
                    # the step may be intact, and an older one would rewind the run for a reason
                    # an operator can fix. Say so instead of falling back.
                    problems[s] = f"{type(exc).__name__}: {exc}"
                    failures[s] = exc
                    err = _unreadable_steps(problems, list(failures.values()))
                    if err is exc:  # a misconfiguration: its own message names the fix
                        exc.add_note(f"ckptmirror: step {s} could not be read; {OUTAGE_FIX}")
                        raise
                    raise err from exc
                log.warning("step %d cannot be restored, falling back to an older step: %s", s, exc)
                problems[s] = f"{type(exc).__name__}: {exc}"
                failures[s] = exc
                continue
            if problems:
                log.warning("restored step %d after skipping newer steps %s", s, sorted(problems, reverse=True))
                loaded.skipped = tuple(sorted(problems, reverse=True))
            if step is None:
                _warn_lagging(s, listing.committed, urls)
            return loaded
        if any(is_damage(e) for e in failures.values()):
            raise NoValidCheckpointError(problems, replicas=urls)
        raise _unreadable_steps(problems, list(failures.values()))
    candidates = _pool_commits(reader, listing.committed, candidates, agree, rank, step, given)
    agreed = _load_agreed(
        reader,
        candidates,
        problems,
        probe,
        shards_of,
        rank,
        step,
        targets,
        strict_paths,
        validate,
        undo,
        agree,
        defer,
        bool(listing.unreachable),
        listing.unreachable,
        urls,
    )
    if agreed is not None and step is None:
        _warn_lagging(agreed.step, listing.committed, urls)
    return agreed


#: At most this many steps that some rank's replicas hold a commit record of and another's do
#: not are shared between the ranks of a restore (newest first).
POOLED_STEPS = 8


def _pool_commits(
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


def _out_of_memory(ranks: Sequence[int], step: int, own: BaseException | None) -> BaseException:
    """What every rank raises when ``ranks`` ran out of memory restoring ``step``: as with one
    rank, not the checkpoint's fault, and an older step would only be a worse answer. The rank
    that ran out raises its own error (``own``), the others a :class:`MemoryError`; all keep
    their tensors."""
    fix = (
        f"ckptmirror: rank(s) {list(ranks)} ran out of memory while restoring step {step}; every rank's model "
        "and optimizer are unchanged. Free memory (or lower io_threads / object_bytes) and restore again"
    )
    if own is not None:
        own.add_note(fix)
        return own
    return MemoryError(fix)


def _warn_lagging(step: int, committed: Mapping[int, Sequence[str]], urls: Sequence[str]) -> None:
    """Say which replicas that answered do not hold the restored newest ``step``: the run has
    fewer copies of it than it was given replicas. A WARNING for one that holds older steps (it
    missed saves: degraded then, and nothing says so later); INFO for one that holds none (a
    replacement node's empty disk, which the next save fills: the usual case, not news)."""
    lagging = [u for u in urls if u not in committed.get(step, ())]
    newest = {u: max((t for t, us in committed.items() if u in us), default=None) for u in lagging}
    # One whose newest step is newer missed nothing: that step could not be restored (damaged),
    # and the restore said so when it fell back.
    behind = {u: t for u, t in newest.items() if t is not None and t < step}
    empty = [u for u, t in newest.items() if t is None]
    if behind:
        log.warning(
            "restored step %d, which replica(s) %s do not hold (their newest committed step: %s): they "
            "missed saves; run 'ckptmirror repair' to copy it there",
            step,
            list(behind),
            ", ".join(f"{u}: {t}" for u, t in behind.items()),
        )
    if empty:
        log.info("restored step %d; replica(s) %s hold no committed step yet (the next save writes there)", step, empty)


def _report(on_unavailable: OnUnavailable, r: Replica, why: BaseException | str) -> None:
    try:
        on_unavailable(r, why)
    except Exception:  # noqa: BLE001 - reporting must not fail the restore
        log.exception("reporting replica %s as unavailable failed", r.url)


def _nobody_listed(unreachable: dict[str, str]) -> ReplicaUnavailableError:
    """The error of a restore that could list no replica at all."""
    detail = "; ".join(f"{u}: {e}" for u, e in unreachable.items())
    return ReplicaUnavailableError(
        f"no replica could be reached, so it is not known whether a checkpoint exists ({detail}); "
        f"restore does not start from scratch when it cannot look: {OUTAGE_FIX}",
        replica=next(iter(unreachable)) if len(unreachable) == 1 else "",
    )


def _partly_listed(unreachable: dict[str, str]) -> ReplicaUnavailableError:
    """The error of a restore that found no committed step on the replicas that answered
    while others could not be listed: those may hold the run's checkpoints."""
    detail = "; ".join(f"{u}: {e}" for u, e in unreachable.items())
    return ReplicaUnavailableError(
        f"no committed step on the replicas that answered, and {', '.join(unreachable)} could not be listed "
        f"({detail}): it may hold this run's checkpoints, so restore does not start from scratch. Bring it back "
        "and restore again; for a new run, or to give up what it holds, leave it out of the replica list for "
        "this restore",
        replica=next(iter(unreachable)) if len(unreachable) == 1 else "",
    )


def _unreadable_steps(problems: dict[int, str], failures: list[BaseException], note: str = "") -> BaseException:
    """The error of a restore whose steps all failed for lack of a replica that could be read
    (none failed a check): the misconfiguration when that is all there was, else an outage."""
    if failures and all(isinstance(e, ReplicaConfigError) for e in failures):
        return failures[0]  # e.g. a peer token refused: its message names the fix
    if note:
        problems = {**problems, -1: note}
    lines = "".join(f"\n  step {s}: {p}" for s, p in sorted(problems.items(), reverse=True) if s >= 0)
    lines += "".join(f"\n  {p}" for s, p in problems.items() if s < 0)
    urls = {getattr(e, "replica", "") for e in failures}
    exc = ReplicaUnavailableError(
        f"checkpoints exist but no replica that holds them could be reached or read:{lines}\n{OUTAGE_FIX}",
        replica=urls.pop() if len(urls) == 1 else "",
    )
    exc.__cause__ = failures[0] if failures else None
    return exc


def manifest_key(commit: CommitRecord, rank: int) -> str:
    """Key of the manifest ``rank`` restores from (rank 0's beyond the stored world size)."""
    return commit.manifest_ref(rank if rank < commit.world_size else 0).key


def _load_agreed(
    reader: _CountingFetcher,
    candidates: list[int],
    problems: dict[int, str],
    probe: Callable[[int], Probed],
    shards_of: Callable[[CommitRecord], Callable[[], list[tuple[RankManifest, str]]]],
    rank: int,
    step: int | None,
    targets: Any,
    strict_paths: Sequence[tuple[Any, ...]],
    validate: Callable[[Any], None] | None,
    undo: BufferFactory | None,
    agree: Callable[[str, Any], list[Any]],
    defer: bool,
    some_down: bool = False,
    unreachable: dict[str, str] | None = None,
    urls: Sequence[str] = (),
) -> Loaded | None:
    """The several-ranks half of :func:`load_newest`: vote on a step, load it, fall back together.

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
        return _unreadable_steps(problems, failures)

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
            raise _out_of_memory(sorted(oom), max(oom.values()), failures[-1] if oom_at is not None else None)
        damaged = damaged or any(v.get("damage") for v in votes)
        # A step some rank could not read (not damage) may be intact: every rank raises rather
        # than rewind, unless another rank found that step damaged (then no rank can restore
        # it whatever the outage, and the ranks look below it).
        seen_damaged = {s for v in votes for s in v.get("damaged_at", ())}
        agreed_damaged |= seen_damaged
        stuck = {r: v["outage_at"] for r, v in enumerate(votes) if v.get("outage_at") is not None}
        blocking = sorted(r for r, s in stuck.items() if s not in seen_damaged)
        if blocking:
            raise _unreadable_steps(problems, failures, f"rank(s) {blocking} could not read their replicas")
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
            _, commit, manifest, objects = found
            with reader.progress_of(manifest, rank, None):
                loaded = fill_step(
                    reader,
                    manifest,
                    manifest_key(commit, rank),
                    objects,
                    targets,
                    strict_paths,
                    validate,
                    shards_of(commit),
                    undo=undo,
                    defer=defer,
                )
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
            raise _out_of_memory(oom_ranks, lo, failures[-1] if not ok and out_of_memory(failures[-1]) else None)
        damaged = damaged or any(v.get("damage") for v in results)
        outage = [r for r, v in enumerate(results) if v.get("outage")]
        if outage and not any(v.get("damaged_now") for v in results):  # see the probe's vote
            if ok:
                loaded.abandon()
            raise _unreadable_steps(problems, failures, f"rank(s) {outage} could not read their replicas")
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


class _CountingFetcher(Fetcher):
    """A :class:`Fetcher` that counts the object bytes it reads into a :class:`Progress`.

    Progress is reported from here rather than from fill.py: the reads of a step all go through
    ``fetch_into``, ``fetch`` and ``verify_mapped``, so counting them needs no hook in the fill code. Arguments
    pass through untouched (``*args``/``**kwargs``), so parameters added to those methods later
    keep working. ``fetch`` reads through ``fetch_into``: only the outermost call of a thread
    counts, so no byte is counted twice.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.interval_s = config.DEFAULT_PROGRESS_INTERVAL_S
        self._progress: Progress | None = None
        self._counting = threading.local()

    @contextlib.contextmanager
    def progress_of(self, manifest: RankManifest, rank: int, world_size: int | None) -> Iterator[None]:
        """Count the reads of one step's load (``fill_step``) and log its progress lines."""
        total = sum(o.size for o in manifest.objects)
        if not total:
            yield  # nothing to read: no progress worth a line
            return
        who = f" (rank {rank})" if world_size != 1 else ""
        with Progress(total, f"restore of step {manifest.step}{who}", log, self.interval_s) as p:
            self._progress = p
            try:
                yield
            finally:
                self._progress = None

    def fetch_into(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`Fetcher.fetch_into`, counting the bytes of ``out`` once it verified."""
        return self._counted(super().fetch_into, args, kwargs, lambda _: _view_bytes(args, kwargs))

    def fetch(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`Fetcher.fetch`, counting the bytes of the returned buffer once it verified."""
        return self._counted(super().fetch, args, kwargs, _buffer_bytes)

    def verify_mapped(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`Fetcher.verify_mapped`, counting the object's bytes once they verified in place."""
        return self._counted(super().verify_mapped, args, kwargs, _mapped_bytes)

    def _counted(
        self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], size: Callable[[Any], int]
    ) -> Any:
        if getattr(self._counting, "busy", False):
            return call(*args, **kwargs)  # inside fetch(): the outer call counts
        self._counting.busy = True
        try:
            result = call(*args, **kwargs)
        finally:
            self._counting.busy = False
        p = self._progress
        if p is not None:
            p.advance(size(result))
        return result


def _view_bytes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Bytes of the buffer ``fetch_into`` filled: its (only) memoryview argument."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, memoryview):
            return a.nbytes
    return 0


def _mapped_bytes(result: Any) -> int:
    """Bytes of the mapping ``verify_mapped`` returns first (``(mapping or None, url, replicas)``)."""
    mapping = result[0] if isinstance(result, tuple) and result else None
    return int(mapping.size) if mapping is not None else 0


def _buffer_bytes(result: Any) -> int:
    """Bytes of the tensor ``fetch`` returns first (``(buffer, url)``)."""
    buf = result[0] if isinstance(result, tuple) and result else result
    return int(buf.numel() * buf.element_size()) if hasattr(buf, "numel") else 0
