#!/usr/bin/env python
"""Time to durable of a local-only save against a raw write+fsync of the same bytes (issue 10).

Per ``--gb`` size: a flat state of float32 tensors (``--tensors``, equal sizes) is saved by a
``Mirror`` on one local directory with ``incremental: False`` (every save writes every byte: an
incremental save of an unchanged state writes nothing, which is not what this measures), and
the same bytes, held in one existing buffer, are written raw to one new file + ``fsync``. The
two alternate round by round (``--rounds``, first round apart as warm-up), each after an
untimed ``os.sync()``, so that both see the same disk. Time to durable = from ``save()`` to
``SaveHandle.result()`` returning (the step's commit record is durable on the replica);
the ratio per round is ckptmirror / raw, and the report gives the median ratio.

``--trace`` adds a breakdown of where a save's time goes: every ``os.write``/``os.pwrite``,
``os.fsync``, ``fsync_dir``, rename/link and ``posix_fadvise`` on the save's threads, as
intervals from ``save()``, summed per kind, and the time the last object became durable,
the commit record started and ended.

    python benchmarks/bench_durable.py --gb 0.3,1.2 --rounds 5
    python benchmarks/bench_durable.py --gb 0.3 --rounds 3 --trace
    python benchmarks/bench_durable.py --gb 0.3 --drop-cache   # storage option drop_cache=True
    python benchmarks/bench_durable.py --gb 3 --direct-io      # + the same save with direct_io=True
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from typing import Any

import torch

GB = 1e9


def log(msg: str) -> None:
    print(f"[bench_durable {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_state(nbytes: int, count: int) -> dict[str, torch.Tensor]:
    per = max(1, nbytes // 4 // count)
    g = torch.Generator().manual_seed(0)
    return {f"t{i:05d}": torch.rand(per, generator=g) for i in range(count)}


class _Holder:
    """A ``Stateful`` over a flat dict of tensors."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in sd.items():
            self.state[k].copy_(v)


class Tracer:
    """Wraps a few ``os`` calls to record (kind, thread, start, end) while active."""

    KINDS = ("write", "pwrite", "fsync", "replace", "link", "posix_fadvise")

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float, float, int]] = []
        self.t0 = 0.0
        self._orig: dict[str, Any] = {}
        self._lock = threading.Lock()

    def install(self) -> None:
        from ckptmirror.replicas import local

        for name in self.KINDS:
            if not hasattr(os, name):
                continue
            orig = getattr(os, name)
            self._orig[name] = orig
            setattr(os, name, self._wrap(name, orig))
        self._orig_fsync_dir = local.fsync_dir

        def fsync_dir(path: str) -> None:
            s = time.perf_counter()
            try:
                self._orig_fsync_dir(path)
            finally:
                self._add("fsync_dir", s, time.perf_counter(), 0)

        local.fsync_dir = fsync_dir

    def _wrap(self, name: str, orig: Any) -> Any:
        def f(*a: Any, **k: Any) -> Any:
            s = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                n = len(a[1]) if name in ("write", "pwrite") and len(a) > 1 else 0
                self._add(name, s, time.perf_counter(), n)

        return f

    def _add(self, kind: str, s: float, e: float, n: int) -> None:
        if self.t0 and threading.current_thread() is not threading.main_thread():
            with self._lock:
                self.events.append((kind, threading.current_thread().name, s - self.t0, e - self.t0, n))

    def start(self) -> None:
        self.events = []
        self.t0 = time.perf_counter()

    def stop(self) -> list[tuple[str, str, float, float, int]]:
        self.t0 = 0.0
        return self.events


def raw_write(buf: torch.Tensor, path: str) -> float:
    view = memoryview(buf.numpy()).cast("B")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done : done + (64 << 20)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def summarize(events: list[tuple[str, str, float, float, int]], total: float) -> str:
    by: dict[str, list[float]] = {}
    for kind, _th, s, e, _n in events:
        by.setdefault(kind, []).append(e - s)
    parts = [f"{k}: n={len(v)} sum={sum(v):.3f}s max={max(v):.3f}s" for k, v in sorted(by.items())]
    fs = [(s, e) for k, _t, s, e, _n in events if k == "fsync"]
    wr = [(s, e) for k, _t, s, e, _n in events if k in ("write", "pwrite")]
    first_w = min((s for s, _ in wr), default=float("nan"))
    last_w = max((e for _, e in wr), default=float("nan"))
    last_f = max((e for _, e in fs), default=float("nan"))
    threads = sorted({t for _k, t, *_ in events})
    return (
        f"    total {total:.3f}s; first write at {first_w:.3f}s, last write ends {last_w:.3f}s, "
        f"last fsync ends {last_f:.3f}s; threads: {', '.join(threads)}\n    " + "\n    ".join(parts)
    )


def run_size(gb: float, args: argparse.Namespace, tracer: Tracer | None) -> dict[str, Any]:
    import ckptmirror

    nbytes = int(gb * GB)
    state = build_state(nbytes, args.tensors)
    real = sum(t.numel() * 4 for t in state.values())
    arena = torch.empty(real, dtype=torch.uint8)
    off = 0
    for t in state.values():  # the same bytes, in one existing buffer
        n = t.numel() * 4
        arena[off : off + n].copy_(t.view(torch.uint8))
        off += n
    workdir = os.path.join(args.dir, f"durable-{gb}")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    opts: dict[str, Any] = {"incremental": False}
    if args.drop_cache:
        opts["drop_cache"] = True
    m = ckptmirror.Mirror([os.path.join(workdir, "ckpt")], keep_last=None, storage_options={"file": opts})
    # --direct-io: a third contender, the same save with the direct_io option, in the same rounds
    mirrors = {"cm": m}
    if args.direct_io:
        mirrors["cmd"] = ckptmirror.Mirror(
            [os.path.join(workdir, "ckpt-direct")],
            keep_last=None,
            storage_options={"file": {**opts, "direct_io": True}},
        )
    rows = []
    try:
        holder = _Holder(state)
        target = _Holder({k: torch.zeros_like(v) for k, v in state.items()}) if args.restore else holder
        for mm in mirrors.values():
            mm.reserve(holder)
        who_all = ["raw", *mirrors]
        for r in range(args.rounds + 1):
            rec: dict[str, Any] = {}
            order = who_all[r % len(who_all) :] + who_all[: r % len(who_all)]  # each goes first in turn
            for who in order:
                os.sync()
                if who == "raw":
                    path = os.path.join(workdir, f"raw-{r}.bin")
                    rec["raw"] = raw_write(arena, path)
                    os.unlink(path)
                else:
                    mm = mirrors[who]
                    if tracer is not None and who == "cm":
                        tracer.start()
                    t0 = time.perf_counter()
                    h = mm.save(r, holder)
                    rec[f"stall_{who}"] = time.perf_counter() - t0
                    h.result()
                    rec[who] = time.perf_counter() - t0
                    if tracer is not None and who == "cm":
                        rec["trace"] = summarize(tracer.stop(), rec["cm"])
                    if args.restore:  # right after the save, as a job restarted at once would
                        t1 = time.perf_counter()
                        mm.restore(target, step=r)
                        rec[f"restore_{who}"] = time.perf_counter() - t1
                    mm.delete(r, force=True)  # untimed: keep the disk from filling
            rec["ratio"] = rec["cm"] / rec["raw"]
            if "cmd" in rec:
                rec["ratio_direct"] = rec["cmd"] / rec["raw"]
            log(
                f"{gb} GB round {r}{' (warm-up)' if r == 0 else ''}: ckptmirror {rec['cm']:.3f}s "
                f"(stall {rec['stall_cm']:.3f}s), raw {rec['raw']:.3f}s, ratio {rec['ratio']:.2f}x"
                + (f", restore {rec['restore_cm']:.3f}s" if "restore_cm" in rec else "")
                + (
                    f"; direct_io {rec['cmd']:.3f}s (stall {rec['stall_cmd']:.3f}s), ratio {rec['ratio_direct']:.2f}x"
                    + (f", restore {rec['restore_cmd']:.3f}s" if "restore_cmd" in rec else "")
                    if "cmd" in rec
                    else ""
                )
            )
            if "trace" in rec:
                print(rec["trace"], file=sys.stderr)
            rows.append(rec)
    finally:
        for mm in mirrors.values():
            mm.close()
        shutil.rmtree(workdir, ignore_errors=True)
    steady = rows[1:] or rows
    out: dict[str, Any] = {
        "gb": real / GB,
        "cm": statistics.median(x["cm"] for x in steady),
        "raw": statistics.median(x["raw"] for x in steady),
        "ratio": statistics.median(x["ratio"] for x in steady),
        "ratios": [round(x["ratio"], 2) for x in steady],
        "restore": statistics.median(x["restore_cm"] for x in steady) if args.restore else None,
    }
    if args.direct_io:
        out["direct"] = {
            "cm": statistics.median(x["cmd"] for x in steady),
            "ratio": statistics.median(x["ratio_direct"] for x in steady),
            "ratios": [round(x["ratio_direct"], 2) for x in steady],
            "restore": statistics.median(x["restore_cmd"] for x in steady) if args.restore else None,
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", default="0.3,1.2", help="comma-separated state sizes in GB (default 0.3,1.2)")
    p.add_argument("--tensors", type=int, default=48, help="tensors in the state (default 48)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per size, after one warm-up (default 5)")
    p.add_argument("--dir", default=os.path.join(os.getcwd(), "bench-out"), help="target directory")
    p.add_argument("--trace", action="store_true", help="print where each save's time goes")
    p.add_argument("--drop-cache", action="store_true", help="local replica option drop_cache=True")
    p.add_argument(
        "--direct-io", action="store_true", help="add a contender: the same save with direct_io=True (O_DIRECT)"
    )
    p.add_argument("--restore", action="store_true", help="also time a restore of each step right after its save")
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    tracer = None
    if args.trace:
        tracer = Tracer()
        tracer.install()
    out = [run_size(float(g), args, tracer) for g in args.gb.split(",")]
    print(
        "\n| state (GB) | ckptmirror time to durable (s) | raw write+fsync (s) | ratio (median of rounds) "
        "| ratios | restore right after (s) |"
    )
    print("|---:|---:|---:|---:|---|---:|")
    for o in out:
        rs = "n/a" if o["restore"] is None else f"{o['restore']:.3f}"
        print(f"| {o['gb']:.2f} | {o['cm']:.3f} | {o['raw']:.3f} | **{o['ratio']:.2f}x** | {o['ratios']} | {rs} |")
        d = o.get("direct")
        if d is not None:
            rs = "n/a" if d["restore"] is None else f"{d['restore']:.3f}"
            print(
                f"| {o['gb']:.2f}, direct_io | {d['cm']:.3f} | {o['raw']:.3f} | **{d['ratio']:.2f}x** "
                f"| {d['ratios']} | {rs} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
