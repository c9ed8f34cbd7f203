#!/usr/bin/env python
"""DCP benchmark: ``FileSystemWriter``/``FileSystemReader`` against ckptmirror's DCP adapter.

Same FSDP2 state (an MLP of ``--params`` float32 parameters, sharded over ``--nproc`` ranks with
``fully_shard`` on CPU/gloo, plus its AdamW state after one step), same disk, one contender
after the other, each in its own ``torchrun`` job. Per contender, rank by rank (the table shows
the slowest rank, as the job waits for it):

* ``dcp.save``: time until it returns (durable: FileSystemWriter fsyncs its files; ckptmirror
  returns once every rank's commit record is written);
* ``dcp.async_save`` (on a separate gloo group): stall = until ``async_save`` returns, total =
  until its future resolves; the first save apart from the median of the others (steady state);
* the memcpy floor: one copy of the rank's local tensors into an existing buffer;
* ``dcp.load`` into a fresh model and optimizer (page cache warm: restores follow the saves);
* bytes on disk.

Contenders: ``fs`` (``FileSystemWriter(sync_files=True)``, reused through ``checkpoint_id``;
``cache_staged_state_dict=True`` with a GPU, as it pins memory, and ``FileSystemReader`` with
DCP's default planners) and ``mirror``
(``MirrorStorageWriter`` with one local replica, ``MirrorSavePlanner``, ``MirrorStorageReader``,
``MirrorLoadPlanner``). Usage::

    python benchmarks/bench_dcp.py --params 20e6 --repeats 3 [--dir /tmp/x] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

CONTENDERS = ["fs", "mirror"]


def log(msg: str) -> None:
    print(f"[bench-dcp {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ------------------------------------------------------------------------------ the worker
def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: save and load with one contender; rank 0 writes the results."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    bg = dist.new_group(backend="gloo")

    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        width = int((args.params / args.layers) ** 0.5)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(args.layers)])
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(4, width)).square().mean().backward()
        optim.step()
        return model, optim

    model, optim = build(1)
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    local = [v.to_local() if hasattr(v, "to_local") else v for v in _tensors(state)]
    nbytes = sum(t.numel() * t.element_size() for t in local)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    floor = []
    for _ in range(3):
        t0 = time.perf_counter()
        off = 0
        for t in local:
            n = t.numel() * t.element_size()
            buf[off : off + n].copy_(t.reshape(-1).view(torch.uint8))
            off += n
        floor.append(time.perf_counter() - t0)

    root = args.dir
    if args.contender == "fs":
        from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

        # cache_staged_state_dict reuses DCP's staging copy, but pins it: only possible with a GPU.
        writer: Any = FileSystemWriter(
            os.path.join(root, "step-0"), sync_files=True, cache_staged_state_dict=torch.cuda.is_available()
        )
        save_planner = load_planner = None

        def reader(step: int) -> Any:
            return FileSystemReader(os.path.join(root, f"step-{step}"))
    else:
        from ckptmirror.dcp import MirrorLoadPlanner, MirrorSavePlanner, MirrorStorageReader, MirrorStorageWriter

        writer = MirrorStorageWriter([os.path.join(root, "mirror")])
        save_planner, load_planner = MirrorSavePlanner, MirrorLoadPlanner

        def reader(step: int) -> Any:
            return MirrorStorageReader([os.path.join(root, "mirror")], step=step)

    out: dict[str, Any] = {"rank": rank, "bytes_per_rank": nbytes, "floor_s": min(floor), "save_s": [], "stall_s": []}
    out["total_s"] = []
    step = 0
    for _ in range(args.repeats):
        step += 1
        dist.barrier()
        t0 = time.perf_counter()
        dcp.save(
            state,
            checkpoint_id=os.path.join(root, f"step-{step}"),
            storage_writer=writer,
            planner=save_planner() if save_planner else None,
        )
        out["save_s"].append(time.perf_counter() - t0)
    for _ in range(args.repeats):
        step += 1
        dist.barrier()
        t0 = time.perf_counter()
        fut = dcp.async_save(
            state,
            checkpoint_id=os.path.join(root, f"step-{step}"),
            storage_writer=writer,
            planner=save_planner() if save_planner else None,
            process_group=bg,
        )
        out["stall_s"].append(time.perf_counter() - t0)
        fut.result()
        out["total_s"].append(time.perf_counter() - t0)
    dist.barrier()
    model2, optim2 = build(2)
    msd2, osd2 = get_state_dict(model2, optim2)
    target = {"model": msd2, "optim": osd2}
    dist.barrier()
    t0 = time.perf_counter()
    dcp.load(target, storage_reader=reader(step), planner=load_planner() if load_planner else None)
    out["load_s"] = time.perf_counter() - t0
    set_state_dict(model2, optim2, model_state_dict=target["model"], optim_state_dict=target["optim"])
    ok = all(
        torch.equal(a.to_local() if hasattr(a, "to_local") else a, b.to_local() if hasattr(b, "to_local") else b)
        for a, b in zip(_tensors(state), _tensors(target))
    )
    out["bit_exact"] = bool(ok)
    if hasattr(writer, "close"):
        writer.close()
    with open(os.path.join(root, f"result-{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def _tensors(tree: Any) -> list[Any]:
    import torch

    out: list[Any] = []
    if isinstance(tree, dict):
        for k in sorted(tree, key=str):
            out += _tensors(tree[k])
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            out += _tensors(v)
    elif isinstance(tree, torch.Tensor):
        out.append(tree)
    return out


# ------------------------------------------------------------------------------ the driver
def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in CONTENDERS:
        d = tempfile.mkdtemp(prefix=f"bench-dcp-{name}-", dir=args.dir)
        log(f"{name}: {args.nproc} ranks, {args.params:.3g} parameters, {args.repeats} saves of each kind")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            __file__,
            "--worker",
            "--contender",
            name,
            "--dir",
            d,
            "--params",
            str(args.params),
            "--layers",
            str(args.layers),
            "--repeats",
            str(args.repeats),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode:
            raise SystemExit(f"{name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
        ranks = [json.load(open(os.path.join(d, f"result-{r}.json"))) for r in range(args.nproc)]
        on_disk = dir_bytes(d) - sum(os.path.getsize(os.path.join(d, f"result-{r}.json")) for r in range(args.nproc))

        def worst(key: str, pick: Any, ranks: list[dict[str, Any]] = ranks) -> float:
            return max(pick(r[key]) for r in ranks)

        def steady(xs: list[float]) -> float:
            return statistics.median(xs[1:]) if len(xs) > 1 else xs[0]

        results[name] = {
            "save_first_s": worst("save_s", lambda xs: xs[0]),
            "save_steady_s": worst("save_s", steady),
            "stall_first_s": worst("stall_s", lambda xs: xs[0]),
            "stall_steady_s": worst("stall_s", steady),
            "async_total_steady_s": worst("total_s", steady),
            "load_s": max(r["load_s"] for r in ranks),
            "floor_s": max(r["floor_s"] for r in ranks),
            "bytes_on_disk": on_disk,
            "state_bytes": sum(r["bytes_per_rank"] for r in ranks),
            "bit_exact": all(r["bit_exact"] for r in ranks),
        }
        shutil.rmtree(d, ignore_errors=True)
    return results


def table(results: dict[str, Any]) -> str:
    rows = [
        ("dcp.save, first (s)", "save_first_s"),
        ("dcp.save, steady (s)", "save_steady_s"),
        ("async_save stall, first (s)", "stall_first_s"),
        ("async_save stall, steady (s)", "stall_steady_s"),
        ("async_save to durable, steady (s)", "async_total_steady_s"),
        ("memcpy floor of a rank's state (s)", "floor_s"),
        ("dcp.load (s)", "load_s"),
        ("bytes on disk", "bytes_on_disk"),
        ("loaded bit-exact", "bit_exact"),
    ]
    names = list(results)
    head = "| figure | " + " | ".join({"fs": "FileSystemWriter", "mirror": "MirrorStorageWriter"}[n] for n in names)
    lines = [head + " |", "|---|" + "---:|" * len(names)]
    for label, key in rows:
        cells = []
        for n in names:
            v = results[n][key]
            cells.append(f"{v:,}" if key == "bytes_on_disk" else str(v) if isinstance(v, bool) else f"{v:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=20e6, help="model parameters (float32), default 20e6")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="saves of each kind (the first is reported apart)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    results = run(args)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
