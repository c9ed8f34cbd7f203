"""The peer agent's middleware: which token may reach which route and namespace, and library
errors turned into statuses.

Apart because it is the one place that decides access; the handlers never check tokens
(the upload handlers only ask :func:`_root_for` what an error message may reveal).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from aiohttp import web

from ..errors import CkptMirrorError, ManifestError
from . import _peer_protocol as wire
from ._agent_config import NamespaceToken
from ._agent_log import _event, log
from ._agent_objects import _scrub_results, _steps
from ._agent_state import AGENT, Agent, _split
from .base import validate_key


def _namespace_of(request: web.Request) -> str | None:
    """The namespace a request acts on; None for one that names none (health, unknown paths)."""
    tail = request.match_info.get(wire.TAIL)
    if tail is None:
        return None
    if request.match_info.route.handler in (_steps, _scrub_results):
        return tail  # /v1/steps/<ns>, /v1/scrub/<ns>: the whole tail is the namespace
    return _split(request)[0]


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
