"""Format version 4: the state tree's ``tensors`` nodes, and the column checks of large manifests.

A state dict (str keys -> tensors) and an optimizer state (keys -> same-keyed dicts of tensors)
are written as one ``tensors`` node each; readers of versions 1-3 never see one, and every
malformed node, key or column is refused naming where it is.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch
from _helpers import traced_peak

from ckptmirror import format as fmt
from ckptmirror.errors import ManifestError
from ckptmirror.restore.check import LeafSpec, validate_manifest
from ckptmirror.state.tree import flatten, unflatten

KEY = fmt.rank_manifest_key(7, 0, "0badc0de")


def _state(n: int = 20) -> dict[str, Any]:
    model = {f"layers.{i}.weight": torch.zeros(i % 3 + 1, 2) for i in range(n)}
    optim = {
        "state": {
            i: {"step": torch.zeros(()), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)} for i in range(n)
        },
        "param_groups": [{"lr": 1e-3, "params": list(range(n))}],
    }
    return {"model": model, "optim": optim, "extra": {"epoch": 3}}


def _manifest(structure: Any, leaves: list[Any], version: int = fmt.FORMAT_VERSION) -> fmt.RankManifest:
    storages, records, offset = [], [], 0
    for i, t in enumerate(leaves):
        nbytes = t.numel() * t.element_size()
        storages.append(fmt.StorageRecord(offset, nbytes))
        offset += nbytes
        shape = tuple(t.shape)
        records.append(fmt.LeafRecord("tensor", i, "float32", shape, fmt.contiguous_strides(shape), 0))
    objects = (fmt.ObjectRecord(fmt.object_key(7, 0, 0, "0badc0de"), offset, "xxh3_64:0123456789abcdef"),)
    return fmt.RankManifest(7, 0, 1, objects, tuple(storages), tuple(records), structure, 1.0, version)


def _roundtrip(m: fmt.RankManifest, version: int | None = None) -> fmt.RankManifest:
    # Before version 5 every column is a plain list: written as version 4, then renumbered.
    data = m.to_json(version=4 if version is not None and version < fmt.RUNS_VERSION else fmt.FORMAT_VERSION)
    if version is not None:
        doc = json.loads(data)
        doc["format_version"] = version
        data = json.dumps(doc).encode()
    return fmt.parse_rank_manifest(data, KEY)


def test_flatten_writes_tensors_nodes_with_the_general_paths_and_leaves() -> None:
    state = _state()
    fast, general = flatten(state), flatten(state, _fast=False)
    model, opt_state = fast.structure["items"][0][1], fast.structure["items"][1][1]["items"][0][1]
    assert model == {"t": "tensors", "keys": list(state["model"]), "i": 0}
    assert opt_state == {"t": "tensors", "keys": list(range(20)), "fields": ["step", "exp_avg", "exp_avg_sq"], "i": 20}
    assert fast.paths == general.paths
    assert all(a is b for a, b in zip(fast.leaves, general.leaves)) and len(fast.leaves) == len(general.leaves) == 80
    assert general.structure["items"][0][1]["t"] == "dict"  # the general path never writes one


def test_dicts_that_do_not_qualify_are_encoded_entry_by_entry() -> None:
    t = torch.zeros(1)
    mixed = {f"k{i}": t.clone() for i in range(10)} | {"lr": 0.1}  # a non-tensor value
    ragged = {i: {"a": t.clone()} if i else {"b": t.clone()} for i in range(10)}  # other keys
    floats = {float(i): t.clone() for i in range(10)}  # float keys
    huge = {(1 << 70) + i: t.clone() for i in range(10)}  # beyond int64
    for d in (mixed, ragged, floats, huge):
        assert flatten({"d": d}).structure["items"][0][1]["t"] == "dict"
        assert flatten({"d": d}).paths == flatten({"d": d}, _fast=False).paths


def test_version_4_round_trips_and_validates_as_the_general_tree() -> None:
    state = _state()
    fast, general = flatten(state), flatten(state, _fast=False)
    m4 = _roundtrip(_manifest(fast.structure, fast.leaves), version=4)
    m3 = _roundtrip(_manifest(general.structure, general.leaves), version=3)
    assert (m4.format_version, m3.format_version) == (4, 3)
    assert (m4.objects, m4.storages, m4.leaves) == (m3.objects, m3.storages, m3.leaves)
    c4, c3 = validate_manifest(m4, KEY), validate_manifest(m3, KEY)
    assert c4.paths == c3.paths and list(c4.paths) == list(c3.paths) == list(range(80))
    assert c4.skeleton == c3.skeleton
    assert c4.skeleton["model"]["layers.4.weight"] == LeafSpec("tensor", "float32", (2, 2))
    assert c4.skeleton["optim"]["state"][3] == {
        "step": LeafSpec("tensor", "float32", ()),
        "exp_avg": LeafSpec("tensor", "float32", (2,)),
        "exp_avg_sq": LeafSpec("tensor", "float32", (2,)),
    }
    assert (c4.esizes, c4.dtypes) == (c3.esizes, c3.dtypes) == ([4] * 80, [torch.float32] * 80)
    # Without a bulk callback (restore, inspect), one leaf() call per tensor, in order.
    calls: list[tuple[str, int, tuple[Any, ...]]] = []
    tree = unflatten(m4.structure, lambda k, i, p: calls.append((k, i, p)) or i, KEY)
    assert calls == [("tensor", i, p) for i, p in enumerate(fast.paths)]
    assert tree["optim"]["state"][19] == {"step": 77, "exp_avg": 78, "exp_avg_sq": 79}
    assert tree["optim"]["param_groups"] == [{"lr": 1e-3, "params": list(range(20))}]


def test_tensors_nodes_in_a_version_3_manifest_are_refused_as_before() -> None:
    fast = flatten(_state())
    m = _roundtrip(_manifest(fast.structure, fast.leaves), version=3)
    with pytest.raises(ManifestError, match=r"unknown node type 'tensors' at state\['model'\]") as exc:
        validate_manifest(m, KEY)
    assert KEY in str(exc.value)


def _with_model_node(node: dict[str, Any], n: int = 4) -> fmt.RankManifest:
    leaves = [torch.zeros(2) for _ in range(n)]
    structure = {"t": "dict", "items": [["model", node]]}
    return _roundtrip(_manifest(structure, leaves))


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"t": "tensors", "keys": ["a", "b", "a", "c"], "i": 0}, r"duplicate dict key 'a' at state\['model'\]"),
        ({"t": "tensors", "keys": [7, 7], "fields": ["u", "v"], "i": 0}, r"duplicate dict key 7 at state\['model'\]"),
        ({"t": "tensors", "keys": ["a", 1.5, "b", "c"], "i": 0}, r"tensors key 1.5 is not a str or an int"),
        ({"t": "tensors", "keys": ["a", ["x"], "b", "c"], "i": 0}, r"is not a str or an int at state\['model'\]"),
        ({"t": "tensors", "keys": ["a", True, "b", "c"], "i": 0}, r"tensors key True is not a str or an int"),
        ({"t": "tensors", "keys": [1 << 63, 1, 2, 3], "i": 0}, r"int key beyond int64 at state\['model'\]"),
        ({"t": "tensors", "keys": "abcd", "i": 0}, r"tensors keys must be a list at state\['model'\]"),
        ({"t": "tensors", "keys": ["a", "b", "c", "d"], "i": -1}, r"non-negative int at state\['model'\]"),
        ({"t": "tensors", "keys": ["a", "b", "c", "d"], "i": "0"}, r"non-negative int at state\['model'\]"),
        ({"t": "tensors", "keys": ["a", "b", "c", "d"]}, r"malformed 'tensors' node .*KeyError"),
        ({"t": "tensors", "keys": ["a", "b", "c", "d"], "i": 0, "x": 1}, r"unknown fields \['x'\]"),
        ({"t": "tensors", "keys": ["a", "b"], "fields": ["u", "u"], "i": 0}, r"duplicate tensors field"),
        ({"t": "tensors", "keys": ["a", "b"], "fields": [], "i": 0}, r"non-empty list of str"),
        ({"t": "tensors", "keys": ["a", "b"], "fields": ["u", 1], "i": 0}, r"non-empty list of str"),
        # Leaf references out of range, or never made: the first bad one is named.
        (
            {"t": "tensors", "keys": ["a", "b", "c", "d"], "i": 1},
            r"bad or repeated tensor reference 4 at state\['model'\]\['d'\]",
        ),
        (
            {"t": "tensors", "keys": ["a", "b", "c"], "fields": ["u", "v"], "i": 0},
            r"reference 4 at state\['model'\]\['c'\]\['u'\]",
        ),
        ({"t": "tensors", "keys": ["a", "b", "c"], "i": 0}, r"1 leaves are never referenced"),
    ],
)
def test_hostile_tensors_nodes_are_refused_naming_the_node(node: dict[str, Any], match: str) -> None:
    m = _with_model_node(node)
    with pytest.raises(ManifestError, match=match) as exc:
        validate_manifest(m, KEY)
    assert KEY in str(exc.value)


def test_a_leaf_referenced_by_a_tensors_node_and_elsewhere_is_refused() -> None:
    leaves = [torch.zeros(2) for _ in range(4)]
    structure = {
        "t": "dict",
        "items": [["x", {"t": "tensor", "i": 2}], ["model", {"t": "tensors", "keys": ["a", "b", "c", "d"], "i": 0}]],
    }
    with pytest.raises(ManifestError, match=r"repeated tensor reference 2 at state\['model'\]\['c'\]"):
        validate_manifest(_roundtrip(_manifest(structure, leaves)), KEY)


def test_a_tensors_node_never_refers_to_an_array_leaf() -> None:
    leaves = [torch.zeros(2) for _ in range(2)]
    m = _manifest({"t": "tensors", "keys": ["a", "b"], "i": 0}, leaves)
    m = fmt.RankManifest(**{**m.__dict__, "leaves": (m.leaves[0], m.leaves[1]._replace(kind="ndarray", dtype="<f4"))})
    with pytest.raises(ManifestError, match=r"bad or repeated tensor reference 1 at state\['b'\]"):
        validate_manifest(m, KEY)


def test_a_tensors_node_too_deep_is_refused() -> None:
    from ckptmirror.state.tree import MAX_DEPTH

    node: Any = {"t": "tensors", "keys": ["a"], "fields": ["u"], "i": 0}
    for _ in range(MAX_DEPTH - 1):
        node = {"t": "list", "v": [node]}
    with pytest.raises(ManifestError, match="nested deeper than"):
        validate_manifest(_roundtrip(_manifest(node, [torch.zeros(1)])), KEY)


def _columns_doc(**leaves: Any) -> bytes:
    m = _manifest({"t": "list", "v": [{"t": "tensor", "i": 0}, {"t": "tensor", "i": 1}]}, [torch.zeros(2, 2)] * 2)
    doc = json.loads(m.to_json())
    doc["leaves"].update(leaves)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ([[2, 2], [2, -1]], r"leaves\.shape\[1\]\[1\]: -1 is outside"),
        ([[2, 2], [2, 2.0]], r"leaves\.shape\[1\]\[1\]: expected an int, got float"),
        ([[2, 2], [2, [2]]], r"leaves\.shape\[1\]\[1\]: expected an int, got list"),
        ([[2, 2], [2, True]], r"leaves\.shape\[1\]\[1\]: expected an int, got bool"),
        ([[2, 2], [1] * 65], r"leaves\.shape\[1\]: too many dimensions"),
        ([[2, 2], [1 << 60]], r"leaves\.shape\[1\]\[0\]: \d+ is outside"),
        ([[2, 2], "ab"], r"leaves\.shape\[1\]: expected a list, got str"),
        ([[2, 2]], r"leaves\.shape: expected 2 items, got 1"),
    ],
)
def test_hostile_shape_columns_name_the_leaf(shape: Any, match: str) -> None:
    with pytest.raises(ManifestError, match=match) as exc:
        fmt.parse_rank_manifest(_columns_doc(shape=shape), KEY)
    assert KEY in str(exc.value)


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("storage", [0, 2], r"leaves\.storage\[1\]: 2 is outside \[0, 1\]"),
        ("storage", [0, True], r"leaves\.storage\[1\]: expected an int, got bool"),
        ("offset", [0, -1], r"leaves\.offset\[1\]: -1 is outside"),
        ("flags", [0, 4], r"leaves\.flags\[1\]: 4 is outside \[0, 3\]"),
        ("type", [0, 1], r"leaves\.type\[1\]: 1 is outside \[0, 0\]"),
    ],
)
def test_hostile_int_columns_name_the_item(column: str, value: Any, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        fmt.parse_rank_manifest(_columns_doc(**{column: value}), KEY)


def test_leaf_bounds_are_still_checked_with_one_dtype() -> None:
    m = _manifest({"t": "tensors", "keys": ["a", "b"], "i": 0}, [torch.zeros(2), torch.zeros(2)])
    big = m.leaves[1]._replace(shape=(3,), stride=(1,))
    bad = fmt.RankManifest(**{**m.__dict__, "leaves": (m.leaves[0], big)})
    with pytest.raises(ManifestError, match=r"leaves\[1\] reaches byte 12 of a 8-byte storage"):
        validate_manifest(bad, KEY)
    unknown = fmt.RankManifest(**{**m.__dict__, "leaves": tuple(lf._replace(dtype="float99") for lf in m.leaves)})
    with pytest.raises(ManifestError, match="unknown dtype 'float99'"):
        validate_manifest(unknown, KEY)


# ------------------------------------------------ what parsing hands to validation (ParsedColumns)


def _mixed_doc() -> dict[str, Any]:
    """A manifest of every kind of leaf: several dtypes, an array, views at offsets, shared
    storages, non-contiguous and expanded strides, empty tensors; structure: a tensor node each."""
    specs = [
        ("tensor", 0, "float32", (4, 3), (3, 1), 0),
        ("tensor", 0, "float32", (3, 4), (1, 3), 0),  # a transpose of the same storage
        ("tensor", 0, "float32", (2,), (1,), 10),  # a view at an offset
        ("tensor", 1, "bfloat16", (5,), (1,), 0),
        ("tensor", 2, "int64", (0, 7), (7, 1), 0),  # empty
        ("tensor", 3, "float32", (8, 1000), (0, 1), 0),  # expanded
        ("ndarray", 4, "<f8", (2, 2), (2, 1), 0),
        ("tensor", 5, "float32", (), (), 0),
    ]
    nbytes = [48, 10, 0, 4000, 32, 4]
    storages, off = [], 0
    for nb in nbytes:
        storages.append(fmt.StorageRecord(off, nb))
        off += nb
    leaves = tuple(fmt.LeafRecord(*s, i % 2 == 0, i % 3 == 0) for i, s in enumerate(specs))
    structure = {"t": "list", "v": [{"t": lf.kind, "i": i} for i, lf in enumerate(leaves)]}
    objects = (fmt.ObjectRecord(fmt.object_key(7, 0, 0, "0badc0de"), off, "xxh3_64:0123456789abcdef"),)
    m = fmt.RankManifest(7, 0, 1, objects, tuple(storages), leaves, structure, 1.0)
    return json.loads(m.to_json())


def _both_ways(data: bytes) -> tuple[Any, Any]:
    """validate_manifest on a parsed manifest (with its ParsedColumns) and on a copy of it (without):
    each a ManifestCheck or the ManifestError's message."""
    import dataclasses

    parsed = fmt.parse_rank_manifest(data, KEY)
    copy = dataclasses.replace(parsed)
    assert fmt.parsed_columns(parsed) is not None and fmt.parsed_columns(copy) is None
    out = []
    for m in (parsed, copy):
        try:
            out.append(validate_manifest(m, KEY))
        except ManifestError as exc:
            out.append(str(exc))
    return out[0], out[1]


def test_parsed_columns_give_what_the_records_give() -> None:
    fast, general = _both_ways(json.dumps(_mixed_doc()).encode())
    assert not isinstance(fast, str), fast
    assert (fast.esizes, fast.dtypes, fast.paths, fast.skeleton, fast.dtensors) == (
        general.esizes,
        general.dtypes,
        general.paths,
        general.skeleton,
        general.dtensors,
    )
    assert fast.esizes == [4, 4, 4, 2, 8, 4, 8, 4]


def test_parsed_columns_are_only_used_for_the_parsed_records() -> None:
    data = json.dumps(_mixed_doc()).encode()
    m = fmt.parse_rank_manifest(data, KEY)
    assert fmt.parsed_columns(m) is not None
    big = m.leaves[3]._replace(shape=(50,), stride=(1,))  # beyond its 10-byte storage
    altered = fmt.RankManifest(**{**m.__dict__, "leaves": (*m.leaves[:3], big, *m.leaves[4:])})
    assert fmt.parsed_columns(altered) is None
    with pytest.raises(ManifestError, match=r"leaves\[3\] reaches byte 100 of a 10-byte storage"):
        validate_manifest(altered, KEY)
    # Records swapped in place (object.__setattr__ on the frozen dataclass) are not vouched for either.
    object.__setattr__(m, "leaves", altered.leaves)
    assert fmt.parsed_columns(m) is None
    with pytest.raises(ManifestError, match=r"leaves\[3\] reaches byte 100"):
        validate_manifest(m, KEY)


def test_parsed_columns_are_dropped_with_their_manifest() -> None:
    import gc

    gc.collect()  # manifests that earlier tests left in garbage cycles (tracebacks) must not count
    before = len(fmt.parse._PARSED)
    m = fmt.parse_rank_manifest(json.dumps(_mixed_doc()).encode(), KEY)
    assert len(fmt.parse._PARSED) == before + 1
    del m
    gc.collect()
    assert len(fmt.parse._PARSED) == before


def _leaf_edit(i: int, **cols: Any) -> Any:
    def edit(doc: dict[str, Any]) -> None:
        lv = doc["leaves"]
        for name, value in cols.items():
            if name == "strides":
                lv["strides"] = sorted([e for e in lv["strides"] if e[0] != i] + [[i, value]])
            elif name == "types":
                lv["types"].append(value)
                lv["type"][i] = len(lv["types"]) - 1
            else:
                lv[name][i] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_leaf_edit(0, shape=[5, 3]), r"leaves\[0\] reaches byte 60 of a 48-byte storage"),
        (_leaf_edit(2, offset=11), r"leaves\[2\] reaches byte 52 of a 48-byte storage"),
        (_leaf_edit(3, shape=[6]), r"leaves\[3\] reaches byte 12 of a 10-byte storage"),
        (_leaf_edit(1, strides=[1, 4]), r"leaves\[1\] reaches byte 60 of a 48-byte storage"),
        (_leaf_edit(5, shape=[16778, 1000]), r"leaves\[5\]: 16778000 elements over a 4000-byte storage"),
        (_leaf_edit(6, strides=[1, 2]), r"leaves\[6\]: ndarray strides must be C-contiguous"),
        (_leaf_edit(6, types=["ndarray", "O"]), r"leaves\[6\]: numpy dtype 'O' holds objects"),
        (_leaf_edit(3, types=["tensor", "float99"]), r"unknown dtype 'float99'"),
        (_leaf_edit(4, offset=10**9), None),  # an empty leaf has no extent: accepted
        (_leaf_edit(0, strides=[3, 1]), None),  # listed strides that are the contiguous ones
        (_leaf_edit(7, shape=[1], strides=[5]), None),
    ],
)
def test_bounds_from_parsed_columns_name_the_leaf_as_the_records_do(edit: Any, match: str | None) -> None:
    doc = _mixed_doc()
    edit(doc)
    fast, general = _both_ways(json.dumps(doc).encode())
    if match is None:
        assert not isinstance(fast, str) and not isinstance(general, str), (fast, general)
        assert (fast.esizes, fast.dtypes, fast.paths, fast.skeleton) == (
            general.esizes,
            general.dtypes,
            general.paths,
            general.skeleton,
        )
    else:
        assert isinstance(fast, str) and fast == general, (fast, general)
        assert re.search(match, fast) and KEY in fast, fast


def test_one_dtype_with_views_at_offsets_and_irregular_strides() -> None:
    # One (kind, dtype) for every leaf: the per-shape table path, with offsets and a transpose.
    storages = (fmt.StorageRecord(0, 64), fmt.StorageRecord(64, 16))
    leaves = (
        fmt.LeafRecord("tensor", 0, "float32", (4, 4), (4, 1), 0),
        fmt.LeafRecord("tensor", 0, "float32", (4, 4), (1, 4), 0),
        fmt.LeafRecord("tensor", 0, "float32", (4,), (1,), 12),
        fmt.LeafRecord("tensor", 1, "float32", (4,), (1,), 0),
    )
    structure = {"t": "tensors", "keys": ["a", "b", "c", "d"], "i": 0}
    objects = (fmt.ObjectRecord(fmt.object_key(7, 0, 0, "0badc0de"), 80, "xxh3_64:0123456789abcdef"),)
    doc = json.loads(fmt.RankManifest(7, 0, 1, objects, storages, leaves, structure, 1.0).to_json())
    fast, general = _both_ways(json.dumps(doc).encode())
    assert not isinstance(fast, str) and fast.skeleton == general.skeleton and fast.esizes == [4] * 4
    assert fast.skeleton["c"] is fast.skeleton["d"], "leaves of one shape share one LeafSpec"
    doc["leaves"]["offset"][2] = 13  # now reaches byte 68 of 64
    fast, general = _both_ways(json.dumps(doc).encode())
    assert fast == general and "leaves[2] reaches byte 68 of a 64-byte storage" in fast


def _adam_state(n: int) -> dict[str, Any]:
    leaves = [torch.zeros(64, 32) for _ in range(n)]
    return {
        "model": {f"layers.{i}.weight": leaves[i] for i in range(n)},
        "optim": {
            "state": {i: {"step": torch.zeros(()), "exp_avg": leaves[i], "exp_avg_sq": leaves[i]} for i in range(n)},
            "param_groups": [{"lr": 1e-3, "params": list(range(n))}],
        },
    }


# The densest compact documents: scalar leaves (the fewest bytes a leaf), many fields a key.
_COMPACT_STATES = {
    "adam-10k-leaves": lambda: _adam_state(2500),
    "scalars": lambda: {i: torch.zeros(()) for i in range(20_000)},
    "scalars-8-fields": lambda: {i: {f"f{c}": torch.zeros(()) for c in range(8)} for i in range(3000)},
}


@pytest.mark.parametrize("case", sorted(_COMPACT_STATES))
def test_parse_cost_bounds_parse_and_validation_of_a_compact_manifest(case: str) -> None:
    """Version 4's tensors nodes and version 5's runs: fewer bytes a leaf, the same bound on what
    reading them builds (runs charged per item they hold)."""
    flat = flatten(_COMPACT_STATES[case]())
    data, run_items = _manifest(flat.structure, list(flat.leaves)).encode()
    assert b'"t":"tensors"' in data and run_items >= len(flat.leaves)  # version 5: columns as runs
    check, peak = traced_peak(lambda: validate_manifest(fmt.parse_rank_manifest(data, KEY), KEY))
    assert len(check.paths) == len(flat.leaves)
    cost = fmt.parse_cost(data, run_items)
    assert peak <= cost, f"parsing took {peak} bytes, the estimate says {cost}"


# ------------------------------------------------ column checks: fast paths name the item as before


def _storages_doc(nbytes: list[Any]) -> bytes:
    m = _manifest({"t": "list", "v": [{"t": "tensor", "i": 0}, {"t": "tensor", "i": 1}]}, [torch.zeros(2, 2)] * 2)
    doc = json.loads(m.to_json())  # two 16-byte storages, one 32-byte object
    doc["storages"]["nbytes"] = nbytes
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        # A column of one value (offsets, the type of a one-dtype manifest)...
        ("offset", [-1, -1], r"leaves\.offset\[0\]: -1 is outside"),
        ("type", [1, 1], r"leaves\.type\[0\]: 1 is outside \[0, 0\]"),
        ("flags", [4, 4], r"leaves\.flags\[0\]: 4 is outside \[0, 3\]"),
        ("flags", [True, True], r"leaves\.flags\[0\]: expected an int, got bool"),
        ("offset", [0.0, 0.0], r"leaves\.offset\[0\]: expected an int, got float"),
        ("type", [0, False], r"leaves\.type\[1\]: expected an int, got bool"),
        # ... of a few possible values (flags, types)...
        ("flags", [3, -1], r"leaves\.flags\[1\]: -1 is outside \[0, 3\]"),
        ("flags", [1, 2.0], r"leaves\.flags\[1\]: expected an int, got float"),
        ("flags", [0, None], r"leaves\.flags\[1\]: expected an int, got NoneType"),
        # ... or of any (storage indices, offsets).
        ("storage", [-1, 1], r"leaves\.storage\[0\]: -1 is outside \[0, 1\]"),
        ("offset", [0, 1 << 60], r"leaves\.offset\[1\]: \d+ is outside"),
        ("storage", [0, "1"], r"leaves\.storage\[1\]: expected an int, got str"),
    ],
)
def test_int_columns_of_one_or_few_values_name_the_item(column: str, value: Any, match: str) -> None:
    with pytest.raises(ManifestError, match=match) as exc:
        fmt.parse_rank_manifest(_columns_doc(**{column: value}), KEY)
    assert KEY in str(exc.value)


@pytest.mark.parametrize(
    ("nbytes", "match"),
    [
        ([16, -16, 32], r"storages\.nbytes\[1\]: -16 is outside \[0, 32\]"),  # adds up, one negative
        ([48, 0], r"storages\.nbytes\[0\]: 48 is outside \[0, 32\]"),  # more than the objects hold
        ([16, 8], r"storages cover 24 bytes, the objects 32: they must tile the stream"),
        ([16, True], r"storages\.nbytes\[1\]: expected an int, got bool"),
        ([16, 16.0], r"storages\.nbytes\[1\]: expected an int, got float"),
        ([], r"storages cover 0 bytes, the objects 32"),
        ("16", r"storages\.nbytes: expected a list, got str"),
    ],
)
def test_storage_sizes_are_checked_as_before(nbytes: Any, match: str) -> None:
    assert fmt.parse_rank_manifest(_storages_doc([16, 16]), KEY).storages[1] == (16, 16)
    with pytest.raises(ManifestError, match=match) as exc:
        fmt.parse_rank_manifest(_storages_doc(nbytes), KEY)
    assert KEY in str(exc.value)


@pytest.mark.parametrize("flags", [[0, 0, 0], [3, 3, 3], [1, 1, 1], [2, 0, 3], [1, 3, 1]])
def test_leaf_flags_of_one_or_several_values_give_each_leaf_its_own(flags: list[int]) -> None:
    m = _manifest({"t": "tensors", "keys": ["a", "b", "c"], "i": 0}, [torch.zeros(2)] * 3)
    doc = json.loads(m.to_json())
    doc["leaves"]["flags"] = flags
    parsed = fmt.parse_rank_manifest(json.dumps(doc).encode(), KEY)
    assert [(lf.requires_grad, lf.parameter) for lf in parsed.leaves] == [(bool(f & 1), bool(f & 2)) for f in flags]
    assert all(type(lf.requires_grad) is bool and type(lf.parameter) is bool for lf in parsed.leaves)


def test_short_documents_skip_counting_but_never_exceed_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # The densest documents parse_cost can see: every byte an object, or a value, non-ASCII text.
    for data in (b"{" * 1000, b"[" * 999 + b"]", b"," * 1000, "é".encode() * 500, b"[" + b"{}," * 333 + b"]"):
        assert fmt.parse_cost(data) <= len(data) * fmt.jsondoc._MAX_COST_PER_BYTE + fmt.jsondoc._COST_PER_VALUE
    data = _columns_doc()
    cost = fmt.parse_cost(data)
    monkeypatch.setattr(fmt.jsondoc, "MAX_PARSE_MEMORY", cost)  # below the bound for its length: counted, and fits
    assert len(data) * fmt.jsondoc._MAX_COST_PER_BYTE > cost
    fmt.parse_rank_manifest(data, KEY)
    monkeypatch.setattr(fmt.jsondoc, "MAX_PARSE_MEMORY", cost - 1)
    with pytest.raises(ManifestError, match="too many JSON values"):
        fmt.parse_rank_manifest(data, KEY)


@pytest.mark.parametrize(
    ("nodes", "bad"),
    [
        # Leaves referenced out of order: a tensors node after references to later leaves.
        ([("tensors", 8, 8), ("tensors", 0, 8)], None),
        ([("tensor", 12, 1), ("tensors", 0, 8), ("tensors", 8, 4), ("tensor", 13, 1), ("tensors", 14, 2)], None),
        ([("tensors", 8, 8), ("tensors", 4, 8)], r"repeated tensor reference 8 at state\[1\]\['k4'\]"),
        ([("tensor", 5, 1), ("tensors", 0, 8)], r"repeated tensor reference 5 at state\[1\]\['k5'\]"),
        ([("tensors", 0, 8), ("tensor", 3, 1)], r"repeated tensor reference 3 at state\[1\]"),
        ([("tensors", 0, 8), ("tensors", 7, 9)], r"repeated tensor reference 7 at state\[1\]\['k0'\]"),
    ],
)
def test_tensors_nodes_in_any_order_refuse_a_leaf_referenced_twice(nodes: list[Any], bad: str | None) -> None:
    def node(kind: str, first: int, count: int) -> dict[str, Any]:
        if kind == "tensor":
            return {"t": "tensor", "i": first}
        return {"t": "tensors", "keys": [f"k{j}" for j in range(count)], "i": first}

    structure = {"t": "list", "v": [node(*n) for n in nodes]}
    m = _roundtrip(_manifest(structure, [torch.zeros(2) for _ in range(16)]))
    if bad is None:
        check = validate_manifest(m, KEY)
        assert sorted(check.paths) == list(range(16))
    else:
        with pytest.raises(ManifestError, match=bad):
            validate_manifest(m, KEY)


# ------------------------------------------------ the collector around large manifests


def _large_manifest(n: int = 12_000) -> bytes:
    flat = flatten(_adam_state(n // 4))
    return _manifest(flat.structure, list(flat.leaves)).to_json()


def test_a_large_manifest_leaves_no_young_objects_behind() -> None:
    """What parsing and checking a large manifest built joins the oldest generation unscanned:
    the collector's next young collection does not walk its records (see format.paused_gc)."""
    import gc

    if not fmt.gcpause._gc_can_promote:
        pytest.skip("no constant-time promotion on this interpreter")
    data = _large_manifest()
    assert len(data) >= fmt.parse._PROMOTE_BYTES
    assert gc.isenabled() and gc.get_freeze_count() == 0
    m = fmt.parse_rank_manifest(data, KEY)
    assert gc.get_count()[0] < 1000, gc.get_count()
    check = validate_manifest(m, KEY)  # a dict and a parent path per optimizer entry (3,000)
    assert gc.get_count()[0] < 1000, gc.get_count()
    assert len(m.leaves.records) == 12_000  # built on first use, in a pause of their own
    assert gc.get_count()[0] < 1000, gc.get_count()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert len(check.paths) == len(m.leaves) == 12_000
    # The caller's own collector setting stays, and then nothing is moved.
    del m, check
    gc.disable()
    try:
        before = gc.get_count()[0]
        kept = validate_manifest(fmt.parse_rank_manifest(data, KEY), KEY)
        assert gc.get_count()[0] > before + 3_000 and not gc.isenabled()  # a dict per optimizer entry
        del kept
    finally:
        gc.enable()
    gc.collect()


def test_objects_the_process_froze_stay_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    if not fmt.gcpause._gc_can_promote:
        pytest.skip("no constant-time promotion on this interpreter")
    monkeypatch.setattr(fmt.gcpause, "_gc_can_promote", True)  # restored after: the test turns it off
    data = _large_manifest()
    sentinel = [object()]  # a container the process freezes: where it is afterwards tells
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        validate_manifest(fmt.parse_rank_manifest(data, KEY), KEY)
        # gc.unfreeze() would have moved every frozen object into the oldest generation. (The
        # count alone is no proof: frozen objects that other threads free meanwhile leave it.)
        assert not any(o is sentinel for o in gc.get_objects(generation=2)), "the process's frozen objects released"
        assert gc.get_freeze_count() > frozen // 2 and gc.isenabled()
        assert not fmt.gcpause._gc_can_promote  # noticed once, then never tried again
    finally:
        gc.unfreeze()


def test_a_tensors_node_claiming_millions_of_leaves_is_refused_without_building_their_paths() -> None:
    """2,000 keys x 2,000 fields: four million leaf references in ~20 KB of JSON, against a
    manifest of four leaves. The first reference past the end is named after building a few key
    paths, not four million (~400 MB)."""
    node = {"t": "tensors", "keys": [f"k{i}" for i in range(2000)], "fields": [f"f{j}" for j in range(2000)], "i": 0}
    m = _with_model_node(node)

    def refuse() -> str:
        with pytest.raises(ManifestError, match=r"reference 4 at state\['model'\]\['k0'\]\['f4'\]") as exc:
            validate_manifest(m, KEY)
        return str(exc.value)

    _, peak = traced_peak(refuse)
    assert peak < 8 << 20, peak
