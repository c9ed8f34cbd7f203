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

- every prepared model (``unwrap_model(...).state_dict()``: the plain model's keys, no
  ``module.``/``_orig_mod.`` prefixes), optimizer and scheduler;
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
processes (``load`` refuses a step saved by another number, e.g. a DDP run's step in one
process, with :class:`~ckptmirror.StateMismatchError`). FSDP, DeepSpeed, Megatron-LM and XLA
are not covered (their checkpoints are sharded or engine-specific): the constructor raises
``NotImplementedError`` there.

A bit-exact mid-epoch resume needs the data position (skip the batches already seen, as
above) and RNG draws in the same order as the uninterrupted run. As with Accelerate's own
``load_state``, the RNG states come back in ``load()``; creating a DataLoader iterator then draws
its base seed from the global torch RNG unless the DataLoader has its own ``generator``: pass
``DataLoader(..., generator=torch.Generator().manual_seed(seed))`` so that draw does not shift
the RNG (``tests/test_accelerate.py`` resumes bit-exactly that way).

A run that resumes from an older step than the newest (the newest did not verify, or
``load(step=...)``) saves the newer steps again: a step committed before this
:class:`MirrorState` was created is replaced when saved again (with several processes, every
process deletes it, then they save it anew; all processes take the same decision). A step this
:class:`MirrorState` saved itself is never replaced: saving it again raises
:class:`~ckptmirror.StepExistsError`.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ReplicaError, StateMismatchError, StepNotFoundError
from ..handle import SaveHandle
from ..mirror import Mirror
from ..replicas import Replica
from ..restore.discover import list_steps

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

    With several processes, create it on every process: the constructor agrees with the others
    on the steps committed before this run (those a save replaces).
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
        # older step abandons the newer ones), once. The same set on every process (the union of
        # what each lists), so that every process takes the same decision in save().
        self._stale: set[int] = set(self.mirror.steps())
        self._rounds = 0  # exchanges made through the mirror's store (each needs its own key)
        if self.mirror.dist.distributed:
            self._stale = set().union(*self._all_gather(sorted(self._stale)))
        self.last_handle: SaveHandle | None = None

    def __enter__(self) -> MirrorState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.mirror.close(raise_errors=exc[0] is None)

    # ------------------------------------------------------------------------- saving
    def save(self, step: int | None = None) -> SaveHandle:
        """Snapshot the whole training state as ``step`` (default: ``project_configuration.iteration``,
        the number ``save_state`` would use); return once it is copied (the rest is in the background).

        Increments ``project_configuration.iteration`` as ``save_state`` does. A ``step`` committed
        before this object was created (by an earlier run) is replaced, once; one saved by this
        object raises :class:`~ckptmirror.StepExistsError`.
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
        stale = step in self._stale
        self._stale.discard(step)  # replaced once: a second save of it is this run's own step
        if stale and self.mirror.dist.distributed:
            # Mirror refuses overwrite=True with several processes: every process deletes the
            # step first, and none saves it before all have.
            self._delete_everywhere(step)
            stale = False
        self.last_handle = self.mirror.save_state(step, state, overwrite=stale)
        acc.project_configuration.iteration += 1
        return self.last_handle

    def _all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (JSON), in rank order, through the mirror's coordination
        store: no collective on the training group (NCCL would need device tensors) and no
        pickle (``all_gather_object`` pickles)."""
        coord = self.mirror._coord
        assert coord is not None  # a distributed Mirror always has one
        self._rounds += 1
        return coord.exchange(f"accelerate/{self._rounds}", value)

    def _delete_everywhere(self, step: int) -> None:
        """Every process: delete ``step`` (committed by an earlier run), then wait for the others."""
        log.warning("step %d was committed by an earlier run that this run went back from: replacing it", step)
        error = ""
        try:
            self.mirror.delete(step, force=True)
        except StepNotFoundError:
            pass  # not on this process's replicas (another process's own replica holds it)
        except Exception as exc:  # noqa: BLE001 - reported to every process below
            error = f"{type(exc).__name__}: {exc}"
        # Also the barrier: no process looks (below) before every process has deleted.
        failed = {r: e for r, e in enumerate(self._all_gather(error)) if e}
        if not failed:
            # Mirror.delete skips a degraded replica with a warning: here that would leave the
            # abandoned step there, and a restore from that replica alone would load it. Every
            # replica must be seen without it before anyone writes the new one.
            listing = list_steps(self.mirror.replicas, timeout_s=self.mirror.open_timeout_s)
            left = sorted(set(listing.committed.get(step, [])) | set(listing.unreachable))
            error = f"step {step} may still be on {', '.join(left)} (unreachable or not deleted there)" if left else ""
            # The second barrier: no process writes the new step before every process has looked.
            failed = {r: e for r, e in enumerate(self._all_gather(error)) if e}
        if failed:
            why = "; ".join(f"rank {r}: {e}" for r, e in failed.items())
            raise ReplicaError(f"could not replace step {step} committed by an earlier run ({why})")

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

        Registered objects that are modules are checked like the models (keys, shapes, dtypes);
        other registered objects, the dataloaders, the grad scaler and the RNG states are loaded
        before the models and optimizers, and put back as they were if one of them fails (a
        :class:`~ckptmirror.StateMismatchError` names it). Their snapshot is a copy of their
        ``state_dict()`` (tensors on the CPU): registered objects hold small states, as a rule.
        """
        loaded = self.mirror.load_state(step, require=step is not None)
        if loaded is None:
            return None
        n, state = loaded
        acc = self.accelerator
        models = [acc.unwrap_model(m, keep_torch_compile=False) for m in acc._models]
        _check_fits(n, state, models, acc)
        # The parts whose load_state_dict runs code that _check_fits cannot vouch for come first,
        # each with a way back; the models and optimizers (checked above) last.
        scaler = acc.scaler if state["scaler"] is not None else None
        parts: list[_Part] = [
            ("the RNG states", _FIX_RNG, _rng_state, _set_rng_state, state["rng"]),
        ]
        if scaler is not None:
            parts.append(("the grad scaler", _FIX_SCALER, scaler.state_dict, scaler.load_state_dict, state["scaler"]))
        for i, (dl, sd) in enumerate(zip(acc._dataloaders, state["dataloaders"])):
            parts.append((f"prepared dataloader {i} ({type(dl).__name__})", _FIX_DATALOADER,
                          _bind(_dataloader_state, dl), _bind(_load_dataloader_state, dl), sd))  # fmt: skip
        for i, (obj, sd) in enumerate(zip(acc._custom_objects, state["custom"])):
            # A module was checked like the models; copying it could double a large state (an EMA).
            get = None if isinstance(obj, torch.nn.Module) else obj.state_dict
            parts.append((f"registered object {i} ({type(obj).__name__})", _FIX_CUSTOM, get, obj.load_state_dict, sd))
        for i, (sched, sd) in enumerate(zip(acc._schedulers, state["schedulers"])):
            parts.append((f"prepared scheduler {i}", _FIX_PREPARED, sched.state_dict, sched.load_state_dict, sd))
        for i, (o, sd) in enumerate(zip(acc._optimizers, state["optimizers"])):
            parts.append((f"prepared optimizer {i}", _FIX_PREPARED, None, o.load_state_dict, sd))
        for i, (m, sd) in enumerate(zip(models, state["models"])):
            parts.append((f"prepared model {i} ({type(m).__name__})", _FIX_PREPARED, None, m.load_state_dict, sd))
        _load_or_undo(n, parts)
        # Again, last: whatever drew random numbers while loading (a load_state_dict may) is undone.
        _set_rng_state(state["rng"])
        acc.step = state["accelerator_step"]
        acc.project_configuration.iteration = state["iteration"]
        log.info("accelerate state restored from step %d", n)
        return n


_FIX_RNG = "resume with the same devices visible to each process as the run that saved it"
_FIX_SCALER = "resume with the same mixed_precision as the run that saved it"
_FIX_DATALOADER = "prepare the same dataloaders (type, use_stateful_dataloader) as the run that saved it"
_FIX_CUSTOM = "register_for_checkpointing the same objects, in the same order and shapes, as the run that saved it"
_FIX_PREPARED = "prepare the same models, optimizers and schedulers as the run that saved it"


def _bind(fn: Callable[..., Any], first: Any) -> Callable[..., Any]:
    return lambda *args: fn(first, *args)


#: A part of the training state load() restores: (what, the fix if it does not load, get its
#: current state or None where no snapshot is taken, load a state, the stored state).
_Part = tuple[str, str, Callable[[], Any] | None, Callable[[Any], None], Any]


def _load_or_undo(step: int, parts: list[_Part]) -> None:
    """Load each part (name, fix, get its state or None, load a state, the stored state) in order.
    If one fails, put every part touched so far back as it was (its state from before anything
    was loaded) and raise StateMismatchError naming the part at fault and the fix."""
    snapshots = [None if get is None else _snapshot(what, get) for what, _, get, _, _ in parts]
    failed, cause = -1, None
    for i, (_, _, _, load, stored) in enumerate(parts):
        try:
            load(stored)
        except Exception as exc:
            failed, cause = i, exc
            break
    if cause is None:
        return
    # Undo in reverse order; the part that failed may be half loaded, so it is put back too.
    not_undone = []
    for (what, _, _, load, _), snap in reversed(list(zip(parts[: failed + 1], snapshots[: failed + 1]))):
        if snap is None:
            not_undone.append(what)
            continue
        try:
            load(snap)
        except Exception as exc:  # noqa: BLE001 - reported in the error below
            log.warning("could not put %s back as it was before load(): %s", what, exc)
            not_undone.append(what)
    name, fix = parts[failed][0], parts[failed][1]
    left = (
        f"; {', '.join(reversed(not_undone))} may be partly loaded"
        if not_undone
        else "; the training state is as it was before load()"
    )
    raise StateMismatchError(
        f"step {step}: loading {name} failed ({type(cause).__name__}: {cause}){left}. Fix: {fix}"
    ) from cause


def _snapshot(what: str, get: Callable[[], Any]) -> Any:
    """A copy of a part's current state; None (it cannot be put back) if it cannot be copied."""
    try:
        return _cpu_copy(get())
    except Exception as exc:  # noqa: BLE001 - the load goes on; a failure then says what was not put back
        log.debug("no snapshot of %s before load(): %s", what, exc)
        return None


def _cpu_copy(value: Any) -> Any:
    """A deep copy of a state, its tensors copied to the CPU (the snapshot takes no device memory;
    a stored state comes back from the replicas on the CPU too)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, (dict, list)):
        out = copy.copy(value)  # the same type (OrderedDict, defaultdict, ...), then each entry copied
        for k in value.keys() if isinstance(value, dict) else range(len(value)):
            out[k] = _cpu_copy(value[k])
        return out
    if type(value) is tuple:
        return tuple(_cpu_copy(v) for v in value)
    return copy.deepcopy(value)


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
        _check_module(f"model {i}", step, m, stored, "")
    for i, (obj, stored) in enumerate(zip(acc._custom_objects, state["custom"])):
        if isinstance(obj, torch.nn.Module):
            _check_module(f"registered object {i} ({type(obj).__name__})", step, obj, stored, _FIX_CUSTOM)
    for i, (o, stored) in enumerate(zip(acc._optimizers, state["optimizers"])):
        have_groups = [len(g["params"]) for g in o.param_groups]
        stored_groups = [len(g["params"]) for g in stored["param_groups"]]
        if have_groups != stored_groups:
            raise StateMismatchError(
                f"optimizer {i}: parameter groups of sizes {stored_groups} in step {step}, {have_groups} here"
            )


def _check_module(what: str, step: int, module: Any, stored: Any, fix: str) -> None:
    """The checks ``load_state_dict(strict=True)`` makes (and the dtypes), before it copies anything."""
    fix = f". Fix: {fix}" if fix else ""
    target = module.state_dict()
    if not isinstance(stored, dict):
        raise StateMismatchError(f"{what}: step {step} holds a {type(stored).__name__}, not a state dict{fix}")
    missing, unexpected = sorted(set(target) - set(stored)), sorted(set(stored) - set(target))
    if missing or unexpected:
        raise StateMismatchError(
            f"{what}: keys differ from step {step}: missing {missing[:5]}, unexpected {unexpected[:5]}{fix}"
        )
    for k, t in target.items():
        s = stored[k]
        if isinstance(t, torch.Tensor) and (
            not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(t.shape) or s.dtype != t.dtype
        ):
            got = f"{s.dtype} {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise StateMismatchError(f"{what}: {k} is {got} in step {step}, {t.dtype} {tuple(t.shape)} here{fix}")


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
