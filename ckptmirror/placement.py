"""Placement records: how one replica holds a step's objects (format version 3).

A rank manifest describes a step's objects by their *decoded* bytes (size and checksum) and
gives each a *home key* under the step (``step-S/rank-R/oNNNNNN-TOKEN.bin``). It is the same
document on every replica, pinned by the commit record. Replicas may hold an object otherwise:

- compressed (``"compression": "zstd"`` for S3): stored under ``...-TOKEN.zst`` with its own
  size and checksum (of the stored bytes, so ``verify`` and ``repair`` never decompress);
- not at all in this step, because an earlier committed step on the same replica holds the same
  bytes (an incremental save): stored under that step's key.

Each writer ``(rank, token)`` of a step writes, to each replica where any of its objects is
stored otherwise than raw at its home key, one placement record
``step-S/rank-R-TOKEN.place.json`` listing those objects. An object the placement does not
list is stored raw at its home key. A replica without a placement record holds every object of
that writer raw at home (which is what every version-1 and -2 step is).

Integrity: the placement carries a checksum of its own canonical JSON, so rot in it is reported
as such; and whatever a placement says, a reader verifies the stored bytes against the
placement's checksum and the decoded bytes against the manifest's (pinned by the commit): a
wrong placement can make an object unavailable on a replica, never wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .checksum import checksum
from .errors import ManifestError
from .format import (
    FORMAT_VERSION,
    MAX_MANIFEST_BYTES,
    MAX_OBJECT_BYTES,
    MAX_RANKS,
    MAX_STEP,
    STORED_OBJECT_RE,
    ObjectRecord,
    RankManifest,
    load_json,
    placement_key,
    step_dir,
    writer_of,
)
from .format.jsondoc import _CHECKSUM_RE, _Fields  # the format's own field checks

if TYPE_CHECKING:
    from .replicas.base import Replica

#: Codecs a placement may name ("none": the raw bytes).
CODECS = ("none", "zstd")

_PLACEMENT_KEY_RE = re.compile(r"step-([0-9]{12})/rank-([0-9]{5})-([0-9a-f]{8})\.place\.json\Z")


class Stored(NamedTuple):
    """How one replica holds one object: under ``key``, encoded with ``codec``, ``size`` bytes
    whose checksum is ``checksum`` (for ``codec == "none"``: the object's own size and checksum)."""

    key: str
    codec: str
    size: int
    checksum: str


def identity(obj: ObjectRecord) -> Stored:
    """An object stored raw at its home key."""
    return Stored(obj.key, "none", obj.size, obj.checksum)


def is_placement_key(key: str) -> bool:
    """Whether ``key`` names a placement record."""
    return _PLACEMENT_KEY_RE.match(key) is not None


@dataclass(frozen=True)
class Placement:
    """The placement record of writer ``(rank, token)`` at ``step`` on one replica."""

    step: int
    rank: int
    token: str
    #: home key -> how this replica stores that object (objects not listed: raw at home)
    entries: dict[str, Stored]

    @property
    def key(self) -> str:
        """Where this record is stored."""
        return placement_key(self.step, self.rank, self.token)

    def to_json(self) -> bytes:
        """Serialise: canonical JSON (sorted keys) with a checksum of the rest of the document."""
        homes = sorted(self.entries)
        doc: dict[str, object] = {
            "format_version": FORMAT_VERSION,
            "kind": "ckptmirror.placement",
            "step": self.step,
            "rank": self.rank,
            "token": self.token,
            "objects": {
                "home": homes,
                "key": [self.entries[h].key for h in homes],
                "codec": [self.entries[h].codec for h in homes],
                "size": [self.entries[h].size for h in homes],
                "checksum": [self.entries[h].checksum for h in homes],
            },
        }
        doc["self_checksum"] = checksum(_canonical(doc))
        return _canonical(doc)

    def references(self) -> set[str]:
        """Stored keys in other steps' directories: what retention must keep while this step lives."""
        own = step_dir(self.step) + "/"
        return {s.key for s in self.entries.values() if not s.key.startswith(own)}


def _canonical(doc: dict[str, object]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def parse_placement(data: bytes, key: str) -> Placement:
    """Parse and validate a placement record; any problem is a :class:`ManifestError` naming ``key``."""
    m = _PLACEMENT_KEY_RE.match(key)
    if m is None:
        raise ManifestError("not a placement record name", key=key)
    doc = load_json(data, key)
    f = _Fields(key)
    if doc.get("kind") != "ckptmirror.placement":
        raise f.err("kind", "not a ckptmirror placement record")
    given = doc.pop("self_checksum", None)
    if not isinstance(given, str) or checksum(_canonical(doc)) != given:
        raise f.err("self_checksum", "the record does not match its own checksum (damaged)")
    step = f.int(doc.get("step"), "step", 0, MAX_STEP)
    rank = f.int(doc.get("rank"), "rank", 0, MAX_RANKS - 1)
    token = f.str(doc.get("token"), "token", 8)
    if (step, rank, token) != (int(m.group(1)), int(m.group(2)), m.group(3)):
        raise f.err("step", "step, rank or token do not match the record's name")
    sec = f.section(doc, "objects")
    homes = f.list(sec.get("home"), "objects.home")
    n = len(homes)
    home_re = re.compile(rf"{step_dir(step)}/rank-{rank:05d}/o[0-9]{{6}}-{token}\.bin\Z")
    f.str_column(homes, "objects.home", home_re, n)
    keys = f.str_column(sec.get("key"), "objects.key", STORED_OBJECT_RE, n)
    codecs = f.list(sec.get("codec"), "objects.codec", n)
    sizes = f.int_column(sec.get("size"), "objects.size", 0, MAX_OBJECT_BYTES, n)
    sums = f.str_column(sec.get("checksum"), "objects.checksum", _CHECKSUM_RE, n)
    entries: dict[str, Stored] = {}
    for i, (home, skey, codec, size, csum) in enumerate(zip(homes, keys, codecs, sizes, sums)):
        if codec not in CODECS:
            raise f.err(f"objects.codec[{i}]", f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
        ref = STORED_OBJECT_RE.match(skey)
        assert ref is not None  # checked by the column
        if int(ref.group(1)) > step:
            raise f.err(f"objects.key[{i}]", f"{skey!r} lies in a newer step: a step references only older ones")
        if (ref.group(2) == "zst") != (codec == "zstd"):
            raise f.err(f"objects.key[{i}]", f"{skey!r} does not carry codec {codec!r}'s suffix")
        if home in entries:
            raise f.err(f"objects.home[{i}]", f"{home!r} listed twice")
        entries[home] = Stored(skey, codec, size, csum)
    return Placement(step, rank, token, entries)


def writers(objects: Iterable[ObjectRecord]) -> list[tuple[int, str]]:
    """The distinct writers ``(rank, token)`` of ``objects``, in first-seen order."""
    seen: dict[tuple[int, str], None] = {}
    for o in objects:
        w = writer_of(o.key)
        if w is not None:
            seen.setdefault(w, None)
    return list(seen)


def resolve(
    m: RankManifest, get: Callable[[str], bytes | None], objects: Sequence[ObjectRecord] | None = None
) -> dict[str, Stored]:
    """How one replica holds ``objects`` (default: all of ``m``'s): home key -> :class:`Stored`.

    ``get(key)`` reads a placement record from that replica (None when it has none). A version
    1 or 2 manifest has no placements: every object is raw at home. Raises
    :class:`ManifestError` for a damaged placement or one that contradicts the manifest.
    """
    objs = m.objects if objects is None else objects
    out = {o.key: identity(o) for o in objs}
    if m.format_version < 3:
        return out
    for rank, token in writers(objs):
        pkey = placement_key(m.step, rank, token)
        data = get(pkey)
        if data is None:
            continue
        p = parse_placement(data, pkey)
        for o in objs:
            s = p.entries.get(o.key)
            if s is None:
                continue
            if s.codec == "none" and (s.size, s.checksum) != (o.size, o.checksum):
                raise ManifestError(
                    f"placement says {o.key} is stored raw as {s.key} with size {s.size} and checksum "
                    f"{s.checksum}, the manifest says {o.size} and {o.checksum}",
                    key=pkey,
                )
            out[o.key] = s
    return out


def placement_of(home: str) -> str | None:
    """Key of the placement record that may list the object ``home`` (None: no writer in its name)."""
    w = writer_of(home)
    return None if w is None else placement_key(int(home[5:17]), *w)


def drop_placement_entry(replica: Replica, home: str) -> None:
    """Make ``replica``'s placement record say that ``home`` is stored raw under its own name
    (``repair`` wrote it so); the record is rewritten atomically, or deleted once it is empty.

    A read-modify-write of the whole record: callers that drop entries of one record from
    several threads must hold one lock per record (``repair`` does), or one change is lost."""
    pkey = placement_of(home)
    if pkey is None:
        return
    if replica.size(pkey) is None:
        return
    p = parse_placement(replica.get(pkey, MAX_PLACEMENT_BYTES), pkey)
    if home not in p.entries:
        return
    entries = {h: s for h, s in p.entries.items() if h != home}
    if entries:
        replica.put(pkey, Placement(p.step, p.rank, p.token, entries).to_json())
    else:
        replica.delete(pkey)


#: Placement records are small (one row per object stored otherwise than raw at home).
MAX_PLACEMENT_BYTES = MAX_MANIFEST_BYTES
