"""``ls``: every step on the replicas, where it is committed, its size and age, and what is garbage."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..format import step_dir
from ..replicas import Replica
from ._common import FAILURES, list_reachable, opened
from ._engine import Engine, KeptForReferences, garbage_keys, referenced, storage_of


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


@dataclass(frozen=True)
class Listing:
    """What :func:`ls` found."""

    replicas: tuple[str, ...]
    steps: tuple[StepInfo, ...]
    unreachable: Mapping[str, str]

    @property
    def exit_code(self) -> int:
        """0, or 2 when a replica could not be listed."""
        return 2 if self.unreachable else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``ckptmirror ls --json``)."""
        d = dataclasses.asdict(self)
        d["exit_code"] = self.exit_code
        return d


def ls(urls: Sequence[str | Replica], *, storage_options: Mapping[str, Mapping[str, Any]] | None = None) -> Listing:
    """List every step on the replicas: where it is committed, its size and age, what is garbage.

    Reads commit records and rank manifests (small JSON documents) and key listings, never
    object contents; use :func:`verify` to check those.
    """
    with opened(urls, storage_options) as replicas:
        listing, reachable = list_reachable(replicas)
        order = {r.url: i for i, r in enumerate(replicas)}
        all_steps = set(listing.committed) | {s for v in listing.torn.values() for s in v}
        eng = Engine(reachable, 1, True, None)
        out: list[StepInfo] = []
        kept = KeptForReferences(listing)  # "holds only files other steps reference"

        try:
            for s in sorted(all_steps):
                holders = sorted(listing.committed.get(s, []), key=order.__getitem__)
                torn_on = tuple(u for u in order if s in listing.torn.get(u, []))
                _, kept_by_url = kept.split(reachable, {u: [s] for u in torn_on})
                kept_on = [u for u in torn_on if u in kept_by_url]
                torn_on = tuple(u for u in torn_on if u not in kept_on)
                garbage: dict[str, tuple[str, ...]] = {}
                storage: dict[str, Any] = {}
                commit, ms, err = referenced(eng, None, s, holders) if holders else (None, None, None)
                for r in reachable:
                    if r.url in holders and ms is not None:
                        storage[r.url] = storage_of(eng, r, s, ms)
                    if r.url in holders or r.url in torn_on:
                        try:
                            g = (
                                garbage_keys(r, s, commit, ms)
                                if r.url in holders
                                else tuple(r.list_prefix(step_dir(s)))
                            )
                        except FAILURES as exc:
                            err = err or f"{r.url}: {exc}"
                            continue
                        if g:
                            garbage[r.url] = g
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
                    )
                )
        finally:
            eng.close()
        return Listing(tuple(r.url for r in replicas), tuple(out), dict(listing.unreachable))
