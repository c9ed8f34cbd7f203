"""Saving a module's own tensors (state_dict(keep_vars=True)) instead of the detached aliases
state_dict() makes: the checkpoint must be the same either way (issue #10, the save stall at
many tensors), and anything that is not torch's own, unhooked state_dict() keeps the old path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from ckptmirror import Mirror
from ckptmirror.format import RankManifest, parse_commit, parse_rank_manifest
from ckptmirror.state.targets import module_state


class Net(nn.Module):
    """Frozen and trainable parameters, bf16, tied weights, buffers of several dtypes, an empty one."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.BatchNorm1d(32), nn.Linear(32, 16))
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.lowp = nn.Parameter(torch.randn(7, 3).to(torch.bfloat16))
        self.empty = nn.Parameter(torch.empty(0))
        self.register_buffer("steps", torch.arange(5))
        self.emb.requires_grad_(False)  # frozen


def manifest(root: Path, step: int) -> RankManifest:
    ck = f"step-{step:012d}/COMMIT.json"
    ref = parse_commit((root / ck).read_bytes(), ck).ranks[0]
    return parse_rank_manifest((root / ref.key).read_bytes(), ref.key)


def _hooked(model: nn.Module) -> nn.Module:
    """A no-op state_dict hook: state_dict() is no longer torch's own, unhooked one."""
    model._register_state_dict_hook(lambda module, sd, prefix, local_metadata: None)
    return model


def test_module_state_takes_the_modules_own_tensors_only_when_it_is_safe() -> None:
    net = Net(0)
    sd, plain = module_state(net)
    assert plain == len(sd) > 0
    assert sd["body.0.weight"] is net.body[0].weight, "the parameter itself, not a detached alias"
    sd, plain = module_state(_hooked(Net(0)))
    assert plain == 0 and type(sd["body.0.weight"]) is torch.Tensor and not sd["body.0.weight"].requires_grad

    class Extra(Net):
        def get_extra_state(self) -> Any:
            return {"note": "not a tensor"}

        def set_extra_state(self, state: Any) -> None:
            pass

    sd, plain = module_state(Extra(0))
    assert plain == 0 and sd["_extra_state"] == {"note": "not a tensor"}

    class Own(Net):
        def state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return super().state_dict(*args, **kwargs)

    assert module_state(Own(0))[1] == 0


@pytest.mark.parametrize("fast_first", [True, False], ids=["own-then-aliases", "aliases-then-own"])
def test_the_checkpoint_is_the_same_as_with_detached_aliases(tmp_path: Path, fast_first: bool) -> None:
    fast, slow = Net(3), _hooked(Net(3))
    opt = torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad], lr=0.1)
    with Mirror([str(tmp_path)]) as m:
        # The same Mirror: the second save is planned anew (other tensors, other layout), and its
        # records must not differ from the first's.
        first, second = (fast, slow) if fast_first else (slow, fast)
        m.save(1, first, opt).result(timeout=60)
        m.save(2, second, opt).result(timeout=60)
    a, b = manifest(tmp_path, 1), manifest(tmp_path, 2)
    assert a.leaves == b.leaves
    assert a.storages == b.storages
    assert a.structure == b.structure
    assert [o.checksum for o in a.objects] == [o.checksum for o in b.objects]
    model_leaves = a.leaves[: len(fast.state_dict())]
    assert not any(lf.parameter or lf.requires_grad for lf in model_leaves), "recorded as state_dict() records them"
    assert any(lf.dtype == "bfloat16" for lf in model_leaves)


def test_a_saved_modules_state_loads_as_plain_tensors_and_restores_bit_exact(tmp_path: Path) -> None:
    src = Net(5)
    with torch.no_grad():
        src.body[2].running_mean.add_(1.5)
    with Mirror([str(tmp_path)]) as m:
        m.save(1, src).result(timeout=60)
        got = m.load_state()
        dst = Net(6)
        res = m.restore(dst)
    assert got is not None and res is not None and res.step == 1
    state = got[1]["model"]
    assert all(type(t) is torch.Tensor and not t.requires_grad for t in state.values())
    for k, v in src.state_dict().items():
        assert torch.equal(state[k], v), k
        assert torch.equal(dst.state_dict()[k], v), k
    assert dst.head.weight is dst.emb.weight, "ties survive"
    assert not dst.emb.weight.requires_grad and dst.body[0].weight.requires_grad, "flags of the target kept"


def test_save_flattens_a_stock_modules_own_tensors(tmp_path: Path, monkeypatch: Any) -> None:
    import ckptmirror.mirror as mirror_mod

    seen: list[tuple[Any, int]] = []
    real = mirror_mod._flatten_state
    monkeypatch.setattr(
        mirror_mod, "_flatten_state", lambda state, plain: (seen.append((state, plain)), real(state, plain))[1]
    )
    net, hooked = Net(0), _hooked(Net(0))
    with Mirror([str(tmp_path)]) as m:
        m.save(1, net).result(timeout=60)
        m.save(2, hooked).result(timeout=60)
    (own, n_own), (aliases, n_aliases) = seen
    assert n_own == len(own["model"]) and own["model"]["body.0.weight"] is net.body[0].weight
    assert n_aliases == 0 and aliases["model"]["body.0.weight"] is not hooked.body[0].weight


def test_a_child_or_a_library_replacing_state_dict_is_not_stock(monkeypatch: Any) -> None:
    class Half(nn.Linear):
        def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # a child's own state_dict()
            return super().state_dict(*args, **kwargs)

    assert module_state(nn.Sequential(Half(2, 2)))[1] == 0
    child = nn.Linear(2, 2)
    child.state_dict = child.state_dict  # type: ignore[method-assign]  # an instance patch on a child
    assert module_state(nn.Sequential(child))[1] == 0
    assert module_state(nn.Sequential(nn.Linear(2, 2)))[1] == 2
    real = nn.Module.state_dict

    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:  # a library's wrapper
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "state_dict", wrapper)
    assert module_state(nn.Sequential(nn.Linear(2, 2)))[1] == 0


class Counter(nn.Module):
    """A module with extra state (not a parameter or buffer), as a tensor or as a dict."""

    def __init__(self, as_tensor: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.count = 0
        self.as_tensor = as_tensor

    def get_extra_state(self) -> Any:
        return torch.tensor([float(self.count)]) if self.as_tensor else {"count": self.count}

    def set_extra_state(self, state: Any) -> None:
        self.count = int(state.item()) if self.as_tensor else state["count"]


@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor", "dict"])
def test_extra_state_is_saved_and_restored_through_set_extra_state(tmp_path: Path, as_tensor: bool) -> None:
    # The tensor case was lost: restore filled the tensor get_extra_state() had just made, saw
    # every entry "filled in place", and skipped load_state_dict(), so set_extra_state() never ran.
    src = Counter(as_tensor)
    src.count = 7
    assert module_state(src)[1] == 0, "extra state: not the module's own tensors"
    with Mirror([str(tmp_path)]) as m:
        m.save(1, src).result(timeout=60)
        dst = Counter(as_tensor)
        res = m.restore(dst)
    assert res is not None and res.step == 1
    assert dst.count == 7
    assert torch.equal(dst.lin.weight, src.lin.weight)
