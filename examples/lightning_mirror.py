"""PyTorch Lightning with asynchronous, replicated ckptmirror checkpoints.

The one ckptmirror line is marked ``# <- ckptmirror``: the Trainer, ModelCheckpoint and
``fit(ckpt_path="last")`` are Lightning's own. Run it twice on the CPU (a tiny model, no
downloads); the first run is killed hard at step 25, the second resumes from the step last.ckpt
names: the newest save whose commit on the replicas, and then the pointer written right after it,
were finished before the crash (step 20; 15 when the crash came while step 20 was still writing or
just before its last.ckpt pointer was written)::

    python examples/lightning_mirror.py --crash-at 25
    python examples/lightning_mirror.py

Replicas: a "local" and a "remote" directory standing in for node-local NVMe and S3 (pass
``--replicas /nvme/ckpt/run1,s3://bucket/ckpt/run1`` for real ones). The checkpoint directory
(``--dir``/checkpoints) holds small JSON pointer files (``last.ckpt``, the top-k files) naming
ckptmirror steps; nothing there or on the replicas is a pickle. Check the replicas with::

    ckptmirror verify lightning-example/local lightning-example/remote
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ckptmirror import SaveHandle
from ckptmirror.integrations.lightning import MirrorCheckpointIO


class Regressor(L.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optim = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return [optim], [torch.optim.lr_scheduler.StepLR(optim, step_size=10, gamma=0.7)]


class CrashAt(Callback):
    """Simulates a node failure: the process dies without any cleanup (saves in flight are lost)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            print(f"crashing at step {trainer.global_step}", flush=True)
            os._exit(1)


def log_save(h: SaveHandle) -> None:
    """Runs on a background thread once a step is durable (or failed): log it to your tracker."""
    print(f"  step {h.step}: stalled training {h.stall_s * 1e3:.1f} ms, committed after {h.committed_s} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="lightning-example", help="working directory (default: %(default)s)")
    p.add_argument("--replicas", help="comma-separated replica URLs (default: <dir>/local,<dir>/remote)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=5, help="checkpoint every N steps (default: %(default)s)")
    p.add_argument("--crash-at", type=int, help="kill the process at this step (first run)")
    a = p.parse_args()
    replicas = a.replicas.split(",") if a.replicas else [os.path.join(a.dir, "local"), os.path.join(a.dir, "remote")]

    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(512, 1, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)

    trainer = L.Trainer(
        max_steps=a.steps,
        accelerator="cpu",
        plugins=[MirrorCheckpointIO(replicas, on_saved=log_save)],  # <- ckptmirror
        callbacks=[
            ModelCheckpoint(
                dirpath=os.path.join(a.dir, "checkpoints"),
                every_n_train_steps=a.every,
                save_top_k=2,
                monitor="train_loss",
                save_last=True,
            ),
            *([CrashAt(a.crash_at)] if a.crash_at else []),
        ],
        logger=False,
        enable_progress_bar=False,
    )
    trainer.fit(Regressor(), data, ckpt_path="last")  # resumes through the plugin when last.ckpt exists
    print(f"done at step {trainer.global_step}; best: {trainer.checkpoint_callback.best_model_path}")  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
