"""S3 multipart uploads: how S3Replica writes an object larger than ``part_bytes``.

Create the upload; send the parts, at most ``max_concurrency`` in flight on the whole replica
(its ``_slots``), each copied into ``bytes`` in a worker thread just before it is sent and
limited to its own part's budget; complete it (the answer must carry an ETag) and confirm the
size with a HEAD. On any failure the upload is aborted (:meth:`S3Multipart._abort`): at once
when the endpoint answered, else by the replica's
:class:`~ckptmirror.replicas._s3_aborts.AbortQueue`. Apart from s3.py because it is the one
operation made of many requests, with a cleanup of its own. A base class of S3Replica, like
:class:`~ckptmirror.replicas._s3_requests.S3Requests`, because tests wrap ``_upload_part`` on
a replica.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..errors import CkptMirrorError, CorruptObjectError, ReplicaError, ReplicaUnavailableError
from ._s3_errors import nothing_to_abort, worth_retrying
from ._s3_requests import _DEADLINE, S3Requests, _all, _content_length

if TYPE_CHECKING:
    from ._s3_aborts import AbortQueue

MIN_PART_BYTES = 5 << 20  # S3's minimum for every part but the last
MAX_PARTS = 10_000
_PART_CHECKSUMS = ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256")


class S3Multipart(S3Requests):
    """The multipart upload of one object: S3Replica's ``put`` for an object of more than
    ``part_bytes`` (uses the replica's ``part_bytes``, ``_slots`` and ``_aborts``)."""

    part_bytes: int
    _slots: asyncio.Semaphore
    _aborts: AbortQueue

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
        and time is left; else in the background (:meth:`~ckptmirror.replicas._s3_aborts.AbortQueue.later`):
        after a missed deadline, an outage or a cancellation, waiting here would hold the caller
        longer for an endpoint that is not answering.
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
                    self._aborts.left_open(path, upload_id, f"the abort failed: {exc}")
                    return
            except Exception:  # noqa: BLE001 - not translated (a bug, a closed client): the queue retries it
                pass
            except BaseException:
                self._aborts.later(key, path, upload_id)
                raise
        self._aborts.later(key, path, upload_id)
