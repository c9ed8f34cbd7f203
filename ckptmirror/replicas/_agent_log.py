"""The peer agent's log: one JSON line per event on stderr (``--log-level``).

Apart because every other agent module logs through :func:`_event`, and the scrubber's lines
(:mod:`._scrub`) go through the same formatter.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from ._agent_config import AgentConfigError

log = logging.getLogger("ckptmirror.agent")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        return json.dumps(doc)


def _event(level: int, msg: str, **fields: Any) -> None:
    log.log(level, msg, extra={"fields": fields})


def _log_to_stderr(level: str | int) -> None:
    """The agent's log: JSON lines on stderr at ``level`` (a logging level, or its name: ``"debug"``)."""
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())  # the number for a known name, else a string
        if not isinstance(number, int):
            raise AgentConfigError(f"--log-level {level!r}: not a log level (debug, info, warning, error)")
        level = number
    # serve() may run twice in one process (tests): replace our handler instead of doubling it.
    for old in [h for h in log.handlers if getattr(h, "_ckptmirror_agent", False)]:
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler._ckptmirror_agent = True  # type: ignore[attr-defined]  # a marker on a stdlib handler, found above
    handler.setFormatter(_JsonFormatter())
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
