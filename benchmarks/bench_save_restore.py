#!/usr/bin/env python
"""Save/restore benchmark: ckptmirror against torch.save + fsync and torch.distributed.checkpoint.

Measures, in one run and on the same state (an MLP of ``--params`` float32 parameters plus
its AdamW state after one optimizer step; ~1.2 GB at the default 100M parameters), the
metrics of docs/PERFORMANCE.md:

* stall: how long the save call blocks the caller (first save apart from the steady state);
* time to durable / committed;
* restore into a freshly built model + optimizer, verified bit-exact against the saved state;
* peak extra host RSS beyond the training state, and whether repeated saves allocate;
* bytes written;
* with ``--slowdown``: training-step time while a save writes in the background.

Every contender runs in its own subprocess (this script re-invokes itself with
``--contender NAME``) so that the peak RSS (VmHWM) belongs to that contender alone. All
checkpoints go to sub-directories of ``--dir`` (one disk for everyone), removed after each
contender. Restores run right after the saves, so the page cache is warm; caches are not
dropped (that needs root).

Run ``python benchmarks/bench_save_restore.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from _memory import proc_status, reset_peak

GB = 1e9
LAYERS = 6  # default; set from --layers
BATCH = 16

# Contender subprocesses, in run order. "reference" produces two rows (memcpy floor, raw write+fsync).
CONTENDERS = ["reference", "torch.save+fsync", "dcp.save", "dcp.async_save", "ckptmirror"]


#: The slowdown run's third contender: ckptmirror with the local replica's direct_io option.
DIRECT = "ckptmirror direct_io"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_probe() -> dict[str, float]:
    """CPU counters: the machine is shared, so measure how much CPU *other* processes used."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    t = os.times()
    return {
        "wall": time.monotonic(),
        "busy": (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK"),
        "steal": (v[7] if len(v) > 7 else 0) / os.sysconf("SC_CLK_TCK"),
        "own": t.user + t.system,
    }


def foreign_cpu(a: dict[str, float] | None, b: dict[str, float] | None) -> dict[str, float] | None:
    """Between two probes: CPUs' worth of work done by other processes, and stolen by the hypervisor."""
    if not a or not b or "busy" not in a or "busy" not in b or b["wall"] <= a["wall"]:
        return None
    wall = b["wall"] - a["wall"]
    return {
        "other_cpus": max(0.0, (b["busy"] - a["busy"]) - (b["own"] - a["own"])) / wall,
        "steal_cpus": (b["steal"] - a["steal"]) / wall,
    }


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


# ------------------------------------------------------------------------------- the state
def width_for(params: float) -> int:
    """Width of the ``LAYERS`` square Linear layers that give about ``params`` parameters."""
    return max(64, int(round(math.sqrt(params / LAYERS) / 64)) * 64)


def build_model(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(LAYERS):
        layers.append(nn.Linear(width, width))
        if i < LAYERS - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train_step(model: nn.Module, optim: torch.optim.Optimizer, width: int) -> None:
    x = torch.randn(BATCH, width)
    model(x).square().mean().backward()
    optim.step()
    optim.zero_grad(set_to_none=True)


def build_state(width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The training state every contender saves: model + AdamW after one step."""
    model = build_model(width, seed=0)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optim, width)
    return model, optim


def fresh_target(width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """What a restarted job has: a newly built model (other init) and an AdamW with empty state."""
    model = build_model(width, seed=1234)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def state_tensors(model: nn.Module, optim: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    out = [(f"model.{k}", v) for k, v in model.state_dict().items()]
    osd = optim.state_dict()
    for pid in sorted(osd["state"]):
        for k, v in sorted(osd["state"][pid].items()):
            if isinstance(v, torch.Tensor):
                out.append((f"optim.state.{pid}.{k}", v))
    return out


def state_nbytes(model: nn.Module, optim: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for _, t in state_tensors(model, optim))


def verify(src: tuple[nn.Module, torch.optim.Optimizer], dst: tuple[nn.Module, torch.optim.Optimizer]) -> None:
    """Raise unless ``dst`` holds exactly the values of ``src`` (model, optimizer state, hyper-parameters)."""
    a, b = state_tensors(*src), state_tensors(*dst)
    if [k for k, _ in a] != [k for k, _ in b]:
        raise AssertionError(f"restored state has other keys: {len(a)} vs {len(b)} tensors")
    for (k, x), (_, y) in zip(a, b):
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            raise AssertionError(f"restored tensor {k} differs from the saved one")
    ga = [{k: v for k, v in g.items() if k != "params"} for g in src[1].state_dict()["param_groups"]]
    gb = [{k: v for k, v in g.items() if k != "params"} for g in dst[1].state_dict()["param_groups"]]
    if ga != gb:
        raise AssertionError("restored optimizer param_groups differ")


# ------------------------------------------------------------------------------ contenders
class Contender:
    """One way of saving and restoring. ``save`` returns a record with at least stall and total."""

    rows: list[str] = []

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)

    def save(self, i: int, model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
        raise NotImplementedError

    def after_saves(self) -> dict[str, Any]:
        return {}

    def restore(self, model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Reference(Contender):
    """Floors: one memcpy of the state into an existing buffer; write those bytes raw + fsync."""

    rows = ["memcpy floor (ref)", "raw write+fsync (ref)"]

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.arena: torch.Tensor | None = None
        self.path = ""

    def save(self, i, model, optim):
        # The floor is the faster of two hand-written loops into one existing buffer: torch's
        # copy_ of native-dtype views, and ctypes.memmove (no OpenMP). A copy_ of uint8 views
        # (as this script did before) opens an OpenMP region for every tensor past 32 KB,
        # which on a busy machine inflates the floor itself (see benchmarks/bench_stall.py).
        tensors = [t for _, t in state_tensors(model, optim)]
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += (n + 15) // 16 * 16  # aligned: native-dtype views
        best = None
        # The first save copies once, into fresh pages (that is what it shows); later ones take the faster loop.
        for how in ("memmove",) if self.arena is None else ("torch", "memmove"):
            t0 = time.perf_counter()
            if self.arena is None:
                self.arena = torch.empty(total, dtype=torch.uint8)
            if how == "torch":
                for t, o, n in zip(tensors, offsets, sizes):
                    self.arena[o : o + n].view(t.dtype).copy_(t.reshape(-1))
            else:
                base = self.arena.data_ptr()
                for t, o, n in zip(tensors, offsets, sizes):
                    ctypes.memmove(base + o, t.data_ptr(), n)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        memcpy = best
        self.path = os.path.join(self.workdir, f"raw-{i}.bin")
        t1 = time.perf_counter()
        view = memoryview(self.arena.numpy())
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = 0
            while written < len(view):
                written += os.write(fd, view[written : written + (64 << 20)])
            os.fsync(fd)
        finally:
            os.close(fd)
        write = time.perf_counter() - t1
        return {"memcpy_s": memcpy, "write_fsync_s": write, "stall": memcpy, "total": memcpy + write}

    def restore(self, model, optim):
        # Floor for restore: read the raw bytes back into an existing buffer (no parsing, no scatter).
        assert self.arena is not None
        view = memoryview(self.arena.numpy())
        t0 = time.perf_counter()
        with open(self.path, "rb", buffering=0) as f:
            got = 0
            while got < len(view):
                n = f.readinto(view[got : got + (64 << 20)])
                if not n:
                    raise EOFError(self.path)
                got += n
        return {"seconds": time.perf_counter() - t0, "verify": False}


class TorchSave(Contender):
    rows = ["torch.save+fsync"]

    def save(self, i, model, optim):
        self.path = os.path.join(self.workdir, f"step-{i}.pt")
        t0 = time.perf_counter()
        with open(self.path, "wb") as f:
            torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        dt = time.perf_counter() - t0
        return {"stall": dt, "total": dt}

    def restore(self, model, optim):
        t0 = time.perf_counter()
        sd = torch.load(self.path, weights_only=True)
        model.load_state_dict(sd["model"])
        optim.load_state_dict(sd["optim"])
        del sd
        return {"seconds": time.perf_counter() - t0}


class _Dcp(Contender):
    """DCP with the documented state-dict helpers (FQN keys, so a fresh optimizer can be filled).

    Save time includes ``get_state_dict``; restore time includes ``get_state_dict`` on the fresh
    model/optimizer (which initialises the empty AdamW state: DCP loads in place only),
    ``dcp.load`` and ``set_state_dict``.
    """

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        self.dcp, self.get_state_dict, self.set_state_dict = dcp, get_state_dict, set_state_dict
        self.path = ""

    def restore(self, model, optim):
        t0 = time.perf_counter()
        msd, osd = self.get_state_dict(model, optim)
        t_init = time.perf_counter() - t0
        sd = {"model": msd, "optim": osd}
        self.dcp.load(sd, checkpoint_id=self.path)
        t_load = time.perf_counter() - t0 - t_init
        self.set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        del sd, msd, osd
        return {"seconds": time.perf_counter() - t0, "get_state_dict_s": t_init, "dcp_load_s": t_load}


class DcpSave(_Dcp):
    rows = ["dcp.save"]

    def save(self, i, model, optim):
        self.path = os.path.join(self.workdir, f"step-{i}")
        t0 = time.perf_counter()
        msd, osd = self.get_state_dict(model, optim)
        self.dcp.save({"model": msd, "optim": osd}, checkpoint_id=self.path)
        dt = time.perf_counter() - t0
        return {"stall": dt, "total": dt}


class DcpAsyncSave(_Dcp):
    rows = ["dcp.async_save"]

    def save(self, i, model, optim):
        self.path = os.path.join(self.workdir, f"step-{i}")
        t0 = time.perf_counter()
        msd, osd = self.get_state_dict(model, optim)
        fut = self.dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=self.path)
        stall = time.perf_counter() - t0
        fut.result()
        return {"stall": stall, "total": time.perf_counter() - t0}


class CkptMirror(Contender):
    rows = ["ckptmirror"]

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        import ckptmirror

        self.ckptmirror = ckptmirror
        # keep_last=None: retention deletes would otherwise run in the background during the
        # next measurement; this script removes the directory itself at the end.
        # incremental=False: the state does not change between these saves, and an incremental
        # save would write nothing; every contender writes the whole state each time.
        self.m = ckptmirror.Mirror([workdir], keep_last=None, storage_options={"file": {"incremental": False}})
        self.last_step = -1

    def save(self, i, model, optim):
        allocs_before = self.m.staging_allocations
        t0 = time.perf_counter()
        h = self.m.save(i, model, optim)
        returned = time.perf_counter() - t0
        h.result()
        wall = time.perf_counter() - t0
        self.last_step = i
        return {
            "stall": h.stall_s,
            "stall_wall_s": returned,
            "wait_s": h.wait_s,
            "total": h.committed_s if h.committed_s is not None else wall,
            "result_wall_s": wall,
            "nbytes": h.nbytes,
            "staging_allocations_before": allocs_before,
            "staging_allocations_after": self.m.staging_allocations,
        }

    def after_saves(self):
        info = {"staging_allocations_final": self.m.staging_allocations}
        self.m.close()  # frees the staging arena: the restore below plays a restarted job
        return info

    def restore(self, model, optim):
        m = self.ckptmirror.Mirror([self.workdir])
        try:
            t0 = time.perf_counter()
            r = m.restore(model, optim)
            dt = time.perf_counter() - t0
        finally:
            m.close()
        if r is None or r.step != self.last_step:
            raise AssertionError(f"ckptmirror restored {r and r.step}, expected step {self.last_step}")
        return {"seconds": dt, "restore_result_seconds": r.seconds}

    def close(self):
        self.m.close(raise_errors=False)


IMPLS: dict[str, Callable[[str], Contender]] = {
    "reference": Reference,
    "torch.save+fsync": TorchSave,
    "dcp.save": DcpSave,
    "dcp.async_save": DcpAsyncSave,
    "ckptmirror": CkptMirror,
}


def run_contender(name: str, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    width = width_for(args.params)
    model, optim = build_state(width)
    gc.collect()
    nbytes = state_nbytes(model, optim)
    base_rss = proc_status()["VmRSS"]
    impl = IMPLS[name](workdir)
    res: dict[str, Any] = {"contender": name, "rows": impl.rows, "state_bytes": nbytes, "base_rss": base_rss}
    try:
        res["load_start"] = load_probe()
        res["peak_reset_ok"] = reset_peak()
        saves = []
        for i in range(args.repeats):
            os.sync()  # untimed: start every save with no dirty pages left by anyone
            rec = impl.save(i, model, optim)
            rec["rss_after_extra"] = proc_status()["VmRSS"] - base_rss
            saves.append(rec)
            log(f"{name}: save {i}: stall {rec['stall']:.3f} s, total {rec['total']:.3f} s")
        res["save_peak_extra"] = proc_status()["VmHWM"] - base_rss
        res["bytes_on_disk"] = dir_bytes(workdir)
        res["saves"] = saves
        res.update(impl.after_saves())
        restores = []
        for i in range(args.repeats):
            target = fresh_target(width)
            gc.collect()
            before = proc_status()["VmRSS"]
            reset_peak()
            rec = impl.restore(*target)
            st = proc_status()
            rec["rss_before"] = before
            rec["transient_extra"] = st["VmHWM"] - st["VmRSS"]
            rec["peak_extra_over_state"] = st["VmHWM"] - base_rss
            if rec.pop("verify", True):
                verify((model, optim), target)
                rec["verified"] = True
            restores.append(rec)
            log(
                f"{name}: restore {i}: {rec['seconds']:.3f} s"
                + (" (verified bit-exact)" if rec.get("verified") else "")
            )
            del target
            gc.collect()
        res["restores"] = restores
        res["load_end"] = load_probe()
    finally:
        impl.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return res


# ------------------------------------------------------------------------ CPU accounting
def thread_cpu() -> dict[int, tuple[str, float]]:
    """Per Python thread of this process (main excepted): (name, user + system CPU seconds).

    Read from /proc/self/task/<tid>/stat (clock ticks): the CPU a save's background threads
    spent, kernel copies included, apart from the training threads running meanwhile. Torch's
    OpenMP workers are not Python threads, so they are not counted. Empty off Linux.
    """
    out: dict[int, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for t in threading.enumerate():
        if t is threading.main_thread() or t.native_id is None:
            continue
        try:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[t.native_id] = (t.name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per thread family (the name without its ``_N`` suffix) between two readings."""
    out: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        spent = cpu - (before[tid][1] if tid in before and before[tid][0] == name else 0.0)
        family = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
        out[family] = out.get(family, 0.0) + spent
    return out


def part_limits(nbytes: int, workdir: str, object_bytes: int = 64 << 20) -> dict[str, float]:
    """CPU seconds per GB of the parts of a save, each alone on one thread, on ``nbytes`` bytes:
    memcpy into a mapped buffer (the snapshot), xxh3 (the checksums), and the write syscalls
    (objects of ``object_bytes`` written to new files in ``workdir``, each fsynced: the
    kernel's copy into the page cache and the writeback). Best of three."""
    import numpy as np
    import xxhash

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(3):
            c0 = time.thread_time()
            fn()
            times.append(time.thread_time() - c0)
        return min(times) / (nbytes / GB)

    def write(flags: int = 0, view: memoryview = src.data) -> None:
        paths = []
        for i, lo in enumerate(range(0, nbytes, object_bytes)):
            paths.append(os.path.join(workdir, f"limit-{i}"))
            fd = os.open(paths[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
            part, done = view[lo : lo + object_bytes], 0
            while done < len(part):
                done += os.write(fd, part[done:])
            os.fsync(fd)
            os.close(fd)
        for p in paths:
            os.unlink(p)

    os.makedirs(workdir, exist_ok=True)
    return {
        "memcpy": best(lambda: np.copyto(dst, src)),
        "xxh3": best(lambda: xxhash.xxh3_64_intdigest(dst.data)),
        "write_syscalls": best(write),
        # The same writes past the page cache, from a page-aligned buffer of whole pages (as
        # O_DIRECT wants; object_bytes is a whole number of pages).
        **(
            {"write_direct": best(partial(write, os.O_DIRECT, _aligned_ones(nbytes)))}
            if hasattr(os, "O_DIRECT")
            else {}
        ),
    }


def _aligned_ones(nbytes: int) -> memoryview:
    """``nbytes`` (rounded down to whole pages) of ones in a page-aligned buffer."""
    import mmap

    import numpy as np

    a = np.frombuffer(mmap.mmap(-1, nbytes // 4096 * 4096), dtype=np.uint8)
    a[:] = 1
    return a.data


# ---------------------------------------------------------------------------- slowdown mode
def run_slowdown(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """Median training-step time with no save, while ckptmirror writes, while dcp.async_save writes.

    Rounds alternate between the two (ckptmirror, dcp, dcp, ckptmirror, ...) with a few no-save
    steps after each, so that all three conditions see the same background load of a shared
    machine. New rounds stop once ``--slowdown-max-s`` has passed (each contender gets at least one).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import ckptmirror

    width = width_for(args.params)
    model, optim = build_state(width)
    os.makedirs(workdir, exist_ok=True)
    res: dict[str, Any] = {
        "contender": "slowdown",
        "state_bytes": state_nbytes(model, optim),
        "threads": torch.get_num_threads(),
    }

    def step() -> float:
        t0 = time.perf_counter()
        train_step(model, optim, width)
        return time.perf_counter() - t0

    res["load_start"] = load_probe()
    t_start = time.perf_counter()
    step()  # warm-up
    base = [step() for _ in range(args.slowdown_baseline_steps)]

    m = ckptmirror.Mirror([os.path.join(workdir, "ckptmirror")], keep_last=None)
    # The same save with the local replica's direct_io option (O_DIRECT: no page-cache copy).
    m_direct = ckptmirror.Mirror(
        [os.path.join(workdir, "ckptmirror-direct")], keep_last=None, storage_options={"file": {"direct_io": True}}
    )

    def start_cm(r: int, m: Any = m, label: str = "ckptmirror"):
        threads_before = thread_cpu()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        h = m.save(r, model, optim)
        stall = time.perf_counter() - t0
        stall_cpu = time.thread_time() - c0

        def finish() -> float:
            h.result()
            m.wait()  # retention too: every background thread is done with this save
            spent = cpu_spent(threads_before, thread_cpu())
            out[label].setdefault("cpu", []).append({"save_call": stall_cpu, **spent})
            return h.committed_s or 0.0

        return stall, h.done, finish, None

    def start_dcp(r: int):
        path = os.path.join(workdir, "dcp", f"step-{r}")
        t0 = time.perf_counter()
        msd, osd = get_state_dict(model, optim)
        fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path)
        stall = time.perf_counter() - t0
        done_at: list[float] = []
        fut.add_done_callback(lambda _: done_at.append(time.perf_counter()))

        def finish() -> float:
            fut.result()
            while not done_at:
                time.sleep(0.001)
            return done_at[0] - t0

        return stall, fut.done, finish, path

    modes = {
        "ckptmirror": start_cm,
        "dcp.async_save": start_dcp,
        DIRECT: partial(start_cm, m=m_direct, label=DIRECT),
    }
    out: dict[str, dict[str, list[Any]]] = {
        k: {"steps": [], "round_steps": [], "stalls": [], "write_s": []} for k in modes
    }
    try:
        for r in range(args.slowdown_rounds):
            order = list(modes) if r % 2 == 0 else list(modes)[::-1]
            for label in order:
                if r > 0 and time.perf_counter() - t_start > args.slowdown_max_s:
                    break
                os.sync()
                stall, done, finish, path = modes[label](r)
                steps: list[float] = []
                while not done():
                    steps.append(step())  # started while the save was still writing
                n = len(steps)
                out[label]["steps"].extend(steps)
                out[label]["round_steps"].append(steps)
                out[label]["stalls"].append(stall)
                out[label]["write_s"].append(finish())
                log(
                    f"slowdown: {label} round {r}: stall {stall:.3f} s, write done {out[label]['write_s'][-1]:.2f} s "
                    f"after the call, {n} steps overlapped"
                )
                if path:
                    shutil.rmtree(path, ignore_errors=True)
                os.sync()
                base.extend(step() for _ in range(args.slowdown_baseline_steps))
    finally:
        m.close(raise_errors=False)
        m_direct.close(raise_errors=False)
    res["baseline_steps"] = base
    res.update(out)
    try:
        res["part_limits"] = part_limits(res["state_bytes"], os.path.join(workdir, "limits"))
    except OSError as exc:
        log(f"slowdown: part limits not measured: {exc}")
    res["load_end"] = load_probe()
    log(f"slowdown: no save: median step {statistics.median(base) * 1e3:.0f} ms over {len(base)} steps")
    shutil.rmtree(workdir, ignore_errors=True)
    return res


# ------------------------------------------------------------------------------ reporting
def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def machine_info(args: argparse.Namespace) -> list[str]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024**2:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import ckptmirror

        cm_version = ckptmirror.__version__
    except Exception:  # noqa: BLE001
        cm_version = "?"
    usage = shutil.disk_usage(args.dir)
    return [
        f"- machine: nproc={os.cpu_count()} (affinity {len(os.sched_getaffinity(0))}), {cpu}, {mem}",
        f"- python {platform.python_version()}, torch {torch.__version__} "
        f"(intra-op threads {torch.get_num_threads()}), ckptmirror {cm_version}",
        f"- target dir: {os.path.abspath(args.dir)} ({usage.free / GB:.0f} GB free); "
        "every contender writes under it, removed afterwards",
    ]


def load_str(res: dict[str, Any]) -> str:
    f = foreign_cpu(res.get("load_start"), res.get("load_end"))
    if f is None:
        return "n/a"
    return f"{f['other_cpus']:.2f} CPUs" + (f", steal {f['steal_cpus']:.2f}" if f["steal_cpus"] >= 0.01 else "")


def busy(res: dict[str, Any]) -> bool:
    f = foreign_cpu(res.get("load_start"), res.get("load_end"))
    return f is not None and f["other_cpus"] + f["steal_cpus"] > 0.25


def rows_for(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows of one contender's result."""
    saves, restores = res.get("saves", []), res.get("restores", [])
    steady = saves[1:]
    peak = res.get("save_peak_extra")
    common = {
        "restore_first": restores[0]["seconds"] if restores else None,
        "restore": med([r["seconds"] for r in restores]),
        "restore_transient": max((r["transient_extra"] for r in restores), default=None),
        "peak_extra": None if peak is None else peak / GB,
        "bytes_on_disk": res.get("bytes_on_disk"),
        "rss_after": [s["rss_after_extra"] / GB for s in saves],
        "totals": [s["total"] for s in saves],
        "load": load_str(res),
    }
    if res["contender"] == "reference":
        memcpy = dict(
            common,
            name="memcpy floor (ref)",
            restore=None,
            restore_first=None,
            restore_transient=None,
            bytes_on_disk=None,
        )
        memcpy.update(
            totals=[s["memcpy_s"] for s in saves],
            stall_first=saves[0]["memcpy_s"] if saves else None,
            stall=med([s["memcpy_s"] for s in steady]),
            total=None,
        )
        raw = dict(common, name="raw write+fsync (ref)")
        raw.update(
            totals=[s["write_fsync_s"] for s in saves],
            stall_first=saves[0]["write_fsync_s"] if saves else None,
            stall=med([s["write_fsync_s"] for s in steady]),
            total=med([s["write_fsync_s"] for s in steady]),
            total_first=saves[0]["write_fsync_s"] if saves else None,
        )
        return [memcpy, raw]
    row = dict(common, name=res["contender"])
    row.update(
        stall_first=saves[0]["stall"] if saves else None,
        stall=med([s["stall"] for s in steady]),
        total=med([s["total"] for s in steady]),
        total_first=saves[0]["total"] if saves else None,
    )
    return [row]


def print_report(
    args: argparse.Namespace, results: list[dict[str, Any]], slowdown: dict[str, Any] | None, elapsed: float
) -> None:
    ok = [r for r in results if "error" not in r]
    state_bytes = next((r["state_bytes"] for r in ok), None) or (slowdown or {}).get("state_bytes")
    width = width_for(args.params)
    nparams = LAYERS * (width * width + width)
    print("# ckptmirror save/restore benchmark\n")
    print(
        f"- state: {nparams / 1e6:.1f}M-parameter MLP ({LAYERS} x Linear({width}, {width}), float32, CPU) "
        "+ AdamW state after one step, "
        f"{4 * 2 * LAYERS} tensors = " + (f"**{state_bytes / GB:.3f} GB**" if state_bytes else "?")
    )
    for line in machine_info(args):
        print(line)
    print(
        f"- repeats per contender: {args.repeats}; 'first' = save #1 (cold: buffers and pages allocated), "
        f"'steady' = median of saves #2..#{args.repeats}"
    )
    print(
        "- restore: median over the repeats, each into a freshly built model + a fresh AdamW (empty state), "
        "**right after saving: page cache warm** (caches not dropped; that needs root); "
        "every restore verified bit-exact"
    )
    print(
        "- peak extra RSS: VmHWM during the saves minus the RSS of the state alone (each contender in its own process)"
    )
    print()
    if not results:
        print("(no contenders run)\n")
    else:
        print(
            "| contender | stall (s) first | stall (s) steady | total/committed (s) steady | restore (s) "
            "| peak extra RSS (GB) |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        all_rows: dict[str, dict[str, Any]] = {}
        for res in results:
            if "error" in res:
                print(f"| {res['contender']} | FAILED | | | | |")
                continue
            for row in rows_for(res):
                all_rows[row["name"]] = row
                print(
                    f"| {row['name']} | {fmt(row['stall_first'])} | {fmt(row['stall'])} | {fmt(row['total'])} | "
                    f"{fmt(row['restore'])} | {fmt(row['peak_extra'], 2)} |"
                )
        print()
        cm, das, ts = all_rows.get("ckptmirror"), all_rows.get("dcp.async_save"), all_rows.get("torch.save+fsync")
        ds, raw = all_rows.get("dcp.save"), all_rows.get("raw write+fsync (ref)")

        def ratio(a: float | None, b: float | None) -> str:
            return "n/a" if not a or not b else f"{a / b:.2f}x"

        if cm and das:
            print(
                f"- ckptmirror stall vs dcp.async_save stall (steady): {fmt(cm['stall'])} s vs {fmt(das['stall'])} s = "
                f"**{ratio(cm['stall'], das['stall'])}** (first save: {ratio(cm['stall_first'], das['stall_first'])})"
            )
        if cm and ts:
            print(
                f"- ckptmirror time-to-committed vs torch.save+fsync (steady): "
                f"{fmt(cm['total'])} s vs {fmt(ts['total'])} s = **{ratio(cm['total'], ts['total'])}** "
                f"(first save: {ratio(cm.get('total_first'), ts.get('total_first'))})"
            )
        if cm and raw:
            print(
                "- ckptmirror time-to-committed vs raw write+fsync of the same bytes: "
                f"{ratio(cm['total'], raw['total'])}"
            )
        if cm and ds:
            print(
                f"- ckptmirror restore vs dcp.load path: {ratio(cm['restore'], ds['restore'])}; "
                f"vs torch.load: {ratio(cm['restore'], ts['restore'] if ts else None)}"
            )
        for res in ok:
            if res["contender"].startswith("dcp") and res.get("restores"):
                rs = res["restores"]
                print(
                    f"- {res['contender']} restore breakdown (median): get_state_dict on the fresh model/optimizer "
                    f"{fmt(med([r['get_state_dict_s'] for r in rs]))} s "
                    f"+ dcp.load {fmt(med([r['dcp_load_s'] for r in rs]))} s "
                    f"(+ set_state_dict: the rest)"
                )
        mem = all_rows.get("memcpy floor (ref)")
        if cm and mem:
            print(f"- ckptmirror stall vs memcpy floor (steady): {ratio(cm['stall'], mem['stall'])}")
        cmres = next((r for r in ok if r["contender"] == "ckptmirror"), None)
        if cmres and cmres.get("saves"):
            s = cmres["saves"]
            before = s[1]["staging_allocations_before"] if len(s) > 1 else s[0]["staging_allocations_after"]
            after = s[-1]["staging_allocations_after"]
            verdict = (
                "no allocation in steady state"
                if after == before
                else f"ALLOCATES: {after - before} new staging buffers"
            )
            sw = med([x["stall_wall_s"] for x in s[1:]])
            print(
                f"- ckptmirror stall as the caller sees it (wall time around `m.save()`; `h.stall_s` counts the same "
                f"span, `state_dict()` included): first {fmt(s[0]['stall_wall_s'])} s, steady {fmt(sw)} s"
            )
            print(
                f"- ckptmirror staging_allocations: {s[0]['staging_allocations_before']} before the first save, "
                f"{before} before the steady-state saves, {after} after them -> {verdict}"
            )
        print()
        print("Memory and bytes detail (GB):\n")
        print(
            "| contender | each save: total (s) | peak extra RSS, saves | extra RSS after each save "
            "| restore transient peak | bytes on disk | CPU used by other processes |"
        )
        print("|---|---|---:|---|---:|---:|---|")
        for row in all_rows.values():
            growth = ", ".join(f"{x:.2f}" for x in row["rss_after"])
            bod = row.get("bytes_on_disk")
            per = f"{bod / GB / args.repeats:.3f} per save" if bod else "n/a"
            tr = row.get("restore_transient")
            each = ", ".join(f"{x:.3f}" for x in row["totals"])
            print(
                f"| {row['name']} | {each} | {fmt(row['peak_extra'], 2)} | {growth} "
                f"| {fmt(None if tr is None else tr / GB, 2)} | {per} | {row['load']} |"
            )
        print()
        print(
            "Notes: stall = total for the blocking contenders (torch.save+fsync, dcp.save, raw write). "
            "dcp.* times include `get_state_dict`; the dcp restore includes `get_state_dict` on the fresh optimizer "
            "(initialises its AdamW state, as DCP loads in place), `dcp.load` and `set_state_dict`. "
            "ckptmirror total = `h.committed_s` (wall time until `result()` is in the JSON). "
            "'restore transient peak' = restore-time VmHWM minus the RSS once the restore is done. "
            "The raw reference restore is a plain read into an existing buffer (no parse, no scatter, no verify)."
        )
        noisy = [r["contender"] for r in ok if busy(r)]
        if noisy:
            print(
                f"\n**Warning: other processes used more than 0.25 of the {len(os.sched_getaffinity(0))} CPUs during: "
                f"{', '.join(noisy)}. Other processes compete for CPU and disk; "
                "compare ratios, rerun for stable numbers.**"
            )
        for res in results:
            if "error" in res:
                print(f"\n**{res['contender']} failed:**\n```\n{res['error'][-3000:]}\n```")
    if slowdown is not None:
        print_slowdown(slowdown)
    print(f"\n_total benchmark wall time: {elapsed:.0f} s_")


def print_slowdown(sd: dict[str, Any]) -> None:
    print("\n## Training-step slowdown while a save writes (metric 2)\n")
    if "error" in sd:
        print(f"slowdown run failed:\n```\n{sd['error'][-3000:]}\n```")
        return
    base = med(sd["baseline_steps"])
    if busy(sd):
        print(
            f"**Warning: machine busy during this run (other processes used {load_str(sd)}); "
            "step times are inflated and noisy.**\n"
        )
    print(
        f"CPU training loop on the same model (batch {BATCH}, forward/backward/AdamW step, "
        f"{sd['threads']} intra-op threads). 'during write' = steps started while the save was still writing; "
        "rounds of the two alternate, with no-save steps between them, so all three see the same background load.\n"
    )
    print(
        "| condition | median step (ms) | steps | vs no save | save stall (s), median "
        "| write time under load (s), median | training time lost per save (s), median |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| no save | {base * 1e3:.0f} | {len(sd['baseline_steps'])} | 1.00x | | | |")
    for key in ("ckptmirror", DIRECT, "dcp.async_save"):
        d = sd.get(key)
        if not d:
            continue
        m = med(d["steps"])
        rel = "n/a" if m is None or not base else f"{m / base:.2f}x"
        lost = [st + sum(x - base for x in rs) for st, rs in zip(d["stalls"], d.get("round_steps", []))]
        print(
            f"| while {key} writes | {fmt(None if m is None else m * 1e3, 0)} | {len(d['steps'])} | {rel} | "
            f"{fmt(med(d['stalls']))} | {fmt(med(d['write_s']), 2)} | {fmt(med(lost), 2)} |"
        )
    print(
        "\n'training time lost per save' = stall + the sum, over the steps that overlapped the write, of "
        "(step time - median no-save step): what one background save costs the loop in all."
    )
    print_cpu(sd, "ckptmirror")
    print_cpu(sd, DIRECT)


def print_cpu(sd: dict[str, Any], label: str) -> None:
    """CPU-seconds per GB of a ckptmirror save, by thread family, against its parts' limits."""
    cpu = (sd.get(label) or {}).get("cpu")
    if not cpu:
        return
    gb = sd["state_bytes"] / GB
    fams = sorted({k for rec in cpu for k in rec}, key=lambda k: (k != "save_call", k))
    print(f"\n### CPU per GB saved ({label}, median over rounds)\n")
    print(
        "Thread CPU time (user + system, /proc) of each thread family from save() to the save's end "
        "(retention included), per GB of state; 'save_call' is the training thread inside save() (the "
        "snapshot copy). Limits: each part alone on one thread, on the same bytes.\n"
    )
    print("| part | CPU-s/GB |")
    print("|---|---:|")
    bg = [sum(v for k, v in rec.items() if k != "save_call") / gb for rec in cpu]
    for k in fams:
        print(f"| {k} | {fmt(med([rec.get(k, 0.0) / gb for rec in cpu]))} |")
    print(f"| **background total** | **{fmt(med(bg))}** |")
    lim = sd.get("part_limits")
    if lim:
        print(f"| limit: memcpy (snapshot) | {fmt(lim['memcpy'])} |")
        print(f"| limit: xxh3 | {fmt(lim['xxh3'])} |")
        direct = label == DIRECT and "write_direct" in lim
        write = lim["write_direct"] if direct else lim["write_syscalls"]
        print(f"| limit: write syscalls (64 MiB files, fsync{', O_DIRECT' if direct else ''}) | {fmt(write)} |")
        print(f"| **limit: background (xxh3 + write syscalls)** | **{fmt(lim['xxh3'] + write)}** |")


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--params", type=float, default=100e6, help="model parameters (default 100e6 -> ~1.2 GB with AdamW state)"
    )
    p.add_argument(
        "--layers",
        type=int,
        default=LAYERS,
        help=f"Linear layers (default {LAYERS}); many layers = many small tensors, e.g. --params 10e6 --layers 2000",
    )
    p.add_argument("--repeats", type=int, default=3, help="saves (and restores) per contender (default 3)")
    p.add_argument(
        "--dir",
        default=os.path.join(os.getcwd(), "bench-out"),
        help="target directory, one disk for all (default ./bench-out)",
    )
    p.add_argument("--json", metavar="PATH", help="write the raw results here")
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)}; 'none' to skip (default: all)",
    )
    p.add_argument(
        "--slowdown", action="store_true", help="also measure training-step slowdown during background saves (~30 s)"
    )
    p.add_argument(
        "--slowdown-rounds", type=int, default=3, help="background saves per async contender in --slowdown (default 3)"
    )
    p.add_argument(
        "--slowdown-baseline-steps",
        type=int,
        default=2,
        help="no-save training steps at the start and after each background save (default 2)",
    )
    p.add_argument(
        "--slowdown-max-s",
        type=float,
        default=30.0,
        help="start no new slowdown round after this many seconds (default 30; one round each at least)",
    )
    p.add_argument("--contender", help=argparse.SUPPRESS)  # internal: run one contender in this process
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    if a.params < 1000:
        p.error("--params too small")
    if a.layers < 1:
        p.error("--layers must be >= 1")
    names = [] if a.contenders.strip() in ("", "none") else [c.strip() for c in a.contenders.split(",") if c.strip()]
    bad = [c for c in names if c not in IMPLS]
    if bad:
        p.error(f"unknown contender(s) {bad}; choose from {CONTENDERS}")
    a.contender_list = names
    return a


def child_main(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    workdir = os.path.join(args.dir, args.contender.replace("+", "_"))
    shutil.rmtree(workdir, ignore_errors=True)
    if args.contender == "slowdown":
        res = run_slowdown(args, workdir)
    else:
        res = run_contender(args.contender, args, workdir)
    with open(args.result_file, "w") as f:
        json.dump(res, f)
    return 0


def run_child(name: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    fd, result_file = tempfile.mkstemp(prefix="bench-result-", suffix=".json", dir=args.dir)
    os.close(fd)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--contender",
        name,
        "--params",
        repr(args.params),
        "--repeats",
        str(args.repeats),
        "--layers",
        str(args.layers),
        "--dir",
        args.dir,
        "--result-file",
        result_file,
        "--slowdown-rounds",
        str(args.slowdown_rounds),
        "--slowdown-baseline-steps",
        str(args.slowdown_baseline_steps),
        "--slowdown-max-s",
        str(args.slowdown_max_s),
    ]
    log(f"running {name} in a subprocess")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    tail: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # echo the child's progress live, keep the tail for the report
            print(line, end="", file=sys.stderr, flush=True)
            tail = (tail + [line])[-60:]
        rc = proc.wait()
        if rc != 0:
            why = f"exit status {rc}" + (f" (killed after the {timeout:.0f} s timeout)" if not timer.is_alive() else "")
            return {"contender": name, "error": "".join(tail) + why}
        with open(result_file) as f:
            res = json.load(f)
        res["process_wall_s"] = time.perf_counter() - t0
        return res
    finally:
        timer.cancel()
        os.unlink(result_file)
        shutil.rmtree(os.path.join(args.dir, name.replace("+", "_")), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    global LAYERS
    args = parse_args(argv)
    LAYERS = args.layers
    args.dir = os.path.abspath(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    if args.contender:
        return child_main(args)
    t0 = time.perf_counter()
    results = [run_child(name, args, timeout=900) for name in args.contender_list]
    slowdown = run_child("slowdown", args, timeout=600) if args.slowdown else None
    elapsed = time.perf_counter() - t0
    print_report(args, results, slowdown, elapsed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": {k: v for k, v in vars(args).items() if k not in ("contender", "result_file")},
                    "machine": machine_info(args),
                    "results": results,
                    "slowdown": slowdown,
                    "elapsed_s": elapsed,
                },
                f,
                indent=1,
            )
        log(f"raw results written to {args.json}")
    try:
        os.rmdir(args.dir)  # only if empty (it is ours and everything under it was cleaned up)
    except OSError:
        pass
    return 1 if any("error" in r for r in results) or (slowdown and "error" in slowdown) else 0


if __name__ == "__main__":
    sys.exit(main())
