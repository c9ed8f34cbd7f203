"""``ckptmirror serve``: the peer agent that keeps replicas for other nodes.

An aiohttp server over a root directory (a disk, or a tmpfs for a RAM tier). Each peer URL
``peer://host:port/<namespace>`` maps to ``<root>/<namespace>``; inside it, the layout is the
same as a local replica, written by the same :class:`~ckptmirror.replicas.local.LocalReplica`
code (temp file, fsync, rename, directory fsync).

Protocol (HTTP/1.1; every request needs ``Authorization: Bearer <token>`` when a token is set):

==========================================  ====================================================
``GET  /v1/health``                          ``{"version", "free_bytes", "uploads_in_flight"}``
``PUT  /v1/o/<ns>/<key>``                    body streamed to disk; ``X-Ckptmirror-Checksum`` and
                                             ``Content-Length`` required, verified while receiving
``PUT  /v1/commit/<ns>/<key>``               commit record; accepted only if every manifest and
                                             object it names is present and verified; 412 if it exists
``GET  /v1/o/<ns>/<key>`` (``Range``)         object bytes; ``HEAD`` for the size
``GET  /v1/steps/<ns>``                      step directories
``GET  /v1/list/<ns>/<prefix>``              keys under a prefix
``DELETE /v1/o/<ns>/<key>``, ``/v1/prefix/<ns>/<prefix>``
==========================================  ====================================================

Statuses: 401 missing token, 403 wrong token, 400 bad name/header, 404 absent, 408 idle client,
409 commit names something absent or unverified, 411 no length, 412 commit exists, 413 too
large, 422 checksum/size mismatch, 503 too many uploads, 507 below the free-space reserve.
Every path is derived here from validated names; symlinks are never followed out of the root.
"""

from __future__ import annotations

import asyncio
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
from ..errors import (
    CkptMirrorError,
    CorruptObjectError,
    ManifestError,
    ObjectMissingError,
    ReplicaPermissionError,
    StepExistsError,
)
from ..format import MAX_MANIFEST_BYTES, TMP_PREFIX, parse_commit, parse_rank_manifest
from .base import validate_key
from .local import LocalReplica

log = logging.getLogger("ckptmirror.agent")

CHUNK_BYTES = 4 << 20
#: Commit records are buffered in memory to be checked; they are ~100 bytes per rank.
MAX_COMMIT_BYTES = 16 << 20
CHECKSUM_HEADER = "X-Ckptmirror-Checksum"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


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


def _split(request: web.Request) -> tuple[str, str]:
    """(namespace, key) from ``/v1/<op>/<ns...>/<key...>``: the namespace has as many segments as
    ``X-Ckptmirror-Namespace-Depth`` says (default 1)."""
    tail = request.match_info["tail"]
    try:
        depth = int(request.headers.get("X-Ckptmirror-Namespace-Depth", "1"))
    except ValueError:
        raise web.HTTPBadRequest(text="bad namespace depth") from None
    parts = tail.split("/")
    if not 1 <= depth < len(parts):
        raise web.HTTPBadRequest(text="bad path")
    return "/".join(parts[:depth]), "/".join(parts[depth:])


def _error(exc: BaseException) -> web.HTTPException:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ManifestError):
        return web.HTTPBadRequest(text=text)
    if isinstance(exc, ObjectMissingError):
        return web.HTTPNotFound(text=text)
    if isinstance(exc, StepExistsError):
        return web.HTTPPreconditionFailed(text=text)
    if isinstance(exc, CorruptObjectError):
        return web.HTTPUnprocessableEntity(text=text)
    if isinstance(exc, ReplicaPermissionError):
        return web.HTTPForbidden(text=text)
    return web.HTTPInternalServerError(text=text)


def build_app(agent: Agent) -> web.Application:
    """The aiohttp application for ``agent`` (used by ``serve`` and by tests)."""

    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if agent.token is not None:
            header = request.headers.get("Authorization", "")
            if not header.startswith("Bearer "):
                _event(logging.WARNING, "rejected: missing token", peer=request.remote, path=request.path)
                raise web.HTTPUnauthorized(text="missing bearer token", headers={"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(header[7:].encode(), agent.token):
                _event(logging.WARNING, "rejected: wrong token", peer=request.remote, path=request.path)
                raise web.HTTPForbidden(text="wrong token")
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except CkptMirrorError as exc:
            raise _error(exc) from exc

    async def health(request: web.Request) -> web.Response:
        free = await agent.run(agent.free_bytes)
        return web.json_response(
            {
                "version": __version__,
                "free_bytes": free,
                "uploads_in_flight": agent.uploads,
                "reserve_free_bytes": agent.reserve_free_bytes,
            }
        )

    async def put_object(request: web.Request) -> web.Response:
        ns, key = _split(request)
        return await _receive(request, ns, key, commit=False)

    async def put_commit(request: web.Request) -> web.Response:
        ns, key = _split(request)
        return await _receive(request, ns, key, commit=True)

    async def _receive(request: web.Request, ns: str, key: str, commit: bool) -> web.Response:
        validate_key(key, "agent")
        replica = agent.replica(ns)
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
        if agent.uploads >= agent.max_uploads:
            raise web.HTTPServiceUnavailable(
                text=f"too many uploads in flight ({agent.max_uploads})", headers={"Retry-After": "1"}
            )
        agent.uploads += 1  # reserve the slot before the first await
        writer = None
        try:
            free = await agent.run(agent.free_bytes)
            if free - length < agent.reserve_free_bytes:
                raise web.HTTPInsufficientStorage(
                    text=f"free space {free} minus {length} is below the reserve {agent.reserve_free_bytes}"
                )
            writer = await agent.run(replica.open_writer, key)
            hasher = Hasher()
            body = bytearray() if commit else None
            received = 0
            while received < length:
                try:
                    chunk = await asyncio.wait_for(
                        request.content.read(min(CHUNK_BYTES, length - received)), agent.idle_timeout_s
                    )
                except asyncio.TimeoutError:
                    _event(
                        logging.WARNING, "upload idle, dropped", ns=ns, key=key, received=received, peer=request.remote
                    )
                    raise web.HTTPRequestTimeout(text=f"no data for {agent.idle_timeout_s} s") from None
                if not chunk:
                    break
                received += len(chunk)
                if body is not None:
                    body += chunk
                await agent.run(_hash_write, hasher, writer, chunk)
            if received != length:
                raise web.HTTPBadRequest(text=f"body ended after {received} of {length} bytes")
            got = hasher.hexdigest()
            if got != expected:
                _event(logging.WARNING, "checksum mismatch, dropped", ns=ns, key=key, expected=expected, got=got)
                raise web.HTTPUnprocessableEntity(text=f"checksum mismatch: received {got}, header says {expected}")
            if commit:
                assert body is not None
                await agent.run(_check_commit, agent, ns, replica, key, bytes(body))
            try:
                await agent.run(writer.finish, commit)
            except StepExistsError:
                writer = None
                if not (commit and await agent.run(replica._holds, key, bytes(body or b""))):
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

    async def get_object(request: web.Request) -> web.StreamResponse:
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
            headers = {"Content-Length": str(end - start), "Accept-Ranges": "bytes", "X-Ckptmirror-Size": str(size)}
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

    async def steps(request: web.Request) -> web.Response:
        ns = request.match_info["tail"]
        return web.json_response(await agent.run(agent.replica(ns).list_steps))

    async def list_prefix(request: web.Request) -> web.Response:
        ns, prefix = _split(request)
        return web.json_response(await agent.run(agent.replica(ns).list_prefix, prefix))

    async def delete_object(request: web.Request) -> web.Response:
        ns, key = _split(request)
        await agent.run(agent.replica(ns).delete, key)
        agent.verified.pop((ns, key), None)
        return web.Response(status=204)

    async def delete_prefix(request: web.Request) -> web.Response:
        ns, prefix = _split(request)
        await agent.run(agent.replica(ns).delete_prefix, prefix)
        for k in [k for k in agent.verified if k[0] == ns and k[1].startswith(prefix.rstrip("/") + "/")]:
            del agent.verified[k]
        return web.Response(status=204)

    app = web.Application(middlewares=[auth], client_max_size=MAX_MANIFEST_BYTES)
    app.router.add_get("/v1/health", health)
    app.router.add_put("/v1/o/{tail:.+}", put_object)
    app.router.add_put("/v1/commit/{tail:.+}", put_commit)
    app.router.add_get("/v1/o/{tail:.+}", get_object)  # also answers HEAD
    app.router.add_get("/v1/steps/{tail:.+}", steps)
    app.router.add_get("/v1/list/{tail:.+}", list_prefix)
    app.router.add_delete("/v1/o/{tail:.+}", delete_object)
    app.router.add_delete("/v1/prefix/{tail:.+}", delete_prefix)
    return app


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


def serve(
    root: str,
    host: str = "127.0.0.1",
    port: int = 7070,
    *,
    token: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    **limits: Any,
) -> None:
    """Run the agent until SIGTERM/SIGINT. Refuses a non-loopback address without a token."""
    if token is None and host not in LOOPBACK:
        raise ValueError(
            f"refusing to listen on {host} without a token: pass --token-file (the agent is a network service)"
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    agent = Agent(root, token=token, **limits)
    ssl_ctx = None
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(tls_cert, tls_key)

    async def main() -> None:
        runner = web.AppRunner(
            build_app(agent), access_log=None, keepalive_timeout=agent.idle_timeout_s, shutdown_timeout=2.0
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx, backlog=128)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        _event(
            logging.INFO,
            "listening",
            host=host,
            port=bound,
            root=agent.root,
            tls=ssl_ctx is not None,
            auth=token is not None,
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
        await runner.cleanup()
        agent.pool.shutdown(wait=True)

    asyncio.run(main())
