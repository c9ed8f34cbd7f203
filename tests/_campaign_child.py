"""Fork server for tests/test_kill_campaign.py: writers to be SIGKILLed, one per kill point.

One process imports torch and the replica backends once, then forks a writer per kill point:
a fresh interpreter per point would cost seconds of imports each, which a campaign of 1,000
points on a small CI machine cannot afford. The test SIGKILLs the forked writer, never this
process. Nothing runs a tensor op or starts a thread here before forking.

    python _campaign_child.py LOCAL_DIR PEER_URL S3_URL

The peer token comes from ``CKPTMIRROR_PEER_TOKEN``, the S3 endpoint and credentials from the
``AWS_*`` variables. stdin: one JSON command per line; for each, stdout gets ``{"pid": PID}``
once the writer is forked and ``{"pid": PID, "status": STATUS}`` (``os.waitpid``'s) once it is
gone. End of stdin: exit. Each writer logs to the command's ``log`` file, opens a Mirror on
the three replicas (each in a FaultyReplica), and:

- ``{"mode": "phase", "replica": NAME, "phase": PHASE, "nth": K, ...}``: commits step A (the
  newest committed + 1) with ``keep_last=1``, then blocks forever at PHASE on replica NAME
  (``local``, ``peer`` or ``s3``), after writing ``marker`` ({"phase", "key", "a"}). Phases:

  ========================  ===============================================================
  ``put``                   the K-th object put of step A+1 (``io_threads=1``: 0..K-1 are there)
  ``put-manifest``          the rank manifest put of step A+1
  ``commit``                the commit of step A+1
  ``delete-commit``         retention after A+1, before step A's commit record is deleted
  ``delete-prefix``         retention after A+1, before step A's directory is deleted
  ``cleanup-stale``         a first save of A+1 failed everywhere at its commit; the retry
                            committed, and is removing the first attempt's files
  ``cleanup-torn``          the same failed A+1, then A+2 committed: retention is removing
                            the torn A+1
  ========================  ===============================================================

  The other replicas go on meanwhile: they may commit the step the blocked one lacks.
- ``{"mode": "loop", "ready": PATH, ...}``: saves steps from the newest committed + 1 on
  (``keep_last=2``), until killed; ``ready`` is written once the mirror is open.

In both modes every step whose ``handle.result()`` returned is appended to ``progress``
("<step>\\n"): a step reported there was durable on every replica.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import traceback
from typing import Any

import _writer_child as wc
import torch

import ckptmirror.replicas.peer
import ckptmirror.replicas.s3  # noqa: F401 - imported before fork: the writers must not pay for it
from ckptmirror import Mirror, SaveFailedError
from ckptmirror.format import commit_key, step_dir
from ckptmirror.replicas import FaultyReplica, LocalReplica, open_replica

WIDTH = 48  # ~56 KiB of state (float32, bfloat16, int64), several objects of up to 16 KiB (few: S3 requests cost)
#: Kept at step 0's values in every step (a frozen base): its objects are stored once and later
#: steps reference them (incremental saves), so kills also land on references and on retention
#: keeping a dropped step's referenced objects.
FROZEN = ("fc1.weight",)
OBJECT_BYTES = 16 << 10
OBJECTS = 4
NAMES = ("local", "peer", "s3")
PHASES = ("put", "put-manifest", "commit", "delete-commit", "delete-prefix", "cleanup-stale", "cleanup-torn")
ALARM_S = 120  # a writer nobody killed ends itself


def _in_dir(key: str, step: int) -> bool:
    """Whether ``key`` is ``step``'s directory or a file in it."""
    return key == step_dir(step) or key.startswith(step_dir(step) + "/")


def _block_forever() -> None:
    threading.Event().wait()


def _append(path: str, step: int) -> None:
    with open(path, "a") as f:
        f.write(f"{step}\n")


def _mirror(urls: list[str], hooks: dict[str, Any], keep_last: int, io_threads: int) -> Mirror:
    inner = [LocalReplica(urls[0]), open_replica(urls[1]), open_replica(urls[2])]
    wrapped = [FaultyReplica(r, on_phase=hooks.get(n)) for n, r in zip(NAMES, inner)]
    return Mirror(
        wrapped, keep_last=keep_last, object_bytes=OBJECT_BYTES, io_threads=io_threads, health_interval_s=3600
    )


def _save(m: Mirror, step: int, progress: str) -> None:
    m.save(step, wc.fill(wc.Net(WIDTH), step, frozen=FROZEN), extra=wc.extra_for(step)).result(timeout=60)
    _append(progress, step)


def run_phase(cmd: dict[str, Any], urls: list[str]) -> None:
    target, phase, nth = cmd["replica"], cmd["phase"], int(cmd["nth"])
    lock = threading.Lock()
    puts = [0]
    armed: dict[str, int] = {}  # "a": the step committed before the interrupted one
    fail_all = threading.Event()

    def fire(ph: str, key: str) -> None:
        wc.announce(cmd["marker"], json.dumps({"phase": ph, "key": key, "a": armed["a"]}))
        _block_forever()

    def hook_for(name: str) -> Any:
        def hook(ph: str, key: str) -> None:
            if fail_all.is_set() and ph == "commit":
                # Not an OSError: the replicas are not marked degraded, the retry writes to all.
                raise RuntimeError("injected: this attempt fails everywhere before its commit")
            if name != target or "a" not in armed:
                return
            a = armed["a"]
            if phase == "put" and ph == "put" and key.startswith(step_dir(a + 1) + "/"):
                with lock:
                    n = puts[0]
                    puts[0] += 1
                if n == nth:
                    fire(ph, key)
            elif phase == "put-manifest" and ph == phase and key.startswith(step_dir(a + 1) + "/"):
                fire(ph, key)
            elif phase == "commit" and ph == phase and key == commit_key(a + 1):
                fire(ph, key)
            elif phase == "delete-commit" and ph == "delete" and key == commit_key(a):
                fire(ph, key)
            elif phase == "delete-prefix" and ph == "delete" and _in_dir(key, a) and key != commit_key(a):
                fire(ph, key)  # the whole directory, or (referenced objects kept) its first file
            elif (
                phase == "cleanup-stale"
                and ph == "delete"
                and key.startswith(step_dir(a + 1) + "/")
                and key != commit_key(a + 1)
            ):
                fire(ph, key)
            elif phase == "cleanup-torn" and ph == "delete" and _in_dir(key, a + 1):
                fire(ph, key)

        return hook

    m = _mirror(urls, {n: hook_for(n) for n in NAMES}, keep_last=1, io_threads=1)
    steps = m.steps()
    a = max(steps) + 1 if steps else 1
    _save(m, a, cmd["progress"])
    m.wait()  # its retention pass too: what the hook sees next belongs to the armed save
    if phase in ("cleanup-stale", "cleanup-torn"):
        fail_all.set()
        failed = m.save(a + 1, wc.fill(wc.Net(WIDTH), a + 1, frozen=FROZEN), extra=wc.extra_for(a + 1))
        assert failed.exception(timeout=60) is not None, "the first attempt at step A+1 was meant to fail"
        # The handle fails as soon as one replica did; the others are still writing: wait for
        # them (still failing) before the retry.
        with contextlib.suppress(SaveFailedError):
            m.wait()
        fail_all.clear()
    armed["a"] = a
    if phase == "cleanup-torn":
        _save(m, a + 2, cmd["progress"])
    else:
        _save(m, a + 1, cmd["progress"])  # never returns for put, put-manifest and commit
    m.wait()  # retention phases block here
    wc.announce(cmd["marker"], json.dumps({"phase": "never-fired", "key": "", "a": a}))


def run_loop(cmd: dict[str, Any], urls: list[str]) -> None:
    m = _mirror(urls, {}, keep_last=2, io_threads=2)
    steps = m.steps()
    start = max(steps) + 1 if steps else 1
    wc.announce(cmd["ready"], "ready")
    for step in range(start, start + 1_000_000):
        _save(m, step, cmd["progress"])


def writer(cmd: dict[str, Any], urls: list[str]) -> None:
    """The forked writer: never returns normally (killed, or os._exit)."""
    code = 1
    try:
        fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)  # stdout is the protocol pipe: the writer's output goes to its log
        os.dup2(fd, 2)
        signal.alarm(ALARM_S)  # default action terminates: no orphan if the test dies
        torch.set_num_threads(1)
        if cmd["mode"] == "phase":
            run_phase(cmd, urls)
        else:
            run_loop(cmd, urls)
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the log and the exit status
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str]) -> None:
    urls = argv[:3]
    assert threading.active_count() == 1, "no thread may run when forking"
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            writer(cmd, urls)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "status": status}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
