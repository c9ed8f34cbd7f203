"""The background aborts of multipart uploads that a failed put gave up on.

An open multipart upload keeps its parts stored (and billed, on AWS) until it is aborted. A put
whose endpoint answered aborts its upload at once (:mod:`~ckptmirror.replicas._s3_multipart`);
one that missed its deadline, met an outage or was cancelled queues it here instead, on none of
the caller's time. :class:`AbortQueue` (one per :class:`~ckptmirror.replicas.s3.S3Replica`)
runs one background task on fsspec's loop while anything is queued: each upload is tried up to
``abort_attempts`` times, spaced out, each attempt with a deadline of its own; ``close()`` gives
what is still queued a last chance (:meth:`AbortQueue.settle`), and an upload that could still
not be aborted is logged, once, with how to remove it. Apart from s3.py because it is state and
a task of its own, with its own retry policy, beside the replica's operations; it sends its
requests through the replica's ``_call``, which it is given.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import CkptMirrorError, ReplicaUnavailableError
from ._s3_errors import abandoned_upload_fix, detail, nothing_to_abort, worth_retrying
from ._s3_requests import _DEADLINE, _GRACE_S, _Expired, _within
from .base import TimeBudget

if TYPE_CHECKING:
    import s3fs

log = logging.getLogger("ckptmirror")

#: Background aborts in flight at once on one replica: they share the connection pool with the
#: data, and after an outage many may be due together.
_ABORTS_AT_ONCE = 4


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


class AbortPolicy(Protocol):
    """The knobs the queue reads whenever it uses them (S3Replica's class attributes, which a
    caller may set on one replica): see :class:`~ckptmirror.replicas.s3.S3Replica`."""

    abort_attempts: int
    abort_backoff_s: float
    abort_close_grace_s: float
    abort_queue_max: int


class AbortQueue:
    """The multipart uploads of one replica that wait for a background abort, and the task that
    aborts them. Used on fsspec's loop only, but for :meth:`settle` (close()'s thread).

    Args:
        call: the replica's ``_call`` (one request, retried within the current deadline).
        where: the replica's ``_where`` (``s3://bucket/key`` of a key, for messages).
        budget, url, bucket, fs: the replica's.
        policy: where ``abort_attempts``, ``abort_backoff_s``, ``abort_close_grace_s`` and
            ``abort_queue_max`` are read (the replica).
    """

    def __init__(
        self,
        *,
        call: Callable[..., Awaitable[Any]],
        where: Callable[[str], str],
        budget: TimeBudget,
        url: str,
        bucket: str,
        fs: s3fs.S3FileSystem,
        policy: AbortPolicy,
    ) -> None:
        self._call = call
        self._where = where
        self.budget = budget
        self.url = url
        self.bucket = bucket
        self.fs = fs
        self._policy = policy
        # Uploads queued for a background abort (by upload id) and the one task that works on
        # them while any are queued: used on fsspec's loop only, so they need no lock.
        self._orphans: dict[str, _Orphan] = {}
        self._aborter: asyncio.Task[None] | None = None
        self._abort_wake = asyncio.Event()  # a new upload queued, or close() wants them all now
        self._abort_slots = asyncio.Semaphore(_ABORTS_AT_ONCE)
        self._closing = False  # close() is giving the queue its last chance: no more retries

    def later(self, key: str, path: str, upload_id: str) -> None:
        """Queue an abort for the background task (started if none runs). On fsspec's loop;
        costs the caller nothing more."""
        if upload_id in self._orphans:
            return
        if len(self._orphans) >= self._policy.abort_queue_max:
            self.left_open(path, upload_id, f"{len(self._orphans)} other uploads already wait for an abort here")
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
        if retry and o.attempts < self._policy.abort_attempts and not self._closing:
            o.due = time.monotonic() + min(self._policy.abort_backoff_s * 2 ** (o.attempts - 1), 30.0)
            log.debug("abort of multipart upload %s failed (%s); trying again later", o.upload_id, o.last)
            return
        self._orphans.pop(o.upload_id, None)
        tries = f"{o.attempts} attempts" if o.attempts > 1 else "the attempt"
        self.left_open(o.path, o.upload_id, f"{tries} to abort it failed, the last: {o.last}")

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
                self.left_open(o.path, o.upload_id, f"the replica was closed before it could be aborted{last}")
            self._orphans.clear()
        finally:
            self._closing = False

    def left_open(self, path: str, upload_id: str, why: str) -> None:
        """Log that ``upload_id`` stays open (``why``), with how to remove it."""
        client = getattr(self.fs, "_s3", None)
        endpoint = str(client.meta.endpoint_url if client is not None else self.fs.endpoint_url or "")
        log.warning(
            "multipart upload %s of s3://%s/%s is left open (%s): its parts stay stored, and billed on AWS, "
            "until it is aborted; %s",
            upload_id, self.bucket, path, why,
            abandoned_upload_fix(bucket=self.bucket, endpoint=endpoint, key=path, upload_id=upload_id),
        )  # fmt: skip

    def settle(self) -> None:
        """Give queued aborts their last chance (``abort_close_grace_s``), never waiting much longer."""
        if self._aborter is None:  # read from another thread: at worst a task that just ended
            return
        loop = self.fs.loop
        grace = self._policy.abort_close_grace_s
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
