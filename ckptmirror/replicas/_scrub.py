"""Checks of what the peer agent stores: one file against its size and checksum, a commit
before it is accepted, and the scrubber.

:func:`check_file` is the one check of a stored file (size, then XXH3 over its bytes); the agent's
commit check (:func:`check_commit`) and the scrubber both use it, so "damaged" means the same
thing in both places.

A namespace may hold only part of a step, as a node-local disk does: with ``ring_peer`` each
node's namespace holds that node's ranks, while the commit record names every rank. The commit
check accepts that when the client names the writers whose files it put there (see Commits in
``_peer_protocol``), and keeps what the namespace held next to the commit record (:class:`Held`);
the scrubber then reports the ranks (and, for a replicated step, the other writers' objects)
the namespace never held as ``not_held``, not as damage, while a manifest or object it held and
lost, or one that is here and damaged, is damage as anywhere else. A namespace without a Held
record must hold everything its commit records name.

The :class:`Scrubber` (``ckptmirror serve --scrub-interval S --scrub-bytes-per-s N``) is a
thread that re-reads everything the agent holds, namespace by namespace: every committed step's
commit record (parsed by :func:`~ckptmirror.format.parse_commit`), each rank manifest it pins
(size and checksum from the commit, then :func:`~ckptmirror.format.parse_rank_manifest`) and
every object each manifest names (size and checksum from the manifest). It never reads faster
than ``bytes_per_s`` on average (:class:`Pacer`): scrubbing takes a bounded share of the disk,
whatever restores and uploads need at the same time. A pass starts every ``interval_s``
seconds (at once when the previous one took longer).

Results are kept per namespace and step, with the time each step was checked, and replaced as
each step is checked again: a damaged object is reported as soon as its step is done, not at
the end of the pass. A write or delete in a step (a ``ckptmirror repair``, retention) drops
that step's result (:meth:`Scrubber.invalidate`): a result is only ever about bytes that have
not changed since they were read. A step deleted while it is being read (retention) is not
reported as damaged: its result is dropped when its commit record turns out to be gone.

Problem kinds are those of ``ckptmirror verify`` (:class:`ckptmirror.ops.Problem`): ``missing``,
``truncated``, ``wrong-size``, ``corrupt``, ``invalid`` (does not parse), ``unreadable``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from typing import Any

from ..checksum import Hasher, checksum
from ..errors import CkptMirrorError, ManifestError, ObjectMissingError
from ..format import (
    MAX_MANIFEST_BYTES,
    RankManifest,
    commit_key,
    parse_commit,
    parse_rank_manifest,
    parse_step_dir,
    step_dir,
    writer_of,
)
from ..placement import MAX_PLACEMENT_BYTES, Stored, resolve
from ._peer_protocol import DEFAULT_SCRUB_BYTES_PER_S, HIDDEN_PREFIX
from .base import validate_key
from .local import LocalReplica

__all__ = [
    "DEFAULT_SCRUB_BYTES_PER_S",
    "Damage",
    "Held",
    "Pacer",
    "Scrubber",
    "check_commit",
    "check_file",
    "drop_held",
    "find_namespaces",
    "held_key",
    "read_held",
]

log = logging.getLogger("ckptmirror.agent")

#: Commit records are ~100 bytes per rank (the agent accepts at most this much for one).
MAX_COMMIT_BYTES = 16 << 20
#: Largest read; the pacer makes them smaller at low rates (a few reads a second).
CHUNK_BYTES = 4 << 20
#: Damaged objects reported by name per namespace (metrics labels, health): a disk that rots
#: wholesale must not blow up the metrics. Counts are always exact.
MAX_NAMED = 100
#: Namespaces nest (``jobs/a``); a tree deeper than this under the root is not walked.
MAX_DEPTH = 32


def _event(level: int, msg: str, **fields: Any) -> None:
    # The agent's JSON formatter (_agent_log._JsonFormatter) turns ``fields`` into keys.
    log.log(level, msg, extra={"fields": fields})


class _Stopped(Exception):
    """The agent is shutting down: abandon the pass."""


class Pacer:
    """At most ``bytes_per_s`` on average: :meth:`before` waits until the next read may start.

    Each read of ``n`` bytes started at ``t`` pushes the next start to ``t + n / bytes_per_s``;
    time lost waiting for a slow disk is not made up afterwards by a burst. ``bytes_per_s = inf``
    never waits (the commit check, which a client is waiting for).
    """

    def __init__(self, bytes_per_s: float, stop: threading.Event | None = None) -> None:
        self.bytes_per_s = bytes_per_s
        self.stop = stop or threading.Event()
        self.next = time.monotonic()
        # At low rates, smaller reads: the average holds over a fraction of a second, not over 4 MiB.
        self.chunk = CHUNK_BYTES if math.isinf(bytes_per_s) else int(max(4096, min(CHUNK_BYTES, bytes_per_s / 4)))
        self.done = 0  # bytes read through this pacer

    def before(self) -> None:
        """Wait until the next read may start; raise :class:`_Stopped` if the agent is stopping."""
        delay = self.next - time.monotonic()
        if delay > 0 and self.stop.wait(delay):
            raise _Stopped
        if self.stop.is_set():
            raise _Stopped

    def after(self, started: float, nbytes: int) -> None:
        """Account a read of ``nbytes`` that started at ``started`` (``time.monotonic()``)."""
        self.done += nbytes
        if not math.isinf(self.bytes_per_s):
            self.next = max(self.next, started) + nbytes / self.bytes_per_s

    def read(self, fd: int, size: int, pos: int) -> bytes:
        """One paced ``pread`` of at most :attr:`chunk` bytes."""
        self.before()
        started = time.monotonic()
        chunk = os.pread(fd, min(self.chunk, size), pos)
        self.after(started, len(chunk))
        return chunk


@dataclass(frozen=True)
class Damage:
    """What is wrong with one stored file: a ``verify`` problem kind and a sentence after its name."""

    kind: str
    detail: str


def check_file(
    replica: LocalReplica, key: str, size: int, csum: str, pacer: Pacer | None = None, keep: bool = False
) -> tuple[Damage | None, bytes]:
    """Check ``key`` on ``replica`` against ``size`` and ``csum`` (reading at ``pacer``'s rate).

    Returns (None, the bytes if ``keep`` else ``b""``) when it matches, else (the damage, ``b""``).
    """
    pacer = pacer or Pacer(math.inf)
    try:
        fd = replica._open_read(key)
    except ObjectMissingError:
        return Damage("missing", "is missing"), b""
    except CkptMirrorError as exc:
        return Damage("unreadable", f"cannot be opened: {exc}"), b""
    try:
        have = os.fstat(fd).st_size
        if have != size:
            return Damage("truncated" if have < size else "wrong-size", f"has {have} bytes, expected {size}"), b""
        hasher = Hasher()
        body = bytearray() if keep else None
        pos = 0
        while pos < size:
            chunk = pacer.read(fd, size - pos, pos)
            if not chunk:
                return Damage("truncated", f"ended after {pos} of {size} bytes"), b""
            hasher.update(chunk)
            if body is not None:
                body += chunk
            pos += len(chunk)
    except OSError as exc:
        return Damage("unreadable", f"cannot be read: {exc.strerror or exc}"), b""
    finally:
        os.close(fd)
    got = hasher.hexdigest()
    if got != csum:
        return Damage("corrupt", f"does not match its checksum (read {got}, recorded {csum})"), b""
    return None, bytes(body) if body is not None else b""


Writer = tuple[int, str]  # (rank, token), as object and manifest names carry it (format.writer_of)


@dataclass(frozen=True)
class Held:
    """What a namespace holds of a committed step whose record names more than that (a node's
    share: ``ring_peer``, see ``_peer_protocol``): the rank manifests present and verified when
    the commit was accepted, and the writers whose objects were (replicated steps: each rank
    writes its own share of the one manifest's objects).

    The agent keeps it next to the commit record (:func:`held_key`, a hidden name no client can
    read, write or delete; it goes with the step directory); the scrubber then requires exactly
    that. Without one, every file the record names must be here (the rule of a full copy)."""

    manifests: frozenset[str]
    writers: frozenset[Writer]

    def to_json(self, commit_checksum: str) -> bytes:
        doc = {
            "kind": HELD_KIND,
            "commit_checksum": commit_checksum,
            "manifests": sorted(self.manifests),
            "writers": [[r, t] for r, t in sorted(self.writers)],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, data: bytes, commit_checksum: str) -> Held | None:
        """The record in ``data`` if it is one, about the commit record ``commit_checksum``; else None."""
        try:
            doc = json.loads(data)
            if doc["kind"] != HELD_KIND or doc["commit_checksum"] != commit_checksum:
                return None
            manifests = frozenset(str(k) for k in doc["manifests"])
            writers = frozenset((int(r), str(t)) for r, t in doc["writers"])
        except (ValueError, KeyError, TypeError):
            return None
        return cls(manifests, writers)


#: Name prefix (in the step directory) of the :class:`Held` record of a commit; hidden (``.``).
HELD_PREFIX = ".held-"
HELD_KIND = "ckptmirror.agent.held"


def held_key(step: int, commit_checksum: str) -> str:
    """Where the :class:`Held` record of the commit record with checksum ``commit_checksum`` is kept
    (named after the record: a step committed again with another record never reads the old one)."""
    return f"{step_dir(step)}/{HELD_PREFIX}{commit_checksum.rsplit(':', 1)[-1]}.json"


def read_held(replica: LocalReplica, step: int, commit_checksum: str) -> Held | None:
    """The :class:`Held` record of that commit record, or None (none: the namespace must hold it all)."""
    try:
        data = replica.get(held_key(step, commit_checksum), MAX_COMMIT_BYTES)
    except CkptMirrorError:
        return None
    return Held.parse(data, commit_checksum)


def drop_held(replica: LocalReplica, step: int) -> None:
    """Remove every :class:`Held` record of ``step`` (its commit record was deleted)."""
    d = os.path.join(replica.root, step_dir(step))
    try:
        names = [e.name for e in os.scandir(d) if e.name.startswith(HELD_PREFIX)]
    except OSError:
        return
    for name in names:
        try:
            replica.delete(f"{step_dir(step)}/{name}")
        except CkptMirrorError:
            pass  # left behind: named after a record that is gone, never read again


def _absent(replica: LocalReplica, key: str) -> bool:
    """Whether ``key`` is not here (a file that cannot be looked at is here: checking it says what is wrong)."""
    try:
        return replica.size(key) is None
    except CkptMirrorError:
        return False


def _not_held_writers(
    replica: LocalReplica, manifest: RankManifest, stored: Mapping[str, Stored], required: AbstractSet[Writer]
) -> set[Writer]:
    """The writers of ``manifest``'s objects that this namespace does not hold: not in ``required``
    and none of their objects here. A writer with any object here must have all of them."""
    by_writer: dict[Writer, list[str]] = {}
    for obj in manifest.objects:
        w = writer_of(obj.key)
        st = stored.get(obj.key)
        if w is not None and st is not None:
            by_writer.setdefault(w, []).append(st.key)
    return {w for w, keys in by_writer.items() if w not in required and all(_absent(replica, k) for k in keys)}


def check_commit(
    replica: LocalReplica,
    ns: str,
    key: str,
    body: bytes,
    verified: MutableMapping[tuple[str, str], tuple[int, str]],
    writers: frozenset[Writer] | None = None,
) -> tuple[list[str], Held | None]:
    """What is wrong with committing ``body`` as ``key`` in ``ns`` (empty: accept it), and, when
    the namespace holds only part of what the record names, what it holds (else None).

    ``writers`` None (no ``X-Ckptmirror-Commit-Writers`` header: an older client, or one that put
    all or none of the step here): every rank manifest and object the record names must be here
    and verify. Otherwise ``writers`` are those whose files the client put here (see Commits in
    ``_peer_protocol``): their manifests (a replicated record's one manifest always) and objects
    must be here and verify; another rank's manifest, or another writer's objects of a replicated
    step, may be absent, but what is here must verify (a writer with some objects here, all of
    them), and a record of which no manifest is here is refused.

    ``verified`` holds ``(ns, key) -> (size, checksum)`` of files this process received and
    verified: those are not read again (only their size is checked), since a commit follows its
    objects within seconds and the scrubber re-reads everything later; files that verify here are
    added to it."""

    def why(k: str, size: int, csum: str) -> str | None:
        if verified.get((ns, k)) == (size, csum) and replica.size(k) == size:
            return None
        damage, _ = check_file(replica, k, size, csum)
        if damage is not None:
            return f"{k} {damage.detail}"
        verified[(ns, k)] = (size, csum)
        return None

    commit = parse_commit(body, key)
    problems: list[str] = []
    if writers is not None and not commit.replicated and not any(writer_of(r.key) in writers for r in commit.ranks):
        problems.append("it names none of the rank manifests this client says it wrote here")
    manifests: set[str] = set()
    held_writers: set[Writer] = set()
    partial = False
    for ref in commit.ranks:
        required = writers is None or commit.replicated or writer_of(ref.key) in writers
        if not required and _absent(replica, ref.key):
            partial = True  # another node's rank: not held here
            continue
        bad = why(ref.key, ref.size, ref.checksum)
        if bad:
            problems.append(bad)
            continue
        manifests.add(ref.key)
        manifest = parse_rank_manifest(replica.get(ref.key, MAX_MANIFEST_BYTES), ref.key)
        try:
            stored = stored_objects(replica, manifest)
        except ManifestError as exc:
            problems.append(str(exc))
            continue
        skip: set[Writer] = set()
        if writers is not None and commit.replicated:
            skip = _not_held_writers(replica, manifest, stored, writers)
            partial = partial or bool(skip)
        for obj in manifest.objects:
            w = writer_of(obj.key)
            if w in skip:
                continue
            st = stored[obj.key]
            bad = why(st.key, st.size, st.checksum)
            if bad:
                problems.append(bad)
            elif w is not None:
                held_writers.add(w)
    if not manifests and not problems:
        problems.append(f"none of the {len(commit.ranks)} rank manifest(s) it names is here")
    if problems or not partial:
        return problems, None
    return [], Held(frozenset(manifests), frozenset(held_writers))


def stored_objects(replica: LocalReplica, manifest: RankManifest) -> dict[str, Stored]:
    """How this replica holds each object of ``manifest``: home key -> stored key, codec, size,
    checksum (format version 3: compressed or referenced objects, from the placement records)."""

    def get(key: str) -> bytes | None:
        if replica.size(key) is None:
            return None
        return replica.get(key, MAX_PLACEMENT_BYTES)

    return resolve(manifest, get)


# ------------------------------------------------------------------------------ the tree
def find_namespaces(root: str) -> list[str]:
    """The namespaces under ``root``: directories holding step directories (never followed
    through symlinks, hidden names skipped), as ``/``-separated names, sorted."""
    out: list[str] = []

    def walk(path: str, parts: list[str]) -> None:
        if len(parts) > MAX_DEPTH:
            return
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            return
        has_steps = False
        for e in entries:
            if e.name.startswith(HIDDEN_PREFIX) or not e.is_dir(follow_symlinks=False):
                continue
            if parse_step_dir(e.name) is not None:
                has_steps = True  # a step directory: no namespace lies inside it
            else:
                walk(e.path, parts + [e.name])
        if has_steps and parts:
            name = "/".join(parts)
            try:
                out.append(validate_key(name))
            except ManifestError:
                pass  # a name no client could have written (made by hand): not ours

    walk(root, [])
    return sorted(out)


def committed_steps(ns_root: str) -> list[int]:
    """Steps of the namespace directory ``ns_root`` that have a commit record, oldest first."""
    try:
        names = [e.name for e in os.scandir(ns_root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    steps = sorted(s for s in map(parse_step_dir, names) if s is not None)
    return [s for s in steps if os.path.isfile(os.path.join(ns_root, *commit_key(s).split("/")))]


def newest_committed(ns_root: str) -> tuple[int, float] | None:
    """(newest committed step, when its commit record was written here: unix time), or None."""
    for step in reversed(committed_steps(ns_root)):
        try:
            return step, os.stat(os.path.join(ns_root, *commit_key(step).split("/"))).st_mtime
        except OSError:
            continue  # deleted since it was listed
    return None


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
        step = parse_step_dir(key.split("/", 1)[0])
        with self.lock:
            # Outside any step directory (no such writes today): the whole namespace, as step -1.
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
