"""The exception tree of ckptmirror.

Every error about checkpoints and replicas derives from :class:`CkptMirrorError` (invalid
arguments raise :class:`ValueError`, a call on a closed mirror :class:`RuntimeError`, time-outs
:class:`TimeoutError`). Where a builtin
exception already means the same thing, the error also subclasses it, so existing
``except FileNotFoundError`` / ``except TypeError`` code keeps working::

    CkptMirrorError
    ├── UnsupportedTypeError (TypeError)        a value in the state cannot be stored; names its key path
    ├── StepExistsError (FileExistsError)        saving a step that is already committed
    ├── StepNotFoundError (FileNotFoundError)    restore(step=N) where N is not committed anywhere
    ├── ObjectMissingError (FileNotFoundError)   an object a manifest names is absent on a replica
    ├── CorruptObjectError (ValueError)          size or checksum mismatch; names replica and key
    ├── ManifestError (ValueError)               a manifest or commit that does not parse or validate
    ├── StateMismatchError (ValueError)          restore target does not fit the stored state
    ├── ReplicaError (OSError)                   a backend failed (I/O, network); names the replica
    │   ├── ReplicaUnavailableError              the backend cannot be reached at all (an outage: retried)
    │   ├── ReplicaLaggingError                  a replica's write of a save was dropped: still writing when
    │   │                                        the next save needed the staging buffer (slow_replica_timeout_s)
    │   └── ReplicaConfigError                   misconfigured: no such bucket, bad URL (raised at once)
    │       ├── ReplicaMissingError              the store the URL names does not exist (no such bucket); an
    │       │                                    outage instead where another replica holds committed steps
    │       ├── ReplicaPermissionError (PermissionError)  access denied (credentials, token), or a
    │       │                                    path that would leave the root
    │       └── ReplicaURLError (ValueError)     a replica URL that cannot be used: does not parse, unknown
    │                                            scheme, bad placeholder, a store given twice
    ├── SaveFailedError                          a background save failed; carries per-replica failures
    ├── SaveSkippedError                         a save was skipped by the in-flight policy
    ├── CoordinationError                        ranks could not agree: one failed, died or timed out
    └── NoValidCheckpointError                   checkpoints exist, but none verifies (damage, not an outage)

Errors that concern one replica or one object carry ``replica`` and ``key`` attributes, and
their message names both, because "checksum mismatch" alone does not tell an operator which
disk to look at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def _rebuild(cls: type[BaseException], args: tuple[object, ...], attrs: dict[str, object]) -> BaseException:
    """An error as :meth:`CkptMirrorError.__reduce__` took it apart, without calling its ``__init__``."""
    exc = cls.__new__(cls)
    exc.args = args
    for name, value in attrs.items():
        setattr(exc, name, value)  # OSError's errno is a slot, not in __dict__
    return exc


class CkptMirrorError(Exception):
    """Base class of every error ckptmirror raises about checkpoints and replicas."""

    def __reduce__(self) -> tuple[object, ...]:
        # Picklable, whatever the subclass's __init__ takes. torch.distributed.checkpoint sends a
        # rank's exception to the coordinator pickled (gather_object); the default reduce calls
        # cls(*args) with the message alone, which failed for every error here that takes other
        # arguments: under torchrun, the coordinator then raised that TypeError instead of the
        # message naming the key and the fix. (Our own files and wire never pickle.)
        attrs = dict(self.__dict__)
        if isinstance(self, OSError):  # its slots; one set to None would change str() (Py_None is "set")
            slots = {"errno": self.errno, "strerror": self.strerror, "filename": self.filename}
            attrs.update((k, v) for k, v in slots.items() if v is not None)
        return (_rebuild, (type(self), self.args, attrs))


class UnsupportedTypeError(CkptMirrorError, TypeError):
    """A value in the state cannot be stored. ``path`` is its key path, e.g. ``state['optim']['x']``."""

    def __init__(self, path: str, value_type: type, hint: str = "") -> None:
        self.path = path
        self.value_type = value_type
        msg = f"cannot checkpoint {path}: unsupported type {value_type.__module__}.{value_type.__qualname__}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class StepExistsError(CkptMirrorError, FileExistsError):
    """The step is already committed; pass ``overwrite=True`` to replace it."""

    def __init__(self, step: int, replica: str = "") -> None:
        self.step = step
        self.replica = replica
        where = f" on replica {replica}" if replica else ""
        super().__init__(f"step {step} is already committed{where}; pass overwrite=True to replace it")


class StepNotFoundError(CkptMirrorError, FileNotFoundError):
    """The requested step (``step``; None: any step) is not committed on any replica.

    ``replicas`` lists the replica URLs that were looked at, so that a mistyped path shows.
    """

    def __init__(self, step: int | None, available: list[int] | None = None, replicas: list[str] | None = None) -> None:
        self.step = step
        self.available = list(available or [])
        self.replicas = list(replicas or [])
        looked = f" (looked at: {', '.join(self.replicas)})" if self.replicas else ""
        if step is None:
            msg = f"no committed step on any replica{looked}; check the replica paths and URLs"
        else:
            msg = f"step {step} is not committed on any replica (committed: {self.available}){looked}"
        super().__init__(msg)


class _ObjectError(CkptMirrorError):
    """Mixin for errors that concern one object on one replica."""

    def __init__(self, message: str, *, replica: str = "", key: str = "") -> None:
        self.replica = replica
        self.key = key
        where = ", ".join(p for p in (f"replica {replica}" if replica else "", f"object {key}" if key else "") if p)
        super().__init__(f"{where}: {message}" if where else message)


class ObjectMissingError(_ObjectError, FileNotFoundError):
    """An object named by a manifest does not exist on a replica."""


class CorruptObjectError(_ObjectError, ValueError):
    """An object's size or checksum does not match what its manifest recorded."""


class ManifestError(_ObjectError, ValueError):
    """A manifest or commit record is not valid (bad JSON, wrong types, hostile names)."""


class StateMismatchError(CkptMirrorError, ValueError):
    """The restore target (model, optimizer, world size) does not fit the stored state."""


class ReplicaError(_ObjectError, OSError):
    """A replica backend failed: I/O error, network error, permission denied, disk full.

    ``errno`` is the operating system's error number where the backend reported one (a local
    disk's ``ENOSPC``; an agent's HTTP 507 reads as ``ENOSPC``), else None: the replica's health
    check uses it to tell a full or read-only replica from one that does not answer.
    """

    def __init__(self, message: str, *, replica: str = "", key: str = "", errno: int | None = None) -> None:
        super().__init__(message, replica=replica, key=key)
        self.errno = errno


class ReplicaUnavailableError(ReplicaError):
    """A replica cannot be reached at all (endpoint down, connection refused, timed out): an outage."""


class ReplicaLaggingError(ReplicaError):
    """A replica did not get a save: its write was dropped because it was still writing when the
    next ``save()`` needed the staging buffer, and another replica had written the step already
    (``Mirror(slow_replica_timeout_s=...)``), or it was skipped while such a dropped write was
    still finishing. Not damage and not an outage: the replica lags; later saves go to it again.
    """


class ReplicaConfigError(ReplicaError):
    """The replica is misconfigured (no such bucket, a URL that names nothing): not an outage.

    Waiting does not fix it, so it is raised at once (e.g. by ``Mirror()``), never retried or
    treated as a degraded replica; the message names the replica and the fix.
    """


class ReplicaMissingError(ReplicaConfigError):
    """The store a replica URL names does not exist: an S3 (or fsspec object store) bucket that
    nobody created, or one lost with its server.

    Raised at once where nothing else holds the run (a typo in a new job's URL must not pass
    silently). Where another replica holds committed steps, a listing (``Mirror()``, a restore,
    the operator commands) reports it as unreachable instead, with a WARNING naming the bucket
    and the fix: a replacement process resumes from the other replicas, and the replica is used
    again once the bucket exists (RELIABILITY #15: an S3 server restarted empty).
    """


class ReplicaPermissionError(ReplicaConfigError, PermissionError):
    """The backend refused access (credentials, ACLs, peer token), or a path would leave the replica root."""


class ReplicaURLError(ReplicaConfigError, ValueError):
    """A replica URL that cannot be used as written: it does not parse (``peer:/host:7070/x``,
    ``s3://`` without a bucket, a port that is not a number), names an unknown scheme (``s4://``),
    has a bad placeholder (``{rnak}``), or names a store given already; the message says what was
    meant. Also a :class:`ValueError`: it is a bad argument, found before anything is written."""


class SaveFailedError(CkptMirrorError):
    """A save did not commit. ``failures`` maps each failed replica URL to its exception."""

    def __init__(self, step: int, failures: Mapping[str, BaseException], message: str = "") -> None:
        self.step = step
        self.failures = dict(failures)
        detail = "; ".join(f"{url}: {type(exc).__name__}: {exc}" for url, exc in self.failures.items())
        super().__init__(message or f"save of step {step} failed: {detail}")


class SaveSkippedError(CkptMirrorError):
    """A save was skipped because the previous one was still writing (``inflight_policy='skip'``)."""


class CoordinationError(CkptMirrorError):
    """The ranks could not agree on a commit or a restore step (a rank failed, died or timed out)."""


class NoValidCheckpointError(CkptMirrorError):
    """Checkpoints exist, but none of them verifies. ``problems`` maps each step to what was wrong.

    ckptmirror raises this instead of returning ``None`` so that a training job never silently
    starts from scratch over a directory full of damaged checkpoints. It means damage: some copy
    failed its size, checksum or parse check (or is missing everywhere it was looked for). A
    restore that fails only because no replica could be reached or read raises
    :class:`ReplicaUnavailableError` instead. ``replicas`` (the URLs looked at) go into the
    message's fix; ``note`` is a line about the restore as a whole (e.g. which ranks failed).
    """

    def __init__(self, problems: Mapping[int, str], *, replicas: Sequence[str] = (), note: str = "") -> None:
        self.problems = dict(problems)
        self.replicas = list(replicas)
        lines = [
            f"  step {s}: {p}" if s >= 0 else f"  {p}"  # a negative key: not about one step
            for s, p in sorted(self.problems.items(), reverse=True)
        ]
        if note:
            lines.append(f"  {note}")
        urls = " ".join(self.replicas) if self.replicas else "REPLICA..."
        fix = (
            f"run 'ckptmirror verify {urls}' to see what is damaged, 'ckptmirror repair {urls}' to "
            "re-replicate it from a good copy, or restore an older step with step=N"
        )
        super().__init__("checkpoints exist but none can be restored:\n" + "\n".join(lines) + "\n" + fix)
