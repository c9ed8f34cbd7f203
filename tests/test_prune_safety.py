"""``ckptmirror prune`` and retention must never remove what still matters.

Each test is one finding of the operator-command audit, on real local replicas (a peer agent for
pin records on a peer), through the real command line or the ops API:

- the guard that justifies removing committed steps reads the kept step in full: a same-size bit
  flip in the newest step used to pass its presence-and-size check, and ``prune --keep 1`` then
  removed every older step that still restored;
- a placement record of a kept step that cannot be read keeps the files of the steps prune
  would remove, and prune says so (exit 1, naming the record) instead of reporting them removed;
  the CLI shows WARNINGs of prune and repair without ``-v``;
- steps a job pinned (``Mirror.pin``: Lightning's best checkpoint) are recorded on the replicas
  and kept by ``prune`` (``--ignore-pins`` removes them);
- a torn directory that a repair commits while prune runs is left alone (its commit record is
  looked for right before its files go);
- a replica that stops answering while prune plans is asked nothing more (exit 2).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _agent import TOKEN
from _helpers import files_under

from ckptmirror import Mirror, ops
from ckptmirror.errors import ReplicaUnavailableError
from ckptmirror.format import commit_key, pin_key, step_dir
from ckptmirror.replicas import LocalReplica, open_replica
from ckptmirror.save.retention import PlacementUnreadable, remove_steps

OBJ = 1024  # bytes per object: each step is a few objects
INC_OBJ = 64 << 10


def state(step: int) -> dict[str, Any]:
    """A small state, different in every byte from step to step (no incremental references)."""
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 16, generator=g), "b": torch.randn(16, generator=g), "step": step}


def frozen_base_state(step: int) -> dict[str, Any]:
    """A frozen base (the same in every step: later steps reference it) and a new head."""
    g = torch.Generator().manual_seed(0)
    base = {f"base.{i}": torch.randn(64, 1024, generator=g) for i in range(4)}
    h = torch.Generator().manual_seed(step)
    return {"model": {**base, "head": torch.randn(64, 64, generator=h)}, "step": step}


def save(urls: list[Path], steps: list[int], obj: int = OBJ, make: Any = state, **kw: Any) -> None:
    with Mirror([str(u) for u in urls], object_bytes=obj, **kw) as m:
        for s in steps:
            m.save_state(s, make(s)).result(timeout=60)


def cli(*args: Any) -> subprocess.CompletedProcess[str]:
    """``python -m ckptmirror ARGS``; never raises on a non-zero status."""
    return subprocess.run(
        [sys.executable, "-m", "ckptmirror", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def committed(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "COMMIT.json").exists())


def flip_middle(p: Path) -> None:
    """Flip one bit in the middle of ``p``: the same size, another checksum."""
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def an_object(root: Path, step: int) -> Path:
    objs = sorted((root / step_dir(step)).glob("rank-*/o*.bin"))
    assert objs, f"no object of step {step} under {root}"
    return objs[len(objs) // 2]


# ------------------------------------------------------------------ the guard reads one step in full


def test_prune_removes_nothing_committed_when_the_kept_step_is_bit_rotted(tmp_path: Path) -> None:
    a = tmp_path / "a"
    save([a], [10, 20, 30])
    flip_middle(an_object(a, 30))  # same size: a presence-and-size check passes it

    r = cli("prune", a, "--keep", "1", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["refused"] and "verifies" in doc["refused"], doc
    assert doc["replicas"][0]["removed_steps"] == []
    assert committed(a) == [10, 20, 30]  # the older steps still restore: they stay

    # Damage wins over an outage (as in verify): a replica that does not answer beside it does
    # not turn the refusal into exit 2, which a script would retry instead of acting on.
    from _helpers import free_port

    down = f"peer://127.0.0.1:{free_port()}/run"
    r = cli("prune", a, down, "--keep", "1", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["refused"] and doc["refused_for_damage"] and down in doc["unreachable"], doc

    # --keep 2: the newest kept step fails, the next one (20) verifies in full and justifies
    # removing 10.
    r2 = cli("prune", a, "--keep", "2", "--json")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert json.loads(r2.stdout)["replicas"][0]["removed_steps"] == [10]
    assert committed(a) == [20, 30]


# ----------------------------------------------------------- an unreadable placement record of a kept step


def test_prune_says_it_kept_steps_when_a_kept_placement_record_is_unreadable(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    save([a, b], [1, 2, 3], obj=INC_OBJ, make=frozen_base_state)
    (place,) = sorted((a / step_dir(3)).glob("*.place.json"))
    flip_middle(place)
    before = files_under(a)

    r = cli("prune", a, b, "--keep", "1", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    res = {p["replica"]: p for p in json.loads(r.stdout)["replicas"]}
    on_a = res[str(a)]
    assert on_a["removed_steps"] == [] and on_a["kept"] == [1, 2, 3], on_a
    (err,) = on_a["errors"]
    assert place.relative_to(a).as_posix() in err and "ckptmirror repair" in err and "ckptmirror verify" in err
    assert files_under(a) == before  # nothing of a went, not even a commit record
    assert res[str(b)]["removed_steps"] == [1, 2] and committed(b) == [3]

    # The removal pass prune runs says that it kept the files (keep_last's pass logs it).
    with pytest.raises(PlacementUnreadable, match="ckptmirror repair") as info:
        remove_steps(LocalReplica(str(a)), [1], raise_unreadable=True)
    assert info.value.key == place.relative_to(a).as_posix()
    step1 = [f for f in before if f.startswith(step_dir(1) + "/")]
    assert [f for f in files_under(a) if f.startswith(step_dir(1) + "/")] == [f for f in step1 if f != commit_key(1)]


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """Put the ``ckptmirror`` logger back as it was after the CLI set it up in this process."""
    log = logging.getLogger("ckptmirror")
    level, propagate, handlers = log.level, log.propagate, list(log.handlers)
    yield
    for h in [h for h in log.handlers if h not in handlers]:
        log.removeHandler(h)
    log.setLevel(level)
    log.propagate = propagate


@pytest.mark.usefixtures("cli_logging")
@pytest.mark.parametrize("command", ["prune", "repair"])
def test_prune_and_repair_show_warnings_without_verbose(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from ckptmirror.cli import main

    a = tmp_path / "a"
    save([a], [1])
    args = [command, str(a)] + (["--keep", "1"] if command == "prune" else ["--no-progress"])
    assert main(args) == 0
    log = logging.getLogger("ckptmirror")
    assert log.level == logging.WARNING  # INFO stays behind -v
    log.warning("a warning of the library")
    assert "ckptmirror: WARNING: a warning of the library" in capsys.readouterr().err
    assert main([*args, "-v"]) == 0 and log.level == logging.INFO


# --------------------------------------------------------------------------------------- pins


def test_prune_keeps_the_steps_the_job_pinned(tmp_path: Path) -> None:
    a = tmp_path / "a"
    with Mirror([str(a)], keep_last=2, object_bytes=OBJ) as m:
        for s in range(6):
            m.save_state(s, state(s)).result(timeout=60)
            if s == 1:
                m.pin(1)  # "best" checkpoint
        m.wait()
        assert m.steps() == [1, 4, 5]
    record = json.loads((a / pin_key(1)).read_bytes())
    assert record["format"] == "ckptmirror-pin" and record["step"] == 1 and record["version"] == 1

    r = cli("prune", a, "--keep", "2", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    (p,) = json.loads(r.stdout)["replicas"]
    assert p["pinned"] == [1] and p["kept"] == [1, 4, 5] and p["removed_steps"] == [], p
    assert committed(a) == [1, 4, 5]
    # The record is no step and no garbage: ls and verify see steps 1, 4, 5 only, all fine.
    v = ops.verify([str(a)])
    assert v.exit_code == 0 and [s.step for s in v.steps] == [1, 4, 5]
    assert [s.step for s in ops.ls([str(a)]).steps] == [1, 4, 5]

    text = cli("prune", a, "--keep", "1", "--dry-run")
    assert text.returncode == 0 and "pinned" in text.stdout and "Mirror.pin" in text.stdout, text.stdout
    r2 = cli("prune", a, "--keep", "2", "--ignore-pins", "--json")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert json.loads(r2.stdout)["replicas"][0]["removed_steps"] == [1]
    assert committed(a) == [4, 5]


def test_unpin_and_delete_remove_the_pin_record(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with Mirror([str(a), str(b)], object_bytes=OBJ) as m:
        for s in (1, 2, 3):
            m.save_state(s, state(s)).result(timeout=60)
        m.pin(1)
        m.pin(2)
        m.wait()
        assert all((r / pin_key(s)).is_file() for r in (a, b) for s in (1, 2))
        m.unpin(1)
        m.delete(2)
        m.wait()
        assert not any((r / pin_key(s)).exists() for r in (a, b) for s in (1, 2))
    res = ops.prune([str(a), str(b)], keep=1)
    assert res.exit_code == 0 and all(p.removed_steps == (1,) and p.pinned == () for p in res.replicas)


def test_a_pin_outlives_the_job_and_an_unpin_in_a_later_run_removes_it(tmp_path: Path) -> None:
    a = tmp_path / "a"
    with Mirror([str(a)], object_bytes=OBJ, keep_last=2) as m:
        m.save_state(1, state(1)).result(timeout=60)
        m.pin(1)
        for s in (2, 3):
            m.save_state(s, state(s)).result(timeout=60)
    assert committed(a) == [1, 2, 3]
    # The job restarts and saves on: its retention keeps the step an earlier run pinned (it
    # deleted it: the pin lived in the first process only), as prune does.
    with Mirror([str(a)], object_bytes=OBJ, keep_last=2) as m:
        for s in (4, 5):
            m.save_state(s, state(s)).result(timeout=60)
    assert committed(a) == [1, 4, 5]
    # A later run unpins it (it never pinned it itself): the record goes, and retention with it.
    with Mirror([str(a)], object_bytes=OBJ, keep_last=2) as m:
        m.unpin(1)
        m.save_state(6, state(6)).result(timeout=60)
    assert not (a / pin_key(1)).exists()
    assert committed(a) == [5, 6]


def test_pin_refuses_a_step_out_of_range_and_retention_goes_on(tmp_path: Path) -> None:
    with Mirror([str(tmp_path)], object_bytes=OBJ, keep_last=2) as m:
        for bad in (-1, 10**12, 1.5, "3"):
            with pytest.raises(ValueError, match="pin/unpin: step"):
                m.pin(bad)  # type: ignore[arg-type]
        for s in range(1, 5):
            m.save_state(s, state(s)).result(timeout=60)
    assert committed(tmp_path) == [3, 4]  # one bad pin once stopped every later retention pass
    with pytest.raises(RuntimeError, match="closed"):
        m.pin(3)


class FailPins(LocalReplica):
    """A local replica whose first pin record write fails (a transient error)."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.failed = 0

    def put(self, key: str, data: Any, *, sync_dir: bool = True) -> None:
        if key.startswith("pins/") and not self.failed:
            self.failed += 1
            raise ReplicaUnavailableError("injected: no answer within its time budget", replica=self.url, key=key)
        super().put(key, data, sync_dir=sync_dir)


def test_a_failed_pin_record_is_a_warning_and_written_after_the_next_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = FailPins(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ckptmirror"), Mirror([r], object_bytes=OBJ) as m:
        m.save_state(1, state(1)).result(timeout=60)
        m.wait()  # step 1's retention pass is done
        m.pin(1)  # returns at once; the write fails in the background
        m.wait()
        assert r.failed == 1 and not (tmp_path / pin_key(1)).exists()
        assert any("pin record of step 1" in rec.getMessage() for rec in caplog.records), caplog.text
        m.save_state(2, state(2)).result(timeout=60)
        m.wait()
    assert (tmp_path / pin_key(1)).is_file()


def test_pin_records_on_a_peer_agent(peer_url: str) -> None:
    so = {"peer": {"token": TOKEN}}
    with Mirror([peer_url], keep_last=1, object_bytes=OBJ, storage_options=so) as m:
        m.save_state(1, state(1)).result(timeout=60)
        m.pin(1)
        for s in (2, 3):
            m.save_state(s, state(s)).result(timeout=60)
        m.wait()
    peer = open_replica(peer_url, so["peer"])
    try:
        assert peer.list_prefix("pins") == [pin_key(1)]
        res = ops.prune([peer_url], keep=1, storage_options=so)
        assert res.exit_code == 0, res
        (p,) = res.replicas
        assert p.pinned == (1,) and p.kept == (1, 3) and p.removed_steps == ()
    finally:
        peer.close()


# ---------------------------------------------------------------- a torn step committed meanwhile


class CommitsMeanwhile(LocalReplica):
    """A local replica on which a "repair" commits torn step ``step`` (copies ``commit``) just
    after prune listed that step's directory, before the removal pass lists the steps again."""

    def __init__(self, root: str, step: int, commit: bytes) -> None:
        super().__init__(root)
        self.step, self.commit_bytes = step, commit
        self.listed = self.committed = False

    def list_prefix(self, prefix: str) -> list[str]:
        if prefix.rstrip("/") == step_dir(self.step):
            self.listed = True
        return super().list_prefix(prefix)

    def list_steps(self) -> list[str]:
        if self.listed and not self.committed:
            self.committed = True
            self.commit(commit_key(self.step), self.commit_bytes)
        return super().list_steps()


def test_prune_leaves_a_torn_step_that_got_committed_meanwhile(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    save([a, b], [1, 2, 3])
    (a / commit_key(2)).unlink()  # a lags: its step 2 is torn there (a writer died between commits)
    r = CommitsMeanwhile(str(a), 2, (b / commit_key(2)).read_bytes())

    res = ops.prune([r], keep=3)
    assert r.committed, "the commit did not happen between the listing and the removal"
    (p,) = res.replicas
    assert p.removed_torn == () and p.committed_meanwhile == (2,), p
    assert res.exit_code == 0
    assert committed(a) == [1, 2, 3]
    assert ops.verify([str(a)]).exit_code == 0  # step 2's files are all there


# ------------------------------------------------------------- a replica that stops answering


class GoesDown(LocalReplica):
    """A local replica that stops answering (every operation fails as an outage) from the first
    listing of step ``step``'s directory on; ``after`` counts the operations asked after that."""

    def __init__(self, root: str, step: int) -> None:
        super().__init__(root)
        self.step = step
        self.down = False
        self.after = 0

    def _out(self, key: str) -> None:
        if self.down:
            self.after += 1
            raise ReplicaUnavailableError("injected: no answer within its time budget", replica=self.url, key=key)

    def list_prefix(self, prefix: str) -> list[str]:
        if prefix.rstrip("/") == step_dir(self.step):
            self.down = True
        self._out(prefix)
        return super().list_prefix(prefix)

    def list_steps(self) -> list[str]:
        self._out("")
        return super().list_steps()

    def get(self, key: str, max_bytes: int) -> bytes:
        self._out(key)
        return super().get(key, max_bytes)

    def size(self, key: str) -> int | None:
        self._out(key)
        return super().size(key)

    def read_into(self, key: str, out: memoryview) -> None:
        self._out(key)
        super().read_into(key, out)

    def delete(self, key: str) -> None:
        self._out(key)
        super().delete(key)

    def delete_prefix(self, prefix: str) -> None:
        self._out(prefix)
        super().delete_prefix(prefix)


def test_prune_asks_a_replica_that_stopped_answering_nothing_more(tmp_path: Path) -> None:
    a = tmp_path / "a"
    save([a], [10, 20, 30, 40])
    r = GoesDown(str(a), 30)  # kept with --keep 2; the guard reads 40 only (it verifies)

    res = ops.prune([r], keep=2)
    assert r.down
    assert r.after == 1, f"{r.after} operations asked of a replica that had stopped answering"
    assert res.exit_code == 2
    (p,) = res.replicas
    assert p.stopped and "injected" in p.stopped
    assert p.removed_steps == () and any("removing steps 10, 20 not tried" in e for e in p.errors), p.errors
    assert committed(a) == [10, 20, 30, 40]


def test_prune_renders_a_stopped_replica(tmp_path: Path) -> None:
    from ckptmirror.cli.render import _prune_lines

    a = tmp_path / "a"
    save([a], [10, 20, 30])
    res = ops.prune([GoesDown(str(a), 20)], keep=1)
    text = "\n".join(_prune_lines(res))
    assert "STOPPED" in text and "stopped answering" in text, text


# ------------------------------------------------------------------ files other steps reference


def test_prune_keeps_files_of_a_kept_step_that_a_later_step_references(tmp_path: Path) -> None:
    # Step 10 saved, step 11 references its objects (incremental), step 10 saved again over
    # them (overwrite=True): the first save's files are no garbage while step 11 needs them.
    frozen = torch.arange(4096, dtype=torch.float32)

    def st(s: int, base: torch.Tensor) -> dict[str, Any]:
        return {"frozen": base, "w": torch.full((64,), float(s)), "step": s}

    with Mirror([str(tmp_path)], object_bytes=OBJ, keep_last=None) as m:
        m.save_state(10, st(10, frozen)).result(timeout=60)
        m.save_state(11, st(11, frozen)).result(timeout=60)
        m.save_state(10, st(10, frozen * 2), overwrite=True).result(timeout=60)
    assert ops.verify([str(tmp_path)]).exit_code == 0
    listed = ops.ls([str(tmp_path)])
    assert all(not info.garbage for info in listed.steps), [info.garbage for info in listed.steps]
    res = ops.prune([str(tmp_path)], keep=5)
    assert res.exit_code == 0 and res.replicas[0].removed_garbage == (), res
    assert ops.verify([str(tmp_path)]).exit_code == 0


def test_prune_keeps_what_a_step_committed_meanwhile_references(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Step 1 dropped (its directory kept for what later steps reference), step 2 torn here (a
    # lagging copy) referencing two of step 1's objects, step 3 referencing one of them. A repair
    # commits step 2 while prune runs: the leftovers prune planned from step 1's directory
    # without step 2's references must stay.
    import importlib

    retention = importlib.import_module("ckptmirror.save.retention")
    x, y = torch.arange(256, dtype=torch.float32), torch.arange(256, dtype=torch.float32) + 1000

    def st(a: torch.Tensor, b: torch.Tensor, z: int) -> dict[str, Any]:
        return {"a": a, "b": b, "c": torch.full((256,), float(z))}

    with Mirror([str(tmp_path)], object_bytes=OBJ, keep_last=None) as m:
        m.save_state(1, st(x, y, 1)).result(timeout=60)
        m.save_state(2, st(x, y, 2)).result(timeout=60)
        m.save_state(3, st(x, y + 5, 3)).result(timeout=60)
    record = (tmp_path / commit_key(2)).read_bytes()
    (tmp_path / commit_key(2)).unlink()
    (tmp_path / commit_key(1)).unlink()
    real = retention.is_committed

    def is_committed(replica: Any, step: int) -> bool:
        if step == 2 and not (tmp_path / commit_key(2)).exists():
            (tmp_path / commit_key(2)).write_bytes(record)  # "repair" commits step 2 right now
        return bool(real(replica, step))

    monkeypatch.setattr(retention, "is_committed", is_committed)
    res = ops.prune([str(tmp_path)], keep=1)
    monkeypatch.setattr(retention, "is_committed", real)
    assert res.replicas[0].committed_meanwhile == (2,), res
    v = ops.verify([str(tmp_path)])
    assert v.exit_code == 0, [str(p) for p in v.problems]


class _RepairDuringDelete(LocalReplica):
    """A local replica where a repair writes step 2's commit record while prune deletes the
    files of that torn step (after prune looked for a commit record, before it was done)."""

    record: bytes = b""

    def delete_prefix(self, prefix: str) -> None:
        super().delete_prefix(prefix)
        if prefix.startswith(step_dir(2)) and self.record:
            super().commit(commit_key(2), self.record)
            self.record = b""


def test_prune_reports_a_torn_step_committed_while_its_files_went(tmp_path: Path) -> None:
    save([tmp_path], [1, 2, 3])
    r = _RepairDuringDelete(str(tmp_path))
    r.record = (tmp_path / commit_key(2)).read_bytes()
    (tmp_path / commit_key(2)).unlink()  # torn here: prune removes it
    res = ops.prune([r], keep=2)
    (p,) = res.replicas
    assert res.exit_code == 1 and 2 not in p.removed_torn, res
    assert any("got a commit record while its files were removed" in e for e in p.errors), p.errors
