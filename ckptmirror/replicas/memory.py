"""In-memory replica (``memory://name``): for tests and for users' own test suites.

Replicas with the same name in one process share their contents, so a test can write with
one :class:`~ckptmirror.Mirror` and read with another. :func:`MemoryReplica.reset` empties one.
"""

from __future__ import annotations

import threading
from typing import ClassVar

from ..errors import CorruptObjectError, ObjectMissingError, StepExistsError
from .base import Buffer, Replica, step_of_key, validate_key


class MemoryReplica(Replica):
    """A dict of bytes, shared per name within the process."""

    read_priority = 5
    _stores: ClassVar[dict[str, dict[str, bytes]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str) -> None:
        super().__init__(url)
        name = url.split("://", 1)[-1]
        with self._lock:
            self.objects = self._stores.setdefault(name, {})

    @classmethod
    def reset(cls, name: str | None = None) -> None:
        """Forget the contents of one named store, or of all of them."""
        with cls._lock:
            if name is None:
                cls._stores.clear()
            else:
                cls._stores.pop(name, None)

    def put(self, key: str, data: Buffer) -> None:
        validate_key(key, self.url)
        blob = bytes(data)
        with self._lock:
            self.objects[key] = blob

    def commit(self, key: str, data: bytes) -> None:
        validate_key(key, self.url)
        with self._lock:
            existing = self.objects.get(key)
            if existing is not None:
                if existing == bytes(data):
                    return
                raise StepExistsError(step_of_key(key), self.url)
            self.objects[key] = bytes(data)

    def _blob(self, key: str) -> bytes:
        validate_key(key, self.url)
        try:
            return self.objects[key]
        except KeyError:
            raise ObjectMissingError("not found", replica=self.url, key=key) from None

    def get(self, key: str, max_bytes: int) -> bytes:
        blob = self._blob(key)
        if len(blob) > max_bytes:
            raise CorruptObjectError(
                f"object is {len(blob)} bytes, more than the {max_bytes} allowed", replica=self.url, key=key
            )
        return blob

    def read_into(self, key: str, out: memoryview) -> None:
        blob = self._blob(key)
        if len(blob) != len(out):
            raise CorruptObjectError(f"size is {len(blob)} bytes, manifest says {len(out)}", replica=self.url, key=key)
        out.cast("B")[:] = blob

    def size(self, key: str) -> int | None:
        validate_key(key, self.url)
        blob = self.objects.get(key)
        return None if blob is None else len(blob)

    def list_steps(self) -> list[str]:
        with self._lock:
            return sorted({k.split("/", 1)[0] for k in self.objects})

    def list_prefix(self, prefix: str) -> list[str]:
        validate_key(prefix.rstrip("/"), self.url)
        with self._lock:
            return sorted(k for k in self.objects if k.startswith(prefix.rstrip("/") + "/"))

    def delete(self, key: str) -> None:
        validate_key(key, self.url)
        with self._lock:
            self.objects.pop(key, None)

    def delete_prefix(self, prefix: str) -> None:
        validate_key(prefix.rstrip("/"), self.url)
        with self._lock:
            for k in [k for k in self.objects if k.startswith(prefix.rstrip("/") + "/")]:
                del self.objects[k]
