"""What a restore raises when it cannot restore: outages, missing replicas, memory.

The errors of :mod:`~ckptmirror.restore.choose` and :mod:`~ckptmirror.restore.agree` that are
not damage: each says that nothing was changed and what to do (:data:`OUTAGE_FIX`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ReplicaConfigError, ReplicaUnavailableError

#: The end of every error that says replicas could not be reached or read.
OUTAGE_FIX = (
    "nothing was changed: not the replicas, not a tensor of the model or optimizer. Start the peer "
    "agent ('ckptmirror serve') or bring the replica back, check the network, the endpoint and the "
    "credentials, then restore again"
)


def nobody_listed(unreachable: dict[str, str]) -> ReplicaUnavailableError:
    """The error of a restore that could list no replica at all."""
    detail = "; ".join(f"{u}: {e}" for u, e in unreachable.items())
    return ReplicaUnavailableError(
        f"no replica could be reached, so it is not known whether a checkpoint exists ({detail}); "
        f"restore does not start from scratch when it cannot look: {OUTAGE_FIX}",
        replica=next(iter(unreachable)) if len(unreachable) == 1 else "",
    )


def partly_listed(unreachable: dict[str, str]) -> ReplicaUnavailableError:
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


def unreadable_steps(problems: dict[int, str], failures: list[BaseException], note: str = "") -> BaseException:
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


def out_of_memory_error(ranks: Sequence[int], step: int, own: BaseException | None) -> BaseException:
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
