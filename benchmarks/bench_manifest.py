#!/usr/bin/env python
"""Manifest benchmark: size, parse and validation time of rank manifests with many leaves.

Builds the rank manifest of a synthetic transformer-like state (``model.layers.L.*`` weights of
realistic shapes plus an AdamW state of ``step``/``exp_avg``/``exp_avg_sq`` per parameter, so
four leaves per parameter; 7B parameters at every leaf count, so more leaves means smaller
tensors, as in MoE models) for each leaf count, serialises it in the layout the library writes
today, in the version-4 layout (every column a plain list, a shape per leaf) and in the
version-1 layout (rows of per-leaf JSON objects, kept here so that the layouts can be compared
after the format moved on), and times what a reader does before it reads a byte of
data: :func:`ckptmirror.format.parse_rank_manifest` then
:func:`ckptmirror.restore.check.validate_manifest`, with the garbage collector as the process
has it. No tensor data is allocated: the leaves are records. Reported: the median wall time and
the least CPU time of ``--repeats`` runs (the machine is shared: CPU time moves less with the
load; compare numbers from one run).

``--cut`` measures instead what the object cut costs and saves on restore (docs/FORMAT.md,
"The cut"): a state of tensors of sizes spread from B/32 to 2B is saved with the old cut (every
B bytes of the stream) and with the version-2 cut at several thresholds (B/d for d in
``--divisors``), then restored in place into the same tensors from the local disk: objects per
step, and the median restore time.

    python benchmarks/bench_manifest.py                 # 1k, 10k, 50k leaves
    python benchmarks/bench_manifest.py --leaves 50000 --repeats 9
    python benchmarks/bench_manifest.py --cut           # ~1 minute
    python benchmarks/bench_manifest.py --fresh --leaves 10000 50000 --repeats 9   # a process per parse
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import ckptmirror
from ckptmirror import format as fmt
from ckptmirror.restore.check import contiguous_strides, validate_manifest
from ckptmirror.save import encode as encode_module  # ckptmirror.save is also the function
from ckptmirror.state.tree import flatten

#: One decoder layer of a Llama-like model, in units of the hidden size ``h``: (name, shape).
_LAYER_PARAMS = (
    ("self_attn.q_proj.weight", (1.0, 1.0)),
    ("self_attn.k_proj.weight", (0.25, 1.0)),
    ("self_attn.v_proj.weight", (0.25, 1.0)),
    ("self_attn.o_proj.weight", (1.0, 1.0)),
    ("mlp.gate_proj.weight", (3.5, 1.0)),
    ("mlp.up_proj.weight", (3.5, 1.0)),
    ("mlp.down_proj.weight", (1.0, 3.5)),
    ("input_layernorm.weight", (1.0,)),
    ("post_attention_layernorm.weight", (1.0,)),
)
#: Parameters of the synthetic model at every leaf count (7B): more leaves means smaller tensors,
#: as in MoE models, so the number of objects stays what a 7B model's state has.
_MODEL_PARAMS = 7e9


def synthetic_manifest(n_leaves: int, object_bytes: int = 64 << 20, compact: bool = True) -> fmt.RankManifest:
    """A rank manifest of about ``n_leaves`` leaves (a multiple of 4) with realistic shapes.

    ``compact``: its structure as the library writes it today (``tensors`` nodes, format version
    4); else as versions 1-3 wrote it (a ``{"t": "tensor", "i": n}`` node per tensor).
    """
    n_params = max(1, n_leaves // 4)
    layers = -(-n_params // len(_LAYER_PARAMS))
    h = max(64, int((_MODEL_PARAMS / (13 * layers)) ** 0.5) // 64 * 64)  # 13 h^2 parameters per layer
    names: list[tuple[str, tuple[int, ...]]] = []
    layer = 0
    while len(names) < n_params:
        for suffix, dims in _LAYER_PARAMS:
            if len(names) < n_params:
                names.append((f"model.layers.{layer}.{suffix}", tuple(int(d * h) for d in dims)))
        layer += 1
    # Placeholders only give flatten() the tree shape; the records below carry the real shapes.
    ph = torch.empty(0)
    model = {name: ph for name, _ in names}
    optim = {
        "state": {i: {"step": ph, "exp_avg": ph, "exp_avg_sq": ph} for i in range(n_params)},
        "param_groups": [
            {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": list(range(n_params))}
        ],
    }
    state = {"model": model, "optim": optim, "extra": None}
    # compact=False: the structure as format versions 1-3 write it (one JSON object per tensor).
    flat = flatten(state) if compact else flatten(state, _fast=False)
    # flatten() orders the leaves model first, then per parameter: step, exp_avg, exp_avg_sq.
    model_shapes = [shape for _, shape in names]
    leaf_shapes = model_shapes + [s for shape in model_shapes for s in ((), shape, shape)]
    storages = []
    leaves = []
    offset = 0
    for i, shape in enumerate(leaf_shapes):
        nbytes = 4
        for d in shape:
            nbytes *= d
        storages.append(fmt.StorageRecord(offset, nbytes))
        offset += nbytes
        is_param = i < len(names)
        leaves.append(fmt.LeafRecord("tensor", i, "float32", shape, contiguous_strides(shape), 0, is_param, is_param))
    assert len(leaves) == len(flat.leaves)
    objects = []
    pos = 0
    token = "1f2e3d4c"
    while pos < offset:
        size = min(object_bytes, offset - pos)
        objects.append(fmt.ObjectRecord(fmt.object_key(42, 0, len(objects), token), size, "xxh3_64:0123456789abcdef"))
        pos += size
    return fmt.RankManifest(42, 0, 1, tuple(objects), tuple(storages), tuple(leaves), flat.structure, 1.7e9)


def to_json_v1(m: fmt.RankManifest) -> bytes:
    """The version-1 serialisation (one JSON object per leaf), as ckptmirror 0.x wrote it."""
    doc = {
        "format_version": 1,
        "kind": "ckptmirror.rank",
        "step": m.step,
        "rank": m.rank,
        "world_size": m.world_size,
        "created_unix": m.created_unix,
        "objects": [[o.key, o.size, o.checksum] for o in m.objects],
        "storages": [[s.offset, s.nbytes] for s in m.storages],
        "leaves": [
            {
                "kind": lf.kind,
                "storage": lf.storage,
                "dtype": lf.dtype,
                "shape": list(lf.shape),
                "stride": list(lf.stride),
                "offset": lf.offset,
                "requires_grad": lf.requires_grad,
                "parameter": lf.parameter,
            }
            for lf in m.leaves
        ],
        "structure": m.structure,
    }
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()


def _times(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(median wall seconds, least CPU seconds) of ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(wall), min(cpu)


def bench_parse(leaf_counts: Sequence[int], repeats: int) -> None:
    print(f"format_version written today: {fmt.FORMAT_VERSION}")
    print("| leaves | layout | bytes | parse ms (wall / cpu) | validate ms | parse+validate ms |")
    print("|---:|---|---:|---:|---:|---:|")
    key = fmt.rank_manifest_key(42, 0, "1f2e3d4c")
    for n in leaf_counts:
        m = synthetic_manifest(n)
        old = synthetic_manifest(n, compact=False)  # the structure of versions 1-3
        docs = {"v1": to_json_v1(old)}
        # Version 3: version 4's columns, the structure without tensors nodes.
        docs["v3"] = old.to_json(version=4).replace(b'{"format_version":4,', b'{"format_version":3,', 1)
        # Version 4: tensors nodes; every column a plain list, a shape per leaf.
        docs["v4"] = m.to_json(version=4)
        docs[f"v{fmt.FORMAT_VERSION}"] = m.to_json()
        for name, data in docs.items():
            parsed = fmt.parse_rank_manifest(data, key)
            assert parsed.leaves == m.leaves and parsed.storages == m.storages and parsed.objects == m.objects
            assert parsed.format_version == int(name[1:])
            cols = [
                _times(lambda d=data: fmt.parse_rank_manifest(d, key), repeats),
                _times(lambda p=parsed: validate_manifest(p, key), repeats),
                _times(lambda d=data: validate_manifest(fmt.parse_rank_manifest(d, key), key), repeats),
            ]
            cells = " | ".join(f"{w * 1e3:.1f} / {c * 1e3:.1f}" for w, c in cols)
            print(f"| {len(m.leaves)} | {name} | {len(data):,} | {cells} |")
            sys.stdout.flush()


def _one_fresh(n: int, version: int) -> None:
    """``--one``: parse + validate one manifest once, in this (fresh) process; print CPU ms as JSON."""
    data = synthetic_manifest(n).to_json(version=version)
    key = fmt.rank_manifest_key(42, 0, "1f2e3d4c")
    c0 = time.process_time()
    parsed = fmt.parse_rank_manifest(data, key)
    c1 = time.process_time()
    validate_manifest(parsed, key)
    c2 = time.process_time()
    print(json.dumps({"bytes": len(data), "parse": (c1 - c0) * 1e3, "validate": (c2 - c1) * 1e3}))


def bench_fresh(leaf_counts: Sequence[int], repeats: int) -> None:
    """Each parse in its own fresh process (as a restore meets it: once, nothing cached),
    versions 4 and 5 alternating; medians of ``repeats`` (CPU ms)."""
    import subprocess

    print(f"fresh processes, versions 4 and {fmt.FORMAT_VERSION} alternating, medians of {repeats} (CPU ms)")
    print("| leaves | layout | bytes | parse | validate | parse+validate |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in leaf_counts:
        runs: dict[int, list[dict[str, float]]] = {4: [], fmt.FORMAT_VERSION: []}
        for _ in range(repeats):
            for v in runs:
                cmd = [sys.executable, __file__, "--one", str(v), "--leaves", str(n)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[v].append(json.loads(out.strip().splitlines()[-1]))
        for v, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("parse", "validate")}
            total = statistics.median(r["parse"] + r["validate"] for r in rs)
            print(
                f"| {n} | v{v} | {int(rs[0]['bytes']):,} | {med['parse']:.1f} | {med['validate']:.1f} | {total:.1f} |"
            )
            sys.stdout.flush()


def _stream_cut(storages: Sequence[fmt.StorageRecord], object_bytes: int) -> tuple[tuple[int, int], ...]:
    """The version-1 cut: every ``object_bytes`` of the stream, whatever the tensors."""
    total = sum(s.nbytes for s in storages)
    return tuple((off, min(object_bytes, total - off)) for off in range(0, total, object_bytes))


def _cut_with_divisor(divisor: int) -> Callable[[Sequence[fmt.StorageRecord], int], tuple[tuple[int, int], ...]]:
    def cut(storages: Sequence[fmt.StorageRecord], object_bytes: int) -> tuple[tuple[int, int], ...]:
        saved = fmt.LARGE_STORAGE_DIVISOR
        fmt.LARGE_STORAGE_DIVISOR = divisor
        try:
            return fmt.cut_objects(storages, object_bytes)
        finally:
            fmt.LARGE_STORAGE_DIVISOR = saved

    return cut


class _Tensors(torch.nn.Module):
    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        for i, n in enumerate(sizes):
            self.register_buffer(f"t{i}", torch.empty(n // 4, dtype=torch.float32))


def bench_cut(object_mib: int, total_mib: int, divisors: Sequence[int], repeats: int) -> None:
    ob = object_mib << 20
    rng = random.Random(0)
    sizes: list[int] = []
    while sum(sizes) < total_mib << 20:  # log-uniform from B/32 to 2B, multiples of 4 bytes
        sizes.append(int(math.exp(rng.uniform(math.log(ob / 32), math.log(2 * ob)))) // 4 * 4)
        sizes.append(rng.randrange(4, 64 << 10, 4))  # a bias or norm after each weight
    src = _Tensors(sizes)
    for b in src.buffers():
        b.uniform_()
    dst = _Tensors(sizes)
    print(f"object_bytes B = {object_mib} MiB; {len(sizes)} tensors, {sum(sizes) / 2**20:.0f} MiB; restore in place")
    print("| cut | objects | objects inside one tensor | restore s (median) |")
    print("|---|---:|---:|---:|")
    variants = [("every B of the stream (v1)", _stream_cut)] + [
        (f"tensor boundaries, large >= B/{d}", _cut_with_divisor(d)) for d in divisors
    ]
    real_cut = encode_module.cut_objects
    for name, cut in variants:
        root = tempfile.mkdtemp(prefix="bench-cut-")
        try:
            encode_module.cut_objects = cut  # type: ignore[assignment]
            with ckptmirror.Mirror([root], object_bytes=ob) as m:
                m.save(1, src).result()
            encode_module.cut_objects = real_cut
            path = next(Path(root, fmt.step_dir(1)).glob("rank-00000-*.json"))
            man = fmt.parse_rank_manifest(path.read_bytes(), "k")
            starts = [0]
            for o in man.objects:
                starts.append(starts[-1] + o.size)
            spans = [(s.offset, s.offset + s.nbytes) for s in man.storages if s.nbytes]
            inside = sum(
                any(a <= lo and hi <= b for a, b in spans) for lo, hi in zip(starts, starts[1:])
            )  # objects a restore reads straight into their tensor
            times = []
            for _ in range(repeats):
                with ckptmirror.Mirror([root], object_bytes=ob) as m:
                    t0 = time.perf_counter()
                    m.restore(dst)
                    times.append(time.perf_counter() - t0)
            assert all(torch.equal(a, b) for a, b in zip(src.buffers(), dst.buffers()))
            print(f"| {name} | {len(man.objects)} | {inside} | {statistics.median(times):.3f} |")
            sys.stdout.flush()
        finally:
            encode_module.cut_objects = real_cut
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leaves", type=int, nargs="+", default=[1000, 10_000, 50_000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cut", action="store_true", help="measure the object cut on restore instead")
    ap.add_argument("--object-mib", type=int, default=8, help="--cut: object_bytes in MiB")
    ap.add_argument("--total-mib", type=int, default=256, help="--cut: size of the state in MiB")
    ap.add_argument("--divisors", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="--cut: thresholds B/d")
    ap.add_argument("--fresh", action="store_true", help="each parse in a fresh process, versions 4 and 5")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # --fresh's child: the format version
    args = ap.parse_args(argv)
    if args.one is not None:
        _one_fresh(args.leaves[0], args.one)
    elif args.fresh:
        bench_fresh(args.leaves, args.repeats)
    elif args.cut:
        bench_cut(args.object_mib, args.total_mib, args.divisors, min(args.repeats, 3))
    else:
        bench_parse(args.leaves, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
