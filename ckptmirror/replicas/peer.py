"""Peer replica (``peer://host:port/namespace``): a ``ckptmirror serve`` agent on another node.

A blocking HTTP/1.1 client (``http.client``, one keep-alive connection per thread) because the
Replica interface is called from writer threads. Bodies are sent straight from the staging
buffer (no copy) and read straight into the caller's buffer (``readinto``).

Time budget: every operation has one deadline (:class:`~ckptmirror.replicas.base.TimeBudget`):
``connect_timeout_s`` (default 5 s) plus its body's bytes at ``min_bytes_per_s`` (default
1 MiB/s; a GET learns its size from the answer's headers). Every blocking step (connect, each
send, each read of the answer) may only wait what is left of it, so a peer that trickles one
byte per second fails as surely as one that never answers; either raises
:class:`~ckptmirror.errors.ReplicaUnavailableError` naming the peer, the operation, the key and
the budget, and the mirror marks the peer degraded until its health endpoint answers again. A
reset or closed connection is retried once, on a fresh connection, inside the same budget.
``timeout_s`` (the older option) still works: an extra limit on each single wait.

Token: the ``token=`` option, else the file named by ``token_file=``, else the environment
variable ``CKPTMIRROR_PEER_TOKEN``; it must equal the agent's (``--token-file`` or the same
variable). A missing or wrong token raises :class:`~ckptmirror.errors.ReplicaPermissionError`
(a configuration error: ``Mirror()`` raises it at once); an agent that is not running raises
:class:`~ckptmirror.errors.ReplicaUnavailableError` (an outage: the peer is degraded until it
answers). TLS: use ``peers://`` (or ``tls=True``) with ``cafile=`` for a private CA.

Scrub results: :meth:`PeerReplica.scrub_report` gives the agent's latest scrub results for the
namespace (``ckptmirror verify`` takes fresh ones instead of reading the objects again), or
raises :class:`ScrubUnavailableError` when the agent does not scrub or is too old to say.

Full agent: an upload the agent has no room for (its ``--reserve-free-bytes``, or a disk that
really filled) is answered 507, raised as a ReplicaError with ``errno == ENOSPC``; the health
check then keeps the peer degraded until :meth:`PeerReplica.probe_write` finds room in the
agent's health document for what the failed save needed.

The wire rules (paths, headers, statuses) are in :mod:`ckptmirror.replicas._peer_protocol`.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import ssl
import threading
import time
import weakref
from typing import Any
from urllib.parse import urlparse

from ..checksum import checksum
from ..errors import (
    CorruptObjectError,
    ObjectMissingError,
    ReplicaConfigError,
    ReplicaError,
    ReplicaUnavailableError,
    ReplicaURLError,
)
from . import _peer_protocol as wire
from ._peer_conn import SEND_PIECE, _BudgetSpent, _Connection, _DeadlineMixin, _Stalled, _TLSConnection
from ._peer_protocol import LOOPBACK_HOSTS, TOKEN_ENV
from .base import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MIN_BYTES_PER_S,
    Buffer,
    Deadline,
    Replica,
    TimeBudget,
    validate_key,
)

__all__ = ["TOKEN_ENV", "PeerReplica", "ScrubUnavailableError"]


class ScrubUnavailableError(ReplicaError):
    """The agent has no scrub results to give: it does not scrub (``ckptmirror serve`` without
    ``--scrub-interval``) or it is older than the ``GET /v1/scrub/`` route. Not an outage: the
    agent answered; whoever wanted its results reads the bytes instead."""


class PeerReplica(Replica):
    """Client of a peer agent (``peer://host:port/namespace``, ``peers://`` for TLS).

    ``token``, ``token_file``: the shared secret (see the module docstring for the order);
    ``connect_timeout_s`` (default 5 s), ``min_bytes_per_s`` (default 1 MiB/s): every operation's
    time budget, ``connect_timeout_s + body bytes / min_bytes_per_s``; ``timeout_s`` (older
    option, default None): an extra limit on each single wait; ``tls``, ``cafile``: TLS and its
    CA bundle.
    """

    read_priority = 20
    heartbeat = True
    budget: TimeBudget

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_file: str | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        min_bytes_per_s: float = DEFAULT_MIN_BYTES_PER_S,
        timeout_s: float | None = None,
        tls: bool | None = None,
        cafile: str | None = None,
    ) -> None:
        super().__init__(url)
        parsed = urlparse(url)
        try:
            port = parsed.port  # raises for a port that is not a number
        except ValueError:
            port = -1
        if parsed.netloc.endswith(":"):  # "host:" with no port: a typo, not the default port
            port = -1
        if parsed.scheme not in ("peer", "peers") or not parsed.hostname or port == -1:
            raise ReplicaURLError(f"peer URL must look like peer://host:port/namespace, got {url!r}")
        self.host = parsed.hostname
        self.port = port or wire.DEFAULT_PORT
        self.namespace = parsed.path.strip("/") or "default"
        validate_key(self.namespace, url)
        self.depth = len(self.namespace.split("/"))
        self.token, self.token_source = self._resolve_token(token, token_file)
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 (or None), got {timeout_s!r}")
        self.budget = TimeBudget(connect_timeout_s, min_bytes_per_s)
        self.timeout_s = timeout_s
        self.tls = (parsed.scheme == "peers") if tls is None else tls
        self.ssl_ctx = ssl.create_default_context(cafile=cafile) if self.tls else None
        self._local = threading.local()
        # What this client put, per step: its commits name those writers (wire.WRITERS_HEADER).
        self._wrote = wire.WriteLog()
        # Every connection this replica opened (any thread), so that abort_inflight() can cut
        # them (each is marked ``cut``, so that what fails on it is reported so and not retried).
        self._conns: weakref.WeakSet[_DeadlineMixin] = weakref.WeakSet()
        self._conns_lock = threading.Lock()
        self._abort_why = ""

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
            + (
                f", or the --namespace-token the agent was given for namespace {self.namespace!r}"
                if wire.WRONG_NAMESPACE_TEXT in text
                else ""
            )
        )

    def _serve_hint(self) -> str:
        """The command that would start the missing agent on this host:port."""
        host = "" if self.host in LOOPBACK_HOSTS else " --host 0.0.0.0"
        tls = " --tls-cert CERT --tls-key KEY" if self.tls else ""
        return f"ckptmirror serve --root DIR{host} --port {self.port} --token-file FILE{tls}"

    # -- transport -----------------------------------------------------------------------
    def _conn(self, deadline: Deadline) -> _DeadlineMixin:
        """This thread's connection, bound to ``deadline`` for the operation about to use it."""
        conn: _DeadlineMixin | None = getattr(self._local, "conn", None)
        if conn is not None and conn.cut:
            # Cut by abort_inflight() while it sat idle (kept alive between operations): its
            # socket is shut. Reused, the next operation would fail at once as "cut", and so
            # would one save after another once the agent answers again (each thread's idle
            # connection in turn); a new operation gets a new connection.
            self._drop()
            conn = None
        if conn is None:
            if self.tls:
                conn = _TLSConnection(self.host, self.port, context=self.ssl_ctx)
            else:
                conn = _Connection(self.host, self.port)
            conn.cap_s = self.timeout_s
            self._local.conn = conn
            with self._conns_lock:
                self._conns.add(conn)
        conn.deadline = deadline
        return conn

    def abort_inflight(self, why: str) -> None:
        """Cut every connection of this replica (the operations waiting on them fail at once,
        with an error that says why, and are not retried); later operations connect anew.

        Called when the heartbeat finds the agent unresponsive: an upload already sent, waiting
        for the stopped agent's answer, would otherwise wait out its whole time budget (69 s
        for a 64 MiB object by default), holding the staging buffer the next save() needs."""
        now = time.monotonic()
        with self._conns_lock:
            self._abort_why = why
            # Only connections that moved nothing for a while: an upload still flowing to an
            # agent slow to answer its health checks (its disk busy) is left to finish.
            conns = [c for c in self._conns if now - c.progress_at >= self.budget.connect_timeout_s]
        for conn in conns:
            conn.cut = True
            sock = getattr(conn, "sock", None)
            raw = getattr(sock, "_sock", sock)  # under the _DeadlineSocket wrapper
            if not isinstance(raw, socket.socket):
                continue
            try:
                # The plain socket's shutdown, also under TLS: SSLSocket.shutdown would first
                # drop its TLS state while another thread may be sending through it. This
                # wakes a thread blocked in send or recv on it; the TLS layer then fails.
                socket.socket.shutdown(raw, socket.SHUT_RDWR)
            except OSError:
                pass  # closed meanwhile

    def _missed(self, dl: Deadline, last: BaseException | None = None, attempts: int = 1) -> ReplicaUnavailableError:
        """The error of an operation that ran out of time (or of a wait cut by ``timeout_s``)."""
        if not dl.expired() and self.timeout_s is not None:  # the older per-wait limit fired first
            return ReplicaUnavailableError(
                f"{dl.op}: no answer within timeout_s={self.timeout_s:g} (one wait), inside its time budget of "
                f"{dl.describe()}",
                replica=self.url,
                key=dl.key,
            )
        if isinstance(last, _Stalled):
            b = dl.budget
            return ReplicaUnavailableError(
                f"{dl.op}: the agent took no data for {last.waited_s:.1f} s (connect_timeout_s={b.connect_timeout_s:g} "
                f"+ a piece of {SEND_PIECE} bytes at min_bytes_per_s={b.min_bytes_per_s:.0f}): stalled or overloaded, "
                f"after {dl.elapsed():.1f} s of its time budget of {dl.describe()}",
                replica=self.url,
                key=dl.key,
            )
        if isinstance(last, _BudgetSpent):
            last = None
        return dl.missed(self.url, attempts=attempts, last=last)

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
        dl: Deadline,
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
        for attempt in (1, 2):
            conn = self._conn(dl)
            try:
                conn.request(  # type: ignore[attr-defined]
                    method, path, body=memoryview(body).cast("B") if body is not None else None, headers=hdrs
                )
                return conn.getresponse()  # type: ignore[attr-defined]
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
            except TimeoutError as exc:  # connect, send or the answer's headers: out of time
                self._drop()
                if conn.cut:
                    raise self._cut(dl) from exc
                raise self._missed(dl, exc, attempt) from exc
            except ssl.SSLError as exc:
                # A setup problem (unknown CA, plain agent), not a passing fault.
                self._drop()
                if conn.cut:
                    raise self._cut(dl) from exc
                raise ReplicaUnavailableError(f"TLS handshake failed: {exc}", replica=self.url, key=key) from exc
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                # A kept-alive connection the agent closed: retry once on a fresh one, in the same budget.
                self._drop()
                if conn.cut:  # cut by abort_inflight(): the agent is not answering
                    raise self._cut(dl) from exc
                if (
                    attempt == 2
                    or dl.expired()
                    or not idempotent
                    and not isinstance(exc, http.client.RemoteDisconnected)
                ):
                    hint = "" if self.tls else " (if the agent uses TLS, use a peers:// URL)"
                    raise ReplicaUnavailableError(
                        f"{dl.op}: connection to agent lost: {exc}{hint}; {attempt} attempt(s) in {dl.elapsed():.1f} s "
                        f"of its time budget of {dl.describe()}",
                        replica=self.url,
                        key=key,
                    ) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if conn.cut:
                    raise self._cut(dl) from exc
                raise ReplicaError(f"{method} failed: {type(exc).__name__}: {exc}", replica=self.url, key=key) from exc
        raise AssertionError("unreachable")

    def _cut(self, dl: Deadline) -> ReplicaUnavailableError:
        """The error of an operation whose connection :meth:`abort_inflight` cut."""
        return ReplicaUnavailableError(
            f"{dl.op}: cut after {dl.elapsed():.1f} s of its time budget of {dl.describe()}: the agent stopped "
            f"answering its health checks ({self._abort_why})",
            replica=self.url,
            key=dl.key,
        )

    def _body_failed(self, dl: Deadline, exc: BaseException, key: str) -> ReplicaError:
        """The error of an answer's body that could not be read to its end.

        A link that dropped mid-body (reset, a short body, a connection the heartbeat cut) is an
        outage (:class:`ReplicaUnavailableError`): ``verify`` lists the replica as unavailable
        instead of calling intact objects "unreadable" damage, and ``repair`` does not try to
        copy over them. Anything else stays a plain :class:`ReplicaError`."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.cut:
            return self._cut(dl)
        if isinstance(exc, (ConnectionError, http.client.IncompleteRead)):
            return ReplicaUnavailableError(
                f"{dl.op}: the connection to the agent dropped while the answer was read ({type(exc).__name__}: "
                f"{exc}), after {dl.elapsed():.1f} s of its time budget of {dl.describe()}",
                replica=self.url,
                key=key,
            )
        return ReplicaError(f"read failed: {type(exc).__name__}: {exc}", replica=self.url, key=key)

    def _read_body(self, resp: http.client.HTTPResponse, dl: Deadline, key: str) -> bytes:
        """The whole answer body, its share of the budget added once its size is known."""
        try:
            dl.extend(nbytes=max(0, int(resp.getheader("Content-Length") or 0)))
            return resp.read()
        except TimeoutError as exc:
            raise self._missed(dl, exc) from exc
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise self._body_failed(dl, exc, key) from exc

    def _path(self, op: str, key: str = "") -> str:
        return wire.request_path(op, self.namespace, key)

    def _check(self, resp: http.client.HTTPResponse, key: str, ok: tuple[int, ...] = (200, 201, 204, 206)) -> None:
        if resp.status in ok:
            return
        text = resp.read(4096).decode("utf-8", "replace").strip()
        raise wire.error_for_status(
            resp.status, text, replica=self.url, key=key, denied=self._denied(resp.status, text)
        )

    def _call(self, op: str, method: str, path: str, key: str, nbytes: int = 0, **kw: Any) -> bytes:
        """One operation: a request (``nbytes`` of body) and its whole answer, under one deadline."""
        dl = self.budget.start(op, key, nbytes)
        resp = self._request(method, path, key, dl, **kw)
        try:
            self._check(resp, key)
            return self._read_body(resp, dl, key)
        except BaseException:
            self._drop()
            raise

    # -- Replica -------------------------------------------------------------------------
    def put(self, key: str, data: Buffer) -> None:
        validate_key(key, self.url)
        self._call(
            "put",
            "PUT",
            self._path(wire.OP_OBJECT, key),
            key,
            len(memoryview(data).cast("B")),
            body=data,
            headers={wire.CHECKSUM_HEADER: checksum(data)},
            idempotent=True,
        )
        self._wrote.wrote(key)

    def commit(self, key: str, data: bytes) -> None:
        """Create the commit record ``key``. The request names the writers whose files this
        client put for the step (``wire.WRITERS_HEADER``), so that the agent requires exactly
        those and accepts a namespace that holds only this node's share of the step, as a
        node-local disk does (``ring_peer``); without them (nothing put here by this client,
        or all of it) every file the record names must be there."""
        validate_key(key, self.url)
        headers = {wire.CHECKSUM_HEADER: checksum(data)}
        writers = self._wrote.header(key, data)
        if writers is not None:
            headers[wire.WRITERS_HEADER] = writers
        self._call(
            "commit",
            "PUT",
            self._path(wire.OP_COMMIT, key),
            key,
            len(data),
            body=data,
            headers=headers,
            idempotent=False,
        )

    def get(self, key: str, max_bytes: int) -> bytes:
        validate_key(key, self.url)
        dl = self.budget.start("get", key)
        resp = self._request("GET", self._path(wire.OP_OBJECT, key), key, dl)
        try:
            self._check(resp, key)
            size = int(resp.getheader("Content-Length") or -1)
            if size > max_bytes:
                raise CorruptObjectError(
                    f"object is {size} bytes, more than the {max_bytes} allowed", replica=self.url, key=key
                )
            return self._read_body(resp, dl, key)
        except BaseException:
            self._drop()
            raise

    def read_into(self, key: str, out: memoryview) -> None:
        validate_key(key, self.url)
        view = out.cast("B") if out.format != "B" else out
        dl = self.budget.start("read_into", key, len(view))
        resp = self._request("GET", self._path(wire.OP_OBJECT, key), key, dl)
        try:
            self._check(resp, key)
            size = int(resp.getheader("Content-Length") or -1)
            if size != len(view):
                raise CorruptObjectError(f"size is {size} bytes, manifest says {len(view)}", replica=self.url, key=key)
            done = 0
            while done < len(view):
                n = resp.readinto(view[done:])
                if not n:  # the agent stopped or the link dropped: an outage, not a damaged copy
                    raise ReplicaUnavailableError(
                        f"read_into: the connection ended after {done} of {len(view)} bytes (the agent stopped or "
                        "the link dropped)",
                        replica=self.url,
                        key=key,
                    )
                done += n
        except TimeoutError as exc:
            self._drop()
            raise self._missed(dl, exc) from exc
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, (ReplicaError, ObjectMissingError)):
                self._drop()
                raise  # already ours (a 404 is a FileNotFoundError, not a failure of the link)
            err = self._body_failed(dl, exc, key)  # (before the drop: it looks at the connection)
            self._drop()
            raise err from exc
        except BaseException:
            self._drop()
            raise

    def size(self, key: str) -> int | None:
        validate_key(key, self.url)
        dl = self.budget.start("size", key)
        resp = self._request("HEAD", self._path(wire.OP_OBJECT, key), key, dl)
        try:
            resp.read()
        except TimeoutError as exc:
            self._drop()
            raise self._missed(dl, exc) from exc
        if resp.status == 404:
            return None
        self._check(resp, key)
        return int(resp.getheader(wire.SIZE_HEADER) or resp.getheader("Content-Length") or 0)

    def list_steps(self) -> list[str]:
        return list(json.loads(self._call("list_steps", "GET", self._path(wire.OP_STEPS), "")))

    def list_prefix(self, prefix: str) -> list[str]:
        validate_key(prefix.rstrip("/"), self.url)
        path = self._path(wire.OP_LIST, prefix.rstrip("/"))
        return list(json.loads(self._call("list_prefix", "GET", path, prefix)))

    def delete(self, key: str) -> None:
        validate_key(key, self.url)
        self._wrote.forget(key)
        self._call("delete", "DELETE", self._path(wire.OP_OBJECT, key), key)

    def delete_prefix(self, prefix: str) -> None:
        validate_key(prefix.rstrip("/"), self.url)
        self._wrote.forget(prefix)
        self._call("delete_prefix", "DELETE", self._path(wire.OP_PREFIX, prefix.rstrip("/")), prefix)

    def health(self) -> dict[str, Any]:
        """The agent's health document (version, free space, uploads in flight)."""
        return dict(json.loads(self._call("health", "GET", wire.HEALTH_PATH, "")))

    def ping(self) -> None:
        self.health()

    def probe_write(self, need_bytes: int) -> None:
        """Raise ReplicaError (with the ``errno``) unless the agent can write (its health document's
        ``write_error`` is null) and would admit ``need_bytes`` now: its free space less its
        reserve and what the uploads in flight still have to write (``GET /v1/health``, under the
        replica's time budget). An agent that reports no free
        space at all passes (nothing to go by: the next save tells); one older than
        ``uploads_reserved_bytes`` counts it as 0."""
        doc = self.health()
        refused = doc.get(wire.WRITE_ERROR_FIELD)
        if isinstance(refused, str) and refused:
            raise ReplicaError(
                f"the agent cannot write under its --root ({wire.WRITE_ERROR_FIELD}={refused}): remount it "
                "read-write or give the agent's user write permission there",
                replica=self.url,
                errno=wire.write_errno_named(refused) or errno.EIO,
            )
        free = _count(doc, "free_bytes")
        if free is None:
            return
        reserve = _count(doc, "reserve_free_bytes") or 0
        in_flight = _count(doc, wire.RESERVED_BYTES_FIELD) or 0
        room = free - reserve - in_flight
        if room < need_bytes:
            raise ReplicaError(
                f"the agent has room for {max(room, 0)} bytes (free_bytes={free} - reserve_free_bytes={reserve} - "
                f"{wire.RESERVED_BYTES_FIELD}={in_flight}), the last save needed need_bytes={need_bytes} here; "
                f"free space under the agent's --root, run 'ckptmirror prune {self.url} --keep N', or lower keep_last",
                replica=self.url,
                errno=errno.ENOSPC,
            )

    def scrub_report(self) -> dict[str, Any]:
        """The agent's latest scrub results for this namespace (``GET /v1/scrub/<ns>``; the
        schema is in :mod:`._peer_protocol`), under the replica's time budget like every call.

        Raises :class:`ScrubUnavailableError` naming the replica when the agent does not scrub
        or is too old to have the route, and ReplicaError when the answer is not a results
        document. Ages in it are the agent's (``age_s``): no clock of this machine is involved.
        """
        op = "scrub_report"
        dl = self.budget.start(op, "")
        resp = self._request("GET", self._path(wire.OP_SCRUB), "", dl)
        try:
            if resp.status == 404:
                text = resp.read(4096).decode("utf-8", "replace").strip()
                # The agent's own 404 says it does not scrub; any other 404 is aiohttp's for a
                # route it does not know: an agent from before scrubbing was added.
                why = (
                    "the agent does not scrub (start it with 'ckptmirror serve --scrub-interval S')"
                    if "scrub" in text
                    else f"the agent has no {wire.PREFIX}/{wire.OP_SCRUB}/ route (too old: upgrade it to scrub)"
                )
                raise ScrubUnavailableError(f"{op}: no scrub results: {why}", replica=self.url)
            self._check(resp, "")
            body = self._read_body(resp, dl, "")
        except BaseException:
            self._drop()
            raise
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise ReplicaError(f"{op}: the answer is not JSON: {exc}", replica=self.url) from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list):
            raise ReplicaError(f"{op}: the answer is not a scrub results document", replica=self.url)
        return doc

    def release_thread(self) -> None:
        self._drop()

    def close(self) -> None:
        self._drop()


def _count(doc: dict[str, Any], field: str) -> int | None:
    """A byte count of the health document; None when absent or not a count (bool is not one)."""
    value = doc.get(field)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
