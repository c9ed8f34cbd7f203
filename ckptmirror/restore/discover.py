"""Step discovery, the first stage of the read path: which steps exist, and where.

A step exists on a replica when its commit record is there (presence only: nothing is read
or verified here). A step directory without a commit record is *torn*, the leftovers of an
interrupted save; a replica that cannot be listed at all, or does not answer in time, is
*unreachable*.

Replicas are consulted concurrently, each on a daemon thread of its own (a small pool per
call): one slow or stalled replica does not make the others wait, a call stuck in a backend
never blocks the caller past ``timeout_s`` nor the process's exit, and a later listing never
waits behind an earlier stuck one. The candidates
found here are validated (:mod:`ckptmirror.restore.check`), read (:mod:`ckptmirror.restore.fill`) and
chosen among (:mod:`ckptmirror.restore.choose`) by the later stages.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CkptMirrorError, ReplicaConfigError, ReplicaMissingError
from ..format import commit_key, parse_step_dir
from ..replicas.base import Replica

log = logging.getLogger("ckptmirror")

#: At most this many replicas are listed at once by one call (the others queue for a thread).
MAX_THREADS = 8


@dataclass(frozen=True)
class StepListing:
    """Which replicas hold a commit record for which step, and what is torn."""

    committed: dict[int, list[str]]  # step -> replica URLs, in preference order
    torn: dict[str, list[int]]  # replica URL -> steps with objects but no commit
    unreachable: dict[str, str]  # replica URL -> error


def list_steps(replicas: Sequence[Replica], timeout_s: float | None = None) -> StepListing:
    """List committed and torn steps on every replica (presence of the commit record only).

    The replicas are consulted concurrently. ``timeout_s``: return after at most this long with
    the replicas that answered; the others are reported in ``unreachable`` ("did not answer
    within N s") with one WARNING naming them, and their calls finish (or fail, within their own
    time budget) on daemon threads nobody waits for. None: wait for every replica.

    A replica that cannot be reached is reported in ``unreachable`` (an outage: the caller goes
    on with the others). A misconfigured one (:class:`ReplicaConfigError`: access denied, a
    wrong peer token) that answers is raised at once: waiting would not fix it, and going on
    without it would hide the mistake for the whole run. Any other exception (a bug) is raised
    too. A store that does not exist (:class:`ReplicaMissingError`: no such bucket) is raised
    too, unless another replica holds committed steps: then the run exists and that store was
    lost (an S3 server restarted empty), so it is reported in ``unreachable`` with a WARNING
    naming it and the fix, and a replacement process resumes from the others.
    """
    if timeout_s is not None and not timeout_s >= 0:
        raise ValueError(f"timeout_s must be >= 0 or None, got {timeout_s!r}")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    if len(replicas) == 1 and timeout_s is None:
        outcomes: dict[int, _Outcome] = {0: _list_one(replicas[0])}  # nothing to overlap: no thread
    else:
        outcomes = _consult(replicas, deadline)
    committed: dict[int, list[str]] = {}
    torn: dict[str, list[int]] = {}
    unreachable: dict[str, str] = {}
    missing: list[tuple[str, ReplicaMissingError]] = []
    silent = []
    for i, r in enumerate(replicas):  # in the caller's order: committed lists are preference-ordered
        outcome = outcomes.get(i)
        if outcome is None:
            silent.append(r.url)
            unreachable[r.url] = f"did not answer within {timeout_s:g} s"
            continue
        if isinstance(outcome, ReplicaMissingError):
            missing.append((r.url, outcome))
            continue
        if isinstance(outcome, BaseException):
            unreachable[r.url] = f"{type(outcome).__name__}: {outcome}"
            continue
        steps, torn_steps = outcome
        for s in steps:
            committed.setdefault(s, []).append(r.url)
        if torn_steps:
            torn[r.url] = torn_steps
    if missing and not committed:
        raise missing[0][1]  # nothing holds this run: a name nobody created is a mistake, said now
    holders = sorted({u for urls in committed.values() for u in urls})
    for url, exc in missing:
        log.warning(
            "%s; going on without it: %s hold%s committed steps of this run (newest %d). Saves skip it until it exists",
            exc,
            ", ".join(holders),
            "s" if len(holders) == 1 else "",
            max(committed),
        )
        unreachable[url] = f"{type(exc).__name__}: {exc}"
    if silent:
        log.warning(
            "replica%s %s did not answer within %g s; going on without %s",
            "s" if len(silent) > 1 else "",
            ", ".join(silent),
            timeout_s,
            "them" if len(silent) > 1 else "it",
        )
    return StepListing(dict(sorted(committed.items())), torn, unreachable)


#: One replica's answer: (committed steps, torn steps), or the outage that stopped it.
_Outcome = tuple[list[int], list[int]] | BaseException


def _list_one(r: Replica) -> _Outcome:
    """Committed and torn steps of one replica; an outage is returned, anything else raised."""
    try:
        steps: list[int] = []
        torn: list[int] = []
        for name in r.list_steps():
            s = parse_step_dir(name)
            if s is None:
                continue
            if r.size(commit_key(s)) is not None:
                steps.append(s)
            else:
                torn.append(s)
        return steps, torn
    except ReplicaMissingError as exc:
        return exc  # list_steps decides, once it knows whether another replica holds the run
    except ReplicaConfigError:
        raise
    except (CkptMirrorError, OSError) as exc:
        log.warning("replica %s could not be listed: %s", r.url, exc)
        return exc


def _consult(replicas: Sequence[Replica], deadline: float | None) -> dict[int, _Outcome]:
    """Outcomes by replica index, of those that answered before ``deadline`` (None: all).

    Raises the first :class:`ReplicaConfigError` (or bug) that arrives, without waiting for the rest.
    """
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(replicas)):
        todo.put(i)
    results: queue.SimpleQueue[tuple[int, _Outcome | None, BaseException | None]] = queue.SimpleQueue()

    def work() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((i, _list_one(replicas[i]), None))
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                results.put((i, None, exc))
            finally:
                replicas[i].release_thread()  # this thread ends soon: close its connection now

    for _ in range(min(len(replicas), MAX_THREADS)):
        # Daemon threads, new for each call: a listing stuck in a backend holds nothing up.
        threading.Thread(target=work, name="ckptmirror-list", daemon=True).start()
    outcomes: dict[int, _Outcome] = {}
    while len(outcomes) < len(replicas):
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            break
        try:
            i, outcome, error = results.get(timeout=wait)
        except queue.Empty:
            break
        if error is not None:
            raise error
        assert outcome is not None
        outcomes[i] = outcome
    return outcomes
