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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import s3fs
from fsspec.asyn import sync

from ..errors import (
    CkptMirrorError,
    CorruptObjectError,
    ObjectMissingError,
    ReplicaError,
    ReplicaUnavailableError,
    StepExistsError,
)
from ._s3_errors import (
    ENDPOINT_FIX,
    THROTTLED,
    TIMED_OUT,
    Verdict,
    _NotSupported,
    _PreconditionFailed,
    abandoned_upload_fix,
    classify,
    detail,
    error_code,
    explain,
    nothing_to_abort,
    worth_retrying,
)
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

log = logging.getLogger("ckptmirror")

T = TypeVar("T")

MIN_PART_BYTES = 5 << 20  # S3's minimum for every part but the last
MAX_PARTS = 10_000
_DELETE_BATCH = 1000  # DeleteObjects limit
_PART_CHECKSUMS = ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256")

#: The deadline of the operation the current task belongs to. A context variable because the
#: operation's requests run in tasks (parts, ranges) that copy the context when created.
_DEADLINE: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("ckptmirror_s3_deadline", default=None)


_GRACE_S = 0.25
#: Background aborts in flight at once on one replica: they share the connection pool with the
#: data, and after an outage many may be due together.
_ABORTS_AT_ONCE = 4


def _earliest(dl: Deadline, cap: float) -> float:
    """The end of one attempt: the operation's deadline (which may move) or the attempt's own limit."""
    return min(dl.end, cap)


class _Expired(Exception):
    """:func:`_within` ran out of time (internal: turned into a verdict or a missed deadline)."""


async def _within(aw: Awaitable[T], end: Callable[[], float]) -> T:
    """Await ``aw`` until the monotonic time ``end()``, re-read whenever it passes (an operation
    may extend its deadline meanwhile); then cancel it, wait until it has stopped (so no range
    still writes into a caller's buffer) and raise :class:`_Expired`.

    Python 3.10 has no ``asyncio.timeout()`` whose deadline can move; this is that.
    """
    task = asyncio.ensure_future(aw)
    try:
        while (left := end() - time.monotonic()) > 0:
            done, _ = await asyncio.wait({task}, timeout=left)
            if done:
                return task.result()
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if task.done() and not task.cancelled() and task.exception() is None:
        return task.result()  # it finished in the same instant
    raise _Expired


def _byte_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _content_length(head: Mapping[str, Any], url: str, key: str) -> int:
    """The size a HEAD answer gives; an answer without one is the server's fault, named."""
    size = head.get("ContentLength")
    if not isinstance(size, int):
        raise ReplicaError(
            "HEAD answered without a Content-Length: the S3 server (or a proxy in front of it) does not "
            "say how large the object is; fix the server or the proxy",
            replica=url,
            key=key,
        )
    return size


@dataclass(eq=False)
class _Orphan:
    """A multipart upload a put gave up on and did not abort itself: queued for the background."""

    key: str  # the replica's key (messages, the deadline)
    path: str  # the bucket's key
    upload_id: str
    due: float  # time.monotonic() of the next attempt
    attempts: int = 0
    last: str = ""  # the last attempt's failure, in words


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


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
            raise ValueError(f"S3 replica URL must look like s3://bucket/prefix, got {url!r}")
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
        # Uploads queued for a background abort (by upload id) and the one task that works on
        # them while any are queued: used on fsspec's loop only, so they need no lock.
        self._orphans: dict[str, _Orphan] = {}
        self._aborter: asyncio.Task[None] | None = None
        self._abort_wake = asyncio.Event()  # a new upload queued, or close() wants them all now
        self._abort_slots = asyncio.Semaphore(_ABORTS_AT_ONCE)
        self._closing = False  # close() is giving the queue its last chance: no more retries

    # -- plumbing ------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        """The S3 key of ``key``; validated before anything is sent."""
        validate_key(key, self.url)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _run(
        self, op: str, key: str, nbytes: int, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any
    ) -> T:
        """Run one operation on fsspec's loop under its own deadline (``nbytes``: its body size).

        The deadline bounds the whole coroutine too, not only its requests: time spent waiting
        for a part slot (held by another operation) counts, so no operation outlives its budget.
        """
        deadline = self.budget.start(op, key, nbytes)

        async def main() -> T:
            _DEADLINE.set(deadline)  # this task's context: seen by every task it creates
            try:
                # A little grace: the request that is running when the deadline passes reports it
                # itself, with its attempts and last error; this bound is for everything else.
                return await _within(fn(*args, **kwargs), lambda: deadline.end + _GRACE_S)
            except _Expired:
                raise deadline.missed(self.url, where=self._where(key), fix=await self._fix()) from None

        return sync(self.fs.loop, main)

    def _deadline(self, op: str, key: str) -> Deadline:
        """The current operation's deadline (a fresh one-request budget outside an operation)."""
        return _DEADLINE.get() or self.budget.start(op, key)

    def _next_request(self) -> None:
        """The current operation needs one more sequential request (a next page, a completion)."""
        dl = _DEADLINE.get()
        if dl is not None:
            dl.extend(requests=1)

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._path(key) if key else self.prefix}"

    async def _fix(self) -> str:
        return explain(ENDPOINT_FIX, bucket=self.bucket, endpoint=await self._endpoint_url())

    async def _send(self, method: str, **kwargs: Any) -> Any:
        """One request on the shared aiobotocore client (tests wrap this to inject faults)."""
        client = await self.fs.set_session()
        return await getattr(client, method)(Bucket=self.bucket, **kwargs)

    async def _retry(
        self, op: str, key: str, attempt: Callable[[], Awaitable[T]], attempt_bytes: int | None = None
    ) -> T:
        """Run ``attempt`` inside the operation's deadline, retrying what :func:`classify` calls
        transient while the budget lasts (and at most ``retries`` times).

        ``attempt_bytes``: this request is one part of a larger operation (a multipart part, a
        range), so each attempt is also limited to that part's own budget: a stalled part is cut
        and retried while the operation still has time, instead of using all of it.
        """
        dl = self._deadline(op, key)
        last: BaseException | None = None
        n = 0  # attempts made
        while True:
            if dl.expired():
                raise dl.missed(self.url, where=self._where(key), attempts=n, last=last, fix=await self._fix())
            now = time.monotonic()
            cap = math.inf if attempt_bytes is None else now + self.budget.seconds(attempt_bytes)
            if self.timeout_s is not None:
                cap = min(cap, now + self.timeout_s)
            n += 1
            try:
                result = await _within(attempt(), partial(_earliest, dl, cap))
                self._bucket_seen = True
                return result
            except CkptMirrorError:
                raise  # our own verdicts (size mismatch, ...) are final
            except _Expired:
                if dl.expired():
                    raise dl.missed(
                        self.url, where=self._where(key), attempts=n, last=last, fix=await self._fix()
                    ) from last
                exc: Exception = asyncio.TimeoutError(f"attempt cut after {cap - now:.1f} s")
                verdict = TIMED_OUT
            except Exception as caught:
                exc = caught
                found = classify(exc, bucket_seen=self._bucket_seen)
                if found is None:
                    raise
                verdict = found
            last = exc
            delay = min(self.backoff_s * 2 ** (n - 1), 10.0) * random.uniform(0.5, 1.0)
            # Throttling asks the client to slow down, not to give up: it is retried while the
            # budget lasts, with the backoff growing, whatever ``retries`` says (with the six
            # attempts that bounds other errors, a 50% SlowDown failed saves and restores
            # after ~3 s of a 30 s budget).
            if verdict.retry and (n <= self.retries or verdict is THROTTLED):
                if delay >= dl.remaining():  # no time left for another attempt: the budget is spent
                    raise dl.missed(
                        self.url, where=self._where(key), attempts=n, last=exc, fix=await self._fix()
                    ) from exc
                log.debug("s3 %s %s failed (%s), retry %d in %.2f s", op, key, detail(exc), n, delay)
                await asyncio.sleep(delay)
                continue
            raise verdict.error(await self._message(op, key, n, verdict, exc, dl), replica=self.url, key=key) from exc

    async def _message(
        self, op: str, key: str, attempts: int, verdict: Verdict, exc: BaseException, dl: Deadline | None = None
    ) -> str:
        """``OP s3://bucket/key: what happened [after N attempts in T of its budget] (server's words); the fix``."""
        where = self._where(key)
        endpoint = await self._endpoint_url()
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        if tries and dl is not None:
            tries += f" in {dl.elapsed():.1f} s of its time budget of {dl.describe()}"
        msg = f"{op} {where}: {explain(verdict.meaning, bucket=self.bucket, endpoint=endpoint)}{tries} ({detail(exc)})"
        if verdict.fix:
            msg += f"; {explain(verdict.fix, bucket=self.bucket, endpoint=endpoint)}"
        return msg

    async def _endpoint_url(self) -> str:
        """The URL the client sends requests to, however it was chosen (option, ``AWS_ENDPOINT_URL``,
        region default): what an operator has to compare with where the server really is."""
        try:
            # The client made for the request that failed; if there is none yet (its creation is
            # what hung), a bounded wait: a message about an operation out of time must not hang.
            client: Any = getattr(self.fs, "_s3", None) or await asyncio.wait_for(self.fs.set_session(), 1.0)
            return str(client.meta.endpoint_url)
        except Exception:  # noqa: BLE001 - a message about one failure must not fail with another
            return str(self.fs.client_kwargs.get("endpoint_url") or self.fs.endpoint_url or "the default AWS endpoint")

    async def _call(self, method: str, key: str, *, attempt_bytes: int | None = None, **kwargs: Any) -> Any:
        return await self._retry(method, key, lambda: self._send(method, **kwargs), attempt_bytes)

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

    async def _put_multipart(self, key: str, path: str, view: memoryview) -> None:
        size = len(view)
        part = max(self.part_bytes, -(-size // MAX_PARTS))
        upload_id = (await self._call("create_multipart_upload", key, attempt_bytes=0, Key=path))["UploadId"]
        try:
            parts = await _all(
                self._upload_part(key, path, upload_id, i + 1, view[off : off + part])
                for i, off in enumerate(range(0, size, part))
            )
            self._next_request()  # S3 may take a while to assemble a large object
            done = await self._call(
                "complete_multipart_upload", key, Key=path, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            if not done.get("ETag"):
                raise ReplicaError(
                    f"CompleteMultipartUpload of s3://{self.bucket}/{path} answered without an ETag",
                    replica=self.url,
                    key=key,
                )
        except BaseException as exc:
            await self._abort(key, path, upload_id, exc)
            raise
        self._next_request()
        stored = _content_length(await self._call("head_object", key, attempt_bytes=0, Key=path), self.url, key)
        if stored != size:
            self._next_request()
            await self._call("delete_object", key, Key=path)
            raise CorruptObjectError(
                f"completed upload holds {stored} bytes, sent {size}; deleted", replica=self.url, key=key
            )

    async def _upload_part(self, key: str, path: str, upload_id: str, number: int, chunk: memoryview) -> dict[str, Any]:
        async with self._slots:
            body = await asyncio.to_thread(bytes, chunk)
            resp = await self._call(
                "upload_part", key, attempt_bytes=len(body), Key=path, UploadId=upload_id, PartNumber=number, Body=body
            )
        if not resp.get("ETag"):
            raise ReplicaError(
                f"UploadPart {number} of s3://{self.bucket}/{path} answered without an ETag", replica=self.url, key=key
            )
        # A part checksum the SDK added must be echoed, or S3 refuses the completion.
        return {"PartNumber": number, "ETag": resp["ETag"], **{k: resp[k] for k in _PART_CHECKSUMS if k in resp}}

    async def _abort(self, key: str, path: str, upload_id: str, cause: BaseException) -> None:
        """Abort an upload the put gives up on (``cause``: why), so that its parts do not stay stored.

        At once, within the put's budget, when the endpoint answered (an error, not an outage)
        and time is left; else in the background (:meth:`_abort_later`): after a missed deadline,
        an outage or a cancellation, waiting here would hold the caller longer for an endpoint
        that is not answering.
        """
        dl = _DEADLINE.get()
        answered = isinstance(cause, Exception) and not isinstance(cause, ReplicaUnavailableError)
        if answered and dl is not None and not dl.expired():
            self._next_request()
            try:
                await self._call("abort_multipart_upload", key, attempt_bytes=0, Key=path, UploadId=upload_id)
                return
            except CkptMirrorError as exc:
                if nothing_to_abort(exc):
                    return
                if not worth_retrying(exc):  # e.g. no permission to abort: asking again will not help
                    self._left_open(path, upload_id, f"the abort failed: {exc}")
                    return
            except Exception:  # noqa: BLE001 - not translated (a bug, a closed client): the queue retries it
                pass
            except BaseException:
                self._abort_later(key, path, upload_id)
                raise
        self._abort_later(key, path, upload_id)

    def _abort_later(self, key: str, path: str, upload_id: str) -> None:
        """Queue an abort for the background task (started if none runs). On fsspec's loop;
        costs the caller nothing more."""
        if upload_id in self._orphans:
            return
        if len(self._orphans) >= self.abort_queue_max:
            self._left_open(path, upload_id, f"{len(self._orphans)} other uploads already wait for an abort here")
            return
        self._orphans[upload_id] = _Orphan(key, path, upload_id, due=time.monotonic())
        self._abort_wake.set()
        if self._aborter is None:
            self._aborter = asyncio.get_running_loop().create_task(self._abort_queued())

    async def _abort_queued(self) -> None:
        """The background task: abort what is queued, each upload up to ``abort_attempts``
        times; ends when nothing is left (the next queued abort starts another)."""
        _DEADLINE.set(None)  # created inside a put: that put's deadline is not this task's
        try:
            while self._orphans:
                now = time.monotonic()
                due = [o for o in self._orphans.values() if o.due <= now]
                if due:
                    await asyncio.gather(*(self._abort_orphan(o) for o in due))
                    continue
                self._abort_wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._abort_wake.wait(), min(o.due for o in self._orphans.values()) - now)
        finally:
            self._aborter = None

    async def _abort_orphan(self, o: _Orphan) -> None:
        """One background attempt at aborting ``o``, with a deadline of its own: one request's."""
        async with self._abort_slots:
            o.attempts += 1
            dl = self.budget.start("abort_multipart_upload", o.key)
            _DEADLINE.set(dl)  # this attempt's task only (gather gave it a copy of the context)
            done = "aborted"
            try:
                call = self._call("abort_multipart_upload", o.key, attempt_bytes=0, Key=o.path, UploadId=o.upload_id)
                try:
                    await _within(call, lambda: dl.end + _GRACE_S)
                except _Expired:
                    raise dl.missed(self.url, where=self._where(o.key)) from None
            except CkptMirrorError as exc:
                if not nothing_to_abort(exc):
                    self._abort_failed(o, exc, retry=worth_retrying(exc))
                    return
                done = "found gone (completed or aborted meanwhile)"
            except Exception as exc:  # noqa: BLE001 - not translated (a bug, a closed client): retried, bounded
                self._abort_failed(o, exc, retry=True)
                return
        self._orphans.pop(o.upload_id, None)
        log.info(
            "multipart upload %s of s3://%s/%s, which a failed put left open, %s",
            o.upload_id,
            self.bucket,
            o.path,
            done,
        )

    def _abort_failed(self, o: _Orphan, exc: BaseException, *, retry: bool) -> None:
        cause = exc.__cause__
        if cause is not None:
            o.last = detail(cause)
        elif isinstance(exc, ReplicaUnavailableError):
            o.last = f"no answer within {self.budget.connect_timeout_s:g} s"
        else:
            o.last = detail(exc)
        if retry and o.attempts < self.abort_attempts and not self._closing:
            o.due = time.monotonic() + min(self.abort_backoff_s * 2 ** (o.attempts - 1), 30.0)
            log.debug("abort of multipart upload %s failed (%s); trying again later", o.upload_id, o.last)
            return
        self._orphans.pop(o.upload_id, None)
        tries = f"{o.attempts} attempts" if o.attempts > 1 else "the attempt"
        self._left_open(o.path, o.upload_id, f"{tries} to abort it failed, the last: {o.last}")

    async def _last_chance(self, grace: float) -> None:
        """For close(): one more attempt now at every queued abort, for at most ``grace`` seconds
        in all; what is still open then is logged, once each."""
        task = self._aborter
        if task is None:
            return
        self._closing = True
        try:
            for o in self._orphans.values():
                o.due = 0.0
            self._abort_wake.set()
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            for o in list(self._orphans.values()):
                last = f" (the last attempt: {o.last})" if o.last else ""
                self._left_open(o.path, o.upload_id, f"the replica was closed before it could be aborted{last}")
            self._orphans.clear()
        finally:
            self._closing = False

    def _left_open(self, path: str, upload_id: str, why: str) -> None:
        client = getattr(self.fs, "_s3", None)
        endpoint = str(client.meta.endpoint_url if client is not None else self.fs.endpoint_url or "")
        log.warning(
            "multipart upload %s of s3://%s/%s is left open (%s): its parts stay stored, and billed on AWS, "
            "until it is aborted; %s",
            upload_id, self.bucket, path, why,
            abandoned_upload_fix(bucket=self.bucket, endpoint=endpoint, key=path, upload_id=upload_id),
        )  # fmt: skip

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
        self._settle_aborts()
        creator = getattr(self.fs, "_s3creator", None)
        if creator is not None and self.fs._s3 is not None:
            self.fs._s3 = None
            s3fs.S3FileSystem.close_session(self.fs.loop, creator)

    def _settle_aborts(self) -> None:
        """Give queued aborts their last chance (``abort_close_grace_s``), never waiting much longer."""
        if self._aborter is None:  # read from another thread: at worst a task that just ended
            return
        loop = self.fs.loop
        grace = self.abort_close_grace_s
        try:
            fut = asyncio.run_coroutine_threadsafe(self._last_chance(grace), loop)
        except RuntimeError:  # the loop is closed (interpreter exit): nothing runs there any more
            return
        if _on_loop(loop):
            return  # waiting here would block the loop it runs on; it ends within the grace
        try:
            fut.result(grace + 0.5)  # + the attempt being cut, and the logging
        except concurrent.futures.TimeoutError:
            fut.cancel()
            log.warning("S3 replica %s: pending multipart upload aborts did not settle at close", self.url)
        except Exception:  # noqa: BLE001 - close() must not fail over a best-effort cleanup
            log.debug("S3 replica %s: settling the pending aborts failed", self.url, exc_info=True)
