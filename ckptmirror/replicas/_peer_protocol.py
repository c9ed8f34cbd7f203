"""The peer wire protocol, written once: what ``PeerReplica`` (the client, :mod:`.peer`) and
``ckptmirror serve`` (the agent, :mod:`.peer_agent`) must agree on.

HTTP/1.1. When the agent has a token, every request carries ``Authorization: Bearer <token>``.
A namespace may have several segments: ``X-Ckptmirror-Namespace-Depth`` (default 1) says how
many leading segments of the path tail are the namespace; the rest is the key.

==========================================  ====================================================
``GET  /v1/health``                          ``{"version", "free_bytes", "uploads_in_flight",
                                             "reserve_free_bytes", "uploads_reserved_bytes",
                                             "write_error", "scrub"}`` (``uploads_reserved_bytes``:
                                             bytes the uploads in flight were admitted with and
                                             have not written yet; absent from older agents: read
                                             it as 0. ``write_error``: null, or the errno's name
                                             when the agent may not create files in its root;
                                             absent: null. ``scrub``: null when off, else settings,
                                             ``passes``, ``last_pass_end_unix``,
                                             ``damaged_count`` and ``damaged``: the first 100
                                             damaged files)
``GET  /metrics``                            Prometheus text format (``_agent_metrics``)
``GET  /v1/scrub/<ns>``                      the scrubber's latest results for a namespace
                                             (below); 404 when the agent does not scrub
``PUT  /v1/o/<ns>/<key>``                    body streamed to disk; ``X-Ckptmirror-Checksum`` and
                                             ``Content-Length`` required, verified while receiving
``PUT  /v1/commit/<ns>/<key>``               commit record; accepted only if what it must hold
                                             here (below) is present and verified; 412 if it exists
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

Commits, ``PUT /v1/commit/``: without :data:`WRITERS_HEADER` every rank manifest the record
names, and every object they name, must be present and verify (a client that sends no header,
an older one included, gets exactly the rule agents always applied). With it, the client names
the writers ``<rank>-<token>`` (``,``-separated; :data:`NO_WRITERS` for none) whose files it put
into this namespace for the step, and the namespace may hold only part of the step, as a
node-local disk does (``ring_peer``: each node's namespace holds that node's ranks):

- per-rank record: the manifests of the named writers are required (at least one of them must
  be named by the record); another rank's manifest may be absent, and if present it must
  verify with every object it names;
- replicated record (``"replicated": true``, one manifest written by every rank): the manifest
  is required, and every object of the named writers; another writer's objects may be absent
  all together, but if any of them is here, all of them must be and verify.

Either way every file that is here and named must verify, and a record of which nothing is here
is refused (409). An agent that accepts a record naming more than the namespace holds keeps
what it held (manifests, object writers) next to it, in the hidden file
``step-S/.held-<checksum of the record>.json``: the scrubber then requires exactly that, and
reports ranks the namespace never held as ``not_held``, not as damage. An older agent ignores
the header and keeps the strict rule (it refuses such a commit with 409, as before).

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
                "ranks": [{"rank", "key", "checksum", "objects", "bytes", "verified", "manifest_ok",
                           "not_held"}],
                "not_held_ranks": [rank, ...],
                "problems": [...]}],
     "problems": [{"step", "key", "kind", "detail", "rank"}]}   # every step's, in step order

``not_held_ranks``: ranks whose manifest this namespace does not hold (it holds a node's share of
the step, see Commits above); they are not checked and not damage. A rank's ``objects`` and
``bytes`` count the objects checked here; ``not_held`` the objects of its manifest this namespace
does not hold (other ranks' share of a replicated step), so ``objects`` is then less than the
manifest lists and ``verify`` reads that rank's objects itself instead of taking these results.
A step is listed only while its result is about the bytes stored now: a write or delete in the
step (``ckptmirror repair``, retention) drops it until it is checked again. ``commit_checksum``
is the XXH3 of the commit record that was checked (a step deleted and saved again is another
record). Problem kinds are ``verify``'s: missing, truncated, wrong-size, corrupt, invalid,
unreadable. Ages are computed by the agent, so the client's clock does not matter.

Statuses: 401 missing token, 403 wrong token (or a path that would leave the root), 400 bad
name/header, 404 absent, 408 idle client or an upload slower than the agent's minimum rate,
409 commit names something absent or unverified, 411 no length, 412 commit exists, 413 too
large, 422 checksum/size mismatch, 503 too many uploads, 507 out of space: the upload would
leave less than the free-space reserve (``free_bytes - uploads_reserved_bytes - length <
reserve_free_bytes``), or the disk really ran out (``ENOSPC``, ``EDQUOT``) while it was written;
other failures of the agent's disk are 500 with the errno's name (``[EIO]``) in the body.
:data:`AGENT_STATUS` and :func:`error_for_status` are the two directions of the error mapping;
the client reads a 507 as a ReplicaError with ``errno == ENOSPC`` (the health check keeps the
peer degraded until :meth:`~.peer.PeerReplica.probe_write` finds room again).
"""

from __future__ import annotations

import errno
import re
import threading
from collections.abc import Iterable
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
from ..format import COMMIT_NAME, parse_commit, parse_step_dir, writer_of
from .base import SPACE_ERRNOS, WRITE_ERRNOS, step_of_key

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

# -- the health document ---------------------------------------------------------------------
#: ``GET /v1/health`` field: bytes the uploads in flight were admitted with and have not written
#: yet (the agent counts them as taken when it admits the next one). Older agents do not send it.
RESERVED_BYTES_FIELD = "uploads_reserved_bytes"
#: ``GET /v1/health`` field: null while the agent may create files in its root, else the errno's
#: name (``"EROFS"`` after a read-only remount, ``"EACCES"``). Older agents do not send it.
WRITE_ERROR_FIELD = "write_error"

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
#: ``PUT /v1/commit/``: the writers ``<rank>-<token>`` whose files the client put into the namespace
#: for the step (see Commits in the module docstring); absent: every file the record names must be here.
WRITERS_HEADER = "X-Ckptmirror-Commit-Writers"
#: The :data:`WRITERS_HEADER` value of a client that put no object of its own (a replicated step's
#: rank that owns no object wrote only the manifest).
NO_WRITERS = "none"
#: A longer :data:`WRITERS_HEADER` value is not sent (aiohttp refuses header lines over 8 KiB): the
#: client then sends none, and the commit needs every file it names (what a full copy has).
MAX_WRITERS_HEADER_BYTES = 4096
_WRITER_ITEM_RE = re.compile(r"([0-9]{1,9})-([0-9a-f]{8})\Z")

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


#: The status of a library error whose ``errno`` says the disk is full (after :data:`AGENT_STATUS`).
OUT_OF_SPACE_STATUS = 507


def status_for(exc: BaseException) -> int:
    """The HTTP status the agent answers ``exc`` with (see :data:`AGENT_STATUS`); a disk that ran
    out of space (``ENOSPC``, ``EDQUOT``) is 507, as the free-space reserve is."""
    for cls, status in AGENT_STATUS:
        if isinstance(exc, cls):
            return status
    if isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS:
        return OUT_OF_SPACE_STATUS
    return 500


def errno_name(exc: BaseException) -> str | None:
    """``"ENOSPC"`` for an OSError that carries that errno; None without one."""
    num = exc.errno if isinstance(exc, OSError) else None
    return errno.errorcode.get(num, str(num)) if num else None


def error_text(exc: BaseException) -> str:
    """The response body for a library error: its class name, then its message, which names the
    errno where there is one (a client cannot tell a full disk from a broken one by ``strerror``
    alone in another locale, and an operator greps for ``ENOSPC``)."""
    text = f"{type(exc).__name__}: {exc}"
    name = errno_name(exc)
    return text if name is None or name in text else f"{text} [{name}]"


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
    failure, and must fail that replica rather than the save's caller. A 507 is a ReplicaError
    with ``errno == ENOSPC`` (below the reserve or really full: no room for this save either way).
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
    if status == OUT_OF_SPACE_STATUS:
        # The health check keeps a replica that failed with ENOSPC degraded until probe_write
        # finds room: a peer that only answers pings would be tried, and fail, every save.
        return ReplicaError(
            f"agent answered HTTP {status} (out of space): {text}", replica=replica, key=key, errno=errno.ENOSPC
        )
    return ReplicaError(f"agent answered HTTP {status}: {text}", replica=replica, key=key, errno=_write_errno(text))


def _write_errno(text: str) -> int | None:
    """The errno an agent's error text names (``[EROFS]``, see :func:`error_text`) where it is one
    that refuses every write (:data:`~ckptmirror.replicas.base.WRITE_ERRNOS`): the health check
    then keeps the peer degraded until a write probe passes. Other errnos are not taken from a
    text, which only they could misread."""
    for name in _ERRNO_IN_TEXT.findall(text):
        num = write_errno_named(name)
        if num is not None:
            return num
    return None


def write_errno_named(name: str) -> int | None:
    """The errno called ``name`` (``"EROFS"``) if it is one of :data:`WRITE_ERRNOS`, else None:
    a name the agent sent is checked, never looked up blindly in :mod:`errno`."""
    num = getattr(errno, name, None) if name.startswith("E") else None
    return num if isinstance(num, int) and num in WRITE_ERRNOS else None


_ERRNO_IN_TEXT = re.compile(r"\[(E[A-Z0-9]+)\]")


# -- commits: which writers' files the client put ---------------------------------------------------
def format_writers(writers: Iterable[tuple[int, str]]) -> str:
    """The :data:`WRITERS_HEADER` value naming ``writers`` ((rank, token) pairs)."""
    items = sorted(set(writers))
    return ",".join(f"{rank}-{token}" for rank, token in items) if items else NO_WRITERS


def parse_writers(value: str) -> frozenset[tuple[int, str]]:
    """The writers a :data:`WRITERS_HEADER` value names; ValueError (the agent answers 400) if malformed."""
    value = value.strip()
    if len(value) > MAX_WRITERS_HEADER_BYTES:
        raise ValueError(f"{WRITERS_HEADER} is longer than {MAX_WRITERS_HEADER_BYTES} bytes")
    if value == NO_WRITERS:
        return frozenset()
    out = set()
    for item in value.split(","):
        m = _WRITER_ITEM_RE.match(item.strip())
        if m is None:
            raise ValueError(f"{WRITERS_HEADER}: {item.strip()[:40]!r} is not <rank>-<8 hex digit token>")
        out.add((int(m.group(1)), m.group(2)))
    return frozenset(out)


def _is_manifest_key(key: str) -> bool:
    """Whether ``key`` (a name :func:`writer_of` knows) is a rank manifest (``step-S/rank-R-T.json``)."""
    return key.count("/") == 1 and key.endswith(".json") and not key.endswith(".place.json")


class WriteLog:
    """The client's record of what it put into its namespace, per step, for the
    :data:`WRITERS_HEADER` of its commit (:meth:`header`).

    Per step: the rank manifests put, and the writers ``(rank, token)`` of the other files put
    (objects, compressed objects, placement records). Thread-safe (puts come from I/O threads);
    at most :attr:`MAX_STEPS` steps are remembered (the oldest are forgotten: their commits, if
    any still come, need every file they name).
    """

    MAX_STEPS = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: dict[int, tuple[set[str], set[tuple[int, str]]]] = {}

    def wrote(self, key: str) -> None:
        """``key`` was put (durably: the agent acknowledged it)."""
        w = writer_of(key)
        step = parse_step_dir(key.split("/", 1)[0])
        if w is None or step is None:
            return
        with self._lock:
            entry = self._steps.get(step)
            if entry is None:
                if len(self._steps) >= self.MAX_STEPS:
                    del self._steps[min(self._steps)]
                entry = self._steps[step] = (set(), set())
            if _is_manifest_key(key):
                entry[0].add(key)
            else:
                entry[1].add(w)

    def forget(self, key: str) -> None:
        """``key`` (or the prefix: a step directory) was deleted: a manifest deleted is no longer
        claimed, a step directory deleted is forgotten."""
        head = key.rstrip("/")
        step = parse_step_dir(head.split("/", 1)[0])
        if step is None:
            return
        with self._lock:
            if "/" not in head:
                self._steps.pop(step, None)
            elif step in self._steps:
                self._steps[step][0].discard(head)

    def header(self, key: str, body: bytes) -> str | None:
        """The :data:`WRITERS_HEADER` value for committing ``body`` as ``key``, or None to send none.

        None (every file the record names must then be here) when this client put none of the
        record's manifests (a commit retried by another process, a record it did not write), when
        it put every one of them (a full copy: the header would change nothing), or when the value
        would exceed :data:`MAX_WRITERS_HEADER_BYTES`. A record that does not parse gets none: the
        agent refuses it anyway.
        """
        try:
            commit = parse_commit(body, key)
        except CkptMirrorError:
            return None
        with self._lock:
            entry = self._steps.get(commit.step)
            if entry is None:
                return None
            manifests, writers = set(entry[0]), set(entry[1])
        if commit.replicated:
            # One manifest, written by every rank; each rank's objects are its own.
            if not commit.ranks or commit.ranks[0].key not in manifests:
                return None
            claimed = writers
        else:
            pinned = [writer_of(ref.key) for ref in commit.ranks if ref.key in manifests]
            claimed = {w for w in pinned if w is not None}
            if not claimed or len(claimed) == len(commit.ranks):
                return None
        value = format_writers(claimed)
        return value if len(value) <= MAX_WRITERS_HEADER_BYTES else None
