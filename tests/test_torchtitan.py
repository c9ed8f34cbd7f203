"""torchtitan (0.3.0): MirrorCheckpointManager, driven directly and by torchtitan's own Trainer.

Skipped unless torchtitan is installed (``pip install 'ckptmirror[torchtitan]'``). Everything
runs on CPU, with a tokenizer and a text data set made here (nothing is downloaded):

- in this process, the manager built from its Config with torchtitan's real optimizer, LR
  scheduler and text dataloader around a tiny model: async saves at an interval, keep_last,
  a restart that resumes bit-exactly with pickle and torch.load made to raise, a fallback over
  a damaged newest step (whose step number is then saved again), a seed checkpoint (model
  only), torchtitan's initial_load_path from a plain DCP checkpoint, the Config's checks;
- torchtitan's Trainer (the Llama 3 debug model, FSDP2 over 2 ranks, gloo) under torchrun, as
  ``--module examples.torchtitan_mirror --config llama3_debugmodel_mirror`` with the
  checkpoint keys on the command line: one uninterrupted run, and one whose ranks SIGKILL
  themselves at step 5, launched again; the second launch loads step 4 and ends bit-exactly
  where the uninterrupted run does; ``ckptmirror verify`` passes on the replicas.
  This needs ``triton`` importable (torchtitan's trainer imports it; it runs no kernel here)
  and a few CPU stand-ins described in ``tests/_torchtitan_child.py``.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import REPO, torchrun


def _need(module: str) -> Any:
    """Import ``module``, or skip: torchtitan lives in its own environment (constraints-torchtitan.txt).
    CI's torchtitan step sets CKPTMIRROR_REQUIRE_TORCHTITAN=1, so a missing module fails there."""
    if os.environ.get("CKPTMIRROR_REQUIRE_TORCHTITAN") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


_need("torchtitan")
safetensors_torch = _need("safetensors.torch")

import torch.distributed.checkpoint as dcp  # noqa: E402
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw  # noqa: E402
from torchtitan.components.tokenizer import HuggingFaceTokenizer  # noqa: E402
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader  # noqa: E402

from ckptmirror.dcp import committed_steps  # noqa: E402
from ckptmirror.format import step_dir  # noqa: E402
from ckptmirror.integrations.torchtitan import MirrorCheckpointManager  # noqa: E402

CHILD = REPO / "tests" / "_torchtitan_child.py"

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


# ----------------------------------------------------------------------------- assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (vocabulary 1000) and a JSON-lines text data set, made here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("tt-assets")
    (root / "tok").mkdir()
    (root / "data").mkdir()
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) for _ in range(400)]
    with open(root / "data" / "train.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(root / "tok" / "tokenizer.json"))
    (root / "tok" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True})
    )
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


# ----------------------------------------------------------------------------- in this process


class TrainState:
    """What torchtitan's Trainer contributes as ``train_state``."""

    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step, self.ntokens_seen = sd["step"], sd["ntokens_seen"]


class Job:
    """A tiny model with torchtitan's optimizer, scheduler and text dataloader, and the manager."""

    def __init__(self, assets: Path, root: Path, seed: int, **config: Any) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Embedding(1000, 16), torch.nn.Linear(16, 1000))
        self.optim = default_adamw(lr=1e-2).build(model_parts=[self.model])
        self.sched = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=self.optim, training_steps=20)
        tok = HuggingFaceTokenizer.Config().build(tokenizer_path=str(assets / "tok"))
        self.dl = HuggingFaceTextDataLoader.Config(dataset="c4_test", dataset_path=str(assets / "data")).build(
            dp_world_size=1, dp_rank=0, tokenizer=tok, seq_len=16, local_batch_size=2
        )
        self.train_state = TrainState()
        opts: dict[str, Any] = {"enable": True, "interval": 2, "keep_last": 2}
        opts["replicas"] = [str(root / "a"), str(root / "b")]
        opts.update(config)
        self.ckpt = MirrorCheckpointManager.Config(**opts).build(
            dataloader=self.dl,
            model_parts=[self.model],
            optimizers=self.optim,
            lr_schedulers=self.sched,
            states={"train_state": self.train_state},
            sd_adapter=None,
            base_folder=str(root),
        )
        self._it: Iterator[Any] | None = None
        self.losses: dict[int, float] = {}

    def train(self, until: int) -> None:
        """Train steps ``train_state.step + 1 .. until``, saving as torchtitan's loop does."""
        if self._it is None:
            self._it = iter(self.dl)
        while self.train_state.step < until:
            step = self.train_state.step + 1
            inp, labels = next(self._it)
            loss = torch.nn.functional.cross_entropy(self.model(inp["input"]).flatten(0, 1), labels.flatten())
            self.optim.zero_grad()
            loss.backward()
            self.ckpt.maybe_wait_for_staging()
            self.optim.step()
            self.sched.step()
            self.train_state.step = step
            self.losses[step] = loss.item()
            self.ckpt.save(step, last_step=False)

    def snapshot(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        for k, v in self.optim.state_dict().items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{k}"] = v.detach().clone()
        return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert any(k.endswith("exp_avg_sq") for k in a), sorted(a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs"


def refuse(*a: Any, **k: Any) -> Any:
    raise AssertionError("pickle/torch.load called during a checkpoint load")


def block_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptmirror", *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_resume_in_process_is_bit_exact_and_unpickles_nothing(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = Job(assets, tmp_path / "whole", seed=1)
    assert whole.ckpt.load() is False  # a fresh start
    whole.train(6)
    ref = whole.snapshot()
    whole.ckpt.close()

    first = Job(assets, tmp_path / "run", seed=1)
    first.ckpt.load()
    first.train(5)  # saves 2 and 4 (async); step 5 is lost with the process
    first.ckpt.maybe_wait_for_saving()
    assert first.ckpt.writer.last_outcome == {str(tmp_path / "run" / r): "committed" for r in ("a", "b")}
    assert first.ckpt.writer.staging_allocations == 1, "async saves reuse one staging buffer"
    first.ckpt.close()
    assert committed_steps([str(tmp_path / "run" / "a")]) == [2, 4]

    again = Job(assets, tmp_path / "run", seed=99)  # other weights, a fresh dataloader
    with monkeypatch.context() as m:
        block_pickle(m)
        assert again.ckpt.load() is True
    assert again.ckpt.loaded_step == 4 and again.train_state.step == 4
    assert again.sched.state_dict() == {"last_epoch": 4}
    again.train(6)
    assert again.losses == {5: whole.losses[5], 6: whole.losses[6]}, "the data position came back too"
    assert_same(ref, again.snapshot())
    again.ckpt.close()
    for r in ("a", "b"):
        assert committed_steps([str(tmp_path / "run" / r)]) == [4, 6]  # keep_last=2
        p = cli("verify", str(tmp_path / "run" / r))
        assert p.returncode == 0, p.stdout + p.stderr
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.endswith((".metadata", ".distcp"))]


def test_damaged_newest_step_falls_back_and_is_saved_again(
    assets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job = Job(assets, tmp_path, seed=1, async_mode="disabled")
    job.ckpt.load()
    job.train(6)
    ref = job.snapshot()
    job.ckpt.close()
    for r in ("a", "b"):  # step 6 truncated on every replica: nowhere to read it from
        for obj in (tmp_path / r / step_dir(6)).rglob("*.bin"):
            obj.write_bytes(obj.read_bytes()[:-1])

    again = Job(assets, tmp_path, seed=5, async_mode="disabled")
    with caplog.at_level("WARNING", logger="ckptmirror"):
        assert again.ckpt.load() is True
    assert again.ckpt.loaded_step == 4 and again.train_state.step == 4
    again.train(6)  # step 6 again: the damaged copy is replaced, with a warning
    assert "replacing it" in caplog.text
    assert_same(ref, again.snapshot())
    again.ckpt.close()
    for r in ("a", "b"):
        assert committed_steps([str(tmp_path / r)]) == [4, 6]
        p = cli("verify", str(tmp_path / r))
        assert p.returncode == 0, p.stdout + p.stderr


def test_load_step_and_seed_checkpoint(assets: Path, tmp_path: Path) -> None:
    seed = Job(assets, tmp_path, seed=3, last_save_model_only=True)
    seed.ckpt.save(0, last_step=True)  # what torchtitan's --checkpoint.create_seed_checkpoint does
    model0 = {k: v.clone() for k, v in seed.model.state_dict().items()}
    seed.ckpt.close()

    job = Job(assets, tmp_path, seed=4)
    assert job.ckpt.load() is True and job.ckpt.loaded_step == 0  # model only: nothing else was saved
    for k, v in job.model.state_dict().items():
        assert torch.equal(v, model0[k]), k
    job.train(4)
    job.ckpt.close()

    other = Job(assets, tmp_path, seed=8)
    assert other.ckpt.load(step=2) is True and other.ckpt.loaded_step == 2 and other.train_state.step == 2
    after2 = other.snapshot()
    other.ckpt.close()
    replay = Job(assets, tmp_path / "replay", seed=4, replicas=[str(tmp_path / "replay")])
    for k, v in replay.model.state_dict().items():
        v.copy_(model0[k])
    replay.train(2)
    assert_same(replay.snapshot(), after2)
    replay.ckpt.close()


def test_initial_load_path_from_a_plain_dcp_checkpoint(assets: Path, tmp_path: Path) -> None:
    src = Job(assets, tmp_path / "src", seed=11)
    plain = tmp_path / "plain-dcp"
    dcp.save(src.model.state_dict(), checkpoint_id=str(plain))  # torchtitan's own format
    src.ckpt.close()
    job = Job(assets, tmp_path / "run", seed=12, initial_load_path=str(plain), initial_load_model_only=True)
    assert job.ckpt.load() is True and job.ckpt.loaded_step is None
    for k, v in job.model.state_dict().items():
        assert torch.equal(v, src.model.state_dict()[k]), k
    job.ckpt.close()


def test_config_keys_and_checks() -> None:
    c = MirrorCheckpointManager.Config(enable=True, keep_latest_k=5)
    assert c.effective_keep_last() == 5 and c.async_mode == "async" and not c.last_save_model_only
    assert MirrorCheckpointManager.Config(keep_latest_k=0).effective_keep_last() is None
    assert MirrorCheckpointManager.Config(keep_last=1).effective_keep_last() == 1  # torchtitan refuses keep_latest_k=1
    opts = MirrorCheckpointManager.Config(storage_options='{"s3": {"part_bytes": 1048576}}').parsed_storage_options()
    assert opts == {"s3": {"part_bytes": 1048576}}
    for bad in (
        {"keep_last": 0},
        {"async_mode": "async_with_pinned_mem"},
        {"last_save_in_hf": True},
        {"storage_options": "[1]"},
        {"storage_options": "{nope"},
        {"on_replica_error": "ignore"},
        {"replicas": ["a", " "]},
        {"io_threads": 0},
    ):
        with pytest.raises(ValueError):
            MirrorCheckpointManager.Config(**bad)
    from torchtitan.components.checkpoint import CheckpointManager

    base = CheckpointManager.Config(interval=7, keep_latest_k=4, folder="ck", async_mode="async_with_pinned_mem")
    mine = MirrorCheckpointManager.Config.from_checkpoint_config(base, enable=True, replicas=["/x"])
    assert (mine.interval, mine.keep_latest_k, mine.folder, mine.replicas) == (7, 4, "ck", ["/x"])
    assert mine.async_mode == "async"
    assert MirrorCheckpointManager.Config()._owner is MirrorCheckpointManager


def test_import_ckptmirror_imports_no_torchtitan() -> None:
    code = (
        "import sys, ckptmirror, ckptmirror.integrations, ckptmirror.dcp;"
        "assert not [m for m in sys.modules if m.startswith('torchtitan')], 'torchtitan imported'"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr


# ----------------------------------------------------------------------------- torchtitan's Trainer


def tt_args(assets: Path, root: Path) -> list[str]:
    """torchtitan's command line: the example config, small shapes, the checkpoint keys."""
    return [
        "--module",
        "examples.torchtitan_mirror",
        "--config",
        "llama3_debugmodel_mirror",
        "--hf_assets_path",
        str(assets / "tok"),
        "--dataloader.dataset_path",
        str(assets / "data"),
        "--training.seq_len",
        "64",
        "--training.local_batch_size",
        "2",
        "--training.steps",
        "6",
        "--dump_folder",
        str(root / "dump"),
        "--parallelism.spmd_backend",
        "partial_dtensor",
        "--debug.seed",
        "7",
        "--metrics.log_freq",
        "1",
        "--checkpoint.interval",
        "2",
        "--checkpoint.keep_last",
        "2",
        "--checkpoint.replicas",
        f"{root}/local-{{rank}},{root}/shared",
    ]


def test_cli_sets_the_checkpoint_keys() -> None:
    _need("triton")  # torchtitan's trainer module imports it
    from torchtitan.config import ConfigManager

    sys.path.insert(0, str(REPO))
    try:
        config = ConfigManager().parse_args(
            [
                "--module=examples.torchtitan_mirror",
                "--config=llama3_debugmodel_mirror",
                "--checkpoint.replicas",
                "/nvme/ckpt/node{node_rank},s3://bucket/run1",
                "--checkpoint.keep_last",
                "2",
                "--checkpoint.async_mode",
                "disabled",
                "--checkpoint.interval",
                "50",
                "--checkpoint.storage_options",
                '{"s3": {"part_bytes": 8388608}}',
            ]
        )
    finally:
        sys.path.remove(str(REPO))
    ck = config.checkpoint
    assert type(ck) is MirrorCheckpointManager.Config
    assert ck.replicas == ["/nvme/ckpt/node{node_rank}", "s3://bucket/run1"]
    assert (ck.keep_last, ck.async_mode, ck.interval, ck.enable) == (2, "disabled", 50, True)
    assert ck.parsed_storage_options() == {"s3": {"part_bytes": 8388608}}


@pytest.fixture(scope="module")
def trainer_runs(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One uninterrupted 2-rank run; and a run SIGKILLed at step 5, then launched again.

    The relaunch is a second torchrun (as a scheduler would resubmit the job), not torchrun's
    ``--max-restarts``: with torch 2.13, a restarted attempt can hang in
    ``init_process_group`` itself, reading the dead attempt's addresses from the agent's store.
    """
    _need("triton")
    whole = tmp_path_factory.mktemp("tt-whole")
    killed = tmp_path_factory.mktemp("tt-killed")
    with pytest.MonkeyPatch.context() as m:
        for k, v in OFFLINE.items():
            m.setenv(k, v)
        torchrun(str(CHILD), str(whole), "--", *tt_args(assets, whole), timeout=600)
        (killed / "first").mkdir()
        (killed / "second").mkdir()
        p = torchrun(
            str(CHILD),
            str(killed / "first"),
            "--kill-at",
            "5",
            "--",
            *tt_args(assets, killed),
            timeout=600,
            check=False,
        )
        assert p.returncode != 0 and not list((killed / "first").glob("result-*")), p.stderr[-3000:]
        torchrun(str(CHILD), str(killed / "second"), "--", *tt_args(assets, killed), timeout=600)
    return whole, killed


def losses(path: Path) -> dict[int, float]:
    return {d["step"]: d["loss"] for d in map(json.loads, path.read_text().splitlines())}


def test_trainer_resumes_after_kill_bit_exact(trainer_runs: tuple[Path, Path]) -> None:
    whole, killed = trainer_runs
    ref = safetensors_torch.load_file(str(whole / "final.safetensors"))
    got = safetensors_torch.load_file(str(killed / "second" / "final.safetensors"))
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in ref) and len(ref) > 50
    assert ref.keys() == got.keys()
    for k in ref:
        assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), f"{k} differs after the resume"
    values = json.loads((whole / "values.json").read_text())
    assert values["train_state"]["step"] == 6 and values["lr_scheduler"] == {"last_epoch": 6}
    assert json.loads((killed / "second" / "values.json").read_text()) == values
    for rank in (0, 1):
        full = losses(whole / f"losses-0-{rank}.jsonl")
        assert sorted(full) == [1, 2, 3, 4, 5, 6]
        assert losses(killed / "first" / f"losses-0-{rank}.jsonl") == {s: full[s] for s in range(1, 6)}  # died in 5
        assert losses(killed / "second" / f"losses-0-{rank}.jsonl") == {5: full[5], 6: full[6]}  # from step 4
        a = json.loads((whole / f"result-{rank}.json").read_text())
        b = json.loads((killed / "second" / f"result-{rank}.json").read_text())
        assert a["loaded_step"] is None and b["loaded_step"] == 4
        assert a["sample_idx"] == b["sample_idx"], "the dataloader resumed where it was"
        assert set(b["last_outcome"].values()) == {"committed"} and b["staging_allocations"] == 1


def test_trainer_replicas_verify(trainer_runs: tuple[Path, Path]) -> None:
    _, killed = trainer_runs
    for place in ("local-0", "local-1", "shared"):
        assert committed_steps([str(killed / place)]) == [4, 6], place  # keep_last=2
    # The shared replica holds every rank's part (a node-local one holds its rank's only).
    p = cli("verify", str(killed / "shared"))
    assert p.returncode == 0, p.stdout + p.stderr
    names = {p.name for p in (killed / "local-1" / step_dir(6)).iterdir()}
    assert any(n.startswith("rank-00001") for n in names) and not any(n.startswith("rank-00000") for n in names)
    assert not [p for p in killed.rglob("*") if p.name.endswith((".metadata", ".distcp"))]
    assert not os.path.exists(killed / "dump" / "checkpoint"), "replicas were given: nothing in dump_folder/folder"
