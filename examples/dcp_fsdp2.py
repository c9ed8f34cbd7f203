"""FSDP2 training that checkpoints through torch.distributed.checkpoint onto ckptmirror replicas.

    torchrun --standalone --nproc-per-node 2 examples/dcp_fsdp2.py --ckpt /tmp/ckpt-dcp --steps 30
    torchrun --standalone --nproc-per-node 2 examples/dcp_fsdp2.py --ckpt /tmp/ckpt-dcp --steps 60  # resumes

Each rank writes its shards to its node's directory and to a shared one; ``dcp.async_save``
(on a separate gloo group, as DCP advises) stalls training for one memcpy. A restart loads the
newest step every rank can recover, with ``MirrorLoadPlanner`` (no pickle). Afterwards,
``ckptmirror ls /tmp/ckpt-dcp/shared`` and ``ckptmirror verify /tmp/ckpt-dcp/shared`` work as for
any ckptmirror checkpoint.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckptmirror.dcp import (
    MirrorLoadPlanner,
    MirrorSavePlanner,
    MirrorStorageReader,
    MirrorStorageWriter,
    committed_steps,
)

warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    replicas = [os.path.join(args.ckpt, "node{node_rank}"), os.path.join(args.ckpt, "shared")]

    start = 0
    if committed_steps([os.path.join(args.ckpt, "shared")]):
        msd, osd = get_state_dict(model, optim)
        state = {"model": msd, "optim": osd, "train": {"step": 0}}
        reader = MirrorStorageReader(replicas)
        dcp.load(state, storage_reader=reader, planner=MirrorLoadPlanner())
        set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = state["train"]["step"] + 1
        if rank == 0:
            print(f"resumed from step {reader.step}")

    writer = MirrorStorageWriter(replicas, keep_last=3)  # one writer: the step comes from checkpoint_id
    bg = dist.new_group(backend="gloo")
    pending = None
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(step)
        loss = model(torch.randn(16, 64, generator=g)).square().mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % args.every == 0:
            if pending is not None:
                pending.result()  # one save in flight at a time
            msd, osd = get_state_dict(model, optim)
            pending = dcp.async_save(
                {"model": msd, "optim": osd, "train": {"step": step, "loss": loss.item()}},
                checkpoint_id=f"{args.ckpt}/step-{step}",
                storage_writer=writer,
                planner=MirrorSavePlanner(),
                process_group=bg,
            )
            if rank == 0:
                print(f"step {step}: loss {loss.item():.4f}, save stalled {writer.last_stage_s * 1e3:.1f} ms")
    if pending is not None:
        pending.result()
    writer.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
