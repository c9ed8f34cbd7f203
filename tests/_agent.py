"""Test helpers for the peer agent: a real ``ckptmirror serve`` process and a faulty TCP proxy.

``agent(root, token_file=...)`` starts the console script on 127.0.0.1 (``--port 0`` unless a
port is given), waits for its one JSON ``{"listening": ...}`` line on stdout and yields an
:class:`AgentProc` that unpacks as ``(url_base, proc, root)``; at exit the process gets SIGTERM,
then SIGKILL if it has not exited after ``term_timeout`` seconds. Its stderr (JSON log lines)
goes to ``<root>.log`` so that a failing test can show what the agent said.

``wait_until``, ``free_port``, ``files_under`` and ``temp_files`` are those of ``_helpers.py``,
importable from here too.

``TcpProxy(port)`` listens on 127.0.0.1 and forwards every connection to the agent, one thread
per connection. Its ``mode`` can be changed while it runs:

- ``"forward"``: pass bytes through;
- ``"delay"``: sleep ``delay_s`` before forwarding each chunk (both directions);
- ``"stall"``: forward the first ``after_bytes`` client->agent bytes of each connection, then
  forward nothing more in that direction and stop reading from the client (a black hole;
  answers from the agent still pass);
- ``"reset"``: forward the first ``after_bytes`` client->agent bytes of each connection, then
  close both sides with ``SO_LINGER 0`` (a TCP RST to client and agent).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO

# Kept importable from here under their old names: the generic helpers live in _helpers.
from _helpers import HOST, files_under, free_port, temp_files, wait_until

__all__ = [
    "HOST",
    "TOKEN",
    "AgentProc",
    "TcpProxy",
    "agent",
    "files_under",
    "free_port",
    "serve_command",
    "start_agent",
    "raw_request",
    "temp_files",
    "terminate",
    "wait_until",
    "write_token",
]

TOKEN = "s3cr3t-test-token-0123456789"
CHECKSUM_HEADER = "X-Ckptmirror-Checksum"


def raw_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    token: str | None = TOKEN,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one raw HTTP request to an agent on 127.0.0.1; a body gets its
    own (correct) checksum header unless ``headers`` says otherwise."""
    import http.client

    from ckptmirror.checksum import checksum

    hdrs: dict[str, str] = {}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    if body is not None:
        hdrs[CHECKSUM_HEADER] = checksum(body)
    hdrs.update(headers or {})
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def serve_command() -> list[str]:
    """The ``ckptmirror`` console script of this environment (fallback: ``python -m``)."""
    script = os.path.join(os.path.dirname(sys.executable), "ckptmirror")
    if os.path.exists(script):
        return [script]
    found = shutil.which("ckptmirror")
    if found:
        return [found]
    return [sys.executable, "-m", "ckptmirror"]


def write_token(path: str | os.PathLike[str], token: str = TOKEN) -> str:
    """Write ``token`` to ``path`` (mode 0600) and return the path as a string."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return path


@dataclass
class AgentProc:
    """A running agent. Unpacks as ``(url_base, proc, root)``."""

    url_base: str  # "peer://127.0.0.1:PORT"
    proc: subprocess.Popen
    root: str
    port: int = 0
    token: str | None = None
    log_path: str = ""

    def __iter__(self) -> Iterator[object]:
        return iter((self.url_base, self.proc, self.root))

    def url(self, namespace: str) -> str:
        return f"{self.url_base}/{namespace}"

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def terminate(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` s; return the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


def _read_first_line(stream: IO[str], out: queue.Queue[str]) -> None:
    try:
        out.put(stream.readline())
    except (OSError, ValueError):
        out.put("")


def start_agent(
    root: str | os.PathLike[str],
    *,
    token_file: str | os.PathLike[str] | None,
    port: int = 0,
    host: str = HOST,
    args: Sequence[str] = (),
    startup_timeout: float = 30.0,
) -> AgentProc:
    """Start ``ckptmirror serve`` and wait for its listening line (raises if it never comes)."""
    root = os.fspath(root)
    log_path = root.rstrip(os.sep) + ".log"
    cmd = serve_command() + ["serve", "--root", root, "--host", host, "--port", str(port)]
    token = None
    if token_file is not None:
        cmd += ["--token-file", os.fspath(token_file)]
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
    cmd += list(args)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=_read_first_line, args=(proc.stdout, lines), daemon=True).start()
    try:
        line = lines.get(timeout=startup_timeout)
    except queue.Empty:
        terminate(proc, 2)
        raise RuntimeError(f"agent did not print its listening line within {startup_timeout} s: {cmd}") from None
    try:
        address = json.loads(line)["listening"]
    except (ValueError, KeyError, TypeError):
        terminate(proc, 2)
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"agent did not start (exit {proc.returncode}); stdout {line!r}; log:\n{tail}") from None
    bound = int(address.rsplit(":", 1)[1])
    return AgentProc(f"peer://{host}:{bound}", proc, root, bound, token, log_path)


@contextlib.contextmanager
def agent(
    root: str | os.PathLike[str],
    *,
    token_file: str | os.PathLike[str] | None,
    port: int = 0,
    host: str = HOST,
    args: Sequence[str] = (),
    term_timeout: float = 10.0,
) -> Iterator[AgentProc]:
    """Context manager around :func:`start_agent`; SIGTERM (then SIGKILL) at exit."""
    a = start_agent(root, token_file=token_file, port=port, host=host, args=args)
    try:
        yield a
    finally:
        terminate(a.proc, term_timeout)


# ---------------------------------------------------------------------------------- proxy
def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class _Stats:
    connections: int = 0
    upstream_bytes: int = 0
    downstream_bytes: int = 0
    stalls: int = 0
    resets: int = 0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class TcpProxy:
    """A threaded TCP proxy on 127.0.0.1 that forwards to ``(upstream_host, upstream_port)``.

    Change ``mode``, ``delay_s`` and ``after_bytes`` at any time; they apply from the next
    chunk on, to open connections too. ``stalled`` is set when some connection stalls.
    """

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = HOST,
        *,
        mode: str = "forward",
        delay_s: float = 0.0,
        after_bytes: int = 0,
        chunk_bytes: int = 64 << 10,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode = mode
        self.delay_s = delay_s
        self.after_bytes = after_bytes
        self.chunk_bytes = chunk_bytes
        self.stats = _Stats()
        self.stalled = threading.Event()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self.port = int(self._listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"proxy-{self.port}", daemon=True)
        self._acceptor.start()

    def set(self, mode: str, *, delay_s: float | None = None, after_bytes: int | None = None) -> None:
        if delay_s is not None:
            self.delay_s = delay_s
        if after_bytes is not None:
            self.after_bytes = after_bytes
        self.mode = mode

    def url(self, namespace: str) -> str:
        return f"peer://{HOST}:{self.port}/{namespace}"

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        self._acceptor.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()
        for t in list(self._threads):
            t.join(5)

    # -- internals -------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(client,), name=f"proxy-{self.port}-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        with self.stats.lock:
            self.stats.connections += 1
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            with self.stats.lock:
                self.stats.refused += 1
            _reset(client)  # the agent is gone: the client sees its connection reset
            return
        client.settimeout(10)
        server.settimeout(10)
        try:
            self._pump(client, server)
        finally:
            for s in (client, server):
                with contextlib.suppress(OSError):
                    s.close()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        up = 0  # client->agent bytes forwarded on this connection
        client_eof = server_eof = stalled = False
        while not self._closed.is_set():
            readable = [s for s, done in ((client, client_eof or stalled), (server, server_eof)) if not done]
            if not readable or (client_eof and server_eof):
                return
            try:
                ready, _, _ = select.select(readable, [], [], 0.05)
            except (OSError, ValueError):
                return
            for src in ready:
                dst = server if src is client else client
                try:
                    data = src.recv(self.chunk_bytes)
                except OSError:
                    _reset(dst)
                    return
                if not data:
                    if src is client:
                        client_eof = True
                    else:
                        server_eof = True
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    continue
                mode = self.mode
                if mode == "delay" and self.delay_s > 0:
                    if self._closed.wait(self.delay_s):
                        return
                if src is client and mode in ("stall", "reset") and up + len(data) >= self.after_bytes:
                    room = max(0, self.after_bytes - up)
                    try:
                        if room:
                            dst.sendall(data[:room])
                    except OSError:
                        return
                    up += room
                    with self.stats.lock:
                        self.stats.upstream_bytes += room
                    if mode == "reset":
                        with self.stats.lock:
                            self.stats.resets += 1
                        _reset(client)
                        _reset(server)
                        return
                    with self.stats.lock:
                        self.stats.stalls += 1
                    stalled = True  # the rest of `data` is dropped; the client is not read again
                    self.stalled.set()
                    continue
                try:
                    dst.sendall(data)
                except OSError:
                    _reset(src)
                    return
                with self.stats.lock:
                    if src is client:
                        self.stats.upstream_bytes += len(data)
                    else:
                        self.stats.downstream_bytes += len(data)
                if src is client:
                    up += len(data)
