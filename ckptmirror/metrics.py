"""Operating numbers of one :class:`~ckptmirror.mirror.Mirror`: :meth:`Mirror.metrics` and Prometheus.

:class:`MirrorMetrics` is the mirror's thread-safe record. Saves finish on background threads
(one per replica); each :class:`~ckptmirror.handle.SaveHandle` tells it every replica outcome as
it is recorded (``SaveHandle._observe``), so the numbers are current as soon as
``handle.result()`` returns, and a slow replica's commit is counted when it happens, not when
the save was decided. :meth:`MirrorMetrics.snapshot` returns plain JSON-serialisable data:

``replicas``
    per replica URL: ``state`` (``"ok"`` or ``"degraded"``, see :mod:`ckptmirror.health`),
    ``error`` (why it is degraded, else None), ``last_committed_step`` (the step most recently
    committed on it by this mirror; at open, the newest it held), ``last_commit_unix`` (when, in
    Unix seconds; None before this mirror's first commit there), ``saves_committed``,
    ``saves_failed``, ``saves_dropped`` (of those failed, the writes dropped because the replica
    lagged: :class:`~ckptmirror.errors.ReplicaLaggingError`), ``saves_skipped`` (degraded at the
    time, still finishing a dropped write, or the whole save skipped), ``lagging`` (a dropped
    write is still running there: new saves skip it) and
    ``committed_state_bytes`` (the state bytes of the saves committed on it: what was written
    there, except that a replicated save over several ranks writes only this rank's share).
``saves``
    ``started`` (handles returned by ``save()``), ``committed``, ``failed``, ``skipped`` (their
    outcomes: committed means on ``min_replicas``), ``in_flight`` (not decided yet),
    ``last_committed_step``, ``last_commit_unix``, ``state_bytes`` (of the saves started).
``stall_seconds``, ``first_commit_seconds``, ``all_commit_seconds``
    histograms (see :class:`Histogram`): how long ``save()`` blocked the caller
    (``handle.stall_s``; skipped saves excluded), and the time from the ``save()`` call until
    the first replica committed, and until every replica written to committed (only saves that
    committed on all of them).
``restores``
    ``count`` (restores and ``load_state`` calls that loaded a step), ``not_found`` (no
    checkpoint at all), ``failed`` (raised), ``last_step`` and ``last_seconds`` (finding,
    reading and verifying the last step loaded).

:class:`MirrorCollector` exposes the same numbers to ``prometheus_client`` (an optional
dependency: imported only when a collector is made). Metric names: see :data:`METRIC_NAMES`.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ReplicaLaggingError
from .handle import HandleEvent, SaveHandle

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from prometheus_client.registry import CollectorRegistry

    from .mirror import Mirror

__all__ = [
    "COMMIT_BUCKETS_S",
    "METRIC_NAMES",
    "STALL_BUCKETS_S",
    "Histogram",
    "MirrorCollector",
    "MirrorMetrics",
    "register",
]

#: Upper bounds (seconds) of the ``stall_seconds`` buckets: a steady save stalls for one memcpy.
STALL_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Upper bounds (seconds) of the time-to-commit buckets: a local disk in under a second, a
#: remote replica in minutes.
COMMIT_BUCKETS_S: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)


class Histogram:
    """Fixed-bucket histogram (not locked itself: :class:`MirrorMetrics` holds its lock)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.count = 0
        self.sum = 0.0
        self.last: float | None = None

    def observe(self, value: float) -> None:
        """Count one value."""
        self._counts[bisect.bisect_left(self.bounds, value)] += 1  # bounds are inclusive ("le")
        self.count += 1
        self.sum += value
        self.last = value

    def cumulative(self) -> list[int]:
        """Per bound: how many values were <= it (Prometheus' buckets, without +Inf = ``count``)."""
        out, acc = [], 0
        for c in self._counts[:-1]:
            acc += c
            out.append(acc)
        return out

    def as_dict(self) -> dict[str, Any]:
        """``{"count", "sum", "last", "le": [bounds], "cumulative": [values <= each bound]}``."""
        return {
            "count": self.count,
            "sum": self.sum,
            "last": self.last,
            "le": list(self.bounds),
            "cumulative": self.cumulative(),
        }


@dataclass
class _ReplicaStats:
    committed: int = 0
    failed: int = 0
    dropped: int = 0
    skipped: int = 0
    committed_bytes: int = 0
    written_bytes: int = 0
    last_step: int | None = None
    last_unix: float | None = None


class MirrorMetrics:
    """Thread-safe counters of one mirror; the :class:`~ckptmirror.mirror.Mirror` feeds it.

    Args:
        urls: the mirror's replica URLs.
        committed_at_open: step -> URLs holding it committed when the mirror was opened (seeds
            ``last_committed_step``, so that a resumed run shows its newest step at once).
    """

    def __init__(self, urls: Sequence[str], committed_at_open: Mapping[int, Sequence[str]] | None = None) -> None:
        committed_at_open = committed_at_open or {}
        self._lock = threading.Lock()
        self._replicas = {u: _ReplicaStats() for u in urls}
        for step, holders in committed_at_open.items():
            for u in holders:
                st = self._replicas.get(u)
                if st is not None and (st.last_step is None or step > st.last_step):
                    st.last_step = step
        self._started = self._committed = self._failed = self._skipped = 0
        self._state_bytes = 0
        self._last_step: int | None = max(committed_at_open, default=None)
        self._last_unix: float | None = None
        self._stall = Histogram(STALL_BUCKETS_S)
        self._first_commit = Histogram(COMMIT_BUCKETS_S)
        self._all_commit = Histogram(COMMIT_BUCKETS_S)
        self._restores = self._restores_failed = self._restores_empty = 0
        self._restore_step: int | None = None
        self._restore_s: float | None = None

    # -- fed by the mirror ------------------------------------------------------------------
    def track(self, handle: SaveHandle) -> None:
        """Count a save ``save()`` returns, and follow its replicas until they all finished.

        Call it once ``handle.stall_s`` is known (or the save was skipped).
        """
        with self._lock:
            self._started += 1
            if not handle.skipped:
                self._stall.observe(handle.stall_s)
                self._state_bytes += handle.nbytes
        first_seen = [False]  # per handle; its events come one at a time (under its lock)

        def observe(h: SaveHandle, ev: HandleEvent) -> None:
            now = time.time()
            settled = h.replicas if ev.settled else None  # the handle's lock is held and re-entrant
            with self._lock:
                for status in ev.changed:
                    st = self._replicas.setdefault(status.url, _ReplicaStats())
                    if status.state == "committed":
                        st.committed += 1
                        st.committed_bytes += h.nbytes
                        st.written_bytes += status.written_bytes or 0
                        st.last_step, st.last_unix = h.step, now
                        if not first_seen[0] and status.seconds is not None:
                            first_seen[0] = True
                            self._first_commit.observe(status.seconds)
                    elif status.state == "failed":
                        st.failed += 1
                        if isinstance(status.error, ReplicaLaggingError):
                            st.dropped += 1
                    elif status.state == "skipped":
                        st.skipped += 1
                if ev.outcome == "committed":
                    self._committed += 1
                    self._last_step, self._last_unix = h.step, now
                elif ev.outcome == "failed":
                    self._failed += 1
                elif ev.outcome == "skipped":
                    self._skipped += 1
                if settled is not None:
                    done = [s for s in settled.values() if s.state == "committed"]
                    if done and not any(s.state == "failed" for s in settled.values()):
                        self._all_commit.observe(max(s.seconds or 0.0 for s in done))

        handle._observe(observe)

    def restore_finished(self, step: int | None, seconds: float, failed: bool = False) -> None:
        """Count one restore: ``step`` loaded (None: no checkpoint), or ``failed`` (it raised)."""
        with self._lock:
            if failed:
                self._restores_failed += 1
            elif step is None:
                self._restores_empty += 1
            else:
                self._restores += 1
                self._restore_step, self._restore_s = step, seconds

    # -- read ------------------------------------------------------------------------------
    def snapshot(self, degraded: Mapping[str, str], lagging: Collection[str] = ()) -> dict[str, Any]:
        """The numbers now, as plain data (the schema is in the module docstring).

        ``degraded`` is URL -> error text of the replicas degraded now
        (:meth:`~ckptmirror.health.ReplicaHealth.degraded`); ``lagging``: the URLs where a
        dropped write is still running (:meth:`~ckptmirror.save.fanout.Fanout.lagging`).
        """
        with self._lock:
            replicas = {
                url: {
                    "state": "degraded" if url in degraded else "ok",
                    "error": degraded.get(url),
                    "last_committed_step": st.last_step,
                    "last_commit_unix": st.last_unix,
                    "saves_committed": st.committed,
                    "saves_failed": st.failed,
                    "saves_dropped": st.dropped,
                    "saves_skipped": st.skipped,
                    "lagging": url in lagging,
                    "committed_state_bytes": st.committed_bytes,
                    "written_bytes": st.written_bytes,
                }
                for url, st in self._replicas.items()
            }
            return {
                "replicas": replicas,
                "saves": {
                    "started": self._started,
                    "committed": self._committed,
                    "failed": self._failed,
                    "skipped": self._skipped,
                    "in_flight": self._started - self._committed - self._failed - self._skipped,
                    "last_committed_step": self._last_step,
                    "last_commit_unix": self._last_unix,
                    "state_bytes": self._state_bytes,
                },
                "stall_seconds": self._stall.as_dict(),
                "first_commit_seconds": self._first_commit.as_dict(),
                "all_commit_seconds": self._all_commit.as_dict(),
                "restores": {
                    "count": self._restores,
                    "not_found": self._restores_empty,
                    "failed": self._restores_failed,
                    "last_step": self._restore_step,
                    "last_seconds": self._restore_s,
                },
            }


# ------------------------------------------------------------------------------ Prometheus
#: The metrics :class:`MirrorCollector` exports: name -> (type, help). Counters are listed
#: without the ``_total`` suffix that the exposition adds; per-replica ones have the label
#: ``replica`` (its URL).
METRIC_NAMES: dict[str, tuple[str, str]] = {
    "ckptmirror_replica_degraded": ("gauge", "1 while the replica is degraded (saves skip it), else 0"),
    "ckptmirror_replica_last_committed_step": ("gauge", "Step most recently committed on the replica"),
    "ckptmirror_replica_last_commit_timestamp_seconds": (
        "gauge",
        "Unix time of the last commit on the replica by this process",
    ),
    "ckptmirror_replica_saves_committed": ("counter", "Saves committed on the replica"),
    "ckptmirror_replica_saves_failed": ("counter", "Saves that failed on the replica"),
    "ckptmirror_replica_saves_dropped": (
        "counter",
        "Saves whose write to the replica was dropped because it lagged (counted in saves_failed too)",
    ),
    "ckptmirror_replica_saves_skipped": ("counter", "Saves that skipped the replica (degraded, or skipped)"),
    "ckptmirror_replica_lagging": ("gauge", "1 while a dropped write is still running on the replica (saves skip it)"),
    "ckptmirror_replica_committed_state_bytes": ("counter", "State bytes of the saves committed on the replica"),
    "ckptmirror_replica_written_bytes": (
        "counter",
        "Bytes written to the replica by committed saves (as stored: compressed, new objects only)",
    ),
    "ckptmirror_saves_started": ("counter", "Saves started (handles returned by save())"),
    "ckptmirror_saves_committed": ("counter", "Saves committed on min_replicas replicas"),
    "ckptmirror_saves_failed": ("counter", "Saves that failed"),
    "ckptmirror_saves_skipped": ("counter", "Saves skipped (no free staging buffer, inflight_policy='skip')"),
    "ckptmirror_saves_in_flight": ("gauge", "Saves not decided yet"),
    "ckptmirror_saved_state_bytes": ("counter", "State bytes of the saves started"),
    "ckptmirror_last_committed_step": ("gauge", "Step of the save most recently committed"),
    "ckptmirror_last_commit_timestamp_seconds": ("gauge", "Unix time of the last committed save"),
    "ckptmirror_save_stall_seconds": ("histogram", "Seconds save() blocked the caller"),
    "ckptmirror_save_first_commit_seconds": ("histogram", "Seconds from save() until the first replica committed"),
    "ckptmirror_save_all_commit_seconds": (
        "histogram",
        "Seconds from save() until every replica written to committed",
    ),
    "ckptmirror_last_save_stall_seconds": ("gauge", "Stall of the last save"),
    "ckptmirror_last_save_first_commit_seconds": ("gauge", "Time to first commit of the last save that committed"),
    "ckptmirror_last_save_all_commit_seconds": ("gauge", "Time to commit everywhere of the last such save"),
    "ckptmirror_restores": ("counter", "Restores that loaded a step"),
    "ckptmirror_restores_not_found": ("counter", "Restores that found no checkpoint"),
    "ckptmirror_restores_failed": ("counter", "Restores that raised"),
    "ckptmirror_last_restore_seconds": ("gauge", "Seconds the last restore took to find, read and verify its step"),
    "ckptmirror_last_restore_step": ("gauge", "Step of the last restore"),
}


def _prometheus_core() -> Any:
    """``prometheus_client.core``, or an ImportError that says how to get it."""
    try:
        import prometheus_client.core as core
    except ImportError as exc:
        raise ImportError(
            "ckptmirror.metrics.MirrorCollector needs prometheus_client: pip install prometheus-client"
        ) from exc
    return core


class MirrorCollector:
    """A ``prometheus_client`` custom collector of one mirror's :meth:`~ckptmirror.mirror.Mirror.metrics`.

    Every scrape reads :meth:`Mirror.metrics` once (cheap: no replica is asked). It keeps
    reporting a closed mirror's final numbers; ``registry.unregister(collector)`` stops it.
    Register one mirror per registry (the metric names carry no mirror label). Example::

        from prometheus_client import start_http_server
        ckptmirror.metrics.register(mirror)     # the default registry
        start_http_server(9100)
    """

    def __init__(self, mirror: Mirror) -> None:
        _prometheus_core()  # fail here, at setup, rather than at the first scrape
        self.mirror = mirror

    def describe(self) -> list[Metric]:
        """Nothing: the registry then learns the names from one :meth:`collect` at registration."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The metric families of :data:`METRIC_NAMES`, from the mirror's numbers now."""
        core = _prometheus_core()
        m = self.mirror.metrics()

        def family(name: str, labels: Sequence[str] = ()) -> Any:
            kind, doc = METRIC_NAMES[name]
            cls = {
                "gauge": core.GaugeMetricFamily,
                "counter": core.CounterMetricFamily,
                "histogram": core.HistogramMetricFamily,
            }[kind]
            return cls(name, doc, labels=list(labels))

        per_replica = {
            "ckptmirror_replica_degraded": lambda r: 1.0 if r["state"] == "degraded" else 0.0,
            "ckptmirror_replica_last_committed_step": lambda r: r["last_committed_step"],
            "ckptmirror_replica_last_commit_timestamp_seconds": lambda r: r["last_commit_unix"],
            "ckptmirror_replica_saves_committed": lambda r: r["saves_committed"],
            "ckptmirror_replica_saves_failed": lambda r: r["saves_failed"],
            "ckptmirror_replica_saves_dropped": lambda r: r["saves_dropped"],
            "ckptmirror_replica_saves_skipped": lambda r: r["saves_skipped"],
            "ckptmirror_replica_lagging": lambda r: 1.0 if r["lagging"] else 0.0,
            "ckptmirror_replica_committed_state_bytes": lambda r: r["committed_state_bytes"],
            "ckptmirror_replica_written_bytes": lambda r: r["written_bytes"],
        }
        for name, get in per_replica.items():
            f = family(name, ["replica"])
            for url, r in m["replicas"].items():
                value = get(r)
                if value is not None:  # unknown yet: no sample rather than a made-up 0
                    f.add_metric([url], float(value))
            yield f

        saves, restores = m["saves"], m["restores"]
        plain = {
            "ckptmirror_saves_started": saves["started"],
            "ckptmirror_saves_committed": saves["committed"],
            "ckptmirror_saves_failed": saves["failed"],
            "ckptmirror_saves_skipped": saves["skipped"],
            "ckptmirror_saves_in_flight": saves["in_flight"],
            "ckptmirror_saved_state_bytes": saves["state_bytes"],
            "ckptmirror_last_committed_step": saves["last_committed_step"],
            "ckptmirror_last_commit_timestamp_seconds": saves["last_commit_unix"],
            "ckptmirror_last_save_stall_seconds": m["stall_seconds"]["last"],
            "ckptmirror_last_save_first_commit_seconds": m["first_commit_seconds"]["last"],
            "ckptmirror_last_save_all_commit_seconds": m["all_commit_seconds"]["last"],
            "ckptmirror_restores": restores["count"],
            "ckptmirror_restores_not_found": restores["not_found"],
            "ckptmirror_restores_failed": restores["failed"],
            "ckptmirror_last_restore_seconds": restores["last_seconds"],
            "ckptmirror_last_restore_step": restores["last_step"],
        }
        for name, value in plain.items():
            f = family(name)
            if value is not None:
                f.add_metric([], float(value))
            yield f

        for name, key in (
            ("ckptmirror_save_stall_seconds", "stall_seconds"),
            ("ckptmirror_save_first_commit_seconds", "first_commit_seconds"),
            ("ckptmirror_save_all_commit_seconds", "all_commit_seconds"),
        ):
            h = m[key]
            buckets = [(_le(b), float(c)) for b, c in zip(h["le"], h["cumulative"])]
            buckets.append(("+Inf", float(h["count"])))
            f = family(name)
            f.add_metric([], buckets, sum_value=h["sum"])
            yield f


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``0.5``, ``1.0``, ``60.0``)."""
    return repr(float(bound))


def register(mirror: Mirror, registry: CollectorRegistry | None = None) -> MirrorCollector:
    """Register a :class:`MirrorCollector` of ``mirror`` with ``registry`` (default: the global
    ``prometheus_client.REGISTRY``) and return it (``registry.unregister(it)`` to stop).

    Raises ImportError naming the package when ``prometheus_client`` is not installed.
    """
    collector = MirrorCollector(mirror)
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    registry.register(collector)
    return collector
