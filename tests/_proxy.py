"""Broken network paths on 127.0.0.1: a TCP proxy in front of a real server that misbehaves on demand.

``FaultProxy(upstream_port, mode)`` listens on 127.0.0.1 (``.port``; ``.endpoint`` for S3,
``.url(namespace)`` for a peer agent) and treats every connection according to ``mode``, which
may be changed at any time (``proxy.mode = "silent"``) and applies to open connections too, so a
replica can be healthy when a ``Mirror`` opens and break afterwards:

- ``"forward"``: pass bytes through;
- ``"silent"``: accept connections, read and discard what the client sends, never answer (a
  half-dead load balancer: the TCP handshake succeeds, nothing ever comes back);
- ``"trickle"``: forward both directions at ``bytes_per_s`` (default one byte per second: a link
  that is up and hopelessly slow; no single read waits long, so per-read timeouts never fire);
- ``"reset"``: close every connection with ``SO_LINGER 0`` (a TCP RST), new ones at once.

One daemon thread per connection; :meth:`FaultProxy.close` stops them all within a fraction of
a second, so a test that fails midway leaves nothing running.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from typing import Literal

HOST = "127.0.0.1"
Mode = Literal["forward", "silent", "trickle", "reset"]
MODES = ("forward", "silent", "trickle", "reset")
_TICK_S = 0.05  # the longest a connection thread waits before looking at the mode and the close flag


def _rst(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the other side gets a TCP RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``(HOST, upstream_port)`` that misbehaves as ``mode`` says."""

    def __init__(self, upstream_port: int, mode: Mode = "forward", *, bytes_per_s: float = 1.0) -> None:
        self.upstream = (HOST, upstream_port)
        self.mode = mode
        self.bytes_per_s = bytes_per_s
        self.connections = 0
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(128)
        self._listener.settimeout(_TICK_S)
        self.port = int(self._listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"fault-proxy-{self.port}", daemon=True)
        self._acceptor.start()

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        self._mode = mode

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: an S3 endpoint URL through this proxy."""
        return f"http://{HOST}:{self.port}"

    def url(self, namespace: str) -> str:
        """``peer://127.0.0.1:PORT/namespace``: a peer URL through this proxy."""
        return f"peer://{HOST}:{self.port}/{namespace}"

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, drop every connection, join the threads."""
        self._closed.set()
        self._acceptor.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(5)

    # -- internals -----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            if self.mode == "reset":
                _rst(client)
                continue
            t = threading.Thread(target=self._serve, args=(client,), name=f"fault-proxy-{self.port}-conn", daemon=True)
            with self._lock:
                self._threads.append(t)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        server: socket.socket | None = None
        if self.mode != "silent":  # a silent load balancer has nobody behind it
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _rst(client)
                return
        try:
            self._pump(client, server)
        finally:
            for s in (client, server):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()

    def _pump(self, client: socket.socket, server: socket.socket | None) -> None:
        # Bytes read but not yet forwarded, per direction. Everything offered is read at once
        # (the kernel's buffers never fill, so the client's writes never block on us): what a
        # client then waits for is an answer, as it would at a real stuck or slow endpoint.
        pending = {"up": bytearray(), "down": bytearray()}
        eof = {"up": False, "down": False}
        credit = 0.0  # trickle: bytes each direction may send now
        last = time.monotonic()
        while not self._closed.is_set():
            mode = self.mode
            if mode == "reset":
                _rst(client)
                if server is not None:
                    _rst(server)
                return
            if server is None and mode != "silent":
                return  # opened while silent: there is no server to forward to; drop it
            socks = {"up": client, "down": server}
            wanted = [s for d, s in socks.items() if s is not None and not eof[d]]
            try:
                ready, _, _ = select.select(wanted, [], [], _TICK_S)
            except (OSError, ValueError):
                return
            for d, src in socks.items():
                if src is None or src not in ready:
                    continue
                try:
                    data = src.recv(1 << 16)
                except OSError:
                    return
                if not data:
                    eof[d] = True
                elif mode != "silent":
                    pending[d] += data
                # silent: dropped, both ways: nothing ever reaches the client
            if mode == "silent":
                if eof["up"]:
                    return  # the client gave up
                continue
            now = time.monotonic()
            if mode == "trickle":
                credit = min(credit + self.bytes_per_s * (now - last), max(1.0, self.bytes_per_s * _TICK_S))
                quota = int(credit)
            else:
                quota = 1 << 62
            for d, dst in (("up", server), ("down", client)):
                if dst is None:
                    continue
                n = min(quota, len(pending[d]))
                if n:
                    try:
                        dst.sendall(pending[d][:n])
                    except OSError:
                        return
                    del pending[d][:n]
                if eof[d] and not pending[d]:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
            last = now
            if mode == "trickle":
                credit -= quota
            if all(eof.values()) and not any(pending.values()):
                return
