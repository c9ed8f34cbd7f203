"""Writer process for tests/test_faults.py: saves checkpoints until the parent SIGKILLs it.

Also imported by the tests (for :class:`Net`, :func:`fill` and :func:`expected_state`), so
the parent can recompute exactly what the child wrote from (step, seed, width) alone; no
values travel through pickle or ``torch.save``.

Modes::

    python _writer_child.py phase ROOT MARKER PHASE
        Commit step 1 fully, then save step 2 through a FaultyReplica whose on_phase hook
        writes MARKER and blocks forever at PHASE:
          put            the 3rd object put of step 2 (io_threads=1: objects 0 and 1 are durable)
          put-manifest   the rank manifest put of step 2 (every object durable)
          commit         the commit of step 2 (objects and rank manifest durable)
          delete-commit  retention (keep_last=1), before step 1's COMMIT.json is deleted
          delete-prefix  retention (keep_last=1), after step 1's COMMIT.json is deleted,
                         before its directory is removed

    python _writer_child.py loop ROOT READY PROGRESS START
        Save steps START, START+1, ... (keep_last=2), appending "<step>\\n" to PROGRESS after
        each handle.result() returns; READY is written once the mirror is open.

The child kills itself after ALARM_S seconds, so a crashed test never leaves it behind.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch

SEED = 7
PHASE_WIDTH = 96  # ~220 KiB of state: 8 objects of 32 KiB
PHASE_OBJECT_BYTES = 32 << 10
LOOP_WIDTH = 24  # ~14 KiB of state: a few ms per save
LOOP_OBJECT_BYTES = 4 << 10
ALARM_S = 120

PHASES = ("put", "put-manifest", "commit", "delete-commit", "delete-prefix")


class Net(torch.nn.Module):
    """Small model with several dtypes (float32, bfloat16, int64, a 0-dim buffer)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(width, 4 * width)
        self.fc2 = torch.nn.Linear(4 * width, width, dtype=torch.bfloat16)
        self.register_buffer("counts", torch.zeros(width, dtype=torch.int64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))


def fill(net: Net, step: int, seed: int = SEED, frozen: tuple[str, ...] = ()) -> Net:
    """Overwrite every tensor of ``net`` with values determined by (step, seed) only; the
    ``frozen`` ones with step 0's values whatever the step (a frozen base: incremental saves)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name in frozen:
                t.copy_(fill(Net(net.fc1.in_features), 0, seed).state_dict()[name])
                continue
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
            else:
                t.copy_(torch.randint(-(2**40), 2**40, t.shape, generator=g, dtype=torch.int64))
    return net


def expected_state(step: int, width: int, seed: int = SEED, frozen: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """What ``Net(width)`` filled for ``step`` holds, as fresh tensors."""
    return {k: v.detach().clone() for k, v in fill(Net(width), step, seed, frozen).state_dict().items()}


def extra_for(step: int, seed: int = SEED) -> dict:
    return {"step": step, "seed": seed}


def announce(path: str, text: str) -> None:
    """Create ``path`` atomically (the parent polls for it)."""
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _block_forever() -> None:
    threading.Event().wait()


def run_phase(root: str, marker: str, phase: str) -> None:
    from ckptmirror import Mirror
    from ckptmirror.format import commit_key, step_dir
    from ckptmirror.replicas import FaultyReplica, LocalReplica

    if phase not in PHASES:
        raise SystemExit(f"unknown phase {phase!r}")
    lock = threading.Lock()
    seen = [0]
    armed = threading.Event()  # only step 2's save (and the retention after it) is interrupted

    def hook(ph: str, key: str) -> None:
        if not armed.is_set():
            return
        if phase in ("put", "put-manifest", "commit"):
            if ph != phase or not key.startswith(step_dir(2) + "/"):
                return
            with lock:
                seen[0] += 1
                n = seen[0]
            if phase == "put" and n < 3:
                return
        elif phase == "delete-commit":
            if not (ph == "delete" and key == commit_key(1)):
                return
        elif phase == "delete-prefix":
            if not (ph == "delete" and key == step_dir(1)):
                return
        announce(marker, f"{ph} {key}")
        _block_forever()

    replica = FaultyReplica(LocalReplica(root), on_phase=hook)
    keep_last = 1 if phase.startswith("delete") else None
    m = Mirror([replica], keep_last=keep_last, object_bytes=PHASE_OBJECT_BYTES, io_threads=1)
    net = Net(PHASE_WIDTH)
    m.save(1, fill(net, 1), extra=extra_for(1)).result(timeout=60)
    armed.set()
    h = m.save(2, fill(net, 2), extra=extra_for(2))
    h.result(timeout=ALARM_S)  # never returns for the put/commit phases
    _block_forever()  # retention phases: the commit returned, retention is blocked


def run_loop(root: str, ready: str, progress: str, start: int) -> None:
    from ckptmirror import Mirror

    m = Mirror([root], keep_last=2, object_bytes=LOOP_OBJECT_BYTES)
    net = Net(LOOP_WIDTH)
    announce(ready, "ready")
    with open(progress, "a") as f:
        for step in range(start, start + 1_000_000):
            m.save(step, fill(net, step), extra=extra_for(step)).result(timeout=60)
            f.write(f"{step}\n")
            f.flush()


def main(argv: list[str]) -> None:
    signal.alarm(ALARM_S)  # default action terminates: no orphan if the parent dies
    torch.set_num_threads(1)
    mode = argv[0]
    if mode == "phase":
        run_phase(argv[1], argv[2], argv[3])
    elif mode == "loop":
        run_loop(argv[1], argv[2], argv[3], int(argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
