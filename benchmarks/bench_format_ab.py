#!/usr/bin/env python
"""Restore time with the manifest written as format 4 against format 5, in one process.

The same module (``--tensors`` parameters, ``--gb`` in all, every fourth one bf16) is saved to
two local replicas, once with the writer forced to format 4 (every int column a plain list, a
shape per leaf) and once as today (runs, a shape table), then restored in place from the two
alternately, page cache warm; medians. What differs between the two is only the manifest, so
this isolates what the format saves from the run-to-run noise of the machine.

    python benchmarks/bench_format_ab.py --tensors 10000 --rounds 9
    python benchmarks/bench_format_ab.py --tensors 50000 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _models import many_params as build

import ckptmirror
from ckptmirror import format as fmt
from ckptmirror.save import encode as encode_module  # ckptmirror.save is also the function


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=10_000)
    ap.add_argument("--gb", type=float, default=0.26)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    src, fresh = build(args.tensors, args.gb, 0), build(args.tensors, args.gb, 1)
    real = encode_module.serialise
    dirs: dict[int, str] = {}
    try:
        for version in (4, fmt.FORMAT_VERSION):
            dirs[version] = tempfile.mkdtemp(prefix=f"bench-format{version}-")
            if version == 4:
                encode_module.serialise = lambda m, key: m.to_json(version=4)  # type: ignore[assignment]
            with ckptmirror.Mirror([dirs[version]]) as m:
                m.save(1, src).result()
            encode_module.serialise = real
            (manifest,) = Path(dirs[version], fmt.step_dir(1)).glob("rank-00000-*.json")
            assert json.loads(manifest.read_bytes())["format_version"] == version
        mirrors = {v: ckptmirror.Mirror([d]) for v, d in dirs.items()}
        for m in mirrors.values():
            m.restore(fresh)  # warm the page cache and the code paths
        times: dict[int, list[float]] = {v: [] for v in mirrors}
        for _ in range(args.rounds):
            for v, m in mirrors.items():
                t0 = time.perf_counter()
                m.restore(fresh)
                times[v].append(time.perf_counter() - t0)
        for m in mirrors.values():
            m.close()
    finally:
        encode_module.serialise = real
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    print(f"{args.tensors} tensors, {args.gb} GB, medians of {args.rounds} alternating rounds:")
    for v, ms in med.items():
        print(f"  format {v}: {ms:.1f} ms")
    print(f"  format {fmt.FORMAT_VERSION} / format 4: {med[fmt.FORMAT_VERSION] / med[4]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
