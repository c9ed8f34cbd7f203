"""The peer agent's ``GET /metrics``: Prometheus text format, from a registry of its own.

Each :class:`~ckptmirror.replicas.peer_agent.Agent` has its own
:class:`prometheus_client.CollectorRegistry` (never the process-global one: two agents in one
process, as in tests, must not share or clash). Counters are updated by the handlers as things
happen; everything that is a state (free space, uploads in flight, the newest committed step of
each namespace, the scrubber's latest results) is read when the metrics are scraped, so it is
never stale and costs nothing between scrapes. The scrape runs on the agent's I/O threads
(it stats the namespaces' step directories), never on the event loop.

Metrics (all prefixed ``ckptmirror_agent_``):

==========================================================  ================================================
``received_bytes_total``                                    upload body bytes received (uploads later
                                                            refused included)
``received_objects_total``                                  objects and rank manifests stored (verified)
``served_bytes_total``, ``served_objects_total``            object bytes sent; object reads answered
                                                            (GET, a Range read counts once; not HEAD)
``uploads_in_flight``, ``max_uploads``                      uploads being received; the limit
``uploads_refused_total{reason}``                           ``size`` 413, ``rate`` 408 too slow, ``idle``
                                                            408 no data, ``space`` 507, ``auth`` 401/403,
                                                            ``busy`` 503, ``checksum`` 422, ``bad_request``
``commits_accepted_total``                                  commit records accepted (identical retries too)
``commits_refused_total{reason}``                           ``unverified`` 409 (something it names is
                                                            absent or does not verify), ``exists`` 412
                                                            (another record), ``other``
``auth_refused_total{reason}``                              any request: ``missing`` token (401),
                                                            ``wrong`` token, token not valid for the route
                                                            or namespace (``scope``) (403)
``free_bytes``, ``reserve_free_bytes``                      free space under the root; the reserve
``namespace_newest_step{namespace}``                        newest committed step
``namespace_newest_step_age_seconds{namespace}``            since this agent accepted its commit record
``scrub_enabled``, ``scrub_interval_seconds``,              the scrubber's settings
``scrub_bytes_per_second_limit``
``scrub_passes_total``, ``scrub_bytes_total``,              complete passes; bytes re-read and re-hashed;
``scrub_files_total``                                       files checked (commits, manifests, objects)
``scrub_last_pass_end_timestamp_seconds``                   end of the latest complete pass (unix time)
``scrub_namespace_checked_timestamp_seconds{namespace}``    end of the latest complete pass over it
``scrub_damaged_objects{namespace}``                        damaged files in the latest results (exact)
``scrub_damaged_object{namespace,key,kind}``                1 for each damaged file, by name (the first
                                                            100 per namespace)
``info{version}``                                           1
==========================================================  ================================================
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from .._version import __version__
from ._scrub import MAX_NAMED, Scrubber, find_namespaces, newest_committed

if TYPE_CHECKING:
    from .peer_agent import Agent

__all__ = ["CONTENT_TYPE", "REFUSAL_REASONS", "AgentMetrics"]

PREFIX = "ckptmirror_agent_"
#: The ``Content-Type`` of ``GET /metrics`` (the format ``generate_latest`` writes).
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Reasons of ``uploads_refused_total``, all exported from the start (at 0) so that a rate() or
#: an alert on one of them works before the first refusal.
REFUSAL_REASONS = ("size", "rate", "idle", "space", "auth", "busy", "checksum", "bad_request")
#: The status of an answer to an upload -> the reason it was refused (408 is told apart where raised).
REFUSAL_BY_STATUS = {413: "size", 408: "rate", 507: "space", 401: "auth", 403: "auth", 503: "busy", 422: "checksum"}
COMMIT_REFUSAL_REASONS = ("unverified", "exists", "other")
AUTH_REFUSAL_REASONS = ("missing", "wrong", "scope")


class AgentMetrics:
    """The agent's registry: counters the handlers update, and a collector for its state."""

    def __init__(self, agent: Agent) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labelnames=tuple(labels), registry=r)

        self.received_bytes = counter("received_bytes", "Upload body bytes received (uploads later refused too).")
        self.received_objects = counter(
            "received_objects", "Objects and rank manifests stored after their checksum verified."
        )
        self.served_bytes = counter("served_bytes", "Object bytes sent to clients.")
        self.served_objects = counter("served_objects", "Object reads answered (GET; a Range read counts once).")
        self.uploads_refused = counter("uploads_refused", "Uploads refused, by reason.", ["reason"])
        self.commits_accepted = counter("commits_accepted", "Commit records accepted.")
        self.commits_refused = counter("commits_refused", "Commit records refused, by reason.", ["reason"])
        self.auth_refused = counter("auth_refused", "Requests refused for their token, by reason.", ["reason"])
        for family, reasons in (
            (self.uploads_refused, REFUSAL_REASONS),
            (self.commits_refused, COMMIT_REFUSAL_REASONS),
            (self.auth_refused, AUTH_REFUSAL_REASONS),
        ):
            for reason in reasons:
                family.labels(reason=reason)  # exported at 0 from the start
        r.register(_StateCollector(agent))

    def refused(self, reason: str) -> None:
        """Count one refused upload."""
        self.uploads_refused.labels(reason=reason).inc()

    def upload_failed(self, status: int, refusal: str | None, commit: bool) -> None:
        """Count an upload answered with ``status`` (>= 400); ``refusal`` when the agent said why
        (two kinds of 408). A commit whose contents were the problem (409, 412) is a commit refusal,
        not an upload refusal; a server error (5xx but 503/507) is neither: nothing was refused."""
        reason = refusal or REFUSAL_BY_STATUS.get(status) or ("bad_request" if status in (400, 411) else None)
        if reason is not None and not (commit and status in (409, 412)):
            self.refused(reason)
        if commit:
            self.commits_refused.labels(reason={409: "unverified", 412: "exists"}.get(status, "other")).inc()

    def render(self) -> bytes:
        """The whole registry in the Prometheus text format (blocking: call it off the event loop)."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """What the agent is, read at each scrape."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        info = GaugeMetricFamily(PREFIX + "info", "The agent's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield _gauge("uploads_in_flight", "Uploads being received now.", a.uploads)
        yield _gauge("max_uploads", "Concurrent uploads allowed (--max-uploads).", a.max_uploads)
        yield _gauge("free_bytes", "Free space under the agent's root.", a.free_bytes())
        yield _gauge(
            "reserve_free_bytes", "Uploads that would leave less free space are refused.", a.reserve_free_bytes
        )
        yield from self._namespaces()
        yield from _scrub_metrics(a.scrubber)

    def _namespaces(self) -> Iterator[Metric]:
        step = GaugeMetricFamily(
            PREFIX + "namespace_newest_step", "Newest committed step of each namespace.", labels=["namespace"]
        )
        age = GaugeMetricFamily(
            PREFIX + "namespace_newest_step_age_seconds",
            "Seconds since this agent accepted the commit record of the newest committed step.",
            labels=["namespace"],
        )
        now = time.time()
        for ns in find_namespaces(self.agent.root):
            newest = newest_committed(self.agent.replica_root(ns))
            if newest is not None:
                step.add_metric([ns], newest[0])
                age.add_metric([ns], max(0.0, now - newest[1]))
        yield step
        yield age


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _scrub_metrics(s: Scrubber | None) -> Iterator[Metric]:
    """The scrubber's settings, totals and latest results (only ``scrub_enabled 0`` when it is off)."""
    yield _gauge("scrub_enabled", "Whether the agent scrubs what it stores (--scrub-interval).", int(s is not None))
    if s is None:
        return
    yield _gauge("scrub_interval_seconds", "A scrub pass starts this often (--scrub-interval).", s.interval_s)
    yield _gauge("scrub_bytes_per_second_limit", "The scrubber reads at most this fast.", s.bytes_per_s)
    yield CounterMetricFamily(PREFIX + "scrub_passes", "Complete scrub passes.", value=s.passes)
    yield CounterMetricFamily(
        PREFIX + "scrub_bytes", "Bytes re-read and re-hashed by the scrubber.", value=s.bytes_read
    )
    yield CounterMetricFamily(
        PREFIX + "scrub_files", "Files checked by the scrubber (commits, manifests, objects).", value=s.files_checked
    )
    end = GaugeMetricFamily(
        PREFIX + "scrub_last_pass_end_timestamp_seconds", "End of the latest complete scrub pass (unix time)."
    )
    if s.last_pass_end_unix is not None:
        end.add_metric([], s.last_pass_end_unix)
    yield end
    checked = GaugeMetricFamily(
        PREFIX + "scrub_namespace_checked_timestamp_seconds",
        "End of the latest complete scrub pass over each namespace (unix time).",
        labels=["namespace"],
    )
    for ns, t in sorted(s.checked_times().items()):
        checked.add_metric([ns], t)
    yield checked
    count = GaugeMetricFamily(
        PREFIX + "scrub_damaged_objects", "Damaged files in the latest scrub results.", labels=["namespace"]
    )
    named = GaugeMetricFamily(
        PREFIX + "scrub_damaged_object",
        f"1 for each damaged file of the latest scrub results (the first {MAX_NAMED} per namespace).",
        labels=["namespace", "key", "kind"],
    )
    damaged = s.damaged()
    for ns in sorted(set(s.checked_times()) | set(damaged)):
        problems = damaged.get(ns, [])
        count.add_metric([ns], len(problems))
        for p in problems[:MAX_NAMED]:
            named.add_metric([ns, p["key"], p["kind"]], 1)
    yield count
    yield named
