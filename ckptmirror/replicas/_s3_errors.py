"""S3 error translation: every botocore/aiohttp failure mapped to one of ckptmirror's errors.

:func:`classify` says, for a failure of one S3 request, which :mod:`ckptmirror.errors` class
reports it, whether it is worth retrying (throttling, 5xx, network errors) and what it means
in words; :class:`~ckptmirror.replicas.s3.S3Replica` runs the one retry loop on top of it
(botocore's own retries are off). Anything this table does not know (a bug) is not
translated and propagates as it is.
"""

from __future__ import annotations

import asyncio

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ..errors import ObjectMissingError, ReplicaError, ReplicaUnavailableError, _ObjectError

# Only S3Replica catches these two, but they may reach the user, whose error texts name the
# class (``f"{type(exc).__name__}: {exc}"``): hence the names they have always had.


class _PreconditionFailed(ReplicaError):
    """412: the object exists (``If-None-Match``) or changed (``If-Match``)."""


class _NotSupported(ReplicaError):
    """501: the server does not implement a feature we asked for."""


_PERMISSION = (ReplicaError, False, "permission denied (PermissionError)")
_MISSING = (ObjectMissingError, False, "not found")
_THROTTLED = (ReplicaError, True, "throttled by the server")
_TRANSIENT = (ReplicaError, True, "transient server error")

#: S3 error code, or HTTP status where the body carries no code -> (error, retry?, meaning).
#: Every error class takes ``replica=`` and ``key=`` (the :class:`~ckptmirror.errors._ObjectError` family).
ERRORS: dict[str, tuple[type[_ObjectError], bool, str]] = {
    "NoSuchBucket": (ReplicaUnavailableError, False, "bucket {bucket!r} does not exist"),
    "NoSuchKey": _MISSING,
    "NotFound": _MISSING,
    "404": _MISSING,
    "NoSuchUpload": (ReplicaError, False, "the multipart upload no longer exists"),
    "AccessDenied": _PERMISSION,
    "AllAccessDisabled": _PERMISSION,
    "InvalidAccessKeyId": _PERMISSION,
    "SignatureDoesNotMatch": _PERMISSION,
    "ExpiredToken": _PERMISSION,
    "403": _PERMISSION,
    "PreconditionFailed": (_PreconditionFailed, False, "precondition failed"),
    "412": (_PreconditionFailed, False, "precondition failed"),
    "NotImplemented": (_NotSupported, False, "not implemented by the server"),
    "501": (_NotSupported, False, "not implemented by the server"),
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


def classify(exc: BaseException) -> tuple[type[_ObjectError], bool, str] | None:
    """(error class, retry?, meaning) for a backend failure; None for anything else (a bug: let it raise)."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        found = ERRORS.get(str(error_code(exc))) or ERRORS.get(str(status))
        if found is None:
            found = (ReplicaError, isinstance(status, int) and status >= 500, "request failed")
        return found
    if isinstance(exc, (BotoConnectionError, ConnectionRefusedError)):  # refused, DNS, connect timeout, proxy
        return (ReplicaUnavailableError, True, "cannot reach the endpoint")
    if isinstance(
        exc, (HTTPClientError, IncompleteReadError, aiohttp.ClientError, ConnectionError)
    ):  # reset, read timeout, short body
        return (ReplicaError, True, "connection failed during the request")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return (ReplicaError, True, "timed out")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return (
            ReplicaError,
            False,
            "no usable AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or pass key=, secret=)",
        )
    if isinstance(exc, BotoCoreError):
        return (ReplicaError, False, "request failed")
    return None


def error_code(exc: BaseException | None) -> str | None:
    """The S3 error code of a botocore ``ClientError`` (None for anything else)."""
    return str(exc.response.get("Error", {}).get("Code")) if isinstance(exc, ClientError) else None


def detail(exc: BaseException) -> str:
    """A failure in a few words for a message: S3 code and message, or exception type and text."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{err.get('Code', status)}: {err.get('Message') or 'HTTP ' + str(status)}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
