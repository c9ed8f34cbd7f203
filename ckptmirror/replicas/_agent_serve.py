"""``ckptmirror serve``'s process side: checks before anything starts (token, TLS, root), the
listening socket and its one stdout line, and the run until SIGTERM/SIGINT.

Apart from the application (:mod:`._agent_app`): :func:`build_app` makes one without a socket.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import ssl
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from .._version import __version__
from . import _peer_protocol as wire
from ._agent_app import build_app
from ._agent_config import AgentConfigError
from ._agent_log import _event, _log_to_stderr
from ._agent_state import Agent
from ._peer_protocol import LOOPBACK_HOSTS

__all__ = ["serve"]


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
