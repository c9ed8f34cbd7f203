"""The operator commands (ls, verify, repair, prune, inspect, export) through the installed entry point.

Every command runs as ``ckptmirror ...`` in a subprocess against real local directories. The
checkpoints are written in this process with :class:`ckptmirror.Mirror` to two replicas, then
damaged on disk: a flipped byte, a truncated (or zero-length) object, a deleted object, a
deleted commit record (a torn copy), a corrupt rank manifest, leftover temp files. Independent
commands run concurrently to keep the file fast (``export`` imports torch, ~3 CPU-seconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _agent import TOKEN, AgentProc, serve_command
from _helpers import S3Bucket, assert_bit_exact

import ckptmirror
from ckptmirror import ops
from ckptmirror.format import commit_key, step_dir

STEPS = (10, 20, 30)
OBJ = 200  # bytes per object: a step is cut into several objects
CLI = serve_command()  # the installed entry point


# --------------------------------------------------------------------------- helpers


def make_state(step: int) -> dict[str, Any]:
    """A nested state with several dtypes, a shared storage and plain values; depends on step."""
    g = torch.Generator().manual_seed(step)
    w = torch.randn(16, 8, generator=g)
    return {
        "model": {
            "layer.weight": w,
            "layer.bias": torch.randn(16, generator=g),
            "emb": torch.randn(10, 4, generator=g).to(torch.bfloat16),
        },
        "optim": {
            "state": {0: {"exp_avg": torch.randn(16, 8, generator=g), "step": torch.tensor(float(step))}},
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0]}],
        },
        "extra": {
            "epoch": step,
            "name": "run",
            "tied": [w, w[1]],  # two views of one storage
            "mask": torch.arange(12).reshape(3, 4) % 3 == 0,
            "ids": torch.arange(7, dtype=torch.int64) * step,
            "arr": np.arange(5, dtype=np.float32) + step,
        },
    }


def expected_flat(step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Dotted tensor names and plain values that an export of ``step`` must hold."""
    s = make_state(step)
    tensors = {
        "model.layer.weight": s["model"]["layer.weight"],
        "model.layer.bias": s["model"]["layer.bias"],
        "model.emb": s["model"]["emb"],
        "optim.state.0.exp_avg": s["optim"]["state"][0]["exp_avg"],
        "optim.state.0.step": s["optim"]["state"][0]["step"],
        "extra.tied.0": s["extra"]["tied"][0],
        "extra.tied.1": s["extra"]["tied"][1],
        "extra.mask": s["extra"]["mask"],
        "extra.ids": s["extra"]["ids"],
        "extra.arr": torch.from_numpy(s["extra"]["arr"]),
    }
    values = {
        "optim.param_groups.0.lr": 0.01,
        "optim.param_groups.0.betas.0": 0.9,
        "optim.param_groups.0.betas.1": 0.999,
        "optim.param_groups.0.params.0": 0,
        "extra.epoch": step,
        "extra.name": "run",
    }
    return tensors, values


def cli(*args: Any, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed entry point; never raises on a non-zero status."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def cli_many(*calls: Sequence[Any]) -> list[subprocess.CompletedProcess[str]]:
    """Run independent commands concurrently (each one imports torch: seconds of CPU)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda c: cli(*c), calls))


def snapshot(*roots: Path) -> dict[str, str]:
    """Path -> sha256 of every file under ``roots`` (temp files included)."""
    out = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def obj(root: Path, step: int, index: int, rank: int = 0) -> Path:
    """Object ``index`` of ``rank`` at ``step`` under ``root`` (names carry a per-save token)."""
    hits = sorted((root / step_dir(step) / f"rank-{rank:05d}").glob(f"o{index:06d}*.bin"))
    assert len(hits) == 1, hits
    return hits[0]


def manifest(root: Path, step: int, rank: int = 0) -> Path:
    """The rank manifest of ``rank`` at ``step`` under ``root``."""
    hits = sorted((root / step_dir(step)).glob(f"rank-{rank:05d}*.json"))
    assert len(hits) == 1, hits
    return hits[0]


def rel(root: Path, path: Path) -> str:
    """The replica key of ``path``."""
    return path.relative_to(root).as_posix()


def flip_byte(p: Path, at: int = 7) -> None:
    data = bytearray(p.read_bytes())
    data[at] ^= 0x10
    p.write_bytes(bytes(data))


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two replicas holding steps 10, 20, 30, written once for the module (tests copy them)."""
    root = tmp_path_factory.mktemp("pristine")
    a, b = root / "a", root / "b"
    with ckptmirror.Mirror([str(a), str(b)], object_bytes=OBJ) as m:
        for s in STEPS:
            m.save_state(s, make_state(s)).result()
    return a, b


@pytest.fixture
def reps(pristine: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the pristine replicas."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(pristine[0], a)
    shutil.copytree(pristine[1], b)
    return a, b


# --------------------------------------------------------------------------- tests


def test_help_of_every_command_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    from ckptmirror.cli import OPS_COMMANDS, build_parser

    for cmd in OPS_COMMANDS:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([cmd, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"ckptmirror {cmd} " in out, cmd
        assert "exit status" in out, cmd


def test_usage_errors_exit_2_with_one_line(reps: tuple[Path, Path], tmp_path: Path) -> None:
    a, _b = reps
    no_url, missing_dir, memory, no_port, gs = cli_many(
        ["verify"],
        ["verify", tmp_path / "no-such-dir"],
        ["prune", a, "memory://x", "--keep", "2"],
        ["ls", "peer://127.0.0.1:/run1"],
        ["ls", "gs://bkt/run1"],  # without gcsfs (as here): a misconfiguration, named
    )
    for r in (no_url, missing_dir, memory, no_port) + ((gs,) if "gcsfs" in gs.stderr else ()):
        assert r.returncode == 2, (r.args, r.stderr)
        assert one_line_error(r).startswith("ckptmirror ")
    assert "peer://host:port/namespace" in no_port.stderr
    assert "does not exist" in missing_dir.stderr and f"mkdir -p {tmp_path / 'no-such-dir'}" in missing_dir.stderr
    assert not (tmp_path / "no-such-dir").exists()  # an operator command never creates a replica
    assert "memory://" in memory.stderr
    # Argument errors in-process too (no torch import per case): still one line, status 2.
    from ckptmirror.cli import main

    for argv in (
        ["prune", str(a), "--keep", "0"],
        ["export", str(a), "--format", "zip", "-o", "x"],
        ["verify", str(a), "--step", "-1"],
    ):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and len(err.getvalue().strip().splitlines()) == 1, (argv, err.getvalue())


def test_clean_replicas_ls_inspect_and_repair_onto_an_empty_replica(reps: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = reps
    ls_json, inspect_txt = cli_many(["ls", a, b, "--json"], ["inspect", a, b, "--step", "20"])
    assert ls_json.returncode == 0, ls_json.stderr
    listing = json.loads(ls_json.stdout)
    assert [s["step"] for s in listing["steps"]] == list(STEPS)
    for s in listing["steps"]:
        assert s["committed_on"] == [str(a), str(b)] and s["torn_on"] == []
        assert s["bytes"] > 0 and s["objects"] > 1 and s["world_size"] == 1 and s["created_unix"] > 0
        assert s["garbage"] == {}

    assert inspect_txt.returncode == 0, inspect_txt.stderr
    out = inspect_txt.stdout
    assert "step 20" in out
    for needle in (
        "model",
        "layer.weight",
        "float32",
        "[16, 8]",
        "emb",
        "bfloat16",
        "[10, 4]",
        "optim",
        "exp_avg",
        "mask",
        "bool",
        "[3, 4]",
        "int64",
        "<f4",
        "shares storage",
        "epoch",
        "'run'",
    ):
        assert needle in out, needle

    # A replacement node's empty directory: repair copies every step there, then all verifies.
    new = tmp_path / "new"
    new.mkdir()
    r = cli("repair", a, new)
    assert r.returncode == 0, r.stdout + r.stderr
    v = cli("verify", a, b, new)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "OK: 3 step(s) verified on 3 replica(s)" in v.stdout
    assert v.stdout.count(" ok") == 9  # step x replica x rank table


def test_verify_names_missing_corrupt_truncated_and_torn(
    reps: tuple[Path, Path], pristine: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = reps
    pa = pristine[0]
    k30_1, k20_0, k20_2, k10_3 = (rel(pa, obj(pa, s, i)) for s, i in ((30, 1), (20, 0), (20, 2), (10, 3)))
    flip_byte(obj(a, 30, 1))  # corrupt on a
    obj(b, 20, 0).unlink()  # missing on b
    data = obj(b, 20, 2).read_bytes()
    obj(b, 20, 2).write_bytes(data[:100])  # truncated on b
    obj(b, 10, 3).write_bytes(b"")  # zero length on b
    (b / commit_key(30)).unlink()  # step 30 torn on b: lagging
    text, js, quick, step10_a = cli_many(
        ["verify", a, b],
        ["verify", a, b, "--json"],
        ["verify", a, b, "--quick", "--json"],
        ["verify", a, "--step", "10"],
    )
    assert text.returncode == 1, text.stdout + text.stderr
    expect = {
        (k30_1, str(a), "corrupt"),
        (k20_0, str(b), "missing"),
        (k20_2, str(b), "truncated"),
        (k10_3, str(b), "truncated"),
        (commit_key(30), str(b), "lagging"),
    }
    for key, rep, kind in expect:
        assert any(
            key in line and rep in line and line.strip().startswith(kind) for line in text.stdout.splitlines()
        ), (key, rep, kind, text.stdout)
    assert "FAILED: 5 problem(s)" in text.stdout

    assert js.returncode == 1
    doc = json.loads(js.stdout)
    assert doc["exit_code"] == 1 and doc["quick"] is False
    assert {(p["key"], p["replica"], p["kind"]) for p in doc["problems"]} == expect
    by_step = {s["step"]: s for s in doc["steps"]}
    assert all(s["recoverable"] for s in by_step.values())  # every object verifies somewhere
    cell = {(s["step"], rc["replica"]): rc for s in doc["steps"] for rc in s["replicas"]}
    assert cell[(30, str(b))]["status"] == "torn" and cell[(30, str(a))]["status"] == "bad"
    assert (
        cell[(20, str(a))]["status"] == "ok"
        and cell[(20, str(b))]["ranks"][0]["verified"] == cell[(20, str(b))]["ranks"][0]["objects"] - 2
    )

    # --quick: manifests, presence and sizes only, so the flipped byte on a goes unnoticed.
    assert quick.returncode == 1
    qdoc = json.loads(quick.stdout)
    assert qdoc["quick"] is True
    assert {(p["key"], p["kind"]) for p in qdoc["problems"]} == {
        (k, kind) for k, _r, kind in expect if kind != "corrupt"
    }
    qcell = {(s["step"], rc["replica"]): rc for s in qdoc["steps"] for rc in s["replicas"]}
    assert qcell[(30, str(a))]["status"] == "ok"

    assert step10_a.returncode == 0, step10_a.stdout
    assert "OK: 1 step(s) verified on 1 replica(s)" in step10_a.stdout


def test_repair_fixes_then_is_idempotent_and_dry_run_writes_nothing(
    reps: tuple[Path, Path], pristine: tuple[Path, Path]
) -> None:
    a, b = reps
    pa, pb = pristine
    k30_1, k20_0, k20_4, k30_2, k10_5 = (
        rel(pa, obj(pa, s, i)) for s, i in ((30, 1), (20, 0), (20, 4), (30, 2), (10, 5))
    )
    m20 = rel(pa, manifest(pa, 20))
    flip_byte(obj(a, 30, 1))  # corrupt on a
    obj(b, 20, 0).unlink()  # missing on b
    obj(a, 20, 4).write_bytes(obj(a, 20, 4).read_bytes()[:5])  # truncated on a
    flip_byte(b / m20, at=40)  # corrupt rank manifest on b
    (b / commit_key(30)).unlink()  # torn on b: repair completes it
    obj(b, 30, 2).unlink()  # ... and the torn copy is missing an object too
    (b / commit_key(10)).write_text("{not json")  # a commit record that does not parse
    # Step 10 object 5 corrupt on both replicas: cannot be repaired from anywhere.
    flip_byte(obj(a, 10, 5))
    flip_byte(obj(b, 10, 5))

    before = snapshot(a, b)
    dry = cli("repair", a, b, "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr  # step 10 object 5 is unrecoverable
    assert snapshot(a, b) == before, "--dry-run changed files"
    assert f"would copy   {k30_1}" in dry.stdout
    assert f"would commit {commit_key(30)}" in dry.stdout
    assert f"CANNOT REPAIR unrecoverable: {k10_5}" in dry.stdout

    first = cli("repair", a, b, "--json")
    assert first.returncode == 1, first.stdout + first.stderr
    doc = json.loads(first.stdout)
    done = {(x["key"], x["replica"], x["action"]) for x in doc["actions"] if x["done"]}
    assert done == {
        (k30_1, str(a), "copy"),
        (k20_0, str(b), "copy"),
        (k20_4, str(a), "copy"),
        (m20, str(b), "copy"),
        (k30_2, str(b), "copy"),
        (commit_key(30), str(b), "commit"),
    }
    assert {(p["key"], p["replica"]) for p in doc["unrecoverable"]} >= {(k10_5, str(a)), (commit_key(10), str(b))}
    # Repaired files are byte-identical to what was written; the commit record is the other replica's.
    for path, good in (
        (a / k30_1, pa / k30_1),
        (b / k20_0, pb / k20_0),
        (a / k20_4, pa / k20_4),
        (b / m20, pb / m20),
        (b / k30_2, pb / k30_2),
        (b / commit_key(30), a / commit_key(30)),
    ):
        assert path.read_bytes() == good.read_bytes(), path

    after_first = snapshot(a, b)
    second, v_all = cli_many(["repair", a, b, "--json"], ["verify", a, b, "--json"])
    assert snapshot(a, b) == after_first, "a second repair changed files"
    assert json.loads(second.stdout)["actions"] == []
    # Steps 20 and 30 had a good copy of everything: they verify everywhere now. What is left is
    # exactly what had no good copy anywhere (and b's unparsable commit of step 10, which repair
    # does not replace while that step cannot be completed).
    vdoc = json.loads(v_all.stdout)
    cells = {(s["step"], rc["replica"]): rc["status"] for s in vdoc["steps"] for rc in s["replicas"]}
    assert all(cells[(s, str(r))] == "ok" for s in (20, 30) for r in (a, b)), cells
    left = {(p["key"], p["replica"], p["kind"]) for p in vdoc["problems"]}
    assert left == {(k10_5, str(a), "corrupt"), (commit_key(10), str(b), "invalid")}, left


def test_prune_keeps_n_and_never_the_newest(reps: tuple[Path, Path]) -> None:
    a, b = reps
    # Garbage: a torn older save on a, a torn newer save on b, a leftover temp file in a kept step.
    (a / step_dir(15) / "rank-00000").mkdir(parents=True)
    (a / step_dir(15) / "rank-00000" / "o000000.bin").write_bytes(b"x" * 10)
    (b / step_dir(40) / "rank-00000").mkdir(parents=True)
    (b / step_dir(40) / "rank-00000" / "o000000.bin").write_bytes(b"y" * 10)
    tmpfile = a / step_dir(30) / "rank-00000" / ".tmp-deadbeef-o000000.bin"
    tmpfile.write_bytes(b"z")

    before = snapshot(a, b)
    dry = cli("prune", a, b, "--keep", "2", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert snapshot(a, b) == before, "--dry-run removed files"
    plan = {p["replica"]: p for p in json.loads(dry.stdout)["replicas"]}
    assert plan[str(a)]["removed_steps"] == [10] and plan[str(a)]["removed_torn"] == [15]

    r = cli("prune", a, b, "--keep", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (a / step_dir(10)).exists() and not (b / step_dir(10)).exists()
    assert (a / commit_key(20)).exists() and (b / commit_key(30)).exists()
    assert not (a / step_dir(15)).exists() and not tmpfile.exists()
    assert (b / step_dir(40)).exists()  # newer than the newest commit: maybe a save in progress
    assert "--all-torn" in r.stdout

    # --keep 1 keeps the newest committed step; --all-torn also removes the newer torn save.
    r1 = cli("prune", a, b, "--keep", "1", "--all-torn")
    assert r1.returncode == 0, r1.stdout + r1.stderr
    for rep in (a, b):
        assert sorted(p.name for p in rep.iterdir()) == [step_dir(30)]
        assert (rep / commit_key(30)).exists()


def test_prune_refuses_to_remove_committed_steps_when_nothing_kept_verifies(reps: tuple[Path, Path]) -> None:
    a, b = reps
    for rep in (a, b):
        obj(rep, 30, 0).unlink()  # the newest step is gone everywhere
    res = ops.prune([str(a), str(b)], keep=1)
    assert res.refused and res.exit_code == 1
    assert all(p.removed_steps == () for p in res.replicas)
    assert (a / commit_key(10)).exists() and (b / commit_key(20)).exists()
    with pytest.raises(ops.UsageError):
        ops.prune([str(a)], keep=0)


def test_export_safetensors_and_torch_match_the_saved_state(reps: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    a, b = reps
    flip_byte(obj(a, 20, 1))  # the export reads through the verifying reader: b serves this one
    st_path, pt_path, exists = tmp_path / "s20.safetensors", tmp_path / "s30.pt", tmp_path / "exists.pt"
    st, pt = cli_many(
        ["export", a, b, "--step", "20", "--format", "safetensors", "-o", st_path],
        ["export", a, b, "--format", "torch", "-o", pt_path],
    )
    assert st.returncode == 0, st.stdout + st.stderr
    assert pt.returncode == 0, pt.stdout + pt.stderr
    assert "step 30" in pt.stdout  # default: newest step
    assert "dropped" not in st.stdout and "cloned 3 tensor(s)" in st.stdout  # three tensors share one storage
    exists.write_bytes(b"keep me")
    with pytest.raises(ops.UsageError, match="--force"):
        ops.export([str(a)], str(exists), format="torch", step=20)
    assert exists.read_bytes() == b"keep me"

    tensors, values = expected_flat(20)
    loaded = load_file(str(st_path))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert_bit_exact(loaded[name], t, name)
    with safe_open(str(st_path), "pt") as f:
        meta = f.metadata()
    for name, v in values.items():
        assert json.loads(meta[name]) == v, name

    tensors, values = expected_flat(30)
    obj_ = torch.load(str(pt_path), weights_only=True)
    assert set(obj_) == set(tensors) | set(values)
    for name, t in tensors.items():
        assert type(obj_[name]) is torch.Tensor
        assert_bit_exact(obj_[name], t, name)
    for name, v in values.items():
        assert obj_[name] == v, name


def test_ops_results_are_frozen_and_json_ready(reps: tuple[Path, Path]) -> None:
    a, b = reps
    rep = ops.verify([str(a), str(b)], quick=True)
    assert rep.exit_code == 0 and len(rep.steps) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.quick = False  # type: ignore[misc]
    json.dumps(rep.to_dict())
    json.dumps(ops.ls([str(a)]).to_dict())
    json.dumps(ops.inspect([str(a)], step=10).to_dict())
    assert ops.repair([str(a), str(b)], dry_run=True).actions == ()


def test_peer_and_s3_replicas_verify_and_repair(
    tmp_path: Path,
    s3_url: str,
    bucket: S3Bucket,
    peer_agent: AgentProc,
    peer_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same commands on a ``peer://`` agent and an ``s3://`` bucket (moto), configured by env vars."""
    monkeypatch.setenv("CKPTMIRROR_PEER_TOKEN", TOKEN)
    local = tmp_path / "local"
    local.mkdir()
    peer = peer_url
    ns_root = Path(peer_agent.root) / peer.rsplit("/", 1)[1]
    with ckptmirror.Mirror([str(local), peer, s3_url], object_bytes=OBJ) as m:
        for s in (1, 2):
            m.save_state(s, make_state(s)).result()
    bad_peer = obj(ns_root, 2, 1)
    flip_byte(bad_peer)
    peer_key = rel(ns_root, bad_peer)
    s3_key = rel(local, obj(local, 1, 2))
    bucket.delete(s3_key)

    before = cli("verify", local, peer, s3_url, "--json")
    assert before.returncode == 1, before.stdout + before.stderr
    found = {(p["key"], p["replica"], p["kind"]) for p in json.loads(before.stdout)["problems"]}
    assert found == {(peer_key, peer, "corrupt"), (s3_key, s3_url, "missing")}, found
    fixed = cli("repair", local, peer, s3_url)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    after = cli("verify", local, peer, s3_url)
    assert after.returncode == 0, after.stdout + after.stderr


def test_verify_tells_lagging_replicas_from_damage(reps: tuple[Path, Path]) -> None:
    """A replica that lacks steps the other committed (absent, or torn: a writer killed between
    its per-replica commits) is LAGGING, exit 3, not damage; damage on top of it is exit 1."""
    a, b = reps
    shutil.rmtree(b / step_dir(20))  # absent on b
    (b / commit_key(30)).unlink()  # torn on b
    text, js = cli_many(["verify", a, b], ["verify", a, b, "--json"])
    assert text.returncode == 3, text.stdout + text.stderr
    out = text.stdout
    assert "DAMAGE" not in out, out
    assert f"[2] {b} lags: step(s) 20, 30" in out, out
    assert out.strip().splitlines()[-1].startswith("LAGGING: no damage; 2 step copy(ies) missing on 1 replica(s)"), out
    lag = out[out.index("LAGGING (2)") :]
    for key in (commit_key(20), commit_key(30)):
        assert any(line.strip().startswith("lagging:") and key in line and str(b) in line for line in lag.splitlines())
    doc = json.loads(js.stdout)
    assert js.returncode == 3 and doc["exit_code"] == 3 and doc["status"] == "lagging", js.stdout
    assert doc["damage"] == [] and doc["lagging"] == {str(b): [20, 30]}
    assert {(p["step"], p["kind"]) for p in doc["problems"]} == {(20, "lagging"), (30, "lagging")}

    # Damage as well: exit 1, and both sections, each naming only its own problems.
    bad = obj(a, 10, 2)
    flip_byte(bad)
    text, js = cli_many(["verify", a, b], ["verify", a, b, "--json"])
    assert text.returncode == 1, text.stdout + text.stderr
    out = text.stdout
    damage = out[out.index("DAMAGE (1)") : out.index("LAGGING (2)")]
    assert rel(a, bad) in damage and "lagging:" not in damage, out
    assert rel(a, bad) not in out[out.index("LAGGING (2)") :], out
    assert "FAILED: 3 problem(s) (damage: 1 corrupt; 2 lagging)" in out, out
    doc = json.loads(js.stdout)
    assert doc["status"] == "damaged" and doc["exit_code"] == 1
    assert [(p["key"], p["kind"]) for p in doc["damage"]] == [(rel(a, bad), "corrupt")]
    assert doc["lagging"] == {str(b): [20, 30]}

    # repair copies the good object back and completes b: verify is clean again.
    fixed = cli("repair", a, b)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    after = ops.verify([str(a), str(b)])
    assert (after.status, after.exit_code, after.lagging, after.damage) == ("ok", 0, {}, ())


def test_verify_help_documents_each_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    from ckptmirror.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["verify", "--help"])
    out = capsys.readouterr().out
    notes = out[out.index("exit status:") :]
    for code, word in (("0", "verified"), ("1", "damage"), ("2", "could not be reached"), ("3", "lags")):
        assert any(line.strip().startswith(code) and word in line for line in notes.splitlines()), (code, notes)
    assert "'ckptmirror repair' completes it" in notes


def test_inspect_prints_an_int_too_long_for_str(tmp_path: Path) -> None:
    """The format stores ints of any size; Python refuses to turn one of more than 4,300 digits
    into text (ValueError). inspect prints it with its middle digits elided, and --json gives it
    exactly, in hex."""
    big, neg = 7**5916, -(10**4999)  # 5,000 digits each
    with pytest.raises(ValueError):
        str(big)  # the interpreter's limit this test is about (it runs with the default)
    root = tmp_path / "r"
    with ckptmirror.Mirror([str(root)]) as m:
        m.save_state(1, {"w": torch.ones(2), "big": big, "neg": neg, "ids": [big], "small": 12345}).result()
    txt, js = cli_many(["inspect", root], ["inspect", root, "--json"])
    assert txt.returncode == 0, txt.stderr
    head, tail = big // 10 ** (5000 - 12), big % 10**12
    assert f"{head}...{tail:012d} (5000 digits)" in txt.stdout, txt.stdout
    assert f"-{10**11}...{0:012d} (5000 digits)" in txt.stdout, txt.stdout
    assert "12345" in txt.stdout
    assert js.returncode == 0, js.stderr
    values = {e["name"]: e.get("value") for e in json.loads(js.stdout)["ranks"][0]["entries"]}
    assert values["big"] == {"int_hex": hex(big), "int_digits": 5000}
    assert values["ids.0"] == values["big"]
    assert int(values["neg"]["int_hex"], 16) == neg and values["neg"]["int_digits"] == 5000
    assert values["small"] == 12345
    # The library's report keeps the values themselves.
    rep = ops.inspect([str(root)])
    got = {e.name: e.value for e in rep.ranks[0].entries}
    assert got["big"] == big and got["neg"] == neg and got["small"] == 12345


def cli_tty(*args: Any) -> tuple[int, str, str]:
    """Run the entry point with stderr on a pseudo-terminal (stdout a pipe): (status, stdout,
    what the terminal showed). A thread drains the terminal so that a chatty bar never blocks."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, and tqdm draws nothing in no columns: make it a
    # terminal a person would have.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    shown = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not chunk:
                return
            shown.extend(chunk)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        r = subprocess.run([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=slave, text=True, timeout=120)
    finally:
        os.close(slave)
    t.join(10)
    os.close(master)
    return r.returncode, r.stdout, shown.decode("utf-8", "replace")


def test_repair_and_export_show_a_progress_bar_on_a_terminal_only(reps: tuple[Path, Path], tmp_path: Path) -> None:
    """On a terminal, repair (verify, copy) and export (read) show tqdm bars on stderr, as verify does;
    with stderr not a terminal, or with --no-progress, they print nothing there."""
    a, b = reps
    flip_byte(obj(b, 20, 1))
    rc, out, shown = cli_tty("repair", a, b)
    assert rc == 0 and "copy" in out, out
    assert "repair: verify" in shown and "repair: copy" in shown, shown
    rc, out, shown = cli_tty("export", a, "--format", "torch", "-o", tmp_path / "x.pt")
    assert rc == 0 and "wrote" in out, out
    assert "export: read" in shown, shown
    rc, _out, shown = cli_tty("export", a, "--format", "torch", "-o", tmp_path / "y.pt", "--no-progress")
    assert rc == 0 and shown.strip() == "", shown
    flip_byte(obj(b, 30, 1))
    piped = cli_many(["repair", a, b], ["export", a, "--format", "torch", "-o", tmp_path / "z.pt"])
    for r in piped:
        assert r.returncode == 0 and r.stderr == "", (r.args, r.stderr)

    # The export's bar counts every object byte it reads, against the step's size as its total.
    bars: list[list[Any]] = []

    class Bar:
        def __init__(self, total: int, unit: str, desc: str) -> None:
            self.record = [total, unit, desc, 0, False]
            bars.append(self.record)

        def update(self, n: int) -> None:
            self.record[3] += n

        def close(self) -> None:
            self.record[4] = True

    rep = ops.export([str(a)], str(tmp_path / "w.pt"), format="torch", step=20, progress=Bar)
    assert rep.step == 20
    stream = ops.inspect([str(a)], step=20).ranks[0].stream_bytes
    assert bars == [[stream, "B", "export: read", stream, True]], (bars, stream)


def test_verify_scrub_options_parse_durations(capsys: pytest.CaptureFixture[str]) -> None:
    """``--scrub-max-age`` takes seconds or a unit (s, m, h, d); anything else is a usage error."""
    from ckptmirror.cli import build_parser
    from ckptmirror.cli.render import _scrub_max_age

    parse = build_parser().parse_args
    for text, seconds in (("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("12h", 43200.0), ("1d", 86400.0), ("0", 0.0)):
        assert _scrub_max_age(parse(["verify", "x", "--scrub-max-age", text])) == seconds, text
    assert _scrub_max_age(parse(["verify", "x"])) == 86400.0  # a day by default
    assert _scrub_max_age(parse(["verify", "x", "--no-scrub-results"])) == 0.0
    for bad in ("-1", "1w", "soon", "inf", "nan", "d"):
        with pytest.raises(SystemExit) as exc:
            parse(["verify", "x", "--scrub-max-age", bad])
        assert exc.value.code == 2, bad
        assert "--scrub-max-age" in capsys.readouterr().err


def test_verify_shows_objects_with_one_cause_on_one_line_and_json_lists_each(reps: tuple[Path, Path]) -> None:
    """Every object of replica b gone (steps 10 and 20) and one flipped byte on a: the text says
    "missing: N objects on b in step(s) 10, 20" once, the lone corrupt object keeps its own line,
    and ``--json`` still lists every object."""
    a, b = reps
    gone = [p for s in (10, 20) for p in sorted((b / step_dir(s) / "rank-00000").glob("o*.bin"))]
    assert len(gone) >= 8  # several objects a step (OBJ bytes each)
    for p in gone:
        p.unlink()
    mkey = rel(b, manifest(b, 20))
    manifest(b, 20).unlink()  # its rank manifest too: "not found" as well, yet a line of its own
    flip_byte(obj(a, 30, 1))
    text, js = cli_many(["verify", a, b], ["verify", a, b, "--json"])
    assert text.returncode == 1 and js.returncode == 1, text.stdout + text.stderr
    damage = text.stdout[text.stdout.index("DAMAGE (") :].split("\n\n")[0].splitlines()[1:]
    missing = [line for line in damage if line.strip().startswith("missing") and " objects of step " in line]
    assert len(missing) == 2, damage  # one line per step
    for s, line in zip((10, 20), missing):
        n = sum(1 for p in gone if p.parent.parent.name == step_dir(s))
        assert f"missing: {n} objects of step {s} on {b} (first: {step_dir(s)}/rank-00000/o" in line, missing
    corrupt = [line for line in damage if line.strip().startswith("corrupt")]
    assert len(corrupt) == 1 and corrupt[0].startswith(f"  corrupt: {rel(a, obj(a, 30, 1))} on {a}: "), damage
    assert [line for line in damage if line.startswith(f"  missing: {mkey} on {b}")], damage
    assert f"DAMAGE ({len(gone) + 2})" in text.stdout and f"FAILED: {len(gone) + 2} problem(s)" in text.stdout
    doc = json.loads(js.stdout)
    assert {p["key"] for p in doc["problems"] if p["kind"] == "missing"} == {rel(b, p) for p in gone} | {mkey}


def test_verify_says_which_replica_holds_nothing_at_all(reps: tuple[Path, Path], tmp_path: Path) -> None:
    """A mistyped path passes for "no checkpoints yet" (exit 0, as for a run before its first
    save); verify names it, as ls does, and next to a replica with steps it lags (exit 3)."""
    a, _b = reps
    typo = tmp_path / "typo"
    typo.mkdir()
    alone, alone_js, beside = cli_many(["verify", typo], ["verify", typo, "--json"], ["verify", a, typo, "--json"])
    assert (
        alone.returncode == 0 and f"[1] {typo}: empty (no steps, no step directories): check the path" in alone.stdout
    )
    assert json.loads(alone_js.stdout)["empty"] == {str(typo): "check the path"}
    doc = json.loads(beside.stdout)
    assert beside.returncode == 3 and doc["empty"] == {str(typo): "check the path"}, doc["empty"]


def test_damage_lines_group_objects_stored_under_their_own_names() -> None:
    """Compressed or referenced objects name the file they are stored in ("not found (stored as
    ...)"): a lost compressed step is still one line, not one per object (a campaign saw 115)."""
    from ckptmirror import ops
    from ckptmirror.cli.render import _damage_lines

    gone = [
        ops.Problem(
            3,
            "s3://b/run",
            f"{step_dir(3)}/rank-00000/o{i:06d}-aa.bin",
            "missing",
            f"not found (stored as {step_dir(0)}/rank-00000/o{i:06d}-bb.zst)",
            0,
        )
        for i in range(6)
    ]
    lone = ops.Problem(3, "s3://b/run", f"{step_dir(3)}/rank-00000/o000009-aa.bin", "corrupt", "checksum mismatch", 0)
    lines = _damage_lines([*gone, lone])
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"missing: 6 objects of step 3 on s3://b/run (first: {gone[0].key}): not found"), lines
    assert lines[1] == str(lone)
