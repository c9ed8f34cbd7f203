"""Pin records: which steps a job pinned (``Mirror.pin``), so that ``ckptmirror prune`` keeps them.

A pin lives in the writing process (retention after each save skips pinned steps) and, since
``prune`` runs in another process, also on every replica as one small JSON record per step::

    pins/step-000000000042.json     {"format": "ckptmirror-pin", "version": 1, "step": 42, ...}

The records sit outside the step directories, under their own prefix: a step's listing, ``ls``,
``verify`` and ``prune``'s garbage detection never see them (a step directory name is
``step-`` and twelve digits; ``pins`` is none), and removing a step leaves its pin alone. The
name is what pins: readers look at the names only, so a record that does not parse still pins
its step (keeping a step by mistake loses nothing). ``Mirror.unpin`` deletes the record.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time

from .names import MAX_STEP, step_dir

#: The key prefix (a top-level directory of the replica) of pin records.
PINS_PREFIX = "pins"
#: The ``format`` field of a pin record, and its version.
PIN_FORMAT = "ckptmirror-pin"
PIN_VERSION = 1
#: Upper bound on a pin record's size (what a reader of one would accept).
MAX_PIN_BYTES = 4096

_PIN_KEY_RE = re.compile(r"pins/step-([0-9]{12})\.json\Z")  # [0-9] and \Z: see names._STEP_DIR_RE


def pin_key(step: int) -> str:
    """Key of the pin record of ``step``: ``pins/step-000000000042.json``."""
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step {step} out of range")
    return f"{PINS_PREFIX}/{step_dir(step)}.json"


def pin_step(key: str) -> int | None:
    """The step a pin record's key pins, or None if ``key`` is no pin record (a temp file)."""
    m = _PIN_KEY_RE.match(key)
    return int(m.group(1)) if m else None


def pin_record(step: int) -> bytes:
    """The JSON document of ``step``'s pin record: who pinned it and when (for the operator;
    readers go by the key)."""
    doc = {
        "format": PIN_FORMAT,
        "version": PIN_VERSION,
        "step": step,
        "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    return json.dumps(doc, sort_keys=True).encode() + b"\n"
