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
ranks resume from different steps (:mod:`~ckptmirror.restore.agree`). The errors that are not
damage are built in :mod:`~ckptmirror.restore.outcome`; progress lines are counted by
:class:`~ckptmirror.restore.counting.CountingFetcher`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import config
from ..errors import (
    NoValidCheckpointError,
    StateMismatchError,
    StepNotFoundError,
)
from ..format import CommitRecord, RankManifest
from ..replicas.base import Replica
from .agree import Probed, load_agreed, pool_commits
from .check import validate_manifest
from .counting import CountingFetcher
from .discover import list_steps
from .fetch import STEP_FAILURES, OnUnavailable, is_damage, out_of_memory
from .fill import Loaded, fill_step
from .outcome import OUTAGE_FIX, nobody_listed, partly_listed, unreadable_steps
from .undo import BufferFactory

log = logging.getLogger("ckptmirror")


def manifest_key(commit: CommitRecord, rank: int) -> str:
    """Key of the manifest ``rank`` restores from (rank 0's beyond the stored world size)."""
    return commit.manifest_ref(rank if rank < commit.world_size else 0).key


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
        raise nobody_listed(listing.unreachable)
    reader = CountingFetcher(replicas, pool, skip_unavailable=True, on_unavailable=on_unavailable)
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

    def load(probed: Probed, progress_world: int | None) -> Loaded:
        commit, manifest, objects = probed
        with reader.progress_of(manifest, rank, progress_world):
            return fill_step(
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

    if agree is None:
        if not candidates:
            if listing.unreachable:
                # The replicas that answered hold nothing (a replaced disk, say), and one that
                # did not may hold the run's checkpoints: a fresh start would rewind the run.
                raise partly_listed(listing.unreachable)
            for url, steps in listing.torn.items():
                log.info("replica %s holds leftovers of interrupted saves (steps %s); no committed step", url, steps)
            return None
        for s in candidates:
            try:
                loaded = load(probe(s), world_size)
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
                    err = unreadable_steps(problems, list(failures.values()))
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
        raise unreadable_steps(problems, list(failures.values()))
    candidates = pool_commits(reader, listing.committed, candidates, agree, rank, step, given)
    agreed = load_agreed(
        candidates,
        problems,
        probe,
        lambda probed: load(probed, None),
        rank,
        step,
        agree,
        bool(listing.unreachable),
        listing.unreachable,
        urls,
    )
    if agreed is not None and step is None:
        _warn_lagging(agreed.step, listing.committed, urls)
    return agreed


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
