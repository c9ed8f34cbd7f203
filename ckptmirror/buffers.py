"""Byte views of tensors and storages, and copies between them, shared by save and restore.

Both paths move raw bytes between tensors and replicas without copies: a save hashes and
writes the staging arena through :func:`host_bytes`; a restore reads objects straight into
the caller's tensors through :func:`byte_view`. The views allocate nothing.

Host-to-host copies go through NumPy (:func:`copy_bytes`, :func:`gather_bytes`), never through
``Tensor.copy_``: on the CPU, torch splits every copy of more than 32,768 elements (32 KiB of a
uint8 view) over its intra-op OpenMP team, and on a busy machine each of those parallel regions
waits for team threads that are spinning or descheduled. Measured here (2 cores, two competing
single-threaded processes): 10,000 copies of 50 KB took 5-80 s through ``torch._foreach_copy_``
and 0.2-0.3 s through NumPy. NumPy copies a contiguous byte range with one ``memmove`` on the
calling thread, with the GIL released for large copies, whatever the caller's OpenMP or torch
thread settings are.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import torch


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's cpuset, ``taskset``).

    Copying and hashing threads beyond this number cannot run at once: they only take CPU time
    from each other and from the calling thread (and each start of one waits for the GIL)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


#: Bytes between two writes of :func:`fault_in`: one per page is enough to map it.
_PAGE = mmap.PAGESIZE


def byte_view(storage: torch.UntypedStorage, start: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor aliasing ``nbytes`` of ``storage`` from byte ``start`` (any device)."""
    # stride (1,) is what set_ derives for a 1-d size anyway; torch's stubs want it spelled out
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, start, (nbytes,), (1,))


def host_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor as a memoryview, without a copy (the same view as
    ``memoryview(t.numpy())``, which numpy's stubs only allow on Python >= 3.12)."""
    return t.numpy().data


def host_array(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a flat uint8 NumPy array, without a copy.

    The array keeps ``t`` (and so its storage) alive. It holds the data pointer ``t`` had when
    it was made: if the storage is later resized, the array points to freed memory, so callers
    that keep it must check that the tensors they came from still start where they did.
    """
    if not t.is_contiguous():
        raise ValueError("host_array needs a contiguous tensor")
    a = t.detach().numpy()
    return a.reshape(-1).view(np.uint8)


def copy_bytes(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy ``src`` into ``dst`` (flat uint8 arrays of one length) without entering OpenMP."""
    np.copyto(dst, src, casting="no")


def gather_bytes(dst: np.ndarray, srcs: list[np.ndarray]) -> None:
    """Copy ``srcs`` back to back into ``dst`` (their lengths sum to its length) in one call.

    One C loop for any number of pieces: thousands of small tensors cost one Python call,
    not one each, and no OpenMP region (see the module docstring).
    """
    if len(srcs) == 1:
        np.copyto(dst, srcs[0], casting="no")
    else:
        np.concatenate(srcs, out=dst, casting="no")


def fault_in(t: torch.Tensor) -> None:
    """Map every page of a CPU tensor now, by writing a zero into each one.

    A copy into fresh pages costs several times a copy into mapped ones (a page fault and the
    kernel zeroing each page); doing it ahead keeps that cost out of the first save. One
    page-faulting pass over the buffer: about 0.3 s per 0.5 GB on this machine class.
    """
    if t.numel() == 0 or t.device.type != "cpu":
        return
    a = host_array(t)
    a[::_PAGE] = 0
    a[-1] = 0  # the last page, when the buffer does not start on a page boundary
