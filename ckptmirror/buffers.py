"""Byte views of tensors and storages, shared by the save path and the restore path.

Both paths move raw bytes between tensors and replicas without copies: a save hashes and
writes the staging arena through :func:`host_bytes`; a restore reads objects straight into
the caller's tensors through :func:`byte_view`. Nothing here allocates.
"""

from __future__ import annotations

import torch


def byte_view(storage: torch.UntypedStorage, start: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor aliasing ``nbytes`` of ``storage`` from byte ``start`` (any device)."""
    # stride (1,) is what set_ derives for a 1-d size anyway; torch's stubs want it spelled out
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, start, (nbytes,), (1,))


def host_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor as a memoryview, without a copy (the same view as
    ``memoryview(t.numpy())``, which numpy's stubs only allow on Python >= 3.12)."""
    return t.numpy().data
