"""Mirror.metrics() and the Prometheus collector, fed by real saves (two disks and a peer agent)."""

from __future__ import annotations

import errno
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _agent import TOKEN
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ckptmirror import Mirror, SaveFailedError, StepNotFoundError
from ckptmirror.errors import ReplicaError
from ckptmirror.metrics import COMMIT_BUCKETS_S, METRIC_NAMES, Histogram, MirrorCollector, register
from ckptmirror.replicas import FaultyReplica, LocalReplica


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 64)


def scrape(m: Mirror) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The collector's output through the exposition format and back: family -> (sample, labels) -> value."""
    registry = CollectorRegistry()
    register(m, registry)
    text = generate_latest(registry).decode()
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name.startswith("ckptmirror_"), fam.name
        samples = out.setdefault(fam.name, {})
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def check_histogram(h: dict[str, Any], count: int) -> None:
    assert h["count"] == count
    assert len(h["le"]) == len(h["cumulative"])
    assert h["cumulative"] == sorted(h["cumulative"]) and (not h["cumulative"] or h["cumulative"][-1] <= count)
    if count:
        assert h["last"] is not None and h["sum"] >= h["last"] >= 0


def test_metrics_follow_saves_on_two_disks_and_a_peer(tmp_path: Path, peer_url: str) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    urls = [a, b, peer_url]
    with Mirror(urls, object_bytes=4096, storage_options={"peer": {"token": TOKEN}}) as m:
        first = m.metrics()
        json.dumps(first, allow_nan=False)  # plain data, strict JSON
        assert set(first["replicas"]) == set(urls)
        for r in first["replicas"].values():
            assert r["state"] == "ok" and r["error"] is None
            assert r["last_committed_step"] is None and r["saves_committed"] == 0
        assert first["saves"]["started"] == 0 and first["saves"]["last_committed_step"] is None
        for key in ("stall_seconds", "first_commit_seconds", "all_commit_seconds"):
            check_histogram(first[key], 0)

        handles = []
        for step in (1, 2, 3):
            t_before = time.time()
            h = m.save(step, model(step)).result(timeout=60)
            handles.append(h)
            now = m.metrics()  # current as soon as result() returns: no waiting for a callback thread
            assert now["saves"]["committed"] == step and now["saves"]["last_committed_step"] == step
            for r in now["replicas"].values():
                assert r["last_committed_step"] == step and t_before <= r["last_commit_unix"] <= time.time()
        m.wait()
        got = m.metrics()
        json.dumps(got, allow_nan=False)
        saves = got["saves"]
        assert (saves["started"], saves["committed"], saves["failed"], saves["skipped"], saves["in_flight"]) == (
            3,
            3,
            0,
            0,
            0,
        )
        assert saves["state_bytes"] == sum(h.nbytes for h in handles) > 0
        for url, r in got["replicas"].items():
            assert r["state"] == "ok", url
            assert (r["saves_committed"], r["saves_failed"], r["saves_skipped"]) == (3, 0, 0)
            assert r["committed_state_bytes"] == saves["state_bytes"]
        for key in ("stall_seconds", "first_commit_seconds", "all_commit_seconds"):
            check_histogram(got[key], 3)
        assert got["stall_seconds"]["sum"] == pytest.approx(sum(h.stall_s for h in handles))
        assert got["stall_seconds"]["last"] == handles[-1].stall_s
        # first commit <= every replica's commit <= the last one's
        last = handles[-1].replicas
        assert got["first_commit_seconds"]["last"] == min(s.seconds for s in last.values())
        assert got["all_commit_seconds"]["last"] == max(s.seconds for s in last.values())

        assert got["restores"] == {"count": 0, "not_found": 0, "failed": 0, "last_step": None, "last_seconds": None}
        res = m.restore(model(9))
        assert res is not None and res.step == 3
        with pytest.raises(StepNotFoundError):
            m.load_state(99)
        restores = m.metrics()["restores"]
        assert restores["count"] == 1 and restores["failed"] == 1 and restores["last_step"] == 3
        assert 0 < restores["last_seconds"] <= res.seconds

        prom = scrape(m)
        for url in urls:
            lab = (("replica", url),)
            assert prom["ckptmirror_replica_degraded"][("ckptmirror_replica_degraded", lab)] == 0
            assert prom["ckptmirror_replica_last_committed_step"][("ckptmirror_replica_last_committed_step", lab)] == 3
            committed = prom["ckptmirror_replica_saves_committed"]
            assert committed[("ckptmirror_replica_saves_committed_total", lab)] == 3
        assert prom["ckptmirror_saves_committed"][("ckptmirror_saves_committed_total", ())] == 3
        assert prom["ckptmirror_last_committed_step"][("ckptmirror_last_committed_step", ())] == 3
        assert prom["ckptmirror_restores"][("ckptmirror_restores_total", ())] == 1
        stall = prom["ckptmirror_save_stall_seconds"]
        assert stall[("ckptmirror_save_stall_seconds_count", ())] == 3
        assert stall[("ckptmirror_save_stall_seconds_bucket", (("le", "+Inf"),))] == 3
        assert stall[("ckptmirror_save_stall_seconds_sum", ())] == pytest.approx(got["stall_seconds"]["sum"])
        commit = prom["ckptmirror_save_all_commit_seconds"]
        assert commit[("ckptmirror_save_all_commit_seconds_count", ())] == 3
        buckets = {dict(lab)["le"]: v for (name, lab), v in commit.items() if name.endswith("_bucket")}
        assert len(buckets) == len(COMMIT_BUCKETS_S) + 1
        assert set(prom) == set(METRIC_NAMES)  # every documented family, and no other


def test_a_failing_replica_shows_degraded_and_is_counted(tmp_path: Path) -> None:
    # ENOSPC is an OSError: the replica is marked degraded; the prober (once an hour here) does
    # not bring it back during the test.
    bad = FaultyReplica(LocalReplica(str(tmp_path / "b")), fail_put_at=1, fail_error=OSError(errno.ENOSPC, "disk full"))
    good = str(tmp_path / "a")
    with Mirror([good, bad], object_bytes=4096, min_replicas=1, health_interval_s=3600) as m:
        h1 = m.save(1, model(1))
        h1.result(timeout=30)
        m.wait()
        got = m.metrics()
        rb, ra = got["replicas"][bad.url], got["replicas"][good]
        assert rb["state"] == "degraded" and "disk full" in rb["error"]
        assert (rb["saves_committed"], rb["saves_failed"], rb["last_committed_step"]) == (0, 1, None)
        assert (ra["state"], ra["saves_committed"], ra["last_committed_step"]) == ("ok", 1, 1)
        assert got["saves"]["committed"] == 1 and got["saves"]["failed"] == 0
        assert got["first_commit_seconds"]["count"] == 1
        assert got["all_commit_seconds"]["count"] == 0  # not committed on every replica written to

        m.save(2, model(2)).result(timeout=30)  # the degraded replica is skipped now
        m.wait()
        got = m.metrics()
        rb, ra = got["replicas"][bad.url], got["replicas"][good]
        assert (rb["saves_committed"], rb["saves_failed"], rb["saves_skipped"]) == (0, 1, 1)
        assert (ra["saves_committed"], ra["last_committed_step"]) == (2, 2)
        assert got["saves"]["committed"] == 2 and got["saves"]["last_committed_step"] == 2
        assert got["stall_seconds"]["count"] == got["first_commit_seconds"]["count"] == 2
        assert got["all_commit_seconds"]["count"] == 1  # step 2: every replica written to (only the good one)

        prom = scrape(m)
        degraded = prom["ckptmirror_replica_degraded"]
        assert degraded[("ckptmirror_replica_degraded", (("replica", bad.url),))] == 1
        assert degraded[("ckptmirror_replica_degraded", (("replica", good),))] == 0
        failed = prom["ckptmirror_replica_saves_failed"]
        assert failed[("ckptmirror_replica_saves_failed_total", (("replica", bad.url),))] == 1
        # no commit on the bad replica yet: no sample rather than a made-up value
        steps = prom["ckptmirror_replica_last_committed_step"]
        assert ("ckptmirror_replica_last_committed_step", (("replica", bad.url),)) not in steps


def test_failed_and_skipped_saves_are_counted(tmp_path: Path) -> None:
    broken = FaultyReplica(LocalReplica(str(tmp_path / "x")), fail_put_at=1, fail_error=ReplicaError("injected"))
    with Mirror([broken], object_bytes=4096) as m:
        with pytest.raises(SaveFailedError):
            m.save(1, model(1)).result(timeout=30)
        m.wait()
        got = m.metrics()
        assert (got["saves"]["started"], got["saves"]["failed"], got["saves"]["committed"]) == (1, 1, 0)
        assert got["replicas"][broken.url]["saves_failed"] == 1
        assert got["first_commit_seconds"]["count"] == 0 and got["stall_seconds"]["count"] == 1

    # A save held in its commit phase keeps the only staging buffer: the next one is skipped.
    gate, entered = threading.Event(), threading.Event()

    def hold(phase: str, key: str) -> None:
        if phase == "commit":
            entered.set()
            gate.wait(30)

    slow = FaultyReplica(LocalReplica(str(tmp_path / "y")), on_phase=hold)
    with Mirror([slow], object_bytes=4096, inflight_policy="skip") as m:
        h1 = m.save(1, model(1))
        assert entered.wait(30)
        h2 = m.save(2, model(2))
        assert h2.skipped
        mid = m.metrics()["saves"]
        assert (mid["started"], mid["skipped"], mid["in_flight"], mid["committed"]) == (2, 1, 1, 0)
        assert m.metrics()["replicas"][slow.url]["saves_skipped"] == 1
        gate.set()
        h1.result(timeout=30)
        m.wait()
        got = m.metrics()
        assert (got["saves"]["committed"], got["saves"]["in_flight"]) == (1, 0)
        assert got["stall_seconds"]["count"] == 1  # the skipped save is not in the stall histogram


def test_metrics_are_consistent_while_saves_complete_on_other_threads(tmp_path: Path) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[dict[str, Any]] = []

    with Mirror([str(tmp_path / "a"), str(tmp_path / "b")], object_bytes=4096, max_inflight=2) as m:

        def reader() -> None:
            try:
                while not stop.is_set():
                    snap = m.metrics()
                    json.dumps(snap, allow_nan=False)
                    s = snap["saves"]
                    assert s["in_flight"] >= 0
                    assert s["committed"] + s["failed"] + s["skipped"] + s["in_flight"] == s["started"]
                    seen.append(snap)
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for step in range(1, 21):
            m.save(step, model(step))
        m.wait()
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors
        got = m.metrics()
    assert got["saves"]["committed"] == 20 and got["stall_seconds"]["count"] == 20
    assert got["all_commit_seconds"]["count"] == 20
    assert all(r["saves_committed"] == 20 for r in got["replicas"].values())
    assert seen  # the readers ran during the saves


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 2.0, 7.0):
        h.observe(v)
    d = h.as_dict()
    assert d["cumulative"] == [2, 4] and d["count"] == 5 and d["sum"] == 12.0 and d["last"] == 7.0


def test_the_collector_needs_prometheus_client_only_when_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Mirror([str(tmp_path)]) as m:
        for name in [n for n in sys.modules if n == "prometheus_client" or n.startswith("prometheus_client.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "prometheus_client", None)  # makes `import prometheus_client` fail
        m.save(1, model(1)).result(timeout=30)
        assert m.metrics()["saves"]["committed"] == 1
        with pytest.raises(ImportError, match="pip install prometheus-client"):
            MirrorCollector(m)
        with pytest.raises(ImportError, match="prometheus-client"):
            register(m)
