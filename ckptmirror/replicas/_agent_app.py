"""The peer agent's aiohttp application: the route table (:func:`build_app`), the agent-wide
routes (``/v1/health``, ``/metrics``), and the scrubber's start and stop with the app.

Apart so that the handler modules need not know each other: this one puts them together.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from .._version import __version__
from ..format import MAX_MANIFEST_BYTES
from . import _peer_protocol as wire
from ._agent_guard import _covers, _guard
from ._agent_metrics import CONTENT_TYPE
from ._agent_objects import _delete_object, _delete_prefix, _get_object, _list_prefix, _scrub_results, _steps
from ._agent_state import AGENT, Agent
from ._agent_upload import _put_commit, _put_object

__all__ = ["build_app"]


async def _health(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    free = await agent.run(agent.free_bytes)
    write_error = await agent.run(agent.write_error)
    return web.json_response(
        {
            "version": __version__,
            "free_bytes": free,
            "uploads_in_flight": agent.uploads,
            "reserve_free_bytes": agent.reserve_free_bytes,
            wire.RESERVED_BYTES_FIELD: agent.space.pending,
            wire.WRITE_ERROR_FIELD: write_error,
            "scrub": agent.scrubber.summary(_covers(agent, request)) if agent.scrubber else None,
        }
    )


async def _metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: rendered on an I/O thread (it stats every namespace's newest steps)."""
    agent = request.app[AGENT]
    body = await agent.run(agent.metrics.render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


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
