"""DDP training that checkpoints to the node's disk, a ring of peer agents and (optionally) S3.

Started by ``slurm_train.sbatch``: one ``torchrun`` per node, every node running
``ckptmirror serve``. Each rank's replicas, matched by position across ranks:

1. ``<local-dir>/<job>/node<N>``: this node's disk (restore reads it first);
2. ``ckptmirror.ring_peer(agents, job, node_rank=N)``: the next node's agent,
   ``peer://<agent N+1>/<job>/node<N>``, so a node's checkpoint survives the node;
3. ``--s3 s3://bucket/prefix`` (optional): shared by every rank, survives the cluster.

``N`` is the node's index in the allocation, ``SLURM_NODEID`` (else torchrun's ``GROUP_RANK``):
the order of ``--agents``, and the ``--node-rank`` the sbatch script gives torchrun, so a
relaunched rank runs on the same node and finds its shards on that node's disk and in its
namespace on the neighbour's agent. Runs on GPUs (NCCL) or CPUs (gloo), and as a plain
``python`` process for a quick try::

    torchrun --nproc-per-node 2 examples/deploy/train_ring_peer.py --agents 127.0.0.1:7070 \\
        --job demo --local-dir /tmp/ckpt --token-file /tmp/agent-token --steps 20 --save-every 5

Rank 0 prints JSON lines: ``{"resumed_from": STEP, "sources": [...]}`` after a restore, and
``{"done": STEP, "replica_steps": {URL: [STEP, ...]}}`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import ckptmirror


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", required=True, help="every node's agent, HOST:PORT, comma-separated, in node order")
    p.add_argument("--job", required=True, help="namespace of this run on the disks and agents")
    p.add_argument("--local-dir", required=True, help="node-local checkpoint directory (NVMe)")
    p.add_argument("--s3", default="", help="optional shared replica, e.g. s3://bucket/ckpt/run1")
    p.add_argument("--token-file", default=None, help="the agents' token (else $CKPTMIRROR_PEER_TOKEN)")
    p.add_argument("--steps", type=int, default=200, help="train until this step")
    p.add_argument("--save-every", type=int, default=50, help="save every N steps")
    p.add_argument("--keep-last", type=int, default=3, help="committed steps kept per replica")
    p.add_argument("--width", type=int, default=256, help="hidden width of the toy model")
    return p


def node_index() -> int:
    """This node's index in the allocation: SLURM_NODEID, else torchrun's GROUP_RANK, else 0."""
    return int(os.environ.get("SLURM_NODEID", os.environ.get("GROUP_RANK", "0")))


def replica_urls(args: argparse.Namespace, node: int) -> list[str]:
    agents = [a.strip() for a in args.agents.split(",") if a.strip()]
    urls = [
        os.path.join(args.local_dir, args.job, f"node{node}"),
        ckptmirror.ring_peer(agents, args.job, node_rank=node),
    ]
    if args.s3:
        urls.append(args.s3)
    return urls


def batch(step: int, rank: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's data depends only on (step, rank): a resumed run sees what it would have."""
    g = torch.Generator().manual_seed(step * 1000 + rank)
    x, y = torch.randn(32, width, generator=g), torch.randn(32, 8, generator=g)
    return x.to(device), y.to(device)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0

    torch.manual_seed(0)
    model: torch.nn.Module = torch.nn.Sequential(
        torch.nn.Linear(args.width, args.width), torch.nn.GELU(), torch.nn.Linear(args.width, 8)
    ).to(device)
    if distributed:
        model = DistributedDataParallel(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # After init_process_group: the Mirror finds the group and every rank saves its part.
    # DDP state is identical on every rank, so it is stored once per replica: the node's ranks
    # share the writing of its disk and its ring namespace, the ranks of all nodes that of S3.
    mirror = ckptmirror.Mirror(
        replica_urls(args, node_index()),
        keep_last=args.keep_last,
        storage_options={"peer": {"token_file": args.token_file}} if args.token_file else None,
    )
    resumed = mirror.restore(model, optim)
    start = resumed.step + 1 if resumed else 1
    if resumed and rank == 0:
        print(json.dumps({"resumed_from": resumed.step, "sources": sorted(set(resumed.sources.values()))}), flush=True)

    for step in range(start, args.steps + 1):
        x, y = batch(step, rank, args.width, device)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step % args.save_every == 0:
            mirror.save(step, model, optim)  # returns after one copy; written in the background

    mirror.wait()  # the last save is committed (raises if it committed nowhere)
    if rank == 0:
        print(json.dumps({"done": args.steps, "replica_steps": mirror.replica_steps()}), flush=True)
    mirror.close()
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
