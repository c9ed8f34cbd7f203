"""Checks of what the peer agent stores: one file against its size and checksum, a commit
before it is accepted, and the scrubber.

:func:`check_file` is the one check of a stored file (size, then XXH3 over its bytes); the agent's
commit check (:func:`check_commit`) and the scrubber both use it, so "damaged" means the same
thing in both places.

A namespace may hold only part of a step, as a node-local disk does: with ``ring_peer`` each
node's namespace holds that node's ranks, while the commit record names every rank. The commit
check accepts that when the client names the writers whose files it put there (see Commits in
``_peer_protocol``), and keeps what the namespace held next to the commit record (:class:`Held`);
the scrubber then reports the ranks (and, for a replicated step, the other writers' objects)
the namespace never held as ``not_held``, not as damage, while a manifest or object it held and
lost, or one that is here and damaged, is damage as anywhere else. A namespace without a Held
record must hold everything its commit records name.

The :class:`Scrubber` (``ckptmirror serve --scrub-interval S --scrub-bytes-per-s N``) is a
thread that re-reads everything the agent holds, namespace by namespace: every committed step's
commit record (parsed by :func:`~ckptmirror.format.parse_commit`), each rank manifest it pins
(size and checksum from the commit, then :func:`~ckptmirror.format.parse_rank_manifest`) and
every object each manifest names (size and checksum from the manifest). It never reads faster
than ``bytes_per_s`` on average (:class:`Pacer`): scrubbing takes a bounded share of the disk,
whatever restores and uploads need at the same time. A pass starts every ``interval_s``
seconds (at once when the previous one took longer).

Results are kept per namespace and step, with the time each step was checked, and replaced as
each step is checked again: a damaged object is reported as soon as its step is done, not at
the end of the pass. A write or delete in a step (a ``ckptmirror repair``, retention) drops
that step's result (:meth:`Scrubber.invalidate`): a result is only ever about bytes that have
not changed since they were read. A step deleted while it is being read (retention) is not
reported as damaged: its result is dropped when its commit record turns out to be gone.

Problem kinds are those of ``ckptmirror verify`` (:class:`ckptmirror.ops.Problem`): ``missing``,
``truncated``, ``wrong-size``, ``corrupt``, ``invalid`` (does not parse), ``unreadable``.

The code lives in two private modules, one concern each; this one keeps the names the agent
imports:

- :mod:`._scrub_check`: :class:`Pacer`, :func:`check_file`, :func:`check_commit`, the
  :class:`Held` records, and the namespace and step directories (no state: the upload handlers
  and the metrics call it too);
- :mod:`._scrub_run`: the :class:`Scrubber` thread and its results.
"""

from __future__ import annotations

from ._peer_protocol import DEFAULT_SCRUB_BYTES_PER_S
from ._scrub_check import (
    CHUNK_BYTES,
    HELD_KIND,
    HELD_PREFIX,
    MAX_COMMIT_BYTES,
    MAX_DEPTH,
    Damage,
    Held,
    Pacer,
    Writer,
    check_commit,
    check_file,
    committed_steps,
    drop_held,
    find_namespaces,
    held_key,
    newest_committed,
    read_held,
    stored_objects,
)
from ._scrub_run import MAX_NAMED, RankResult, Scrubber, StepResult

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_SCRUB_BYTES_PER_S",
    "HELD_KIND",
    "HELD_PREFIX",
    "MAX_COMMIT_BYTES",
    "MAX_DEPTH",
    "MAX_NAMED",
    "Damage",
    "Held",
    "Pacer",
    "RankResult",
    "Scrubber",
    "StepResult",
    "Writer",
    "check_commit",
    "check_file",
    "committed_steps",
    "drop_held",
    "find_namespaces",
    "held_key",
    "newest_committed",
    "read_held",
    "stored_objects",
]
