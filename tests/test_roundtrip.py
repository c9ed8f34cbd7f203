"""Round-trip tests for ckptmirror: what goes in comes back bit-exact, on a real local disk.

Everything here uses a real directory (pytest's tmp_path) as the only replica, and a real
child process where a fresh process matters (resuming training). Tensors are compared
bit-exactly (raw bytes through an integer view) together with dtype, shape and stride;
Python floats by their IEEE-754 bytes, so NaN and -0.0 compare exactly too.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import random
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptmirror
from ckptmirror.state.tree import DTYPES_BY_NAME

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _models, whatever pytest's import mode
import _models  # noqa: E402
from _models import Net, make_data, make_optimizer, train_step

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- helpers

_INT_BY_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """An integer tensor with the same raw element bytes as ``t`` (same shape and strides)."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    es = t.element_size()
    if es == 16:  # complex128: no 128-bit integer, compare the two float64 halves
        t = torch.view_as_real(t)
        es = 8
    return t.view(_INT_BY_SIZE[es])


def assert_tensor_same(
    a: torch.Tensor, b: torch.Tensor, path: str = "t", *, stride: bool = True, grad: bool = True
) -> None:
    assert isinstance(b, torch.Tensor), f"{path}: got {type(b)}"
    assert b.dtype == a.dtype, f"{path}: dtype {b.dtype} != {a.dtype}"
    assert b.shape == a.shape, f"{path}: shape {tuple(b.shape)} != {tuple(a.shape)}"
    if stride:
        assert b.stride() == a.stride(), f"{path}: stride {b.stride()} != {a.stride()}"
    if grad:
        assert b.requires_grad == a.requires_grad, f"{path}: requires_grad {b.requires_grad} != {a.requires_grad}"
    assert b.device == a.device, f"{path}: device"
    assert torch.equal(_bits(a), _bits(b)), f"{path}: values differ"


def _float_bytes(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """Deep, type-strict, bit-exact comparison (dict subclasses may come back as dict)."""
    if isinstance(a, torch.Tensor):
        assert type(b) is type(a), f"{path}: {type(b)} != {type(a)}"
        assert_tensor_same(a, b, path)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f"{path}: got {type(b)}"
        assert b.dtype == a.dtype, f"{path}: dtype {b.dtype} != {a.dtype}"
        assert b.shape == a.shape, f"{path}: shape {b.shape} != {a.shape}"
        assert b.tobytes() == a.tobytes(), f"{path}: values differ"
    elif isinstance(a, np.generic):  # before float: np.float64 is a float subclass
        assert type(b) is type(a), f"{path}: {type(b)} != {type(a)}"
        assert b.dtype == a.dtype and b.tobytes() == a.tobytes(), f"{path}: {b!r} != {a!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: got {type(b)}"
        assert len(b) == len(a), f"{path}: keys {list(b)} != {list(a)}"
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            assert_same(ka, kb, f"{path} key {ka!r}")
            assert_same(va, vb, f"{path}[{ka!r}]")
    elif type(a) in (list, tuple):
        assert type(b) is type(a), f"{path}: {type(b).__name__} != {type(a).__name__}"
        assert len(b) == len(a), f"{path}: length {len(b)} != {len(a)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert type(b) is float, f"{path}: {type(b)} != float"
        assert _float_bytes(a) == _float_bytes(b), f"{path}: {b!r} != {a!r}"
    else:
        assert type(b) is type(a), f"{path}: {type(b)} != {type(a)}"
        assert b == a, f"{path}: {b!r} != {a!r}"


def clone_tree(x: Any) -> Any:
    """Deep copy whose tensors keep dtype, shape and strides (the reference to compare against)."""
    return copy.deepcopy(x)


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A tensor of ``dtype`` filled with random bytes (any bit pattern, NaNs included)."""
    es = torch.empty(0, dtype=dtype).element_size()
    n = math.prod(shape)
    raw = torch.randint(0, 256, (max(n, 1) * es,), dtype=torch.uint8, generator=gen)[: n * es]
    return raw.view(dtype).reshape(shape)


@pytest.fixture
def mirror(tmp_path):
    m = ckptmirror.Mirror([str(tmp_path)])
    yield m
    m.close()


# ------------------------------------------------ 1. plain-data state round trip


def _rich_state() -> tuple[dict, dict]:
    """A nested state of every supported plain value; also the next draws of each RNG state."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((6, 8))
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    # What each RNG produces next from the saved state (then put the RNGs back).
    nxt = {
        "py": [random.random() for _ in range(3)],
        "np": np.random.random_sample(3).tolist(),
        "torch": torch.rand(3),
    }
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state)
    state = {
        "int_keys": {0: "zero", 1: "one", -5: [1, 2, 3], 2**70: "big"},
        "str_keys": {"a": 1, "ünï": 2, "": 3, "t": 4, "items": 5},
        # no two keys compare equal (True == 1 and -0.0 == 0 would merge in any dict)
        "mixed_keys": {
            7: "int",
            "7": "str",
            None: "none",
            2.5: "float",
            True: "bool",
            -0.0: "negzero",
            float("nan"): "nan",
            2**100: "huge",
        },
        "list": [1, [2, [3, []]], (), ("t", (1,)), {"in": ["list"]}],
        "tuple": (1, "a", None, (2.0, (3,)), [4]),
        "empty": {"dict": {}, "list": [], "tuple": ()},
        "sizes": [torch.Size([3, 0, 5]), torch.Size([]), torch.Size([2**40])],
        "none": None,
        "bools": [True, False],
        "ints": [0, -1, 2**31, 2**63, -(2**63) - 1, 2**64, 2**100, -(2**100) + 1, 10**300],
        "floats": [0.0, -0.0, 1.5, math.nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308, 0.1, 1 / 3],
        "str": 'héllo wörld ✓ 日本語 🤖 \x00 \n "quoted" \\ \u2028',
        "bytes": bytes(range(256)),
        "empty_bytes": b"",
        "dtypes": [
            torch.float32,
            torch.bfloat16,
            torch.float8_e5m2,
            torch.complex64,
            torch.bool,
            torch.uint64,
            torch.half,
        ],
        "devices": [torch.device("cpu"), torch.device("cuda:1"), torch.device("cuda"), torch.device("meta")],
        "np": {
            "f64": base,
            "f32_T": base.astype(np.float32).T,
            "i16_step": (base * 100).astype(np.int16)[::2, 1::3],
            "negative_strides": base[::-1, ::-2],
            "fortran": np.asfortranarray(base),
            "u8": rng.integers(0, 256, (3, 5), dtype=np.uint8),
            "bool": base > 0,
            "c128": base[:, :4] + 1j * base[:, 4:],
            "c64_T": (base[:, :4] - 2j * base[:, 4:]).astype(np.complex64).T,
            "f16": base.astype(np.float16),
            "big_endian": np.arange(12, dtype=">i4").reshape(3, 4),
            "nan": np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0]),
            "empty": np.zeros((0, 4), np.int64),
            "u64": np.array([2**64 - 1, 0, 2**63], np.uint64),
            "unicode": np.array(["a", "ßß", "日本"]),
            "dt64": np.array(["2024-02-29", "1970-01-01"], "datetime64[D]"),
        },
        "np_scalars": [
            np.float32(1.5),
            np.float32("nan"),
            np.float16(-2.25),
            np.int8(-7),
            np.int64(-3),
            np.uint64(2**64 - 1),
            np.bool_(True),
            np.complex64(1 - 2j),
            np.complex128(-0.0 + 3j),
        ],
        "py_random": py_state,
        "np_random": np_state,
        "torch_rng": torch_state,
    }
    return state, nxt


def test_plain_state_round_trip(mirror, tmp_path):
    state, nxt = _rich_state()
    expected = clone_tree(state)
    h = mirror.save_state(3, state)
    assert h.result(timeout=30) is h and h.done()
    assert mirror.steps() == [3]
    assert step_dirs(tmp_path) == ["step-000000000003"]

    step, loaded = mirror.load_state()
    assert step == 3
    assert_same(expected, loaded)
    # spot checks that a lenient comparison could hide
    assert type(loaded["tuple"]) is tuple and type(loaded["tuple"][3][1]) is tuple
    assert isinstance(loaded["sizes"][0], torch.Size)
    assert math.copysign(1.0, loaded["floats"][1]) == -1.0
    assert list(loaded["mixed_keys"])[:5] == [7, "7", None, 2.5, True]
    assert type(list(loaded["mixed_keys"])[4]) is bool
    assert loaded["ints"][-1] == 10**300

    # a second, independent Mirror over the same directory reads the same thing by step
    with ckptmirror.Mirror([str(tmp_path)]) as m2:
        step2, again = m2.load_state(step=3)
    assert step2 == 3
    assert_same(expected, again)

    # the restored RNG states are usable and continue the exact same sequences
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        random.setstate(loaded["py_random"])
        np.random.set_state(loaded["np_random"])
        torch.set_rng_state(loaded["torch_rng"])
        assert [random.random() for _ in range(3)] == nxt["py"]
        assert np.random.random_sample(3).tolist() == nxt["np"]
        assert_tensor_same(nxt["torch"], torch.rand(3))
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def test_numpy_zero_dim_array_keeps_its_shape(mirror):
    """A 0-d ndarray (what ``np.array(x)`` or ``arr.sum(keepdims=False)`` on arrays gives) must
    come back 0-d. Exposes: staging.plan uses np.ascontiguousarray, which returns ndim >= 1."""
    state = {"a": np.array(5.0), "b": np.array(-3, dtype=np.int16), "c": np.array(True)}
    mirror.save_state(1, state).result(timeout=30)
    _, loaded = mirror.load_state()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype, k
        assert loaded[k].shape == v.shape == (), f"{k}: restored shape {loaded[k].shape}"
        assert loaded[k].tobytes() == v.tobytes(), k


def test_numpy_float64_scalar_keeps_its_type(mirror):
    """Every numpy scalar is documented to round-trip as an ``npscalar``; np.float64 is a float
    subclass and is caught by the plain-float branch first, coming back as a Python float."""
    state = {"x": np.float64(0.1), "nan": np.float64("nan"), "f32": np.float32(0.1)}
    mirror.save_state(1, state).result(timeout=30)
    _, loaded = mirror.load_state()
    assert type(loaded["f32"]) is np.float32  # the non-float-subclass case works
    for k in ("x", "nan"):
        assert type(loaded[k]) is np.float64, f"{k}: came back as {type(loaded[k]).__name__}"
        assert loaded[k].tobytes() == state[k].tobytes()


def test_int_of_any_size_round_trips_or_is_refused_by_save(mirror):
    """tree.py documents ints as "exact, any size". An int past CPython's 4300-digit str
    conversion limit must either round-trip or be refused by save() itself (a TypeError naming
    the key path); it must not be accepted and then fail in the background."""
    huge = 10**5000
    try:
        h = mirror.save_state(1, {"n": huge})
    except ckptmirror.UnsupportedTypeError as exc:
        assert "state['n']" in str(exc)
        assert mirror.steps() == []
        return
    h.result(timeout=30)  # currently: SaveFailedError (ValueError from json.dumps in the writer)
    _, loaded = mirror.load_state()
    assert loaded["n"] == huge


# ------------------------------------------------------- 2. tensors of every dtype

REQUIRED_DTYPES = {
    "bfloat16",
    "float16",
    "float32",
    "float64",
    "float8_e4m3fn",
    "float8_e5m2",
    "complex64",
    "complex128",
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
}


def test_tensors_of_every_dtype_round_trip(mirror):
    gen = torch.Generator().manual_seed(0)
    state: dict[str, Any] = {}
    skipped = {}
    for name, dtype in sorted(DTYPES_BY_NAME.items()):
        try:
            full = random_tensor(dtype, (6, 4), gen)
            entry = {
                "full": full,
                "T": full.t(),  # shares storage with full
                "step": full[::2, 1::2],  # non-contiguous, offset, shares storage
                "zero_d": random_tensor(dtype, (), gen),
                "empty": torch.empty((0, 3), dtype=dtype),
            }
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            skipped[name] = str(exc)
            continue
        state[name] = entry
    covered = set(state)
    assert REQUIRED_DTYPES <= covered, f"missing dtypes: {REQUIRED_DTYPES - covered}; skipped: {skipped}"
    expected = clone_tree(state)

    mirror.save_state(1, state).result(timeout=30)
    _, loaded = mirror.load_state()
    assert set(loaded) == covered
    for name in sorted(covered):
        for k, t in expected[name].items():
            assert_tensor_same(t, loaded[name][k], f"{name}.{k}")
        o = loaded[name]
        # views still share one storage after restore
        ptr = o["full"].untyped_storage().data_ptr()
        assert o["T"].untyped_storage().data_ptr() == ptr, name
        assert o["step"].untyped_storage().data_ptr() == ptr, name
        assert o["step"].storage_offset() - o["full"].storage_offset() == 1, name
        assert o["zero_d"].dim() == 0


def test_shared_storage_views_tied_weights_and_parameters(mirror):
    torch.manual_seed(1)
    base = torch.randn(5, 6)
    big = torch.arange(100, dtype=torch.float64)
    p = torch.nn.Parameter(torch.randn(3, 2))
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    leaf = torch.randn(7, requires_grad=True)
    c = torch.randn(4, dtype=torch.complex64)
    state = {
        "base": base,
        "row2": base[2],
        "cols": base[1:, ::2],
        "T": base.t(),
        "slice_only": big[37:45],  # its base storage is not part of the state
        "p": p,
        "tied": p,  # two keys, one tensor
        "p_view": p.detach()[1],
        "frozen": frozen,
        "leaf_requires_grad": leaf,
        "conj_view": c.conj(),  # lazy conjugate: its raw bytes are not its values
    }
    # deepcopy keeps strides, storage offsets and sharing (and requires_grad / Parameter-ness)
    expected = clone_tree({k: v for k, v in state.items() if k != "conj_view"})
    expected_conj = c.conj().resolve_conj()
    mirror.save_state(1, state).result(timeout=30)
    _, o = mirror.load_state()

    for k, v in expected.items():
        assert type(o[k]) is type(v), k
        assert_tensor_same(v, o[k], k)
    assert_tensor_same(expected_conj, o["conj_view"], "conj_view")
    assert_tensor_same(base, o["T"].t(), "T.t()", grad=False)
    # Parameter-ness and requires_grad come back
    assert type(o["p"]) is torch.nn.Parameter and o["p"].requires_grad
    assert type(o["tied"]) is torch.nn.Parameter and o["tied"].requires_grad
    assert type(o["frozen"]) is torch.nn.Parameter and not o["frozen"].requires_grad
    assert type(o["leaf_requires_grad"]) is torch.Tensor and o["leaf_requires_grad"].requires_grad
    assert type(o["base"]) is torch.Tensor and not o["base"].requires_grad
    assert torch.equal(o["conj_view"], c.conj())

    # storage sharing survives: mutate one, see the others change
    with torch.no_grad():
        o["base"][2, 4] = 12345.0
        o["base"][3, 2] = -777.0
        o["tied"][1, 0] = 42.0
    assert o["row2"][4].item() == 12345.0
    assert o["T"][4, 2].item() == 12345.0
    assert o["cols"][2, 1].item() == -777.0
    assert o["p"][1, 0].item() == 42.0
    assert o["p_view"][0].item() == 42.0
    # ... and storage that was not shared is not aliased
    assert o["frozen"].untyped_storage().data_ptr() != o["p"].untyped_storage().data_ptr()


# ------------------------------------------- 3. model + optimizer (+ scheduler, scaler)


def _make_sched(kind: str, opt: torch.optim.Optimizer):
    if kind == "sgd":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    if kind == "adam":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.05, 0.01], total_steps=20)


def _scaler(**kw) -> torch.amp.GradScaler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.amp.GradScaler("cpu", **kw)


def _train_with_scaler(model, opt, sched, scaler, data, steps: range) -> list[float]:
    x, y = data
    losses = []
    for i in steps:
        lo = (i * 8) % 64
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x[lo : lo + 8]), y[lo : lo + 8])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_model_optimizer_scheduler_scaler_round_trip(tmp_path, kind):
    data = make_data()
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer(kind, model)
    sched = _make_sched(kind, opt)
    scaler = _scaler(init_scale=2.0**10, growth_interval=2)
    _train_with_scaler(model, opt, sched, scaler, data, range(5))
    assert len(opt.state) == len(list(model.parameters()))  # optimizer state is populated
    assert len({g["lr"] for g in opt.param_groups}) == 2

    exp_model = clone_tree(model.state_dict())
    exp_opt = clone_tree(opt.state_dict())
    exp_sched = clone_tree(sched.state_dict())
    exp_scaler = clone_tree(scaler.state_dict())
    with ckptmirror.Mirror([str(tmp_path)]) as m:
        h = m.save(7, model, opt, extra={"sched": sched.state_dict(), "scaler": scaler.state_dict(), "epoch": 3})
        h.result(timeout=30)

    # fresh objects with different values and learning rates, in a new Mirror
    torch.manual_seed(123)
    model2 = Net()
    opt2 = make_optimizer(kind, model2, lrs=(0.9, 0.8))
    sched2 = _make_sched(kind, opt2)
    scaler2 = _scaler(init_scale=3.0)
    assert not torch.equal(model2.fc1.weight, model.fc1.weight)
    params_before = [p for p in model2.parameters()]
    with ckptmirror.Mirror([str(tmp_path)]) as m2:
        res = m2.restore(model2, opt2)
    assert isinstance(res, ckptmirror.RestoreResult)
    assert res.step == 7
    assert res.extra["epoch"] == 3
    assert res.sources and set(res.sources.values()) == {str(tmp_path)}
    assert all(k.startswith("step-000000000007/") for k in res.sources)
    # restored in place: same Parameter objects
    assert all(a is b for a, b in zip(params_before, model2.parameters()))

    assert_same(exp_model, model2.state_dict(), "model")
    assert_same(exp_opt, opt2.state_dict(), "optim")
    assert_same(exp_opt["param_groups"], opt2.state_dict()["param_groups"], "param_groups")
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in exp_opt["param_groups"]]

    assert_same(exp_sched, res.extra["sched"], "extra.sched")
    sched2.load_state_dict(res.extra["sched"])
    assert_same(exp_sched, sched2.state_dict(), "sched2")
    assert_same(exp_scaler, res.extra["scaler"], "extra.scaler")
    scaler2.load_state_dict(res.extra["scaler"])
    assert scaler2.get_scale() == scaler.get_scale()
    assert_same(exp_scaler, scaler2.state_dict(), "scaler2")

    # one more identical step on both gives bit-identical parameters
    torch.manual_seed(5)
    l1 = _train_with_scaler(model, opt, sched, scaler, data, range(5, 6))
    torch.manual_seed(5)
    l2 = _train_with_scaler(model2, opt2, sched2, scaler2, data, range(5, 6))
    assert l1 == l2
    assert_same(clone_tree(model.state_dict()), model2.state_dict(), "after one more step")


# ------------------------------------------------ 4. resume in a fresh process


def test_resume_in_fresh_process_matches_uninterrupted_run(tmp_path):
    total, k = 12, 5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same as the child, so reductions split the same way
    try:
        model, opt, sched = _models.build(seed=0, total_steps=total)
        data = make_data()
        losses = []
        with ckptmirror.Mirror([str(tmp_path)]) as m:
            for i in range(total):
                if i == k:
                    # the training loop mutates everything right after save() returns
                    m.save(k, model, opt, extra={"sched": sched.state_dict(), "torch_rng": torch.get_rng_state()})
                losses.append(train_step(model, opt, sched, data, i))
            m.wait()
            assert m.steps() == [k]
    finally:
        torch.set_num_threads(threads)
    assert len(set(losses)) == total  # training actually moves

    proc = subprocess.run(
        [sys.executable, str(HERE / "_models.py"), "resume", str(tmp_path), str(k), str(total)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(HERE.parent),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = [float.fromhex(v) for v in json.loads(proc.stdout.strip().splitlines()[-1])]
    assert resumed == losses[k:]


# ------------------------------------------------ 5. mutation right after save()


def test_mutation_right_after_save_does_not_leak_into_checkpoint(mirror):
    data = make_data()
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer("sgd", model)
    for i in range(2):
        train_step(model, opt, None, data, i)
    big = torch.randn(1 << 21)  # 8 MiB, so a lazy copy could not win the race by luck
    arr = np.arange(10_000, dtype=np.float64)
    extra = {"big": big, "arr": arr, "list": [1, 2]}
    exp_model = clone_tree(model.state_dict())
    exp_opt = clone_tree(opt.state_dict())
    exp_extra = clone_tree(extra)

    h = mirror.save(1, model, opt, extra=extra)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1000)
        model.bn.running_mean.add_(5)
        model.bn.num_batches_tracked.add_(10)
        for st in opt.state.values():
            st["momentum_buffer"].mul_(-3)
        big.fill_(7.0)
    arr[:] = -1
    extra["list"].append(3)
    opt.param_groups[0]["lr"] = 99.0
    h.result(timeout=30)

    torch.manual_seed(9)
    model2 = Net()
    opt2 = make_optimizer("sgd", model2)
    res = mirror.restore(model2, opt2)
    assert res is not None and res.step == 1
    assert_same(exp_model, model2.state_dict(), "model")
    assert_same(exp_opt, opt2.state_dict(), "optim")
    assert_same(exp_extra, res.extra, "extra")
    assert not torch.equal(model2.fc1.weight, model.fc1.weight)  # the mutation really happened


# ------------------------------------------------------------ 6. unsupported values

Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(object(), id="object"),
        pytest.param(lambda x: x, id="lambda"),
        pytest.param({1, 2}, id="set"),
        pytest.param(Point(1, 2), id="namedtuple"),
        pytest.param(torch.eye(3).to_sparse(), id="sparse_coo"),
        pytest.param(torch.eye(3).to_sparse_csr(), id="sparse_csr"),
        pytest.param(1 + 2j, id="complex"),
    ],
)
def test_unsupported_value_is_refused_by_save_with_its_key_path(mirror, tmp_path, bad):
    mirror.save_state(1, {"ok": torch.ones(2)}).result(timeout=30)
    before_steps, before_dirs = mirror.steps(), sorted(os.listdir(tmp_path))

    state = {"a": [torch.zeros(3), {"b": bad}], "z": 1}
    with pytest.raises(ckptmirror.UnsupportedTypeError) as ei:
        mirror.save_state(2, state)
    assert isinstance(ei.value, TypeError)
    assert isinstance(ei.value, ckptmirror.CkptMirrorError)
    assert ei.value.path == "state['a'][1]['b']"
    assert "state['a'][1]['b']" in str(ei.value)

    # ...and via save(): inside extra
    with pytest.raises(ckptmirror.UnsupportedTypeError) as ei2:
        mirror.save(2, torch.nn.Linear(2, 2), None, extra={"cfg": {"x": bad}})
    assert "state['extra']['cfg']['x']" in str(ei2.value)

    mirror.wait()
    assert mirror.steps() == before_steps
    assert sorted(os.listdir(tmp_path)) == before_dirs
    # the refused step number is still free
    mirror.save_state(2, {"a": [1]}).result(timeout=30)
    assert mirror.steps() == [1, 2]


def test_unsupported_value_in_optimizer_param_group_names_exact_path(mirror, tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.2}], lr=0.1)
    opt.param_groups[0]["foo"] = object()
    with pytest.raises(ckptmirror.UnsupportedTypeError) as ei:
        mirror.save(1, model, opt)
    assert isinstance(ei.value, TypeError)
    assert "state['optim']['param_groups'][0]['foo']" in str(ei.value)
    opt.param_groups[0]["foo"] = {"nested": [1, {2, 3}]}
    with pytest.raises(TypeError) as ei:
        mirror.save(1, model, opt)
    assert "state['optim']['param_groups'][0]['foo']['nested'][1]" in str(ei.value)
    mirror.wait()
    assert mirror.steps() == []
    assert step_dirs(tmp_path) == []

    opt.param_groups[0]["foo"] = "fine"
    mirror.save(1, model, opt).result(timeout=30)
    assert mirror.steps() == [1]


# --------------------------------------------------------- 7. staging steady state


def _storage_bytes(*trees: Any) -> int:
    seen: dict[int, int] = {}

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            if x.numel():
                seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    for t in trees:
        walk(t)
    return sum(seen.values())


def test_steady_state_saves_do_not_allocate_staging(mirror, tmp_path):
    data = make_data()
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer("adam", model)
    train_step(model, opt, None, data, 0)
    assert mirror.staging_allocations == 0

    h = mirror.save(0, model, opt, extra={"rng": torch.get_rng_state()})
    h.result(timeout=30)
    first = mirror.staging_allocations
    assert first >= 1
    assert h.nbytes == _storage_bytes(model.state_dict(), opt.state_dict(), torch.get_rng_state())
    assert h.done() and h.stall_s > 0 and h.committed_s is not None
    assert h.replicas[str(tmp_path)].state == "committed"

    handles = []
    for step in range(1, 7):
        train_step(model, opt, None, data, step)
        handles.append(mirror.save(step, model, opt, extra={"rng": torch.get_rng_state()}))
        if step % 2:  # alternate: wait, and save while the previous one is still writing
            handles[-1].result(timeout=30)
        assert mirror.staging_allocations == first, f"step {step}"
    mirror.wait()
    assert all(x.done() and x.nbytes == h.nbytes for x in handles)
    assert mirror.steps() == list(range(7))
    assert mirror.staging_allocations == first
    # and the last one holds the last values
    _, st = mirror.load_state(step=6)
    assert_same(clone_tree(model.state_dict()), st["model"])


# ----------------------------------------------- 8. retention and step collisions


def test_keep_last_two_over_five_saves(tmp_path):
    with ckptmirror.Mirror([str(tmp_path)], keep_last=2) as m:
        for s in range(1, 6):
            m.save_state(s * 10, {"s": torch.full((3,), float(s))}).result(timeout=30)
    # close() has joined the writer, so retention after the last save has run too
    assert step_dirs(tmp_path) == ["step-000000000040", "step-000000000050"]
    with ckptmirror.Mirror([str(tmp_path)], keep_last=2) as m:
        assert m.steps() == [40, 50]
        step, st = m.load_state()
        assert step == 50 and torch.equal(st["s"], torch.full((3,), 5.0))
        _, st40 = m.load_state(step=40)
        assert torch.equal(st40["s"], torch.full((3,), 4.0))
        # retention goes on with the existing steps in the next session
        m.save_state(60, {"s": torch.zeros(1)}).result(timeout=30)
    assert step_dirs(tmp_path) == ["step-000000000050", "step-000000000060"]


def test_keep_last_never_deletes_newest_committed_step(tmp_path):
    with ckptmirror.Mirror([str(tmp_path)], keep_last=1) as m:
        m.save_state(10, {"v": torch.tensor([10])}).result(timeout=30)
        m.save_state(11, {"v": torch.tensor([11])}).result(timeout=30)
    assert step_dirs(tmp_path) == ["step-000000000011"]
    with ckptmirror.Mirror([str(tmp_path)], keep_last=1) as m:
        # a lower step number saved later must not make retention drop the newest step
        m.save_state(3, {"v": torch.tensor([3])}).result(timeout=30)
    with ckptmirror.Mirror([str(tmp_path)]) as m:
        assert 11 in m.steps()
        step, st = m.load_state()
        assert step == 11 and st["v"].tolist() == [11]
        assert m.load_state(step=3)[1]["v"].tolist() == [3]


def test_wait_returns_after_retention_of_finished_saves(tmp_path):
    """After ``wait()`` ("every in-flight save has finished") the directory should reflect
    keep_last. Exposes: the handle completes at commit and retention runs afterwards on the
    writer thread, so wait()/result() return while old steps are still being deleted (only
    close() joins it). Deletes are slowed down here to make that window deterministic."""
    from ckptmirror.replicas import FaultyReplica, LocalReplica

    def slow_delete(phase: str, key: str) -> None:
        if phase == "delete":
            time.sleep(0.3)

    replica = FaultyReplica(LocalReplica(str(tmp_path)), on_phase=slow_delete)
    with ckptmirror.Mirror([replica], keep_last=1) as m:
        m.save_state(1, {"v": torch.ones(2)}).result(timeout=30)
        m.save_state(2, {"v": torch.zeros(2)}).result(timeout=30)  # new bytes: step 1 keeps nothing
        m.wait()
        assert m.steps() == [2]
        assert step_dirs(tmp_path) == ["step-000000000002"]


def test_saving_committed_step_is_refused_unless_overwrite(tmp_path):
    with ckptmirror.Mirror([str(tmp_path)]) as m:
        m.save_state(5, {"v": torch.tensor([1.0]), "tag": "first"}).result(timeout=30)
        with pytest.raises(ckptmirror.StepExistsError) as ei:
            m.save_state(5, {"v": torch.tensor([2.0]), "tag": "second"})
        assert isinstance(ei.value, FileExistsError)
        with pytest.raises(FileExistsError):
            m.save(5, torch.nn.Linear(1, 1))
        # also refused while the first save of a step is still in flight
        h = m.save_state(6, {"v": torch.zeros(1 << 20)})
        with pytest.raises(ckptmirror.StepExistsError):
            m.save_state(6, {"v": torch.ones(1)})
        h.result(timeout=30)
        # ... and asked to overwrite a step whose save is still finishing, it waits for that save
        h = m.save_state(7, {"v": torch.zeros(1 << 20)})
        m.save_state(7, {"v": torch.ones(1), "tag": "second"}, overwrite=True).result(timeout=30)
        assert h.result(timeout=30) is h
        assert m.load_state(step=7)[1]["tag"] == "second"
        assert m.load_state(step=5)[1]["tag"] == "first"

    # a new Mirror over the same directory knows what is committed
    with ckptmirror.Mirror([str(tmp_path)]) as m2:
        with pytest.raises(ckptmirror.StepExistsError):
            m2.save_state(5, {"tag": "third"})
        assert m2.load_state(step=5)[1]["tag"] == "first"
        m2.save_state(5, {"v": torch.tensor([3.0, 4.0]), "tag": "replaced"}, overwrite=True).result(timeout=30)
        assert m2.steps() == [5, 6, 7]
        _, st = m2.load_state(step=5)
    assert st["tag"] == "replaced"
    assert_tensor_same(torch.tensor([3.0, 4.0]), st["v"])
    with ckptmirror.Mirror([str(tmp_path)]) as m3:
        assert m3.load_state(step=5)[1]["tag"] == "replaced"


# ----------------------------------------------------------------- 9. restore errors


def test_restore_on_empty_directory_returns_none(mirror, tmp_path):
    model = torch.nn.Linear(2, 2)
    before = clone_tree(model.state_dict())
    assert mirror.restore(model) is None
    assert mirror.restore(model, torch.optim.SGD(model.parameters(), lr=0.1)) is None
    assert mirror.load_state() is None
    assert mirror.steps() == []
    assert_same(before, model.state_dict())


def test_restore_missing_step_raises_step_not_found(mirror):
    model = torch.nn.Linear(2, 2)
    mirror.save(1, model).result(timeout=30)
    with pytest.raises(ckptmirror.StepNotFoundError) as ei:
        mirror.restore(model, step=2)
    assert isinstance(ei.value, FileNotFoundError)
    assert ei.value.step == 2 and 1 in ei.value.available
    with pytest.raises(ckptmirror.StepNotFoundError):
        mirror.load_state(step=0)
    assert mirror.restore(model, step=1).step == 1


def test_restore_into_model_of_different_shape_raises_and_leaves_it_unchanged(mirror):
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    mirror.save(1, src).result(timeout=30)

    # same keys, one shape differs (the other layer would fit and must not be touched either)
    dst = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 5))
    before = clone_tree(dst.state_dict())
    with pytest.raises(ckptmirror.StateMismatchError) as ei:
        mirror.restore(dst)
    assert isinstance(ei.value, ValueError)
    assert "1.weight" in str(ei.value)
    assert_same(before, dst.state_dict())

    # a missing key is a mismatch as well
    dst2 = torch.nn.Sequential(torch.nn.Linear(4, 8))
    before2 = clone_tree(dst2.state_dict())
    with pytest.raises(ckptmirror.StateMismatchError):
        mirror.restore(dst2)
    assert_same(before2, dst2.state_dict())


def test_restore_with_mismatched_optimizer_raises_state_mismatch_before_touching_model(mirror):
    """Mirror.restore documents StateMismatchError, raised before any tensor is modified, when
    the checkpoint does not fit the model *or optimizer*. Exposes: an optimizer with a different
    param-group layout gets a plain ValueError from torch's load_state_dict, after the model's
    parameters were already overwritten."""
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer("adam", model)  # two param groups
    train_step(model, opt, None, make_data(), 0)
    mirror.save(1, model, opt).result(timeout=30)

    torch.manual_seed(1)
    model2 = Net()
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)  # one param group
    before_model = clone_tree(model2.state_dict())
    before_opt = clone_tree(opt2.state_dict())
    with pytest.raises(ckptmirror.StateMismatchError):
        mirror.restore(model2, opt2)
    assert_same(before_model, model2.state_dict(), "model left unchanged")
    assert_same(before_opt, opt2.state_dict(), "optimizer left unchanged")


# --------------------------------------------------------------- 10. module-level API


@pytest.fixture
def default_mirror_cleanup():
    ckptmirror.close()
    yield
    ckptmirror.close()


def test_module_level_init_save_wait_restore_close(tmp_path, default_mirror_cleanup):
    m = ckptmirror.init([str(tmp_path)], keep_last=2)
    assert isinstance(m, ckptmirror.Mirror) and ckptmirror.get_mirror() is m
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer("sgd", model)
    data = make_data()
    assert ckptmirror.restore(model, opt) is None  # fresh run
    for step in range(3):
        train_step(model, opt, None, data, step)
        h = ckptmirror.save(step, model, opt, extra={"step": step})
        assert isinstance(h, ckptmirror.SaveHandle)
    ckptmirror.wait()
    assert h.done()
    assert 2 in m.steps()
    exp_model, exp_opt = clone_tree(model.state_dict()), clone_tree(opt.state_dict())
    ckptmirror.close()
    with pytest.raises(RuntimeError):
        m.save(3, model)  # the default mirror really was closed
    ckptmirror.close()  # idempotent
    assert step_dirs(tmp_path) == ["step-000000000001", "step-000000000002"]  # keep_last=2

    # init again (a new default), restore into fresh objects
    ckptmirror.init([str(tmp_path)])
    torch.manual_seed(5)
    model2 = Net()
    opt2 = make_optimizer("sgd", model2)
    res = ckptmirror.restore(model2, opt2)
    assert res.step == 2 and res.extra == {"step": 2}
    assert_same(exp_model, model2.state_dict())
    assert_same(exp_opt, opt2.state_dict())
    res1 = ckptmirror.restore(model2, opt2, step=1)
    assert res1.step == 1 and res1.extra == {"step": 1}


def test_module_level_restore_without_init_uses_env_var(tmp_path, monkeypatch, default_mirror_cleanup):
    a, b = tmp_path / "a", tmp_path / "b"
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    with ckptmirror.Mirror([str(a), f"file://{b}"]) as m:
        m.save(4, model, extra="hello").result(timeout=30)
    assert step_dirs(a) == step_dirs(b) == ["step-000000000004"]

    monkeypatch.setenv(ckptmirror.ENV_REPLICAS, f" {a} , file://{b} ,")
    model2 = torch.nn.Linear(3, 3)
    res = ckptmirror.restore(model2)
    assert res is not None and res.step == 4 and res.extra == "hello"
    assert_same(clone_tree(model.state_dict()), model2.state_dict())
    assert [r.url for r in ckptmirror.get_mirror().replicas] == [str(a), f"file://{b}"]
    # the env-configured default mirror saves too, to both replicas
    ckptmirror.save(5, model2)
    ckptmirror.wait()
    assert step_dirs(a) == step_dirs(b) == ["step-000000000004", "step-000000000005"]


def test_module_level_without_init_or_env_var_raises(monkeypatch, default_mirror_cleanup):
    monkeypatch.delenv(ckptmirror.ENV_REPLICAS, raising=False)
    with pytest.raises(ckptmirror.CkptMirrorError):
        ckptmirror.restore(torch.nn.Linear(1, 1))


def test_flatten_fast_paths_encode_exactly_as_the_rules_say() -> None:
    """flatten() takes shortcuts for plain tensors in dicts and plain ints/strings in lists
    (the bulk of a state dict); they must give the documented encoding, and leave the rest
    (enums, big ints, str subclasses, parameters, meta tensors) to the general rules."""
    import enum

    from ckptmirror.state.tree import MAX_DEPTH, flatten

    class Color(enum.IntEnum):
        RED = 1

    class Name(str):
        pass

    w, p = torch.ones(2), torch.nn.Parameter(torch.zeros(3))
    f = flatten({"w": w, 7: p, Name("n"): [3, "s", 2**70, Color.RED, True, w], -(2**63): None})
    assert f.structure == {
        "t": "dict",
        "items": [
            ["w", {"t": "tensor", "i": 0}],
            [7, {"t": "tensor", "i": 1}],
            [
                "n",
                {"t": "list", "v": [3, "s", {"t": "int", "v": hex(2**70)}, 1, True, {"t": "tensor", "i": 2}]},
            ],
            [-(2**63), None],
        ],
    }
    assert [type(k) for k, _ in f.structure["items"][:3]] == [str, int, str]  # Name -> plain str
    assert f.leaves[0] is w and f.leaves[1] is p and f.leaves[2] is w
    assert f.paths == [("w",), (7,), (Name("n"), 5)]
    with pytest.raises(ckptmirror.UnsupportedTypeError, match=r"state\['m'\]"):
        flatten({"m": torch.empty(2, device="meta")})
    deep: Any = {"t": torch.ones(1)}
    for _ in range(MAX_DEPTH):
        deep = {"d": deep}
    with pytest.raises(ckptmirror.UnsupportedTypeError, match="nested deeper"):
        flatten(deep)


def test_wait_timeout_names_a_save_still_copying_on_another_thread(tmp_path):
    """wait() waits for a save() another thread is still making; its TimeoutError says so (it
    used to list only the queued handles: an empty list here)."""
    release = threading.Event()

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4))

        def state_dict(self, *args, **kwargs):
            release.wait(30)
            return super().state_dict(*args, **kwargs)

    with ckptmirror.Mirror(str(tmp_path / "r")) as m:
        t = threading.Thread(target=lambda: m.save(1, Slow()))
        t.start()
        try:
            deadline = time.monotonic() + 10
            while m._saving == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(TimeoutError, match=r"1 save\(\) call\(s\) still in progress"):
                m.wait(timeout=0.2)
        finally:
            release.set()
            t.join(30)
        m.wait(timeout=30)
        assert m.steps() == [1]
