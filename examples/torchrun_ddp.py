"""DDP training that checkpoints with ckptmirror and resumes after a crash.

Run on CPU with two processes::

    torchrun --nproc-per-node 2 examples/torchrun_ddp.py --ckpt /tmp/ckpt --steps 40

Replicas: a node-local directory per node (``{node_rank}`` is filled in per rank) and a shared
one standing in for S3 or a shared filesystem; ``--replicas`` overrides them (``s3://...``,
``peer://...``). The DDP model and its optimizer are identical on every rank, so ckptmirror
stores them once per replica: the shared one once in total, each rank writing a share of
the objects; each node's directory whole, written by that node's ranks.

Crash and resume: ``--crash-at-step N`` SIGKILLs rank ``--crash-rank`` right after it starts
saving step N, the first time only (a marker file remembers). Under
``torchrun --max-restarts 1`` the job restarts and resumes from the last step committed on
every rank. Losses go to ``<ckpt>/losses-rank<R>.jsonl``; the test suite compares them with an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ckptmirror

SEED = 7


def build() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4)
    )


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's data depends only on the step and the rank: a resumed run sees the same."""
    g = torch.Generator().manual_seed(SEED * 1000 + step * 16 + rank)
    return torch.randn(16, 32, generator=g), torch.randn(16, 4, generator=g)


def state_digest(model_state: dict, optim_state: dict) -> str:
    """xxh3 over every tensor's bytes, in key order."""
    from ckptmirror.checksum import Hasher

    h = Hasher()
    tensors = [model_state[k] for k in sorted(model_state)]
    tensors += [
        v
        for p in sorted(optim_state["state"])
        for _, v in sorted(optim_state["state"][p].items())
        if isinstance(v, torch.Tensor)
    ]
    for t in tensors:
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    ap.add_argument("--ckpt", required=True, help="directory for the demo replicas and loss logs")
    ap.add_argument("--replicas", help="comma-separated replica URLs (default: node-local + shared under --ckpt)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--crash-at-step", type=int, default=-1)
    ap.add_argument("--crash-rank", type=int, default=1)
    ap.add_argument("--object-bytes", type=int, default=64 << 10)
    args = ap.parse_args(argv)

    init_process_group()
    rank = dist.get_rank()
    torch.set_num_threads(1)
    urls = (
        args.replicas.split(",")
        if args.replicas
        else [os.path.join(args.ckpt, "node{node_rank}-local"), os.path.join(args.ckpt, "shared")]
    )
    model = DDP(build())
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mirror = ckptmirror.Mirror(urls, keep_last=3, object_bytes=args.object_bytes, commit_timeout_s=30)

    resumed = mirror.restore(model, optim)
    start = resumed.step + 1 if resumed else 1
    os.makedirs(args.ckpt, exist_ok=True)  # the loss log lives there even when no replica does
    log_path = os.path.join(args.ckpt, f"losses-rank{rank}.jsonl")
    with open(log_path, "a", encoding="utf-8") as log:
        if resumed:
            log.write(
                json.dumps({"resumed_from": resumed.step, "sources": sorted(set(resumed.sources.values()))}) + "\n"
            )
        for step in range(start, args.steps + 1):
            x, y = batch(step, rank)
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
                    os.kill(os.getpid(), signal.SIGKILL)  # mid-save: the background write is under way
        # A digest of the final state, so a test can compare it with a restore elsewhere.
        digest = state_digest(model.module.state_dict(), optim.state_dict())
        log.write(json.dumps({"final_digest": digest}) + "\n")
    mirror.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
