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
* ``dcp.load`` into a fresh model and optimizer, ``--load-repeats`` times (median; page cache
  warm: loads follow the saves), every load checked bit-exact;
* bytes on disk.

The driver runs ``--rounds`` rounds, each one job per contender (the order alternates from round
to round, so that drift on a shared machine hits both alike), on an idle machine and/or under a
competing CPU load (``--machine idle,loaded``: one busy single-threaded torch process per core,
started by the script). Each figure is the median over the rounds, with the range.

Contenders: ``fs`` (``FileSystemWriter(sync_files=True)``, reused through ``checkpoint_id``;
``cache_staged_state_dict=True`` with a GPU, as it pins memory, and ``FileSystemReader`` with
DCP's default planners) and ``mirror``
(``MirrorStorageWriter`` with one local replica, ``MirrorSavePlanner``, ``MirrorStorageReader``,
``MirrorLoadPlanner``). Usage::

    python benchmarks/bench_dcp.py --params 20e6 --repeats 3 [--rounds 3] [--load-repeats 3]
        [--machine idle,loaded] [--dir /tmp/x] [--json out.json] [--out table.md]
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

from _load import start_load

CONTENDERS = ["fs", "mirror"]
NAMES = {"fs": "FileSystemWriter/Reader", "mirror": "MirrorStorageWriter/Reader"}


def log(msg: str) -> None:
    print(f"[bench-dcp {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpu_busy() -> tuple[float, float]:
    """(wall, busy CPU seconds of the whole machine) from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return time.monotonic(), (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


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

        kw = {"object_bytes": int(args.object_bytes)} if args.object_bytes else {}
        writer = MirrorStorageWriter([os.path.join(root, "mirror")], **kw)
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
    out["load_s"] = []
    ok = True
    for i in range(args.load_repeats):
        # A fresh model and optimizer each time, as a restarted job loads into.
        model2, optim2 = build(2 + i)
        msd2, osd2 = get_state_dict(model2, optim2)
        target = {"model": msd2, "optim": osd2}
        dist.barrier()
        t0 = time.perf_counter()
        dcp.load(target, storage_reader=reader(step), planner=load_planner() if load_planner else None)
        out["load_s"].append(time.perf_counter() - t0)
        set_state_dict(model2, optim2, model_state_dict=target["model"], optim_state_dict=target["optim"])
        ok = ok and all(
            torch.equal(a.to_local() if hasattr(a, "to_local") else a, b.to_local() if hasattr(b, "to_local") else b)
            for a, b in zip(_tensors(state), _tensors(target))
        )
        del model2, optim2, msd2, osd2, target
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
def run_job(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """One torchrun job of ``name``: every figure, as the slowest rank saw it."""
    d = tempfile.mkdtemp(prefix=f"bench-dcp-{name}-", dir=args.dir)
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
        "--load-repeats",
        str(args.load_repeats),
        "--object-bytes",
        str(args.object_bytes),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    busy0, own0 = cpu_busy(), os.times()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode:
            raise SystemExit(f"{name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
        busy1, own1 = cpu_busy(), os.times()
        ranks = [json.load(open(os.path.join(d, f"result-{r}.json"))) for r in range(args.nproc)]
        on_disk = dir_bytes(d) - sum(os.path.getsize(os.path.join(d, f"result-{r}.json")) for r in range(args.nproc))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    wall = busy1[0] - busy0[0]
    # CPU time of the job's own processes (children of this one, once they exited).
    own = (own1.children_user + own1.children_system) - (own0.children_user + own0.children_system)

    def worst(key: str, pick: Any) -> float:
        return max(pick(r[key]) for r in ranks)

    def steady(xs: list[float]) -> float:
        return statistics.median(xs[1:]) if len(xs) > 1 else xs[0]

    n_loads = len(ranks[0]["load_s"])
    return {
        "save_first_s": worst("save_s", lambda xs: xs[0]),
        "save_steady_s": worst("save_s", steady),
        "stall_first_s": worst("stall_s", lambda xs: xs[0]),
        "stall_steady_s": worst("stall_s", steady),
        "async_total_steady_s": worst("total_s", steady),
        # each load: the slowest rank; then the median over the loads
        "load_s": statistics.median(max(r["load_s"][i] for r in ranks) for i in range(n_loads)),
        "floor_s": max(r["floor_s"] for r in ranks),
        "bytes_on_disk": on_disk,
        "state_bytes": sum(r["bytes_per_rank"] for r in ranks),
        "bit_exact": all(r["bit_exact"] for r in ranks),
        "other_cpus": max(0.0, (busy1[1] - busy0[1]) - own) / wall if wall > 0 else 0.0,
        "loadavg": loadavg(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``{machine: {contender: [per-round figures]}}``."""
    results: dict[str, Any] = {}
    for machine in args.machine.split(","):
        procs: list[subprocess.Popen[bytes]] = []
        if machine == "loaded":
            procs = start_load()
            time.sleep(1.0)
        elif machine != "idle":
            raise SystemExit(f"--machine: idle or loaded, not {machine!r}")
        try:
            per: dict[str, list[dict[str, Any]]] = {c: [] for c in args.contenders.split(",")}
            for rnd in range(args.rounds):
                order = list(per) if rnd % 2 == 0 else list(reversed(per))
                for name in order:
                    res = run_job(args, name)
                    per[name].append(res)
                    log(
                        f"{machine} round {rnd + 1}/{args.rounds} {name}: save {res['save_steady_s']:.3f} s, "
                        f"stall {res['stall_steady_s']:.3f} s, durable {res['async_total_steady_s']:.3f} s, "
                        f"load {res['load_s']:.3f} s, other CPUs {res['other_cpus']:.2f}, load avg {res['loadavg']}"
                    )
            results[machine] = per
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
    return results


ROWS = [
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


def table(results: dict[str, Any]) -> str:
    """Per machine state: each figure's median over the rounds (range), and mirror / fs."""
    lines = []
    for machine, per in results.items():
        names = list(per)
        rounds = len(per[names[0]])
        lines.append(f"### {machine} ({rounds} round(s); median over rounds, [min-max])")
        lines.append("")
        head = "| figure | " + " | ".join(NAMES[n] for n in names)
        both = "fs" in per and "mirror" in per
        lines.append(head + (" | mirror / fs |" if both else " |"))
        lines.append("|---|" + "---:|" * (len(names) + both))
        for label, key in ROWS:
            cells = []
            meds = {}
            for n in names:
                xs = [r[key] for r in per[n]]
                if key == "bit_exact":
                    cells.append(str(all(xs)))
                elif key == "bytes_on_disk":
                    cells.append(f"{int(statistics.median(xs)):,}")
                else:
                    meds[n] = statistics.median(xs)
                    cells.append(f"{meds[n]:.3f} [{min(xs):.3f}-{max(xs):.3f}]")
            if both:
                cells.append(f"{meds['mirror'] / meds['fs']:.2f}" if meds.get("fs") else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        other = [r["other_cpus"] for n in names for r in per[n]]
        lines.append("")
        lines.append(
            f"Other processes' CPU use during the jobs (CPUs' worth, competing load included): "
            f"median {statistics.median(other):.2f}, max {max(other):.2f}."
        )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=20e6, help="model parameters (float32), default 20e6")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="saves of each kind (the first is reported apart)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--load-repeats", type=int, default=3, help="loads per job, each into a fresh model (median)")
    ap.add_argument("--rounds", type=int, default=1, help="jobs per contender and machine state (median)")
    ap.add_argument("--machine", default="idle", help="idle, loaded or idle,loaded (competing CPU load)")
    ap.add_argument(
        "--object-bytes", type=float, default=0, help="MirrorStorageWriter(object_bytes=...); 0: its default"
    )
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="a subset of fs,mirror")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the per-round results here")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    t0 = time.perf_counter()
    results = run(args)
    import torch

    text = (
        f"# bench_dcp.py --params {args.params:.3g} --layers {args.layers} --nproc {args.nproc} "
        f"--repeats {args.repeats} --load-repeats {args.load_repeats} --rounds {args.rounds}"
        + (f" --object-bytes {args.object_bytes:.0f}" if args.object_bytes else "")
        + "\n\n"
        f"- machine: {os.cpu_count()} cores, torch {torch.__version__}; 'loaded' = {os.cpu_count()} competing "
        f"single-threaded torch processes started by the benchmark; {time.strftime('%Y-%m-%d')}, "
        f"{(time.perf_counter() - t0) / 60:.1f} min\n\n" + table(results)
    )
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
