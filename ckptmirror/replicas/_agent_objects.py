"""The peer agent's handlers of the routes that read, list or delete what a namespace holds,
and its scrub report.

Apart from the uploads (:mod:`._agent_upload`): none of these admits bytes, and the middleware
(:mod:`._agent_guard`) tells namespace-only routes by these handlers.
"""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web

from ..format import COMMIT_NAME, parse_step_dir
from . import _peer_protocol as wire
from ._agent_state import AGENT, CHUNK_BYTES, _refuse_hidden, _split
from ._scrub import drop_held
from .base import validate_key

log = logging.getLogger("ckptmirror")


async def _scrub_results(request: web.Request) -> web.Response:
    """``GET /v1/scrub/<ns>``: the scrubber's latest results for ``ns`` (see ``_peer_protocol``)."""
    agent = request.app[AGENT]
    ns = request.match_info[wire.TAIL]
    validate_key(ns, "agent namespace")
    _refuse_hidden(ns)
    if agent.scrubber is None:
        raise web.HTTPNotFound(text="this agent does not scrub (ckptmirror serve --scrub-interval)")
    return web.json_response(agent.scrubber.namespace_report(ns))


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
            try:
                # A client that stops reading would hold this chunk, the descriptor and the
                # connection for good (aiohttp's keep-alive timer does not cover a request in
                # progress): 100 such clients held 1.2 GB. It gets --idle-timeout-s per chunk.
                await asyncio.wait_for(resp.write(chunk), agent.idle_timeout_s)
            except asyncio.TimeoutError:
                log.warning(
                    "GET %s/%s: the client took no data for %g s (--idle-timeout-s); connection closed",
                    ns,
                    key,
                    agent.idle_timeout_s,
                )
                if request.transport is not None:
                    request.transport.abort()
                raise ConnectionResetError(f"client stopped reading {ns}/{key}") from None
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
