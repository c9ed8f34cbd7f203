"""``ls``: every step on the replicas, where it is committed, its size and age, and what is garbage."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from ..errors import ReplicaUnavailableError
from ..format import step_dir
from ..replicas import Replica
from ._common import FAILURES, empty_hint, list_reachable, opened, strip_where
from ._engine import Engine, KeptForReferences, garbage_keys, referenced, storage_of

T = TypeVar("T")


@dataclass(frozen=True)
class StepInfo:
    """One step as :func:`ls` sees it."""

    step: int
    committed_on: tuple[str, ...]
    torn_on: tuple[str, ...]  # objects but no commit record there
    world_size: int | None
    objects: int | None
    bytes: int | None  # tensor bytes of all ranks (one copy)
    created_unix: float | None
    garbage: Mapping[str, tuple[str, ...]]  # replica -> keys under this step that no commit names
    error: str | None = None  # the commit or a manifest could not be read from any replica
    #: replica -> how it stores the step: raw and stored bytes, compressed and referenced objects
    storage: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    #: replicas where the directory is no step any more (no commit record) but keeps objects that
    #: later steps reference (incremental saves); not garbage, not an interrupted save
    kept_for_references_on: tuple[str, ...] = ()
    #: replicas that stopped answering during the run, before this step was listed there (see
    #: :func:`ls`): what they hold of it is the initial listing's only (committed or torn there);
    #: storage, garbage and references were not asked
    not_listed_on: tuple[str, ...] = ()
    #: ranks that no replica given holds, by their share records (partial replicas: a node-local
    #: directory, a ``ring_peer`` namespace; those ranks are on other nodes' replicas):
    #: ``objects`` and ``bytes`` count the other ranks only
    ranks_not_held: tuple[int, ...] = ()


@dataclass(frozen=True)
class Listing:
    """What :func:`ls` found.

    ``unreachable``: replica -> why it could not be listed, or why it stopped answering during
    the run (then the steps from the one it failed on were not listed there: ``not_listed_on``).
    ``empty``: replica -> what to check, for each replica that answered and holds nothing at all,
    no step and no step directory (a mistyped namespace, prefix or path looks like this).
    """

    replicas: tuple[str, ...]
    steps: tuple[StepInfo, ...]
    unreachable: Mapping[str, str]
    empty: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0, or 2 when a replica could not be listed or stopped answering during the listing."""
        return 2 if self.unreachable else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``ckptmirror ls --json``)."""
        d = dataclasses.asdict(self)
        d["exit_code"] = self.exit_code
        return d


class _Outages:
    """The replicas that stopped answering during one :func:`ls` run, and the asks they are spared.

    The initial listing said which replicas answer; one that stops answering afterwards would
    otherwise be asked again for every step and object (a time budget each: minutes, for nothing).
    Once it fails with an outage (:class:`ReplicaUnavailableError`, a missed deadline included)
    it is not asked again in this run.
    """

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.down: dict[str, str] = {}  # replica URL -> the outage, as reported
        self.since: dict[str, int] = {}  # replica URL -> the step it failed on

    def note(self, r: Replica, step: int, exc: BaseException) -> bool:
        """Mark ``r`` down if ``exc`` is an outage; return whether it is."""
        if not isinstance(exc, ReplicaUnavailableError):
            return False
        self.mark(r.url, step, strip_where(str(exc), r.url, ""))
        return True

    def mark(self, url: str, step: int, why: str) -> None:
        """Mark the replica ``url`` down from ``step`` on, for ``why``."""
        if url not in self.down:
            self.down[url] = why if len(why) <= 300 else why[:297] + "..."
            self.since[url] = step

    def sync(self, step: int) -> None:
        """Take in the outages the engine's readers met (they stop asking such a replica too)."""
        for reader in (self.eng.shared, *self.eng.single.values()):
            for url, exc in reader.unavailable().items():
                self.mark(url, step, strip_where(str(exc), url, ""))

    def ask(self, r: Replica, step: int, call: Callable[[], T]) -> T | None:
        """``call()``, unless ``r`` is down (None); an outage marks ``r`` down (None). Other
        failures propagate to the caller, which reports them as it did before."""
        if r.url in self.down:
            return None
        try:
            return call()
        except FAILURES as exc:
            if self.note(r, step, exc):
                return None
            raise

    def unreachable(self) -> dict[str, str]:
        """``Listing.unreachable`` entries for the replicas that stopped answering."""
        return {
            u: f"stopped answering during the listing, at step {self.since[u]} ({why}); "
            "from that step on, what it holds was not listed: run ls again once it answers"
            for u, why in self.down.items()
        }


def _all_keys(r: Replica, prefix: str) -> tuple[str, ...]:
    """Every key under ``prefix`` on ``r``."""
    return tuple(r.list_prefix(prefix))


def ls(urls: Sequence[str | Replica], *, storage_options: Mapping[str, Mapping[str, Any]] | None = None) -> Listing:
    """List every step on the replicas: where it is committed, its size and age, what is garbage.

    Reads commit records and rank manifests (small JSON documents) and key listings, never
    object contents; use :func:`verify` to check those. A replica that stops answering after
    the initial listing is not asked again in this run: the steps from then on name it in
    ``not_listed_on`` and it is in ``unreachable`` (exit status 2).
    """
    with opened(urls, storage_options) as replicas:
        listing, reachable = list_reachable(replicas)
        order = {r.url: i for i, r in enumerate(replicas)}
        by_url = {r.url: r for r in reachable}
        all_steps = set(listing.committed) | {s for v in listing.torn.values() for s in v}
        eng = Engine(reachable, 1, True, None)
        out: list[StepInfo] = []
        kept = KeptForReferences(listing)  # "holds only files other steps reference"
        outages = _Outages(eng)
        empty = {
            r.url: empty_hint(r.url)
            for r in reachable
            if not listing.torn.get(r.url) and not any(r.url in us for us in listing.committed.values())
        }

        try:
            for s in sorted(all_steps):
                outages.sync(s)
                holders = sorted(listing.committed.get(s, []), key=order.__getitem__)
                torn_on = tuple(u for u in order if s in listing.torn.get(u, []))
                kept_on: list[str] = []
                for u in torn_on:
                    r = by_url[u]
                    try:
                        if outages.ask(r, s, partial(kept, r, s)):
                            kept_on.append(u)
                    except FAILURES:
                        pass  # judged torn, as before: what is wrong with the replica shows elsewhere
                torn_on = tuple(u for u in torn_on if u not in kept_on)
                garbage: dict[str, tuple[str, ...]] = {}
                storage: dict[str, Any] = {}
                # The commit from a holder that still answers (the shared reader skips those
                # that stopped answering to it; these are the ones that stopped answering to us).
                live = [u for u in holders if u not in outages.down]
                unheld: list[int] = []
                commit, ms, err = referenced(eng, None, s, live, unheld) if live else (None, None, None)
                if holders and not live:
                    err = "not listed: every replica that holds it stopped answering"
                for r in reachable:
                    if r.url not in holders and r.url not in torn_on:
                        continue
                    try:
                        # Garbage first: a direct listing whose error says whether the replica
                        # stopped answering; storage_of (below) keeps its errors as text.
                        g = outages.ask(
                            r,
                            s,
                            partial(garbage_keys, r, s, commit, ms)
                            if r.url in holders
                            else partial(_all_keys, r, step_dir(s)),
                        )
                    except FAILURES as exc:
                        err = err or f"{r.url}: {exc}"
                        continue
                    if g and r.url in holders:
                        # Files a later step references (this step saved again over an earlier
                        # save that step referenced) are no garbage (prune keeps them too).
                        try:
                            refs = outages.ask(r, s, partial(kept.refs, r))
                        except FAILURES:
                            refs = None
                        g = tuple(k for k in g if refs is None or k not in refs)
                    if g:
                        garbage[r.url] = g
                    if r.url in holders and ms is not None and r.url not in outages.down:
                        st = storage_of(eng, r, s, ms)
                        outages.sync(s)  # an outage its placement reads met
                        if st.get("unavailable") and r.url not in outages.down:
                            # storage_of stopped at an outage (its error, as text): ask nothing more
                            outages.mark(r.url, s, strip_where(str(st.get("error", "")), r.url, ""))
                        if r.url not in outages.down:
                            storage[r.url] = st
                out.append(
                    StepInfo(
                        s,
                        tuple(holders),
                        torn_on,
                        commit.world_size if commit else None,
                        sum(len(m.objects) for m in ms) if ms is not None else None,
                        sum(m.stream_bytes for m in ms) if ms is not None else None,
                        commit.created_unix if commit else None,
                        garbage,
                        err,
                        storage,
                        tuple(kept_on),
                        tuple(u for u in order if u in outages.down),
                        tuple(unheld),
                    )
                )
        finally:
            eng.close()
        return Listing(
            tuple(r.url for r in replicas), tuple(out), {**listing.unreachable, **outages.unreachable()}, empty
        )
