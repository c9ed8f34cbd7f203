"""Training time lost per checkpoint: Lightning's native checkpointing against ckptmirror.

The same model (an MLP, AdamW, CPU) trains the same number of steps with the same
``ModelCheckpoint(every_n_train_steps=--every, save_last=True)`` three ways, each run in a fresh
process:

- ``none``: no checkpoints (the baseline; ``enable_checkpointing=False``);
- ``native``: Lightning's own TorchCheckpointIO (``torch.save`` of the whole checkpoint, twice per
  checkpoint step: the top-k file and ``last.ckpt``), synchronous, to the local disk;
- ``ckptmirror``: ``MirrorCheckpointIO`` with ``--replicas`` local directories on the same disk
  (asynchronous; one save per step however many files ModelCheckpoint asks for; the run ends only
  when the last save is durable: ``fit`` includes the plugin's teardown).

Reported per run: the training wall time (``trainer.fit``, model and data built before the clock
starts), the stall per checkpoint step (seconds the training thread spent in ModelCheckpoint's
saves at that step: building the checkpoint dict plus the CheckpointIO calls; median), and the time
lost per checkpoint: (wall time - the baseline's) / checkpoint steps. Rounds alternate the modes
(``--rounds``, medians reported). On a shared 2-core machine the wall-time difference is noisy (the
background writes compete with training for the same cores); the stall is the direct measure.
Lightning's saves do not fsync; ckptmirror's do.

Run (about 2-3 minutes on 2 cores at the defaults)::

    python benchmarks/bench_lightning.py
    python benchmarks/bench_lightning.py --params 30e6 --steps 60 --every 10 --rounds 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

MODES = ("none", "native", "ckptmirror")


def dir_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def run_one(mode: str, a: argparse.Namespace, work: str) -> dict[str, Any]:
    """One training run in this process; returns its measurements."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.set_num_threads(a.threads)
    width = 1024
    layers = max(1, round(a.params / (width * width)))

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            blocks: list[torch.nn.Module] = []
            for _ in range(layers):
                blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
            self.net = torch.nn.Sequential(*blocks, torch.nn.Linear(width, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    stalls: dict[int, float] = {}

    class TimedCheckpoint(ModelCheckpoint):
        """ModelCheckpoint that records the seconds its saves took, per global step."""

        def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
            t0 = time.perf_counter()
            super()._save_checkpoint(trainer, filepath)
            stalls[trainer.global_step] = stalls.get(trainer.global_step, 0.0) + time.perf_counter() - t0

    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    n = a.batch * a.steps
    data = torch.utils.data.TensorDataset(torch.randn(n, width, generator=g), torch.randn(n, 1, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=a.batch)
    ckpt_dir = os.path.join(work, "checkpoints")
    plugins: list[Any] = []
    handles: list[Any] = []
    if mode == "ckptmirror":
        from ckptmirror.integrations.lightning import MirrorCheckpointIO

        replicas = [os.path.join(work, f"replica{i}") for i in range(a.replicas)]
        plugins.append(MirrorCheckpointIO(replicas, on_saved=handles.append))
    callbacks = (
        [] if mode == "none" else [TimedCheckpoint(dirpath=ckpt_dir, every_n_train_steps=a.every, save_last=True)]
    )
    trainer = L.Trainer(
        max_steps=a.steps,
        accelerator="cpu",
        plugins=plugins,
        callbacks=callbacks,
        enable_checkpointing=mode != "none",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = MLP()
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    wall = time.perf_counter() - t0
    return {
        "mode": mode,
        "params": params,
        "wall_s": wall,
        "checkpoint_steps": len(stalls),
        "stall_s": sorted(stalls.values()),
        "ckptmirror_stall_s": sorted(h.stall_s for h in handles),
        "ckptmirror_commit_s": sorted(h.committed_s for h in handles if h.committed_s is not None),
        "bytes_on_disk": dir_bytes(work),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=16e6, help="model parameters, about (default: %(default)s)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10, help="checkpoint every N steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--replicas", type=int, default=1, help="ckptmirror local replicas (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each mode, alternating (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (default: %(default)s)")
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir, removed)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one run (a child process)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        print(json.dumps(run_one(a.mode, a, a.work)))
        return

    root = a.dir or tempfile.mkdtemp(prefix="bench-lightning-")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    forwarded = [f"--{k}={getattr(a, k)}" for k in ("params", "steps", "every", "batch", "replicas", "threads")]
    try:
        for r in range(a.rounds):
            for mode in MODES:
                work = os.path.join(root, f"{mode}-{r}")
                os.makedirs(work, exist_ok=True)
                cmd = [sys.executable, __file__, f"--mode={mode}", f"--work={work}", *forwarded]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
                shutil.rmtree(work, ignore_errors=True)
                print(f"round {r + 1}/{a.rounds} {mode:10s} {results[mode][-1]['wall_s']:.2f} s", file=sys.stderr)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    base = statistics.median(x["wall_s"] for x in results["none"])
    first = results["native"][0]
    print(
        f"\n{first['params'] / 1e6:.1f}M parameters (AdamW: ~{first['params'] * 12 / 1e6:.0f} MB of tensors per "
        f"checkpoint), {a.steps} steps, a checkpoint every {a.every} steps ({first['checkpoint_steps']} checkpoints), "
        f"ckptmirror to {a.replicas} local replica(s); medians of {a.rounds} round(s)\n"
    )
    print(f"{'mode':12s} {'wall s':>8s} {'stall/ckpt s':>13s} {'lost/ckpt s':>12s}")
    summary: dict[str, Any] = {"args": vars(a), "runs": results, "summary": {}}
    for mode in MODES:
        runs = results[mode]
        wall = statistics.median(x["wall_s"] for x in runs)
        n = runs[0]["checkpoint_steps"]
        stall = statistics.median(s for x in runs for s in x["stall_s"]) if n else 0.0
        lost = (wall - base) / n if n else 0.0
        summary["summary"][mode] = {"wall_s": wall, "stall_per_ckpt_s": stall, "lost_per_ckpt_s": lost}
        cells = f"{stall:13.3f} {lost:12.3f}" if n else f"{'-':>13s} {'-':>12s}"
        print(f"{mode:12s} {wall:8.2f} {cells}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
