#!/usr/bin/env python
"""The save stall at every state size and tensor count, idle and on a busy machine (issue 10).

One command runs the matrix: sizes (``--sizes``, GB) x tensor counts (``--counts``) x machine
state (idle, and loaded by one single-threaded torch process per core that this script starts
and stops itself) x contenders, each contender in its own process:

* ``floor``: the memcpy floor, copying every tensor into one existing buffer by hand, the
  fastest of two loops with prebuilt views (``Tensor.copy_`` of native-dtype views, and
  ``ctypes.memmove``); "first" copies into a fresh buffer (its pages get mapped);
* ``ckptmirror``: ``Mirror.reserve`` (timed apart) then ``Mirror.save``; stall = ``h.stall_s``;
* ``ckptmirror-noreserve``: the first save without ``reserve`` (and one steady save);
* ``dcp.async_save``: stall = until ``torch.distributed.checkpoint.async_save`` returns;
* ``torch.save``: ``torch.save`` + flush + fsync, all of it a stall.

The state is a flat dict of ``count`` tensors of mixed sizes (1x-4x, every fourth bf16) adding
up to the size: the shape of a real model's state, without the model. Each contender saves it
once ("first") and ``--repeats`` more times ("steady": the median), waits for every save to be
durable before the next, and ``os.sync()``s in between (untimed). Checkpoints go under
``--dir`` and are deleted after each contender.

``--module``: the tensors are the parameters of one ``nn.Module`` instead, and each contender
gets the state the way its users do, inside the timed stall: ``Mirror.save(step, module)`` (which
calls ``state_dict()`` itself), ``dcp.async_save({"model": module.state_dict()})``,
``torch.save({"model": module.state_dict()})``. At 10k-50k tensors torch's ``state_dict()``
alone (a ``detach()``ed alias per tensor) costs more than copying a 0.1 GB state.

Prints a Markdown table of seconds and one of ratios (stall / memcpy floor, steady), and with
``--chart PATH`` draws stall against tensor count (matplotlib). ``--quick`` runs small sizes.

    python benchmarks/bench_stall.py --quick                    # ~5 min on 2 cores
    python benchmarks/bench_stall.py --json out.json --chart docs/stall_vs_tensors.png  # full
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _load import start_load

CONTENDERS = ["floor", "ckptmirror", "ckptmirror-noreserve", "dcp.async_save", "torch.save"]


def log(msg: str) -> None:
    print(f"[bench_stall {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpu_busy() -> tuple[float, float]:
    """(wall, busy CPU seconds of the whole machine) from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return time.monotonic(), (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------- the state
def build_state(total_bytes: int, count: int) -> dict[str, Any]:
    """``count`` tensors of 1x-4x mixed sizes (every fourth bf16) adding up to ``total_bytes``."""
    import torch

    weights = [1.0 + 3.0 * ((i * 2654435761) % 97) / 96.0 for i in range(count)]
    scale = total_bytes / sum(weights)
    state = {}
    for i, w in enumerate(weights):
        dtype = torch.bfloat16 if i % 4 == 3 else torch.float32
        n = max(1, int(w * scale) // (2 if dtype == torch.bfloat16 else 4))
        # fill_ writes (maps) every page, like a trained tensor; the values do not matter here
        state[f"layer{i // 4}.p{i % 4}"] = torch.empty(n, dtype=dtype).fill_(i % 7 + 0.5)
    return state


def nbytes_of(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class Holder:
    """A Stateful over the flat dict, so ckptmirror goes through ``Mirror.save(step, model)``."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, sd: dict[str, Any]) -> None:  # pragma: no cover - not restored here
        raise NotImplementedError


# ------------------------------------------------------------------------------ contenders
def run_floor(state: dict[str, Any], repeats: int) -> dict[str, Any]:
    """The memcpy floor: every tensor into one buffer, by the faster of two hand-written loops."""
    import torch

    tensors = list(state.values())
    offsets, off = [], 0
    for t in tensors:
        offsets.append(off)
        off += (t.numel() * t.element_size() + 15) // 16 * 16  # aligned: native-dtype views
    total = off

    def views(buf: torch.Tensor) -> list[torch.Tensor]:
        return [buf[o : o + t.numel() * t.element_size()].view(t.dtype) for o, t in zip(offsets, tensors)]

    def ptrs(buf: torch.Tensor) -> list[tuple[int, int, int]]:
        base = buf.data_ptr()
        return [(base + o, t.data_ptr(), t.numel() * t.element_size()) for o, t in zip(offsets, tensors)]

    def torch_loop(dst: list[torch.Tensor]) -> None:
        for d, s in zip(dst, tensors):
            d.copy_(s)

    def memmove_loop(p: list[tuple[int, int, int]]) -> None:
        mm = ctypes.memmove
        for d, s, n in p:
            mm(d, s, n)

    out: dict[str, Any] = {}
    for name, prep, loop in (("memmove", ptrs, memmove_loop), ("torch", views, torch_loop)):
        fresh = torch.empty(total, dtype=torch.uint8)
        dst = prep(fresh)
        t0 = time.perf_counter()
        loop(dst)  # type: ignore[operator]
        first = time.perf_counter() - t0
        steady = []
        if name == "torch" and first > 3 * out["memmove"]["first"]:
            # copy_ opens an OpenMP region per tensor past 32,768 elements: on a loaded machine
            # that loop can take minutes; it is not the floor then, so do not wait for it.
            out[name] = {"first": first, "steady": [first]}
            continue
        for _ in range(repeats):
            t0 = time.perf_counter()
            loop(dst)  # type: ignore[operator]
            steady.append(time.perf_counter() - t0)
        out[name] = {"first": first, "steady": steady}
        del dst, fresh
        gc.collect()
    best = min(out, key=lambda k: statistics.median(out[k]["steady"]))
    return {
        "first": out[best]["first"],
        "steady": out[best]["steady"],
        "method": best,
        "by_method": {k: {"first": v["first"], "steady": statistics.median(v["steady"])} for k, v in out.items()},
    }


def as_module(state: dict[str, Any]) -> Any:
    """An ``nn.Module`` whose parameters are the tensors of ``state`` (the same storages)."""
    import torch

    mod = torch.nn.Module()
    for i, t in enumerate(state.values()):
        mod.register_parameter(f"p{i}", torch.nn.Parameter(t))
    return mod


def run_ckptmirror(
    state: dict[str, Any], repeats: int, workdir: str, reserve: bool, module: Any = None
) -> dict[str, Any]:
    import ckptmirror

    holder = module if module is not None else Holder(state)
    out: dict[str, Any] = {}
    with ckptmirror.Mirror([workdir], keep_last=1) as m:
        if reserve:
            t0 = time.perf_counter()
            m.reserve(holder)
            out["reserve_s"] = time.perf_counter() - t0
        allocs = m.staging_allocations
        stalls = []
        for i in range(1 + (repeats if reserve else 1)):
            os.sync()
            h = m.save(i, holder)
            h.result()
            m.wait()  # retention passes too: the next stall is measured with the writers idle
            stalls.append(h.stall_s)
        out.update(first=stalls[0], steady=stalls[1:], allocations_after_reserve=m.staging_allocations - allocs)
    return out


def run_dcp(get_state: Callable[[], Any], repeats: int, workdir: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    stalls = []
    for i in range(1 + repeats):
        os.sync()
        path = os.path.join(workdir, f"step-{i}")
        t0 = time.perf_counter()
        fut = dcp.async_save({"model": get_state()}, checkpoint_id=path)
        stalls.append(time.perf_counter() - t0)
        fut.result()
        if i:
            shutil.rmtree(os.path.join(workdir, f"step-{i - 1}"), ignore_errors=True)
    return {"first": stalls[0], "steady": stalls[1:]}


def run_torch_save(get_state: Callable[[], Any], repeats: int, workdir: str) -> dict[str, Any]:
    import torch

    stalls = []
    for i in range(1 + repeats):
        os.sync()
        path = os.path.join(workdir, f"step-{i}.pt")
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save({"model": get_state()}, f)
            f.flush()
            os.fsync(f.fileno())
        stalls.append(time.perf_counter() - t0)
        if i:
            os.unlink(os.path.join(workdir, f"step-{i - 1}.pt"))
    return {"first": stalls[0], "steady": stalls[1:]}


def run_contender(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    size = int(float(args.size) * 1e9)
    t0 = time.perf_counter()
    state = build_state(size, args.count)
    module = as_module(state) if args.module else None
    # What each contender saves, taken inside its timed stall: the module's state_dict() with --module.
    get_state: Callable[[], Any] = module.state_dict if module is not None else (lambda: state)
    build_s = time.perf_counter() - t0
    workdir = tempfile.mkdtemp(prefix=f"stall-{args.contender}-", dir=args.dir)
    busy0 = cpu_busy()
    own0 = os.times()
    try:
        if args.contender == "floor":
            res = run_floor(state, args.repeats)
        elif args.contender == "ckptmirror":
            res = run_ckptmirror(state, args.repeats, workdir, reserve=True, module=module)
        elif args.contender == "ckptmirror-noreserve":
            res = run_ckptmirror(state, args.repeats, workdir, reserve=False, module=module)
        elif args.contender == "dcp.async_save":
            res = run_dcp(get_state, args.repeats, workdir)
        elif args.contender == "torch.save":
            res = run_torch_save(get_state, args.repeats, workdir)
        else:
            raise SystemExit(f"unknown contender {args.contender}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    busy1, own1 = cpu_busy(), os.times()
    wall = busy1[0] - busy0[0]
    own = (own1.user + own1.system) - (own0.user + own0.system)
    res.update(
        contender=args.contender,
        state_bytes=nbytes_of(state),
        tensors=len(state),
        build_s=build_s,
        threads=torch.get_num_threads(),
        # CPUs' worth of work by every other process (the competing load included) meanwhile
        other_cpus=max(0.0, (busy1[1] - busy0[1]) - own) / wall if wall > 0 else None,
    )
    return res


# ---------------------------------------------------------------------------------- driver
def run_cell(args: argparse.Namespace, size: str, count: int, loaded: bool) -> list[dict[str, Any]]:
    procs: list[subprocess.Popen[bytes]] = []
    if loaded:
        procs = start_load()
        time.sleep(1.0)
    out = []
    try:
        for c in args.contenders.split(","):
            la = loadavg()
            cmd = [sys.executable, os.path.abspath(__file__), "--contender", c, "--size", size]
            cmd += ["--count", str(count), "--repeats", str(args.repeats), "--dir", args.dir]
            cmd += ["--module"] if args.module else []
            t0 = time.perf_counter()
            try:
                cp = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout_s)
                if cp.returncode != 0:
                    res: dict[str, Any] = {"contender": c, "error": f"exit {cp.returncode}"}
                else:
                    res = json.loads(cp.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                res = {"contender": c, "error": f"timeout {args.timeout_s:.0f} s"}
            res.update(
                size_gb=float(size), count=count, loaded=loaded, loadavg_before=la, wall_s=time.perf_counter() - t0
            )
            out.append(res)
            if "error" in res:
                log(f"{size} GB x {count} {'loaded' if loaded else 'idle'}: {c}: {res['error']}")
            else:
                log(
                    f"{size} GB x {count} {'loaded' if loaded else 'idle'}: {c}: first {res['first']:.3f} s, "
                    f"steady {statistics.median(res['steady']):.3f} s (load avg {la})"
                )
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    return out


def med(res: dict[str, Any] | None) -> float | None:
    if not res or "error" in res or not res.get("steady"):
        return None
    return statistics.median(res["steady"])


def fmt(x: float | None, d: int = 3) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def report(args: argparse.Namespace, results: list[dict[str, Any]], elapsed: float) -> None:
    contenders = [c for c in args.contenders.split(",") if c != "floor"]
    cells: dict[tuple[float, int, bool], dict[str, dict[str, Any]]] = {}
    for r in results:
        cells.setdefault((r["size_gb"], r["count"], r["loaded"]), {})[r["contender"]] = r
    import torch

    print("# Save stall vs the memcpy floor\n")
    print(
        f"- machine: {os.cpu_count()} cores, torch {torch.__version__} (intra-op threads {torch.get_num_threads()}); "
        f"'loaded' = {os.cpu_count()} competing single-threaded torch processes started by the benchmark"
    )
    print(
        f"- each contender in its own process; first save, then median of {args.repeats} steady saves; "
        f"the whole run took {elapsed / 60:.1f} min"
    )
    if getattr(args, "module", False):
        print("- `--module`: the tensors are one nn.Module's parameters; each stall includes getting its state_dict()")
    print("- 'other CPUs' = CPUs' worth of work by other processes during the cell's ckptmirror run (load included)\n")
    print("## Ratios: stall / memcpy floor (steady floor)\n")
    head = "| GB | tensors | machine | other CPUs | floor steady (s) | floor first (s) |"
    for c in contenders:
        head += f" {c} first | {c} steady |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for (size, count, loaded), by in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        floor = by.get("floor")
        f_steady = med(floor)
        cm = by.get("ckptmirror") or {}
        row = f"| {size:g} | {count} | {'loaded' if loaded else 'idle'} | {fmt(cm.get('other_cpus'), 2)} "
        row += f"| {fmt(f_steady)} | {fmt(floor.get('first') if floor and 'error' not in floor else None)} |"
        for c in contenders:
            r = by.get(c)
            if not r or "error" in r or not f_steady:
                err = r.get("error", "-") if r else "-"
                row += f" {err} | {err} |"
                continue
            first = r["first"] / f_steady
            steady = med(r)
            row += f" {first:.2f} | {fmt(None if steady is None else steady / f_steady, 2)} |"
        print(row)
    print("\n## Seconds\n")
    head = "| GB | tensors | machine | floor method | floor first | floor steady |"
    for c in contenders:
        head += f" {c} first | {c} steady |"
    head += " ckptmirror reserve (s) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for (size, count, loaded), by in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        floor = by.get("floor") or {}
        row = f"| {size:g} | {count} | {'loaded' if loaded else 'idle'} | {floor.get('method', '-')} "
        row += f"| {fmt(floor.get('first'))} | {fmt(med(floor))} |"
        for c in contenders:
            r = by.get(c)
            if not r or "error" in r:
                row += f" {(r or {}).get('error', '-')} | - |"
                continue
            row += f" {fmt(r['first'])} | {fmt(med(r))} |"
        row += f" {fmt((by.get('ckptmirror') or {}).get('reserve_s'))} |"
        print(row)


def chart(path: str, results: list[dict[str, Any]], contenders: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size_gb"] for r in results})
    fig, axes = plt.subplots(
        len(sizes), 2, figsize=(11, 3.6 * len(sizes)), squeeze=False, sharex=True, constrained_layout=True
    )
    styles = {
        "floor": dict(color="black", marker="o", linestyle="-"),
        "ckptmirror": dict(color="tab:blue", marker="s", linestyle="-"),
        "ckptmirror-noreserve": dict(color="tab:blue", marker="x", linestyle=":"),
        "dcp.async_save": dict(color="tab:orange", marker="^", linestyle="-"),
        "torch.save": dict(color="tab:green", marker="v", linestyle="-"),
    }
    for i, size in enumerate(sizes):
        for j, loaded in enumerate((False, True)):
            ax = axes[i][j]
            for c in contenders:
                pts = sorted(
                    (r["count"], r)
                    for r in results
                    if r["contender"] == c and r["size_gb"] == size and r["loaded"] == loaded and "error" not in r
                )
                if c == "ckptmirror-noreserve":  # its point is the first save: that is what it shows
                    xs, ys = [p for p, _ in pts], [r["first"] for _, r in pts]
                    label = "ckptmirror, first save without reserve"
                else:
                    xs, ys = [p for p, _ in pts], [med(r) for _, r in pts]
                    label = "memcpy floor" if c == "floor" else f"{c} (steady)"
                if xs:
                    ax.plot(xs, ys, label=label, **styles.get(c, {}))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{size:g} GB state, {'machine loaded (1 busy process per core)' if loaded else 'idle'}")
            ax.set_ylabel("stall (s)")
            if i == len(sizes) - 1:
                ax.set_xlabel("tensors in the state")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Save stall against tensor count (median of steady saves; lower is better)")
    fig.savefig(path, dpi=110)
    log(f"chart written to {path}")


def save_json(args: argparse.Namespace, results: list[dict[str, Any]], elapsed: float) -> None:
    with open(args.json, "w") as f:
        json.dump({"contenders": args.contenders, "repeats": args.repeats, "elapsed_s": elapsed, "results": results}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (0.1 GB): a few minutes")
    ap.add_argument("--sizes", default=None, help="GB, comma-separated (default 0.3,1.2,3; --quick 0.1)")
    ap.add_argument("--counts", default="6,1000,10000,50000")
    ap.add_argument("--machine", default="idle,loaded", help="idle, loaded or both")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--repeats", type=int, default=3, help="steady saves per contender (after the first)")
    ap.add_argument("--timeout-s", type=float, default=None, help="per contender process (default 300, --quick 120)")
    ap.add_argument("--budget-min", type=float, default=90.0, help="start no new cell after this many minutes")
    ap.add_argument("--dir", default="./bench-out", help="checkpoints go under it (deleted after each contender)")
    ap.add_argument("--json", default=None, help="write every record here")
    ap.add_argument("--chart", default=None, help="draw stall against tensor count into this PNG")
    ap.add_argument("--from-json", default=None, help="only print the tables (and chart) of an earlier --json")
    ap.add_argument("--module", action="store_true", help="the tensors as one nn.Module's parameters (see above)")
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    if args.contender:
        print(json.dumps(run_contender(args)))
        return
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        args.contenders, args.repeats = saved["contenders"], saved["repeats"]
        report(args, saved["results"], saved["elapsed_s"])
        if args.chart:
            chart(args.chart, saved["results"], args.contenders.split(","))
        return
    sizes = (args.sizes or ("0.1" if args.quick else "0.3,1.2,3")).split(",")
    if args.timeout_s is None:
        args.timeout_s = 120.0 if args.quick else 300.0
    counts = [int(c) for c in args.counts.split(",")]
    machine = args.machine.split(",")
    t0 = time.perf_counter()
    log(f"load average at start: {loadavg()}")
    results: list[dict[str, Any]] = []
    skipped = []
    for size in sizes:
        for count in counts:
            for state in machine:
                if time.perf_counter() - t0 > args.budget_min * 60:
                    skipped.append(f"{size} GB x {count} {state}")
                    continue
                results += run_cell(args, size, count, state == "loaded")
                if args.json:  # after every cell: a run stopped half-way keeps what it measured
                    save_json(args, results, time.perf_counter() - t0)
    if skipped:
        log(f"--budget-min {args.budget_min:g} reached; cells not run: {', '.join(skipped)}")
    elapsed = time.perf_counter() - t0
    log(f"load average at end: {loadavg()}; {elapsed / 60:.1f} min")
    if args.json:
        save_json(args, results, elapsed)
    report(args, results, elapsed)
    if args.chart:
        chart(args.chart, results, args.contenders.split(","))
    try:
        os.rmdir(args.dir)
    except OSError:
        pass


if __name__ == "__main__":
    main()
