"""The :class:`Scrubber`: the thread that re-reads everything the peer agent holds at a bounded
rate, and the latest results it keeps per namespace and step (:class:`StepResult`,
:class:`RankResult`).

Apart from :mod:`._scrub_check` because it is the part with state (a thread, a lock, results
that a write or delete invalidates); how a file is read and judged, and which namespaces and
steps there are, is there. The pass, its pacing and its results are described in
:mod:`._scrub`'s docstring.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..checksum import checksum
from ..errors import CkptMirrorError, ManifestError
from ..format import PINS_PREFIX, commit_key, parse_commit, parse_rank_manifest, parse_step_dir, writer_of
from ..placement import Stored
from ._scrub_check import (
    MAX_COMMIT_BYTES,
    Damage,
    Pacer,
    Writer,
    _absent,
    _not_held_writers,
    _Stopped,
    check_file,
    committed_steps,
    find_namespaces,
    read_held,
    stored_objects,
)
from .local import LocalReplica

__all__ = ["MAX_NAMED", "RankResult", "Scrubber", "StepResult"]

log = logging.getLogger("ckptmirror.agent")

#: Damaged objects reported by name per namespace (metrics labels, health): a disk that rots
#: wholesale must not blow up the metrics. Counts are always exact.
MAX_NAMED = 100


def _event(level: int, msg: str, **fields: Any) -> None:
    # The agent's JSON formatter (_agent_log._JsonFormatter) turns ``fields`` into keys.
    log.log(level, msg, extra={"fields": fields})


# ------------------------------------------------------------------------------- results
@dataclass
class RankResult:
    """One rank manifest of one step, as ``verify``'s ``RankCheck`` has it; ``objects`` and
    ``bytes`` count the objects checked here, ``not_held`` those of the manifest this namespace
    does not hold (another writer's share of a replicated step, see :class:`Held`)."""

    rank: int
    key: str
    checksum: str
    objects: int
    bytes: int
    verified: int
    manifest_ok: bool
    not_held: int = 0


@dataclass
class StepResult:
    """The latest check of one committed step: ``commit_checksum`` says which commit record
    (a step deleted and saved again is another record), ``checked_unix`` when the check ended."""

    step: int
    commit_checksum: str
    checked_unix: float
    ranks: list[RankResult] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)
    #: Ranks whose manifest this namespace does not hold (a node's share of the step: :class:`Held`).
    not_held_ranks: list[int] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "bad" if self.problems else "ok"

    def to_dict(self, now: float) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status
        d["age_s"] = round(max(0.0, now - self.checked_unix), 3)
        return d


@dataclass
class _Namespace:
    steps: dict[int, StepResult] = field(default_factory=dict)
    checked_unix: float | None = None  # end of the latest complete pass over this namespace


class Scrubber:
    """The scrubbing thread and its latest results (see the module docstring).

    ``replica(ns)`` gives the agent's replica of a namespace; ``on_damage(ns, key)`` is called for
    each damaged file found (the agent forgets it verified it).
    """

    def __init__(
        self,
        root: str,
        replica: Callable[[str], LocalReplica],
        *,
        interval_s: float,
        bytes_per_s: int,
        on_damage: Callable[[str, str], object] = lambda ns, key: None,
    ) -> None:
        self.root = root
        self.replica = replica
        self.interval_s = interval_s
        self.bytes_per_s = bytes_per_s
        self.on_damage = on_damage
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.results: dict[str, _Namespace] = {}
        self._generation: dict[tuple[str, int], int] = {}
        # Totals since the agent started (metrics counters).
        self.passes = 0
        self.files_checked = 0
        self._bytes_before = 0  # bytes read by the passes before the current one
        self._pacer: Pacer | None = None  # the current pass's (its count grows read by read)
        self.last_pass_end_unix: float | None = None
        self.running = False

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread (the first pass begins at once)."""
        self.thread = threading.Thread(target=self._loop, name="ckptmirror-scrub", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread: a pass in progress is abandoned at its next read."""
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                self._pass()
            except _Stopped:
                return
            except Exception as exc:  # a bug or an unexpected disk error: log it, keep the agent up
                _event(logging.ERROR, "scrub pass failed", error=f"{type(exc).__name__}: {exc}")
            if self.stop_event.wait(max(0.0, self.interval_s - (time.monotonic() - started))):
                return

    # -- what the handlers call ------------------------------------------------------------
    @property
    def bytes_read(self) -> int:
        """Bytes read since the agent started, up to the last read (not the last file)."""
        with self.lock:
            return self._bytes_before + (self._pacer.done if self._pacer else 0)

    def invalidate(self, ns: str, key: str) -> None:
        """A write or delete of ``key`` (or prefix) in ``ns``: forget the result of its step."""
        head = key.split("/", 1)[0]
        if head == PINS_PREFIX:
            return  # a pin record (Mirror.pin): no step's files changed (Lightning pins every save)
        step = parse_step_dir(head)
        with self.lock:
            # Outside any step directory (nothing else today): the whole namespace, as step -1.
            k = (ns, -1 if step is None else step)
            self._generation[k] = self._generation.get(k, 0) + 1
            res = self.results.get(ns)
            if res is not None:
                if step is None:
                    res.steps.clear()
                else:
                    res.steps.pop(step, None)

    def _gen(self, ns: str, step: int) -> tuple[int, int]:
        """The generation of a step's result (call with the lock held): changes when it is invalidated."""
        return self._generation.get((ns, step), 0), self._generation.get((ns, -1), 0)

    def namespace_report(self, ns: str) -> dict[str, Any]:
        """The ``GET /v1/scrub/<ns>`` document (see ``_peer_protocol``)."""
        now = time.time()
        with self.lock:
            res = self.results.get(ns) or _Namespace()
            steps = [res.steps[s].to_dict(now) for s in sorted(res.steps)]
            checked = res.checked_unix
        return {
            "namespace": ns,
            "now_unix": now,
            "interval_s": self.interval_s,
            "bytes_per_s": self.bytes_per_s,
            "checked_unix": checked,
            "age_s": None if checked is None else round(max(0.0, now - checked), 3),
            "steps": steps,
            "problems": [p for s in steps for p in s["problems"]],
        }

    def damaged(self) -> dict[str, list[dict[str, Any]]]:
        """Namespace -> every problem of its latest results (namespaces without any left out)."""
        with self.lock:
            out = {ns: [p for s in sorted(r.steps) for p in r.steps[s].problems] for ns, r in self.results.items()}
        return {ns: ps for ns, ps in out.items() if ps}

    def checked_times(self) -> dict[str, float]:
        """Namespace -> end of its latest complete pass (unix time)."""
        with self.lock:
            return {ns: r.checked_unix for ns, r in self.results.items() if r.checked_unix is not None}

    def summary(self, covers: Callable[[str], bool] = lambda ns: True) -> dict[str, Any]:
        """The ``scrub`` part of ``GET /v1/health``, limited to the namespaces ``covers`` accepts."""
        damaged = [dict(p, namespace=ns) for ns, ps in self.damaged().items() if covers(ns) for p in ps]
        return {
            "interval_s": self.interval_s,
            "bytes_per_s": self.bytes_per_s,
            "passes": self.passes,
            "running": self.running,
            "last_pass_end_unix": self.last_pass_end_unix,
            "damaged_count": len(damaged),
            "damaged": damaged[:MAX_NAMED],
        }

    # -- the pass --------------------------------------------------------------------------
    def _pass(self) -> None:
        pacer = Pacer(self.bytes_per_s, self.stop_event)
        t0 = time.monotonic()
        with self.lock:
            self._pacer = pacer
        self.running = True
        namespaces = find_namespaces(self.root)
        steps = damaged = 0
        try:
            for ns in namespaces:
                s, d = self._scrub_namespace(ns, pacer)
                steps, damaged = steps + s, damaged + d
        finally:
            self.running = False
            with self.lock:
                self._bytes_before += pacer.done
                self._pacer = None
        with self.lock:
            for gone in set(self.results) - set(namespaces):
                del self.results[gone]
            self.passes += 1
            self.last_pass_end_unix = time.time()
        _event(
            logging.INFO,
            "scrub pass done",
            namespaces=len(namespaces),
            steps=steps,
            bytes=pacer.done,
            damaged=damaged,
            seconds=round(time.monotonic() - t0, 3),
        )

    def _scrub_namespace(self, ns: str, pacer: Pacer) -> tuple[int, int]:
        """Check every committed step of ``ns``; (steps checked, damaged files)."""
        try:
            replica = self.replica(ns)
        except Exception:  # a name the agent refuses: skipped, like any file it did not write
            return 0, 0
        steps = committed_steps(replica.root)
        damaged = 0
        for step in steps:
            with self.lock:
                gen = self._gen(ns, step)
            result = self._scrub_step(ns, replica, step, pacer)
            with self.lock:
                if result is None or self._gen(ns, step) != gen:
                    continue  # gone, or written or deleted while we read it: the result is about old bytes
            # Logged before it is published: whoever sees it on /metrics finds it in the log.
            for p in result.problems:
                _event(logging.WARNING, "scrub: damaged object", ns=ns, **p)
                self.on_damage(ns, p["key"])
            with self.lock:
                if self._gen(ns, step) != gen:
                    continue
                self.results.setdefault(ns, _Namespace()).steps[step] = result
            damaged += len(result.problems)
        with self.lock:
            res = self.results.setdefault(ns, _Namespace())
            for gone in set(res.steps) - set(steps):
                del res.steps[gone]
            # Generations of steps not committed now: nothing of theirs is being read (one thread),
            # and a step committed later starts from a fresh snapshot; so they need not grow forever.
            for k in [k for k in self._generation if k[0] == ns and k[1] >= 0 and k[1] not in steps]:
                del self._generation[k]
            res.checked_unix = time.time()
        return len(steps), damaged

    def _check(
        self, replica: LocalReplica, key: str, size: int, csum: str, pacer: Pacer, keep: bool = False
    ) -> tuple[Damage | None, bytes]:
        try:
            return check_file(replica, key, size, csum, pacer, keep)
        finally:
            with self.lock:
                self.files_checked += 1

    def _scrub_step(self, ns: str, replica: LocalReplica, step: int, pacer: Pacer) -> StepResult | None:
        """Check one committed step; None if its commit record is gone (deleted meanwhile)."""
        key = commit_key(step)
        record = self._read_commit(replica, key, pacer)
        if record is None:
            return None
        with self.lock:
            self.files_checked += 1
        result = StepResult(step, checksum(record), 0.0)
        # A namespace that holds a node's share of the step (the agent accepted the commit with
        # only that here) has its Held record: what it does not hold is not damage. Without one,
        # it must hold everything the commit record names.
        held = read_held(replica, step, result.commit_checksum)

        def problem(k: str, damage: Damage, rank: int | None = None) -> None:
            result.problems.append({"step": step, "key": k, "kind": damage.kind, "detail": damage.detail, "rank": rank})

        try:
            commit = parse_commit(record, key)
        except ManifestError as exc:
            problem(key, Damage("invalid", f"does not parse: {exc}"))
            commit = None
        seen: set[str] = set()
        for ref in commit.ranks if commit else ():
            if held is not None and ref.key not in held.manifests and _absent(replica, ref.key):
                result.not_held_ranks.append(ref.rank)  # another node's rank
                continue
            damage, body = self._check(replica, ref.key, ref.size, ref.checksum, pacer, keep=True)
            manifest = None
            if damage is None:
                try:
                    manifest = parse_rank_manifest(body, ref.key)
                except ManifestError as exc:
                    damage = Damage("invalid", f"does not parse: {exc}")
            if damage is not None:
                problem(ref.key, damage, ref.rank)
            objects = manifest.objects if manifest else ()
            stored: dict[str, Stored] = {}
            if manifest is not None:
                try:
                    stored = stored_objects(replica, manifest)
                except ManifestError as exc:
                    problem(ref.key, Damage("invalid", f"placement record: {exc}"), ref.rank)
            skip: set[Writer] = set()
            if held is not None and commit is not None and commit.replicated and manifest is not None and stored:
                # Another rank's share of a replicated step: absent all together, unless this
                # namespace held it at the commit (then it is damage).
                skip = _not_held_writers(replica, manifest, stored, held.writers)
            mine = [o for o in objects if writer_of(o.key) not in skip] if skip else list(objects)
            bad = 0
            for obj in mine:
                if obj.key in seen:
                    continue  # listed by two manifests (replicated saves): checked once
                seen.add(obj.key)
                st = stored.get(obj.key)
                if st is None:  # its placement is unusable: reported above
                    bad += 1
                    continue
                # The stored bytes (compressed, or an earlier step's object): no decoding needed,
                # the placement pins their checksum. Problems are reported by the manifest's name.
                d, _ = self._check(replica, st.key, st.size, st.checksum, pacer)
                if d is not None:
                    bad += 1
                    if st.key != obj.key:
                        d = Damage(d.kind, f"{d.detail} (stored as {st.key})")
                    problem(obj.key, d, ref.rank)
            result.ranks.append(
                RankResult(
                    ref.rank,
                    ref.key,
                    ref.checksum,
                    len(mine),
                    sum(o.size for o in mine),
                    len(mine) - bad,
                    damage is None,
                    len(objects) - len(mine),
                )
            )
        # Retention deletes the commit record first, then the step: files missing because the
        # step went away while we read it are not damage.
        if result.problems and self._read_commit(replica, key, Pacer(math.inf)) != record:
            return None
        result.checked_unix = time.time()
        return result

    def _read_commit(self, replica: LocalReplica, key: str, pacer: Pacer) -> bytes | None:
        """The commit record's bytes, or None if it is gone (or unreadable: not ours to judge)."""
        try:
            fd = replica._open_read(key)
        except CkptMirrorError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size > MAX_COMMIT_BYTES:
                return b""  # parse_commit reports it as invalid
            body = bytearray()
            while len(body) < size:
                chunk = pacer.read(fd, size - len(body), len(body))
                if not chunk:
                    break
                body += chunk
            return bytes(body)
        except OSError:
            return None
        finally:
            os.close(fd)
