"""Speculative staging: copy the state by the last save's plan while ``save()`` checks the state.

Building and checking the state (``state_dict()``, :func:`~ckptmirror.state.tree.flatten`,
:func:`~ckptmirror.save.snapshot.plan_key`) is per-tensor Python work under the GIL, ~2 us a
tensor; a coalesced copy (:func:`~ckptmirror.save.snapshot.stage`) is a few large memmoves
that NumPy runs without the GIL. :func:`speculate` starts that copy on a stager thread before
the checks, so that at thousands of tensors the stall is about the longer of the two instead of
their sum. It is a bet, and safe to make: the plan holds every storage it reads, so a state
that changed meanwhile only means the copy is thrown away (or patched, when
:func:`~ckptmirror.save.snapshot.replan` patched the plan) and done again
(:meth:`Speculation.take`).

Limit, measured at 50k tensors in 0.1 GB: the copy alone takes ~20 ms, but beside the checks
it takes ~70 ms and ends after them. NumPy gives the GIL up around each source range and needs
it back after each, while the checks hold it through long C calls (``TensorGuards.check``, the
data-pointer ``map``). There the bet gains next to nothing; at 10k tensors ~10%.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor, Future

import torch

from .arena import Arena, ArenaPool
from .snapshot import Plan, reuse_staged, stage, staging_need

#: :func:`speculate` bets only on plans of at least this many leaves (fewer: the checks it
#: would overlap take microseconds).
SPECULATE_MIN_LEAVES = 256


class Speculation:
    """A copy of the state into ``arena`` by the last plan, running while save() checks the state."""

    def __init__(
        self, plan: Plan, arena: Arena, future: Future[tuple[torch.Tensor, Callable[[], None]]], wait_s: float
    ) -> None:
        self.plan = plan
        self.arena = arena
        self.future = future
        self.wait_s = wait_s  # how long acquiring the arena waited for saves in flight

    def wait(self) -> tuple[torch.Tensor, Callable[[], None]] | None:
        """The copy's (stream, finish), once it is over; None if it failed (then stage anew)."""
        try:
            return self.future.result()
        except Exception:  # noqa: BLE001 - the bet failed: save() stages the state itself, and reports
            return None

    def take(self, p: Plan) -> tuple[torch.Tensor, Callable[[], None]] | None:
        """The staging for ``p`` if the bet holds (``p`` is the plan copied, or patched from
        it); None: the arena's bytes are stale, stage ``p`` anew (into the same arena)."""
        done = self.wait()
        if done is None:
            return None
        staged = self.arena.reserve(self.plan.copies.staging_bytes, pinned=False)  # the buffer copied into
        return done if reuse_staged(p, self.plan, staged) else None

    def discard(self, pool: ArenaPool) -> None:
        """The save failed before it used the copy: wait for it, give the arena back."""
        self.wait()
        pool.release(self.arena)


def speculate(
    last: Plan | None,
    arenas: ArenaPool,
    staging_bytes: int | None,
    block: bool,
    stager: Callable[[], Executor],
) -> Speculation | None:
    """Start copying the state into a free arena by ``last`` (the last save's plan) on the
    ``stager()`` thread, before checking that the plan still fits; None where it does not bet.

    Only for host-only plans of many tensors whose copy is mostly large memmoves (the GIL free
    while it runs), that fit the staging cap (``staging_bytes``), with an arena free now or, if
    ``block`` (``inflight_policy="wait"``), once one is: that wait is the one ``save()`` would
    make anyway, and goes into :attr:`Speculation.wait_s`.
    """
    if (
        last is None
        or len(last.leaves) < SPECULATE_MIN_LEAVES
        or not last.copies.gil_light
        or (staging_bytes is not None and staging_need(last) > staging_bytes)
    ):
        return None
    t_wait = time.perf_counter()
    arena = arenas.acquire(block=block)
    if arena is None:
        return None
    return Speculation(last, arena, stager().submit(stage, last, arena), time.perf_counter() - t_wait)
