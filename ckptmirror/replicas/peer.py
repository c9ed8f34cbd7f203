"""Peer replica (``peer://host:port/namespace``): a ``ckptmirror serve`` agent on another node.

A blocking HTTP/1.1 client (``http.client``, one keep-alive connection per thread) because the
Replica interface is called from writer threads. Bodies are sent straight from the staging
buffer (no copy) and read straight into the caller's buffer (``readinto``). Every call has a
socket timeout (``timeout_s``): a stalled or reset connection fails the call, and the mirror
marks the peer degraded until its health endpoint answers again.

Token: the ``token=`` option, else the file named by ``token_file=``, else the environment
variable ``CKPTMIRROR_PEER_TOKEN``; it must equal the agent's (``--token-file`` or the same
variable). A missing or wrong token raises :class:`~ckptmirror.errors.ReplicaPermissionError`
(a configuration error: ``Mirror()`` raises it at once); an agent that is not running raises
:class:`~ckptmirror.errors.ReplicaUnavailableError` (an outage: the peer is degraded until it
answers). TLS: use ``peers://`` (or ``tls=True``) with ``cafile=`` for a private CA.

The wire rules (paths, headers, statuses) are in :mod:`ckptmirror.replicas._peer_protocol`.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import threading
from typing import Any
from urllib.parse import urlparse

from ..checksum import checksum
from ..errors import CorruptObjectError, ReplicaConfigError, ReplicaError, ReplicaUnavailableError
from . import _peer_protocol as wire
from ._peer_protocol import LOOPBACK_HOSTS, TOKEN_ENV
from .base import Buffer, Replica, validate_key

__all__ = ["TOKEN_ENV", "PeerReplica"]


class PeerReplica(Replica):
    """Client of a peer agent (``peer://host:port/namespace``, ``peers://`` for TLS).

    ``token``, ``token_file``: the shared secret (see the module docstring for the order);
    ``timeout_s``: the socket timeout of every call; ``tls``, ``cafile``: TLS and its CA bundle.
    """

    read_priority = 20
    heartbeat = True

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_file: str | None = None,
        timeout_s: float = 30.0,
        tls: bool | None = None,
        cafile: str | None = None,
    ) -> None:
        super().__init__(url)
        parsed = urlparse(url)
        if parsed.scheme not in ("peer", "peers") or not parsed.hostname:
            raise ValueError(f"peer URL must look like peer://host:port/namespace, got {url!r}")
        self.host = parsed.hostname
        self.port = parsed.port or wire.DEFAULT_PORT
        self.namespace = parsed.path.strip("/") or "default"
        validate_key(self.namespace, url)
        self.depth = len(self.namespace.split("/"))
        self.token, self.token_source = self._resolve_token(token, token_file)
        self.timeout_s = timeout_s
        self.tls = (parsed.scheme == "peers") if tls is None else tls
        self.ssl_ctx = ssl.create_default_context(cafile=cafile) if self.tls else None
        self._local = threading.local()

    def _resolve_token(self, token: str | None, token_file: str | None) -> tuple[str | None, str | None]:
        """(token, where it came from, for error messages); (None, None) when none was given."""
        if token is not None:
            return token, "the token given as token="
        if token_file:
            try:
                return wire.read_token_file(token_file), f"the token read from token_file={token_file!r}"
            except (OSError, UnicodeDecodeError) as exc:
                # Raised at construction, by Mirror(): a typo in the path is not an outage.
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ReplicaConfigError(
                    f"cannot read token_file={token_file!r}: {why}; it must hold the agent's token "
                    f"(the same as its --token-file or {TOKEN_ENV})",
                    replica=self.url,
                ) from exc
        env = os.environ.get(TOKEN_ENV)
        if env is not None:
            return env, f"the token from the environment variable {TOKEN_ENV}"
        return None, None

    def _denied(self, status: int, text: str) -> str:
        """The message of an authentication rejection: which token was used, and the fix."""
        if self.token_source is None:
            what = f"the agent requires a token and none was given (not as token=, in {TOKEN_ENV}, nor in token_file=)"
        elif not self.token:
            what = f"the agent requires a token and {self.token_source} is empty"
        else:
            what = f"the agent refused {self.token_source}"
        return (
            f"{what} (HTTP {status}: {text or 'no body'}); pass the agent's token as token=, in {TOKEN_ENV} "
            f"or as token_file= (e.g. storage_options={{'peer': {{'token_file': PATH}}}}): it must match "
            f"the agent's --token-file or {TOKEN_ENV}"
        )

    def _serve_hint(self) -> str:
        """The command that would start the missing agent on this host:port."""
        host = "" if self.host in LOOPBACK_HOSTS else " --host 0.0.0.0"
        tls = " --tls-cert CERT --tls-key KEY" if self.tls else ""
        return f"ckptmirror serve --root DIR{host} --port {self.port} --token-file FILE{tls}"

    # -- transport -----------------------------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.tls:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s, context=self.ssl_ctx)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _request(
        self,
        method: str,
        path: str,
        key: str,
        body: Buffer | None = None,
        headers: dict[str, str] | None = None,
        idempotent: bool = True,
    ) -> http.client.HTTPResponse:
        hdrs = {wire.DEPTH_HEADER: str(self.depth)}
        if self.token:
            hdrs[wire.AUTHORIZATION] = wire.bearer(self.token)
        hdrs.update(headers or {})
        if body is not None:
            hdrs["Content-Length"] = str(len(memoryview(body).cast("B")))
        for attempt in (0, 1):
            conn = self._conn()
            try:
                conn.request(method, path, body=memoryview(body).cast("B") if body is not None else None, headers=hdrs)
                return conn.getresponse()
            except ConnectionRefusedError as exc:
                # Nothing listens there: an outage (the peer is degraded and probed), but most
                # often in the first hour an agent nobody started. Say how to start it.
                self._drop()
                raise ReplicaUnavailableError(
                    f"no agent is listening on {self.host}:{self.port} (connection refused); "
                    f"start one there: {self._serve_hint()}",
                    replica=self.url,
                    key=key,
                ) from exc
            except socket.gaierror as exc:
                self._drop()
                raise ReplicaUnavailableError(
                    f"agent not reachable: cannot resolve host {self.host!r}: {exc}", replica=self.url, key=key
                ) from exc
            except ssl.SSLError as exc:
                # A setup problem (unknown CA, plain agent), not a passing fault.
                self._drop()
                raise ReplicaUnavailableError(f"TLS handshake failed: {exc}", replica=self.url, key=key) from exc
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                # A kept-alive connection the agent closed: retry once on a fresh one.
                self._drop()
                if attempt or not idempotent and not isinstance(exc, http.client.RemoteDisconnected):
                    hint = "" if self.tls else " (if the agent uses TLS, use a peers:// URL)"
                    raise ReplicaError(f"connection to agent lost: {exc}{hint}", replica=self.url, key=key) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                what = (
                    "timed out"
                    if isinstance(exc, (socket.timeout, TimeoutError))
                    else f"failed: {type(exc).__name__}: {exc}"
                )
                raise ReplicaError(f"{method} {what}", replica=self.url, key=key) from exc
        raise AssertionError("unreachable")

    def _path(self, op: str, key: str = "") -> str:
        return wire.request_path(op, self.namespace, key)

    def _check(self, resp: http.client.HTTPResponse, key: str, ok: tuple[int, ...] = (200, 201, 204, 206)) -> None:
        if resp.status in ok:
            return
        text = resp.read(4096).decode("utf-8", "replace").strip()
        raise wire.error_for_status(
            resp.status, text, replica=self.url, key=key, denied=self._denied(resp.status, text)
        )

    def _call(self, method: str, path: str, key: str, **kw: Any) -> bytes:
        resp = self._request(method, path, key, **kw)
        try:
            self._check(resp, key)
            return resp.read()
        except BaseException:
            self._drop()
            raise

    # -- Replica -------------------------------------------------------------------------
    def put(self, key: str, data: Buffer) -> None:
        validate_key(key, self.url)
        self._call(
            "PUT",
            self._path(wire.OP_OBJECT, key),
            key,
            body=data,
            headers={wire.CHECKSUM_HEADER: checksum(data)},
            idempotent=True,
        )

    def commit(self, key: str, data: bytes) -> None:
        validate_key(key, self.url)
        self._call(
            "PUT",
            self._path(wire.OP_COMMIT, key),
            key,
            body=data,
            headers={wire.CHECKSUM_HEADER: checksum(data)},
            idempotent=False,
        )

    def get(self, key: str, max_bytes: int) -> bytes:
        validate_key(key, self.url)
        resp = self._request("GET", self._path(wire.OP_OBJECT, key), key)
        try:
            self._check(resp, key)
            size = int(resp.getheader("Content-Length") or -1)
            if size > max_bytes:
                raise CorruptObjectError(
                    f"object is {size} bytes, more than the {max_bytes} allowed", replica=self.url, key=key
                )
            return resp.read()
        except BaseException:
            self._drop()
            raise

    def read_into(self, key: str, out: memoryview) -> None:
        validate_key(key, self.url)
        view = out.cast("B") if out.format != "B" else out
        resp = self._request("GET", self._path(wire.OP_OBJECT, key), key)
        try:
            self._check(resp, key)
            size = int(resp.getheader("Content-Length") or -1)
            if size != len(view):
                raise CorruptObjectError(f"size is {size} bytes, manifest says {len(view)}", replica=self.url, key=key)
            done = 0
            while done < len(view):
                n = resp.readinto(view[done:])
                if not n:
                    raise CorruptObjectError(
                        f"connection ended after {done} of {len(view)} bytes", replica=self.url, key=key
                    )
                done += n
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            if isinstance(exc, ReplicaError):
                raise
            raise ReplicaError(f"read failed: {type(exc).__name__}: {exc}", replica=self.url, key=key) from exc
        except BaseException:
            self._drop()
            raise

    def size(self, key: str) -> int | None:
        validate_key(key, self.url)
        resp = self._request("HEAD", self._path(wire.OP_OBJECT, key), key)
        resp.read()
        if resp.status == 404:
            return None
        self._check(resp, key)
        return int(resp.getheader(wire.SIZE_HEADER) or resp.getheader("Content-Length") or 0)

    def list_steps(self) -> list[str]:
        return list(json.loads(self._call("GET", self._path(wire.OP_STEPS), "")))

    def list_prefix(self, prefix: str) -> list[str]:
        validate_key(prefix.rstrip("/"), self.url)
        return list(json.loads(self._call("GET", self._path(wire.OP_LIST, prefix.rstrip("/")), prefix)))

    def delete(self, key: str) -> None:
        validate_key(key, self.url)
        self._call("DELETE", self._path(wire.OP_OBJECT, key), key)

    def delete_prefix(self, prefix: str) -> None:
        validate_key(prefix.rstrip("/"), self.url)
        self._call("DELETE", self._path(wire.OP_PREFIX, prefix.rstrip("/")), prefix)

    def health(self) -> dict[str, Any]:
        """The agent's health document (version, free space, uploads in flight)."""
        return dict(json.loads(self._call("GET", wire.HEALTH_PATH, "")))

    def ping(self) -> None:
        self.health()

    def close(self) -> None:
        self._drop()
