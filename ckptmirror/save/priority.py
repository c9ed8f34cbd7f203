"""CPU priority of the background save threads: they yield the CPU to the training loop.

On a machine whose cores the training loop keeps busy (a CPU training run, the data loader
of a GPU one), every CPU-second a background save spends (hashing, the kernel's copies into
the page cache, Python) is taken from the training threads. Raising the nice value of the
threads that write saves in the background (:data:`~ckptmirror.config.ENV_BACKGROUND_NICE`,
default 15) makes the scheduler give the CPU to the training threads first; the save uses
what they leave (a CPU training loop leaves gaps: its threads wait on each other and on memory),
and still gets a share when they take everything (nice 15 against 0: about 1/30 of a contended
core), so it never starves. Measured on a 2-core CPU training run (1.2 GB saved): the
overlapping steps 1.04x the no-save step at nice 19 (write 15 s), 1.10-1.11x at 15 (12-13 s),
1.46x at 10 (6 s): a busy training loop pays less and the write takes longer, which
:meth:`~ckptmirror.handle.SaveHandle.result` reports as it is. 15, not 19: a save must still
finish before the next one on a machine whose every core other processes keep busy.

Linux only: there, ``setpriority(PRIO_PROCESS, tid)`` changes one thread. Elsewhere (macOS)
the same call changes the whole process, so nothing is done. An unprivileged process may raise
a nice value but not lower it back, so this is only ever applied to threads the library
creates and keeps (its pools' workers), from inside the worker itself, never to the caller's
thread: a pool's worker threads are started by whoever submits first, possibly the training
thread, and are lowered once started.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger("ckptmirror")

#: Whether a thread's own nice value can be set (Linux: per-thread nice values).
SUPPORTED = sys.platform.startswith("linux") and hasattr(os, "setpriority")


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value to ``nice`` (never lowers it); a pool's initializer.

    Must only run on threads the library owns (see the module docstring). Failure (a
    container that forbids it) is logged at DEBUG and ignored: priority is an optimisation.
    """
    if nice <= 0 or not SUPPORTED:
        return
    if threading.current_thread() is threading.main_thread():
        return  # a guard: a pool worker is never the main thread
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:
        log.debug("could not set the nice value of thread %s to %d: %s", threading.current_thread().name, nice, exc)
