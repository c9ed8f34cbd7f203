"""Operator commands against replicas that change under them, and the exit codes of their mistakes.

Found by an audit of the operator commands next to a real trainer:

- ``ls`` against a replica that stops answering after the initial listing (a ``ckptmirror
  serve`` agent behind a proxy that turns into a black hole): it must ask that replica nothing
  more (one time budget, not one per step and object) and exit 2 naming it;
- ``verify`` while a job saves with ``keep_last``: a step its retention deletes during the check
  is "removed during the check", not damage; a step that commits on a replica during the check
  is checked again, not "lagging";
- a missing S3 bucket or a wrong peer token is a configuration error: exit 2, as documented;
- a replica that holds nothing at all (a mistyped namespace) is named as empty by ``ls``;
- ``repair`` with an unreachable replica does not say "nothing to repair".

Every replica is real: local directories, the session's moto server, ``ckptmirror serve``
agents (``tests/_agent.py``).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _agent import TOKEN, AgentProc, TcpProxy, serve_command, wait_until

import ckptmirror
from ckptmirror import ops
from ckptmirror.format import commit_key, step_dir

# The modules (``ckptmirror.ops.ls`` is also the name of the function the package exports).
ls_module = importlib.import_module("ckptmirror.ops.ls")
verify_module = importlib.import_module("ckptmirror.ops.verify")

CLI = serve_command()
OBJ = 256  # bytes per object: each step is several objects (more asks per step)
BUDGET_S = 0.5  # connect_timeout_s of the peer behind the proxy: what one ask of a black hole costs


def state(step: int) -> dict[str, Any]:
    """A small state that differs from step to step."""
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal(512).astype(np.float32), "b": rng.standard_normal(64), "step": step}


def cli(*args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed entry point; never raises on a non-zero status."""
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


# ------------------------------------------------------------------------------- F4: ls outage


@pytest.fixture
def stalling_peer(peer_agent: AgentProc, tmp_path: Path) -> Iterator[tuple[Path, str, TcpProxy]]:
    """A local replica and a peer replica (through a proxy) holding the same 8 steps."""
    local = tmp_path / "local"
    local.mkdir()
    with TcpProxy(peer_agent.port) as proxy:
        peer = proxy.url(f"ls-outage-{tmp_path.name[-12:]}")
        with ckptmirror.Mirror([str(local), peer], object_bytes=OBJ, storage_options={"peer": {"token": TOKEN}}) as m:
            for s in range(8):
                m.save_state(s, state(s)).result()
        yield local, peer, proxy


def test_ls_stops_asking_a_replica_that_stopped_answering(
    stalling_peer: tuple[Path, str, TcpProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer answers the initial listing, then turns into a black hole: ls asks it once more
    (one time budget), not once per step and object, and exits 2 naming it; the steps listed
    after it stopped say that they were not listed there."""
    local, peer, proxy = stalling_peer
    real = ls_module.list_reachable

    def listed_then_stalled(replicas: Any) -> Any:
        out = real(replicas)
        proxy.set("stall", after_bytes=0)  # from now on the agent gets no byte of any request
        return out

    monkeypatch.setattr(ls_module, "list_reachable", listed_then_stalled)
    options = {"peer": {"token": TOKEN, "connect_timeout_s": BUDGET_S, "min_bytes_per_s": 1 << 20}}
    t0 = time.monotonic()
    res = ops.ls([str(local), peer], storage_options=options)
    took = time.monotonic() - t0
    # Without the fix: a budget per step (garbage listing) and per object (storage): > 8 budgets.
    assert took < 5 * BUDGET_S + 2, f"ls took {took:.1f} s: it kept asking the stalled replica"
    assert res.exit_code == 2
    assert peer in res.unreachable and "stopped answering during the listing" in res.unreachable[peer]
    assert [s.step for s in res.steps] == list(range(8))
    assert all(peer in s.not_listed_on for s in res.steps[1:]), [s.not_listed_on for s in res.steps]
    # The local replica is listed in full all the same.
    assert all(s.committed_on == (str(local), peer) and s.objects for s in res.steps)
    assert all(str(local) in s.storage for s in res.steps)


def test_ls_cli_says_which_steps_were_not_listed(
    stalling_peer: tuple[Path, str, TcpProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rendering: the note of every step not listed there, and the UNREACHABLE line."""
    from ckptmirror.cli.render import _ls_lines

    local, peer, proxy = stalling_peer
    real = ls_module.list_reachable

    def listed_then_stalled(replicas: Any) -> Any:
        out = real(replicas)
        proxy.set("stall", after_bytes=0)
        return out

    monkeypatch.setattr(ls_module, "list_reachable", listed_then_stalled)
    options = {"peer": {"token": TOKEN, "connect_timeout_s": BUDGET_S, "min_bytes_per_s": 1 << 20}}
    text = "\n".join(_ls_lines(ops.ls([str(local), peer], storage_options=options)))
    assert text.count("not listed on [2] (stopped answering") >= 7, text
    assert f"UNREACHABLE [2] {peer}: stopped answering during the listing" in text, text


# ------------------------------------------------------------------------- F9: exit codes, empty


def test_missing_bucket_and_wrong_token_are_configuration_errors_exit_2(
    tmp_path: Path, make_bucket: Any, peer_agent: AgentProc
) -> None:
    """docs/operations.md: exit status 2 for a usage or configuration problem. A bucket that
    does not exist and a token the agent refuses are both; the message names the replica and
    the fix."""
    make_bucket()  # the moto server and its AWS_* variables
    missing = cli("ls", "s3://no-such-bucket-for-ckptmirror/run")
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "no-such-bucket-for-ckptmirror" in missing.stderr and "create it" in missing.stderr
    among = cli("verify", tmp_path, "s3://no-such-bucket-for-ckptmirror/run", "--no-progress")
    assert among.returncode == 2, among.stdout + among.stderr
    url = peer_agent.url("some-ns")
    wrong = cli("ls", url, env={"CKPTMIRROR_PEER_TOKEN": "wrong-token"})
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert url in wrong.stderr and "token" in wrong.stderr
    # The library raises what it raised before (a ReplicaConfigError), now also a usage error.
    from ckptmirror.errors import ReplicaConfigError

    with pytest.raises(ReplicaConfigError) as exc:
        ops.ls(["s3://no-such-bucket-for-ckptmirror/run"])
    assert isinstance(exc.value, ops.UsageError)


def test_ls_names_a_replica_that_holds_nothing(
    tmp_path: Path, peer_agent: AgentProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mistyped namespace is an empty replica: ls says so per replica, not just "no steps"."""
    monkeypatch.setenv("CKPTMIRROR_PEER_TOKEN", TOKEN)
    local = tmp_path / "a"
    local.mkdir()
    with ckptmirror.Mirror([str(local)], object_bytes=OBJ) as m:
        m.save_state(1, state(1)).result()
    typo = peer_agent.url(f"mistyped-{tmp_path.name[-12:]}")
    res = ops.ls([str(local), typo])
    assert res.exit_code == 0
    assert list(res.empty) == [typo] and "namespace" in res.empty[typo]
    out = cli("ls", local, typo)
    assert out.returncode == 0, out.stderr
    assert f"[2] {typo}: empty (no steps, no step directories): check the namespace" in out.stdout, out.stdout
    only = cli("ls", typo)
    assert "no steps" in only.stdout and "empty (no steps" in only.stdout, only.stdout


def test_repair_with_an_unreachable_replica_says_the_check_was_incomplete(tmp_path: Path) -> None:
    """repair cannot say "nothing to repair ... on every replica" when one was not reached."""
    local = tmp_path / "a"
    local.mkdir()
    with ckptmirror.Mirror([str(local)], object_bytes=OBJ) as m:
        m.save_state(1, state(1)).result()
    down = "peer://127.0.0.1:1/ns"  # nothing listens there: connection refused
    out = cli("repair", local, down, "--no-progress", env={"CKPTMIRROR_PEER_TOKEN": TOKEN})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "on every replica" not in out.stdout, out.stdout
    assert "INCOMPLETE: 1 replica(s) not checked" in out.stdout, out.stdout
    assert "nothing to repair on the replicas that answered" in out.stdout, out.stdout


# ------------------------------------------------------------------- F5: verify beside a saving job


def verify_after(monkeypatch: pytest.MonkeyPatch, meanwhile: Any) -> None:
    """Make ``verify`` run ``meanwhile()`` right after its step listing: what a job that saves
    does while the check runs (the check takes seconds to minutes; here it is made certain)."""
    real = verify_module.list_reachable

    def listed_then(replicas: Any) -> Any:
        out = real(replicas)
        meanwhile()
        return out

    monkeypatch.setattr(verify_module, "list_reachable", listed_then)


def two_replicas_with_steps_1_2(tmp_path: Path) -> tuple[Path, Path]:
    """Two local replicas ``a`` and ``b`` under ``tmp_path``, both holding steps 1 and 2."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with ckptmirror.Mirror([str(a), str(b)], object_bytes=OBJ) as m:
        for s in (1, 2):
            m.save_state(s, state(s)).result()
    return a, b


def later(delay_s: float, action: Any) -> None:
    """Run ``action()`` ``delay_s`` from now on a thread: a job's writes or deletes that land
    while verify runs, after what it read at the listing."""

    def run() -> None:
        time.sleep(delay_s)
        action()

    threading.Thread(target=run, daemon=True).start()


def test_verify_a_step_retention_removes_during_the_check_is_not_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's keep_last retention deletes the oldest step while verify checks it: "removed
    during the check", exit 0, not missing objects (exit 1)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with ckptmirror.Mirror([str(a), str(b)], keep_last=2, object_bytes=OBJ) as m:
        for s in (1, 2):
            m.save_state(s, state(s)).result()

        def next_save() -> None:
            m.save_state(3, state(3)).result()  # retention then removes step 1 everywhere
            m.wait()
            wait_until(lambda: not (a / step_dir(1)).exists() and not (b / step_dir(1)).exists(), what="retention")

        verify_after(monkeypatch, next_save)
        res = ops.verify([str(a), str(b)], threads=2)
    assert res.exit_code == 0, [str(p) for p in res.problems]
    assert [s.step for s in res.steps] == [2]
    assert res.removed_during_check == {str(a): (1,), str(b): (1,)}
    from ckptmirror.cli.render import _verify_lines

    text = "\n".join(_verify_lines(res))
    assert "step(s) 1 removed during the check" in text and "OK: 1 step(s) verified" in text, text


def test_verify_a_copy_removed_on_one_replica_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention reached one replica only by the end of the check: that copy is "removed" (not
    damage), the other is verified; a step still committed somewhere stays in the report."""
    from ckptmirror.replicas import open_replica
    from ckptmirror.save.retention import remove_step

    a, b = two_replicas_with_steps_1_2(tmp_path)
    verify_after(monkeypatch, lambda: remove_step(open_replica(str(a)), 1))
    res = ops.verify([str(a), str(b)])
    assert res.exit_code == 0, [str(p) for p in res.problems]
    step1 = res.steps[0]
    assert step1.step == 1 and step1.recoverable
    assert {c.replica: c.status for c in step1.replicas} == {str(a): "removed", str(b): "ok"}
    assert res.removed_during_check == {str(a): (1,)}


def test_verify_a_copy_that_commits_during_the_check_is_checked_not_lagging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the listing a save had committed on one replica, not yet on the other (its commit
    record lands during the check): that copy is checked once more, not LAGGING (exit 3)."""
    a, b = two_replicas_with_steps_1_2(tmp_path)
    record = b / commit_key(2)
    held = tmp_path / "commit-2"
    shutil.move(record, held)  # step 2 torn on b: between the save's per-replica commits
    verify_after(monkeypatch, lambda: shutil.move(held, record))
    res = ops.verify([str(a), str(b)])
    assert res.exit_code == 0, [str(p) for p in res.problems]
    assert res.committed_during_check == {str(b): (2,)}
    assert {c.replica: c.status for c in res.steps[1].replicas} == {str(a): "ok", str(b): "ok"}
    assert all(rk.verified == rk.objects for c in res.steps[1].replicas for rk in c.ranks)


def test_verify_the_first_save_committing_during_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify while the first save is written: torn everywhere at the listing ("interrupted
    saves but no committed step", exit 1, before), committed by the end: checked, exit 0."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with ckptmirror.Mirror([str(a), str(b)], object_bytes=OBJ) as m:
        m.save_state(1, state(1)).result()
    moved = []
    for root in (a, b):
        held = tmp_path / f"commit-{root.name}"
        shutil.move(root / commit_key(1), held)
        moved.append((held, root / commit_key(1)))
    verify_after(monkeypatch, lambda: [shutil.move(src, dst) for src, dst in moved])
    res = ops.verify([str(a), str(b)])
    assert res.exit_code == 0, [str(p) for p in res.problems]
    assert [s.step for s in res.steps] == [1] and res.steps[0].recoverable
    assert res.committed_during_check == {str(a): (1,), str(b): (1,)}
    assert not res.torn


def test_verify_damage_of_a_step_still_committed_is_still_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asking again changes nothing for real damage: the commit record is still there."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with ckptmirror.Mirror([str(a), str(b)], object_bytes=OBJ) as m:
        m.save_state(1, state(1)).result()
    victim = sorted((a / step_dir(1)).rglob("o*.bin"))[0]
    victim.unlink()
    record = b / commit_key(1)
    record.unlink()  # b lags for good (no save in progress)
    res = ops.verify([str(a), str(b)])
    assert res.exit_code == 1
    assert [p.kind for p in res.damage] == ["missing"]
    assert res.lagging == {str(b): (1,)}
    assert not res.removed_during_check and not res.committed_during_check


def frozen_state(step: int) -> dict[str, Any]:
    """A state with a large part that never changes (incremental saves reference its objects)."""
    base = np.arange(4096, dtype=np.float32)
    return {"frozen": base, **state(step)}


def test_verify_damage_that_outlives_a_removed_step_is_still_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verify slower than the saves: every step it checked is removed by retention before it
    is done. A corrupt object those steps referenced (a frozen part in an older step's
    directory) that the steps that stay reference too is still damage (exit 1), not "ok"
    because every step it was found through went."""
    a = tmp_path / "a"
    a.mkdir()
    with ckptmirror.Mirror([str(a)], keep_last=2, object_bytes=OBJ) as m:
        for s in (1, 2):
            m.save_state(s, frozen_state(s)).result()
        shared = sorted((a / step_dir(1)).rglob("o*.bin"))[0]  # the frozen part: step 2 references it
        data = bytearray(shared.read_bytes())
        data[len(data) // 2] ^= 0x01
        shared.write_bytes(bytes(data))
        real = verify_module.recheck
        ran: list[int] = []

        def saves_then_recheck(*args: Any, **kw: Any) -> Any:
            if not ran:  # the job saves on while verify reads: retention removes steps 1 and 2
                ran.append(1)
                for s in (3, 4):
                    m.save_state(s, frozen_state(s)).result()
                m.wait()
            return real(*args, **kw)

        monkeypatch.setattr(verify_module, "recheck", saves_then_recheck)
        res = ops.verify([str(a)])
    assert ran and not (a / commit_key(2)).exists() and shared.exists()
    assert res.exit_code == 1, (res.exit_code, res.removed_during_check)
    assert any(p.kind == "corrupt" and "stored as step-000000000001" in p.detail for p in res.problems), [
        str(p) for p in res.problems
    ]


def test_verify_a_copy_a_prune_left_for_references_lags_while_nothing_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prune of one replica alone left its copy of the oldest step as what retention leaves
    with incremental saves (the files later steps reference), while the other replica still
    holds the step committed, and nothing changes during the check: that copy lags (exit 3),
    and repair would complete it; verify and repair agree. (Removed during a check, by a job's
    retention reaching one replica after the other, is told by the change: the other tests.)"""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with ckptmirror.Mirror([str(a), str(b)], object_bytes=OBJ) as m:
        for s in (1, 2, 3):
            m.save_state(s, frozen_state(s)).result()
    ops.prune([str(a)], keep=2)
    assert (a / step_dir(1)).exists() and not (a / commit_key(1)).exists()  # kept for references
    res = ops.verify([str(a), str(b)])
    assert res.exit_code == 3, [str(p) for p in res.problems]
    assert not res.removed_during_check
    assert {c.replica: c.status for c in res.steps[0].replicas}[str(b)] == "ok"
    assert any(str(a) == c.replica and c.status != "ok" for c in res.steps[0].replicas), res.steps[0]
    dry = ops.repair([str(a), str(b)], dry_run=True)
    assert any(x.action == "commit" and x.replica == str(a) and x.step == 1 for x in dry.actions)


def test_verify_a_torn_copy_deleted_during_the_check_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention deletes the commit record first, then the files: at the listing the copy on one
    replica is torn, by the end of the check it is gone. Not lagging."""
    a, b = two_replicas_with_steps_1_2(tmp_path)
    (a / commit_key(1)).unlink()
    verify_after(monkeypatch, lambda: later(0.3, lambda: shutil.rmtree(a / step_dir(1))))
    res = ops.verify([str(a), str(b)])
    assert res.exit_code == 0, [str(p) for p in res.problems]
    assert res.removed_during_check == {str(a): (1,)}


def test_verify_the_first_save_still_writing_is_not_an_interrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing committed anywhere, and the torn save's files change while verify looks: a save
    in progress (exit 0, "in_progress"), not "interrupted saves but no committed step" (1). An
    interrupted save, whose files do not change, is still reported."""
    a = tmp_path / "a"
    a.mkdir()
    with ckptmirror.Mirror([str(a)], object_bytes=OBJ) as m:
        m.save_state(1, state(1)).result()
    (a / commit_key(1)).unlink()
    interrupted = ops.verify([str(a)])
    assert interrupted.exit_code == 1 and not interrupted.in_progress

    late = a / step_dir(1) / "rank-00000" / "o999999-late.bin"
    verify_after(monkeypatch, lambda: later(0.3, lambda: late.write_bytes(b"x" * OBJ)))
    res = ops.verify([str(a)])
    assert res.exit_code == 0, [str(p) for p in res.problems]
    assert res.in_progress == {str(a): (1,)} and not res.torn
    from ckptmirror.cli.render import _verify_lines

    assert "a save is in progress" in "\n".join(_verify_lines(res))

    # Files only removed (prune --all-torn, a failed save's cleanup): still an interrupted save.
    victim = sorted(p for p in (a / step_dir(1)).rglob("*.bin") if p != late)[0]
    verify_after(monkeypatch, lambda: later(0.3, victim.unlink))
    res = ops.verify([str(a)])
    assert res.exit_code == 1 and not res.in_progress, (res.exit_code, res.in_progress)


def test_verify_a_copy_being_saved_during_the_check_is_not_lagging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save committed on one replica and is still writing the other (files added while
    verify looks, no commit record yet): "saving" there, in_progress, exit 0; not LAGGING."""
    a, b = two_replicas_with_steps_1_2(tmp_path)
    (b / commit_key(2)).unlink()
    late = b / step_dir(2) / "rank-00000" / "o999999-late.bin"
    verify_after(monkeypatch, lambda: later(0.3, lambda: late.write_bytes(b"x" * OBJ)))
    res = ops.verify([str(a), str(b)])
    assert res.exit_code == 0, [str(p) for p in res.problems]
    assert res.in_progress == {str(b): (2,)}
    assert {c.replica: c.status for c in res.steps[1].replicas} == {str(a): "ok", str(b): "saving"}
