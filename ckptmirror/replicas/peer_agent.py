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
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import os
import shutil
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from .._version import __version__
from ..checksum import Hasher, is_checksum
from ..errors import CkptMirrorError, ManifestError, StepExistsError
from ..format import MAX_MANIFEST_BYTES, TMP_PREFIX, parse_commit, parse_rank_manifest
from . import _peer_protocol as wire
from ._peer_protocol import CHECKSUM_HEADER, LOOPBACK_HOSTS
from .base import validate_key
from .local import AtomicWriter, LocalReplica

__all__ = ["Agent", "AgentConfigError", "build_app", "serve"]

log = logging.getLogger("ckptmirror.agent")

CHUNK_BYTES = 4 << 20
#: Commit records are buffered in memory to be checked; they are ~100 bytes per rank.
MAX_COMMIT_BYTES = 16 << 20


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
        fsync: bool = True,
    ) -> None:
        self.root = os.path.realpath(root)
        os.makedirs(self.root, exist_ok=True)
        self.token = token.encode() if token else None
        self.max_object_bytes = max_object_bytes
        self.reserve_free_bytes = reserve_free_bytes
        self.max_uploads = max_uploads
        self.idle_timeout_s = idle_timeout_s
        self.fsync = fsync
        self.uploads = 0
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="agent-io")
        self._replicas: dict[str, LocalReplica] = {}
        # (namespace, key) -> (size, checksum) of objects this process received and verified,
        # so a commit need not re-read them. Objects from before a restart are re-hashed.
        self.verified: dict[tuple[str, str], tuple[int, str]] = {}
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

    def replica(self, ns: str) -> LocalReplica:
        validate_key(ns, "agent namespace")
        r = self._replicas.get(ns)
        if r is None:
            path = os.path.join(self.root, *ns.split("/"))
            real = os.path.realpath(path)
            if not (real == self.root or real.startswith(self.root + os.sep)):
                raise ManifestError("namespace escapes the agent root", key=ns)
            # create=False: a rejected request must not leave an empty namespace behind.
            r = LocalReplica(path, fsync=self.fsync, create=False)
            if not (r.root == self.root or r.root.startswith(self.root + os.sep)):
                raise ManifestError("namespace escapes the agent root through a symlink", key=ns)
            r.url = f"namespace {ns}"  # error messages go to clients: no absolute server paths
            self._replicas[ns] = r
        return r

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


# ------------------------------------------------------------------------------ middleware
def _authorize(agent: Agent, request: web.Request) -> None:
    """Refuse a request without the agent's token (401) or with another one (403)."""
    if agent.token is None:
        return
    header = request.headers.get(wire.AUTHORIZATION, "")
    if not header.startswith(wire.BEARER):
        _event(logging.WARNING, "rejected: missing token", peer=request.remote, path=request.path)
        raise web.HTTPUnauthorized(text=wire.MISSING_TOKEN_TEXT, headers={"WWW-Authenticate": "Bearer"})
    # Constant-time: the comparison must not tell an attacker how many leading bytes were right.
    if not hmac.compare_digest(header[len(wire.BEARER) :].encode(), agent.token):
        _event(logging.WARNING, "rejected: wrong token", peer=request.remote, path=request.path)
        raise web.HTTPForbidden(text=wire.WRONG_TOKEN_TEXT)


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
        }
    )


async def _put_object(request: web.Request) -> web.Response:
    ns, key = _split(request)
    return await _receive(request, ns, key, commit=False)


async def _put_commit(request: web.Request) -> web.Response:
    ns, key = _split(request)
    return await _receive(request, ns, key, commit=True)


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
    agent: Agent, request: web.Request, writer: AtomicWriter, length: int, *, keep: bool, ns: str, key: str
) -> tuple[str, bytes]:
    """Read exactly ``length`` body bytes into ``writer``, hashing them as they pass.

    Returns (checksum, the body if ``keep`` else ``b""``). A client that sends nothing for the
    idle timeout gets 408, one whose body ends early 400.
    """
    hasher = Hasher()
    body = bytearray() if keep else None
    received = 0
    while received < length:
        try:
            chunk = await asyncio.wait_for(
                request.content.read(min(CHUNK_BYTES, length - received)), agent.idle_timeout_s
            )
        except asyncio.TimeoutError:
            _event(logging.WARNING, "upload idle, dropped", ns=ns, key=key, received=received, peer=request.remote)
            raise web.HTTPRequestTimeout(text=f"no data for {agent.idle_timeout_s} s") from None
        if not chunk:
            break
        received += len(chunk)
        if body is not None:
            body += chunk
        await agent.run(_hash_write, hasher, writer, chunk)
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
    writer: AtomicWriter | None = None
    try:
        free = await agent.run(agent.free_bytes)
        if free - length < agent.reserve_free_bytes:
            raise web.HTTPInsufficientStorage(
                text=f"free space {free} minus {length} is below the reserve {agent.reserve_free_bytes}"
            )
        writer = await agent.run(replica.open_writer, key)
        got, body = await _stream_body(agent, request, writer, length, keep=commit, ns=ns, key=key)
        if got != expected:
            _event(logging.WARNING, "checksum mismatch, dropped", ns=ns, key=key, expected=expected, got=got)
            raise web.HTTPUnprocessableEntity(text=f"checksum mismatch: received {got}, header says {expected}")
        if commit:
            await agent.run(_check_commit, agent, ns, replica, key, body)
        try:
            await agent.run(writer.finish, commit)
        except StepExistsError:
            writer = None
            # Retrying a commit whose answer was lost must succeed, if it is the same record.
            if not (commit and await agent.run(replica._holds, key, body)):
                raise
            return web.Response(status=201, text="ok (identical commit exists)")
        writer = None
        if not commit:
            agent.verified[(ns, key)] = (length, expected)
        _event(logging.INFO, "committed" if commit else "stored", ns=ns, key=key, bytes=length)
        return web.Response(status=201, text="ok")
    finally:
        agent.uploads -= 1
        if writer is not None:
            await agent.run(writer.abort)


async def _get_object(request: web.Request) -> web.StreamResponse:
    """Object bytes, whole or one ``Range``; ``HEAD`` answers the headers only."""
    agent = request.app[AGENT]
    ns, key = _split(request)
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
        await resp.write_eof()
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
    return web.json_response(await agent.run(agent.replica(ns).list_prefix, prefix))


async def _delete_object(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    ns, key = _split(request)
    await agent.run(agent.replica(ns).delete, key)
    agent.verified.pop((ns, key), None)
    return web.Response(status=204)


async def _delete_prefix(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    ns, prefix = _split(request)
    await agent.run(agent.replica(ns).delete_prefix, prefix)
    under = prefix.rstrip("/") + "/"
    for k in [k for k in agent.verified if k[0] == ns and k[1].startswith(under)]:
        del agent.verified[k]
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
    return app


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


def _file_matches(agent: Agent, ns: str, replica: LocalReplica, key: str, size: int, csum: str) -> str | None:
    """None if ``key`` is present with ``size`` and ``csum``; else what is wrong."""
    if agent.verified.get((ns, key)) == (size, csum):
        if replica.size(key) == size:
            return None
    have = replica.size(key)
    if have is None:
        return f"{key} is missing"
    if have != size:
        return f"{key} has {have} bytes, expected {size}"
    hasher = Hasher()
    fd = replica._open_read(key)
    try:
        pos = 0
        while pos < size:
            chunk = os.pread(fd, CHUNK_BYTES, pos)
            if not chunk:
                break
            hasher.update(chunk)
            pos += len(chunk)
    finally:
        os.close(fd)
    if hasher.hexdigest() != csum:
        return f"{key} does not match its checksum"
    agent.verified[(ns, key)] = (size, csum)
    return None


def _check_commit(agent: Agent, ns: str, replica: LocalReplica, key: str, body: bytes) -> None:
    """Refuse a commit unless every rank manifest and object it names is here and verifies."""
    commit = parse_commit(body, key)
    problems = []
    for ref in commit.ranks:
        why = _file_matches(agent, ns, replica, ref.key, ref.size, ref.checksum)
        if why:
            problems.append(why)
            continue
        manifest = parse_rank_manifest(replica.get(ref.key, MAX_MANIFEST_BYTES), ref.key)
        for obj in manifest.objects:
            why = _file_matches(agent, ns, replica, obj.key, obj.size, obj.checksum)
            if why:
                problems.append(why)
    if problems:
        raise web.HTTPConflict(text="commit refused: " + "; ".join(problems[:20]))


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
            auth=agent.token is not None,
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
    tls_cert: str | None = None,
    tls_key: str | None = None,
    log_level: str | int = "info",
    **limits: Any,
) -> None:
    """Run the agent until SIGTERM/SIGINT.

    Raises :class:`AgentConfigError` before creating anything for options that cannot work: a
    non-loopback address without a token, half a TLS setup or unreadable TLS files, a root that
    cannot be created, an address it cannot listen on. ``limits`` go to :class:`Agent`.
    """
    if not token and host not in LOOPBACK_HOSTS:
        raise AgentConfigError(
            f"refusing to listen on {host} without a token: pass --token-file FILE or set {wire.TOKEN_ENV} "
            "(the agent is a network service)"
        )
    _log_to_stderr(log_level)
    ssl_ctx = _tls_context(tls_cert, tls_key)
    try:
        agent = Agent(root, token=token, **limits)
    except OSError as exc:
        raise AgentConfigError(f"--root {root}: cannot use it as the agent's root: {exc.strerror or exc}") from exc
    try:
        asyncio.run(_run(agent, host, port, ssl_ctx))
    finally:
        agent.pool.shutdown(wait=True)
