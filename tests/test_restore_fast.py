"""The column-at-a-time restore path (issue #10): many small tensors, and every way a target
or a stored leaf can leave the common case (fresh buffers, shared storages, views, strided or
mismatched targets), each still restored bit-exact or refused before anything changed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ckptmirror import Mirror, NoValidCheckpointError, StateMismatchError
from ckptmirror.format import parse_commit, parse_rank_manifest
from ckptmirror.restore import fill, reads
from ckptmirror.restore.undo import Landing, UndoLog

OBJ = 16 << 10  # objects of many small tensors each, and tensors that span several objects


def many(n: int, seed: int) -> torch.nn.Module:
    """``n`` small parameters of mixed dtypes and shapes, a buffer and a large tensor."""
    g = torch.Generator().manual_seed(seed)
    mod = torch.nn.Module()
    for i in range(n):
        shape = (3 + i % 5,) if i % 3 else (2, 2 + i % 4)
        t = torch.randn(shape, generator=g)
        mod.register_parameter(f"p{i}", torch.nn.Parameter(t if i % 4 else t.to(torch.bfloat16)))
    mod.register_buffer("steps", torch.arange(7))
    mod.register_parameter("big", torch.nn.Parameter(torch.randn(40_000, generator=g)))  # ~10 objects
    mod.register_parameter("empty", torch.nn.Parameter(torch.empty(0)))
    return mod


def raw(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous().reshape(-1).view(torch.uint8) for k, v in sd.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def objects(root: Path, step: int) -> list[str]:
    ck = f"step-{step:012d}/COMMIT.json"
    ref = parse_commit((root / ck).read_bytes(), ck).ranks[0]
    return [o.key for o in parse_rank_manifest((root / ref.key).read_bytes(), ref.key).objects]


def corrupt(root: Path, key: str) -> None:
    p = root / key
    p.write_bytes(bytes(b ^ 0xFF for b in p.read_bytes()))


@pytest.mark.parametrize("hooked", [False, True], ids=["landing", "undo-log"])
def test_many_small_tensors_restore_bit_exact_in_place(tmp_path: Path, hooked: bool) -> None:
    src = many(400, 0)
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        m.save(1, src).result(timeout=60)
    dst = many(400, 1)
    if hooked:  # the undo-log path (restore cannot defer the landing)
        dst.register_load_state_dict_post_hook(lambda module, keys: None)
    ptrs = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        res = m.restore(dst)
    assert res is not None and res.step == 1
    assert same(raw(dst.state_dict()), raw(src.state_dict()))
    assert {k: v.data_ptr() for k, v in dst.state_dict().items()} == ptrs, "not filled in place"


def test_corrupt_object_among_many_small_tensors_leaves_every_tensor_untouched(tmp_path: Path) -> None:
    src = many(400, 0)
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        m.save(1, src).result(timeout=60)
    keys = objects(tmp_path, 1)
    assert len(keys) > 10
    corrupt(tmp_path, keys[len(keys) // 3])
    dst = many(400, 1)
    before = raw(dst.state_dict())
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m, pytest.raises(NoValidCheckpointError) as err:
        m.restore(dst)
    assert keys[len(keys) // 3] in str(err.value) and str(tmp_path) in str(err.value)
    assert same(raw(dst.state_dict()), before)


def odd(seed: int) -> torch.nn.Module:
    """Tensors off the common case: two views of one storage (one at an offset), a transposed
    one, a strided parameter, integers."""
    g = torch.Generator().manual_seed(seed)
    mod = torch.nn.Module()
    base = torch.randn(64, generator=g)
    mod.register_buffer("a", base[:16])
    mod.register_buffer("b", base[16:40].view(4, 6))
    mod.register_buffer("t", torch.randn(5, 7, generator=g).t())
    mod.register_parameter("strided", torch.nn.Parameter(torch.randn(66, generator=g)[::2]))
    mod.register_buffer("ints", torch.randint(0, 1000, (11,), generator=g))
    mod.register_parameter("plain", torch.nn.Parameter(torch.randn(500, generator=g)))
    return mod


@pytest.mark.parametrize("hooked", [False, True], ids=["landing", "undo-log"])
def test_targets_off_the_common_case_restore_bit_exact(tmp_path: Path, hooked: bool) -> None:
    src = odd(0)
    with Mirror([str(tmp_path)], object_bytes=256) as m:
        m.save(1, src).result(timeout=60)
        dst = odd(1)
        if hooked:
            dst.register_load_state_dict_post_hook(lambda module, keys: None)
        ptrs = {k: v.data_ptr() for k, v in dst.state_dict().items()}
        m.restore(dst)
        assert same(raw(dst.state_dict()), raw(src.state_dict()))
        assert {k: v.data_ptr() for k, v in dst.state_dict().items()} == ptrs
        # without targets: new tensors, the shared storage still shared
        step, loaded = m.load_state(require=True)  # type: ignore[misc]
    assert step == 1
    assert same(raw(loaded["model"]), raw(src.state_dict()))
    a, b = loaded["model"]["a"], loaded["model"]["b"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_shape_and_key_mismatches_are_refused_before_any_write(tmp_path: Path) -> None:
    src = many(50, 0)
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        m.save(1, src).result(timeout=60)
        # one shape differs
        dst = many(50, 1)
        dst.p7 = torch.nn.Parameter(torch.zeros(99))
        before = raw(dst.state_dict())
        with pytest.raises(StateMismatchError, match=r"p7.*checkpoint shape \[5\].*target shape \[99\]"):
            m.restore(dst)
        assert same(raw(dst.state_dict()), before)
        # as many keys, one renamed: named on both sides
        dst = many(50, 1)
        dst.register_parameter("renamed", dst.p3)
        del dst.p3
        before = raw(dst.state_dict())
        with pytest.raises(StateMismatchError) as err:
            m.restore(dst)
        assert "renamed" in str(err.value) and "in the target but not in the checkpoint" in str(err.value)
        assert "p3" in str(err.value) and "in the checkpoint but not in the target" in str(err.value)
        assert same(raw(dst.state_dict()), before)
        # a dtype that differs is filled through a fresh buffer and converted by torch, as before
        dst = many(50, 1).double()
        m.restore(dst)
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v.to(dst.state_dict()[k].dtype)), k


def test_model_and_optimizer_nested_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(30)])
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optim.step()
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        m.save(1, model, optim, extra={"nested": [1, (2.5, "x"), {"t": torch.ones(3)}]}).result(timeout=60)
        torch.manual_seed(1)
        model2 = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(30)])
        optim2 = torch.optim.AdamW(model2.parameters())
        model2(torch.randn(2, 8)).sum().backward()
        optim2.step()
        res = m.restore(model2, optim2)
    assert res is not None
    assert res.extra["nested"][:2] == [1, (2.5, "x")] and torch.equal(res.extra["nested"][2]["t"], torch.ones(3))
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = optim.state_dict(), optim2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][name]), (k, name)


def test_state_tree_falls_back_to_decoding_when_the_skeleton_does_not_match(tmp_path: Path) -> None:
    with Mirror([str(tmp_path)]) as m:
        m.save(1, None, extra={"a": torch.ones(2), "b": [torch.zeros(1), 3]}).result(timeout=60)
    ck = "step-000000000001/COMMIT.json"
    ref = parse_commit((tmp_path / ck).read_bytes(), ck).ranks[0]
    man = parse_rank_manifest((tmp_path / ref.key).read_bytes(), ref.key)
    check = fill.validate_manifest(man, ref.key)
    leaves = ["L0", "L1"]
    tree = fill._state_tree(man, check, leaves, ref.key)
    assert tree["extra"] == {"a": "L0", "b": ["L1", 3]}
    short = dataclasses.replace(check, skeleton={"extra": {"a": check.skeleton["extra"]["a"]}})
    assert fill._state_tree(man, short, leaves, ref.key) == tree  # one placeholder too few
    long = dataclasses.replace(check, skeleton=[check.skeleton, check.skeleton])
    assert fill._state_tree(man, long, leaves, ref.key) == tree  # too many


def test_landing_columns_and_undo_capacity_on_first_use() -> None:
    srcs = [torch.randint(0, 255, (n,), dtype=torch.uint8) for n in (3, 300 << 10, 5)]
    dsts = [torch.zeros_like(s) for s in srcs]

    class Source:
        closed = 0

        def close(self) -> None:
            Source.closed += 1

    landing = Landing()
    landing.add_columns(Source(), [d.data_ptr() for d in dsts[:2]], [s.data_ptr() for s in srcs[:2]], [3, 300 << 10])
    landing.add(Source(), [(dsts[2].data_ptr(), srcs[2].data_ptr(), 5)])
    landing.add(Source(), [])
    assert landing.nbytes == 3 + (300 << 10) + 5
    landing.land(2)
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs)) and Source.closed == 3

    calls = []

    def size() -> int:
        calls.append(1)
        return 64

    log = UndoLog(size)
    assert not calls, "sized on first use only"
    t = torch.arange(4.0)
    log.save(t)
    log.save_raw(t.data_ptr(), 8)
    assert calls == [1] and log.capacity == 64 and log.saved_bytes == 32
    t.zero_()
    log.rollback()
    assert torch.equal(t, torch.arange(4.0))


class _WithExtra(torch.nn.Module):
    """Stock loading, plus extra state: its tensors fill in place, the extra state needs loading."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        torch.nn.init.constant_(self.lin.weight, float(seed))
        self.note = {"seed": seed}

    def get_extra_state(self) -> Any:
        return dict(self.note)

    def set_extra_state(self, state: Any) -> None:
        self.note = dict(state)


def test_extra_state_is_loaded_although_every_tensor_filled_in_place(tmp_path: Path) -> None:
    src = _WithExtra(1)
    with Mirror([str(tmp_path)]) as m:
        m.save(1, src).result(timeout=60)
        dst = _WithExtra(2)
        m.restore(dst)
    assert dst.note == {"seed": 1}
    assert torch.equal(dst.lin.weight, src.lin.weight)


def test_optimizer_groups_are_looked_up_by_hash_with_the_same_answers() -> None:
    from ckptmirror.state.targets import IdList, indexed_groups

    state = {"state": {}, "param_groups": [{"lr": 0.1, "params": [3, 1, 2]}, {"params": (4,)}, "odd"]}
    out = indexed_groups(state)
    assert out == state and type(state["param_groups"][0]["params"]) is list, "the input is not changed"
    ids = out["param_groups"][0]["params"]
    assert isinstance(ids, IdList) and list(ids) == [3, 1, 2]
    assert 1 in ids and 4 not in ids and [1] not in ids and 1.0 in ids
    assert out["param_groups"][1:] == state["param_groups"][1:]
    assert indexed_groups(None) is None and indexed_groups({"x": 1}) == {"x": 1}


def test_model_and_optimizer_with_many_parameters_in_one_group(tmp_path: Path) -> None:
    src, dst = many(600, 0), many(600, 1)
    opts = []
    for mod in (src, dst):
        opt = torch.optim.Adam(mod.parameters(), lr=1e-3)
        for p in mod.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        opts.append(opt)
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        m.save(1, src, opts[0]).result(timeout=60)
        m.restore(dst, opts[1])
    assert same(raw(dst.state_dict()), raw(src.state_dict()))
    s1, s2 = opts[0].state_dict(), opts[1].state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k, st in s1["state"].items():
        assert all(torch.equal(v, s2["state"][k][name]) for name, v in st.items())
    assert type(opts[1].param_groups[0]["params"]) is list


def test_objects_verified_ahead_are_read_once_and_always_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptmirror.replicas.local import LocalReplica
    from ckptmirror.restore.fetch import Fetcher

    mapped: list[Any] = []
    reads: list[str] = []
    real_map, real_read = LocalReplica.map_object, Fetcher.fetch_into

    def map_object(self: LocalReplica, key: str, size: int) -> Any:
        mo = real_map(self, key, size)
        mapped.append(mo)
        return mo

    def fetch_into(self: Fetcher, key: str, *args: Any, **kwargs: Any) -> str:
        reads.append(key)
        return real_read(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalReplica, "map_object", map_object)
    monkeypatch.setattr(Fetcher, "fetch_into", fetch_into)

    def closed() -> bool:
        return all(mo.buffer.closed for mo in mapped if mo is not None)

    src = many(60, 0)
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        m.save(1, src).result(timeout=60)
        n_objects = len(objects(tmp_path, 1))
        # Filled in place: each object mapped and verified once, ahead, and read no other way.
        dst = many(60, 1)
        m.restore(dst)
        assert same(raw(dst.state_dict()), raw(src.state_dict()))
        assert len(mapped) == n_objects and not reads and closed()
        # Refused (a shape differs) while objects were being verified: every mapping closed.
        mapped.clear()
        dst = many(60, 1)
        dst.p7 = torch.nn.Parameter(torch.zeros(99))
        before = raw(dst.state_dict())
        with pytest.raises(StateMismatchError):
            m.restore(dst)
        assert same(raw(dst.state_dict()), before) and closed()
        # Other dtypes: fresh buffers (the large tensor's objects hold nothing else), filled out of
        # the verified mappings, not read again.
        mapped.clear()
        dst = many(60, 1).double()
        m.restore(dst)
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v.to(dst.state_dict()[k].dtype)), k
        assert len(mapped) == n_objects and not reads and closed()


def test_an_object_verified_ahead_for_a_cuda_target_is_read_again_the_usual_way() -> None:
    # ahead.host_first guessed host memory, and a storage of the object turned out to be a CUDA
    # target's (ptr 0): the mapping is closed and the object read the usual way.
    class Mapping:
        addr, size, closed = 0, 8, False

        def close(self) -> None:
            self.closed = True

    mo, cands = Mapping(), ["replica"]
    obj = reads.ObjectRecord("step-000000000001/rank-00000/o000000-00000000.bin", 8, "xxh3_64:" + "0" * 16)
    landing = Landing()
    cols = reads._Cols(np.array([0]), np.array([8]), np.array([0]), np.array([True]))
    got = reads._deferred(None, obj, cands, 0, 8, cols, landing, (mo, "url", []))  # type: ignore[arg-type]
    assert got is cands and mo.closed and landing.nbytes == 0


def test_filled_in_place_holds_only_where_every_entry_is_the_targets_own() -> None:
    from ckptmirror.state.targets import filled_in_place

    a, b, c = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    target = {"a": a, "b": b, "c": c}
    assert filled_in_place({"a": a, "b": b, "c": c}, target)  # the stored order: compared in order
    assert filled_in_place({"c": c, "a": a, "b": b}, target)  # another order: looked up
    assert not filled_in_place({"a": a, "b": c, "c": b}, target)  # same tensors, other keys
    assert not filled_in_place({"a": a, "x": b, "c": c}, target)  # a key the target lacks
    assert not filled_in_place({"a": a, "b": b, "c": torch.zeros(1)}, target)  # a new tensor
    # Fewer entries than the target: each one is the target's own (keys only the target has keep
    # their values: nn.Module's strict loading refuses them before this is asked).
    assert filled_in_place({"a": a, "b": b}, target)
    assert not filled_in_place([a], target) and not filled_in_place({"a": a}, [a])


def _manifest(root: Path, step: int) -> Any:
    ck = f"step-{step:012d}/COMMIT.json"
    ref = parse_commit((root / ck).read_bytes(), ck).ranks[0]
    return parse_rank_manifest((root / ref.key).read_bytes(), ref.key), ref.key


def test_the_manifest_check_proves_the_exact_layout_only_where_every_leaf_fills_its_storage(tmp_path: Path) -> None:
    """``ManifestCheck.exact`` (every leaf C-contiguous from its storage's first byte to its
    last) lets restore skip the per-leaf layout checks: it must be False wherever one leaf is a
    view at an offset, a shorter view, or strided; computed alike from what parsing built and
    from records (a manifest the writer holds)."""
    from ckptmirror.restore.check import validate_manifest

    tied = torch.nn.Module()  # two keys, one storage, each filling it: exact (the two users are checked apart)
    tied.register_parameter("w", torch.nn.Parameter(torch.randn(6)))
    tied.register_parameter("v", tied.w)
    transposed = torch.nn.Module()  # fills its storage, from its first byte, in other strides
    transposed.register_buffer("t", torch.randn(5, 7).t())
    cases = {"plain": (many(30, 0), True), "odd": (odd(0), False), "tied": (tied, True), "t": (transposed, False)}
    for step, (name, (mod, want)) in enumerate(cases.items(), start=1):
        with Mirror([str(tmp_path)]) as m:
            m.save(step, mod).result(timeout=60)
        mf, key = _manifest(tmp_path, step)
        assert validate_manifest(mf, key).exact is want, name
        as_records = dataclasses.replace(mf, leaves=tuple(mf.leaves), storages=tuple(mf.storages))
        assert validate_manifest(as_records, key).exact is want, f"{name}, as records"
    # A leaf that ends where its storage ends but starts past its first byte (the writer stores
    # a lone view from its own first byte; a hand-made manifest): not exact.
    mf, key = _manifest(tmp_path, 3)
    assert len(mf.leaves) == 2 and validate_manifest(mf, key).exact
    shifted = tuple(lf._replace(shape=(4,), stride=(1,), offset=2) for lf in mf.leaves)
    assert validate_manifest(dataclasses.replace(mf, leaves=shifted), key).exact is False


def test_the_targets_dict_is_kept_as_the_loaded_one_where_every_stored_key_fills_its_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the model's dict holds exactly the stored keys and every one fills the model's own
    tensor (straight, or copied in: another dtype, an empty tensor), the loaded state holds the
    target's dict itself, not a copy rebuilt leaf by leaf; the values are right either way."""
    import ckptmirror.mirror as mirror_mod

    seen: list[tuple[Any, Any]] = []
    real = mirror_mod.filled_in_place

    def spy(loaded: Any, target: Any) -> bool:
        seen.append((loaded, target))
        return real(loaded, target)

    monkeypatch.setattr(mirror_mod, "filled_in_place", spy)
    src = many(80, 0)
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        m.save(1, src).result(timeout=60)
        for dtype in (None, torch.float64):
            seen.clear()
            dst = many(80, 1)
            if dtype is not None:
                dst.p5 = torch.nn.Parameter(dst.p5.detach().to(dtype))  # a fresh buffer, copied in
            m.restore(dst)
            for k, v in src.state_dict().items():
                assert torch.equal(dst.state_dict()[k], v.to(dst.state_dict()[k].dtype)), k
            assert len(seen) == 1 and seen[0][0] is seen[0][1], "the target's dict, kept"


def test_a_target_dict_is_kept_only_where_the_tree_would_hold_the_same() -> None:
    from ckptmirror.restore.check import KeyPaths, LeafSpec, ManifestCheck

    keys = KeyPaths()
    keys.add_node(0, 3, ("model",), ["a", "b", "c"], None)
    spec = LeafSpec("tensor", "float32", (1,))
    skeleton = {"model": {"a": spec, "b": spec, "c": spec}, "extra": None}
    check = ManifestCheck([4] * 3, ["float32"] * 3, keys, skeleton, {})
    t = {i: torch.zeros(1) for i in range(3)}
    sub = {"a": t[0], "b": t[1], "c": t[2]}
    whole = [(("model",), 0, 3, sub)]
    assert fill._reused(check, t, whole, {}) == {id(skeleton["model"]): sub}
    tree = fill._state_tree(None, check, [t[0], t[1], t[2]], "k", fill._reused(check, t, whole, {}))  # type: ignore[arg-type]
    assert tree["model"] is sub and tree["extra"] is None
    assert fill._reused(check, {0: t[0], 2: t[2]}, whole, {}) == {}  # "b" fills no tensor of the target's
    assert fill._reused(check, t, whole, {1: object()}) == {}  # a DTensor's entry is not the tensor filled
    assert fill._reused(check, t, [(("model",), 0, 2, sub)], {}) == {}  # the node holds more than the run


def test_placeholders_of_a_parsed_manifest_of_several_dtypes_are_those_of_its_records(tmp_path: Path) -> None:
    """The skeleton's placeholders, found by type and shape index for a parsed manifest of
    several dtypes, are those built from each record's kind, dtype and shape."""
    from ckptmirror.restore.check import LeafSpec, validate_manifest

    with Mirror([str(tmp_path)]) as m:
        m.save(1, many(40, 0)).result(timeout=60)
    mf, key = _manifest(tmp_path, 1)
    parsed = validate_manifest(mf, key).skeleton["model"]
    want = {
        k: LeafSpec("tensor", str(v.dtype).removeprefix("torch."), tuple(v.shape))
        for k, v in many(40, 0).state_dict().items()
    }
    assert len({s.dtype for s in want.values()}) == 3  # float32, bfloat16, int64
    assert parsed == want
    as_records = dataclasses.replace(mf, leaves=tuple(mf.leaves), storages=tuple(mf.storages))
    assert validate_manifest(as_records, key).skeleton["model"] == want


def test_a_restore_on_one_io_thread_verifies_ahead_and_lands_without_waiting_on_itself(tmp_path: Path) -> None:
    """One I/O thread: the verifying lane and the reads that wait for its results share it; two:
    the landing's helper runs on the restore's pool too (a deadlock would hang: run in a child
    process with a deadline)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_restore_fast import many, raw, same
        from ckptmirror import Mirror
        src = many(300, 0)
        with Mirror([{str(tmp_path)!r}], object_bytes=16 << 10) as m:
            m.save(1, src).result(timeout=60)
        for threads in (1, 2):
            dst = many(300, 1)
            with Mirror([{str(tmp_path)!r}], io_threads=threads) as m:
                assert m.restore(dst).step == 1
            assert same(raw(dst.state_dict()), raw(src.state_dict())), threads
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_stateful_whose_state_dict_is_its_live_dict_gets_a_loaded_dict_of_its_own(tmp_path: Path) -> None:
    """Not torch's loading: the loaded dict must not be the object's own (its loader clears its
    dict, then fills it from the one given: the same dict would lose every key)."""

    class Live:
        def __init__(self, v: float) -> None:
            self.sd = {"w": torch.full((4,), v), "b": torch.full((2,), v)}

        def state_dict(self) -> dict[str, torch.Tensor]:
            return self.sd

        def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
            self.sd.clear()
            self.sd.update(sd)

    with Mirror([str(tmp_path)]) as m:
        m.save(1, Live(1.0)).result(timeout=60)  # type: ignore[arg-type]
        dst = Live(0.0)
        m.restore(dst)  # type: ignore[arg-type]
    assert sorted(dst.sd) == ["b", "w"]
    assert torch.equal(dst.sd["w"], torch.ones(4)) and torch.equal(dst.sd["b"], torch.ones(2))


def test_landing_helpers_already_started_are_waited_for_when_a_later_one_cannot_start() -> None:
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ckptmirror.restore.undo import _on_helpers

    done = threading.Event()

    def slow() -> None:
        time.sleep(0.3)
        done.set()

    class Refusing(ThreadPoolExecutor):
        calls = 0

        def submit(self, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("cannot schedule new futures")
            return super().submit(*args, **kwargs)

    with Refusing(2) as pool:
        with pytest.raises(RuntimeError, match="cannot schedule"):
            _on_helpers(pool, 3, [(slow,), (slow,)], lambda: None)
        assert done.is_set(), "returned while the first helper was still running"  # (before the pool's own wait)


@pytest.mark.parametrize("hooked", [False, True], ids=["landing", "undo-log"])
def test_a_stored_transposed_tensor_restores_into_a_contiguous_one_by_value(tmp_path: Path, hooked: bool) -> None:
    """A storage whose leaf is not C-contiguous (stored transposed) must not be read byte for byte
    into a contiguous target of the same shape: the manifest is not exact, the layout is checked."""
    src = torch.nn.Module()
    src.register_buffer("t", torch.arange(35.0).reshape(5, 7).t())  # (7, 5), strides (1, 7)
    src.register_buffer("s", torch.arange(66.0)[::2])  # strided
    with Mirror([str(tmp_path)]) as m:
        m.save(1, src).result(timeout=60)
    dst = torch.nn.Module()
    dst.register_buffer("t", torch.zeros(7, 5))  # contiguous
    dst.register_buffer("s", torch.zeros(33))
    if hooked:
        dst.register_load_state_dict_post_hook(lambda module, keys: None)
    ptr = dst.t.data_ptr()
    with Mirror([str(tmp_path)]) as m:
        m.restore(dst)
    assert torch.equal(dst.t, src.t) and torch.equal(dst.s, src.s)
    assert dst.t.data_ptr() == ptr and dst.t.is_contiguous()


def test_storage_targets_decides_on_its_short_path_as_on_the_general_one(tmp_path: Path, monkeypatch: Any) -> None:
    """Where every leaf fills its own storage and the manifest proved the layout, storage_targets
    checks the targets in two C-level scans (dtypes, host addresses). Its decisions must be those
    of the general path (``exact=False`` takes it): every storage straight into its tensor, and
    a target of another dtype or a non-contiguous one gets a fresh buffer. A manifest that is
    not exact (a stored transposed tensor) never takes the short path."""
    from ckptmirror.restore import match
    from ckptmirror.restore.check import validate_manifest

    general = []  # calls of the general path's scatter (the short path makes none)
    real_scatter = match.scatter
    monkeypatch.setattr(match, "scatter", lambda *a: (general.append(1), real_scatter(*a))[1])

    def module(seed: int, transposed: bool = False) -> torch.nn.Module:
        g = torch.Generator().manual_seed(seed)
        mod = torch.nn.Module()
        for i in range(12):
            t = torch.randn((3 + i % 4, 2), generator=g)
            mod.register_parameter(f"p{i}", torch.nn.Parameter(t if i % 3 else t.to(torch.bfloat16)))
        mod.register_buffer("steps", torch.arange(5))
        if transposed:
            mod.register_buffer("t", torch.randn(5, 7, generator=g).t())
        return mod

    def decide(step: int, sd: dict[str, Any], exact: bool | None = None) -> tuple[list[Any], ...]:
        mf, key = _manifest(tmp_path, step)
        check = validate_manifest(mf, key)
        leaf_targets, _, _, cols, _ = match.match_targets(mf, check, {"model": sd, "optim": None}, [("model",)])
        general.clear()
        out = match.storage_targets(
            mf, leaf_targets, check.dtypes, check.esizes, set(), cols, check.exact if exact is None else exact
        )
        ptrs = [p if d else None for p, d in zip(out.ptr, out.is_direct)]
        return list(out.read), list(out.is_direct), ptrs, [d is None for d in out.dest]

    with Mirror([str(tmp_path)]) as m:
        m.save(1, module(0)).result(timeout=60)
        m.save(2, module(0, transposed=True)).result(timeout=60)
    plain = dict(module(1).state_dict(keep_vars=True))
    short = decide(1, plain)
    assert not general, "the short path was not taken"
    assert short == decide(1, plain, exact=False) and general and all(short[1])
    assert short[2] == [t.data_ptr() for t in plain.values()]  # (the stored order is the module's)
    for name, change in (
        ("another dtype", lambda t: t.detach().double()),
        ("not contiguous", lambda t: torch.empty(t.shape[::-1], dtype=t.dtype).t()),
    ):
        other = dict(plain)
        other["p4"] = change(other["p4"])
        got = decide(1, other)
        assert got == decide(1, other, exact=False), name
        assert got[1].count(False) == 1 and not got[3][list(plain).index("p4")], name  # p4 alone: a fresh buffer
    # Stored transposed: its storage is not filled straight into a contiguous target (its
    # address is known, so only the manifest's layout can keep it off the short path).
    with_t = dict(module(1, transposed=True).state_dict(keep_vars=True))
    with_t["t"] = with_t["t"].contiguous()
    got = decide(2, with_t)
    assert general, "a manifest that is not exact took the short path"
    assert got[1] == [k != "t" for k in with_t], got[1]


def test_key_path_cuts_are_computed_again_after_entries_are_added() -> None:
    from ckptmirror.restore.check import KeyPaths

    keys = KeyPaths()
    keys.add(0, ("a", "x"))
    keys.add(1, ("a", "y"))
    assert keys.cuts == [0, 2]
    keys.add(2, ("b", "z"))
    assert keys.cuts == [0, 2, 3]
    keys.cuts.insert(1, 1)  # the caller's copy (its last entry unchanged: the cache would not notice)
    assert keys.cuts == [0, 2, 3] and [p for p, _, _ in keys.runs()] == [("a",), ("b",)]


def test_the_read_plan_matches_a_storage_by_storage_reference() -> None:
    """_read_plan (array operations) against a plain loop: storages listed in or out of stream
    order, some empty, some not read; objects of random sizes, some holding no storage read."""
    import random

    from ckptmirror.restore.match import StorageTargets

    rng = random.Random(7)
    for case in range(300):
        n = rng.randrange(0, 12)
        sizes = [rng.choice((0, 1, 3, 8, 40)) for _ in range(n)]
        starts, at = [], 0
        for sz in sizes:
            at += rng.choice((0, 0, 5))  # gaps between storages (other storages' bytes, padding)
            starts.append(at)
            at += sz
        listed = list(range(n))
        if case % 2:
            rng.shuffle(listed)  # storages listed out of stream order
        offsets, nbytes = [starts[i] for i in listed], [sizes[i] for i in listed]
        targets = StorageTargets(n)
        targets.read = [rng.random() < 0.7 for _ in range(n)]
        targets.is_direct = [rng.random() < 0.5 for _ in range(n)]
        targets.ptr = [rng.randrange(1 << 40) for _ in range(n)]
        inner = sorted(rng.sample(range(1, at), min(4, at - 1))) if at > 1 else []
        cuts = [0, *inner, at] if at else [0]
        cols, order, wanted = reads._read_plan(offsets, nbytes, targets, cuts)
        ref = sorted((s for s in range(n) if targets.read[s] and nbytes[s]), key=lambda s: offsets[s])
        got_order = list(range(n)) if order is None else order.tolist()
        assert got_order == ref, case
        assert cols.starts.tolist() == [offsets[s] for s in ref]
        assert cols.ends.tolist() == [offsets[s] + nbytes[s] for s in ref]
        assert cols.ptrs.tolist() == [targets.ptr[s] for s in ref]
        assert cols.direct.tolist() == [targets.is_direct[s] for s in ref]
        want = [
            j
            for j in range(len(cuts) - 1)
            if any(offsets[s] < cuts[j + 1] and offsets[s] + nbytes[s] > cuts[j] for s in ref)
        ]
        assert wanted == want, case


def test_landing_copies_the_columns_it_is_given() -> None:
    """A caller may reuse its arrays after add_columns: what lands is what was added."""

    class Source:
        def close(self) -> None:
            pass

    src = torch.arange(8, dtype=torch.uint8)
    dst = torch.zeros(8, dtype=torch.uint8)
    d = np.array([dst.data_ptr()], dtype=np.int64)
    s_ = np.array([src.data_ptr()], dtype=np.int64)
    n = np.array([8], dtype=np.int64)
    landing = Landing()
    landing.add_columns(Source(), d, s_, n)
    n[0] = 2  # reused by the caller
    d[0] += 4
    landing.land()
    assert dst.tolist() == list(range(8))
