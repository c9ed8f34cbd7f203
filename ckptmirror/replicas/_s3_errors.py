"""S3 error translation: every botocore/aiohttp failure mapped to one of ckptmirror's errors.

:func:`classify` says, for a failure of one S3 request, which :mod:`ckptmirror.errors` class
reports it, whether it is worth retrying (throttling, 5xx, network errors), what it means in
words and, where the operator has something to fix, how; :class:`~ckptmirror.replicas.s3.S3Replica`
runs the one retry loop on top of it (botocore's own retries are off) and builds the message
with :func:`explain`. Anything this table does not know (a bug) is not translated and
propagates as it is.

Three kinds of failure matter to a caller that has just started a run:

* **Misconfiguration** (:class:`~ckptmirror.errors.ReplicaConfigError`; for credentials
  :class:`~ckptmirror.errors.ReplicaPermissionError`): no such bucket, access denied, unknown
  key id, wrong secret, no credentials at all. Never retried, and ``Mirror()`` raises it at
  construction, because waiting does not fix it. (A bucket that vanishes after this client
  has used it is an outage instead: :data:`BUCKET_GONE`.)
* **Outage** (:class:`~ckptmirror.errors.ReplicaUnavailableError`): nothing answers at the
  endpoint (connection refused, DNS, timeout), or not within the operation's time budget.
  Retried within that budget; a ``Mirror`` starts with the replica
  degraded and brings it back when it answers. The message names the endpoint that was tried,
  since a wrong ``AWS_ENDPOINT_URL`` looks exactly like a server that is down.
* Everything else (:class:`~ckptmirror.errors.ReplicaError`): throttling, 5xx, a connection
  lost mid-request; retried where that can help.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ..errors import (
    ObjectMissingError,
    ReplicaError,
    ReplicaMissingError,
    ReplicaPermissionError,
    ReplicaUnavailableError,
    _ObjectError,
)

# Only S3Replica catches these two, but they may reach the user, whose error texts name the
# class (``f"{type(exc).__name__}: {exc}"``): hence the names they have always had.


class _PreconditionFailed(ReplicaError):
    """412: the object exists (``If-None-Match``) or changed (``If-Match``)."""


class _NotSupported(ReplicaError):
    """501: the server does not implement a feature we asked for."""


class Verdict(NamedTuple):
    """What one failed request means.

    ``meaning`` and ``fix`` are :meth:`str.format` templates: ``{bucket}``, ``{endpoint}`` (the
    URL the client sent the request to) and ``{endpoint_flag}`` (`` --endpoint-url URL`` for an
    S3-compatible server, empty for AWS), filled in by :func:`explain`.
    """

    error: type[_ObjectError]  # every class takes ``replica=`` and ``key=``
    retry: bool
    meaning: str
    fix: str = ""


# Where the client's settings come from, in the order botocore/s3fs look (named in the fixes,
# because the operator has to find out which one is wrong).
_CREDENTIALS_FIX = (
    "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, "
    "or key/secret/profile in storage_options['s3']) and the bucket policy of {bucket!r}"
)
_ENDPOINT_FIX = (
    "check that the S3 server is up and that this is its URL (set by endpoint_url in storage_options['s3'], "
    "else the AWS_ENDPOINT_URL environment variable, else AWS's default for the region)"
)

_PERMISSION = Verdict(ReplicaPermissionError, False, "permission denied", _CREDENTIALS_FIX)
_MISSING = Verdict(ObjectMissingError, False, "not found")
_THROTTLED = Verdict(ReplicaError, True, "throttled by the server")
_TRANSIENT = Verdict(ReplicaError, True, "transient server error")
_UNREACHABLE = Verdict(ReplicaUnavailableError, True, "cannot reach the endpoint {endpoint}", _ENDPOINT_FIX)
_TIMED_OUT = Verdict(
    ReplicaUnavailableError,
    True,
    "no answer from the endpoint {endpoint}: timed out",
    _ENDPOINT_FIX + "; if the link is just slow, raise connect_timeout_s or lower min_bytes_per_s",
)
#: Public names for S3Replica's deadline handling: an attempt cut by its own time limit is a
#: timeout like botocore's, and a missed budget names the endpoint the same way; throttling is
#: retried while the budget lasts, not a fixed number of times.
TIMED_OUT = _TIMED_OUT
ENDPOINT_FIX = _ENDPOINT_FIX
THROTTLED = _THROTTLED

#: A bucket this client has used before and that is gone now (deleted, or a test server
#: restarted without its data): an outage that recreating the bucket ends, not a mistake in the
#: URL, so the replica is degraded and probed, and a restore goes on with the other replicas.
BUCKET_GONE = Verdict(
    ReplicaUnavailableError,
    False,
    "bucket {bucket!r} does not exist on {endpoint} any more (it did earlier in this process)",
    "recreate it (e.g. `aws s3 mb s3://{bucket}{endpoint_flag}`); the replica is used again once it answers",
)

#: S3 error code, or HTTP status where the body carries no code -> verdict.
ERRORS: dict[str, Verdict] = {
    "NoSuchBucket": Verdict(  # never seen: a typo in the URL, a bucket nobody created, or one lost
        ReplicaMissingError,
        False,
        "bucket {bucket!r} does not exist on {endpoint}",
        "create it (e.g. `aws s3 mb s3://{bucket}{endpoint_flag}`) or fix the replica URL",
    ),
    "NoSuchKey": _MISSING,
    "NotFound": _MISSING,
    "404": _MISSING,  # HEAD answers a bare 404, for a missing key and a missing bucket alike
    "NoSuchUpload": Verdict(ReplicaError, False, "the multipart upload no longer exists"),
    "AccessDenied": _PERMISSION,
    "AllAccessDisabled": _PERMISSION,
    "AccountProblem": _PERMISSION,
    "InvalidSecurity": _PERMISSION,
    "InvalidAccessKeyId": _PERMISSION._replace(meaning="permission denied: the server does not know the access key id"),
    "SignatureDoesNotMatch": _PERMISSION._replace(
        meaning="permission denied: the request signature does not match (wrong secret key?)"
    ),
    "ExpiredToken": _PERMISSION._replace(meaning="permission denied: the session token has expired"),
    "InvalidToken": _PERMISSION._replace(meaning="permission denied: the session token is not valid"),
    "403": _PERMISSION,  # HEAD: a bare 403, whatever the reason
    # HEAD: a bare 400 (no body, so no code) is what S3 answers to an expired or malformed
    # session token, or to a request signed for another region than the bucket's.
    "400": _PERMISSION._replace(
        meaning="bad request (a bare 400, as S3 answers a HEAD with an expired or invalid session "
        "token, or one signed for another region than the bucket's)",
        fix=_CREDENTIALS_FIX + ", and the region (region= in storage_options['s3'] or AWS_DEFAULT_REGION)",
    ),
    "PreconditionFailed": Verdict(_PreconditionFailed, False, "precondition failed"),
    "412": Verdict(_PreconditionFailed, False, "precondition failed"),
    "NotImplemented": Verdict(_NotSupported, False, "not implemented by the server"),
    "501": Verdict(_NotSupported, False, "not implemented by the server"),
    "SlowDown": _THROTTLED,
    "Throttling": _THROTTLED,
    "ThrottlingException": _THROTTLED,
    "RequestLimitExceeded": _THROTTLED,
    "TooManyRequests": _THROTTLED,
    "RequestThrottled": _THROTTLED,
    "429": _THROTTLED,
    "503": _THROTTLED,
    "ServiceUnavailable": _THROTTLED,
    "InternalError": _TRANSIENT,
    "RequestTimeout": _TRANSIENT,
    "ConditionalRequestConflict": _TRANSIENT,  # two conditional writes in flight: AWS says retry
    "500": _TRANSIENT,
    "502": _TRANSIENT,
    "504": _TRANSIENT,
}


def classify(exc: BaseException, *, bucket_seen: bool = False) -> Verdict | None:
    """The verdict on a backend failure; None for anything else (a bug: let it raise).

    ``bucket_seen``: whether a request to this bucket has succeeded before, which turns a
    missing bucket from a misconfiguration into an outage (:data:`BUCKET_GONE`).
    """
    if isinstance(exc, ClientError):
        if bucket_seen and error_code(exc) == "NoSuchBucket":
            return BUCKET_GONE
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        # By code; by status where the body had none. Not "400" by status: a 400 with a code of
        # its own (InvalidArgument, BadDigest, ...) is not the bare one of a HEAD (see ERRORS).
        found = ERRORS.get(str(error_code(exc))) or (ERRORS.get(str(status)) if status != 400 else None)
        if found is None:
            found = Verdict(ReplicaError, isinstance(status, int) and status >= 500, "request failed")
        return found
    # Order matters: ReadTimeoutError is an HTTPClientError, ConnectTimeoutError a BotoConnectionError.
    if isinstance(exc, (BotoConnectionError, ConnectionRefusedError)):  # refused, DNS, connect timeout, proxy
        return _UNREACHABLE
    if isinstance(exc, (ReadTimeoutError, asyncio.TimeoutError, TimeoutError)):  # connected, no answer
        return _TIMED_OUT
    if isinstance(
        exc, (HTTPClientError, IncompleteReadError, aiohttp.ClientError, ConnectionError)
    ):  # reset, short body: the server was there a moment ago
        # An outage, not damage: verify lists the replica as unavailable (an intact object read
        # over a link that dropped is not "unreadable"), repair does not copy over it.
        return Verdict(ReplicaUnavailableError, True, "connection failed during the request")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return Verdict(
            ReplicaPermissionError,
            False,
            "no usable AWS credentials",
            "set them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or key/secret/profile in "
            "storage_options['s3']), or pass anon=True in storage_options['s3'] for a public bucket",
        )
    if isinstance(exc, BotoCoreError):
        return Verdict(ReplicaError, False, "request failed")
    return None


def explain(text: str, *, bucket: str, endpoint: str) -> str:
    """Fill in a :class:`Verdict` template for one replica and the endpoint its client used."""
    flag = "" if "amazonaws.com" in endpoint else f" --endpoint-url {endpoint}"
    return text.format(bucket=bucket, endpoint=endpoint, endpoint_flag=flag)


def error_code(exc: BaseException | None) -> str | None:
    """The S3 error code of a botocore ``ClientError`` (None for anything else)."""
    return str(exc.response.get("Error", {}).get("Code")) if isinstance(exc, ClientError) else None


def nothing_to_abort(exc: BaseException) -> bool:
    """Whether a failed AbortMultipartUpload means there is no upload left to abort: it was
    completed or aborted meanwhile (``NoSuchUpload``), or its bucket is gone with it."""
    return error_code(exc.__cause__) in ("NoSuchUpload", "NoSuchBucket")


def worth_retrying(exc: BaseException) -> bool:
    """Whether a request that failed with ``exc`` (an error :func:`classify` chose) may succeed
    later: an outage or a transient error, not a refusal such as permission denied."""
    if isinstance(exc, ReplicaUnavailableError):
        return True
    verdict = classify(exc.__cause__) if exc.__cause__ is not None else None
    return verdict is not None and verdict.retry


def abandoned_upload_fix(*, bucket: str, endpoint: str, key: str, upload_id: str) -> str:
    """What an operator does about a multipart upload that could not be aborted: its parts
    stay stored (and billed, on AWS) until someone aborts it."""
    flag = f" --endpoint-url {endpoint}" if endpoint.startswith("http") and "amazonaws.com" not in endpoint else ""
    return (
        "retention or `ckptmirror prune` aborts it when its step is removed; a lifecycle rule on the bucket "
        "with AbortIncompleteMultipartUpload (e.g. DaysAfterInitiation: 1) removes every upload left like this; "
        f"`aws s3api abort-multipart-upload --bucket {bucket} --key {key} --upload-id {upload_id}{flag}` "
        "removes this one now"
    )


def detail(exc: BaseException) -> str:
    """A failure in a few words for a message: S3 code and message, or exception type and text."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{err.get('Code', status)}: {err.get('Message') or 'HTTP ' + str(status)}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
