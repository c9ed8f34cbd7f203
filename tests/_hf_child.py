"""Child process for tests/test_hf_trainer.py: a tiny GPT-2 trained by the HF Trainer on the CPU.

Modes (one JSON line on stdout at the end, for the test to read):

- ``crash``: train with :class:`MirrorCallback`, and at ``--crash-at`` wait for the saves in
  flight to commit, then ``os._exit`` (no cleanup, no atexit: a hard crash).
- ``resume``: :func:`materialize` the newest verified step into ``--out`` and continue with
  ``trainer.train(resume_from_checkpoint=path)``; write the final weights to ``--weights``.
- ``reference``: the same run, uninterrupted, without any checkpointing; final weights to ``--weights``.
- ``native``: the same run with HF's own ``save_strategy="steps"`` (its checkpoints for comparison);
  ``resume --from-checkpoint DIR`` is HF's own resume from one of them.

``--cuda`` trains on the GPU in fp16 (a grad scaler) with HF's ``full_determinism``.
``--eval-steps N`` evaluates every N steps on a small eval set (the eval DataLoader draws from the
torch RNG), tracks ``best_metric`` (eval_loss) and adds an ``EarlyStoppingCallback`` (a stateful
callback, after the MirrorCallback in the list; its counter moves at every evaluation) that never
stops this short run.

The model has dropout and the data is shuffled, so a resume is bit-exact only if the RNG states,
the data position and the optimizer/scheduler states all come back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (
    EarlyStoppingCallback,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ckptmirror.integrations.transformers import MirrorCallback, materialize

SEED = 0
SAMPLES = 40  # 10 optimizer steps per epoch at batch size 4


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Fixed random token sequences; labels = inputs (causal LM)."""

    def __init__(self, n: int = SAMPLES, length: int = 8, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def build_model(width: int = 16, layers: int = 1, cuda: bool = False) -> GPT2LMHeadModel:
    torch.manual_seed(SEED)
    cfg = GPT2Config(
        vocab_size=64, n_positions=16, n_embd=width, n_layer=layers, n_head=2, bos_token_id=0, eos_token_id=0
    )
    if cuda:
        # Eager attention: fused SDPA kernels may lack deterministic backward passes on a GPU.
        cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)  # dropout 0.1 everywhere: the RNG matters


def make_trainer(
    out: str,
    max_steps: int,
    callbacks: list[Any],
    save_strategy: str = "no",
    save_steps: int = 500,
    width: int = 16,
    layers: int = 1,
    samples: int = SAMPLES,
    cuda: bool = False,
    eval_steps: int = 0,
    logging_steps: int = 5,
) -> Trainer:
    evaluating = eval_steps > 0
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        max_steps=max_steps,
        learning_rate=1e-3,
        warmup_steps=3,
        lr_scheduler_type="linear",
        save_strategy=save_strategy,
        save_steps=save_steps,
        logging_steps=logging_steps,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=eval_steps or None,
        per_device_eval_batch_size=4,
        metric_for_best_model="eval_loss" if evaluating else None,
        greater_is_better=False if evaluating else None,
        report_to=[],
        use_cpu=not cuda,
        # On a GPU: fp16 with a grad scaler (saved and restored too), deterministic kernels.
        fp16=cuda,
        full_determinism=cuda,
        seed=SEED,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if evaluating:
        # No eval loss improves by 1.0 here: its counter counts the evaluations after the first.
        callbacks = [*callbacks, EarlyStoppingCallback(early_stopping_patience=1000, early_stopping_threshold=1.0)]
    return Trainer(
        model=build_model(width, layers, cuda),
        args=args,
        train_dataset=Tokens(samples),
        eval_dataset=Tokens(6) if evaluating else None,
        callbacks=callbacks,
    )


class Crash(TrainerCallback):  # type: ignore[misc]
    """At step ``at``, after the MirrorCallback (earlier in the list) queued its save: wait for the
    saves to commit, then die without any cleanup."""

    def __init__(self, mirror_cb: MirrorCallback, at: int) -> None:
        self.mirror_cb = mirror_cb
        self.at = at

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.at:
            assert self.mirror_cb.mirror is not None
            self.mirror_cb.mirror.wait()
            print(json.dumps({"crashed_at": state.global_step}), flush=True)
            os._exit(17)


def final_weights(trainer: Trainer, path: str) -> None:
    sd = {k: v.cpu() for k, v in trainer.model.state_dict().items()}
    # lm_head.weight is wte.weight (tied): write one copy.
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items() if k != "lm_head.weight"}, path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["crash", "resume", "reference", "native"])
    p.add_argument("--replicas", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default="")
    p.add_argument("--max-steps", type=int, default=15)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--crash-at", type=int, default=10)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--samples", type=int, default=SAMPLES)
    p.add_argument("--cuda", action="store_true", help="train on the GPU, fp16 (grad scaler), deterministic")
    p.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps (0: no evaluation)")
    p.add_argument("--logging-steps", type=int, default=5)
    p.add_argument("--from-checkpoint", default="", help="resume: HF's own resume from this directory")
    a = p.parse_args()
    replicas = [r for r in a.replicas.split(",") if r]
    size = {
        "width": a.width,
        "layers": a.layers,
        "samples": a.samples,
        "cuda": a.cuda,
        "eval_steps": a.eval_steps,
        "logging_steps": a.logging_steps,
    }
    report: dict[str, Any] = {}
    t0 = time.perf_counter()
    if a.mode == "crash":
        cb = MirrorCallback(replicas, save_steps=a.save_steps)
        trainer = make_trainer(a.out, a.max_steps, [cb], **size)
        trainer.add_callback(Crash(cb, a.crash_at))
        trainer.train()
        report["finished"] = True  # not reached when --crash-at <= --max-steps
    elif a.mode == "resume" and a.from_checkpoint:
        trainer = make_trainer(a.out, a.max_steps, [], **size)
        trainer.train(resume_from_checkpoint=a.from_checkpoint)
        final_weights(trainer, a.weights)
    elif a.mode == "resume":
        cb = MirrorCallback(replicas, save_steps=a.save_steps)
        trainer = make_trainer(a.out, a.max_steps, [cb], **size)
        path = materialize(replicas, a.out)
        report["resumed_from"] = path
        report["files"] = sorted(os.listdir(path)) if path else []
        trainer.train(resume_from_checkpoint=path)
        final_weights(trainer, a.weights)
        report["stall_s"] = cb.last_handle.stall_s if cb.last_handle else None
        # MirrorCallback wraps Trainer._maybe_log_save_evaluate during train() only.
        report["still_wrapped"] = "_maybe_log_save_evaluate" in vars(trainer)
    elif a.mode == "reference":
        trainer = make_trainer(a.out, a.max_steps, [], **size)
        trainer.train()
        final_weights(trainer, a.weights)
    else:
        trainer = make_trainer(a.out, a.max_steps, [], save_strategy="steps", save_steps=a.save_steps, **size)
        trainer.train()
        if a.weights:
            final_weights(trainer, a.weights)
    report["train_s"] = time.perf_counter() - t0
    report["global_step"] = trainer.state.global_step
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    sys.exit(main())
