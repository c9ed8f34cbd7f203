"""``ckptmirror demo``: async saves to three replicas, a killed process, a lost node, a verified restore.

The demo starts a peer agent (``ckptmirror serve``) and, unless ``AWS_ENDPOINT_URL`` points at
one, a moto S3 server on loopback. It runs the training loop in a child process that saves to
the local disk, the peer and S3 (so the crash is a real SIGKILL, not an exception), deletes the
local replica as if the node were lost, restores from the peer, times a restore from S3 alone,
and checks both bit for bit against an uninterrupted run of the same deterministic training.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import torch

SEED = 1234


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


@contextlib.contextmanager
def services(root: str) -> Iterator[dict[str, str]]:
    """Start a peer agent and, unless AWS_ENDPOINT_URL is set, a moto S3 server, on loopback."""
    procs: list[subprocess.Popen[bytes]] = []
    env = {"CKPTMIRROR_PEER_TOKEN": secrets.token_hex(16)}
    try:
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
        if not os.environ.get("AWS_ENDPOINT_URL"):
            s3port = _free_port()
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3port)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            _wait_http(f"http://127.0.0.1:{s3port}/")
            env.update(
                AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3port}",
                AWS_ACCESS_KEY_ID="demo",
                AWS_SECRET_ACCESS_KEY="demo",
                AWS_DEFAULT_REGION="us-east-1",
            )
        bucket = os.environ.get("CKPTMIRROR_DEMO_BUCKET", "ckptmirror-demo")
        env["CKPTMIRROR_DEMO_S3"] = f"s3://{bucket}/run-{secrets.token_hex(3)}"
        os.environ.update(env)
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        yield env
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def child(root: str, steps: int, save_every: int) -> None:
    """The training process: trains, saves every ``save_every`` steps, reports on stdout."""
    import ckptmirror

    torch.set_num_threads(1)
    model, optim = build()
    mirror = ckptmirror.Mirror(replica_urls(root), keep_last=3)
    pending: list[Any] = []
    for step in range(1, steps + 1):
        loss = train_step(model, optim, step)
        if step % save_every == 0:
            h = mirror.save(step, model, optim, extra={"loss": loss})
            pending.append(h)
        for h in [h for h in pending if all(st.state != "pending" for st in h.replicas.values())]:
            h.result()
            pending.remove(h)
            replica_s = [st.seconds for st in h.replicas.values()]
            print(
                json.dumps(
                    {
                        "event": "committed",
                        "step": h.step,
                        "stall_s": h.stall_s,
                        "wait_s": h.wait_s,
                        "replica_s": replica_s,
                        "bytes": h.nbytes,
                    }
                ),
                flush=True,
            )
        print(json.dumps({"event": "step", "step": step, "loss": loss}), flush=True)
        time.sleep(0.02)  # a real step takes longer; leaves room for the background writer
    mirror.close()


def _state_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


def _restore_into_fresh(urls: list[str]) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer, float]:
    import ckptmirror

    model, optim = build(seed=999)  # a "replacement node": different initial weights
    t0 = time.perf_counter()
    with ckptmirror.Mirror(urls) as mirror:
        result = mirror.restore(model, optim)
    return result, model, optim, time.perf_counter() - t0


def run_demo(directory: str | None, steps: int, save_every: int) -> int:
    """Run the whole demo; returns the process exit status (0: restored bit-exact)."""
    import ckptmirror

    root = directory or tempfile.mkdtemp(prefix="ckptmirror-demo-")
    if os.path.exists(root) and os.listdir(root):
        shutil.rmtree(root)
    os.makedirs(root, exist_ok=True)
    kill_at = max(save_every * 2 + 1, steps * 3 // 4)
    try:
        with services(root):
            urls = replica_urls(root)
            print(f"ckptmirror {ckptmirror.__version__} demo; replicas:")
            for u, what in zip(
                urls, ("this node's disk", "peer agent (ckptmirror serve) on 'node 1'", "S3-compatible store")
            ):
                print(f"  {u:<48} {what}")
            print(f"training in a child process; it saves every {save_every} steps and is SIGKILLed at step {kill_at}")
            proc = subprocess.Popen(
                [sys.executable, "-m", "ckptmirror.cli.demo", "--child", root, str(steps), str(save_every)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                ev = json.loads(line)
                if ev["event"] == "committed":
                    per = ", ".join(
                        f"{name} {sec * 1e3:.0f} ms" for name, sec in zip(("disk", "peer", "s3"), ev["replica_s"])
                    )
                    print(
                        f"  step {ev['step']:>4}: {ev['bytes'] / 1e6:.1f} MB, training stalled {ev['stall_s'] * 1e3:.1f} ms"
                        + (
                            f" ({ev['wait_s'] * 1e3:.0f} ms of it waiting for the previous save)"
                            if ev["wait_s"] > 1e-3
                            else ""
                        )
                        + f"; committed on {per}"
                    )
                elif ev["step"] >= kill_at:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            proc.wait()
            print(f"child killed with SIGKILL at step {kill_at} (exit status {proc.returncode})")
            shutil.rmtree(urls[0])
            print(f"node 0 lost: deleted its local replica {urls[0]}")

            with ckptmirror.Mirror(urls) as mirror:
                print(f"committed steps per replica: {mirror.replica_steps()}")
            result, model, optim, peer_s = _restore_into_fresh(urls)
            if result is None:
                print("no checkpoint was committed before the crash")
                return 1
            served = sorted(set(result.sources.values()))
            print(
                f"restored step {result.step} from {served} in {peer_s * 1e3:.0f} ms (every checksum verified; opening and listing all three replicas included)"
            )
            # Like for like: one replica each, the same step, a fresh model each time.
            _, _, _, peer_only_s = _restore_into_fresh([urls[1]])
            s3_result, s3_model, s3_optim, s3_s = _restore_into_fresh([urls[2]])
            print(
                f"the same step from the peer alone: {peer_only_s * 1e3:.0f} ms; from S3 alone: {s3_s * 1e3:.0f} ms "
                f"({s3_s / peer_only_s:.1f}x; both servers run on this machine's loopback here)"
            )

            ref_model, ref_optim = build()
            for step in range(1, result.step + 1):
                train_step(ref_model, ref_optim, step)
            same = (
                all(
                    _state_equal(ref.state_dict(), got.state_dict())
                    for ref, got in (
                        (ref_model, model),
                        (ref_optim, optim),
                        (ref_model, s3_model),
                        (ref_optim, s3_optim),
                    )
                )
                and s3_result is not None
                and s3_result.step == result.step
            )
            print(
                f"bit-exact against an uninterrupted run to step {result.step} (peer and S3 copies): {'yes' if same else 'NO'}"
            )
            nxt = result.step + 1
            a, b = train_step(model, optim, nxt), train_step(ref_model, ref_optim, nxt)
            print(
                f"step {nxt} after restore: loss {a:.6f} (uninterrupted run: {b:.6f}, {'identical' if a == b else 'DIFFERENT'})"
            )
            return 0 if same and a == b else 1
    finally:
        if directory is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: python -m ckptmirror.cli.demo --child ROOT STEPS SAVE_EVERY (use 'ckptmirror demo')")
