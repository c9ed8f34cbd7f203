"""``ckptmirror serve``: the peer agent that keeps replicas for other nodes.

An aiohttp server over a root directory (a disk, or a tmpfs for a RAM tier). Each peer URL
``peer://host:port/<namespace>`` maps to ``<root>/<namespace>``; inside it, the layout is the
same as a local replica, written by the same :class:`~ckptmirror.replicas.local.LocalReplica`
code (temp file, fsync, rename, directory fsync).

The protocol (paths, headers, statuses) is written once, in
:mod:`ckptmirror.replicas._peer_protocol`, shared with the client
(:class:`~ckptmirror.replicas.peer.PeerReplica`). Here: one handler per route, the middleware
that checks the token and turns library errors into statuses, and :func:`serve`.
Every path is derived here from validated names; symlinks are never followed out of the root.

This module is the agent's public face; the code lives in private modules, one concern each:

- :mod:`._agent_config`: :class:`AgentConfigError` and the namespace tokens;
- :mod:`._agent_log`: the JSON log lines on stderr;
- :mod:`._agent_admission`: :class:`SpaceLedger`, :class:`Promise` and :class:`UploadPace`;
- :mod:`._agent_state`: :class:`Agent`, and how a request names a namespace and key;
- :mod:`._agent_guard`: the middleware (tokens, errors to statuses);
- :mod:`._agent_objects`: the handlers that read, list and delete, and the scrub report;
- :mod:`._agent_upload`: the upload handlers (admission, pacing, verify, publish);
- :mod:`._agent_app`: :func:`build_app`, ``/v1/health`` and ``/metrics``;
- :mod:`._agent_serve`: :func:`serve`.

What a client can reach, and for how long:

- names starting with ``.`` (temp files of uploads in progress) are refused on every route and
  never listed; commit records are created only through the verified, create-if-absent
  ``/v1/commit/`` route, never through ``PUT /v1/o/``;
- an upload is admitted only if the free space, less what the uploads already in flight still
  have to write (:class:`SpaceLedger`), leaves ``reserve_free_bytes`` after it; a disk that runs
  out anyway (another writer filled it, a quota) answers 507 too, its temp file removed;
- an upload must deliver ``min_upload_bytes_per_s`` over every ``upload_rate_window_s`` of
  waiting for it (the first window is its grace period), else it is cut, its temp file removed
  and its slot freed: a trickle of bytes would otherwise hold a slot forever, since the idle
  timeout only bounds the wait for one read;
- per-namespace tokens (``namespace_tokens``) confine a token to a namespace prefix; the agent's
  own token stays valid everywhere (the admin token); the metrics token (``metrics_token``) is
  valid only on ``GET /metrics`` and ``GET /v1/health``, which name no data.

``GET /metrics`` (:mod:`._agent_metrics`) and the scrubber (:mod:`._scrub`, ``--scrub-interval``)
live in modules of their own; the handlers here only count what happens.
"""

from __future__ import annotations

from ._agent_admission import Promise, SpaceLedger, UploadPace
from ._agent_app import build_app
from ._agent_config import AgentConfigError, NamespaceToken, parse_namespace_tokens
from ._agent_serve import serve
from ._agent_state import Agent

__all__ = [
    "Agent",
    "AgentConfigError",
    "NamespaceToken",
    "Promise",
    "SpaceLedger",
    "UploadPace",
    "parse_namespace_tokens",
    "build_app",
    "serve",
]
