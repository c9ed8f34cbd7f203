"""A torchtitan config_registry module: torchtitan jobs that checkpoint to ckptmirror replicas.

torchtitan (0.3.0) picks a config with ``--module``/``--config`` and takes overrides of any key
as ``--section.key value``. From the repository root (``pip install 'ckptmirror[torchtitan]'``;
torchtitan's own data and tokenizer paths as usual)::

    torchrun --nproc-per-node 8 -m torchtitan.train \\
        --module examples.torchtitan_mirror --config llama3_debugmodel_mirror \\
        --checkpoint.replicas '/local/nvme/ckpt/run1/node{node_rank},s3://bucket/ckpt/run1' \\
        --checkpoint.keep_last 3 --checkpoint.interval 100

Run the same command again after a crash (or let ``torchrun --max-restarts`` do it): the job
loads the newest step every rank can recover, from the first replica where each object
verifies, and trains on. ``ckptmirror ls/verify s3://bucket/ckpt/run1`` work on the replicas.

The checkpoint keys (``--checkpoint.*``): ``replicas`` (comma-separated URLs; empty: one replica
at ``dump_folder/folder``), ``interval``, ``keep_last``, ``async_mode`` (``async`` | ``disabled``),
``min_replicas``, ``on_replica_error`` (``warn`` | ``raise``), ``object_bytes``, ``io_threads``,
``commit_timeout_s``, ``storage_options`` (JSON), ``dataloader_state`` (``json`` | ``pickle``), and
torchtitan's ``load_step``, ``exclude_from_loading``, ``initial_load_path``, ``last_save_model_only``,
``export_dtype``, ``enable_first_step_checkpoint``, ``load_only``
(:mod:`ckptmirror.integrations.torchtitan` describes each).

To put any other torchtitan config on ckptmirror, do what these functions do: keep the config
and swap its ``checkpoint`` for a ``MirrorCheckpointManager.Config``.
"""

from __future__ import annotations

from torchtitan.models.llama3.config_registry import llama3_debugmodel
from torchtitan.trainer import Trainer

from ckptmirror.integrations.torchtitan import MirrorCheckpointManager


def llama3_debugmodel_mirror() -> Trainer.Config:
    """torchtitan's Llama 3 debug model, checkpointed every 10 steps to ckptmirror, async, keeping 3 steps."""
    config = llama3_debugmodel()
    config.checkpoint = MirrorCheckpointManager.Config.from_checkpoint_config(
        config.checkpoint,
        enable=True,
        interval=10,
        keep_last=3,
        async_mode="async",
        replicas=[],  # dump_folder/checkpoint; set --checkpoint.replicas for real runs
    )
    return config
