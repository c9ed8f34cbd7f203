"""``verify``: check every object of every committed step on every replica, each on its own.

Peer agents that scrub (``ckptmirror serve --scrub-interval``) have re-read and re-hashed what
they store already; pulling every byte over the network to hash it again costs the whole
checkpoint's size in traffic, where their answer costs one request. So for a peer replica, a
full verify asks the agent for its scrub results
(:meth:`~ckptmirror.replicas.peer.PeerReplica.scrub_report`) and takes an object's result from
them instead of reading it when all of this holds:

- the agent has a finished check of the step (it publishes one per step as soon as the step is
  done, and drops it when anything in the step is written or deleted, so it is about the bytes
  stored now);
- that check is younger than ``scrub_max_age_s`` (by the agent's own clock: ``age_s``);
- it is about the commit record this verify read from that replica (same XXH3 of its bytes), and
  its rank manifests are the ones that commit pins (same key and checksum, parsed, as many
  objects as the manifest lists): a manifest pins each object's size and checksum, so the agent
  checked *these* objects, not just objects of these names.

Everything else (a step saved or repaired since the last pass, a rank whose manifest the agent
could not read, an agent that does not scrub or is too old to say) is read and hashed as usual.
Damage in the results is reported like damage found by reading (same kinds, same exit code),
with "scrubbed by agent at ..." in front of the agent's description. A ``quick`` verify takes
only that damage from the results, under the same conditions, and checks every other object's
presence and size as usual (the agent's "good" may predate a file removed since).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..checksum import checksum
from ..format import MAX_MANIFEST_BYTES, CommitRecord, commit_key
from ..replicas import Replica
from ..replicas.peer import ScrubUnavailableError
from ._common import (
    FAILURES,
    Problem,
    ProgressFactory,
    UsageError,
    empty_hint,
    kept_steps,
    list_reachable,
    opened,
    strip_where,
)
from ._engine import Engine, KeptForReferences, ObjJob, ReplicaPlan, plan_problems, recoverable, unchecked_ranks
from ._verify_recheck import files_of, first_save, recheck, settle

#: How old a peer agent's scrub results may be for ``verify`` to use them (``--scrub-max-age``):
#: a day, the scrub interval an agent is most likely run with.
DEFAULT_SCRUB_MAX_AGE_S = 86400.0


@dataclass(frozen=True)
class RankCheck:
    """One rank of one step on one replica."""

    rank: int
    objects: int
    bytes: int
    verified: int  # objects that passed
    manifest_ok: bool
    problems: tuple[Problem, ...]
    scrubbed: int = 0  # objects whose result is the peer agent's scrub (not read by this verify)
    read: int = 0  # objects checked by this verify itself (read and hashed; presence and size if quick)
    #: False: a partial replica that is not meant to hold this rank (its share record, written
    #: with the commit, leaves it out; see :mod:`ckptmirror.format.share`); nothing checked here.
    held: bool = True

    @property
    def ok(self) -> bool:
        """No problem with this rank on this replica."""
        return not self.problems


@dataclass(frozen=True)
class ScrubbedBy:
    """The objects of one step on one replica whose results came from the peer agent's scrub.

    ``checked_unix``: when the agent finished checking the step, on this machine's clock (the
    time of the answer less the agent's ``age_s``: the two machines' clocks need not agree);
    ``keys``: those objects, damaged ones included; the step's other objects were read here.
    """

    checked_unix: float
    age_s: float
    keys: tuple[str, ...]


@dataclass(frozen=True)
class ReplicaCheck:
    """One step on one replica. ``status``: ``ok``, ``bad``, ``absent`` or ``torn`` (not committed
    here), ``removed`` (its commit record gone by the end of the check: retention or ``prune``
    deleted it meanwhile; nothing reported, see :mod:`._verify_recheck`) or ``saving`` (not
    committed here yet, files added during the check: a save is writing it; not lagging).

    ``scrubbed``: the objects taken from the peer agent's scrub results instead of being read (None: none).
    """

    step: int
    replica: str
    status: str
    ranks: tuple[RankCheck, ...]
    problems: tuple[Problem, ...]
    scrubbed: ScrubbedBy | None = None

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
    #: Ranks that no replica checked here holds: each is a partial replica (a node-local
    #: directory, a ``ring_peer`` namespace) whose share record leaves them out. They are on
    #: other nodes' replicas; ``recoverable`` is about the other ranks only.
    unchecked_ranks: tuple[int, ...] = ()
    #: Not recoverable as stored, but ``repair`` can rebuild it: every object it lacks verifies
    #: under another name (another step's file with the same bytes; steps share files through
    #: incremental saves, or hold the same bytes when one replica takes self-contained saves).
    rebuildable: bool = False


#: What :attr:`VerifyReport.exit_code` means (``ckptmirror verify --help`` prints the same).
EXIT_OK, EXIT_DAMAGE, EXIT_UNREACHABLE, EXIT_LAGGING = 0, 1, 2, 3


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found.

    Problems come in two sorts. *Damage* (:attr:`damage`): an object missing, truncated, of the
    wrong size or corrupt, a commit record or rank manifest that does not parse or match, a
    step that verifies nowhere, replicas that hold different checkpoints under one step number
    (``disagree``: their commit records differ). *Lagging* (:attr:`lagging`): a step committed on some replica
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
    #: Peer replica -> whether its agent's scrub results were used, and why not (see the module docstring).
    scrub: Mapping[str, str] = field(default_factory=dict)
    #: Replica -> step directories without a commit record that only keep objects later steps
    #: there reference (incremental saves: what retention leaves of a dropped step); not torn.
    kept_for_references: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    #: Replica -> steps removed there during the check (a job's ``keep_last`` retention, a
    #: ``prune``): what was found missing of them is not damage. Steps removed from every
    #: replica leave :attr:`steps`. See :mod:`ckptmirror.ops._verify_recheck`.
    removed_during_check: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    #: Replica -> steps that committed there during the check (a save in progress at the
    #: listing): checked once more there, not lagging.
    committed_during_check: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    #: Replica -> steps without a commit record there whose files changed during the check: a
    #: save writing them (a step committed on another replica: not lagging; a first save, with
    #: no step committed anywhere: not an interrupted save). No damage.
    in_progress: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    #: Replica -> what to check, for each replica that answered and holds nothing at all (no
    #: step, no step directory): a mistyped path or namespace looks like that, as does a run
    #: before its first save (which is why it does not change the exit status). As ``ls``.
    empty: Mapping[str, str] = field(default_factory=dict)
    #: ``keep`` (``verify --keep N``: the job's ``keep_last``): replica -> the steps it lacks
    #: that are neither among the newest N steps committed anywhere nor pinned. Retention
    #: removes those (one replica's pass may come while another is down, which then still holds
    #: them), so they are not expected on every replica: not lagging, and repair leaves them.
    not_kept: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    keep: int | None = None

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
        """The problems that are damage: every kind but ``lagging`` and ``unavailable``."""
        return tuple(p for p in self.problems if p.kind not in ("lagging", "unavailable"))

    @property
    def unavailable(self) -> dict[str, tuple[Problem, ...]]:
        """Replica -> its ``unavailable`` problems: it stopped answering during the check (no
        answer within its time budget, refused, throttled throughout), so what it holds there
        was not checked. An outage, not damage: the exit status is 2, as for ``unreachable``."""
        out: dict[str, list[Problem]] = {}
        for p in self.problems:
            if p.kind == "unavailable":
                out.setdefault(p.replica, []).append(p)
        return {u: tuple(v) for u, v in out.items()}

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
        (a replica could not be listed, or stopped answering during the check: what it holds is
        unknown, whatever the others show).

        Damage found on the replicas that answered wins over an outage: it is certain, and a
        script that retries on ``unreachable`` must not sit on it until the outage ends (the
        report lists both). A step that is not recoverable only for want of the replicas that
        did not answer is ``unreachable``: its copies may be intact there, and so is a note about
        the step as a whole ("not committed on any replica"), which only the replicas that
        answered could tell."""
        if any(p.replica for p in self.damage):  # found on a replica that answered: certain
            return "damaged"
        if self.unreachable or self.unavailable:
            return "unreachable"
        if self.damage or not all(s.recoverable for s in self.steps):
            return "damaged"
        return "lagging" if self.lagging else "ok"

    @property
    def exit_code(self) -> int:
        """0 (:data:`EXIT_OK`): every step verified on every replica; 1 (:data:`EXIT_DAMAGE`):
        damage, lagging copies or unreachable replicas or not; 2 (:data:`EXIT_UNREACHABLE`): no
        damage found, but a replica could not be reached; 3 (:data:`EXIT_LAGGING`): no damage,
        only lagging copies ('ckptmirror repair')."""
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
        d["unavailable"] = {u: len(v) for u, v in self.unavailable.items()}
        d["status"] = self.status
        d["exit_code"] = self.exit_code
        d["torn"] = {k: list(v) for k, v in self.torn.items()}
        d["kept_for_references"] = {k: list(v) for k, v in self.kept_for_references.items()}
        d["not_kept"] = {k: list(v) for k, v in self.not_kept.items()}
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


def _replica_check(
    plan: ReplicaPlan, scrubbed: ScrubbedBy | None = None, extra: Sequence[Problem] = ()
) -> ReplicaCheck:
    """The report of one step on one replica, once its objects have been checked; ``extra``:
    problems found by comparing it with the other replicas (:func:`_disagreements`)."""
    ranks: list[RankCheck] = []
    from_scrub = set(scrubbed.keys) if scrubbed else set()
    for rp in plan.ranks:
        m = rp.manifest
        n_scrubbed = sum(1 for j in rp.jobs if j.obj.key in from_scrub)
        ranks.append(
            RankCheck(
                rp.rank,
                len(m.objects) if m else 0,
                m.stream_bytes if m else 0,
                sum(1 for j in rp.jobs if j.problem is None),
                rp.manifest_problem is None and rp.invalid is None,
                tuple(rp.problems()),
                n_scrubbed,
                len(rp.jobs) - n_scrubbed,
                rp.held,
            )
        )
    problems = tuple(plan_problems(plan)) + tuple(extra)
    status = "bad" if problems else "ok"
    return ReplicaCheck(plan.step, plan.replica.url, status, tuple(ranks), problems, scrubbed)


def _when_exact(ts: float) -> str:
    ms = int(round((ts % 1) * 1000)) % 1000
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{ms:03d}"


def _commit_difference(here: CommitRecord, there: CommitRecord) -> str:
    """How two commit records of one step differ, in words (``here`` vs ``there``)."""
    parts: list[str] = []
    if [(r.key, r.checksum) for r in here.ranks] != [(r.key, r.checksum) for r in there.ranks]:
        a = here.ranks[0].key if here.ranks else "-"
        b = there.ranks[0].key if there.ranks else "-"
        parts.append(f"rank manifests {a} here, {b} there" if a != b else "other rank manifest checksums")
    if here.world_size != there.world_size:
        parts.append(f"{here.world_size} rank(s) here, {there.world_size} there")
    if here.created_unix != there.created_unix:
        parts.append(f"saved {_when_exact(here.created_unix)} here, {_when_exact(there.created_unix)} there")
    return "; ".join(parts) or "other fields"


def _disagreements(eng: Engine, step: int, plans: Sequence[ReplicaPlan]) -> dict[int, list[Problem]]:
    """id(plan) -> a ``disagree`` problem, for each replica whose commit record of ``step``
    differs from the one a restore would read; or an ``invalid`` one, for a record that differs
    and does not verify while another does (see below).

    One save writes the same commit record to every replica, so two replicas with different
    records hold different checkpoints under one step number (a step directory copied from
    another run, a step overwritten while a replica was down), each of which may verify on its
    own. A restore reads the commit of the first replica in read order (local disk first, then
    the order given) where it parses and verifies; the others are flagged. A record whose pins
    verify nowhere while another replica's record of the step does is damage, not another
    checkpoint (one flipped bit in a pinned checksum still parses): ``invalid``, and ``repair``
    replaces it; calling the whole copy foreign would have had the operator delete it.

    The record that verifies is judged by content: it may lack objects under its own names
    that verify under another step's (incremental saves share files): it is still the evidence
    that the other record is damaged, and ``repair`` rebuilds from it. Judged by names alone, a
    damaged record beside such a step was called another checkpoint, and repair refused the step
    that verify said it could rebuild.
    """
    valid = [p for p in plans if p.commit is not None]
    if len({p.commit.pins for p in valid if p.commit is not None}) <= 1:
        return {}
    rank = {r.url: i for i, r in enumerate(eng.replicas)}
    valid.sort(key=lambda p: rank[p.replica.url])
    out: dict[int, list[Problem]] = {}
    whole = [p for p in valid if recoverable(eng, [p], by_content=True)]
    for p in valid:
        # Damaged, not foreign: a record of the same save (same manifest files) as one that
        # verifies, with a pin that matches no manifest on any replica, every replica answering
        # (restore switches records in exactly that case; an outage or damaged objects are not it).
        twin = next(
            (
                w
                for w in whole
                if w.commit is not None
                and p.commit is not None
                and w.commit.same_save(p.commit)
                and w.commit.pins != p.commit.pins
            ),
            None,
        )
        if twin is None or eng.down or not any(rp.held and rp.manifest is None for rp in p.ranks):
            continue
        out[id(p)] = [
            Problem(
                step,
                p.replica.url,
                commit_key(step),
                "invalid",
                "this commit record pins a rank manifest that verifies on no replica, where the record of the "
                f"same save on {twin.replica.url} verifies (a damaged record: one flipped bit still parses): "
                + (
                    "a restore reads that one, 'ckptmirror repair' writes it here"
                    if recoverable(eng, [twin])
                    else "'ckptmirror repair' rebuilds that step from objects that verify under another step's "
                    "name and writes its record here"
                ),
            )
        ]
    valid = [p for p in valid if id(p) not in out]
    if len({p.commit.pins for p in valid if p.commit is not None}) <= 1:
        return out
    first = valid[0]
    assert first.commit is not None
    same = [p.replica.url for p in valid if p.commit is not None and p.commit.pins == first.commit.pins]
    for p in valid:
        if p.commit is None or p.commit.pins == first.commit.pins:
            continue
        assert p.commit is not None
        detail = (
            f"step {step} here is another checkpoint than on {', '.join(same)}: the commit records differ "
            f"({_commit_difference(p.commit, first.commit)}); a restore of step {step} reads the one on "
            f"{first.replica.url}. Delete step {step} on the replica(s) holding the foreign copy, then "
            "'ckptmirror repair' with all the replicas copies the other one there"
        )
        out[id(p)] = [Problem(step, p.replica.url, commit_key(step), "disagree", detail)]
    return out


# ------------------------------------------------------------------ the peer agent's scrub results


@dataclass(frozen=True)
class _ScrubbedStep:
    """One step of an agent's scrub results, as far as :func:`_use_scrub` needs it."""

    commit_checksum: str
    age_s: float
    checked_unix: float  # on this machine's clock
    ranks: Mapping[int, tuple[str, str, bool, int]]  # rank -> (manifest key, checksum, manifest_ok, objects)
    problems: Mapping[str, tuple[str, str]]  # object key -> (kind, detail)


def _parse_scrub_step(entry: Any, received: float) -> tuple[int, _ScrubbedStep] | None:
    """(step, its result) from one entry of ``GET /v1/scrub/<ns>``; None if it does not have the
    expected shape (then its objects are read: a result we cannot read proves nothing)."""
    try:
        age = float(entry["age_s"])
        ranks = {
            int(r["rank"]): (str(r["key"]), str(r["checksum"]), bool(r["manifest_ok"]), int(r["objects"]))
            for r in entry["ranks"]
        }
        problems = {str(p["key"]): (str(p["kind"]), str(p["detail"])) for p in entry["problems"]}
        step = int(entry["step"])
        result = _ScrubbedStep(str(entry["commit_checksum"]), age, received - age, ranks, problems)
    except (KeyError, TypeError, ValueError):
        return None
    if not math.isfinite(age) or age < 0:
        return None
    return step, result


def _scrub_results(
    replicas: Sequence[Replica], max_age_s: float
) -> tuple[dict[str, dict[int, _ScrubbedStep]], dict[str, str]]:
    """The scrub results of every peer replica whose agent has some, and per peer replica a
    note on whether they can be used (:attr:`VerifyReport.scrub`). Also with ``--quick``,
    which takes only the damage they report (see :func:`_use_scrub`)."""
    results: dict[str, dict[int, _ScrubbedStep]] = {}
    notes: dict[str, str] = {}
    for r in replicas:
        fetch = getattr(r, "scrub_report", None)
        if not callable(fetch):
            continue  # not a peer agent: nobody but this verify can check its bytes
        if max_age_s <= 0:
            notes[r.url] = "not used: turned off (every object is read)"
            continue
        try:
            doc = fetch()
        except ScrubUnavailableError as exc:
            notes[r.url] = f"not used: {strip_where(str(exc), r.url, '')}"
            continue
        except FAILURES as exc:
            # The reads that follow will say what is wrong with the replica; here it only
            # means that its objects are read.
            notes[r.url] = f"not used: could not get the agent's scrub results: {strip_where(str(exc), r.url, '')}"
            continue
        received = time.time()
        parsed = (_parse_scrub_step(e, received) for e in doc["steps"])
        results[r.url] = dict(x for x in parsed if x is not None)
    return results, notes


def _scrub_note(url: str, checks: Sequence[ReplicaCheck], max_age_s: float, quick: bool) -> str:
    """The :attr:`VerifyReport.scrub` note of a peer replica whose agent gave its results."""
    mine = [c for c in checks if c.replica == url and c.status in ("ok", "bad")]
    used = [c for c in mine if c.scrubbed is not None]
    fresh = f"at most {_duration(max_age_s)} old and about the commit stored there"
    if not mine:
        return "no committed step there to use them for"
    if quick:
        bad = sum(len(c.scrubbed.keys) for c in used if c.scrubbed is not None)
        return (
            f"--quick: only the damage they report is taken ({bad} object(s) in {len(used)} step(s), results {fresh}); "
            "presence and sizes checked here"
        )
    if len(used) == len(mine) and all(rk.read == 0 for c in used for rk in c.ranks):
        return f"used for every step ({len(used)}): no object read there ({fresh})"
    if not used:
        return f"not used: no result {fresh} (every object read there)"
    return f"used for {len(used)} of {len(mine)} step(s) where {fresh}; the other objects were read"


def _duration(seconds: float) -> str:
    """``86400`` -> ``1d``, ``90`` -> ``90s``: the largest unit that divides it."""
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"


def _use_scrub(
    eng: Engine, plan: ReplicaPlan, steps: Mapping[int, _ScrubbedStep] | None, max_age_s: float, quick: bool
) -> tuple[list[ObjJob], ScrubbedBy | None]:
    """Settle the objects of ``plan`` that the agent's scrub results cover (module docstring);
    return the jobs left to read, and what was taken from the results.

    With ``quick``, only the damage they report is taken: the agent read and hashed those
    bytes, which a quick check never does (it reported OK over objects the agent had found
    corrupt). An object the results call good is still checked for presence and size here: it
    may have gone since the agent read it."""
    jobs = plan.jobs()
    res = steps.get(plan.step) if steps is not None else None
    if res is None or plan.commit is None or res.age_s > max_age_s:
        return jobs, None
    r = plan.replica
    try:
        # The bytes of the record the engine parsed, to compare with the agent's: a step
        # deleted and saved again under the same number is another record (a few hundred bytes).
        raw = r.get(commit_key(plan.step), MAX_MANIFEST_BYTES)
    except FAILURES:
        return jobs, None
    if checksum(raw) != res.commit_checksum:
        return jobs, None
    named = {commit_key(plan.step)} | {rp.key for rp in plan.ranks} | {j.obj.key for j in jobs}
    if not set(res.problems) <= named:
        # Damage under a name this commit does not give (an agent that stores objects under
        # other names than the manifest's): which of our objects it is cannot be told, so none
        # of the step's results is taken as proof that an object is good.
        return jobs, None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(res.checked_unix))
    keys: list[str] = []
    left: list[ObjJob] = []
    for rp in plan.ranks:
        scrubbed = res.ranks.get(rp.rank)
        covered = (
            scrubbed is not None
            and rp.manifest is not None
            and scrubbed[:3] == (rp.key, rp.checksum, True)
            and scrubbed[3] == len(rp.manifest.objects)
        )
        if not covered:
            left.extend(rp.jobs)
            continue
        for job in rp.jobs:
            bad = res.problems.get(job.obj.key)
            if quick and bad is None:
                left.append(job)
                continue
            problem = (
                Problem(plan.step, r.url, job.obj.key, bad[0], f"scrubbed by agent at {when}: {bad[1]}", job.rank)
                if bad is not None
                else None
            )
            eng.settle(job, problem)
            keys.append(job.obj.key)
    if not keys:
        return left, None
    return left, ScrubbedBy(res.checked_unix, res.age_s, tuple(keys))


def _settle_changes(
    eng: Engine,
    per_step: list[tuple[int, list[ReplicaPlan], list[ReplicaCheck]]],
    before: Mapping[tuple[str, int], frozenset[str]],
    listed_at: float,
) -> tuple[list[tuple[int, list[ReplicaPlan], list[ReplicaCheck]]], dict[str, dict[str, list[int]]]]:
    """``per_step`` (step, its plans, its lagging replicas' checks) once the steps with problems
    have been looked at again (:func:`._verify_recheck.recheck`): steps removed everywhere left
    out, copies removed during the check marked ``removed``, copies being saved ``saving``,
    copies committed during the check checked. Also, per change (``removed``, ``committed``,
    ``saving``): replica -> steps."""
    if any(absent for _, _, absent in per_step):
        settle(listed_at)
    out: list[tuple[int, list[ReplicaPlan], list[ReplicaCheck]]] = []
    changes: dict[str, dict[str, list[int]]] = {"removed": {}, "committed": {}, "saving": {}}
    for s, plans, absent in per_step:
        rc = recheck(eng, s, plans, [c.replica for c in absent], before)
        for kind, urls in (("removed", rc.removed), ("committed", rc.committed), ("saving", rc.saving)):
            for u in urls:
                changes[kind].setdefault(u, []).append(s)
        if rc.gone:
            continue
        changed = set(rc.committed) | set(rc.removed) | set(rc.saving)
        left = [c for c in absent if c.replica not in changed]
        left += [ReplicaCheck(s, u, "removed", (), ()) for u in rc.removed]
        left += [ReplicaCheck(s, u, "saving", (), ()) for u in rc.saving]
        out.append((s, rc.plans, left))
    return out, changes


def verify(
    urls: Sequence[str | Replica],
    *,
    step: int | None = None,
    quick: bool = False,
    threads: int = 4,
    progress: ProgressFactory | None = None,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    scrub_max_age_s: float = DEFAULT_SCRUB_MAX_AGE_S,
    keep: int | None = None,
) -> VerifyReport:
    """Check every committed step (or ``step``) on every replica, each replica on its own.

    Full mode reads every object and checks its size and checksum exactly as a restore would;
    ``quick`` checks commit records, rank manifests (they are small), and the presence and
    size of every object. A step committed on one replica but not on another is reported as
    ``lagging`` on the latter; torn saves (objects without a commit) are listed as garbage, not
    as problems, and a directory that only keeps objects later steps reference (a step that
    retention dropped, incremental saves) is neither. Replicas whose commit records of one step
    differ hold different checkpoints under that number: damage of kind ``disagree`` on each
    replica whose record is not the one a restore would read. See :class:`VerifyReport` for the
    result and its exit code.

    On a peer replica whose agent scrubs, full mode takes each object's result from the agent's
    scrub results instead of reading it, where they are at most ``scrub_max_age_s`` old and
    about the commit stored now (see the module docstring); ``scrub_max_age_s=0`` reads everything.

    A job may save meanwhile: before a problem or a lagging copy is reported, the replicas
    concerned are looked at again (:mod:`._verify_recheck`). Steps its retention removed during
    the check are in ``removed_during_check``, not damage; copies that committed during the check
    are checked (``committed_during_check``); copies being written are ``in_progress``.

    ``keep``: the job's ``keep_last``. A step that is neither among the newest ``keep`` steps
    committed anywhere nor pinned is not expected on every replica (one replica's retention
    removed it while another, down then, still holds it): where it is missing, it is listed in
    ``not_kept``, not as lagging. Its copies that exist are checked as any other.
    """
    if keep is not None and keep < 1:
        raise UsageError(f"--keep must be at least 1, got {keep}")
    with opened(urls, storage_options) as replicas:
        listing, reachable = list_reachable(replicas)
        expected = kept_steps(reachable, listing.committed, keep)
        not_kept: dict[str, list[int]] = {}
        # Torn copies of a step committed elsewhere are "lagging" problems, not garbage. A directory
        # that only keeps objects later steps reference (a step retention dropped) is neither.
        torn = {u: tuple(sorted(s for s in v if s not in listing.committed)) for u, v in listing.torn.items()}
        refs = KeptForReferences(listing)
        torn, kept = refs.split(reachable, {u: v for u, v in torn.items() if v})
        notes: list[Problem] = []
        # Step-level notes speak for the replicas that answered only (see VerifyReport.status).
        answered = " that answered" if listing.unreachable else ""
        if step is not None and step not in listing.committed:
            notes.append(
                Problem(
                    step,
                    "",
                    commit_key(step),
                    "missing",
                    f"step {step} is not committed on any replica{answered} (committed: {sorted(listing.committed)})",
                )
            )
            steps: list[int] = []
        else:
            steps = sorted(listing.committed) if step is None else [step]
        no_commit: Problem | None = None
        if not steps and step is None and any(torn.values()):
            no_commit = Problem(
                -1, "", "", "unrecoverable", f"the replicas{answered} hold interrupted saves but no committed step"
            )
            notes.append(no_commit)
        # What those torn saves hold now: whether it changes tells a first save in progress.
        before_first = files_of(reachable, torn) if no_commit is not None else {}
        # ... and those of the torn copies of steps committed elsewhere (lagging, or not: a
        # save writing them, a retention deleting them)
        before_lagging = files_of(
            reachable, {u: [s for s in v if s in listing.committed and s in steps] for u, v in listing.torn.items()}
        )
        listed_at = time.monotonic()
        in_progress: dict[str, list[int]] = {}
        eng = Engine(reachable, threads, quick, progress)
        scrub_results, scrub_notes = _scrub_results(reachable, scrub_max_age_s)
        scrubbed: dict[int, ScrubbedBy] = {}  # id(plan) -> what its agent's scrub settled
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
                        left, by = _use_scrub(eng, plan, scrub_results.get(r.url), scrub_max_age_s, quick)
                        jobs.extend(left)
                        if by is not None:
                            scrubbed[id(plan)] = by
                    else:
                        is_torn = s in listing.torn.get(r.url, [])
                        if expected is not None and s not in expected:
                            # Retention's to remove (a torn copy: a pass that stopped): not lagging.
                            not_kept.setdefault(r.url, []).append(s)
                            continue
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
            # A job that saves meanwhile (retention deleting, a save committing) is not damage.
            # Nothing committed at the listing: a first save may have committed since, or be writing.
            since: dict[int, list[ReplicaPlan]] = {}
            moving: dict[str, list[int]] = {}
            if no_commit is not None:
                since, moving = first_save(eng, torn, before_first, listed_at)
                if since or moving:  # a first save, not an interrupted one
                    notes.remove(no_commit)
                per_step += [(s, plans, []) for s, plans in sorted(since.items())]
            per_step, changes = _settle_changes(eng, per_step, before_lagging, listed_at)
            removed_on, committed_on, in_progress = changes["removed"], changes["committed"], changes["saving"]
            for s, plans, _ in per_step:
                for new in plans if s in since else ():
                    committed_on.setdefault(new.replica.url, []).append(s)
            for u, v in moving.items():
                in_progress.setdefault(u, []).extend(v)
            if since or moving:
                torn = {
                    u: rest
                    for u, v in torn.items()
                    if (rest := tuple(x for x in v if x not in since and x not in moving.get(u, ())))
                }
            out_steps: list[StepCheck] = []
            order = {r.url: i for i, r in enumerate(replicas)}
            for s, plans, absent in per_step:
                differ = _disagreements(eng, s, plans)
                checks = sorted(
                    [_replica_check(p, scrubbed.get(id(p)), differ.get(id(p), ())) for p in plans] + absent,
                    key=lambda c: order[c.replica],
                )
                ws, nobj, nbytes, created = _step_meta(plans)
                out_steps.append(
                    StepCheck(
                        s,
                        ws,
                        nobj,
                        nbytes,
                        created,
                        ok := recoverable(eng, plans),
                        tuple(checks),
                        unchecked_ranks(plans),
                        # Not when replicas dispute the step: repair leaves it to the operator.
                        not ok
                        and not any(q.kind == "disagree" for found in differ.values() for q in found)
                        and recoverable(eng, plans, by_content=True),
                    )
                )
        finally:
            eng.close()
        all_checks = [c for st in out_steps for c in st.replicas]
        for url in scrub_results:
            scrub_notes[url] = _scrub_note(url, all_checks, scrub_max_age_s, quick)
        return VerifyReport(
            tuple(r.url for r in replicas),
            quick,
            tuple(out_steps),
            torn,
            dict(listing.unreachable),
            tuple(notes),
            scrub_notes,
            kept,
            {u: tuple(v) for u, v in removed_on.items()},
            {u: tuple(v) for u, v in committed_on.items()},
            {u: tuple(v) for u, v in in_progress.items()},
            {
                r.url: empty_hint(r.url)
                for r in reachable
                if not listing.torn.get(r.url) and not any(r.url in us for us in listing.committed.values())
            },
            {u: tuple(sorted(v)) for u, v in not_kept.items()},
            keep,
        )
