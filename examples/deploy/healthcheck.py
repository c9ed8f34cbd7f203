#!/usr/bin/env python3
"""Health check of ``ckptmirror serve`` agents: ``GET /v1/health`` on each, with a token.

Used by the container image's HEALTHCHECK and by the Slurm recipe to wait for every node's
agent before training starts. Standard library only (it runs where only Python is installed)::

    python healthcheck.py --token-file /run/secrets/ckptmirror_metrics_token 127.0.0.1:7070
    python healthcheck.py --token-file ~/.config/ckptmirror/token --wait 120 node0:7070 node1:7070

The agent asks for a token on ``/v1/health`` whenever it has an admin or namespace token; any
token it knows will do, so give it the read-only one (``--metrics-token-file``) where there is
one. The token comes from ``--token-file``, else from ``CKPTMIRROR_PEER_TOKEN``.

Exit status: 0 when every agent answered 200 (within ``--wait`` seconds), 1 otherwise. One line
per agent on stdout: ``HOST:PORT ok version=... free_bytes=... uploads_in_flight=...`` (with
``scrub_damaged=N`` when the agent scrubs), or ``HOST:PORT down: <why>``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
import time

#: The agent's health route (``ckptmirror.replicas._peer_protocol.HEALTH_PATH``).
HEALTH_PATH = "/v1/health"
#: The environment variable the client library and the agent read the token from.
TOKEN_ENV = "CKPTMIRROR_PEER_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="GET /v1/health on ckptmirror serve agents; exit 0 when all answer.")
    p.add_argument("agents", nargs="+", metavar="HOST:PORT", help="agents to check ([::1]:7070 for IPv6)")
    p.add_argument("--token-file", metavar="FILE", help=f"file holding a token the agents know (else ${TOKEN_ENV})")
    p.add_argument("--wait", type=float, default=0.0, metavar="S", help="retry until every agent answers, at most S s")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="per-request timeout (default 5 s)")
    p.add_argument("--tls", action="store_true", help="HTTPS (agents started with --tls-cert/--tls-key)")
    p.add_argument("--cafile", metavar="FILE", help="CA bundle for --tls (a private CA)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing; only the exit status")
    return p


def split_address(agent: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port)."""
    host, sep, port = agent.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{agent!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def check(agent: str, token: str | None, timeout: float, tls: bool, cafile: str | None) -> tuple[bool, str]:
    """(ok, one line) for one agent."""
    try:
        host, port = split_address(agent)
        conn: http.client.HTTPConnection
        if tls:
            ctx = ssl.create_default_context(cafile=cafile)
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            conn.request("GET", HEALTH_PATH, headers=headers)
            resp = conn.getresponse()
            body = resp.read(1 << 20)
        finally:
            conn.close()
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return False, f"{agent} down: {exc}"
    if resp.status != 200:
        text = body.decode("utf-8", "replace").strip()[:200]
        return False, f"{agent} down: HTTP {resp.status} {text}"
    try:
        doc = json.loads(body)
        line = (
            f"{agent} ok version={doc['version']} free_bytes={doc['free_bytes']} "
            f"uploads_in_flight={doc['uploads_in_flight']}"
        )
    except (ValueError, KeyError, TypeError):
        return False, f"{agent} down: the answer is not the agent's health document"
    scrub = doc.get("scrub")
    if isinstance(scrub, dict):
        line += f" scrub_damaged={scrub.get('damaged_count', 0)}"
    return True, line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            print(f"healthcheck: --token-file {args.token_file}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    else:
        token = (os.environ.get(TOKEN_ENV) or "").strip() or None
    deadline = time.monotonic() + max(0.0, args.wait)
    pending = list(args.agents)
    lines: dict[str, str] = {}
    while True:
        still = []
        for agent in pending:
            ok, lines[agent] = check(agent, token, args.timeout, args.tls, args.cafile)
            if not ok:
                still.append(agent)
        pending = still
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    if not args.quiet:
        for agent in args.agents:
            print(lines[agent], flush=True)
    return 0 if not pending else 1


if __name__ == "__main__":
    sys.exit(main())
