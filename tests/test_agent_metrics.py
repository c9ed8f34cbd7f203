"""The peer agent's ``GET /metrics`` and its scrubber (issue 15, the agent's parts).

- ``/metrics`` is the Prometheus text format, parsed here by ``prometheus_client``'s own parser:
  bytes and objects received and served, uploads refused by reason, commits accepted and refused,
  free space, each namespace's newest committed step and its age, the scrubber's results. Token
  rules: a read-only metrics token (``--metrics-token-file``) or the admin token; no token is a
  401; a namespace token is a 403 there, and the metrics token is a 403 on every data route.
- ``--scrub-interval``: a byte flipped in a stored object is reported by name (``/metrics``,
  ``/v1/health``, the JSON log, ``GET /v1/scrub/<ns>``) by the first pass that starts after it,
  and healing the object (a PUT, as ``ckptmirror repair`` does) drops the stale result at once.
- ``--scrub-bytes-per-s``: bytes scrubbed never run ahead of the limit (a bound the pacing makes
  exact, checked with the clock read before and after each scrape: no timing flakiness), and a
  pass is not much slower than the limit either (a generous margin).

Every test runs real ``ckptmirror serve`` processes (``tests/_agent.py``) on 127.0.0.1; each is
bounded in time by socket timeouts and ``wait_until`` deadlines.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _agent import HOST, TOKEN, AgentProc, agent, raw_request, serve_command, wait_until, write_token
from prometheus_client.parser import text_string_to_metric_families

import ckptmirror
from ckptmirror.checksum import checksum
from ckptmirror.format import CommitRecord, RankRef, commit_key, rank_manifest_key
from ckptmirror.replicas.peer import TOKEN_ENV, PeerReplica

METRICS_TOKEN = "metrics-only-token-0123456789"
JOB_TOKEN = "token-of-job-a-0123456789"
CSUM = "X-Ckptmirror-Checksum"

Labels = frozenset[tuple[str, str]]


@pytest.fixture(autouse=True)
def _no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A token in the developer's environment must not reach the clients (or agents) by accident.
    monkeypatch.delenv(TOKEN_ENV, raising=False)


# ------------------------------------------------------------------------------- helpers
def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    token: str | None = TOKEN,
    headers: dict[str, str] | None = None,
    timeout: float = 15,
) -> tuple[int, bytes]:
    """(status, body) of one request (see :func:`_agent.raw_request`)."""
    status, _, data = raw_request(port, method, path, body, token=token, headers=headers, timeout=timeout)
    return status, data


class Samples:
    """One scrape of ``/metrics``, parsed by ``prometheus_client``'s own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.values: dict[tuple[str, Labels], float] = {}
        self.families: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for s in family.samples:
                self.values[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.values.get((name, frozenset(labels.items())))

    def __getitem__(self, name: str) -> float:
        value = self.get(name)
        assert value is not None, f"{name} not in the metrics:\n{self.text}"
        return value

    def labelled(self, name: str) -> dict[Labels, float]:
        """Every sample of ``name``: labels -> value."""
        return {labels: v for (n, labels), v in self.values.items() if n == name}


def scrape(a: AgentProc, token: str | None = TOKEN) -> Samples:
    status, body = request(a.port, "GET", "/metrics", token=token)
    assert status == 200, body
    return Samples(body.decode())


def health(a: AgentProc, token: str | None = TOKEN) -> dict[str, Any]:
    status, body = request(a.port, "GET", "/v1/health", token=token)
    assert status == 200, body
    return dict(json.loads(body))


def scrub_report(a: AgentProc, ns: str, token: str | None = TOKEN) -> dict[str, Any]:
    status, body = request(a.port, "GET", f"/v1/scrub/{ns}", token=token)
    assert status == 200, body
    return dict(json.loads(body))


def log_lines(a: AgentProc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in a.log().splitlines() if line.startswith("{")]


def save(url: str, token: str, step: int, numel: int = 4096) -> None:
    """Save a small state as ``step`` to the peer ``url`` alone, and check it committed."""
    state = {"w": torch.arange(numel, dtype=torch.float32) + step}
    with ckptmirror.Mirror([url], storage_options={"peer": {"token": token, "timeout_s": 10}}) as m:
        h = m.save_state(step, state).result(timeout=60)
    assert h.replicas[url].state == "committed", h.replicas


def raw_put(port: int, path: str, length: int, first: bytes, token: str = TOKEN) -> socket.socket:
    """A PUT whose head and first body bytes are sent; the caller sends the rest (or not)."""
    s = socket.create_connection((HOST, port), timeout=15)
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"{CSUM}: {checksum(b'x')}\r\nContent-Length: {length}\r\n\r\n"
    )
    s.sendall(head.encode() + first)
    return s


def read_status(s: socket.socket, timeout: float = 15) -> int:
    s.settimeout(timeout)
    buf = b""
    while b"\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return int(buf.split(b" ", 2)[1])


def objects_of(ns_root: Path, step: int) -> list[Path]:
    return sorted((ns_root / f"step-{step:012d}").glob("rank-*/o*.bin"))


# ========================================================================== 1. /metrics
@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    """Admin token, a metrics token, a namespace token for ``job-a``; a 1 s idle timeout and a
    2 s rate window (10 kB/s) so that both kinds of 408 are quick; no scrubbing."""
    base = tmp_path_factory.mktemp("metered")
    args = [
        "--reserve-free-bytes",
        "0",
        "--max-object-bytes",
        "1000000",
        "--idle-timeout-s",
        "1",
        "--upload-rate-window-s",
        "2",
        "--min-upload-bytes-per-s",
        "10000",
        "--metrics-token-file",
        write_token(base / "metrics.token", METRICS_TOKEN),
        "--namespace-token",
        f"job-a={write_token(base / 'a.token', JOB_TOKEN)}",
    ]
    with agent(base / "root", token_file=write_token(base / "token"), args=args) as a:
        yield a


def test_metrics_token_rules(metered: AgentProc) -> None:
    a = metered
    # The metrics token and the admin token both read it.
    m = scrape(a, METRICS_TOKEN)
    assert scrape(a, TOKEN).get("ckptmirror_agent_info", version=ckptmirror.__version__) == 1
    # No token: 401; unknown token: 403; a job's namespace token: 403 (/metrics names every namespace).
    assert request(a.port, "GET", "/metrics", token=None)[0] == 401
    assert request(a.port, "GET", "/metrics", token="not-a-token")[0] == 403
    assert request(a.port, "GET", "/metrics", token=JOB_TOKEN)[0] == 403
    # The metrics token is read-only: health yes, any data route no (reads, listings, writes).
    assert health(a, METRICS_TOKEN)["scrub"] is None  # this agent does not scrub
    for method, path, body in (
        ("GET", "/v1/steps/job-a", None),
        ("GET", "/v1/list/job-a/step-000000000001", None),
        ("GET", "/v1/o/job-a/step-000000000001/rank-00000/o000000-0123abcd.bin", None),
        ("PUT", "/v1/o/job-a/step-000000000001/rank-00000/o000000-0123abcd.bin", b"abc"),
        ("DELETE", "/v1/prefix/job-a/step-000000000001", None),
        ("GET", "/v1/scrub/job-a", None),
    ):
        status, text = request(a.port, method, path, body, token=METRICS_TOKEN)
        assert status == 403 and text.startswith(b"wrong token"), (method, path, status, text)
    after = scrape(a, METRICS_TOKEN)

    def delta(name: str, **labels: str) -> float:
        return (after.get(name, **labels) or 0) - (m.get(name, **labels) or 0)

    refused = "ckptmirror_agent_auth_refused_total"
    assert [delta(refused, reason=r) for r in ("missing", "wrong", "scope")] == [1, 1, 7], after.text
    assert delta("ckptmirror_agent_uploads_refused_total", reason="auth") == 1  # the PUT: refused for its token
    # Without scrubbing there are no scrub results to serve.
    assert request(a.port, "GET", "/v1/scrub/job-a")[0] == 404


def test_metrics_count_traffic_and_refusals(metered: AgentProc) -> None:
    a = metered
    ns = f"job-a/run-{uuid.uuid4().hex[:8]}"  # under the job's prefix: its token writes there
    url = f"{a.url_base}/{ns}"
    before = scrape(a)
    t0 = time.time()
    save(url, JOB_TOKEN, 3)
    save(url, JOB_TOKEN, 5)
    m = scrape(a)
    stored = sum(f.stat().st_size for f in Path(a.root, ns).rglob("*") if f.is_file() and f.name != "COMMIT.json")
    assert m["ckptmirror_agent_received_bytes_total"] - before["ckptmirror_agent_received_bytes_total"] >= stored
    assert m["ckptmirror_agent_received_objects_total"] - before["ckptmirror_agent_received_objects_total"] >= 4
    assert m["ckptmirror_agent_commits_accepted_total"] - before["ckptmirror_agent_commits_accepted_total"] == 2
    assert m.get("ckptmirror_agent_namespace_newest_step", namespace=ns) == 5
    age = m.get("ckptmirror_agent_namespace_newest_step_age_seconds", namespace=ns)
    assert age is not None and 0 <= age <= time.time() - t0 + 1
    assert m["ckptmirror_agent_free_bytes"] > 0 and m["ckptmirror_agent_reserve_free_bytes"] == 0
    assert m["ckptmirror_agent_uploads_in_flight"] == 0 and m["ckptmirror_agent_max_uploads"] == 16
    assert m["ckptmirror_agent_scrub_enabled"] == 0

    # Served: a restore reads the manifest and the objects back.
    with ckptmirror.Mirror([url], storage_options={"peer": {"token": JOB_TOKEN, "timeout_s": 10}}) as mirror:
        res = mirror.load_state()
    assert res is not None and res[0] == 5
    m2 = scrape(a)
    assert m2["ckptmirror_agent_served_bytes_total"] - m["ckptmirror_agent_served_bytes_total"] >= 4096 * 4
    assert m2["ckptmirror_agent_served_objects_total"] - m["ckptmirror_agent_served_objects_total"] >= 2

    # Refusals, one of each reason this agent can be made to give quickly (admin token, a
    # one-segment namespace: raw requests need no depth header).
    raw_ns = f"refusals-{uuid.uuid4().hex[:8]}"
    okey = f"/v1/o/{raw_ns}/step-000000000007/rank-00000/o000000-0123abcd.bin"
    s = raw_put(a.port, okey, 2_000_000, b"")  # over --max-object-bytes: refused before the body
    assert read_status(s) == 413
    s.close()
    assert request(a.port, "PUT", okey, b"abc", headers={CSUM: checksum(b"abd")})[0] == 422
    assert request(a.port, "PUT", okey, b"abc", headers={CSUM: "nonsense"})[0] == 400
    s = raw_put(a.port, okey, 1000, b"12345")  # then nothing: idle after 1 s
    assert read_status(s) == 408
    s.close()
    s = raw_put(a.port, okey, 1000, b"1")  # a byte every 0.2 s: never idle, far below 10 kB/s
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not select.select([s], [], [], 0.2)[0]:
        try:
            s.sendall(b"2")
        except OSError:
            break  # cut and closed: its answer is still readable
    assert read_status(s) == 408  # cut at the end of the first 2 s window
    s.close()
    # A commit naming a manifest that is not there: refused (409), counted as a commit refusal.
    mkey = rank_manifest_key(7, 0, "0123abcd")
    record = CommitRecord(7, 1, (RankRef(0, mkey, 10, checksum(b"0123456789")),)).to_json()
    status, text = request(a.port, "PUT", f"/v1/commit/{raw_ns}/{commit_key(7)}", record)
    assert status == 409, text

    def delta(name: str, **labels: str) -> float:
        return (m3.get(name, **labels) or 0) - (m2.get(name, **labels) or 0)

    m3 = wait_until(
        lambda: (x := scrape(a)).get("ckptmirror_agent_uploads_refused_total", reason="rate") and x,
        timeout=15,
        what="the rate refusal counted",
    )
    refused = "ckptmirror_agent_uploads_refused_total"
    assert {r: delta(refused, reason=r) for r in ("size", "checksum", "bad_request", "idle", "rate")} == {
        "size": 1,
        "checksum": 1,
        "bad_request": 1,
        "idle": 1,
        "rate": 1,
    }, m3.text
    assert delta(refused, reason="space") == 0 and delta(refused, reason="busy") == 0
    assert delta("ckptmirror_agent_commits_refused_total", reason="unverified") == 1
    assert delta("ckptmirror_agent_commits_accepted_total") == 0
    # The received-bytes counter also counts the bodies of refused uploads.
    assert delta("ckptmirror_agent_received_bytes_total") >= 3


# ========================================================================= 2. scrubbing
SCRUB_INTERVAL_S = 2.0


@pytest.fixture(scope="module")
def scrubbing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    """Scrubs every 2 s at 20 MB/s; admin token, and a namespace token for ``other``."""
    base = tmp_path_factory.mktemp("scrubbing")
    args = [
        "--reserve-free-bytes",
        "0",
        "--scrub-interval",
        str(SCRUB_INTERVAL_S),
        "--scrub-bytes-per-s",
        "20000000",
        "--namespace-token",
        f"other={write_token(base / 'other.token', JOB_TOKEN)}",
    ]
    with agent(base / "root", token_file=write_token(base / "token"), args=args) as a:
        yield a


def test_scrub_reports_a_flipped_byte_by_name(scrubbing: AgentProc) -> None:
    a = scrubbing
    ns = f"scrub-{uuid.uuid4().hex[:8]}"
    url = a.url(ns)
    save(url, TOKEN, 1)
    save(url, TOKEN, 2)
    ns_root = Path(a.root, ns)

    # Both steps scrubbed clean first (the results name the commit record that was checked).
    def both_checked() -> dict[str, Any] | None:
        r = scrub_report(a, ns)
        return r if [s["step"] for s in r["steps"]] == [1, 2] else None

    rep = wait_until(both_checked, timeout=30, what="a scrub of both steps")
    assert [s["status"] for s in rep["steps"]] == ["ok", "ok"] and rep["problems"] == []
    for s in rep["steps"]:
        assert s["commit_checksum"] == checksum((ns_root / commit_key(s["step"])).read_bytes())
        assert s["ranks"][0]["verified"] == s["ranks"][0]["objects"] >= 1 and s["ranks"][0]["manifest_ok"]
        assert 0 <= s["age_s"] < 60
    assert rep["checked_unix"] is not None and rep["interval_s"] == SCRUB_INTERVAL_S
    m = scrape(a)
    assert m.get("ckptmirror_agent_scrub_damaged_objects", namespace=ns) == 0
    assert m["ckptmirror_agent_scrub_bytes_total"] > 0 and m["ckptmirror_agent_scrub_files_total"] >= 6

    # Rot: one byte of one object of step 2, same size, behind the agent's back.
    (victim,) = objects_of(ns_root, 2)[:1]
    key = victim.relative_to(ns_root).as_posix()
    original = victim.read_bytes()
    flipped = time.time()
    with open(victim, "r+b") as f:
        f.seek(len(original) // 2)
        f.write(bytes([original[len(original) // 2] ^ 0x01]))

    name = "ckptmirror_agent_scrub_damaged_object"
    found = wait_until(
        lambda: (x := scrape(a)).get(name, namespace=ns, key=key, kind="corrupt") == 1 and x,
        timeout=SCRUB_INTERVAL_S + 30,  # one interval, plus a generous allowance for a loaded machine
        what=f"{key} reported damaged on /metrics",
    )
    assert found.get("ckptmirror_agent_scrub_damaged_objects", namespace=ns) == 1
    # The JSON log names it, and says when: at most one pass ended between the flip and the
    # report (the one in progress at the flip), so the pass that found it is the first to start
    # after the flip, within one interval. The log's order is the agent's own: no timing guess.
    lines = log_lines(a)
    first = next(i for i, r in enumerate(lines) if r.get("msg") == "scrub: damaged object" and r.get("key") == key)
    assert lines[first]["ns"] == ns and lines[first]["kind"] == "corrupt" and lines[first]["step"] == 2
    ended = [r for r in lines[:first] if r.get("msg") == "scrub pass done" and r["ts"] > flipped + 0.001]
    assert len(ended) <= 1, ended

    # /v1/health names it (to the admin token; not to a token of another namespace).
    damaged = health(a)["scrub"]["damaged"]
    assert any(d["namespace"] == ns and d["key"] == key and d["kind"] == "corrupt" for d in damaged), damaged
    assert all(d["namespace"] == "other" for d in health(a, JOB_TOKEN)["scrub"]["damaged"])
    # The results endpoint follows the namespace rules: another namespace's token gets 403.
    assert request(a.port, "GET", f"/v1/scrub/{ns}", token=JOB_TOKEN)[0] == 403
    assert scrub_report(a, "other", JOB_TOKEN)["steps"] == []
    # GET /v1/scrub/<ns>: step 2 bad with the problem, step 1 still ok.
    rep = scrub_report(a, ns)
    by_step = {s["step"]: s for s in rep["steps"]}
    assert by_step[1]["status"] == "ok" and by_step[2]["status"] == "bad"
    assert [(p["key"], p["kind"], p["step"]) for p in rep["problems"]] == [(key, "corrupt", 2)]
    assert by_step[2]["ranks"][0]["verified"] == by_step[2]["ranks"][0]["objects"] - 1

    # Healed as `ckptmirror repair` would (a PUT of the good bytes): the stale result goes at once
    # (step 2 is absent until checked again, or already checked again: never the old "bad")...
    PeerReplica(url, token=TOKEN, timeout_s=10).put(key, original)
    assert [s["status"] for s in scrub_report(a, ns)["steps"] if s["step"] == 2] in ([], ["ok"])
    # ... and the next pass finds the step clean again.
    wait_until(
        lambda: {s["step"]: s["status"] for s in scrub_report(a, ns)["steps"]} == {1: "ok", 2: "ok"},
        timeout=SCRUB_INTERVAL_S + 30,
        what="step 2 scrubbed clean after the repair",
    )
    m = scrape(a)
    assert m.get("ckptmirror_agent_scrub_damaged_objects", namespace=ns) == 0
    assert not [labels for labels in m.labelled(name) if ("namespace", ns) in labels]


def test_scrub_rate_is_bounded(tmp_path: Path) -> None:
    rate = 1_000_000  # bytes/s
    ns = "bulk"
    # ~4 MB written before the agent starts (the namespace's layout is a local replica's), so its
    # first pass has them all to read, at the limit: about 4 s.
    with ckptmirror.Mirror([str(tmp_path / "root" / ns)], object_bytes=1 << 20) as m:
        m.save_state(1, {"w": torch.arange(1 << 20, dtype=torch.float32)}).result(timeout=60)
    total = sum(f.stat().st_size for f in (tmp_path / "root" / ns).rglob("*") if f.is_file())
    assert total > 4_000_000
    # No token at all (loopback): /metrics is open like everything else. A reserve no disk has:
    # every upload is refused for space.
    args = ["--scrub-interval", "3600", "--scrub-bytes-per-s", str(rate), "--reserve-free-bytes", str(1 << 62)]
    with agent(tmp_path / "root", token_file=None, args=args) as a:
        samples: list[tuple[float, float, float, Samples]] = []  # (clock before, clock after, bytes, scrape)
        deadline = time.monotonic() + 4 * total / rate + 30  # a generous margin: the machine is shared
        while time.monotonic() < deadline:
            before = time.monotonic()
            m = scrape(a, token=None)
            samples.append((before, time.monotonic(), m["ckptmirror_agent_scrub_bytes_total"], m))
            if m["ckptmirror_agent_scrub_passes_total"] >= 1 and m["ckptmirror_agent_scrub_bytes_total"] > 0:
                break
            time.sleep(0.2)
        last = samples[-1][3]
        assert last["ckptmirror_agent_scrub_passes_total"] >= 1, "the first pass did not end in time"
        assert last["ckptmirror_agent_scrub_bytes_total"] == total  # everything, once
        assert last["ckptmirror_agent_scrub_bytes_per_second_limit"] == rate
        assert last.get("ckptmirror_agent_scrub_damaged_objects", namespace=ns) == 0

        # Never ahead of the limit. The pacer lets a read start only once the bytes before it
        # fit the rate, so from any scrape on, bytes(t) - bytes(first) <= rate * (t - first) plus
        # the one read admitted at that boundary (reads are rate/4 bytes; the counter moves when a
        # read completes), with `first` read before its scrape and `t` after its own.
        moving = [s for s in samples if s[2] > 0]
        assert len(moving) >= 3, "too few scrapes during the pass"
        t_first, _, b_first, _ = moving[0]
        for _, t_after, b, _ in moving[1:]:
            allowed = rate * (t_after - t_first) * 1.01 + rate / 4 + 4096
            assert b - b_first <= allowed, (b - b_first, t_after - t_first)
        # The agent's own account of the pass (its log): never faster than the limit allows (the
        # last read cannot start before the bytes before it fit the rate; reads are rate/4 bytes),
        # and not far slower either (a generous margin: the machine is shared).
        (done,) = [r for r in log_lines(a) if r.get("msg") == "scrub pass done" and r["bytes"] > 0][:1]
        assert done["bytes"] == total and done["damaged"] == 0
        assert (total - rate / 4) / rate * 0.99 <= done["seconds"] <= 5 * total / rate, done

        # Space refusals are counted too (this agent's reserve refuses everything).
        path = f"/v1/o/{ns}/step-000000000002/rank-00000/o000000-0123abcd.bin"
        assert request(a.port, "PUT", path, b"abc", token=None)[0] == 507
        assert scrape(a, token=None).get("ckptmirror_agent_uploads_refused_total", reason="space") == 1


# ================================================================= 3. options that cannot work
def test_serve_refuses_bad_metrics_and_scrub_options(tmp_path: Path) -> None:
    token = write_token(tmp_path / "token")
    same = write_token(tmp_path / "same.token")  # the admin token again
    for args, expected in (
        (["--scrub-interval", "5", "--scrub-bytes-per-s", "0"], "--scrub-bytes-per-s"),
        (["--token-file", token, "--metrics-token-file", same], "--metrics-token-file"),
    ):
        p = subprocess.run(
            serve_command() + ["serve", "--root", str(tmp_path / "root"), "--port", "0", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 2 and expected in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not os.path.exists(tmp_path / "root")  # refused before creating anything
