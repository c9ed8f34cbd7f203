"""The competing CPU load the benchmarks start: single-threaded torch processes multiplying
matrices (a training job's load), one per core by default."""

from __future__ import annotations

import os
import subprocess
import sys

LOAD_CODE = """
import os
parent = int(os.environ["BENCH_LOAD_PARENT"])  # read before the slow import: the parent may be gone by then
import torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
while os.getppid() == parent:  # ends with the benchmark, even one killed before it stops the load
    for _ in range(100):
        a = (a @ a).tanh_()
"""


def start_load(n: int | None = None) -> list[subprocess.Popen[bytes]]:
    """``n`` (default: one per core) load processes; the caller kills them (they also end when
    the caller's process ends, killed or not: each polls its parent)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", BENCH_LOAD_PARENT=str(os.getpid()))
    count = n if n is not None else (os.cpu_count() or 2)
    return [subprocess.Popen([sys.executable, "-c", LOAD_CODE], env=env) for _ in range(count)]
