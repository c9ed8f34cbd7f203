"""Bounded staging memory: ``Mirror(staging_bytes=N)`` for states larger than what host RAM can stage.

* a state 5x the cap saves and restores bit-exact, and no staging arena grows past the cap;
* the step holds the values at the call, in the slices written before ``save()`` returned and in
  the one staged for the background alike (the caller changes every tensor right after);
* with compression and incremental saves, slices are compressed and referenced like any object;
* a replica failing in a slice written before ``save()`` returned fails that replica only;
* what cannot work is refused clearly (a cap below ``object_bytes``, overwrite).
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import assert_bit_exact, files_under

from ckptmirror import Mirror
from ckptmirror.replicas import FaultyReplica, LocalReplica

OBJ = 256 << 10
CAP = 1 << 20


def big_state(seed: int) -> dict[str, Any]:
    """~5 MiB in tensors of several sizes and dtypes (large ones cut in objects, small ones grouped)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {f"w{i}": torch.randn(256, 1024, generator=g) for i in range(4)}  # 4 x 1 MiB
    out["bf16"] = torch.randn(512, 512, generator=g).to(torch.bfloat16)  # 0.5 MiB
    out.update({f"small{i}": torch.randn(100 + i, generator=g) for i in range(50)})
    out["frozen"] = torch.arange(40_000, dtype=torch.float32)  # the same in every step
    return out


def arena_bytes(m: Mirror) -> int:
    return max(a.buffer.numel() for a in m._arenas._all)


def test_a_state_larger_than_the_cap_saves_and_restores_bit_exact(tmp_path: Path) -> None:
    state = big_state(1)
    want = {k: v.clone() for k, v in state.items()}
    with Mirror([str(tmp_path)], object_bytes=OBJ, staging_bytes=CAP) as m:
        h = m.save_state(1, state)
        # The values at the call: change every tensor the moment save() returns.
        for t in state.values():
            t.add_(1.0)
        h.result(timeout=60)
        assert arena_bytes(m) <= CAP
        assert h.stall_s is not None and h.nbytes > 4 * CAP
    with Mirror([str(tmp_path)]) as m:
        got = m.load_state(require=True)
    assert got is not None
    assert_bit_exact(got[1], want)


def test_slices_are_compressed_and_referenced_like_any_object(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    opts = {str(b): {"compression": "zstd"}}
    with Mirror([str(a), str(b)], object_bytes=OBJ, staging_bytes=CAP, storage_options=opts) as m:
        m.save_state(1, big_state(1)).result(timeout=60)
        second = big_state(1)  # identical: every object of step 2 references step 1's
        second["w0"] = second["w0"] + 1  # but one
        m.save_state(2, second).result(timeout=60)
    assert any(f.endswith(".zst") for f in files_under(b / "step-000000000001"))
    step2 = [f for f in files_under(a / "step-000000000002") if f.endswith(".bin")]
    assert 0 < len(step2) <= 4, step2  # w0's objects only
    for only in (a, b):
        with Mirror([str(only)]) as m:
            got = m.load_state(2, require=True)
        assert got is not None
        assert_bit_exact(got[1], second, f"from {only.name}: ")


def test_a_replica_failing_in_an_early_slice_fails_that_replica_only(tmp_path: Path) -> None:
    good = tmp_path / "good"
    bad = FaultyReplica(LocalReplica(str(tmp_path / "bad")), fail_put_at=1, fail_error=OSError(errno.EIO, "I/O error"))
    state = big_state(2)
    with Mirror([str(good), bad], object_bytes=OBJ, staging_bytes=CAP, health_interval_s=3600, min_replicas=1) as m:
        h = m.save_state(1, state)
        h.result(timeout=60)
        states = {u: st.state for u, st in h.replicas.items()}
    assert states == {str(good): "committed", bad.url: "failed"}
    with Mirror([str(good)]) as m:
        got = m.load_state(require=True)
    assert got is not None
    assert_bit_exact(got[1], state)


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="staging_bytes must be None or an int of at least object_bytes"):
        Mirror([str(tmp_path)], object_bytes=OBJ, staging_bytes=OBJ - 1)
    with Mirror([str(tmp_path)], object_bytes=OBJ, staging_bytes=CAP) as m:
        m.save_state(1, big_state(3)).result(timeout=60)
        with pytest.raises(ValueError, match="overwrite=True is not supported"):
            m.save_state(1, big_state(3), overwrite=True)
        # A state that fits is saved the usual way (one memcpy, nothing written before return).
        m.save_state(2, {"x": torch.ones(10)}).result(timeout=60)


def test_reserve_sizes_arenas_to_the_cap(tmp_path: Path) -> None:
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)])  # ~6 MiB
    with Mirror([str(tmp_path)], object_bytes=OBJ, staging_bytes=CAP) as m:
        assert m.reserve(model) > 5 * CAP
        assert arena_bytes(m) == CAP
        m.save(1, model).result(timeout=60)
        assert arena_bytes(m) == CAP
