"""Multipart uploads a failed put gives up on are aborted, not left open on the server.

An open multipart upload keeps its parts stored (and billed, on AWS) until someone aborts it.
Before, only a put whose error came back with time left in its budget aborted its upload; one
that missed its deadline (a stalled endpoint, a part whose answer never came), met an outage,
or was cut while waiting for a part slot left it open until retention or ``delete_prefix``
removed its step. Now those are aborted by the replica's background task (at once when the
endpoint answers, else a few times, spaced out), and ``close()`` gives what is still queued a
bounded last chance and logs what it could not abort, once, with the fix.

Everything is real: a moto S3 server on 127.0.0.1 and a :class:`_proxy.FaultProxy` in front of
it that goes silent or resets connections. What decides *when* the fault starts is the only
thing not real: the replica breaks the link (or withholds a request) as it sends a given part.
Bounds are on hangs only, several budgets wide.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from _helpers import S3Bucket, ck_warnings, wait_until
from _proxy import FaultProxy, Mode

from ckptmirror.errors import ReplicaUnavailableError
from ckptmirror.format import object_key
from ckptmirror.replicas.s3 import S3Replica

MiB = 1 << 20
PART = 5 * MiB  # S3's minimum part size
KEY = object_key(1, 0, 0, "0123abcd")
#: Short budgets, so that a missed one is cheap: a 15 MiB put gets 1 + 15/16 s.
OPTIONS: dict[str, Any] = dict(part_bytes=PART, connect_timeout_s=1.0, min_bytes_per_s=16 * MiB, retries=2)
#: How long a test waits for a background abort that should happen; the fixed code needs about
#: one budget, the old one never aborts.
ABORTED_WITHIN_S = 30.0
#: A background retry delay no test waits for: an abort seen within ABORTED_WITHIN_S was the
#: first attempt (or close()'s last chance), not a later retry.
NEVER_S = 3600.0

#: What a test does as the replica sends one upload_part request (``kwargs``: its arguments).
PartHook = Callable[[dict[str, Any]], Awaitable[None]]


def payload(n: int) -> bytes:
    return os.urandom(n)


class _Hooked(S3Replica):
    """S3Replica that awaits ``on_part(kwargs)`` before sending each part: where a test breaks things."""

    def __init__(self, url: str, on_part: PartHook, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.on_part = on_part

    async def _send(self, method: str, **kwargs: Any) -> Any:
        if method == "upload_part":
            await self.on_part(kwargs)
        return await super()._send(method, **kwargs)


class Link:
    """A fresh bucket on the moto server, a FaultProxy in front of the server, and the replicas
    the test opened through it (closed at teardown, before the proxy)."""

    def __init__(self, bucket: S3Bucket, proxy: FaultProxy) -> None:
        self.bucket = bucket
        self.proxy = proxy
        self.replicas: list[S3Replica] = []

    def replica(self, on_part: PartHook, **options: Any) -> S3Replica:
        r = _Hooked(self.bucket.url, on_part, endpoint_url=self.proxy.endpoint, **{**OPTIONS, **options})
        r.compression = "none"
        self.replicas.append(r)
        return r

    def break_at_part(self, number: int, mode: Mode) -> PartHook:
        """A hook that sets the proxy to ``mode`` as part ``number`` is sent (once)."""

        async def hook(kwargs: dict[str, Any]) -> None:
            if kwargs["PartNumber"] == number and self.proxy.mode == "forward":
                self.proxy.mode = mode

        return hook

    def open_uploads(self) -> list[dict[str, Any]]:
        """The multipart uploads open in the bucket, asked of the server itself (not through the proxy)."""
        uploads: list[dict[str, Any]] = self.bucket.client.list_multipart_uploads(Bucket=self.bucket.name).get(
            "Uploads", []
        )
        return uploads


@pytest.fixture
def link(make_bucket: Callable[[str], str], moto_server: str) -> Iterator[Link]:
    bucket = S3Bucket(f"s3://{make_bucket('abandoned')}/run", moto_server)
    proxy = FaultProxy(int(moto_server.rsplit(":", 1)[1]))
    made = Link(bucket, proxy)
    try:
        yield made
    finally:
        proxy.mode = "reset"  # whatever a replica still waits for fails now
        for r in made.replicas:
            r.close()
        proxy.close()


def put_fails(r: S3Replica, key: str, size: int) -> BaseException:
    with pytest.raises(ReplicaUnavailableError) as ei:
        r.put(key, payload(size))
    return ei.value


def left_open(caplog: pytest.LogCaptureFixture, upload_id: str) -> list[str]:
    return [m for m in ck_warnings(caplog) if upload_id in m and "left open" in m]


# ------------------------------------------------- (a) given up during an outage: aborted later
@pytest.mark.parametrize("how", ["silent", "reset"])
def test_an_upload_given_up_in_an_outage_is_aborted_once_the_endpoint_answers_again(
    link: Link, how: Mode, caplog: pytest.LogCaptureFixture
) -> None:
    """Part 2 meets a dead link: ``silent`` (accepted, never answered: the put misses its
    deadline) or ``reset`` (refused: the put fails as an outage, with time left). The put
    raises; the upload (part 1 stored) is open; the link comes back and the upload is gone,
    aborted in the background. Before: left open, and the only thing that ever removed it was
    retention or delete_prefix of its step."""
    caplog.set_level(logging.INFO, logger="ckptmirror")
    r = link.replica(link.break_at_part(2, how), max_concurrency=1)
    put_fails(r, KEY, 3 * PART)
    # Nothing can abort it while the link is down: it is open, with the part that went through.
    assert [u["Key"] for u in link.open_uploads()] == [link.bucket.full(KEY)]
    link.proxy.mode = "forward"
    wait_until(lambda: not link.open_uploads(), ABORTED_WITHIN_S, 0.1, "the abandoned upload to be aborted")
    assert not [m for m in ck_warnings(caplog) if "left open" in m], ck_warnings(caplog)


# ---------------------------------------- (b) given up while the endpoint answers: aborted at once
def test_an_upload_whose_part_is_never_answered_is_aborted_at_once(link: Link) -> None:
    """Part 2's request gets no answer (lost on the way) while the server answers everything
    else: the put misses its deadline, and the upload is aborted by the first background
    attempt (later ones are an hour away here). Before: the deadline was spent, so the abort was
    skipped, though the server would have answered it."""

    async def lost(kwargs: dict[str, Any]) -> None:
        if kwargs["PartNumber"] == 2:
            await asyncio.sleep(NEVER_S)

    r = link.replica(lost, max_concurrency=1)
    r.abort_backoff_s = NEVER_S
    put_fails(r, KEY, 3 * PART)
    wait_until(lambda: not link.open_uploads(), ABORTED_WITHIN_S, 0.1, "the abandoned upload to be aborted")


def test_an_upload_cut_while_waiting_for_a_part_slot_is_aborted_at_once(link: Link) -> None:
    """Two puts on a replica with one part slot: the first one's part is never answered and holds
    the slot; the second, waiting for it, is cut at its deadline (cancelled, not failed by a
    request). Both uploads are aborted by the first background attempt; before, both stayed open."""
    small, large = object_key(1, 0, 1, "0123abcd"), object_key(1, 0, 2, "0123abcd")
    holding = threading.Event()

    async def hold(kwargs: dict[str, Any]) -> None:
        if kwargs["Key"].endswith(large):
            holding.set()
            await asyncio.sleep(NEVER_S)

    r = link.replica(hold, max_concurrency=1)
    r.abort_backoff_s = NEVER_S
    with ThreadPoolExecutor(2) as pool:
        # The large put's budget (1 + 40/16 s) outlasts the small one's (1 + 10/16 s): the slot
        # stays taken for the whole of the small put's budget.
        first = pool.submit(put_fails, r, large, 8 * PART)
        assert holding.wait(30), "the large put never sent a part"
        second = pool.submit(put_fails, r, small, 2 * PART)
        assert "time budget" in str(second.result(60))
        first.result(60)
    wait_until(lambda: not link.open_uploads(), ABORTED_WITHIN_S, 0.1, "both abandoned uploads to be aborted")


# ------------------------------------------------------------------------- (c) close() bounded
def test_close_with_an_abort_pending_on_a_dead_endpoint_returns_and_says_what_is_left(
    link: Link, caplog: pytest.LogCaptureFixture
) -> None:
    """An abort is queued and the endpoint is dead (silent; each attempt may wait 30 s here):
    close() returns after its short grace, not after an attempt's deadline, and logs the upload
    it could not abort, once, with the bucket, key, upload id and what to do."""
    caplog.set_level(logging.DEBUG, logger="ckptmirror")
    r = link.replica(link.break_at_part(2, "reset"), max_concurrency=1, connect_timeout_s=30.0)
    put_fails(r, KEY, 3 * PART)  # refused: fails at once, whatever the budget
    (upload,) = link.open_uploads()
    link.proxy.mode = "silent"
    close = threading.Thread(target=r.close, daemon=True)
    close.start()
    close.join(15)  # far below the 30 s an attempt may wait; the grace is about 1.5 s
    assert not close.is_alive(), "close() hung on the pending abort"
    lines = left_open(caplog, upload["UploadId"])
    assert len(lines) == 1, ck_warnings(caplog)
    for part in (f"s3://{link.bucket.name}/{upload['Key']}", "ckptmirror prune", "AbortIncompleteMultipartUpload"):
        assert part in lines[0], lines[0]
    assert f"--bucket {link.bucket.name} --key {upload['Key']} --upload-id {upload['UploadId']}" in lines[0]
    assert [u["UploadId"] for u in link.open_uploads()] == [upload["UploadId"]]  # the server never heard of it
    link.proxy.mode = "forward"
    threading.Event().wait(2.0)  # past the first retry delay: the queue ended with close(), nothing retries
    assert len(left_open(caplog, upload["UploadId"])) == 1, ck_warnings(caplog)


def test_close_gives_a_pending_abort_its_last_chance(link: Link, caplog: pytest.LogCaptureFixture) -> None:
    """The background abort failed once (refused) and its next try is an hour away; the
    endpoint answers again when the replica is closed: close() aborts the upload before it
    returns, instead of leaving it for retention."""
    r = link.replica(link.break_at_part(2, "reset"), max_concurrency=1)
    r.abort_backoff_s = NEVER_S
    put_fails(r, KEY, 3 * PART)
    # Time for the first background attempt, refused like the put. (On a machine too slow for
    # it, the attempt succeeds after the link is back instead: the test passes, proving less.)
    threading.Event().wait(1.0)
    assert [u["Key"] for u in link.open_uploads()] == [link.bucket.full(KEY)]
    link.proxy.mode = "forward"
    r.close()
    assert link.open_uploads() == []
    assert not [m for m in ck_warnings(caplog) if "left open" in m], ck_warnings(caplog)
