"""What all-or-nothing restore costs: restore time with the undo log against without it.

Usage: python benchmarks/bench_restore_undo.py [--gb 0.5] [--tensors 1000] [--repeats 5]

Saves one state (an MLP-shaped list of fp32 tensors plus bf16 ones) to a local replica, then
restores it into a fresh model, alternating "undo log on" (the library's behaviour) and "undo
log off" (the log replaced by one that keeps nothing), and prints the medians and their ratio.
The page cache is warm for both (the same files are read each time).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import ckptmirror
from ckptmirror.restore import fill


class _NoUndo(fill.UndoLog):
    """Keeps nothing: the behaviour before all-or-nothing restore. Both ways of saving a region
    are replaced (host targets go through save_raw; an earlier version of this script replaced
    only save() and so compared the undo log with itself)."""

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
    per = int(args.gb * 1e9 / 4 / n)
    state = {f"t{i}": torch.randn(per) if i % 4 else torch.randn(per).to(torch.bfloat16) for i in range(n)}

    class Holder:
        def __init__(self, sd: dict[str, torch.Tensor]) -> None:
            self.sd = sd

        def state_dict(self) -> dict[str, torch.Tensor]:
            return self.sd

        def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
            pass

    with tempfile.TemporaryDirectory() as d, ckptmirror.Mirror([d]) as m:
        m.save(1, Holder(state)).result()
        fresh = Holder({k: torch.empty_like(v) for k, v in state.items()})
        times: dict[str, list[float]] = {"undo": [], "no undo": []}
        real = fill.UndoLog
        for _ in range(args.repeats):
            for mode in ("undo", "no undo"):
                fill.UndoLog = real if mode == "undo" else _NoUndo  # type: ignore[misc]
                t0 = time.perf_counter()
                m.restore(fresh)
                times[mode].append(time.perf_counter() - t0)
        fill.UndoLog = real  # type: ignore[misc]
        assert all(torch.equal(fresh.sd[k], v) for k, v in state.items())
    a, b = statistics.median(times["undo"]), statistics.median(times["no undo"])
    print(
        f"{args.gb} GB in {n} tensors, median of {args.repeats}: undo {a:.3f} s, no undo {b:.3f} s, ratio {a / b:.2f}x"
    )


if __name__ == "__main__":
    main()
