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
pass afterwards; before the repair, ``verify`` says step 1 can be rebuilt. Also here: a damaged
commit record beside such a step, one self-contained replica repairing itself, and (unit level)
how repair orders and judges the sources of such a copy.
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import files_under

from ckptmirror import Mirror
from ckptmirror.checksum import checksum
from ckptmirror.errors import CorruptObjectError, ObjectMissingError, ReplicaError, ReplicaUnavailableError
from ckptmirror.format import commit_key, step_dir
from ckptmirror.ops import repair, verify
from ckptmirror.ops._engine import Engine
from ckptmirror.ops.repair import _fetch_any, _read_raw
from ckptmirror.placement import parse_placement
from ckptmirror.replicas import open_replica

OBJ = 64 << 10


def _state(step: int) -> dict[str, Any]:
    """A frozen base (the same in every step) and a small head that changes each step."""
    g = torch.Generator().manual_seed(0)
    base = {f"base.{i}": torch.randn(64, 1024, generator=g) for i in range(4)}  # 4 x 256 KiB
    h = torch.Generator().manual_seed(step)
    return {"model": {**base, "head.weight": torch.randn(64, 64, generator=h)}, "step": step}


def _placement(a: Path, step: int) -> tuple[bytes, str]:
    """The raw placement record of ``a``'s ``step`` and its key."""
    (pname,) = [f for f in files_under(a / step_dir(step)) if f.endswith(".place.json")]
    key = f"{step_dir(step)}/{pname}"
    return (a / key).read_bytes(), key


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

    # A dry run plans what the run does: the shared file on a counted once, for step 1.
    dry = repair([str(a), str(b)], dry_run=True)
    planned = sorted((x.step, x.bytes > 0) for x in dry.actions if Path(x.replica).name == "a" and x.action == "copy")
    assert planned == [(1, True), (2, False)], planned
    assert not any(x.done for x in dry.actions)

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


def test_a_damaged_commit_record_beside_a_rebuildable_step_is_damage_not_another_checkpoint(tmp_path: Path) -> None:
    """A third replica ``c`` (self-contained saves) lost the shared file and its step-1 commit
    record has one flipped digit in a pinned checksum (it still parses). The record that verifies
    (``a``'s) does so only by content: the file it lacks verifies under step 2's name on ``b``.

    That record is still the evidence that ``c``'s is damaged: ``invalid``, which repair replaces.
    Judged by names alone it was called another checkpoint (``disagree``): verify said repair
    could rebuild step 1 while telling the operator to delete a copy, and repair refused (exit 1).
    """
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    whole = {str(b): {"incremental": False}, str(c): {"incremental": False}}
    with Mirror([str(a), str(b), str(c)], object_bytes=OBJ, storage_options=whole) as m:
        for s in (1, 2):
            m.save_state(s, _state(s)).result(timeout=60)
    shared = _shared_file(a)
    p = a / shared
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    shutil.rmtree(b / step_dir(1))
    (c / shared).unlink()
    record = c / commit_key(1)
    text = record.read_text()
    pin = re.search(r"xxh3_64:([0-9a-f]{16})", text)
    assert pin is not None
    digit = pin.group(0)[-1]
    record.write_text(text.replace(pin.group(0), pin.group(0)[:-1] + ("0" if digit != "0" else "1"), 1))

    before = verify([str(a), str(b), str(c)])
    on_c = [
        (d.step, d.kind, d.key) for d in before.damage if Path(d.replica).name == "c" and d.key.endswith("COMMIT.json")
    ]
    assert on_c == [(1, "invalid", commit_key(1))], on_c
    assert {st.step: (st.recoverable, st.rebuildable) for st in before.steps} == {1: (False, True), 2: (True, False)}

    fixed = repair([str(a), str(b), str(c)])
    unrec = [(p.step, Path(p.replica).name, p.kind, p.key) for p in fixed.unrecoverable]
    assert (fixed.exit_code, unrec) == (0, []), unrec
    after = verify([str(a), str(b), str(c)])
    assert after.exit_code == 0, [(d.step, d.replica, d.kind, d.key) for d in after.damage]


def test_one_self_contained_replica_repairs_itself_from_another_steps_copy(tmp_path: Path) -> None:
    """One replica of self-contained saves: a frozen base file of step 1 is damaged, and step 2
    holds the same bytes under its own name. ``ckptmirror verify`` (the real command) says repair
    can fix it although there is no other replica, and ``ckptmirror repair`` does."""
    a = tmp_path / "a"
    with Mirror([str(a)], object_bytes=OBJ, storage_options={str(a): {"incremental": False}}) as m:
        for s in (1, 2):
            m.save_state(s, _state(s)).result(timeout=60)
    assert not any(f.endswith(".place.json") for f in files_under(a / step_dir(2)))
    # The first object of step 1 is the first base tensor's bytes (the same in step 2).
    objs = sorted(f for f in files_under(a / step_dir(1)) if f.endswith(".bin"))
    p = a / step_dir(1) / objs[0]
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))

    before = verify([str(a)])
    assert {st.step: (st.recoverable, st.rebuildable) for st in before.steps} == {1: (False, True), 2: (True, False)}
    cmd = [sys.executable, "-m", "ckptmirror"]
    out = subprocess.run([*cmd, "verify", str(a)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "'ckptmirror repair' can fix them" in out.stdout, out.stdout
    fixed = subprocess.run([*cmd, "repair", str(a)], capture_output=True, text=True, timeout=120)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert verify([str(a)]).exit_code == 0


class _Down:
    """A replica that cannot be reached (in-process stand-in, unit level)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, key: str, size: int) -> bytes:
        raise ReplicaUnavailableError("timed out", replica=self.url, key=key)


class _Gone:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, key: str, size: int) -> bytes:
        raise ObjectMissingError("not found", replica=self.url, key=key)


class _Holds:
    def __init__(self, url: str, data: bytes) -> None:
        self.url, self.data = url, data

    def get(self, key: str, size: int) -> bytes:
        return self.data


def test_a_copy_whose_sources_are_all_out_of_reach_is_an_outage_not_damage() -> None:
    """Every source of an object (its own name and a twin) timed out: repair must report an
    outage (a later run can get past it), not "no replica holds a verifying copy"."""
    groups: list[tuple[str, Any]] = [("k1", [_Down("s3://x")]), ("k2", [_Down("/p")])]
    with pytest.raises(ReplicaUnavailableError):
        _read_raw("k1", 4, checksum(b"abcd"), groups)
    # Gone from one source, out of reach on the other: an outage, by restore's rule (nothing
    # was read and failed its check).
    gone = [("k1", [_Gone("/b")]), ("k2", [_Down("s3://c")])]
    with pytest.raises(ReplicaUnavailableError):
        _read_raw("k1", 4, checksum(b"abcd"), gone)
    # One damaged source among them: damage it is.
    groups.append(("k3", [_Holds("/q", b"abce")]))
    with pytest.raises(CorruptObjectError):
        _read_raw("k1", 4, checksum(b"abcd"), groups)
    assert _read_raw("k1", 4, checksum(b"abcd"), [*groups, ("k4", [_Holds("/r", b"abcd")])])[1:] == ("/r", "k4")

    class _Shared:
        def __init__(self, errors: list[BaseException]) -> None:
            self.errors = errors

        def fetch_into(self, name: str, csum: str, sources: Any, out: memoryview) -> str:
            raise self.errors.pop(0)

    class _Eng:
        def __init__(self, errors: list[BaseException]) -> None:
            self.shared = _Shared(errors)

    out = memoryview(bytearray(4))
    down: list[BaseException] = [ReplicaUnavailableError("timed out", replica="/p", key=k) for k in ("k1", "k2")]
    mixed = [down[0], CorruptObjectError("checksum mismatch", replica="/q", key="k2")]
    with pytest.raises(ReplicaUnavailableError):
        _fetch_any(_Eng(down), "k1", "c", [("k1", []), ("k2", [])], out)  # type: ignore[arg-type]
    with pytest.raises(CorruptObjectError):
        _fetch_any(_Eng(mixed), "k1", "c", [("k1", []), ("k2", [])], out)  # type: ignore[arg-type]


def test_copy_sources_reads_the_targets_own_twin_last(tmp_path: Path) -> None:
    """The same bytes under other names on the target and on another replica: the other
    replica's copy is tried first (a slow read on the target would count against the target)."""
    t, o, p = (open_replica(str(tmp_path / n)) for n in ("t", "o", "p"))
    eng = Engine([t, o, p], 1, quick=False, progress=None)
    try:
        eng._mark_good(t.url, "s1/x", 4, "c")  # the target's own twin, preferred replica first
        eng._mark_good(t.url, "s2/x", 4, "c")
        eng._mark_good(o.url, "s2/x", 4, "c")
        eng._mark_good(p.url, "s0/x", 4, "c")  # a third replica's, under a third name
        groups = [(k, [r.url for r in reps]) for k, reps in eng.copy_sources("s3/x", 4, "c", t)]
        assert groups == [("s2/x", [o.url]), ("s0/x", [p.url]), ("s1/x", [t.url]), ("s2/x", [t.url])], groups
    finally:
        eng.close()


def test_a_step_whose_copy_cannot_be_read_is_not_called_rebuildable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The only replica's copy of a step-1 object cannot be read (EIO, injected in-process);
    its bytes verify under step 2's name. Repair never overwrites a copy it could not read, so
    verify must not say the step can be rebuilt (it did, and repair then refused it)."""
    from ckptmirror.cli.render import _verify_lines
    from ckptmirror.replicas import local

    a = tmp_path / "a"
    with Mirror([str(a)], object_bytes=OBJ, storage_options={str(a): {"incremental": False}}) as m:
        for s in (1, 2):
            m.save_state(s, _state(s)).result(timeout=60)
    bad = f"{step_dir(1)}/{sorted(f for f in files_under(a / step_dir(1)) if f.endswith('.bin'))[0]}"
    read_into, get = local.LocalReplica.read_into, local.LocalReplica.get

    def eio(self: Any, key: str) -> None:
        if key == bad:
            raise ReplicaError("read failed: [EIO] Input/output error", replica=self.url, key=key, errno=errno.EIO)

    monkeypatch.setattr(
        local.LocalReplica, "read_into", lambda self, key, out: eio(self, key) or read_into(self, key, out)
    )
    monkeypatch.setattr(local.LocalReplica, "get", lambda self, key, n: eio(self, key) or get(self, key, n))
    before = verify([str(a)])
    assert [(d.step, d.kind) for d in before.damage] == [(1, "unreadable")]
    assert {st.step: (st.recoverable, st.rebuildable) for st in before.steps} == {1: (False, False), 2: (True, False)}
    assert "repair' can fix" not in _verify_lines(before)[-1]
    assert repair([str(a)]).exit_code == 1


def test_two_objects_of_one_step_in_one_file_are_copied_once_dry_run_alike(tmp_path: Path) -> None:
    """Equal objects of one step share one file on an incremental replica (stored once, under
    step 1's name). Its damage is repaired by one copy: the dry run says what the run does, and
    the run does not copy the file twice from two pool threads at once."""
    a, b = tmp_path / "a", tmp_path / "b"

    def zeros(step: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        base = {f"zero.{i}": torch.zeros(64, 256) for i in range(2)}  # 2 x 64 KiB, equal bytes
        base.update({f"rnd.{i}": torch.randn(64, 256, generator=g) for i in range(2)})
        return {"model": {**base, "head.weight": torch.randn(64, 64, generator=torch.Generator().manual_seed(step))}}

    with Mirror([str(a), str(b)], object_bytes=OBJ, storage_options={str(b): {"incremental": False}}) as m:
        for s in (1, 2):
            m.save_state(s, zeros(s)).result(timeout=60)
    refs = parse_placement(*_placement(a, 2)).references()
    counts = {k: sum(1 for e in parse_placement(*_placement(a, 2)).entries.values() if e.key == k) for k in refs}
    shared = [k for k, n in counts.items() if n > 1]
    assert len(shared) == 1, counts  # the zero tensors: one file for two objects
    p = a / shared[0]
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))

    def moved(res: Any) -> list[int]:
        return sorted(x.bytes for x in res.actions if x.action == "copy" and Path(x.replica).name == "a")

    dry = repair([str(a), str(b)], step=2, dry_run=True)
    real = repair([str(a), str(b)], step=2, threads=4)
    assert moved(dry) == moved(real) == [0, 64 << 10], (moved(dry), moved(real))
    assert real.exit_code == 0
    assert verify([str(a), str(b)]).exit_code == 0
