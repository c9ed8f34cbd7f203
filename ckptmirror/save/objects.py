"""Phase 1 of a save on one replica: every object, the placement record, the rank manifest.

Split from :mod:`~ckptmirror.save.fanout`, which runs this for every replica at once: what is
here concerns one replica's writes, and nothing of it is visible to a reader until phase 2
(:mod:`~ckptmirror.save.commit`) writes the commit record. :class:`ObjectEncoder` encodes each
object once for all the replicas that compress it, on their I/O threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from ..buffers import host_bytes
from ..checksum import checksum
from ..errors import ReplicaLaggingError, StepExistsError
from ..format import (
    placement_key,
    step_dir,
    stored_object_key,
    writer_of,
)
from ..placement import Placement, Stored
from ..replicas.base import Buffer, Replica
from ..replicas.local import LocalReplica
from .encode import EncodedStep, Segments
from .retention import (
    is_committed,
    remove_step,
)

log = logging.getLogger("ckptmirror")


class ObjectEncoder:
    """Encodes a save's objects with a codec at most once, however many replicas store them so.

    ``users[(codec, i)]`` is how many replicas will ask for object ``i`` encoded with ``codec``;
    the encoded bytes are dropped once the last one has released them, so a save holds only
    the encoded objects some replica has not written yet. The first replica to ask encodes
    (on its I/O thread); the others wait for that result. An object that does not shrink is
    stored raw (``get`` returns None): decoding it would cost time and save nothing.
    """

    def __init__(
        self,
        view: memoryview,
        windows: Sequence[tuple[int, int]],
        segments: Sequence[Segments],
        users: Mapping[tuple[str, int], int],
        levels: Mapping[str, int],
        hints: Any,
        base: int = 0,
    ) -> None:
        self._base = base  # stream offset of view[0] (a sliced save stages part of the stream)
        self._view = view
        self._windows = windows
        self._segments = segments
        self._levels = levels
        self._hints = hints
        self._lock = threading.Lock()
        self._users = dict(users)
        self._locks: dict[tuple[str, int], threading.Lock] = {k: threading.Lock() for k in users}
        self._done: dict[tuple[str, int], tuple[bytes, str] | None] = {}
        self.encoded_bytes = 0  # what the encodes produced (stored bytes of encoded objects)
        self.raw_bytes = 0  # what they consumed

    def _encode(self, name: str, i: int) -> tuple[bytes, str] | None:
        from .. import codec  # here: zstandard is imported only by saves that compress

        off, size = self._windows[i]
        data = self._view[off - self._base : off - self._base + size]
        blob = codec.encode(data, self._segments[i], level=self._levels[name], hints=self._hints, slot=i)
        with self._lock:
            self.raw_bytes += size
            self.encoded_bytes += min(len(blob), size)
        if len(blob) >= size:
            return None
        return blob, checksum(blob)

    def get(self, name: str, i: int) -> tuple[bytes, str] | None:
        """Object ``i`` encoded with ``name`` and the checksum of the encoded bytes; None: store it raw."""
        key = (name, i)
        lock = self._locks.get(key)
        if lock is None:  # not planned (a reference that turned out to be gone): encode for this one use
            return self._encode(name, i)
        with lock:
            if key not in self._done:
                self._done[key] = self._encode(name, i)
            return self._done[key]

    def release(self, name: str, i: int) -> None:
        """One replica is done with object ``i`` as ``name``: drop it after the last one."""
        key = (name, i)
        with self._lock:
            left = self._users.get(key)
            if left is None:
                return
            if left <= 1:
                del self._users[key]
                self._done.pop(key, None)
            else:
                self._users[key] = left - 1


def write_objects(
    replica: Replica,
    enc: EncodedStep,
    stream: torch.Tensor,
    pool: ThreadPoolExecutor,
    overwrite: bool,
    *,
    refs: Mapping[int, Stored] | None = None,
    encoder: ObjectEncoder | None = None,
    live: Collection[str] = (),
    base: int = 0,
    done: Mapping[str, Stored] | None = None,
    owned: Sequence[int] | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Stored]:
    """Phase 1 on one replica: every object, the placement record, then the rank manifest.
    Nothing is committed. Returns how each object this rank owns is stored there, by home key.

    ``refs``: objects an earlier committed step stores here with the same content; each is
    checked to still be there with its size (else written anew) and referenced, not written.
    ``encoder``: objects for a compressing replica come from it. Names carry this save's
    token, so nothing here can overwrite another writer's files. ``stream`` holds the data
    stream from byte ``base`` on; objects in ``done`` were written already (a sliced save,
    :meth:`~ckptmirror.save.fanout.Fanout.prewrite`). ``owned``: the objects this rank writes here (default: all, or
    ``enc.owned`` for a replicated step; see :meth:`~ckptmirror.save.fanout.Fanout._owned_at`).
    ``stop``: once set (the write was dropped, :mod:`~ckptmirror.save.lag`), no further object or
    record is written: :class:`~ckptmirror.errors.ReplicaLaggingError` is raised instead.
    """
    step = enc.step
    if is_committed(replica, step):
        if not overwrite:
            raise StepExistsError(step, replica.url)
        log.warning("overwriting committed step %d on %s", step, replica.url)
        remove_step(replica, step, live)
    view = host_bytes(stream) if enc.windows else memoryview(b"")
    mine = owned if owned is not None else range(len(enc.windows)) if enc.owned is None else enc.owned
    done = done or {}
    homes = [o.key for o in enc.manifest.objects]
    todo = [i for i in mine if homes[i] not in done]
    stored = dict(done)
    sums = [o.checksum for o in enc.manifest.objects]
    # Local disk, when this save can need no placement record (nothing referenced, nothing
    # compressed): the manifest is written alongside the objects, and every name is made
    # durable by the one directory-fsync pass after them all. The commit still comes after.
    early = (
        isinstance(replica, LocalReplica)
        and not refs
        and (encoder is None or replica.compression == "none")
        and all(s.key == h for h, s in done.items())
    )
    extra = ((enc.manifest_key, enc.manifest_bytes),) if early else ()
    stored.update(
        put_objects(replica, homes, enc.windows, sums, view, base, pool, todo, refs or {}, encoder, extra, stop)
    )
    stored = {homes[i]: stored[homes[i]] for i in mine}
    if early:
        return stored
    _check_stop(stop, replica, step)
    records: list[tuple[str, bytes]] = [
        (placement_key(step, rank, token), Placement(step, rank, token, entries).to_json())
        for (rank, token), entries in _special_by_writer(stored).items()
    ]
    records.append((enc.manifest_key, enc.manifest_bytes))
    for key, data in records:  # the placement before the manifest (retention reads placements first)
        if isinstance(replica, LocalReplica):
            replica.put(key, data, sync_dir=False)
        else:
            replica.put(key, data)
    if isinstance(replica, LocalReplica):
        replica.sync_dirs([k for k, _ in records])
    return stored


def put_objects(
    replica: Replica,
    homes: Sequence[str],
    windows: Sequence[tuple[int, int]],
    sums: Sequence[str],
    view: memoryview,
    base: int,
    pool: ThreadPoolExecutor,
    indices: Sequence[int],
    refs: Mapping[int, Stored],
    encoder: ObjectEncoder | None,
    extra: Sequence[tuple[str, bytes]] = (),
    stop: threading.Event | None = None,
) -> dict[str, Stored]:
    """Store objects ``indices`` on ``replica`` (in parallel on ``pool``): referenced, compressed
    or raw, by its policy. ``view`` holds the data stream from byte ``base`` on. Returns how each
    is stored, by home key; the first failure is raised once the puts in flight are done.
    ``extra``: (key, bytes) records put on the pool alongside (first).

    Every file is durable under its name on return. On local disk, each is fsynced by the
    thread that wrote it and renamed; the directories are fsynced once each, after them all
    (:meth:`LocalReplica.sync_dirs`), instead of once per file."""
    name = replica.compression
    local = replica if isinstance(replica, LocalReplica) else None
    written: list[str] = []

    def put(key: str, data: Buffer) -> None:
        if local is not None:
            local.put(key, data, sync_dir=False)
            written.append(key)  # list.append is atomic
        else:
            replica.put(key, data)

    def put_one(i: int) -> Stored:
        home = homes[i]
        if stop is not None and stop.is_set():
            if name != "none" and encoder is not None and i not in refs:
                encoder.release(name, i)  # its encoded bytes need not wait for this replica
            _check_stop(stop, replica, None)
        ref = refs.get(i)
        if ref is not None and replica.size(ref.key) == ref.size:
            return ref  # unchanged since a committed step stored it here: reference it
        off, size = windows[i]
        if name != "none" and encoder is not None:
            try:
                got = encoder.get(name, i)
                if got is not None:
                    blob, blob_sum = got
                    key = stored_object_key(home, name)
                    put(key, blob)
                    return Stored(key, name, len(blob), blob_sum)
            finally:
                encoder.release(name, i)
        put(home, view[off - base : off - base + size])
        return Stored(home, "none", size, sums[i])

    side: list[Future[None]] = [pool.submit(put, key, data) for key, data in extra]
    futures: list[Future[Stored]] = [pool.submit(put_one, i) for i in indices]
    every: list[Future[Any]] = [*side, *futures]
    wait(every, return_when=FIRST_EXCEPTION)
    for f in every:
        f.cancel()  # not started yet: dropped once one put has failed
    wait(every)
    for f in every:
        if not f.cancelled():
            f.result()  # first failure wins
    if local is not None and written:
        local.sync_dirs(written)
    return {homes[i]: f.result() for i, f in zip(indices, futures)}


def _check_stop(stop: threading.Event | None, replica: Replica, step: int | None) -> None:
    if stop is not None and stop.is_set():
        what = f"step {step}" if step is not None else "a step"
        raise ReplicaLaggingError(f"write of {what} dropped: the replica lags", replica=replica.url)


def _special_by_writer(stored: Mapping[str, Stored]) -> dict[tuple[int, str], dict[str, Stored]]:
    """The objects stored other than raw under their own name (compressed, or an earlier step's
    object), grouped by the writer their home key names: one placement record each, as readers
    look a record up by its objects' writer. A rank writes for one writer unless it writes a
    replicated state's objects for several (:meth:`~ckptmirror.save.fanout.Fanout._owned_at`)."""
    out: dict[tuple[int, str], dict[str, Stored]] = {}
    for home, st in stored.items():
        if st.key != home:
            w = writer_of(home)
            assert w is not None  # object keys always name their writer
            out.setdefault(w, {})[home] = st
    return out


def written_bytes_of(step: int, stored: Mapping[str, Stored], enc: EncodedStep) -> int:
    """Bytes this rank wrote for this save on one replica: objects as stored in this step's
    directory (referenced ones cost nothing), its placement record, the rank manifest."""
    prefix = step_dir(step) + "/"
    placement = sum(  # about their size
        len(Placement(step, 0, "00000000", entries).to_json()) for entries in _special_by_writer(stored).values()
    )
    return sum(s.size for s in stored.values() if s.key.startswith(prefix)) + placement + len(enc.manifest_bytes)


def written_here(step: int, stored: Mapping[str, Stored], enc: EncodedStep) -> list[str]:
    """The files this save wrote into ``step``'s directory (references to older steps excluded)."""
    prefix = step_dir(step) + "/"
    keys = [s.key for s in stored.values() if s.key.startswith(prefix)]
    keys += [placement_key(step, *w) for w in _special_by_writer(stored)]
    return keys + [enc.manifest_key]
