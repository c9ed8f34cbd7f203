"""Fault-injection tests: the faults of docs/RELIABILITY.md that a local-disk replica must survive.

Everything runs on real files under ``tmp_path``; crashes are real ``SIGKILL``s of a writer
subprocess (``tests/_writer_child.py``, forked from a server that imported torch and ckptmirror
once: ``_helpers.ForkServer``) at exact points of the commit protocol (a
``FaultyReplica.on_phase`` hook writes a marker file and blocks) and at random points.
Expected values are recomputed from (step, seed): nothing is checked through pickle or
``torch.save``.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _helpers import (
    Forked,
    ForkServer,
    assert_bit_exact,
    ck_warnings,
    files_under,
    state_of,
    temp_files,
    wait_until,
)

from ckptmirror import (
    CkptMirrorError,
    CorruptObjectError,
    Mirror,
    NoValidCheckpointError,
    SaveFailedError,
    StepExistsError,
)
from ckptmirror.checksum import checksum
from ckptmirror.format import commit_key, step_dir
from ckptmirror.replicas import FaultyReplica, LocalReplica
from ckptmirror.restore.discover import list_steps

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_writer_child.py"
_spec = importlib.util.spec_from_file_location("_writer_child", CHILD)
assert _spec is not None and _spec.loader is not None
wc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wc)

W = 32  # in-process model width: ~25 KiB of state
OBJ = 4 << 10  # -> 7 objects per step
KILL_SEED = int(os.environ.get("CKPTMIRROR_FAULT_SEED", "20240917"))

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to tell files apart")


# ----------------------------------------------------------------------------- helpers
def save_steps(root: Path, steps: list[int], width: int = W, seed: int = wc.SEED, **kw: Any) -> None:
    kw.setdefault("object_bytes", OBJ)
    with Mirror([str(root)], **kw) as m:
        net = wc.Net(width)
        for s in steps:
            m.save(s, wc.fill(net, s, seed), extra=wc.extra_for(s, seed)).result(timeout=60)


def restore_fresh(root: Path, width: int = W, **kw: Any) -> tuple[Any, torch.nn.Module]:
    """Restore into a new model whose values match no saved step."""
    net = wc.fill(wc.Net(width), 999_999)
    with Mirror([str(root)]) as m:
        res = m.restore(net, **kw)
    return res, net


def assert_restores(root: Path, want: int, width: int = W, seed: int = wc.SEED, *, at: int | None = None) -> Any:
    """Restore (the newest step, or step ``at``) and check it is step ``want``, bit-exact."""
    res, net = restore_fresh(root, width, step=at)
    assert res is not None, f"nothing restored, expected step {want}"
    assert res.step == want, f"restored step {res.step}, expected {want}"
    assert_bit_exact(state_of(net), wc.expected_state(want, width, seed), f"step {want}: ")
    return res


def steps_of(root: Path) -> list[int]:
    with Mirror([str(root)]) as m:
        return m.steps()


def tree_snapshot(top: Path, exclude: Path | None = None) -> dict[str, tuple[Any, ...]]:
    """Everything under ``top`` (not following links, skipping ``exclude``): type, size, mtime, content hash."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirs, files in os.walk(top):
        if exclude is not None:
            dirs[:] = [d for d in dirs if Path(dirpath, d) != exclude]
        for name in dirs + files:
            p = Path(dirpath, name)
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
            out[str(p.relative_to(top))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def mkey(root: Path, step: int) -> str:
    """Key of rank 0's manifest of ``step``: the one the commit pins, else the only one on disk."""
    commit = root / commit_key(step)
    if commit.exists():
        return json.loads(commit.read_bytes())["ranks"][0][1]
    found = sorted((root / step_dir(step)).glob("rank-00000-*.json"))
    assert len(found) == 1, f"expected one manifest of step {step}, found {found}"
    return f"{step_dir(step)}/{found[0].name}"


def has_manifest(root: Path, step: int) -> bool:
    return bool(list((root / step_dir(step)).glob("rank-00000-*.json")))


def okey(root: Path, step: int, index: int) -> str:
    """Key of object ``index`` of rank 0 at ``step``, from its manifest."""
    return manifest_doc(root, step)["objects"]["key"][index]


def manifest_doc(root: Path, step: int) -> dict[str, Any]:
    return json.loads((root / mkey(root, step)).read_bytes())


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def write_commit(root: Path, step: int, data: bytes) -> None:
    p = root / commit_key(step)
    if p.exists():
        p.unlink()
    p.write_bytes(data)


def pin_manifest(root: Path, step: int, manifest: bytes) -> None:
    """Install ``manifest`` as the rank manifest of ``step`` and re-pin it in the commit, so it verifies."""
    (root / mkey(root, step)).write_bytes(manifest)
    commit = json.loads((root / commit_key(step)).read_bytes())
    commit["ranks"][0][2] = len(manifest)
    commit["ranks"][0][3] = checksum(manifest)
    write_commit(root, step, dumps(commit))


# ------------------------------------------------------------------ writer subprocesses
@pytest.fixture(scope="module")
def writers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    """Forks the writer processes (``python _writer_child.py ...``) from one process that imported
    torch and ckptmirror once: a fresh interpreter per writer spends seconds importing them."""
    server = ForkServer(["_writer_child", "ckptmirror", "ckptmirror.replicas", "ckptmirror.format"],
                        tmp_path_factory.mktemp("writers") / "server.log")  # fmt: skip
    yield server
    server.close()


@pytest.fixture
def spawn(tmp_path: Path, writers: ForkServer):
    procs: list[Forked] = []

    def start(*args: Any) -> Forked:
        log_path = tmp_path / f"child-{len(procs)}.log"
        p = writers.popen([str(CHILD), *map(str, args)], os.getcwd(), log_path)
        p.log_path = log_path  # type: ignore[attr-defined]
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def wait_for_marker(p: Forked, marker: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if p.poll() is not None:
            pytest.fail(f"writer exited ({p.returncode}) before writing {marker.name}:\n{p.log_path.read_text()}")  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            pytest.fail(f"writer did not reach {marker.name} within {timeout} s:\n{p.log_path.read_text()}")  # type: ignore[attr-defined]
        time.sleep(0.005)
    return marker.read_text()


def sigkill(p: Forked) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL, f"writer ended with {p.returncode}, not by SIGKILL"


# ==================================================== 1. SIGKILL at each commit phase
@pytest.mark.parametrize("phase", wc.PHASES)
def test_sigkill_at_commit_protocol_phase(tmp_path: Path, spawn, caplog: pytest.LogCaptureFixture, phase: str) -> None:
    root, marker = tmp_path / "root", tmp_path / "marker"
    p = spawn("phase", root, marker, phase)
    where = wait_for_marker(p, marker)
    sigkill(p)

    width = wc.PHASE_WIDTH
    s1, s2 = root / step_dir(1), root / step_dir(2)
    n_objects = len(manifest_doc(root, 1)["objects"]["key"])
    assert n_objects >= 5, "the state must span several objects for the put phase to be mid-write"
    objs2 = (
        sorted(f.name.split("-")[0] + ".bin" for f in (s2 / "rank-00000").glob("o*.bin"))
        if (s2 / "rank-00000").is_dir()
        else []
    )
    url = str(root)

    # Where the writer died (the hook runs before the inner replica call).
    if phase == "put":
        assert objs2 == ["o000000.bin", "o000001.bin"], where
        assert not has_manifest(root, 2) and not (root / commit_key(2)).exists()
    elif phase == "put-manifest":
        assert len(objs2) == n_objects, where
        assert not has_manifest(root, 2) and not (root / commit_key(2)).exists()
    elif phase == "commit":
        assert len(objs2) == n_objects and has_manifest(root, 2), where
        assert not (root / commit_key(2)).exists()
    elif phase == "delete-commit":
        assert (root / commit_key(2)).exists() and (root / commit_key(1)).exists(), where
    elif phase == "delete-prefix":
        assert (root / commit_key(2)).exists() and not (root / commit_key(1)).exists(), where
        assert (s1 / "rank-00000").is_dir(), "step 1's objects are still there (directory not yet removed)"
    assert temp_files(root) == [], "the kill happened before any write of this phase began"

    # What readers see. A commit is durable before retention starts, and retention deletes the
    # old step's COMMIT.json before its objects: the step stops existing atomically.
    expected_steps, expected_torn = {
        "put": ([1], [2]),
        "put-manifest": ([1], [2]),
        "commit": ([1], [2]),
        "delete-commit": ([1, 2], []),
        "delete-prefix": ([2], [1]),
    }[phase]
    with Mirror([url]) as m:
        assert m.steps() == expected_steps
        listing = list_steps(m.replicas)
    assert listing.torn.get(url, []) == expected_torn, "leftovers are reported as torn (garbage)"

    caplog.clear()
    caplog.set_level(logging.INFO, logger="ckptmirror")
    newest = expected_steps[-1]
    res = assert_restores(root, newest, width)
    assert res.extra == wc.extra_for(newest)
    assert ck_warnings(caplog) == [], "a torn step is garbage, not corruption: restore must not warn"
    for s in expected_steps:  # every listed step is whole, including step 1 while retention is cut short
        assert_restores(root, s, width, at=s)

    # A new writer recovers: leftovers of the torn step are cleaned before it is written again.
    if phase in ("put", "put-manifest", "commit"):
        # Larger objects than the dead writer used: any stale object file would stay visible.
        save_steps(root, [2], width, object_bytes=3 * wc.PHASE_OBJECT_BYTES)
        doc = manifest_doc(root, 2)
        want = {mkey(root, 2), commit_key(2)} | set(doc["objects"]["key"])
        got = {f"{step_dir(2)}/{f}" for f in files_under(s2)}
        assert got == want, f"stale files left in step 2: {sorted(got - want)}"
        assert steps_of(root) == [1, 2]
        assert_restores(root, 2, width)
    else:
        save_steps(root, [3], width, keep_last=1, object_bytes=wc.PHASE_OBJECT_BYTES)
        assert steps_of(root) == [3]
        assert sorted(os.listdir(root)) == [step_dir(3)], "retention removes the interrupted deletion's leftovers"
        assert_restores(root, 3, width)


# ====================================================== 2. SIGKILL at random points
def test_sigkill_at_random_points(tmp_path: Path, spawn) -> None:
    root = tmp_path / "root"
    width = wc.LOOP_WIDTH
    save_steps(root, [1], width, keep_last=2, object_bytes=wc.LOOP_OBJECT_BYTES)
    rng = random.Random(KILL_SEED)
    start, saved_total = 2, 0
    for it in range(5):
        ready, progress = tmp_path / f"ready-{it}", tmp_path / f"progress-{it}"
        p = spawn("loop", root, ready, progress, start)
        wait_for_marker(p, ready)
        delay = rng.uniform(0.0, 0.3)
        time.sleep(delay)  # the random kill point, not a synchronisation
        sigkill(p)
        ctx = f"iteration {it} (seed {KILL_SEED}, kill {delay * 1000:.0f} ms after ready)"

        text = progress.read_text() if progress.exists() else ""
        reported = [int(line) for line in text.split("\n")[:-1]]  # complete lines only
        saved_total += len(reported)
        steps = steps_of(root)
        assert steps, ctx
        newest = steps[-1]
        if reported:
            assert newest >= reported[-1], (
                f"{ctx}: step {reported[-1]} was reported durable but the newest listed is {newest}"
            )
        res = assert_restores(root, newest, width)
        assert res.extra == wc.extra_for(newest), ctx
        for s in steps:  # the torn step is never listed; every listed step verifies
            assert_restores(root, s, width, at=s)
        start = newest + 1  # the next writer may meet the torn leftovers of this step
    assert saved_total > 0, "the writer never completed a save before being killed: the kill points were all at startup"


# ============================================ 3. corrupt, truncated, empty objects
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        i = len(data) // 3
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :])
    elif how == "truncate":
        path.write_bytes(data[: len(data) - 7])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip", "truncate", "empty"])
def test_damaged_object_falls_back_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    root = tmp_path / "root"
    save_steps(root, [1, 2])
    key = okey(root, 2, 1)
    _damage(root / key, how)

    caplog.set_level(logging.INFO, logger="ckptmirror")
    res = assert_restores(root, 1)
    assert res.extra == wc.extra_for(1)
    warnings = ck_warnings(caplog)
    assert any(key in w for w in warnings), f"no warning names {key}: {warnings}"

    with Mirror([str(root)]) as m:
        with pytest.raises(CorruptObjectError) as ei:
            m.load_state(step=2)
    msg = str(ei.value)
    assert key in msg and str(root) in msg, msg

    if how != "flip":
        # A size mismatch is caught before any byte is decoded: the target is left untouched.
        net = wc.fill(wc.Net(W), 999_999)
        before = state_of(net)
        with Mirror([str(root)]) as m:
            with pytest.raises(CkptMirrorError):
                m.restore(net, step=2)
        assert_bit_exact(state_of(net), before, "target modified by a failed restore: ")


def test_fallback_never_mixes_two_steps(tmp_path: Path) -> None:
    """Step 2 fails on its first object while its other objects are still being read (a slow
    replica): whatever those late reads do, the model must end up holding step 1 only."""
    root = tmp_path / "root"
    save_steps(root, [1, 2])
    bad = okey(root, 2, 0)

    def slow_step2(phase: str, key: str) -> None:
        if phase == "get" and key.startswith(step_dir(2) + "/rank-00000/") and key != bad:
            time.sleep(0.2)  # a slow replica, not a synchronisation

    replica = FaultyReplica(LocalReplica(str(root)), flip_read={bad}, on_phase=slow_step2)
    net = wc.fill(wc.Net(W), 999_999)
    with Mirror([replica]) as m:
        res = m.restore(net)
    assert res is not None and res.step == 1
    assert_bit_exact(state_of(net), wc.expected_state(1, W), "restored step 1 holds bytes of another step: ")


# ================================================ 4. nothing valid / nothing committed
def test_every_step_corrupt_raises_never_none(tmp_path: Path) -> None:
    root = tmp_path / "root"
    save_steps(root, [1, 2])
    for s in (1, 2):
        _damage(root / okey(root, s, 0), "flip")
    # A torn newer step must not turn "nothing verifies" into "nothing exists".
    torn = root / step_dir(3) / "rank-00000"
    torn.mkdir(parents=True)
    (torn / "o000000.bin").write_bytes(b"\0" * 100)
    with pytest.raises(NoValidCheckpointError) as ei:
        restore_fresh(root)
    assert set(ei.value.problems) == {1, 2}
    for s in (1, 2):
        assert okey(root, s, 0) in ei.value.problems[s]
    with Mirror([str(root)]) as m:
        with pytest.raises(NoValidCheckpointError):
            m.load_state()


def test_only_torn_step_restores_none(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with Mirror([FaultyReplica(LocalReplica(str(root)), fail_commit=True)], object_bytes=OBJ) as m:
        with pytest.raises(SaveFailedError):
            m.save(1, wc.fill(wc.Net(W), 1)).result(timeout=30)
    assert (root / mkey(root, 1)).exists() and (root / okey(root, 1, 0)).exists()
    assert not (root / commit_key(1)).exists()
    net = wc.fill(wc.Net(W), 999_999)
    before = state_of(net)
    with Mirror([str(root)]) as m:
        assert m.steps() == []
        assert m.restore(net) is None
        assert m.load_state() is None
    assert_bit_exact(state_of(net), before, "restore of nothing modified the model: ")


# ============================================= 5. corrupt and hostile manifests, commits
HOSTILE_W = W


def _hostile_extra(step: int) -> dict[str, Any]:
    return {"step": step, "arr": np.arange(64, dtype=np.float64) * step}


@pytest.fixture(scope="module")
def hostile_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "root"
    with Mirror([str(root)], object_bytes=OBJ) as m:
        net = wc.Net(HOSTILE_W)
        for s in (1, 2):
            m.save(s, wc.fill(net, s), extra=_hostile_extra(s)).result(timeout=60)
    return root


def _leaf(doc: dict[str, Any], kind: str) -> int:
    """Index of the first leaf of ``kind`` in a version-2 manifest's columns."""
    cols = doc["leaves"]
    return next(i for i, t in enumerate(cols["type"]) if cols["types"][t][0] == kind)


def _set_leaf(doc: dict[str, Any], i: int, **fields: Any) -> None:
    """Set leaf ``i``'s fields (shape, stride, offset, storage, dtype) in the columns."""
    cols = doc["leaves"]
    for name, value in fields.items():
        if name == "stride":
            cols["strides"] = sorted([e for e in cols["strides"] if e[0] != i] + [[i, value]])
        elif name == "dtype":
            cols["types"].append([cols["types"][cols["type"][i]][0], value])
            cols["type"][i] = len(cols["types"]) - 1
        else:
            cols[name][i] = value


def _stride(doc: dict[str, Any], i: int) -> list[int]:
    """Leaf ``i``'s strides: explicit ones, else the C-contiguous ones of its shape."""
    from ckptmirror.format import contiguous_strides

    explicit = {j: st for j, st in doc["leaves"]["strides"]}
    return list(explicit.get(i, contiguous_strides(tuple(doc["leaves"]["shape"][i]))))


def _with(doc: dict[str, Any], fn: Callable[[dict[str, Any]], Any]) -> bytes:
    fn(doc)
    return dumps(doc)


def _textual(doc: dict[str, Any], field_path: Callable[[dict[str, Any], str], None], raw: bytes) -> bytes:
    """Serialise ``doc`` with a placeholder, then splice in JSON text json.dumps would never write."""
    field_path(doc, "__HOSTILE__")
    return dumps(doc).replace(b'"__HOSTILE__"', raw, 1)


def _set(path: tuple[Any, ...]) -> Callable[[dict[str, Any], Any], None]:
    def setter(doc: dict[str, Any], value: Any) -> None:
        node: Any = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return setter


def _untile(d: dict[str, Any]) -> None:
    """Storages that do not tile the stream (version 2 has no offsets, so it cannot say "overlap")."""
    d["storages"]["nbytes"][0] += 16


# Each builds step 2's rank manifest from the valid one (ctx: outside dir, step 1's manifest).
HOSTILE_MANIFESTS: dict[str, Callable[[dict[str, Any], dict[str, Any]], bytes]] = {
    "bad-json": lambda d, c: dumps(d)[:-40],
    "not-utf8": lambda d, c: b"\xff\xfe\x00\x01garbage",
    "top-level-list": lambda d, c: b"[1, 2, 3]",
    "empty": lambda d, c: b" ",
    "step-as-string": lambda d, c: _with(d, lambda x: x.__setitem__("step", "2")),
    "shape-as-dict": lambda d, c: _with(d, lambda x: x["leaves"]["shape"].__setitem__(0, {"0": 4})),
    "objects-as-dict": lambda d, c: _with(d, lambda x: x.__setitem__("objects", {"a": 1})),
    "name-dotdot-etc-passwd": lambda d, c: _with(d, lambda x: x["objects"]["key"].__setitem__(0, "../../etc/passwd")),
    "name-absolute-etc-passwd": lambda d, c: _with(d, lambda x: x["objects"]["key"].__setitem__(0, "/etc/passwd")),
    # A byte-identical copy of object 0 lies outside the root: following the name would "verify".
    "name-dotdot-to-valid-copy": lambda d, c: _with(
        d, lambda x: x["objects"]["key"].__setitem__(0, "../outside/o000000.bin")
    ),
    "name-nested-dotdot-to-valid-copy": lambda d, c: _with(
        d, lambda x: x["objects"]["key"].__setitem__(0, "step-000000000002/rank-00000/../../../outside/o000000.bin")
    ),
    "name-absolute-to-valid-copy": lambda d, c: _with(
        d, lambda x: x["objects"]["key"].__setitem__(0, str(c["outside"] / "o000000.bin"))
    ),
    "name-with-nul": lambda d, c: _with(
        d, lambda x: x["objects"]["key"].__setitem__(0, x["objects"]["key"][0] + "\x00.x")
    ),
    "name-with-backslash": lambda d, c: _with(
        d, lambda x: x["objects"]["key"].__setitem__(0, "step-000000000002\\..\\..\\outside\\o000000.bin")
    ),
    "name-trailing-newline": lambda d, c: _with(
        d, lambda x: x["objects"]["key"].__setitem__(0, x["objects"]["key"][0] + "\n")
    ),
    "name-unicode-digits": lambda d, c: _with(
        d, lambda x: x["objects"]["key"].__setitem__(0, "step-٠٠٠٠٠٠٠٠٠٠٠٢/rank-00000/o000000-0a0b0c0d.bin")
    ),
    "object-size-1e30": lambda d, c: _with(d, lambda x: x["objects"]["size"].__setitem__(0, 10**30)),
    "object-size-negative": lambda d, c: _with(d, lambda x: x["objects"]["size"].__setitem__(0, -1)),
    "object-checksum-malformed": lambda d, c: _with(d, lambda x: x["objects"]["checksum"].__setitem__(0, "md5:00")),
    "storage-nbytes-1e30": lambda d, c: _with(d, lambda x: x["storages"]["nbytes"].__setitem__(0, 10**30)),
    "shape-dim-1e18": lambda d, c: _with(d, lambda x: x["leaves"]["shape"][0].__setitem__(0, 10**18)),
    "numel-overflows-int64": lambda d, c: _with(
        d, lambda x: _set_leaf(x, 0, shape=[2**50, 2**50], stride=[0, 0], offset=0)
    ),
    "step-5000-digits": lambda d, c: _textual(d, _set(("step",)), b"9" * 5000),
    "duplicate-keys": lambda d, c: b'{"step":2,' + dumps(d)[1:],
    "duplicate-keys-conflicting": lambda d, c: dumps(d)[:-1] + b',"objects":[]}',
    "json-nested-100000": lambda d, c: _textual(d, _set(("structure",)), b"[" * 100_000 + b"]" * 100_000),
    "structure-nested-300": lambda d, c: _with(d, lambda x: x.__setitem__("structure", _nested_list(300))),
    "nan-constant": lambda d, c: _textual(d, _set(("created_unix",)), b"NaN"),
    "infinity-in-shape": lambda d, c: _textual(d, lambda x, v: x["leaves"]["shape"][0].__setitem__(0, v), b"Infinity"),
    "tensor-shape-outside-storage": lambda d, c: _with(
        d, lambda x: x["leaves"]["shape"][0].__setitem__(0, x["leaves"]["shape"][0][0] * 100)
    ),
    "tensor-stride-outside-storage": lambda d, c: _with(
        d, lambda x: _set_leaf(x, 0, stride=[10**9] + _stride(x, 0)[1:])
    ),
    "tensor-offset-outside-storage": lambda d, c: _with(d, lambda x: x["leaves"]["offset"].__setitem__(0, 10**6)),
    "ndarray-stride-zero-outside-storage": lambda d, c: _with(
        d, lambda x: _set_leaf(x, _leaf(x, "ndarray"), shape=[10**6], stride=[0])
    ),
    "ndarray-dtype-invalid": lambda d, c: _with(d, lambda x: _set_leaf(x, _leaf(x, "ndarray"), dtype="M8[as/7]")),
    "ndarray-dtype-object": lambda d, c: _with(d, lambda x: _set_leaf(x, _leaf(x, "ndarray"), dtype="O")),
    "tensor-dtype-unknown": lambda d, c: _with(d, lambda x: _set_leaf(x, 0, dtype="float1024")),
    "storage-index-out-of-range": lambda d, c: _with(d, lambda x: x["leaves"]["storage"].__setitem__(0, 10**6)),
    "storages-do-not-tile": lambda d, c: _with(d, _untile),
    "leaf-reference-out-of-range": lambda d, c: _with(
        d, lambda x: x.__setitem__("structure", {"t": "tensor", "i": 999})
    ),
    "manifest-of-another-step": lambda d, c: c["manifest1"],
}


def _nested_list(depth: int) -> Any:
    node: Any = {"t": "list", "v": []}
    for _ in range(depth):
        node = {"t": "list", "v": [node]}
    return node


# Each builds step 2's COMMIT.json from the valid one (ctx as above).
HOSTILE_COMMITS: dict[str, Callable[[dict[str, Any], dict[str, Any]], bytes]] = {
    "commit-bad-json": lambda d, c: b'{"format_version": 2, "kind": "ckptmirror.commit", ',
    "commit-step-as-string": lambda d, c: _with(d, lambda x: x.__setitem__("step", "2")),
    "commit-step-of-another-dir": lambda d, c: _with(
        d, lambda x: x.update(step=1, ranks=[[0, c["mkey1"]] + x["ranks"][0][2:]])
    ),
    "commit-rank-key-dotdot": lambda d, c: _with(d, lambda x: x["ranks"][0].__setitem__(1, "../../etc/passwd")),
    "commit-rank-key-absolute": lambda d, c: _with(d, lambda x: x["ranks"][0].__setitem__(1, "/etc/passwd")),
    # A verifying copy of step 2's rank manifest lies outside the root.
    "commit-rank-key-to-valid-copy": lambda d, c: _with(
        d, lambda x: x["ranks"][0].__setitem__(1, "../outside/rank-00000.json")
    ),
    "commit-size-1e30": lambda d, c: _with(d, lambda x: x["ranks"][0].__setitem__(2, 10**30)),
    "commit-world-size-1e30": lambda d, c: _with(d, lambda x: x.__setitem__("world_size", 10**30)),
    "commit-duplicate-keys": lambda d, c: b'{"step":2,' + dumps(d)[1:],
    "commit-nested-100000": lambda d, c: _textual(d, _set(("ranks",)), b"[" * 100_000 + b"]" * 100_000),
    "commit-nan": lambda d, c: _textual(d, _set(("created_unix",)), b"NaN"),
    "commit-ranks-as-dict": lambda d, c: _with(d, lambda x: x.__setitem__("ranks", {"0": 1})),
}


def _prepare_hostile(tmp_path: Path, template: Path) -> tuple[Path, dict[str, Any]]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(template, root, symlinks=True)
    outside.mkdir()
    (outside / "sentinel.txt").write_text("must stay as it is\n")
    shutil.copyfile(root / okey(root, 2, 0), outside / "o000000.bin")
    shutil.copyfile(root / mkey(root, 2), outside / "rank-00000.json")
    ctx = {"outside": outside, "manifest1": (root / mkey(root, 1)).read_bytes(), "mkey1": mkey(root, 1)}
    return root, ctx


def _check_hostile_step(tmp_path: Path, root: Path, caplog: pytest.LogCaptureFixture, names: str) -> None:
    before = tree_snapshot(tmp_path, exclude=root)
    with Mirror([str(root)]) as m:
        with pytest.raises(CkptMirrorError) as ei:
            m.load_state(step=2)
    msg = str(ei.value)
    assert names in msg or "step 2" in msg, f"the error does not say which manifest is bad: {msg}"

    caplog.clear()
    caplog.set_level(logging.INFO, logger="ckptmirror")
    res = assert_restores(root, 1, HOSTILE_W)
    assert res.extra["step"] == 1 and np.array_equal(res.extra["arr"], _hostile_extra(1)["arr"])
    assert any("step 2" in w for w in ck_warnings(caplog)), "falling back must be logged as a warning"

    # Retention over the hostile step must not follow anything it says either.
    save_steps(root, [3], HOSTILE_W, keep_last=1)
    assert steps_of(root) == [3]
    assert tree_snapshot(tmp_path, exclude=root) == before, "files outside the replica root were touched"


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
def test_hostile_rank_manifest(
    tmp_path: Path, hostile_template: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    root, ctx = _prepare_hostile(tmp_path, hostile_template)
    pin_manifest(root, 2, HOSTILE_MANIFESTS[case](manifest_doc(root, 2), ctx))
    _check_hostile_step(tmp_path, root, caplog, step_dir(2))


@pytest.mark.parametrize("case", sorted(HOSTILE_COMMITS))
def test_hostile_commit_record(
    tmp_path: Path, hostile_template: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    root, ctx = _prepare_hostile(tmp_path, hostile_template)
    commit = json.loads((root / commit_key(2)).read_bytes())
    write_commit(root, 2, HOSTILE_COMMITS[case](commit, ctx))
    _check_hostile_step(tmp_path, root, caplog, commit_key(2))


def test_oversized_manifest_is_refused_unread(
    tmp_path: Path, hostile_template: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, _ctx = _prepare_hostile(tmp_path, hostile_template)
    os.truncate(root / mkey(root, 2), (256 << 20) + 1)  # sparse: costs no disk
    _check_hostile_step(tmp_path, root, caplog, mkey(root, 2))


@pytest.mark.parametrize(
    "case", ["tensor-shape-outside-storage", "storages-do-not-tile", "leaf-reference-out-of-range"]
)
def test_manifest_error_names_the_manifest_key(tmp_path: Path, hostile_template: Path, case: str) -> None:
    """RELIABILITY.md #7: "a clear error naming the object" -- the manifest's key, as for parse errors."""
    root, ctx = _prepare_hostile(tmp_path, hostile_template)
    pin_manifest(root, 2, HOSTILE_MANIFESTS[case](manifest_doc(root, 2), ctx))
    with Mirror([str(root)]) as m:
        with pytest.raises(CkptMirrorError) as ei:
            m.load_state(step=2)
    assert mkey(root, 2) in str(ei.value), str(ei.value)


# ========================================================== 6. pickle payloads
class _RunsOnUnpickle:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _payload(marker: Path) -> bytes:
    return pickle.dumps(_RunsOnUnpickle(str(marker)), protocol=2)


@pytest.mark.parametrize("where", ["object", "object-pinned", "rank-manifest", "commit"])
def test_pickle_payload_is_never_executed(
    tmp_path: Path, hostile_template: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # The payload is live: unpickling it in another interpreter creates its marker.
    control = tmp_path / "control-marker"
    subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
        input=_payload(control),
        check=True,
        timeout=60,
    )
    assert control.exists()

    marker = tmp_path / "pwned"
    payload = _payload(marker)
    root, _ctx = _prepare_hostile(tmp_path, hostile_template)
    okey0 = okey(root, 2, 0)
    if where == "object":
        (root / okey0).write_bytes(payload)
    elif where == "object-pinned":
        size = (root / okey0).stat().st_size
        assert len(payload) < size
        data = payload + b"\0" * (size - len(payload))
        (root / okey0).write_bytes(data)
        doc = manifest_doc(root, 2)
        doc["objects"]["checksum"][0] = checksum(data)
        pin_manifest(root, 2, dumps(doc))
    elif where == "rank-manifest":
        pin_manifest(root, 2, payload)
    else:
        write_commit(root, 2, payload)

    calls: list[str] = []

    def forbid(name: str) -> Callable[..., Any]:
        def f(*a: Any, **k: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called on checkpoint data")

        return f

    for mod, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, forbid(f"{mod.__name__}.{name}"))

    with Mirror([str(root)]) as m:
        if where == "object-pinned":
            step, state = m.load_state(step=2)  # verifies: the bytes are just tensor data
            raw = state["extra"]["arr"].tobytes() + b"".join(
                t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in state["model"].values()
            )
            assert payload in raw, "object 0's bytes (the payload) come back as plain tensor/array data"
        else:
            with pytest.raises(CkptMirrorError):
                m.load_state(step=2)
            assert_restores(root, 1, HOSTILE_W)
    assert not marker.exists(), "the pickle payload was executed"
    assert calls == []


# ============================================================ 7. disk full
def _enospc_mirror(root: Path) -> Mirror:
    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return Mirror([FaultyReplica(LocalReplica(str(root)), fail_put_at=2, fail_error=err)], object_bytes=OBJ)


def _assert_enospc(err: BaseException, root: Path, step: int) -> None:
    assert isinstance(err, SaveFailedError), repr(err)
    assert err.step == step
    msg = str(err)
    assert str(root) in msg, f"the error does not name the replica: {msg}"
    assert "ENOSPC" in msg or os.strerror(errno.ENOSPC) in msg, f"the error does not name ENOSPC: {msg}"
    cause = err.failures.get(str(root))
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC, repr(cause)
    assert temp_files(root) == []
    assert not (root / commit_key(step)).exists()
    assert steps_of(root) == [1]
    assert_restores(root, 1)


def test_enospc_observed_by_result_then_next_save_succeeds(tmp_path: Path) -> None:
    root = tmp_path / "root"
    save_steps(root, [1])
    net = wc.Net(W)
    m = _enospc_mirror(root)
    try:
        h = m.save(2, wc.fill(net, 2), extra=wc.extra_for(2))
        with pytest.raises(SaveFailedError) as ei:
            h.result(timeout=30)
        _assert_enospc(ei.value, root, 2)
        # Reported once: the next save (of the same step: leftovers are replaced) succeeds.
        m.save(2, wc.fill(net, 2), extra=wc.extra_for(2)).result(timeout=30)
    finally:
        m.close()
    assert steps_of(root) == [1, 2]
    assert_restores(root, 2)


def test_enospc_unobserved_is_raised_by_next_save_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    save_steps(root, [1])
    net = wc.Net(W)
    m = _enospc_mirror(root)
    try:
        h = m.save(2, wc.fill(net, 2))
        wait_until(h.done, what="the failing save to finish")
        with pytest.raises(SaveFailedError) as ei:
            m.save(3, wc.fill(net, 3))
        _assert_enospc(ei.value, root, 2)
        m.save(3, wc.fill(net, 3)).result(timeout=30)
    finally:
        m.close()
    assert steps_of(root) == [1, 3]
    assert_restores(root, 3)


def test_enospc_unobserved_is_raised_by_wait_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    save_steps(root, [1])
    m = _enospc_mirror(root)
    try:
        h = m.save(2, wc.fill(wc.Net(W), 2))
        wait_until(h.done, what="the failing save to finish")
        with pytest.raises(SaveFailedError) as ei:
            m.wait(timeout=30)
        _assert_enospc(ei.value, root, 2)
        m.wait(timeout=30)
    finally:
        m.close()  # already reported: close does not raise it again


@needs_proc
def test_enospc_inside_an_object_write_removes_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    save_steps(root, [1])
    real_write = os.write
    hits: list[str] = []

    def write(fd: int, data: Any) -> int:
        path = fd_path(fd)
        name = os.path.basename(path)
        if step_dir(2) in path and name.startswith(".tmp-") and "-o000001-" in name:
            real_write(fd, memoryview(data)[: len(memoryview(data)) // 2])  # half the object hits the disk
            hits.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    net = wc.Net(W)
    m = Mirror([str(root)], object_bytes=OBJ)
    try:
        with pytest.raises(SaveFailedError) as ei:
            m.save(2, wc.fill(net, 2)).result(timeout=30)
        assert len(hits) == 1
        msg = str(ei.value)
        assert str(root) in msg and "ENOSPC" in msg and f"{step_dir(2)}/rank-00000/o000001-" in msg, msg
        assert temp_files(root) == [], "the partly written temp file must be removed"
        assert (
            not list((root / step_dir(2) / "rank-00000").glob("o000001-*.bin")) and not (root / commit_key(2)).exists()
        )
        assert_restores(root, 1)
        monkeypatch.undo()  # space is back
        m.save(2, wc.fill(net, 2)).result(timeout=30)
    finally:
        monkeypatch.undo()
        m.close()
    assert_restores(root, 2)


# ====================================================================== 8. fsync EIO
@needs_proc
@pytest.mark.parametrize("target", ["-o000000-", "-rank-00000-"])
def test_fsync_eio_fails_the_step_without_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    root = tmp_path / "root"
    save_steps(root, [1])
    real_fsync = os.fsync
    attempts: list[str] = []
    synced: list[str] = []

    def fsync(fd: int) -> None:
        path = fd_path(fd)
        name = os.path.basename(path)
        if step_dir(2) in path and name.startswith(".tmp-") and target in name:
            attempts.append(path)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        synced.append(path)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with Mirror([str(root)], object_bytes=OBJ) as m:
        with pytest.raises(SaveFailedError) as ei:
            m.save(2, wc.fill(wc.Net(W), 2)).result(timeout=30)
        m.wait(timeout=30)  # nothing retries in the background either
    assert len(attempts) == 1, f"fsync of the failing file attempted {len(attempts)} times: {attempts}"
    assert any(step_dir(2) in p for p in synced), "the other files of the step are fsynced (sanity)"
    msg = str(ei.value)
    assert "EIO" in msg and "fsync" in msg and str(root) in msg, msg
    pattern = "rank-00000/o000000-*.bin" if "o000000" in target else "rank-00000-*.json"
    assert not list((root / step_dir(2)).glob(pattern)), "a file whose fsync failed must not be renamed into place"
    assert not (root / commit_key(2)).exists()
    assert temp_files(root) == []
    monkeypatch.undo()
    assert steps_of(root) == [1]
    assert_restores(root, 1)


@needs_proc
def test_every_name_is_durable_before_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Directories are fsynced once each (not once per file), but after every rename into them
    and before the commit record's link; new directories' entries in their parents too."""
    root = tmp_path / "root"
    save_steps(root, [1])
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        path = fd_path(fd)
        real_fsync(fd)
        with lock:
            events.append(("dirsync" if os.path.isdir(path) else "fsync", path))

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        real_replace(src, dst, **kw)
        with lock:
            events.append(("rename", str(dst)))

    def link(src: Any, dst: Any, **kw: Any) -> None:
        real_link(src, dst, **kw)
        with lock:
            events.append(("link", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    with Mirror([str(root)], object_bytes=OBJ) as m:
        m.save(2, wc.fill(wc.Net(W), 2), extra=wc.extra_for(2, wc.SEED)).result(timeout=30)
    monkeypatch.undo()
    real = os.path.realpath(root)
    step = os.path.join(real, step_dir(2))
    ev = [(k, p) for k, p in events if p.startswith(step) or p == real]
    commit_at = ev.index(("link", os.path.join(real, commit_key(2))))
    renames = [(i, p) for i, (k, p) in enumerate(ev) if k == "rename"]
    assert len(renames) >= 8, renames  # 7 objects and the manifest
    for i, p in renames:
        assert i < commit_at, f"{p} renamed after the commit"
        syncs = [j for j, (k, d) in enumerate(ev) if k == "dirsync" and d == os.path.dirname(p) and i < j < commit_at]
        assert syncs, f"the directory of {p} is not fsynced between its rename and the commit"
    for d in (step, real):  # the new step directory's entry in the root, the rank directory's in the step
        assert any(k == "dirsync" and q == d for k, q in ev[:commit_at]), f"{d} not fsynced before the commit"
    assert ("dirsync", step) in ev[commit_at:], "the commit's directory is fsynced after the link"
    rank_dir_syncs = [p for k, p in ev if k == "dirsync" and p.endswith("rank-00000")]
    assert len(rank_dir_syncs) == 1, f"one fsync of the objects' directory per save, got {len(rank_dir_syncs)}"
    assert_restores(root, 2)


@needs_proc
def test_directory_fsync_eio_fails_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    save_steps(root, [1])
    real_fsync = os.fsync
    attempts: list[str] = []

    def fsync(fd: int) -> None:
        path = fd_path(fd)
        if step_dir(2) in path and path.endswith("rank-00000") and os.path.isdir(path):
            attempts.append(path)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with Mirror([str(root)], object_bytes=OBJ) as m:
        with pytest.raises(SaveFailedError) as ei:
            m.save(2, wc.fill(wc.Net(W), 2)).result(timeout=30)
        m.wait(timeout=30)
    assert len(attempts) == 1, attempts
    assert "EIO" in str(ei.value) and "directory fsync" in str(ei.value)
    assert not (root / commit_key(2)).exists()
    monkeypatch.undo()
    assert steps_of(root) == [1]
    assert_restores(root, 1)


def test_writeback_error_fails_the_put(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error from the early writeback (sync_file_range) fails the put like a write error."""
    from ckptmirror.replicas import local

    root = tmp_path / "root"
    save_steps(root, [1])

    def writeback(fd: int, offset: int, nbytes: int) -> bool:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(local, "_writeback", writeback)
    monkeypatch.setattr(local, "_sync_file_range", lambda *a: 0)  # "available", whatever the platform
    with Mirror([str(root)], object_bytes=OBJ) as m:
        with pytest.raises(SaveFailedError) as ei:
            m.save(2, wc.fill(wc.Net(W), 2)).result(timeout=30)
    assert "EIO" in str(ei.value)
    assert not (root / commit_key(2)).exists()
    assert temp_files(root) == []
    monkeypatch.undo()
    assert_restores(root, 1)


def test_drop_cache_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``drop_cache=True``: every file's pages are dropped once fsynced; saves restore bit-exact."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise here")
    root = tmp_path / "root"
    advised: list[int] = []
    real = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append(advice)
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    save_steps(root, [1, 2], storage_options={"file": {"drop_cache": True}})
    assert advised and set(advised) == {os.POSIX_FADV_DONTNEED}
    n = len(advised)
    save_steps(root, [3])  # off by default
    assert len(advised) == n
    monkeypatch.undo()
    assert_restores(root, 3)
    assert_restores(root, 2, at=2)
    with pytest.raises(ValueError, match="drop_cache"):
        LocalReplica(str(root), drop_cache="yes")  # type: ignore[arg-type]


# ============================================================ 9. step already committed
def test_saving_a_committed_step_is_refused_unless_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "root"
    net = wc.Net(W)
    with Mirror([str(root)], object_bytes=OBJ) as m:
        m.save(1, wc.fill(net, 1)).result(timeout=30)
        before = tree_snapshot(root)
        with pytest.raises(StepExistsError):
            m.save(1, wc.fill(net, 2))
        with Mirror([str(root)], object_bytes=OBJ) as m2:  # a second writer, opened after the commit
            with pytest.raises(StepExistsError):
                m2.save(1, wc.fill(net, 2))
        assert tree_snapshot(root) == before
        assert_restores(root, 1)
        m.save(1, wc.fill(net, 2), overwrite=True).result(timeout=30)  # asked for explicitly
    res, restored = restore_fresh(root)
    assert res is not None and res.step == 1
    assert_bit_exact(state_of(restored), wc.expected_state(2, W))


def test_step_in_flight_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    gate, entered = threading.Event(), threading.Event()

    def hook(phase: str, key: str) -> None:
        if phase == "commit":
            entered.set()
            gate.wait(30)

    net = wc.Net(W)
    m = Mirror([FaultyReplica(LocalReplica(str(root)), on_phase=hook)], object_bytes=OBJ)
    try:
        h = m.save(3, wc.fill(net, 3))
        assert entered.wait(30)
        with pytest.raises(StepExistsError):
            m.save(3, wc.fill(net, 4))
        gate.set()
        h.result(timeout=30)
        with pytest.raises(StepExistsError):
            m.save(3, wc.fill(net, 4))
    finally:
        gate.set()
        m.close()
    assert_restores(root, 3)


def test_second_mirror_opened_before_the_commit_is_refused_by_the_commit_record(tmp_path: Path) -> None:
    root = tmp_path / "root"
    a = Mirror([str(root)], object_bytes=OBJ)
    b = Mirror([str(root)], object_bytes=OBJ)  # its list of committed steps predates a's commit
    try:
        a.save(1, wc.fill(wc.Net(W), 1)).result(timeout=30)
        before = tree_snapshot(root)
        hb = b.save(1, wc.fill(wc.Net(W), 1, seed=99))
        with pytest.raises(SaveFailedError) as ei:
            hb.result(timeout=30)
        assert isinstance(ei.value.failures[str(root)], StepExistsError)
        assert tree_snapshot(root) == before, "the refused writer modified the committed step"
    finally:
        a.close()
        b.close(raise_errors=False)
    assert_restores(root, 1)


def test_losing_writer_never_damages_the_winners_committed_step(tmp_path: Path) -> None:
    """Two writers race for step 5; B passed its "already committed?" check, then A commits.

    The commit record is create-if-absent, so B cannot commit; but B must not damage A's
    committed step either (RELIABILITY.md: "A committed step is never overwritten in place").
    """
    root = tmp_path / "root"
    save_steps(root, [4])
    gate, b_putting = threading.Event(), threading.Event()

    def hook(phase: str, key: str) -> None:
        if phase == "put" and not b_putting.is_set():
            b_putting.set()
            gate.wait(30)

    a = Mirror([str(root)], object_bytes=OBJ)
    # io_threads=1: every put of B waits behind the first one, so B has written nothing yet.
    b = Mirror([FaultyReplica(LocalReplica(str(root)), on_phase=hook)], object_bytes=OBJ, io_threads=1)
    try:
        hb = b.save(5, wc.fill(wc.Net(W), 5, seed=99))
        assert b_putting.wait(30)
        a.save(5, wc.fill(wc.Net(W), 5), extra=wc.extra_for(5)).result(timeout=30)
        gate.set()
        with pytest.raises(SaveFailedError):
            hb.result(timeout=30)
    finally:
        gate.set()
        a.close()
        b.close(raise_errors=False)
    assert steps_of(root) == [4, 5]
    assert_restores(root, 5)


# ============================================================== 10. planted symlinks
@pytest.mark.parametrize("planted", ["step-dir", "rank-dir"])
def test_symlink_in_root_is_not_followed_on_save(tmp_path: Path, planted: str) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    save_steps(root, [4])
    if planted == "step-dir":
        os.symlink(outside, root / step_dir(5))
    else:
        (root / step_dir(5)).mkdir()
        os.symlink(outside, root / step_dir(5) / "rank-00000")
    with Mirror([str(root)], object_bytes=OBJ) as m:
        with pytest.raises(SaveFailedError) as ei:
            m.save(5, wc.fill(wc.Net(W), 5)).result(timeout=30)
        assert isinstance(ei.value.failures[str(root)], CkptMirrorError)
        assert str(root) in str(ei.value)
        assert m.steps() == [4]
    assert list(outside.iterdir()) == [], "the save wrote outside the replica root"
    assert_restores(root, 4)


def test_symlinked_step_outside_root_is_neither_listed_nor_deleted(tmp_path: Path) -> None:
    root, outside, elsewhere = tmp_path / "root", tmp_path / "outside", tmp_path / "elsewhere"
    save_steps(elsewhere, [1])  # a complete committed step, outside the root
    outside.mkdir()
    shutil.copytree(elsewhere / step_dir(1), outside / step_dir(1))
    root.mkdir()
    os.symlink(outside / step_dir(1), root / step_dir(1))
    before = tree_snapshot(outside)
    with Mirror([str(root)]) as m:
        assert m.steps() == []
    save_steps(root, [2, 3], keep_last=1)  # retention runs twice over the planted link
    assert steps_of(root) == [3]
    assert tree_snapshot(outside) == before, "retention deleted or changed files outside the root"
    assert_restores(root, 3)


def test_a_step_restore_skipped_as_damaged_can_be_saved_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The newest step is damaged on the only replica: restore falls back one step, the job
    # trains that step again and saves it. The save used to raise StepExistsError ("pass
    # overwrite=True"), so the run stopped at the same place after every restart (a campaign
    # found it). Now the save replaces the damaged copies, once.
    root = tmp_path / "root"
    with Mirror([str(root)], object_bytes=OBJ) as m:
        for s in (1, 2):
            m.save(s, wc.fill(wc.Net(W), s)).result(timeout=30)
    obj = root / okey(root, 2, 0)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01
    obj.write_bytes(bytes(data))
    net = wc.fill(wc.Net(W), 999)
    with caplog.at_level(logging.WARNING, logger="ckptmirror"), Mirror([str(root)], object_bytes=OBJ) as m:
        assert m.restore(net).step == 1
        assert_bit_exact(state_of(net), state_of(wc.fill(wc.Net(W), 1)))
        again = wc.fill(wc.Net(W), 22)  # step 2 trained again (other values than the damaged save's)
        h = m.save(2, again)
        h.result(timeout=30)
        assert {st.state for st in h.replicas.values()} == {"committed"}
        with pytest.raises(StepExistsError):
            m.save(2, again)  # once: the new step 2 is intact
    assert any("replacing the damaged copies" in w for w in ck_warnings(caplog)), ck_warnings(caplog)
    fresh = wc.fill(wc.Net(W), 999)
    with Mirror([str(root)]) as m:
        assert m.restore(fresh).step == 2
    assert_bit_exact(state_of(fresh), state_of(wc.fill(wc.Net(W), 22)))


def test_a_delete_raced_by_another_deleter_of_the_step_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen in CI: the job's keep_last retention removed step 3's directory while a Lightning
    # release deleted step 3 (Mirror.delete): after unlinking the commit record, the delete's
    # fsync of the step directory met ENOENT and failed, leaving a release marker behind. The
    # directory is gone because the other deleter removed it: our removal holds.
    root = tmp_path / "root"
    save_steps(root, [1, 2, 3])
    real_unlink = os.unlink

    def unlink(path: Any, *a: Any, **k: Any) -> None:
        real_unlink(path, *a, **k)
        if str(path).endswith(commit_key(2)):
            shutil.rmtree(root / step_dir(2))  # the other deleter, right after our unlink

    monkeypatch.setattr(os, "unlink", unlink)
    with Mirror([str(root)], object_bytes=OBJ) as m:
        m.delete(2)
        monkeypatch.undo()
        assert m.steps() == [1, 3]
    assert steps_of(root) == [1, 3]
