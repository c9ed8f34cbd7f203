"""A parsed manifest keeps its leaves and storages as columns, and a check its key paths.

Parsing a 50,000-leaf manifest built a record per leaf and per storage, and validating it a key
path per leaf; the common restore reads neither: it reads whole columns. These tests hold that
the columns say what the records said, that the records are built only when something asks for
one (and are then the same records), and that a whole restore from a real replica never asks.
"""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptmirror
from ckptmirror import format as fmt
from ckptmirror.restore.check import KeyPaths, validate_manifest
from ckptmirror.state.tree import flatten

KEY = fmt.rank_manifest_key(7, 0, "0badc0de")


def _manifest(leaves: list[fmt.LeafRecord], structure: Any) -> fmt.RankManifest:
    storages, offset = [], 0
    for lf in leaves:
        nbytes = 4
        for d in lf.shape:
            nbytes *= d
        storages.append(fmt.StorageRecord(offset, nbytes))
        offset += nbytes
    objects = (fmt.ObjectRecord(fmt.object_key(7, 0, 0, "0badc0de"), offset, "xxh3_64:0123456789abcdef"),)
    return fmt.RankManifest(7, 0, 1, objects, tuple(storages), tuple(leaves), structure, 1.0)


def _records(n: int) -> list[fmt.LeafRecord]:
    # Every combination of the two flags, several shapes, each leaf its own storage.
    out = []
    for i in range(n):
        shape = ((i % 5) + 1, 3) if i % 7 else ()
        grad, param = bool(i & 1), bool(i & 2)
        out.append(fmt.LeafRecord("tensor", i, "float32", shape, fmt.contiguous_strides(shape), 0, grad, param))
    return out


@pytest.mark.parametrize("n", [3, 200])  # 200: int columns written as runs, shapes as a table
def test_parsed_leaves_are_columns_equal_to_the_records(n: int) -> None:
    recs = _records(n)
    m = _manifest(recs, {"t": "tensors", "keys": [f"k{i}" for i in range(n)], "i": 0})
    p = fmt.parse_rank_manifest(m.to_json(), KEY)
    assert isinstance(p.leaves, fmt.LeafColumns) and isinstance(p.storages, fmt.StorageColumns)
    cols = fmt.leaf_columns(p)
    assert cols is p.leaves  # nothing built
    assert cols.shapes == [r.shape for r in recs] and cols.storage == list(range(n))
    assert cols.flags == [int(r.requires_grad) | int(r.parameter) << 1 for r in recs]
    assert fmt.storage_columns(p).nbytes == [s.nbytes for s in m.storages]
    assert fmt.storage_columns(p).offsets == [s.offset for s in m.storages]
    assert p.leaves._built is None and p.storages._built is None
    # An index builds that one record; anything else every record, once.
    assert p.leaves[1] == recs[1] and p.leaves[-1] == recs[-1] and p.storages[-1] == m.storages[-1]
    assert p.leaves._built is None and p.storages._built is None
    with pytest.raises(IndexError):
        p.leaves[n]
    # Asked for, the records are the writer's, and the sequence behaves as the tuple did.
    assert p.leaves == m.leaves and m.leaves == p.leaves and p.storages == m.storages
    assert p == m and hash(p.leaves) == hash(m.leaves)
    assert p.leaves[1:3] == tuple(recs[1:3]) and list(p.leaves) == recs and len(p.leaves) == n
    assert p.leaves.records is p.leaves.records  # built once
    assert p.leaves != list(recs)  # as a tuple is not equal to a list


def test_columns_of_a_writers_records_are_the_parsed_columns() -> None:
    recs = _records(100)
    m = _manifest(recs, {"t": "tensors", "keys": [f"k{i}" for i in range(100)], "i": 0})
    p = fmt.parse_rank_manifest(m.to_json(), KEY)
    mine, parsed = fmt.leaf_columns(m), fmt.leaf_columns(p)
    names = ("kinds", "storage", "dtypes", "shapes", "strides", "offsets", "flags")
    for name in names:
        assert getattr(mine, name) == getattr(parsed, name), name
    # Records built from the columns alone (every flag value, then one flag for every leaf).
    again = fmt.LeafColumns(*(list(getattr(mine, name)) for name in names))
    assert again._built is None and again.records == m.leaves
    assert [again[i] for i in range(100)] == recs
    for flags in range(4):
        one = fmt.LeafColumns(*(list(getattr(mine, name)) for name in names[:-1]), [flags] * 100)
        assert {(r.requires_grad, r.parameter) for r in one} == {(bool(flags & 1), bool(flags & 2))}
        assert one[7].requires_grad == bool(flags & 1) and one[7].parameter == bool(flags & 2)


def test_records_are_built_once_by_concurrent_first_users() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    recs = _records(20_000)
    m = _manifest(recs, {"t": "tensors", "keys": [f"k{i}" for i in range(20_000)], "i": 0})
    p = fmt.parse_rank_manifest(m.to_json(), KEY)
    start = threading.Barrier(8)

    def first_use(_: int) -> tuple[fmt.LeafRecord, ...]:
        start.wait()
        return p.leaves.records

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(first_use, range(8)))
    assert all(r is got[0] for r in got) and got[0] == m.leaves


def test_checking_many_shards_reads_one_record_each() -> None:
    """A shard's shape is read from its record: one built per shard, never every leaf's per shard
    (which made validating 8,000 shards of a writer's manifest take 26 s)."""
    n = 300
    leaves = [fmt.LeafRecord("tensor", i, "float32", (2,), (1,), 0) for i in range(n)]
    structure = {
        "t": "dict",
        "items": [[f"w{i}", {"t": "dtensor", "i": i, "gshape": [4], "goffset": [2]}] for i in range(n)],
    }
    for m in (_manifest(leaves, structure), fmt.parse_rank_manifest(_manifest(leaves, structure).to_json(), KEY)):
        built: list[int] = []
        real = fmt.LeafColumns.of.__func__  # type: ignore[attr-defined]

        def counting(cls: Any, records: Any, real: Any = real, built: list[int] = built) -> Any:
            built.append(len(records))
            return real(cls, records)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fmt.LeafColumns, "of", classmethod(counting))
            check = validate_manifest(m, KEY)
        assert len(check.dtensors) == n and check.dtensors[5] == ((4,), (2,))
        assert len(built) <= 2, built  # the columns once (the leaf bounds), not once per shard


def _expected_runs(paths: list[tuple[Any, ...]]) -> list[tuple[Any, int, int]]:
    """Runs of equal parents, from full key paths (what restore computed before)."""
    out, pos = [], 0
    for parent, group in groupby(p[:-1] if p else None for p in paths):
        k = len(list(group))
        out.append((parent, pos, pos + k))
        pos += k
    return out


def _small_and_large_state() -> dict[str, Any]:
    t = torch.zeros(2)
    return {
        "model": {f"layers.{i}.w": t for i in range(40)},  # a tensors node
        "small": {"a": t, "b": t},  # entry by entry
        "optim": {"state": {i: {"step": t, "exp_avg": t} for i in range(20)}},  # a tensors node with fields
        "list": [t, {"x": t}, t],
    }


@pytest.mark.parametrize("compact", [True, False])
def test_key_paths_as_columns_give_every_path_and_the_runs_of_siblings(compact: bool) -> None:
    flat = flatten(_small_and_large_state()) if compact else flatten(_small_and_large_state(), _fast=False)
    recs = [fmt.LeafRecord("tensor", i, "float32", (2,), (1,), 0) for i in range(len(flat.leaves))]
    m = _manifest(recs, flat.structure)
    if not compact:
        m = fmt.RankManifest(**{**m.__dict__, "format_version": 3})
    check = validate_manifest(fmt.parse_rank_manifest(m.to_json(version=4), KEY) if compact else m, KEY)
    keys = check.keys
    assert isinstance(keys, KeyPaths)
    assert keys.paths() == flat.paths and list(check.paths.values()) == flat.paths
    assert keys.order == list(range(len(flat.leaves)))
    assert list(keys.runs()) == _expected_runs(flat.paths)


def test_a_leaf_at_the_root_has_the_empty_path() -> None:
    flat = flatten(torch.zeros(2))
    m = _manifest([fmt.LeafRecord("tensor", 0, "float32", (2,), (1,), 0)], flat.structure)
    check = validate_manifest(m, KEY)
    assert check.keys.paths() == [()] and list(check.keys.runs()) == [(None, 0, 1)]


def test_a_restore_from_a_replica_never_builds_a_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Save a model with bf16 and fp32 tensors (two dtypes: the general checks) and its AdamW
    state, then restore both in place with every record builder refusing to run."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(30)))
    for i, lin in enumerate(model):
        if i % 3 == 0:
            lin.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    with ckptmirror.Mirror([str(tmp_path)]) as mirror:
        mirror.save(1, model, opt).result()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_opt = json.dumps(str(opt.state_dict()["param_groups"]))
    for p in model.parameters():
        p.data.zero_()
    fresh_opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    fresh_opt.step()  # its state exists, so that it is filled in place
    built: list[int] = []

    def refuse(self: Any) -> Any:
        built.append(len(self))
        raise AssertionError("a record was built")

    monkeypatch.setattr(fmt.records._LazyRecords, "records", property(refuse))
    monkeypatch.setattr(fmt.records._LazyRecords, "_row", refuse)
    monkeypatch.setattr(KeyPaths, "paths", refuse)  # nor a key path per leaf
    with ckptmirror.Mirror([str(tmp_path)]) as mirror:
        result = mirror.restore(model, fresh_opt)
    assert result is not None and result.step == 1
    assert built == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert json.dumps(str(fresh_opt.state_dict()["param_groups"])) == want_opt
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_a_finalizer_that_reads_records_while_they_are_built_does_not_hang(tmp_path: Path) -> None:
    """Building a large manifest's records starts a GC pause that may collect first; a finalizer
    run by that collection which reads another manifest's records must not wait for a lock the
    same thread holds (it did: the process hung with its collector off). In a subprocess, so that
    a hang is a failed test, not a hung suite."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "finalizer.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import gc, sys, threading
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from ckptmirror import format as fmt
            from test_columns import KEY, _manifest, _records

            recs = _records(5000)
            data = _manifest(recs, {{"t": "tensors", "keys": [f"k{{i}}" for i in range(5000)], "i": 0}}).to_json()
            p, q = fmt.parse_rank_manifest(data, KEY), fmt.parse_rank_manifest(data, KEY)
            seen = []

            class Holder:
                def __del__(self):
                    seen.append(len(list(q.leaves)))

            h = Holder()
            h.self = h  # a cycle: only a collection frees it
            del h
            t = threading.Thread(target=lambda: seen.append(len(p.leaves.records)), daemon=True)
            t.start()
            t.join(60)
            print("hung" if t.is_alive() else "ok", sorted(seen), gc.isenabled())
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "[5000,", "5000]", "True"], out.stdout
