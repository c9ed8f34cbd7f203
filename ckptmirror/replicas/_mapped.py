"""A local object file mapped read-only, for restore (``LocalReplica.map_object``): its bytes
are verified where they lie, then landed from the same file. Kept apart from ``local.py``, the
write side, which re-exports :class:`MappedObject`."""

from __future__ import annotations

import mmap
import os

import numpy as np

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_BINARY = getattr(os, "O_BINARY", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


class MappedObject:
    """An object file mapped read-only: its bytes where the page cache holds them, no copy.

    Restore verifies a local object here (the checksum reads the mapped pages) and later copies
    the very same pages into the caller's tensor, so nothing lands before every object of the
    step verified, at the cost of no extra copy. Objects are immutable once committed (written
    under a temporary name, then renamed; deleted with ``unlink``, never truncated or rewritten
    in place), so the pages cannot change between the two.
    """

    __slots__ = ("_ident", "_mm", "addr", "key", "path", "replica", "size")

    def __init__(self, mm: mmap.mmap, size: int, path: str, ident: tuple[int, int], replica: str, key: str) -> None:
        self._mm = mm
        self.size = size
        # Only the address is kept: a live buffer export would stop close() from unmapping.
        self.addr = int(np.frombuffer(mm, dtype=np.uint8).ctypes.data)
        self.path = path  # where it was mapped from, with the file's (device, inode)
        self._ident = ident
        self.replica = replica
        self.key = key

    def reopen(self) -> int | None:
        """A read-only descriptor on the very file that is mapped, or None.

        Restore lands the verified bytes with ``preadv`` on it (:mod:`~ckptmirror.restore.vread`)
        rather than copying out of the mapping. The path is opened again (keeping a descriptor
        per mapped object could run out of them at thousands of objects) and kept only if it is
        still the same file, by device and inode: while the mapping lives, the inode cannot be
        freed and its number reused. A path that names another file now (the object was
        replaced, e.g. by a repair) gives None: the caller copies out of the mapping. The same
        file cut shorter since (it should never be) still gives its descriptor: reading it
        fails cleanly, where copying out of the mapping past its end would die of SIGBUS.
        """
        try:
            # O_NONBLOCK: a FIFO put under the name must not block the restore (no effect on files).
            fd = os.open(self.path, os.O_RDONLY | O_NOFOLLOW | O_BINARY | O_NONBLOCK)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == self._ident:
                return fd
        except OSError:
            pass
        os.close(fd)
        return None

    @property
    def buffer(self) -> mmap.mmap:
        """The mapped bytes (read-only)."""
        return self._mm

    def close(self) -> None:
        """Unmap (idempotent). ``addr`` is invalid afterwards."""
        self._mm.close()
