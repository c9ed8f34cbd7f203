"""Peer replica (``peer://host:port/namespace``): a ``ckptmirror serve`` agent on another node.

A blocking HTTP/1.1 client (``http.client``, one keep-alive connection per thread) because the
Replica interface is called from writer threads. Bodies are sent straight from the staging
buffer (no copy) and read straight into the caller's buffer (``readinto``). Every call has a
socket timeout (``timeout_s``): a stalled or reset connection fails the call, and the mirror
marks the peer degraded until its health endpoint answers again.

Token: ``token=`` option, else ``CKPTMIRROR_PEER_TOKEN``, else ``token_file=``. TLS: use
``peers://`` (or ``tls=True``) with ``cafile=`` for a private CA.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import threading
from typing import Any
from urllib.parse import quote, urlparse

from ..checksum import checksum
from ..errors import CorruptObjectError, ObjectMissingError, ReplicaError, ReplicaUnavailableError, StepExistsError
from .base import Buffer, Replica, step_of_key, validate_key

TOKEN_ENV = "CKPTMIRROR_PEER_TOKEN"


class PeerReplica(Replica):
    """Client of a peer agent."""

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
        self.port = parsed.port or 7070
        self.namespace = parsed.path.strip("/") or "default"
        validate_key(self.namespace, url)
        self.depth = len(self.namespace.split("/"))
        if token is None and token_file:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout_s = timeout_s
        self.tls = (parsed.scheme == "peers") if tls is None else tls
        self.ssl_ctx = ssl.create_default_context(cafile=cafile) if self.tls else None
        self._local = threading.local()

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
        hdrs = {"X-Ckptmirror-Namespace-Depth": str(self.depth)}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        hdrs.update(headers or {})
        if body is not None:
            hdrs["Content-Length"] = str(len(memoryview(body).cast("B")))
        for attempt in (0, 1):
            conn = self._conn()
            try:
                conn.request(method, path, body=memoryview(body).cast("B") if body is not None else None, headers=hdrs)
                return conn.getresponse()
            except (ConnectionRefusedError, socket.gaierror) as exc:
                self._drop()
                raise ReplicaUnavailableError(f"agent not reachable: {exc}", replica=self.url, key=key) from exc
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
        ns = quote(self.namespace)
        return f"/v1/{op}/{ns}/{quote(key)}" if key else f"/v1/{op}/{ns}"

    def _check(self, resp: http.client.HTTPResponse, key: str, ok: tuple[int, ...] = (200, 201, 204, 206)) -> None:
        if resp.status in ok:
            return
        text = resp.read(4096).decode("utf-8", "replace").strip()
        if resp.status == 404:
            raise ObjectMissingError("not found", replica=self.url, key=key)
        if resp.status == 412:
            raise StepExistsError(step_of_key(key), self.url)
        if resp.status == 422:
            raise CorruptObjectError(f"agent rejected the body: {text}", replica=self.url, key=key)
        if resp.status in (401, 403):
            raise ReplicaUnavailableError(
                f"agent refused the token (HTTP {resp.status}): {text}", replica=self.url, key=key
            )
        raise ReplicaError(f"agent answered HTTP {resp.status}: {text}", replica=self.url, key=key)

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
            self._path("o", key),
            key,
            body=data,
            headers={"X-Ckptmirror-Checksum": checksum(data)},
            idempotent=True,
        )

    def commit(self, key: str, data: bytes) -> None:
        validate_key(key, self.url)
        self._call(
            "PUT",
            self._path("commit", key),
            key,
            body=data,
            headers={"X-Ckptmirror-Checksum": checksum(data)},
            idempotent=False,
        )

    def get(self, key: str, max_bytes: int) -> bytes:
        validate_key(key, self.url)
        resp = self._request("GET", self._path("o", key), key)
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
        resp = self._request("GET", self._path("o", key), key)
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
        resp = self._request("HEAD", self._path("o", key), key)
        resp.read()
        if resp.status == 404:
            return None
        self._check(resp, key)
        return int(resp.getheader("X-Ckptmirror-Size") or resp.getheader("Content-Length") or 0)

    def list_steps(self) -> list[str]:
        return list(json.loads(self._call("GET", self._path("steps"), "")))

    def list_prefix(self, prefix: str) -> list[str]:
        validate_key(prefix.rstrip("/"), self.url)
        return list(json.loads(self._call("GET", self._path("list", prefix.rstrip("/")), prefix)))

    def delete(self, key: str) -> None:
        validate_key(key, self.url)
        self._call("DELETE", self._path("o", key), key)

    def delete_prefix(self, prefix: str) -> None:
        validate_key(prefix.rstrip("/"), self.url)
        self._call("DELETE", self._path("prefix", prefix.rstrip("/")), prefix)

    def health(self) -> dict[str, Any]:
        """The agent's health document (version, free space, uploads in flight)."""
        return dict(json.loads(self._call("GET", "/v1/health", "")))

    def ping(self) -> None:
        self.health()

    def close(self) -> None:
        self._drop()
