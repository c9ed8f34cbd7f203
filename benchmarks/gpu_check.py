#!/usr/bin/env python
"""GPU check of the save path: bit-exact through a CUDA state, and its stall against a raw copy.

Needs only torch (with CUDA) and ckptmirror (``pip install -e .`` from the repo root); runs in
well under 5 minutes on one GPU and writes only under a temporary directory. Without a GPU it
says so and exits 0.

What it does, on ``cuda:0``:

1. builds a model of mixed sizes (bf16 linear layers, fp32 norms, a frozen bf16 embedding with
   ``requires_grad=False``) and its AdamW, a few thousand state tensors in all (AdamW's ``step``
   counters stay on the CPU, so the state mixes devices), and trains one step;
2. ``Mirror.reserve`` (pinned staging), then a few rounds of: clone the state on the GPU (the
   expected values), ``save()``, and run the next training step at once, on the default stream
   or on a side stream, while the save writes in the background;
3. restores each saved step into a freshly built model and optimizer (other seed) and checks
   every tensor bit for bit against the clone, and the optimizer's hyper-parameters;
4. measures the memcpy floor: every tensor of the state copied by hand into one preallocated
   pinned buffer (``non_blocking=True`` device-to-host copies, then a synchronize).

Prints a small table (stall vs the floor, step time alone and while a save writes) and exits
non-zero on any mismatch.

    python benchmarks/gpu_check.py                 # defaults: ~2,800 tensors, ~1.3 GB
    python benchmarks/gpu_check.py --layers 400    # ~11,000 tensors
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)  # fp32
        self.up = nn.Linear(width, 4 * width).to(torch.bfloat16)
        self.down = nn.Linear(4 * width, width).to(torch.bfloat16)
        self.gate = nn.Parameter(torch.ones(width, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x.float()).to(torch.bfloat16)
        return x + self.down(torch.nn.functional.gelu(self.up(h))) * self.gate


class Model(nn.Module):
    def __init__(self, width: int, layers: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width).to(torch.bfloat16)
        self.embed.requires_grad_(False)  # a frozen part: no gradient, no optimizer state
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, vocab).to(torch.bfloat16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x).float()


def build(seed: int, args: argparse.Namespace, device: torch.device) -> tuple[Model, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Model(args.width, args.layers, args.vocab).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt


def train_step(model: Model, opt: torch.optim.Optimizer, step: int, args: argparse.Namespace) -> None:
    g = torch.Generator(device=model.head.weight.device).manual_seed(step)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=model.head.weight.device, generator=g)
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{pid}.{k}"] = v
    return out


def clone_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state_tensors(model, opt).items()}


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def compare(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Every difference in keys, dtype, shape, device type or bytes."""
    problems = []
    if set(got) != set(expected):
        problems.append(
            f"keys differ: missing {sorted(set(expected) - set(got))[:5]}, extra {sorted(set(got) - set(expected))[:5]}"
        )
    for k in sorted(set(got) & set(expected)):
        a, e = got[k], expected[k]
        if a.dtype != e.dtype or a.shape != e.shape or a.device.type != e.device.type:
            problems.append(f"{k}: {a.dtype}{tuple(a.shape)}@{a.device} vs {e.dtype}{tuple(e.shape)}@{e.device}")
        elif not torch.equal(raw(a).cpu(), raw(e).cpu()):
            problems.append(f"{k}: bytes differ")
    return problems


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_copy(tensors: list[torch.Tensor], device: torch.device, repeats: int) -> tuple[float, float]:
    """(first, steady median) of copying every tensor into one preallocated pinned buffer by hand."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, off = [], 0
    for n in sizes:
        offsets.append(off)
        off += (n + 15) // 16 * 16
    buf = torch.empty(off, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = [buf[o : o + n] for o, n in zip(offsets, sizes)]
    src = [raw(t) for t in tensors]
    times = []
    for _ in range(1 + repeats):
        sync(device)
        t0 = time.perf_counter()
        for d, s in zip(dst, src):
            d.copy_(s, non_blocking=s.is_cuda)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=100, help="blocks of 7 tensors each (x ~4 with AdamW)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7, help="saves (each followed at once by a training step)")
    ap.add_argument("--repeats", type=int, default=3, help="steady floor copies")
    ap.add_argument(
        "--settle",
        action="store_true",
        help="wait for the queued training step before each save, so the stall is the copy alone "
        "(by default save() is called with the step still queued and orders its copies after it)",
    )
    # A dry run of this script's own logic on the CPU (no streams, no pinned memory): for testing it.
    ap.add_argument("--device", default="cuda:0", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check, skipping.")
        return 0
    import ckptmirror

    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, opt = build(0, args, device)
    train_step(model, opt, 0, args)
    sync(device)
    state = state_tensors(model, opt)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    n_cuda = sum(t.is_cuda for t in state.values())
    print(
        f"gpu_check: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU dry run'}, "
        f"torch {torch.__version__}, "
        f"ckptmirror {ckptmirror.__version__}"
    )
    print(
        f"state: {len(state)} tensors ({n_cuda} on CUDA, {len(state) - n_cuda} on the CPU), "
        f"{nbytes / 1e9:.3f} GB; dtypes {sorted({str(t.dtype) for t in state.values()})}; "
        + ("saves after a synchronize (--settle)" if args.settle else "saves with the training step still queued")
    )

    # Step time alone (the reference for the step that overlaps a background write).
    alone = []
    for i in range(3):
        sync(device)
        t0 = time.perf_counter()
        train_step(model, opt, 100 + i, args)
        sync(device)
        alone.append(time.perf_counter() - t0)

    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    with tempfile.TemporaryDirectory(prefix="ckptmirror-gpu-check-") as d:
        expected: dict[int, dict[str, torch.Tensor]] = {}
        with ckptmirror.Mirror([d]) as m:
            t0 = time.perf_counter()
            m.reserve(model, opt)
            reserve_s = time.perf_counter() - t0
            allocs = m.staging_allocations
            for r in range(args.rounds):
                step = 10 + r
                on_side = side is not None and r % 2 == 1  # every other round: train and save on a side stream
                ctx = torch.cuda.stream(side) if on_side else contextlib.nullcontext()
                with ctx:
                    train_step(model, opt, step, args)  # queued, not finished: save must order after it
                    expected[step] = clone_state(model, opt)
                    if args.settle:
                        sync(device)
                    t0 = time.perf_counter()
                    h = m.save(step, model, opt, extra={"round": r})
                    returned = time.perf_counter() - t0
                    # The next step changes every parameter in place while the save writes.
                    t1 = time.perf_counter()
                    train_step(model, opt, 1000 + step, args)
                    sync(device)
                    overlapped = time.perf_counter() - t1
                h.result()
                rows.append(
                    {
                        "step": step,
                        "stream": "side" if on_side else "default",
                        "stall": h.stall_s,
                        "returned": returned,
                        "overlapped_step": overlapped,
                        "committed": h.committed_s,
                    }
                )
            new_allocs = m.staging_allocations - allocs
            if new_allocs:
                problems.append(f"saves after reserve allocated {new_allocs} staging buffer(s)")

        for step, exp in expected.items():
            target, target_opt = build(1234, args, device)
            with ckptmirror.Mirror([d]) as m:
                res = m.restore(target, target_opt, step=step)
            if res is None or res.step != step:
                problems.append(f"step {step}: restore returned {res and res.step}")
                continue
            got = state_tensors(target, target_opt)
            for p in compare(got, exp):
                problems.append(f"step {step}: {p}")
            groups = [{k: v for k, v in g.items() if k != "params"} for g in target_opt.state_dict()["param_groups"]]
            want = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
            if groups != want:
                problems.append(f"step {step}: optimizer param_groups differ")
            if target.embed.weight.requires_grad:
                problems.append("the frozen embedding requires grad after restore")
            del target, target_opt, got

    floor_first, floor = floor_copy(list(state_tensors(model, opt).values()), device, args.repeats)
    steady = [r["stall"] for r in rows[1:]] or [rows[0]["stall"]]
    print()
    print("| save | stream | stall (s) | save() returned (s) | next step, overlapping the write (s) | committed (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        print(
            f"| {'first' if i == 0 else i + 1} (step {r['step']}) | {r['stream']} | {r['stall']:.4f} "
            f"| {r['returned']:.4f} | {r['overlapped_step']:.4f} | {r['committed'] or float('nan'):.3f} |"
        )
    print()
    print("| metric | value |")
    print("|---|---:|")
    print(f"| reserve (s) | {reserve_s:.3f} |")
    print(f"| memcpy floor: raw D2H into pinned, first / steady (s) | {floor_first:.4f} / {floor:.4f} |")
    print(f"| ckptmirror stall, first / steady median (s) | {rows[0]['stall']:.4f} / {statistics.median(steady):.4f} |")
    print(
        f"| stall / floor, first / steady | {rows[0]['stall'] / floor:.2f} / {statistics.median(steady) / floor:.2f} |"
    )
    # Per stream: a save issued on a side stream orders its copies after that stream's queued
    # work; the two can differ, and one median over both hides which one is slow.
    for stream in ("default", "side"):
        mine = [r["stall"] for r in rows[1:] if r["stream"] == stream]
        if mine:
            med = statistics.median(mine)
            print(
                f"| steady stall on the {stream} stream, median of {len(mine)} (s) / floor "
                f"| {med:.4f} / {med / floor:.2f} |"
            )
    print(f"| training step alone, median (s) | {statistics.median(alone):.4f} |")
    print(
        "| training step overlapping a save's write, median (s) "
        f"| {statistics.median(r['overlapped_step'] for r in rows):.4f} |"
    )
    print(f"| total run time (s) | {time.perf_counter() - t_start:.1f} |")
    print()
    if problems:
        print(f"FAILED: {len(problems)} problem(s):")
        for p in problems[:50]:
            print(f"  - {p}")
        return 1
    print(f"OK: {len(expected)} saved steps restored bit-exact ({len(state)} tensors each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
