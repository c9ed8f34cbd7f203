"""A torchrun worker for tests/test_fsdp.py: FSDP2 (fully_shard) on CPU with gloo.

    torchrun ... _fsdp_child.py MODE ROOT [MODE ROOT ...]

save ROOT:    train 3 deterministic steps, save step 3 to ROOT/ckpt, and write the full
              (unsharded) model and optimizer tensors to ROOT/reference.safetensors.
restore ROOT: build the model with other weights, shard it over this world size, restore,
              and write the full tensors to ROOT/restored-<world>.safetensors (rank 0).

Several (MODE, ROOT) pairs run one after the other in the same job (each with its own model,
optimizer and Mirror), as a job that resumes and then saves does: one torchrun start, and its
process group, serve them all.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptmirror


def build(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Odd sizes: shards are uneven, and 4 ranks do not divide them.
    return torch.nn.Sequential(
        torch.nn.Linear(13, 37), torch.nn.ReLU(), torch.nn.Linear(37, 11), torch.nn.ReLU(), torch.nn.Linear(11, 5)
    )


def full(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.full_tensor().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in optim.state.items():
        for k, v in st.items():
            out[f"optim.{names[id(p)]}.{k}"] = (
                (v.full_tensor() if hasattr(v, "full_tensor") else v).contiguous().clone()
            )
    return out


def main() -> int:
    args = sys.argv[1:]
    assert args and len(args) % 2 == 0, "usage: _fsdp_child.py MODE ROOT [MODE ROOT ...]"
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for mode, root in zip(args[::2], args[1::2]):
        assert mode in ("save", "restore"), mode
        run(mode, root, mesh)
        dist.barrier()
    dist.destroy_process_group()
    return 0


def run(mode: str, root: str, mesh: Any) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    model = build(seed=1 if mode == "save" else 99)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mirror = ckptmirror.Mirror([os.path.join(root, "ckpt")], object_bytes=4096, commit_timeout_s=60)
    if mode == "save":
        for step in range(1, 4):
            g = torch.Generator().manual_seed(step)
            loss = model(torch.randn(8, 13, generator=g)).square().mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
        mirror.save(3, model, optim).result(timeout=120)
        ref = full(model, optim)
        if rank == 0:
            save_file(ref, os.path.join(root, "reference.safetensors"))
    else:
        res = mirror.restore(model, optim)
        assert res is not None and res.step == 3, res
        got = full(model, optim)
        if rank == 0:
            save_file(got, os.path.join(root, f"restored-{world}.safetensors"))
    mirror.close()


if __name__ == "__main__":
    sys.exit(main())
