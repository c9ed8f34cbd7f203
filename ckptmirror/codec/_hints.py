"""CompressionHints: the memory, from save to save, of which planes did not compress.

Apart because it is the codec's only long-lived object (one per run, shared by the I/O
threads) and needs neither numpy nor zstd: the encoder only asks it and tells it.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable


class CompressionHints:
    """Remembers which planes of which objects did not compress, so that later saves skip them.

    Pass one instance to every :func:`encode` of a run, with a ``slot`` naming the object (its
    index in the rank's data stream, say). A plane found incompressible is stored raw on the
    next saves without compressing even a sample; every ``recheck_every``-th save samples it
    again, in case the data changed (an optimizer state that was all zeros at step 0).
    Thread-safe. Memory: one small dict entry per incompressible plane, at most
    ``max_entries`` (then the oldest are forgotten).

    ``sampled`` and ``skipped`` count the plane decisions made by compressing and made from a hint.
    """

    def __init__(self, recheck_every: int = 16, max_entries: int = 1 << 20) -> None:
        if recheck_every < 1 or max_entries < 1:
            raise ValueError(f"recheck_every and max_entries must be >= 1, not {recheck_every}, {max_entries}")
        self.recheck_every = recheck_every
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._raw: dict[Hashable, int] = {}  # plane key -> saves skipped since it was last checked
        self.sampled = 0
        self.skipped = 0

    def skip(self, key: Hashable) -> bool:
        """Whether plane ``key`` should be stored raw without trying (counts the decision)."""
        with self._lock:
            n = self._raw.get(key)
            if n is None or n + 1 >= self.recheck_every:
                self._raw.pop(key, None)
                self.sampled += 1
                return False
            self._raw[key] = n + 1
            self.skipped += 1
            return True

    def record(self, key: Hashable, compressible: bool) -> None:
        """Record what compressing plane ``key`` found."""
        with self._lock:
            if compressible:
                self._raw.pop(key, None)
                return
            if key not in self._raw and len(self._raw) >= self.max_entries:
                del self._raw[next(iter(self._raw))]  # dicts keep insertion order: the oldest
            self._raw[key] = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._raw)
