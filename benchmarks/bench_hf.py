"""Training time lost per checkpoint: the frameworks' own checkpointing against ckptmirror.

For each framework (the HF Trainer, an Accelerate loop), the same model trains the same number
of steps three times, each in a fresh process:

- ``none``: no checkpoints (the baseline);
- ``native``: the framework's own saving every ``--every`` steps (Trainer ``save_strategy="steps"``,
  ``accelerator.save_state``), synchronous, to the local disk;
- ``ckptmirror``: ``MirrorCallback`` / ``MirrorState`` every ``--every`` steps to one local
  replica on the same disk (asynchronous; the run ends only when the last save is durable).

Reported per run: the training wall time (model built and prepared before the clock starts;
for ckptmirror the final wait for the last save is included), the stall per save (seconds the
training thread spent inside the save call, median) and the time lost per checkpoint:
(wall time - the baseline's) / number of saves. On a shared 2-core machine the wall-time
difference is noisy (the background writes compete with training for the same cores); the stall
is the direct measure. Note that the frameworks' saves do not fsync, ckptmirror's do.

Run::

    python benchmarks/bench_hf.py                 # ~13M-parameter GPT-2 / ~9M-parameter MLP, CPU
    python benchmarks/bench_hf.py --device cuda --width 1024 --layers 8 --json out.json  # ~100M / ~75M
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

FRAMEWORKS = ("transformers", "accelerate")
MODES = ("none", "native", "ckptmirror")


def dir_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


# --------------------------------------------------------------------------- one run
def run_transformers(mode: str, a: argparse.Namespace, work: str) -> dict[str, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from ckptmirror.integrations.transformers import MirrorCallback

    class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(self) -> None:
            self.x = torch.randint(0, 1024, (4096, 16), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.x[i], "labels": self.x[i]}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=1024, n_positions=16, n_embd=a.width, n_layer=a.layers, n_head=8, bos_token_id=0,
                   eos_token_id=0)
    )  # fmt: skip
    stalls: list[float] = []
    callbacks = []
    if mode == "ckptmirror":
        cb = MirrorCallback([f"{work}/replica"], save_steps=a.every)
        save = cb.save

        def timed_save(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return save(*args, **kwargs)
            finally:
                stalls.append(time.perf_counter() - t)

        cb.save = timed_save  # type: ignore[method-assign]
        callbacks.append(cb)
    args = TrainingArguments(
        output_dir=f"{work}/out",
        max_steps=a.steps,
        per_device_train_batch_size=8,
        save_strategy="steps" if mode == "native" else "no",
        save_steps=a.every,
        report_to=[],
        use_cpu=a.device == "cpu",
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
    if mode == "native":
        native = trainer._save_checkpoint

        def timed_native(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return native(*args, **kwargs)
            finally:
                stalls.append(time.perf_counter() - t)

        trainer._save_checkpoint = timed_native  # type: ignore[method-assign]
    t0 = time.perf_counter()
    trainer.train()  # MirrorCallback.on_train_end waits for the last save
    wall = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return {"wall_s": wall, "stalls": stalls, "params": params}


def run_accelerate(mode: str, a: argparse.Namespace, work: str) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from ckptmirror.integrations.accelerate import MirrorState

    set_seed(0)
    acc = Accelerator(
        cpu=a.device == "cpu", project_config=ProjectConfiguration(project_dir=work, automatic_checkpoint_naming=True)
    )
    w = a.width * 3
    layers: list[torch.nn.Module] = []
    for _ in range(a.layers):
        layers += [torch.nn.Linear(w, w), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(w, 1))
    x = torch.randn(4096, w, generator=torch.Generator().manual_seed(1))
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=32, shuffle=True)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optim, dl = acc.prepare(model, optim, dl)
    ckpt = MirrorState(acc, [f"{work}/replica"]) if mode == "ckptmirror" else None
    stalls: list[float] = []
    t0 = time.perf_counter()
    step = 0
    while step < a.steps:
        for xb, yb in dl:
            acc.backward(torch.nn.functional.mse_loss(model(xb), yb))
            optim.step()
            optim.zero_grad()
            step += 1
            if step % a.every == 0 and mode != "none":
                t = time.perf_counter()
                if ckpt is not None:
                    ckpt.save(step)
                else:
                    acc.save_state()
                stalls.append(time.perf_counter() - t)
            if step == a.steps:
                break
    if ckpt is not None:
        ckpt.close()  # the last save is durable before the clock stops
    if a.device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "stalls": stalls, "params": sum(p.numel() for p in model.parameters())}


def child(framework: str, mode: str, a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bench-hf-{framework}-{mode}-", dir=a.dir) as work:
        fn = run_transformers if framework == "transformers" else run_accelerate
        out = fn(mode, a, work)
        out["ckpt_bytes"] = (
            dir_bytes(f"{work}/replica")
            if mode == "ckptmirror"
            else dir_bytes(f"{work}/out" if framework == "transformers" else f"{work}/checkpoints")
            if mode == "native"
            else 0
        )
        print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------ parent
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="checkpoint interval in steps")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dir", default=None, help="where checkpoints go (default: the temp directory)")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=2, metavar=("FRAMEWORK", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a)
        return
    passthrough = ["--steps", str(a.steps), "--every", str(a.every), "--width", str(a.width),
                   "--layers", str(a.layers), "--device", a.device] + (["--dir", a.dir] if a.dir else [])  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), HF_HUB_OFFLINE="1")
    results: dict[str, dict[str, Any]] = {}
    for fw in a.frameworks.split(","):
        # A short throwaway run first: the first process pays for cold caches (imports, files).
        warm = ["--steps", "2", *passthrough[2:]]  # passthrough starts with --steps N
        subprocess.run(
            [sys.executable, __file__, "--child", fw, "none", *warm], capture_output=True, env=env, check=False
        )
        for mode in MODES:
            r = subprocess.run(
                [sys.executable, __file__, "--child", fw, mode, *passthrough],
                capture_output=True, text=True, env=env, check=False,
            )  # fmt: skip
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if r.returncode != 0 or line is None:
                sys.exit(f"{fw}/{mode} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
            results[f"{fw}/{mode}"] = json.loads(line[len("RESULT ") :])
            print(f"  {fw}/{mode}: {results[f'{fw}/{mode}']['wall_s']:.2f} s", file=sys.stderr, flush=True)

    print(
        f"\n{a.steps} steps, a checkpoint every {a.every} steps ({a.steps // a.every} saves); one process, {a.device}\n"
    )
    print("| framework | checkpointing | params | checkpoint MB | train wall s | stall per save s (median) "
          "| time lost per checkpoint s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for fw in a.frameworks.split(","):
        base = results[f"{fw}/none"]["wall_s"]
        for mode in MODES:
            r = results[f"{fw}/{mode}"]
            n = len(r["stalls"])
            stall = f"{statistics.median(r['stalls']):.3f}" if n else "-"
            lost = f"{(r['wall_s'] - base) / n:.3f}" if n else "-"
            mb = f"{r['ckpt_bytes'] / 1e6 / n:.0f}" if n else "-"
            print(f"| {fw} | {mode} | {r['params'] / 1e6:.1f}M | {mb} | {r['wall_s']:.2f} | {stall} | {lost} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
