#!/usr/bin/env python
"""Where one restore's time goes, stage by stage (wall clock on the calling thread).

    python benchmarks/restore_stages.py --tensors 50000 --gb 0.3 --repeats 7

Builds the module of ``bench_restore.py`` (``--tensors`` parameters, every fourth bf16;
``--gb`` counts them all at fp32 sizes, as there: ``--gb 0.3`` is a 0.26 GB state), saves it
once to a local replica and restores it ``--repeats`` times into a fresh module (after one
warm-up), page cache warm. Each stage is a function of the restore path, wrapped with a timer:
the medians per restore are printed, stages nested in others included in both
(``match_targets`` holds ``_gather`` and ``TargetCols``; ``fill_step`` holds the checks, the
match and the reads; ``load_newest`` holds ``fill_step`` and reading the manifest).
``_deferred`` runs on the pool's threads: its figure is their wall time summed per restore
(GIL waits included), not the calling thread's.
A profiling aid for one machine state, not a contender: compare stages within one run.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _models import many_params as build

import ckptmirror

T: dict[str, list[float]] = collections.defaultdict(list)


def timed(label: str, f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)
    def g(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            T[label].append(time.perf_counter() - t0)

    return g


def instrument() -> None:
    fill = importlib.import_module("ckptmirror.restore.fill")
    match = importlib.import_module("ckptmirror.restore.match")
    choose = importlib.import_module("ckptmirror.restore.choose")
    mirror = importlib.import_module("ckptmirror.mirror")
    undo = importlib.import_module("ckptmirror.restore.undo")
    try:
        reads = importlib.import_module("ckptmirror.restore.reads")
    except ImportError:  # an older tree: the reads were part of fill
        reads = fill
    for name in ("validate_manifest", "match_targets", "storage_targets", "_read_objects"):
        setattr(fill, name, timed(name, getattr(fill, name)))
    reads._deferred = timed("_deferred", reads._deferred)
    for name in ("_build_leaves", "_state_tree"):
        setattr(fill, name, timed(name, getattr(fill, name)))
    match._gather = timed("_gather", match._gather)
    init = match.TargetCols.__init__
    match.TargetCols.__init__ = timed("TargetCols", init)  # type: ignore[method-assign]
    choose.fill_step = timed("fill_step", choose.fill_step)
    mirror.load_newest = timed("load_newest", mirror.load_newest)
    mirror.restore_targets = timed("restore_targets (state_dict)", mirror.restore_targets)
    undo.Landing.land = timed("land", undo.Landing.land)  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensors", type=int, default=50000)
    ap.add_argument("--gb", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    src, fresh = build(args.tensors, args.gb, 0), build(args.tensors, args.gb, 1)
    instrument()
    with tempfile.TemporaryDirectory() as d, ckptmirror.Mirror([d]) as m:
        m.save(1, src).result()
        m.restore(fresh)  # warm-up
        T.clear()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            m.restore(fresh)
            T["TOTAL"].append(time.perf_counter() - t0)
    nbytes = sum(p.numel() * p.element_size() for p in src.parameters())
    print(f"{args.tensors} tensors, {nbytes / 1e9:.2f} GB, medians of {args.repeats} restores (ms):")
    for k, v in T.items():
        if k == "_deferred":
            print(f"  {k:30s} {sum(v) / args.repeats * 1e3:8.1f}  (pool threads' wall time, summed per restore)")
        else:
            print(f"  {k:30s} {statistics.median(v) * 1e3:8.1f}")


if __name__ == "__main__":
    main()
