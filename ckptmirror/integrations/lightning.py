"""PyTorch Lightning checkpoints through ckptmirror: asynchronous, replicated, checksummed, no pickle.

::

    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from ckptmirror.integrations.lightning import MirrorCheckpointIO

    trainer = Trainer(
        plugins=[MirrorCheckpointIO(["/local/nvme/ckpt/run1", "s3://bucket/ckpt/run1"])],
        callbacks=[ModelCheckpoint(dirpath="checkpoints", every_n_train_steps=500, save_last=True)],
    )
    trainer.fit(model, datamodule=dm, ckpt_path="last")   # resumes through the plugin

How Lightning's checkpoint files map onto ckptmirror:

- **One ckptmirror step per ``global_step``.** ``save_checkpoint`` snapshots the checkpoint dict
  (``Mirror.save_state``: one copy into reused host buffers) and returns; hashing and writing to
  every replica happen in the background. ModelCheckpoint saves the same step twice (a top-k file
  and ``last.ckpt``): the second call stores nothing, it only names the step again.
- **Every ``path`` Lightning asks for becomes a small JSON pointer file** (step, replicas, the
  checkpoint's top-level keys, callback state: below), written (temp file, fsync, rename) only
  once that step is committed on the replicas; until then the file keeps naming the previous
  committed step, or does not exist.
  A path named again before its previous save committed (``last.ckpt`` when saves take longer than
  the interval between them) waits for both: each commit moves the pointer to its step, unless a
  later call's pointer is there already; a save that fails leaves it naming the step before. A
  step no pointer names any more (``last.ckpt`` moved on, the top-k file was evicted) is released.
  ``fit(ckpt_path="last")`` lists the directory for ``last*.ckpt`` itself, so the pointers are what
  it finds; ``load_checkpoint(path)`` reads the pointer and loads that step, each object from the
  first replica where it verifies. The pointer's parent directory is created.
- **``remove_checkpoint(path)``** (how ModelCheckpoint evicts top-k files) removes the pointer and
  deletes its step from every replica (``Mirror.delete``, in the background) once no pointer this
  plugin knows of names it any more: pointers it wrote or loaded, and those in the directories it
  wrote to or loaded from (scanned once per directory). Before a step's last pointer goes, a release
  marker (``.ckptmirror-release-<step>.json``, hidden, JSON) is written next to it and removed once
  the step is deleted: a process killed mid-delete leaves it, and the next process that reads or
  writes checkpoints in that directory finishes the delete. Steps named by a pointer are pinned
  (``Mirror.pin``), so that ``keep_last=`` never removes a top-k or best checkpoint: with
  ``keep_last`` set it only cleans up steps no pointer names (e.g. one committed just before a
  crash, whose pointer was never written). The newest committed step is never deleted.
- **Callback state per file.** The state stored for a step is the checkpoint dict of the *first*
  ``save_checkpoint`` call of that step; the later calls of the step differ in the callbacks'
  bookkeeping (ModelCheckpoint sets ``last_model_path`` to ``last.ckpt`` just before saving it).
  Each pointer carries, as JSON, the fields of its call's ``checkpoint["callbacks"]`` that differ
  from the stored ones, and ``load_checkpoint`` puts them back: a resume from ``last.ckpt`` sees
  what Lightning's own ``last.ckpt`` would hold, and goes on overwriting ``last.ckpt`` (not
  ``last-v1.ckpt``), as natively.
- **``hyper_parameters``** (and ``datamodule_hyper_parameters``) are converted to storable forms
  before the save (see :func:`storable_hparams`): ``argparse.Namespace`` -> dict,
  ``pathlib.Path`` (any ``os.PathLike``) -> str, an ``Enum`` -> its value, a dataclass instance ->
  dict of its fields, a named tuple -> dict, a set -> list, an OmegaConf container -> plain
  containers; ``hparams_type`` (a class) -> its qualified name, which Lightning's own loader reads
  as ``AttributeDict``. Anything else that ckptmirror cannot store raises
  :class:`~ckptmirror.UnsupportedTypeError` naming the key path and how to exclude it
  (``self.save_hyperparameters(ignore=[...])``). Other entries are stored as they are (see
  :mod:`ckptmirror.state.tree` for what is storable); a value that is not raises the same error,
  naming its path under ``state[...]``.
- Nothing the plugin writes or reads is pickled: the pointers are JSON, the steps are ckptmirror
  steps (``ckptmirror ls/verify/repair/inspect`` work on the replicas). ``load_checkpoint`` refuses a
  file that is not a pointer (e.g. a ``torch.save`` checkpoint from before) instead of unpickling it.

What is covered: single-device training and DDP (tested with ``strategy="ddp"``; for ``ddp_spawn``
the plugin pickles without its Mirror, which each process opens on first use): Lightning's strategy
calls ``save_checkpoint``/``remove_checkpoint`` on global rank 0 only, so the plugin's mirror is
private to that process (``Mirror(distributed=False)``) and never waits for the other ranks; every
rank calls ``load_checkpoint`` and reads the replicas itself (as with native checkpoints, the pointer
and the replicas must be reachable from every rank: shared or object storage). FSDP and
ModelParallel strategies save sharded checkpoints through ``torch.distributed.checkpoint`` and bypass
CheckpointIO: use the DCP adapter (:mod:`ckptmirror.dcp`) there. Do not wrap this plugin in
Lightning's ``AsyncCheckpointIO``: it clones every tensor first, while ckptmirror's save already
returns after one copy. ``ModelCheckpoint(save_last="link")`` makes ``last.ckpt`` a symlink to a
top-k pointer that is written only at commit; use ``save_last=True``: ckptmirror stores the step once
either way.

Limits: a run resumed from an older checkpoint that reaches a step the earlier run had committed
replaces that step (``overwrite=True``, with a warning), as Lightning overwrites a file of the same
name; during the rewrite that step exists nowhere. A callback field that differs between the calls
of one step and has no JSON form (an object, a tensor of more than 64 elements), or a delta over
16 KiB (logged), loads as the first call saved it. A crash between a step's commit and the write of
its pointers leaves them naming the step before (Lightning's own files are written one after the
other too). ``LightningModule.load_from_checkpoint`` reads files itself
(``torch.load``) and does not go through the plugin: use ``trainer.validate/test/predict(ckpt_path=
...)``, or ``ckpt = MirrorCheckpointIO(replicas).load_checkpoint(path)`` then
``model.load_state_dict(ckpt["state_dict"])``.

Importing this module imports Lightning (``lightning``, else the standalone
``lightning_fabric``/``pytorch_lightning``); ``import ckptmirror`` never does.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CkptMirrorError, StepExistsError, StepNotFoundError
from ..handle import SaveHandle
from ..mirror import Mirror
from ..replicas import Replica
from ._lightning_hparams import _convert_checkpoint, storable_hparams
from ._lightning_pointers import (
    POINTER_FORMAT,
    POINTER_VERSION,
    RELEASE_FORMAT,
    PointerError,
    _norm,
    _parent,
    _release_path,
    _remove_file,
    _scan_pointers,
    _write_pointer,
    apply_callbacks,
    callbacks_delta,
    encode_callbacks,
    read_pointer,
)

if TYPE_CHECKING:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
else:
    try:
        from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    except ImportError:  # only the standalone packages (pip install pytorch-lightning)
        from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO

__all__ = ["POINTER_FORMAT", "MirrorCheckpointIO", "PointerError", "read_pointer", "storable_hparams"]

log = logging.getLogger("ckptmirror.lightning")


@dataclasses.dataclass
class _Pending:
    """A pointer to write: the step it names, the top-level keys of the save that named it, the
    save whose commit it waits for (None until that save is started; None for a "name" of a step
    committed before this process, which is written at once), the order of the
    ``save_checkpoint`` call (a later call's pointer replaces an earlier one's, never the reverse)
    and where that call's callback state differs from the stored step's (see
    :func:`~._lightning_pointers.callbacks_delta`)."""

    step: int
    keys: frozenset[str]
    handle: SaveHandle | None
    seq: int
    callbacks: dict[str, Any]


class MirrorCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that saves through a :class:`~ckptmirror.Mirror` (see the module doc).

    Args:
        replicas: replica URLs or :class:`~ckptmirror.Replica` objects, as for ``Mirror``.
        on_saved: called with each step's :class:`~ckptmirror.SaveHandle` once its outcome is known
            (on a background thread): log ``stall_s``, ``committed_s``, ``nbytes`` to a tracker.
        **mirror_options: passed to :class:`~ckptmirror.Mirror` (``keep_last``, ``min_replicas``,
            ``storage_options``, ``max_inflight``, ...). ``distributed`` is always False: Lightning
            checkpoints from global rank 0 alone.

    The Mirror is opened on first use (after DDP has started the processes) and closed by
    ``teardown()`` at the end of ``fit``/``validate``/``test``, which waits for the saves in flight,
    writes their pointers and raises a save that failed; a later call opens it again. Its health,
    steps and handles are reachable through :attr:`mirror`.
    """

    def __init__(
        self,
        replicas: Sequence[str | Replica] | str | Replica,
        *,
        on_saved: Callable[[SaveHandle], object] | None = None,
        **mirror_options: Any,
    ) -> None:
        super().__init__()
        if isinstance(replicas, (str, Replica)):
            replicas = [replicas]
        if not replicas:
            raise ValueError("MirrorCheckpointIO needs at least one replica URL")
        if mirror_options.get("distributed") not in (None, False) or mirror_options.get("process_group") is not None:
            raise ValueError(
                "MirrorCheckpointIO saves from global rank 0 only (Lightning calls CheckpointIO there): "
                "distributed= and process_group= cannot be set"
            )
        mirror_options.pop("distributed", None)
        self.replicas: list[str | Replica] = list(replicas)
        self.on_saved = on_saved
        self.mirror_options = mirror_options
        self._init_runtime()
        _register_with_standalone_lightning()

    def _init_runtime(self) -> None:
        self._mirror: Mirror | None = None
        # Guards everything below; pointer files are written and removed under it (small, fast),
        # so that the training thread and the save threads agree on which path names which step.
        self._lock = threading.Lock()
        self._written: dict[str, int] = {}  # pointer on disk: path -> step
        # The save_checkpoint call whose pointer is on disk (path -> its seq; absent: an earlier
        # process's pointer, which any call of this one replaces).
        self._written_seq: dict[str, int] = {}
        self._seq = 0  # save_checkpoint calls so far
        # Pointers to write once their step commits (path -> what and when, in call order). A
        # path can wait for several steps at once (last.ckpt when a save is slower than the
        # interval between saves): each commit writes its pointer unless a later call's is there.
        self._pending: dict[str, list[_Pending]] = {}
        # Steps this process saved or loaded: their top-level keys (a step is stored once), and
        # the JSON form of the callback state stored for the newest (what the pointers of the
        # calls naming it again differ from).
        self._keys: dict[int, frozenset[str]] = {}
        self._stored_callbacks: dict[int, dict[str, dict[str, Any]]] = {}
        self._handles: dict[int, SaveHandle] = {}
        self._scanned: set[str] = set()  # directories whose pointers are known
        self._markers: dict[int, set[str]] = {}  # release markers on disk, by step
        self._deleting: dict[int, threading.Event] = {}
        self._releaser: ThreadPoolExecutor | None = None

    # Lightning pickles the trainer (and its plugins) for ddp_spawn: the runtime state (a Mirror
    # with threads, locks) stays behind and each process opens its own on first use.
    def __getstate__(self) -> dict[str, Any]:
        return {"replicas": self.replicas, "on_saved": self.on_saved, "mirror_options": self.mirror_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    @property
    def mirror(self) -> Mirror:
        """The Mirror the plugin saves to (opened now if it is not open)."""
        with self._lock:
            if self._mirror is None:
                self._mirror = Mirror(self.replicas, distributed=False, **self.mirror_options)
                self._releaser = ThreadPoolExecutor(1, thread_name_prefix="ckptmirror-lightning-release")
            return self._mirror

    # ------------------------------------------------------------------------- save
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Snapshot ``checkpoint`` as step ``checkpoint["global_step"]`` (once per step) and name it
        ``path``; the pointer at ``path`` is written when the step has committed."""
        if storage_options is not None:
            raise TypeError(
                f"Trainer.save_checkpoint(..., storage_options=...) is not supported by {type(self).__name__}: "
                "pass storage_options to MirrorCheckpointIO(..., storage_options=...) instead"
            )
        step = checkpoint.get("global_step")
        if type(step) is not int or step < 0:
            raise ValueError(f"the checkpoint has no usable 'global_step' (got {step!r}): ckptmirror steps are ints")
        key = _norm(path)
        mirror = self.mirror
        self._scan(_parent(key))
        keys = frozenset(str(k) for k in checkpoint)
        # Now: ModelCheckpoint's state (e.g. best_k_models) is a live reference that changes later.
        callbacks = encode_callbacks(checkpoint.get("callbacks"))
        while True:
            with self._lock:
                busy = self._deleting.get(step)
                if busy is None:
                    mode = self._save_mode(step, keys)
                    delta = self._callbacks_delta(step, callbacks, path) if mode == "name" else {}
                    # Named from now on: a release of this step queued earlier sees it and backs off.
                    # The pointer waits for the save in flight ("name") or for the one made below.
                    self._seq += 1
                    handle = self._handles.get(step) if mode == "name" else None
                    entry = _Pending(step, keys, handle, self._seq, delta)
                    self._pending.setdefault(key, []).append(entry)
                    self._unmark(step)  # named again: a release marker left for it is void
                    break
            busy.wait()  # the step is being deleted (an earlier timeline): let that finish first
        if mode == "name":
            # The same global_step again (ModelCheckpoint: top-k file, then last.ckpt), or the step
            # this process resumed from: the state is stored or on its way; this path only names it.
            if entry.handle is None or entry.handle.done():
                self._write_pending(entry.handle, step, ok=entry.handle is None or entry.handle.committed_s is not None)
            return
        state = _convert_checkpoint(checkpoint)
        try:
            handle = self._save(mirror, step, state, overwrite=mode == "more")
        except BaseException:
            with self._lock:
                self._drop_pending(key, entry)
            raise
        with self._lock:
            self._keys[step] = keys
            self._handles[step] = handle
            # Only the newest step's: the calls naming a step follow its save (ModelCheckpoint's
            # files of one global_step); ModelCheckpoint(save_top_k=-1) state grows with the run.
            self._stored_callbacks = {step: callbacks}
            # Every pointer waiting for this step (this path, and others named while the earlier
            # save of a "more" step was in flight) now waits for this save.
            for entries in self._pending.values():
                for e in entries:
                    if e.step == step:
                        e.handle = handle
        mirror.pin(step)
        handle.add_done_callback(self._on_done)  # runs at once if the save is done already
        if self.on_saved is not None:
            handle.add_done_callback(self.on_saved)

    def _drop_pending(self, path: str, entry: _Pending) -> None:
        """(lock held) Forget one pending pointer."""
        entries = [e for e in self._pending.get(path, ()) if e is not entry]
        if entries:
            self._pending[path] = entries
        else:
            self._pending.pop(path, None)

    def _callbacks_delta(self, step: int, callbacks: dict[str, dict[str, Any]], path: Any) -> dict[str, Any]:
        """(lock held) Where a call naming stored ``step`` differs from the stored callback state."""
        stored = self._stored_callbacks.get(step)
        if stored is None:
            return {}
        try:
            return callbacks_delta(stored, callbacks)
        except ValueError as exc:
            log.warning("%s: not recording its callback state (%s); a resume from it sees step %d's", path, exc, step)
            return {}

    def _save_mode(self, step: int, keys: frozenset[str]) -> str:
        """(lock held) ``"name"``: the step is stored already with these entries; ``"more"``: this
        process stored it with fewer (weights only), store it again; ``"new"``: save it."""
        stored = self._keys.get(step)
        if stored is None:
            return "new"
        handle = self._handles.get(step)
        if handle is not None and handle.done() and handle.committed_s is None:
            return "new"  # that save failed or was skipped: try again (the failure is raised first)
        return "name" if keys <= stored else "more"

    def _save(self, mirror: Mirror, step: int, state: dict[str, Any], overwrite: bool) -> SaveHandle:
        if overwrite:
            mirror.wait()  # the earlier save of this step may still be writing
            log.info("step %d saved again with more entries (%s)", step, ", ".join(sorted(state)))
            return mirror.save_state(step, state, overwrite=True)
        try:
            return mirror.save_state(step, state)
        except StepExistsError:
            # Committed by an earlier process that went past this step (the run resumed from an
            # older checkpoint, or crashed before writing this step's pointer): this run's history
            # replaces it, as Lightning overwrites a checkpoint file of the same name.
            log.warning("step %d is already committed on the replicas (an earlier run); replacing it", step)
            mirror.wait()
            return mirror.save_state(step, state, overwrite=True)

    def _on_done(self, handle: SaveHandle) -> None:
        """A save finished (on a background thread): write or drop the pointers waiting for it.

        ``committed_s`` is set only when the step committed on enough replicas; reading it does
        not mark a failure as reported (the Mirror raises it on the next save or at teardown).
        """
        self._write_pending(handle, handle.step, ok=handle.committed_s is not None)

    def _write_pending(self, handle: SaveHandle | None, step: int, ok: bool) -> None:
        """Write the pointers waiting for ``handle`` (None: ``step``, committed before this
        process) if ``ok``, else drop them; release the steps no pointer names any more.

        Saves commit in order, but their done callbacks run on threads of their own (and
        :meth:`wait` runs them too), so this may run for a later save first: a pointer is written
        only if no later ``save_checkpoint`` call's pointer for that path is on disk, and writing
        it drops the path's pending pointers of earlier calls (superseded, never to be written).
        A failed save's pointers are dropped: the path keeps naming the step written before.
        """
        released: list[int] = []
        with self._lock:
            failed: list[str] = []
            for p in list(self._pending):
                entries = self._pending[p]
                mine = [e for e in entries if e.step == step and e.handle is handle]
                if not mine:
                    continue
                rest = [e for e in entries if all(e is not m for m in mine)]
                self._pending[p] = rest
                e = max(mine, key=lambda m: m.seq)
                if not ok:
                    failed.append(p)
                elif e.seq < self._written_seq.get(p, -1):
                    released.append(step)  # a later call's pointer is there already
                else:
                    superseded = [x for x in rest if x.seq < e.seq]
                    self._pending[p] = [x for x in rest if x.seq > e.seq]
                    if self._write_one(p, e, released):
                        released.extend(x.step for x in superseded)
                    else:  # the path keeps its pointer: an earlier call's may still replace it
                        self._pending[p] = rest
                if not self._pending[p]:
                    del self._pending[p]
            if not ok:
                released.append(step)
                if failed:
                    log.error("step %d was not committed; not writing its pointers %s", step, failed)
            released = [s for s in dict.fromkeys(released) if not self._named(s)]
        for s in released:
            self._release(s)

    def _write_one(self, path: str, e: _Pending, released: list[int]) -> bool:
        """(lock held) Write the pointer ``e`` at ``path``; the step it replaces goes to ``released``."""
        previous = self._written.get(path)
        if previous is not None and previous != e.step and not self._named(previous, besides=path):
            self._mark(previous, _parent(path))  # before the last pointer to it goes
        try:
            _write_pointer(path, self._pointer_doc(e.step, e.keys, e.callbacks))
        except OSError as exc:
            log.error("could not write the checkpoint pointer %s for step %d: %s", path, e.step, exc)
            return False
        self._written[path] = e.step
        self._written_seq[path] = e.seq
        if previous is not None and previous != e.step:
            released.append(previous)
        return True

    def _pointer_doc(
        self, step: int, keys: frozenset[str], callbacks: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        assert self._mirror is not None
        return {
            "format": POINTER_FORMAT,
            "version": POINTER_VERSION,
            "step": step,
            "replicas": [r.url for r in self._mirror.replicas],
            "keys": sorted(keys),
            "callbacks": dict(callbacks or {}),
            "written_unix_s": round(time.time(), 3),
        }

    # ------------------------------------------------------------------------- remove
    def remove_checkpoint(self, path: Any) -> None:
        """Remove the pointer at ``path``; its step is deleted once no known pointer names it."""
        key = _norm(path)
        self.mirror  # noqa: B018 - opened: releasing a step needs it
        self._scan(_parent(key))
        with self._lock:
            steps = {e.step for e in self._pending.pop(key, ())}
            written = self._written.pop(key, None)
            self._written_seq.pop(key, None)
            if written is not None:
                steps.add(written)
            ours = False
            try:
                steps.add(read_pointer(key)["step"])
                ours = True
            except FileNotFoundError:
                pass
            except (OSError, PointerError) as exc:
                # Not ours (a native checkpoint from before the switch): Lightning asked for this
                # path, but the plugin removes only what it wrote.
                log.warning("not removing %s: %s", key, exc)
            released = [s for s in steps if not self._named(s)]
            for s in released:
                self._mark(s, _parent(key))  # before the pointer goes: a crash mid-delete leaves a note
            if ours:
                _remove_file(key)
        for s in released:
            self._release(s)

    def _named(self, step: int, besides: str | None = None) -> bool:
        """Whether a known pointer (written, other than the one at ``besides``, or pending) names
        ``step`` (lock held)."""
        return any(s == step and p != besides for p, s in self._written.items()) or any(
            e.step == step for entries in self._pending.values() for e in entries
        )

    def _mark(self, step: int, directory: str) -> None:
        """Write the release marker of ``step`` in ``directory`` (lock held): the intent to delete
        it survives a crash; the next process that scans the directory finishes the release."""
        path = _release_path(directory, step)
        if path in self._markers.get(step, ()):
            return
        assert self._mirror is not None
        doc = {**self._pointer_doc(step, frozenset()), "format": RELEASE_FORMAT}
        try:
            _write_pointer(path, doc)
        except OSError as exc:
            log.warning("could not write the release marker %s: %s", path, exc)
            return
        self._markers.setdefault(step, set()).add(path)

    def _unmark(self, step: int) -> None:
        """Remove the release markers of ``step`` (lock held): deleted, or named again."""
        for path in self._markers.pop(step, ()):
            try:
                _remove_file(path)
            except OSError as exc:
                log.warning("could not remove the release marker %s: %s", path, exc)

    def _release(self, step: int) -> None:
        """Delete ``step`` in the background, unless it is named again by then."""
        if self._mirror is None or self._releaser is None:
            return
        mirror = self._mirror
        try:
            self._releaser.submit(self._delete, mirror, step)
        except RuntimeError:  # shut down (teardown raced a late callback): the step stays
            log.debug("step %d not released: the plugin is closing", step)

    def _delete(self, mirror: Mirror, step: int) -> None:
        with self._lock:
            if self._named(step):
                self._unmark(step)
                return
            done = self._deleting[step] = threading.Event()
        deleted = settled = False
        try:
            mirror.unpin(step)
            mirror.delete(step)
            deleted = True
            log.info("released step %d (no checkpoint pointer names it)", step)
        except StepNotFoundError:
            deleted = True  # never committed (a failed save), or gone already
        except ValueError as exc:  # the newest committed step: kept, a restore would use it
            settled = True
            log.debug("step %d kept: %s", step, exc)
        except (CkptMirrorError, OSError) as exc:
            # The marker stays: the next process that scans its directory tries again.
            log.warning("could not delete step %d: %s (ckptmirror prune removes it later)", step, exc)
        finally:
            with self._lock:
                self._deleting.pop(step, None)
                if deleted:  # a later save of this step is a new save
                    self._keys.pop(step, None)
                    self._handles.pop(step, None)
                    self._stored_callbacks.pop(step, None)
                if deleted or settled:
                    self._unmark(step)
            done.set()

    # ------------------------------------------------------------------------- load
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read the pointer at ``path`` and load its step from the replicas (each object from the
        first replica where it verifies). Tensors come back on the CPU, or on ``map_location`` when
        that is a device (a dict maps ``"cpu"``; a callable is ignored). ``weights_only`` does not
        matter: nothing is unpickled."""
        key = _norm(path)
        doc = read_pointer(key)
        step = doc["step"]
        mirror = self.mirror
        self._scan(_parent(key))
        urls = [r.url for r in mirror.replicas]
        if doc["replicas"] and not set(doc["replicas"]) & set(urls):
            log.warning("%s names replicas %s; reading step %d from this plugin's %s", key, doc["replicas"], step, urls)
        try:
            loaded = mirror.load_state(step, require=True)
        except CkptMirrorError as exc:
            log.error("cannot load step %d named by %s: %s", step, key, exc)
            raise
        assert loaded is not None  # require=True raises instead
        state = loaded[1]
        if not isinstance(state, dict):
            raise PointerError(key, f"step {step} does not hold a Lightning checkpoint dict")
        with self._lock:
            # Saving this step again (a resume that checkpoints before training on) only names it.
            if step not in self._keys:
                self._keys[step] = frozenset(str(k) for k in state)
                self._stored_callbacks = {step: encode_callbacks(state.get("callbacks"))}
        # The callback state of the save that wrote this pointer (ModelCheckpoint's last.ckpt
        # names itself as last_model_path), where it differs from the step's stored state.
        state = apply_callbacks(state, doc["callbacks"])
        if doc["keys"]:
            # A weights-only save of a step stored in full earlier: return what that save held.
            state = {k: v for k, v in state.items() if k in set(doc["keys"])}
        device = _target_device(map_location)
        if device is not None and device.type != "cpu":
            state = _to_device(state, device)
        log.info("loaded step %d for %s", step, key)
        return state

    # ------------------------------------------------------------------------- directories
    def _scan(self, directory: str) -> None:
        """Learn the pointers already in ``directory`` (once): they name steps too. Finish the
        releases an earlier process marked there and did not complete (it was killed mid-delete)."""
        with self._lock:
            if directory in self._scanned:
                return
            self._scanned.add(directory)
        found, markers = _scan_pointers(directory)
        mirror = self._mirror
        with self._lock:
            for p, s in found.items():
                self._written.setdefault(p, s)
            for s, path in markers.items():
                self._markers.setdefault(s, set()).add(path)
            unfinished = sorted(s for s in markers if not self._named(s))
        if mirror is not None:
            for s in set(found.values()):
                mirror.pin(s)
        for s in unfinished:
            log.info("finishing the release of step %d (marked in %s)", s, directory)
            self._release(s)

    # ------------------------------------------------------------------------- teardown
    def wait(self) -> None:
        """Block until every save so far is committed and its pointers written; raise a failed save."""
        mirror = self._mirror
        if mirror is None:
            return
        try:
            mirror.wait()
        finally:
            # The done callbacks run on their own threads: write what they may not have yet.
            with self._lock:
                handles = {
                    id(e.handle): e.handle
                    for entries in self._pending.values()
                    for e in entries
                    if e.handle is not None
                }
            for h in handles.values():
                if h.done():
                    self._on_done(h)
            releaser = self._releaser
            if releaser is not None:
                releaser.submit(lambda: None).result()  # the releases queued so far

    def teardown(self) -> None:
        """End of a Trainer stage: wait for the saves (raising a failure), then close the Mirror.

        Lightning also tears down after an exception in training: then a failed save is logged,
        not raised, so that the original exception is the one the user sees.
        """
        mirror = self._mirror
        if mirror is None:
            return
        handling = sys.exc_info()[0] is not None
        try:
            self.wait()
        except Exception:
            if not handling:
                raise
            log.exception("a checkpoint save failed (teardown after another error)")
        finally:
            with self._lock:
                self._mirror = None
                releaser, self._releaser = self._releaser, None
                self._handles.clear()
                self._keys.clear()
                self._stored_callbacks.clear()
                self._pending.clear()
                self._scanned.clear()
                self._markers.clear()
            if releaser is not None:
                releaser.shutdown(wait=True)
            # wait() above reported any failure; close() frees threads and staging buffers.
            mirror.close(raise_errors=False)


def _target_device(map_location: Any) -> torch.device | None:
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    if isinstance(map_location, Mapping) and "cpu" in map_location:
        return torch.device(map_location["cpu"])
    return None


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        seq = [_to_device(v, device) for v in obj]
        return seq if type(obj) is list else tuple(seq)
    return obj


def _register_with_standalone_lightning() -> None:
    """Make the plugin a CheckpointIO for ``pytorch_lightning.Trainer`` too, when that is in use.

    The standalone ``pytorch_lightning`` checks plugins against ``lightning_fabric``'s CheckpointIO,
    a different class from ``lightning.fabric``'s; registering as a virtual subclass (an ABC) lets
    one plugin class serve both. Only done when ``lightning_fabric`` is imported already: importing
    it here would load a second copy of Lightning for users of ``lightning``.
    """
    standalone = sys.modules.get("lightning_fabric.plugins.io.checkpoint_io")
    if standalone is None:
        return
    base = getattr(standalone, "CheckpointIO", None)
    if base is not None and base is not CheckpointIO and not issubclass(MirrorCheckpointIO, base):
        base.register(MirrorCheckpointIO)
