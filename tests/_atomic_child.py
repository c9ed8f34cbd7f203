"""A torchrun worker for tests/test_restore_atomic.py: per-rank models saved, then restored.

Usage: torchrun --standalone --nproc-per-node 2 tests/_atomic_child.py MODE ROOT
MODE ``save`` saves steps 1 and 2 (values derived from rank and step) to ``ROOT/rank{rank}``;
MODE ``restore`` builds a model with other values, restores, and writes what happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

import ckptmirror


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    optim.step()
    return model, optim


def digest(model: torch.nn.Module, optim: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for t in list(model.state_dict().values()) + [
        v for s in optim.state_dict()["state"].values() for v in s.values() if isinstance(v, torch.Tensor)
    ]:
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    mode, root = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict[str, object] = {"rank": rank}
    m = ckptmirror.Mirror([os.path.join(root, f"rank{rank}")], object_bytes=4 << 10, commit_timeout_s=30)
    if mode == "save":
        for step in (1, 2):
            model, optim = build(100 * rank + step)
            m.save(step, model, optim).result(timeout=60)
            out[f"digest{step}"] = digest(model, optim)
    else:
        model, optim = build(999 + rank)
        out["before"] = digest(model, optim)
        try:
            res = m.restore(model, optim)
            out["step"] = res.step if res is not None else None
        except ckptmirror.CkptMirrorError as exc:
            out["error"] = type(exc).__name__
        out["after"] = digest(model, optim)
    m.close()
    with open(os.path.join(root, f"{mode}-{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
