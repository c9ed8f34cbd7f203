"""Child of test_dcp_slow_replica.py, under ``torchrun --nproc-per-node 2``: DCP saves where one
rank's uploads to the shared replica hang.

Replicas: ``ROOT/local-<rank>`` and ``ROOT/shared``; on rank 0 the shared one is a FaultyReplica
whose object puts of step 2 wait up to 20 s. Both ranks ``dcp.save`` steps 1, 2 and 3
(``slow_replica_timeout_s=3``) and write each save's seconds and the writer's outcome per
replica to ``ROOT/result-<rank>.json``.

``cross`` as a second argument: rank 0's uploads to the shared replica and rank 1's writes to
its local replica are each 2 s slow on step 1 (each rank has one slow position, a different
one), and each rank saves step 1 only.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ckptmirror.dcp import MirrorSavePlanner, MirrorStorageWriter
from ckptmirror.replicas import FaultyReplica, LocalReplica

warnings.filterwarnings("ignore")


def main() -> None:
    root = sys.argv[1]
    cross = sys.argv[2:] == ["cross"]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    shared: object = os.path.join(root, "shared")
    local: object = os.path.join(root, f"local-{rank}")
    released = threading.Event()
    if cross:

        def slow(phase: str, key: str) -> None:
            if phase == "put" and key.startswith("step-000000000001/"):
                time.sleep(2)

        if rank == 0:
            shared = FaultyReplica(LocalReplica(str(shared)), on_phase=slow)
        else:
            local = FaultyReplica(LocalReplica(str(local)), on_phase=slow)
    elif rank == 0:

        def hang(phase: str, key: str) -> None:
            if phase == "put" and key.startswith("step-000000000002/"):
                released.wait(20)

        shared = FaultyReplica(LocalReplica(str(shared)), on_phase=hang)
    w = MirrorStorageWriter(
        [local, shared],
        object_bytes=64 << 10,
        io_threads=2,
        slow_replica_timeout_s=0.5 if cross else 3,
        commit_timeout_s=60,
    )
    out: dict[str, object] = {"rank": rank}
    for step in (1,) if cross else (1, 2, 3):
        g = torch.Generator().manual_seed(100 * step + rank)
        state = {"model": {f"r{rank}.t{i}": torch.randn(16384, generator=g) for i in range(8)}}
        t0 = time.monotonic()
        dcp.save(state, storage_writer=w, checkpoint_id=f"run/step-{step}", planner=MirrorSavePlanner())
        out[f"seconds{step}"] = time.monotonic() - t0
        out[f"outcome{step}"] = {("shared" if "shared" in u else "local"): v for u, v in w.last_outcome.items()}
    released.set()
    w.close()
    with open(os.path.join(root, f"result-{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
