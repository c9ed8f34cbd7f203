"""Hugging Face ``Trainer``: asynchronous, replicated checkpoints through a callback.

The two lines a user adds::

    from ckptmirror.integrations.transformers import MirrorCallback, materialize

    replicas = ["/local/nvme/ckpt/run1", "s3://bucket/ckpt/run1"]
    args = TrainingArguments(output_dir="out", save_strategy="no", ...)  # HF's own saving off
    trainer = Trainer(model, args, ..., callbacks=[MirrorCallback(replicas, save_steps=500)])  # line 1
    trainer.train(resume_from_checkpoint=materialize(replicas, args.output_dir))  # line 2

How it works:

- :class:`MirrorCallback` saves every ``save_steps`` optimizer steps (and at the last step, as
  HF does): the model, the optimizer, the LR scheduler, the grad scaler if any, the RNG states
  (python, numpy, torch CPU and accelerator) and the ``TrainerState`` as JSON. ``save()``
  returns after one copy into staging memory; hashing and writing to every replica happen in
  the background. HF's own ``on_save`` fires only after HF wrote its files (and not at all with
  ``save_strategy="no"``), so a callback there would save no time: the callback replaces HF's
  saving (``save_strategy="no"``) instead of doubling it.
- The snapshot is taken where HF's own ``_save_checkpoint`` would take it: ``on_step_end``
  marks the step, and the save runs when ``Trainer._maybe_log_save_evaluate`` returns for that
  step (the callback wraps that method on the Trainer instance from ``on_train_begin`` to
  ``on_train_end``), after the step's logging and evaluation. Evaluation draws from the torch
  RNG (the eval DataLoader's iterator takes a seed) and updates ``log_history``,
  ``best_metric`` and stateful callbacks such as ``EarlyStoppingCallback``, some of it after
  every ``on_evaluate`` callback has run: a snapshot taken earlier would resume with another
  RNG state than HF's own resume, and without that step's evaluation. Where the Trainer is
  not found (or has no such method) the callback saves at ``on_step_end`` instead, with a
  WARNING.
- :func:`materialize` loads the newest step that verifies on any replica (falling back object
  by object to another replica, and step by step to older steps) and writes it back out as
  ``output_dir/checkpoint-N`` in the Trainer's own layout. ``trainer.train(resume_from_checkpoint=
  path)`` then runs HF's resume logic unchanged: the weights, optimizer, scheduler and scaler,
  the skipping of the batches already seen in the current epoch, and the RNG restore after it.
  On a fresh run (no checkpoint anywhere) it returns None and ``train(resume_from_checkpoint=
  None)`` starts from scratch. Checkpoints that exist but none of which verifies raise
  :class:`~ckptmirror.NoValidCheckpointError`: never a silent restart.

What HF needs on disk (transformers 5.24; checked in ``Trainer._load_from_checkpoint``,
``_load_optimizer_and_scheduler``, ``_load_scaler`` and ``_load_rng_state``):

============================  ==========================================================
file                          how HF reads it
============================  ==========================================================
``model.safetensors``         ``safetensors.torch.load_file`` (no pickle)
``trainer_state.json``        ``TrainerState.load_from_json`` (JSON)
``config.json``               only for a version warning (JSON; written when the model has one)
``generation_config.json``    not on resume; written for generating models, as ``save_pretrained`` does
``optimizer.pt``              ``torch.load(weights_only=True)``: a torch.save pickle, no other format
``scheduler.pt``              ``torch.load(weights_only=True)``: likewise
``scaler.pt``                 ``torch.load(weights_only=True)``: likewise (only with a grad scaler)
``rng_state.pth``             ``torch.load(weights_only=True)`` under ``safe_globals()``: likewise
============================  ==========================================================

HF accepts no safetensors or JSON alternative for the optimizer, scheduler, scaler and RNG
files, so :func:`materialize` writes those four with ``torch.save`` - only inside the
materialized directory, which HF reads with its restricted ``weights_only=True`` unpickler.
The replicas themselves hold no pickle: JSON manifests and raw tensor bytes, as always. The
materialized directory is a disposable cache of what the replicas hold: :func:`materialize`
replaces the ones it wrote before and never touches a ``checkpoint-N`` it did not write.
``training_args.bin`` (a full, unrestricted pickle of ``TrainingArguments``) is not written: HF
does not read it on resume.

Scope: one training process (``args.world_size == 1``), without DeepSpeed or FSDP (their
checkpoints are sharded files of their own); the callback raises ``NotImplementedError`` at
``on_train_begin`` otherwise. The saved ``TrainerState`` is the one HF would save at that
step: its ``log_history`` holds that step's loss log and evaluation. ``best_global_step`` and
``best_model_checkpoint`` stay unset, as in any run with ``save_strategy="no"`` (HF sets them
only for checkpoints it writes itself).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import shutil
import sys
import uuid
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback  # type: ignore[import-not-found,unused-ignore]  # optional extra

from ..handle import SaveHandle
from ..mirror import Mirror
from ..replicas import Replica

log = logging.getLogger("ckptmirror")

__all__ = ["FORMAT", "MirrorCallback", "materialize"]

#: Stored with every step, checked by :func:`materialize` (a step saved by another writer, e.g.
#: a plain ``Mirror.save``, is refused with a clear error instead of a KeyError).
FORMAT = "ckptmirror.transformers/1"
#: The file in a materialized ``checkpoint-N`` that says ckptmirror wrote it (JSON).
MARKER = "ckptmirror.json"

# HF's file names (transformers/trainer.py); the layout HF's resume reads.
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_GENERATION_CONFIG = "generation_config.json"
_TRAINER_STATE = "trainer_state.json"
_OPTIMIZER = "optimizer.pt"
_SCHEDULER = "scheduler.pt"
_SCALER = "scaler.pt"
_RNG = "rng_state.pth"
#: Where materialize writes before the rename (in output_dir; HF's ``checkpoint-N`` regex skips it).
_TMP_PREFIX = ".ckptmirror-tmp-checkpoint-"


class MirrorCallback(TrainerCallback):  # type: ignore[misc,unused-ignore]  # Any where transformers is absent
    """Save the Trainer's full training state to ckptmirror replicas every ``save_steps`` steps.

    Args:
        replicas: replica URLs or :class:`~ckptmirror.Replica` objects, as for :class:`~ckptmirror.Mirror`.
        save_steps: save when ``state.global_step`` is a multiple of this, and at the last step.
        **mirror_options: passed to :class:`~ckptmirror.Mirror` (``keep_last``, ``storage_options``,
            ``min_replicas``, ...). ``distributed`` is always False: one process saves.

    The mirror opens at ``on_train_begin`` (a misconfigured replica raises there, before the first
    step) and closes at ``on_train_end``, which waits for the last save and raises if it failed.
    :attr:`mirror` and :attr:`last_handle` are there for logging (``last_handle.stall_s``,
    ``add_done_callback``).
    """

    def __init__(self, replicas: Sequence[str | Replica], save_steps: int, **mirror_options: Any) -> None:
        if isinstance(save_steps, bool) or not isinstance(save_steps, int) or save_steps < 1:
            raise ValueError(f"save_steps must be a positive int, got {save_steps!r}")
        if "distributed" in mirror_options:
            raise ValueError("MirrorCallback saves from one process: do not pass distributed=")
        self.replicas = [replicas] if isinstance(replicas, (str, Replica)) else list(replicas)
        self.save_steps = save_steps
        self.mirror_options = mirror_options
        self.mirror: Mirror | None = None
        self.last_handle: SaveHandle | None = None
        self._trainer: Any = None
        self._preexisting: set[int] = set()
        #: The step marked at ``on_step_end``, saved when HF's ``_maybe_log_save_evaluate`` returns.
        self._pending: int | None = None
        #: Whether ``_maybe_log_save_evaluate`` is wrapped (else: save at ``on_step_end``).
        self._hooked = False

    # ------------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = _find_trainer()
        _check_supported(args, trainer)
        if str(getattr(args.save_strategy, "value", args.save_strategy)) != "no":
            log.warning(
                "MirrorCallback with save_strategy=%r: HF also writes its own (synchronous, pickled) checkpoints; "
                "set save_strategy='no' to keep only the asynchronous ckptmirror saves",
                str(getattr(args.save_strategy, "value", args.save_strategy)),
            )
        self._trainer = trainer
        self._pending = None
        if self.mirror is None:
            self.mirror = Mirror(self.replicas, distributed=False, **self.mirror_options)
            self._preexisting = set(self.mirror.steps())
        self._hooked = self._hook(trainer)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = int(state.global_step)
        if step % self.save_steps == 0 or (state.max_steps and step >= state.max_steps):
            if self._hooked:
                # HF logs, evaluates (RNG draws, log_history, best_metric, EarlyStopping) and
                # saves its own checkpoint after on_step_end: save where it would.
                self._pending = step
            else:
                self.save(state, control, kwargs.get("model"), kwargs.get("optimizer"), kwargs.get("lr_scheduler"))

    # A marked step still unsaved here means that _maybe_log_save_evaluate did not run after
    # on_step_end (a Trainer subclass with a loop of its own): save it late rather than never.
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._save_pending(late=True)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._save_pending(late=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        try:
            self._save_pending(late=True)
        finally:
            self.close()

    # ------------------------------------------------------------------ save point
    def _hook(self, trainer: Any) -> bool:
        """Wrap ``trainer._maybe_log_save_evaluate`` (on the instance) to save the marked step
        when it returns: HF's own save point, after the step's logging and evaluation."""
        if trainer is None:
            return False
        inner = getattr(trainer, "_maybe_log_save_evaluate", None)
        if not callable(inner):
            log.warning(
                "MirrorCallback: %s has no _maybe_log_save_evaluate; saving at on_step_end, before the step's "
                "logging and evaluation (a resume may not be bit-exact when evaluation runs on a save step)",
                type(trainer).__name__,
            )
            return False
        owner = getattr(inner, "_ckptmirror_callback", None)
        if owner is self:
            return True  # still in place: an earlier train() raised before on_train_end
        if owner is not None:
            # Left by another MirrorCallback whose train() raised (no on_train_end): unwrap it,
            # so that its callback (and its mirror) is not held, nor saves twice.
            inner = inner.__wrapped__

        @functools.wraps(inner)
        def maybe_log_save_evaluate_then_mirror(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            self._save_pending()
            return out

        maybe_log_save_evaluate_then_mirror._ckptmirror_callback = self  # type: ignore[attr-defined]
        trainer._maybe_log_save_evaluate = maybe_log_save_evaluate_then_mirror
        return True

    def _unhook(self, trainer: Any) -> None:
        wrapper: Callable[..., Any] | None = vars(trainer).get("_maybe_log_save_evaluate") if trainer else None
        if wrapper is not None and getattr(wrapper, "_ckptmirror_callback", None) is self:
            del trainer._maybe_log_save_evaluate  # the class's method again
        self._hooked = False

    def _save_pending(self, late: bool = False) -> None:
        step, self._pending = self._pending, None
        trainer = self._trainer
        if step is None or trainer is None:
            return
        if late:
            log.warning(
                "MirrorCallback: Trainer._maybe_log_save_evaluate did not run after step %d; saving it now", step
            )
        state = trainer.state
        if int(state.global_step) != step:
            raise RuntimeError(
                f"MirrorCallback: step {step} was to be saved, but the Trainer is at {state.global_step}"
            )
        handler = trainer.callback_handler
        self.save(state, trainer.control, handler.model, handler.optimizer, handler.lr_scheduler)

    # ----------------------------------------------------------------------- saving
    def save(self, state: Any, control: Any, model: Any, optimizer: Any, lr_scheduler: Any) -> SaveHandle:
        """Snapshot the training state as step ``state.global_step``; return once it is copied."""
        if self.mirror is None:
            raise RuntimeError("MirrorCallback.save before on_train_begin (or after on_train_end)")
        if model is None or optimizer is None:
            raise RuntimeError("MirrorCallback needs the Trainer's model and optimizer (callback kwargs)")
        step = int(state.global_step)
        payload = {
            "format": FORMAT,
            "model": model.state_dict(),
            # Tied weights (GPT-2's lm_head = wte) are one tensor under two keys; HF writes one.
            "tied": _tied_keys(model),
            "config": _config_json(model),
            "generation_config": _generation_config_json(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            "scaler": _scaler_state(self._trainer, optimizer),
            "rng": _rng_state(),
            "trainer_state": self._trainer_state_json(state, control),
        }
        # A step committed before this run began belongs to an abandoned timeline (a resume from
        # an older step): replace it, as HF replaces checkpoint-N. Steps of this run only grow.
        overwrite = step in self._preexisting
        self.last_handle = self.mirror.save_state(step, payload, overwrite=overwrite)
        return self.last_handle

    def _trainer_state_json(self, state: Any, control: Any) -> str:
        """``trainer_state.json`` as HF's ``_save_checkpoint`` would write it now, without
        changing the live state (HF mutates it: stateful callbacks, ``store_flos``)."""
        from transformers.trainer_callback import ExportableState  # type: ignore[import-not-found,unused-ignore]

        d = dataclasses.asdict(state)
        trainer = self._trainer
        if trainer is not None:
            # store_flos() folds the flos of the steps since the last save into total_flos.
            d["total_flos"] = float(d.get("total_flos") or 0) + float(getattr(trainer, "current_flos", 0) or 0)
            exportable = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ExportableState)]
        else:
            exportable = []
        stateful: dict[str, Any] = dict(d.get("stateful_callbacks") or {})
        by_name: dict[str, list[Any]] = {}
        for cb in [*exportable, control]:
            if isinstance(cb, ExportableState):
                by_name.setdefault(type(cb).__name__, []).append(cb.state())
        for name, states in by_name.items():
            stateful[name] = states[0] if len(states) == 1 else states
        d["stateful_callbacks"] = stateful
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def close(self) -> None:
        """Wait for the last save (raises if it failed) and release the mirror."""
        m, self.mirror = self.mirror, None
        if self._trainer is not None:
            self._unhook(self._trainer)
        self._trainer = None
        self._pending = None
        if m is not None:
            m.close()


def materialize(
    replicas: Sequence[str | Replica],
    output_dir: str | os.PathLike[str],
    step: int | None = None,
    **mirror_options: Any,
) -> str | None:
    """Write the newest verified step (or ``step``) as ``output_dir/checkpoint-N``; return its path.

    Returns None when no replica holds a checkpoint (a fresh run; a WARNING names the replicas
    looked at). ``step`` given and missing raises :class:`~ckptmirror.StepNotFoundError`;
    checkpoints that exist but none of which verifies raise :class:`~ckptmirror.NoValidCheckpointError`.

    The directory is written under a temporary name and renamed into place, so HF never sees a
    half-written ``checkpoint-N``. Earlier directories this function wrote (they hold
    ``ckptmirror.json``) are replaced; a ``checkpoint-N`` that HF itself wrote raises
    ``FileExistsError`` instead of being overwritten.
    """
    if "distributed" in mirror_options:
        raise ValueError("materialize reads from one process: do not pass distributed=")
    reps = [replicas] if isinstance(replicas, (str, Replica)) else list(replicas)
    with Mirror(reps, distributed=False, **mirror_options) as m:
        loaded = m.load_state(step, require=step is not None)
        urls = [r.url for r in m.replicas]
    if loaded is None:
        return None
    n, state = loaded
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"step {n} on {urls} was not saved by ckptmirror.integrations.transformers.MirrorCallback "
            f"(format {state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
            f"expected {FORMAT!r})"
        )
    out = os.fspath(output_dir)
    os.makedirs(out, exist_ok=True)
    final = os.path.join(out, f"checkpoint-{n}")
    if os.path.exists(final) and not os.path.isfile(os.path.join(final, MARKER)):
        raise FileExistsError(
            f"{final} exists and was not written by ckptmirror (an HF checkpoint?): "
            f"resume from it directly, or move it away"
        )
    # Same directory as the target, so the rename is atomic; HF's checkpoint regex skips it.
    tmp = os.path.join(out, f"{_TMP_PREFIX}{n}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        _write_checkpoint_dir(tmp, n, state, urls)
        if os.path.exists(final):
            old = f"{tmp}-old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_older_materializations(out, keep=final)
    log.info("materialized step %d from %s as %s", n, ", ".join(urls), final)
    return final


# ------------------------------------------------------------------------------ helpers
def _write_checkpoint_dir(path: str, step: int, state: dict[str, Any], urls: list[str]) -> None:
    """The Trainer's checkpoint layout; see the module docstring for which file is read how."""
    from safetensors.torch import save_file

    tied = state.get("tied") or {}
    weights = {k: v.contiguous() for k, v in state["model"].items() if k not in tied}
    save_file(weights, os.path.join(path, _WEIGHTS), metadata={"format": "pt"})
    if state.get("config") is not None:
        _write_text(os.path.join(path, _CONFIG), state["config"])
    if state.get("generation_config") is not None:
        _write_text(os.path.join(path, _GENERATION_CONFIG), state["generation_config"])
    _write_text(os.path.join(path, _TRAINER_STATE), state["trainer_state"])
    # HF reads these four only through torch.load(weights_only=True): torch.save is the one
    # format it accepts. They exist only here, never in the replicas.
    torch.save(state["optimizer"], os.path.join(path, _OPTIMIZER))
    if state.get("scheduler") is not None:
        torch.save(state["scheduler"], os.path.join(path, _SCHEDULER))
    if state.get("scaler") is not None:
        torch.save(state["scaler"], os.path.join(path, _SCALER))
    torch.save(state["rng"], os.path.join(path, _RNG))
    _write_text(
        os.path.join(path, MARKER),
        json.dumps({"step": step, "replicas": urls, "format": FORMAT}, indent=2) + "\n",
    )


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _remove_older_materializations(out: str, keep: str) -> None:
    """Drop other ``checkpoint-*`` directories this module wrote (caches of the replicas; a stale
    one would be picked by ``resume_from_checkpoint=True`` if its step were higher) and temporary
    directories left by an interrupted materialize."""
    for name in os.listdir(out):
        p = os.path.join(out, name)
        if name.startswith(_TMP_PREFIX):
            # Left by a materialize that crashed mid-write (ours by name; HF never reads them).
            shutil.rmtree(p, ignore_errors=True)
        elif p != keep and name.startswith("checkpoint-") and os.path.isfile(os.path.join(p, MARKER)):
            shutil.rmtree(p, ignore_errors=True)


def _find_trainer() -> Any:
    """The Trainer that is calling this callback, from the call stack.

    Callbacks get the model, optimizer and scheduler, but not the Trainer; the grad scaler
    (``trainer.accelerator.scaler``), the other stateful callbacks and the flos counter are only
    there. ``on_train_begin`` is called from ``Trainer._inner_training_loop`` through
    ``CallbackHandler``: a few frames up. None if not found (then the scaler comes from the
    prepared optimizer and only ``TrainerControl``'s state is recorded).
    """
    from transformers import Trainer  # type: ignore[import-not-found,unused-ignore]

    frame: FrameType | None = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            break
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back
    log.warning("MirrorCallback: could not find the Trainer on the call stack; saving without its extras")
    return None


def _check_supported(args: Any, trainer: Any) -> None:
    if int(getattr(args, "world_size", 1)) > 1:
        raise NotImplementedError(
            "MirrorCallback supports one training process (args.world_size == 1) for now; "
            f"this run has {args.world_size}"
        )
    if trainer is not None and (getattr(trainer, "is_deepspeed_enabled", False) or trainer.is_fsdp_enabled):
        raise NotImplementedError("MirrorCallback does not cover DeepSpeed or FSDP (their checkpoints are sharded)")


def _tied_keys(model: Any) -> dict[str, str]:
    """``{duplicate key: kept key}`` for state-dict entries that are the same tensor memory.

    The first key in state-dict order is kept (for GPT-2, ``transformer.wte.weight``; HF drops
    ``lm_head.weight`` the same way). HF loads with ``strict=False`` into the tied model, so
    loading one of them sets both.
    """
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    tied: dict[str, str] = {}
    for k, v in model.state_dict(keep_vars=False).items():
        if not isinstance(v, torch.Tensor) or v.device.type == "meta":
            continue
        ident = (v.untyped_storage().data_ptr(), int(v.storage_offset()), tuple(v.shape), tuple(v.stride()), v.dtype)
        if ident in seen:
            tied[k] = seen[ident]
        else:
            seen[ident] = k
    return tied


def _config_json(model: Any) -> str | None:
    """``config.json`` as ``save_pretrained`` writes it (it adds ``architectures`` and ``dtype``)."""
    config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    if not callable(to_json):
        return None
    d = json.loads(to_json())
    d.setdefault("architectures", [type(model).__name__])
    dtype = getattr(model, "dtype", None)
    if "dtype" not in d and isinstance(dtype, torch.dtype):
        d["dtype"] = str(dtype).removeprefix("torch.")
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def _generation_config_json(model: Any) -> str | None:
    """``generation_config.json`` for models that generate (``save_pretrained`` writes it too)."""
    can_generate = getattr(model, "can_generate", None)
    gen = getattr(model, "generation_config", None)
    if not callable(can_generate) or gen is None or not can_generate():
        return None
    return str(gen.to_json_string())


def _scaler_state(trainer: Any, optimizer: Any) -> dict[str, Any] | None:
    """The grad scaler's state: the accelerator's, else the prepared optimizer's (same object)."""
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    if scaler is None:
        scaler = getattr(optimizer, "scaler", None)
    return scaler.state_dict() if scaler is not None else None


def _rng_state() -> dict[str, Any]:
    """What HF's ``_save_rng_state`` stores for one process (same keys, same order)."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state()
    from transformers.utils import (  # type: ignore[import-not-found,unused-ignore]
        is_torch_hpu_available,
        is_torch_mlu_available,
        is_torch_musa_available,
        is_torch_npu_available,
        is_torch_xla_available,
    )

    if is_torch_xla_available():
        import torch_xla.core.xla_model as xm  # type: ignore[import-not-found,unused-ignore]

        states["xla"] = xm.get_rng_state()
    for name, available in (
        ("npu", is_torch_npu_available),
        ("hpu", is_torch_hpu_available),
        ("mlu", is_torch_mlu_available),
        ("musa", is_torch_musa_available),
    ):
        if available():
            states[name] = getattr(torch, name).get_rng_state()
    return states
