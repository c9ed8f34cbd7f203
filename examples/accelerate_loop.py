"""An Accelerate training loop with asynchronous, replicated ckptmirror checkpoints.

``MirrorState`` replaces ``accelerator.save_state`` / ``load_state`` (lines marked
``# <- ckptmirror``). Run it twice on the CPU; the first run is killed after batch 50, the second
resumes from batch 48 (the last save) in the middle of an epoch::

    python examples/accelerate_loop.py --crash-at 50
    python examples/accelerate_loop.py

Several processes work the same way (on the CPU: ``torchrun --nproc-per-node 2
examples/accelerate_loop.py --cpu``): every process calls ``save`` and ``load``, and a step
commits once every process's part is durable.
"""

from __future__ import annotations

import argparse
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

from ckptmirror.integrations.accelerate import MirrorState


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/ckptmirror-accelerate-example")
    p.add_argument("--replicas", default=None, help="comma-separated replica URLs")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--save-every", type=int, default=16, help="save every N batches")
    p.add_argument("--crash-at", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU (several processes: gloo)")
    a = p.parse_args()
    replicas = a.replicas.split(",") if a.replicas else [f"{a.dir}/local", f"{a.dir}/remote"]

    set_seed(0)
    accelerator = Accelerator(
        cpu=a.cpu,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # the data order is f(seed, epoch)
        project_config=ProjectConfiguration(project_dir=a.dir, total_limit=3),  # total_limit -> keep_last
    )
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    # Its own generator: the iterator's base seed then does not come from the (restored) global RNG.
    dl = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(2))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=a.epochs * len(dl))
    model, optim, dl, sched = accelerator.prepare(model, optim, dl, sched)

    ckpt = MirrorState(accelerator, replicas)  # <- ckptmirror
    done = ckpt.load() or 0  # <- ckptmirror: batches trained so far (None on a fresh run)
    if done:
        accelerator.print(f"resumed after batch {done}")
    for epoch in range(done // len(dl), a.epochs):
        dl.set_epoch(epoch)
        skip = done % len(dl) if epoch == done // len(dl) else 0
        for xb, yb in accelerator.skip_first_batches(dl, skip) if skip else dl:
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            accelerator.backward(loss)
            optim.step()
            sched.step()
            optim.zero_grad()
            done += 1
            if done % a.save_every == 0:
                ckpt.save(done)  # <- ckptmirror: returns after one copy; the writes go on in the background
            if done == a.crash_at:
                ckpt.wait()  # (only so the demo's crash comes after the save committed)
                accelerator.print(f"simulated crash after batch {done}")
                os._exit(1)
        accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}")
    ckpt.close()  # <- ckptmirror: waits for the last save; raises if it failed


if __name__ == "__main__":
    main()
