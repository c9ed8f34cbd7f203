"""Format version 4: the state tree's ``tensors`` nodes, and the column checks of large manifests.

A state dict (str keys -> tensors) and an optimizer state (keys -> same-keyed dicts of tensors)
are written as one ``tensors`` node each; readers of versions 1-3 never see one, and every
malformed node, key or column is refused naming where it is.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

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
    data = m.to_json()
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
    m4 = _roundtrip(_manifest(fast.structure, fast.leaves))
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
