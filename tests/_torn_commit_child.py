"""Child of test_torn_commit.py, run under ``torchrun --nproc-per-node 2``: node-local replicas
(``ROOT/node<rank>``), and a commit record that reaches one node only.

``save ROOT``: both ranks save step 0, then step 1; rank 1 is SIGKILLed as it is about to write
its copy of step 1's commit record (rank 0's copy is written first). ``resume ROOT``: restore
into fresh tensors, print the step and whether the values are step N's, then save the next two
steps and print their outcome.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import ckptmirror
from ckptmirror.replicas import FaultyReplica, LocalReplica


def state(step: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g).to(torch.bfloat16)}


def main() -> None:
    mode, root = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    path = os.path.join(root, f"node{rank}")
    os.makedirs(path, exist_ok=True)
    if mode == "save":

        def hook(phase: str, key: str) -> None:
            if rank == 1 and phase == "commit" and "step-000000000001" in key:
                time.sleep(2)  # rank 0 writes its copy first
                os.kill(os.getpid(), signal.SIGKILL)

        m = ckptmirror.Mirror([FaultyReplica(LocalReplica(path), on_phase=hook)], commit_timeout_s=30)
        m.save_state(0, state(0, rank)).result(timeout=60)
        m.save_state(1, state(1, rank)).result(timeout=60)
        time.sleep(5)
        m.close()
        return
    m = ckptmirror.Mirror([path], commit_timeout_s=30)
    loaded = m.load_state()
    assert loaded is not None
    step, tree = loaded
    want = state(step, rank)
    exact = all(torch.equal(tree[k], want[k]) for k in want)
    print(f"rank {rank}: restored {step} exact {exact}", flush=True)
    for s in (step + 1, step + 2):
        try:
            m.save_state(s, state(s, rank)).result(timeout=60)
            print(f"rank {rank}: save {s} committed", flush=True)
        except Exception as exc:  # printed for the test to assert on
            print(f"rank {rank}: save {s} failed {type(exc).__name__}", flush=True)
    m.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
