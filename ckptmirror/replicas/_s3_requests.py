"""S3 request plumbing: each operation's deadline, the one retry loop, the error messages.

:class:`S3Requests` is the part of :class:`~ckptmirror.replicas.s3.S3Replica` that sends
requests, the same for every operation: :meth:`~S3Requests._run` runs an operation on
fsspec's event loop under its own :class:`~ckptmirror.replicas.base.Deadline` (kept in a
context variable, :data:`_DEADLINE`, so that the part and range tasks of the operation see
it), :meth:`~S3Requests._retry` is the only retry loop (what
:func:`~ckptmirror.replicas._s3_errors.classify` calls transient, with backoff and jitter,
while the budget lasts), :meth:`~S3Requests._send` the one place a request goes out, and
:meth:`~S3Requests._message` what a failure says. Apart from s3.py, which says what each
operation sends, because this says how any request is sent, bounded and retried. A base class
of S3Replica rather than an object it owns: tests wrap ``_send`` (a subclass, or an instance
attribute), and every request has to go through that one method of the replica.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from fsspec.asyn import sync

from ..errors import CkptMirrorError, ReplicaError
from ._s3_errors import ENDPOINT_FIX, THROTTLED, TIMED_OUT, Verdict, classify, detail, explain
from .base import Deadline, TimeBudget, validate_key

if TYPE_CHECKING:
    import s3fs

log = logging.getLogger("ckptmirror")

T = TypeVar("T")

#: The deadline of the operation the current task belongs to. A context variable because the
#: operation's requests run in tasks (parts, ranges) that copy the context when created.
_DEADLINE: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("ckptmirror_s3_deadline", default=None)


_GRACE_S = 0.25


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


class S3Requests:
    """How S3Replica sends requests: under the operation's deadline, retried, failures explained.

    Uses the replica's ``url``, ``bucket``, ``prefix``, ``fs``, ``budget``, ``timeout_s``,
    ``retries``, ``backoff_s`` (set by :class:`~ckptmirror.replicas.s3.S3Replica`).
    """

    url: str
    bucket: str
    prefix: str
    fs: s3fs.S3FileSystem
    budget: TimeBudget
    timeout_s: float | None
    retries: int
    backoff_s: float
    _bucket_seen: bool

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
