"""The on-replica format: key layout, manifest records, JSON (de)serialisation and validation.

See ``docs/FORMAT.md`` for the byte-level description. In short, per step::

    step-000000000042/rank-00000/o000000-1f2e3d4c.bin   object: raw bytes, a window of the rank's data stream
    step-000000000042/rank-00000-1f2e3d4c.json          rank manifest: objects (size, checksum), tensors, structure
    step-000000000042/COMMIT.json                       written last: pins every rank manifest by size+checksum

``1f2e3d4c`` is a random token drawn for each save of each rank, so two writers of the same
step (or a retry after a crash) never write the same name: a losing writer cannot damage the
winner's objects, and leftovers of a torn save never collide with the next attempt.

A rank's *data stream* is the concatenation of its objects in order; every storage lives at
an offset in that stream, and :func:`cut_objects` is the rule that cuts it into objects.
Everything read from a replica is validated here before use: a manifest is untrusted input
(wrong types, huge numbers, ``../`` names, duplicate keys, documents built to exhaust memory).

Version 2 (written today) stores the per-object, per-storage and per-leaf fields as columns
(parallel JSON arrays) so that a reader builds its records without a Python step per item;
version-1 manifests (one JSON object per leaf) are still read. Version 3 added placement
records; version 4 the state tree's ``tensors`` node (:mod:`ckptmirror.state.tree`), so that
large state dicts and optimizer states are not one JSON object per tensor.

The package, by concern: :mod:`.names` (versions, limits, keys), :mod:`.records` (records
as columns, the object cut), :mod:`.manifest` (manifest and commit record, and how they are
written), :mod:`.jsondoc` (bounds and strict parsing of untrusted JSON), :mod:`.parse` (reading
every format version), :mod:`.share` (which ranks a partial replica holds), :mod:`.gcpause`
(the GC pause around them), :mod:`.pins` (pin records: the steps a job pinned). The public
names are imported from here (``from ckptmirror.format import ...``); private helpers stay in
their module.
"""

from __future__ import annotations

from .gcpause import (
    paused_gc,
)
from .jsondoc import (
    MAX_PARSE_MEMORY,
    check_parse_cost,
    load_json,
    parse_cost,
    serialise,
)
from .manifest import (
    CommitRecord,
    RankManifest,
    RankRef,
)
from .names import (
    CODEC_SUFFIX,
    COMMIT_NAME,
    COMPACT_TREE_VERSION,
    FORMAT_VERSION,
    MAX_DIMS,
    MAX_MANIFEST_BYTES,
    MAX_OBJECT_BYTES,
    MAX_RANKS,
    MAX_STEP,
    MAX_STREAM_BYTES,
    RUNS_MIN_ITEMS,
    RUNS_VERSION,
    STORED_OBJECT_RE,
    TMP_PREFIX,
    commit_key,
    is_rank_manifest_key,
    new_token,
    object_key,
    parse_step_dir,
    placement_key,
    rank_manifest_key,
    step_dir,
    stored_object_key,
    writer_of,
)
from .parse import (
    ParsedColumns,
    parse_commit,
    parse_rank_manifest,
    parsed_columns,
)
from .pins import (
    MAX_PIN_BYTES,
    PINS_PREFIX,
    pin_key,
    pin_record,
    pin_step,
)
from .records import (
    LARGE_STORAGE_DIVISOR,
    LEAF_DTYPE,
    LEAF_KIND,
    LEAF_OFFSET,
    LEAF_SHAPE,
    LEAF_STORAGE,
    LEAF_STRIDE,
    OBJECT_SIZE,
    STORAGE_NBYTES,
    STORAGE_OFFSET,
    LeafColumns,
    LeafRecord,
    ObjectRecord,
    StorageColumns,
    StorageRecord,
    contiguous_strides,
    cut_objects,
    encode_ints,
    leaf_columns,
    storage_columns,
)
from .share import (
    MAX_SHARE_BYTES,
    ShareRecord,
    is_share_key,
    share_key,
)

__all__ = [
    "CODEC_SUFFIX",
    "COMMIT_NAME",
    "COMPACT_TREE_VERSION",
    "CommitRecord",
    "FORMAT_VERSION",
    "LARGE_STORAGE_DIVISOR",
    "LEAF_DTYPE",
    "LEAF_KIND",
    "LEAF_OFFSET",
    "LEAF_SHAPE",
    "LEAF_STORAGE",
    "LEAF_STRIDE",
    "LeafColumns",
    "LeafRecord",
    "MAX_DIMS",
    "MAX_MANIFEST_BYTES",
    "MAX_OBJECT_BYTES",
    "MAX_PARSE_MEMORY",
    "MAX_PIN_BYTES",
    "MAX_RANKS",
    "MAX_SHARE_BYTES",
    "MAX_STEP",
    "MAX_STREAM_BYTES",
    "OBJECT_SIZE",
    "PINS_PREFIX",
    "ObjectRecord",
    "ParsedColumns",
    "RUNS_MIN_ITEMS",
    "RUNS_VERSION",
    "RankManifest",
    "RankRef",
    "STORAGE_NBYTES",
    "STORAGE_OFFSET",
    "STORED_OBJECT_RE",
    "ShareRecord",
    "StorageColumns",
    "StorageRecord",
    "TMP_PREFIX",
    "check_parse_cost",
    "commit_key",
    "contiguous_strides",
    "is_share_key",
    "cut_objects",
    "encode_ints",
    "is_rank_manifest_key",
    "leaf_columns",
    "load_json",
    "new_token",
    "object_key",
    "parse_commit",
    "parse_cost",
    "parse_rank_manifest",
    "parse_step_dir",
    "parsed_columns",
    "paused_gc",
    "pin_key",
    "pin_record",
    "pin_step",
    "placement_key",
    "rank_manifest_key",
    "serialise",
    "share_key",
    "step_dir",
    "storage_columns",
    "stored_object_key",
    "writer_of",
]
