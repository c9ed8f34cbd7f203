"""Pin records on the replicas (:mod:`ckptmirror.format.pins`): written and deleted in the
background for :meth:`Fanout.pin <ckptmirror.save.fanout.Fanout.pin>`, so that ``ckptmirror
prune``, another process, keeps the steps a job pinned.

A pin must never cost the training thread a network round trip: :meth:`PinRecords.want` only
notes what each replica should hold, and :meth:`PinRecords.write` (the fanout's retention
thread) does the I/O. What fails stays noted and is tried again on the replica's next pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from ..errors import CkptMirrorError
from ..format import pin_key, pin_record
from ..replicas.base import Replica

log = logging.getLogger("ckptmirror")


class PinRecords:
    """Per replica URL, the pin records still to write (True) or delete (False) there."""

    def __init__(self, urls: Sequence[str]) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, dict[int, bool]] = {u: {} for u in urls}

    def want(self, url: str, step: int, pinned: bool) -> None:
        """Note that ``url`` should hold ``step``'s pin record (``pinned``) or not. No I/O."""
        with self._lock:
            self._pending[url][step] = pinned

    def write(self, replica: Replica) -> None:
        """Write and delete the records pending on ``replica``. A failure is a WARNING and ends
        the attempt (the next one would likely wait as long: an outage costs a time budget); what
        is left stays pending for the next call."""
        with self._lock:
            todo = sorted(self._pending[replica.url].items())
        for step, pinned in todo:
            try:
                if pinned:
                    replica.put(pin_key(step), pin_record(step))
                else:
                    replica.delete(pin_key(step))
            except Exception as exc:  # noqa: BLE001 - never out of the retention thread (it would stop retention)
                if not isinstance(exc, (CkptMirrorError, OSError)):
                    log.warning("pin record of step %d on %s dropped: %s", step, replica.url, exc)
                    with self._lock:
                        if self._pending[replica.url].get(step) is pinned:
                            del self._pending[replica.url][step]
                    continue
                log.warning(
                    "could not %s the pin record of step %d on %s: %s (tried again after the next save there; "
                    "until then 'ckptmirror prune' there does not know the pin)",
                    "write" if pinned else "delete",
                    step,
                    replica.url,
                    exc,
                )
                return
            with self._lock:
                if self._pending[replica.url].get(step) is pinned:  # not changed meanwhile
                    del self._pending[replica.url][step]

    def pending(self, url: str) -> bool:
        """Whether records are still to be written or deleted on ``url``."""
        with self._lock:
            return bool(self._pending[url])
