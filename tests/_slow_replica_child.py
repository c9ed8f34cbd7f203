"""Child of test_slow_replica.py, run under ``torchrun --nproc-per-node 2``.

Each rank saves to its node-local disk (``ROOT/local<rank>``) and to a shared replica
(``ROOT/shared``). On rank 0 the shared replica hangs the object puts of step 2 until the file
``ROOT/open`` exists (a stalled upload on one node only). Each rank prints, one line per fact:
save 3's stall, how step 2 and step 3 ended on each replica, save 4's outcome, and whether the
shared replica alone restores step 4 exactly.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ckptmirror
from ckptmirror.format import step_dir
from ckptmirror.replicas import FaultyReplica, LocalReplica


def state(step: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {f"t{i}": torch.randn(16384, generator=g) for i in range(8)}


def until(cond: object, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > end:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


def main() -> None:
    root = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    opened = root / "open"

    def hang(phase: str, key: str) -> None:
        if rank == 0 and phase.startswith("put") and key.startswith(step_dir(2) + "/"):
            until(opened.exists, 90)

    local = str(root / f"local{rank}")
    shared = FaultyReplica(LocalReplica(str(root / "shared")), on_phase=hang)
    with ckptmirror.Mirror(
        [local, shared], object_bytes=64 << 10, slow_replica_timeout_s=0.5, commit_timeout_s=60, keep_last=None
    ) as m:
        h1 = m.save_state(1, state(1, rank))
        h1.result(timeout=60)
        h2 = m.save_state(2, state(2, rank))
        until(lambda: h2.replicas[local].state == "committed")
        t0 = time.monotonic()
        h3 = m.save_state(3, state(3, rank))
        print(f"rank {rank}: stall3 {time.monotonic() - t0:.2f}", flush=True)
        for name, h in (("2", h2), ("3", h3)):
            until(lambda h=h: all(s.state != "pending" for s in h.replicas.values()))
            st = h.replicas[shared.url]
            print(f"rank {rank}: step {name} local {h.replicas[local].state}", flush=True)
            print(f"rank {rank}: step {name} shared {st.state} {type(st.error).__name__}", flush=True)
        if rank == 0:
            opened.touch()
            until(lambda: not m.metrics()["replicas"][shared.url]["lagging"])
        dist.barrier()
        h4 = m.save_state(4, state(4, rank))
        h4.result(timeout=60)
        until(lambda: all(s.state != "pending" for s in h4.replicas.values()))
        print(f"rank {rank}: step 4 {sorted(s.state for s in h4.replicas.values())}", flush=True)
    dist.barrier()  # both mirrors closed: their give-backs done
    left = sorted(p.name for s in (2, 3) for p in (root / "shared" / step_dir(s)).rglob("*") if p.is_file())
    print(f"rank {rank}: shared leftovers of steps 2-3 {left}", flush=True)
    with ckptmirror.Mirror([str(root / "shared")], commit_timeout_s=60) as back:
        steps = back.steps()
        loaded = back.load_state()
        assert loaded is not None
        want = state(loaded[0], rank)
        exact = all(torch.equal(loaded[1][k], want[k]) for k in want)
        print(f"rank {rank}: shared steps {steps} restored {loaded[0]} exact {exact}", flush=True)
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
