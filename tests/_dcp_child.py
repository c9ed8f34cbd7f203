"""A worker for tests/test_dcp.py: FSDP2 (fully_shard) on CPU/gloo, saved and loaded through DCP.

Usage (under torchrun unless noted; ``URL ...`` is this rank's replica list, with placeholders):

save ROOT URL ...          train 4 deterministic steps; dcp.save step 2 (a reused writer, the step
                           from checkpoint_id), dcp.async_save steps 3 and 4 on a separate gloo
                           group; write the full tensors of each saved step (rank 0) to
                           ROOT/reference-<step>.safetensors and the values to ROOT/values-<step>.json
load ROOT TAG STEP URL ... build the model with other weights, sharded over this world size, and
                           dcp.load (STEP "newest" or a number) with pickle.load(s), pickle.Unpickler
                           and torch.load made to raise; write the full tensors (rank 0) to
                           ROOT/restored-TAG.safetensors and ROOT/result-TAG-<rank>.json. TAG and
                           STEP may be comma-separated lists of the same length: one load each, in
                           turn, in this job (a model of its own each; one torchrun start for all)
default-planner ROOT URL ... dcp.save with DCP's default planner and an int in the state; each
                           rank writes what dcp.save raised to ROOT/refused-<rank>.json
kill ROOT URL ...          launched by hand (not torchrun): step 1 is saved; during step 2 rank 1
                           SIGKILLs itself after its first object; rank 0 records what dcp.save did
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckptmirror.dcp import MirrorLoadPlanner, MirrorSavePlanner, MirrorStorageReader, MirrorStorageWriter

warnings.filterwarnings("ignore")  # DCP warns about a few of its own deprecations on every call


def build(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Odd sizes: shards are uneven, and 4 ranks do not divide them.
    return torch.nn.Sequential(
        torch.nn.Linear(13, 37), torch.nn.ReLU(), torch.nn.Linear(37, 11), torch.nn.ReLU(), torch.nn.Linear(11, 5)
    )


def shard(model: torch.nn.Module, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def train_step(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    loss = model(torch.randn(8, 13, generator=g)).square().mean()
    optim.zero_grad()
    loss.backward()
    optim.step()


def app_state(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    """What a trainer hands DCP: model and optimizer (fqn keys) and plain values."""
    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optim),
        "extra": {"step": step, "lr_history": [1e-2, 5e-3], "note": "ckpt", "nan": float("nan"), "t": (1, None)},
    }


def full(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP-style state, unsharded, under its flattened name."""
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, torch.Tensor):
            t = v.full_tensor() if hasattr(v, "full_tensor") else v
            out[prefix] = t.detach().contiguous().clone()

    walk("", {"model": state["model"], "optim": state["optim"]["state"]})
    return out


def values(state: dict[str, Any]) -> dict[str, Any]:
    """The non-tensor part, as JSON (NaN spelled out)."""
    extra = dict(state["extra"])
    extra["nan"] = repr(extra["nan"])
    extra["t"] = [type(extra["t"]).__name__, list(extra["t"])]
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["optim"]["param_groups"]
    ]
    return {"extra": extra, "param_groups": groups}


def block_pickle() -> None:
    """Make every way of unpickling raise: a load that tries is caught. DCP's own collectives
    keep working: c10d bound its Unpickler when it was imported, and sends plans between ranks."""

    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("pickle/torch.load called during a ckptmirror DCP load")

    pickle.load = refuse  # type: ignore[assignment]
    pickle.loads = refuse  # type: ignore[assignment]
    pickle.Unpickler = refuse  # type: ignore[assignment, misc]
    torch.load = refuse  # type: ignore[assignment]
    torch.serialization.load = refuse  # type: ignore[assignment]


def save(root: str, urls: list[str]) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    model = build(seed=1)
    shard(model, world)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    bg = dist.new_group(backend="gloo")  # DCP advises a separate group for async_save
    writer = MirrorStorageWriter(urls, object_bytes=2048, commit_timeout_s=60)
    out: dict[str, Any] = {"rank": rank, "stall_s": {}, "allocations": []}
    for step in range(1, 5):
        train_step(model, optim, step)
        state = app_state(model, optim, step)
        if step >= 2:
            ref = full(state)
            if rank == 0:
                save_file(ref, os.path.join(root, f"reference-{step}.safetensors"))
                with open(os.path.join(root, f"values-{step}.json"), "w") as f:
                    json.dump(values(state), f)
        if step == 2:
            dcp.save(state, checkpoint_id=f"{root}/step-{step}", storage_writer=writer, planner=MirrorSavePlanner())
            out["sync_outcome"] = dict(writer.last_outcome)
        elif step >= 3:
            t0 = time.perf_counter()
            fut = dcp.async_save(
                state,
                checkpoint_id=f"{root}/step-{step}",
                storage_writer=writer,
                planner=MirrorSavePlanner(),
                process_group=bg,
            )
            out["stall_s"][step] = time.perf_counter() - t0
            fut.result(timeout=120)
            out["allocations"].append(writer.staging_allocations)
            out.setdefault("copied", []).append(writer.last_copied_bytes)
            out["last_outcome"] = dict(writer.last_outcome)
    writer.close()
    with open(os.path.join(root, f"result-save-{rank}.json"), "w") as f:
        json.dump(out, f)


def load(root: str, tag: str, step: str, urls: list[str]) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    model = build(seed=99)
    shard(model, world)
    optim = torch.optim.AdamW(model.parameters(), lr=0.5)
    train_step(model, optim, 7)  # other values everywhere, and optimizer state to load into
    state = app_state(model, optim, -1)
    state["extra"] = {"step": -1, "lr_history": [], "note": "", "nan": 0.0, "t": ()}
    block_pickle()
    reader = MirrorStorageReader(urls, step=None if step == "newest" else int(step), commit_timeout_s=60)
    dcp.load(state, storage_reader=reader, planner=MirrorLoadPlanner())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optim, state["optim"])
    try:
        pickle.loads(pickle.dumps(1))
        blocked = False
    except AssertionError:
        blocked = True
    got = full({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)})
    if rank == 0:
        save_file(got, os.path.join(root, f"restored-{tag}.safetensors"))
    out = {"rank": rank, "step": reader.step, "sources": reader.sources, "values": values(state), "blocked": blocked}
    reader.close()
    with open(os.path.join(root, f"result-{tag}-{rank}.json"), "w") as f:
        json.dump(out, f)


def kill(root: str, urls: list[str]) -> int:
    from ckptmirror.replicas import FaultyReplica, LocalReplica

    rank = dist.get_rank()
    puts = {"n": 0}
    lock = threading.Lock()
    armed = threading.Event()

    def die_after_first_object(phase: str, key: str) -> None:
        if armed.is_set() and phase == "put":
            with lock:
                puts["n"] += 1
                if puts["n"] >= 2:
                    os.kill(os.getpid(), signal.SIGKILL)  # mid-save: one object written, no report

    replicas: list[Any] = list(urls)
    if rank == 1:
        replicas = [FaultyReplica(LocalReplica(u), on_phase=die_after_first_object) for u in urls]
    model = build(seed=1)
    shard(model, 2)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, optim, 1)
    dcp.save(
        app_state(model, optim, 1), storage_writer=MirrorStorageWriter(replicas, step=1), planner=MirrorSavePlanner()
    )
    train_step(model, optim, 2)
    out: dict[str, Any] = {"rank": rank}
    armed.set()
    t0 = time.monotonic()
    try:
        w = MirrorStorageWriter(replicas, step=2, object_bytes=1024, commit_timeout_s=20)
        dcp.save(app_state(model, optim, 2), storage_writer=w, planner=MirrorSavePlanner())
        out["step2"] = "committed"
    except BaseException as exc:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
        out["step2"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    out["seconds"] = time.monotonic() - t0
    with open(os.path.join(root, f"result-kill-{rank}.json"), "w") as f:
        json.dump(out, f)
    sys.stdout.flush()
    os._exit(0)  # the process group lost a rank: tearing it down could hang


def save_to_full(root: str, urls: list[str]) -> int:
    """Rank 1 finds the last replica full (ENOSPC) writing step 2; rank 0 writes its shard there."""
    import errno

    from ckptmirror.replicas import FaultyReplica, LocalReplica

    rank = dist.get_rank()

    def no_space(phase: str, key: str) -> None:
        if phase == "put" and key.startswith("step-000000000002/"):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

    replicas: list[Any] = [u.replace("{rank}", str(rank)) for u in urls]
    if rank == 1:
        replicas[-1] = FaultyReplica(LocalReplica(replicas[-1]), on_phase=no_space)
    model = build(seed=1)
    shard(model, 2)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out: dict[str, Any] = {"rank": rank}
    for step in (1, 2):
        train_step(model, optim, step)
        w = MirrorStorageWriter(replicas, step=step, object_bytes=1024, commit_timeout_s=20)
        try:
            dcp.save(app_state(model, optim, step), storage_writer=w, planner=MirrorSavePlanner())
        finally:
            w.close()  # waits for the background deletes and commit records
        out[f"step{step}"] = w.last_outcome
    with open(os.path.join(root, f"result-full-{rank}.json"), "w") as f:
        json.dump(out, f)
    return 0


def default_planner(root: str, urls: list[str]) -> None:
    """dcp.save with DCP's default planner and a plain int in the state: each rank records what
    dcp.save raised (DCP pickles each rank's exception to the coordinator and back)."""
    rank = dist.get_rank()
    model = build(seed=1)
    state = {"model": model.state_dict(), "meta": {"epoch": 3}}
    w = MirrorStorageWriter([u.replace("{rank}", str(rank)) for u in urls], step=30)
    try:
        dcp.save(state, storage_writer=w)
        got = {"raised": None, "message": ""}
    except BaseException as exc:  # CheckpointException wraps each rank's error
        got = {"raised": type(exc).__name__, "message": str(exc)}
    finally:
        w.close()
    with open(os.path.join(root, f"refused-{rank}.json"), "w") as f:
        json.dump(got, f)


def main() -> int:
    mode, root = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    if mode == "save":
        save(root, sys.argv[3:])
    elif mode == "load":
        tags, steps = sys.argv[3].split(","), sys.argv[4].split(",")
        assert len(tags) == len(steps), (tags, steps)
        for tag, step in zip(tags, steps):
            load(root, tag, step, sys.argv[5:])
            dist.barrier()
    elif mode == "kill":
        return kill(root, sys.argv[3:])
    elif mode == "full":
        save_to_full(root, sys.argv[3:])
    elif mode == "default-planner":
        default_planner(root, sys.argv[3:])
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
