"""The checks of what the peer agent stores, and where it stores it: one file against its size and
checksum at a bounded read rate (:class:`Pacer`, :func:`check_file`), a commit before the agent
accepts it (:func:`check_commit`), the :class:`Held` record of a node's share of a step, and the
namespace and step directories under the agent's root (:func:`find_namespaces`,
:func:`committed_steps`).

Apart from the scrubber's thread (:mod:`._scrub_run`) because none of it keeps state: the upload
handlers (the commit check), the metrics (the tree) and the scrubber all call it, so "damaged"
and "committed" mean the same thing in each. The rules (a namespace that holds part of a step,
the problem kinds) are in :mod:`._scrub`'s docstring.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Mapping, MutableMapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from ..checksum import Hasher
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
from ._peer_protocol import HIDDEN_PREFIX
from .base import validate_key
from .local import LocalReplica

__all__ = [
    "CHUNK_BYTES",
    "HELD_KIND",
    "HELD_PREFIX",
    "MAX_COMMIT_BYTES",
    "MAX_DEPTH",
    "Damage",
    "Held",
    "Pacer",
    "Writer",
    "check_commit",
    "check_file",
    "committed_steps",
    "drop_held",
    "find_namespaces",
    "held_key",
    "newest_committed",
    "read_held",
    "stored_objects",
]

#: Commit records are ~100 bytes per rank (the agent accepts at most this much for one).
MAX_COMMIT_BYTES = 16 << 20
#: Largest read; the pacer makes them smaller at low rates (a few reads a second).
CHUNK_BYTES = 4 << 20
#: Namespaces nest (``jobs/a``); a tree deeper than this under the root is not walked.
MAX_DEPTH = 32


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
