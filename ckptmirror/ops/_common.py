"""What every operator command shares: opening replicas, :class:`Problem`, error types, tree walking.

This module is internal to :mod:`ckptmirror.ops`; its names carry no leading underscore
because the package's modules import them from one another. The public ones are
re-exported by :mod:`ckptmirror.ops`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import CkptMirrorError, ReplicaConfigError, ReplicaPermissionError
from ..replicas import Replica, close_opened, scheme_of
from ..replicas import open_replicas as _open_replicas
from ..restore.discover import StepListing, list_steps
from ..save.retention import pinned_steps

#: Errors that concern one replica or object; anything else is a bug and propagates.
FAILURES = (CkptMirrorError, OSError)


class UsageError(CkptMirrorError, ValueError):
    """Bad arguments: an unknown URL scheme, a ``memory://`` URL on the command line, ``--keep 0``."""


class ReplicaConfigUsageError(ReplicaConfigError, UsageError):
    """A replica that answers but is misconfigured (no such bucket, access denied, a token the
    peer agent refuses), met by an operator command: still a :class:`ReplicaConfigError` (its
    message names the replica and the fix, unchanged), and also a :class:`UsageError`, because
    for an operator command it is a mistake in what it was given (exit status 2, as the
    documentation says), not a failure of the checkpoints (1)."""


class ReplicaPermissionUsageError(ReplicaConfigUsageError, ReplicaPermissionError):
    """:class:`ReplicaConfigUsageError` of a refused access: still a ``PermissionError`` too."""


def as_usage_error(exc: ReplicaConfigError) -> ReplicaConfigUsageError:
    """``exc`` as a :class:`ReplicaConfigUsageError` (a :class:`ReplicaPermissionUsageError` if
    it was a refused access): the same message, replica, key and errno."""
    cls = ReplicaPermissionUsageError if isinstance(exc, ReplicaPermissionError) else ReplicaConfigUsageError
    out = cls(str(exc), errno=exc.errno)
    out.replica, out.key = exc.replica, exc.key
    return out


class Progress(Protocol):
    """What the progress callback factory returns (a ``tqdm`` bar fits)."""

    def update(self, n: int) -> Any: ...

    def close(self) -> Any: ...


#: ``progress(total, unit, description)`` -> a :class:`Progress`; called once per reading pass.
#: ``total`` 0 means that it is not known beforehand (the bar counts without a percentage).
ProgressFactory = Callable[[int, str, str], Progress]


# ----------------------------------------------------------------------------- replicas


def reject_memory_url(url: str) -> None:
    """Raise :class:`UsageError` if ``url`` is a ``memory://`` URL.

    Shared with the command line, which checks every URL before opening any: a memory
    replica exists only inside the Python process that made it.
    """
    try:
        memory = scheme_of(url) == "memory"
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if memory:
        raise UsageError(f"{url}: memory:// replicas live inside one Python process; the command line cannot see them")


def open_replicas(
    urls: Sequence[str | Replica],
    *,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    allow_memory: bool = True,
) -> list[Replica]:
    """:func:`ckptmirror.replicas.open_replicas` for operator commands: a local directory must
    exist already, and a bad URL is a :class:`UsageError`."""
    if not urls:
        raise UsageError("at least one replica URL is needed")
    for u in urls:
        if not isinstance(u, (str, Replica)) or not u:
            raise UsageError(f"replica URL must be a non-empty string, got {u!r}")
        if isinstance(u, str) and not allow_memory:
            reject_memory_url(u)
    try:
        return _open_replicas(urls, storage_options, must_exist=True)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    except ImportError as exc:
        raise UsageError(str(exc)) from exc
    except ReplicaConfigError as exc:  # e.g. gs:// without gcsfs: what it was given cannot work
        if isinstance(exc, UsageError):
            raise
        raise as_usage_error(exc) from exc


@contextmanager
def opened(
    urls: Sequence[str | Replica], storage_options: Mapping[str, Mapping[str, Any]] | None
) -> Iterator[list[Replica]]:
    """:func:`open_replicas` for the duration of a ``with`` block."""
    replicas = open_replicas(urls, storage_options=storage_options)
    try:
        yield replicas
    except ReplicaConfigError as exc:
        # Raised at once by the listing (a wrong bucket or token does not get better by waiting)
        # or by any later call: the command's caller was given a replica that cannot work.
        if isinstance(exc, UsageError):
            raise
        raise as_usage_error(exc) from exc
    finally:
        close_opened(replicas, urls)


def list_reachable(replicas: Sequence[Replica]) -> tuple[StepListing, list[Replica]]:
    """The reader's step listing, and the replicas it could list (in the caller's order)."""
    listing = list_steps(replicas)
    return listing, [r for r in replicas if r.url not in listing.unreachable]


# ----------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one object (or commit, or step) on one replica.

    ``kind`` is one of ``missing``, ``truncated`` (shorter than recorded, zero length included),
    ``wrong-size`` (longer), ``corrupt`` (checksum mismatch), ``invalid`` (a commit or manifest
    that does not parse or validate), ``unreadable`` (the backend failed to read it),
    ``unavailable`` (the replica stopped answering during the run: an outage, not damage; what it
    holds was not checked),
    ``lagging`` (the step is committed on another replica but not on this one),
    ``disagree`` (this replica's commit record of the step differs from the one a restore reads:
    another checkpoint under the same step number) and ``unrecoverable`` (no replica holds a
    verifying copy).
    """

    step: int
    replica: str
    key: str
    kind: str
    detail: str
    rank: int | None = None

    def __str__(self) -> str:
        where = " ".join(p for p in (self.key, f"on {self.replica}" if self.replica else "") if p)
        return f"{self.kind}: {where}: {self.detail}" if where else f"{self.kind}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def strip_where(msg: str, url: str, key: str) -> str:
    """Drop the "replica X, object K: " prefixes an error repeats, and the reader's wrapper."""
    prefixes = (
        "no replica holds a verifying copy: ",
        f"replica {url}, object {key}: ",
        f"object {key}: ",
        f"replica {url}: ",
    )
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if msg.startswith(prefix):
                msg = msg[len(prefix) :]
                changed = True
    return msg


# ----------------------------------------------------------------------------- state trees


def walk(node: Any, path: tuple[Any, ...], is_leaf: Callable[[Any], bool]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Yield (path, value) for every leaf and plain value; empty containers are values.

    Only plain lists and tuples are walked into: a ``torch.Size`` (a tuple subclass) is one
    value, not a container of ints.
    """
    if is_leaf(node):
        yield path, node
    elif isinstance(node, dict) and node:
        for k, v in node.items():
            yield from walk(v, path + (k,), is_leaf)
    elif type(node) in (list, tuple) and node:
        for i, v in enumerate(node):
            yield from walk(v, path + (i,), is_leaf)
    else:
        yield path, node


def dotted(path: tuple[Any, ...]) -> str:
    """A key path as a dotted name: ``("optim", "state", 0, "exp_avg")`` -> ``optim.state.0.exp_avg``."""
    return ".".join(str(k) for k in path)


def empty_hint(url: str) -> str:
    """What to check when ``url`` holds nothing at all: the part of the URL most likely mistyped."""
    try:
        scheme = scheme_of(url)
    except ValueError:
        scheme = ""
    if scheme in ("peer", "peers"):
        # The agent has no listing of its namespaces to offer (its API lists keys within one).
        named = url.split("://", 1)[-1].strip("/").count("/") > 0
        return (
            "check the namespace (peer://HOST:PORT/NAMESPACE"
            + ("" if named else "; without one, the agent's 'default' namespace is meant")
            + ") and that the agent is the one the job writes to"
        )
    if scheme == "s3":
        return "check the bucket and prefix (s3://BUCKET/PREFIX)"
    if scheme in ("", "file"):
        return "check the path"
    return "check the URL"


def kept_steps(
    replicas: Sequence[Replica], committed: Mapping[int, Sequence[str]], keep: int | None
) -> set[int] | None:
    """The steps a job with ``keep_last=keep`` keeps on every replica: the newest ``keep``
    committed anywhere, and the pinned ones (any replica's pin records). None when ``keep`` is
    None, or when a replica's pin records cannot be listed (then every step is expected, as
    without ``keep``: a step that may be pinned is not waved through)."""
    if keep is None:
        return None
    out = set(sorted(committed)[-keep:])
    for r in replicas:
        try:
            out |= pinned_steps(r)
        except (CkptMirrorError, OSError):
            return None
    return out
