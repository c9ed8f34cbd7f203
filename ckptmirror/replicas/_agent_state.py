"""The peer agent's state (:class:`Agent`: root, limits, per-namespace replicas) and how a
request names a namespace and key in it.

Apart from the handlers so that every route module shares one state class and one way of
splitting and refusing names, without importing each other.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from ..errors import ManifestError
from ..format import TMP_PREFIX
from . import _peer_protocol as wire
from ._agent_admission import SpaceLedger
from ._agent_config import AgentConfigError, parse_namespace_tokens
from ._agent_metrics import AgentMetrics
from ._peer_protocol import DEFAULT_MIN_UPLOAD_BYTES_PER_S, DEFAULT_UPLOAD_RATE_WINDOW_S
from ._scrub import DEFAULT_SCRUB_BYTES_PER_S, Scrubber
from .base import validate_key
from .local import LocalReplica

__all__ = ["AGENT", "CHUNK_BYTES", "Agent"]


CHUNK_BYTES = 4 << 20


class Agent:
    """The agent's state: root, limits, and the per-namespace replicas."""

    def __init__(
        self,
        root: str,
        *,
        token: str | None,
        max_object_bytes: int = 16 << 30,
        reserve_free_bytes: int = 1 << 30,
        max_uploads: int = 16,
        idle_timeout_s: float = 30.0,
        min_upload_bytes_per_s: int = DEFAULT_MIN_UPLOAD_BYTES_PER_S,
        upload_rate_window_s: float = DEFAULT_UPLOAD_RATE_WINDOW_S,
        namespace_tokens: Mapping[str, str] | None = None,
        metrics_token: str | None = None,
        scrub_interval_s: float = 0.0,
        scrub_bytes_per_s: int = DEFAULT_SCRUB_BYTES_PER_S,
        fsync: bool = True,
        direct_io: bool = False,
    ) -> None:
        """``token`` is valid on every namespace (the admin token); each of ``namespace_tokens``
        (``{prefix: token}``) only on its prefix; ``metrics_token`` only on ``/metrics`` and
        ``/v1/health``. With none, no request needs a token. ``scrub_interval_s > 0`` scrubs
        (:mod:`._scrub`) at most ``scrub_bytes_per_s``. ``direct_io``: write received objects
        past the page cache (the local replica's option of that name). Raises AgentConfigError (before creating
        anything) for options that cannot work."""
        if not 0 <= scrub_interval_s < math.inf:
            raise AgentConfigError(f"--scrub-interval {scrub_interval_s}: must be 0 (off) or a number of seconds")
        if scrub_bytes_per_s <= 0:
            raise AgentConfigError(f"--scrub-bytes-per-s {scrub_bytes_per_s}: must be a positive number of bytes")
        if min_upload_bytes_per_s < 0:
            raise AgentConfigError(f"--min-upload-bytes-per-s {min_upload_bytes_per_s}: must be 0 (off) or more")
        if not upload_rate_window_s > 0 or math.isinf(upload_rate_window_s):
            raise AgentConfigError(f"--upload-rate-window-s {upload_rate_window_s}: must be a positive number")
        self.namespace_tokens = parse_namespace_tokens(namespace_tokens)
        self.metrics_token = metrics_token.encode() if metrics_token else None
        others = [nt.token for nt in self.namespace_tokens] + ([token.encode()] if token else [])
        if self.metrics_token is not None and self.metrics_token in others:
            # One token with two scopes: the read-only metrics token would also write.
            raise AgentConfigError("--metrics-token-file: the metrics token must differ from every other token")
        self.root = os.path.realpath(root)
        os.makedirs(self.root, exist_ok=True)
        self.token = token.encode() if token else None
        self.max_object_bytes = max_object_bytes
        self.reserve_free_bytes = reserve_free_bytes
        self.max_uploads = max_uploads
        self.idle_timeout_s = idle_timeout_s
        self.min_upload_bytes_per_s = min_upload_bytes_per_s
        self.upload_rate_window_s = upload_rate_window_s
        self.fsync = fsync
        self.direct_io = direct_io
        self.uploads = 0
        self.space = SpaceLedger()
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="agent-io")
        self._replicas: dict[str, LocalReplica] = {}
        # (namespace, key) -> (size, checksum) of objects this process received and verified,
        # so a commit need not re-read them. Objects from before a restart are re-hashed.
        self.verified: dict[tuple[str, str], tuple[int, str]] = {}
        self.scrubber = (
            Scrubber(
                self.root,
                self.replica,
                interval_s=scrub_interval_s,
                bytes_per_s=scrub_bytes_per_s,
                on_damage=lambda ns, key: self.verified.pop((ns, key), None),  # a commit must re-hash it
            )
            if scrub_interval_s > 0
            else None
        )
        self.metrics = AgentMetrics(self)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        # Temp files of uploads interrupted by a crash: never visible, removed at start.
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                if f.startswith(TMP_PREFIX):
                    try:
                        os.unlink(os.path.join(dirpath, f))
                    except OSError:
                        pass

    @property
    def needs_token(self) -> bool:
        """Whether every request must carry a token (the agent's own or a namespace's)."""
        return self.token is not None or bool(self.namespace_tokens)

    def replica(self, ns: str) -> LocalReplica:
        validate_key(ns, "agent namespace")
        _refuse_hidden(ns)
        r = self._replicas.get(ns)
        if r is None:
            path = os.path.join(self.root, *ns.split("/"))
            real = os.path.realpath(path)
            if not (real == self.root or real.startswith(self.root + os.sep)):
                raise ManifestError("namespace escapes the agent root", key=ns)
            # create=False: a rejected request must not leave an empty namespace behind.
            r = LocalReplica(path, fsync=self.fsync, create=False, direct_io=self.direct_io)
            if not (r.root == self.root or r.root.startswith(self.root + os.sep)):
                raise ManifestError("namespace escapes the agent root through a symlink", key=ns)
            r.url = f"namespace {ns}"  # error messages go to clients: no absolute server paths
            self._replicas[ns] = r
        return r

    def replica_root(self, ns: str) -> str:
        """The directory of namespace ``ns`` (a name :func:`._scrub.find_namespaces` found)."""
        return os.path.join(self.root, *ns.split("/"))

    def changed(self, ns: str, key: str) -> None:
        """``key`` (or the prefix) in ``ns`` was written or deleted: the scrubber's result of its
        step is about other bytes now (after a ``ckptmirror repair``, say), so it is dropped."""
        if self.scrubber is not None:
            self.scrubber.invalidate(ns, key)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def write_error(self) -> str | None:
        """The errno's name (``"EROFS"``, ``"EACCES"``) if this process may not create files in
        the root now (a read-only remount, a changed permission), else None. ``access()`` only:
        cheap enough for every health check, which a real write and fsync would not be."""
        if os.access(self.root, os.W_OK | os.X_OK):
            return None
        try:
            read_only = bool(os.statvfs(self.root).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        return "EROFS" if read_only else "EACCES"

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


#: Where the handlers find the agent: the application holds it.
AGENT: web.AppKey[Agent] = web.AppKey("agent", Agent)


def _split(request: web.Request) -> tuple[str, str]:
    """(namespace, key) from ``/v1/<op>/<ns...>/<key...>``: the namespace has as many segments as
    the namespace-depth header says (default 1)."""
    tail = request.match_info[wire.TAIL]
    try:
        depth = int(request.headers.get(wire.DEPTH_HEADER, str(wire.DEFAULT_DEPTH)))
    except ValueError:
        raise web.HTTPBadRequest(text="bad namespace depth") from None
    parts = tail.split("/")
    if not 1 <= depth < len(parts):
        raise web.HTTPBadRequest(text="bad path")
    return "/".join(parts[:depth]), "/".join(parts[depth:])


def _refuse_hidden(name: str, *, commit_record: bool = True) -> None:
    """400 for a name the agent keeps to itself (see :func:`_peer_protocol.refused_name`)."""
    why = wire.refused_name(name, commit_record=commit_record)
    if why:
        raise web.HTTPBadRequest(text=f"refused name {why}")
