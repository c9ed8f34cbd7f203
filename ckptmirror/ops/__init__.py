"""Operator commands as library functions: ``ls``, ``verify``, ``repair``, ``prune``, ``inspect``, ``export``.

The ``ckptmirror`` command line (:mod:`ckptmirror.cli`) is a thin layer over these functions;
they can be called from Python as well and return frozen dataclasses (each with ``to_dict()``
for JSON). Replicas are given as URLs (or :class:`~ckptmirror.replicas.Replica` objects),
opened with :func:`~ckptmirror.replicas.open_replica`, so every backend works here.

Verification is the reader's verification, not a second implementation: commit records are
read with :meth:`~ckptmirror.restore.fetch.Fetcher.read_commit`, rank manifests with
:meth:`~ckptmirror.restore.fetch.Fetcher.read_manifest` (size and checksum pinned by the commit)
and checked with :func:`~ckptmirror.restore.check.validate_manifest`, presence and sizes with
:meth:`~ckptmirror.restore.fetch.Fetcher.preflight` and object contents with
:meth:`~ckptmirror.restore.fetch.Fetcher.fetch` (size + xxh3), restricted to one replica at a
time so that every replica is judged on its own. Object reads run on a small thread pool; each
thread reuses one buffer as large as the largest object it has read, so memory stays at
``threads x object size`` whatever the size of the checkpoint.

Nothing here unpickles or ``torch.load``s checkpoint data. :func:`export` writes files for other
tools (``safetensors`` or ``torch.save``); writing is not loading.

One module per command (:mod:`.ls`, :mod:`.verify`, :mod:`.repair`, :mod:`.prune`,
:mod:`.inspect`, :mod:`.export`), the checking engine in :mod:`._engine` and what they share in
:mod:`._common`. Each command module has the name of its function, so ``ckptmirror.ops.verify``
is the function; use :func:`importlib.import_module` to reach a module itself.
"""

from __future__ import annotations

from ._common import Problem, UsageError, dotted, open_replicas

# Importable from here (they type the ``progress`` argument of verify and repair) but, as before
# the split, not in __all__; "X as X" marks them as re-exported for type checkers.
from ._common import Progress as Progress
from ._common import ProgressFactory as ProgressFactory
from .export import ExportReport, export
from .inspect import InspectReport, LeafInfo, RankTree, TreeEntry, inspect
from .ls import Listing, StepInfo, ls
from .prune import PruneReport, PruneResult, prune
from .repair import RepairAction, RepairReport, repair
from .verify import RankCheck, ReplicaCheck, StepCheck, VerifyReport, verify

__all__ = [
    "ExportReport",
    "InspectReport",
    "LeafInfo",
    "Listing",
    "Problem",
    "PruneReport",
    "PruneResult",
    "RankCheck",
    "RankTree",
    "RepairAction",
    "RepairReport",
    "ReplicaCheck",
    "StepCheck",
    "StepInfo",
    "TreeEntry",
    "UsageError",
    "VerifyReport",
    "dotted",
    "export",
    "inspect",
    "ls",
    "open_replicas",
    "prune",
    "repair",
    "verify",
]
