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
  size. On any failure the upload is aborted, so no partial object ever becomes visible;
  an upload whose abort also failed is removed by :meth:`S3Replica.delete_prefix`.
* **Conditional commits.** The commit object is written with ``If-None-Match: *``, so of two
  writers exactly one commits. The first commit probes whether the server honours the
  header (a server that answers 501 or silently ignores it gets the weaker HEAD-then-PUT,
  and a warning, once).
* **No listing cache.** Every listing is a fresh ``ListObjectsV2``; s3fs's dircache, which can
  hide a step written by another client, is never consulted. ``size()`` is always a HEAD.
* **One error table.** :func:`~ckptmirror.replicas._s3_errors.classify` maps every
  botocore/aiohttp failure to one of ckptmirror's errors and says whether it is worth
  retrying; :meth:`S3Replica._retry` is the only retry loop (botocore's own retries are off),
  with exponential backoff and jitter, and a ``timeout_s`` on every attempt. Misconfiguration
  (no such bucket: :class:`~ckptmirror.errors.ReplicaConfigError`; access denied, unknown key,
  wrong secret, no credentials: :class:`~ckptmirror.errors.ReplicaPermissionError`) is never
  retried, and ``Mirror()`` raises it at construction; an endpoint where nothing answers, or
  a bucket that vanishes after it was used, is :class:`~ckptmirror.errors.ReplicaUnavailableError`
  (an outage: the replica is degraded and probed until it answers).
  Every message names the replica, the endpoint where that helps, and the fix.

A HEAD on a missing bucket answers a bare 404, indistinguishable from a missing key, so
``size()`` reports None there; every listing and GET names the missing bucket.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import s3fs
from fsspec.asyn import sync

from ..errors import CkptMirrorError, CorruptObjectError, ObjectMissingError, ReplicaError, StepExistsError
from ._s3_errors import Verdict, _NotSupported, _PreconditionFailed, classify, detail, error_code, explain
from .base import Buffer, Replica, step_of_key, validate_key

log = logging.getLogger("ckptmirror")

T = TypeVar("T")

MIN_PART_BYTES = 5 << 20  # S3's minimum for every part but the last
MAX_PARTS = 10_000
_DELETE_BATCH = 1000  # DeleteObjects limit
_PART_CHECKSUMS = ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256")


def _byte_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


async def _all(aws: Iterable[Awaitable[T]]) -> list[T]:
    """gather(), but on the first failure cancel the rest and wait for them, so that no
    part is still uploading when we abort and no range still writes into the caller's buffer."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class S3Replica(Replica):
    """A prefix in an S3 bucket.

    Args:
        url: ``s3://bucket/prefix`` (the prefix may be empty).
        endpoint_url, key, secret, region: override ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
            ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` (and profiles, instance roles).
        part_bytes: objects larger than this are uploaded and read as parts of this size (>= 5 MiB).
        max_concurrency: part uploads and ranged reads in flight on this replica, all objects together.
        timeout_s: limit for every request attempt (connect, read, and the whole attempt).
        retries: retries after the first attempt, for throttling, 5xx and network errors.
        s3fs_options: passed to :class:`s3fs.S3FileSystem` (e.g. ``profile``, ``config_kwargs``).

    Example::

        Mirror(["/local/ckpt", S3Replica("s3://bucket/run1", part_bytes=16 << 20)])
    """

    read_priority = 30
    #: First retry delay; doubles per retry (capped at 10 s), with jitter.
    backoff_s = 0.1

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
        timeout_s: float = 60.0,
        retries: int = 5,
        **s3fs_options: Any,
    ) -> None:
        super().__init__(url)
        scheme, _, rest = url.partition("://")
        bucket, _, prefix = rest.partition("/")
        if scheme.lower() not in ("s3", "s3a") or not bucket:
            raise ValueError(f"S3 replica URL must look like s3://bucket/prefix, got {url!r}")
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part_bytes must be at least {MIN_PART_BYTES} (S3's minimum part size), got {part_bytes}")
        if max_concurrency < 1 or timeout_s <= 0 or retries < 0:
            raise ValueError("max_concurrency must be >= 1, timeout_s > 0, retries >= 0")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_bytes = part_bytes
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        config = {
            "connect_timeout": timeout_s,
            "read_timeout": timeout_s,
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

    # -- plumbing ------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        """The S3 key of ``key``; validated before anything is sent."""
        validate_key(key, self.url)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return sync(self.fs.loop, fn, *args, **kwargs)

    async def _send(self, method: str, **kwargs: Any) -> Any:
        """One request on the shared aiobotocore client (tests wrap this to inject faults)."""
        client = await self.fs.set_session()
        return await getattr(client, method)(Bucket=self.bucket, **kwargs)

    async def _retry(self, op: str, key: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` under ``timeout_s``, retrying what :func:`classify` calls transient."""
        for n in range(self.retries + 1):
            try:
                result = await asyncio.wait_for(attempt(), self.timeout_s)
                self._bucket_seen = True
                return result
            except CkptMirrorError:
                raise  # our own verdicts (size mismatch, ...) are final
            except Exception as exc:
                verdict = classify(exc, bucket_seen=self._bucket_seen)
                if verdict is None:
                    raise
                if verdict.retry and n < self.retries:
                    delay = min(self.backoff_s * 2**n, 10.0) * random.uniform(0.5, 1.0)
                    log.debug("s3 %s %s failed (%s), retry %d in %.2f s", op, key, detail(exc), n + 1, delay)
                    await asyncio.sleep(delay)
                    continue
                raise verdict.error(
                    await self._message(op, key, n + 1, verdict, exc), replica=self.url, key=key
                ) from exc
        raise AssertionError("unreachable")

    async def _message(self, op: str, key: str, attempts: int, verdict: Verdict, exc: BaseException) -> str:
        """``OP s3://bucket/key: what happened [after N attempts] (server's words); how to fix it``."""
        where = f"s3://{self.bucket}/{self._path(key) if key else self.prefix}"
        endpoint = await self._endpoint_url()
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        msg = f"{op} {where}: {explain(verdict.meaning, bucket=self.bucket, endpoint=endpoint)}{tries} ({detail(exc)})"
        if verdict.fix:
            msg += f"; {explain(verdict.fix, bucket=self.bucket, endpoint=endpoint)}"
        return msg

    async def _endpoint_url(self) -> str:
        """The URL the client sends requests to, however it was chosen (option, ``AWS_ENDPOINT_URL``,
        region default): what an operator has to compare with where the server really is."""
        try:
            client = await self.fs.set_session()
            return str(client.meta.endpoint_url)
        except Exception:  # noqa: BLE001 - a message about one failure must not fail with another
            return str(self.fs.client_kwargs.get("endpoint_url") or self.fs.endpoint_url or "the default AWS endpoint")

    async def _call(self, method: str, key: str, **kwargs: Any) -> Any:
        return await self._retry(method, key, lambda: self._send(method, **kwargs))

    # -- writing -------------------------------------------------------------------------
    def put(self, key: str, data: Buffer) -> None:
        self._run(self._put, key, self._path(key), data)

    async def _put(self, key: str, path: str, data: Buffer) -> None:
        view = _byte_view(data)
        if len(view) > self.part_bytes:
            return await self._put_multipart(key, path, view)
        async with self._slots:
            body = data if isinstance(data, bytes) else await asyncio.to_thread(bytes, view)
            await self._call("put_object", key, Key=path, Body=body)

    async def _put_multipart(self, key: str, path: str, view: memoryview) -> None:
        size = len(view)
        part = max(self.part_bytes, -(-size // MAX_PARTS))
        upload_id = (await self._call("create_multipart_upload", key, Key=path))["UploadId"]
        try:
            parts = await _all(
                self._upload_part(key, path, upload_id, i + 1, view[off : off + part])
                for i, off in enumerate(range(0, size, part))
            )
            done = await self._call(
                "complete_multipart_upload", key, Key=path, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            if not done.get("ETag"):
                raise ReplicaError(
                    f"CompleteMultipartUpload of s3://{self.bucket}/{path} answered without an ETag",
                    replica=self.url,
                    key=key,
                )
        except BaseException:
            await self._abort(key, path, upload_id)
            raise
        stored = (await self._call("head_object", key, Key=path))["ContentLength"]
        if stored != size:
            await self._call("delete_object", key, Key=path)
            raise CorruptObjectError(
                f"completed upload holds {stored} bytes, sent {size}; deleted", replica=self.url, key=key
            )

    async def _upload_part(self, key: str, path: str, upload_id: str, number: int, chunk: memoryview) -> dict[str, Any]:
        async with self._slots:
            body = await asyncio.to_thread(bytes, chunk)
            resp = await self._call("upload_part", key, Key=path, UploadId=upload_id, PartNumber=number, Body=body)
        if not resp.get("ETag"):
            raise ReplicaError(
                f"UploadPart {number} of s3://{self.bucket}/{path} answered without an ETag", replica=self.url, key=key
            )
        # A part checksum the SDK added must be echoed, or S3 refuses the completion.
        return {"PartNumber": number, "ETag": resp["ETag"], **{k: resp[k] for k in _PART_CHECKSUMS if k in resp}}

    async def _abort(self, key: str, path: str, upload_id: str) -> None:
        try:
            await self._call("abort_multipart_upload", key, Key=path, UploadId=upload_id)
        except CkptMirrorError as exc:
            log.warning(
                "could not abort multipart upload %s of s3://%s/%s (delete_prefix removes it): %s",
                upload_id,
                self.bucket,
                path,
                exc,
            )

    def commit(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if self._conditional is None:
            with self._probe_lock:
                if self._conditional is None:
                    self._conditional = self._run(self._probe_conditional_writes)
        self._run(self._commit, key, path, bytes(data))

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
                await self._call("put_object", key, Key=path, Body=body)
                return
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
            await self._call("put_object", "", Key=probe, Body=b"", IfNoneMatch="*")
            why = "it ignored If-None-Match: * on an existing object"
        except _PreconditionFailed:
            return True
        except _NotSupported as exc:
            why = f"it answered {detail(exc.__cause__ or exc)}"
        finally:
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
        return self._run(self._get, key, self._path(key), max_bytes)

    async def _get(self, key: str, path: str, max_bytes: int) -> bytes:
        async def attempt() -> bytes:
            resp = await self._send("get_object", Key=path)
            body = resp["Body"]
            try:
                size = resp["ContentLength"]
                if size > max_bytes:
                    raise CorruptObjectError(
                        f"object is {size} bytes, more than the {max_bytes} allowed", replica=self.url, key=key
                    )
                data = await body.read()
            finally:
                body.close()
            if len(data) != size:
                raise CorruptObjectError(
                    f"read {len(data)} bytes, Content-Length said {size}", replica=self.url, key=key
                )
            return data

        return await self._retry("get_object", key, attempt)

    def read_into(self, key: str, out: memoryview) -> None:
        self._run(self._read_into, key, self._path(key), _byte_view(out))

    async def _read_into(self, key: str, path: str, view: memoryview) -> None:
        head = await self._call("head_object", key, Key=path)
        size = head["ContentLength"]
        if size != len(view):
            raise CorruptObjectError(f"size is {size} bytes, manifest says {len(view)}", replica=self.url, key=key)
        ranged = size > self.part_bytes
        match = {"IfMatch": head["ETag"]} if ranged and head.get("ETag") else {}
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
                if resp["ContentLength"] != end - start:
                    raise CorruptObjectError(
                        f"asked for bytes {start}-{end - 1}, got {resp['ContentLength']} bytes",
                        replica=self.url,
                        key=key,
                    )
                pos = start
                while pos < end and (n := await body.readinto(view[pos:end])):
                    pos += n
            finally:
                body.close()
            if pos != end:
                raise CorruptObjectError(f"object ended at byte {pos}, expected {end}", replica=self.url, key=key)

        async with self._slots:
            await self._retry("get_object", key, attempt)

    def size(self, key: str) -> int | None:
        path = self._path(key)
        try:
            return int(self._run(self._call, "head_object", key, Key=path)["ContentLength"])
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

    def _root(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def list_steps(self) -> list[str]:
        root = self._root()
        _, dirs = self._run(self._list, root, "", True)
        # A writer killed while its first objects were still multipart uploads leaves a step
        # that has no completed object: list it too, so retention and prune can abort them.
        dirs = list(dirs) + self._run(self._upload_dirs, root)
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

    def list_prefix(self, prefix: str) -> list[str]:
        keys, _ = self._run(self._list, self._path(prefix) + "/", prefix, False)
        return sorted(k[len(self._root()) :] for k in keys)

    # -- deleting ------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        try:
            self._run(self._call, "delete_object", key, Key=self._path(key))
        except ObjectMissingError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        self._run(self._delete_prefix, prefix, self._path(prefix) + "/")

    async def _delete_prefix(self, prefix: str, path: str) -> None:
        await self._abort_uploads(prefix, path)
        keys, _ = await self._list(path, prefix, False)
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": k} for k in keys[i : i + _DELETE_BATCH]]
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
                try:
                    await self._call("abort_multipart_upload", prefix, Key=u["Key"], UploadId=u["UploadId"])
                except ReplicaError as exc:
                    if error_code(exc.__cause__) != "NoSuchUpload":  # finished or aborted meanwhile: fine
                        raise
            if not resp.get("IsTruncated"):
                return
            kw.update(KeyMarker=resp["NextKeyMarker"], UploadIdMarker=resp["NextUploadIdMarker"])

    def close(self) -> None:
        creator = getattr(self.fs, "_s3creator", None)
        if creator is not None and self.fs._s3 is not None:
            self.fs._s3 = None
            s3fs.S3FileSystem.close_session(self.fs.loop, creator)
