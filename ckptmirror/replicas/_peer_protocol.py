"""The peer wire protocol, written once: what ``PeerReplica`` (the client, :mod:`.peer`) and
``ckptmirror serve`` (the agent, :mod:`.peer_agent`) must agree on.

HTTP/1.1. When the agent has a token, every request carries ``Authorization: Bearer <token>``.
A namespace may have several segments: ``X-Ckptmirror-Namespace-Depth`` (default 1) says how
many leading segments of the path tail are the namespace; the rest is the key.

==========================================  ====================================================
``GET  /v1/health``                          ``{"version", "free_bytes", "uploads_in_flight",
                                             "reserve_free_bytes", "scrub"}`` (``scrub``: null
                                             when off, else settings, ``passes``,
                                             ``last_pass_end_unix``, ``damaged_count`` and
                                             ``damaged``: the first 100 damaged files)
``GET  /metrics``                            Prometheus text format (``_agent_metrics``)
``GET  /v1/scrub/<ns>``                      the scrubber's latest results for a namespace
                                             (below); 404 when the agent does not scrub
``PUT  /v1/o/<ns>/<key>``                    body streamed to disk; ``X-Ckptmirror-Checksum`` and
                                             ``Content-Length`` required, verified while receiving
``PUT  /v1/commit/<ns>/<key>``               commit record; accepted only if every manifest and
                                             object it names is present and verified; 412 if it exists
``GET  /v1/o/<ns>/<key>`` (``Range``)         object bytes; ``HEAD`` for the size (``X-Ckptmirror-Size``)
``GET  /v1/steps/<ns>``                      step directories (JSON list)
``GET  /v1/list/<ns>/<prefix>``              keys under a prefix (JSON list)
``DELETE /v1/o/<ns>/<key>``, ``/v1/prefix/<ns>/<prefix>``
==========================================  ====================================================

Names: a name with any path segment starting with ``.`` (:data:`HIDDEN_PREFIX`) is the agent's
own (the temp file of an upload in progress is ``.tmp-<uuid>-<name>``): every route refuses it
(400), and listings never show one. Commit records (a segment named ``COMMIT.json``) are written
only through ``PUT /v1/commit/``, which verifies and creates if absent: ``PUT /v1/o/`` refuses
them (400). :func:`refused_name` says why a name is refused.

Tokens: the agent's token (``--token-file``) is valid on every namespace; per-namespace tokens
(``--namespace-token PREFIX=FILE``) only on the namespaces ``PREFIX`` and ``PREFIX/...``. A token
the agent knows, on a namespace it is not valid for, gets 403 :data:`WRONG_NAMESPACE_TEXT`.
The metrics token (``--metrics-token-file``) is read-only: valid on ``GET /metrics`` and
``GET /v1/health`` only. ``/metrics`` takes the admin token too, never a namespace token (it names
every namespace): 403 :data:`WRONG_SCOPE_TEXT`. ``/metrics`` needs a token (401 without) whenever
the agent has any token; ``/v1/health`` shows a namespace token only its namespaces' damage.

Scrub results, ``GET /v1/scrub/<ns>`` (the whole tail is the namespace; the admin token or a
namespace token covering it), for ``ckptmirror verify`` to use instead of reading everything
again when they are fresh::

    {"namespace", "now_unix", "interval_s", "bytes_per_s",
     "checked_unix", "age_s",          # end of the latest complete pass over it (null: none yet)
     "steps": [{"step", "commit_checksum", "checked_unix", "age_s", "status": "ok" | "bad",
                "ranks": [{"rank", "key", "checksum", "objects", "bytes", "verified", "manifest_ok"}],
                "problems": [...]}],
     "problems": [{"step", "key", "kind", "detail", "rank"}]}   # every step's, in step order

A step is listed only while its result is about the bytes stored now: a write or delete in the
step (``ckptmirror repair``, retention) drops it until it is checked again. ``commit_checksum``
is the XXH3 of the commit record that was checked (a step deleted and saved again is another
record). Problem kinds are ``verify``'s: missing, truncated, wrong-size, corrupt, invalid,
unreadable. Ages are computed by the agent, so the client's clock does not matter.

Statuses: 401 missing token, 403 wrong token (or a path that would leave the root), 400 bad
name/header, 404 absent, 408 idle client or an upload slower than the agent's minimum rate,
409 commit names something absent or unverified, 411 no length, 412 commit exists, 413 too
large, 422 checksum/size mismatch, 503 too many uploads, 507 below the free-space reserve.
:data:`AGENT_STATUS` and :func:`error_for_status` are the two directions of the error mapping.
"""

from __future__ import annotations

from urllib.parse import quote

from ..errors import (
    CkptMirrorError,
    CorruptObjectError,
    ManifestError,
    ObjectMissingError,
    ReplicaError,
    ReplicaPermissionError,
    StepExistsError,
)
from ..format import COMMIT_NAME
from .base import step_of_key

#: Environment variable holding the shared token, read by the client and by ``ckptmirror serve``.
TOKEN_ENV = "CKPTMIRROR_PEER_TOKEN"
#: Port of ``peer://host/ns`` URLs without one, and ``ckptmirror serve``'s default.
DEFAULT_PORT = 7070
#: Addresses ``ckptmirror serve`` listens on without a token (anything else needs one).
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
#: ``ckptmirror serve``'s default minimum upload rate (``--min-upload-bytes-per-s``): far below
#: any real link shared by 16 uploads (16 x 64 KiB/s is 1 MiB/s), far above a client that
#: trickles bytes to hold an upload slot.
DEFAULT_MIN_UPLOAD_BYTES_PER_S = 64 << 10
#: The window that rate is measured over (``--upload-rate-window-s``), also each upload's grace period.
DEFAULT_UPLOAD_RATE_WINDOW_S = 10.0
#: ``ckptmirror serve --scrub-bytes-per-s`` default: 32 MiB/s, a few percent of an NVMe drive's
#: read rate (a fifth of one HDD's); 1 TB is scrubbed in about 9 hours.
DEFAULT_SCRUB_BYTES_PER_S = 32 << 20

# -- paths -------------------------------------------------------------------------------------
PREFIX = "/v1"
HEALTH_PATH = f"{PREFIX}/health"
#: Prometheus metrics: where scrapers look by default, outside the versioned API.
METRICS_PATH = "/metrics"
OP_OBJECT = "o"  # PUT, GET, HEAD, DELETE one object
OP_COMMIT = "commit"  # PUT a commit record
OP_STEPS = "steps"  # GET the step directories of a namespace
OP_LIST = "list"  # GET the keys under a prefix
OP_PREFIX = "prefix"  # DELETE everything under a prefix
OP_SCRUB = "scrub"  # GET the scrubber's latest results of a namespace
#: Name of the path tail (``<ns>/<key>``) in the agent's routes.
TAIL = "tail"

# -- headers -----------------------------------------------------------------------------------
AUTHORIZATION = "Authorization"
BEARER = "Bearer "
CHECKSUM_HEADER = "X-Ckptmirror-Checksum"
DEPTH_HEADER = "X-Ckptmirror-Namespace-Depth"
DEFAULT_DEPTH = 1
SIZE_HEADER = "X-Ckptmirror-Size"

# -- the bodies of the agent's authentication answers ---------------------------------------------
MISSING_TOKEN_TEXT = "missing bearer token"  # with 401 and ``WWW-Authenticate: Bearer``
WRONG_TOKEN_TEXT = "wrong token"  # with 403
#: With 403: a per-namespace token used on a namespace outside its prefix. It starts like
#: :data:`WRONG_TOKEN_TEXT` so that clients read it as an authentication rejection too.
WRONG_NAMESPACE_TEXT = "wrong token for this namespace"
#: With 403: a known token on a route it is not valid for (the metrics token on a data route, a
#: namespace token on ``/metrics``). It too starts like :data:`WRONG_TOKEN_TEXT`.
WRONG_SCOPE_TEXT = "wrong token for this route"

# -- names -------------------------------------------------------------------------------------
#: Names (any path segment) starting with this are the agent's own: temp files of uploads.
HIDDEN_PREFIX = "."


def refused_name(name: str, *, commit_record: bool = True) -> str | None:
    """Why the agent refuses ``name`` (a namespace, key or prefix), or None if it does not.

    Any segment starting with :data:`HIDDEN_PREFIX` is refused on every route: such files are
    temp files of uploads in progress, whose partial bytes must never be read, listed, replaced
    or deleted by a client. ``commit_record=False`` (``PUT /v1/o/``) also refuses a segment named
    like a commit record: those are created only through ``PUT /v1/commit/``, which verifies the
    record and never replaces one.
    """
    for seg in name.split("/"):
        if seg.startswith(HIDDEN_PREFIX):
            return f"{seg!r}: names starting with {HIDDEN_PREFIX!r} are the agent's own (uploads in progress)"
        if not commit_record and seg == COMMIT_NAME:
            return (
                f"{seg!r}: commit records are written only through PUT {PREFIX}/{OP_COMMIT}/ (verified, never replaced)"
            )
    return None


def route(op: str) -> str:
    """The agent's aiohttp route pattern for ``op`` (the tail is ``<ns>/<key>``)."""
    return f"{PREFIX}/{op}/{{{TAIL}:.+}}"


def request_path(op: str, namespace: str, key: str = "") -> str:
    """The client's request path for ``op`` on ``namespace`` (and ``key``), percent-quoted."""
    ns = quote(namespace)
    return f"{PREFIX}/{op}/{ns}/{quote(key)}" if key else f"{PREFIX}/{op}/{ns}"


def bearer(token: str) -> str:
    """The ``Authorization`` header value for ``token``."""
    return BEARER + token


def read_token_file(path: str) -> str:
    """The token in the file ``path``, surrounding whitespace (the trailing newline) stripped.

    Raises OSError (absent, unreadable) or UnicodeDecodeError; the callers name their option
    (``token_file=``, ``--token-file``) in the message they make of it.
    """
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


# -- errors, agent side: library error -> status ---------------------------------------------------
#: The status the agent answers a library error with; the first ``isinstance`` match wins, and
#: anything else is a 500. The body is :func:`error_text` of the error.
AGENT_STATUS: tuple[tuple[type[CkptMirrorError], int], ...] = (
    (ManifestError, 400),
    (ObjectMissingError, 404),
    (StepExistsError, 412),
    (CorruptObjectError, 422),
    (ReplicaPermissionError, 403),
)


def status_for(exc: BaseException) -> int:
    """The HTTP status the agent answers ``exc`` with (see :data:`AGENT_STATUS`)."""
    for cls, status in AGENT_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_text(exc: BaseException) -> str:
    """The response body for a library error: its class name, then its message."""
    return f"{type(exc).__name__}: {exc}"


# -- errors, client side: status -> library error ---------------------------------------------------
def is_auth_rejection(status: int, text: str) -> bool:
    """Whether an answer means the token was missing or wrong (not a path the agent refused).

    A 403 for a path that would leave the root carries :func:`error_text` of a
    ReplicaPermissionError; a 403 from authentication carries :data:`WRONG_TOKEN_TEXT`, and a
    HEAD answer has no body at all (so it counts as authentication: that is by far the likelier).
    """
    if status == 401:
        return True
    return status == 403 and not text.startswith(f"{ReplicaPermissionError.__name__}:")


def error_for_status(status: int, text: str, *, replica: str, key: str, denied: str = "") -> CkptMirrorError:
    """The error the client raises for an answer with ``status`` and body ``text``.

    ``denied`` is the message for an authentication rejection (the client knows where its token
    came from). A 400 stays a plain ReplicaError, not a ManifestError: the client validated the
    names before sending, so a 400 means the agent and client disagree (versions), a replica
    failure, and must fail that replica rather than the save's caller.
    """
    if status in (401, 403):
        if is_auth_rejection(status, text):
            return ReplicaPermissionError(denied or f"agent refused the token (HTTP {status}: {text})", replica=replica)
        return ReplicaPermissionError(f"agent refused the path (HTTP {status}: {text})", replica=replica, key=key)
    if status == 404:
        return ObjectMissingError("not found", replica=replica, key=key)
    if status == 412:
        return StepExistsError(step_of_key(key), replica)
    if status == 422:
        return CorruptObjectError(f"agent rejected the body: {text}", replica=replica, key=key)
    return ReplicaError(f"agent answered HTTP {status}: {text}", replica=replica, key=key)
