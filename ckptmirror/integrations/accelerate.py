"""Hugging Face Accelerate: ``accelerator.save_state``/``load_state``, asynchronous and replicated.

Usage (the loop is the user's, as with Accelerate's own ``save_state``/``load_state``)::

    from ckptmirror.integrations.accelerate import MirrorState

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    model, optim, dl, sched = accelerator.prepare(model, optim, dl, sched)
    accelerator.register_for_checkpointing(my_stateful_thing)
    ckpt = MirrorState(accelerator, ["/local/nvme/ckpt/run1", "s3://bucket/ckpt/run1"], keep_last=3)

    done = ckpt.load() or 0                     # batches seen; None on a fresh run
    for epoch in range(done // len(dl), epochs):
        dl.set_epoch(epoch)
        skip = done % len(dl) if epoch == done // len(dl) else 0
        for batch in accelerator.skip_first_batches(dl, skip) if skip else dl:
            ...train...
            done += 1
            if done % 100 == 0:
                ckpt.save(done)                 # returns after one copy; writes in the background
    ckpt.close()                                # waits for the last save; raises if it failed

What one step holds - everything ``accelerator.save_state`` writes, nothing pickled (ckptmirror
stores JSON plus raw tensor bytes; an unsupported value raises ``UnsupportedTypeError`` naming
its key path, e.g. ``state['custom'][0]['fn']`` for the first registered object):

- every prepared model (``unwrap_model(...).state_dict()``: no ``module.``/``_orig_mod.`` prefixes,
  so a run saved under DDP resumes in one process and back), optimizer and scheduler;
- the ``state_dict()`` of every object passed to ``register_for_checkpointing``;
- per prepared dataloader: its epoch counter (``iteration``), the seedable sampler's epoch and
  seed, and a ``StatefulDataLoader``'s ``state_dict()`` (``use_stateful_dataloader=True``);
- the grad scaler, ``accelerator.step`` (the gradient-accumulation counter);
- this process's RNG states (python, numpy, torch CPU, and CUDA/XPU/... where present);
- ``project_configuration.iteration`` as ``save_state`` leaves it (one more than before the
  save); :meth:`MirrorState.load` sets it back, so a native ``save_state`` afterwards numbers on.

With several processes (``accelerate launch``), every process calls :meth:`~MirrorState.save`
and :meth:`~MirrorState.load` with the same step: each stores its own part (its RNG states
differ), the step commits when every process's part is durable, and ``load`` agrees on the
newest step every process can restore. Every process stores the whole state, so the replicas
hold ``num_processes`` copies of the (replicated) model; resume with the same number of
processes. FSDP, DeepSpeed, Megatron-LM and XLA are not covered (their checkpoints are sharded
or engine-specific): the constructor raises ``NotImplementedError`` there.

A bit-exact mid-epoch resume needs the data position (skip the batches already seen, as
above) and RNG draws in the same order as the uninterrupted run. As with Accelerate's own
``load_state``, the RNG states come back in ``load()``; creating a DataLoader iterator then draws
its base seed from the global torch RNG unless the DataLoader has its own ``generator``: pass
``DataLoader(..., generator=torch.Generator().manual_seed(seed))`` so that draw does not shift
the RNG (``tests/test_accelerate.py`` resumes bit-exactly that way).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import StateMismatchError
from ..handle import SaveHandle
from ..mirror import Mirror
from ..replicas import Replica

log = logging.getLogger("ckptmirror")

__all__ = ["FORMAT", "MirrorState"]

#: Stored with every step; :meth:`MirrorState.load` refuses a step saved by another writer.
FORMAT = "ckptmirror.accelerate/1"

# Accelerate's distributed types whose models are ordinary (possibly DDP-wrapped) modules.
_SUPPORTED = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
              "MULTI_HPU", "MULTI_NEURON"}  # fmt: skip


class MirrorState:
    """Save and load everything ``accelerator.save_state`` would, asynchronously, to ckptmirror replicas.

    Args:
        accelerator: the ``accelerate.Accelerator``; call ``prepare`` and
            ``register_for_checkpointing`` before the first :meth:`save` or :meth:`load` (they
            read ``accelerator``'s lists at each call).
        replicas: replica URLs or :class:`~ckptmirror.Replica` objects, as for :class:`~ckptmirror.Mirror`.
        **mirror_options: passed to :class:`~ckptmirror.Mirror`. ``keep_last`` defaults to the
            accelerator's ``project_configuration.total_limit``.
    """

    def __init__(self, accelerator: Any, replicas: Sequence[str | Replica], **mirror_options: Any) -> None:
        dtype = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
        if dtype not in _SUPPORTED:
            raise NotImplementedError(
                f"MirrorState covers single-process and DDP training; not {dtype} (sharded or engine-specific "
                "checkpoints: for FSDP use torch.distributed.checkpoint)"
            )
        if getattr(accelerator, "_save_model_state_pre_hook", None) or getattr(
            accelerator, "_load_model_state_pre_hook", None
        ):
            # Those hooks write and read files in save_state's directory: there is none here.
            log.warning("MirrorState does not call hooks registered with register_save/load_state_pre_hook")
        self.accelerator = accelerator
        total_limit = getattr(accelerator.project_configuration, "total_limit", None)
        if "keep_last" not in mirror_options and total_limit:
            mirror_options["keep_last"] = total_limit
        reps = [replicas] if isinstance(replicas, (str, Replica)) else list(replicas)
        self.mirror = Mirror(reps, **mirror_options)
        # Steps committed before this run began: saving one again replaces it (a resume from an
        # older step abandons the newer ones), where the mirror allows it (one process).
        self._preexisting = set(self.mirror.steps())
        self.last_handle: SaveHandle | None = None

    def __enter__(self) -> MirrorState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.mirror.close(raise_errors=exc[0] is None)

    # ------------------------------------------------------------------------- saving
    def save(self, step: int | None = None) -> SaveHandle:
        """Snapshot the whole training state as ``step`` (default: ``project_configuration.iteration``,
        the number ``save_state`` would use); return once it is copied (the rest is in the background).

        Increments ``project_configuration.iteration`` as ``save_state`` does.
        """
        acc = self.accelerator
        if step is None:
            step = int(acc.project_configuration.iteration)
        state = {
            "format": FORMAT,
            "models": [acc.unwrap_model(m, keep_torch_compile=False).state_dict() for m in acc._models],
            "optimizers": [o.state_dict() for o in acc._optimizers],
            "schedulers": [s.state_dict() for s in acc._schedulers],
            "dataloaders": [_dataloader_state(dl) for dl in acc._dataloaders],
            "custom": [obj.state_dict() for obj in acc._custom_objects],
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "rng": _rng_state(),
            "accelerator_step": int(acc.step),
            "iteration": int(acc.project_configuration.iteration) + 1,
            "num_processes": int(acc.num_processes),
        }
        overwrite = step in self._preexisting and not self.mirror.dist.distributed
        self.last_handle = self.mirror.save_state(step, state, overwrite=overwrite)
        acc.project_configuration.iteration += 1
        return self.last_handle

    def wait(self, timeout: float | None = None) -> None:
        """Block until every save in flight committed; raise the first failure not yet reported."""
        self.mirror.wait(timeout)

    def close(self) -> None:
        """Wait for the last save (raises if it failed), then release the mirror's threads and memory."""
        self.mirror.close()

    # ------------------------------------------------------------------------ loading
    def load(self, step: int | None = None) -> int | None:
        """Restore the newest step that verifies on the replicas (or ``step``); return it.

        None on a fresh run (no checkpoint anywhere; a WARNING names the replicas). ``step``
        given and missing raises :class:`~ckptmirror.StepNotFoundError`; checkpoints none of which
        verifies raise :class:`~ckptmirror.NoValidCheckpointError`. Every object is verified and
        the stored state checked against the prepared models, optimizers, schedulers, registered
        objects and dataloaders before anything is loaded: a mismatch raises
        :class:`~ckptmirror.StateMismatchError` and leaves the training state untouched.
        """
        loaded = self.mirror.load_state(step, require=step is not None)
        if loaded is None:
            return None
        n, state = loaded
        acc = self.accelerator
        models = [acc.unwrap_model(m, keep_torch_compile=False) for m in acc._models]
        _check_fits(n, state, models, acc)
        for m, sd in zip(models, state["models"]):
            m.load_state_dict(sd)
        for o, sd in zip(acc._optimizers, state["optimizers"]):
            o.load_state_dict(sd)
        for s, sd in zip(acc._schedulers, state["schedulers"]):
            s.load_state_dict(sd)
        for dl, sd in zip(acc._dataloaders, state["dataloaders"]):
            _load_dataloader_state(dl, sd)
        for obj, sd in zip(acc._custom_objects, state["custom"]):
            obj.load_state_dict(sd)
        if acc.scaler is not None and state["scaler"] is not None:
            acc.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        acc.step = state["accelerator_step"]
        acc.project_configuration.iteration = state["iteration"]
        log.info("accelerate state restored from step %d", n)
        return n


# ------------------------------------------------------------------------------ helpers
def _check_fits(step: int, state: Any, models: list[Any], acc: Any) -> None:
    """Refuse, before anything is loaded, a stored state that does not fit the prepared objects."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise StateMismatchError(f"step {step} was not saved by MirrorState (format {got!r}, expected {FORMAT!r})")
    counts = {
        "models": len(models),
        "optimizers": len(acc._optimizers),
        "schedulers": len(acc._schedulers),
        "dataloaders": len(acc._dataloaders),
        "custom": len(acc._custom_objects),
    }
    for key, have in counts.items():
        if len(state[key]) != have:
            what = "registered objects" if key == "custom" else f"prepared {key}"
            raise StateMismatchError(f"step {step} holds {len(state[key])} {what}, this accelerator has {have}")
    if state["num_processes"] != acc.num_processes:
        raise StateMismatchError(
            f"step {step} was saved by {state['num_processes']} processes, this run has {acc.num_processes}"
        )
    for i, (m, stored) in enumerate(zip(models, state["models"])):
        target = m.state_dict()
        missing, unexpected = sorted(set(target) - set(stored)), sorted(set(stored) - set(target))
        if missing or unexpected:
            raise StateMismatchError(
                f"model {i}: keys differ from step {step}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for k, t in target.items():
            s = stored[k]
            if isinstance(t, torch.Tensor) and (tuple(s.shape) != tuple(t.shape) or s.dtype != t.dtype):
                raise StateMismatchError(
                    f"model {i}: {k} is {s.dtype} {tuple(s.shape)} in step {step}, {t.dtype} {tuple(t.shape)} here"
                )
    for i, (o, stored) in enumerate(zip(acc._optimizers, state["optimizers"])):
        have_groups = [len(g["params"]) for g in o.param_groups]
        stored_groups = [len(g["params"]) for g in stored["param_groups"]]
        if have_groups != stored_groups:
            raise StateMismatchError(
                f"optimizer {i}: parameter groups of sizes {stored_groups} in step {step}, {have_groups} here"
            )


def _dataloader_state(dl: Any) -> dict[str, Any]:
    """What fixes a prepared dataloader's position and order (a superset of what ``save_state``
    keeps: it saves the seedable sampler only for iterable datasets, and not ``iteration``)."""
    from accelerate.data_loader import SeedableRandomSampler  # type: ignore[import-untyped,import-not-found,unused-ignore]

    out: dict[str, Any] = {}
    if isinstance(getattr(dl, "iteration", None), int):
        # DataLoaderShard.__iter__ calls set_epoch(iteration): the epoch the sampler shuffles for.
        out["iteration"] = dl.iteration
    get_sampler = getattr(dl, "get_sampler", None)
    sampler = get_sampler() if callable(get_sampler) else None
    if isinstance(sampler, SeedableRandomSampler):
        out["sampler"] = {"epoch": int(sampler.epoch), "initial_seed": int(sampler.initial_seed)}
    if getattr(dl, "use_stateful_dataloader", False):
        out["state_dict"] = dl.state_dict()
    return out


def _load_dataloader_state(dl: Any, state: dict[str, Any]) -> None:
    from accelerate.data_loader import SeedableRandomSampler  # type: ignore[import-untyped,import-not-found,unused-ignore]

    if "iteration" in state:
        dl.iteration = state["iteration"]
    get_sampler = getattr(dl, "get_sampler", None)
    sampler = get_sampler() if callable(get_sampler) else None
    if "sampler" in state and isinstance(sampler, SeedableRandomSampler):
        sampler.epoch = state["sampler"]["epoch"]
        sampler.initial_seed = state["sampler"]["initial_seed"]
    if "state_dict" in state:
        dl.load_state_dict(state["state_dict"])


# (name, availability check in accelerate.utils, torch module attribute): accelerate's own list.
_DEVICE_RNGS = (
    ("cuda", "is_cuda_available", "cuda"),
    ("xpu", "is_xpu_available", "xpu"),
    ("mlu", "is_mlu_available", "mlu"),
    ("sdaa", "is_sdaa_available", "sdaa"),
    ("musa", "is_musa_available", "musa"),
    ("hpu", "is_hpu_available", "hpu"),
    ("neuron", "is_neuron_available", "neuron"),
)


def _rng_state() -> dict[str, Any]:
    """This process's RNG states, as ``save_accelerator_state`` collects them."""
    import accelerate.utils as au  # type: ignore[import-untyped,import-not-found,unused-ignore]

    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    for name, check, mod in _DEVICE_RNGS:
        if getattr(au, check, lambda: False)():
            states[name] = list(getattr(torch, mod).get_rng_state_all())
    if au.is_torch_xla_available():
        import torch_xla.core.xla_model as xm  # type: ignore[import-not-found,unused-ignore]

        states["xla"] = xm.get_rng_state()
    return states


def _set_rng_state(states: dict[str, Any]) -> None:
    # Unlike accelerate's load_state, which logs "Could not load random states" at INFO and goes
    # on (accelerate#4283), a failure here raises: a resume with the wrong RNG is not a resume.
    import accelerate.utils as au  # type: ignore[import-untyped,import-not-found,unused-ignore]

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    for name, check, mod in _DEVICE_RNGS:
        if name in states and getattr(au, check, lambda: False)():
            getattr(torch, mod).set_rng_state_all(states[name])
    if "xla" in states and au.is_torch_xla_available():
        import torch_xla.core.xla_model as xm  # type: ignore[import-not-found,unused-ignore]

        xm.set_rng_state(states["xla"])
