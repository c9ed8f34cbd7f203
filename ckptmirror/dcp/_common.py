"""What the DCP writer and reader share: steps from checkpoint ids, opening replicas, bad steps.

The writer's vote is :class:`~ckptmirror.dist.Coordinator`'s commit protocol with its two
optional moves, which DCP's call order needs: a rank that fails its write publishes the abort
itself (:meth:`~ckptmirror.dist.Coordinator.abort`: DCP then never calls ``finish()``, the
coordinator's only chance to decide), and every rank acknowledges its commit record
(:meth:`~ckptmirror.dist.Coordinator.ack`), so that ``finish()`` returns only once every
rank's node-local commit is written.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from ..dist import DistInfo, expand_url
from ..format import MAX_STEP
from ..replicas import Replica, close_opened, open_replicas

# The last run of digits in the id's last path segment: ".../step-400", "ckpt/400", "step_000400".
_STEP_RE = re.compile(r"([0-9]+)[^0-9]*\Z")


def step_from_checkpoint_id(checkpoint_id: str | os.PathLike[str] | None) -> int | None:
    """The step a DCP ``checkpoint_id`` names: the trailing integer of its last segment, or None."""
    if checkpoint_id is None:
        return None
    last = os.fspath(checkpoint_id).rstrip("/").rsplit("/", 1)[-1]
    m = _STEP_RE.search(last)
    if m is None:
        return None
    step = int(m.group(1))
    return step if step <= MAX_STEP else None


def check_step(step: Any) -> int:
    """``step`` if it is a valid ckptmirror step (an int in [0, 10^12)), else ValueError."""
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be an int in [0, {MAX_STEP}], got {step!r}")
    return step


def open_for(
    replicas: Sequence[str | Replica] | str | Replica,
    info: DistInfo,
    storage_options: Mapping[str, Mapping[str, Any]] | None,
    owner: object,
) -> tuple[list[Replica], weakref.finalize]:
    """Open a rank's replica list (URL placeholders filled for this rank).

    Returns the replicas and the finalizer that closes those opened from URLs (``Replica``
    objects stay the caller's): it runs when ``owner`` is garbage collected, or when called
    (the owner's ``close()``), so a writer made for one save does not leak connections.
    """
    if isinstance(replicas, (str, Replica)):
        replicas = [replicas]
    if not replicas:
        raise ValueError("at least one replica URL is needed")
    urls = [expand_url(u, info) if isinstance(u, str) else u for u in replicas]
    opened = open_replicas(urls, storage_options)
    return opened, weakref.finalize(owner, close_opened, opened, urls)


_counter_lock = threading.Lock()
_load_count = 0


def next_load_prefix() -> str:
    """Store prefix shared by the same load on every rank: ranks load in the same order, and a
    restarted job (torchrun --max-restarts) gets a new round."""
    global _load_count
    with _counter_lock:
        _load_count += 1
        n = _load_count
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"ckptmirror/dcp-load/{run}/{restart}/{n}"


_bad_lock = threading.Lock()
_bad_steps: dict[tuple[str, ...], set[int]] = {}


def mark_bad(urls: Sequence[str], step: int) -> None:
    """Remember that ``step`` failed to load from these replicas, found only while reading.

    DCP cannot fall back to another step in the middle of a load (the plan is made), so the
    load raises; the next load in this process skips the step, and with several ranks the
    vote then settles on an older step for all of them.
    """
    with _bad_lock:
        _bad_steps.setdefault(tuple(urls), set()).add(step)


def is_bad(urls: Sequence[str], step: int) -> bool:
    """Whether :func:`mark_bad` recorded ``step`` for these replicas."""
    with _bad_lock:
        return step in _bad_steps.get(tuple(urls), ())
