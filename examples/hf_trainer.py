"""Hugging Face Trainer with asynchronous, replicated ckptmirror checkpoints.

The two ckptmirror lines are marked ``# <- ckptmirror``. Run it twice on the CPU (a tiny random
GPT-2, no downloads); the first run is killed at step 25, the second resumes from step 20::

    python examples/hf_trainer.py --crash-at 25
    python examples/hf_trainer.py

Replicas: a "local" and a "remote" directory standing in for node-local NVMe and S3 (pass
``--replicas /nvme/ckpt/run1,s3://bucket/ckpt/run1`` for real ones). HF's own saving is off
(``save_strategy="no"``); ``MirrorCallback`` saves every ``--save-steps`` steps in the background
and ``materialize`` writes the newest verified step back as ``checkpoint-N`` for HF's own resume.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from ckptmirror.integrations.transformers import MirrorCallback, materialize


class RandomTokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int = 256, length: int = 32, vocab: int = 128) -> None:
        self.x = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class CrashAt(TrainerCallback):  # type: ignore[misc]
    """Simulates a node failure: kill the process without any cleanup."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            print(f"simulated crash at step {state.global_step}", flush=True)
            os._exit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/ckptmirror-hf-example")
    p.add_argument("--replicas", default=None, help="comma-separated replica URLs")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--crash-at", type=int, default=0)
    a = p.parse_args()
    replicas = a.replicas.split(",") if a.replicas else [f"{a.dir}/local", f"{a.dir}/remote"]

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2))
    args = TrainingArguments(
        output_dir=f"{a.dir}/out",
        max_steps=a.steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_strategy="no",  # ckptmirror does the saving
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    callbacks: list[TrainerCallback] = [MirrorCallback(replicas, save_steps=a.save_steps, keep_last=2)]  # <- ckptmirror
    if a.crash_at:
        callbacks.append(CrashAt(a.crash_at))
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=materialize(replicas, args.output_dir))  # <- ckptmirror
    print(f"done at step {trainer.state.global_step}")


if __name__ == "__main__":
    main()
