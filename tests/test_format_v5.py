"""Format version 5: int columns as runs, leaf shapes as a table, and version-4 steps still read.

* ``tests/data/v4_step``, written by ckptmirror before version 5, restores bit-exact and
  verifies, and a version-5 save next to it commits and restores;
* :func:`ckptmirror.format.encode_ints` round-trips any column, and writes runs only where they
  are at most half as many numbers;
* a large manifest written as version 5 (runs, a shape table) and the same manifest written as
  version 4 parse to the same records and validate to the same result;
* hostile runs and shape tables are refused naming the field, and runs that stand for more
  items than the parse memory limit admits are refused before a single item is built; the
  writer drops runs where a reader would refuse them, and refuses what a reader would refuse
  anyway.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import files_under, traced_peak
from test_format_v2 import _mut, assert_identical, v1_fixture_state

import ckptmirror
from ckptmirror import format as fmt
from ckptmirror.errors import CkptMirrorError, ManifestError
from ckptmirror.ops import verify
from ckptmirror.restore.check import validate_manifest
from ckptmirror.state.tree import flatten

DATA = Path(__file__).resolve().parent / "data"
V4_STEP = DATA / "v4_step"
KEY = fmt.rank_manifest_key(3, 0, "0badc0de")


def v4_fixture_state() -> dict[str, Any]:
    """The state saved in tests/data/v4_step (step 11) by the version-4 writer: the version-1
    fixture's state plus 160 small parameters (fp32 and bf16, every third one frozen) and their
    Adam-like state, so that the manifest holds ``tensors`` nodes and long columns (658 leaves).
    Exact arithmetic only, like :func:`test_format_v2.v1_fixture_state`."""
    state = v1_fixture_state()

    def ramp(n: int, dtype: torch.dtype, scale: float, shift: float) -> torch.Tensor:
        return (torch.arange(n, dtype=torch.float64) * scale + shift).to(dtype)

    blocks = {}
    for i in range(160):
        shape = (4,) if i % 2 else (2, 3)
        dtype = torch.bfloat16 if i % 4 == 1 else torch.float32
        t = ramp(math.prod(shape), dtype, 0.125, i - 80.0).reshape(shape)
        blocks[f"blocks.{i}.w"] = torch.nn.Parameter(t, requires_grad=i % 3 != 0)
    state["model"].update(blocks)
    state["optim"]["state"].update(
        {
            i + 1: {
                "step": torch.tensor(float(i)),
                "exp_avg": ramp(4, torch.float32, 0.25, -i / 8),
                "exp_avg_sq": ramp(4, torch.float32, 0.5, i / 16),
            }
            for i in range(160)
        }
    )
    return state


def _v4_manifest(root: Path) -> tuple[str, dict[str, Any]]:
    (rel,) = [f for f in files_under(root) if f.startswith("step-000000000011/rank-00000-") and f.endswith(".json")]
    return rel, json.loads((root / rel).read_bytes())


# ============================================================ 1. version-4 steps still read
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_v4_fixture_restores_bit_exact_and_verifies(tmp_path: Path, compression: str) -> None:
    root = tmp_path / "v4"
    shutil.copytree(V4_STEP, root)
    _, doc = _v4_manifest(root)
    assert doc["format_version"] == 4, "the fixture must stay a version-4 step"
    assert json.loads((root / fmt.commit_key(11)).read_bytes())["format_version"] == 4
    assert isinstance(doc["leaves"]["storage"], list) and "shapes" not in doc["leaves"]
    assert len(doc["leaves"]["type"]) >= 4 * fmt.RUNS_MIN_ITEMS, "long enough that version 5 would use runs"
    opts = {"file": {"compression": compression}}
    with ckptmirror.Mirror([str(root)], storage_options=opts) as m:
        step, state = m.load_state()
        assert step == 11
        assert_identical(state, v4_fixture_state())
        m.save_state(12, v4_fixture_state())
        m.wait()
    with ckptmirror.Mirror([str(root)]) as m:
        assert m.steps() == [11, 12]
        for s in (11, 12):
            got = m.load_state(s, require=True)
            assert got is not None
            assert_identical(got[1], v4_fixture_state())
    rel12 = next(f for f in files_under(root) if f.startswith("step-000000000012/rank-00000-") and f.endswith(".json"))
    doc12 = json.loads((root / rel12).read_bytes())
    assert doc12["format_version"] == fmt.FORMAT_VERSION == 5
    runs = [k for k, v in doc12["leaves"].items() if isinstance(v, dict)]
    assert runs and "shapes" in doc12["leaves"], "the same state written as version 5 uses runs and a shape table"
    assert verify([str(root)]).exit_code == 0


def test_v4_fixture_and_its_v5_rewrite_parse_to_the_same_records() -> None:
    rel, _ = _v4_manifest(V4_STEP)
    raw = (V4_STEP / rel).read_bytes()
    m4 = fmt.parse_rank_manifest(raw, rel)
    data, run_items = m4.encode()
    assert run_items > 0 and len(data) < len(raw)
    m5 = fmt.parse_rank_manifest(data, rel)
    assert m5.format_version == 5 and m4.format_version == 4
    assert (m5.objects, m5.storages, m5.leaves, m5.structure) == (m4.objects, m4.storages, m4.leaves, m4.structure)
    c4, c5 = validate_manifest(m4, rel), validate_manifest(m5, rel)
    assert (c5.esizes, c5.dtype_names, c5.paths) == (c4.esizes, c4.dtype_names, c4.paths)
    assert repr(c5.skeleton) == repr(c4.skeleton)  # repr: the state holds a NaN
    # Written as version 4 again, it is the fixture's own document.
    assert m4.to_json(version=4) == raw


# ============================================================ 2. runs
def _expand(value: Any) -> list[int]:
    if isinstance(value, list):
        return value
    flat = value["runs"]
    out: list[int] = []
    for a, step, c in zip(flat[0::3], flat[1::3], flat[2::3]):
        out += [a + step * k for k in range(c)]
    return out


def _columns() -> list[list[int]]:
    rng = random.Random(5)
    n = 500
    return [
        [0] * n,
        list(range(n)),
        list(range(n, 0, -1)),
        [7],
        list(range(fmt.RUNS_MIN_ITEMS - 1)),
        [0] * fmt.RUNS_MIN_ITEMS,
        [3] * 100 + [0] * 300 + [3] * 100,  # flags: trainable, then optimizer state, ...
        [i // 3 for i in range(n)],  # runs of three equal values: too short to pay
        [1, 0, 0, 0] * 125,  # every fourth leaf of another dtype
        [rng.randrange(-(10**12), 10**12) for _ in range(n)],
        [x for k in range(20) for x in range(k * 1000, k * 1000 + 25)],  # storage indices with gaps
        [5, 5] + list(range(10, 200, 2)) + [1 << 40] * 90,
        [rng.choice([0, 1]) for _ in range(n)],
    ]


@pytest.mark.parametrize("i", range(len(_columns())))
def test_encode_ints_round_trips_and_writes_runs_only_where_they_pay(i: int) -> None:
    col = _columns()[i]
    out = fmt.encode_ints(list(col))
    assert _expand(out) == col
    if isinstance(out, dict):
        assert len(col) >= fmt.RUNS_MIN_ITEMS and len(out["runs"]) <= len(col) // 2
        counts = out["runs"][2::3]
        assert min(counts) >= 1 and sum(counts) == len(col)
    # The reader expands them to the same column.
    f = fmt.jsondoc._Fields("k", b"", runs=True)
    assert f.int_column(out, "c", min(col), max(col), len(col)) == col


def test_encode_ints_finds_the_obvious_runs() -> None:
    n = 1000
    assert fmt.encode_ints([0] * n) == {"runs": [0, 0, n]}
    assert fmt.encode_ints(list(range(n))) == {"runs": [0, 1, n]}
    assert fmt.encode_ints([3] * 250 + [0] * 750) == {"runs": [3, 0, 250, 0, 0, 750]}
    assert isinstance(fmt.encode_ints([1, 0, 0, 0] * 250), list)


def _big_state(n_params: int = 300) -> dict[str, Any]:
    """A model's weights (three shapes repeating, bf16 and fp32) and an Adam-like state."""
    shapes = [(8, 4), (4,), (4, 4)]
    model = {
        f"layers.{i}.w": torch.full(shapes[i % 3], float(i), dtype=torch.bfloat16 if i % 5 == 0 else torch.float32)
        for i in range(n_params)
    }
    optim = {
        "state": {i: {"step": torch.tensor(float(i)), "exp_avg": torch.zeros(shapes[i % 3])} for i in range(n_params)},
        "param_groups": [{"lr": 1e-3, "params": list(range(n_params))}],
    }
    return {"model": model, "optim": optim}


def test_a_saved_large_state_uses_runs_and_a_shape_table_and_restores(tmp_path: Path) -> None:
    state = _big_state()
    with ckptmirror.Mirror([str(tmp_path)]) as m:
        m.save_state(3, state).result(timeout=60)
        got = m.load_state(3, require=True)
    assert got is not None
    assert_identical(got[1], state)
    rel = next(
        f for f in files_under(tmp_path) if f.startswith("step-000000000003/rank-00000-") and f.endswith(".json")
    )
    doc = json.loads((tmp_path / rel).read_bytes())
    leaves = doc["leaves"]
    assert doc["format_version"] == 5
    assert leaves["shapes"] == [[8, 4], [4], [4, 4], []]
    assert leaves["storage"] == {"runs": [0, 1, 900]} and leaves["offset"] == {"runs": [0, 0, 900]}
    m5 = fmt.parse_rank_manifest((tmp_path / rel).read_bytes(), rel)
    m4 = fmt.parse_rank_manifest(m5.to_json(version=4), rel)
    assert (m4.objects, m4.storages, m4.leaves) == (m5.objects, m5.storages, m5.leaves)
    assert validate_manifest(m4, rel).paths == validate_manifest(m5, rel).paths
    assert verify([str(tmp_path)]).exit_code == 0


# ============================================================ 3. hostile version-5 manifests
def _doc() -> dict[str, Any]:
    """A version-5 manifest of 900 leaves whose columns are runs and whose shapes are a table."""
    flat = flatten(_big_state())
    storages, leaves, off = [], [], 0
    for i, t in enumerate(flat.leaves):
        nb = t.numel() * t.element_size()
        storages.append(fmt.StorageRecord(off, nb))
        off += nb
        dtype = str(t.dtype).removeprefix("torch.")
        leaves.append(fmt.LeafRecord("tensor", i, dtype, tuple(t.shape), fmt.contiguous_strides(tuple(t.shape)), 0))
    objects = (fmt.ObjectRecord(fmt.object_key(3, 0, 0, "0badc0de"), off, "xxh3_64:0123456789abcdef"),)
    m = fmt.RankManifest(3, 0, 1, objects, tuple(storages), tuple(leaves), flat.structure, 1.0)
    doc = json.loads(m.to_json())
    assert doc["leaves"]["storage"] == {"runs": [0, 1, 900]} and "shapes" in doc["leaves"]
    return doc


HOSTILE_V5: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "runs-not-triples": (_mut(("leaves", "offset"), {"runs": [0, 0]}), r"leaves\.offset\.runs: expected \(first"),
    "runs-count-zero": (_mut(("leaves", "offset"), {"runs": [0, 0, 900, 0, 0, 0]}), r"leaves\.offset\.runs\[5\]"),
    "runs-count-negative": (
        _mut(("leaves", "offset"), {"runs": [0, 0, 901, 0, 0, -1]}),
        r"leaves\.offset\.runs\[5\]: a run holds at least 1",
    ),
    "runs-too-few-items": (_mut(("leaves", "offset"), {"runs": [0, 0, 899]}), r"leaves\.offset: the runs hold 899"),
    "runs-too-many-items": (_mut(("leaves", "storage"), {"runs": [0, 1, 901]}), r"leaves\.storage: the runs hold 901"),
    "runs-bool": (_mut(("leaves", "offset"), {"runs": [0, 0, True]}), r"leaves\.offset\.runs\[2\]: expected an int"),
    "runs-float": (_mut(("leaves", "offset"), {"runs": [0.0, 0, 900]}), r"leaves\.offset\.runs\[0\]: expected an int"),
    "runs-as-string": (_mut(("leaves", "offset"), {"runs": "0,0,900"}), r"leaves\.offset\.runs: expected a list"),
    "runs-extra-field": (
        _mut(("leaves", "offset"), {"runs": [0, 0, 900], "x": 1}),
        r'leaves\.offset: expected a list, or an object \{"runs"',
    ),
    "runs-step-past-the-storages": (
        _mut(("leaves", "storage"), {"runs": [0, 2, 900]}),
        r"leaves\.storage\.runs\[0\]: run of 900 from 0 by 2 reaches 1798, outside \[0, 899\]",
    ),
    "runs-negative-step-below-zero": (
        _mut(("leaves", "offset"), {"runs": [5, -1, 900]}),
        r"leaves\.offset\.runs\[0\]: .* reaches -894",
    ),
    "runs-flags-beyond-3": (_mut(("leaves", "flags"), {"runs": [0, 1, 900]}), r"leaves\.flags\.runs\[0\]"),
    "runs-type-beyond-table": (_mut(("leaves", "type"), {"runs": [0, 0, 899, 7, 0, 1]}), r"leaves\.type\.runs\[3\]"),
    "runs-object-size": (_mut(("objects", "size"), {"runs": [1, 0, 2]}), r"objects\.size: the runs hold 2 items"),
    "runs-nbytes-do-not-tile": (
        _mut(("storages", "nbytes"), {"runs": [4, 0, 900]}),
        r"storages cover 3600 bytes, the objects",
    ),
    "shape-index-beyond-table": (
        _mut(("leaves", "shape"), {"runs": [0, 0, 899, 4, 0, 1]}),
        r"leaves\.shape\.runs\[3\]: .*outside \[0, 3\]",
    ),
    "shapes-not-a-list": (_mut(("leaves", "shapes"), {"0": [4]}), r"leaves\.shapes: expected a list"),
    "shapes-entry-not-a-list": (_mut(("leaves", "shapes", 0), 32), r"leaves\.shapes\[0\]: expected a list"),
    "shapes-negative-dim": (_mut(("leaves", "shapes", 0), [8, -4]), r"leaves\.shapes\[0\]\[1\]: -4 is outside"),
    "shapes-float-dim": (_mut(("leaves", "shapes", 0), [8, 4.0]), r"leaves\.shapes\[0\]\[1\]: expected an int"),
    "shapes-65-dims": (_mut(("leaves", "shapes", 0), [1] * 65), r"leaves\.shapes\[0\]: too many dimensions"),
    "strides-as-runs": (
        _mut(("leaves", "strides"), [[0, {"runs": [4, -3, 2]}]]),
        r"leaves\.strides\[0\]\[1\]: expected a list",
    ),
    # A valid shape, larger than the leaf's storage: caught by the bounds check, naming the leaf.
    "shapes-outside-storage": (_mut(("leaves", "shapes", 0), [8, 400]), r"leaves\[0\] reaches byte"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_V5))
def test_hostile_v5_manifest_is_refused_naming_the_field(case: str) -> None:
    doc = _doc()
    validate_manifest(fmt.parse_rank_manifest(json.dumps(doc).encode(), KEY), KEY)  # the unmodified one is fine
    mutate, match = HOSTILE_V5[case]
    mutate(doc)
    with pytest.raises(ManifestError, match=match) as ei:
        validate_manifest(fmt.parse_rank_manifest(json.dumps(doc).encode(), KEY), KEY)
    assert KEY in str(ei.value)


@pytest.mark.parametrize("version", [2, 3, 4])
def test_runs_in_an_older_version_are_refused(version: int) -> None:
    doc = _doc()
    doc["format_version"] = version
    with pytest.raises(
        ManifestError, match=r"field objects\.size: expected a list, got dict|leaves\.\w+: expected a list"
    ):
        fmt.parse_rank_manifest(json.dumps(doc).encode(), KEY)


@pytest.mark.parametrize(
    "runs",
    [
        [0, 0, 10**12],  # one run of a trillion
        [0, 0, 1 << 62, 0, 0, 1 << 62],  # counts that overflow an int64 together
        [0, 1, 3_000_000],  # three million: a few hundred MiB
    ],
)
def test_runs_beyond_the_memory_limit_are_refused_before_any_item_is_built(runs: list[int]) -> None:
    doc = _doc()
    doc["leaves"]["type"] = {"runs": runs}  # the first leaf column: it sets the leaf count
    data = json.dumps(doc).encode()
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(
            ManifestError, match=r"field leaves\.type: runs of \d+ items in all.*over the 512 MiB limit"
        ):
            fmt.parse_rank_manifest(data, KEY)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"refusing took {peak >> 20} MiB: the items were built"
    assert elapsed < 30  # generous: building 10^12 items would never finish


def test_runs_are_charged_across_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _doc()
    data = json.dumps(doc).encode()
    m = fmt.parse_rank_manifest(data, KEY)
    # Each leaf column alone would fit; all of them together do not.
    monkeypatch.setattr(fmt.jsondoc, "MAX_PARSE_MEMORY", fmt.parse_cost(data, 2 * 900))
    with pytest.raises(ManifestError, match=r"runs of \d+ items in all") as ei:
        fmt.parse_rank_manifest(data, KEY)
    assert "leaves." in str(ei.value)
    monkeypatch.setattr(fmt.jsondoc, "MAX_PARSE_MEMORY", 512 << 20)
    assert fmt.parse_rank_manifest(data, KEY).leaves == m.leaves


def test_near_the_limit_the_writer_drops_runs_and_past_it_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _big_state()
    with ckptmirror.Mirror([str(tmp_path)]) as m:
        m.save_state(1, state).result(timeout=60)
        rel = next(f for f in files_under(tmp_path) if f.endswith(".json") and "/rank-00000-" in f)
        m1 = fmt.parse_rank_manifest((tmp_path / rel).read_bytes(), rel)
        runs_doc, run_items = m1.encode()
        plain_doc, none = m1.encode(runs=False)
        assert none == 0 and b'"runs"' not in plain_doc and run_items > 0
        with_runs, plain = fmt.parse_cost(runs_doc, run_items), fmt.parse_cost(plain_doc)
        assert plain < with_runs, "runs are charged more than the plain ints they stand for"
        # Room for the plain columns, not for the runs: a reader refuses the runs... (midway: the
        # next step's manifest differs by a few bytes, its time and token)
        monkeypatch.setattr(fmt.jsondoc, "MAX_PARSE_MEMORY", (plain + with_runs) // 2)
        with pytest.raises(ManifestError, match=r"runs of \d+ items in all"):
            fmt.parse_rank_manifest(runs_doc, rel)
        # ... so the writer writes plain columns (still version 5), which restore.
        m.save_state(2, state).result(timeout=60)
        rel2 = next(f for f in files_under(tmp_path) if f.endswith(".json") and "step-000000000002/rank-00000-" in f)
        doc2 = (tmp_path / rel2).read_bytes()
        assert b'"runs"' not in doc2 and json.loads(doc2)["format_version"] == 5
        got = m.load_state(2, require=True)
        assert got is not None
        assert_identical(got[1], state)
        # Room for neither: the save fails rather than write a step no reader accepts.
        monkeypatch.setattr(fmt.jsondoc, "MAX_PARSE_MEMORY", plain // 2)
        with pytest.raises(CkptMirrorError, match=r"too many JSON values for its size"):
            m.save_state(3, state).result(timeout=60)
        monkeypatch.setattr(fmt.jsondoc, "MAX_PARSE_MEMORY", 512 << 20)
        assert m.steps() == [1, 2]


@pytest.mark.parametrize("version", [4, 5])
def test_a_shape_of_more_elements_than_any_stream_is_refused_while_parsing(version: int) -> None:
    """Element counts and extents are computed per leaf later: a table (version 5) would let
    every leaf point at one huge shape for the price of an int."""
    doc = _doc()
    if version == 5:
        doc["leaves"]["shapes"][1] = [1 << 40] * 64
        path = r"leaves\.shapes\[1\]"
    else:
        doc = json.loads(fmt.parse_rank_manifest(json.dumps(doc).encode(), KEY).to_json(version=4))
        doc["leaves"]["shape"][1] = [1 << 26, 1 << 25]  # 2^51 elements, each dimension in bounds
        path = r"leaves\.shape\[1\]"
    with pytest.raises(ManifestError, match=path + r": .* elements, more than any leaf can hold"):
        fmt.parse_rank_manifest(json.dumps(doc).encode(), KEY)
    # A shape with a 0 dimension holds no element, whatever the others.
    doc = _doc()
    doc["leaves"]["shapes"].append([0, 1 << 50])
    fmt.parse_rank_manifest(json.dumps(doc).encode(), KEY)


def test_the_cost_of_a_version_5_manifest_bounds_what_reading_it_takes() -> None:
    # The densest: every column but the shape indices as runs, one shape for all leaves.
    state = {"t": {i: torch.zeros(()) for i in range(20_000)}}
    flat = flatten(state)
    n = len(flat.leaves)
    storages = tuple(fmt.StorageRecord(4 * i, 4) for i in range(n))
    leaves = tuple(fmt.LeafRecord("tensor", i, "float32", (), (), 0) for i in range(n))
    objects = (fmt.ObjectRecord(fmt.object_key(3, 0, 0, "0badc0de"), 4 * n, "xxh3_64:0123456789abcdef"),)
    data, run_items = fmt.RankManifest(3, 0, 1, objects, storages, leaves, flat.structure, 1.0).encode()
    assert run_items >= 5 * n
    check, peak = traced_peak(lambda: validate_manifest(fmt.parse_rank_manifest(data, KEY), KEY))
    assert len(check.paths) == n
    cost = fmt.parse_cost(data, run_items)
    assert fmt.parse_cost(data) < peak <= cost, (fmt.parse_cost(data), peak, cost)
