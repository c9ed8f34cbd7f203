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

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ReplicaUnavailableError, ReplicaURLError
from .base import Replica, validate_key
from .faulty import FaultyReplica
from .local import LocalReplica, path_from_url
from .memory import MemoryReplica

__all__ = [
    "FaultyReplica",
    "LocalReplica",
    "MemoryReplica",
    "Replica",
    "open_replica",
    "open_replicas",
    "scheme_of",
    "validate_key",
]

#: Schemes ckptmirror implements itself (the others go to fsspec).
SCHEMES = ("file", "memory", "peer", "peers", "s3", "s3a")
_EXAMPLES = "file:///path or /path, memory://name, peer://host:port/ns, s3://bucket/prefix, fsspec+PROTOCOL://..."


def _fsspec_protocols() -> list[str]:
    import fsspec

    return list(fsspec.available_protocols())


def scheme_of(url: str) -> str:
    """The scheme of a replica URL, lower-case; ``""`` for a plain path.

    Raises ValueError for a URL that lost a slash or a colon (``peer:/host:7070/x``,
    ``file//data/x``, ``s3:bucket``): read as a relative path it would put checkpoints in a
    surprising directory of the current one.
    """
    if "://" in url:
        return url.split("://", 1)[0].lower()
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)(:/?|//)(?!/)", url)
    if m and (m.group(1).lower() in SCHEMES or m.group(1).lower().startswith("fsspec+")):
        fixed = f"{m.group(1)}://{url[m.end() :]}"
        raise ReplicaURLError(
            f"malformed replica URL {url!r}: did you mean {fixed!r}? "
            f"(a plain relative path would be {os.path.join('.', url)!r})"
        )
    return ""


def options_for(
    url: str | Replica, storage_options: Mapping[str, Mapping[str, Any]] | None
) -> Mapping[str, Any] | None:
    """The backend options of ``url`` from a ``storage_options`` mapping: by full URL, else by
    scheme (``"file"`` for plain paths), else by its backend's scheme (``"peer"`` also covers
    ``peers://``, ``"s3"`` also ``s3a://``: options such as ``cafile`` exist for exactly those
    URLs, and silently dropping them would fail the TLS handshake far from the cause)."""
    if isinstance(url, Replica) or not storage_options:
        return None
    if url in storage_options:
        return storage_options[url]
    scheme = scheme_of(url) or "file"
    if scheme in storage_options:
        return storage_options[scheme]
    return storage_options.get(_SCHEME_FAMILY.get(scheme, scheme))


#: Schemes whose backend is another scheme's, for :func:`options_for`.
_SCHEME_FAMILY = {"peers": "peer", "s3a": "s3"}


#: Storage options every backend takes (how saves store objects there), not passed to its constructor.
POLICY_OPTIONS = ("compression", "compression_level", "incremental")


def _apply_policy(replica: Replica, policy: Mapping[str, Any]) -> Replica:
    """Set a replica's storage policy from its ``storage_options``; bad values name the replica."""
    comp = policy.get("compression", "auto")
    if comp not in ("none", "zstd", "auto"):
        raise ValueError(
            f"storage option compression={comp!r} for {replica.url}: use 'none', 'zstd' or 'auto' "
            "(auto: zstd for S3 and fsspec, none for local disk, memory and peers)"
        )
    if comp != "auto":
        replica.compression = comp
    level = policy.get("compression_level", replica.compression_level)
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22:
        raise ValueError(f"storage option compression_level={level!r} for {replica.url}: an int from 1 to 22")
    replica.compression_level = level
    inc = policy.get("incremental", replica.incremental)
    if not isinstance(inc, bool):
        raise ValueError(f"storage option incremental={inc!r} for {replica.url}: True or False")
    replica.incremental = inc
    return replica


def open_replica(url: str | Replica, options: Mapping[str, Any] | None = None) -> Replica:
    """Return the backend for ``url``; a :class:`Replica` instance is returned unchanged.

    ``options`` go to the backend's constructor, except the storage policy every backend takes:
    ``compression`` (``"none"``, ``"zstd"``, ``"auto"``), ``compression_level`` and
    ``incremental`` (see :class:`~ckptmirror.replicas.base.Replica`).

    Raises ValueError for a URL that cannot be parsed or names an unknown scheme (suggesting
    the closest known one), ImportError naming the package to install.
    """
    if isinstance(url, Replica):
        return url
    if not isinstance(url, str) or not url:
        raise ValueError(f"replica URL must be a non-empty string, got {url!r}")
    opts = dict(options or {})
    policy = {k: opts.pop(k) for k in POLICY_OPTIONS if k in opts}
    return _apply_policy(_open_backend(url, opts), policy)


def _open_backend(url: str, opts: dict[str, Any]) -> Replica:
    scheme = scheme_of(url)
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
    protocols = _fsspec_protocols()
    if scheme.startswith("fsspec+") or scheme in protocols:
        from .fsspec_replica import FsspecReplica

        return FsspecReplica(url, **opts)
    close = difflib.get_close_matches(scheme, [*SCHEMES, *protocols], n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}://? " if close else ""
    raise ReplicaURLError(
        f"unsupported replica URL scheme {scheme!r} in {url!r}: {hint}"
        f"(supported: {_EXAMPLES}, and the protocols fsspec knows)"
    )


def open_replicas(
    urls: Sequence[str | Replica],
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    must_exist: bool = False,
) -> list[Replica]:
    """Open every URL with :func:`open_replica` and the options :func:`options_for` picks.

    ``must_exist``: a local directory must exist already (operator commands and restores never
    create one, so a mistyped path is reported instead of showing an empty replica). Raises
    ValueError for a bad or duplicate URL; on any error the replicas opened so far are closed.
    """
    out: list[Replica] = []
    try:
        for u in urls:
            if isinstance(u, str) and must_exist and scheme_of(u) in ("", "file"):
                path = path_from_url(u)
                if not os.path.isdir(path):
                    if os.path.exists(path):
                        raise ReplicaUnavailableError(f"{path} is not a directory", replica=u)
                    raise ReplicaUnavailableError(
                        f"{path} does not exist (the operator commands create no directory: a mistyped "
                        f"path would pass for an empty replica); to fill a new or replaced disk with "
                        f"'ckptmirror repair', create it first: mkdir -p {path}",
                        replica=u,
                    )
            out.append(open_replica(u, options_for(u, storage_options)))
        # Local directories by where they lead (``/x``, ``/x/``, ``file:///x``, a symlink to it):
        # one store twice would be one copy counted as two, and a save's files on one position
        # would be the other's too (a failed save's cleanup would delete the other's commit).
        where: dict[str, list[str]] = {}
        for r in out:
            where.setdefault(f"file:{r.root}" if isinstance(r, LocalReplica) else r.url, []).append(r.url)
        dup = sorted(" = ".join(us) if len(set(us)) > 1 else us[0] for us in where.values() if len(us) > 1)
        if dup:
            raise ReplicaURLError(f"replica given more than once: {'; '.join(dup)}; give each store once")
    except BaseException:
        close_opened(out, urls)
        raise
    return out


def close_opened(replicas: Sequence[Replica], urls: Sequence[str | Replica]) -> None:
    """Close the replicas opened from URLs; those the caller passed in as objects are theirs."""
    for r in replicas:
        if not any(r is u for u in urls):
            r.close()
