"""Format versions, limits and the key layout: where each object, manifest and commit record lives."""

from __future__ import annotations

import re
import secrets

#: The version written; every version from 1 up to it is read.
FORMAT_VERSION = 5
#: The first version whose state tree may hold ``tensors`` nodes (see :mod:`ckptmirror.state.tree`).
COMPACT_TREE_VERSION = 4
#: The first version whose int columns may be runs and whose leaf shapes may be a table plus an
#: index column (see :func:`encode_ints` and docs/FORMAT.md, "Int columns").
RUNS_VERSION = 5
#: A column shorter than this is written as a plain list (runs would save nothing worth it).
RUNS_MIN_ITEMS = 64
MAX_STEP = 10**12 - 1
MAX_RANKS = 100_000
MAX_OBJECT_BYTES = 1 << 40  # 1 TiB: anything larger in a manifest is hostile or corrupt
MAX_STREAM_BYTES = 1 << 50
MAX_MANIFEST_BYTES = 256 << 20
#: Upper bound on the memory that parsing one manifest or commit record may take, as estimated
#: by :func:`parse_cost` before any Python object is built (see docs/FORMAT.md, "Parsing bounds").
MAX_DIMS = 64
COMMIT_NAME = "COMMIT.json"

# [0-9] and \Z, not \d and $: \d matches non-ASCII digits and $ accepts a trailing newline.
_STEP_DIR_RE = re.compile(r"step-([0-9]{12})\Z")
_OBJECT_NAME_RE = r"rank-[0-9]{5}/o[0-9]{6}-[0-9a-f]{8}\.bin\Z"  # inside a step directory
_OBJECT_KEY_RE = re.compile(r"step-[0-9]{12}/" + _OBJECT_NAME_RE)
_MANIFEST_KEY_RE = re.compile(r"step-([0-9]{12})/rank-([0-9]{5})-[0-9a-f]{8}\.json\Z")
_TOKEN_RE = re.compile(r"[0-9a-f]{8}\Z")


def new_token() -> str:
    """A fresh writer token: 8 random hex digits, drawn for each save of each rank."""
    return secrets.token_hex(4)


def step_dir(step: int) -> str:
    """Key prefix of a step: ``step-000000000042``."""
    return f"step-{step:012d}"


def parse_step_dir(name: str) -> int | None:
    """Step number of a step directory name, or None if the name is not one."""
    m = _STEP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def _check_token(token: str) -> str:
    if not _TOKEN_RE.match(token):
        raise ValueError(f"bad writer token {token!r}")
    return token


def object_key(step: int, rank: int, index: int, token: str) -> str:
    """Key of object ``index`` of ``rank`` at ``step``, written by the save with ``token``."""
    return f"{step_dir(step)}/rank-{rank:05d}/o{index:06d}-{_check_token(token)}.bin"


def rank_manifest_key(step: int, rank: int, token: str) -> str:
    """Key of a rank manifest written by the save with ``token``."""
    return f"{step_dir(step)}/rank-{rank:05d}-{_check_token(token)}.json"


_WRITER_RE = re.compile(
    r"step-[0-9]{12}/rank-([0-9]{5})(?:/o[0-9]{6}-([0-9a-f]{8})\.(?:bin|zst)|-([0-9a-f]{8})\.(?:json|place\.json))\Z"
)
#: Stored object names (format version 3): ``.bin`` raw bytes, ``.zst`` the zstd byte-plane codec.
STORED_OBJECT_RE = re.compile(r"step-([0-9]{12})/rank-[0-9]{5}/o[0-9]{6}-[0-9a-f]{8}\.(bin|zst)\Z")
#: File name suffix of each codec's stored objects.
CODEC_SUFFIX = {"none": ".bin", "zstd": ".zst"}


def stored_object_key(home: str, codec: str) -> str:
    """Where an object whose manifest key is ``home`` is stored when encoded with ``codec``."""
    return home if codec == "none" else home[: -len(".bin")] + CODEC_SUFFIX[codec]


def placement_key(step: int, rank: int, token: str) -> str:
    """Key of the placement record of writer ``(rank, token)`` at ``step`` (format version 3)."""
    return f"{step_dir(step)}/rank-{rank:05d}-{_check_token(token)}.place.json"


#: Name prefix of a file being written (``.tmp-<uuid32>-<name>``): never a committed object.
TMP_PREFIX = ".tmp-"
_TMP_RE = re.compile(re.escape(TMP_PREFIX) + r"[0-9a-f]{32}-")


def writer_of(key: str) -> tuple[int, str] | None:
    """``(rank, token)`` of an object or rank manifest key, or of a local temp file of one
    (``.tmp-<uuid>-<name>``); None for anything else (commit records and their temp files)."""
    head, _, name = key.rpartition("/")
    m = _WRITER_RE.match(f"{head}/{_TMP_RE.sub('', name, count=1)}" if name.startswith(TMP_PREFIX) else key)
    return (int(m.group(1)), m.group(2) or m.group(3)) if m else None


def is_rank_manifest_key(key: str, step: int, rank: int) -> bool:
    """Whether ``key`` is a well-formed rank manifest name for ``step`` and ``rank``."""
    m = _MANIFEST_KEY_RE.match(key)
    return m is not None and int(m.group(1)) == step and int(m.group(2)) == rank


def commit_key(step: int) -> str:
    """Key of a step's commit record, the object written last."""
    return f"{step_dir(step)}/{COMMIT_NAME}"
