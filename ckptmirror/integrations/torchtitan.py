"""torchtitan: checkpoint a torchtitan job to ckptmirror replicas, by configuration.

:class:`MirrorCheckpointManager` is a torchtitan ``BaseCheckpointManager`` (torchtitan 0.3.0).
torchtitan builds the manager from ``Trainer.Config.checkpoint``, so putting a
``MirrorCheckpointManager.Config`` there is the whole change. In a config_registry module
(torchtitan selects one with ``--module``/``--config``)::

    from ckptmirror.integrations.torchtitan import MirrorCheckpointManager
    from torchtitan.models.llama3.config_registry import llama3_8b

    def llama3_8b_mirror():
        config = llama3_8b()
        config.checkpoint = MirrorCheckpointManager.Config(
            enable=True,
            interval=500,
            replicas=["/local/nvme/ckpt/run1/node{node_rank}", "s3://bucket/ckpt/run1"],
            keep_last=3,
        )
        return config

then ``torchrun ... -m torchtitan.train --module my_configs --config llama3_8b_mirror``, with any
key overridable on the command line: ``--checkpoint.replicas /nvme/a,s3://b/run1``,
``--checkpoint.keep_last 2``, ``--checkpoint.interval 100``, ``--checkpoint.async_mode disabled``.
``examples/torchtitan_mirror.py`` is such a module. The keys (``checkpoint.*``):

====================== ===================================================================
``replicas``           replica URLs, as for :class:`~ckptmirror.Mirror` (local paths, ``s3://``,
                       ``peer://``, fsspec URLs; ``{rank}``/``{node_rank}``/... placeholders;
                       every rank writes its own part to its replicas, lists matched by position).
                       A relative path is under ``dump_folder``, like ``folder``. Empty (default):
                       one replica, ``dump_folder/folder``.
``interval``           save every N steps (torchtitan's key); also ``enable_first_step_checkpoint``
                       and the last step, as torchtitan does.
``keep_last``          keep the newest N committed steps per replica (>= 1; deletes only after a
                       newer step committed). None (default): ``keep_latest_k`` (0 = keep all).
``async_mode``         ``"async"`` (default): ``dcp.async_save`` on a separate gloo group, the
                       training thread stalls for one memcpy into reused staging buffers;
                       ``"disabled"``: ``dcp.save``, returns once the step is committed.
``min_replicas``       a save fails when it committed on fewer replica positions (default 1).
``on_replica_error``   ``"warn"`` (default) or ``"raise"`` (fail the save on any replica failure).
``object_bytes``,      object size and concurrent transfers per replica (64 MiB, 4).
``io_threads``
``commit_timeout_s``   how long ranks wait for each other's part of a save or load (300).
``slow_replica_``      once a replica holds a rank's part of a step, how long the others get
``timeout_s``          before their write of that step is dropped (10; None: wait for all).
``storage_options``    JSON object, per URL scheme, e.g. ``'{"s3": {"part_bytes": 33554432}}'``.
``dataloader_state``   ``"json"`` (default): the dataloader's position is stored as ckptmirror JSON
                       instead of torchtitan's pickle, so no load unpickles anything;
                       ``"pickle"``: torchtitan's own ``state_dict()`` as it is.
``load_step``,         torchtitan's keys, same meaning; ``initial_load_path`` (a plain DCP or HF
``exclude_from_...``,  checkpoint, read with DCP's own readers) is used only while no replica has a
``initial_load_*``,    committed step. ``last_save_model_only`` defaults to False here (the last
``last_save_*``,       step stays resumable); ``last_save_in_hf`` is refused (use
``export_dtype``,      ``ckptmirror export``).
``load_only``, ...
====================== ===================================================================

Saving goes through :mod:`ckptmirror.dcp` (:class:`~ckptmirror.dcp.MirrorStorageWriter` with
:class:`~ckptmirror.dcp.MirrorSavePlanner`, one writer reused for every save), loading through
:class:`~ckptmirror.dcp.MirrorStorageReader` with :class:`~ckptmirror.dcp.MirrorLoadPlanner`:
the newest step every rank can recover, each object from the first replica where it verifies,
older steps when the newest is damaged, all ranks agreeing. Nothing in a load calls ``pickle``
or ``torch.load`` (with ``dataloader_state="json"``). The state is torchtitan's own: the
model's flattened state dict, ``optimizer``, ``lr_scheduler``, ``dataloader``, ``train_state``.
Each step is a ckptmirror step: ``ckptmirror ls/verify/repair/prune/inspect`` work on it.

When a run resumes from an older step than the newest committed one (``load_step``, or a
fallback over a damaged step), saving a step that an earlier run committed replaces it, with a
WARNING (torchtitan's own manager overwrites such a step too).

Importing this module imports torchtitan; ``import ckptmirror`` does not.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.components.checkpointer import (  # type: ignore[import-not-found, import-untyped, unused-ignore]
    DATALOADER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    BaseCheckpointManager,
    ModelWrapper,
)
from torchtitan.config import TORCH_DTYPE_MAP  # type: ignore[import-not-found, import-untyped, unused-ignore]

from ..dcp import MirrorLoadPlanner, MirrorSavePlanner, MirrorStorageReader, MirrorStorageWriter
from ..dcp._codec import decode_value, encode_value
from ..dist import detect, expand_url
from ..errors import CkptMirrorError
from ..replicas import Replica, close_opened, open_replicas
from ..restore.discover import list_steps
from ..save.retention import is_committed, remove_step

log = logging.getLogger("ckptmirror")

__all__ = ["MirrorCheckpointManager"]

_MiB = 1 << 20


def _is_url(u: str) -> bool:
    return "://" in u


def _new_gloo_group() -> Any:
    """A gloo group over every rank, safe to create in a job restarted by ``torchrun --max-restarts``.

    The elastic agent's store outlives a restart, and a group gets the same name (a counter) in
    every attempt: a rank that reaches ``new_group`` before its peer can read the peer's address
    from the attempt that died, and gloo then retries that dead address until it times out
    (seen with torch 2.13 whenever ranks build the group at different moments). Group names
    are moved to a range of their own in each attempt, the same on every rank.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart > 0:
        from torch.distributed import distributed_c10d

        world = getattr(distributed_c10d, "_world", None)
        count = getattr(world, "group_count", None)
        if isinstance(count, int):
            setattr(world, "group_count", max(count, restart * 1_000_000))  # noqa: B010 - a private counter
        else:
            log.warning("cannot make process group names unique after a restart; a gloo group may fail to connect")
    return dist.new_group(backend="gloo")


class _JsonDataloaderState(Stateful):
    """A torchtitan ``ParallelAwareDataloader``'s state, as ckptmirror JSON instead of pickle.

    torchtitan stores ``{"dp_rank_R": pickle.dumps(state), "world_size": N}`` and unpickles it on
    load. This keeps the same keys (one opaque value per data-parallel rank, so the key set does
    not depend on how far the loader got) with the value encoded by ckptmirror's tree encoding.
    """

    def __init__(self, dataloader: Any) -> None:
        from torchdata.stateful_dataloader import StatefulDataLoader  # type: ignore[import-not-found, import-untyped, unused-ignore]

        self.dataloader = dataloader
        self._base = StatefulDataLoader

    def state_dict(self) -> dict[str, Any]:
        dl = self.dataloader
        inner = self._base.state_dict(dl)  # StatefulDataLoader's, not torchtitan's pickling override
        return {dl._rank_id: encode_value(inner, f"dataloader.{dl._rank_id}"), "world_size": dl.dp_world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        dl = self.dataloader
        if not state_dict:
            return
        if dl._rank_id not in state_dict:
            log.warning("dataloader state has no entry for data-parallel rank %d (%s)", dl.dp_rank, dl._rank_id)
            return
        if state_dict["world_size"] != dl.dp_world_size:
            raise ValueError(
                f"the checkpoint's dataloader state is for {state_dict['world_size']} data-parallel ranks, this job "
                f"has {dl.dp_world_size}: torchtitan cannot reshard it (exclude it with "
                "--checkpoint.exclude_from_loading dataloader)"
            )
        value = state_dict[dl._rank_id]
        data = value if isinstance(value, bytes) else bytes(value)
        self._base.load_state_dict(dl, decode_value(data, f"dataloader.{dl._rank_id}"))


class MirrorCheckpointManager(BaseCheckpointManager):
    """torchtitan's checkpoint manager contract, saving to and loading from ckptmirror replicas.

    Built by torchtitan from :class:`MirrorCheckpointManager.Config` (see the module docstring
    for the keys); the constructor takes what torchtitan's ``Trainer`` passes to every manager.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseCheckpointManager.Config):  # type: ignore[misc, unused-ignore]
        replicas: list[str] = field(default_factory=list)
        """Replica URLs ({rank}, {node_rank}... placeholders); relative: under dump_folder. Empty: folder."""

        keep_last: int | None = None
        """Keep the newest N committed steps per replica (>= 1). None: keep_latest_k (0 keeps all)."""

        async_mode: Literal["async", "disabled"] = "async"
        """"async": dcp.async_save through the ckptmirror writer's staging; "disabled": dcp.save."""

        min_replicas: int | None = None
        """A save fails when it committed on fewer replica positions than this (default 1)."""

        on_replica_error: Literal["warn", "raise"] = "warn"
        """"raise": any replica failure fails the save."""

        object_bytes: int = 64 * _MiB
        """Size of the objects a rank's data is cut into."""

        io_threads: int = 4
        """Concurrent object transfers per replica."""

        commit_timeout_s: float = 300.0
        """How long ranks wait for each other's part of a save or load."""

        slow_replica_timeout_s: float | None = 10.0
        """Once a replica holds a rank's part of a step, seconds the others get before their write
        of it is dropped (the step does not commit there). None: wait for every replica."""

        storage_options: str = ""
        """JSON object of per-scheme options, e.g. '{"s3": {"part_bytes": 33554432}}'."""

        dataloader_state: Literal["json", "pickle"] = "json"
        """"json": the dataloader position as ckptmirror JSON (no pickle on load); "pickle": torchtitan's own."""

        last_save_model_only: bool = False
        """Whether the final checkpoint holds the model only (False here: the last step stays resumable)."""

        def __post_init__(self) -> None:
            BaseCheckpointManager.Config.__post_init__(self)
            self.async_mode = self.async_mode.lower()  # type: ignore[assignment]
            if self.async_mode not in ("async", "disabled"):
                raise ValueError(
                    f"checkpoint.async_mode must be 'async' or 'disabled' for MirrorCheckpointManager, "
                    f"got {self.async_mode!r}"
                )
            if self.last_save_in_hf:
                raise ValueError(
                    "checkpoint.last_save_in_hf is not supported by MirrorCheckpointManager: the last step is a "
                    "ckptmirror step (export it with `ckptmirror export`)"
                )
            if self.keep_last is not None and self.keep_last < 1:
                raise ValueError("checkpoint.keep_last must be >= 1 (or unset to use keep_latest_k)")
            if self.min_replicas is not None and self.min_replicas < 1:
                raise ValueError("checkpoint.min_replicas must be >= 1")
            if self.on_replica_error not in ("warn", "raise"):
                raise ValueError("checkpoint.on_replica_error must be 'warn' or 'raise'")
            if self.dataloader_state not in ("json", "pickle"):
                raise ValueError("checkpoint.dataloader_state must be 'json' or 'pickle'")
            if self.object_bytes < 1 or self.io_threads < 1 or not self.commit_timeout_s > 0:
                raise ValueError("checkpoint.object_bytes, io_threads and commit_timeout_s must be positive")
            if any(not isinstance(u, str) or not u.strip() for u in self.replicas):
                raise ValueError(f"checkpoint.replicas holds an empty URL: {self.replicas!r}")
            self.parsed_storage_options()

        def parsed_storage_options(self) -> dict[str, dict[str, Any]] | None:
            """``storage_options`` as a dict (None when unset); ValueError when it is not a JSON object of objects."""
            if not self.storage_options.strip():
                return None
            try:
                opts = json.loads(self.storage_options)
            except ValueError as exc:
                raise ValueError(f"checkpoint.storage_options is not JSON: {exc}") from None
            if not isinstance(opts, dict) or not all(isinstance(v, dict) for v in opts.values()):
                raise ValueError('checkpoint.storage_options must be a JSON object of objects: {"s3": {...}}')
            return opts

        def effective_keep_last(self) -> int | None:
            """``keep_last``, else ``keep_latest_k`` (0: None, keep everything)."""
            if self.keep_last is not None:
                return self.keep_last
            return self.keep_latest_k or None

        @classmethod
        def from_checkpoint_config(cls, base: Any, **overrides: Any) -> MirrorCheckpointManager.Config:
            """A Config with every field that ``base`` (another manager's Config) shares, then ``overrides``.

            ``config.checkpoint = MirrorCheckpointManager.Config.from_checkpoint_config(config.checkpoint,
            enable=True, replicas=[...])`` keeps a model config's interval, folder, load policy...
            (``async_mode`` and ``last_save_in_hf`` are not carried over).
            """
            mine = {f.name for f in fields(cls) if f.init}
            skip = {"async_mode", "last_save_in_hf", "last_save_model_only"}
            kw = {f.name: getattr(base, f.name) for f in fields(base) if f.name in mine and f.name not in skip}
            kw.update(overrides)
            return cls(**kw)

    def __init__(
        self,
        config: Config,
        *,
        dataloader: Any,
        model_parts: list[torch.nn.Module],
        optimizers: Any,
        lr_schedulers: Any,
        states: dict[str, Any],
        sd_adapter: Any,
        base_folder: str = "",
    ) -> None:
        self.enable = config.enable
        if not self.enable:
            return
        self.save_future: Future[Any] | None = None
        self._closed = False
        self.config = config
        self.interval = config.interval
        self.load_only = config.load_only
        self.enable_first_step_checkpoint = config.enable_first_step_checkpoint
        self.exclude_from_loading = list(config.exclude_from_loading)
        self.last_save_model_only = config.last_save_model_only
        self.export_dtype = TORCH_DTYPE_MAP[config.export_dtype]
        self.sd_adapter = sd_adapter
        self.async_mode = config.async_mode
        self.folder = os.path.join(base_folder, config.folder) if not _is_url(config.folder) else config.folder

        dl_state: Any = dataloader
        if config.dataloader_state == "json" and dataloader is not None:
            if hasattr(dataloader, "_rank_id") and hasattr(dataloader, "dp_world_size"):
                dl_state = _JsonDataloaderState(dataloader)
            else:
                log.info("dataloader %s is stored through its own state_dict()", type(dataloader).__name__)
        self.states = states
        self.states.update(
            {MODEL: ModelWrapper(model_parts), OPTIMIZER: optimizers, DATALOADER: dl_state, LR_SCHEDULER: lr_schedulers}
        )

        # A gloo group: async_save's collectives (DCP advises a separate group, and it needs a CPU
        # backend), and the few agreements this manager makes between ranks.
        self.pg: Any = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.pg = _new_gloo_group()

        info = detect()
        self._urls = [expand_url(u, info) for u in replica_urls(config, base_folder)]
        self.replicas: list[Replica] = open_replicas(self._urls, config.parsed_storage_options())
        self.keep_last = config.effective_keep_last()
        self._writer = MirrorStorageWriter(
            self.replicas,
            keep_last=self.keep_last,
            object_bytes=config.object_bytes,
            io_threads=config.io_threads,
            min_replicas=config.min_replicas,
            on_replica_error=config.on_replica_error,
            commit_timeout_s=config.commit_timeout_s,
            slow_replica_timeout_s=config.slow_replica_timeout_s,
        )
        #: Steps committed on this rank's replicas that are newer than the step this run resumed
        #: from: saving one of them replaces it.
        self._stale: set[int] = set()
        #: The step the last :meth:`load` restored (None: none yet, or a fresh start).
        self.loaded_step: int | None = None
        log.info(
            "ckptmirror checkpointing active: every %d steps to %s (keep_last=%s, %s)",
            self.interval,
            ", ".join(r.url for r in self.replicas),
            self.keep_last,
            "async" if self.async_mode == "async" else "synchronous",
        )

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing to report to at collection time
            pass

    # ------------------------------------------------------------------ collectives
    def _all_max(self, value: int) -> int:
        """The largest ``value`` over all ranks (this rank's alone without a group)."""
        if self.pg is None:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.pg)
        return int(t.item())

    def _committed_here(self) -> list[int]:
        return sorted(list_steps(self.replicas).committed)

    # ------------------------------------------------------------------ saving
    def _should_save(self, curr_step: int, last_step: bool = False) -> bool:
        if self.load_only:
            return False
        if curr_step == 1 and self.enable_first_step_checkpoint:
            return True
        return last_step or curr_step % self.interval == 0

    def _flattened_states(self) -> dict[str, Any]:
        """What torchtitan saves: the model's state dict at the top level, the other states beside it."""
        sd = {k: v for k, v in self.states.items() if k != MODEL}
        sd.update(self.states[MODEL].state_dict())
        return sd

    def _model_only_states(self) -> dict[str, Any]:
        states: dict[str, Any] = self.states[MODEL].state_dict()
        return {
            k: v.to(self.export_dtype)
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != self.export_dtype
            else v
            for k, v in states.items()
        }

    def _replace_stale(self, step: int) -> None:
        """Every rank: if ``step`` was committed by an earlier run (newer than the step resumed from), delete it."""
        if self._all_max(int(step in self._stale)) == 0:
            return
        self._stale.discard(step)
        log.warning("step %d was committed by an earlier run that this run went back from: replacing it", step)
        for r in self.replicas:
            try:
                if is_committed(r, step):
                    remove_step(r, step)
            except (CkptMirrorError, OSError) as exc:  # another rank sharing the replica removed it first
                log.info("removing the old step %d on %s: %s", step, r.url, exc)
        if self.pg is not None:
            dist.barrier(group=self.pg)

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._should_save(curr_step, last_step):
            return False
        self.maybe_wait_for_saving()
        self._replace_stale(curr_step)
        begin = time.monotonic()
        checkpoint_id = f"step-{curr_step}"
        if last_step:
            if self.last_save_model_only:
                log.info("saving a model-only checkpoint in %s at the last step, %d", self.export_dtype, curr_step)
                states = self._model_only_states()
            else:
                states = self._flattened_states()
            dcp.save(states, checkpoint_id=checkpoint_id, storage_writer=self._writer, planner=MirrorSavePlanner())
            what = "saved"
        elif self.async_mode == "async":
            self.save_future = dcp.async_save(  # type: ignore[assignment]
                self._flattened_states(),
                checkpoint_id=checkpoint_id,
                storage_writer=self._writer,
                planner=MirrorSavePlanner(),
                process_group=self.pg,
            )
            what = "staged"
        else:
            dcp.save(
                self._flattened_states(),
                checkpoint_id=checkpoint_id,
                storage_writer=self._writer,
                planner=MirrorSavePlanner(),
            )
            what = "saved"
        log.info("checkpoint of step %d %s in %.2f s", curr_step, what, time.monotonic() - begin)
        return True

    def _wait_for_saving(self) -> None:
        fut, self.save_future = self.save_future, None
        if fut is not None:
            fut.result()

    def _maybe_wait_for_staging(self) -> None:
        """Nothing to wait for: the writer's ``stage()`` returns once the state is copied."""

    # ------------------------------------------------------------------ loading
    def _load(self, step: int = -1) -> bool:
        committed = self._committed_here()
        newest = self._all_max(max(committed, default=-1))
        if step != -1 and newest < 0:
            raise FileNotFoundError(
                f"--checkpoint.load_step={step}: no step is committed on {', '.join(r.url for r in self.replicas)}"
            )
        if newest < 0:
            return self._initial_load()
        target = step if step != -1 else newest
        model_only = target == 0
        states = self.states[MODEL].state_dict() if model_only else self._states_to_load()
        begin = time.monotonic()
        reader = MirrorStorageReader(
            self.replicas,
            step=None if step == -1 else step,
            io_threads=self.config.io_threads,
            commit_timeout_s=self.config.commit_timeout_s,
        )
        try:
            dcp.load(states, storage_reader=reader, planner=MirrorLoadPlanner())
            loaded = reader.step
        finally:
            reader.close()
        # The model's state dict is flattened into ``states`` (no Stateful to call back).
        self.states[MODEL].load_state_dict(states)
        assert loaded is not None
        self.loaded_step = loaded
        self._stale = {s for s in committed if s > loaded}
        if loaded != target:
            log.warning("loaded step %d: newer steps could not be loaded on every rank", loaded)
        log.info(
            "loaded step %d%s from ckptmirror replicas in %.2f s",
            loaded,
            " (model only)" if model_only else "",
            time.monotonic() - begin,
        )
        return True

    def _states_to_load(self) -> dict[str, Any]:
        for key in self.exclude_from_loading:
            if key not in self.states:
                raise ValueError(f"{key} not found in state_dict.")
        sd = {k: v for k, v in self.states.items() if k not in self.exclude_from_loading and k != MODEL}
        sd.update(self.states[MODEL].state_dict())
        return sd

    def _initial_load(self) -> bool:
        """No committed step anywhere: torchtitan's initial load (a DCP or HF checkpoint), or a fresh start."""
        cfg = self.config
        path = cfg.initial_load_path
        from_hf = cfg.initial_load_in_hf
        if not path and from_hf:
            if not (self.sd_adapter is not None and getattr(self.sd_adapter, "hf_assets_path", None)):
                raise ValueError("initial_load_in_hf requires sd_adapter and hf_assets_path")
            path = self.sd_adapter.hf_assets_path
        if not path:
            log.info("no checkpoint on %s: this is a fresh start", ", ".join(r.url for r in self.replicas))
            return False
        if not os.path.isdir(path) and not _is_url(path):
            raise ValueError(f"checkpoint.initial_load_path is invalid: {path}")
        model_only = cfg.initial_load_model_only
        states = self.states[MODEL].state_dict() if model_only else self._states_to_load()
        begin = time.monotonic()
        if from_hf:
            hf_sd = self.sd_adapter.to_hf(states)
            dcp.load(
                hf_sd, storage_reader=self.sd_adapter.get_hf_storage_reader(path, cfg.initial_load_in_hf_quantized)
            )
            self.states[MODEL].load_state_dict(self.sd_adapter.from_hf(hf_sd))
        else:
            # A plain DCP checkpoint (torchtitan's own format): DCP's reader and planner, which
            # unpickle its metadata and values. It is the job's configured starting point.
            dcp.load(states, checkpoint_id=path)
            self.states[MODEL].load_state_dict(states)
        log.info("initial load from %s%s in %.2f s", path, " (HF)" if from_hf else "", time.monotonic() - begin)
        return True

    # ------------------------------------------------------------------ closing
    def _close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        pending = sys.exc_info()[0] is not None
        try:
            if self.save_future is not None:
                try:
                    self._wait_for_saving()
                except BaseException:
                    if not pending:
                        raise
                    log.exception("the checkpoint save in flight failed")
        finally:
            self._writer.close()
            close_opened(self.replicas, self._urls)

    @property
    def writer(self) -> MirrorStorageWriter:
        """The storage writer every save goes through (``last_outcome``, ``last_stage_s``, ``staging_allocations``)."""
        return self._writer


def replica_urls(config: Any, base_folder: str = "") -> list[str]:
    """The replica URLs a ``MirrorCheckpointManager.Config`` names (placeholders not filled)."""
    urls = list(config.replicas) or [config.folder]
    return [u if _is_url(u) or os.path.isabs(u) else os.path.join(base_folder, u) for u in urls]
