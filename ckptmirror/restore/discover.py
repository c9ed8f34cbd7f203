"""Step discovery, the first stage of the read path: which steps exist, and where.

A step exists on a replica when its commit record is there (presence only: nothing is read
or verified here). A step directory without a commit record is *torn*, the leftovers of an
interrupted save; a replica that cannot be listed at all is *unreachable*. The candidates
found here are validated (:mod:`ckptmirror.restore.check`), read (:mod:`ckptmirror.restore.fill`) and
chosen among (:mod:`ckptmirror.restore.choose`) by the later stages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CkptMirrorError, ReplicaConfigError
from ..format import commit_key, parse_step_dir
from ..replicas.base import Replica

log = logging.getLogger("ckptmirror")


@dataclass(frozen=True)
class StepListing:
    """Which replicas hold a commit record for which step, and what is torn."""

    committed: dict[int, list[str]]  # step -> replica URLs, in preference order
    torn: dict[str, list[int]]  # replica URL -> steps with objects but no commit
    unreachable: dict[str, str]  # replica URL -> error


def list_steps(replicas: Sequence[Replica]) -> StepListing:
    """List committed and torn steps on every replica (presence of the commit record only).

    A replica that cannot be reached is reported in ``unreachable`` (an outage: the caller goes
    on with the others). A misconfigured one (:class:`ReplicaConfigError`: no such bucket,
    access denied, a wrong peer token) is raised at once: waiting would not fix it, and going
    on without it would hide the mistake for the whole run.
    """
    committed: dict[int, list[str]] = {}
    torn: dict[str, list[int]] = {}
    unreachable: dict[str, str] = {}
    for r in replicas:
        try:
            for name in r.list_steps():
                s = parse_step_dir(name)
                if s is None:
                    continue
                if r.size(commit_key(s)) is not None:
                    committed.setdefault(s, []).append(r.url)
                else:
                    torn.setdefault(r.url, []).append(s)
        except ReplicaConfigError:
            raise
        except (CkptMirrorError, OSError) as exc:
            log.warning("replica %s could not be listed: %s", r.url, exc)
            unreachable[r.url] = f"{type(exc).__name__}: {exc}"
    return StepListing(dict(sorted(committed.items())), torn, unreachable)
