"""FSDP2 (fully_shard) training that checkpoints with ckptmirror, crashes, and resumes.

Run on CPU with two processes::

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 examples/torchrun_fsdp2.py \\
        --ckpt /tmp/ckpt-fsdp --steps 30 --crash-at-step 20

Each rank stores only its own shards (with their global shapes and offsets); a restore onto
another number of ranks reshards them, e.g. resume the run above on four processes::

    torchrun --standalone --nproc-per-node 4 examples/torchrun_fsdp2.py --ckpt /tmp/ckpt-fsdp --steps 40

``--crash-at-step N`` SIGKILLs rank ``--crash-rank`` right after it starts saving step N, the
first time only; torchrun restarts the job, which resumes from the last step committed by
every rank. Losses go to ``<ckpt>/losses-rank<R>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptmirror

SEED = 11


def build(mesh: object) -> torch.nn.Module:
    torch.manual_seed(SEED)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 4)
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (the same on every rank here, for simplicity)."""
    g = torch.Generator().manual_seed(SEED * 1000 + step)
    return torch.randn(16, 32, generator=g), torch.randn(16, 4, generator=g)


def init_process_group() -> None:
    """``init_process_group`` with a store namespace per torchrun restart round.

    After ``--max-restarts`` restarts the workers, gloo can pick up the previous round's
    addresses from the launcher's store and fail with "connection refused"
    (pytorch/pytorch#167288). A prefix per round keeps the rounds apart.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group("gloo")
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, use_libuv=True)
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"round-{restart}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="directory for the replicas and loss logs")
    ap.add_argument("--replicas", help="comma-separated replica URLs (default: node-local + shared under --ckpt)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--crash-at-step", type=int, default=-1)
    ap.add_argument("--crash-rank", type=int, default=1)
    args = ap.parse_args(argv)

    init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = build(init_device_mesh("cpu", (world,)))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    urls = (
        args.replicas.split(",")
        if args.replicas
        else [os.path.join(args.ckpt, "node{node_rank}-local"), os.path.join(args.ckpt, "shared")]
    )
    mirror = ckptmirror.Mirror(urls, keep_last=3, object_bytes=64 << 10, commit_timeout_s=30)

    resumed = mirror.restore(model, optim)  # reshards if the world size changed
    start = resumed.step + 1 if resumed else 1
    os.makedirs(args.ckpt, exist_ok=True)  # the loss log lives there even when no replica does
    with open(os.path.join(args.ckpt, f"losses-rank{rank}.jsonl"), "a", encoding="utf-8") as log:
        if resumed:
            log.write(json.dumps({"resumed_from": resumed.step, "world_size": world}) + "\n")
        for step in range(start, args.steps + 1):
            x, y = batch(step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
            log.flush()
            if step % args.save_every == 0:
                mirror.save(step, model, optim, extra={"step": step})
                marker = os.path.join(args.ckpt, "crashed-once")
                if step == args.crash_at_step and rank == args.crash_rank and not os.path.exists(marker):
                    open(marker, "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
    mirror.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
