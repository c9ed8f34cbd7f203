"""Writes that bypass the page cache (``O_DIRECT``): the local replica's ``direct_io`` option.

Why: a buffered write makes the kernel copy every byte into fresh page-cache pages and later
write them back; on the 2-core benchmark machine that cost 1.1-2.5 CPU-seconds per GB written
(a 64 MiB-object, 4-thread write of 1 GB + fsync), against 0.16 with ``O_DIRECT``, where the
device reads the bytes straight from our buffer (measured in
``benchmarks/results/direct_io_2026-12-02.md``). On a training node those CPU-seconds come out
of the training step, and the cached copy pushes the training's own pages out of memory. The
price: a restore soon after reads the objects from the disk, not from memory.

``O_DIRECT`` wants the buffer's address, the file offset and the length aligned to the
device's logical block size. :class:`DirectFile` writes whole blocks of :data:`ALIGN` bytes:
straight from the caller's buffer where its address is aligned (the staging arena starts on a
page, so an object that starts at a 4 KiB multiple of the stream is), else through a per-thread
bounce buffer (one memcpy, no GIL: NumPy copies without it); the last partial block is held
back and written through the page cache when the file is finished (the fsync after covers
it). A filesystem that refuses ``O_DIRECT`` (``EINVAL``) turns it off for the rest of the
file, which is then written the ordinary way: a refusal can cost speed, never a write (any
other error fails the write, as it would without the option).
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import threading
from collections.abc import Callable

import numpy as np

#: Alignment of addresses, offsets and lengths: 4 KiB covers every logical block size seen on
#: Linux disks (512 or 4096) and is the page size, so a page-aligned buffer always qualifies.
ALIGN = 4096
#: Bytes per write call, and the size of each thread's bounce buffer.
CHUNK = 4 << 20
O_DIRECT: int = getattr(os, "O_DIRECT", 0)

_local = threading.local()


def supported() -> bool:
    """Whether this platform has ``O_DIRECT`` (Linux); elsewhere the option writes buffered."""
    return O_DIRECT != 0 and sys.platform.startswith("linux")


def _bounce() -> np.ndarray:
    """This thread's page-aligned bounce buffer of :data:`CHUNK` bytes (made on first use; an
    I/O pool's threads live as long as their mirror, so each makes one)."""
    buf: np.ndarray | None = getattr(_local, "buf", None)
    if buf is None:
        # Anonymous maps are page-aligned. Private: a child forked later gets its own copy,
        # where a shared map would let its writes change the bytes of ours in flight.
        buf = np.frombuffer(mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=np.uint8)
        _local.buf = buf
    return buf


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


class DirectFile:
    """Appends to ``fd``, opened with ``O_DIRECT`` (and written only through this object).

    ``on_refused(exc)`` is called once if the filesystem refuses a direct write (``EINVAL``):
    the write is then done through the page cache, and so is the rest of the file.
    """

    def __init__(self, fd: int, on_refused: Callable[[OSError], None]) -> None:
        self.fd = fd
        self.direct = True
        self._pending = bytearray()  # the last partial block, held back until more comes or the end
        self._on_refused = on_refused

    def write(self, view: memoryview) -> None:
        """Append ``view`` (bytes). Raises OSError as ``os.write`` does, ``EINVAL`` excepted."""
        if not self.direct:
            self._flush_pending()
            _write_all(self.fd, view)
            return
        pos = 0
        if self._pending:
            pos = min(ALIGN - len(self._pending), len(view))
            self._pending += view[:pos]
            if len(self._pending) < ALIGN:
                return
            block, self._pending = bytes(self._pending), bytearray()
            self._blocks(memoryview(block))
        whole = (len(view) - pos) // ALIGN * ALIGN
        if whole:
            self._blocks(view[pos : pos + whole])
        self._pending += view[pos + whole :]
        if not self.direct:  # refused meanwhile: nothing is held back any more
            self._flush_pending()

    def finish(self) -> None:
        """Write what is held back (the last partial block) through the page cache; the caller
        fsyncs next."""
        if self._pending:
            if self.direct:
                self._buffered()
            self._flush_pending()

    def _blocks(self, view: memoryview) -> None:
        """Write ``view`` (a whole number of blocks, at an aligned file offset)."""
        src = np.frombuffer(view, dtype=np.uint8)
        aligned = src.ctypes.data % ALIGN == 0
        done = 0
        while done < len(src):
            if not self.direct:
                _write_all(self.fd, view[done:])
                return
            k = min(CHUNK, len(src) - done)
            if aligned:
                chunk = view[done : done + k]
            else:
                bounce = _bounce()
                np.copyto(bounce[:k], src[done : done + k])
                chunk = bounce[:k].data
            try:
                n = os.write(self.fd, chunk)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._buffered()  # nothing was written: the loop writes it the ordinary way
                self._on_refused(exc)
                continue
            if n % ALIGN:
                self._buffered()  # a short write left the offset unaligned: the rest goes buffered
            done += n

    def _buffered(self) -> None:
        import fcntl  # here: the module is imported on every platform, fcntl exists on POSIX only

        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~O_DIRECT)
        self.direct = False

    def _flush_pending(self) -> None:
        if self._pending:
            block, self._pending = bytes(self._pending), bytearray()
            _write_all(self.fd, memoryview(block))
