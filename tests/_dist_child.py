"""A torchrun worker for tests/test_distributed.py: per-rank state, placeholders, kills.

Usage: torchrun --standalone --nproc-per-node N tests/_dist_child.py MODE ROOT [URL ...]
Each rank's state is a deterministic function of (rank, step), so the test can recompute it.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
import torch.distributed as dist

import ckptmirror


def rank_state(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {
        "w": torch.randn(300, 100, generator=g),
        "rank": rank,
        "step": step,
        "rng": torch.get_rng_state()[:16].clone().fill_(rank),
    }


def _faulty(urls: list, rank: int, on_phase) -> list:
    """This rank's replicas, each wrapped to call ``on_phase`` (and read through the wrapper)."""
    from ckptmirror.replicas import FaultyReplica, LocalReplica

    replicas = []
    for u in urls:
        r = FaultyReplica(LocalReplica(u.replace("{rank}", str(rank))), on_phase=on_phase)
        r.read_priority = 10**6  # read through the wrapper, not mapped in place
        replicas.append(r)
    return replicas


def main() -> int:
    mode, root, urls = sys.argv[1], sys.argv[2], sys.argv[3:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {"rank": rank}
    replicas: list = list(urls)
    # restore-denied: rank 1 cannot open step 2's objects on any replica (EACCES: intact bytes,
    # a permission an operator can fix); no rank may rewind to step 1 for that, every rank raises.
    # restore-damaged-denied: the same, and rank 0 finds step 2 corrupt everywhere: no rank can
    # restore step 2 whatever rank 1's outage, so both restore step 1.
    if mode in ("restore-denied", "restore-damaged-denied") and (rank == 1 or mode == "restore-damaged-denied"):
        import errno

        from ckptmirror.errors import CorruptObjectError, ReplicaPermissionError

        def denied(phase: str, key: str) -> None:
            if phase == "get" and key.startswith("step-000000000002/") and key.endswith(".bin"):
                if rank == 0:
                    raise CorruptObjectError("checksum mismatch (injected)", key=key)
                raise ReplicaPermissionError("open failed", key=key) from OSError(errno.EACCES, "Permission denied")

        replicas = _faulty(urls, rank, denied)
    # restore-oom(-probe): rank 1 runs out of memory (ENOMEM) reading step 2's objects (or its
    # manifest): not the checkpoint's fault, so no rank may fall back to step 1; every rank raises.
    # restore-oom-bare: a plain MemoryError (no ReplicaError around it) reading the manifest.
    if mode in ("restore-oom", "restore-oom-probe", "restore-oom-bare") and rank == 1:
        import errno

        from ckptmirror.errors import ReplicaError

        suffix = ".bin" if mode == "restore-oom" else ".json"

        def no_memory(phase: str, key: str) -> None:
            if phase == "get" and key.startswith("step-000000000002/rank-") and key.endswith(suffix):
                if mode == "restore-oom-bare":
                    raise MemoryError("injected")
                raise ReplicaError("read failed", key=key) from OSError(errno.ENOMEM, "Cannot allocate memory")

        replicas = _faulty(urls, rank, no_memory)
    # save-full: rank 1 finds the (shared) replica full writing step 2; rank 0's writes succeed.
    if mode == "save-full" and rank == 1:
        import errno

        def full(phase: str, key: str) -> None:
            if phase == "put" and key.startswith("step-000000000002/"):
                raise OSError(errno.ENOSPC, "No space left on device (injected)")

        replicas = _faulty(urls, rank, full)
    m = ckptmirror.Mirror(replicas, object_bytes=32 << 10, commit_timeout_s=8, keep_last=5)
    if mode == "save":
        for step in (1, 2):
            m.save_state(step, rank_state(rank, step)).result(timeout=60)
        out["steps"] = m.steps()
    elif mode == "save-full":
        m.save_state(1, rank_state(rank, 1)).result(timeout=60)
        try:
            m.save_state(2, rank_state(rank, 2)).result(timeout=60)
            out["step2"] = "committed"
        except ckptmirror.SaveFailedError as exc:
            out["step2"] = f"failed: {exc}"
        m.close(raise_errors=False)  # waits for the background deletes
        with open(os.path.join(root, f"result-{rank}.json"), "w") as f:
            json.dump(out, f)
        dist.barrier()
        dist.destroy_process_group()
        return 0
    elif mode == "kill-mid-save":
        m.save_state(1, rank_state(rank, 1)).result(timeout=60)
        dist.barrier()
        h = m.save_state(2, rank_state(rank, 2))
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # before this rank reports its shard as durable
        try:
            h.result(timeout=60)
            out["step2"] = "committed"
        except ckptmirror.SaveFailedError as exc:
            out["step2"] = f"failed: {exc}"
        m.close(raise_errors=False)
        with open(os.path.join(root, f"result-{rank}.json"), "w") as f:
            json.dump(out, f)
        return 0
    elif mode == "restore":
        import logging

        served: list[str] = []

        class Grab(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "objects served by" in record.getMessage():
                    served.append(record.getMessage())

        logging.getLogger("ckptmirror").addHandler(Grab())
        logging.getLogger("ckptmirror").setLevel(logging.INFO)
        res = m.load_state()
        out["served"] = served
        assert res is not None
        step, state = res
        expect = rank_state(rank, step)
        out.update(step=step, equal=bool(torch.equal(state["w"], expect["w"]) and state["rank"] == rank))
    elif mode in ("restore-denied", "restore-damaged-denied", "restore-oom", "restore-oom-probe", "restore-oom-bare"):
        try:
            res = m.load_state()
            out["step"] = res[0] if res is not None else None
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out["error"] = type(exc).__name__
    m.close()
    with open(os.path.join(root, f"result-{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
