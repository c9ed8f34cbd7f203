"""Vectored reads: land many copies out of one verified object file with ``preadv(2)``.

A restore of a state with many small tensors lands each tensor's verified bytes with a copy of
its own. With one ``ctypes.memmove`` per copy, Python's call overhead (~1.3 us) costs as much
as the copying: 50k copies of 5 kB out of a mapped 0.26 GB object took 131 ms here, against
52 ms for ``readv`` of the same file into the same tensors. ``preadv`` takes up to ``IOV_MAX``
(1024) destinations a system call, so the per-copy cost is the kernel's, and the kernel copies
out of the page cache through its own mapping of it (no user page-table walks). Measured on this
2-core VM, 0.26 GB, page cache warm (``/tmp`` scripts, medians of 7):

======== ======================== ======================= ==================
tensors  memmove, one call each   preadv, 1 / 2 threads   raw ``readv``
======== ======================== ======================= ==================
6        41 ms                    42 / 26 ms              41 ms
10k      57 ms                    45 / 25 ms              41 ms
50k      131 ms                   56 / 34 ms              52 ms
======== ======================== ======================= ==================

The bytes are those that were verified: the file is read through a descriptor opened on the
very inode that was mapped and checksummed (see
:meth:`~ckptmirror.replicas.local.MappedObject.reopen`), and committed objects are never
rewritten in place. A file cut shorter since, or one that cannot be read any more (a disk error
after its pages were evicted), makes the read fail with an error, where a copy out of the
mapping would have died of SIGBUS. A rewrite in place of the same length would land unverified
bytes, as a copy out of the shared mapping would: nothing in ckptmirror does that.

Linux only (``preadv`` through libc with a 64-bit ``off_t``); elsewhere :data:`AVAILABLE` is
False and the caller copies out of the mapping instead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: Destinations per ``preadv`` call (the kernel refuses more with EINVAL).
IOV_MAX = 1024
try:
    # Linux's limit is 1024 (UIO_MAXIOV); a libc may report less, never honour more, or -1.
    _v = int(os.sysconf("SC_IOV_MAX"))
    IOV_MAX = _v if 0 < _v <= 1024 else 1024
except (ValueError, OSError, AttributeError):
    pass

_PreadFn = Callable[[int, int, int, int], int]
_Ints = Sequence[int] | np.ndarray


def _load() -> tuple[_PreadFn, _PreadFn] | None:
    """libc's ``preadv`` and ``pread`` (Linux, 64-bit), or None."""
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        preadv, pread = libc.preadv, libc.pread
    except (OSError, AttributeError):
        return None
    # ctypes calls release the GIL: two threads read in parallel.
    preadv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    preadv.restype = ctypes.c_ssize_t
    pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
    pread.restype = ctypes.c_ssize_t
    return preadv, pread


_FNS = _load()
#: Whether vectored reads are available here.
AVAILABLE = _FNS is not None


@dataclass
class Plan:
    """Copies out of one file, as ``preadv`` calls.

    ``iov``: the ``struct iovec`` array (address, length), one row per copy, in file order of
    each call; ``calls``: per call, its first row, its number of rows, its file offset and its
    bytes.
    """

    iov: np.ndarray
    calls: list[tuple[int, int, int, int]]


def plan(dst: _Ints, offsets: _Ints, nbytes: _Ints, chunk: int) -> Plan:
    """Plan copies ``nbytes[i]`` bytes at file offset ``offsets[i]`` -> address ``dst[i]``.

    Copies longer than ``chunk`` are cut into pieces of ``chunk`` bytes, and a call holds about
    ``chunk`` bytes at most, so that the calls spread evenly over threads (one large tensor
    too). A call covers copies that follow each other in the file with no gap (the writer's
    layout: storages back to back); at most :data:`IOV_MAX` of them. Built with array
    operations: a Python step per call, none per copy.
    """
    d = np.asarray(dst, dtype=np.int64)
    o = np.asarray(offsets, dtype=np.int64)
    n = np.asarray(nbytes, dtype=np.int64)
    if (n <= 0).any():
        keep = n > 0
        d, o, n = d[keep], o[keep], n[keep]
    if n.size and int(n.max()) > chunk:
        reps = -(-n // chunk)
        idx = np.repeat(np.arange(n.size), reps)
        within = np.arange(idx.size, dtype=np.int64) - np.repeat(np.cumsum(reps) - reps, reps)
        step = within * chunk
        d, o, n = d[idx] + step, o[idx] + step, np.minimum(chunk, n[idx] - step)
    k = int(n.size)
    iov = np.empty((k, 2), dtype=np.uint64)
    iov[:, 0] = d
    iov[:, 1] = n
    if k == 0:
        return Plan(iov, [])
    before = np.cumsum(n) - n  # bytes of the copies before each one
    brk = np.empty(k, dtype=bool)
    brk[0] = True
    brk[1:] = (o[1:] != o[:-1] + n[:-1]) | (before[1:] // chunk != before[:-1] // chunk)
    starts = np.flatnonzero(brk).tolist()
    ends = starts[1:] + [k]
    ends_bytes = before.tolist() + [int(before[-1] + n[-1])]
    ol = o.tolist()
    calls: list[tuple[int, int, int, int]] = []
    for a, b in zip(starts, ends):
        for s in range(a, b, IOV_MAX):
            e = min(b, s + IOV_MAX)
            calls.append((s, e - s, ol[s], ends_bytes[e] - ends_bytes[s]))
    return Plan(iov, calls)


def read(fd: int, p: Plan, calls: Sequence[int]) -> None:
    """Perform the calls numbered ``calls`` of plan ``p`` on file ``fd``.

    A short read (the kernel may stop early) continues where it stopped; an error, or the file
    ending before every byte was read, raises :class:`OSError`.
    """
    assert _FNS is not None, "vread.read() without preadv (check AVAILABLE)"
    preadv = _FNS[0]
    base = p.iov.ctypes.data
    for c in calls:
        first, count, off, want = p.calls[c]
        while True:
            got = preadv(fd, base + 16 * first, count, off)
            if got >= 0 or ctypes.get_errno() != errno.EINTR:
                break
        if got < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"preadv at offset {off}: {os.strerror(e)}")
        if got != want:
            _finish(fd, p.iov[first : first + count].tolist(), off, got)


def _finish(fd: int, rows: list[list[int]], off: int, done: int) -> None:
    """The rest of a call that stopped after ``done`` bytes: one ``pread`` per copy left."""
    assert _FNS is not None
    pread = _FNS[1]
    for addr, length in rows:
        if done >= length:
            done -= length
            off += length
            continue
        addr, length, off = addr + done, length - done, off + done
        done = 0
        while length:
            got = pread(fd, addr, length, off)
            if got < 0:
                e = ctypes.get_errno()
                if e == errno.EINTR:
                    continue
                raise OSError(e, f"pread at offset {off}: {os.strerror(e)}")
            if got == 0:
                raise OSError(errno.EIO, f"the file ended at offset {off}, {length} bytes short")
            addr, length, off = addr + got, length - got, off + got
