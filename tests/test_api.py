"""The public surface: a sorted, complete __all__, and the error tree's builtin bases."""

from __future__ import annotations

import subprocess
import sys

import ckptmirror
from ckptmirror import errors


def test_all_is_sorted_and_resolves() -> None:
    assert ckptmirror.__all__ == sorted(ckptmirror.__all__)
    for name in ckptmirror.__all__:
        assert hasattr(ckptmirror, name), name


def test_every_error_is_exported_and_derives_from_the_base() -> None:
    classes = [
        v
        for v in vars(errors).values()
        if isinstance(v, type) and issubclass(v, Exception) and not v.__name__.startswith("_")
    ]
    for cls in classes:
        assert issubclass(cls, ckptmirror.CkptMirrorError), cls
        assert cls.__name__ in ckptmirror.__all__, cls


def test_errors_subclass_the_builtin_they_mean() -> None:
    assert issubclass(ckptmirror.UnsupportedTypeError, TypeError)
    assert issubclass(ckptmirror.StepExistsError, FileExistsError)
    assert issubclass(ckptmirror.StepNotFoundError, FileNotFoundError)
    assert issubclass(ckptmirror.ObjectMissingError, FileNotFoundError)
    assert issubclass(ckptmirror.CorruptObjectError, ValueError)
    assert issubclass(ckptmirror.ReplicaError, OSError)
    assert issubclass(ckptmirror.ReplicaPermissionError, PermissionError)
    err = ckptmirror.CorruptObjectError("checksum mismatch", replica="s3://b/p", key="step-000000000001/x")
    assert "s3://b/p" in str(err) and "step-000000000001/x" in str(err)


def test_import_ckptmirror_does_not_import_torch_until_mirror_is_used() -> None:
    # The command line and the peer agent run without torch (~3 CPU-seconds a process); the
    # public names still work, imported on first use.
    code = (
        "import sys, ckptmirror, ckptmirror.cli.main, ckptmirror.replicas.peer_agent\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert {'Mirror', 'RestoreResult', 'Stateful'} <= set(dir(ckptmirror))\n"
        "from ckptmirror import Mirror\n"
        "assert 'torch' in sys.modules and Mirror is ckptmirror.Mirror\n"
        "import ckptmirror.save.snapshot, ckptmirror.restore.fill\n"
        "assert callable(ckptmirror.save) and callable(ckptmirror.restore), 'a subpackage took the name'\n"
        "assert ckptmirror.RestoreResult.__name__ == 'RestoreResult'\n"
        "try:\n"
        "    ckptmirror.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_every_error_survives_pickling_with_its_message_and_attributes() -> None:
    """torch.distributed.checkpoint pickles a rank's exception to the coordinator and back; an
    error whose ``__init__`` takes more than the message must still arrive whole (the default
    reduce calls ``cls(message)``: a TypeError from the unpickler instead of the error)."""
    import errno as errnos
    import pickle

    from ckptmirror.save.retention import RetentionStopped

    samples: list[BaseException] = [
        errors.CkptMirrorError("base"),
        errors.UnsupportedTypeError("state_dict['meta']['epoch']", int, "pass planner=MirrorSavePlanner()"),
        errors.StepExistsError(7, "/r"),
        errors.StepNotFoundError(9, [1, 2], ["/r", "s3://b/p"]),
        errors.ObjectMissingError("not found", replica="/r", key="step-1/o"),
        errors.CorruptObjectError("checksum mismatch", replica="/r", key="step-1/o"),
        errors.ManifestError("bad JSON", replica="/r", key="step-1/m.json"),
        errors.StateMismatchError("shape"),
        errors.ReplicaError("disk full", replica="/r", key="k", errno=errnos.ENOSPC),
        errors.ReplicaUnavailableError("down", replica="peer://h:1/x"),
        errors.ReplicaLaggingError("dropped its write of step 3", replica="s3://b"),
        errors.ReplicaConfigError("no bucket", replica="s3://b"),
        errors.ReplicaMissingError("bucket 'b' does not exist", replica="s3://b"),
        errors.ReplicaPermissionError("denied", replica="s3://b"),
        errors.ReplicaURLError("unknown scheme", replica="s4://b"),
        errors.SaveFailedError(3, {"/r": errors.ReplicaError("io", replica="/r")}),
        errors.SaveSkippedError("skipped"),
        errors.CoordinationError("rank 1 died"),
        errors.NoValidCheckpointError({5: "corrupt"}, replicas=["/r"], note="ranks 1"),
        RetentionStopped("/r", "step 4", errors.ReplicaUnavailableError("down", replica="/r")),
    ]
    covered = {type(e) for e in samples}
    for v in vars(errors).values():
        if isinstance(v, type) and issubclass(v, Exception) and not v.__name__.startswith("_"):
            assert v in covered, f"add a sample of {v.__name__}"
    for exc in samples:
        exc.add_note("a note")
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc) and back.args == exc.args, exc
        assert back.__notes__ == ["a note"], exc
        for name, value in vars(exc).items():
            assert name in vars(back) and str(vars(back)[name]) == str(value), (exc, name)
        if isinstance(exc, OSError):
            assert back.errno == exc.errno, exc
    replica_error = samples[8]
    assert isinstance(replica_error, errors.ReplicaError)
    assert pickle.loads(pickle.dumps(replica_error)).errno == errnos.ENOSPC
