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
