"""Child of test_resave_damaged.py, run under ``torchrun --nproc-per-node 2``.

Replicas: a node-local ``ROOT/local-<rank>`` and a ``ROOT/shared`` one that both ranks write.
Each rank's state is a function of (rank, step, generation), so the test can tell the first
save of a step from its second.

``save ROOT``: generation 1 saves steps 1 and 2. ``resume ROOT``: restore (the test damaged rank
0's copy of step 2 on every replica in between, so the ranks fall back to step 1 together), then
train on: save step 2 again and step 3, generation 2. ``restore ROOT``: a fresh job restores the
newest step and step 2, and checks them against generation 2. Each rank writes what it saw to
``ROOT/<mode>-<rank>.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import ckptmirror


def state(rank: int, step: int, gen: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * gen + 100 * step + rank)
    return {"w": torch.randn(256, 64, generator=g), "b": torch.randn(64, generator=g).to(torch.bfloat16)}


def equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def main() -> None:
    mode, root = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    urls = [os.path.join(root, f"local-{rank}"), os.path.join(root, "shared")]
    m = ckptmirror.Mirror(urls, object_bytes=16 << 10, commit_timeout_s=20)
    out: dict[str, object] = {"rank": rank}
    if mode == "save":
        for step in (1, 2):
            m.save_state(step, state(rank, step, 1)).result(timeout=60)
    elif mode == "resume":
        got = m.load_state()
        assert got is not None
        step, st = got
        out["restored"] = step
        out["restored_exact"] = equal(st, state(rank, step, 1))
        for s in (2, 3):
            try:
                h = m.save_state(s, state(rank, s, 2))
                h.result(timeout=60)
                m.wait(timeout=60)  # every replica's outcome, not only the first commit
                out[f"save{s}"] = sorted({v.state for v in h.replicas.values()})
            except Exception as exc:  # noqa: BLE001 - reported to the test
                out[f"save{s}"] = f"{type(exc).__name__}: {exc}"
    elif mode == "restore":
        got = m.load_state()
        assert got is not None
        out["newest"] = got[0]
        out["newest_exact"] = equal(got[1], state(rank, got[0], 2))
        again = m.load_state(2)
        assert again is not None
        out["step2_exact"] = equal(again[1], state(rank, 2, 2))
    m.close()
    with open(os.path.join(root, f"{mode}-{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
