"""Configuration by environment: the one table of ``CKPTMIRROR_*`` variables, and their parsers.

Every environment variable the library or ``ckptmirror serve`` reads is a row of
:data:`ENVIRONMENT` (name, meaning, default); docs/configuration.md's table must match it
row for row (tests/test_docs.py fails otherwise and prints the table to paste). Rules, the same for every variable:

* an explicit argument (``Mirror(keep_last=3)``, ``on_sigterm=``, ``--token-file``) always wins
  over the environment; the environment only fills in what the caller left out;
* an unset or empty variable means the default (except an empty :data:`ENV_PEER_TOKEN`, a
  usage error for ``ckptmirror serve``: an empty token must not mean "no token");
* a bad value raises :class:`EnvConfigError` (a ``ValueError``) naming the variable, the value
  and the accepted values, when the mirror is created, not hours later (``Mirror()`` checks
  the variables that restores and the background threads read later).

The variables are read when they are used (``Mirror()``, :func:`ckptmirror.get_mirror`, a
restore), never cached at import, so a test or a launcher may set them late.
"""

from __future__ import annotations

import enum
import logging
import math
import os
from typing import NamedTuple

from .errors import CkptMirrorError
from .replicas._peer_protocol import TOKEN_ENV

__all__ = [
    "DEFAULT_BACKGROUND_NICE",
    "ENVIRONMENT",
    "ENV_BACKGROUND_NICE",
    "ENV_KEEP_LAST",
    "ENV_LOG_LEVEL",
    "ENV_ON_SIGTERM",
    "ENV_PEER_TOKEN",
    "ENV_PROGRESS_INTERVAL_S",
    "ENV_REPLICAS",
    "FROM_ENV",
    "EnvConfigError",
    "EnvVar",
    "FromEnv",
    "apply_log_level",
    "background_nice",
    "keep_last",
    "log_level",
    "on_sigterm",
    "progress_interval_s",
    "replicas",
]

ENV_REPLICAS = "CKPTMIRROR_REPLICAS"
ENV_KEEP_LAST = "CKPTMIRROR_KEEP_LAST"
ENV_LOG_LEVEL = "CKPTMIRROR_LOG_LEVEL"
ENV_ON_SIGTERM = "CKPTMIRROR_ON_SIGTERM"
ENV_PROGRESS_INTERVAL_S = "CKPTMIRROR_PROGRESS_INTERVAL_S"
ENV_BACKGROUND_NICE = "CKPTMIRROR_BACKGROUND_NICE"
#: Defined next to the peer wire protocol (the client and ``ckptmirror serve`` both read it).
ENV_PEER_TOKEN = TOKEN_ENV

#: Accepted values of :data:`ENV_LOG_LEVEL` (case-insensitive).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Default of :data:`ENV_PROGRESS_INTERVAL_S`: seconds between two progress lines of a restore.
DEFAULT_PROGRESS_INTERVAL_S = 5.0
#: Default of :data:`ENV_BACKGROUND_NICE`: the nice value of a save's background threads.
#: 15: on a 2-core CPU training run (both cores busy) nice 10 still slowed the steps that
#: overlap a write 1.46x, nice 15 1.10-1.11x and nice 19 1.04x; the write of 1.2 GB took 6 s,
#: 12-13 s and 15 s (bench_save_restore.py --slowdown, 2026-12-01). Not 19: where other processes
#: (data loader workers) keep every core busy, a save gets about 1/70 of a core at 19, 1/30 at
#: 15, and a write that lags the next save() holds the training thread. Where the cores have
#: idle time (most GPU runs) the value changes nothing.
DEFAULT_BACKGROUND_NICE = 15


class EnvVar(NamedTuple):
    """One row of :data:`ENVIRONMENT`."""

    name: str
    meaning: str
    default: str


#: Every environment variable ckptmirror reads: (name, meaning, default). The source of
#: docs/configuration.md; a variable read anywhere in the package must have a row here.
ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar(
        ENV_REPLICAS,
        "Comma-separated replica URLs of the default mirror that the module-level API "
        "(ckptmirror.save/restore/wait) creates when ckptmirror.init() was not called.",
        "unset: the module-level API raises until init() is called",
    ),
    EnvVar(
        ENV_KEEP_LAST,
        "Default of Mirror(keep_last=...): keep this many committed steps per replica "
        "(an integer >= 1), or 'none' to keep every step. An explicit keep_last= argument wins.",
        "none",
    ),
    EnvVar(
        ENV_LOG_LEVEL,
        "Level of the 'ckptmirror' logger (DEBUG, INFO, WARNING, ERROR, CRITICAL), set when a Mirror is "
        "created. Only that logger's level: handlers and the root logger stay the application's.",
        "unset: the level is left as it is (inherited from the root logger)",
    ),
    EnvVar(
        ENV_ON_SIGTERM,
        "Default of Mirror(on_sigterm=...): 'flush' commits the saves in flight on SIGTERM before "
        "the process exits; 'none' (or 'off') does nothing. An explicit on_sigterm= argument wins.",
        "none",
    ),
    EnvVar(
        ENV_PROGRESS_INTERVAL_S,
        "Seconds between two INFO progress lines (bytes, rate, ETA) of a restore; a positive number.",
        str(DEFAULT_PROGRESS_INTERVAL_S),
    ),
    EnvVar(
        ENV_BACKGROUND_NICE,
        "Linux: nice value (0-19) of the threads a Mirror owns that write saves in the background "
        "(hash, I/O, replica and retention threads), so that they yield the CPU to the training loop; "
        "0 leaves them at the process's priority. Never applied to the thread that calls save().",
        str(DEFAULT_BACKGROUND_NICE),
    ),
    EnvVar(
        ENV_PEER_TOKEN,
        "Shared token of peer:// replicas (client, when neither token= nor token_file= is given) and "
        "of the 'ckptmirror serve' agent (when --token-file is not given).",
        "unset: no token (the agent then listens on loopback only)",
    ),
)


class EnvConfigError(CkptMirrorError, ValueError):
    """An environment variable (or the argument it stands in for) has a value that is not accepted."""


class FromEnv(enum.Enum):
    """Type of :data:`FROM_ENV`, the default of arguments that fall back to the environment."""

    FROM_ENV = "FROM_ENV"

    def __repr__(self) -> str:
        # Shown in help() and the docs' signatures: say where the value comes from.
        return "<from the environment>"


#: Default of an argument that falls back to its environment variable (a caller passing None
#: means None: "explicit arguments always win").
FROM_ENV = FromEnv.FROM_ENV


def _env(name: str) -> str | None:
    """The variable's value, stripped; None when unset or empty."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _env_int(name: str, value: str, *, low: int, high: int | None = None, use: str) -> int:
    """``value``, the text of variable ``name``, as an integer from ``low`` to ``high`` (no upper bound when None).

    Anything else (not an integer, out of bounds) raises :class:`EnvConfigError` naming the
    variable and the value, ending with ``use`` (what to set instead).
    """
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or n < low or (high is not None and n > high):
        raise EnvConfigError(f"${name}={value!r} is not accepted: use {use}")
    return n


def replicas() -> list[str]:
    """The replica URLs of :data:`ENV_REPLICAS` (empty when unset)."""
    return [u.strip() for u in os.environ.get(ENV_REPLICAS, "").split(",") if u.strip()]


def keep_last(explicit: int | None | FromEnv = FROM_ENV) -> int | None:
    """``Mirror(keep_last=)``: the argument when given (None included), else :data:`ENV_KEEP_LAST`.

    The argument itself is checked by the Mirror; only the environment's text is parsed here.
    """
    if explicit is not FROM_ENV:
        return explicit
    value = _env(ENV_KEEP_LAST)
    if value is None or value.lower() == "none":
        return None
    return _env_int(ENV_KEEP_LAST, value, low=1, use="an integer >= 1 (steps kept per replica) or 'none'")


def on_sigterm(explicit: str | None = None) -> str | None:
    """``Mirror(on_sigterm=)``: ``"flush"`` or None (do nothing); the argument wins over :data:`ENV_ON_SIGTERM`."""
    if explicit is not None:
        source, value = "on_sigterm", explicit
    else:
        source, value = f"${ENV_ON_SIGTERM}", os.environ.get(ENV_ON_SIGTERM, "none")
    norm = value.strip().lower()
    if norm in ("", "none", "off"):
        return None
    if norm != "flush":
        # "on_sigterm" appears either way: the argument's name, or the variable's.
        raise EnvConfigError(f"{source}={value!r} is not accepted: use 'flush' or 'none'")
    return norm


def log_level() -> int | None:
    """The level :data:`ENV_LOG_LEVEL` asks for (a ``logging`` constant), or None when unset."""
    value = _env(ENV_LOG_LEVEL)
    if value is None:
        return None
    if value.upper() not in LOG_LEVELS:
        raise EnvConfigError(f"${ENV_LOG_LEVEL}={value!r} is not accepted: use one of {', '.join(LOG_LEVELS)}")
    return int(getattr(logging, value.upper()))


def apply_log_level() -> None:
    """Set the ``ckptmirror`` logger's level from :data:`ENV_LOG_LEVEL`, when it is set.

    Only that logger's level: an application that configured logging (handlers, formats, the
    root level) keeps its configuration; without any, Python shows WARNING and above only.
    """
    level = log_level()
    if level is not None:
        logging.getLogger("ckptmirror").setLevel(level)


def progress_interval_s() -> float:
    """Seconds between two progress lines of a restore (:data:`ENV_PROGRESS_INTERVAL_S`)."""
    value = _env(ENV_PROGRESS_INTERVAL_S)
    if value is None:
        return DEFAULT_PROGRESS_INTERVAL_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise EnvConfigError(f"${ENV_PROGRESS_INTERVAL_S}={value!r} is not accepted: use a positive number of seconds")
    return seconds


def background_nice() -> int:
    """The nice value of a save's background threads (:data:`ENV_BACKGROUND_NICE`): 0 to 19."""
    value = _env(ENV_BACKGROUND_NICE)
    if value is None:
        return DEFAULT_BACKGROUND_NICE
    return _env_int(ENV_BACKGROUND_NICE, value, low=0, high=19, use="an integer from 0 (no change) to 19 (lowest)")
