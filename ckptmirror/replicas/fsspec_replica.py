"""Generic replica on any fsspec filesystem (``gs://``, ``az://``, ``fsspec+PROTO://...``).

For stores without a dedicated backend. ``open_replica`` sends here every scheme that
fsspec knows and ckptmirror has no backend for, and any URL written ``fsspec+PROTO://...``,
which forces this backend even where a dedicated one exists: ``fsspec+file:///path`` is a
local directory through fsspec's ``LocalFileSystem`` (handy for tests), ``fsspec+s3://``
goes through s3fs's file API instead of :class:`~ckptmirror.replicas.s3.S3Replica`.

Guarantees are weaker than a dedicated backend's, and depend on the filesystem:

* **Writes.** Where a rename is atomic (local filesystems; ``atomic_rename=True`` for
  others you know), an object is written to a temp name in its directory and moved into
  place, so a reader never sees it partial. Elsewhere it is written directly, which is still
  all-or-nothing on object stores (an upload becomes visible when it completes), not on
  filesystems. Durability is whatever the filesystem gives on close: no fsync. For a local
  disk use the plain path (:class:`~ckptmirror.replicas.local.LocalReplica`).
* **Commits.** Create-if-absent is best effort: an existence check, then the write. Two
  writers racing on one step can both commit; use a backend with atomic commits
  (local disk, S3 with ``If-None-Match``) where that matters.
* **Listings.** The listing cache is invalidated before every listing and size check, so a
  step written by another client is never hidden by a stale cache.
* **Buckets are never created.** On object stores (filesystems with buckets or containers:
  s3fs, gcsfs, adlfs) the bucket must exist: a missing one is a
  :class:`~ckptmirror.errors.ReplicaConfigError` from the first listing (which ``Mirror()``
  does at construction), not a bucket silently made in whatever account and region the
  credentials pick; one that vanishes after it was used is an outage
  (:class:`~ckptmirror.errors.ReplicaUnavailableError`). Directories, including the root, are
  made by the first write, and opening a replica writes nothing.

Time budget: every operation has one deadline, :class:`~ckptmirror.replicas.base.TimeBudget`
(``connect_timeout_s``, default 5 s, plus its body bytes at ``min_bytes_per_s``, default
1 MiB/s; the same options as the S3 and peer backends). fsspec backends cannot be interrupted
from outside, so each operation runs on a daemon thread and the caller stops waiting at the
deadline with :class:`~ckptmirror.errors.ReplicaUnavailableError` (the replica is degraded); the
call it abandons finishes or fails on its own, and never touches the caller's buffer again:
a write copies each chunk out of it, and a read copies each chunk into it, under a lock that
the deadline takes first. A write that is abandoned or fails is discarded, not closed (closing
a buffered fsspec file uploads what it has), so no partial object is published.

Errors: a ``PermissionError`` from the filesystem becomes
:class:`~ckptmirror.errors.ReplicaPermissionError` (misconfiguration: raised at once, never
retried); a network failure (connection refused, DNS, timeout, from botocore or aiohttp)
becomes :class:`~ckptmirror.errors.ReplicaUnavailableError` (an outage: the replica is
degraded and retried later). Every message names the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec

from ..errors import (
    CorruptObjectError,
    ObjectMissingError,
    ReplicaConfigError,
    ReplicaError,
    ReplicaMissingError,
    ReplicaPermissionError,
    ReplicaUnavailableError,
    StepExistsError,
)
from ..format import TMP_PREFIX
from .base import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MIN_BYTES_PER_S,
    Buffer,
    Deadline,
    Replica,
    TimeBudget,
    step_of_key,
    validate_key,
)

T = TypeVar("T")

_WRITE_CHUNK = 8 << 20
_READ_CHUNK = 8 << 20
#: Protocols whose ``mv`` is an atomic rename within one filesystem.
_ATOMIC_RENAME = frozenset({"file", "local"})


def _backend_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(nothing answers, any other backend failure): the exceptions fsspec backends raise.

    Many are not ``OSError`` (s3fs lets some of botocore's through, gcsfs and adlfs aiohttp's),
    so they are named here, from whichever of those packages is installed.
    """
    network: list[type[BaseException]] = [ConnectionError, TimeoutError, asyncio.TimeoutError]
    other: list[type[BaseException]] = [OSError, ValueError, RuntimeError]
    try:
        from botocore.exceptions import BotoCoreError, ReadTimeoutError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        network += [BotoConnectionError, ReadTimeoutError]  # refused, DNS, connect/read timeout
        other += [BotoCoreError]
    except ImportError:
        pass
    try:
        import aiohttp

        network += [aiohttp.ClientConnectionError]
        other += [aiohttp.ClientError]
    except ImportError:
        pass
    return tuple(network), tuple(other)


_NETWORK_ERRORS, _OTHER_ERRORS = _backend_errors()


class _Abandoned(Exception):
    """The caller stopped waiting for this operation (its deadline passed): stop touching its buffers."""


class _Handoff:
    """Who may touch the caller's buffer: the worker (until the deadline), then nobody.

    The worker copies each chunk under ``lock`` after :meth:`check`; the caller, at the deadline,
    takes ``lock`` and sets ``abandoned``. So once the caller has given up, no byte of its
    buffer is read or written by the thread it left behind.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False

    def check(self) -> None:
        """Raise :class:`_Abandoned` if the caller gave up (call with ``lock`` held)."""
        if self.abandoned:
            raise _Abandoned


def _discard(f: Any) -> None:
    """Drop a file being written without publishing it (an upload is aborted, nothing committed)."""
    with contextlib.suppress(Exception):
        f.discard()
    if isinstance(f, fsspec.spec.AbstractBufferedFile):
        f.closed = True  # close() (and __del__) would flush the partial buffer as the object
    else:
        with contextlib.suppress(Exception):
            f.close()


class FsspecReplica(Replica):
    """A directory on any fsspec filesystem.

    Args:
        url: ``PROTO://path`` or ``fsspec+PROTO://path``.
        atomic_rename: whether ``mv`` is atomic on this filesystem (default: only for local files).
        connect_timeout_s, min_bytes_per_s: every operation's time budget,
            ``connect_timeout_s + body bytes / min_bytes_per_s`` (defaults 5 s and 1 MiB/s).
        storage_options: passed to the fsspec filesystem (credentials, endpoints, ...).

    Example::

        FsspecReplica("gs://bucket/run1", token="/path/to/key.json")
    """

    read_priority = 40
    budget: TimeBudget

    compression = "zstd"  # a network store is slower than the codec: fewer bytes, sooner durable

    def __init__(
        self,
        url: str,
        *,
        atomic_rename: bool | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        min_bytes_per_s: float = DEFAULT_MIN_BYTES_PER_S,
        **storage_options: Any,
    ) -> None:
        super().__init__(url)
        self.budget = TimeBudget(connect_timeout_s, min_bytes_per_s)
        target = url.split("+", 1)[1] if url.lower().startswith("fsspec+") else url
        try:
            self.fs, root = fsspec.core.url_to_fs(target, **storage_options)
        except ImportError as exc:  # fsspec knows the protocol, its package is not installed
            raise ReplicaConfigError(f"{exc} (needed for this replica)", replica=url) from exc
        self.root = root.rstrip("/")
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.atomic_rename = bool(protocols & _ATOMIC_RENAME) if atomic_rename is None else atomic_rename
        #: The bucket (container) of the root on an object store; None on filesystems without
        #: buckets. s3fs, gcsfs and adlfs all have ``split_path``, whose first part is the bucket.
        split = getattr(self.fs, "split_path", None)
        self.bucket: str | None = (split(self.root)[0] or None) if callable(split) else None
        # Whether the bucket was there once: from then on its absence is an outage (deleted,
        # server restarted), not a wrong URL. A plain bool: it only ever goes False -> True.
        self._bucket_seen = False
        # No I/O here (the root is made by the first write): opening a replica to restore from
        # creates nothing, and an endpoint that is down leaves the replica degraded, not unopenable.

    def _path(self, key: str) -> str:
        validate_key(key, self.url)
        return f"{self.root}/{key}"

    def _bounded(self, op: str, key: str, nbytes: int, fn: Callable[[_Handoff, Deadline], T]) -> T:
        """Run ``fn(handoff, deadline)`` on a daemon thread; wait for it until the deadline (which
        ``fn`` may extend), then give up with :class:`ReplicaUnavailableError`.

        A daemon thread per call, not a pool: a call stuck in its backend must never hold up a
        later one, nor the process's exit.
        """
        dl = self.budget.start(op, key, nbytes)
        handoff = _Handoff()
        out: list[tuple[bool, Any]] = []
        done = threading.Event()

        def run() -> None:
            try:
                out.append((True, fn(handoff, dl)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                out.append((False, exc))
            finally:
                done.set()

        threading.Thread(target=run, name=f"ckptmirror-fsspec-{op}", daemon=True).start()
        while not done.wait(max(0.0, dl.remaining())):
            if dl.expired():
                with handoff.lock:
                    handoff.abandoned = True
                if not done.is_set():  # (it may have finished while we took the lock: then use its result)
                    raise dl.missed(self.url, where=f"{self.root}/{key}" if key else self.root)
        ok, value = out[0]
        if ok:
            return value
        raise value

    def _guard(self, what: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn``, translating the filesystem's errors into ckptmirror's."""
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as exc:
            raise ObjectMissingError("not found", replica=self.url, key=key) from exc
        except PermissionError as exc:
            raise ReplicaPermissionError(
                f"{what}: permission denied ({exc}); check the credentials this filesystem uses (storage_options "
                f"for this URL, or the provider's environment, e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/"
                f"AWS_PROFILE for s3, GOOGLE_APPLICATION_CREDENTIALS for gcs) and the permissions on {self.root}",
                replica=self.url,
                key=key,
            ) from exc
        except _NETWORK_ERRORS as exc:
            raise ReplicaUnavailableError(
                f"{what}: cannot reach the storage service ({type(exc).__name__}: {exc}); check that it is up and "
                "that the endpoint is right (storage_options for this URL, e.g. endpoint_url, or AWS_ENDPOINT_URL "
                "for s3)",
                replica=self.url,
                key=key,
            ) from exc
        except _OTHER_ERRORS as exc:  # fsspec backends raise a mix
            raise ReplicaError(f"{what} failed: {type(exc).__name__}: {exc}", replica=self.url, key=key) from exc

    def _check_bucket(self) -> None:
        """Raise :class:`ReplicaConfigError` if the root's bucket does not exist (the root itself
        may be missing: that is an empty replica). Only a definite "not found" counts; a bucket we
        may not inspect (a policy that allows the prefix but not HeadBucket) is taken to exist."""
        if self.bucket is None:
            return
        self.fs.invalidate_cache(self.bucket)
        try:
            self._guard("check bucket", "", self.fs.info, self.bucket)
        except ObjectMissingError as exc:
            create = f"e.g. `aws s3 mb s3://{self.bucket}` or `gcloud storage buckets create gs://{self.bucket}`"
            if self._bucket_seen:
                raise ReplicaUnavailableError(
                    f"bucket {self.bucket!r} does not exist any more (it did earlier in this process): recreate it "
                    f"({create}); the replica is used again once it answers",
                    replica=self.url,
                ) from exc
            raise ReplicaMissingError(
                f"bucket {self.bucket!r} does not exist: create it ({create}) or fix the replica URL",
                replica=self.url,
            ) from exc
        except ReplicaPermissionError:
            return
        self._bucket_seen = True

    # -- writing -------------------------------------------------------------------------
    def _write(self, path: str, key: str, data: Buffer, handoff: _Handoff) -> None:
        view = memoryview(data).cast("B")
        if self.bucket is None:
            self._guard("mkdir", key, self.fs.makedirs, path.rsplit("/", 1)[0], exist_ok=True)
        # else an object store: directories are implied by keys, and its makedirs would create a
        # missing bucket (s3fs, gcsfs do), which must stay an error.

        def write() -> None:
            f = self.fs.open(path, "wb")
            try:
                for off in range(0, len(view), _WRITE_CHUNK):
                    with handoff.lock:  # a copy: the caller's buffer is never read after it gave up
                        handoff.check()
                        chunk = bytes(view[off : off + _WRITE_CHUNK])
                    f.write(chunk)
            except BaseException:
                _discard(f)  # never publish a partial object
                raise
            f.close()

        try:
            self._guard("write", key, write)
        except ObjectMissingError as exc:  # "not found" on a write: where it should go is missing
            self._check_bucket()  # names a missing bucket (e.g. deleted mid-run)
            raise ReplicaError("write failed: its directory does not exist", replica=self.url, key=key) from exc
        self._bucket_seen = True

    def put(self, key: str, data: Buffer) -> None:
        path = self._path(key)
        self._bounded("put", key, len(memoryview(data).cast("B")), lambda h, _: self._put(path, key, data, h))

    def _put(self, path: str, key: str, data: Buffer, handoff: _Handoff) -> None:
        if not self.atomic_rename:
            return self._write(path, key, data, handoff)
        head, name = path.rsplit("/", 1)
        tmp = f"{head}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
        try:
            self._write(tmp, key, data, handoff)
            self._guard("rename", key, self.fs.mv, tmp, path)
        except BaseException:
            try:
                self.fs.rm_file(tmp)
            except (OSError, ValueError):
                pass
            raise

    def commit(self, key: str, data: bytes) -> None:
        if self.size(key) is not None:  # best effort: see the module docstring
            if self.get(key, len(data)) == bytes(data):
                return  # the identical commit record is already there
            raise StepExistsError(step_of_key(key), self.url)
        self.put(key, data)

    # -- reading -------------------------------------------------------------------------
    def _size_of(self, path: str, key: str) -> int:
        self.fs.invalidate_cache(path)
        info = self._guard("stat", key, self.fs.info, path)
        if info.get("type") == "directory":
            raise ObjectMissingError("is a directory, not an object", replica=self.url, key=key)
        return int(info["size"])

    def get(self, key: str, max_bytes: int) -> bytes:
        path = self._path(key)
        return self._bounded("get", key, 0, lambda _, dl: self._get(path, key, max_bytes, dl))

    def _get(self, path: str, key: str, max_bytes: int, dl: Deadline) -> bytes:
        size = self._size_of(path, key)
        if size > max_bytes:
            raise CorruptObjectError(
                f"object is {size} bytes, more than the {max_bytes} allowed", replica=self.url, key=key
            )
        dl.extend(nbytes=size)  # the body's share of the budget, now that its size is known
        data = self._guard("read", key, self.fs.cat_file, path)
        if len(data) != size:
            raise CorruptObjectError(f"read {len(data)} bytes, the listing said {size}", replica=self.url, key=key)
        return bytes(data)

    def read_into(self, key: str, out: memoryview) -> None:
        path = self._path(key)
        view = out if out.format == "B" and out.ndim == 1 else out.cast("B")
        self._bounded("read_into", key, len(view), lambda h, _: self._read_into(path, key, view, h))

    def _read_into(self, path: str, key: str, view: memoryview, handoff: _Handoff) -> None:
        size = self._size_of(path, key)
        if size != len(view):
            raise CorruptObjectError(f"size is {size} bytes, manifest says {len(view)}", replica=self.url, key=key)

        def read() -> int:
            # Through a chunk of our own, copied in under the handoff lock: a read that is still
            # running when the caller gives up must not write into a buffer it has moved on with.
            bounce = memoryview(bytearray(min(len(view), _READ_CHUNK)))
            done = 0
            with self.fs.open(path, "rb") as f:
                while done < len(view) and (n := f.readinto(bounce[: min(len(bounce), len(view) - done)])):
                    with handoff.lock:
                        handoff.check()
                        view[done : done + n] = bounce[:n]
                    done += n
            return done

        done = self._guard("read", key, read)
        if done != len(view):
            raise CorruptObjectError(f"object ended after {done} of {len(view)} bytes", replica=self.url, key=key)

    def size(self, key: str) -> int | None:
        path = self._path(key)
        try:
            return self._bounded("size", key, 0, lambda *_: self._size_of(path, key))
        except ObjectMissingError:
            return None

    def list_steps(self) -> list[str]:
        return self._bounded("list_steps", "", 0, lambda *_: self._list_steps())

    def _list_steps(self) -> list[str]:
        self.fs.invalidate_cache(self.root)
        try:
            entries = self._guard("list", "", self.fs.ls, self.root, detail=True)
        except ObjectMissingError:
            self._check_bucket()  # an empty replica, or a missing bucket (s3fs: NoSuchBucket is FileNotFoundError)
            return []
        self._bucket_seen = True
        names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")
        return sorted(n for n in names if not n.startswith("."))

    def list_prefix(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        return self._bounded("list_prefix", prefix, 0, lambda *_: self._list_prefix(path, prefix))

    def _list_prefix(self, path: str, prefix: str) -> list[str]:
        self.fs.invalidate_cache(path)
        try:
            found = self._guard("list", prefix, self.fs.find, path)
        except ObjectMissingError:
            return []
        root = self.root + "/"
        return sorted(p[len(root) :] for p in found if p.startswith(root))

    # -- deleting ------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            self._bounded("delete", key, 0, lambda *_: self._guard("delete", key, self.fs.rm_file, path))
        except ObjectMissingError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        self._bounded("delete_prefix", prefix, 0, lambda *_: self._delete_prefix(path, prefix))

    def _delete_prefix(self, path: str, prefix: str) -> None:
        try:
            self._guard("delete", prefix, self.fs.rm, path, recursive=True)
        except ObjectMissingError:
            pass
        self.fs.invalidate_cache(path)
