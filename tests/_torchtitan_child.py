"""A worker for tests/test_torchtitan.py: torchtitan's Trainer on CPU/gloo, checkpointing through
``MirrorCheckpointManager``.

Usage (under torchrun, from the repository root)::

    python tests/_torchtitan_child.py OUT [--kill-at N] -- TORCHTITAN_ARGS...

Runs what ``python -m torchtitan.train TORCHTITAN_ARGS`` runs (parse the config, build the
Trainer, ``train()``, ``close()``) and writes, per rank, ``OUT/losses-<attempt>-<rank>.jsonl``
(step and loss of every step this attempt trained) and, after training,
``OUT/result-<rank>.json`` (the step loaded at start, the dataloader's position), and on rank 0
``OUT/final.safetensors`` (every model and optimizer tensor, unsharded) and ``OUT/values.json``
(the non-tensor optimizer values, ``lr_scheduler``, ``train_state``).

``--kill-at N``: on the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), when the trainer
reaches step N every rank waits for the save in flight, then SIGKILLs itself (launching the
job again resumes it). Checkpoint loads run with ``pickle`` and ``torch.load`` made to raise.

torchtitan 0.3.0 assumes an accelerator: before it is imported, the device type is forced to
``cpu`` and ``torch.cpu`` gets the few functions it calls (device name, memory statistics); and
as FlexAttention has no backward pass on CPU, its compiled kernel is replaced by the same
attention computed densely (the BlockMask's ``mask_mod`` as a boolean mask for
``scaled_dot_product_attention``), and block masks are built without ``torch.compile``; FSDP
reduces gradients with SUM (gloo has no PREMUL_SUM; torchtitan's divide factor is 1).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import torch._utils

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # --module examples.torchtitan_mirror

warnings.filterwarnings("ignore")


def cpu_shim() -> None:
    torch._utils._get_available_device_type = lambda: "cpu"  # type: ignore[assignment]
    stubs = {
        "get_device_name": lambda *a, **k: "cpu",
        "get_device_properties": lambda *a, **k: types.SimpleNamespace(total_memory=8 << 30, name="cpu"),
        "reset_peak_memory_stats": lambda *a, **k: None,
        "empty_cache": lambda *a, **k: None,
        "memory_stats": lambda *a, **k: {},
    }
    for name, fn in stubs.items():
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, fn)
    torch.cpu.current_device = lambda: 0  # type: ignore[assignment]  # used as barrier(device_ids=[...])
    # torchtitan 0.3.0 calls torch.distributed.set_timeout after the first step; torch 2.13 has
    # only the private form of it.
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = lambda timeout, group=None: c10d._set_pg_timeout(timeout, group)  # type: ignore[attr-defined]
    # torchtitan sets FSDP's gradient divide factor to 1, which FSDP reduces with PREMUL_SUM:
    # gloo has none. A plain SUM, then the division by 1, is the same arithmetic.
    from torch.distributed.fsdp import FSDPModule

    set_factor = FSDPModule.set_gradient_divide_factor

    def set_factor_sum(self: Any, factor: float) -> None:
        set_factor(self, factor)
        self.set_force_sum_reduction_for_comms(True)

    FSDPModule.set_gradient_divide_factor = set_factor_sum  # type: ignore[method-assign]


def dense_attention() -> None:
    """FlexAttention's compiled kernel -> SDPA with the block mask as a dense boolean mask."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, create_mask
    from torchtitan.models.common import attention

    def flex(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        score_mod: Any = None,
        block_mask: Any = None,
        scale: Any = None,
        enable_gqa: bool = False,
        return_aux: Any = None,
        kernel_options: Any = None,
    ) -> Any:
        if score_mod is not None or (return_aux is not None and return_aux.lse):
            raise NotImplementedError("the CPU stand-in for FlexAttention covers mask_mod only")
        mask = None
        if block_mask is not None:
            mask = create_mask(block_mask.mask_mod, q.shape[0], 1, q.shape[2], k.shape[2], device=q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
        return out, types.SimpleNamespace(lse=None)

    attention.FlexAttention.compiled_flex_attn = staticmethod(flex)  # debug.deterministic resets _compiled_flex_attn
    attention._compiled_create_block_mask = create_block_mask


def refuse(*a: Any, **k: Any) -> Any:
    raise AssertionError("pickle/torch.load called while loading a ckptmirror checkpoint")


def no_pickle(fn: Any) -> Any:
    """``fn`` with every way of unpickling made to raise while it runs."""

    def run(*a: Any, **k: Any) -> Any:
        saved = (pickle.load, pickle.loads, pickle.Unpickler, torch.load)
        pickle.load = pickle.loads = pickle.Unpickler = torch.load = refuse  # type: ignore[assignment, misc]
        try:
            return fn(*a, **k)
        finally:
            pickle.load, pickle.loads, pickle.Unpickler, torch.load = saved  # type: ignore[misc]

    return run


def full(v: Any) -> torch.Tensor:
    t = v.full_tensor() if hasattr(v, "full_tensor") else v
    return t.detach().contiguous().clone()


def plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def main() -> int:
    out = Path(sys.argv[1])
    rest = sys.argv[2:]
    kill_at = None
    if rest[:1] == ["--kill-at"]:
        kill_at, rest = int(rest[1]), rest[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    cpu_shim()
    dense_attention()
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torchtitan.components.checkpointer import MODEL
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import init_logger

    init_logger()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    config = ConfigManager().parse_args(rest)
    trainer = config.build()
    rank = dist.get_rank()
    ckpt = trainer.checkpointer
    losses = open(out / f"losses-{attempt}-{rank}.jsonl", "w")

    log_metrics = trainer.metrics_processor.log

    def log(step: int, loss: float, *a: Any, **k: Any) -> Any:
        losses.write(json.dumps({"step": step, "loss": loss}) + "\n")
        losses.flush()
        return log_metrics(step, loss, *a, **k)

    trainer.metrics_processor.log = log
    ckpt.load = no_pickle(ckpt.load)
    save = ckpt.save

    def save_then_maybe_die(curr_step: int, last_step: bool = False) -> bool:
        done = save(curr_step, last_step=last_step)
        if kill_at is not None and attempt == 0 and curr_step == kill_at:
            ckpt.maybe_wait_for_saving()  # the previous interval's step is committed
            losses.close()
            os.kill(os.getpid(), signal.SIGKILL)
        return done

    ckpt.save = save_then_maybe_die
    trainer.train()
    losses.close()

    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    for k, v in ckpt.states[MODEL].state_dict().items():
        tensors[f"model.{k}"] = full(v)
    for k, v in trainer.optimizers.state_dict().items():
        if isinstance(v, torch.Tensor):
            tensors[f"optim.{k}"] = full(v)
        else:
            values[f"optim.{k}"] = plain(v)
    values["lr_scheduler"] = plain(trainer.lr_schedulers.state_dict())
    values["train_state"] = plain(trainer.state_dict())
    ds = trainer.dataloader.dataset
    result = {
        "rank": rank,
        "attempt": attempt,
        "loaded_step": ckpt.loaded_step,
        "sample_idx": getattr(ds, "_sample_idx", None),
        "last_outcome": ckpt.writer.last_outcome,
        "staging_allocations": ckpt.writer.staging_allocations,
    }
    if rank == 0:
        save_file(tensors, str(out / "final.safetensors"))
        (out / "values.json").write_text(json.dumps(values, sort_keys=True))
    (out / f"result-{rank}.json").write_text(json.dumps(result))
    trainer.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
