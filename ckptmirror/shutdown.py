"""Elastic shutdown: on SIGTERM, commit the save in flight, then exit as the process would have.

TorchElastic (torchrun) stops workers with SIGTERM and kills them about 30 s later. Without help,
a save still writing in the background dies with the process and the newest step is lost.
With ``Mirror(on_sigterm="flush")`` (or ``CKPTMIRROR_ON_SIGTERM=flush``) the first SIGTERM:

1. is caught by a handler that only starts a waiter thread (a signal handler runs in the main
   thread between two bytecodes, possibly while that thread holds the mirror's lock, so it must
   not wait itself);
2. the waiter waits for the saves in flight, at most ``timeout_s`` (default 20 s, inside the
   usual 30 s grace period), then sends SIGTERM to the process again;
3. the handler, called again, puts the previous handler back and hands the signal to it: the
   default action terminates the process (exit status -15), a Python handler runs as usual.

A second SIGTERM while waiting is the impatient operator's: it is handed on at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from . import config

log = logging.getLogger("ckptmirror")

#: Environment variable that turns the behaviour on for every Mirror (``flush``) or off (``none``);
#: its row is in :data:`ckptmirror.config.ENVIRONMENT`.
ENV = config.ENV_ON_SIGTERM


def resolve(on_sigterm: str | None) -> str | None:
    """The effective policy: the argument, else the environment; ``flush`` or None.

    A bad value raises :class:`~ckptmirror.config.EnvConfigError` (a ``ValueError``)."""
    return config.on_sigterm(on_sigterm)


class SigtermFlush:
    """Installs the SIGTERM handler described in the module docstring for one mirror."""

    def __init__(self, wait: Callable[[float], None], timeout_s: float) -> None:
        self._wait = wait
        self.timeout_s = timeout_s
        self._previous: Any = None
        self._state = "idle"  # idle -> waiting -> done
        self._installed = False

    def install(self) -> bool:
        """Install the handler; False (with a warning) outside the main thread, where Python
        does not allow it."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("on_sigterm='flush' needs the Mirror to be created in the main thread; not installed")
            return False
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
        return True

    def uninstall(self) -> None:
        """Put the previous handler back (when still ours, and from the main thread)."""
        if not self._installed or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, self._previous)
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._state == "idle":
            self._state = "waiting"
            log.warning("SIGTERM: committing the save in flight (at most %.0f s) before exiting", self.timeout_s)
            threading.Thread(target=self._flush, name="ckptmirror-sigterm", daemon=True).start()
            return
        # Flushed (or a second SIGTERM while waiting): hand the signal to the previous handler.
        self._state = "done"
        self.uninstall()
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:  # SIG_DFL (or unknown, e.g. set from C): the default action, termination
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def _flush(self) -> None:
        try:
            self._wait(self.timeout_s)
            log.warning("SIGTERM: saves in flight are committed; exiting")
        except BaseException as exc:  # noqa: BLE001 - exiting anyway; say what was lost
            log.error("SIGTERM: the save in flight did not commit (%s: %s); exiting", type(exc).__name__, exc)
        if self._state == "waiting":
            os.kill(os.getpid(), signal.SIGTERM)
