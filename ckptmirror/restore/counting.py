"""A :class:`~ckptmirror.restore.fetch.Fetcher` that counts the bytes a step's load reads, for
its progress lines (:class:`~ckptmirror.progress.Progress`)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .. import config
from ..format import RankManifest
from ..progress import Progress
from .fetch import Fetcher

log = logging.getLogger("ckptmirror")


class CountingFetcher(Fetcher):
    """A :class:`Fetcher` that counts the object bytes it reads into a :class:`Progress`.

    Progress is reported from here rather than from fill.py: the reads of a step all go through
    ``fetch_into``, ``fetch`` and ``verify_mapped``, so counting them needs no hook in the fill code. Arguments
    pass through untouched (``*args``/``**kwargs``), so parameters added to those methods later
    keep working. ``fetch`` reads through ``fetch_into``: only the outermost call of a thread
    counts, so no byte is counted twice.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.interval_s = config.DEFAULT_PROGRESS_INTERVAL_S
        self._progress: Progress | None = None
        self._counting = threading.local()

    @contextlib.contextmanager
    def progress_of(self, manifest: RankManifest, rank: int, world_size: int | None) -> Iterator[None]:
        """Count the reads of one step's load (``fill_step``) and log its progress lines."""
        total = sum(o.size for o in manifest.objects)
        if not total:
            yield  # nothing to read: no progress worth a line
            return
        who = f" (rank {rank})" if world_size != 1 else ""
        with Progress(total, f"restore of step {manifest.step}{who}", log, self.interval_s) as p:
            self._progress = p
            try:
                yield
            finally:
                self._progress = None

    def fetch_into(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`Fetcher.fetch_into`, counting the bytes of ``out`` once it verified."""
        return self._counted(super().fetch_into, args, kwargs, lambda _: _view_bytes(args, kwargs))

    def fetch(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`Fetcher.fetch`, counting the bytes of the returned buffer once it verified."""
        return self._counted(super().fetch, args, kwargs, _buffer_bytes)

    def verify_mapped(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`Fetcher.verify_mapped`, counting the object's bytes once they verified in place."""
        return self._counted(super().verify_mapped, args, kwargs, _mapped_bytes)

    def _counted(
        self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], size: Callable[[Any], int]
    ) -> Any:
        if getattr(self._counting, "busy", False):
            return call(*args, **kwargs)  # inside fetch(): the outer call counts
        self._counting.busy = True
        try:
            result = call(*args, **kwargs)
        finally:
            self._counting.busy = False
        p = self._progress
        if p is not None:
            p.advance(size(result))
        return result


def _view_bytes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Bytes of the buffer ``fetch_into`` filled: its (only) memoryview argument."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, memoryview):
            return a.nbytes
    return 0


def _mapped_bytes(result: Any) -> int:
    """Bytes of the mapping ``verify_mapped`` returns first (``(mapping or None, url, replicas)``)."""
    mapping = result[0] if isinstance(result, tuple) and result else None
    return int(mapping.size) if mapping is not None else 0


def _buffer_bytes(result: Any) -> int:
    """Bytes of the tensor ``fetch`` returns first (``(buffer, url)``)."""
    buf = result[0] if isinstance(result, tuple) and result else result
    return int(buf.numel() * buf.element_size()) if hasattr(buf, "numel") else 0
