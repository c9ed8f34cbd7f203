"""ckptmirror: replicated, checksummed, asynchronous checkpoints for PyTorch training.

``save()`` returns after one memcpy of the state into reused host buffers; hashing and
writing to every replica happen in the background; a commit record written last makes a
step exist. ``restore()`` finds the newest step that verifies and loads it in place,
falling back object by object to other replicas and step by step to older checkpoints.

Module-level helpers keep one default :class:`Mirror` for a training script::

    import ckptmirror
    ckptmirror.init(["/data/ckpt/run1"], keep_last=3)
    resumed = ckptmirror.restore(model, optim)        # a RestoreResult, or None on a fresh run
    start = resumed.step + 1 if resumed else 0
    for step in range(start, ...):
        ...
        ckptmirror.save(step, model, optim)
    ckptmirror.close()

Without :func:`init`, the replicas come from ``CKPTMIRROR_REPLICAS`` (comma-separated URLs).
Every environment variable ckptmirror reads is listed in :data:`ckptmirror.config.ENVIRONMENT`;
:meth:`Mirror.metrics` and :mod:`ckptmirror.metrics` (Prometheus) report how the saves are going.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import config

# The subpackages named like the functions below, imported first (they are light: docstrings)
# so that the functions win the names: a package's first import binds it as an attribute of
# its parent, and ``ckptmirror.mirror`` (imported on first use, below) imports both.
from . import restore as _restore_path  # noqa: F401
from . import save as _save_path  # noqa: F401
from ._version import __version__
from .config import EnvConfigError
from .dist import ring_peer
from .errors import (
    CkptMirrorError,
    CoordinationError,
    CorruptObjectError,
    ManifestError,
    NoValidCheckpointError,
    ObjectMissingError,
    ReplicaConfigError,
    ReplicaError,
    ReplicaLaggingError,
    ReplicaMissingError,
    ReplicaPermissionError,
    ReplicaUnavailableError,
    ReplicaURLError,
    SaveFailedError,
    SaveSkippedError,
    StateMismatchError,
    StepExistsError,
    StepNotFoundError,
    UnsupportedTypeError,
)
from .handle import ReplicaStatus, SaveHandle
from .replicas import Replica

if TYPE_CHECKING:
    from .mirror import Mirror, RestoreResult, Stateful

#: Names imported on first use (PEP 562): ``ckptmirror.mirror`` imports torch (~3 CPU-seconds),
#: which the command line, the operator commands but ``export`` and the peer agent
#: (``ckptmirror serve``) never need. ``from ckptmirror import Mirror`` and ``ckptmirror.Mirror``
#: work as before.
_LAZY = {"Mirror": "mirror", "RestoreResult": "mirror", "Stateful": "state.targets"}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ckptmirror' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)  # binds no name of ours: see above
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CkptMirrorError",
    "CoordinationError",
    "CorruptObjectError",
    "EnvConfigError",
    "ManifestError",
    "Mirror",
    "NoValidCheckpointError",
    "ObjectMissingError",
    "Replica",
    "ReplicaConfigError",
    "ReplicaError",
    "ReplicaLaggingError",
    "ReplicaMissingError",
    "ReplicaPermissionError",
    "ReplicaStatus",
    "ReplicaURLError",
    "ReplicaUnavailableError",
    "RestoreResult",
    "SaveFailedError",
    "SaveHandle",
    "SaveSkippedError",
    "StateMismatchError",
    "Stateful",
    "StepExistsError",
    "StepNotFoundError",
    "UnsupportedTypeError",
    "__version__",
    "close",
    "get_mirror",
    "init",
    "restore",
    "ring_peer",
    "save",
    "wait",
]

#: Kept here for callers that named it so; the table of variables is :mod:`ckptmirror.config`.
ENV_REPLICAS = config.ENV_REPLICAS
_default: Mirror | None = None
_default_lock = threading.Lock()


def init(replicas: Sequence[str | Replica], **options: Any) -> Mirror:
    """Create the default mirror used by the module-level functions (closing any previous one)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        from .mirror import Mirror

        _default = Mirror(replicas, **options)
        return _default


def get_mirror() -> Mirror:
    """The default mirror: the one from :func:`init`, else one built from the environment
    (``CKPTMIRROR_REPLICAS``, and the other variables of :data:`ckptmirror.config.ENVIRONMENT`)."""
    global _default
    with _default_lock:
        if _default is None:
            urls = config.replicas()
            if not urls:
                if os.environ.get(ENV_REPLICAS, "").strip():  # set, but only commas and spaces
                    raise EnvConfigError(
                        f"${ENV_REPLICAS}={os.environ[ENV_REPLICAS]!r} is not accepted: use comma-separated "
                        "replica URLs (a local path, s3://bucket/prefix, peer://host:port/namespace, ...)"
                    )
                raise CkptMirrorError(f"no replicas configured: call ckptmirror.init([...]) or set {ENV_REPLICAS}")
            from .mirror import Mirror

            try:
                _default = Mirror(urls)
            except ReplicaURLError as exc:  # the variable's text, not an argument: name the variable
                raise EnvConfigError(f"${ENV_REPLICAS}={os.environ[ENV_REPLICAS]!r} is not accepted: {exc}") from exc
        return _default


def save(step: int, model: Stateful | None, optim: Stateful | None = None, **kwargs: Any) -> SaveHandle:
    """:meth:`Mirror.save` on the default mirror."""
    return get_mirror().save(step, model, optim, **kwargs)


def restore(model: Stateful | None, optim: Stateful | None = None, **kwargs: Any) -> RestoreResult | None:
    """:meth:`Mirror.restore` on the default mirror."""
    return get_mirror().restore(model, optim, **kwargs)


def wait(timeout: float | None = None) -> None:
    """:meth:`Mirror.wait` on the default mirror."""
    get_mirror().wait(timeout)


def close() -> None:
    """Close the default mirror (waits for in-flight saves)."""
    global _default
    with _default_lock:
        m, _default = _default, None
    if m is not None:
        m.close()
