"""Local-disk replica (``file:///path`` or a plain path).

Writes follow the recipe in RELIABILITY.md: a temp file created with ``O_EXCL`` in the
destination directory, written, fsynced, renamed into place, then the directory fsynced.
A failed fsync is never retried (after "fsyncgate", a retry can report durability that is
not there): the put fails, and with it this replica's copy of the step. Commits use
``link()``, which fails if the target exists, so a commit is never replaced.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import uuid
from collections.abc import Callable
from urllib.parse import unquote, urlparse

import numpy as np

from ..errors import CorruptObjectError, ObjectMissingError, ReplicaError, ReplicaPermissionError, StepExistsError
from ..format import TMP_PREFIX
from .base import Buffer, Replica, step_of_key, validate_key

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
#: Map every page at once (one call instead of a page fault per 64 KiB): Linux only.
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class MappedObject:
    """An object file mapped read-only: its bytes where the page cache holds them, no copy.

    Restore verifies a local object here (the checksum reads the mapped pages) and later copies
    the very same pages into the caller's tensor, so nothing lands before every object of the
    step verified, at the cost of no extra copy. Objects are immutable once committed (written
    under a temporary name, then renamed; deleted with ``unlink``, never truncated or rewritten
    in place), so the pages cannot change between the two.
    """

    __slots__ = ("_mm", "addr", "size")

    def __init__(self, mm: mmap.mmap, size: int) -> None:
        self._mm = mm
        self.size = size
        # Only the address is kept: a live buffer export would stop close() from unmapping.
        self.addr = int(np.frombuffer(mm, dtype=np.uint8).ctypes.data)

    @property
    def buffer(self) -> mmap.mmap:
        """The mapped bytes (read-only)."""
        return self._mm

    def close(self) -> None:
        """Unmap (idempotent). ``addr`` is invalid afterwards."""
        self._mm.close()


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

    def __init__(self, url: str, *, fsync: bool = True, create: bool = False) -> None:
        """The root directory is created by the first write (``create=True``: now). Until then,
        reads of a missing root find nothing: opening a replica to restore from never creates
        a directory, so a mistyped path stays visible instead of becoming an empty replica."""
        super().__init__(url)
        self.root = os.path.realpath(path_from_url(url))
        self.fsync = fsync
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
        )

    # -- writing -------------------------------------------------------------------------
    def _sync_parent(self, path: str, key: str) -> None:
        if self.fsync:
            try:
                fsync_dir(os.path.dirname(path))
            except OSError as exc:
                raise self._err(exc, key, "directory fsync (not retried)") from exc

    def open_writer(self, key: str) -> AtomicWriter:
        """Start an atomic write of ``key``: feed chunks, then ``finish()`` (or ``abort()``)."""
        return AtomicWriter(self, key, self._path(key))

    def put(self, key: str, data: Buffer) -> None:
        w = self.open_writer(key)
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        w.finish()

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
            got = os.fstat(fd).st_size
            if got != size:
                raise CorruptObjectError(f"size is {got} bytes, manifest says {size}", replica=self.url, key=key)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ)
        except OSError as exc:
            raise self._err(exc, key, "map") from exc
        finally:
            os.close(fd)  # the mapping keeps the file's pages; the descriptor is not needed
        return MappedObject(mm, size)

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
        self._sync_parent(path, key)


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
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as exc:
            raise replica._err(exc, key, "mkdir") from exc
        self.tmp = os.path.join(d, f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            self.fd: int | None = os.open(
                self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_BINARY, 0o644
            )
        except OSError as exc:
            raise replica._err(exc, key, "create") from exc

    def write(self, data: Buffer) -> None:
        """Append ``data``; on failure the temp file is removed and a ReplicaError raised."""
        assert self.fd is not None
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done : done + (64 << 20)])
        except OSError as exc:
            self.abort()
            raise self.replica._err(exc, self.key, "write") from exc
        self.written += done

    def finish(self, exclusive: bool = False) -> None:
        """Make the object durable under its name. ``exclusive``: fail if the name exists."""
        assert self.fd is not None
        r, key = self.replica, self.key
        try:
            if r.fsync:
                try:
                    os.fsync(self.fd)
                except OSError as exc:
                    raise r._err(exc, key, "fsync (not retried)") from exc
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
