"""``ckptmirror verify`` answers for a peer replica from its agent's scrub results (issue 15).

Every test runs real ``ckptmirror serve`` processes (``tests/_agent.py``) and the installed
``ckptmirror`` entry point; checkpoints are written with :class:`ckptmirror.Mirror` to a peer
agent and a local directory.

- Fresh results for the commit stored now: verify reads no object from the agent (its
  ``served_bytes_total`` counter, parsed with ``prometheus_client``'s own parser, grows by less
  than one object: only commit records and manifests) and says so per replica, rank and object.
- A byte flipped behind the agent's back: the next pass finds it, and verify names the object as
  corrupt from the results (exit status 1) without reading it; ``ckptmirror repair`` copies it
  back from the local replica; verify is clean afterwards (read at once, scrubbed again later).
- Results older than ``--scrub-max-age``, ``--scrub-max-age 0``, ``--no-scrub-results``: every
  byte is read. A step saved after the agent's last pass is read; older ones come from the results.
- An agent that does not scrub, and one too old to have the route: verify reads, and
  :meth:`PeerReplica.scrub_report` raises :class:`ScrubUnavailableError` naming the replica.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from _agent import TOKEN, AgentProc, agent, raw_request, serve_command, wait_until, write_token
from prometheus_client.parser import text_string_to_metric_families

import ckptmirror
from ckptmirror import ops
from ckptmirror.checksum import checksum
from ckptmirror.format import commit_key, step_dir
from ckptmirror.replicas.peer import TOKEN_ENV, PeerReplica, ScrubUnavailableError

SCRUB_INTERVAL_S = 1.0
OBJ = 64 << 10  # bytes per object: each step is several objects
NUMEL = 64 << 10  # float32 elements per step: 256 KiB, four objects
CLI = serve_command()


@pytest.fixture(autouse=True)
def _token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The agents' token, for the PeerReplica of this process and the ckptmirror processes alike.
    monkeypatch.setenv(TOKEN_ENV, TOKEN)


@pytest.fixture(scope="module")
def scrubbing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    """An agent that scrubs every second, far faster than these few MB need."""
    base = tmp_path_factory.mktemp("verify-scrub")
    args = ["--reserve-free-bytes", "0", "--scrub-interval", str(SCRUB_INTERVAL_S), "--scrub-bytes-per-s", "500000000"]
    with agent(base / "root", token_file=write_token(base / "token"), args=args) as a:
        yield a


# ------------------------------------------------------------------------------- helpers
def state(step: int) -> dict[str, Any]:
    """A different state at every step (no object of one step is identical to another's)."""
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(NUMEL, generator=g), "step": step}


def save(urls: Sequence[str], steps: Sequence[int]) -> None:
    with ckptmirror.Mirror(list(urls), object_bytes=OBJ) as m:
        for s in steps:
            h = m.save_state(s, state(s)).result(timeout=60)
            assert all(r.state == "committed" for r in h.replicas.values()), h.replicas


def cli(*args: Any) -> subprocess.CompletedProcess[str]:
    """The installed entry point; never raises on a non-zero status."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def verify_json(*args: Any) -> tuple[int, dict[str, Any]]:
    r = cli("verify", *args, "--json")
    assert r.stdout.strip(), r.stderr
    return r.returncode, dict(json.loads(r.stdout))


def served_bytes(a: AgentProc) -> float:
    """The agent's ``ckptmirror_agent_served_bytes_total`` (object bytes it sent)."""
    status, _, body = raw_request(a.port, "GET", "/metrics")
    assert status == 200, body
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "ckptmirror_agent_served_bytes_total":
                return float(sample.value)
    raise AssertionError("ckptmirror_agent_served_bytes_total not on /metrics")


def scrub_doc(a: AgentProc, ns: str) -> dict[str, Any]:
    status, _, body = raw_request(a.port, "GET", f"/v1/scrub/{ns}")
    assert status == 200, body
    return dict(json.loads(body))


def wait_scrubbed(a: AgentProc, ns: str, steps: Sequence[int], timeout: float = 60) -> dict[str, Any]:
    """Wait until the agent's results name exactly ``steps``, each clean and about the commit
    record stored now (a step saved a moment ago may still be unchecked)."""
    ns_root = Path(a.root, ns)

    def done() -> dict[str, Any] | None:
        doc = scrub_doc(a, ns)
        by_step = {s["step"]: s for s in doc["steps"]}
        if sorted(by_step) != sorted(steps):
            return None
        for s in steps:
            record = (ns_root / commit_key(s)).read_bytes()
            if by_step[s]["status"] != "ok" or by_step[s]["commit_checksum"] != checksum(record):
                return None
        return doc

    found = wait_until(done, timeout=timeout, what=f"a clean scrub of steps {list(steps)} of {ns}")
    assert found is not None
    return found


def object_files(ns_root: Path, step: int) -> list[Path]:
    """The object files of ``step`` (rank 0) under a replica root, in key order."""
    return sorted((ns_root / step_dir(step) / "rank-00000").glob("o*.bin"))


def object_bytes(ns_root: Path, steps: Sequence[int]) -> int:
    return sum(p.stat().st_size for s in steps for p in object_files(ns_root, s))


def checks(doc: dict[str, Any], replica: str) -> dict[int, dict[str, Any]]:
    """Step -> the ReplicaCheck of ``replica`` in a ``verify --json`` document."""
    return {s["step"]: rc for s in doc["steps"] for rc in s["replicas"] if rc["replica"] == replica}


def fresh_ns(a: AgentProc) -> tuple[str, str, Path]:
    ns = f"vs-{uuid.uuid4().hex[:10]}"
    return ns, a.url(ns), Path(a.root, ns)


# ------------------------------------------------------------------------------- tests
def test_verify_takes_fresh_scrub_results_and_reads_no_object(scrubbing: AgentProc, tmp_path: Path) -> None:
    a = scrubbing
    ns, peer, ns_root = fresh_ns(a)
    local = tmp_path / "local"
    local.mkdir()
    save([peer, str(local)], (1, 2, 3))
    wait_scrubbed(a, ns, (1, 2, 3))
    smallest = min(p.stat().st_size for s in (1, 2, 3) for p in object_files(ns_root, s))
    assert smallest > 1000

    before = served_bytes(a)
    rc, doc = verify_json(local, peer)
    served = served_bytes(a) - before
    assert rc == 0 and doc["status"] == "ok", doc
    # No object was pulled from the agent: what it served is commit records and manifests only.
    assert served < smallest, served
    for step, rc_ in checks(doc, peer).items():
        keys = sorted(p.relative_to(ns_root).as_posix() for p in object_files(ns_root, step))
        assert rc_["scrubbed"] is not None, rc_
        assert sorted(rc_["scrubbed"]["keys"]) == keys
        assert [(r["scrubbed"], r["read"], r["verified"]) for r in rc_["ranks"]] == [(len(keys), 0, len(keys))]
        assert 0 <= rc_["scrubbed"]["age_s"] < 60
        assert abs(rc_["scrubbed"]["checked_unix"] - time.time()) < 60
    # The local replica was read, as always.
    for rc_ in checks(doc, str(local)).values():
        assert rc_["scrubbed"] is None and rc_["ranks"][0]["read"] == rc_["ranks"][0]["objects"] > 0
    assert doc["scrub"][peer].startswith("used for every step (3)"), doc["scrub"]
    assert str(local) not in doc["scrub"]

    # The text says it per replica and rank.
    text = cli("verify", local, peer)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "object(s) scrubbed by agent at" in text.stdout and "agent scrub" in text.stdout, text.stdout
    assert "CHECKED BY" in text.stdout and "peer agents' scrub results:" in text.stdout


def test_flipped_byte_found_by_scrub_is_corrupt_and_repair_heals_it(scrubbing: AgentProc, tmp_path: Path) -> None:
    a = scrubbing
    ns, peer, ns_root = fresh_ns(a)
    local = tmp_path / "local"
    local.mkdir()
    save([peer, str(local)], (1, 2))
    wait_scrubbed(a, ns, (1, 2))

    victim = object_files(ns_root, 2)[1]
    key = victim.relative_to(ns_root).as_posix()
    original = victim.read_bytes()
    with open(victim, "r+b") as f:  # same size: only a re-hash can tell
        f.seek(len(original) // 2)
        f.write(bytes([original[len(original) // 2] ^ 0x01]))
    flipped = time.monotonic()

    # Within one interval (plus a pass and a loaded machine's allowance) verify names it, from the results.
    def reported() -> ops.VerifyReport | None:
        rep = ops.verify([str(local), peer])
        return rep if any(p.key == key for p in rep.damage) else None

    rep = wait_until(reported, timeout=SCRUB_INTERVAL_S + 30, interval=0.2, what=f"verify reporting {key}")
    assert rep is not None and time.monotonic() - flipped < SCRUB_INTERVAL_S + 30
    (p,) = rep.damage
    assert (p.step, p.replica, p.key, p.kind) == (2, peer, key, "corrupt")
    assert p.detail.startswith("scrubbed by agent at "), p.detail

    before = served_bytes(a)
    rc, doc = verify_json(local, peer)
    assert served_bytes(a) - before < len(original)  # told without reading it
    assert rc == 1 and doc["exit_code"] == 1 and doc["status"] == "damaged", doc
    assert [(d["key"], d["replica"], d["kind"]) for d in doc["damage"]] == [(key, peer, "corrupt")]
    step2 = checks(doc, peer)[2]
    assert step2["status"] == "bad" and key in step2["scrubbed"]["keys"]
    assert all(s["recoverable"] for s in doc["steps"])
    text = cli("verify", local, peer)
    assert text.returncode == 1 and key in text.stdout and "scrubbed by agent at" in text.stdout, text.stdout
    # --quick reads no object, yet takes the damage the agent found (it said OK over it before);
    # the objects the agent calls good are still checked for presence and size.
    rq = ops.verify([str(local), peer], quick=True)
    assert rq.exit_code == 1 and [(d.key, d.replica, d.kind) for d in rq.damage] == [(key, peer, "corrupt")], rq
    assert "only the damage they report" in rq.scrub[peer], rq.scrub
    gone = object_files(ns_root, 1)[0]
    kept = gone.read_bytes()
    gone.unlink()
    try:
        rq = ops.verify([str(local), peer], quick=True)
        assert {(d.key, d.kind) for d in rq.damage} == {
            (key, "corrupt"),
            (gone.relative_to(ns_root).as_posix(), "missing"),
        }
    finally:
        gone.write_bytes(kept)

    # repair copies it back from the local replica.
    fixed = cli("repair", local, peer, "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    actions = json.loads(fixed.stdout)["actions"]
    assert [(x["key"], x["replica"], x["source"], x["action"], x["done"]) for x in actions] == [
        (key, peer, str(local), "copy", True)
    ], actions
    assert victim.read_bytes() == original

    # Clean at once: the repair's write dropped the agent's result of step 2, so it is read
    # (or it was already scrubbed again) ...
    rc, doc = verify_json(local, peer)
    assert rc == 0 and doc["damage"] == [], doc
    # ... and once the agent has checked it again, it comes from the results, clean.
    wait_scrubbed(a, ns, (1, 2))
    rc, doc = verify_json(local, peer)
    assert rc == 0 and all(c["scrubbed"] is not None for c in checks(doc, peer).values()), doc


def test_stale_or_refused_scrub_results_read_the_bytes(tmp_path: Path) -> None:
    """A pass long ago (an agent that scrubs hourly): older than --scrub-max-age, the bytes are
    read; a step saved after the pass is read even where the older ones come from the results."""
    root = tmp_path / "root"
    ns = "run"
    local = tmp_path / "local"
    local.mkdir()
    # Written before the agent starts (the namespace's layout is a local replica's), so its first
    # pass, at start, covers them; the next is an hour away.
    save([str(root / ns), str(local)], (1, 2))
    args = ["--reserve-free-bytes", "0", "--scrub-interval", "3600", "--scrub-bytes-per-s", "500000000"]
    with agent(root, token_file=write_token(tmp_path / "token"), args=args) as a:
        peer = a.url(ns)
        ns_root = root / ns
        wait_scrubbed(a, ns, (1, 2))
        save([peer, str(local)], (3,))  # new since the pass
        old, new = object_bytes(ns_root, (1, 2)), object_bytes(ns_root, (3,))

        before = served_bytes(a)
        rc, doc = verify_json(local, peer)
        served = served_bytes(a) - before
        assert rc == 0, doc
        by_step = checks(doc, peer)
        assert by_step[1]["scrubbed"] is not None and by_step[2]["scrubbed"] is not None
        assert by_step[3]["scrubbed"] is None and by_step[3]["ranks"][0]["read"] == by_step[3]["ranks"][0]["objects"]
        assert new <= served < new + min(p.stat().st_size for p in object_files(ns_root, 1)), (served, new)
        assert doc["scrub"][peer].startswith("used for 2 of 3 step(s)"), doc["scrub"]

        # Too old for --scrub-max-age, turned off with 0, or refused: everything is read.
        wait_until(lambda: scrub_doc(a, ns)["steps"][0]["age_s"] > 1.5, timeout=10, what="results 1.5 s old")
        for flags in (["--scrub-max-age", "1"], ["--scrub-max-age", "0"], ["--no-scrub-results"]):
            before = served_bytes(a)
            rc, doc = verify_json(local, peer, *flags)
            assert rc == 0, (flags, doc)
            assert served_bytes(a) - before >= old + new, flags
            assert all(c["scrubbed"] is None for c in checks(doc, peer).values()), flags
            assert doc["scrub"][peer].startswith("not used"), (flags, doc["scrub"])
        # Library callers have the same switch.
        rep = ops.verify([str(local), peer], scrub_max_age_s=0)
        assert all(rc_.scrubbed is None for s in rep.steps for rc_ in s.replicas)


def test_agent_that_does_not_scrub_falls_back_to_reading(peer_agent: AgentProc, peer_url: str, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    save([peer_url, str(local)], (1,))
    with pytest.raises(ScrubUnavailableError, match="does not scrub") as exc:
        PeerReplica(peer_url, token=TOKEN).scrub_report()
    assert peer_url in str(exc.value) and "--scrub-interval" in str(exc.value)
    rc, doc = verify_json(local, peer_url)
    assert rc == 0, doc
    (c,) = checks(doc, peer_url).values()
    assert c["scrubbed"] is None and c["ranks"][0]["read"] == c["ranks"][0]["objects"] > 0
    assert doc["scrub"][peer_url].startswith("not used: ") and "does not scrub" in doc["scrub"][peer_url]


class _OldAgent(http.server.BaseHTTPRequestHandler):
    """An agent from before scrubbing: aiohttp's plain 404 for a route it does not know."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        body = b"404: Not Found"
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_scrub_report_of_an_agent_too_old_names_the_replica() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OldAgent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"peer://127.0.0.1:{server.server_address[1]}/ns"
        r = PeerReplica(url, token=TOKEN, connect_timeout_s=5)
        with pytest.raises(ScrubUnavailableError, match="too old") as exc:
            r.scrub_report()
        assert url in str(exc.value)
        r.close()
    finally:
        server.shutdown()
        server.server_close()
