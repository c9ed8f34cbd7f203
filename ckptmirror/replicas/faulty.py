"""A fault-injecting wrapper around any replica, for tests (yours and ours).

Example: fail the third put (objects and manifests count alike) with ENOSPC, and flip a bit in
every read of one object (its key ends in the writer's token: list the step's keys to find it)::

    r = FaultyReplica(LocalReplica("/tmp/x"), fail_put_at=3, fail_error=OSError(errno.ENOSPC, "No space left"))
    r = FaultyReplica(LocalReplica("/tmp/x"), flip_read={"step-000000000001/rank-00000/o000000-e33f9033.bin"})

``on_phase`` lets a test stop or kill a writer at an exact point of the commit protocol: the
callback receives the phase name (``"put"``, ``"put-manifest"``, ``"commit"``, ``"get"``,
``"delete"``) and the key, before the inner replica is called.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from ..errors import ReplicaError
from .base import Buffer, Replica


class FaultyReplica(Replica):
    """Wraps ``inner``; every fault is off unless asked for."""

    def __init__(
        self,
        inner: Replica,
        *,
        fail_put_at: int | None = None,
        fail_error: BaseException | None = None,
        truncate_put_at: int | None = None,
        flip_read: Iterable[str] = (),
        delay_s: float = 0.0,
        fail_commit: bool = False,
        unavailable: bool = False,
        on_phase: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(inner.url)
        self.inner = inner
        self.read_priority = inner.read_priority
        self.compression = inner.compression
        self.compression_level = inner.compression_level
        self.incremental = inner.incremental
        self.fail_put_at = fail_put_at
        self.fail_error = fail_error
        self.truncate_put_at = truncate_put_at
        self.flip_read = set(flip_read)
        self.delay_s = delay_s
        self.fail_commit = fail_commit
        self.unavailable = unavailable
        self.on_phase = on_phase
        self.puts = 0
        self._lock = threading.Lock()

    def _gate(self, phase: str, key: str) -> None:
        if self.unavailable:
            raise ReplicaError("injected: replica unavailable", replica=self.url, key=key)
        if self.on_phase is not None:
            self.on_phase(phase, key)
        if self.delay_s:
            time.sleep(self.delay_s)

    def put(self, key: str, data: Buffer) -> None:
        phase = "put-manifest" if key.endswith(".json") else "put"
        self._gate(phase, key)
        with self._lock:
            self.puts += 1
            n = self.puts
        if self.fail_put_at is not None and n == self.fail_put_at:
            raise self.fail_error or ReplicaError(f"injected failure on put #{n}", replica=self.url, key=key)
        if self.truncate_put_at is not None and n == self.truncate_put_at:
            data = memoryview(data)[: len(memoryview(data)) // 2]
        self.inner.put(key, data)

    def commit(self, key: str, data: bytes) -> None:
        self._gate("commit", key)
        if self.fail_commit:
            raise self.fail_error or ReplicaError("injected commit failure", replica=self.url, key=key)
        self.inner.commit(key, data)

    def get(self, key: str, max_bytes: int) -> bytes:
        self._gate("get", key)
        data = self.inner.get(key, max_bytes)
        if key in self.flip_read and data:
            data = bytes([data[0] ^ 0x01]) + data[1:]
        return data

    def read_into(self, key: str, out: memoryview) -> None:
        self._gate("get", key)
        self.inner.read_into(key, out)
        if key in self.flip_read and len(out):
            view = out.cast("B") if out.format != "B" else out
            view[len(view) // 2] ^= 0x01

    def size(self, key: str) -> int | None:
        if self.unavailable:
            raise ReplicaError("injected: replica unavailable", replica=self.url, key=key)
        return self.inner.size(key)

    def list_steps(self) -> list[str]:
        if self.unavailable:
            raise ReplicaError("injected: replica unavailable", replica=self.url)
        return self.inner.list_steps()

    def list_prefix(self, prefix: str) -> list[str]:
        return self.inner.list_prefix(prefix)

    def delete(self, key: str) -> None:
        self._gate("delete", key)
        self.inner.delete(key)

    def delete_prefix(self, prefix: str) -> None:
        self._gate("delete", prefix)
        self.inner.delete_prefix(prefix)

    def probe_write(self, need_bytes: int) -> None:
        self.inner.probe_write(need_bytes)

    def close(self) -> None:
        self.inner.close()
