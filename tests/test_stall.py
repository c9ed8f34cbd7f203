"""The save stall: Mirror.reserve, and the staging copy that keeps save() at one memcpy.

Speed is measured in benchmarks/ (bench_stall.py, repro_stall.py), never asserted here; these
tests pin the behaviour the speed rests on: reserve plans and allocates so that the first save
allocates and plans nothing, the staging copy is byte-exact for every layout it cuts into pieces
and shares between threads, and it leaves torch's thread settings and the copy kernels alone.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _helpers import assert_bit_exact, snapshot
from torch import nn

import ckptmirror
import ckptmirror.mirror as mirror_mod
from ckptmirror.save import copies as copies_mod
from ckptmirror.save import layout as layout_mod
from ckptmirror.save import snapshot as snap
from ckptmirror.save import speculate as speculate_mod
from ckptmirror.state.tree import flatten, unflatten


class Mixed(nn.Module):
    """fp32 and bf16 layers, a frozen embedding (no grad, no optimizer state), many small norms."""

    def __init__(self, width: int = 64, norms: int = 40) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 32).to(torch.bfloat16)
        self.frozen = nn.Embedding(100, width)
        self.frozen.requires_grad_(False)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(norms))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x + self.frozen.weight[:1])
        for n in self.norms:
            h = n(h)
        return h.sum() + self.head(h.to(torch.bfloat16)).float().sum()


def make(seed: int, width: int = 64, norms: int = 40) -> tuple[Mixed, torch.optim.Optimizer]:
    """A model and its AdamW after one step (the optimizer state exists)."""
    torch.manual_seed(seed)
    model = Mixed(width, norms)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step(model, opt, seed)
    return model, opt


def step(model: Mixed, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad(set_to_none=True)
    model(torch.randn(4, model.body[0].in_features, generator=g)).backward()
    opt.step()


def test_reserve_then_first_save_allocates_and_plans_nothing_and_restores_bit_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plans = []
    real_plan = snap.plan

    def counting_plan(flat: Any) -> snap.Plan:
        plans.append(1)
        return real_plan(flat)

    monkeypatch.setattr(mirror_mod, "plan", counting_plan)  # what save() calls
    monkeypatch.setattr(snap, "plan", counting_plan)  # what reserve() calls
    model, opt = make(1)
    counter = torch.arange(5)  # a tensor in extra that stays the same object
    with ckptmirror.Mirror([str(tmp_path / "ckpt")]) as m:
        assert m.staging_allocations == 0
        nbytes = m.reserve(model, opt, extra={"epoch": 3, "counter": counter})
        assert m.staging_allocations == 1 and len(plans) == 1
        expected = snapshot(model, opt)
        h = m.save(1, model, opt, extra={"epoch": 3, "counter": counter})
        step(model, opt, 2)  # change every trainable tensor right after save() returns
        h.result()
        assert m.staging_allocations == 1, "the first save after reserve allocated a staging buffer"
        assert len(plans) == 1, "the first save after reserve planned the layout again"
        assert h.nbytes == nbytes
        h = m.save(2, model, opt, extra={"epoch": 4, "counter": counter})
        h.result()
        assert m.staging_allocations == 1 and len(plans) == 1

    target, target_opt = make(99)  # other values everywhere, so each one must come from the checkpoint
    with ckptmirror.Mirror([str(tmp_path / "ckpt")]) as m:
        r = m.restore(target, target_opt, step=1)
    assert r is not None and r.step == 1 and r.extra["epoch"] == 3
    assert_bit_exact(r.extra["counter"], counter, "extra.counter")
    assert_bit_exact(snapshot(target, target_opt), expected, "state")
    assert target.head.weight.dtype == torch.bfloat16
    assert not target.frozen.weight.requires_grad


def resident_fraction(t: torch.Tensor) -> float:
    """Which fraction of the pages under a CPU tensor is in memory (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = t.data_ptr() & ~(page - 1)
    length = t.data_ptr() + t.numel() * t.element_size() - start
    pages = (length + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) != 0:
        pytest.skip(f"mincore failed: errno {ctypes.get_errno()}")
    return sum(v & 1 for v in vec) / pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore(2) as on Linux")
def test_reserve_maps_every_arena_page(tmp_path: Path) -> None:
    model, opt = make(3, width=512, norms=2)  # ~8 MB of state
    with ckptmirror.Mirror([str(tmp_path / "ckpt")], max_inflight=2) as m:
        nbytes = m.reserve(model, opt)
        assert m.staging_allocations == 2
        arenas = m._arenas._all  # white-box: the pages themselves are what reserve promises
        for a in arenas:
            assert a.buffer.numel() >= nbytes
            assert resident_fraction(a.buffer[:nbytes]) == 1.0
        handles = [m.save(i, model, opt) for i in range(4)]  # back to back: both arenas in use
        for h in handles:
            h.result()
        assert m.staging_allocations == 2


def test_state_that_changes_after_reserve_still_saves_correctly(tmp_path: Path) -> None:
    small, small_opt = make(4, width=32, norms=3)
    big, big_opt = make(5, width=96, norms=7)  # other shapes and more tensors
    with ckptmirror.Mirror([str(tmp_path / "ckpt")]) as m:
        m.reserve(small, small_opt)
        allocs = m.staging_allocations
        expected_big = snapshot(big, big_opt)
        m.save(1, big, big_opt).result()
        assert m.staging_allocations == allocs + 1  # the arena had to grow
        expected_small = snapshot(small, small_opt)
        m.save(2, small, small_opt).result()
        assert m.staging_allocations == allocs + 1  # smaller: the grown arena is reused
    for s, (seed, width, norms), expected in ((1, (11, 96, 7), expected_big), (2, (12, 32, 3), expected_small)):
        target, target_opt = make(seed, width, norms)
        with ckptmirror.Mirror([str(tmp_path / "ckpt")]) as m:
            r = m.restore(target, target_opt, step=s)
        assert r is not None and r.step == s
        assert_bit_exact(snapshot(target, target_opt), expected, f"step {s}")


def tricky_state() -> dict[str, Any]:
    """Leaves whose spans split, gather, share storage, are empty, 0-d or NumPy."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(300, 200, generator=g)  # 240 KB: split into many 4 KiB pieces below
    return {
        "big_t": base.t(),  # non-contiguous view
        "row": base[17],  # shares base's storage
        "bf16": torch.randn(1000, generator=g).to(torch.bfloat16),
        "int64": torch.randint(-(2**62), 2**62, (333,), generator=g),
        "bool": torch.rand(77, generator=g) > 0.5,
        "c64": torch.randn(50, dtype=torch.complex64, generator=g),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5),
        "small": [torch.full((i,), float(i)) for i in range(1, 200)],  # gathered into one piece
        "np": np.arange(5000, dtype=np.int32).reshape(50, 100)[:, ::3],  # non-contiguous array
        "np0": np.array(2.5),
        "frozen": nn.Parameter(torch.randn(64, 64, generator=g), requires_grad=False),
    }


@pytest.mark.parametrize("threads", [1, 3])
def test_staging_copy_is_byte_exact_when_cut_into_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    # Tiny pieces and no size floor for threads: every branch of the copy runs on a small state.
    monkeypatch.setattr(copies_mod, "PIECE_BYTES", 4096)
    monkeypatch.setattr(copies_mod, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(copies_mod, "PARALLEL_MIN_AVERAGE", 0)
    monkeypatch.setattr(copies_mod, "COPY_THREADS", threads)
    state = tricky_state()
    with ckptmirror.Mirror([str(tmp_path / "ckpt")]) as m:
        m.save_state(1, state).result()
        m.save_state(2, state).result()  # cached plan, same arena
        loaded = m.load_state(2)
    assert loaded is not None
    got = loaded[1]
    expected = dict(state, np=np.ascontiguousarray(state["np"]))
    assert_bit_exact(got, expected, "state")


def test_stream_matches_a_copy_made_by_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(copies_mod, "PIECE_BYTES", 4096)
    state = {k: v for k, v in tricky_state().items() if k not in ("np", "np0")}
    p = snap.plan(flatten(state))
    arena = snap.Arena()
    stream = snap.snapshot(p, arena).clone()
    # Independently: every span's bytes, copied by torch from a uint8 view of its storage.
    expected = torch.cat(
        [
            torch.empty(0, dtype=torch.uint8).set_(sp.storage)[sp.start : sp.start + sp.nbytes].clone()
            for sp in p.spans
            if sp.nbytes and sp.storage is not None
        ]
    )
    assert stream.numel() == p.total_bytes == expected.numel()
    assert torch.equal(stream, expected)


def test_host_copy_uses_no_torch_copy_kernel_and_keeps_thread_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU staging copy must not go through torch's copy (an OpenMP region per tensor)."""
    threads, interop = torch.get_num_threads(), torch.get_num_interop_threads()
    omp_env = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))}
    monkeypatch.setattr(copies_mod, "PARALLEL_MIN_BYTES", 0)
    state = {f"t{i}": torch.randn(40_000) for i in range(20)}  # each past torch's 32,768-element grain
    p = snap.plan(flatten(state))

    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("the CPU staging copy went through a torch copy kernel")

    monkeypatch.setattr(torch, "_foreach_copy_", forbidden)
    monkeypatch.setattr(torch.Tensor, "copy_", forbidden)
    stream = snap.snapshot(p, snap.Arena())
    monkeypatch.undo()
    assert torch.equal(stream.view(torch.float32), torch.cat(list(state.values())))
    assert (torch.get_num_threads(), torch.get_num_interop_threads()) == (threads, interop)
    assert {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))} == omp_env


def test_paused_gc_restores_the_callers_setting() -> None:
    assert gc.isenabled()
    with snap.paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with snap.paused_gc():
            pass
        assert not gc.isenabled()  # the caller had disabled it: it stays disabled
    finally:
        gc.enable()


def test_replan_swaps_moved_tensors_and_matches_a_fresh_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new ``torch.get_rng_state()`` in every save's extra must not cost a whole new plan."""
    monkeypatch.setattr(copies_mod, "PIECE_BYTES", 1024)  # the 5 KB RNG state spans several pieces
    weights = {f"w{i}": torch.full((i + 1,), float(i)) for i in range(300)}
    first = {"model": weights, "extra": {"rng": torch.get_rng_state()}}
    flat0 = flatten(first)
    p0, key0 = snap.plan(flat0), snap.plan_key(flat0)
    torch.rand(3)  # the generator moves on: the next state holds other bytes, in a new tensor
    second = {"model": weights, "extra": {"rng": torch.get_rng_state()}}
    flat1 = flatten(second)
    key1 = snap.plan_key(flat1)
    assert key1 != key0
    p1 = snap.replan(p0, key0, flat1, key1)
    assert p1 is not None
    fresh = snap.plan(flat1)
    assert p1.storages == fresh.storages and p1.leaves == fresh.leaves and p1.total_bytes == fresh.total_bytes
    got = snap.snapshot(p1, snap.Arena()).clone()
    assert torch.equal(got, snap.snapshot(fresh, snap.Arena()))
    assert not torch.equal(got, snap.snapshot(p0, snap.Arena()))  # the old plan still copies the old RNG state
    assert len(p1.copies.pieces) == len(p0.copies.pieces)


def test_replan_refuses_what_it_cannot_patch() -> None:
    a, b = torch.arange(10.0), torch.arange(10.0) + 1
    flat0 = flatten({"x": a, "y": b})
    p0, key0 = snap.plan(flat0), snap.plan_key(flat0)

    def attempt(state: dict[str, Any]) -> snap.Plan | None:
        flat = flatten(state)
        return snap.replan(p0, key0, flat, snap.plan_key(flat))

    assert attempt({"x": a, "y": a[:]}) is None  # y now shares x's storage: one span, not two
    assert attempt({"x": a, "y": torch.arange(12.0)[2:]}) is None  # another offset in its storage
    assert attempt({"x": a, "y": torch.arange(10.0).view(2, 5)}) is None  # other shape
    assert attempt({"x": a, "y": torch.arange(10)}) is None  # other dtype
    assert attempt({"x": a, "y": b.clone()}) is not None  # same layout, other storage: patched
    # A larger storage with the tensor at its start: the span is the tensor's bytes, as before.
    big = torch.arange(11.0)
    p = attempt({"x": a, "y": big[:10]})
    assert p is not None
    assert torch.equal(snap.snapshot(p, snap.Arena())[40:].view(torch.float32), big[:10])


# ---------------------------------------------------------------- the plan cache's key and flatten
def _same_address_changes(t: torch.Tensor) -> dict[str, Any]:
    """Tensors at ``t``'s data pointer (``t``: 12 float32 in a 3x4 layout) that are laid out
    otherwise: a plan made for ``t`` must never be reused for any of them."""
    c = torch.view_as_complex(t.view(6, 2))
    return {
        "shape": t.view(4, 3),
        "strides": t.as_strided((4, 3), (1, 4)),
        "dtype": t.view(torch.int32),
        "requires_grad": t.detach().requires_grad_(True),
        "parameter": nn.Parameter(t.detach(), requires_grad=False),
        "fewer elements": t[:2],
        "complex": c,
        "conj": c.conj(),
        "neg": c._neg_view(),
    }


@pytest.mark.parametrize("layouts", [True, False], ids=["layouts", "by-column"])
def test_plan_key_tells_apart_every_change_at_the_same_address(monkeypatch: pytest.MonkeyPatch, layouts: bool) -> None:
    from ckptmirror.state import tree

    if not layouts:
        monkeypatch.setattr(tree, "_guards_ok", False)  # as on a torch without TensorGuards
        monkeypatch.setattr(tree, "_LAYOUTS", [])
    else:
        assert tree._layouts_work(), "TensorGuards misbehaves here: every save checks column by column"
    base = torch.arange(12.0).view(3, 4)
    others = {f"w{i}": torch.full((i + 1,), float(i)) for i in range(20)}  # > the bulk path's minimum
    key0 = snap.plan_key(flatten({"model": others, "x": base}))
    assert key0 is not None
    assert snap.plan_key(flatten({"model": dict(others), "x": base.view(3, 4)})) == key0  # same layout
    for what, t in _same_address_changes(base).items():
        assert t.data_ptr() == base.data_ptr()
        key = snap.plan_key(flatten({"model": others, "x": t}))
        assert key != key0, what
    # the same tensor object, changed in place
    t = base.clone()
    key1 = snap.plan_key(flatten({"model": others, "x": t}))
    for what, change in [
        ("t_", lambda: t.t_()),
        ("as_strided_", lambda: t.as_strided_((2, 6), (6, 1))),
        ("requires_grad_", lambda: t.requires_grad_(True)),
        (".data", lambda: setattr(t, "data", t.data.view(12))),
    ]:
        change()
        key = snap.plan_key(flatten({"model": others, "x": t}))
        assert key != key1, what
        key1 = key
    # a tensor of the big dict moved to other storage (set_), or the dict changed shape
    moved = dict(others, w3=others["w3"].clone())
    assert snap.plan_key(flatten({"model": moved, "x": base})) != key0
    assert snap.plan_key(flatten({"model": {**others, "w20": torch.ones(1)}, "x": base})) != key0
    assert snap.plan_key(flatten({"model": others, "x": base, "np": np.zeros(2)})) is None


def test_save_never_reuses_a_plan_for_a_state_laid_out_otherwise(tmp_path: Path) -> None:
    """End to end: same data pointers, other layouts, saved one after the other with the plan cache."""
    base = torch.arange(12.0).view(3, 4)
    others = {f"w{i}": torch.full((i + 1,), float(i)) for i in range(20)}
    variants = {"base": base, **_same_address_changes(base)}
    with ckptmirror.Mirror([str(tmp_path / "ckpt")]) as m:
        for i, t in enumerate(variants.values()):
            m.save_state(i, {"model": others, "x": t}).result()
        for i, (what, t) in enumerate(variants.items()):
            loaded = m.load_state(i)
            assert loaded is not None
            got = loaded[1]["x"]
            assert type(got) is type(t) and got.dtype == t.dtype and got.shape == t.shape, what
            assert got.stride() == t.stride() or not t.is_contiguous(), what
            assert got.requires_grad == t.requires_grad, what
            assert torch.equal(got.detach().resolve_conj().resolve_neg(), t.detach().resolve_conj().resolve_neg()), what
            assert_bit_exact(loaded[1]["model"], others, what)


def test_bulk_flatten_encodes_as_the_per_entry_path() -> None:
    p = nn.Parameter(torch.ones(2))
    state = {
        "model": {f"layer{i}.w": torch.full((i + 1,), float(i)) for i in range(30)} | {"p": p},
        "optim": {
            "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "mixed": {f"k{i}": (torch.ones(1) if i % 2 else i) for i in range(20)},  # not all tensors: per entry
        "intkeys": {i: torch.ones(1) for i in range(20)},  # not all str keys: per entry
        "list": [torch.zeros(3)],
    }
    fast, slow = flatten(state), flatten(state, _fast=False)
    # Format 4: the fast path writes a large dict of tensors as one compact ``tensors`` node,
    # the per-entry path as a ``dict`` node of leaves; both must stand for the same tree.
    fast_items = dict(fast.structure["items"])  # type: ignore[index]
    assert fast_items["model"]["t"] == "tensors" and fast_items["intkeys"]["t"] == "tensors"
    assert fast_items["mixed"]["t"] == "dict"  # not all tensors: entry by entry
    assert dict(slow.structure["items"])["model"]["t"] == "dict"  # type: ignore[index]

    def rebuilt(f: Any) -> Any:
        return unflatten(f.structure, lambda kind, i, path: ("leaf", kind, i, path))

    assert rebuilt(fast) == rebuilt(slow)
    assert fast.paths == slow.paths
    assert len(fast.leaves) == len(slow.leaves) and all(a is b for a, b in zip(fast.leaves, slow.leaves))
    assert fast.layout is None  # a leaf in a list is not taken by the fast path
    only_dicts = flatten({"model": state["model"]})
    assert only_dicts.layout is not None and only_dicts.layout.matches(only_dicts.leaves)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: torch.empty(3, device="meta"),
        lambda: torch.ones(2, 2).to_sparse(),
        lambda: torch.ones(3).as_subclass(_Sub),
    ],
    ids=["meta", "sparse", "subclass"],
)
def test_bulk_flatten_refuses_what_the_per_entry_path_refuses(bad: Any) -> None:
    good = {f"w{i}": torch.ones(i + 1) for i in range(30)}
    flatten({"model": good})  # a layout for these 30 tensors is made and kept
    with pytest.raises(ckptmirror.UnsupportedTypeError, match=r"state\['model'\]\['w7'\]"):
        flatten({"model": {**good, "w7": bad()}})


class _Sub(torch.Tensor):
    pass


# ---------------------------------------------------------------- coalesced copies of small storages
JUNK = 0xAB  # what the memory between the storages holds: it must never reach the stream


def back_to_back(n: int, gap: int | list[int], seed: int = 0) -> tuple[np.ndarray, list[torch.Tensor]]:
    """``n`` small tensors of mixed dtypes and sizes whose storages lie one after the other in one
    buffer, ``gap`` bytes of junk apart (one gap for all, or one per pair): what an allocator
    makes of tensors created in a row, at known addresses."""
    g = np.random.default_rng(seed)
    gaps = [gap] * n if isinstance(gap, int) else gap
    dtypes = [np.float32, np.int64, np.int16, np.float64]
    sizes = [int(g.integers(1, 40)) * np.dtype(dtypes[i % 4]).itemsize for i in range(n)]
    buf = np.full(sum(sizes) + sum(gaps) + 8 * n + 64, JUNK, dtype=np.uint8)
    base = (-buf.ctypes.data) % 16  # 16-aligned starts: every dtype's view is aligned
    out, pos = [], base
    for i, nb in enumerate(sizes):
        pos += (-pos) % 8  # keep int64/float64 aligned: the gap grows by at most 7 bytes
        arr = buf[pos : pos + nb].view(dtypes[i % 4])
        arr[...] = g.integers(-1000, 1000, arr.size)
        out.append(torch.from_numpy(arr))  # its own storage, pointing into buf
        pos += nb + gaps[i]
    return buf, out


def storage_by_storage(p: snap.Plan) -> torch.Tensor:
    """The stream as an independent copy makes it: every span's bytes, by torch, in order."""
    return torch.cat(
        [
            torch.empty(0, dtype=torch.uint8).set_(sp.storage)[sp.start : sp.start + sp.nbytes].clone()
            for sp in p.spans
            if sp.nbytes and sp.storage is not None
        ]
    )


def test_small_storages_in_a_row_are_copied_as_runs_and_the_gaps_never_reach_the_stream() -> None:
    buf, small = back_to_back(400, 48)
    big = torch.randn(40_000)  # a large storage (160 KB): laid out first, copied on its own
    state = {"a": small[:200], "big": big, "b": small[200:], "bf16": torch.randn(3000).to(torch.bfloat16)}
    p = snap.plan(flatten(state))
    c = p.copies
    assert len(c.in_run) >= 390 and c.moves, "adjacent small storages should be coalesced"
    assert c.staging_bytes > p.total_bytes  # the gaps are staged ...
    sizes = [sp.nbytes for sp in p.spans if sp.nbytes]
    first_small = next(i for i, n in enumerate(sizes) if n < snap.SMALL_SPAN)
    assert all(n < snap.SMALL_SPAN for n in sizes[first_small:])  # small storages last
    arena = snap.Arena()
    stream, finish = snap.stage(p, arena)
    assert not torch.equal(stream, storage_by_storage(p))  # ... and closed only by finish()
    finish()
    assert torch.equal(stream, storage_by_storage(p))
    buf[buf == JUNK] = 0x11  # other junk, other values: a cached plan copies what is there now
    for t in small:
        t.add_(1)
    big.mul_(2)
    assert torch.equal(snap.snapshot(p, arena), storage_by_storage(p))


@pytest.mark.parametrize(
    ("gaps", "coalesced"),
    [
        ("max", True),  # MAX_GAP bytes apart: still one run
        ("over", False),  # one more: every storage alone
        ("backwards", False),  # each storage before the previous one in memory
    ],
)
def test_only_storages_close_enough_in_order_are_coalesced(gaps: str, coalesced: bool) -> None:
    n = 300
    if gaps == "backwards":
        buf, ts = back_to_back(n, 8)
        ts = ts[::-1]
    else:
        # an 8-byte dtype everywhere keeps the gaps exact (no alignment padding)
        gap = snap.MAX_GAP if gaps == "max" else snap.MAX_GAP + 1
        size = 8192  # large enough that MAX_GAP_SHARE does not refuse the gaps
        assert gap <= snap.MAX_GAP_SHARE * size
        buf = np.full(n * (size + gap) + 64, JUNK, dtype=np.uint8)
        base = (-buf.ctypes.data) % 16
        at = [base + i * (size + gap) for i in range(n)]
        ts = [torch.from_numpy(buf[a : a + size].view(np.int64)) for a in at]
        for i, t in enumerate(ts):
            t.fill_(i)
    p = snap.plan(flatten({"t": ts}))
    assert bool(p.copies.moves) == coalesced
    assert torch.equal(snap.snapshot(p, snap.Arena()), storage_by_storage(p))


def test_a_run_is_not_coalesced_when_its_gaps_cost_too_much_staging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout_mod, "MAX_GAP_SHARE", 0.01)
    buf, ts = back_to_back(300, 200)  # gaps of 200 bytes between storages of ~150: far over 1%
    p = snap.plan(flatten({"t": ts}))
    assert not p.copies.moves and p.copies.staging_bytes == p.total_bytes
    assert torch.equal(snap.snapshot(p, snap.Arena()), storage_by_storage(p))


def test_replan_of_a_tensor_moved_out_of_a_run_copies_its_new_bytes() -> None:
    buf, ts = back_to_back(300, 16)
    state = {"t": list(ts)}
    flat0 = flatten(state)
    p0, key0 = snap.plan(flat0), snap.plan_key(flat0)
    assert 150 in {p0.leaves[i].storage for i in range(len(ts))} and p0.copies.moves
    j = p0.leaves[150].storage
    assert j in p0.copies.in_run
    moved = ts[150].clone().add_(7)  # same layout, new storage elsewhere
    state["t"][150] = moved
    flat1 = flatten(state)
    key1 = snap.plan_key(flat1)
    p1 = snap.replan(p0, key0, flat1, key1)
    assert p1 is not None and j in p1.copies.fixups
    got = snap.snapshot(p1, snap.Arena())
    assert torch.equal(got, storage_by_storage(p1))
    assert torch.equal(got, snap.snapshot(snap.plan(flat1), snap.Arena()))
    ts[150].fill_(-5)  # the old tensor's bytes (still covered by the run) must not come back
    assert torch.equal(snap.snapshot(p1, snap.Arena()), storage_by_storage(p1))


def test_coalesced_state_saves_restores_and_respects_the_staging_cap(tmp_path: Path) -> None:
    torch.manual_seed(3)
    # Tensors created in a row by torch itself, as a model's small parameters are.
    state = {f"layer{i}": torch.randn(200 + 7 * (i % 100)) for i in range(600)}
    state["big"] = torch.randn(100_000)
    p = snap.plan(flatten(state))
    if not p.copies.moves:
        pytest.skip("this allocator did not place the tensors in a row")
    for cap, label in ((None, "loose"), (p.total_bytes, "cap between the stream and its gaps")):
        with ckptmirror.Mirror([str(tmp_path / label)], staging_bytes=cap, object_bytes=1 << 16) as m:
            m.reserve(None, extra=state)
            allocs = m.staging_allocations
            for step_ in (1, 2):
                for t in state.values():
                    t.add_(1)
                m.save_state(step_, {"model": None, "optim": None, "extra": state}).result()
                assert m.staging_allocations == allocs
                if cap is not None:
                    assert all(a.buffer.numel() <= cap for a in m._arenas._all)
                loaded = m.load_state(step_)
            assert loaded is not None
            assert_bit_exact(loaded[1]["extra"], state, label)


# ---------------------------------------------------------------- speculative staging (save/speculate.py)
def many_small(seed: int, n: int = 600) -> dict[str, torch.Tensor]:
    """Small tensors back to back in memory plus a large one: a coalesced plan, whatever the
    allocator did before."""
    _, small = back_to_back(n, 16, seed)
    state = {f"layer{i}": t for i, t in enumerate(small)}
    state["big"] = torch.randn(100_000, generator=torch.Generator().manual_seed(seed))
    return state


def test_speculative_staging_is_used_patched_or_thrown_away_and_always_saves_the_state_at_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = many_small(5)
    assert snap.plan(flatten({"model": None, "optim": None, "extra": state})).copies.gil_light
    outcomes: list[bool] = []
    real = speculate_mod.reuse_staged

    def spy(p: snap.Plan, copied: snap.Plan, staged: torch.Tensor) -> bool:
        outcomes.append(real(p, copied, staged))
        return outcomes[-1]

    monkeypatch.setattr(speculate_mod, "reuse_staged", spy)
    expected: dict[int, dict[str, torch.Tensor]] = {}
    with ckptmirror.Mirror([str(tmp_path / "ckpt")], keep_last=None) as m:
        m.reserve(None, extra=state)
        allocs = m.staging_allocations
        for step_, change in enumerate(["values", "values", "moved", "values", "reshaped", "values"], start=1):
            if change == "values":
                for t in state.values():
                    t.add_(1)
            elif change == "moved":  # a new tensor laid out as the old: the plan is patched
                state["layer300"] = state["layer300"].clone().mul_(3)
            else:  # another shape: the copy made by the last plan is thrown away
                state["layer7"] = torch.randn(17).double()
            m.save_state(step_, {"model": None, "optim": None, "extra": state}).result()
            expected[step_] = {k: v.clone() for k, v in state.items()}
        assert m.staging_allocations == allocs
        for step_, want in expected.items():
            loaded = m.load_state(step_)
            assert loaded is not None
            assert_bit_exact(loaded[1]["extra"], want, f"step {step_}")
    # every save but the first bet on the last plan: same plan, patched plan, other plan
    assert outcomes == [True, True, True, True, False, True]


def test_a_failed_speculation_or_a_bad_state_leaves_the_mirror_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = many_small(6)
    with ckptmirror.Mirror([str(tmp_path / "ckpt")]) as m:
        m.save_state(1, state).result()
        assert m._plan_cache is not None and m._plan_cache[1].copies.gil_light
        real_stage = mirror_mod.stage
        calls = {"n": 0}

        def failing_once(*a: Any, **k: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:  # the speculative copy, on the stager thread
                raise RuntimeError("copy failed")
            return real_stage(*a, **k)

        monkeypatch.setattr(speculate_mod, "stage", failing_once)  # the bet
        monkeypatch.setattr(mirror_mod, "stage", failing_once)  # the copy save() makes when it fails
        state["big"].fill_(2.0)
        m.save_state(2, state).result()  # staged again on the caller's thread
        assert calls["n"] == 2
        monkeypatch.undo()
        with pytest.raises(TypeError, match="bad"):
            m.save_state(3, {**state, "bad": object()})  # fails after the bet started
        assert len(m._arenas._free) == len(m._arenas._all)  # its arena came back
        state["big"].fill_(3.0)
        m.save_state(4, state).result()
        loaded = m.load_state(4)
    assert loaded is not None
    assert_bit_exact(loaded[1], state, "step 4")
