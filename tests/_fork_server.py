"""Fork server for child-process tests whose children spend most of their time importing a framework.

    python tests/_fork_server.py MODULE [MODULE ...]

imports the MODULEs (e.g. ``lightning``, ``transformers``: seconds of CPU each on a small
machine, most of what a training child costs), then runs child scripts as new processes forked
from it: each runs ``python SCRIPT ARGS...`` would (``runpy`` as ``__main__``, its own argv, cwd,
stdout and stderr), except that the MODULEs are already imported. Nothing in this process runs
a tensor op or starts a thread before forking, so a forked child starts as clean as a fresh
interpreter that imported the same modules. The client is :class:`_helpers.ForkServer`. Not for
children that use CUDA (a process that touched the GPU driver cannot hand it to a fork).

stdin: one JSON command a line, ``{"argv": [SCRIPT, ARG...], "cwd": DIR, "stdout": FILE,
"stderr": FILE}``; stdout gets ``{"pid": PID}`` once the child is forked and ``{"pid": PID,
"status": STATUS}`` (``os.waitpid``'s) once it has exited. Children run concurrently; exits are
reported in the order they happen. End of stdin: the server waits for its children, then exits.
A child's exit status is what the script's would be: 0 when it returns, ``sys.exit``'s code, 1
on an uncaught exception (the traceback goes to its stderr), or whatever ``os._exit`` or a
signal makes it; on its way out it waits for its non-daemon threads and runs the atexit
callbacks, as the interpreter does.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import sys
import threading
import time
from typing import Any


def _redirect(fd: int, path: str, flags: int) -> None:
    new = os.open(path, flags, 0o644)
    os.dup2(new, fd)
    os.close(new)


def child(cmd: dict[str, Any]) -> None:
    """The forked child: never returns (``os._exit``)."""
    code = 1
    try:
        _redirect(0, os.devnull, os.O_RDONLY)  # the server's stdin is its command pipe
        _redirect(1, cmd["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # stdout is the server's protocol pipe
        _redirect(2, cmd["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.chdir(cmd["cwd"])
        script = os.path.abspath(cmd["argv"][0])
        sys.argv = [script, *cmd["argv"][1:]]
        sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` has it
        import runpy

        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported through stderr and the exit status
        import traceback

        traceback.print_exc()
    try:
        # What the interpreter does on its way out of `python SCRIPT`: wait for the threads that
        # are not daemons, then run the atexit callbacks (logging's flush among them).
        threading._shutdown()  # type: ignore[attr-defined]
        import atexit

        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main(modules: list[str]) -> None:
    for name in modules:
        importlib.import_module(name)
    assert threading.active_count() == 1, f"no thread may run when forking: {threading.enumerate()}"
    print(json.dumps({"ready": True}), flush=True)
    running: set[int] = set()
    pending = b""  # stdin is read raw (os.read), so select() never misses a line Python buffered
    stdin_open = True
    while stdin_open or running:
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                print(json.dumps({"pid": pid, "status": status}), flush=True)
        if not stdin_open:
            time.sleep(0.02)
            continue
        ready, _, _ = select.select([0], [], [], 0.02)
        if not ready:
            continue
        data = os.read(0, 1 << 16)
        stdin_open = bool(data)
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            pid = os.fork()
            if pid == 0:
                child(json.loads(line))
            running.add(pid)
            print(json.dumps({"pid": pid}), flush=True)
    os._exit(0)  # no interpreter teardown: seconds with a framework's modules loaded, for nothing


if __name__ == "__main__":
    main(sys.argv[1:])
