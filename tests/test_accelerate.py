"""The Accelerate integration (ckptmirror.integrations.accelerate.MirrorState), with the real
accelerate on the CPU and a tiny MLP (tests/_accelerate_child.py).

The proof: a loop that saves through ``MirrorState.save`` is killed with ``os._exit`` after
three saves; one replica is corrupted; a new process ``load()``s the newest verified step from the
other replica and trains on. Its final weights (and the registered object's running loss sum)
are bit for bit those of an uninterrupted run (Accelerate's own ``load_state`` resume is
bit-exact on this loop too). The replicas hold no pickle and pass ``ckptmirror verify``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("accelerate", reason="the [accelerate] extra is not installed")

import torch  # noqa: E402
from _helpers import REPO, assert_bit_exact, files_under, snapshot, torchrun, torchrun_start  # noqa: E402

import ckptmirror  # noqa: E402
from ckptmirror.integrations.accelerate import MirrorState  # noqa: E402

CHILD = str(Path(__file__).with_name("_accelerate_child.py"))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
#: On a GPU the loop runs in fp16 (a grad scaler) with deterministic algorithms.
DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


# ------------------------------------------------------------------------------ helpers
def child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO
    )


def finish(p: subprocess.Popen[str], rc: int = 0, timeout: float = 240) -> dict[str, Any]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == rc, f"child exited {p.returncode}, expected {rc}:\n{out[-2000:]}\n{err[-4000:]}"
    return dict(json.loads(out.strip().splitlines()[-1]))


def assert_no_pickle(root: Path) -> None:
    """Every file of a replica is ckptmirror's format: JSON records, or raw object bytes that are
    neither a pickle (protocol 2+ header) nor a torch.save zip."""
    names = files_under(root)
    assert names, f"nothing under {root}"
    for name in names:
        data = (root / name).read_bytes()
        assert not name.endswith((".pt", ".pth", ".pkl", ".pickle")), name
        if name.endswith(".json"):
            json.loads(data)
            continue
        assert name.endswith(".bin") and "/rank-" in f"/{name}", f"unexpected file {name}"
        assert not data.startswith(b"PK\x03\x04"), f"{name} is a zip archive (torch.save?)"
        assert not (data[:1] == b"\x80" and 2 <= data[1] <= 5), f"{name} starts like a pickle"


def corrupt_step(root: Path, step: int) -> None:
    """Flip one byte in every object of ``step`` (sizes unchanged: only checksums catch it)."""
    objs = list(root.glob(f"step-{step:012d}/rank-*/*.bin"))
    assert objs, f"no objects of step {step} under {root}"
    for p in objs:
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x20
        p.write_bytes(bytes(data))


def verify(*replicas: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptmirror", "verify", "--no-progress", *map(str, replicas)],
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120,
    )  # fmt: skip


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# -------------------------------------------------------------------------- the proof
@pytest.mark.parametrize("device", DEVICES)
def test_crash_resume_is_bit_exact(tmp_path: Path, device: str) -> None:
    ra, rb = tmp_path / "replica-a", tmp_path / "replica-b"
    replicas = f"{ra},{rb}"
    dev = ["--cuda"] if device == "cuda" else []
    crash = child("crash", "--replicas", replicas, "--project", str(tmp_path / "p1"), "--crash-at", "14", *dev)
    ref = child("reference", "--project", str(tmp_path / "p2"), "--weights", str(tmp_path / "ref.safetensors"), *dev)
    assert finish(crash, rc=17) == {"crashed_at": 14}
    expected = finish(ref)

    with ckptmirror.Mirror([str(ra), str(rb)], distributed=False) as m:
        assert m.replica_steps() == {str(ra): [4, 8, 12], str(rb): [4, 8, 12]}
    for r in (ra, rb):
        assert_no_pickle(r)
    v = verify(ra, rb)
    assert v.returncode == 0, v.stdout + v.stderr
    # Nothing else was written: MirrorState does not use save_state's project directory.
    assert not (tmp_path / "p1" / "checkpoints").exists()

    corrupt_step(ra, 12)  # the newest step, on the replica restore tries first
    res = finish(child("resume", "--replicas", replicas, "--project", str(tmp_path / "p3"),
                       "--weights", str(tmp_path / "resumed.safetensors"), *dev))  # fmt: skip
    # Step 12 = 12 batches: the third save, so save_state's numbering goes on at 3.
    assert (res["resumed_from"], res["progress"], res["iteration"]) == (12, 12, 3)
    assert res["scaler"] == (device == "cuda")
    if device == "cuda":
        # Accelerate's own save_state/load_state resume from the same batch first (the reference
        # where a framework is not bit-exact against an uninterrupted run), then the uninterrupted run.
        nat = tmp_path / "native"
        finish(child("native", "--project", str(nat), "--crash-at", "14", *dev), rc=17)
        finish(child("native", "--resume-native", "--project", str(nat), "--weights", str(tmp_path / "nat.safetensors"),
                     *dev))  # fmt: skip
        assert_bit_exact(
            load_weights(tmp_path / "resumed.safetensors"), load_weights(tmp_path / "nat.safetensors"), "w"
        )
    assert (res["batches"], res["loss_sum"]) == (expected["batches"], expected["loss_sum"])
    assert_bit_exact(load_weights(tmp_path / "resumed.safetensors"), load_weights(tmp_path / "ref.safetensors"), "w")
    with ckptmirror.Mirror([str(rb)], distributed=False) as m:
        assert m.steps() == [4, 8, 12, 16, 20, 24, 28]
    assert_no_pickle(rb)


def test_ddp_two_processes_crash_resume_is_bit_exact(tmp_path: Path) -> None:
    """The same under torchrun: two CPU processes (gloo DDP), each saving its own part (its RNG
    states differ); the step commits once both parts are durable and both load it back."""
    ra, rb = tmp_path / "replica-a", tmp_path / "replica-b"
    replicas = f"{ra},{rb}"
    # The uninterrupted reference shares nothing with the other jobs: it runs alongside them.
    reference = torchrun_start(
        CHILD, "reference", "--project", str(tmp_path / "p2"), "--weights", str(tmp_path / "ref.safetensors")
    )
    try:
        # 40 samples, 2 processes: 5 batches per process and epoch, 15 in all.
        crash = torchrun(CHILD, "crash", "--replicas", replicas, "--project", str(tmp_path / "p1"), "--crash-at",
                         "14", check=False)  # fmt: skip
        assert crash.returncode != 0 and '"crashed_at": 14' in crash.stdout, crash.stdout + crash.stderr[-3000:]
        with ckptmirror.Mirror([str(ra), str(rb)], distributed=False) as m:
            assert m.steps() == [4, 8, 12]
        assert len(list((ra / "step-000000000012").glob("rank-*.json"))) == 2  # one manifest per process
        assert_no_pickle(ra)
        corrupt_step(ra, 12)
        res = torchrun(CHILD, "resume", "--replicas", replicas, "--project", str(tmp_path / "p3"),
                       "--weights", str(tmp_path / "resumed.safetensors"))  # fmt: skip
        ref = reference.result()
    finally:
        reference.kill()
    got, want = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (res, ref))
    assert (got["processes"], got["resumed_from"], got["progress"]) == (2, 12, 12)
    assert (got["batches"], got["loss_sum"]) == (want["batches"], want["loss_sum"])
    assert_bit_exact(load_weights(tmp_path / "resumed.safetensors"), load_weights(tmp_path / "ref.safetensors"), "w")


def test_ddp_resume_from_older_step_replaces_the_newer_ones(tmp_path: Path) -> None:
    """Two processes resume from step 4 (step 8 is damaged): on reaching step 8 every process
    deletes the old step 8, then they save it anew (Mirror refuses overwrite=True with several
    ranks; before the fix both processes raised StepExistsError here, on every restart)."""
    r = tmp_path / "replica"
    common = ("--replicas", str(r), "--epochs", "2")  # 5 batches per process and epoch: 10 in all
    crash = torchrun(CHILD, "crash", *common, "--project", str(tmp_path / "p1"), "--crash-at", "8", check=False)
    assert crash.returncode != 0 and '"crashed_at": 8' in crash.stdout, crash.stdout + crash.stderr[-3000:]
    corrupt_step(r, 8)
    step4 = {p: p.stat().st_mtime_ns for p in (r / "step-000000000004").rglob("*")}
    res = torchrun(CHILD, "resume", *common, "--project", str(tmp_path / "p2"))
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert (got["resumed_from"], got["batches"]) == (4, 10)
    assert "step 8 was committed by an earlier run" in res.stderr
    with ckptmirror.Mirror([str(r)], distributed=False) as m:
        assert m.steps() == [4, 8]
    v = verify(r)  # the damaged step 8 is gone: the new one verifies
    assert v.returncode == 0, v.stdout + v.stderr
    # The step resumed from was not touched.
    assert {p: p.stat().st_mtime_ns for p in (r / "step-000000000004").rglob("*")} == step4


# ---------------------------------------------------------------------- in process
@pytest.fixture
def accelerator() -> Iterator[Any]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    acc = Accelerator(
        cpu=True,
        gradient_accumulation_steps=2,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        project_config=ProjectConfiguration(total_limit=2),
    )
    yield acc
    AcceleratorState._reset_state(True)


class Box:
    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.value = sd["value"]


def prepared(acc: Any, seed: int) -> tuple[Any, ...]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2, shuffle=True)
    return acc.prepare(model, opt, dl, sched)


def test_roundtrip_in_process(tmp_path: Path, accelerator: Any) -> None:
    acc = accelerator
    model, opt, dl, sched = prepared(acc, 0)
    box = Box([1, 2.5, "x", (3, None)])
    acc.register_for_checkpointing(box)
    with MirrorState(acc, [str(tmp_path / "r")]) as ckpt:
        assert ckpt.mirror.keep_last == 2  # from project_configuration.total_limit
        assert ckpt.load() is None  # fresh run
        for (x,) in dl:
            with acc.accumulate(model):
                acc.backward(model(x).square().mean())
                opt.step()
                sched.step()
                opt.zero_grad()
        dl.set_epoch(3)
        saved = {
            "model": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "rng": torch.get_rng_state(),
        }
        acc_step, iteration = acc.step, acc.project_configuration.iteration
        ckpt.save()  # step = project_configuration.iteration
        assert acc.project_configuration.iteration == iteration + 1
        ckpt.wait()
        saved["opt"] = {"state": {k: {n: t.clone() for n, t in v.items()} for k, v in saved["opt"]["state"].items()},
                        "param_groups": saved["opt"]["param_groups"]}  # fmt: skip

        # Change everything, then load it back.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        opt.step()
        sched.step()
        box.value = "changed"
        dl.set_epoch(7)
        acc.step = 99
        acc.project_configuration.iteration = 42
        torch.manual_seed(123)
        assert ckpt.load() == iteration
    assert_bit_exact(model.state_dict(), saved["model"], "model")
    assert_bit_exact(opt.state_dict(), saved["opt"], "optimizer")
    assert sched.state_dict() == saved["sched"]
    assert_bit_exact(torch.get_rng_state(), saved["rng"], "rng")
    assert box.value == [1, 2.5, "x", (3, None)]
    assert (acc.step, acc.project_configuration.iteration, dl.iteration) == (acc_step, iteration + 1, 3)
    assert dl.get_sampler().epoch == 3


def test_mismatch_leaves_state_untouched(tmp_path: Path, accelerator: Any) -> None:
    acc = accelerator
    model, opt, dl, sched = prepared(acc, 0)
    with MirrorState(acc, [str(tmp_path / "r")]) as ckpt:
        ckpt.save(5)
    # One more registered object than the checkpoint holds: refused before anything is loaded.
    acc.register_for_checkpointing(Box(1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with MirrorState(acc, [str(tmp_path / "r")]) as ckpt:
        with pytest.raises(ckptmirror.StateMismatchError, match="holds 0 registered objects, this accelerator has 1"):
            ckpt.load()
    assert_bit_exact(model.state_dict(), before, "model")


def test_unsupported_value_names_its_key_path(tmp_path: Path, accelerator: Any) -> None:
    acc = accelerator
    prepared(acc, 0)
    acc.register_for_checkpointing(Box(lambda: 1))
    with MirrorState(acc, [str(tmp_path / "r")]) as ckpt:
        with pytest.raises(ckptmirror.UnsupportedTypeError, match=r"\['custom'\]\[0\]\['value'\]"):
            ckpt.save(1)
        assert ckpt.mirror.steps() == []


def test_registered_module_that_does_not_fit_leaves_state_untouched(tmp_path: Path, accelerator: Any) -> None:
    """A registered module (an EMA head) changed shape: refused before the model, the optimizer or
    the RNG is touched (it used to load them, then fail with a raw size-mismatch RuntimeError)."""
    acc = accelerator
    model, opt, dl, sched = prepared(acc, 0)
    ema = torch.nn.Linear(4, 4)
    acc.register_for_checkpointing(ema)
    with MirrorState(acc, [str(tmp_path / "r")]) as ckpt:
        ckpt.save(5)
    ema.weight.data, ema.bias.data = torch.zeros(5, 4), torch.zeros(5)  # now a Linear(4, 5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before, rng = snapshot(model, opt), torch.get_rng_state()
    with MirrorState(acc, [str(tmp_path / "r")]) as ckpt:
        with pytest.raises(ckptmirror.StateMismatchError, match=r"registered object 0 \(Linear\): weight is .*Fix"):
            ckpt.load()
    assert_bit_exact(snapshot(model, opt), before, "model and optimizer")
    assert_bit_exact(torch.get_rng_state(), rng, "rng")


class Fussy(Box):
    """A registered object that loads only a state of its own version (after it took its value)."""

    version = 1

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "version": self.version}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        if sd["version"] != self.version:
            raise ValueError(f"version {sd['version']}, expected {self.version}")


def test_failed_load_puts_everything_back(tmp_path: Path, accelerator: Any) -> None:
    """A registered object's load_state_dict raises: what was loaded before it (RNG, dataloader,
    another registered object, the object itself) is put back, the models and optimizers were not
    touched, and the error names the object at fault and the fix."""
    acc = accelerator
    model, opt, dl, sched = prepared(acc, 0)
    box, fussy = Box([1, 2]), Fussy("saved")
    acc.register_for_checkpointing(box)
    acc.register_for_checkpointing(fussy)
    with MirrorState(acc, [str(tmp_path / "r")]) as ckpt:
        ckpt.save(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    box.value, fussy.value, fussy.version = [3], "now", 2
    dl.set_epoch(7)
    acc.step = 9
    before, rng = snapshot(model, opt), torch.get_rng_state()
    sched_before = sched.state_dict()
    with MirrorState(acc, [str(tmp_path / "r")]) as ckpt:
        with pytest.raises(ckptmirror.StateMismatchError, match=r"registered object 1 \(Fussy\) failed \(ValueError.*"
                           r"as it was before load\(\)\. Fix: register_for_checkpointing"):  # fmt: skip
            ckpt.load()
    assert (box.value, fussy.value, dl.iteration, dl.get_sampler().epoch, acc.step) == ([3], "now", 7, 7, 9)
    assert_bit_exact(snapshot(model, opt), before, "model and optimizer")
    assert_bit_exact(torch.get_rng_state(), rng, "rng")
    assert sched.state_dict() == sched_before


def test_single_process_replaces_an_earlier_runs_step_once(tmp_path: Path, accelerator: Any) -> None:
    """A step committed before this MirrorState was created is replaced when saved again; one it
    saved itself is not."""
    acc = accelerator
    prepared(acc, 0)
    with MirrorState(acc, [str(tmp_path / "r")]) as ckpt:
        ckpt.save(4)
        ckpt.save(8)
    with MirrorState(acc, [str(tmp_path / "r")]) as ckpt:
        assert ckpt.load(step=4) == 4
        ckpt.save(8)  # the earlier run's step 8: replaced
        ckpt.wait()
        with pytest.raises(ckptmirror.StepExistsError):
            ckpt.save(8)  # this run's own step 8
        assert ckpt.mirror.steps() == [4, 8]
