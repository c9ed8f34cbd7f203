"""All or nothing: a restore that fails leaves the caller's tensors exactly as they were.

Objects are read straight into the caller's tensors, so without an undo log a corrupt object
would leave a model that is part new step, part old values, part bytes that failed their
checksum. Each test corrupts a real object file on the only replica (same size, other bytes)
and compares every byte of the model and optimizer before and after.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers import REPO, stored_key, torchrun

from ckptmirror import Mirror, NoValidCheckpointError, StateMismatchError
from ckptmirror.format import parse_commit, parse_rank_manifest
from ckptmirror.replicas.local import LocalReplica

OBJ = 4 << 10  # small objects: a few dozen per step, so first/middle/last differ


def build(seed: int, width: int = 64, hooked: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model and its AdamW state. ``hooked``: the model has a load_state_dict hook, so
    restore cannot land bytes after every check and takes the undo-log path instead."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, width), torch.nn.Linear(width, 8))
    if hooked:
        model.register_load_state_dict_post_hook(lambda module, keys: None)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    optim.step()
    return model, optim


def raw(model: torch.nn.Module, optim: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every byte of the model and the optimizer state, as copies."""
    ts = list(model.state_dict().values())
    ts += [v for s in optim.state_dict()["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [t.detach().clone().contiguous().reshape(-1).view(torch.uint8) for t in ts]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def objects(root: Path, step: int, rank: int = 0) -> list[tuple[str, int]]:
    """(key, stream offset) of every object of ``rank`` at ``step`` on the local replica ``root``."""
    ck = f"step-{step:012d}/COMMIT.json"
    commit = parse_commit((root / ck).read_bytes(), ck)
    ref = commit.ranks[rank]
    m = parse_rank_manifest((root / ref.key).read_bytes(), ref.key)
    out, off = [], 0
    for o in m.objects:
        out.append((stored_key(root, o.key), off))  # an incremental save may reference an older step's file
        off += o.size
    return out


def optim_object(root: Path, step: int) -> str:
    """The key of an object that holds only optimizer state (AdamW moments come after the model)."""
    ck = f"step-{step:012d}/COMMIT.json"
    ref = parse_commit((root / ck).read_bytes(), ck).ranks[0]
    m = parse_rank_manifest((root / ref.key).read_bytes(), ref.key)
    model_bytes = sum(p.numel() * p.element_size() for p in build(0)[0].parameters())
    offs = objects(root, step)
    return next(k for k, off in offs if off >= model_bytes and off + OBJ <= m.stream_bytes - 1024)


def own(objs: list[tuple[str, int]], step: int) -> list[tuple[str, int]]:
    """The objects of ``objs`` stored in ``step``'s own directory (not referenced from an earlier step)."""
    return [o for o in objs if o[0].startswith(f"step-{step:012d}/")]


def corrupt(root: Path, key: str) -> None:
    """Flip every byte of the object: same size (the preflight passes), wrong checksum."""
    p = root / key
    data = bytearray(p.read_bytes())
    for i in range(len(data)):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        model, optim = build(1)
        m.save(7, model, optim).result(timeout=60)
    return tmp_path


@pytest.mark.parametrize("loading", ["stock", "hooked"])
@pytest.mark.parametrize("which", ["first", "middle", "last", "optimizer"])
def test_corrupt_object_on_the_only_replica_leaves_the_target_untouched(saved: Path, which: str, loading: str) -> None:
    objs = objects(saved, 7)
    assert len(objs) >= 10, "the test needs many objects"
    key = {
        "first": objs[0][0],
        "middle": objs[len(objs) // 2][0],
        "last": objs[-1][0],
        "optimizer": optim_object(saved, 7),
    }[which]
    corrupt(saved, key)
    model, optim = build(2, hooked=loading == "hooked")
    before = raw(model, optim)
    with Mirror([str(saved)], object_bytes=OBJ) as m:
        with pytest.raises(NoValidCheckpointError):
            m.restore(model, optim)
    assert same(raw(model, optim), before), f"corrupt {which} object: the target was modified"
    assert not any(torch.isnan(p).any() for p in model.parameters())


def test_fallback_to_an_older_step_that_does_not_fit_leaves_the_target_untouched(tmp_path: Path) -> None:
    # Step 1 was saved from a narrower model; step 2 fits but is corrupt. The restore tries step
    # 2 (writing into the target), fails, falls back to step 1, which does not fit: the target
    # must be exactly as before, not half step 2.
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        m.save(1, *build(1, width=32)).result(timeout=60)
        m.save(2, *build(1)).result(timeout=60)
    objs = objects(tmp_path, 2)
    corrupt(tmp_path, objs[len(objs) // 2][0])
    model, optim = build(3)
    before = raw(model, optim)
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        with pytest.raises((StateMismatchError, NoValidCheckpointError)):
            m.restore(model, optim)
    assert same(raw(model, optim), before)


def test_fallback_to_an_older_step_restores_it_bit_exact(tmp_path: Path) -> None:
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        old_model, old_optim = build(1)
        m.save(1, old_model, old_optim).result(timeout=60)
        m.save(2, *build(2)).result(timeout=60)
    objs = own(objects(tmp_path, 2), 2)  # not one step 1 shares (incremental saves store those once)
    corrupt(tmp_path, objs[-1][0])
    model, optim = build(3)
    with Mirror([str(tmp_path)], object_bytes=OBJ) as m:
        res = m.restore(model, optim)
    assert res is not None and res.step == 1
    assert same(raw(model, optim), raw(old_model, old_optim))


def test_load_state_dict_failing_after_the_fill_rolls_back(saved: Path) -> None:
    class Picky(torch.nn.Sequential):
        """A module whose load_state_dict raises after the tensors were filled in place."""

        def load_state_dict(self, *a, **k):  # type: ignore[no-untyped-def,override]
            raise RuntimeError("refused by the module")

    torch.manual_seed(5)
    model = Picky(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    optim.step()
    before = raw(model, optim)
    with Mirror([str(saved)], object_bytes=OBJ) as m:
        with pytest.raises(RuntimeError, match="refused"):
            m.restore(model, optim)
    assert same(raw(model, optim), before)


def test_optimizer_load_failing_rolls_back_model_and_param_groups(saved: Path) -> None:
    model, optim = build(2)
    optim.param_groups[0]["lr"] = 0.5
    before = raw(model, optim)
    real = optim.load_state_dict
    calls = []

    def flaky(sd):  # type: ignore[no-untyped-def]
        calls.append(sd)
        if len(calls) == 1:
            real(sd)  # the checkpoint's groups land, then the call fails
            raise RuntimeError("optimizer refused")
        return real(sd)

    optim.load_state_dict = flaky  # type: ignore[method-assign]
    with Mirror([str(saved)], object_bytes=OBJ) as m:
        with pytest.raises(RuntimeError, match="optimizer refused"):
            m.restore(model, optim)
    assert same(raw(model, optim), before)
    assert optim.param_groups[0]["lr"] == 0.5


def test_strict_false_with_extra_keys_in_the_target_restores(saved: Path) -> None:
    src_model, src_optim = build(1)
    model, _ = build(2)
    model.add_module("extra", torch.nn.Linear(2, 2))
    extra_before = model.extra.weight.detach().clone()
    with Mirror([str(saved)], object_bytes=OBJ) as m:
        res = m.restore(model, strict=False)
    assert res is not None and res.step == 7
    for k, v in src_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model.extra.weight, extra_before)


def test_successful_restore_keeps_no_undo_memory_beyond_the_staging_arena(saved: Path) -> None:
    model, optim = build(2, hooked=True)
    with Mirror([str(saved)], object_bytes=OBJ) as m:
        m.restore(model, optim)
        allocated = m.staging_allocations
        assert allocated == 1  # the undo log borrowed the staging arena
        m.save(8, model, optim).result(timeout=60)  # the first save reuses the arena the undo log used
        assert m.staging_allocations == allocated


def test_stock_loading_restores_from_local_disk_without_an_undo_copy(saved: Path) -> None:
    """torch's own load_state_dict: local objects verify where they lie and land after every
    check, so nothing is copied aside (the staging arena is not even allocated)."""
    model, optim = build(2)
    with Mirror([str(saved)], object_bytes=OBJ) as m:
        res = m.restore(model, optim)
        assert res is not None and res.step == 7
        assert m.staging_allocations == 0
    src_model, src_optim = build(1)
    assert same(raw(model, optim), raw(src_model, src_optim))


@pytest.mark.parametrize("loading", ["stock", "hooked"])
def test_corrupt_local_copy_is_read_from_the_next_replica(tmp_path: Path, loading: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with Mirror([str(a), str(b)], object_bytes=OBJ) as m:
        m.save(7, *build(1)).result(timeout=60)
    objs = objects(a, 7)
    for key, _ in (objs[0], objs[len(objs) // 2], objs[-1]):
        corrupt(a, key)
    model, optim = build(2, hooked=loading == "hooked")
    with Mirror([str(a), str(b)], object_bytes=OBJ) as m:
        res = m.restore(model, optim)
    assert res is not None and res.step == 7
    assert {res.sources[k] for k, _ in (objs[0], objs[-1])} == {LocalReplica(str(b)).url}
    assert res.sources[objs[1][0]] == LocalReplica(str(a)).url
    assert same(raw(model, optim), raw(*build(1)))


def test_all_ranks_roll_back_together(tmp_path: Path) -> None:
    # Rank 1's newest step is corrupt, rank 0's verifies: rank 0 loads step 2, then must undo it
    # and both ranks restore step 1. With step 1 corrupt on rank 1 too, both fail untouched.
    child = str(REPO / "tests" / "_atomic_child.py")
    torchrun(child, "save", str(tmp_path))
    saved = [json.loads((tmp_path / f"save-{r}.json").read_text()) for r in (0, 1)]
    corrupt(tmp_path / "rank1", own(objects(tmp_path / "rank1", 2, rank=1), 2)[-1][0])
    torchrun(child, "restore", str(tmp_path))
    got = [json.loads((tmp_path / f"restore-{r}.json").read_text()) for r in (0, 1)]
    for r in (0, 1):
        assert got[r].get("step") == 1, got
        assert got[r]["after"] == saved[r]["digest1"], f"rank {r} is not exactly step 1"
    corrupt(tmp_path / "rank1", objects(tmp_path / "rank1", 1, rank=1)[0][0])
    torchrun(child, "restore", str(tmp_path))
    got = [json.loads((tmp_path / f"restore-{r}.json").read_text()) for r in (0, 1)]
    for r in (0, 1):
        assert got[r].get("error") == "NoValidCheckpointError", got
        assert got[r]["after"] == got[r]["before"], f"rank {r} was left modified"


def test_stock_loading_is_recognised_and_anything_else_keeps_the_undo_copy() -> None:
    from ckptmirror.state.targets import stock_loading

    def plain() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.LayerNorm(2))

    m = plain()
    assert stock_loading(m, torch.optim.AdamW(m.parameters()))
    assert stock_loading(m, None) and stock_loading(None, torch.optim.SGD(m.parameters(), lr=0.1))
    hooked = plain()
    hooked[0].register_load_state_dict_post_hook(lambda module, keys: None)
    assert not stock_loading(hooked, None)
    copies = plain()
    copies[1]._register_state_dict_hook(lambda *a: None)  # may hand out copies
    assert not stock_loading(copies, None)

    class Own(torch.nn.Linear):
        def _load_from_state_dict(self, *a, **k):  # type: ignore[no-untyped-def]
            return super()._load_from_state_dict(*a, **k)

    assert not stock_loading(torch.nn.Sequential(Own(2, 2)), None)
    assert not stock_loading(build(0, hooked=True)[0], None)
    opt = torch.optim.AdamW(m.parameters())
    opt.load_state_dict = lambda sd: None  # type: ignore[method-assign]
    assert not stock_loading(m, opt)
    opt2 = torch.optim.AdamW(m.parameters())
    opt2.register_load_state_dict_pre_hook(lambda o, sd: None)
    assert not stock_loading(m, opt2)
    assert not stock_loading(object(), None)


@pytest.mark.parametrize("threads", [1, 2])
def test_landing_copies_small_and_large_regions_and_releases_the_sources(threads: int) -> None:
    from ckptmirror.restore.undo import Landing

    class Source:
        closed = 0

        def close(self) -> None:
            Source.closed += 1

    sizes = [1, 1000, 300 << 10, 40 << 20, 9 << 20]  # under and over the small and chunk sizes
    srcs = [torch.randint(0, 255, (n,), dtype=torch.uint8) for n in sizes]
    dsts = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    landing = Landing()
    landing.add(Source(), [(d.data_ptr(), s.data_ptr(), d.numel()) for d, s in zip(dsts, srcs)])
    whole, part = torch.zeros(4, 4), torch.arange(16.0).reshape(4, 4)
    landing.add_tensor(whole.t(), part)  # a strided destination lands through torch
    assert landing.nbytes == sum(sizes) + 64
    assert all(not d.any() for d in dsts), "nothing lands before land()"
    landing.land(threads)
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))
    assert torch.equal(whole.t(), part)
    assert Source.closed == 1 and landing.nbytes == 0
    dropped = Landing()
    other = srcs[0] ^ 0xFF  # differs in every byte from what dsts[0] holds
    dropped.add(Source(), [(dsts[0].data_ptr(), other.data_ptr(), 1)])
    dropped.discard()
    dropped.land(threads)  # nothing left to land
    assert Source.closed == 2 and torch.equal(dsts[0], srcs[0])
