"""``ckptmirror serve``: the peer agent that keeps replicas for other nodes.

An aiohttp server over a root directory (a disk, or a tmpfs for a RAM tier). Each peer URL
``peer://host:port/<namespace>`` maps to ``<root>/<namespace>``; inside it, the layout is the
same as a local replica, written by the same :class:`~ckptmirror.replicas.local.LocalReplica`
code (temp file, fsync, rename, directory fsync).

The protocol (paths, headers, statuses) is written once, in
:mod:`ckptmirror.replicas._peer_protocol`, shared with the client
(:class:`~ckptmirror.replicas.peer.PeerReplica`). Here: one handler per route, the middleware
that checks the token and turns library errors into statuses, and :func:`serve`.
Every path is derived here from validated names; symlinks are never followed out of the root.

What a client can reach, and for how long:

- names starting with ``.`` (temp files of uploads in progress) are refused on every route and
  never listed; commit records are created only through the verified, create-if-absent
  ``/v1/commit/`` route, never through ``PUT /v1/o/``;
- an upload is admitted only if the free space, less what the uploads already in flight still
  have to write (:class:`SpaceLedger`), leaves ``reserve_free_bytes`` after it; a disk that runs
  out anyway (another writer filled it, a quota) answers 507 too, its temp file removed;
- an upload must deliver ``min_upload_bytes_per_s`` over every ``upload_rate_window_s`` of
  waiting for it (the first window is its grace period), else it is cut, its temp file removed
  and its slot freed: a trickle of bytes would otherwise hold a slot forever, since the idle
  timeout only bounds the wait for one read;
- per-namespace tokens (``namespace_tokens``) confine a token to a namespace prefix; the agent's
  own token stays valid everywhere (the admin token); the metrics token (``metrics_token``) is
  valid only on ``GET /metrics`` and ``GET /v1/health``, which name no data.

``GET /metrics`` (:mod:`._agent_metrics`) and the scrubber (:mod:`._scrub`, ``--scrub-interval``)
live in modules of their own; the handlers here only count what happens.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import math
import os
import shutil
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

from aiohttp import web

from .._version import __version__
from ..checksum import Hasher, checksum, is_checksum
from ..errors import CkptMirrorError, ManifestError, StepExistsError
from ..format import COMMIT_NAME, MAX_MANIFEST_BYTES, TMP_PREFIX, parse_step_dir
from . import _peer_protocol as wire
from ._agent_metrics import CONTENT_TYPE, AgentMetrics
from ._peer_protocol import (
    CHECKSUM_HEADER,
    DEFAULT_MIN_UPLOAD_BYTES_PER_S,
    DEFAULT_UPLOAD_RATE_WINDOW_S,
    LOOPBACK_HOSTS,
)
from ._scrub import (
    DEFAULT_SCRUB_BYTES_PER_S,
    MAX_COMMIT_BYTES,
    Held,
    Scrubber,
    check_commit,
    drop_held,
    held_key,
)
from .base import SPACE_ERRNOS, validate_key
from .local import AtomicWriter, LocalReplica

__all__ = [
    "Agent",
    "AgentConfigError",
    "NamespaceToken",
    "Promise",
    "SpaceLedger",
    "UploadPace",
    "parse_namespace_tokens",
    "build_app",
    "serve",
]

log = logging.getLogger("ckptmirror.agent")

CHUNK_BYTES = 4 << 20


class AgentConfigError(ValueError):
    """The agent cannot start with these options (a usage error: ``ckptmirror serve`` exits 2).

    The message names the command-line option to fix.
    """


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        return json.dumps(doc)


def _event(level: int, msg: str, **fields: Any) -> None:
    log.log(level, msg, extra={"fields": fields})


@dataclass(frozen=True)
class NamespaceToken:
    """A token valid only on the namespace ``prefix`` and the namespaces under it."""

    prefix: tuple[str, ...]  # the prefix's segments: "jobs/a" covers "jobs/a" and "jobs/a/x", not "jobs/ab"
    token: bytes

    def covers(self, namespace: str) -> bool:
        """Whether ``namespace`` is ``prefix`` or under it (compared segment by segment)."""
        return tuple(namespace.split("/")[: len(self.prefix)]) == self.prefix


def parse_namespace_tokens(tokens: Mapping[str, str] | None) -> tuple[NamespaceToken, ...]:
    """Validated :class:`NamespaceToken` objects from ``{prefix: token}``; AgentConfigError if not valid."""
    out = []
    for prefix, token in (tokens or {}).items():
        clean = prefix.strip("/")
        try:
            validate_key(clean, "--namespace-token")
        except ManifestError:
            raise AgentConfigError(
                f"--namespace-token {prefix!r}: not a namespace prefix (segments of letters, digits, '.', '_', '-')"
            ) from None
        why = wire.refused_name(clean)
        if why:
            raise AgentConfigError(f"--namespace-token {prefix!r}: {why}")
        if not token or not token.strip():
            raise AgentConfigError(f"--namespace-token {prefix!r}: the token is empty")
        out.append(NamespaceToken(tuple(clean.split("/")), token.strip().encode()))
    return tuple(out)


class UploadPace:
    """The minimum-rate rule of one upload: at least ``min_bytes_per_s`` x ``window_s`` bytes (or
    the rest of the body, if less) in every window of ``window_s`` seconds spent waiting for the
    client. The first window is the grace period: nothing is judged before it ends.

    Only time spent waiting for the client counts, not time the agent spends writing to disk:
    a slow disk must not get its clients cut. ``min_bytes_per_s == 0`` disables the rule.
    """

    def __init__(self, min_bytes_per_s: int, window_s: float, length: int) -> None:
        self.min_bytes_per_s = min_bytes_per_s
        self.window_s = window_s
        self.need = math.inf if min_bytes_per_s <= 0 else min_bytes_per_s * window_s
        self.waited = 0.0  # seconds spent waiting for the client in this window
        self.got = 0  # bytes received in this window
        self.left = length  # bytes still to come when this window started

    def time_left(self) -> float:
        """Seconds of waiting left in this window (inf when the rule is off)."""
        return math.inf if self.min_bytes_per_s <= 0 else max(0.0, self.window_s - self.waited)

    def record(self, waited: float, nbytes: int) -> bool:
        """Account one wait of ``waited`` seconds that brought ``nbytes``; False if the window
        just ended short of the minimum (cut the upload). A window that ends on time starts the next."""
        self.waited += waited
        self.got += nbytes
        if self.min_bytes_per_s <= 0 or self.waited < self.window_s:
            return True
        if self.got < min(self.need, self.left):
            return False
        self.left -= self.got
        self.waited, self.got = 0.0, 0
        return True


class SpaceLedger:
    """Bytes the uploads in flight were admitted with and have not written yet.

    The free space the disk reports already leaves out what an upload has written, so each
    upload's promise shrinks as its bytes reach the disk, only after each write returns: in
    between its bytes are counted twice (too careful), never zero times. Lives on the event
    loop (no lock): every change happens between two awaits.
    """

    def __init__(self) -> None:
        #: bytes promised and not written yet (``uploads_reserved_bytes`` on ``/v1/health``)
        self.pending = 0
        #: every byte ever promised: only grows, so that :meth:`others_since` sees promises made
        #: while a check waited for the free space, even those already written or released
        self.promised = 0

    def mark(self) -> tuple[int, int]:
        """What a check takes before it reads the free space (see :meth:`others_since`)."""
        return self.pending, self.promised

    def others_since(self, mark: tuple[int, int]) -> int:
        """Bytes to count as taken by other uploads for a free space read after ``mark``.

        What was pending at the mark (bytes written while the free space was read are then
        counted twice, which only errs on the side of refusing), plus all that was promised
        since: an upload admitted during the read must count in full, its writes may or may not
        show in the number read."""
        return mark[0] + self.promised - mark[1]

    def promise(self, nbytes: int) -> Promise:
        self.pending += nbytes
        self.promised += nbytes
        return Promise(self, nbytes)


class Promise:
    """One upload's share of a :class:`SpaceLedger`: shrinks as it is written; released
    (:meth:`release`, idempotent) however the upload ends."""

    __slots__ = ("ledger", "left")

    def __init__(self, ledger: SpaceLedger, nbytes: int) -> None:
        self.ledger = ledger
        self.left = nbytes

    def wrote(self, nbytes: int) -> None:
        n = min(nbytes, self.left)
        self.left -= n
        self.ledger.pending -= n

    def release(self) -> None:
        self.ledger.pending -= self.left
        self.left = 0


class Agent:
    """The agent's state: root, limits, and the per-namespace replicas."""

    def __init__(
        self,
        root: str,
        *,
        token: str | None,
        max_object_bytes: int = 16 << 30,
        reserve_free_bytes: int = 1 << 30,
        max_uploads: int = 16,
        idle_timeout_s: float = 30.0,
        min_upload_bytes_per_s: int = DEFAULT_MIN_UPLOAD_BYTES_PER_S,
        upload_rate_window_s: float = DEFAULT_UPLOAD_RATE_WINDOW_S,
        namespace_tokens: Mapping[str, str] | None = None,
        metrics_token: str | None = None,
        scrub_interval_s: float = 0.0,
        scrub_bytes_per_s: int = DEFAULT_SCRUB_BYTES_PER_S,
        fsync: bool = True,
        direct_io: bool = False,
    ) -> None:
        """``token`` is valid on every namespace (the admin token); each of ``namespace_tokens``
        (``{prefix: token}``) only on its prefix; ``metrics_token`` only on ``/metrics`` and
        ``/v1/health``. With none, no request needs a token. ``scrub_interval_s > 0`` scrubs
        (:mod:`._scrub`) at most ``scrub_bytes_per_s``. ``direct_io``: write received objects
        past the page cache (the local replica's option of that name). Raises AgentConfigError (before creating
        anything) for options that cannot work."""
        if not 0 <= scrub_interval_s < math.inf:
            raise AgentConfigError(f"--scrub-interval {scrub_interval_s}: must be 0 (off) or a number of seconds")
        if scrub_bytes_per_s <= 0:
            raise AgentConfigError(f"--scrub-bytes-per-s {scrub_bytes_per_s}: must be a positive number of bytes")
        if min_upload_bytes_per_s < 0:
            raise AgentConfigError(f"--min-upload-bytes-per-s {min_upload_bytes_per_s}: must be 0 (off) or more")
        if not upload_rate_window_s > 0 or math.isinf(upload_rate_window_s):
            raise AgentConfigError(f"--upload-rate-window-s {upload_rate_window_s}: must be a positive number")
        self.namespace_tokens = parse_namespace_tokens(namespace_tokens)
        self.metrics_token = metrics_token.encode() if metrics_token else None
        others = [nt.token for nt in self.namespace_tokens] + ([token.encode()] if token else [])
        if self.metrics_token is not None and self.metrics_token in others:
            # One token with two scopes: the read-only metrics token would also write.
            raise AgentConfigError("--metrics-token-file: the metrics token must differ from every other token")
        self.root = os.path.realpath(root)
        os.makedirs(self.root, exist_ok=True)
        self.token = token.encode() if token else None
        self.max_object_bytes = max_object_bytes
        self.reserve_free_bytes = reserve_free_bytes
        self.max_uploads = max_uploads
        self.idle_timeout_s = idle_timeout_s
        self.min_upload_bytes_per_s = min_upload_bytes_per_s
        self.upload_rate_window_s = upload_rate_window_s
        self.fsync = fsync
        self.direct_io = direct_io
        self.uploads = 0
        self.space = SpaceLedger()
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="agent-io")
        self._replicas: dict[str, LocalReplica] = {}
        # (namespace, key) -> (size, checksum) of objects this process received and verified,
        # so a commit need not re-read them. Objects from before a restart are re-hashed.
        self.verified: dict[tuple[str, str], tuple[int, str]] = {}
        self.scrubber = (
            Scrubber(
                self.root,
                self.replica,
                interval_s=scrub_interval_s,
                bytes_per_s=scrub_bytes_per_s,
                on_damage=lambda ns, key: self.verified.pop((ns, key), None),  # a commit must re-hash it
            )
            if scrub_interval_s > 0
            else None
        )
        self.metrics = AgentMetrics(self)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        # Temp files of uploads interrupted by a crash: never visible, removed at start.
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                if f.startswith(TMP_PREFIX):
                    try:
                        os.unlink(os.path.join(dirpath, f))
                    except OSError:
                        pass

    @property
    def needs_token(self) -> bool:
        """Whether every request must carry a token (the agent's own or a namespace's)."""
        return self.token is not None or bool(self.namespace_tokens)

    def replica(self, ns: str) -> LocalReplica:
        validate_key(ns, "agent namespace")
        _refuse_hidden(ns)
        r = self._replicas.get(ns)
        if r is None:
            path = os.path.join(self.root, *ns.split("/"))
            real = os.path.realpath(path)
            if not (real == self.root or real.startswith(self.root + os.sep)):
                raise ManifestError("namespace escapes the agent root", key=ns)
            # create=False: a rejected request must not leave an empty namespace behind.
            r = LocalReplica(path, fsync=self.fsync, create=False, direct_io=self.direct_io)
            if not (r.root == self.root or r.root.startswith(self.root + os.sep)):
                raise ManifestError("namespace escapes the agent root through a symlink", key=ns)
            r.url = f"namespace {ns}"  # error messages go to clients: no absolute server paths
            self._replicas[ns] = r
        return r

    def replica_root(self, ns: str) -> str:
        """The directory of namespace ``ns`` (a name :func:`._scrub.find_namespaces` found)."""
        return os.path.join(self.root, *ns.split("/"))

    def changed(self, ns: str, key: str) -> None:
        """``key`` (or the prefix) in ``ns`` was written or deleted: the scrubber's result of its
        step is about other bytes now (after a ``ckptmirror repair``, say), so it is dropped."""
        if self.scrubber is not None:
            self.scrubber.invalidate(ns, key)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


#: Where the handlers find the agent: the application holds it.
AGENT: web.AppKey[Agent] = web.AppKey("agent", Agent)


def _split(request: web.Request) -> tuple[str, str]:
    """(namespace, key) from ``/v1/<op>/<ns...>/<key...>``: the namespace has as many segments as
    the namespace-depth header says (default 1)."""
    tail = request.match_info[wire.TAIL]
    try:
        depth = int(request.headers.get(wire.DEPTH_HEADER, str(wire.DEFAULT_DEPTH)))
    except ValueError:
        raise web.HTTPBadRequest(text="bad namespace depth") from None
    parts = tail.split("/")
    if not 1 <= depth < len(parts):
        raise web.HTTPBadRequest(text="bad path")
    return "/".join(parts[:depth]), "/".join(parts[depth:])


def _refuse_hidden(name: str, *, commit_record: bool = True) -> None:
    """400 for a name the agent keeps to itself (see :func:`_peer_protocol.refused_name`)."""
    why = wire.refused_name(name, commit_record=commit_record)
    if why:
        raise web.HTTPBadRequest(text=f"refused name {why}")


def _namespace_of(request: web.Request) -> str | None:
    """The namespace a request acts on; None for one that names none (health, unknown paths)."""
    tail = request.match_info.get(wire.TAIL)
    if tail is None:
        return None
    if request.match_info.route.handler in (_steps, _scrub_results):
        return tail  # /v1/steps/<ns>, /v1/scrub/<ns>: the whole tail is the namespace
    return _split(request)[0]


# ------------------------------------------------------------------------------ middleware
def _tokens(agent: Agent, request: web.Request) -> tuple[bool, bool, list[NamespaceToken]] | None:
    """(admin token?, metrics token?, the namespace tokens it is) of the request's token; None without one.

    Constant-time: the comparison must not tell an attacker how many leading bytes were right.
    Every token is compared (no early exit), so the time does not tell which one matched either.
    """
    header = request.headers.get(wire.AUTHORIZATION, "")
    if not header.startswith(wire.BEARER):
        return None
    given = header[len(wire.BEARER) :].encode()
    admin = agent.token is not None and hmac.compare_digest(given, agent.token)
    metrics = agent.metrics_token is not None and hmac.compare_digest(given, agent.metrics_token)
    return admin, metrics, [nt for nt in agent.namespace_tokens if hmac.compare_digest(given, nt.token)]


def _refuse(
    agent: Agent, request: web.Request, reason: str, exc: web.HTTPException, msg: str, **fields: Any
) -> NoReturn:
    """Log, count (an upload refused for its token is an upload refused: ``auth``) and raise ``exc``."""
    _event(logging.WARNING, msg, peer=request.remote, path=request.path, **fields)
    agent.metrics.auth_refused.labels(reason=reason).inc()
    if request.method == "PUT":
        agent.metrics.refused("auth")
    raise exc


def _authorize(agent: Agent, request: web.Request) -> None:
    """Refuse a request without a token (401), with one the agent does not know (403), or with a
    token not valid there (403): a namespace token on a namespace outside its prefix or on
    ``/metrics``, the metrics token anywhere but ``/metrics`` and ``/v1/health``. The agent's own
    token is valid everywhere; any known token may read ``/v1/health`` (it names no namespace).
    ``/metrics`` needs a token when the agent has any, the metrics token included."""
    is_metrics = request.path == wire.METRICS_PATH
    if not (agent.needs_token or (is_metrics and agent.metrics_token is not None)):
        return
    found = _tokens(agent, request)
    if found is None:
        _refuse(
            agent,
            request,
            "missing",
            web.HTTPUnauthorized(text=wire.MISSING_TOKEN_TEXT, headers={"WWW-Authenticate": "Bearer"}),
            "rejected: missing token",
        )
    admin, metrics, scoped = found
    if admin or (metrics and request.path in (wire.METRICS_PATH, wire.HEALTH_PATH)):
        return
    if metrics or (scoped and is_metrics):
        # Read-only for the metrics token; /metrics names every namespace, so not for a job's token.
        _refuse(
            agent, request, "scope", web.HTTPForbidden(text=wire.WRONG_SCOPE_TEXT), "rejected: token not valid here"
        )
    if not scoped:
        _refuse(agent, request, "wrong", web.HTTPForbidden(text=wire.WRONG_TOKEN_TEXT), "rejected: wrong token")
    ns = _namespace_of(request)
    if ns is None:
        return
    try:
        validate_key(ns, "agent namespace")  # before matching: "a/../b" must not pass as under "a"
    except ManifestError as exc:
        raise web.HTTPBadRequest(text=wire.error_text(exc)) from None
    if not any(nt.covers(ns) for nt in scoped):
        _refuse(
            agent,
            request,
            "scope",
            web.HTTPForbidden(text=wire.WRONG_NAMESPACE_TEXT),
            "rejected: token not valid for this namespace",
            ns=ns,
        )


def _covers(agent: Agent, request: web.Request) -> Callable[[str], bool]:
    """Which namespaces the request's token may see (``/v1/health`` names damaged objects)."""
    found = _tokens(agent, request) if agent.needs_token else None
    if found is None or found[0] or found[1]:
        return lambda ns: True  # no tokens at all, the admin token, or the metrics token (sees /metrics)
    scoped = found[2]
    return lambda ns: any(nt.covers(ns) for nt in scoped)


def _root_for(agent: Agent, request: web.Request) -> str:
    """The agent's root as an error message may name it to this request's client: the path for
    the admin token (or an agent without tokens), else a pointer to the option. A namespace token
    is a tenant's: it learns nothing of the server's layout (see :meth:`Agent.replica`)."""
    found = _tokens(agent, request) if agent.needs_token else None
    return agent.root if found is None or found[0] else "the agent's --root"


def _trace(request: web.Request, status: int) -> None:
    """One debug line per answered request (``--log-level debug``, ``-v``)."""
    if log.isEnabledFor(logging.DEBUG):
        _event(logging.DEBUG, "request", method=request.method, path=request.path, status=status, peer=request.remote)


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every request: the token first, then the handler; a library error becomes its status."""
    _authorize(request.app[AGENT], request)
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        _trace(request, exc.status)
        raise
    except CkptMirrorError as exc:
        resp = web.Response(status=wire.status_for(exc), text=wire.error_text(exc))
    except OSError as exc:
        if isinstance(exc, ConnectionError):
            raise  # the client went away: nobody reads an answer
        # aiohttp would answer a bare "500 Internal Server Error"; the errno's name says what broke.
        # Not str(exc): an OSError's filename is a server path.
        _event(logging.ERROR, "request failed", method=request.method, path=request.path, error=str(exc))
        name = wire.errno_name(exc) or "no errno"
        resp = web.Response(status=wire.status_for(exc), text=f"{type(exc).__name__}: [{name}] {exc.strerror or ''}")
    _trace(request, resp.status)
    return resp


# -------------------------------------------------------------------------------- handlers
async def _health(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    free = await agent.run(agent.free_bytes)
    return web.json_response(
        {
            "version": __version__,
            "free_bytes": free,
            "uploads_in_flight": agent.uploads,
            "reserve_free_bytes": agent.reserve_free_bytes,
            wire.RESERVED_BYTES_FIELD: agent.space.pending,
            "scrub": agent.scrubber.summary(_covers(agent, request)) if agent.scrubber else None,
        }
    )


async def _metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: rendered on an I/O thread (it stats every namespace's newest steps)."""
    agent = request.app[AGENT]
    body = await agent.run(agent.metrics.render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _scrub_results(request: web.Request) -> web.Response:
    """``GET /v1/scrub/<ns>``: the scrubber's latest results for ``ns`` (see ``_peer_protocol``)."""
    agent = request.app[AGENT]
    ns = request.match_info[wire.TAIL]
    validate_key(ns, "agent namespace")
    _refuse_hidden(ns)
    if agent.scrubber is None:
        raise web.HTTPNotFound(text="this agent does not scrub (ckptmirror serve --scrub-interval)")
    return web.json_response(agent.scrubber.namespace_report(ns))


class _UploadCut(web.HTTPRequestTimeout):
    """408 for an upload cut by the agent; ``refusal`` is its reason on ``/metrics``."""

    def __init__(self, refusal: str, text: str) -> None:
        super().__init__(text=text)
        self.refusal = refusal


async def _put(request: web.Request, commit: bool) -> web.Response:
    """``PUT /v1/o/`` (``commit`` False) and ``PUT /v1/commit/``, counted on ``/metrics``."""
    metrics = request.app[AGENT].metrics
    try:
        ns, key = _split(request)
        _refuse_hidden(key, commit_record=commit)  # a commit record only through /v1/commit/
        resp = await _receive(request, ns, key, commit)
    except (web.HTTPException, CkptMirrorError) as exc:
        status = exc.status if isinstance(exc, web.HTTPException) else wire.status_for(exc)
        metrics.upload_failed(status, getattr(exc, "refusal", None), commit)
        raise
    (metrics.commits_accepted if commit else metrics.received_objects).inc()
    return resp


async def _put_object(request: web.Request) -> web.Response:
    return await _put(request, commit=False)


async def _put_commit(request: web.Request) -> web.Response:
    return await _put(request, commit=True)


def _upload_header(agent: Agent, request: web.Request, commit: bool) -> tuple[int, str]:
    """(length, checksum) of an upload, checked before a byte of its body is read."""
    length = request.content_length
    if length is None:
        raise web.HTTPLengthRequired(text="Content-Length is required")
    limit = MAX_COMMIT_BYTES if commit else agent.max_object_bytes
    if length > limit:
        raise web.HTTPRequestEntityTooLarge(
            max_size=limit, actual_size=length, text=f"{length} bytes exceeds the limit of {limit}"
        )
    expected = request.headers.get(CHECKSUM_HEADER, "")
    if not is_checksum(expected):
        raise web.HTTPBadRequest(text=f"missing or malformed {CHECKSUM_HEADER}")
    return length, expected


async def _stream_body(
    agent: Agent,
    request: web.Request,
    writer: AtomicWriter,
    length: int,
    *,
    keep: bool,
    ns: str,
    key: str,
    promise: Promise | None = None,
) -> tuple[str, bytes]:
    """Read exactly ``length`` body bytes into ``writer``, hashing them as they pass; what is
    written is taken off ``promise`` (the upload's share of :attr:`Agent.space`).

    Returns (checksum, the body if ``keep`` else ``b""``). A client that sends nothing for the
    idle timeout gets 408, and so does one slower than the minimum rate (:class:`UploadPace`);
    one whose body ends early gets 400. Either way the caller removes the temp file.
    """
    hasher = Hasher()
    body = bytearray() if keep else None
    received = 0
    pace = UploadPace(agent.min_upload_bytes_per_s, agent.upload_rate_window_s, length)
    loop = asyncio.get_running_loop()
    last_data = loop.time()
    while received < length:
        started = loop.time()
        # Wake up at the idle timeout or at the end of the rate window, whichever comes first:
        # a client trickling a byte a second never trips the idle timeout, only the window.
        timeout = min(agent.idle_timeout_s - (started - last_data), pace.time_left())
        chunk: bytes | None = None
        if timeout > 0:
            try:
                # Cancelling a pending read loses no data: aiohttp's reader consumes its buffer
                # only when the read completes.
                chunk = await asyncio.wait_for(request.content.read(min(CHUNK_BYTES, length - received)), timeout)
            except asyncio.TimeoutError:
                pass
        now = loop.time()
        if chunk is None and now - last_data >= agent.idle_timeout_s:
            _event(logging.WARNING, "upload idle, dropped", ns=ns, key=key, received=received, peer=request.remote)
            raise _UploadCut("idle", f"no data for {agent.idle_timeout_s} s")
        if not pace.record(now - started, len(chunk or b"")):
            got = received + len(chunk or b"")
            _event(
                logging.WARNING,
                "upload too slow, cut",
                ns=ns,
                key=key,
                received=got,
                length=length,
                window_bytes=pace.got,
                window_s=pace.window_s,
                min_bytes_per_s=pace.min_bytes_per_s,
                peer=request.remote,
            )
            # The slot is freed and the temp file removed as this propagates (see _receive). The
            # connection is not reset: aiohttp drains what the client still sends for at most
            # 10 s (its "lingering close") and then closes it, so the client can read this 408 (a
            # reset would discard it) while holding no slot and writing nothing to disk.
            raise _UploadCut(
                "rate",
                f"upload too slow: {pace.got} bytes in {pace.window_s:g} s, below the agent's minimum "
                f"of {pace.min_bytes_per_s} bytes/s (--min-upload-bytes-per-s); cut after {got} of "
                f"{length} bytes",
            )
        if chunk is None:
            continue  # the window ended on time: the next one starts
        if not chunk:
            break
        last_data = now
        received += len(chunk)
        agent.metrics.received_bytes.inc(len(chunk))
        if body is not None:
            body += chunk
        await agent.run(_hash_write, hasher, writer, chunk)
        if promise is not None:
            promise.wrote(len(chunk))  # after the write: the free space shows it now
    if received != length:
        raise web.HTTPBadRequest(text=f"body ended after {received} of {length} bytes")
    return hasher.hexdigest(), bytes(body) if body is not None else b""


async def _receive(request: web.Request, ns: str, key: str, commit: bool) -> web.Response:
    """Stream an upload to a temp file, verify it, then publish it (a commit once it is checked)."""
    agent = request.app[AGENT]
    validate_key(key, "agent")
    replica = agent.replica(ns)
    length, expected = _upload_header(agent, request, commit)
    if agent.uploads >= agent.max_uploads:
        raise web.HTTPServiceUnavailable(
            text=f"too many uploads in flight ({agent.max_uploads})", headers={"Retry-After": "1"}
        )
    agent.uploads += 1  # reserve the slot before the first await
    promise: Promise | None = None
    try:
        mark = agent.space.mark()
        free = await agent.run(agent.free_bytes)
        # From here to the promise, no await: the check and the promise are one step of the
        # event loop, so two uploads that fit only one at a time cannot both be admitted.
        others = agent.space.others_since(mark)
        if free - others - length < agent.reserve_free_bytes:
            raise web.HTTPInsufficientStorage(
                text=f"free space {free} minus {others} bytes still to come for the uploads in flight minus "
                f"{length} is below the reserve {agent.reserve_free_bytes} (--reserve-free-bytes) under "
                f"{_root_for(agent, request)}; {_space_fix(request, ns)}"
            )
        promise = agent.space.promise(length)
        try:
            return await _write_upload(agent, request, replica, ns, key, commit, length, expected, promise)
        except OSError as exc:  # a ReplicaError of the local replica carries its errno too
            if exc.errno not in SPACE_ERRNOS:
                raise
            raise await _out_of_space(agent, request, ns, key, length, exc) from exc
    finally:
        agent.uploads -= 1
        if promise is not None:
            promise.release()


async def _write_upload(
    agent: Agent,
    request: web.Request,
    replica: LocalReplica,
    ns: str,
    key: str,
    commit: bool,
    length: int,
    expected: str,
    promise: Promise,
) -> web.Response:
    """The body of an admitted upload: temp file, verify, publish. The temp file is gone
    however this ends (the slot and the promise are the caller's)."""
    writer: AtomicWriter | None = None
    try:
        writer = await agent.run(replica.open_writer, key)
        got, body = await _stream_body(agent, request, writer, length, keep=commit, ns=ns, key=key, promise=promise)
        if got != expected:
            _event(logging.WARNING, "checksum mismatch, dropped", ns=ns, key=key, expected=expected, got=got)
            raise web.HTTPUnprocessableEntity(text=f"checksum mismatch: received {got}, header says {expected}")
        held_written: str | None = None
        if commit:
            writers = _commit_writers(request)
            problems, held = await agent.run(check_commit, replica, ns, key, body, agent.verified, writers)
            if problems:
                raise web.HTTPConflict(text="commit refused: " + "; ".join(problems[:20]))
            if held is not None:
                held_written = await agent.run(_keep_held, replica, key, body, held)
        try:
            await agent.run(writer.finish, commit)
        except StepExistsError:
            writer = None
            # Retrying a commit whose answer was lost must succeed, if it is the same record.
            if not (commit and await agent.run(replica._holds, key, body)):
                if held_written is not None:  # named after our record, which lost: never read
                    await agent.run(replica.delete, held_written)
                raise
            return web.Response(status=201, text="ok (identical commit exists)")
        writer = None
        agent.changed(ns, key)
        if not commit:
            agent.verified[(ns, key)] = (length, expected)
        _event(logging.INFO, "committed" if commit else "stored", ns=ns, key=key, bytes=length)
        return web.Response(status=201, text="ok")
    finally:
        if writer is not None:
            # Before the out-of-space answer is made: its free space must not count the temp file.
            await agent.run(writer.abort)


def _space_fix(request: web.Request, ns: str) -> str:
    """What to do about a full agent, with the command for this namespace."""
    scheme = "peers" if request.secure else "peer"
    return (
        "free space there (delete what is not needed), run 'ckptmirror prune "
        f"{scheme}://{request.host}/{ns} --keep N', or lower keep_last"
    )


async def _out_of_space(
    agent: Agent, request: web.Request, ns: str, key: str, length: int, exc: OSError
) -> web.HTTPInsufficientStorage:
    """The 507 of an upload whose write, fsync or rename found the disk full (``exc``): the
    reserve is only a guess when other writers share the disk, or a quota bounds it."""
    try:
        free: int | str = await agent.run(agent.free_bytes)
    except OSError as err:
        free = f"unknown ({wire.errno_name(err) or err})"
    name = wire.errno_name(exc)
    _event(logging.WARNING, "out of space, upload dropped", ns=ns, key=key, bytes=length, errno=name, free=free)
    return web.HTTPInsufficientStorage(
        text=f"out of space: [{name}] while writing {key} ({length} bytes) under {_root_for(agent, request)}, "
        f"{free} bytes free now; {_space_fix(request, ns)}"
    )


def _commit_writers(request: web.Request) -> frozenset[tuple[int, str]] | None:
    """The writers a commit's client put files for (``wire.WRITERS_HEADER``); None without the header.

    Without it the commit needs every file the record names (the rule for clients that predate the
    header: they expect the agent to vouch for the whole step). With it, the namespace may hold
    only the named writers' share of the step (``_scrub.check_commit``)."""
    value = request.headers.get(wire.WRITERS_HEADER)
    if value is None:
        return None
    try:
        return wire.parse_writers(value)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None


def _keep_held(replica: LocalReplica, key: str, body: bytes, held: Held) -> str | None:
    """Write the Held record of the commit record ``body`` (before the record itself becomes
    visible, so that the scrubber never sees the step without it) and return its key; None when
    ``key`` exists already (the commit then ends in 412, or finds an identical record that has
    its own) or is not in a step directory (the scrubber only reads those)."""
    step = parse_step_dir(key.split("/", 1)[0])
    if step is None or replica.size(key) is not None:
        return None
    csum = checksum(body)
    hkey = held_key(step, csum)
    replica.put(hkey, held.to_json(csum))
    return hkey


async def _get_object(request: web.Request) -> web.StreamResponse:
    """Object bytes, whole or one ``Range``; ``HEAD`` answers the headers only."""
    agent = request.app[AGENT]
    ns, key = _split(request)
    _refuse_hidden(key)  # another upload's temp file: its bytes are partial
    replica = agent.replica(ns)
    fd = await agent.run(replica._open_read, key)
    try:
        size = os.fstat(fd).st_size
        start, end = 0, size
        rng = request.headers.get("Range")
        status = 200
        if rng:
            start, end = _parse_range(rng, size)
            status = 206
        headers = {"Content-Length": str(end - start), "Accept-Ranges": "bytes", wire.SIZE_HEADER: str(size)}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        pos = start
        while pos < end:
            chunk = await agent.run(os.pread, fd, min(CHUNK_BYTES, end - pos), pos)
            if not chunk:
                break
            await resp.write(chunk)
            pos += len(chunk)
            agent.metrics.served_bytes.inc(len(chunk))
        await resp.write_eof()
        agent.metrics.served_objects.inc()
        return resp
    finally:
        os.close(fd)


async def _steps(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    ns = request.match_info[wire.TAIL]
    return web.json_response(await agent.run(agent.replica(ns).list_steps))


async def _list_prefix(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    ns, prefix = _split(request)
    _refuse_hidden(prefix)
    keys = await agent.run(agent.replica(ns).list_prefix, prefix)
    # Temp files of uploads in progress are not objects: a listing never shows them.
    return web.json_response([k for k in keys if wire.refused_name(k) is None])


async def _delete_object(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    ns, key = _split(request)
    _refuse_hidden(key)  # deleting another upload's temp file would fail that upload
    replica = agent.replica(ns)
    await agent.run(replica.delete, key)
    head, _, name = key.partition("/")
    step = parse_step_dir(head)
    if name == COMMIT_NAME and step is not None:
        await agent.run(drop_held, replica, step)  # what the namespace held of that commit
    agent.verified.pop((ns, key), None)
    agent.changed(ns, key)
    return web.Response(status=204)


async def _delete_prefix(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    ns, prefix = _split(request)
    _refuse_hidden(prefix)
    await agent.run(agent.replica(ns).delete_prefix, prefix)
    under = prefix.rstrip("/") + "/"
    # list(): a copy made without releasing the GIL, while I/O threads (commit checks) and the
    # scrubber add and remove entries.
    for k in [k for k in list(agent.verified) if k[0] == ns and k[1].startswith(under)]:
        agent.verified.pop(k, None)
    agent.changed(ns, prefix)
    return web.Response(status=204)


def build_app(agent: Agent) -> web.Application:
    """The aiohttp application for ``agent`` (used by ``serve`` and by tests)."""
    app = web.Application(middlewares=[_guard], client_max_size=MAX_MANIFEST_BYTES)
    app[AGENT] = agent
    app.router.add_get(wire.HEALTH_PATH, _health)
    app.router.add_put(wire.route(wire.OP_OBJECT), _put_object)
    app.router.add_put(wire.route(wire.OP_COMMIT), _put_commit)
    app.router.add_get(wire.route(wire.OP_OBJECT), _get_object)  # also answers HEAD
    app.router.add_get(wire.route(wire.OP_STEPS), _steps)
    app.router.add_get(wire.route(wire.OP_LIST), _list_prefix)
    app.router.add_delete(wire.route(wire.OP_OBJECT), _delete_object)
    app.router.add_delete(wire.route(wire.OP_PREFIX), _delete_prefix)
    app.router.add_get(wire.METRICS_PATH, _metrics)
    app.router.add_get(wire.route(wire.OP_SCRUB), _scrub_results)
    app.on_startup.append(_start_scrubber)
    app.on_cleanup.append(_stop_scrubber)
    return app


async def _start_scrubber(app: web.Application) -> None:
    scrubber = app[AGENT].scrubber
    if scrubber is not None:
        scrubber.start()


async def _stop_scrubber(app: web.Application) -> None:
    scrubber = app[AGENT].scrubber
    if scrubber is not None:
        await asyncio.get_running_loop().run_in_executor(None, scrubber.stop)  # joins the thread


# ------------------------------------------------------------------------------- helpers
def _hash_write(hasher: Hasher, writer: Any, chunk: bytes) -> None:
    hasher.update(chunk)
    writer.write(chunk)


def _parse_range(header: str, size: int) -> tuple[int, int]:
    try:
        unit, spec = header.split("=", 1)
        a, b = spec.split("-", 1)
        if unit.strip() != "bytes" or "," in spec:
            raise ValueError
        start = int(a)
        end = int(b) + 1 if b else size
    except ValueError:
        raise web.HTTPBadRequest(text=f"unsupported Range {header!r}") from None
    if not 0 <= start < end <= size:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, end


# ----------------------------------------------------------------------------------- serve
def _log_to_stderr(level: str | int) -> None:
    """The agent's log: JSON lines on stderr at ``level`` (a logging level, or its name: ``"debug"``)."""
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())  # the number for a known name, else a string
        if not isinstance(number, int):
            raise AgentConfigError(f"--log-level {level!r}: not a log level (debug, info, warning, error)")
        level = number
    # serve() may run twice in one process (tests): replace our handler instead of doubling it.
    for old in [h for h in log.handlers if getattr(h, "_ckptmirror_agent", False)]:
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler._ckptmirror_agent = True  # type: ignore[attr-defined]  # a marker on a stdlib handler, found above
    handler.setFormatter(_JsonFormatter())
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def _tls_context(tls_cert: str | None, tls_key: str | None) -> ssl.SSLContext | None:
    """The server TLS context, or None for plain HTTP; AgentConfigError for half a setup or bad files."""
    if not (tls_cert or tls_key):
        return None
    if not (tls_cert and tls_key):
        raise AgentConfigError("--tls-cert and --tls-key go together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(tls_cert, tls_key)
    except OSError as exc:  # ssl.SSLError is an OSError too
        why = exc.strerror if exc.strerror and not isinstance(exc, ssl.SSLError) else str(exc)
        raise AgentConfigError(f"--tls-cert {tls_cert} / --tls-key {tls_key}: cannot load them: {why}") from exc
    return ctx


async def _run(agent: Agent, host: str, port: int, ssl_ctx: ssl.SSLContext | None) -> None:
    """Listen, print the listening line, and serve until SIGTERM/SIGINT."""
    runner = web.AppRunner(
        build_app(agent), access_log=None, keepalive_timeout=agent.idle_timeout_s, shutdown_timeout=2.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx, backlog=128)
        try:
            await site.start()
        except OSError as exc:
            # Address in use (another agent?), not available on this machine, or a privileged port.
            # asyncio rewrites strerror into a long sentence; the errno's own text is enough.
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise AgentConfigError(
                f"cannot listen on {host}:{port} (--host/--port): {why}"
                + ("; is another agent running there?" if exc.errno == errno.EADDRINUSE else "")
            ) from exc
        bound = runner.addresses[0][1] if runner.addresses else port
        _event(
            logging.INFO,
            "listening",
            host=host,
            port=bound,
            root=agent.root,
            tls=ssl_ctx is not None,
            auth=agent.needs_token,
            namespace_tokens=len(agent.namespace_tokens),
            min_upload_bytes_per_s=agent.min_upload_bytes_per_s,
            upload_rate_window_s=agent.upload_rate_window_s,
            metrics_token=agent.metrics_token is not None,
            scrub_interval_s=agent.scrubber.interval_s if agent.scrubber else 0,
            scrub_bytes_per_s=agent.scrubber.bytes_per_s if agent.scrubber else 0,
            version=__version__,
        )
        # One line on stdout for whoever started us (tests, scripts) to learn the port.
        print(json.dumps({"listening": f"{host}:{bound}"}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        _event(logging.INFO, "shutting down")
    finally:
        await runner.cleanup()


def serve(
    root: str,
    host: str = "127.0.0.1",
    port: int = wire.DEFAULT_PORT,
    *,
    token: str | None = None,
    namespace_tokens: Mapping[str, str] | None = None,
    metrics_token: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    log_level: str | int = "info",
    **limits: Any,
) -> None:
    """Run the agent until SIGTERM/SIGINT.

    ``token`` is valid on every namespace; ``namespace_tokens`` (``{prefix: token}``) each on
    their prefix only; ``metrics_token`` on ``/metrics`` and ``/v1/health`` only (it does not
    let the agent listen beyond loopback: the data routes would be open). Raises
    :class:`AgentConfigError` before creating anything for options that cannot work: a
    non-loopback address without any token, half a TLS setup or unreadable TLS files, a bad
    namespace token, a root that cannot be created, an address it cannot listen on.
    ``limits`` go to :class:`Agent`.
    """
    if not token and not namespace_tokens and host not in LOOPBACK_HOSTS:
        raise AgentConfigError(
            f"refusing to listen on {host} without a token: pass --token-file FILE, set {wire.TOKEN_ENV} "
            "or give --namespace-token PREFIX=FILE (the agent is a network service)"
        )
    _log_to_stderr(log_level)
    ssl_ctx = _tls_context(tls_cert, tls_key)
    try:
        agent = Agent(root, token=token, namespace_tokens=namespace_tokens, metrics_token=metrics_token, **limits)
    except OSError as exc:
        raise AgentConfigError(f"--root {root}: cannot use it as the agent's root: {exc.strerror or exc}") from exc
    try:
        asyncio.run(_run(agent, host, port, ssl_ctx))
    finally:
        agent.pool.shutdown(wait=True)
