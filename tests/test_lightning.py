"""ckptmirror.integrations.lightning.MirrorCheckpointIO with the real Lightning (CPU).

The proof (module fixtures, child processes: tests/_lightning_child.py, forked from a server
that imported Lightning once): a tiny LightningModule
trains with the plugin and two local replicas and is killed hard (``os._exit``) mid-epoch after some
saves; a new process resumes with ``fit(ckpt_path="last")`` through the plugin. Lightning is not
bit-exact when resuming mid-epoch against an uninterrupted run, so the reference is Lightning's own
resume: the same training with TorchCheckpointIO, resumed from its checkpoint of the same step. The
final weights and optimizer state must match bit for bit; so must the saved step itself. Also: no
file the integration wrote is a pickle, ``ckptmirror verify`` passes, and with one replica corrupted
the resume reads the other and still matches.

The other tests drive the plugin in this process: one save per global_step, pointers written only
after the commit (and last.ckpt moving on with each commit while saves overlap), top-k eviction
releasing steps, a resume from the first checkpoint overwriting last.ckpt as Lightning does,
weights-only saves, hyper-parameter conversion, refusing pickles, and that ``import ckptmirror``
does not import Lightning.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning", reason="the Lightning tests need lightning (pip install -e '.[lightning]')")

import lightning as L  # noqa: E402
from _helpers import Forked, ForkServer, wait_until  # noqa: E402
from _lightning_child import CRASH_CODE, Arch, Opt  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from ckptmirror import Mirror, ReplicaError, SaveFailedError, UnsupportedTypeError  # noqa: E402
from ckptmirror.integrations._lightning_pointers import (  # noqa: E402
    apply_callbacks,
    callbacks_delta,
    encode_callbacks,
)
from ckptmirror.integrations.lightning import (  # noqa: E402
    MirrorCheckpointIO,
    PointerError,
    read_pointer,
    storable_hparams,
)
from ckptmirror.replicas.faulty import FaultyReplica  # noqa: E402
from ckptmirror.replicas.local import LocalReplica  # noqa: E402

CHILD = Path(__file__).with_name("_lightning_child.py")
MAX_STEPS = 20  # 8 batches an epoch: the crash (step 11) and the resume fall mid-epoch
EVERY = 3
CRASH_AT = 11
CHILD_TIMEOUT_S = 600


# ------------------------------------------------------------------------- child processes
#: What a training child imports: loaded once by the module's fork server (_helpers.ForkServer),
#: which forks every child; a fresh interpreter per child would import Lightning each time.
PRELOAD = ["lightning", "lightning.pytorch.callbacks", "ckptmirror.integrations.lightning"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    """The fork server of this module's training children."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHILD.parent.parent), os.environ.get("PYTHONPATH", "")])}
    server = ForkServer(PRELOAD, tmp_path_factory.mktemp("lightning-server") / "server.log", env=env)
    yield server
    server.close()


def start(runs: ForkServer, cfg: dict[str, Any], cwd: Path, name: str) -> Forked:
    """Start one training process in ``cwd``; its config and output go next to ``cwd``."""
    cfg_path = cwd.parent / f"{name}.json"
    cfg_path.write_text(json.dumps({**cfg, "out": str(cwd.parent / f"{name}.out.json")}))
    cwd.mkdir(parents=True, exist_ok=True)
    return runs.popen([str(CHILD), str(cfg_path)], cwd, cwd.parent / f"{name}.log")


def finish(proc: Forked, expect_rc: int = 0) -> dict[str, Any] | None:
    """Wait for a child; check its exit status; return its result JSON (None after a crash)."""
    try:
        rc = proc.wait(CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait(60)
    log = child_log(proc)
    assert rc == expect_rc, f"{proc.stdout_path.stem} exited {rc}, expected {expect_rc}:\n{log[-4000:]}"
    out = proc.stdout_path.with_suffix(".out.json")
    return json.loads(out.read_text()) if expect_rc == 0 else None


def child_log(proc: Forked) -> str:
    return proc.stdout_path.read_text(errors="replace")


def mirror_cfg(**kw: Any) -> dict[str, Any]:
    # Relative replica and checkpoint paths: a copy of the run directory is a run of its own.
    return {"checkpoint_io": "mirror", "replicas": ["rA", "rB"], "ckpt_dir": "ck", "every": EVERY,
            "max_steps": MAX_STEPS, "ckpt_path": "last", **kw}  # fmt: skip


@dataclasses.dataclass
class Crashed:
    base: Path
    run: Path  # the crashed mirror run (cwd of its processes)
    copy: Path  # a copy of it taken right after the crash
    ref: Path  # the native reference run
    step: int  # the step last.ckpt names after the crash


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory, runs: ForkServer) -> Crashed:
    """A mirror run killed at CRASH_AT and, alongside, a native run saving every EVERY steps."""
    base = tmp_path_factory.mktemp("lightning")
    run, ref = base / "run", base / "ref"
    native = start(runs, {"checkpoint_io": "native", "ckpt_dir": "nck", "every": EVERY, "top_k": -1,
                    "max_steps": MAX_STEPS}, ref, "native_full")  # fmt: skip
    crash = start(runs, mirror_cfg(crash_at=CRASH_AT), run, "mirror_crash")
    finish(crash, expect_rc=CRASH_CODE)
    finish(native)
    step = read_pointer(run / "ck" / "last.ckpt")["step"]
    assert step in (3, 6, 9), step  # a step saved before the crash, committed (else no pointer)
    shutil.copytree(run, base / "copy", symlinks=True)
    return Crashed(base, run, base / "copy", ref, step)


@dataclasses.dataclass
class Resumed:
    native: dict[str, Any]
    mirror: dict[str, Any]
    corrupted: dict[str, Any]
    corrupted_log: str
    verify_corrupted_rc: int


@pytest.fixture(scope="module")
def resumed(crashed: Crashed, runs: ForkServer) -> Resumed:
    """Three resumes at once: native from its file of the crash step, the plugin from "last", and
    the plugin from "last" in the copy whose replica rA has every object corrupted."""
    flipped = 0
    for obj in (crashed.copy / "rA").rglob("*.bin"):
        data = bytearray(obj.read_bytes())
        if obj.name.startswith(".tmp-") or not data:
            continue  # what the crash left of an upload (maybe empty): no object of any step
        data[len(data) // 2] ^= 0xFF
        obj.write_bytes(bytes(data))
        flipped += 1
    assert flipped, "no object files found to corrupt"
    verify_rc = verify(crashed.copy).returncode
    (native_file,) = (crashed.ref / "nck").glob(f"epoch=*-step={crashed.step}.ckpt")
    procs = [
        start(
            runs,
            {
                "checkpoint_io": "native",
                "ckpt_dir": "nck_resumed",
                "every": EVERY,
                "top_k": -1,
                "max_steps": MAX_STEPS,
                "ckpt_path": str(native_file),
                "weights_only": False,
            },
            crashed.ref,
            "native_resume",
        ),  # fmt: skip
        start(runs, mirror_cfg(), crashed.run, "mirror_resume"),
        start(runs, mirror_cfg(), crashed.copy, "corrupted_resume"),
    ]
    native, mirror, corrupted = (finish(p) for p in procs)
    assert native is not None and mirror is not None and corrupted is not None
    return Resumed(native, mirror, corrupted, child_log(procs[2]), verify_rc)


def verify(run: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptmirror", "verify", "--no-progress", "rA", "rB"],
        cwd=run,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ------------------------------------------------------------------------- the proof
def test_saved_step_matches_lightning_native_checkpoint(crashed: Crashed, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step the pointer names holds what Lightning's own checkpoint of that step holds."""
    with Mirror([str(crashed.run / "rA"), str(crashed.run / "rB")]) as m:
        loaded = m.load_state(crashed.step, require=True)
    assert loaded is not None
    ours = loaded[1]
    (native_file,) = (crashed.ref / "nck").glob(f"epoch=*-step={crashed.step}.ckpt")
    # The reference's own pickle, read by the test. It names the hyper-parameters' classes as
    # __main__.Arch and __main__.Opt (the child ran as a script): one more reason not to pickle.
    for cls in (Arch, Opt):
        monkeypatch.setattr(sys.modules["__main__"], cls.__name__, cls, raising=False)
    theirs = torch.load(native_file, weights_only=False)
    assert ours["global_step"] == theirs["global_step"] == crashed.step
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for k, v in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][k], v) and ours["state_dict"][k].dtype == v.dtype, k
    for o, t in zip(ours["optimizer_states"], theirs["optimizer_states"]):
        for i, st in t["state"].items():
            for name, v in st.items():
                assert torch.equal(o["state"][i][name], v), (i, name)
        assert o["param_groups"] == t["param_groups"]
    assert ours["lr_schedulers"] == theirs["lr_schedulers"]
    assert ours["loops"] == theirs["loops"]
    # Hyper-parameters: converted to JSON-able forms, not pickled.
    hp = ours["hyper_parameters"]
    assert hp["arch"] == {"hidden": 16, "dropout": 0.1}
    assert hp["opt"] == "adam"
    assert hp["out_dir"] == "/tmp/out"
    assert hp["args"] == {"seed": 0, "name": "tiny"}


def test_crash_resume_matches_native_resume_bit_for_bit(crashed: Crashed, resumed: Resumed) -> None:
    assert resumed.mirror["started_at"] == resumed.native["started_at"] == crashed.step
    assert resumed.mirror["global_step"] == resumed.native["global_step"] == MAX_STEPS
    assert resumed.mirror["model"] == resumed.native["model"]
    assert resumed.mirror["optim"] == resumed.native["optim"]
    assert len(resumed.mirror["model"]) == 4 and len(resumed.mirror["optim"]) >= 8


def test_no_pickle_written_and_verify_passes(crashed: Crashed, resumed: Resumed) -> None:
    """After crash and resume: the checkpoint directory holds JSON pointers only, the replicas
    JSON records and raw objects only, and ``ckptmirror verify`` finds every step intact."""
    pointers = sorted((crashed.run / "ck").iterdir())
    # Release markers (a crash mid-delete leaves one) were acted on and removed by the resume.
    assert not [p for p in pointers if p.name.startswith(".")], pointers
    assert [p.name for p in pointers if p.name.startswith("last")] == ["last.ckpt"]
    for p in pointers:
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{p} looks pickled"
        doc = read_pointer(p)
        assert doc["replicas"] == ["rA", "rB"]
    assert read_pointer(crashed.run / "ck" / "last.ckpt")["step"] == MAX_STEPS - MAX_STEPS % EVERY
    for replica in ("rA", "rB"):
        for f in (crashed.run / replica).rglob("*"):
            if f.is_dir():
                continue
            assert f.suffix in (".json", ".bin"), f"unexpected file {f}"
            if f.suffix == ".json":
                json.loads(f.read_bytes())
    everything = [f for f in crashed.run.rglob("*") if f.is_file()]
    assert not [f for f in everything if f.suffix in (".pt", ".pth", ".pkl", ".pickle")]
    result = verify(crashed.run)
    assert result.returncode == 0, result.stdout + result.stderr


def test_resume_with_a_corrupted_replica_reads_the_other(resumed: Resumed) -> None:
    assert resumed.verify_corrupted_rc == 1  # verify sees the damage on rA
    assert resumed.corrupted["model"] == resumed.native["model"]
    assert resumed.corrupted["optim"] == resumed.native["optim"]
    served = [line for line in resumed.corrupted_log.splitlines() if "objects served by" in line]
    assert served and "'rB'" in served[0] and "'rA'" not in served[0], served


# ------------------------------------------------------------------------- in this process
class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.05, **extra: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def loader() -> torch.utils.data.DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def trainer(io: MirrorCheckpointIO, ckpt_dir: Path, max_steps: int, **ckpt: Any) -> L.Trainer:
    options = {"every_n_train_steps": 3, "save_top_k": 2, "monitor": "step", "mode": "max", "save_last": True, **ckpt}
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        plugins=[io],
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, **options)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_one_save_per_step_and_topk_eviction_releases_steps(tmp_path: Path) -> None:
    saved: list[int] = []
    io = MirrorCheckpointIO([str(tmp_path / "r1"), str(tmp_path / "r2")], on_saved=lambda h: saved.append(h.step))
    trainer(io, tmp_path / "ck", 13).fit(Tiny(), loader())
    # ModelCheckpoint saved each step twice (top-k file and last.ckpt): one ckptmirror save each.
    assert sorted(saved) == [3, 6, 9, 12]
    pointers = {p.name: read_pointer(p)["step"] for p in (tmp_path / "ck").iterdir()}
    assert sorted(pointers.values()) == [9, 12, 12] and pointers["last.ckpt"] == 12
    # Steps 3 and 6 were evicted from the top 2 and named by no pointer: deleted everywhere.
    assert io.mirror.replica_steps() == {str(tmp_path / "r1"): [9, 12], str(tmp_path / "r2"): [9, 12]}
    io.teardown()

    # A second fit resumes from last.ckpt through the plugin and goes on saving and evicting.
    saved.clear()
    io2 = MirrorCheckpointIO([str(tmp_path / "r1"), str(tmp_path / "r2")], on_saved=lambda h: saved.append(h.step))
    t = trainer(io2, tmp_path / "ck", 19)
    t.fit(Tiny(), loader(), ckpt_path="last")
    assert sorted(saved) == [15, 18]
    assert sorted(read_pointer(p)["step"] for p in (tmp_path / "ck").iterdir()) == [15, 18, 18]
    assert io2.mirror.steps() == [15, 18]
    io2.teardown()


def gated_replica(root: Path) -> tuple[FaultyReplica, threading.Event, threading.Event]:
    """A local replica whose commits wait for ``release``; ``reached`` is set at the first commit."""
    release, reached = threading.Event(), threading.Event()

    def on_phase(phase: str, key: str) -> None:
        if phase == "commit":
            reached.set()
            assert release.wait(60)

    return FaultyReplica(LocalReplica(str(root)), on_phase=on_phase), release, reached


def state(step: int, weights_only: bool = False) -> dict[str, Any]:
    ckpt: dict[str, Any] = {"global_step": step, "epoch": 0, "state_dict": {"w": torch.full((3,), float(step))}}
    if not weights_only:
        ckpt["optimizer_states"] = [{"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": []}]
    return ckpt


def test_pointer_is_written_only_after_the_commit(tmp_path: Path) -> None:
    replica, release, reached = gated_replica(tmp_path / "r")
    handles: list[Any] = []
    io = MirrorCheckpointIO([replica], on_saved=handles.append)
    a, b = tmp_path / "new" / "dir" / "a.ckpt", tmp_path / "new" / "dir" / "b.ckpt"
    io.save_checkpoint(state(5), a)
    io.save_checkpoint(state(5), b)  # the same step under another name: no second save
    assert reached.wait(30)
    assert not a.exists() and not b.exists()  # the step is not committed yet
    release.set()
    io.wait()
    assert read_pointer(a)["step"] == read_pointer(b)["step"] == 5  # parent directories created
    assert [h.step for h in handles] == [5]
    assert io.load_checkpoint(b)["state_dict"]["w"].tolist() == [5.0, 5.0, 5.0]
    io.teardown()


def test_failed_save_writes_no_pointer_and_is_raised(tmp_path: Path) -> None:
    io = MirrorCheckpointIO([FaultyReplica(LocalReplica(str(tmp_path / "r")), fail_commit=True)])
    io.save_checkpoint(state(2), tmp_path / "ck" / "last.ckpt")
    with pytest.raises(SaveFailedError):
        io.teardown()
    assert not (tmp_path / "ck" / "last.ckpt").exists()


def test_remove_releases_a_step_only_when_no_pointer_names_it(tmp_path: Path) -> None:
    io = MirrorCheckpointIO([str(tmp_path / "r")], keep_last=1)
    ck = tmp_path / "ck"
    io.save_checkpoint(state(3), ck / "a.ckpt")
    io.save_checkpoint(state(3), ck / "b.ckpt")
    io.save_checkpoint(state(6), ck / "c.ckpt")
    io.wait()
    # keep_last=1 would drop step 3 after step 6 committed; the pointers pin it.
    assert io.mirror.steps() == [3, 6]
    io.remove_checkpoint(ck / "a.ckpt")
    io.wait()
    assert io.mirror.steps() == [3, 6] and not (ck / "a.ckpt").exists()  # b.ckpt still names step 3
    io.remove_checkpoint(ck / "b.ckpt")
    io.wait()
    assert io.mirror.steps() == [6]
    io.remove_checkpoint(ck / "missing.ckpt")  # nothing there: nothing happens
    io.teardown()

    # A new process (a new plugin) learns the pointers in the directory before releasing a step.
    io2 = MirrorCheckpointIO([str(tmp_path / "r")])
    io2.save_checkpoint(state(9), ck / "d.ckpt")
    io2.save_checkpoint(state(9), ck / "c.ckpt")  # c.ckpt moves from step 6 to step 9
    io2.wait()
    assert io2.mirror.steps() == [9]
    io2.teardown()


def test_release_interrupted_by_a_crash_is_finished_by_the_next_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = tmp_path / "ck"
    io = MirrorCheckpointIO([str(tmp_path / "r1"), str(tmp_path / "r2")])
    io.save_checkpoint(state(3), ck / "a.ckpt")
    io.save_checkpoint(state(6), ck / "b.ckpt")
    io.wait()
    # The process "dies" right after the pointer went and before the step was deleted.
    with monkeypatch.context() as m:
        m.setattr(MirrorCheckpointIO, "_release", lambda self, step: None)
        io.remove_checkpoint(ck / "a.ckpt")
    markers = [p.name for p in ck.iterdir() if p.name.startswith(".")]
    assert markers == [".ckptmirror-release-000000000003.json"]
    assert json.loads((ck / markers[0]).read_text())["step"] == 3
    assert io.mirror.steps() == [3, 6]
    io.teardown()

    (ck / f".b.ckpt.tmp-{'0' * 32}").write_text('{"torn": ')  # a pointer write cut short by the crash
    io2 = MirrorCheckpointIO([str(tmp_path / "r1"), str(tmp_path / "r2")])
    assert io2.load_checkpoint(ck / "b.ckpt")["global_step"] == 6  # scans the directory
    io2.wait()
    assert io2.mirror.steps() == [6]
    assert [p.name for p in ck.iterdir()] == ["b.ckpt"]
    io2.teardown()


def test_weights_only_and_full_saves_of_one_step(tmp_path: Path) -> None:
    saved: list[int] = []
    io = MirrorCheckpointIO([str(tmp_path / "r")], on_saved=lambda h: saved.append(h.step))
    ck = tmp_path / "ck"
    io.save_checkpoint(state(4), ck / "full.ckpt")
    io.save_checkpoint(state(4, weights_only=True), ck / "weights.ckpt")
    io.wait()
    assert saved == [4]  # stored once, in full
    assert "optimizer_states" not in io.load_checkpoint(ck / "weights.ckpt")  # as that save held it
    assert "optimizer_states" in io.load_checkpoint(ck / "full.ckpt")
    # The other order: weights first, then the full checkpoint of the same step is stored again.
    io.save_checkpoint(state(7, weights_only=True), ck / "w7.ckpt")
    io.save_checkpoint(state(7), ck / "f7.ckpt")
    io.wait()
    assert saved == [4, 7, 7]
    assert "optimizer_states" in io.load_checkpoint(ck / "f7.ckpt")
    assert "optimizer_states" not in io.load_checkpoint(ck / "w7.ckpt")
    io.teardown()


class StopAt(L.Callback):
    """At the start of step ``at`` (its save of step ``at`` is issued and blocked in its commit),
    runs ``check`` (a stand-in for a crash: what a resume would find now), then lets the commit go."""

    def __init__(self, at: int, check: Any, release: threading.Event) -> None:
        self.at, self.check, self.release = at, check, release
        self.result: Any = None
        self.error: BaseException | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.at:
            return
        try:
            self.result = self.check()
        except BaseException as exc:  # noqa: BLE001 - raised by the test, after fit
            self.error = exc
        finally:
            self.release.set()


def test_last_ckpt_advances_while_saves_overlap_and_releases_what_it_left(tmp_path: Path) -> None:
    """Each save slower than a training step (every step saved, last.ckpt only): every commit
    moves last.ckpt to its step, although the next step's save names last.ckpt again before it;
    the step it leaves is released (keep_last=1 deletes it), not pinned for good."""
    gate_step = 6
    release = threading.Event()

    def on_phase(phase: str, key: str) -> None:
        if phase != "commit":
            return
        if key.startswith(f"step-{gate_step:012d}/"):
            assert release.wait(60)  # a save in flight when the process "dies"
        else:
            time.sleep(0.05)  # slower than a training step of this model

    r = tmp_path / "r"
    io = MirrorCheckpointIO([FaultyReplica(LocalReplica(str(r)), on_phase=on_phase)], keep_last=1)
    ck = tmp_path / "ck"

    def at_crash() -> tuple[int, list[int]]:
        # Committed: 1..5 (step 6 is held in its commit). A resume now must find step 5.
        step = wait_until(lambda: (ck / "last.ckpt").exists() and read_pointer(ck / "last.ckpt")["step"] == 5,
                          timeout=5, what="last.ckpt naming step 5")  # fmt: skip
        steps = wait_until(lambda: (s := Mirror([str(r)]).steps()) == [5] and s, timeout=5, what="steps 1-4 released")
        return step, steps

    stop = StopAt(gate_step, at_crash, release)
    t = L.Trainer(
        max_steps=8,
        accelerator="cpu",
        plugins=[io],
        callbacks=[ModelCheckpoint(dirpath=ck, every_n_train_steps=1, save_top_k=0, save_last=True), stop],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t.fit(Tiny(), loader())
    if stop.error is not None:
        raise stop.error
    assert stop.result is not None
    assert [p.name for p in ck.iterdir()] == ["last.ckpt"] and read_pointer(ck / "last.ckpt")["step"] == 8
    assert io.mirror.steps() == [8]  # nothing left pinned: keep_last=1 and last.ckpt alone name steps
    io.teardown()


def test_pointer_order_follows_the_calls_and_a_failed_save_keeps_the_previous_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Done callbacks run on threads of their own: when a later save's runs first, the earlier
    save's commit does not move the pointer back. A save that fails leaves the pointer where it was."""
    replica, release, _ = gated_replica(tmp_path / "r")
    io = MirrorCheckpointIO([replica], max_inflight=2)
    handles: list[Any] = []
    monkeypatch.setattr(io, "_on_done", handles.append)  # run by hand below, in reverse order
    last, top = tmp_path / "ck" / "last.ckpt", tmp_path / "ck" / "top.ckpt"
    io.save_checkpoint(state(2), top)
    io.save_checkpoint(state(2), last)
    io.save_checkpoint(state(4), last)
    release.set()
    io.mirror.wait()
    assert [h.step for h in handles] == [2, 4] and not top.exists() and not last.exists()
    MirrorCheckpointIO._on_done(io, handles[1])
    assert read_pointer(last)["step"] == 4 and not top.exists()
    MirrorCheckpointIO._on_done(io, handles[0])
    assert read_pointer(last)["step"] == 4 and read_pointer(top)["step"] == 2
    monkeypatch.undo()
    io.wait()
    assert io.mirror.steps() == [2, 4]  # top.ckpt names step 2
    io.teardown()

    def fail_step_6(phase: str, key: str) -> None:
        if phase == "commit" and key.startswith(f"step-{6:012d}/"):
            raise ReplicaError("injected commit failure", replica="r", key=key)

    io2 = MirrorCheckpointIO([FaultyReplica(LocalReplica(str(tmp_path / "r")), on_phase=fail_step_6)])
    io2.save_checkpoint(state(6), last)
    with pytest.raises(SaveFailedError):
        io2.teardown()
    assert read_pointer(last)["step"] == 4


def test_resume_from_the_first_checkpoint_overwrites_last_ckpt_as_lightning_does(tmp_path: Path) -> None:
    """The first save of a run (the top-k file) holds ModelCheckpoint's last_model_path == ""; the
    last.ckpt save of that step names last.ckpt. A resume from last.ckpt must see the latter (the
    pointer carries it), so that Lightning overwrites last.ckpt, as with its own checkpoints,
    instead of starting last-v1.ckpt and leaving last.ckpt at the old step."""

    def run(ck: Path, io: MirrorCheckpointIO | None) -> None:
        for max_steps, ckpt_path in ((3, None), (7, "last")):
            plugins = [io] if io is not None else []
            L.Trainer(
                max_steps=max_steps,
                accelerator="cpu",
                plugins=plugins,
                callbacks=[
                    ModelCheckpoint(
                        dirpath=ck, every_n_train_steps=3, save_top_k=2, monitor="step", mode="max", save_last=True
                    )
                ],  # fmt: skip
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            ).fit(Tiny(), loader(), ckpt_path=ckpt_path, weights_only=False)
            if io is not None:
                io.teardown()

    native, ours = tmp_path / "native", tmp_path / "ours"
    run(native, None)
    io = MirrorCheckpointIO([str(tmp_path / "r")])
    run(ours, io)
    names = sorted(p.name for p in ours.iterdir())
    assert (
        names == sorted(p.name for p in native.iterdir()) == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    )
    assert torch.load(native / "last.ckpt", weights_only=False)["global_step"] == 6
    assert read_pointer(ours / "last.ckpt")["step"] == 6
    # What the resume saw: the callback state of last.ckpt's own save.
    loaded = io.load_checkpoint(ours / "last.ckpt")
    (mc_state,) = loaded["callbacks"].values()
    assert mc_state["last_model_path"] == str(ours / "last.ckpt")
    io.teardown()


def test_callbacks_delta_round_trip() -> None:
    stored = {"best_k_models": {"b.ckpt": torch.tensor(2.0), "a.ckpt": torch.tensor(1.0)}, "last_model_path": "",
              "kth_value": torch.tensor(float("inf")), "big": torch.zeros(1000), "t": (1, "x")}  # fmt: skip
    call = {**stored, "last_model_path": "last.ckpt", "kth_value": torch.tensor(1.5, dtype=torch.bfloat16),
            "big": torch.ones(1000), "extra": [None, True, 3]}  # fmt: skip
    delta = callbacks_delta(encode_callbacks({"MC": stored}), encode_callbacks({"MC": call, "Other": {"n": 1}}))
    # Only what differs and can be written as JSON ("big" cannot: the stored value loads).
    assert set(delta) == {"MC", "Other"} and set(delta["MC"]) == {"last_model_path", "kth_value", "extra"}
    delta = json.loads(json.dumps(delta))  # as a pointer holds it
    out = apply_callbacks({"callbacks": {"MC": dict(stored)}, "x": 1}, delta)
    mc = out["callbacks"]["MC"]
    assert mc["last_model_path"] == "last.ckpt" and mc["extra"] == [None, True, 3] and mc["t"] == (1, "x")
    assert mc["kth_value"].dtype == torch.bfloat16 and mc["kth_value"].item() == 1.5
    assert list(mc["best_k_models"]) == ["b.ckpt", "a.ckpt"] and mc["big"] is stored["big"]
    assert out["callbacks"]["Other"] == {"n": 1} and out["x"] == 1


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Inner:
    path: Path
    color: Color = Color.RED


Point = collections.namedtuple("Point", ["x", "y"])


def test_hyper_parameters_are_converted() -> None:
    hp = {
        "args": argparse.Namespace(lr=0.1, data=Path("/data"), nested=argparse.Namespace(k=1)),
        "inner": Inner(Path("/x/y")),
        "level": Level.HIGH,
        "tags": {"b", "a"},
        "pt": Point(1, 2),
        "by_color": {Color.RED: 1},
        "t": torch.ones(2),
        "dtype": torch.float16,
    }
    out = storable_hparams(hp)
    assert out["args"] == {"lr": 0.1, "data": "/data", "nested": {"k": 1}}
    assert out["inner"] == {"path": "/x/y", "color": "red"}
    assert out["level"] == 3 and type(out["level"]) is int
    assert out["tags"] == ["a", "b"]
    assert out["pt"] == {"x": 1, "y": 2}
    assert out["by_color"] == {"red": 1}
    assert torch.equal(out["t"], torch.ones(2)) and out["dtype"] is torch.float16
    with pytest.raises(UnsupportedTypeError, match=r"checkpoint\['hyper_parameters'\]\['x'\]\[0\]"):
        storable_hparams({"x": [object()]})


def test_unconvertible_hyper_parameter_names_its_path_and_how_to_exclude_it(tmp_path: Path) -> None:
    io = MirrorCheckpointIO([str(tmp_path / "r")])
    t = trainer(io, tmp_path / "ck", 4)
    with pytest.warns(UserWarning), pytest.raises(UnsupportedTypeError) as info:
        t.fit(Tiny(loss_fn=torch.nn.MSELoss()), loader())  # an nn.Module as a hyper-parameter
    msg = str(info.value)
    assert "checkpoint['hyper_parameters']['loss_fn']" in msg
    assert "save_hyperparameters(ignore=['loss_fn'])" in msg
    assert not (tmp_path / "ck").exists() or not list((tmp_path / "ck").iterdir())


def test_load_refuses_a_pickle_and_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    native = tmp_path / "native.ckpt"
    torch.save({"state_dict": {}}, native)

    def forbidden(*a: Any, **k: Any) -> Any:
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    monkeypatch.setattr("pickle.loads", forbidden)
    io = MirrorCheckpointIO([str(tmp_path / "r")])
    with pytest.raises(PointerError, match="TorchCheckpointIO"):
        io.load_checkpoint(native)
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "absent.ckpt")
    io.remove_checkpoint(native)  # not ours: left alone
    assert native.exists()
    io.teardown()


def test_options_and_import_isolation() -> None:
    with pytest.raises(ValueError, match="rank 0"):
        MirrorCheckpointIO(["/tmp/x"], distributed=True)
    code = (
        "import sys, ckptmirror, ckptmirror.integrations; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
        "'lightning_fabric')); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_ddp_saves_from_rank_zero_and_every_rank_resumes(tmp_path: Path, runs: ForkServer) -> None:
    """DDP on CPU (2 processes, gloo): rank 0 alone saves through its private mirror; a second
    job resumes from last.ckpt on both ranks, which end with the same weights."""
    run = tmp_path / "run"
    cfg = mirror_cfg(max_steps=7, devices=2, strategy="ddp")
    first = finish(start(runs, cfg, run, "ddp_first"))
    assert first is not None and first["started_at"] == 0
    assert read_pointer(run / "ck" / "last.ckpt")["step"] == 6
    second = finish(start(runs, {**cfg, "max_steps": 10}, run, "ddp_resume"))
    other = json.loads((tmp_path / "ddp_resume.out.json.rank1").read_text())
    assert second is not None and second["started_at"] == other["started_at"] == 6
    assert second["global_step"] == other["global_step"] == 10
    assert second["model"] == other["model"]
    assert sorted(read_pointer(p)["step"] for p in (run / "ck").iterdir()) == [6, 9, 9]
    with Mirror([str(run / "rA"), str(run / "rB")]) as m:
        assert m.replica_steps() == {str(run / "rA"): [6, 9], str(run / "rB"): [6, 9]}
    result = verify(run)
    assert result.returncode == 0, result.stdout + result.stderr
