"""Replica backends, chosen by URL scheme.

=============================  =====================================================
URL                            backend
=============================  =====================================================
``/path``, ``file:///path``    :class:`~ckptmirror.replicas.local.LocalReplica`
``memory://name``              :class:`~ckptmirror.replicas.memory.MemoryReplica`
``peer://host:port/ns``        :class:`~ckptmirror.replicas.peer.PeerReplica` (a ``ckptmirror serve`` agent)
``s3://bucket/prefix``         :class:`~ckptmirror.replicas.s3.S3Replica` (needs s3fs)
``fsspec+PROTO://...``         :class:`~ckptmirror.replicas.fsspec_replica.FsspecReplica` on any
                               fsspec protocol, e.g. ``fsspec+file:///path``
``gs://``, ``az://``, ...      :class:`~ckptmirror.replicas.fsspec_replica.FsspecReplica` for the
                               other protocols fsspec knows (needs their package, e.g. gcsfs)
=============================  =====================================================

The S3 and fsspec backends are imported on first use.
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
    if scheme in ("s3", "s3a"):
        try:
            from .s3 import S3Replica
        except ImportError as exc:
            raise ImportError(f"s3:// replicas need s3fs ({exc}): pip install s3fs") from exc
        return S3Replica(url, **opts)
    import fsspec

    if scheme.startswith("fsspec+") or scheme in fsspec.available_protocols():
        from .fsspec_replica import FsspecReplica

        return FsspecReplica(url, **opts)
    raise ValueError(
        f"unsupported replica URL scheme {scheme!r} in {url!r} "
        "(supported: file://, memory://, peer://, s3://, fsspec+PROTOCOL://, and the protocols fsspec knows)"
    )
