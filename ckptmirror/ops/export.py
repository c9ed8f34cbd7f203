"""``export``: write one rank of a step as a ``safetensors`` or ``torch.save`` file for other tools.

Writing is not loading: nothing here unpickles or ``torch.load``s checkpoint data; the state
is read and verified exactly as a restore reads it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CkptMirrorError
from ..replicas import Replica
from ..replicas.base import Buffer
from ..restore.discover import list_steps
from ..restore.fetch import Fetcher
from ._common import FAILURES, Progress, ProgressFactory, UsageError, dotted, opened, walk

if TYPE_CHECKING:  # imported by the functions that build tensors: the other commands run without torch
    import torch


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export` wrote."""

    path: str
    format: str
    step: int
    rank: int
    tensors: int
    tensor_bytes: int
    values: tuple[str, ...]  # names of plain values stored (safetensors: as JSON metadata)
    dropped: tuple[str, ...]  # "name: why", for values the format cannot hold
    cloned: tuple[str, ...]  # tensors copied because they shared storage or were not contiguous

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


class _Counted(Replica):
    """``inner`` as it is, except that the object bytes read through it are counted on a progress
    bar: the reader :func:`export` loads with (:func:`~ckptmirror.restore.choose.load_newest`)
    has no progress hook of its own, and a multi-GB export without one looks hung."""

    def __init__(self, inner: Replica, bar: Progress, lock: threading.Lock) -> None:
        super().__init__(inner.url)
        # Every setting a Replica declares (read preference, time budget, ...) is the inner one's,
        # so the reader orders and times this replica exactly as it would the inner one.
        for name, value in vars(Replica).items():
            if not name.startswith("_") and not callable(value) and not isinstance(value, property):
                setattr(self, name, getattr(inner, name))
        self.inner = inner
        self._bar = bar
        self._lock = lock

    def read_into(self, key: str, out: memoryview) -> None:
        self.inner.read_into(key, out)
        with self._lock:  # tqdm's update is not meant for several threads at once
            self._bar.update(out.nbytes)

    def put(self, key: str, data: Buffer) -> None:
        self.inner.put(key, data)

    def commit(self, key: str, data: bytes) -> None:
        self.inner.commit(key, data)

    def get(self, key: str, max_bytes: int) -> bytes:
        return self.inner.get(key, max_bytes)

    def size(self, key: str) -> int | None:
        return self.inner.size(key)

    def list_steps(self) -> list[str]:
        return self.inner.list_steps()

    def list_prefix(self, prefix: str) -> list[str]:
        return self.inner.list_prefix(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(prefix)

    def ping(self) -> None:
        self.inner.ping()

    def release_thread(self) -> None:
        self.inner.release_thread()

    def close(self) -> None:
        pass  # the inner replica is closed by whoever opened it


def _expected_bytes(replicas: Sequence[Replica], pool: ThreadPoolExecutor, step: int | None, rank: int) -> int:
    """The bytes of ``rank`` of ``step`` (default: the newest committed), the bar's total; 0 if
    they cannot be told (the bar then counts without a percentage). Costs a listing and two
    small reads; the export falls back to an older step on its own if this one does not verify."""
    try:
        listing = list_steps(replicas)
        candidates = [step] if step is not None else sorted(listing.committed, reverse=True)
        if not candidates or candidates[0] not in listing.committed:
            return 0
        reader = Fetcher([r for r in replicas if r.url not in listing.unreachable], pool)
        commit = reader.read_commit(candidates[0], listing.committed[candidates[0]])
        if rank >= commit.world_size and not commit.replicated:
            return 0
        return reader.read_manifest(commit, rank).stream_bytes
    except FAILURES:
        return 0


def _plain(v: Any, name: str, fmt: str) -> tuple[bool, Any, str]:
    """(keep, converted value, note) for a non-tensor value."""
    import torch

    if isinstance(v, torch.Size):
        return True, [int(d) for d in v], ""
    if isinstance(v, (torch.dtype, torch.device)):
        return True, str(v), ""
    if type(v).__module__.startswith("numpy") and hasattr(v, "item"):
        return True, v.item(), ""
    if isinstance(v, (bytes, bytearray)):
        if fmt == "torch":
            return True, bytes(v), ""
        return False, None, "bytes cannot be stored in safetensors metadata"
    if v is None or isinstance(v, (bool, int, float, str)) or v == {} or v == [] or v == ():
        return True, (list(v) if isinstance(v, tuple) else v), ""
    return False, None, f"unsupported value of type {type(v).__name__}"


def export(
    urls: Sequence[str | Replica],
    out: str,
    *,
    format: str = "safetensors",
    step: int | None = None,
    rank: int = 0,
    overwrite: bool = False,
    threads: int = 4,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: ProgressFactory | None = None,
) -> ExportReport:
    """Write one rank of ``step`` (default: the newest that verifies) as one file for other tools.

    Nested key paths become dotted names (``model.fc1.weight``, ``optim.state.0.exp_avg``).
    ``safetensors``: tensors as tensors (ones that share storage are cloned, as the format
    requires); plain values as JSON strings in the metadata (``format: pt`` is added for
    Hugging Face loaders); ``bytes`` are dropped with a note. ``torch``: ``torch.save`` of a
    flat dict of plain tensors and plain values, loadable with ``torch.load(weights_only=True)``.
    The data is read and verified exactly as a restore reads it. The file is written to a
    temporary name and renamed, so a failed export leaves nothing half-written. ``progress``
    (as :func:`~ckptmirror.ops.verify`'s) counts the object bytes read.
    """
    try:
        import torch

        from ..restore.choose import load_newest  # the restore path
    except ImportError as exc:  # only export builds tensors: the other commands run without torch
        raise CkptMirrorError(f"export needs torch to build the tensors it writes ({exc}); pip install torch") from exc

    if format not in ("safetensors", "torch"):
        raise UsageError(f"--format must be safetensors or torch, got {format!r}")
    out = os.path.abspath(out)
    if os.path.isdir(out):
        raise UsageError(f"{out} is a directory; give a file name")
    if os.path.exists(out) and not overwrite:
        raise UsageError(f"{out} exists; pass --force to replace it")
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError(f"directory {os.path.dirname(out)} does not exist")
    with opened(urls, storage_options) as replicas:
        pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="ckptmirror-export")
        bar: Progress | None = None
        try:
            sources: Sequence[Replica] = replicas
            if progress is not None:
                bar = progress(_expected_bytes(replicas, pool, step, rank), "B", "export: read")
                lock = threading.Lock()
                sources = [_Counted(r, bar, lock) for r in replicas]
            loaded = load_newest(sources, pool, rank=rank, world_size=None, step=step)
        finally:
            pool.shutdown(wait=True)
            if bar is not None:
                bar.close()
    if loaded is None:
        raise CkptMirrorError("no committed step on these replicas")
    tensors, values, dropped = _flat(loaded.state, format)
    cloned: list[str] = []
    # Write to a temporary name in the same directory, then rename: a failed export leaves
    # no half-written file, and an existing file is replaced only by a complete one.
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex}")
    try:
        if format == "safetensors":
            ntensors, nbytes = _save_safetensors(tmp, tensors, values, dropped, cloned)
        else:
            obj: dict[str, Any] = dict(tensors)  # detached: plain tensors, no Parameter
            obj.update(values)
            torch.save(obj, tmp)
            ntensors, nbytes = len(tensors), sum(t.numel() * t.element_size() for t in tensors.values())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportReport(out, format, loaded.step, rank, ntensors, nbytes, tuple(values), tuple(dropped), tuple(cloned))


def _flat(state: Any, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """The state as dotted names: tensors (arrays converted), plain values, and "name: why" for what was dropped."""
    import numpy as np
    import torch

    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    dropped: list[str] = []

    def is_leaf(x: Any) -> bool:
        return isinstance(x, (torch.Tensor, np.ndarray))

    for path, v in walk(state, (), is_leaf):
        name = dotted(path) or "state"
        if name in tensors or name in values:
            raise CkptMirrorError(
                f"two entries of the state have the same dotted name {name!r}; the export would lose one"
            )
        if isinstance(v, np.ndarray):
            try:
                v = torch.from_numpy(np.ascontiguousarray(v))
            except TypeError as exc:
                dropped.append(f"{name}: numpy dtype {v.dtype} has no torch equivalent ({exc})")
                continue
        if isinstance(v, torch.Tensor):
            tensors[name] = v.detach()
            continue
        keep, conv, note = _plain(v, name, fmt)
        if keep:
            values[name] = conv
        else:
            dropped.append(f"{name}: {note}")
    return tensors, values, dropped


def _save_safetensors(
    path: str, tensors: dict[str, torch.Tensor], values: dict[str, Any], dropped: list[str], cloned: list[str]
) -> tuple[int, int]:
    """Write ``tensors`` and ``values`` (as JSON metadata) to ``path``; the tensors and bytes written.

    Appends to ``dropped`` the tensors whose dtype safetensors cannot hold and to ``cloned``
    those copied because the format wants each tensor contiguous and alone in its storage.
    """
    import safetensors.torch as st
    import torch
    from safetensors.torch import save_file

    supported = set(getattr(st, "_TYPES", {}).values())
    by_storage: dict[int, int] = {}
    for t in tensors.values():
        if t.numel():
            p = t.untyped_storage().data_ptr()
            by_storage[p] = by_storage.get(p, 0) + 1
    final: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if supported and t.dtype not in supported:
            dropped.append(f"{name}: dtype {t.dtype} is not supported by safetensors")
            continue
        if t.numel() == 0 or by_storage[t.untyped_storage().data_ptr()] > 1 or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
            cloned.append(name)
        final[name] = t
    metadata = {k: json.dumps(v) for k, v in values.items()}
    if "format" not in metadata and "format" not in final:
        metadata["format"] = "pt"  # what Hugging Face loaders look for
    save_file(final, path, metadata=metadata)
    return len(final), sum(t.numel() * t.element_size() for t in final.values())
