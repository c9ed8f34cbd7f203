"""Helpers shared by the test files (one copy each); fixtures built on them are in ``conftest.py``.

Polling (:func:`wait_until`), free ports, files on disk, log records, models and their
bit-exact comparison, child scripts forked from a server that imported their framework once
(:class:`ForkServer`), ``torchrun`` jobs, the AWS environment of an S3 test server and a boto3
view of a bucket. The peer agent's helpers are in ``_agent.py``.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from torch import nn

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent

T = TypeVar("T")


# ------------------------------------------------------------------------------ polling
def traced_peak(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()`` and the peak of the Python memory it allocated (tracemalloc), in bytes, after a
    full collection so that earlier garbage does not count."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return result, peak


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` s pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# -------------------------------------------------------------------------------- ports
def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct ports that were free a moment ago (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago: for a server started on a known port, or one nobody listens on."""
    return free_ports(1, host)[0]


def answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (any status counts)."""
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


# -------------------------------------------------------------------------------- files
def files_under(root: str | os.PathLike[str]) -> list[str]:
    """Every non-directory entry under ``root`` (relative paths, sorted), symlinks not followed."""
    root = os.fspath(root)
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def temp_files(root: str | os.PathLike[str]) -> list[str]:
    """Agent/replica temp files (``.tmp-*``) under ``root``, sorted."""
    return [f for f in files_under(root) if os.path.basename(f).startswith(".tmp-")]


def local_manifest(root: Path, step: int) -> Any:
    """The rank manifest of rank 0 at ``step`` in the local replica ``root``, parsed."""
    from ckptmirror.format import parse_rank_manifest, step_dir

    (path,) = (root / step_dir(step)).glob("rank-00000-*.json")
    return parse_rank_manifest(path.read_bytes(), path.relative_to(root).as_posix())


def stored_key(root: str | os.PathLike[str], key: str) -> str:
    """Where the local replica ``root`` holds the object whose manifest key is ``key``: itself,
    or (format version 3) the compressed or earlier step's file its placement record names."""
    from ckptmirror.format import writer_of
    from ckptmirror.placement import parse_placement

    w = writer_of(key)
    if w is None:
        return key
    step_dir = key.split("/", 1)[0]
    pkey = f"{step_dir}/rank-{w[0]:05d}-{w[1]}.place.json"
    path = Path(root) / pkey
    if not path.exists():
        return key
    s = parse_placement(path.read_bytes(), pkey).entries.get(key)
    return key if s is None else s.key


# --------------------------------------------------------------------------------- logs
def ck_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages of the WARNING (and worse) records ckptmirror logged."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("ckptmirror") and r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------- models
def make_net(width: int, layers: int) -> nn.Module:
    """``layers`` x Linear(width, width)."""
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def fill(net: nn.Module, seed: int) -> nn.Module:
    """Deterministic, step-specific values (so that restoring the wrong step is caught)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net


def state_of(net: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's state dict."""
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def make_state(seed: int, dims: tuple[int, int, int] = (512, 768, 256)) -> tuple[nn.Module, torch.optim.Optimizer]:
    """An MLP and its SGD optimizer after one training step (momentum buffers set).

    The default ``dims`` give ~2.4 MB of parameters plus momentum buffers of the same size.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(dims[0], dims[1]), nn.Tanh(), nn.Linear(dims[1], dims[2]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, opt, seed)
    return model, opt


def train(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    """One deterministic SGD step of a :func:`make_state` model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, model[0].in_features, generator=g)
    opt.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()
    opt.step()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Deep copies of the model's and the optimizer's state dicts."""

    def copy(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().clone()
        if isinstance(v, dict):
            return {k: copy(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(copy(x) for x in v)
        return v

    return {"model": copy(model.state_dict()), "optim": copy(opt.state_dict())}


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_exact(actual: Any, expected: Any, what: str = "") -> None:
    """``actual`` has the structure of ``expected`` (dicts, lists, tuples) and every tensor the
    same dtype, shape and bytes; other values are equal. ``what`` prefixes the messages."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{what}: {type(actual).__name__}, not a tensor"
        assert actual.dtype == expected.dtype and tuple(actual.shape) == tuple(expected.shape), (
            f"{what}: {actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}"
        )
        assert torch.equal(_raw(actual), _raw(expected)), f"{what}: bytes differ"
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{what}: {type(actual).__name__}, not an array"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
        assert actual.tobytes() == expected.tobytes(), f"{what}: bytes differ"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (
            f"{what}: keys {sorted(map(str, actual))} vs {sorted(map(str, expected))}"
        )
        for k in expected:
            assert_bit_exact(actual[k], expected[k], f"{what}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_bit_exact(a, e, f"{what}[{i}]")
    else:
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"


# --------------------------------------------------------------------------- fork server
class Forked:
    """A child of a :class:`ForkServer`: ``pid``, ``wait``, ``kill``, ``returncode`` as a Popen's,
    its stdout and stderr in files."""

    def __init__(self, server: ForkServer, pid: int, stdout: Path, stderr: Path) -> None:
        self.server, self.pid, self.stdout_path, self.stderr_path = server, pid, stdout, stderr
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        """The exit code (negative: the signal that ended it); TimeoutExpired as Popen.wait."""
        if self.returncode is None:
            self.returncode = self.server.wait(self.pid, 1e9 if timeout is None else timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(f"forked child {self.pid}", timeout or 0.0)
        return self.returncode

    def poll(self) -> int | None:
        """The exit code if the child has exited (the server reported it), else None."""
        if self.returncode is None:
            self.returncode = self.server.wait(self.pid, 0.0)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait, then (stdout, stderr) as text, as ``Popen.communicate`` gives them."""
        self.wait(timeout)
        return self.stdout_path.read_text(errors="replace"), self.stderr_path.read_text(errors="replace")


class ForkServer:
    """``tests/_fork_server.py``: imports ``modules`` once, then forks each child script from
    that process (see there). :meth:`popen` starts one; children run concurrently.

    For child scripts whose cost is mostly importing a framework: a fresh interpreter per child
    pays that every time. Each child is still a process of its own, started after the server
    ran nothing but imports, and ends as the script would (``os._exit``, signals, exit codes).
    """

    def __init__(self, modules: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 300) -> None:
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "_fork_server.py"), *modules],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=f,
                env=env,
                cwd=REPO,
            )
        self._buf = b""
        self._exited: dict[int, int] = {}  # pid -> os.waitpid status, reported but not yet collected
        doc = self._next(timeout)
        assert doc == {"ready": True}, f"fork server not ready after {timeout} s ({doc}):\n{self._said()}"

    def _said(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def _next(self, timeout: float) -> dict[str, Any] | None:
        """The server's next line, or None if it said nothing within ``timeout`` s."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            data = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not data:
                raise AssertionError(f"fork server exited ({self.proc.poll()}):\n{self._said()}")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        doc: dict[str, Any] = json.loads(line)
        return doc

    def popen(self, argv: list[str], cwd: str | os.PathLike[str], stdout: Path, stderr: Path | None = None) -> Forked:
        """Fork ``python argv...`` in ``cwd``; its stdout goes to ``stdout`` (appended), its stderr
        to ``stderr`` (default: the same file)."""
        stderr = stdout if stderr is None else stderr
        assert self.proc.stdin is not None
        cmd = {"argv": [str(a) for a in argv], "cwd": str(cwd), "stdout": str(stdout), "stderr": str(stderr)}
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        while True:
            doc = self._next(60.0)
            assert doc is not None, f"the fork server did not fork within 60 s:\n{self._said()}"
            if "status" in doc:
                self._exited[doc["pid"]] = doc["status"]
            else:
                return Forked(self, int(doc["pid"]), stdout, stderr)

    def wait(self, pid: int, timeout: float) -> int | None:
        """The exit code of child ``pid`` (negative: killed by that signal), or None after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while pid not in self._exited:
            doc = self._next(deadline - time.monotonic())
            if doc is None:
                return None
            self._exited[doc["pid"]] = doc["status"]
        return os.waitstatus_to_exitcode(self._exited.pop(pid))

    def close(self) -> None:
        """End of commands: the server waits for its children, then exits."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()


# ------------------------------------------------------------------------------ torchrun
#: Seen once in ~20 runs of a 4-rank job on 2 cores: a worker aborts in torch's C++ teardown
#: after the job's work (and ckptmirror's threads) finished. Only that signature is retried.
TEARDOWN_ABORT = "terminate called without an active exception"


def _torchrun_cmd(args: tuple[str, ...], nproc: int, restarts: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={restarts}",
        *args,
    ]


_TORCHRUN_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(
    *args: str, nproc: int = 2, restarts: int = 0, timeout: float = 240, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``torch.distributed.run --standalone`` in the repository (the environment, AWS_* too,
    is inherited); with ``check``, a failed job raises AssertionError with its output."""
    cmd = _torchrun_cmd(args, nproc, restarts)
    env = dict(os.environ, **_TORCHRUN_ENV)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    return _torchrun_checked(p, cmd, env, timeout, check)


def _torchrun_checked(
    p: subprocess.CompletedProcess[str], cmd: list[str], env: dict[str, str], timeout: float, check: bool
) -> subprocess.CompletedProcess[str]:
    if check and p.returncode != 0 and TEARDOWN_ABORT in p.stderr:
        # Only that signature is retried, and the rerun is checked like the first.
        warnings.warn(
            f"torchrun worker aborted in torch teardown; running the job again: {p.stderr[-500:]}", stacklevel=3
        )
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


class TorchrunJob:
    """A :func:`torchrun` job started in the background (``torchrun_start``), for a test to run
    an independent job (a reference run) alongside its others; :meth:`result` waits and checks
    it as :func:`torchrun` does."""

    def __init__(self, args: tuple[str, ...], nproc: int, restarts: int, timeout: float, check: bool) -> None:
        self.cmd = _torchrun_cmd(args, nproc, restarts)
        self.env = dict(os.environ, **_TORCHRUN_ENV)
        self.timeout, self.check = timeout, check
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=REPO
        )

    def result(self) -> subprocess.CompletedProcess[str]:
        try:
            out, err = self.proc.communicate(timeout=max(1.0, self.timeout - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        p = subprocess.CompletedProcess(self.cmd, self.proc.returncode, out, err)
        return _torchrun_checked(p, self.cmd, self.env, self.timeout, self.check)

    def kill(self) -> None:
        """For a test leaving early: the job is not left running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def torchrun_start(
    *args: str, nproc: int = 2, restarts: int = 0, timeout: float = 240, check: bool = True
) -> TorchrunJob:
    """:func:`torchrun` without waiting for it: ``.result()`` gives what torchrun would have."""
    return TorchrunJob(args, nproc, restarts, timeout, check)


def read_losses(path: Path, *, once: bool = False) -> tuple[dict[int, float], list[dict[str, Any]]]:
    """(step -> loss, the other records in order) of one rank's JSON-lines loss log.

    A step trained again after a restart keeps its last loss; with ``once``, a step trained
    twice fails the test instead.
    """
    out: dict[int, float] = {}
    events: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        if "step" in d:
            assert not (once and d["step"] in out), f"step {d['step']} trained twice in {path}"
            out[d["step"]] = d["loss"]
        else:
            events.append(d)
    return out, events


# ------------------------------------------------------------------------------------ S3
def point_aws_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, key: str = "testing", secret: str = "testing") -> None:
    """The standard AWS variables point at ``endpoint``; the developer's ~/.aws stays out."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    nowhere = os.path.join(tempfile.gettempdir(), f"no-aws-config-{uuid.uuid4().hex}")
    monkeypatch.setenv("AWS_CONFIG_FILE", nowhere)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


class S3Bucket:
    """boto3 view of the bucket behind an ``s3://bucket/prefix`` URL, to look and to damage.

    Keys are relative to the prefix. Credentials come from the environment (:func:`point_aws_at`).
    """

    def __init__(self, url: str, endpoint: str) -> None:
        import boto3

        self.url = url
        self.name, _, self.prefix = url.split("://", 1)[1].partition("/")
        self.client = boto3.client("s3", endpoint_url=endpoint)

    def full(self, key: str) -> str:
        """The bucket key of ``key``."""
        return f"{self.prefix}/{key}" if self.prefix else key

    def sizes(self) -> dict[str, int]:
        """Visible objects under the prefix: key (relative to the prefix) -> size."""
        out: dict[str, int] = {}
        under = self.full("")
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=under):
            for o in page.get("Contents", []):
                out[o["Key"][len(under) :]] = o["Size"]
        return out

    def files(self) -> dict[str, bytes]:
        return {k: self.get(k) for k in self.sizes()}

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=self.full(key))["Body"].read()

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=self.full(key), Body=body)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=self.full(key))

    def uploads(self) -> list[str]:
        """Bucket keys of the multipart uploads open under the prefix."""
        resp = self.client.list_multipart_uploads(Bucket=self.name, Prefix=self.full(""))
        return [u["Key"] for u in resp.get("Uploads", [])]

    def wipe(self) -> None:
        """What an S3 server restarted without its data looks like: nothing left in the bucket."""
        for u in self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", []):
            self.client.abort_multipart_upload(Bucket=self.name, Key=u["Key"], UploadId=u["UploadId"])
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name):
            for o in page.get("Contents", []):
                self.client.delete_object(Bucket=self.name, Key=o["Key"])


def takes_o_direct(directory: str | os.PathLike[str]) -> bool:
    """Whether files in ``directory`` can be opened with ``O_DIRECT`` (Linux; tmpfs before
    kernel 6.6 and some FUSE filesystems refuse it with EINVAL)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    path = os.path.join(directory, f".o-direct-probe-{uuid.uuid4().hex}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o600)
    except OSError:
        return False
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    os.close(fd)
    return True


# ---------------------------------------------------------------------------- small disks
@contextlib.contextmanager
def small_tmpfs(path: str, size_mib: int) -> Iterator[str]:
    """A ``size_mib`` MiB tmpfs mounted at ``path`` (created) for a test of a disk that fills up;
    the test is skipped where this process may not mount. Unmounted (lazily) at the end."""
    os.makedirs(path)
    got = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", path], capture_output=True, text=True
    )
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {got.stderr.strip() or got.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def fill_disk(path: str, leave_bytes: int = 0) -> str:
    """Fill the filesystem of ``path`` until ``leave_bytes`` (rounded to pages) are free, or, with
    0, until it refuses another byte (an agent may be writing at the same time); the filler's path."""
    mib = 1 << 20
    filler = os.path.join(path, ".filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        st = os.statvfs(path)
        n = max(0, st.f_bavail * st.f_frsize - leave_bytes)
        block = b"\xff" * mib
        while n > 0 or leave_bytes == 0:
            try:
                n -= os.write(fd, block[: min(mib, n) if leave_bytes else mib])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return filler


class Gate:
    """An ``on_phase`` hook that holds the object puts of one step until :meth:`open` (a replica
    whose uploads hang), counting the puts of that step that began after :attr:`dropped_at`."""

    def __init__(self, step: int, hold_s: float = 20) -> None:
        self.prefix = f"step-{step:012d}/"  # format.step_dir
        self.hold_s = hold_s  # then it opens by itself (a hang that would stall a save this long)
        self.until: float | None = None
        self.opened = threading.Event()
        self.waiting = 0
        self.after_drop = 0
        self.dropped_at: float | None = None
        self._lock = threading.Lock()

    def __call__(self, phase: str, key: str) -> None:
        if not phase.startswith("put") or not key.startswith(self.prefix):
            return
        with self._lock:
            self.waiting += 1
            if self.dropped_at is not None:
                self.after_drop += 1
            if self.until is None:
                self.until = time.monotonic() + self.hold_s
        self.opened.wait(max(0.0, self.until - time.monotonic()))

    def open(self) -> None:
        self.opened.set()
