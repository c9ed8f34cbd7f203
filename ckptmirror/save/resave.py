"""Saving a damaged step again with several ranks: erase it everywhere, then write it anew.

A restore skips a step that no replica holds a valid copy of (for some rank), and the ranks
resume together from an older one (:mod:`~ckptmirror.restore.choose`); the job then trains the
skipped step again and saves it. That save must replace the damaged copies, or the job stops at
the same step after every restart (``StepExistsError``).

One process replaces a step as ``overwrite=True`` does (:func:`~ckptmirror.save.objects.write_objects`
deletes it first on each replica). With several ranks that is a race: on a shared replica one
rank's deletion of the old step would take the files another rank has started to write for the
new one. So every rank first erases the step on each of its replicas, and no rank writes before
every rank has (a barrier through the coordinator). The ranks agree on the steps to replace from
the restore's votes, so they all take this path for the same save.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Any

from ..errors import CkptMirrorError, CoordinationError, StepExistsError
from ..replicas.base import Replica
from .retention import RetentionStopped, is_committed, remove_step

log = logging.getLogger("ckptmirror")


def erase_for_resave(
    replicas: Sequence[Replica],
    step: int,
    live: Callable[[str], Collection[str]],
    stop: Callable[[Replica], Callable[[], str | None]],
    barrier: Callable[[bool], Sequence[Any]],
) -> dict[str, BaseException]:
    """Delete committed ``step`` from each of ``replicas`` (commit record first), then wait at
    ``barrier`` for every other rank to have done the same. Returns, by URL, why a replica still
    holds the old step (it did not answer, say); the save must not be written there: its old
    commit record would stay, pinning the damaged copy.

    ``barrier(ok)`` publishes whether this rank got through its replicas (False when something
    unexpected was raised, which then propagates) and returns every rank's; it is called
    whatever happens, so that no rank waits for one that gave up. Raises
    :class:`~ckptmirror.errors.CoordinationError` when another rank gave up (then no rank may
    write), and what ``barrier`` raises (a rank that died).

    ``live`` gives a replica's keys that saves in flight use (never deleted); ``stop`` the
    stop condition of a removal pass (the replica was marked degraded meanwhile).
    """
    failed: dict[str, BaseException] = {}
    done = False
    try:
        for r in replicas:
            try:
                if is_committed(r, step) and not remove_step(r, step, live(r.url), stop(r)):
                    failed[r.url] = StepExistsError(step, r.url)  # committed again meanwhile: not ours to delete
            except (CkptMirrorError, OSError) as exc:
                cause = exc.cause if isinstance(exc, RetentionStopped) and isinstance(exc.cause, BaseException) else exc
                log.warning("step %d: could not remove its damaged copy from %s: %s", step, r.url, cause)
                failed[r.url] = cause
        done = True
    finally:
        ranks = barrier(done)
    gave_up = [i for i, ok in enumerate(ranks) if not ok]
    if gave_up:
        raise CoordinationError(
            f"step {step}: rank(s) {gave_up} could not erase the damaged copy before saving it again; "
            "nothing of this save is written"
        )
    return failed
