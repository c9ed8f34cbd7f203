"""S3 replica (``s3://bucket/prefix``) for AWS S3 and S3-compatible servers.

Built on :class:`s3fs.S3FileSystem` for what it does well (credentials, endpoint and region
resolution, including ``AWS_ENDPOINT_URL`` and the other standard ``AWS_*`` variables, and
one aiobotocore client on fsspec's event-loop thread), but it calls that client directly
instead of s3fs's file methods, because the commit protocol needs things they hide:

* **Multipart uploads we can check.** Objects larger than ``part_bytes`` go up as parts, up
  to ``max_concurrency`` at a time for the whole replica (a semaphore, not s3fs's
  batch-by-batch gather). Each part is copied once into ``bytes`` (botocore accepts no
  memoryview) in a worker thread just before it is sent, so memory in flight stays at about
  ``max_concurrency * part_bytes`` however large the object. The completion answer must carry
  an ETag (botocore turns a 200 with an error body into an error), and a HEAD confirms the
  size. On any failure the upload is aborted, so no partial object ever becomes visible and
  no parts stay stored: at once when the endpoint answered (an error), else (a missed
  deadline, an outage, a cancelled put) by one background task per replica, which tries each
  upload a few times, spaced out, each attempt with a deadline of its own, on none of the
  caller's time; :meth:`S3Replica.close` gives those still queued a last chance of about a
  second. An upload that could still not be aborted is logged, once, with how to remove it
  (retention and ``ckptmirror prune`` abort it with its step, :meth:`S3Replica.delete_prefix`).
* **Conditional commits.** The commit object is written with ``If-None-Match: *``, so of two
  writers exactly one commits. The first commit probes whether the server honours the
  header (a server that answers 501 or silently ignores it gets the weaker HEAD-then-PUT,
  and a warning, once).
* **No listing cache.** Every listing is a fresh ``ListObjectsV2``; s3fs's dircache, which can
  hide a step written by another client, is never consulted. ``size()`` is always a HEAD.
* **A time budget per operation.** Every operation (``put``, ``get``, ``size``, a listing, ...)
  gets one deadline, :class:`~ckptmirror.replicas.base.TimeBudget`: ``connect_timeout_s``
  (default 5 s) plus its body bytes at ``min_bytes_per_s`` (default 1 MiB/s); a listing or a
  multipart upload adds ``connect_timeout_s`` per further request it finds it needs. Retries
  (at most ``retries``) happen only inside it, and each part of a multipart upload or ranged
  read has its own attempt limit (its part's budget), so one stalled part is retried instead of
  holding the whole object. An operation that misses its deadline raises
  :class:`~ckptmirror.errors.ReplicaUnavailableError` naming the replica, the operation, the
  key and the budget: an endpoint that accepts connections and never answers costs one
  budget, not ``retries`` x a timeout.
* **One error table.** :func:`~ckptmirror.replicas._s3_errors.classify` maps every
  botocore/aiohttp failure to one of ckptmirror's errors and says whether it is worth
  retrying; :meth:`S3Replica._retry` is the only retry loop (botocore's own retries are off),
  with exponential backoff and jitter. Misconfiguration
  (no such bucket: :class:`~ckptmirror.errors.ReplicaConfigError`; access denied, unknown key,
  wrong secret, no credentials: :class:`~ckptmirror.errors.ReplicaPermissionError`) is never
  retried, and ``Mirror()`` raises it at construction; an endpoint where nothing answers, or
  a bucket that vanishes after it was used, is :class:`~ckptmirror.errors.ReplicaUnavailableError`
  (an outage: the replica is degraded and probed until it answers).
  Every message names the replica, the endpoint where that helps, and the fix.

A HEAD on a missing bucket answers a bare 404, indistinguishable from a missing key, so
``size()`` reports None there; every listing and GET names the missing bucket.

This module holds the operations; the private modules beside it hold the rest:
:mod:`~ckptmirror.replicas._s3_requests` (deadlines, the retry loop, messages),
:mod:`~ckptmirror.replicas._s3_multipart` (multipart uploads),
:mod:`~ckptmirror.replicas._s3_aborts` (the background abort queue) and
:mod:`~ckptmirror.replicas._s3_errors` (the error table).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import uuid
from typing import Any

import s3fs

from ..errors import (
    CkptMirrorError,
    CorruptObjectError,
    ObjectMissingError,
    ReplicaError,
    ReplicaURLError,
    StepExistsError,
)
from ._s3_aborts import AbortQueue
from ._s3_errors import _NotSupported, _PreconditionFailed, detail, error_code
from ._s3_multipart import MAX_PARTS as MAX_PARTS
from ._s3_multipart import MIN_PART_BYTES, S3Multipart
from ._s3_requests import _DEADLINE, _all, _content_length
from .base import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MIN_BYTES_PER_S,
    Buffer,
    Replica,
    TimeBudget,
    step_of_key,
)

log = logging.getLogger("ckptmirror")

_DELETE_BATCH = 1000  # DeleteObjects limit


def _byte_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class S3Replica(S3Multipart, Replica):
    """A prefix in an S3 bucket.

    Args:
        url: ``s3://bucket/prefix`` (the prefix may be empty).
        endpoint_url, key, secret, region: override ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
            ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` (and profiles, instance roles).
        part_bytes: objects larger than this are uploaded and read as parts of this size (>= 5 MiB).
        max_concurrency: part uploads and ranged reads in flight on this replica, all objects together.
        connect_timeout_s: the fixed part of every operation's time budget (connect, request,
            first byte of the answer), and botocore's connect timeout. Default 5 s.
        min_bytes_per_s: floor throughput: an operation on ``n`` bytes gets ``n / min_bytes_per_s``
            seconds more. Default 1 MiB/s. A missed budget raises ReplicaUnavailableError.
        timeout_s: (older option, still accepted) an extra limit on each request attempt, inside
            the budget; None (default): the budget alone.
        retries: at most this many retries after the first attempt (5xx, network errors), and
            only while the operation's budget lasts. Throttling (SlowDown, 503, 429) is retried
            while the budget lasts whatever this says; throttled throughout, it is an outage.
        s3fs_options: passed to :class:`s3fs.S3FileSystem` (e.g. ``profile``, ``config_kwargs``).

    Example::

        Mirror(["/local/ckpt", S3Replica("s3://bucket/run1", part_bytes=16 << 20)])
    """

    read_priority = 30
    budget: TimeBudget
    #: First retry delay; doubles per retry (capped at 10 s), with jitter.
    backoff_s = 0.1
    #: Background aborts of multipart uploads a put gave up on: attempts per upload, the delay
    #: before the second (doubling, at most 30 s: about half a minute in all), how long close()
    #: gives those still queued, and how many may wait (more are logged as left open at once).
    abort_attempts = 6
    abort_backoff_s = 1.0
    abort_close_grace_s = 1.5
    abort_queue_max = 256

    compression = "zstd"  # a network store is slower than the codec: fewer bytes, sooner durable

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        key: str | None = None,
        secret: str | None = None,
        region: str | None = None,
        part_bytes: int = 32 << 20,
        max_concurrency: int = 8,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        min_bytes_per_s: float = DEFAULT_MIN_BYTES_PER_S,
        timeout_s: float | None = None,
        retries: int = 5,
        **s3fs_options: Any,
    ) -> None:
        super().__init__(url)
        scheme, _, rest = url.partition("://")
        bucket, _, prefix = rest.partition("/")
        if scheme.lower() not in ("s3", "s3a") or not bucket:
            raise ReplicaURLError(f"S3 replica URL must look like s3://bucket/prefix, got {url!r}")
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part_bytes must be at least {MIN_PART_BYTES} (S3's minimum part size), got {part_bytes}")
        if max_concurrency < 1 or (timeout_s is not None and timeout_s <= 0) or retries < 0:
            raise ValueError("max_concurrency must be >= 1, timeout_s > 0 (or None), retries >= 0")
        self.budget = TimeBudget(connect_timeout_s, min_bytes_per_s)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_bytes = part_bytes
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        # botocore's own limits only catch what the budget would too, earlier: a connect that
        # hangs, and a read that waits longer than a whole part is allowed (the budget, enforced
        # around every attempt, is what bounds a trickle that never trips a per-read timeout).
        part_s = self.budget.seconds(part_bytes)
        config = {
            "connect_timeout": min(connect_timeout_s, timeout_s or math.inf),
            "read_timeout": min(part_s, timeout_s or math.inf),
            "retries": {"mode": "standard", "total_max_attempts": 1},  # _retry is the one retry loop
            "max_pool_connections": max_concurrency + 8,  # + metadata requests beside the data
        }
        config.update(s3fs_options.pop("config_kwargs", {}))
        client_kwargs = dict(s3fs_options.pop("client_kwargs", {}))
        if region:
            client_kwargs.setdefault("region_name", region)
        self.fs = s3fs.S3FileSystem(
            key=key, secret=secret, endpoint_url=endpoint_url, client_kwargs=client_kwargs,
            config_kwargs=config, skip_instance_cache=True, **s3fs_options,
        )  # fmt: skip
        self._slots = asyncio.Semaphore(max_concurrency)  # binds to fsspec's loop on first use
        self._conditional: bool | None = None  # does the server honour If-None-Match? (probed once)
        self._probe_lock = threading.Lock()
        # Whether a request has succeeded: from then on a missing bucket is an outage (deleted,
        # server restarted), not a wrong URL. A plain bool: it only ever goes False -> True.
        self._bucket_seen = False
        self._aborts = AbortQueue(
            call=self._call, where=self._where, budget=self.budget, url=self.url, bucket=self.bucket, fs=self.fs,
            policy=self,
        )  # fmt: skip

    # -- writing -------------------------------------------------------------------------
    def put(self, key: str, data: Buffer) -> None:
        path = self._path(key)
        self._run("put", key, len(_byte_view(data)), self._put, key, path, data)

    async def _put(self, key: str, path: str, data: Buffer) -> None:
        view = _byte_view(data)
        if len(view) > self.part_bytes:
            return await self._put_multipart(key, path, view)
        async with self._slots:
            body = data if isinstance(data, bytes) else await asyncio.to_thread(bytes, view)
            await self._call("put_object", key, Key=path, Body=body)

    def commit(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if self._conditional is None:
            with self._probe_lock:
                if self._conditional is None:
                    self._conditional = self._run("probe conditional writes", "", 0, self._probe_conditional_writes)
        self._run("commit", key, len(data), self._commit, key, path, bytes(data))

    async def _commit(self, key: str, path: str, body: bytes) -> None:
        conflict: BaseException | None = None
        if self._conditional:
            try:
                await self._call("put_object", key, Key=path, Body=body, IfNoneMatch="*")
                return
            except _PreconditionFailed as exc:
                conflict = exc
        else:
            # Weaker: a second writer between this HEAD and the PUT also "wins".
            try:
                await self._call("head_object", key, Key=path)
            except ObjectMissingError:
                self._next_request()
                await self._call("put_object", key, Key=path, Body=body)
                return
        self._next_request()
        if await self._holds(key, path, body):
            return  # a retried request of ours landed first: the same commit, not a rival
        raise StepExistsError(step_of_key(key), self.url) from conflict

    async def _holds(self, key: str, path: str, body: bytes) -> bool:
        try:
            return await self._get(key, path, len(body)) == body
        except (ObjectMissingError, CorruptObjectError):
            return False

    async def _probe_conditional_writes(self) -> bool:
        """Write a probe object twice with ``If-None-Match: *``: the second must get 412."""
        probe = f"{self.prefix}/.ckptmirror-probe-{uuid.uuid4().hex}".lstrip("/")
        try:
            await self._call("put_object", "", Key=probe, Body=b"", IfNoneMatch="*")
            self._next_request()
            await self._call("put_object", "", Key=probe, Body=b"", IfNoneMatch="*")
            why = "it ignored If-None-Match: * on an existing object"
        except _PreconditionFailed:
            return True
        except _NotSupported as exc:
            why = f"it answered {detail(exc.__cause__ or exc)}"
        finally:
            self._next_request()
            try:
                await self._call("delete_object", "", Key=probe)
            except CkptMirrorError:
                pass
        log.warning(
            "S3 server for %s does not support conditional writes (%s): commits fall back to HEAD-then-PUT, "
            "so two writers racing on one step could both commit",
            self.url, why,
        )  # fmt: skip
        return False

    # -- reading -------------------------------------------------------------------------
    def get(self, key: str, max_bytes: int) -> bytes:
        path = self._path(key)
        return self._run("get", key, 0, self._get, key, path, max_bytes)

    async def _get(self, key: str, path: str, max_bytes: int) -> bytes:
        extended = False

        async def attempt() -> bytes:
            nonlocal extended
            resp = await self._send("get_object", Key=path)
            body = resp["Body"]
            try:
                # A gateway that re-sends the body chunked gives no Content-Length: then read at
                # most one byte past the limit, and the length read is all there is to check.
                size = resp.get("ContentLength")
                if size is not None and size > max_bytes:
                    raise CorruptObjectError(
                        f"object is {size} bytes, more than the {max_bytes} allowed", replica=self.url, key=key
                    )
                dl = _DEADLINE.get()
                if dl is not None and size is not None and not extended:
                    # The body's share of the budget, now that its size is known: once per
                    # operation, not per attempt (a trickling server would stretch it each time).
                    dl.extend(nbytes=size)
                    extended = True
                data = await (body.read() if size is not None else body.read(max_bytes + 1))
            finally:
                body.close()
            if size is None and len(data) > max_bytes:
                raise CorruptObjectError(
                    f"object is more than the {max_bytes} bytes allowed", replica=self.url, key=key
                )
            if size is not None and len(data) != size:
                raise CorruptObjectError(
                    f"read {len(data)} bytes, Content-Length said {size}", replica=self.url, key=key
                )
            return data

        return await self._retry("get_object", key, attempt)

    def read_into(self, key: str, out: memoryview) -> None:
        path = self._path(key)
        view = _byte_view(out)
        self._run("read_into", key, len(view), self._read_into, key, path, view)

    async def _read_into(self, key: str, path: str, view: memoryview) -> None:
        head = await self._call("head_object", key, attempt_bytes=0, Key=path)
        size = _content_length(head, self.url, key)
        if size != len(view):
            raise CorruptObjectError(f"size is {size} bytes, manifest says {len(view)}", replica=self.url, key=key)
        ranged = size > self.part_bytes
        match = {"IfMatch": head["ETag"]} if ranged and head.get("ETag") else {}
        self._next_request()  # the GETs (concurrent: one request's share for them all)
        try:
            await _all(
                self._read_range(key, path, view, off, min(off + self.part_bytes, size), ranged, match)
                for off in range(0, size, self.part_bytes)
            )
        except _PreconditionFailed as exc:
            raise CorruptObjectError("object changed while it was being read", replica=self.url, key=key) from exc

    async def _read_range(
        self, key: str, path: str, view: memoryview, start: int, end: int, ranged: bool, match: dict[str, str]
    ) -> None:
        async def attempt() -> None:
            kw = {"Range": f"bytes={start}-{end - 1}", **match} if ranged else {}
            resp = await self._send("get_object", Key=path, **kw)
            body = resp["Body"]
            try:
                length = resp.get("ContentLength")  # None: a chunked answer; the bytes read are checked
                if length is not None and length != end - start:
                    raise CorruptObjectError(
                        f"asked for bytes {start}-{end - 1}, got {length} bytes",
                        replica=self.url,
                        key=key,
                    )
                pos = start
                while pos < end and (n := await body.readinto(view[pos:end])):
                    pos += n
                more = b"" if length is not None or pos != end else await body.read(1)
            finally:
                body.close()
            if pos != end:
                raise CorruptObjectError(f"object ended at byte {pos}, expected {end}", replica=self.url, key=key)
            if more:
                raise CorruptObjectError(
                    f"answer longer than the {end - start} bytes asked for", replica=self.url, key=key
                )

        async with self._slots:
            await self._retry("get_object", key, attempt, attempt_bytes=end - start if ranged else None)

    def size(self, key: str) -> int | None:
        path = self._path(key)
        try:
            head = self._run("size", key, 0, self._call, "head_object", key, attempt_bytes=0, Key=path)
            return _content_length(head, self.url, key)
        except ObjectMissingError:
            return None

    # -- listing -------------------------------------------------------------------------
    async def _list(self, prefix: str, key: str, delimiter: bool) -> tuple[list[str], list[str]]:
        """(object keys, common prefixes) under ``prefix``: always a fresh listing, never a cache."""
        keys: list[str] = []
        dirs: list[str] = []
        kw: dict[str, Any] = {"Prefix": prefix, **({"Delimiter": "/"} if delimiter else {})}
        while True:
            resp = await self._call("list_objects_v2", key, **kw)
            keys += [o["Key"] for o in resp.get("Contents", ())]
            dirs += [p["Prefix"] for p in resp.get("CommonPrefixes", ())]
            if not resp.get("IsTruncated"):
                return keys, dirs
            kw["ContinuationToken"] = resp["NextContinuationToken"]
            self._next_request()  # a long listing is not a slow one: each page gets its share

    def _root(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def list_steps(self) -> list[str]:
        root = self._root()
        return self._run("list_steps", "", 0, self._list_steps, root)

    async def _list_steps(self, root: str) -> list[str]:
        _, dirs = await self._list(root, "", True)
        # A writer killed while its first objects were still multipart uploads leaves a step
        # that has no completed object: list it too, so retention and prune can abort them.
        self._next_request()
        dirs = list(dirs) + await self._upload_dirs(root)
        names = {d[len(root) :].rstrip("/") for d in dirs}
        return sorted(n for n in names if n and not n.startswith("."))

    async def _upload_dirs(self, root: str) -> list[str]:
        # No Delimiter: not every S3-compatible server groups uploads by prefix (moto does
        # not). Open uploads are few (only those of writers that died), so list them all.
        out: set[str] = set()
        kw: dict[str, Any] = {"Prefix": root}
        while True:
            resp = await self._call("list_multipart_uploads", "", **kw)
            for u in resp.get("Uploads", ()):
                head, sep, _ = u["Key"][len(root) :].partition("/")
                if sep:
                    out.add(root + head + "/")
            if not resp.get("IsTruncated"):
                return sorted(out)
            kw.update(KeyMarker=resp["NextKeyMarker"], UploadIdMarker=resp["NextUploadIdMarker"])
            self._next_request()

    def list_prefix(self, prefix: str) -> list[str]:
        path = self._path(prefix) + "/"
        keys, _ = self._run("list_prefix", prefix, 0, self._list, path, prefix, False)
        return sorted(k[len(self._root()) :] for k in keys)

    # -- deleting ------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            self._run("delete", key, 0, self._call, "delete_object", key, Key=path)
        except ObjectMissingError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix) + "/"
        self._run("delete_prefix", prefix, 0, self._delete_prefix, prefix, path)

    async def _delete_prefix(self, prefix: str, path: str) -> None:
        await self._abort_uploads(prefix, path)
        self._next_request()
        keys, _ = await self._list(path, prefix, False)
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": k} for k in keys[i : i + _DELETE_BATCH]]
            self._next_request()
            resp = await self._call("delete_objects", prefix, Delete={"Objects": batch, "Quiet": True})
            errors = [e for e in resp.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise ReplicaError(
                    f"could not delete {len(errors)} objects under s3://{self.bucket}/{path}, e.g. {first.get('Key')}: "
                    f"{first.get('Code')}: {first.get('Message')}",
                    replica=self.url, key=prefix,
                )  # fmt: skip

    async def _abort_uploads(self, prefix: str, path: str) -> None:
        """Abort multipart uploads left under ``path`` by writers that died mid-upload."""
        kw: dict[str, Any] = {"Prefix": path}
        while True:
            resp = await self._call("list_multipart_uploads", prefix, **kw)
            for u in resp.get("Uploads", ()):
                self._next_request()
                try:
                    await self._call("abort_multipart_upload", prefix, Key=u["Key"], UploadId=u["UploadId"])
                except ReplicaError as exc:
                    if error_code(exc.__cause__) != "NoSuchUpload":  # finished or aborted meanwhile: fine
                        raise
            if not resp.get("IsTruncated"):
                return
            kw.update(KeyMarker=resp["NextKeyMarker"], UploadIdMarker=resp["NextUploadIdMarker"])
            self._next_request()

    def close(self) -> None:
        self._aborts.settle()
        creator = getattr(self.fs, "_s3creator", None)
        if creator is not None and self.fs._s3 is not None:
            self.fs._s3 = None
            s3fs.S3FileSystem.close_session(self.fs.loop, creator)
