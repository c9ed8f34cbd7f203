"""One Lightning training process for tests/test_lightning.py (and benchmarks/bench_lightning.py).

Run as ``python tests/_lightning_child.py CONFIG.json`` in the run's directory. The config says:

- ``checkpoint_io``: ``"mirror"`` (MirrorCheckpointIO over ``replicas``) or ``"native"`` (Lightning's
  TorchCheckpointIO: the reference);
- ``max_steps``, ``every`` (ModelCheckpoint's every_n_train_steps), ``top_k``, ``ckpt_dir``;
- ``ckpt_path``: passed to ``trainer.fit`` (``"last"``, a file, or null), with ``weights_only``;
- ``crash_at``: ``os._exit(CRASH_CODE)`` at the end of that global step (no teardown, no flush);
- ``devices``/``strategy``: e.g. 2 and ``"ddp"`` (CPU, gloo);
- ``out``: where to write the result JSON (on global rank 0; rank r writes ``out.rank{r}``): the
  global step training started from, the final global step, and a SHA-256 of every tensor of the
  model and of the optimizer state (dtype, shape and bytes), to compare runs bit for bit.

Determinism: one CPU thread, fixed seeds, a fixed dataset; dropout and Adam make the state worth
comparing. The hyper-parameters include a Namespace, a Path, an Enum and a dataclass, which the
mirror plugin must store without pickle.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

CRASH_CODE = 17


class Opt(enum.Enum):
    ADAM = "adam"


@dataclasses.dataclass
class Arch:
    hidden: int = 16
    dropout: float = 0.1


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def digests(tree: Any, prefix: str = "") -> dict[str, str]:
    """SHA-256 of every tensor in a nested state, by key path."""
    out: dict[str, str] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix] = tensor_digest(tree)
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(digests(v, f"{prefix}/{k}"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(digests(v, f"{prefix}/{i}"))
    return out


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("ckptmirror").setLevel(logging.INFO)

    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class Tiny(L.LightningModule):
        def __init__(self, lr: float, arch: Arch, opt: Opt, out_dir: Path, args: argparse.Namespace) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, arch.hidden),
                torch.nn.ReLU(),
                torch.nn.Dropout(arch.dropout),
                torch.nn.Linear(arch.hidden, 1),
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            optim = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return [optim], [torch.optim.lr_scheduler.StepLR(optim, step_size=4, gamma=0.5)]

    class Probe(Callback):
        """Records where training started; crashes the process hard at ``crash_at``."""

        def __init__(self) -> None:
            self.started_at: int | None = None
            self.stall_s: list[float] = []

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.started_at = trainer.global_step

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if cfg.get("crash_at") is not None and trainer.global_step >= cfg["crash_at"]:
                sys.stderr.flush()
                os._exit(CRASH_CODE)  # a hard crash: no teardown, no flush of saves in flight

    L.seed_everything(0, workers=True)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(cfg.get("samples", 32), 8, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(x.shape[0], 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False)

    plugins: list[Any] = []
    io = None
    if cfg["checkpoint_io"] == "mirror":
        from ckptmirror.integrations.lightning import MirrorCheckpointIO

        io = MirrorCheckpointIO(cfg["replicas"], **cfg.get("mirror_options", {}))
        plugins.append(io)
    probe = Probe()
    checkpoint = ModelCheckpoint(
        dirpath=cfg["ckpt_dir"],
        every_n_train_steps=cfg["every"],
        save_top_k=cfg.get("top_k", 2),
        monitor="step",
        mode="max",
        save_last=True,
    )
    trainer = L.Trainer(
        max_steps=cfg["max_steps"],
        accelerator="cpu",
        devices=cfg.get("devices", 1),
        strategy=cfg.get("strategy", "auto"),
        plugins=plugins,
        callbacks=[checkpoint, probe],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=os.getcwd(),
    )
    model = Tiny(
        lr=0.01,
        arch=Arch(),
        opt=Opt.ADAM,
        out_dir=Path("/tmp/out"),
        args=argparse.Namespace(seed=0, name="tiny"),
    )
    t0 = time.perf_counter()
    # weights_only=False for the native reference only: its pickle holds the dataclass and enum
    # hyper-parameters, which torch.load refuses by default (the mirror plugin never unpickles).
    trainer.fit(model, loader, ckpt_path=cfg.get("ckpt_path"), weights_only=cfg.get("weights_only"))
    fit_s = time.perf_counter() - t0
    result = {
        "started_at": probe.started_at,
        "global_step": trainer.global_step,
        "fit_s": fit_s,
        "model": digests(model.state_dict()),
        "optim": digests(trainer.optimizers[0].state_dict()["state"]),
        "rank": trainer.global_rank,
    }
    out = cfg["out"] if trainer.global_rank == 0 else f"{cfg['out']}.rank{trainer.global_rank}"
    Path(out).write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
