"""``ckptmirror demo``: async saves during training, a killed process, a verified restore.

The demo runs the training loop in a child process (so the crash is a real SIGKILL, not an
exception), then restores in this process and checks the result bit for bit against an
uninterrupted run of the same deterministic training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

SEED = 1234


def build(seed: int = SEED) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The demo model (about 1.2M parameters) and its AdamW optimizer, deterministically initialised."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 16)
    )
    optim = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 2e-3}, {"params": list(model[2].parameters()) + list(model[4].parameters())}], lr=1e-3)
    return model, optim


def train_step(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> float:
    """One deterministic step: the batch depends only on the step number."""
    g = torch.Generator().manual_seed(SEED + step)
    x = torch.randn(64, 256, generator=g)
    y = torch.randn(64, 16, generator=g)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return float(loss.detach())


def replica_urls(root: str) -> list[str]:
    """The replicas the demo writes to."""
    return [os.path.join(root, "node0-local")]


def child(root: str, steps: int, save_every: int) -> None:
    """The training process: trains, saves every ``save_every`` steps, reports on stdout."""
    import ckptmirror

    torch.set_num_threads(1)
    model, optim = build()
    mirror = ckptmirror.Mirror(replica_urls(root), keep_last=3)
    pending: list[Any] = []
    for step in range(1, steps + 1):
        loss = train_step(model, optim, step)
        if step % save_every == 0:
            h = mirror.save(step, model, optim, extra={"loss": loss})
            pending.append(h)
        for h in [h for h in pending if h.done()]:
            h.result()
            pending.remove(h)
            print(json.dumps({"event": "committed", "step": h.step, "stall_s": h.stall_s, "committed_s": h.committed_s, "bytes": h.nbytes}), flush=True)
        print(json.dumps({"event": "step", "step": step, "loss": loss}), flush=True)
        time.sleep(0.02)  # a real step takes longer; leaves room for the background writer
    mirror.close()


def _state_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


def run_demo(directory: str | None, steps: int, save_every: int) -> int:
    """Run the whole demo; returns the process exit status (0: restored bit-exact)."""
    import ckptmirror

    root = directory or tempfile.mkdtemp(prefix="ckptmirror-demo-")
    if os.path.exists(root) and os.listdir(root):
        shutil.rmtree(root)
    os.makedirs(root, exist_ok=True)
    kill_at = max(save_every * 2 + 1, steps * 3 // 4)
    print(f"ckptmirror {ckptmirror.__version__} demo: replicas {replica_urls(root)}")
    print(f"training in a child process; it saves every {save_every} steps and is SIGKILLed at step {kill_at}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptmirror.demo", "--child", root, str(steps), str(save_every)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    commits = []
    for line in proc.stdout:
        ev = json.loads(line)
        if ev["event"] == "committed":
            commits.append(ev)
            print(f"  step {ev['step']:>4}: saved {ev['bytes'] / 1e6:.1f} MB, training stalled {ev['stall_s'] * 1e3:.1f} ms, committed after {ev['committed_s'] * 1e3:.0f} ms")
        elif ev["step"] >= kill_at:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    print(f"child killed with SIGKILL at step {kill_at} (exit status {proc.returncode})")

    torch.set_num_threads(1)
    model, optim = build(seed=999)  # a "replacement node": different initial weights
    t0 = time.perf_counter()
    with ckptmirror.Mirror(replica_urls(root)) as mirror:
        print(f"committed steps on disk: {mirror.steps()}")
        result = mirror.restore(model, optim)
    if result is None:
        print("no checkpoint was committed before the crash")
        return 1
    print(f"restored step {result.step} in {(time.perf_counter() - t0) * 1e3:.0f} ms (checksums verified), loss then {result.extra['loss']:.6f}")

    ref_model, ref_optim = build()
    for step in range(1, result.step + 1):
        train_step(ref_model, ref_optim, step)
    same = _state_equal(ref_model.state_dict(), model.state_dict()) and _state_equal(ref_optim.state_dict(), optim.state_dict())
    print(f"bit-exact against an uninterrupted run to step {result.step}: {'yes' if same else 'NO'}")
    nxt = result.step + 1
    a, b = train_step(model, optim, nxt), train_step(ref_model, ref_optim, nxt)
    print(f"step {nxt} after restore: loss {a:.6f} (uninterrupted run: {b:.6f}, {'identical' if a == b else 'DIFFERENT'})")
    if directory is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if same and a == b else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: python -m ckptmirror.demo --child ROOT STEPS SAVE_EVERY (use 'ckptmirror demo')")
