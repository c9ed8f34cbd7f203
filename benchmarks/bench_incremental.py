#!/usr/bin/env python
"""Incremental saves: bytes written and time to durable for a mostly frozen model.

The state: a transformer-ish stack (``--blocks`` blocks of LayerNorm + qkv/out projections +
a 4x MLP, plain ``nn.Linear`` layers, over a token embedding) whose base is frozen
(``requires_grad=False``, no optimizer state) and a trainable head (LayerNorm + two Linear
layers) sized to ``--head-share`` of the parameters (default 5%), with AdamW over the head only.
``--steps`` training steps run between saves, so the head's weights and AdamW state change
every time and the base never does.

Contenders, each saving the *same* state after the same training steps (in an order that
rotates from one save to the next, so that none always goes first):

* ``ckptmirror incremental``: ``Mirror`` on a local directory, default storage options
  (incremental saves on, no compression on local disk): save 1 writes everything, later saves
  reference the objects the previous step stored;
* ``ckptmirror full``: the same with ``storage_options={"file": {"incremental": False}}``;
* ``dcp.save``: ``get_state_dict`` + ``torch.distributed.checkpoint.save`` to a
  ``FileSystemWriter`` (fsyncs its files by default), a new directory each save.

Per save: bytes written (measured on disk: the step directory's files, ``st_size`` summed, and
the blocks allocated ``du``-style; a ckptmirror step directory excludes the objects it references
from earlier steps), time to durable (the ``save()`` call until ``handle.result()`` returns; for
DCP the whole ``dcp.save`` call), and for ckptmirror the stall and what ``ops.inspect`` reports
(referenced objects). The trainable share (the head's weights + its AdamW state) is the
reference for the bytes: the target is bytes written per save <= 1.05 x trainable share.

Each ``--load`` condition runs the whole sequence: ``0`` as the machine is, ``1`` with one
competing busy process (``python -c 'while True: pass'``); the load average and the CPU that
other processes used during the saves (``/proc/stat``) are reported with each.

Before every save the script calls ``os.sync()`` (not timed) so that the previous save's dirty
pages do not flush during this one. Run ``--help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from _models import Block

MB = 1e6
CONTENDERS = ("ckptmirror incremental", "ckptmirror full", "dcp.save")
TARGET = 1.05  # bytes written per save <= trainable share + 5%


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- the model
class Model(nn.Module):
    """Frozen base (embedding + blocks + final norm), trainable head (norm + 2 Linear)."""

    def __init__(self, d: int, blocks: int, vocab: int, head_out: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, head_out))
        self.to(dtype)
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("head."))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the base is frozen: no activations kept for it
            x = self.embed(tokens)
            for blk in self.blocks:
                x = blk(x)
            x = self.norm(x)
        return self.head(x)


def head_out_for(d: int, blocks: int, vocab: int, share: float) -> int:
    """Output width of the head's last Linear so that the head holds ``share`` of the parameters."""
    base = vocab * d + blocks * (12 * d * d + 13 * d) + 2 * d
    head_fixed = 2 * d + d * d + d
    want = share / (1 - share) * base
    return max(16, round((want - head_fixed) / (d + 1)))


def train(model: Model, optim: torch.optim.Optimizer, steps: int, batch: int, seq: int, gen: torch.Generator) -> float:
    loss = torch.zeros(())
    for _ in range(steps):
        tokens = torch.randint(0, model.embed.num_embeddings, (batch, seq), generator=gen)
        target = torch.randint(0, model.head[-1].out_features, (batch, seq), generator=gen)
        logits = model(tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    return float(loss.detach())


def tensor_bytes(ts: Any) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def shares(model: Model, optim: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    opt = tensor_bytes(v for st in optim.state.values() for v in st.values())
    return {
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in trainable),
        "model_bytes": tensor_bytes(model.state_dict().values()),
        "head_bytes": tensor_bytes(trainable),
        "optim_bytes": opt,
        "trainable_share_bytes": tensor_bytes(trainable) + opt,
        "state_bytes": tensor_bytes(model.state_dict().values()) + opt,
        "tensors": len(model.state_dict()) + sum(len(st) for st in optim.state.values()),
    }


# ----------------------------------------------------------------------------- measurements
DATA_SUFFIXES = (".bin", ".zst", ".distcp")  # ckptmirror objects (raw, compressed), DCP data files


def disk_bytes(path: str) -> dict[str, int]:
    """Files under ``path``: count, bytes (st_size summed), bytes allocated as du counts them,
    and the bytes of tensor data files alone (the rest is manifests, placement and commit records)."""
    out = {"files": 0, "bytes": 0, "alloc_bytes": 0, "data_bytes": 0}
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            out["files"] += 1
            out["bytes"] += st.st_size
            out["alloc_bytes"] += st.st_blocks * 512
            if name.endswith(DATA_SUFFIXES):
                out["data_bytes"] += st.st_size
    return out


def cpu_probe() -> dict[str, float]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    t = os.times()
    return {
        "wall": time.monotonic(),
        "busy": (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK"),
        "own": t.user + t.system + t.children_user + t.children_system,
    }


def other_cpus(a: dict[str, float], b: dict[str, float]) -> float:
    """CPUs' worth of work other processes (the competing load included) did between two probes."""
    wall = b["wall"] - a["wall"]
    return max(0.0, (b["busy"] - a["busy"]) - (b["own"] - a["own"])) / wall if wall > 0 else 0.0


class Contender:
    name = ""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)

    def save(self, step: int, model: Model, optim: torch.optim.Optimizer) -> dict[str, Any]:
        raise NotImplementedError

    def tidy(self, step: int) -> None:
        """Untimed, after each save: let retention finish, drop old checkpoints."""

    def close(self) -> None:
        pass


class CkptMirror(Contender):
    def __init__(self, root: str, incremental: bool, object_bytes: int) -> None:
        super().__init__(root)
        import ckptmirror
        from ckptmirror.format import step_dir
        from ckptmirror.ops import inspect

        self.name = "ckptmirror incremental" if incremental else "ckptmirror full"
        self.step_dir = step_dir
        self.inspect = inspect
        # keep_last=2: the newest step and the one before it stay (disk stays bounded); m.wait()
        # after each save (untimed) lets the retention pass finish before the next measurement.
        self.m = ckptmirror.Mirror(
            [root],
            keep_last=2,
            object_bytes=object_bytes,
            storage_options={"file": {"incremental": incremental}},
        )
        self.url = self.m.replicas[0].url

    def save(self, step, model, optim):
        t0 = time.perf_counter()
        h = self.m.save(step, model, optim)
        returned = time.perf_counter() - t0
        h.result()
        durable = time.perf_counter() - t0
        st = h.replicas[self.url]
        rep = self.inspect([self.root]).storage.get(self.url, {})
        return {
            "durable_s": durable,
            "stall_s": h.stall_s,
            "returned_s": returned,
            "committed_s": h.committed_s,
            **disk_bytes(os.path.join(self.root, self.step_dir(step))),
            "written_bytes": getattr(st, "written_bytes", None),
            "storage": dict(rep),
        }

    def tidy(self, step):
        self.m.wait()

    def close(self):
        self.m.close(raise_errors=False)


class DcpSave(Contender):
    name = "dcp.save"

    def __init__(self, root: str) -> None:
        super().__init__(root)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.dcp, self.get_state_dict = dcp, get_state_dict

    def _path(self, step: int) -> str:
        return os.path.join(self.root, f"step-{step}")

    def save(self, step, model, optim):
        path = self._path(step)
        t0 = time.perf_counter()
        msd, osd = self.get_state_dict(model, optim)
        self.dcp.save({"model": msd, "optim": osd}, storage_writer=self.dcp.FileSystemWriter(path))
        durable = time.perf_counter() - t0
        return {"durable_s": durable, **disk_bytes(path)}

    def tidy(self, step):
        shutil.rmtree(self._path(step - 2), ignore_errors=True)  # keep two, as the mirrors do


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def verify_last(c: CkptMirror, step: int, model: Model, optim: torch.optim.Optimizer) -> str:
    """Restore ``step`` through a new Mirror (a restarted job) and compare it bit for bit."""
    import ckptmirror

    with ckptmirror.Mirror([c.root]) as m2:
        got = m2.load_state(step, require=True)
    assert got is not None
    _, state = got
    want = {"model": model.state_dict(), "optim": optim.state_dict()}
    bad = []
    for key, t in want["model"].items():
        if not same_bits(state["model"][key], t):
            bad.append(key)
    for pid, st in want["optim"]["state"].items():
        for k, t in st.items():
            if not same_bits(state["optim"]["state"][pid][k], t):
                bad.append(f"optim.{pid}.{k}")
    return "bit-exact" if not bad else f"MISMATCH in {len(bad)} tensors: {bad[:5]}"


# ------------------------------------------------------------------------------------ a run
def run_condition(args: argparse.Namespace, load: int, workdir: str) -> dict[str, Any]:
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    head_out = head_out_for(args.d, args.blocks, args.vocab, args.head_share)
    model = Model(args.d, args.blocks, args.vocab, head_out, dtype)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    busy: list[subprocess.Popen[bytes]] = []
    cond: dict[str, Any] = {"load": load, "saves": {n: [] for n in args.contenders}}
    try:
        for _ in range(load):
            busy.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        if load:
            log(f"load={load}: competing busy process(es) started; warming up {args.load_warmup_s:.0f} s")
            time.sleep(args.load_warmup_s)
        cond["loadavg_start"] = os.getloadavg()
        train(model, optim, args.steps, args.batch, args.seq, gen)  # AdamW state exists from here on
        cond["shares"] = shares(model, optim)
        log(
            "state: {:.0f} MB in {} tensors; trainable share {:.1f} MB (head {:.1f} MB + AdamW {:.1f} MB), "
            "{:.1%} of the parameters".format(
                cond["shares"]["state_bytes"] / MB,
                cond["shares"]["tensors"],
                cond["shares"]["trainable_share_bytes"] / MB,
                cond["shares"]["head_bytes"] / MB,
                cond["shares"]["optim_bytes"] / MB,
                cond["shares"]["trainable_params"] / cond["shares"]["params"],
            )
        )
        contenders: dict[str, Contender] = {}
        for name in args.contenders:
            root = os.path.join(workdir, f"load{load}-{name.replace(' ', '-')}")
            if name == "dcp.save":
                contenders[name] = DcpSave(root)
            else:
                contenders[name] = CkptMirror(root, name.endswith("incremental"), args.object_bytes)
        other: list[float] = []
        train_s: list[float] = []
        try:
            for i in range(1, args.saves + 1):
                if i > 1:
                    t0 = time.perf_counter()
                    loss = train(model, optim, args.steps, args.batch, args.seq, gen)
                    train_s.append(time.perf_counter() - t0)
                    log(f"load={load} save {i}: trained {args.steps} steps in {train_s[-1]:.1f} s (loss {loss:.3f})")
                names = list(args.contenders)
                k = (i - 1) % len(names)
                for name in names[k:] + names[:k]:
                    os.sync()
                    a = cpu_probe()
                    rec = contenders[name].save(i, model, optim)
                    b = cpu_probe()
                    rec["other_cpus"] = other_cpus(a, b)
                    rec["step"] = i
                    other.append(rec["other_cpus"])
                    cond["saves"][name].append(rec)
                    log(
                        f"load={load} save {i} {name}: {rec['bytes'] / MB:.1f} MB written, "
                        f"durable {rec['durable_s']:.2f} s, other CPUs {rec['other_cpus']:.2f}"
                    )
                    contenders[name].tidy(i)
            cond["loadavg_end"] = os.getloadavg()
            cond["other_cpus"] = statistics.mean(other) if other else 0.0
            cond["train_s"] = statistics.median(train_s) if train_s else None
            inc = contenders.get("ckptmirror incremental")
            if isinstance(inc, CkptMirror) and args.verify:
                inc.m.wait()
                cond["verify"] = verify_last(inc, args.saves, model, optim)
                log(f"load={load}: last incremental step restored through a new Mirror: {cond['verify']}")
        finally:
            for c in contenders.values():
                c.close()
            for name in contenders:
                shutil.rmtree(os.path.join(workdir, f"load{load}-{name.replace(' ', '-')}"), ignore_errors=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return cond


# ----------------------------------------------------------------------------------- report
def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def versions() -> str:
    try:
        import ckptmirror

        cm = ckptmirror.__version__
    except Exception:  # noqa: BLE001
        cm = "?"
    threads = torch.get_num_threads()
    return f"python {platform.python_version()}, torch {torch.__version__} (threads {threads}), ckptmirror {cm}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def report(args: argparse.Namespace, conds: list[dict[str, Any]]) -> str:
    sh = conds[0]["shares"]
    trainable = sh["trainable_share_bytes"]
    out = [
        f"# Incremental saves: bytes written and time to durable ({datetime.date.today().isoformat()})",
        "",
        f"- machine: nproc={os.cpu_count()}, {cpu_model()}; {versions()}",
        f"- state: {args.dtype} model of {sh['params'] / 1e6:.1f} M parameters ({args.blocks} blocks, d={args.d}, "
        f"vocab {args.vocab}), {sh['tensors']} tensors, {sh['state_bytes'] / MB:.1f} MB with AdamW; frozen base "
        f"{1 - sh['trainable_params'] / sh['params']:.1%} of the parameters (requires_grad=False, no optimizer state)",
        f"- trainable share: head {sh['head_bytes'] / MB:.1f} MB + AdamW state {sh['optim_bytes'] / MB:.1f} MB = "
        f"**{trainable / MB:.1f} MB** ({trainable / sh['state_bytes']:.1%} of the state); target: bytes written per "
        f"save <= {TARGET:.2f} x that = {TARGET * trainable / MB:.1f} MB",
        f"- {args.saves} saves per contender, {args.steps} training steps (batch {args.batch} x {args.seq} tokens) "
        f"before each; saves 2..{args.saves} are summarised (medians), save 1 is the full first save; "
        f"object_bytes {args.object_bytes >> 20} MiB; target dir {os.path.abspath(args.dir)}",
        "- bytes written: the new step directory on disk (st_size summed; for ckptmirror it excludes objects "
        "referenced from earlier steps); durable: save() call -> handle.result() returned (dcp: the dcp.save call, "
        "fsynced files)",
        "",
    ]
    for c in conds:
        la0, la1 = c["loadavg_start"], c["loadavg_end"]
        what = "no extra load" if c["load"] == 0 else f"{c['load']} competing busy process(es)"
        out += [
            f"## {what}: load average {la0[0]:.2f} at start, {la1[0]:.2f} / {la1[1]:.2f} / {la1[2]:.2f} at end; "
            f"other processes used {c['other_cpus']:.2f} CPUs during the saves (of {os.cpu_count()})",
            "",
            "| contender | save 1 MB | MB written/save (2..N) | / trainable share | du MB | files | "
            "durable s (save 1) | durable s (2..N) | vs full ckptmirror | vs dcp.save | stall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        steady = {n: [r for r in recs if r["step"] > 1] for n, recs in c["saves"].items()}
        dur = {n: med([r["durable_s"] for r in rs]) for n, rs in steady.items()}
        for name, recs in c["saves"].items():
            rs = steady[name]
            b = med([r["bytes"] for r in rs])
            d = dur[name]
            full = dur.get("ckptmirror full")
            dcp = dur.get("dcp.save")
            out.append(
                "| {} | {:.1f} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                    name,
                    recs[0]["bytes"] / MB,
                    fmt(b and b / MB, 1),
                    fmt(b and b / trainable, 3),
                    fmt(med([r["alloc_bytes"] for r in rs]) and med([r["alloc_bytes"] for r in rs]) / MB, 1),
                    fmt(med([r["files"] for r in rs]), 0),
                    fmt(recs[0]["durable_s"]),
                    fmt(d),
                    fmt(d / full if d and full else None),
                    fmt(d / dcp if d and dcp else None),
                    fmt(med([r.get("stall_s") for r in rs]), 3) if "stall_s" in recs[0] else "-",
                )
            )
        out.append("")
        inc = steady.get("ckptmirror incremental")
        if inc:
            per = ", ".join(
                f"{r['bytes'] / MB:.1f} MB/{r['durable_s']:.2f} s (ref {r['storage'].get('referenced', '?')} obj, "
                f"{r['storage'].get('referenced_bytes', 0) / MB:.0f} MB)"
                for r in inc
            )
            b = med([r["bytes"] for r in inc])
            data = med([r["data_bytes"] for r in inc])
            out.append(f"- incremental saves 2..N: {per}")
            if b is not None and data is not None:
                out += [
                    f"- of the bytes written, tensor data (objects) {data / MB:.1f} MB, metadata (manifest, "
                    f"placement, commit) {(b - data) / 1e3:.1f} KB; an object holds a whole group of small tensors, "
                    "so frozen tensors that share an object with trainable ones are written again: "
                    f"{(data - trainable) / MB:.1f} MB here (at most object_bytes)",
                    f"- target bytes written <= {TARGET:.2f} x trainable share: "
                    f"**{'met' if b <= TARGET * trainable else 'NOT met'}** ({b / trainable:.3f} x; "
                    f"{(b - trainable) / MB:+.1f} MB over the trainable share)",
                ]
            if c.get("verify"):
                out.append(f"- last incremental step restored through a new Mirror: {c['verify']}")
        if c.get("train_s") is not None:
            out.append(f"- training: {args.steps} steps took {c['train_s']:.1f} s (median) between saves")
        out.append("")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=768, help="model width (default 768)")
    p.add_argument("--blocks", type=int, default=12, help="frozen transformer blocks (default 12)")
    p.add_argument("--vocab", type=int, default=8192, help="embedding rows (default 8192)")
    p.add_argument("--head-share", type=float, default=0.05, help="trainable share of the parameters (0.05)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--saves", type=int, default=5, help="saves per contender and condition (default 5)")
    p.add_argument("--steps", type=int, default=2, help="training steps between saves (default 2)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--object-bytes", type=int, default=64 << 20, help="ckptmirror object_bytes (default 64 MiB)")
    p.add_argument("--load", default="0,1", help="competing busy processes per condition, e.g. 0,1 (default)")
    p.add_argument("--load-warmup-s", type=float, default=5.0)
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="subset of: " + ", ".join(CONTENDERS))
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the bit-exact restore check")
    p.add_argument("--dir", default="bench-out", help="where checkpoints go (default ./bench-out, removed after)")
    p.add_argument("--out", help="also write the Markdown report to this file")
    p.add_argument("--json", help="dump the raw records to this file")
    args = p.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for c in args.contenders:
        if c not in CONTENDERS:
            p.error(f"unknown contender {c!r}; choose from {', '.join(CONTENDERS)}")
    args.load = [int(x) for x in args.load.split(",")]
    if args.saves < 2:
        p.error("--saves must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
    os.makedirs(args.dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="bench-incremental-", dir=args.dir)
    t0 = time.monotonic()
    conds = []
    try:
        for load in args.load:
            conds.append(run_condition(args, load, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        try:
            os.rmdir(args.dir)
        except OSError:
            pass
    text = report(args, conds) + f"\n(run took {time.monotonic() - t0:.0f} s)\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "conditions": conds}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
