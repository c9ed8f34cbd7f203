"""What the operator commands of the ``ckptmirror`` command line print.

Each command is a :mod:`ckptmirror.ops` call and a function that turns its report into text
lines; ``--json`` prints the report's ``to_dict()`` instead. Imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from .. import ops


class _Report(Protocol):
    """What every ops report has: a JSON-ready form."""

    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=_Report)


@dataclass(frozen=True)
class _Command(Generic[R]):
    """An operator command: the library call, and its report as text."""

    call: Callable[[argparse.Namespace], R]
    lines: Callable[[R], list[str]]


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.command``, print its report (as JSON with ``--json``); return its exit status."""
    command: _Command[Any] = _COMMANDS[args.command]
    res = command.call(args)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        sys.stdout.write("\n".join(command.lines(res)) + "\n")
    # inspect and export have no exit_code: they succeed (0) or raise.
    return int(getattr(res, "exit_code", 0))


def _progress(args: argparse.Namespace) -> ops.ProgressFactory | None:
    """A tqdm bar factory when stderr is a terminal and tqdm is installed; else None."""
    if getattr(args, "no_progress", False) or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None

    def make(total: int, unit: str, desc: str) -> Any:
        return tqdm(
            total=total or None,  # 0: not known beforehand (a count and a rate, no percentage)
            unit=unit,
            unit_scale=True,
            unit_divisor=1024 if unit == "B" else 1000,
            desc=desc,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )

    return make


def _scrub_max_age(args: argparse.Namespace) -> float:
    """``verify``'s ``scrub_max_age_s``: 0 with ``--no-scrub-results``, else ``--scrub-max-age`` or the default."""
    from ..ops.verify import DEFAULT_SCRUB_MAX_AGE_S

    if args.no_scrub_results:
        return 0.0
    return DEFAULT_SCRUB_MAX_AGE_S if args.scrub_max_age is None else float(args.scrub_max_age)


# -- rendering ---------------------------------------------------------------------------------


def _size(n: int | None) -> str:
    """Bytes in binary units; "?" if unknown."""
    if n is None:
        return "?"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{int(v)} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{n} B"


def _when(ts: float | None) -> str:
    """A Unix time as local date and time; "?" if unknown."""
    if ts is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _age(ts: float | None) -> str:
    """How long ago a Unix time was, in its largest whole unit (d, h, m, s); "?" if unknown."""
    if ts is None:
        return "?"
    d = max(0.0, time.time() - ts)
    for unit, secs in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= secs:
            return f"{int(d // secs)}{unit}"
    return f"{int(d)}s"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "") -> list[str]:
    """Left-aligned columns, as wide as their widest cell."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]


def _legend(urls: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Short tags ``[1]``, ``[2]`` ... for the replicas (URLs are too long for table columns), and their legend."""
    tags = {u: f"[{i + 1}]" for i, u in enumerate(urls)}
    return tags, ["replicas:"] + [f"  {tags[u]} {u}" for u in urls]


def _first(items: Sequence[str], n: int) -> str:
    """The first ``n`` items, comma-separated, with " ..." if there are more."""
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")


def _unreachable_lines(unreachable: Mapping[str, str], tags: dict[str, str]) -> list[str]:
    """One line per replica that could not be listed, with its tag and the error."""
    return [f"UNREACHABLE {tags.get(u, '')} {u}: {e}" for u, e in unreachable.items()]


def _stored_note(storage: Any) -> str:
    """``stored 0.7 GB (zstd 12, 30 referenced)``: how the replicas store a step, where it is not raw."""
    parts = []
    for st in storage.values():
        if st.get("compressed") or st.get("referenced"):
            what = [f"{st['compressed']} compressed"] if st.get("compressed") else []
            what += [f"{st['referenced']} referenced"] if st.get("referenced") else []
            parts.append(f"stored {_size(st['stored_bytes'] - st['referenced_bytes'])} new ({', '.join(what)})")
    return "; ".join(dict.fromkeys(parts))


def _ls_lines(res: ops.Listing) -> list[str]:
    """What ``ckptmirror ls`` prints without ``--json``."""
    tags, lines = _legend(res.replicas)
    if not res.steps:
        lines.append("no steps")
    # A replica that holds nothing at all is most often a mistyped namespace, prefix or path:
    # say so per replica rather than let "no steps" pass for a clean run.
    lines += [f"{tags[u]} {u}: empty (no steps, no step directories): {hint}" for u, hint in res.empty.items()]
    if res.steps:
        rows: list[list[Any]] = []
        for s in res.steps:
            cells = [
                "?"
                if u in res.unreachable
                else "committed"
                if u in s.committed_on
                else "torn"
                if u in s.torn_on
                else "refs"
                if u in s.kept_for_references_on
                else "-"
                for u in res.replicas
            ]
            note = (
                ("objects later steps reference" if s.kept_for_references_on else "no committed copy")
                if not s.committed_on
                else (s.error or _stored_note(s.storage))
            )
            if s.ranks_not_held:
                note = "; ".join(
                    p
                    for p in (
                        note,
                        f"rank(s) {_steps_text(s.ranks_not_held)} not held by these replicas (partial: size and "
                        "objects are the other ranks')",
                    )
                    if p
                )
            # Replicas that stopped answering mid-run: their cells are the initial listing's only.
            stopped = [tags[u] for u in s.not_listed_on]
            if stopped:
                note = "; ".join(
                    p for p in (note, f"not listed on {' '.join(stopped)} (stopped answering: see UNREACHABLE)") if p
                )
            rows.append(
                [
                    s.step,
                    *cells,
                    _size(s.bytes),
                    s.objects if s.objects is not None else "?",
                    s.world_size or "?",
                    _when(s.created_unix),
                    _age(s.created_unix),
                    note,
                ]
            )
        lines += _table(
            ["STEP", *[tags[u] for u in res.replicas], "SIZE", "OBJECTS", "RANKS", "SAVED", "AGE", "NOTE"], rows
        )
        garbage = [(s, u, keys) for s in res.steps for u, keys in s.garbage.items()]
        if garbage:
            lines.append("garbage and incomplete copies (see 'ckptmirror prune' and 'ckptmirror repair'):")
            for s, u, keys in garbage:
                what = (
                    ("incomplete copy ('ckptmirror repair' completes it)" if s.committed_on else "interrupted save")
                    if u in s.torn_on
                    else "leftovers"
                )
                lines.append(f"  {tags[u]} step {s.step}: {what}, {len(keys)} key(s): " + _first(keys, 3))
    lines += _unreachable_lines(res.unreachable, tags)
    return lines


def _verify_lines(res: ops.VerifyReport) -> list[str]:
    """What ``ckptmirror verify`` prints without ``--json``."""
    tags, lines = _legend(res.replicas)
    any_scrubbed = any(rc.scrubbed is not None for s in res.steps for rc in s.replicas)
    mode = (
        "quick: manifests, presence, sizes"
        if res.quick
        else "full: every byte checksummed, read here or scrubbed by its peer agent"
        if any_scrubbed
        else "full: every byte read and checksummed"
    )
    for s in res.steps:
        head = (
            f"step {s.step}: {s.world_size or '?'} rank(s), {s.objects if s.objects is not None else '?'} objects, "
            f"{_size(s.bytes)}, saved {_when(s.created_unix)} ({_age(s.created_unix)} ago)"
        )
        lines.append("")
        stopped = any(p.kind == "unavailable" for rc in s.replicas for p in rc.problems)
        lines.append(
            head
            + (
                ""
                if s.recoverable
                else "  -- NOT VERIFIED: a replica stopped answering (see UNAVAILABLE)"
                if stopped
                else "  -- NOT RECOVERABLE from these replicas as they are: 'ckptmirror repair' can rebuild it "
                "(what it lacks verifies under another step's name)"
                if s.rebuildable
                else "  -- NOT RECOVERABLE from these replicas"
            )
        )
        rows: list[list[Any]] = []
        for rc in s.replicas:
            label = f"{tags[rc.replica]} {rc.replica}"
            if not rc.ranks:
                status = {
                    "absent": "LAGGING (not here)",
                    "torn": "LAGGING (torn here)",
                    "removed": "removed during the check",
                    "saving": "being saved during the check",
                }.get(rc.status, "BAD commit")
                rows.append([label, "-", "-", "-", "-", status])
            differs = any(p.kind == "disagree" for p in rc.problems)
            for rk in rc.ranks:
                if not rk.held:
                    rows.append([label, rk.rank, "-", "-", "-", "not held here (partial replica)"])
                    continue
                outage = not rk.ok and all(p.kind == "unavailable" for p in rk.problems)
                status = ("ok" if rk.ok else "UNAVAILABLE" if outage else "BAD") + (
                    ", ANOTHER CHECKPOINT" if differs else ""
                )
                rows.append([label, rk.rank, f"{rk.verified}/{rk.objects}", _size(rk.bytes), _how(rk), status])
        rows += [
            [f"{tags[u]} {u}", "-", "-", "-", "-", f"not here, not kept (--keep {res.keep})"]
            for u, v in res.not_kept.items()
            if s.step in v
        ]
        lines += _table(["REPLICA", "RANK", "OBJECTS OK", "BYTES", "CHECKED BY", "STATUS"], rows, "  ")
        if s.unchecked_ranks:
            lines.append(
                f"  rank(s) {', '.join(map(str, s.unchecked_ranks))} not checked: no replica given holds them "
                "(each is a partial replica, a node's share); verify the other nodes' replicas too"
            )
        for rc in s.replicas:
            if rc.scrubbed is not None:
                read = sum(rk.read for rk in rc.ranks)
                lines.append(
                    f"  {tags[rc.replica]} {len(rc.scrubbed.keys)} object(s) scrubbed by agent at "
                    f"{_when(rc.scrubbed.checked_unix)} ({_age(rc.scrubbed.checked_unix)} ago), not read here"
                    + (f"; {read} read here" if read else "")
                )
    # Damage and lagging copies in sections of their own: a lagging replica (a step committed
    # elsewhere, missing here) is not broken and 'repair' completes it; damage is bytes gone wrong.
    damage = res.damage
    lagging = [p for p in res.problems if p.kind == "lagging"]
    if damage:
        lines.append("")
        lines.append(f"DAMAGE ({len(damage)}): objects or records that are missing or wrong:")
        lines += [f"  {line}" for line in _damage_lines(damage)]
    unavailable = res.unavailable
    if unavailable:
        lines.append("")
        lines.append(
            f"UNAVAILABLE ({len(unavailable)} replica(s)): not damage: they stopped answering during the check "
            "(no answer within the time budget, refused, or throttled throughout), so what they hold was not "
            "checked; run verify again once they answer:"
        )
        lines += [
            f"  {tags[u]} {u}: {len(ps)} item(s) not checked; first: {ps[0].key}: {ps[0].detail}"
            for u, ps in unavailable.items()
        ]
    if lagging:
        lines.append("")
        lines.append(
            f"LAGGING ({len(lagging)}): not damage: steps committed on another replica but not (fully) here,"
            " as a writer stopped between its per-replica commits leaves them; 'ckptmirror repair' completes them:"
        )
        lines += [f"  {tags[u]} {u} lags: step(s) {', '.join(map(str, v))}" for u, v in res.lagging.items()]
        lines += [f"  {p}" for p in lagging]
        if res.keep is None and _retired_looking(res):
            lines.append(
                "  some replica lacks only steps older than every step it holds: if the job saves with "
                "keep_last=N, its retention removed them while another replica was down; 'verify --keep N' "
                "and 'repair --keep N' leave those alone"
            )
    if res.not_kept:
        lines.append("")
        lines.append(f"not kept (older than the newest {res.keep} steps, not pinned; not lagging):")
        lines += [f"  {tags[u]} {u}: step(s) {_steps_text(v)}" for u, v in res.not_kept.items()]
    if res.removed_during_check or res.committed_during_check:
        # A job saving meanwhile: its retention deleted steps, or a save committed, after the listing.
        lines.append("")
        lines.append("changed during the check (a job saving meanwhile; not damage):")
        lines += [
            f"  {tags[u]} {u}: step(s) {_steps_text(v)} removed during the check (retention or prune), not checked"
            for u, v in res.removed_during_check.items()
        ]
        lines += [
            f"  {tags[u]} {u}: step(s) {_steps_text(v)} committed during the check, checked once it had"
            for u, v in res.committed_during_check.items()
        ]
    if res.in_progress:
        lines.append("")
        lines.append("a save in progress (files added during the check, not committed there yet; not lagging):")
        lines += [f"  {tags[u]} {u}: step(s) {_steps_text(v)}" for u, v in res.in_progress.items()]
    if res.scrub:
        lines.append("")
        lines.append("peer agents' scrub results:")
        lines += [f"  {tags[u]} {u}: {note}" for u, note in res.scrub.items()]
    torn = {u: v for u, v in res.torn.items() if v}
    if torn:
        lines.append("")
        lines.append("garbage (interrupted saves, not corruption; see 'ckptmirror prune'):")
        lines += [f"  {tags[u]} torn steps {list(v)}" for u, v in torn.items()]
    lines += _unreachable_lines(res.unreachable, tags)
    if res.empty:  # a mistyped path or namespace passes for "no checkpoints yet": say so
        lines.append("")
        lines += [f"{tags[u]} {u}: empty (no steps, no step directories): {hint}" for u, hint in res.empty.items()]
    lines.append("")
    n = len(res.steps)
    problems = res.problems
    partial = sorted({s.step for s in res.steps if s.unchecked_ranks})
    if res.status == "ok":
        lines.append(
            (
                f"OK: {n} step(s) verified on {len(res.replicas)} replica(s) ({mode})"
                + (f"; step(s) {_steps_text(partial)}: only the ranks these replicas hold" if partial else "")
            )
            if n
            else "OK: no committed checkpoint yet, a save is in progress"
            if res.in_progress
            else "OK: no checkpoints on these replicas"
        )
    elif res.status == "lagging":
        copies = sum(len(v) for v in res.lagging.values())
        lines.append(
            f"LAGGING: no damage; {copies} step copy(ies) missing on {len(res.lagging)} replica(s) that the others "
            f"hold, {n} step(s) checked ({mode}); 'ckptmirror repair' completes them"
        )
    else:
        kinds: dict[str, int] = {}
        for p in damage:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        summary = ", ".join(f"{c} {k}" for k, c in sorted(kinds.items()))
        if lagging:
            summary = f"damage: {summary or 'none'}; {len(lagging)} lagging"
        if damage or lagging:
            msg = f"FAILED: {len(damage) + len(lagging)} problem(s) ({summary}) in {n} step(s) ({mode})"
            if res.unreachable:
                msg += f"; {len(res.unreachable)} replica(s) unreachable"
            if unavailable:
                msg += f"; {len(unavailable)} replica(s) stopped answering (not checked)"
        elif unavailable:
            msg = (
                f"INCOMPLETE: {len(unavailable) + len(res.unreachable)} replica(s) unreachable or stopped "
                f"answering, no damage found; {n} step(s) checked on the others ({mode})"
            )
        elif res.unreachable:
            msg = (
                f"INCOMPLETE: {len(res.unreachable)} replica(s) unreachable; "
                f"{n} step(s) verified on the others ({mode})"
            )
        else:
            lost = [s.step for s in res.steps if not s.recoverable]
            msg = f"FAILED: step(s) {', '.join(map(str, lost))} not recoverable from these replicas ({mode})"
        disagree = sorted({p.step for p in damage if p.kind == "disagree"})
        fixable = [p for p in problems if p.kind not in ("disagree", "unavailable")]
        # One replica can fix itself too, where what a step lacks verifies there under another
        # step's name (self-contained saves of a frozen part hold the same bytes per step).
        if (
            fixable
            and all(s.recoverable or s.rebuildable for s in res.steps)
            and (len(res.replicas) > 1 or any(s.rebuildable for s in res.steps))
        ):
            msg += "; 'ckptmirror repair' can fix them " + (
                "from the good copies" if len(res.replicas) > 1 else "from copies under other steps' names"
            )
        if disagree:
            msg += (
                f"; the replicas hold different checkpoints under step(s) {', '.join(map(str, disagree))}: "
                "delete the foreign copy, then run 'ckptmirror repair' (see DAMAGE)"
            )
        lines.append(msg)
    return lines


#: How many objects with one cause are listed one per line before they share a line.
_DAMAGE_GROUP_AT = 4


_STORED_AS = re.compile(r" \(stored as [^()]*\)")


def _damage_lines(damage: Sequence[ops.Problem]) -> list[str]:
    """One line per problem, except that objects of one step with one kind of problem, on one
    replica, with the very same cause (a damaged placement record makes every object of its
    writer invalid; a lost directory makes every object missing) share one line that counts
    them and names the first: otherwise one cause fills thousands of lines (``--json`` lists
    each). Commit records and rank manifests keep a line each."""

    def group_of(p: ops.Problem) -> tuple[str, str, str, int] | None:
        name = p.key.rsplit("/", 1)[-1]
        is_object = "/rank-" in p.key and name.startswith("o") and name.endswith((".bin", ".zst"))
        # The cause without where each object is stored (compressed or referenced objects name
        # their own file: "(stored as ...)"), else a lost compressed step is a line per object.
        return (p.kind, p.replica, _STORED_AS.sub("", p.detail), p.step) if is_object else None

    groups: dict[tuple[str, str, str, int], list[ops.Problem]] = {}
    for p in damage:
        g = group_of(p)
        if g is not None:
            groups.setdefault(g, []).append(p)
    out: list[str] = []
    shown: set[tuple[str, str, str, int]] = set()
    for p in damage:
        g = group_of(p)
        if g is None or len(groups[g]) < _DAMAGE_GROUP_AT:
            out.append(str(p))
        elif g not in shown:
            shown.add(g)
            out.append(
                f"{p.kind}: {len(groups[g])} objects of step {p.step} on {p.replica} (first: {p.key}): {p.detail}"
            )
    return out


def _how(rk: ops.RankCheck) -> str:
    """How the objects of one rank were checked: read here, or by the peer agent's scrub."""
    if rk.scrubbed and not rk.read:
        return "agent scrub"
    if rk.scrubbed:
        return f"scrub {rk.scrubbed}, read {rk.read}"
    return "read"


def _retired_looking(res: ops.VerifyReport) -> bool:
    """Whether some replica lags only on steps older than every step it holds (what retention
    leaves on the replicas that stayed up while another was down)."""
    held: dict[str, list[int]] = {}
    for s in res.steps:
        for rc in s.replicas:
            if rc.status == "ok" or rc.ranks:
                held.setdefault(rc.replica, []).append(s.step)
    return any(u in held and max(v) < min(held[u]) for u, v in res.lagging.items())


def _repair_lines(res: ops.RepairReport) -> list[str]:
    """What ``ckptmirror repair`` prints without ``--json``."""
    tags, lines = _legend(res.replicas)
    verb = "would " if res.dry_run else ""
    for a in res.actions:
        if a.action == "copy":
            text = (
                f"{verb}copy   {a.key} {tags.get(a.source or '', '?')} -> {tags[a.replica]}  "
                f"({_size(a.bytes)}; was {a.reason})"
            )
        else:
            text = f"{verb}{a.action} {a.key} on {tags[a.replica]}  ({a.reason})"
        if a.error:
            text = f"FAILED {text}: {a.error}"
        lines.append(text)
    for p in res.unrecoverable:
        lines.append(f"CANNOT REPAIR {p}")
    lines += [
        f"not copied to {tags[u]} (older than the newest --keep steps, not pinned: its retention's to remove): "
        f"step(s) {_steps_text(v)}"
        for u, v in res.not_kept.items()
    ]
    lines += _unreachable_lines(res.unreachable, tags)
    copies = sum(1 for a in res.actions if a.action == "copy" and (a.done or res.dry_run))
    commits = sum(1 for a in res.actions if a.action.endswith("commit") and (a.done or res.dry_run))
    records = sum(1 for a in res.actions if a.action == "delete-placement" and a.done)
    # An unreachable replica, or one that stopped answering, was not checked: "nothing to repair"
    # would claim it holds good copies. Say what was checked, and that it was not all.
    stopped = sorted({p.replica for p in res.unrecoverable if p.kind == "unavailable"})
    not_checked = [*res.unreachable, *(u for u in stopped if u not in res.unreachable)]
    if not_checked:
        lines.append(
            f"INCOMPLETE: {len(not_checked)} replica(s) not checked (unreachable or stopped answering: "
            f"{' '.join(tags.get(u, u) for u in not_checked)}); run repair again once they answer"
        )
    if not res.actions and not res.unrecoverable:
        lines.append(
            f"nothing to repair on the replicas that answered: {len(res.steps)} step(s) verify there"
            if not_checked
            else f"nothing to repair: {len(res.steps)} step(s) verify on every replica"
        )
    else:
        lines.append(
            f"{'would copy' if res.dry_run else 'copied'} {copies} object(s), "
            f"{'would commit' if res.dry_run else 'committed'} {commits} step copy(ies)"
            + (f", removed {records} damaged placement record(s)" if records else "")
            + (f"; {len(res.unrecoverable)} problem(s) cannot be repaired" if res.unrecoverable else "")
        )
    return lines


def _steps_text(steps: Sequence[int]) -> str:
    """Step numbers as a list, or "none"."""
    return ", ".join(map(str, steps)) if steps else "none"


def _prune_lines(res: ops.PruneReport) -> list[str]:
    """What ``ckptmirror prune`` prints without ``--json``."""
    verb = "would remove" if res.dry_run else "removed"
    lines: list[str] = []
    if res.refused:
        lines.append(f"kept every committed step: {res.refused}")
    for p in res.replicas:
        garbage = f"{len(p.removed_garbage)} key(s)" + (
            ": " + _first(p.removed_garbage, 3) if p.removed_garbage else ""
        )
        rows: list[tuple[str, str]] = [
            ("kept steps", _steps_text(p.kept)),
            (f"{verb} steps", _steps_text(p.removed_steps)),
            (f"{verb} torn saves", _steps_text(p.removed_torn)),
            (f"{verb} leftovers", garbage),
        ]
        if p.kept_for_references:
            rows.append(
                (
                    "kept for references",
                    f"{_steps_text(p.kept_for_references)} (not interrupted saves: they hold objects that kept steps "
                    "reference; their other files count as leftovers)",
                )
            )
        if p.pinned:
            why = "--ignore-pins: counted as any other step" if res.ignore_pins else "kept, not counted towards --keep"
            rows.append(("pinned", f"{_steps_text(p.pinned)} (by the job, Mirror.pin; {why})"))
        if p.committed_meanwhile:
            rows.append(
                ("left alone", f"{_steps_text(p.committed_meanwhile)} (committed meanwhile: a repair or a save)")
            )
        if p.skipped_torn:
            rows.append(
                (
                    "left torn saves",
                    f"{_steps_text(p.skipped_torn)} (newer than the newest commit, maybe a save in progress; "
                    "--all-torn removes them)",
                )
            )
        rows += [("FAILED", e) for e in p.errors]
        if p.stopped:
            rows.append(("STOPPED", "the replica stopped answering: nothing more was asked of it (see FAILED)"))
        width = max(len(a) for a, _ in rows)
        lines.append(f"{p.replica}:")
        lines += [f"  {a.ljust(width)}  {b}" for a, b in rows]
    lines += [f"UNREACHABLE {u}: {e}" for u, e in res.unreachable.items()]
    return lines


def _leaf_text(leaf: ops.LeafInfo) -> str:
    """dtype, shape, bytes, and what else is notable about a tensor."""
    shape = "[" + ", ".join(map(str, leaf.shape)) + "]"
    extra: list[str] = []
    if leaf.kind == "ndarray":
        extra.append("numpy")
    if leaf.parameter:
        extra.append("parameter")
    elif leaf.requires_grad:
        extra.append("requires_grad")
    if leaf.shared:
        extra.append(f"shares storage {leaf.storage}")
    return f"{leaf.dtype:<10} {shape:<16} {_size(leaf.nbytes):>10}" + (f"  ({', '.join(extra)})" if extra else "")


def _value_text(v: Any) -> str:
    """A plain value, cut to fit one table cell."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _tree_lines(node: Any, label: str, depth: int, out: list[tuple[str, str]]) -> None:
    """Append (indented label, description) rows for ``node`` and everything below it."""
    pad = "  " * depth
    if isinstance(node, ops.LeafInfo):
        out.append((pad + label, _leaf_text(node)))
    elif isinstance(node, dict) and node:
        out.append((pad + label, ""))
        for k, v in node.items():
            _tree_lines(v, str(k), depth + 1, out)
    elif type(node) in (list, tuple) and node:
        out.append((pad + label, f"({type(node).__name__} of {len(node)})"))
        for i, v in enumerate(node):
            _tree_lines(v, str(i), depth + 1, out)
    else:
        out.append((pad + label, _value_text(node)))


def _inspect_lines(res: ops.InspectReport) -> list[str]:
    """What ``ckptmirror inspect`` prints without ``--json``."""
    lines = [
        f"step {res.step}: {res.world_size} rank(s), saved {_when(res.created_unix)} ({_age(res.created_unix)} ago)"
    ]
    for url, st in res.storage.items():
        if "objects" not in st or not st["objects"]:
            continue
        ratio = st["raw_bytes"] / st["stored_bytes"] if st["stored_bytes"] else 1.0
        lines.append(
            f"on {url}: {st['objects']} object(s), {_size(st['raw_bytes'])} raw, stored as {_size(st['stored_bytes'])} "
            f"({ratio:.2f}x; {st['compressed']} compressed, {st['referenced']} referencing earlier steps, "
            f"{_size(st['stored_bytes'] - st['referenced_bytes'])} new in this step)"
        )
    for rt in res.ranks:
        tensors = [e for e in rt.entries if e.leaf is not None]
        lines.append(f"rank {rt.rank}: {len(tensors)} tensor(s), {_size(rt.stream_bytes)} in {rt.objects} object(s)")
        rows: list[tuple[str, str]] = []
        tree = rt.tree
        if isinstance(tree, dict) and tree:
            for k, v in tree.items():
                _tree_lines(v, str(k), 1, rows)
        else:
            _tree_lines(tree, "state", 1, rows)
        width = max((len(a) for a, _ in rows), default=0)
        lines += [f"{a.ljust(width)}  {b}".rstrip() for a, b in rows]
    return lines


def _export_lines(res: ops.ExportReport) -> list[str]:
    """What ``ckptmirror export`` prints without ``--json``."""
    where = "metadata" if res.format == "safetensors" else "the dict"
    lines = [
        f"wrote {res.path} ({res.format}): step {res.step}, rank {res.rank}, {res.tensors} tensor(s), "
        f"{_size(res.tensor_bytes)}, {len(res.values)} plain value(s) in {where}"
    ]
    if res.cloned:
        lines.append(
            f"cloned {len(res.cloned)} tensor(s) that shared storage or were not contiguous: " + _first(res.cloned, 5)
        )
    for d in res.dropped:
        lines.append(f"dropped {d}")
    return lines


_COMMANDS: dict[str, _Command[Any]] = {
    "ls": _Command(lambda a: ops.ls(a.urls), _ls_lines),
    "verify": _Command(
        lambda a: ops.verify(
            a.urls,
            step=a.step,
            quick=a.quick,
            threads=a.threads,
            progress=_progress(a),
            scrub_max_age_s=_scrub_max_age(a),
            keep=a.keep,
        ),
        _verify_lines,
    ),
    "repair": _Command(
        lambda a: ops.repair(
            a.urls,
            step=a.step,
            dry_run=a.dry_run,
            threads=a.threads,
            progress=_progress(a),
            partial=a.partial,
            keep=a.keep,
        ),
        _repair_lines,
    ),
    "prune": _Command(
        lambda a: ops.prune(a.urls, keep=a.keep, dry_run=a.dry_run, all_torn=a.all_torn, ignore_pins=a.ignore_pins),
        _prune_lines,
    ),
    "inspect": _Command(lambda a: ops.inspect(a.urls, step=a.step, rank=a.rank), _inspect_lines),
    "export": _Command(
        lambda a: ops.export(
            a.urls,
            a.output,
            format=a.format,
            step=a.step,
            rank=a.rank,
            overwrite=a.force,
            threads=a.threads,
            progress=_progress(a),
        ),
        _export_lines,
    ),
}
