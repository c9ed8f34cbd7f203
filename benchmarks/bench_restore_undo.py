"""What all-or-nothing restore costs: restore time against a restore that keeps nothing to undo.

Usage: python benchmarks/bench_restore_undo.py [--gb 0.5] [--tensors 1000] [--repeats 5]

Saves one state (a module holding fp32 and bf16 parameters) to a local replica, then restores
it into a fresh module, rotating three modes, and prints the medians and the ratios:

* ``library``: what ``Mirror.restore`` does (local objects verified where they lie, landed after
  every check; an undo copy only for what lands earlier);
* ``undo log``: every object lands as it verifies, after an undo copy of the bytes it replaces
  (what the library does for modules with their own ``load_state_dict`` or load hooks);
* ``no undo``: objects land as they verify and nothing is kept (the behaviour before
  all-or-nothing restore: a failed restore left a half-written model). The baseline.

The page cache is warm for all (the same files are read each time).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time

import torch
from _models import many_params

import ckptmirror
from ckptmirror.restore import fill

mirror_mod = importlib.import_module("ckptmirror.mirror")


class _NoUndo(fill.UndoLog):
    """Keeps nothing. Both ways of saving a region are replaced (host targets go through
    save_raw; an earlier version of this script replaced only save() and so compared the undo
    log with itself)."""

    def save(self, region: torch.Tensor) -> None:
        return None

    def save_raw(self, ptr: int, nbytes: int) -> None:
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=0.5)
    ap.add_argument("--tensors", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = max(2, args.tensors)
    src = many_params(n, args.gb, 0)
    real_undo, real_stock = fill.UndoLog, mirror_mod.stock_loading
    modes = {
        "library": (real_undo, real_stock),
        "undo log": (real_undo, lambda *_: False),
        "no undo": (_NoUndo, lambda *_: False),
    }
    times: dict[str, list[float]] = {k: [] for k in modes}
    with tempfile.TemporaryDirectory() as d, ckptmirror.Mirror([d]) as m:
        m.save(1, src).result()
        fresh = many_params(n, args.gb, 1)
        try:
            for _ in range(args.repeats):
                for mode, (undo_cls, stock) in modes.items():
                    fill.UndoLog = undo_cls  # type: ignore[misc]
                    mirror_mod.stock_loading = stock
                    with torch.no_grad():
                        for p in fresh.parameters():
                            p.zero_()  # every mode starts from other values
                    t0 = time.perf_counter()
                    m.restore(fresh)
                    times[mode].append(time.perf_counter() - t0)
                    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), src.parameters())), mode
        finally:
            fill.UndoLog = real_undo  # type: ignore[misc]
            mirror_mod.stock_loading = real_stock
    base = statistics.median(times["no undo"])
    print(f"{args.gb} GB in {n} tensors, warm page cache, median of {args.repeats}:")
    for mode, ts in times.items():
        med = statistics.median(ts)
        print(f"  {mode:9s} {med:.3f} s  {med / base:.2f}x")


if __name__ == "__main__":
    main()
