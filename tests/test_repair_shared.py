"""``repair`` of a file that several steps share (incremental saves).

Replica ``a`` takes incremental saves: its step 2 keeps the frozen base objects under step 1's
names (its placement record references them). Replica ``b`` takes self-contained saves
(``{"incremental": False}``): its step 2 holds the same bytes raw under step 2's own names.
One base file of step 1 is damaged on ``a`` (which damages step 1 and step 2 there) and step 1 is
lost on ``b`` (its whole directory, or only that file). The only verifying copy of those bytes
is then ``b``'s step-2 object, under another step's name.

A single repair has everything it needs: it copies ``b``'s step-2 object to ``a``, which puts
it where ``a`` keeps it, under step 1's name, so ``a``'s step 1 verifies again, and ``b`` can
be given its step 1 (that object from its own step-2 twin). Repair must say so (exit 0, nothing
unrecoverable), write the shared file once, leave nothing for a second run, and ``verify`` must
pass afterwards; before the repair, ``verify`` says step 1 can be rebuilt.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import files_under

from ckptmirror import Mirror
from ckptmirror.format import step_dir
from ckptmirror.ops import repair, verify
from ckptmirror.placement import parse_placement

OBJ = 64 << 10


def _state(step: int) -> dict[str, Any]:
    """A frozen base (the same in every step) and a small head that changes each step."""
    g = torch.Generator().manual_seed(0)
    base = {f"base.{i}": torch.randn(64, 1024, generator=g) for i in range(4)}  # 4 x 256 KiB
    h = torch.Generator().manual_seed(step)
    return {"model": {**base, "head.weight": torch.randn(64, 64, generator=h)}, "step": step}


def _shared_file(a: Path) -> str:
    """A step-1 file that ``a``'s step 2 references (its placement record says so)."""
    (pname,) = [f for f in files_under(a / step_dir(2)) if f.endswith(".place.json")]
    key = f"{step_dir(2)}/{pname}"
    refs = sorted(parse_placement((a / key).read_bytes(), key).references())
    assert refs and all(k.startswith(step_dir(1) + "/") for k in refs), refs
    return refs[0]


@pytest.mark.parametrize("loss", ["step-dir", "file"])
def test_repair_rebuilds_a_shared_file_once_and_reports_it_repaired(tmp_path: Path, loss: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with Mirror([str(a), str(b)], object_bytes=OBJ, storage_options={str(b): {"incremental": False}}) as m:
        for s in (1, 2):
            m.save_state(s, _state(s)).result(timeout=60)
    shared = _shared_file(a)
    # b's step 2 holds those bytes raw under its own name: b took self-contained saves.
    assert not any(f.endswith(".place.json") for f in files_under(b / step_dir(2)))

    # Flip a byte of the shared file on a: a's steps 1 and 2 are both damaged.
    p = a / shared
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    if loss == "step-dir":
        shutil.rmtree(b / step_dir(1))  # b lags on step 1
    else:
        (b / shared).unlink()  # b's step 1 is committed but misses the file

    before = verify([str(a), str(b)])
    assert before.exit_code != 0
    assert {(d.step, Path(d.replica).name) for d in before.damage} >= {(1, "a"), (2, "a")}

    # Step 1 is not restorable as stored, but verify says repair can rebuild it.
    assert {st.step: (st.recoverable, st.rebuildable) for st in before.steps} == {1: (False, True), 2: (True, False)}

    first = repair([str(a), str(b)])
    unrec = [(p.step, Path(p.replica).name, p.kind, p.key, p.detail) for p in first.unrecoverable]
    errors = [(x.step, x.key, x.error) for x in first.actions if x.error]
    # The bytes of the shared file verify on b (under step 2's name): everything is repairable in
    # one run. Observed: exit 1, step 1 on a "corrupt here and no other replica holds a verifying
    # copy" (although this very run rewrote that file, copying a's step-2 object) and step 1 on b
    # "no replica holds a complete verifying copy of this step" / "missing here ...".
    assert (first.exit_code, unrec, errors) == (0, [], []), (
        first.exit_code,
        unrec,
        errors,
        [(x.step, Path(x.replica).name, x.key, x.action) for x in first.actions],
    )

    # The shared file on a is written once, for step 1; step 2's copy, which resolves to the
    # same file there (a's placement record), finds it rewritten and moves nothing.
    on_a = sorted((x.step, x.bytes > 0) for x in first.actions if Path(x.replica).name == "a" and x.action == "copy")
    assert on_a == [(1, True), (2, False)], on_a
    assert all(x.done for x in first.actions)

    # After a run that reported success, verify passes and a second run has nothing left to do.
    after = verify([str(a), str(b)])
    assert after.exit_code == 0, [(d.step, d.replica, d.kind, d.key) for d in after.damage]
    second = repair([str(a), str(b)])
    assert (second.exit_code, second.actions, second.unrecoverable) == (0, (), ()), [
        (x.step, Path(x.replica).name, x.key, x.action) for x in second.actions
    ]
