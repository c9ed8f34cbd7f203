"""Replica backends, chosen by URL scheme.

=============================  =====================================================
URL                            backend
=============================  =====================================================
``/path``, ``file:///path``    :class:`~ckptmirror.replicas.local.LocalReplica`
``memory://name``              :class:`~ckptmirror.replicas.memory.MemoryReplica`
``peer://host:port/ns``        :class:`~ckptmirror.replicas.peer.PeerReplica` (a ``ckptmirror serve`` agent)
=============================  =====================================================
"""

from __future__ import annotations

from typing import Any, Mapping

from .base import Replica, validate_key
from .faulty import FaultyReplica
from .local import LocalReplica
from .memory import MemoryReplica

__all__ = ["FaultyReplica", "LocalReplica", "MemoryReplica", "Replica", "open_replica", "validate_key"]


def open_replica(url: "str | Replica", options: Mapping[str, Any] | None = None) -> Replica:
    """Return the backend for ``url``; a :class:`Replica` instance is returned unchanged."""
    if isinstance(url, Replica):
        return url
    if not isinstance(url, str) or not url:
        raise ValueError(f"replica URL must be a non-empty string, got {url!r}")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    opts = dict(options or {})
    if scheme in ("", "file"):
        return LocalReplica(url, **opts)
    if scheme == "memory":
        return MemoryReplica(url)
    if scheme in ("peer", "peers"):
        from .peer import PeerReplica

        return PeerReplica(url, **opts)
    raise ValueError(f"unsupported replica URL scheme {scheme!r} in {url!r} (supported: file://, memory://)")
