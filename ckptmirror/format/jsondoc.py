"""Reading untrusted JSON documents: bounds on their parse memory, strict parsing, typed fields."""

from __future__ import annotations

import builtins
import json
import math
import operator
import re
from itertools import repeat
from operator import countOf
from typing import TYPE_CHECKING, Any

from ..checksum import is_checksum
from ..errors import ManifestError
from .gcpause import paused_gc
from .names import _OBJECT_KEY_RE, FORMAT_VERSION, MAX_MANIFEST_BYTES, MAX_STREAM_BYTES

if TYPE_CHECKING:
    from .manifest import RankManifest


#: Upper bound on the memory that parsing one manifest or commit record may take, as estimated
#: by :func:`parse_cost` before any Python object is built (see docs/FORMAT.md, "Parsing bounds").
MAX_PARSE_MEMORY = 512 << 20

# ---------------------------------------------------------------- parsing (untrusted input)

# What parsing costs in Python memory, on 64-bit CPython (3.10-3.13), as upper bounds checked by
# tests/test_format_v2.py against what documents built to be expensive really take (tracemalloc):
#: per JSON value: the object (an int, a float, a short str: 107 bytes at worst, a one-character
#: astral string), the slot that points at it, and its share of the records built from it
_COST_PER_VALUE = 112
#: per JSON object, on top of its values: the list of (key, value) pairs the duplicate check gets
_COST_PER_OBJECT = 64
#: per item expanded from runs (format version 5), which the document's bytes do not count: the
#: int in its column and its share of the records and checks built per leaf, as a JSON value
#: for each column a leaf has in version 4 would have been charged (tests/test_format_v5.py)
_COST_PER_RUN_ITEM = 2 * _COST_PER_VALUE


def parse_cost(data: bytes, run_items: int = 0) -> int:
    """Estimated peak memory (bytes) of parsing ``data`` into records: an upper bound, in O(n) C time.

    Every JSON value follows a ``[``, ``{``, ``,`` or ``:`` (or starts the document), so counting
    those bytes bounds the number of values without parsing anything; the same bytes inside
    strings only make the bound looser. The text itself is counted twice (the decoded document
    and the strings cut from it), at four bytes a character unless it is all ASCII.
    ``run_items``: items the document's int columns hold as runs (format version 5), which its
    bytes do not show, at :data:`_COST_PER_RUN_ITEM` each.
    """
    objects = data.count(b"{")
    values = data.count(b",") + data.count(b":") + data.count(b"[") + objects + 1
    per_char = 1 if data.isascii() else 4
    return (
        2 * per_char * len(data)
        + _COST_PER_VALUE * values
        + _COST_PER_OBJECT * objects
        + _COST_PER_RUN_ITEM * run_items
    )


#: The most :func:`parse_cost` can charge a byte of a document: four bytes a character, counted
#: twice, and a JSON object (a value and an object) at every byte.
_MAX_COST_PER_BYTE = 2 * 4 + _COST_PER_VALUE + _COST_PER_OBJECT


def check_parse_cost(data: bytes, key: str, run_items: int = 0) -> None:
    """Refuse (:class:`ManifestError` naming ``key``) a document whose :func:`parse_cost`, plus
    ``run_items`` items its int columns hold as runs (format version 5: what
    :meth:`RankManifest.encode` returns), exceeds :data:`MAX_PARSE_MEMORY`. Readers call it
    before parsing (and charge runs as they meet them); the writer calls it on every manifest
    it serialises, so that no save writes a manifest that readers would refuse.

    A document too short to exceed the limit whatever its bytes (under 2.9 MB) is not counted."""
    cost = _cost_over_limit(data, run_items)
    if cost is not None:
        raise ManifestError(
            f"manifest of {len(data)} bytes holds too many JSON values for its size"
            + (f" ({run_items} of them as runs)" if run_items else "")
            + f": parsing it would take about {cost >> 20} MiB, over the {MAX_PARSE_MEMORY >> 20} MiB limit",
            key=key,
        )


def serialise(manifest: RankManifest, key: str) -> bytes:
    """What a writer stores for ``manifest`` (at ``key``): its JSON, refused
    (:class:`ManifestError`) if readers would refuse it (:func:`check_parse_cost`).

    Runs are charged at :data:`_COST_PER_RUN_ITEM` an item, more than the plain int they stand
    for costs (:data:`_COST_PER_VALUE`), so near the limit runs can make a manifest cost more than
    its plain form: then it is written with plain columns, and any manifest that version 4 could
    write, version 5 can too."""
    data, run_items = manifest.encode()
    if run_items and _cost_over_limit(data, run_items) is not None:
        data, run_items = manifest.encode(runs=False)
    check_parse_cost(data, key, run_items)
    return data


def _cost_over_limit(data: bytes, run_items: int) -> int | None:
    """The estimated cost of parsing ``data`` with ``run_items`` items expanded from runs, if it
    exceeds :data:`MAX_PARSE_MEMORY`; None if it does not (counted only when it might)."""
    extra = run_items * _COST_PER_RUN_ITEM
    if len(data) * _MAX_COST_PER_BYTE + _COST_PER_VALUE + extra <= MAX_PARSE_MEMORY:
        return None
    cost = parse_cost(data, run_items)
    return cost if cost > MAX_PARSE_MEMORY else None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # in C; only a document with a duplicate takes the slow path below
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate JSON key {k!r}")
            seen.add(k)
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    # A literal such as 1e400 is valid JSON grammar but no double: float() makes it inf, which
    # the format excludes as it excludes the Infinity constant (verify and inspect would choke on it).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is beyond the range of a double")
    return value


def load_json(data: bytes, key: str) -> dict[str, Any]:
    """Parse a manifest document strictly; any problem is a :class:`ManifestError` naming ``key``.

    Bounded before any Python object is built: at most :data:`MAX_MANIFEST_BYTES` bytes and an
    estimated parse memory (:func:`parse_cost`) of at most :data:`MAX_PARSE_MEMORY`. UTF-8 only
    (``json.loads`` would otherwise guess UTF-16 or UTF-32 from the first bytes).
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of {len(data)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit", key=key)
    check_parse_cost(data, key)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not UTF-8: {exc}", key=key) from exc
    try:
        with paused_gc():
            doc = json.loads(
                text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
            )
    except RecursionError as exc:
        raise ManifestError("JSON nested too deeply", key=key) from exc
    except ValueError as exc:
        raise ManifestError(f"not valid JSON: {exc}", key=key) from exc
    if not isinstance(doc, dict):
        raise ManifestError("top level is not a JSON object", key=key)
    version = doc.get("format_version")
    if type(version) is not int:
        raise ManifestError("format_version missing or not an int", key=key)
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"format_version {version} is newer than this ckptmirror understands ({FORMAT_VERSION}); "
            "upgrade ckptmirror",
            key=key,
        )
    if version < 1:
        raise ManifestError(f"bad format_version {version}", key=key)
    return doc


_CHECKSUM_RE = re.compile(r"xxh3_64:[0-9a-f]{16}\Z")


class _Fields:
    """Typed field access that reports the manifest key and the field path on failure."""

    # The methods are named after the builtins they check, and in the class body those names
    # shadow the builtins: annotations spell them ``builtins.int`` etc.

    def __init__(self, key: builtins.str, data: bytes | None = None, runs: builtins.bool = False) -> None:
        self.key = key
        #: The document (for the memory bound of what runs expand to) and whether its int
        #: columns may be runs (format version 5 on).
        self.data = data
        self.runs_ok = runs
        self.expanded = 0  # items expanded from runs so far

    def err(self, path: builtins.str, msg: builtins.str) -> ManifestError:
        return ManifestError(f"field {path}: {msg}", key=self.key)

    def int(self, value: Any, path: builtins.str, lo: builtins.int, hi: builtins.int) -> builtins.int:
        if type(value) is not int:
            raise self.err(path, f"expected an int, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise self.err(path, f"{value} is outside [{lo}, {hi}]")
        return value

    def list(self, value: Any, path: builtins.str, length: builtins.int | None = None) -> builtins.list[Any]:
        if not isinstance(value, list):
            raise self.err(path, f"expected a list, got {type(value).__name__}")
        if length is not None and len(value) != length:
            raise self.err(path, f"expected {length} items, got {len(value)}")
        return value

    def str(self, value: Any, path: builtins.str, max_len: builtins.int = 4096) -> builtins.str:
        if not isinstance(value, str) or len(value) > max_len:
            raise self.err(path, "expected a short string")
        return value

    def bool(self, value: Any, path: builtins.str) -> builtins.bool:
        if type(value) is not bool:
            raise self.err(path, "expected a bool")
        return value

    def number(self, value: Any, path: builtins.str) -> float:
        if type(value) not in (int, float):
            raise self.err(path, "expected a number")
        try:
            out = float(value)
        except OverflowError:  # an int of hundreds of digits
            out = math.inf
        if not math.isfinite(out):
            raise self.err(path, "expected a finite number")
        return out

    def checksum(self, value: Any, path: builtins.str) -> builtins.str:
        if not is_checksum(value):
            raise self.err(path, f"malformed checksum {value!r}")
        return value

    def object_key(self, value: Any, path: builtins.str) -> builtins.str:
        k = self.str(value, path)
        # Keys are resolved by the replicas, but a manifest is untrusted: only the exact shape
        # the writer produces is accepted, so "../x", "/etc/passwd" or "a\x00b" never get that far.
        if not _OBJECT_KEY_RE.match(k):
            raise self.err(path, f"object name {k!r} is not a valid object key")
        return k

    def section(self, doc: dict[builtins.str, Any], name: builtins.str) -> dict[builtins.str, Any]:
        value = doc.get(name)
        if not isinstance(value, dict):
            raise self.err(name, "expected an object of columns")
        return value

    # Columns are checked a whole list at a time, in C (map, set, min, max): a manifest has
    # tens of thousands of leaves, and a Python step per item would be most of the parse time.
    # Only on failure does a Python loop look for the first bad item, to name it.

    def int_column(
        self,
        value: Any,
        path: builtins.str,
        lo: builtins.int,
        hi: builtins.int,
        length: builtins.int | None = None,
    ) -> builtins.list[builtins.int]:
        if self.runs_ok and isinstance(value, dict):
            return self.runs(value, path, lo, hi, length)
        col = self.list(value, path, length)
        if col and not (_all_of_type(col, int) and _ints_within(col, lo, hi)):
            self.first_bad_int(col, path, lo, hi)
        return col

    def ints(self, value: Any, path: builtins.str, lo: builtins.int, hi: builtins.int) -> Any:
        """``value`` with its runs expanded (ints in ``[lo, hi]``) if it is runs; else as it is,
        for the caller's own checks."""
        if self.runs_ok and isinstance(value, dict):
            return self.runs(value, path, lo, hi, None)
        return value

    def runs(
        self, value: dict[builtins.str, Any], path: builtins.str, lo: builtins.int, hi: builtins.int, length: Any
    ) -> builtins.list[builtins.int]:
        """Expand ``{"runs": [first, step, count, ...]}`` (format version 5): every item an int
        in ``[lo, hi]``, ``length`` items in all if given. Checked per run (the ends of a run
        bound its items), and the memory its items take is charged before they are built."""
        if builtins.list(value) != ["runs"]:
            raise self.err(path, 'expected a list, or an object {"runs": [...]}')
        p = path + ".runs"
        flat = self.list(value["runs"], p)
        if len(flat) % 3:
            raise self.err(p, f"expected (first, step, count) triples, got {len(flat)} numbers")
        if flat and not _all_of_type(flat, builtins.int):
            self.first_bad_int(flat, p, -MAX_STREAM_BYTES, MAX_STREAM_BYTES)
        firsts, steps, counts = flat[0::3], flat[1::3], flat[2::3]
        if counts and min(counts) < 1:
            j = next(j for j, c in enumerate(counts) if c < 1)
            raise self.err(f"{p}[{3 * j + 2}]", f"a run holds at least 1 item, got {counts[j]}")
        total = sum(counts)
        if length is not None and total != length:
            raise self.err(path, f"the runs hold {total} items, expected {length}")
        self.charge(total, path)
        lasts = builtins.list(map(operator.add, firsts, map(operator.mul, steps, map(operator.sub, counts, repeat(1)))))
        if firsts and not (lo <= min(min(firsts), min(lasts)) and max(max(firsts), max(lasts)) <= hi):
            for j, (a, z) in enumerate(zip(firsts, lasts)):
                for v in (a, z):
                    if not lo <= v <= hi:
                        raise self.err(
                            f"{p}[{3 * j}]",
                            f"run of {counts[j]} from {a} by {steps[j]} reaches {v}, outside [{lo}, {hi}]",
                        )
        out: builtins.list[builtins.int] = []
        for a, step, c in zip(firsts, steps, counts):
            out += repeat(a, c) if step == 0 else range(a, a + step * c, step)
        return out

    def charge(self, items: builtins.int, path: builtins.str) -> None:
        """Count ``items`` more ints expanded from runs against :data:`MAX_PARSE_MEMORY`, on top
        of the document's :func:`parse_cost`: a few bytes of runs may stand for millions of items."""
        self.expanded += items
        cost = _cost_over_limit(self.data if self.data is not None else b"", self.expanded)
        if cost is not None:
            raise self.err(
                path,
                f"runs of {self.expanded} items in all: reading the manifest would take about "
                f"{cost >> 20} MiB, over the {MAX_PARSE_MEMORY >> 20} MiB limit",
            )

    def first_bad_int(self, col: builtins.list[Any], path: builtins.str, lo: builtins.int, hi: builtins.int) -> None:
        """Raise naming the first item of ``col`` that is not an int in ``[lo, hi]``, if any."""
        for i, v in enumerate(col):
            self.int(v, f"{path}[{i}]", lo, hi)

    def str_column(
        self, value: Any, path: builtins.str, pattern: re.Pattern[builtins.str], length: builtins.int
    ) -> builtins.list[builtins.str]:
        col = self.list(value, path, length)
        if col and not (set(map(type, col)) <= {str} and all(map(pattern.match, col))):
            for i, v in enumerate(col):
                if not isinstance(v, str) or not pattern.match(v):
                    raise self.err(f"{path}[{i}]", f"{v!r} does not match {pattern.pattern!r}")
        return col


def _all_of_type(col: list[Any], t: type) -> bool:
    """Whether every item of ``col`` is exactly a ``t`` (a bool is not an int, nor a float),
    counted in C (a third cheaper than the set of their types)."""
    return countOf(map(type, col), t) == len(col)


def _ints_within(col: list[int], lo: int, hi: int) -> bool:
    """Whether every item of ``col`` (ints, checked before) lies in ``[lo, hi]``, in C.

    A column of one value (the element offsets, the type of a one-dtype manifest) is recognised
    by ``list.count`` (mostly an identity compare: JSON decodes small ints to shared objects), a
    column of a few possible values (flags, types) by its set, any other by ``min`` and ``max``.
    """
    if col[0] == col[-1] and col.count(col[0]) == len(col):
        return lo <= col[0] <= hi
    if hi - lo < 16:
        return set(col) <= set(range(lo, hi + 1))
    return lo <= min(col) and max(col) <= hi
