"""A torchrun worker for tests/test_mirror_api.py: a rank-0-only Mirror(distributed=False).

Usage: torchrun --standalone --nproc-per-node 2 tests/_private_child.py ROOT
Rank 0 alone saves and restores through a private mirror while rank 1 waits at a barrier;
with a coordinating mirror, rank 0 would wait for rank 1's vote forever.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import ckptmirror


def main() -> int:
    root = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        model = torch.nn.Linear(8, 8)
        with ckptmirror.Mirror([os.path.join(root, "ckpt")], distributed=False, commit_timeout_s=5) as m:
            m.save(1, model).result(timeout=30)
            fresh = torch.nn.Linear(8, 8)
            res = m.restore(fresh)
        out = {"step": res.step if res else None, "equal": bool(torch.equal(fresh.weight, model.weight))}
        with open(os.path.join(root, "private.json"), "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
