"""A torchrun worker for tests/test_ring_peer.py: each rank plays one node, with the replicas of
docs/distributed.md, ``[node-local dir, ckptmirror.ring_peer(agents, ns, node_rank=rank)]``.

Usage: torchrun --standalone --nproc-per-node 2 tests/_ring_child.py MODE ROOT AGENT0 AGENT1

- ``save``: per-rank state (namespace ``run1``), steps 1 and 2 (one tensor unchanged, so step 2
  references step 1's object: incremental saves), then a replicated (DDP-like) state (namespace
  ``run2``, written round-robin by both ranks).
- ``restore``: loads the per-rank state (``run1``) and says which replica served it.

Each rank writes ``ROOT/<mode>-<rank>.json``. The states are deterministic functions of (rank,
step), so the test recomputes them (:func:`rank_state`, :func:`replicated_state`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

import ckptmirror

#: Small objects: several per rank, so that both ranks write a share of the replicated state.
OBJECT_BYTES = 16 << 10


def rank_state(rank: int, step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {
        "w": torch.randn(100, 80, generator=g),
        "b": torch.arange(4096, dtype=torch.int64) * (rank + 1),  # the same at every step
        "rank": rank,
        "step": step,
    }


def replicated_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {"p": torch.randn(30000, generator=g), "q": torch.randn(9000, generator=g).to(torch.bfloat16)}


def urls(root: str, agents: list[str], ns: str, rank: int, local: str) -> list[str]:
    return [os.path.join(root, f"{local}-{rank}"), ckptmirror.ring_peer(agents, ns, node_rank=rank)]


def outcome(handle: Any) -> str:
    """ "ok", or why the save failed."""
    try:
        handle.result(timeout=60)
        return "ok"
    except ckptmirror.SaveFailedError as exc:
        return f"failed: {exc}"


def states(handle: Any) -> dict[str, list[str]]:
    return {u: [s.state, str(s.error or "")] for u, s in handle.replicas.items()}


def main() -> int:
    mode, root, agents = sys.argv[1], sys.argv[2], sys.argv[3:5]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict[str, Any] = {"rank": rank}
    opts: dict[str, Any] = {"object_bytes": OBJECT_BYTES, "commit_timeout_s": 30, "keep_last": 5}
    if mode == "save":
        m = ckptmirror.Mirror(urls(root, agents, "run1", rank, "local"), **opts)
        for step in (1, 2):
            h = m.save_state(step, rank_state(rank, step))
            out[f"step{step}"] = outcome(h)
            out[f"states{step}"] = states(h)
        m.close()
        rep = ckptmirror.Mirror(urls(root, agents, "run2", rank, "replocal"), **opts)
        h = rep.save_state(1, replicated_state(), replicated=True)
        out["replicated"] = outcome(h)
        out["replicated_states"] = states(h)
        # Step 2, the same state: every object referenced from step 1 (incremental), so each
        # replica gets a placement record per writer whose objects the rank wrote there.
        out["replicated2"] = outcome(rep.save_state(2, replicated_state(), replicated=True))
        rep.close()
    elif mode == "restore":
        served: list[str] = []

        class Grab(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "objects served by" in record.getMessage():
                    served.append(record.getMessage())

        logging.getLogger("ckptmirror").addHandler(Grab())
        logging.getLogger("ckptmirror").setLevel(logging.INFO)
        m = ckptmirror.Mirror(urls(root, agents, "run1", rank, "local"), **opts)
        res = m.load_state()
        m.close()
        assert res is not None
        step, state = res
        expect = rank_state(rank, step)
        out.update(
            step=step,
            served=served,
            equal=all(
                torch.equal(state[k].view(torch.uint8), expect[k].view(torch.uint8))
                and state[k].dtype == expect[k].dtype
                for k in ("w", "b")
            )
            and (state["rank"], state["step"]) == (rank, step),
        )
    with open(os.path.join(root, f"{mode}-{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
