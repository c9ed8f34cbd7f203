#!/usr/bin/env python
"""Reproduce issue 10's save stall and show where it came from and what fixed it.

The state: ``--tensors`` fp32 tensors of ``--elements`` elements each (default 10,000 x 12,500 =
0.5 GB, the issue's case). The machine is made busy by ``--load`` competing single-threaded torch
processes (default: one per core) that this script starts and stops itself. Each variant runs
in its own process (fresh OpenMP state, its own environment) and makes ``--saves`` saves with
``Mirror.save_state`` to a local directory: the first one, then steady ones. Variants:

* ``legacy``: the staging copy as it was before the fix (uint8 byte views of every storage, one
  ``torch._foreach_copy_``), patched into the mirror: each 50 KB tensor is 50,000 uint8 elements,
  past torch's 32,768-element grain, so each copy is an OpenMP parallel region;
* ``legacy+PASSIVE`` / ``legacy+1thread``: the same with ``OMP_WAIT_POLICY=PASSIVE`` in the
  environment, or ``torch.set_num_threads(1)`` (what the library must not require);
* ``native-foreach``: idea 1, the copy through native-dtype views (12,500 fp32 elements stay
  under the grain: no parallel region, but one still opens for any tensor past 32,768 elements);
* ``fixed``: the library as it is (NumPy gathers on the calling thread, no OpenMP);
* ``... +overlap``: ``max_inflight=2`` and no wait between saves, so the previous save's
  background threads (hashing pool, writers) run during the copy: what they add.

For every save it reports the stall, the time inside the staging copy, the CPU seconds of the
caller's thread, of the other threads that are not ckptmirror's (the OpenMP team), and of
ckptmirror's threads during the copy, and the caller's involuntary context switches.

    python benchmarks/repro_stall.py                          # the issue's case, ~5-10 min loaded
    python benchmarks/repro_stall.py --tensors 2000 --saves 3 # quicker
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from _load import start_load

VARIANTS = [
    "legacy",
    "legacy+PASSIVE",
    "legacy+1thread",
    "native-foreach",
    "fixed",
    "legacy+overlap",
    "fixed+overlap",
]


def stop_load(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, by native thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def nonvoluntary_switches() -> int:
    with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
        for line in f:
            if line.startswith("nonvoluntary_ctxt_switches"):
                return int(line.split()[1])
    return 0


# ----------------------------------------------------------------------- copies being compared
def _legacy_snapshot(p: Any, arena: Any) -> Any:
    """The pre-fix staging copy: uint8 views of every storage, one torch._foreach_copy_."""
    import torch

    from ckptmirror.buffers import byte_view

    stream = arena.reserve(p.total_bytes, p.needs_pinned)
    cache = _CACHE.setdefault(id(p.copies), {})
    if "src" not in cache:
        cache["pairs"] = [(sp.offset, byte_view(sp.storage, sp.start, sp.nbytes)) for sp in p.spans if sp.nbytes]
        cache["src"] = [s for _, s in cache["pairs"]]
    if cache.get("dst_for") != stream.data_ptr():
        cache["dst"] = [stream[off : off + s.numel()] for off, s in cache["pairs"]]
        cache["dst_for"] = stream.data_ptr()
    torch._foreach_copy_(cache["dst"], cache["src"])
    return stream


def _native_snapshot(p: Any, arena: Any) -> Any:
    """Idea 1: the same single foreach call through views of the widest dtype that fits each span."""
    import torch

    from ckptmirror.buffers import byte_view

    stream = arena.reserve(p.total_bytes, p.needs_pinned)
    cache = _CACHE.setdefault(id(p.copies), {})
    if "src" not in cache:
        pairs = []
        for sp in p.spans:
            if not sp.nbytes:
                continue
            size = next(s for s in (8, 4, 2, 1) if sp.nbytes % s == 0 and sp.offset % s == 0 and sp.start % s == 0)
            dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[size]
            pairs.append((sp.offset, sp.nbytes, dtype, byte_view(sp.storage, sp.start, sp.nbytes).view(dtype)))
        cache["pairs"] = pairs
        cache["src"] = [s for *_, s in pairs]
    if cache.get("dst_for") != stream.data_ptr():
        cache["dst"] = [stream[off : off + n].view(dt) for off, n, dt, _ in cache["pairs"]]
        cache["dst_for"] = stream.data_ptr()
    torch._foreach_copy_(cache["dst"], cache["src"])
    return stream


_CACHE: dict[int, dict[str, Any]] = {}


# ------------------------------------------------------------------------------ one variant
def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import ckptmirror
    import ckptmirror.mirror as mirror_mod

    variant = args.variant
    if variant.endswith("+1thread"):
        torch.set_num_threads(1)
    base = variant.split("+")[0]
    # The library's own copy is ``stage`` (stream, and the work it leaves to the writer thread);
    # the reference variants return the stream only, and leave nothing.
    stage = mirror_mod.stage
    variants = {"legacy": _legacy_snapshot, "native-foreach": _native_snapshot}

    def copy(p: Any, arena: Any, cap: Any) -> Any:
        if base in variants:
            return variants[base](p, arena), None
        return stage(p, arena, cap)

    overlap = variant.endswith("+overlap")
    records: list[dict[str, Any]] = []
    names: dict[int, str] = {}

    def timed_copy(p: Any, arena: Any, cap: Any = None) -> Any:
        names.update({t.native_id: t.name for t in threading.enumerate() if t.native_id is not None})
        me = threading.get_native_id()
        cpu0, sw0, t0 = thread_cpu(), nonvoluntary_switches(), time.perf_counter()
        out = copy(p, arena, cap)
        dt = time.perf_counter() - t0
        cpu1, sw1 = thread_cpu(), nonvoluntary_switches()
        names.update({t.native_id: t.name for t in threading.enumerate() if t.native_id is not None})
        rec = {"copy_s": dt, "caller_cpu_s": 0.0, "omp_team_cpu_s": 0.0, "ckptmirror_cpu_s": 0.0}
        for tid, c in cpu1.items():
            d = c - cpu0.get(tid, 0.0)
            if tid == me:
                rec["caller_cpu_s"] += d
            elif names.get(tid, "").startswith("ckptmirror"):
                rec["ckptmirror_cpu_s"] += d
            else:  # threads Python did not start: torch's OpenMP team (and its other pools)
                rec["omp_team_cpu_s"] += d
        rec["caller_involuntary_switches"] = sw1 - sw0
        records.append(rec)
        return out

    mirror_mod.stage = timed_copy  # type: ignore[assignment]
    # Speculative staging (save/speculate.py) would copy steady saves on a stager thread, past
    # this hook: off, so that every save's copy is the one measured here, on the caller.
    # (by module path: ``ckptmirror.save`` is also the name of the save function)
    speculate_mod = importlib.import_module("ckptmirror.save.speculate")
    speculate_mod.SPECULATE_MIN_LEAVES = 1 << 62
    state = {f"t{i}": torch.full((args.elements,), float(i)) for i in range(args.tensors)}
    out: dict[str, Any] = {"variant": variant, "threads": torch.get_num_threads(), "saves": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        m = ckptmirror.Mirror([d], keep_last=2, max_inflight=2 if overlap else 1)
        try:
            handles = []
            t_end = time.monotonic() + args.budget_s
            for i in range(args.saves):
                h = m.save_state(i, state)
                handles.append(h)
                rec = dict(records[-1], stall_s=h.stall_s, wait_s=h.wait_s)
                out["saves"].append(rec)
                print(json.dumps({"progress": variant, "save": i, **rec}), file=sys.stderr, flush=True)
                if not overlap:
                    h.result()
                if time.monotonic() > t_end:
                    out["truncated"] = True
                    break
            for h in handles:
                h.result()
        finally:
            m.close(raise_errors=False)
    return out


# ---------------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=10_000)
    ap.add_argument("--elements", type=int, default=12_500, help="fp32 elements per tensor")
    ap.add_argument("--load", type=int, default=os.cpu_count() or 2, help="competing processes (0: idle)")
    ap.add_argument("--saves", type=int, default=4, help="saves per variant: the first, then steady ones")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--budget-s", type=float, default=150.0, help="no new save in a variant after this long")
    ap.add_argument("--dir", default=None, help="where the checkpoints go (a temporary directory under it)")
    ap.add_argument("--json", default=None, help="write the raw records here")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    results = []
    t_start = time.perf_counter()
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    procs = start_load(args.load) if args.load else []
    try:
        time.sleep(1.0 if procs else 0)
        for v in args.variants.split(","):
            env = dict(os.environ)
            if v.endswith("+PASSIVE"):
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            cmd = [sys.executable, __file__, "--variant", v, "--tensors", str(args.tensors)]
            cmd += ["--elements", str(args.elements), "--saves", str(args.saves), "--budget-s", str(args.budget_s)]
            if args.dir:
                cmd += ["--dir", args.dir]
            print(f"[repro] {v} ...", file=sys.stderr, flush=True)
            cp = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
            if cp.returncode != 0:
                results.append({"variant": v, "error": f"exit {cp.returncode}"})
                continue
            results.append(json.loads(cp.stdout.strip().splitlines()[-1]))
    finally:
        stop_load(procs)
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]

    gb = args.tensors * args.elements * 4 / 1e9
    print(
        f"# Save stall: {args.tensors} fp32 tensors x {args.elements} elements ({gb:.2f} GB), "
        f"{args.load} competing single-threaded processes, {os.cpu_count()} cores\n"
    )
    print(f"load average before {' '.join(load_before)}, after {' '.join(load_after)} (includes the competing load)\n")
    print(
        "| variant | first stall (s) | steady stall (s), median | steady copy (s) | caller CPU (s) "
        "| OpenMP team CPU (s) | ckptmirror threads CPU (s) | caller involuntary switches |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | | | | | |")
            continue
        s = r["saves"]
        steady = s[1:] or s

        def medof(k: str, steady: list[dict[str, Any]] = steady) -> float:
            return statistics.median(x[k] for x in steady)

        print(
            f"| {r['variant']}{' (budget hit)' if r.get('truncated') else ''} | {s[0]['stall_s']:.3f} "
            f"| {medof('stall_s'):.3f} | {medof('copy_s'):.3f} | {medof('caller_cpu_s'):.2f} "
            f"| {medof('omp_team_cpu_s'):.2f} | {medof('ckptmirror_cpu_s'):.2f} "
            f"| {int(medof('caller_involuntary_switches'))} |"
        )
    print(f"\n(total {time.perf_counter() - t_start:.0f} s; CPU columns are per steady save, during the copy only)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
