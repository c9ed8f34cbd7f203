"""Child process for tests/test_accelerate.py: a tiny MLP trained in an Accelerate loop on the CPU.

Modes (one JSON line on stdout at the end):

- ``crash``: train with :class:`MirrorState` saves every ``--save-every`` batches; at ``--crash-at``
  wait for the saves in flight, then ``os._exit`` (a hard crash: no cleanup, no atexit).
- ``resume``: ``MirrorState.load()`` and continue to the end; final weights to ``--weights``.
- ``reference``: the same run, uninterrupted, without checkpoints; final weights to ``--weights``.
- ``native``: Accelerate's own ``save_state`` every ``--save-every`` batches (crash with
  ``--crash-at``; ``--resume-native`` continues from the newest ``checkpoint_*`` with ``load_state``).

The model has dropout, the data is shuffled (seedable sampler), there is gradient accumulation,
an LR scheduler and an object registered for checkpointing: a resume is bit-exact only if all of
them come back. Under ``torchrun`` it trains with DDP on the CPU (gloo): every process saves and
loads its part; rank 0 writes the weights and prints the report. ``--cuda`` trains on the GPU in
fp16 (a grad scaler) with deterministic algorithms.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from safetensors.torch import save_file

from ckptmirror.integrations.accelerate import MirrorState

SEED = 0


class Progress:
    """A registered object: what the loop has seen (checked after the resume)."""

    def __init__(self) -> None:
        self.batches = 0
        self.loss_sum = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "loss_sum": self.loss_sum}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.batches = sd["batches"]
        self.loss_sum = sd["loss_sum"]


def build(
    width: int, samples: int, project_dir: str, total_limit: int | None = None, cuda: bool = False
) -> tuple[Any, ...]:
    set_seed(SEED)
    if cuda:
        torch.use_deterministic_algorithms(True)  # with CUBLAS_WORKSPACE_CONFIG set by the caller
    acc = Accelerator(
        cpu=not cuda,
        mixed_precision="fp16" if cuda else "no",  # on a GPU: a grad scaler, saved and restored too
        gradient_accumulation_steps=2,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        project_config=ProjectConfiguration(
            project_dir=project_dir, automatic_checkpoint_naming=True, total_limit=total_limit
        ),
    )
    model = torch.nn.Sequential(
        torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(width, 1)
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 8, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(samples, 1, generator=g)
    # Its own generator: creating an iterator then draws no base seed from the global RNG (see
    # ckptmirror.integrations.accelerate's docstring).
    dl = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2)
    )
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 / (1 + 0.1 * s))
    model, optim, dl, sched = acc.prepare(model, optim, dl, sched)
    progress = Progress()
    acc.register_for_checkpointing(progress)
    return acc, model, optim, dl, sched, progress


def train(
    acc: Any,
    model: Any,
    optim: Any,
    dl: Any,
    sched: Any,
    progress: Progress,
    *,
    start: int,
    epochs: int,
    on_batch: Any,
) -> None:
    n = len(dl)
    done = start
    for epoch in range(start // n, epochs):
        dl.set_epoch(epoch)
        skip = done % n if epoch == start // n else 0
        for xb, yb in acc.skip_first_batches(dl, skip) if skip else dl:
            with acc.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(xb), yb)
                acc.backward(loss)
                optim.step()
                sched.step()
                optim.zero_grad()
            done += 1
            progress.batches += 1
            progress.loss_sum += float(loss.detach())
            on_batch(done)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["crash", "resume", "reference", "native"])
    p.add_argument("--replicas", default="")
    p.add_argument("--project", required=True)
    p.add_argument("--weights", default="")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--crash-at", type=int, default=0)
    p.add_argument("--resume-native", action="store_true")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--samples", type=int, default=40)  # 10 batches per epoch
    p.add_argument("--cuda", action="store_true", help="train on the GPU, fp16 (grad scaler), deterministic")
    a = p.parse_args()
    replicas = [r for r in a.replicas.split(",") if r]
    acc, model, optim, dl, sched, progress = build(a.width, a.samples, a.project, cuda=a.cuda)
    report: dict[str, Any] = {}
    ckpt = MirrorState(acc, replicas) if a.mode in ("crash", "resume") else None
    start = 0
    if a.mode == "resume":
        assert ckpt is not None
        start = ckpt.load() or 0
        report.update(resumed_from=start, iteration=acc.project_configuration.iteration, progress=progress.batches)
    if a.mode == "native" and a.resume_native:
        ckdir = os.path.join(a.project, "checkpoints")
        acc.load_state()  # the newest checkpoint_<i> (automatic naming)
        newest = max(os.listdir(ckdir), key=lambda f: int(re.findall(r"\d+", f)[-1]))
        acc.project_configuration.iteration = int(re.findall(r"\d+", newest)[-1]) + 1
        start = progress.batches
        report["resumed_from"] = start
    stalls: list[float] = []

    def on_batch(done: int) -> None:
        if done % a.save_every == 0:
            if ckpt is not None:
                t = time.perf_counter()
                ckpt.save(done)
                stalls.append(time.perf_counter() - t)
            elif a.mode == "native":
                t = time.perf_counter()
                acc.save_state()
                stalls.append(time.perf_counter() - t)
        if a.crash_at and done == a.crash_at:
            if ckpt is not None:
                ckpt.wait()
            if acc.is_main_process:
                print(json.dumps({"crashed_at": done}), flush=True)
            os._exit(17)

    t0 = time.perf_counter()
    train(acc, model, optim, dl, sched, progress, start=start, epochs=a.epochs, on_batch=on_batch)
    report["train_s"] = time.perf_counter() - t0
    if ckpt is not None:
        ckpt.close()
    report.update(batches=progress.batches, loss_sum=progress.loss_sum, stalls=stalls)
    report["processes"] = acc.num_processes
    report["scaler"] = acc.scaler is not None
    if a.weights and acc.is_main_process:
        sd = acc.unwrap_model(model).state_dict()
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}, a.weights)
    if acc.is_main_process:
        print(json.dumps(report), flush=True)
    acc.end_training()


if __name__ == "__main__":
    main()
