"""FSDP2 (fully_shard, DTensor) under real torchrun on CPU/gloo: round trip, resharding onto
another world size (2 -> 4, 4 -> 2), consolidation into an unsharded model, and a checkpoint
that cannot be mapped failing before any tensor is touched."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _helpers import REPO, torchrun

import ckptmirror

CHILD = REPO / "tests" / "_fsdp_child.py"
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def fsdp_job(nproc: int, *args: str) -> None:
    """Run ``_fsdp_child.py`` under torchrun on ``nproc`` ranks."""
    torchrun(str(CHILD), *args, nproc=nproc, timeout=300)


def assert_same(ref_path: Path, got_path: Path) -> None:
    ref, got = safetensors_torch.load_file(str(ref_path)), safetensors_torch.load_file(str(got_path))
    assert ref.keys() == got.keys()
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in ref), "optimizer state is compared too"
    for k in ref:
        assert ref[k].dtype == got[k].dtype and ref[k].shape == got[k].shape, k
        assert torch.equal(ref[k], got[k]), f"{k} differs after restore"


# Three jobs in all (a torchrun start costs more than the work): 2 ranks save; 4 ranks restore
# that (2 -> 4), then save; 2 ranks restore the 4-rank checkpoint (4 -> 2), then the 2-rank one.
# Each restore builds its model with other weights and writes what it restored to a file of
# its own (restored-<world>.safetensors under the checkpoint's directory); the tests compare.
@pytest.fixture(scope="module")
def saved_by_2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fsdp2")
    fsdp_job(2, "save", str(root))
    return root


@pytest.fixture(scope="module")
def saved_by_4(saved_by_2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 ranks restore the 2-rank checkpoint (restored-4 under saved_by_2), then save their own."""
    root = tmp_path_factory.mktemp("fsdp4")
    fsdp_job(4, "restore", str(saved_by_2), "save", str(root))
    return root


@pytest.fixture(scope="module")
def restored_by_2(saved_by_2: Path, saved_by_4: Path) -> None:
    """2 ranks restore the 4-rank checkpoint, then the 2-rank one (restored-2 under each)."""
    fsdp_job(2, "restore", str(saved_by_4), "restore", str(saved_by_2))


def test_fsdp2_round_trip_same_world_size(saved_by_2: Path, restored_by_2: None) -> None:
    assert_same(saved_by_2 / "reference.safetensors", saved_by_2 / "restored-2.safetensors")


def test_fsdp2_reshards_2_to_4(saved_by_2: Path, saved_by_4: Path) -> None:
    assert_same(saved_by_2 / "reference.safetensors", saved_by_2 / "restored-4.safetensors")


def test_fsdp2_reshards_4_to_2(saved_by_4: Path, restored_by_2: None) -> None:
    assert_same(saved_by_4 / "reference.safetensors", saved_by_4 / "restored-2.safetensors")


def test_fsdp2_checkpoint_consolidates_into_a_plain_model(saved_by_2: Path) -> None:
    sys.path.insert(0, str(CHILD.parent))
    try:
        import _fsdp_child as child
    finally:
        sys.path.pop(0)
    model = child.build(seed=5)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with ckptmirror.Mirror([str(saved_by_2 / "ckpt")]) as m:
        res = m.restore(model, optim)
    assert res is not None and res.step == 3
    ref = safetensors_torch.load_file(str(saved_by_2 / "reference.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[f"model.{k}"]), k
    names = {id(p): n for n, p in model.named_parameters()}
    assert optim.state, "no optimizer state was restored"
    for p, st in optim.state.items():
        assert torch.equal(st["exp_avg"], ref[f"optim.{names[id(p)]}.exp_avg"])


def test_fsdp2_checkpoint_that_does_not_fit_fails_before_touching_the_model(saved_by_2: Path) -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(13, 38), torch.nn.ReLU(), torch.nn.Linear(38, 11), torch.nn.ReLU(), torch.nn.Linear(11, 5)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ckptmirror.Mirror([str(saved_by_2 / "ckpt")]) as m:
        with pytest.raises(ckptmirror.StateMismatchError, match="global shape"):
            m.restore(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
