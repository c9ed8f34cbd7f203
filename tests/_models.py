"""Small deterministic models and a training loop shared by test_roundtrip.py.

Also the entry point of the "resume in a fresh process" check: run as

    python tests/_models.py resume DIR STEP TOTAL

it builds a fresh model/optimizer/scheduler (from a *different* seed, so every value must
come from the checkpoint), restores step STEP from DIR with ckptmirror, trains to TOTAL and
prints the losses as a JSON list of ``float.hex`` strings (exact).
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

N_SAMPLES = 64
BATCH = 8
IN, HIDDEN, OUT = 8, 16, 1


class Net(nn.Module):
    """Linear -> BatchNorm -> Tanh -> Dropout -> Linear; BatchNorm adds int64 0-d buffers,
    Dropout makes the global RNG part of the training state."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.bn = nn.BatchNorm1d(HIDDEN)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, IN, generator=g)
    y = torch.randn(N_SAMPLES, OUT, generator=g)
    return x, y


def param_groups(model: Net, lrs: tuple[float, float]) -> list[dict]:
    return [
        {"params": list(model.fc1.parameters()) + list(model.bn.parameters()), "lr": lrs[0]},
        {"params": list(model.fc2.parameters()), "lr": lrs[1], "weight_decay": 0.05},
    ]


def make_optimizer(kind: str, model: Net, lrs: tuple[float, float] = (0.02, 0.005)) -> torch.optim.Optimizer:
    groups = param_groups(model, lrs)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9, nesterov=True)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lrs[0], amsgrad=True)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lrs[0], betas=(0.85, 0.99))
    raise ValueError(kind)


def build(seed: int, total_steps: int, lrs: tuple[float, float] = (0.02, 0.005)):
    """A fresh model + AdamW + OneCycleLR (its state_dict is plain data; it also edits betas)."""
    torch.manual_seed(seed)
    model = Net()
    opt = make_optimizer("adamw", model, lrs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.05, 0.01], total_steps=total_steps)
    return model, opt, sched


def train_step(model: Net, opt: torch.optim.Optimizer, sched, data, i: int) -> float:
    x, y = data
    lo = (i * BATCH) % N_SAMPLES
    xb, yb = x[lo : lo + BATCH], y[lo : lo + BATCH]
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(xb), yb)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return loss.item()


def resume_main(directory: str, step: int, total: int) -> None:
    import ckptmirror

    torch.set_num_threads(1)
    model, opt, sched = build(seed=999, total_steps=total, lrs=(0.7, 0.3))
    with ckptmirror.Mirror([directory]) as m:
        res = m.restore(model, opt, step=step)
    assert res is not None and res.step == step
    sched.load_state_dict(res.extra["sched"])
    torch.set_rng_state(res.extra["torch_rng"])
    data = make_data()
    losses = [train_step(model, opt, sched, data, i) for i in range(step, total)]
    print(json.dumps([float.hex(v) for v in losses]))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "resume":
        resume_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit("usage: _models.py resume DIR STEP TOTAL")
