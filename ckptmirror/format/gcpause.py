"""Pausing the cyclic garbage collector while manifests are parsed and checked (see :func:`paused_gc`)."""

from __future__ import annotations

import gc
import sys
import sysconfig
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_gc_lock = threading.Lock()
_gc_depth = 0
_gc_resume = False
_gc_promote_now = False
#: Whether :func:`paused_gc` may hand what a pause built to the oldest generation (see there):
#: CPython with a GIL only, where ``gc.freeze()`` and ``gc.unfreeze()`` splice the generations'
#: lists in constant time (the free-threaded build walks the heap). Cleared for good once the
#: process is seen to keep objects frozen itself.
_gc_can_promote = (
    sys.implementation.name == "cpython" and hasattr(gc, "freeze") and not sysconfig.get_config_var("Py_GIL_DISABLED")
)


@contextmanager
def paused_gc(promote: bool = False) -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a manifest is parsed or checked, or while a
    save builds per-leaf objects (``flatten``, ``plan_key``: at 50,000 tensors ``plan_key``
    took 0.05 s paused, 0.06-0.14 s not).

    Parsing builds hundreds of thousands of containers in a burst, and each burst of
    allocations triggers collections that scan every tracked object of the process (the
    model, the optimizer, torch itself): measured 2.6x the parse time at 50k leaves. What is
    built here is acyclic (JSON trees, tuples), so those scans find nothing to free; memory is
    bounded by :data:`MAX_PARSE_MEMORY` instead. Nested and concurrent users share one pause; the
    collector is re-enabled when the last one leaves, if it was enabled when the first came.

    ``promote`` (for a large manifest; decided by the first user): re-enabled as is, the
    collector would scan everything the pause left behind at its next allocation (the records
    of every leaf: 15-20 ms at 50k leaves, a sixth of parse and validation), again one
    generation up later, and find nothing. So the young generations are collected when the
    pause starts (a few thousand objects at most), and what they hold when it ends, the pause's
    survivors, joins the oldest generation unscanned (``gc.freeze()`` then ``gc.unfreeze()``:
    two list splices), where full collections see it like any other long-lived object. Not in a
    process that keeps objects frozen itself (``gc.get_freeze_count()``): that would release them.
    """
    global _gc_depth, _gc_resume, _gc_promote_now
    with _gc_lock:
        first = _gc_depth == 0
        if first:
            _gc_resume = gc.isenabled()
            _gc_promote_now = promote and _gc_resume and _gc_can_promote
            gc.disable()
        _gc_depth += 1
        collect = first and _gc_promote_now
    try:
        if collect:  # outside the lock: finalizers run here
            gc.collect(1)
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_resume:
                if _gc_promote_now:
                    _promote_young()
                gc.enable()


def _promote_young() -> None:
    """Move the young generations' objects to the oldest one without scanning them (see
    :func:`paused_gc`); nothing where the process keeps objects frozen."""
    global _gc_can_promote
    if gc.get_freeze_count():  # walks the frozen objects: once, never again after
        _gc_can_promote = False
        return
    gc.freeze()
    gc.unfreeze()
