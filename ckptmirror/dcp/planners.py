"""Planners that keep pickle out of DCP: non-tensor values travel as ckptmirror JSON trees.

DCP's :class:`~torch.distributed.checkpoint.DefaultSavePlanner` turns every non-tensor value
(learning rates, ``param_groups`` entries, step counts kept as Python numbers) into
``torch.save`` bytes, and :class:`~torch.distributed.checkpoint.DefaultLoadPlanner` reads them
back with ``torch.load(weights_only=False)``: loading a checkpoint could run code. These two
planners change only that: values are encoded with ckptmirror's closed JSON tree encoding
(:mod:`ckptmirror.state.tree`) and decoded without unpickling. Tensors, sharding, flattening
and resharding are DCP's own, unchanged.

Call order (DCP's, on every rank unless noted)::

    save:  set_up_planner -> create_local_plan -> create_global_plan (coordinator)
           -> finish_plan -> resolve_data (from the storage writer, per item)
    load:  set_up_planner -> create_local_plan -> create_global_plan (coordinator)
           -> finish_plan -> load_bytes / resolve_tensor + commit_tensor (from the storage reader)
"""

from __future__ import annotations

import io
from typing import Any

from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import ReadItem, SavePlan, WriteItem, WriteItemType

from ._codec import decode_value, encode_value


class MirrorSavePlanner(DefaultSavePlanner):
    """:class:`DefaultSavePlanner` whose non-tensor values are ckptmirror JSON, not ``torch.save`` bytes.

    Pass it to ``dcp.save`` / ``dcp.async_save`` with a
    :class:`~ckptmirror.dcp.MirrorStorageWriter` (which refuses DCP's default planner when the
    state holds non-tensor values). Values are encoded while the local plan is made, so a value
    that cannot be stored (an object, a tensor inside a tuple) fails the save on every rank
    before anything is written, with an :class:`~ckptmirror.UnsupportedTypeError` naming its
    key path. The constructor takes :class:`DefaultSavePlanner`'s arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encoded: dict[str, bytes] = {}

    def create_local_plan(self) -> SavePlan:
        """DCP's local plan; every non-tensor value is encoded now (and kept for :meth:`resolve_data`)."""
        plan = super().create_local_plan()
        self._encoded = {
            item.index.fqn: encode_value(self.lookup_object(item.index), item.index.fqn)
            for item in plan.items
            if item.type == WriteItemType.BYTE_IO
        }
        return plan

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:  # noqa: A002 - DCP's parameter name
        """Tensors unchanged; a non-tensor value as ckptmirror JSON bytes (never ``torch.save``)."""
        if write_item.type != WriteItemType.BYTE_IO:
            return object
        fqn = write_item.index.fqn
        data = self._encoded.get(fqn)
        if data is None:  # resolve_data without create_local_plan (a caller driving the planner itself)
            data = encode_value(object, fqn)
        return io.BytesIO(data)


class MirrorLoadPlanner(DefaultLoadPlanner):
    """:class:`DefaultLoadPlanner` that decodes non-tensor values from ckptmirror JSON.

    ``load_bytes`` never calls ``torch.load`` or ``pickle``: bytes that are not ckptmirror's
    JSON encoding (a checkpoint written with DCP's default planner) raise
    :class:`~ckptmirror.ManifestError` naming the key. The constructor takes
    :class:`DefaultLoadPlanner`'s arguments.
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Decode one value and put it where the state dict had it (as DCP's default planner does)."""
        fqn = read_item.dest_index.fqn
        obj = decode_value(value.getvalue(), fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
