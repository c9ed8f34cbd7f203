"""The Hugging Face Trainer integration (ckptmirror.integrations.transformers), with the real
transformers on the CPU and a tiny random-initialised GPT-2 (tests/_hf_child.py).

The proof: a run that saves through MirrorCallback is killed with ``os._exit`` after two saves;
one replica is corrupted; a new process materializes the newest verified step from the other
replica and resumes through HF's own ``resume_from_checkpoint``. Its final weights are bit for
bit those of an uninterrupted run (HF's own resume is bit-exact on this run too, so the
uninterrupted run is the reference), and the materialized ``checkpoint-8`` holds what HF's own
``checkpoint-8`` holds. The replicas hold no pickle and pass ``ckptmirror verify``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers", reason="the [transformers] extra is not installed")

import torch  # noqa: E402
from _helpers import REPO, Forked, ForkServer, assert_bit_exact, files_under  # noqa: E402

import ckptmirror  # noqa: E402
from ckptmirror.integrations.transformers import FORMAT, MARKER, MirrorCallback, materialize  # noqa: E402

CHILD = str(Path(__file__).with_name("_hf_child.py"))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1",
           CUBLAS_WORKSPACE_CONFIG=":4096:8")  # fmt: skip
#: On a GPU the run is fp16 (HF adds a grad scaler: scaler.pt) with HF's full_determinism.
DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Forked | subprocess.Popen[str]]]:
    """``child(*args)`` starts ``python _hf_child.py ARGS`` (env ENV, cwd the repository). On the
    CPU it is forked from a server that imported the child's modules (transformers' Trainer,
    GPT-2) once: seconds of CPU a child would otherwise spend on its imports each time. A
    ``--cuda`` child is a fresh interpreter (CUDA and fork do not mix)."""
    base = tmp_path_factory.mktemp("hf-children")
    server = ForkServer(["_hf_child"], base / "server.log", env=ENV)
    n = iter(range(1 << 30))

    def start(*args: str) -> Forked | subprocess.Popen[str]:
        if "--cuda" in args:
            return subprocess.Popen(
                [sys.executable, CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                cwd=REPO,
            )  # fmt: skip
        i = next(n)
        return server.popen([CHILD, *args], REPO, base / f"{i}.out", base / f"{i}.err")

    yield start
    server.close()


def finish(p: Forked | subprocess.Popen[str], rc: int = 0, timeout: float = 240) -> dict[str, Any]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
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


def corrupt_step(root: Path, step: int) -> int:
    """Flip one byte in every object of ``step`` (sizes unchanged: only checksums catch it)."""
    n = 0
    for p in root.glob(f"step-{step:012d}/rank-*/*.bin"):
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x20
        p.write_bytes(bytes(data))
        n += 1
    assert n, f"no objects of step {step} under {root}"
    return n


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
def test_crash_resume_is_bit_exact_and_hf_layout(
    tmp_path: Path, device: str, child: Callable[..., Forked | subprocess.Popen[str]]
) -> None:
    ra, rb = tmp_path / "replica-a", tmp_path / "replica-b"
    replicas = f"{ra},{rb}"
    dev = ["--cuda"] if device == "cuda" else []
    # The crashing run and HF's own uninterrupted run (which also writes HF's checkpoint-8, for
    # the layout comparison) side by side.
    crash = child("crash", "--replicas", replicas, "--out", str(tmp_path / "run"), "--crash-at", "10", *dev)
    ref = child("native", "--out", str(tmp_path / "ref"), "--weights", str(tmp_path / "ref.safetensors"), *dev)
    assert finish(crash, rc=17) == {"crashed_at": 10}
    assert finish(ref)["global_step"] == 15

    with ckptmirror.Mirror([str(ra), str(rb)], distributed=False) as m:
        assert m.replica_steps() == {str(ra): [4, 8], str(rb): [4, 8]}
    for r in (ra, rb):
        assert_no_pickle(r)
    v = verify(ra, rb)
    assert v.returncode == 0, v.stdout + v.stderr

    # A replica corrupted before the resume: the newest step still comes back, from the other.
    corrupt_step(ra, 8)
    assert verify(ra).returncode != 0

    res = finish(child("resume", "--replicas", replicas, "--out", str(tmp_path / "run"),
                       "--weights", str(tmp_path / "resumed.safetensors"), *dev))  # fmt: skip
    assert res["resumed_from"] == str(tmp_path / "run" / "checkpoint-8")
    assert res["global_step"] == 15
    assert "training_args.bin" not in res["files"]
    if device == "cuda":
        assert "scaler.pt" in res["files"]
        # HF's own resume from its own checkpoint-8 first (the reference where a framework is
        # not bit-exact against an uninterrupted run), then the uninterrupted run.
        native = ["--from-checkpoint", str(tmp_path / "ref" / "checkpoint-8"), "--out", str(tmp_path / "nat")]
        finish(child("resume", *native, "--weights", str(tmp_path / "native.safetensors"), *dev))
        assert_bit_exact(
            load_weights(tmp_path / "resumed.safetensors"), load_weights(tmp_path / "native.safetensors"), "w"
        )
    assert_bit_exact(load_weights(tmp_path / "resumed.safetensors"), load_weights(tmp_path / "ref.safetensors"), "w")

    # The materialized directory holds what HF's own checkpoint-8 holds.
    ours, hf = tmp_path / "run" / "checkpoint-8", tmp_path / "ref" / "checkpoint-8"
    assert sorted(os.listdir(ours)) == sorted(set(os.listdir(hf)) - {"training_args.bin"} | {MARKER})
    assert_bit_exact(load_weights(ours / "model.safetensors"), load_weights(hf / "model.safetensors"), "model")
    from transformers.trainer_pt_utils import safe_globals

    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth") + (("scaler.pt",) if device == "cuda" else ()):
        with safe_globals():  # as HF reads them: the restricted weights_only unpickler
            assert_bit_exact(torch.load(ours / name, weights_only=True), torch.load(hf / name, weights_only=True), name)
    for name in ("config.json", "generation_config.json"):
        assert (ours / name).read_text() == (hf / name).read_text(), name
    a, b = json.loads((ours / "trainer_state.json").read_text()), json.loads((hf / "trainer_state.json").read_text())
    # Differences by design: save_steps is the TrainingArguments' (HF's saving is off), and HF
    # records its control with should_save set (it is saving); the rest (log history, flos,
    # epoch) is identical.
    for d in (a, b):
        d.pop("save_steps")
        d["stateful_callbacks"]["TrainerControl"]["args"].pop("should_save")
    assert a == b

    # The resumed run saved on: steps 12 and 15 (the last step) on both replicas.
    with ckptmirror.Mirror([str(ra), str(rb)], distributed=False) as m:
        assert m.replica_steps() == {str(ra): [4, 8, 12, 15], str(rb): [4, 8, 12, 15]}
    for r in (ra, rb):
        assert_no_pickle(r)


# ------------------------------------------------------------------------ materialize
def synthetic_step(replica: Path, step: int) -> None:
    """A step with MirrorCallback's layout, saved without a Trainer (fast unit tests)."""
    import random

    import numpy as np

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {
        "format": FORMAT,
        "model": net.state_dict(),
        "tied": {},
        "config": None,
        "generation_config": None,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 0,
        },  # fmt: skip
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
        "trainer_state": json.dumps({"global_step": step}) + "\n",
    }
    with ckptmirror.Mirror([str(replica)], distributed=False) as m:
        m.save_state(step, state)


def test_materialize_fresh_run_returns_none(tmp_path: Path) -> None:
    assert materialize([str(tmp_path / "empty")], tmp_path / "out") is None
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_materialize_layout_replace_and_cleanup(tmp_path: Path) -> None:
    rep, out = tmp_path / "rep", tmp_path / "out"
    synthetic_step(rep, 3)
    p3 = materialize([str(rep)], out)
    assert p3 == str(out / "checkpoint-3")
    assert sorted(os.listdir(p3)) == [
        MARKER, "model.safetensors", "optimizer.pt", "rng_state.pth", "scaler.pt", "scheduler.pt", "trainer_state.json"
    ]  # fmt: skip
    assert json.loads((out / "checkpoint-3" / MARKER).read_text())["step"] == 3
    # Materializing again replaces its own directory; a newer step removes the older copy.
    assert materialize([str(rep)], out) == p3
    synthetic_step(rep, 5)
    (out / ".ckptmirror-tmp-checkpoint-5-deadbeef").mkdir()  # as an interrupted materialize leaves it
    assert materialize([str(rep)], out) == str(out / "checkpoint-5")
    assert sorted(os.listdir(out)) == ["checkpoint-5"]  # no temp or stale directories left
    # An explicit older step.
    assert materialize([str(rep)], out, step=3) == p3
    with pytest.raises(ckptmirror.StepNotFoundError):
        materialize([str(rep)], out, step=4)


def test_materialize_never_overwrites_an_hf_checkpoint(tmp_path: Path) -> None:
    rep, out = tmp_path / "rep", tmp_path / "out"
    synthetic_step(rep, 3)
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"HF's own")
    with pytest.raises(FileExistsError, match="not written by ckptmirror"):
        materialize([str(rep)], out)
    assert (out / "checkpoint-3" / "model.safetensors").read_bytes() == b"HF's own"
    assert sorted(os.listdir(out)) == ["checkpoint-3"]


def test_materialize_refuses_a_step_it_did_not_write(tmp_path: Path) -> None:
    with ckptmirror.Mirror([str(tmp_path / "rep")]) as m:
        m.save_state(1, {"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="not saved by ckptmirror.integrations.transformers"):
        materialize([str(tmp_path / "rep")], tmp_path / "out")


def test_callback_arguments_and_scope() -> None:
    from ckptmirror.integrations.transformers import _check_supported

    with pytest.raises(ValueError, match="save_steps"):
        MirrorCallback(["memory://x"], save_steps=0)
    with pytest.raises(ValueError, match="distributed"):
        MirrorCallback(["memory://x"], save_steps=5, distributed=True)

    class Args:
        world_size = 2

    with pytest.raises(NotImplementedError, match="one training process"):
        _check_supported(Args(), None)


def test_importing_ckptmirror_imports_no_framework() -> None:
    code = (
        "import sys, ckptmirror, ckptmirror.integrations; "
        "bad = [m for m in ('transformers', 'accelerate', 'lightning', 'pytorch_lightning') if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------- evaluation on a save step
def _timeless(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``log_history`` without the wall-clock entries (runtime, throughput) that differ run to run."""
    return [{k: v for k, v in e.items() if not k.endswith(("_runtime", "_per_second"))} for e in history]


def test_resume_is_bit_exact_when_evaluation_runs_on_a_save_step(
    tmp_path: Path, child: Callable[..., Forked | subprocess.Popen[str]]
) -> None:
    """eval_steps == save_steps == logging_steps: after ``on_step_end`` HF logs the step and
    evaluates (the eval DataLoader's iterator draws from the torch RNG; log_history, best_metric
    and EarlyStoppingCallback change), then writes its own checkpoint. A snapshot taken at
    ``on_step_end`` resumes with another torch RNG state and without that step's evaluation: the
    resumed run then drifts from the uninterrupted one. MirrorCallback saves where HF would."""
    ra, run, ref = tmp_path / "replica", tmp_path / "run", tmp_path / "ref"
    ev = ["--eval-steps", "4", "--logging-steps", "4"]
    crash = child("crash", "--replicas", str(ra), "--out", str(run), "--crash-at", "10", *ev)
    native = child("native", "--out", str(ref), "--weights", str(tmp_path / "ref.safetensors"), *ev)
    assert finish(crash, rc=17) == {"crashed_at": 10}
    assert finish(native)["global_step"] == 15
    with ckptmirror.Mirror([str(ra)], distributed=False) as m:
        assert m.steps() == [4, 8]  # one save per save step, evaluation or not

    res = finish(child("resume", "--replicas", str(ra), "--out", str(run),
                       "--weights", str(tmp_path / "resumed.safetensors"), *ev))  # fmt: skip
    assert res["resumed_from"] == str(run / "checkpoint-8")
    assert res["still_wrapped"] is False

    # The materialized checkpoint-8 holds what HF's own checkpoint-8 holds: the RNG state after
    # the step's evaluation, and a trainer state with that evaluation in it.
    ours, hf = run / "checkpoint-8", ref / "checkpoint-8"
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():
        assert_bit_exact(
            torch.load(ours / "rng_state.pth", weights_only=True),
            torch.load(hf / "rng_state.pth", weights_only=True),
            "rng_state.pth",
        )
    a, b = json.loads((ours / "trainer_state.json").read_text()), json.loads((hf / "trainer_state.json").read_text())
    for d in (a, b):
        d["log_history"] = _timeless(d["log_history"])
    hf_eval = [e for e in b["log_history"] if e["step"] == 8 and "eval_loss" in e]
    assert len(hf_eval) == 1, b["log_history"]
    assert [e for e in a["log_history"] if e["step"] == 8 and "eval_loss" in e] == hf_eval
    assert any(e["step"] == 8 and "loss" in e for e in a["log_history"])  # the step's loss log too
    assert a["best_metric"] is not None
    # EarlyStoppingCallback (after MirrorCallback in the list) has counted step 8's evaluation.
    counter = a["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"]
    assert counter == 1
    # Differences by design: HF's own saving (save_strategy="steps") also records which of its
    # checkpoints is the best; with save_strategy="no" neither run has one. See the first test
    # for save_steps and should_save.
    for d in (a, b):
        d.pop("save_steps")
        d["stateful_callbacks"]["TrainerControl"]["args"].pop("should_save")
    assert (b.pop("best_global_step"), b.pop("best_model_checkpoint")) == (8, str(hf))
    assert (a.pop("best_global_step"), a.pop("best_model_checkpoint")) == (None, None)
    assert a == b

    assert_bit_exact(load_weights(tmp_path / "resumed.safetensors"), load_weights(tmp_path / "ref.safetensors"), "w")
    # Steps 12 and 15 (the last, evaluated at the end) saved once each.
    with ckptmirror.Mirror([str(ra)], distributed=False) as m:
        assert m.steps() == [4, 8, 12, 15]


def test_a_wrapper_left_by_a_failed_train_is_unwrapped_by_the_next_callback(tmp_path: Path) -> None:
    # A train() that raised never reached on_train_end: its callback's wrapper stayed on the
    # Trainer. A new callback takes HF's own method back, not the old wrapper (which would keep
    # the old callback and its mirror alive and save twice).
    from ckptmirror.integrations.transformers import MirrorCallback

    class FakeTrainer:
        def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> str:
            return "hf"

    t = FakeTrainer()
    old, new = MirrorCallback([str(tmp_path)], save_steps=1), MirrorCallback([str(tmp_path)], save_steps=1)
    assert old._hook(t) and old._hook(t)  # the same callback again: left as it is
    assert t._maybe_log_save_evaluate._ckptmirror_callback is old  # type: ignore[attr-defined]
    assert new._hook(t)
    wrapper = t._maybe_log_save_evaluate
    assert wrapper._ckptmirror_callback is new  # type: ignore[attr-defined]
    assert wrapper.__wrapped__.__func__ is FakeTrainer._maybe_log_save_evaluate  # type: ignore[attr-defined]
    assert wrapper() == "hf"
    new._unhook(t)
    assert "_maybe_log_save_evaluate" not in vars(t)
