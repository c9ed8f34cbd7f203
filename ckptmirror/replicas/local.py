"""Local-disk replica (``file:///path`` or a plain path).

Writes follow the recipe in RELIABILITY.md: a temp file created with ``O_EXCL`` in the
destination directory, written, fsynced, renamed into place, then the directory fsynced.
A failed fsync is never retried (after "fsyncgate", a retry can report durability that is
not there): the put fails, and with it this replica's copy of the step. Commits use
``link()``, which fails if the target exists, so a commit is never replaced.

A save writes many objects into one directory: it puts them with ``sync_dir=False`` (each
file is still fsynced before its rename) and then calls :meth:`LocalReplica.sync_dirs` once,
which fsyncs each of their directories once, before anything that depends on them (the
manifest, the commit record) is written. A directory this replica creates gets its own
entry made durable too (its parent fsynced) before the next directory fsync returns.

``drop_cache=True`` (storage option, off by default) drops a file's pages from the page cache
once it is durable (``POSIX_FADV_DONTNEED`` after the fsync): a save then leaves no cached
copy behind (the kernel keeps no clean pages that it must later reclaim), at the cost that a
restore soon after reads the objects from the disk instead of memory.

``direct_io=True`` (storage option, off by default; Linux) writes objects with ``O_DIRECT``
(:mod:`~ckptmirror.replicas._direct`): the kernel copies nothing into the page cache, which
cuts the CPU a save costs several-fold and leaves the page cache to the training; a restore
soon after reads from the disk, as with ``drop_cache``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterable
from urllib.parse import unquote, urlparse

from ..errors import CorruptObjectError, ObjectMissingError, ReplicaError, ReplicaPermissionError, StepExistsError
from ..format import TMP_PREFIX
from . import _direct
from ._mapped import O_BINARY as _O_BINARY
from ._mapped import O_NOFOLLOW as _O_NOFOLLOW
from ._mapped import MappedObject
from .base import Buffer, Replica, step_of_key, validate_key

log = logging.getLogger("ckptmirror")

#: Map every page at once (one call instead of a page fault per 64 KiB): Linux only.
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
#: Bytes per write call when writeback is started as the file is written (see _writeback).
_WRITEBACK_CHUNK = 16 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def _writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Start (not wait for) the writeback of bytes ``[offset, offset + nbytes)`` of ``fd``, so
    that the disk writes a file while the rest of it is still being copied in and the fsync at
    the end has little left to do. Only a head start: durability still comes from the fsync
    (which also reports any error of this writeback). Raises OSError for an I/O error; False
    when the call is not supported here (then it is not tried again for this file)."""
    if _sync_file_range is None:
        return False
    if _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EIO, errno.ENOSPC, errno.EDQUOT):
        raise OSError(err, os.strerror(err))
    return False


def path_from_url(url: str) -> str:
    """Filesystem path of a ``file://`` URL or plain path."""
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URL with a host is not supported: {url}")
        return unquote(parsed.path)
    return url


def fsync_dir(path: str) -> None:
    """fsync a directory so that renames and creations in it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalReplica(Replica):
    """A directory on a local (or node-local) filesystem."""

    read_priority = 10

    def __init__(
        self, url: str, *, fsync: bool = True, create: bool = False, drop_cache: bool = False, direct_io: bool = False
    ) -> None:
        """The root directory is created by the first write (``create=True``: now). Until then,
        reads of a missing root find nothing: opening a replica to restore from never creates
        a directory, so a mistyped path stays visible instead of becoming an empty replica.

        ``drop_cache``: drop each written file's pages from the page cache once it is durable
        (see the module's docstring); only with ``fsync`` (unsynced pages cannot be dropped).
        ``direct_io``: write objects with ``O_DIRECT``, past the page cache (Linux; elsewhere,
        or on a filesystem that refuses it, they are written the ordinary way)."""
        super().__init__(url)
        for name, value in (("drop_cache", drop_cache), ("direct_io", direct_io)):
            if not isinstance(value, bool):
                raise ValueError(f"storage option {name}={value!r} for {url}: True or False")
        self.root = os.path.realpath(path_from_url(url))
        self.fsync = fsync
        self.drop_cache = drop_cache and fsync and hasattr(os, "posix_fadvise")
        #: whether new files are opened with O_DIRECT: turned off for good (with one warning)
        #: the first time this filesystem refuses it
        self.direct_io = direct_io and _direct.supported()
        self._direct_lock = threading.Lock()  # one warning, however many I/O threads are refused at once
        # Directories whose entries were added by a mkdir of ours and not fsynced yet.
        self._dirty_dirs: set[str] = set()
        self._dirty_lock = threading.Lock()
        if create:
            os.makedirs(self.root, exist_ok=True)

    # -- paths ---------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        validate_key(key, self.url)
        path = os.path.join(self.root, *key.split("/"))
        # A directory planted as a symlink inside the root must not lead us outside it.
        parent = os.path.realpath(os.path.dirname(path))
        if parent != self.root and not parent.startswith(self.root + os.sep):
            raise ReplicaPermissionError("path escapes the replica root through a symlink", replica=self.url, key=key)
        return path

    def _err(self, exc: OSError, key: str, what: str) -> ReplicaError:
        return ReplicaError(
            f"{what} failed: [{errno.errorcode.get(exc.errno or 0, exc.errno)}] {exc.strerror or exc}",
            replica=self.url,
            key=key,
            errno=exc.errno,
        )

    # -- writing -------------------------------------------------------------------------
    def _sync_parent(self, path: str, key: str, gone_ok: bool = False) -> None:
        if self.fsync:
            self._sync_dirs_now({os.path.dirname(path)}, key, gone_ok)

    def _sync_dirs_now(self, dirs: set[str], key: str, gone_ok: bool = False) -> None:
        """fsync ``dirs`` and every directory a mkdir of ours added an entry to since the last time.

        ``gone_ok`` (after a delete): a directory that no longer exists is skipped. Another
        deleter of the same step (the job's retention while a Lightning release deletes it,
        another rank, ``prune``) removed it after our unlink; our removal holds, and making the
        directory's own removal durable is that deleter's. Failing the delete for it left a
        release marker behind (seen once in CI)."""
        with self._dirty_lock:
            created = set(self._dirty_dirs)  # left in the set until fsynced: a concurrent caller syncs them too
        try:
            # Deepest first: a new directory's own entries, then its entry in its parent.
            for d in sorted(dirs | created, key=lambda p: (-p.count(os.sep), p)):
                try:
                    fsync_dir(d)
                except FileNotFoundError:
                    if not gone_ok:
                        raise
        except OSError as exc:
            raise self._err(exc, key, "directory fsync (not retried)") from exc
        if created:
            with self._dirty_lock:
                self._dirty_dirs -= created

    def sync_dirs(self, keys: Iterable[str]) -> None:
        """Make the names of ``keys``, put with ``sync_dir=False``, durable: one fsync per
        directory holding them (and of the parents of directories created meanwhile)."""
        if not self.fsync:
            return
        keys = list(keys)
        if keys:
            self._sync_dirs_now({os.path.dirname(self._path(k)) for k in keys}, keys[0])

    def _makedirs(self, d: str, key: str) -> None:
        """Create ``d`` and its missing parents; remember the parents whose entries changed."""
        if os.path.isdir(d):
            return
        missing = []
        p = d
        while (p == self.root or p.startswith(self.root + os.sep)) and not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as exc:
            raise self._err(exc, key, "mkdir") from exc
        if self.fsync:
            with self._dirty_lock:
                self._dirty_dirs.update(os.path.dirname(m) for m in missing)

    def _direct_refused(self, exc: OSError) -> None:
        with self._direct_lock:
            if not self.direct_io:
                return
            self.direct_io = False
            log.warning(
                "replica %s: the filesystem refused O_DIRECT (%s); direct_io is off for this replica, "
                "files are written through the page cache",
                self.url,
                exc,
            )

    def open_writer(self, key: str) -> AtomicWriter:
        """Start an atomic write of ``key``: feed chunks, then ``finish()`` (or ``abort()``)."""
        return AtomicWriter(self, key, self._path(key))

    def put(self, key: str, data: Buffer, *, sync_dir: bool = True) -> None:
        """Write ``key`` durably. ``sync_dir=False``: its directory is not fsynced (the file
        is): the caller calls :meth:`sync_dirs` before relying on the name."""
        w = self.open_writer(key)
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        w.finish(sync_dir=sync_dir)

    def commit(self, key: str, data: bytes) -> None:
        w = self.open_writer(key)
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        try:
            w.finish(exclusive=True)
        except StepExistsError:
            if self._holds(key, data):
                return  # the same commit record: ours, or an identical one from another rank
            raise

    def _holds(self, key: str, data: bytes) -> bool:
        try:
            return self.get(key, len(data)) == data
        except (CorruptObjectError, ObjectMissingError):
            return False

    # -- reading -------------------------------------------------------------------------
    def _open_read(self, key: str) -> int:
        path = self._path(key)
        try:
            return os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_BINARY)
        except FileNotFoundError as exc:
            raise ObjectMissingError("not found", replica=self.url, key=key) from exc
        except OSError as exc:
            raise self._err(exc, key, "open") from exc

    def get(self, key: str, max_bytes: int) -> bytes:
        fd = self._open_read(key)
        try:
            size = os.fstat(fd).st_size
            if size > max_bytes:
                raise CorruptObjectError(
                    f"object is {size} bytes, more than the {max_bytes} allowed", replica=self.url, key=key
                )
            out = bytearray(size)
            self._readinto(fd, memoryview(out), key)
            return bytes(out)
        finally:
            os.close(fd)

    def read_into(self, key: str, out: memoryview) -> None:
        fd = self._open_read(key)
        try:
            size = os.fstat(fd).st_size
            if size != len(out):
                raise CorruptObjectError(f"size is {size} bytes, manifest says {len(out)}", replica=self.url, key=key)
            self._readinto(fd, out, key)
        finally:
            os.close(fd)

    def _readinto(self, fd: int, out: memoryview, key: str) -> None:
        view = out.cast("B") if out.format != "B" else out
        done = 0
        try:
            while done < len(view):
                n = os.readv(fd, [view[done:]])
                if n == 0:
                    raise CorruptObjectError(
                        f"object ended after {done} of {len(view)} bytes", replica=self.url, key=key
                    )
                done += n
        except OSError as exc:
            raise self._err(exc, key, "read") from exc

    def map_object(self, key: str, size: int) -> MappedObject | None:
        """Map object ``key`` (of ``size`` bytes) read-only; None where mapping is not
        available (an empty object, a platform without ``mmap`` flags). The caller closes it."""
        if size <= 0 or not hasattr(mmap, "MAP_SHARED"):
            return None
        fd = self._open_read(key)
        try:
            st = os.fstat(fd)
            if st.st_size != size:
                raise CorruptObjectError(f"size is {st.st_size} bytes, manifest says {size}", replica=self.url, key=key)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ)
        except OSError as exc:
            raise self._err(exc, key, "map") from exc
        finally:
            os.close(fd)  # the mapping keeps the file's pages; MappedObject.reopen() opens it again
        return MappedObject(mm, size, self._path(key), (st.st_dev, st.st_ino), self.url, key)

    def size(self, key: str) -> int | None:
        try:
            st = os.stat(self._path(key), follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._err(exc, key, "stat") from exc
        return st.st_size

    def list_steps(self) -> list[str]:
        try:
            return sorted(
                e.name for e in os.scandir(self.root) if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
            )
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._err(exc, "", "list") from exc

    def probe_write(self, need_bytes: int) -> None:
        """Raise unless ``need_bytes`` fit on this filesystem and a small file can be written,
        fsynced and removed in the root (a full, quota-bound or read-only disk still lists)."""
        try:
            st = os.statvfs(self.root)
        except OSError as exc:
            raise self._err(exc, "", "statvfs") from exc
        free = st.f_bavail * st.f_frsize
        if free < need_bytes:
            raise ReplicaError(
                f"{free} bytes free, the last save needed {need_bytes} here; free space on the disk "
                "(ckptmirror prune, or a lower keep_last)",
                replica=self.url,
                errno=errno.ENOSPC,
            )
        # A dot name: list_steps and the operator commands never see it, even if we die here.
        path = os.path.join(self.root, f".ckptmirror-probe-{os.getpid()}-{threading.get_ident()}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_BINARY | _O_NOFOLLOW, 0o600)
            try:
                os.write(fd, b"\0" * 4096)  # one block: the filesystem must find room for it
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._err(exc, "", "write probe") from exc
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass  # never created, or removed already

    def list_prefix(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if os.path.islink(base):
            raise ReplicaPermissionError(
                "prefix is a symlink; not followed out of the root", replica=self.url, key=prefix
            )
        out: list[str] = []
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            out.extend(f"{rel}/{f}" for f in files)
        return sorted(out)

    # -- deleting ------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        self._remove(key, os.unlink)

    def delete_prefix(self, prefix: str) -> None:
        self._remove(prefix, shutil.rmtree)

    def _remove(self, key: str, remove: Callable[[str], None]) -> None:
        """Remove a file or a tree durably (the directory entry's removal is fsynced)."""
        path = self._path(key)
        try:
            remove(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._err(exc, key, "delete") from exc
        self._sync_parent(path, key, gone_ok=True)


class AtomicWriter:
    """Temp file (``O_EXCL``, same directory) -> write -> fsync -> rename or link -> directory fsync.

    Used for objects put in one piece and for bodies streamed in by the peer agent. Until
    :meth:`finish`, nothing is visible under the final name; :meth:`abort` removes the temp file.
    """

    def __init__(self, replica: LocalReplica, key: str, path: str) -> None:
        self.replica = replica
        self.key = key
        self.path = path
        self.written = 0
        d = os.path.dirname(path)
        replica._makedirs(d, key)
        self.tmp = os.path.join(d, f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
        self.writeback = replica.fsync and _sync_file_range is not None
        self.direct: _direct.DirectFile | None = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_BINARY
        try:
            self.fd: int | None = None
            if replica.direct_io:
                try:
                    self.fd = os.open(self.tmp, flags | _direct.O_DIRECT, 0o644)
                    self.direct = _direct.DirectFile(self.fd, replica._direct_refused)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    # Refused (tmpfs on older kernels, some FUSE filesystems): Linux may have
                    # created the file before refusing, so it goes before the ordinary open.
                    _unlink_quiet(self.tmp)
                    replica._direct_refused(exc)
            if self.fd is None:
                self.fd = os.open(self.tmp, flags, 0o644)
        except OSError as exc:
            raise replica._err(exc, key, "create") from exc

    def write(self, data: Buffer) -> None:
        """Append ``data``; on failure the temp file is removed and a ReplicaError raised.

        With fsync on, writeback starts chunk by chunk as the data is written (the disk works
        while the rest is copied into the page cache); the fsync in :meth:`finish` still makes
        it durable. With ``direct_io`` the bytes go past the page cache
        (:class:`~ckptmirror.replicas._direct.DirectFile`), the last partial block at
        :meth:`finish`."""
        assert self.fd is not None
        view = memoryview(data).cast("B")
        if self.direct is not None:
            try:
                self.direct.write(view)
            except OSError as exc:
                self.abort()
                raise self.replica._err(exc, self.key, "write") from exc
            self.written += len(view)
            return
        done = 0
        chunk = _WRITEBACK_CHUNK if self.writeback else 64 << 20
        try:
            while done < len(view):
                n = os.write(self.fd, view[done : done + chunk])
                if self.writeback:
                    self.writeback = _writeback(self.fd, self.written + done, n)
                done += n
        except OSError as exc:
            self.abort()
            raise self.replica._err(exc, self.key, "write") from exc
        self.written += done

    def finish(self, exclusive: bool = False, sync_dir: bool = True) -> None:
        """Make the object durable under its name. ``exclusive``: fail if the name exists.
        ``sync_dir=False``: the file is fsynced, its directory is left to the caller
        (:meth:`LocalReplica.sync_dirs`)."""
        assert self.fd is not None
        r, key = self.replica, self.key
        try:
            if self.direct is not None:
                try:
                    self.direct.finish()  # the last partial block, through the page cache
                except OSError as exc:
                    raise r._err(exc, key, "write") from exc
            if r.fsync:
                try:
                    os.fsync(self.fd)
                except OSError as exc:
                    raise r._err(exc, key, "fsync (not retried)") from exc
                if r.drop_cache:
                    try:
                        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    except OSError:
                        pass  # advice only: the data is durable either way
            os.close(self.fd)
            self.fd = None
            try:
                if exclusive:
                    os.link(self.tmp, self.path)  # EEXIST instead of replacing: never two commits
                else:
                    os.replace(self.tmp, self.path)
            except FileExistsError as exc:
                raise StepExistsError(step_of_key(key), r.url) from exc
            except OSError as exc:
                raise r._err(exc, key, "link" if exclusive else "rename") from exc
        finally:
            self.abort()
        if sync_dir:
            r._sync_parent(self.path, key)

    def abort(self) -> None:
        """Drop the temp file (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        _unlink_quiet(self.tmp)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
