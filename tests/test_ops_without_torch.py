"""The operator commands (ls, verify, inspect, repair, prune) on a machine without torch.

A checkpoint written by a real training state (bf16 and fp32 tensors, an AdamW state, a
compressed object) is checked, damaged, repaired and pruned by the command line in a process
where ``import torch`` fails: what an operator's box or a storage node without torch runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptmirror
from ckptmirror.cli.main import main
from ckptmirror.format import step_dir
from ckptmirror.state.decode import DTYPE_ITEMSIZES, dtype_itemsize
from ckptmirror.state.tree import DTYPES_BY_NAME


def _ago(text: str) -> str:
    return re.sub(r"\(\d+(\.\d+)?[smhd] ago\)", "(N ago)", text)


# Runs the command line with torch made unimportable (as if it were not installed).
_NO_TORCH = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch' (hidden by the test)")
        return None

sys.meta_path.insert(0, _NoTorch())
from ckptmirror.cli.main import main
code = main(sys.argv[1:])
sys.exit(code)
"""
# ("torch" stays out of sys.modules by construction; the return codes carry the test.)


def cli_without_torch(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _NO_TORCH, *map(str, args)], capture_output=True, text=True, timeout=120
    )


def _train_state(step: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(step)
    model = torch.nn.Module()
    model.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    model.frozen = torch.nn.Embedding(16, 8).to(torch.bfloat16).requires_grad_(False)  # a frozen bf16 part
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.net(torch.randn(4, 32)).sum().backward()
    opt.step()
    return model, opt


def test_the_dtype_table_is_torchs() -> None:
    # The table that checks manifests without torch must say what torch says, for every dtype
    # ckptmirror stores; a torch that adds one fails here until the table learns it.
    assert DTYPE_ITEMSIZES == {name: d.itemsize for name, d in DTYPES_BY_NAME.items()}
    assert dtype_itemsize("bfloat16") == 2
    try:
        dtype_itemsize("float1024", "step-000000000001/rank-00000-abcdef01.json")
    except ckptmirror.ManifestError as exc:
        assert "float1024" in str(exc) and "rank-00000-abcdef01.json" in str(exc)
    else:
        raise AssertionError("an unknown dtype name was accepted")


def test_an_unknown_dtype_without_torch_is_a_manifest_error() -> None:
    # A manifest of a newer torch's dtype, checked where there is no torch: the manifest's
    # fault, named, not an ImportError.
    code = _NO_TORCH.split("from ckptmirror.cli")[0] + (
        "import ckptmirror\n"
        "from ckptmirror.state.decode import dtype_itemsize\n"
        "assert dtype_itemsize('float8_e5m2') == 1\n"
        "try:\n"
        "    dtype_itemsize('float1024', 'step-000000000001/rank-00000-abcdef01.json')\n"
        "except ckptmirror.ManifestError as exc:\n"
        "    assert 'float1024' in str(exc) and 'rank-00000-abcdef01.json' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('accepted')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# Torch objects among the plain values (what Lightning keeps in its hyperparameters): the
# commands check and show them without torch, as a process with torch shows them.
_TORCH_VALUES = {"dtype": torch.bfloat16, "shape": torch.Size([2, 3]), "device": torch.device("cpu", 0)}


def test_ls_verify_inspect_repair_prune_run_without_torch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with ckptmirror.Mirror([str(a), str(b)], storage_options={str(b): {"compression": "zstd"}}) as m:
        for step in (1, 2):
            model, opt = _train_state(step)
            m.save(step, model, opt, extra=_TORCH_VALUES).result()

    ls = cli_without_torch("ls", a, b, "--json")
    assert ls.returncode == 0, ls.stderr
    listed = json.loads(ls.stdout)
    assert [(s["step"], len(s["committed_on"])) for s in listed["steps"]] == [(1, 2), (2, 2)]
    assert all(s["storage"][str(b)]["compressed"] == s["objects"] for s in listed["steps"])  # zstd on b

    ok = cli_without_torch("verify", "--no-progress", a, b)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK: 2 step(s) verified on 2 replica(s)" in ok.stdout

    # inspect shows what a process with torch shows (here, the same command in this process).
    for args in (["inspect", str(a), "--json"], ["inspect", str(a)]):
        without = cli_without_torch(*args)
        assert without.returncode == 0, without.stderr
        assert main(args) == 0
        # The human form says how long ago a step was saved ("(2s ago)"): the two runs may
        # straddle a second, so that part is compared without its number.
        assert _ago(without.stdout) == _ago(capsys.readouterr().out)
    text = without.stdout
    for shown in (
        "bfloat16",
        "float32",
        "exp_avg",
        "torch.bfloat16",
        "torch.Size([2, 3])",
        "device(type='cpu', index=0)",
    ):
        assert shown in text, (shown, text[:3000])

    # Damage the newest step on a: one object flipped, one removed.
    objs = sorted((a / step_dir(2) / "rank-00000").glob("o*.bin"))
    assert len(objs) >= 2
    data = bytearray(objs[0].read_bytes())
    data[3] ^= 0x40
    objs[0].write_bytes(bytes(data))
    objs[1].unlink()
    bad = cli_without_torch("verify", "--no-progress", a, b)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "corrupt" in bad.stdout and objs[0].name in bad.stdout, bad.stdout
    assert "missing" in bad.stdout and objs[1].name in bad.stdout, bad.stdout

    fixed = cli_without_torch("repair", "--no-progress", a, b)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    again = cli_without_torch("verify", "--no-progress", a, b)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "OK: 2 step(s) verified on 2 replica(s)" in again.stdout

    pruned = cli_without_torch("prune", a, b, "--keep", "1")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert not (a / step_dir(1)).exists() and (a / step_dir(2)).exists()

    # The one command that builds tensors says what it needs.
    out = cli_without_torch("export", a, "--format", "safetensors", "-o", tmp_path / "x.safetensors")
    assert out.returncode != 0 and "export needs torch" in out.stderr and "Traceback" not in out.stderr, out.stderr

    # What the repaired replica holds restores bit-exact (here, with torch).
    model, opt = _train_state(2)
    fresh, fresh_opt = _train_state(7)
    with ckptmirror.Mirror([str(a)]) as m:
        result = m.restore(fresh, fresh_opt)
        assert result is not None and result.step == 2 and result.extra == _TORCH_VALUES
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q) and p.dtype == q.dtype
    assert json.dumps(opt.state_dict()["param_groups"]) == json.dumps(fresh_opt.state_dict()["param_groups"])
