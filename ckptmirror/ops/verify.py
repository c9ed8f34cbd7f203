"""``verify``: check every object of every committed step on every replica, each on its own."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..format import commit_key
from ..replicas import Replica
from ._common import Problem, ProgressFactory, list_reachable, opened
from ._engine import Engine, ObjJob, ReplicaPlan, plan_problems, recoverable


@dataclass(frozen=True)
class RankCheck:
    """One rank of one step on one replica."""

    rank: int
    objects: int
    bytes: int
    verified: int  # objects that passed
    manifest_ok: bool
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        """No problem with this rank on this replica."""
        return not self.problems


@dataclass(frozen=True)
class ReplicaCheck:
    """One step on one replica. ``status``: ``ok``, ``bad``, ``absent`` or ``torn`` (not committed here)."""

    step: int
    replica: str
    status: str
    ranks: tuple[RankCheck, ...]
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        """Committed here and everything verified."""
        return self.status == "ok"


@dataclass(frozen=True)
class StepCheck:
    """One step on every replica, and whether it can be restored at all."""

    step: int
    world_size: int | None
    objects: int | None
    bytes: int | None
    created_unix: float | None
    recoverable: bool
    replicas: tuple[ReplicaCheck, ...]


#: What :attr:`VerifyReport.exit_code` means (``ckptmirror verify --help`` prints the same).
EXIT_OK, EXIT_DAMAGE, EXIT_UNREACHABLE, EXIT_LAGGING = 0, 1, 2, 3


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found.

    Problems come in two sorts. *Damage* (:attr:`damage`): an object missing, truncated, of the
    wrong size or corrupt, a commit record or rank manifest that does not parse or match, a
    step that verifies nowhere. *Lagging* (:attr:`lagging`): a step committed on some replica
    but not on this one, absent or only partly written here, as a writer killed between its
    per-replica commits leaves it; nothing stored is wrong, and ``ckptmirror repair`` completes
    the copy. :attr:`status` and :attr:`exit_code` tell them apart.
    """

    replicas: tuple[str, ...]
    quick: bool
    steps: tuple[StepCheck, ...]
    torn: Mapping[str, tuple[int, ...]]  # replica -> steps with objects but no commit anywhere (garbage)
    unreachable: Mapping[str, str]
    notes: tuple[Problem, ...] = ()  # problems not tied to one replica (step not found, ...)

    @property
    def problems(self) -> tuple[Problem, ...]:
        """Every problem, damage and lagging, in step and replica order."""
        out = list(self.notes)
        for s in self.steps:
            for rc in s.replicas:
                out.extend(rc.problems)
        return tuple(out)

    @property
    def damage(self) -> tuple[Problem, ...]:
        """The problems that are damage: every kind but ``lagging``."""
        return tuple(p for p in self.problems if p.kind != "lagging")

    @property
    def lagging(self) -> dict[str, tuple[int, ...]]:
        """Replica -> the steps committed elsewhere but not there (absent or torn there), ascending."""
        out: dict[str, list[int]] = {}
        for p in self.problems:
            if p.kind == "lagging":
                out.setdefault(p.replica, []).append(p.step)
        return {u: tuple(sorted(v)) for u, v in out.items()}

    @property
    def status(self) -> str:
        """``ok``; ``lagging`` (no damage, some replica behind); ``damaged``; ``unreachable``
        (a replica could not be listed: what it holds is unknown, whatever the others show)."""
        if self.unreachable:
            return "unreachable"
        if self.damage or not all(s.recoverable for s in self.steps):
            return "damaged"
        return "lagging" if self.lagging else "ok"

    @property
    def exit_code(self) -> int:
        """0 (:data:`EXIT_OK`): every step verified on every replica; 1 (:data:`EXIT_DAMAGE`):
        damage, lagging copies or not; 2 (:data:`EXIT_UNREACHABLE`): a replica could not be
        reached; 3 (:data:`EXIT_LAGGING`): no damage, only lagging copies ('ckptmirror repair')."""
        return {
            "ok": EXIT_OK,
            "damaged": EXIT_DAMAGE,
            "unreachable": EXIT_UNREACHABLE,
            "lagging": EXIT_LAGGING,
        }[self.status]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``ckptmirror verify --json``): ``problems`` holds every problem,
        ``damage`` and ``lagging`` ({replica: [steps]}) split them; ``status`` and ``exit_code``."""
        d = dataclasses.asdict(self)
        d["problems"] = [p.to_dict() for p in self.problems]
        d["damage"] = [p.to_dict() for p in self.damage]
        d["lagging"] = {u: list(v) for u, v in self.lagging.items()}
        d["status"] = self.status
        d["exit_code"] = self.exit_code
        d["torn"] = {k: list(v) for k, v in self.torn.items()}
        return d


def _step_meta(plans: Sequence[ReplicaPlan]) -> tuple[int | None, int | None, int | None, float | None]:
    """World size, objects, bytes and save time of a step, from the first commit that has them."""
    for plan in plans:
        if plan.commit is not None and all(rp.manifest is not None for rp in plan.ranks):
            ms = [rp.manifest for rp in plan.ranks if rp.manifest is not None]
            return (
                plan.commit.world_size,
                sum(len(m.objects) for m in ms),
                sum(m.stream_bytes for m in ms),
                plan.commit.created_unix,
            )
    for plan in plans:
        if plan.commit is not None:
            return plan.commit.world_size, None, None, plan.commit.created_unix
    return None, None, None, None


def _replica_check(plan: ReplicaPlan) -> ReplicaCheck:
    """The report of one step on one replica, once its objects have been checked."""
    ranks: list[RankCheck] = []
    for rp in plan.ranks:
        m = rp.manifest
        ranks.append(
            RankCheck(
                rp.rank,
                len(m.objects) if m else 0,
                m.stream_bytes if m else 0,
                sum(1 for j in rp.jobs if j.problem is None),
                rp.manifest_problem is None and rp.invalid is None,
                tuple(rp.problems()),
            )
        )
    problems = tuple(plan_problems(plan))
    return ReplicaCheck(plan.step, plan.replica.url, "bad" if problems else "ok", tuple(ranks), problems)


def verify(
    urls: Sequence[str | Replica],
    *,
    step: int | None = None,
    quick: bool = False,
    threads: int = 4,
    progress: ProgressFactory | None = None,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> VerifyReport:
    """Check every committed step (or ``step``) on every replica, each replica on its own.

    Full mode reads every object and checks its size and checksum exactly as a restore would;
    ``quick`` checks commit records, rank manifests (they are small), and the presence and
    size of every object. A step committed on one replica but not on another is reported as
    ``lagging`` on the latter; torn saves (objects without a commit) are listed as garbage, not
    as problems. See :class:`VerifyReport` for the result and its exit code.
    """
    with opened(urls, storage_options) as replicas:
        listing, reachable = list_reachable(replicas)
        # Torn copies of a step committed elsewhere are "lagging" problems, not garbage.
        torn = {u: tuple(sorted(s for s in v if s not in listing.committed)) for u, v in listing.torn.items()}
        torn = {u: v for u, v in torn.items() if v}
        notes: list[Problem] = []
        if step is not None and step not in listing.committed:
            notes.append(
                Problem(
                    step,
                    "",
                    commit_key(step),
                    "missing",
                    f"step {step} is not committed on any replica (committed: {sorted(listing.committed)})",
                )
            )
            steps: list[int] = []
        else:
            steps = sorted(listing.committed) if step is None else [step]
        if not steps and step is None and any(listing.torn.values()):
            notes.append(
                Problem(-1, "", "", "unrecoverable", "the replicas hold interrupted saves but no committed step")
            )
        eng = Engine(reachable, threads, quick, progress)
        try:
            per_step: list[tuple[int, list[ReplicaPlan], list[ReplicaCheck]]] = []
            jobs: list[ObjJob] = []
            for s in steps:
                holders = listing.committed[s]
                plans: list[ReplicaPlan] = []
                absent: list[ReplicaCheck] = []
                for r in reachable:
                    if r.url in holders:
                        plan = eng.replica_plan(r, s)
                        plans.append(plan)
                        jobs.extend(plan.jobs())
                    else:
                        is_torn = s in listing.torn.get(r.url, [])
                        status = "torn" if is_torn else "absent"
                        others = ", ".join(u for u in holders)
                        p = Problem(
                            s,
                            r.url,
                            commit_key(s),
                            "lagging",
                            f"step {s} is committed on {others} but "
                            f"{'only partly written' if is_torn else 'absent'} here",
                        )
                        absent.append(ReplicaCheck(s, r.url, status, (), (p,)))
                per_step.append((s, plans, absent))
            eng.run(jobs, "verify --quick" if quick else "verify")
            eng.complete([p for _, plans, _ in per_step for p in plans], "verify: other copies")
            out_steps: list[StepCheck] = []
            order = {r.url: i for i, r in enumerate(replicas)}
            for s, plans, absent in per_step:
                checks = sorted([_replica_check(p) for p in plans] + absent, key=lambda c: order[c.replica])
                ws, nobj, nbytes, created = _step_meta(plans)
                out_steps.append(StepCheck(s, ws, nobj, nbytes, created, recoverable(eng, plans), tuple(checks)))
        finally:
            eng.close()
        return VerifyReport(
            tuple(r.url for r in replicas), quick, tuple(out_steps), torn, dict(listing.unreachable), tuple(notes)
        )
