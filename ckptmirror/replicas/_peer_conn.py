"""The peer replica's HTTP connections, each blocking step bounded by the operation's deadline.

:class:`~ckptmirror.replicas.peer.PeerReplica` talks ``http.client``; a socket timeout alone
bounds each wait, not their sum (a peer that sends one byte per second never trips it), nor
the progress of an upload. The connections here re-arm the socket with what is left of the
operation's deadline before every send and read, and send bodies in pieces, each under a
progress limit. Apart from peer.py because it is the transport under the replica's operations.
"""

from __future__ import annotations

import http.client
import io
import math
import socket
import time
from typing import Any

from .base import Deadline


class _BudgetSpent(TimeoutError):
    """A blocking step found the operation's deadline already passed (raised before waiting)."""


class _Stalled(TimeoutError):
    """An upload made no progress: the agent took none of a piece of the body within
    ``connect_timeout_s`` plus the piece at ``min_bytes_per_s`` (see :meth:`_DeadlineSocket.sendall`)."""

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"no progress for {waited_s:.1f} s")
        self.waited_s = waited_s


#: Bodies are sent in pieces of this size, each under its own progress limit (see ``sendall``).
SEND_PIECE = 1 << 20


class _DeadlineMixin:
    """An ``http.client`` connection whose every blocking step waits at most what is left of
    the current operation's deadline (``self.deadline``, set per operation by the replica).

    A per-socket timeout alone bounds each wait, not their sum: a peer that sends one byte per
    second never trips it. So the socket is wrapped once connected, and the timeout is set
    again, to the time left, before every send and every read.
    """

    deadline: Deadline | None = None
    cap_s: float | None = None  # the older ``timeout_s``: a limit on each single wait
    progress_at = 0.0  # time.monotonic() of the last byte sent or received (see abort_inflight)
    cut = False  # cut by abort_inflight: what fails on it is reported so, and not retried
    sock: Any
    timeout: float | None

    def wait_s(self) -> float:
        """How long the next blocking step may wait; raises :class:`_BudgetSpent` if nothing is left."""
        left = math.inf if self.deadline is None else self.deadline.remaining()
        if left <= 0:
            raise _BudgetSpent("the operation's time budget is spent")
        return min(left, self.cap_s or math.inf)

    def connect(self) -> None:
        budget = self.deadline.budget.connect_timeout_s if self.deadline is not None else None
        self.timeout = min(self.wait_s(), budget or math.inf)
        super().connect()  # type: ignore[misc]
        self.sock = _DeadlineSocket(self.sock, self)


class _Connection(_DeadlineMixin, http.client.HTTPConnection):
    pass


class _TLSConnection(_DeadlineMixin, http.client.HTTPSConnection):
    pass  # the mixin wraps the socket after the TLS handshake: reads go through TLS as before


class _DeadlineSocket:
    """The connected socket as ``http.client`` uses it (``sendall``, ``makefile``, ``close``),
    each step armed with the time left of the operation's deadline."""

    def __init__(self, sock: socket.socket, conn: _DeadlineMixin) -> None:
        self._sock = sock
        self._conn = conn

    def arm(self) -> None:
        self._sock.settimeout(self._conn.wait_s())

    def sendall(self, data: Any) -> None:
        """Send ``data`` in pieces of :data:`SEND_PIECE`, each allowed what is left of the
        deadline but at most ``connect_timeout_s`` plus the piece at ``min_bytes_per_s``.

        The deadline alone lets a stalled agent (stopped, its disk hung) hold a 64 MiB upload
        for the whole budget (69 s by default), and with it the staging buffer the next save()
        waits for; measured. A peer that takes no data for that long counts as down, as a link
        slower than ``min_bytes_per_s`` does. Since Python 3.5 a socket timeout bounds a whole
        ``sendall``, hence the pieces.
        """
        view = memoryview(data)
        if view.itemsize != 1 or view.ndim != 1:
            view = view.cast("B")
        dl = self._conn.deadline
        self._conn.progress_at = time.monotonic()
        for off in range(0, max(len(view), 1), SEND_PIECE):
            piece = view[off : off + SEND_PIECE]
            wait = self._conn.wait_s()
            limit = wait if dl is None else dl.budget.connect_timeout_s + len(piece) / dl.budget.min_bytes_per_s
            self._sock.settimeout(min(wait, limit))
            try:
                self._sock.sendall(piece)
                self._conn.progress_at = time.monotonic()
            except TimeoutError:
                if limit < wait:  # the progress limit fired, not the deadline
                    raise _Stalled(limit) from None
                raise

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        # The socket's own raw reader (it counts as an open reference: the socket stays open
        # for a response still being read after the connection closed it), armed per read.
        return io.BufferedReader(_DeadlineReader(self._sock.makefile("rb", buffering=0), self))

    def close(self) -> None:
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _DeadlineReader(io.RawIOBase):
    """A raw reader that arms the socket with the time left before every read."""

    def __init__(self, raw: Any, owner: _DeadlineSocket) -> None:
        super().__init__()
        self._raw = raw
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        self._owner.arm()
        n = int(self._raw.readinto(b))
        if n:
            self._owner._conn.progress_at = time.monotonic()
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()
