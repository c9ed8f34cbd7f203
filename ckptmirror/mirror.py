"""The user-facing :class:`Mirror`: async save to several replicas, verified restore.

Threads: the caller's thread only flattens the state (:mod:`ckptmirror.state.tree`) and
copies it into a staging arena (:mod:`ckptmirror.save.snapshot`). One background thread per
mirror takes saves in order and hands each to :class:`~ckptmirror.save.fanout.Fanout`, which
hashes the objects (a small pool) and runs one task per replica, each with its own pool of
``io_threads`` workers for object puts. A second thread probes degraded replicas (and those
that ask for a heartbeat): :mod:`ckptmirror.health`.

Restore reads through :func:`~ckptmirror.restore.choose.load_newest`; the caller's model and
optimizer are prepared and checked by :mod:`ckptmirror.state.targets`.

Memory: ``max_inflight`` arenas, each as large as the state's tensor bytes (host memory;
pinned when the state is on a GPU), plus ``io_threads`` object buffers of up to
``object_bytes`` per replica during restore. Nothing else scales with the state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, cast

from . import config, shutdown
from .dist import Coordinator, DistInfo, detect, expand_url
from .errors import ReplicaError, ReplicaLaggingError, ReplicaUnavailableError, StepExistsError, StepNotFoundError
from .format import MAX_STEP, paused_gc
from .handle import SaveHandle
from .health import ReplicaHealth
from .metrics import MirrorMetrics
from .replicas import Replica, close_opened, open_replicas
from .restore.choose import load_newest
from .restore.discover import list_steps
from .restore.switch import brisk_switching
from .restore.undo import BufferFactory
from .save.arena import ArenaPool
from .save.encode import PreWritten
from .save.fanout import Fanout, SaveJob
from .save.lag import check_slow_replica_timeout
from .save.sliced import sliced_snapshot
from .save.snapshot import (
    Plan,
    plan,
    plan_key,
    prepare,
    replan,
    stage,
)
from .save.speculate import speculate
from .state.targets import (
    Stateful,
    check_fits,
    filled_in_place,
    indexed_groups,
    init_sharded_optimizer_state,
    module_state,
    restore_targets,
    stock_loading,
)
from .state.tree import Flattened, flatten

log = logging.getLogger("ckptmirror")
#: How long close() waits for a health ping in progress before it closes the replicas.
_HEALTH_JOIN_S = 2.0

DEFAULT_OBJECT_BYTES = 64 << 20


@dataclass(frozen=True)
class RestoreResult:
    """What :meth:`Mirror.restore` brought back."""

    step: int
    extra: Any = None
    #: object key -> URL of the replica that served it
    sources: Mapping[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _state_of(model: Stateful | None, optim: Stateful | None, extra: Any) -> tuple[dict[str, Any], int]:
    """What :meth:`Mirror.save` saves and :meth:`Mirror.reserve` plans for, and how many of its
    first leaves (the model's) to record as plain tensors (:func:`module_state`)."""
    sd, plain = module_state(model) if model is not None else (None, 0)
    return {"model": sd, "optim": optim.state_dict() if optim is not None else None, "extra": extra}, plain


def _flatten_state(state: Any, plain: int) -> Flattened:
    """:func:`flatten` ``state``; its first ``plain`` leaves, the model's, recorded as plain tensors."""
    flat = flatten(state)
    if not plain:
        return flat
    paths = flat.paths
    # The model's entries come first, one leaf each (all tensors: module_state checked): what
    # makes the first ``plain`` leaves exactly the model's. Checked at both ends.
    if len(paths) < plain or paths[plain - 1][:1] != ("model",) or paths[plain:][:1] and paths[plain][:1] == ("model",):
        raise AssertionError("the model's state dict entries are not the first leaves of the state")
    return dataclasses.replace(flat, plain=plain)


class Mirror:
    """Replicated, checksummed, asynchronous checkpoints of a training state.

    Args:
        replicas: URLs (``/path`` or a ``pathlib.Path``, ``file:///path``, ``memory://name``) or
            :class:`Replica` objects. Restore prefers them in ``read_priority`` order (local disk first).
        keep_last: keep this many committed steps per replica (None: keep all). Older steps
            are deleted only after a newer one is committed; the newest is never deleted.
            Default: ``$CKPTMIRROR_KEEP_LAST`` (an integer, or ``none``), else None.
        object_bytes: size of the objects the data stream is cut into (default 64 MiB).
        io_threads: concurrent object transfers per replica.
        max_inflight: staging arenas; a save needs a free one (memory = this x state size).
        inflight_policy: ``"wait"`` (default) blocks ``save()`` until an arena is free;
            ``"skip"`` returns a skipped handle at once and logs a warning.
        min_replicas: replicas a step must commit on for ``handle.result()`` to succeed
            (default: every replica that was healthy when the save started).
        on_replica_error: ``"warn"`` (default): a replica that fails a save is logged, marked
            degraded and skipped by later saves until it answers again; training goes on as
            long as the step committed somewhere. ``"raise"``: any replica failure fails the
            save, and the next ``save()``/``wait()`` raises it.
        health_interval_s: how often degraded replicas are probed in the background.
        storage_options: backend options by full URL or by scheme, e.g.
            ``{"s3": {"part_bytes": 16 << 20}, "file": {"fsync": True}}``; a URL entry wins.
        on_sigterm: ``"flush"``: on SIGTERM (how torchrun stops workers, killing them ~30 s
            later), commit the saves in flight, at most ``sigterm_timeout_s``, then exit as the
            process would have. Default: ``$CKPTMIRROR_ON_SIGTERM``, else ``"none"``. The Mirror
            must be created in the main thread for this.
        open_timeout_s: how long opening the mirror, :meth:`steps` and a restore wait for the
            replicas to list their steps (asked concurrently); the ones that have not answered by
            then are skipped (degraded, with a WARNING) and the others are used.
        distributed: ``False`` makes this a single process's mirror even when a process group
            exists (for code that saves from one rank only, e.g. Lightning's CheckpointIO);
            ``None`` (default) follows ``process_group``.
        process_group: the group whose ranks save together (default: the default group when
            torch.distributed is initialised). Replica URLs may use ``{rank}``,
            ``{local_rank}``, ``{node_rank}`` and ``{world_size}``.
        commit_timeout_s: how long the ranks wait for each other to commit a step; a rank that
            dies mid-save means that step never commits, after at most this long.
        replicated: whether the saved state is identical on every rank, so that it is stored
            once per replica, its objects spread over the ranks that write to that replica (all
            of them on a shared one: once in total). None (default): yes when the model
            given to :meth:`save` is wrapped in ``DistributedDataParallel``. The ranks verify
            that it really is identical; if not, the save fails with StateMismatchError.
        staging_bytes: cap on each staging arena (default: none, an arena holds the whole
            state). A state larger than the cap is snapshotted in slices: ``save()`` copies a
            slice, writes it to the replicas and waits for that, copies the next, ..., and
            returns once the last slice (at most ``staging_bytes``) is copied; that one is
            written in the background like any save. The trade-off: host memory stays at
            ``max_inflight x staging_bytes`` whatever the state's size, and the training thread
            stalls for writing the part that did not fit (about ``(state - cap) / write speed``
            of the slowest replica) instead of one memcpy. Correctness does not change: the
            step holds the values at the call. At least ``object_bytes``.
        slow_replica_timeout_s: how long a ``save()`` that needs a staging arena waits for
            replicas still writing the objects of an earlier save that other replicas
            (``min_replicas`` of them, at least one) have committed. Then those writes of that save
            are dropped (recorded on its handle as :class:`ReplicaLaggingError`, with a
            WARNING; nothing of it is committed there) and the arena is reused: one stalled
            upload holds the training thread this long, not its whole time budget. A replica
            whose dropped write is still running is skipped by new saves; the first save after
            it returned goes there again. ``None``: wait for every replica (a slow one then
            holds the training thread up to its operation budget). Never with
            ``on_replica_error="raise"``, and never when no replica has committed the save yet.
            A replica already committing (its objects written) is waited for.

    Example::

        with ckptmirror.Mirror(["/data/ckpt/run1"], keep_last=3) as m:
            resumed = m.restore(model, optim)    # resume, if a checkpoint exists
            start = resumed.step + 1 if resumed else 0
            for step in range(start, steps):
                train_step()
                if step % 100 == 0:
                    m.save(step, model, optim, extra={"epoch": epoch})
    """

    def __init__(
        self,
        replicas: Sequence[str | os.PathLike[str] | Replica] | str | os.PathLike[str] | Replica,
        *,
        keep_last: int | None | config.FromEnv = config.FROM_ENV,
        object_bytes: int = DEFAULT_OBJECT_BYTES,
        io_threads: int = 4,
        max_inflight: int = 1,
        inflight_policy: Literal["wait", "skip"] = "wait",
        min_replicas: int | None = None,
        on_replica_error: Literal["warn", "raise"] = "warn",
        health_interval_s: float = 5.0,
        storage_options: Mapping[str, Mapping[str, Any]] | None = None,
        process_group: Any = None,
        distributed: bool | None = None,
        open_timeout_s: float = 5.0,
        on_sigterm: Literal["flush", "none"] | None = None,
        sigterm_timeout_s: float = 20.0,
        commit_timeout_s: float = 300.0,
        replicated: bool | None = None,
        staging_bytes: int | None = None,
        slow_replica_timeout_s: float | None = 10.0,
    ) -> None:
        if isinstance(replicas, (str, os.PathLike, Replica)):
            replicas = [replicas]
        # A pathlib.Path is a local directory, as its string is (storage_options key by the string).
        given: list[str | Replica] = [os.fspath(u) if isinstance(u, os.PathLike) else u for u in replicas]
        config.apply_log_level()  # $CKPTMIRROR_LOG_LEVEL, if set: the ckptmirror logger's level only
        keep_last = config.keep_last(keep_last)  # an explicit argument (None included) wins
        # Read by restores and the background threads later: a bad value fails here, not at the
        # first restore, hours into a run that only saved.
        config.progress_interval_s()
        config.background_nice()
        _check_options(len(given), keep_last, object_bytes, inflight_policy, on_replica_error, min_replicas)
        check_slow_replica_timeout(slow_replica_timeout_s)
        # distributed=False: this process's private mirror even inside a process group (a
        # framework that checkpoints from rank 0 only must not wait for the other ranks' votes).
        self.dist: DistInfo = DistInfo() if distributed is False else detect(process_group)
        if self.dist.distributed and inflight_policy == "skip":
            # Ranks must make the same saves: one rank skipping would leave the others waiting.
            raise ValueError("inflight_policy='skip' is not supported with several ranks")
        self.min_replicas = min_replicas
        self.on_replica_error = on_replica_error
        self.health_interval_s = health_interval_s
        self.keep_last = keep_last
        self.object_bytes = object_bytes
        self.io_threads = io_threads
        self.inflight_policy = inflight_policy
        self.replicated = replicated
        if staging_bytes is not None and (
            isinstance(staging_bytes, bool) or not isinstance(staging_bytes, int) or staging_bytes < object_bytes
        ):
            raise ValueError(
                f"staging_bytes must be None or an int of at least object_bytes ({object_bytes}), got {staging_bytes!r}"
            )
        self.staging_bytes = staging_bytes
        self.open_timeout_s = open_timeout_s
        sigterm_policy = shutdown.resolve(on_sigterm)  # bad values raise before anything is opened
        urls = [expand_url(u, self.dist) if isinstance(u, str) else u for u in given]
        self.replicas: list[Replica] = open_replicas(urls, storage_options)
        # Replicas built here from URLs are closed by close(); Replica objects stay the caller's.
        self._owned = [r for r, u in zip(self.replicas, urls) if not isinstance(u, Replica)]
        try:
            # Raises ReplicaConfigError (no such bucket, access denied, wrong token) now, not
            # hours into the run; a replica that cannot be reached starts degraded instead.
            listing = list_steps(self.replicas, timeout_s=open_timeout_s)
        except BaseException:
            close_opened(self.replicas, urls)
            raise
        self._health = ReplicaHealth(self.replicas, health_interval_s)
        self._metrics = MirrorMetrics([r.url for r in self.replicas], listing.committed)
        self._health.mark_all(listing.unreachable)
        self._coord: Coordinator | None = None
        if self.dist.distributed:
            self._coord = Coordinator(self.dist, _mirror_prefix(), commit_timeout_s)
        # With on_replica_error="raise" a dropped write would be a failed save: wait instead.
        self.slow_replica_timeout_s = slow_replica_timeout_s if on_replica_error == "warn" else None
        self._fanout = Fanout(
            self.replicas,
            self.dist,
            self._coord,
            io_threads,
            self._health,
            set(listing.committed),
            max_inflight=max_inflight,
            slow_replica_timeout_s=self.slow_replica_timeout_s,
            keep_written=min_replicas or 1,
        )
        self._start_threads(max_inflight)
        self._sigterm: shutdown.SigtermFlush | None = None
        if sigterm_policy == "flush":
            self._sigterm = shutdown.SigtermFlush(lambda t: self.wait(timeout=t), sigterm_timeout_s)
            self._sigterm.install()

    def _start_threads(self, max_inflight: int) -> None:
        """The save queue, its bookkeeping and the background threads (writer and prober)."""
        self._arenas = ArenaPool(max_inflight, self._fanout.drop_laggards, self.slow_replica_timeout_s)
        self._jobs: queue.Queue[SaveJob | None] = queue.Queue()
        self._seq = 0
        self._restores = 0
        self._plan_cache: tuple[tuple[object, ...], Plan] | None = None
        #: Steps the last restore skipped as damaged on every replica (one rank): a save of one
        #: replaces them (see _save).
        self._damaged_steps: set[int] = set()
        self._stager: ThreadPoolExecutor | None = None  # see _stage_executor
        self._lock = threading.Lock()  # guards the handles and in-flight bookkeeping below
        self._handles: list[SaveHandle] = []
        self._unfinished = 0  # queued or running background jobs (retention included)
        self._saving = 0  # save() calls in progress on the caller's threads (not queued yet)
        self._idle = threading.Condition(self._lock)
        self._inflight_steps: set[int] = set()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="ckptmirror-writer", daemon=True)
        self._worker.start()
        self._health.start()

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(raise_errors=exc[0] is None)

    # ------------------------------------------------------------------------- saving
    def save(
        self,
        step: int,
        model: Stateful | None,
        optim: Stateful | None = None,
        *,
        extra: Any = None,
        overwrite: bool = False,
        replicated: bool | None = None,
    ) -> SaveHandle:
        """Snapshot ``model`` (and ``optim``, ``extra``) as ``step``; return once the copy is taken.

        The checkpoint holds the values at the call: the caller may change parameters as
        soon as this returns. Raises :class:`UnsupportedTypeError` (a ``TypeError``) naming
        the key path of a value that cannot be stored, :class:`StepExistsError` if the step
        is committed already (unless ``overwrite=True``), and :class:`SaveFailedError` if an
        earlier background save failed and was not yet reported.
        """
        t0 = time.perf_counter()  # the stall includes building the state dicts
        if replicated is None:
            replicated = self.replicated if self.replicated is not None else _is_ddp(model)
        return self._save(step, partial(_state_of, model, optim, extra), overwrite, t0, replicated, model)

    def save_state(
        self, step: int, state: Any, *, overwrite: bool = False, replicated: bool | None = None
    ) -> SaveHandle:
        """Like :meth:`save`, for any nested state (dicts, lists, tensors, plain values)."""
        return self._save(
            step,
            lambda: (state, 0),
            overwrite,
            time.perf_counter(),
            bool(replicated if replicated is not None else self.replicated),
        )

    def _save(self, *args: Any, **kwargs: Any) -> SaveHandle:
        """:meth:`_save_now`, counted as a save in progress while it runs."""
        # A save() in progress (copying, or waiting for a staging buffer) counts as in flight for
        # wait(): a SIGTERM flush that starts meanwhile (its handler runs between two bytecodes
        # of this very call) must wait for it, not find nothing queued and exit without it.
        with self._lock:
            self._saving += 1
        try:
            return self._save_now(*args, **kwargs)
        finally:
            with self._idle:
                self._saving -= 1
                self._idle.notify_all()

    def _save_now(
        self,
        step: int,
        make_state: Callable[[], tuple[Any, int]],
        overwrite: bool,
        t0: float,
        replicated: bool,
        model: Any = None,
    ) -> SaveHandle:
        self._check_open()
        self._raise_unreported()
        if type(step) is not int or not 0 <= step <= MAX_STEP:
            raise ValueError(f"step must be an int in [0, {MAX_STEP}], got {step!r}")
        if overwrite and self.dist.distributed:
            raise ValueError("overwrite=True is not supported with several ranks: save under a new step")
        if overwrite:
            # Asked to replace the step: after a save of it still finishing, never alongside it,
            # and never refused with "pass overwrite=True".
            self._await_step(step)
        with self._lock:
            inflight = step in self._inflight_steps
        if not overwrite and step in self._damaged_steps and self.staging_bytes is None:
            # The restore of this process skipped this step: no replica held a copy that passed
            # its checks (for some rank: with several ranks every rank skipped it, and every rank
            # takes this path for it). The job trains it again from the older step; refusing its
            # save would stop the run at the same place after every restart. It replaces the
            # damaged copies (several ranks: erased everywhere first, save.resave).
            log.warning("step %d: replacing the damaged copies that the restore skipped", step)
            self._damaged_steps.discard(step)
            overwrite = True
        if inflight or (not overwrite and self._fanout.has_committed(step)):
            raise StepExistsError(step)
        cached = self._plan_cache
        spec = speculate(
            cached[1] if cached is not None else None,
            self._arenas,
            self.staging_bytes,
            self.inflight_policy == "wait",
            self._stage_executor,
        )
        try:
            state, plain = make_state()
            # The collector off while ~3 objects a tensor are built: a full collection started
            # by them walks every object of the training process (at 50k tensors it doubled the
            # stall of every other save, 0.3 -> 0.55 s). Garbage made meanwhile waits for the next.
            with paused_gc():
                flat = _flatten_state(state, plain)
                key = plan_key(flat)
            if key is not None and cached is not None and cached[0] == key:
                p = dataclasses.replace(cached[1], structure=flat.structure)  # same tensors: reuse views
            else:
                # Only where some tensors live changed (a new RNG state in every save's extra):
                # patch the cached plan; anything else: plan anew.
                p = (replan(cached[1], cached[0], flat, key) if cached is not None else None) or plan(flat)
                self._plan_cache = (key, p) if key is not None else None
        except BaseException:
            if spec is not None:
                spec.discard(self._arenas)
            raise
        t_wait = time.perf_counter()
        arena = spec.arena if spec is not None else self._arenas.acquire(block=self.inflight_policy == "wait")
        wait_s = time.perf_counter() - t_wait + (spec.wait_s if spec is not None else 0.0)
        # The targets after the wait: it may have dropped a slow replica's write (save.lag).
        degraded = self._health.degraded()
        targets = [r for r in self.replicas if r.url not in degraded] or list(self.replicas)
        skipped: dict[str, ReplicaError] = {
            r.url: ReplicaUnavailableError(f"skipped: degraded ({degraded.get(r.url, 'unknown')})", replica=r.url)
            for r in self.replicas
            if r not in targets
        }
        lagging = self._fanout.lagging()
        if any(r.url in lagging for r in targets) and any(r.url not in lagging for r in targets):
            # A dropped write of an earlier save still runs there: this save would queue
            # behind it. The first save after it ended goes there again.
            for r in targets:
                if r.url in lagging:
                    skipped[r.url] = ReplicaLaggingError(
                        "skipped: still finishing the write of an earlier save that was dropped", replica=r.url
                    )
            targets = [r for r in targets if r.url not in lagging]
        if self.on_replica_error == "raise":
            required = len(self.replicas)  # a degraded replica that is skipped is a failure too
        elif self.min_replicas is None:
            required = len(targets)
        else:
            required = self.min_replicas
        handle = SaveHandle(step, [r.url for r in self.replicas], required, t0)
        for url, err in skipped.items():
            handle._set_replica(url, "skipped", err)
        if arena is None:
            log.warning("skipping save of step %d: the previous save is still writing (inflight_policy='skip')", step)
            handle._skip()
            self._metrics.track(handle)
            return handle
        handle.wait_s = wait_s
        pre: PreWritten | None = None
        finish: Callable[[], None] | None = None  # what the writer does first (see snapshot.stage)
        try:
            staged = spec.take(p) if spec is not None else None
            if staged is not None:
                stream, finish = staged
            elif self.staging_bytes is not None and p.total_bytes > self.staging_bytes:
                if replicated and self.dist.distributed:
                    raise ValueError(
                        "a replicated (DDP) state larger than staging_bytes cannot be saved in slices: "
                        "raise staging_bytes, or pass replicated=False"
                    )
                if overwrite:
                    raise ValueError("overwrite=True is not supported for a state larger than staging_bytes")
                cap = cast(int, self.staging_bytes)
                stream, pre = sliced_snapshot(self._fanout, step, p, arena, targets, cap, self.object_bytes, model)
            else:
                stream, finish = stage(p, arena, self.staging_bytes)
        except BaseException:
            if spec is not None:
                spec.wait()  # its copy into this arena must be over before the arena is reused
            self._arenas.release(arena)
            raise
        handle.nbytes = p.total_bytes
        handle.stall_s = time.perf_counter() - t0
        self._metrics.track(handle)
        with self._lock:
            self._inflight_steps.add(step)
            self._handles.append(handle)
            self._unfinished += 1
        self._seq += 1
        self._jobs.put(
            SaveJob(
                step,
                handle,
                arena,
                stream,
                p,
                overwrite,
                targets,
                self._seq,
                replicated and self.dist.distributed,
                pre,
                _model_ref(model),
                finish,
            )
        )
        return handle

    def _await_step(self, step: int) -> None:
        """Wait until no save of ``step`` is in flight. Its handle resolves once enough replicas
        committed; slower ones may still be writing, and its bookkeeping ends just after."""
        with self._idle:
            self._idle.wait_for(lambda: step not in self._inflight_steps)

    def _stage_executor(self) -> ThreadPoolExecutor:
        """The stager thread of :func:`~ckptmirror.save.speculate.speculate`, made when first needed."""
        if self._stager is None:
            self._stager = ThreadPoolExecutor(1, thread_name_prefix="ckptmirror-stage")
        return self._stager

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            release = _once(partial(self._arenas.release, job.arena))
            try:
                # The arena goes back as soon as no replica reads it: possibly before this
                # returns (a slow replica's write dropped, save.lag).
                self._fanout.write(job, self.object_bytes, self.keep_last, release)
            except BaseException as exc:  # noqa: BLE001 - reported on the handle, then by save()/wait()
                log.error("save of step %d failed: %s", job.step, exc)
                job.handle._fail(exc)
            finally:
                release()
                with self._lock:
                    self._inflight_steps.discard(job.step)
                    self._unfinished -= 1
                    self._idle.notify_all()

    def health(self) -> dict[str, str]:
        """Per replica URL: ``"ok"`` or ``"degraded: <last error>"``."""
        return self._health.summary()

    def metrics(self) -> dict[str, Any]:
        """Operating numbers as plain, JSON-serialisable data: per replica (state, last committed
        step and when, saves committed/failed/skipped), saves started/committed/failed/skipped,
        stall and time-to-commit histograms, restores. Thread-safe and cheap (no replica is
        asked). Schema: :mod:`ckptmirror.metrics`; for Prometheus, :func:`ckptmirror.metrics.register`.
        """
        return self._metrics.snapshot(self._health.degraded(), self._fanout.lagging())

    def _raise_unreported(self) -> None:
        # A save that committed nowhere is always raised; one that committed on fewer
        # replicas than required is raised only with on_replica_error="raise" (it was logged).
        with self._lock:
            for h in self._handles:
                err = h._unobserved_error
                if err is not None:
                    if self.on_replica_error != "raise" and any(st.state == "pending" for st in h.replicas.values()):
                        continue  # another replica may still commit this step: decide once it has finished
                    h._mark_observed()
                    if self.on_replica_error == "raise" or h.committed_count == 0:
                        raise err
            self._handles = [
                h for h in self._handles if not h.done() or any(st.state == "pending" for st in h.replicas.values())
            ]

    def wait(self, timeout: float | None = None) -> None:
        """Block until every in-flight save has finished; raise the first failure not yet reported.

        A failure is reported once: by ``handle.result()``, or else by the next ``save()``,
        ``wait()`` or ``close()``. Raises :class:`TimeoutError` if ``timeout`` passes first.
        A ``save()`` still running on another thread (copying, or waiting for a staging buffer)
        is in flight too: it is waited for. Do not call ``wait()`` while that ``save()`` waits on
        something this thread holds.
        """
        t0 = time.monotonic()
        with self._idle:
            # Jobs finish after their handles resolve (slower replicas): wait for all, and for
            # save() calls other threads (or an interrupted main thread) are still making.
            if not self._idle.wait_for(lambda: self._unfinished == 0 and self._saving == 0, timeout=timeout):
                # Done handles too, if a replica still writes (min_replicas reached without it).
                pending = [h for h in self._handles if any(s.state == "pending" for s in h.replicas.values())]
                copying = (
                    f"; {self._saving} save() call(s) still in progress (copying the state, or waiting for a "
                    "staging buffer)"
                    if self._saving
                    else ""
                )
                raise TimeoutError(f"saves still in flight after {timeout} s: {pending}{copying}")
        # Retention runs after the writes, on its own thread: wait() means "nothing in flight".
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))
        if not self._fanout.drain_retention(left):
            raise TimeoutError(f"retention still deleting old steps after {timeout} s")
        self._raise_unreported()

    # ---------------------------------------------------------------------- restoring
    def restore(
        self,
        model: Stateful | None,
        optim: Stateful | None = None,
        *,
        step: int | None = None,
        strict: bool = True,
        require: bool = False,
    ) -> RestoreResult | None:
        """Load the newest step that verifies (or ``step``) into ``model`` and ``optim`` in place.

        Returns None when no checkpoint exists at all, after logging a WARNING that names every
        replica looked at (a mistyped path shows there; nothing is created). ``require=True``
        raises :class:`StepNotFoundError` instead: use it when a run must resume. Raises
        :class:`NoValidCheckpointError` when checkpoints exist but none verifies (some copy
        failed its checks), :class:`ReplicaUnavailableError` when the replicas that hold them
        could not be reached or read (an outage: retry once they are back), and
        :class:`StateMismatchError` (before any tensor is modified) when the checkpoint does
        not fit the model or optimizer. All or nothing: when it raises, every tensor of
        ``model`` and ``optim`` holds exactly what it held before the call; the one exception is
        a local object file cut shorter (or unreadable) by something else after it verified, and
        the :class:`CorruptObjectError` then says that the tensors hold part of the step.
        """
        # The cyclic GC paused: a restore builds ~10 objects per tensor, and at 10k tensors the
        # collections that triggers took a third of the restore (0.52 s -> 0.32 s without them).
        # The GIL handed over every 0.5 ms, not 5: the objects verify on the pool meanwhile, and
        # each of their returns from a GIL-free call waited out the interval (restore/switch.py).
        with paused_gc(), brisk_switching():
            return self._restore(model, optim, step, strict, require)

    def _restore(
        self, model: Stateful | None, optim: Stateful | None, step: int | None, strict: bool, require: bool
    ) -> RestoreResult | None:
        t0 = time.perf_counter()
        if optim is not None:
            init_sharded_optimizer_state(optim)
        # With torch's own load_state_dict (no overrides, no hooks), nothing can fail once the
        # bytes verified and the ranks agreed: local objects then wait, verified where they lie,
        # and land just before it, with no undo copy (see restore/undo.py).
        defer = stock_loading(model, optim)
        targets = {
            "model": restore_targets(model, defer) if model is not None else None,
            "optim": optim.state_dict() if optim is not None else None,
        }
        strict_paths = [("model",)] if (strict and model is not None) else []
        # The undo log (what restore overwrites in place, kept until the state is loaded) lives
        # in a staging arena: the first save needs that memory anyway, so a run pays no extra.
        arena = self._arenas.acquire(block=False)
        # One pool for the whole restore: its threads, started while reading, land the bytes too.
        pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="ckptmirror-read")
        try:
            factory = (lambda n: arena.reserve(n, pinned=False)) if arena is not None else None
            validate = partial(check_fits, model, optim, targets)
            loaded = self._load(step, targets, strict_paths, validate, require, factory, defer, pool)
            if loaded is None:
                return None
            state = loaded.state
            optim_touched = False
            landed = False
            try:
                deferred = loaded.landing is not None and loaded.landing.nbytes > 0
                loaded.land(self.io_threads, pool)
                landed = deferred
                if model is not None and defer and filled_in_place(state["model"], targets["model"]):
                    pass  # torch's own loading would copy each tensor onto itself (seconds at 50k tensors)
                elif model is not None and strict:
                    model.load_state_dict(state["model"])
                elif model is not None:  # keys only the target has keep their values (nn.Module)
                    cast(Any, model).load_state_dict(state["model"], strict=False)
                if optim is not None and state["optim"] is not None:
                    optim_touched = True
                    optim.load_state_dict(indexed_groups(state["optim"]))
            except BaseException as exc:
                if landed:
                    # Not expected (torch's own loading, checked before): the bytes are in, and
                    # undoing only the part with an undo copy would mix two steps.
                    exc.add_note(f"ckptmirror: the model and optimizer tensors hold step {loaded.step} completely")
                    raise
                # All or nothing: put the caller's tensors back, then the optimizer's groups.
                loaded.abandon()
                if optim_touched and optim is not None:
                    optim.load_state_dict(indexed_groups(targets["optim"]))
                raise
            if loaded.undo is not None:
                loaded.undo.release()
        finally:
            pool.shutdown(wait=True)
            if arena is not None:
                self._arenas.release(arena)
        return RestoreResult(loaded.step, state["extra"], loaded.sources, time.perf_counter() - t0)

    def load_state(self, step: int | None = None, *, require: bool = False) -> tuple[int, Any] | None:
        """Return ``(step, state)`` for the newest step that verifies (or ``step``), or None
        (with a WARNING naming the replicas; ``require=True`` raises :class:`StepNotFoundError`)."""
        with paused_gc():
            loaded = self._load(step, None, [], None, require, None)
        return None if loaded is None else (loaded.step, loaded.state)

    def _load(
        self,
        step: int | None,
        targets: Any,
        strict_paths: list[tuple[Any, ...]],
        validate: Any,
        require: bool,
        undo: BufferFactory | None,
        defer: bool = False,
        shared_pool: ThreadPoolExecutor | None = None,
    ) -> Any:
        """The newest step that verifies (or ``step``), read with ``shared_pool`` (the caller's,
        left running) or a pool of its own."""
        self._check_open()
        t0 = time.perf_counter()
        pool = shared_pool or ThreadPoolExecutor(self.io_threads, thread_name_prefix="ckptmirror-read")
        coord: Coordinator | None = None
        try:
            agree = None
            if self.dist.distributed:
                # Its own store connection and key space: restores may run while saves are in flight.
                self._restores += 1
                assert self._coord is not None  # __init__ creates it whenever dist.distributed
                coord = Coordinator(
                    self.dist, f"{self._coord.prefix}/restore{self._restores}", self._coord.timeout.total_seconds()
                )
                agree = coord.exchange
            loaded = load_newest(
                self.replicas,
                pool,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                step=step,
                targets=targets,
                strict_paths=strict_paths,
                validate=validate,
                undo=undo,
                agree=agree,
                list_timeout_s=self.open_timeout_s,
                defer=defer,
                on_unavailable=self._health.mark,  # a replica that stalls mid-restore shows in health()
            )
        except BaseException:
            self._metrics.restore_finished(None, time.perf_counter() - t0, failed=True)
            raise
        finally:
            if shared_pool is None:
                pool.shutdown(wait=True)
            if coord is not None:
                coord.close()
        self._metrics.restore_finished(None if loaded is None else loaded.step, time.perf_counter() - t0)
        if loaded is not None:
            # With several ranks ``skipped`` comes from the ranks' votes: the same on every rank,
            # so every rank re-saves those steps alike (see _save_now).
            self._damaged_steps = set(loaded.skipped)
        if loaded is None:
            urls = [r.url for r in self.replicas]
            if require:
                raise StepNotFoundError(None, [], urls)
            down = self._health.degraded()
            log.warning(
                "no committed checkpoint on any replica; starting from scratch. Looked at: %s%s",
                ", ".join(urls),
                f" (unreachable: {', '.join(down)})" if down else "",
            )
        if loaded is not None:
            by_replica: dict[str, int] = {}
            for url in loaded.sources.values():
                by_replica[url] = by_replica.get(url, 0) + 1
            log.info("restored step %d; objects served by %s", loaded.step, by_replica)
        return loaded

    def reserve(self, model: Stateful | None, optim: Stateful | None = None, *, extra: Any = None) -> int:
        """Prepare the staging of this state now, before the training loop; return its bytes.

        Without it the first :meth:`save` pays for fresh pages (4-6x a steady save: the kernel
        maps and zeroes every page the copy touches) and for planning the layout (per-tensor
        Python work, ~1 s at 50,000 tensors). This plans the layout of ``model``, ``optim`` and
        ``extra`` as :meth:`save` would, keeps the plan for the next save of the same tensors,
        and allocates every staging arena and maps its pages. A save of the same tensors then
        allocates nothing (:attr:`staging_allocations` unchanged) and stalls like a steady one.

        Cost: memory, ``max_inflight`` x the state's tensor bytes (host memory; pinned when the
        state is on a GPU; a CPU state of hundreds of small tensors adds the allocator's gaps
        between them, at most a quarter more: see ``snapshot.COALESCE_MIN``), held from now on
        instead of from the first save; time, the planning plus one page-faulting pass over
        that memory (~0.6 s per GB of unpinned memory on a 2-core VM). It waits for saves in
        flight to release their arenas.

        Pass the state you will save. An optimizer that creates its state lazily (AdamW, Adam)
        has none before its first step: reserve after :meth:`restore` or after that step, else
        the arenas are sized without it and the first save grows them. A state that changes
        later (other shapes, more tensors) still saves correctly: it is planned anew and the
        arenas grow if they must.
        """
        self._check_open()
        key, p = prepare(_flatten_state(*_state_of(model, optim, extra)), self._arenas, self.staging_bytes)
        if key is not None:
            self._plan_cache = (key, p)
        return p.total_bytes

    def steps(self) -> list[int]:
        """Committed steps (on any replica), ascending."""
        return sorted(list_steps(self.replicas, timeout_s=self.open_timeout_s).committed)

    def replica_steps(self) -> dict[str, list[int]]:
        """Committed steps per replica URL, ascending.

        A replica that cannot be listed within ``open_timeout_s`` is given as ``[]`` (what it
        holds is unknown, not nothing) and logged at WARNING with the error; ``ckptmirror ls``
        and :func:`ckptmirror.ops.ls` report it as unreachable."""
        listing = list_steps(self.replicas, timeout_s=self.open_timeout_s)
        out: dict[str, list[int]] = {r.url: [] for r in self.replicas}
        for s, urls in listing.committed.items():
            for u in urls:
                out[u].append(s)
        return out

    def delete(self, step: int, *, force: bool = False) -> None:
        """Delete committed ``step`` from every replica (commit record first, then its objects).

        Refuses the newest committed step unless ``force=True`` (it is the one a restore would
        use); a save of ``step`` still in flight is waited for first. Degraded replicas are
        skipped with a warning (``ckptmirror prune`` removes the step there later). With several
        ranks, call it on every rank.
        Raises :class:`StepNotFoundError` if the step is not committed anywhere this mirror knows,
        and :class:`ReplicaError` naming the replica if a reachable replica failed to delete it.
        """
        self._check_open()
        self._await_step(step)
        known = self._fanout.committed_steps()
        if step not in known:
            raise StepNotFoundError(step, sorted(known), [r.url for r in self.replicas])
        if step == max(known) and not force:
            raise ValueError(f"step {step} is the newest committed step (the one restore uses); pass force=True")
        failures = self._fanout.delete(step)
        for url, exc in failures.items():
            log.warning("could not delete step %d on %s: %s", step, url, exc)
        hard = {u: e for u, e in failures.items() if not isinstance(e, ReplicaUnavailableError)}
        if hard:
            url, exc = next(iter(hard.items()))
            raise ReplicaError(f"deleting step {step} failed: {exc}", replica=url) from exc

    def pin(self, step: int) -> None:
        """Keep ``step`` out of ``keep_last`` retention and out of ``ckptmirror prune`` until :meth:`unpin`.

        Pinned steps do not count towards ``keep_last``: with ``keep_last=3`` and one pin, four
        steps stay. For frameworks that keep a "best" checkpoint besides the newest ones. The
        pin is recorded on every replica (``pins/step-<S>.json``, see docs/FORMAT.md) so that
        ``ckptmirror prune`` keeps the step too; the record is written in the background, never
        on the calling thread, and a failure to write it is a WARNING (retried after the next
        save there). Pinning a step that is pinned already writes nothing. A pin record
        outlives the process: the job's retention after a restart keeps that step too, until
        :meth:`unpin` (from any process) deletes the record. The record is on the replicas once
        :meth:`wait` returns (a process killed before that loses it; the in-process pin was
        never at risk). Raises ``ValueError`` for a step
        out of range, ``RuntimeError`` once the Mirror is closed.
        """
        self._check_open()
        self._fanout.pin(step, True)

    def unpin(self, step: int) -> None:
        """Give ``step`` back to retention (the next save's retention pass may delete it); its
        pin records are deleted in the background, also one an earlier run of the job wrote."""
        self._check_open()
        self._fanout.pin(step, False)

    @property
    def staging_allocations(self) -> int:
        """How many staging buffers have been allocated; constant in steady state."""
        return self._arenas.allocations

    # -------------------------------------------------------------------------- closing
    def close(self, raise_errors: bool = True) -> None:
        """Wait for in-flight saves, stop the threads, free the staging buffers."""
        if self._closed:
            return
        try:
            if raise_errors:
                self.wait()
        finally:
            self._closed = True
            self._health.stop()  # no new ping; the one in progress is waited for below
            if self._sigterm is not None:
                self._sigterm.uninstall()
            self._jobs.put(None)
            self._worker.join()
            self._fanout.close()
            if self._coord is not None:
                self._coord.close()  # its store connections go now, before the caller destroys the group
            if self._stager is not None:
                self._stager.shutdown(wait=True)
            self._arenas.release_memory()
            self._plan_cache = None
            # A ping in progress ends within its replica's budget; waiting a little lets the
            # usual case (an instant ping) end before its replica is closed under it, and a
            # prober still stuck after that only ever marks a replica of a closed mirror.
            if not self._health.stop(timeout=_HEALTH_JOIN_S):
                log.debug("health prober still in a ping at close; it ends within the replica's budget")
            for r in self._owned:
                r.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Mirror is closed")


_mirror_count = 0
_mirror_count_lock = threading.Lock()


def _mirror_prefix() -> str:
    """Store prefix shared by the same Mirror on every rank: ranks create mirrors in the same
    order, and a restarted job (torchrun --max-restarts) gets a new round."""
    global _mirror_count
    with _mirror_count_lock:
        _mirror_count += 1
        n = _mirror_count
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"ckptmirror/{run}/{restart}/m{n}"


def _is_ddp(model: Any) -> bool:
    """A model wrapped in DistributedDataParallel holds the same state on every rank."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, DistributedDataParallel)


def _check_options(
    n_replicas: int,
    keep_last: int | None,
    object_bytes: int,
    inflight_policy: str,
    on_replica_error: str,
    min_replicas: int | None,
) -> None:
    """Reject bad :class:`Mirror` arguments before anything is opened."""
    if not n_replicas:
        raise ValueError("Mirror needs at least one replica URL")
    if keep_last is not None and keep_last < 1:
        raise ValueError("keep_last must be >= 1 (the newest committed step is never deleted) or None")
    if object_bytes < 1:
        raise ValueError("object_bytes must be positive")
    if inflight_policy not in ("wait", "skip"):
        raise ValueError("inflight_policy must be 'wait' or 'skip'")
    if on_replica_error not in ("warn", "raise"):
        raise ValueError("on_replica_error must be 'warn' or 'raise'")
    if min_replicas is not None and not 1 <= min_replicas <= n_replicas:
        raise ValueError(f"min_replicas must be between 1 and {n_replicas}")


def _once(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn``, run by the first call only (thread-safe)."""
    lock = threading.Lock()
    called = False

    def call() -> None:
        nonlocal called
        with lock:
            if called:
                return
            called = True
        fn()

    return call


def _model_ref(model: Any) -> Callable[[], Any] | None:
    """How the background writer finds ``model`` (for its frozen parameters) without keeping
    it alive: a weak reference where the type allows one (``nn.Module`` does)."""
    if model is None:
        return None
    try:
        return weakref.ref(model)
    except TypeError:
        return lambda: model
