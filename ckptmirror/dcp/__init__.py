"""``torch.distributed.checkpoint`` (DCP) onto ckptmirror replicas: ``dcp.save``, ``async_save``, ``load``.

::

    import torch.distributed.checkpoint as dcp
    from ckptmirror.dcp import MirrorStorageWriter, MirrorStorageReader, MirrorSavePlanner, MirrorLoadPlanner

    replicas = ["/local/nvme/ckpt/node{node_rank}", "s3://bucket/run1"]
    dcp.save(state_dict, storage_writer=MirrorStorageWriter(replicas, step=step), planner=MirrorSavePlanner())
    fut = dcp.async_save(state_dict, storage_writer=writer, planner=MirrorSavePlanner(),
                         checkpoint_id=f"run1/step-{step}", process_group=gloo_group)
    dcp.load(state_dict, storage_reader=MirrorStorageReader(replicas), planner=MirrorLoadPlanner())

What changes against DCP's ``FileSystemWriter``/``FileSystemReader``:

- every rank's data goes to that rank's replicas (lists are per rank, matched by position, with
  ``{rank}``/``{node_rank}`` placeholders), written in parallel, every object checksummed;
- a step commits only when every rank's part is durable, by the same vote as
  :class:`~ckptmirror.Mirror`; a rank that fails or dies mid-save means no commit;
- nothing is pickled: DCP's ``Metadata`` and non-tensor values are JSON (ckptmirror's tree
  encoding); a load never calls ``pickle`` or ``torch.load``;
- loads take each object from the first replica where it verifies, pick the newest step every
  rank can recover (or ``step=``), and fall back to older steps, all ranks together;
- a step written through DCP is a ckptmirror step: ``ckptmirror ls/verify/repair/prune/inspect``
  work on it (see :mod:`ckptmirror.dcp.writer` for the layout).

This package imports ``torch.distributed.checkpoint``; ``import ckptmirror`` does not import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..replicas import Replica, close_opened, open_replicas
from ..restore.discover import list_steps
from ._codec import VALUE_MAGIC, decode_value, encode_value
from .planners import MirrorLoadPlanner, MirrorSavePlanner
from .reader import MirrorStorageReader
from .writer import MirrorStorageWriter

__all__ = [
    "VALUE_MAGIC",
    "MirrorLoadPlanner",
    "MirrorSavePlanner",
    "MirrorStorageReader",
    "MirrorStorageWriter",
    "committed_steps",
    "decode_value",
    "encode_value",
]


def committed_steps(
    replicas: Sequence[str | Replica], storage_options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[int]:
    """Steps committed on any of ``replicas`` (URLs without placeholders, or Replica objects), ascending.

    Presence of the commit record only (nothing is verified): use it to decide between a fresh
    start and ``dcp.load``, which raises when there is nothing to load.
    """
    opened = open_replicas(list(replicas), storage_options)
    try:
        return sorted(list_steps(opened).committed)
    finally:
        close_opened(opened, list(replicas))
