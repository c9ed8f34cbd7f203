"""The peer replica end to end: real ``ckptmirror serve`` processes, real sockets, real SIGKILL.

RELIABILITY.md items 16 (slow, stalled or reset peer connections) and 17 (hostile or broken
clients of the agent), and the "Peer agent" commit rule: the agent verifies size and checksum
while receiving, writes with temp file + fsync + rename, and accepts a commit only when every
object it names is present and verified.

Agents are started by ``tests/_agent.py`` (the console script, ``--port 0``, a token file);
most tests share the session's agent (``peer_agent`` in conftest.py), each in namespaces of its
own. Faults on the wire come from ``TcpProxy`` (delay, stall, reset with SO_LINGER 0).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _agent import (
    HOST,
    TOKEN,
    AgentProc,
    TcpProxy,
    agent,
    files_under,
    free_port,
    raw_request,
    serve_command,
    start_agent,
    temp_files,
    terminate,
    wait_until,
)
from _helpers import assert_bit_exact, make_state, snapshot, train

import ckptmirror
from ckptmirror.checksum import checksum
from ckptmirror.errors import (
    ManifestError,
    ReplicaError,
    ReplicaPermissionError,
    SaveFailedError,
    StepExistsError,
)
from ckptmirror.replicas import FaultyReplica, LocalReplica
from ckptmirror.replicas.peer import TOKEN_ENV, PeerReplica

pytestmark = pytest.mark.usefixtures("no_peer_token_env")

OBJECT_BYTES = 1 << 20  # the state below is ~4.7 MB: five or six objects per step
STEP = "step-{:012d}"
CSUM = "X-Ckptmirror-Checksum"


# ----------------------------------------------------------------------------- helpers
def restore_from(urls: list[str], snap: dict[str, Any], step: int, **kw: Any) -> ckptmirror.RestoreResult:
    """Restore into a fresh model/optimizer (other seed) and check it is bit-exact ``snap``."""
    model, opt = make_state(seed=4242)
    with mirror(urls, **kw) as m:
        res = m.restore(model, opt)
    assert res is not None and res.step == step
    assert_bit_exact(snapshot(model, opt), snap, "state")
    return res


def mirror(urls: list[str], *, peer: dict[str, Any] | None = None, **kw: Any) -> ckptmirror.Mirror:
    kw.setdefault("object_bytes", OBJECT_BYTES)
    return ckptmirror.Mirror(urls, storage_options={"peer": {"token": TOKEN, **(peer or {})}}, **kw)


def states(h: ckptmirror.SaveHandle) -> dict[str, str]:
    return {u: s.state for u, s in h.replicas.items()}


def settle(h: ckptmirror.SaveHandle, timeout: float = 30) -> dict[str, ckptmirror.ReplicaStatus]:
    """Wait until no replica of ``h`` is pending (a handle can fail before the others finish)."""
    wait_until(
        lambda: all(s.state != "pending" for s in h.replicas.values()),
        timeout,
        0.01,
        "every replica of the save to finish",
    )
    return h.replicas


# ------------------------------------------------------------------------- raw HTTP
def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    token: str | None = TOKEN,
    timeout: float = 10,
) -> tuple[int, dict[str, str], bytes]:
    return raw_request(port, method, path, body, token=token, headers=headers, timeout=timeout)


def send_head(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> socket.socket:
    """Open a raw connection, send a request head (and maybe the start of a body), return it."""
    s = socket.create_connection((HOST, port), timeout=10)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"] + [f"{k}: {v}" for k, v in headers.items()]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return s


def read_status(s: socket.socket, timeout: float) -> int | None:
    """Status code of the response on ``s``; None if the agent closed without answering;
    0 if it neither answered nor closed within ``timeout`` seconds."""
    s.settimeout(timeout)
    buf = b""
    while b"\r\n" not in buf:
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            return None
        except TimeoutError:
            return 0
        if not chunk:
            return None
        buf += chunk
    return int(buf.split(b" ", 2)[1])


def health(a: AgentProc) -> dict[str, Any]:
    status, _, body = request(a.port, "GET", "/v1/health")
    assert status == 200, body
    return json.loads(body)


def wait_idle(a: AgentProc, timeout: float = 10) -> None:
    wait_until(lambda: health(a)["uploads_in_flight"] == 0, timeout, 0.05, "the agent to have no upload in flight")


def okey(step: int, index: int = 0) -> str:
    """Key of object ``index`` of rank 0 at ``step``."""
    return f"{STEP.format(step)}/rank-00000/o{index:06d}.bin"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, peer_token_file: str) -> Iterator[AgentProc]:
    """An agent with tight limits: objects <= 1 MB, idle timeout 1 s, one upload at a time."""
    base = tmp_path_factory.mktemp("limited")
    args = ["--max-object-bytes", "1000000", "--idle-timeout-s", "1", "--max-uploads", "1"]
    with agent(base / "root", token_file=peer_token_file, args=args) as a:
        yield a


# ================================================================ 1. round trip through a peer
def test_round_trip_restores_from_peer_alone(
    peer_agent: AgentProc, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = str(tmp_path / "local")
    peer = peer_agent.url("roundtrip")
    model, opt = make_state(seed=1)
    with mirror([local, peer]) as m:
        h1 = m.save(1, model, opt, extra={"epoch": 1}).result(timeout=60)
        train(model, opt, seed=2)
        snap2 = snapshot(model, opt)
        h2 = m.save(2, model, opt, extra={"epoch": 2}).result(timeout=60)
    for h in (h1, h2):
        assert states(h) == {local: "committed", peer: "committed"}
    ns_root = os.path.join(peer_agent.root, "roundtrip")
    objects = [f for f in files_under(ns_root) if f.startswith(STEP.format(2) + "/rank-00000/")]
    assert len(objects) >= 4, objects  # several objects of 1 MiB, not one blob
    assert os.path.isfile(os.path.join(ns_root, STEP.format(2), "COMMIT.json"))
    assert temp_files(ns_root) == []

    shutil.rmtree(local)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # the token from the environment this time
    model2, opt2 = make_state(seed=99)
    with ckptmirror.Mirror([peer], object_bytes=OBJECT_BYTES) as m:
        assert m.steps() == [1, 2]
        res = m.restore(model2, opt2)
    assert res is not None and res.step == 2 and res.extra == {"epoch": 2}
    assert_bit_exact(snapshot(model2, opt2), snap2)
    assert res.sources and set(res.sources.values()) == {peer}
    assert len(res.sources) == len(objects)


# ======================================================== 2. agent SIGKILLed mid-upload
def test_agent_sigkill_mid_upload_leaves_nothing_partial(tmp_path: Any, peer_token_file: str) -> None:
    root = str(tmp_path / "agent")
    local = str(tmp_path / "local")
    ns = "killed"
    first = start_agent(root, token_file=peer_token_file)
    try:
        with TcpProxy(first.port) as proxy, mirror([local, proxy.url(ns)], health_interval_s=60) as m:
            peer = proxy.url(ns)
            model, opt = make_state(seed=3)
            snap1 = snapshot(model, opt)
            assert states(m.save(1, model, opt).result(timeout=60)) == {local: "committed", peer: "committed"}

            train(model, opt, seed=4)
            proxy.set("delay", delay_s=0.03)  # ~0.5 s per 1 MiB object: the kill lands mid-stream
            h = m.save(2, model, opt)
            step2 = os.path.join(root, ns, STEP.format(2))
            wait_until(
                lambda: any(f.endswith(".bin") for f in temp_files(step2)) if os.path.isdir(step2) else False,
                20,
                0.005,
                "an object upload in progress",
            )
            first.proc.send_signal(signal.SIGKILL)
            assert first.proc.wait(10) == -signal.SIGKILL

            with pytest.raises(SaveFailedError):
                h.result(timeout=60)
            st = settle(h)
            assert st[local].state == "committed"
            assert st[peer].state == "failed" and isinstance(st[peer].error, OSError), st[peer]
            assert m.health()[peer].startswith("degraded")

        # Nothing partial is visible on the agent's disk: no commit for step 2, and every object
        # under its final name is complete (equal to the local replica's copy of it).
        leftovers = temp_files(step2)
        assert leftovers, "the kill should have left a temp file of the interrupted upload"
        assert not os.path.exists(os.path.join(step2, "COMMIT.json"))
        for rel in files_under(step2):
            if os.path.basename(rel).startswith(".tmp-"):
                continue
            with open(os.path.join(step2, rel), "rb") as a, open(os.path.join(local, STEP.format(2), rel), "rb") as b:
                assert a.read() == b.read(), f"{rel} on the agent is not the complete object"
    finally:
        terminate(first.proc, 5)

    with agent(root, token_file=peer_token_file) as second:
        assert temp_files(root) == [], "leftover temp files must be removed at startup"
        res = restore_from([second.url(ns)], snap1, step=1)
        assert set(res.sources.values()) == {second.url(ns)}
        with mirror([second.url(ns)]) as m:
            assert m.steps() == [1]  # the torn step 2 is not listed


# ============================================ 3. agent down for whole saves, then back
def test_peer_down_at_start_training_goes_on_then_rejoins(tmp_path: Any, peer_token_file: str) -> None:
    port = free_port()
    local, peer = str(tmp_path / "local"), f"peer://{HOST}:{port}/down"
    model, opt = make_state(seed=5)
    with mirror([local, peer], health_interval_s=0.2) as m:
        assert m.health()[peer].startswith("degraded")
        assert m.health()[local] == "ok"
        h1 = m.save(1, model, opt).result(timeout=60)
        assert states(h1) == {local: "committed", peer: "skipped"}
        train(model, opt, seed=6)
        h2 = m.save(2, model, opt)  # no exception: training goes on
        assert states(h2.result(timeout=60))[local] == "committed"
        assert m.health()[peer].startswith("degraded")

        with agent(tmp_path / "agent", token_file=peer_token_file, port=port) as a:
            t0 = time.monotonic()
            wait_until(lambda: m.health()[peer] == "ok", 5, 0.02, "the peer to rejoin")
            assert time.monotonic() - t0 < 2.0, "rejoined only after many heartbeat intervals"
            train(model, opt, seed=7)
            snap3 = snapshot(model, opt)
            h3 = m.save(3, model, opt).result(timeout=60)
            assert states(h3) == {local: "committed", peer: "committed"}
            ns_root = os.path.join(a.root, "down")
            assert os.path.isfile(os.path.join(ns_root, STEP.format(3), "COMMIT.json"))
            assert not os.path.exists(os.path.join(ns_root, STEP.format(1)))
            restore_from([peer], snap3, step=3)


def test_peer_killed_between_saves_is_skipped_then_rejoins(tmp_path: Any, peer_token_file: str) -> None:
    root = tmp_path / "agent"
    local = str(tmp_path / "local")
    a = start_agent(root, token_file=peer_token_file)
    try:
        peer = a.url("between")
        model, opt = make_state(seed=8)
        with mirror([local, peer], health_interval_s=0.2) as m:
            assert states(m.save(1, model, opt).result(timeout=60)) == {local: "committed", peer: "committed"}
            a.proc.kill()
            a.proc.wait(10)
            wait_until(
                lambda: m.health()[peer].startswith("degraded"), 5, 0.02, "the heartbeat to notice the dead peer"
            )
            train(model, opt, seed=9)
            h2 = m.save(2, model, opt).result(timeout=60)
            assert states(h2) == {local: "committed", peer: "skipped"}
            train(model, opt, seed=10)
            m.save(3, model, opt).result(timeout=60)

            with agent(root, token_file=peer_token_file, port=a.port) as back:
                wait_until(lambda: m.health()[peer] == "ok", 5, 0.02, "the peer to rejoin")
                train(model, opt, seed=11)
                h4 = m.save(4, model, opt).result(timeout=60)
                assert states(h4) == {local: "committed", peer: "committed"}
                assert sorted(m.replica_steps()[peer]) == [1, 4]
                assert os.path.isfile(os.path.join(back.root, "between", STEP.format(4), "COMMIT.json"))
    finally:
        terminate(a.proc, 5)


# ===================================================================== 4. authentication
def test_missing_or_wrong_token_is_rejected_and_writes_nothing(peer_agent: AgentProc) -> None:
    body = os.urandom(4096)
    path = "/v1/o/auth/" + okey(1)
    ns_root = os.path.join(peer_agent.root, "auth")

    status, headers, _ = request(peer_agent.port, "PUT", path, body, token=None)
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    status, _, _ = request(peer_agent.port, "PUT", path, body, headers={"Authorization": f"Basic {TOKEN}"}, token=None)
    assert status == 401
    for wrong in ("wrong", TOKEN[:-1], TOKEN + "x", ""):
        status, _, _ = request(peer_agent.port, "PUT", path, body, token=wrong)
        assert status in (401, 403) and (status == 403 or wrong == ""), (wrong, status)
    status, _, _ = request(
        peer_agent.port, "PUT", "/v1/commit/auth/" + STEP.format(1) + "/COMMIT.json", b"{}", token="wrong"
    )
    assert status == 403
    assert request(peer_agent.port, "GET", "/v1/health", token=None)[0] == 401
    assert request(peer_agent.port, "GET", "/v1/steps/auth", token="wrong")[0] == 403
    assert not os.path.exists(ns_root), files_under(ns_root)

    with pytest.raises(ReplicaPermissionError, match="403"):
        PeerReplica(peer_agent.url("auth"), token="wrong", timeout_s=5).put(okey(1), body)
    assert not os.path.exists(ns_root)

    # The same request with the right token is accepted: the rejections above were the token's.
    assert request(peer_agent.port, "PUT", path, body)[0] == 201
    with open(os.path.join(ns_root, STEP.format(1), "rank-00000", "o000000.bin"), "rb") as f:
        assert f.read() == body


def test_refuses_non_loopback_without_token(tmp_path: Any) -> None:
    root = tmp_path / "never"
    proc = subprocess.run(
        serve_command() + ["serve", "--host", "0.0.0.0", "--port", "0", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "listening" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "token" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not root.exists()


# ================================================================ 5. names and symlinks
def _tree(path: str) -> list[str]:
    out = []
    for dirpath, dirs, files in os.walk(path):
        out += [os.path.relpath(os.path.join(dirpath, n), path) for n in dirs + files]
    return sorted(out)


def test_path_traversal_and_bad_names_rejected(peer_agent: AgentProc) -> None:
    base = os.path.dirname(peer_agent.root)  # the agent root's parent: where "../" would land
    for d in ("etc", "outside"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    sentinel = os.path.join(base, "outside", "keep.txt")
    with open(sentinel, "w") as f:
        f.write("SENTINEL-CONTENT")
    outside_before = {p for p in _tree(base) if not p.startswith("root")}
    root_before = files_under(peer_agent.root)
    body = b"evil" * 100

    bad_puts = [
        "/v1/o/tr/../../etc/x",
        "/v1/o/tr/%2e%2e/%2e%2e/etc/x",
        "/v1/o/tr/%2E%2E%2F%2E%2E%2Fetc%2Fx",
        "/v1/o/tr//etc/x",
        "/v1/o//etc/x",
        "/v1/o/tr/%2Fetc%2Fx",
        "/v1/o/tr/a%00b",
        "/v1/o/tr/step%00/x.bin",
        "/v1/o/tr/a\\..\\..\\x",
        "/v1/o/tr/a%5c..%5cx",
        "/v1/o/../x/y",
        "/v1/o/%2e%2e/outside/x",
        "/v1/o/%2e%2e/%2e%2e/x",
        "/v1/o/./x/y",
        "/v1/o/tr/./x",
        "/v1/o/tr/a%2f..%2f..%2f..%2fx",
        "/v1/o/tr/" + "a" * 300 + "/x",
        "/v1/commit/tr/../../etc/COMMIT.json",
        "/v1/commit/%2e%2e/outside/COMMIT.json",
    ]
    for path in bad_puts:
        status, _, text = request(peer_agent.port, "PUT", path, body)
        assert status in (400, 404), (path, status, text)
    for depth in ("0", "-1", "9", "x"):
        status, _, text = request(
            peer_agent.port, "PUT", "/v1/o/tr/x/y", body, headers={"X-Ckptmirror-Namespace-Depth": depth}
        )
        assert status in (400, 404), (depth, status, text)
    for method, path in [
        ("GET", "/v1/o/tr/../../outside/keep.txt"),
        ("GET", "/v1/o/%2e%2e/outside/keep.txt"),
        ("GET", "/v1/steps/%2e%2e"),
        ("GET", "/v1/list/%2e%2e/outside"),
        ("GET", "/v1/list/tr/%2e%2e"),
        ("DELETE", "/v1/o/%2e%2e/outside/keep.txt"),
        ("DELETE", "/v1/prefix/%2e%2e/outside"),
        ("DELETE", "/v1/prefix/tr/%2e%2e%2f%2e%2e%2foutside"),
    ]:
        status, _, text = request(peer_agent.port, method, path)
        assert status in (400, 404), (method, path, status, text)
        assert b"SENTINEL-CONTENT" not in text

    assert {p for p in _tree(base) if not p.startswith("root")} == outside_before
    assert os.listdir(os.path.join(base, "etc")) == []
    with open(sentinel) as f:
        assert f.read() == "SENTINEL-CONTENT"
    assert files_under(peer_agent.root) == root_before, "a rejected request created a file in the root"

    # The client refuses such keys before sending anything.
    with pytest.raises(ManifestError):
        PeerReplica(peer_agent.url("tr"), token=TOKEN).put("../../etc/x", body)
    with pytest.raises((ManifestError, ValueError)):
        PeerReplica(f"peer://{HOST}:{peer_agent.port}/..", token=TOKEN)


@pytest.fixture
def planted(peer_agent: AgentProc, tmp_path: Any) -> Iterator[dict[str, str]]:
    """Symlinks planted in the agent root, each pointing at a directory outside it."""
    out = {k: str(tmp_path / f"outside-{k}") for k in ("ns", "step", "rank", "secret")}
    for d in out.values():
        os.makedirs(d)
    with open(os.path.join(out["secret"], "secret.txt"), "w") as f:
        f.write("TOP-SECRET")
    ns = os.path.join(peer_agent.root, "sym")
    os.makedirs(os.path.join(ns, STEP.format(2)), exist_ok=True)
    os.makedirs(os.path.join(ns, STEP.format(3), "rank-00000"), exist_ok=True)
    os.symlink(out["ns"], os.path.join(peer_agent.root, "evilns"))
    os.symlink(out["step"], os.path.join(ns, STEP.format(1)))
    os.symlink(out["rank"], os.path.join(ns, STEP.format(2), "rank-00000"))
    os.symlink(os.path.join(out["secret"], "secret.txt"), os.path.join(ns, STEP.format(3), "rank-00000", "o000000.bin"))
    os.symlink(out["secret"], os.path.join(ns, STEP.format(4)))
    yield out
    os.unlink(os.path.join(peer_agent.root, "evilns"))
    shutil.rmtree(ns)


def test_symlinks_planted_in_root_are_not_written_through(peer_agent: AgentProc, planted: dict[str, str]) -> None:
    body = os.urandom(10000)
    for path in [
        "/v1/o/evilns/" + okey(1),  # namespace dir is a symlink
        "/v1/commit/evilns/" + STEP.format(1) + "/COMMIT.json",
        "/v1/o/sym/" + okey(1),  # step dir is a symlink
        "/v1/o/sym/" + STEP.format(1) + "/rank-00000.json",
        "/v1/commit/sym/" + STEP.format(1) + "/COMMIT.json",
        "/v1/o/sym/" + okey(2),  # rank dir is a symlink
        "/v1/o/sym/" + STEP.format(4) + "/secret.txt",  # would overwrite the outside file
    ]:
        status, _, text = request(peer_agent.port, "PUT", path, body)
        assert status >= 400, (path, status, text)
    for method, path in [
        ("GET", "/v1/steps/evilns"),
        ("GET", "/v1/o/sym/" + STEP.format(4) + "/secret.txt"),
        ("GET", "/v1/o/sym/" + okey(3)),  # the object itself is a symlink
        ("DELETE", "/v1/o/sym/" + STEP.format(4) + "/secret.txt"),
        ("DELETE", "/v1/prefix/sym/" + STEP.format(4)),
    ]:
        status, _, text = request(peer_agent.port, method, path)
        assert status >= 400, (method, path, status)
        assert b"TOP-SECRET" not in text
    for k in ("ns", "step", "rank"):
        assert os.listdir(planted[k]) == [], f"something was written outside the root through the {k} symlink"
    with open(os.path.join(planted["secret"], "secret.txt")) as f:
        assert f.read() == "TOP-SECRET"
    assert os.listdir(planted["secret"]) == ["secret.txt"]

    # A symlink under an object's final name is replaced by the new object, never written through.
    assert request(peer_agent.port, "PUT", "/v1/o/sym/" + okey(3), body)[0] == 201
    final = os.path.join(peer_agent.root, "sym", STEP.format(3), "rank-00000", "o000000.bin")
    assert not os.path.islink(final)
    with open(final, "rb") as f:
        assert f.read() == body
    with open(os.path.join(planted["secret"], "secret.txt")) as f:
        assert f.read() == "TOP-SECRET"


def test_listing_does_not_follow_a_symlinked_step_dir(peer_agent: AgentProc, planted: dict[str, str]) -> None:
    """GET /v1/list does not follow a step directory planted as a symlink: nothing outside the root is listed."""
    status, _, text = request(peer_agent.port, "GET", "/v1/list/sym/" + STEP.format(4))
    assert not (status == 200 and b"secret.txt" in text), f"the listing reveals a file outside the root: {text!r}"


# ============================================================ 6. sizes, lengths, checksums
def test_oversized_body_413(limited: AgentProc) -> None:
    wait_idle(limited)
    key = "/v1/o/big/" + okey(1)
    s = send_head(
        limited.port,
        "PUT",
        key,
        {"Authorization": f"Bearer {TOKEN}", CSUM: checksum(b"x"), "Content-Length": "2000000"},
    )
    with s:
        assert read_status(s, 5) == 413
    assert (
        request(
            limited.port,
            "PUT",
            "/v1/commit/big/" + STEP.format(1) + "/COMMIT.json",
            headers={"Content-Length": str(300 << 20), CSUM: checksum(b"")},
        )[0]
        == 413
    )
    assert files_under(os.path.join(limited.root, "big")) == []
    # At the limit exactly: accepted.
    body = os.urandom(1_000_000)
    assert request(limited.port, "PUT", key, body)[0] == 201
    assert os.path.getsize(os.path.join(limited.root, "big", STEP.format(1), "rank-00000", "o000000.bin")) == 1_000_000


def test_missing_content_length_411(peer_agent: AgentProc) -> None:
    conn = http.client.HTTPConnection(HOST, peer_agent.port, timeout=10)
    try:
        conn.request(
            "PUT",
            "/v1/o/chunked/" + okey(1),
            body=iter([b"a" * 1000, b"b" * 1000]),
            headers={
                "Authorization": f"Bearer {TOKEN}",
                CSUM: checksum(b"a" * 1000 + b"b" * 1000),
                "Transfer-Encoding": "chunked",
            },
            encode_chunked=True,
        )
        assert conn.getresponse().status == 411
    finally:
        conn.close()
    assert files_under(os.path.join(peer_agent.root, "chunked")) == []


def test_checksum_mismatch_422_and_malformed_400(peer_agent: AgentProc) -> None:
    body = os.urandom(300_000)
    path = "/v1/o/csum/" + okey(1)
    status, _, text = request(peer_agent.port, "PUT", path, body, headers={CSUM: checksum(body + b"!")})
    assert status == 422, text
    for bad in ("", "sha256:00", "xxh3_64:XYZ", checksum(body).upper()):
        status, _, _ = request(peer_agent.port, "PUT", path, body, headers={CSUM: bad})
        assert status == 400, bad
    ns_root = os.path.join(peer_agent.root, "csum")
    assert files_under(ns_root) == []  # no final object, no temp file
    # A body shorter than its Content-Length is not stored either.
    s = send_head(
        peer_agent.port,
        "PUT",
        path,
        {"Authorization": f"Bearer {TOKEN}", CSUM: checksum(body), "Content-Length": str(len(body))},
        body[:1000],
    )
    s.shutdown(socket.SHUT_WR)
    with s:
        read_status(s, 5)
    wait_until(lambda: files_under(ns_root) == [], 5, 0.05, "the truncated upload to be dropped")


@pytest.fixture(scope="module")
def saved_step(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files of one step written to a local replica: key -> bytes; and the saved state."""
    local = str(tmp_path_factory.mktemp("src") / "local")
    model, opt = make_state(seed=12)
    with mirror([local]) as m:
        m.save(1, model, opt).result(timeout=60)
    files = {}
    for rel in files_under(local):
        with open(os.path.join(local, rel), "rb") as f:
            files[rel.replace(os.sep, "/")] = f.read()
    return files, snapshot(model, opt)


def test_commit_only_when_objects_verified_and_only_once(
    peer_agent: AgentProc, saved_step: tuple[dict[str, bytes], dict[str, Any]]
) -> None:
    files, snap = saved_step
    commit_key = STEP.format(1) + "/COMMIT.json"
    manifest_key = next(k for k in files if k.endswith(".json") and k != commit_key)
    objects = sorted(k for k in files if k.endswith(".bin"))
    assert len(objects) >= 4
    r = PeerReplica(peer_agent.url("commit"), token=TOKEN, timeout_s=10)
    ns_root = os.path.join(peer_agent.root, "commit")
    committed = os.path.join(ns_root, commit_key)
    try:
        with pytest.raises(ReplicaError, match="409"):
            r.commit(commit_key, files[commit_key])  # nothing is there
        assert not os.path.exists(committed)

        r.put(manifest_key, files[manifest_key])
        for k in objects[:-1]:
            r.put(k, files[k])
        with pytest.raises(ReplicaError, match="409"):
            r.commit(commit_key, files[commit_key])  # one object missing
        assert not os.path.exists(committed)

        wrong = bytearray(files[objects[-1]])
        wrong[len(wrong) // 2] ^= 0x01
        r.put(objects[-1], bytes(wrong))  # right size, wrong bytes (its own checksum header is right)
        with pytest.raises(ReplicaError, match="409"):
            r.commit(commit_key, files[commit_key])
        assert not os.path.exists(committed)

        r.put(objects[-1], files[objects[-1]])
        r.commit(commit_key, files[commit_key])
        with open(committed, "rb") as f:
            assert f.read() == files[commit_key]

        # A second, different commit record for the step is refused (412 -> StepExistsError);
        # re-sending the identical record is idempotent success.
        doc = json.loads(files[commit_key])
        doc["created_unix"] += 1.0
        other = json.dumps(doc, separators=(",", ":")).encode()
        with pytest.raises(StepExistsError):
            r.commit(commit_key, other)
        status, _, _ = request(peer_agent.port, "PUT", "/v1/commit/commit/" + commit_key, other)
        assert status == 412
        r.commit(commit_key, files[commit_key])
        with open(committed, "rb") as f:
            assert f.read() == files[commit_key]
        assert temp_files(ns_root) == []
    finally:
        r.close()
    restore_from([peer_agent.url("commit")], snap, step=1)


# ========================================================================= 7. slow clients
def test_idle_upload_gets_408_and_leaves_no_temp_file(limited: AgentProc) -> None:
    wait_idle(limited)
    ns_root = os.path.join(limited.root, "idle")
    path = "/v1/o/idle/" + okey(1)
    s = send_head(
        limited.port,
        "PUT",
        path,
        {"Authorization": f"Bearer {TOKEN}", CSUM: checksum(b"x"), "Content-Length": "900000"},
        b"abc",
    )
    with s:
        t0 = time.monotonic()
        wait_until(lambda: temp_files(ns_root), 3, 0.01, "the upload's temp file")
        status = read_status(s, 8)
        elapsed = time.monotonic() - t0
    assert status in (408, None), status
    assert elapsed < 4, f"the idle upload was dropped only after {elapsed:.1f} s (idle timeout 1 s)"
    wait_until(lambda: files_under(ns_root) == [], 3, 0.05, "no temp file and no object")
    wait_idle(limited)


def test_too_many_uploads_503(limited: AgentProc) -> None:
    wait_idle(limited)
    stalled_path = "/v1/o/busy/" + okey(1)
    other_path = "/v1/o/busy/" + okey(2)
    s = send_head(
        limited.port,
        "PUT",
        stalled_path,
        {"Authorization": f"Bearer {TOKEN}", CSUM: checksum(b"x"), "Content-Length": "900000"},
        b"abc",
    )
    with s:
        wait_until(lambda: health(limited)["uploads_in_flight"] == 1, 3, 0.01, "the first upload to be in flight")
        body = os.urandom(5000)
        status, headers, _ = request(limited.port, "PUT", other_path, body)
        assert status == 503 and headers.get("Retry-After")
        assert not os.path.exists(os.path.join(limited.root, "busy", STEP.format(2)))
        assert read_status(s, 8) in (408, None)
    wait_idle(limited, 5)
    assert request(limited.port, "PUT", other_path, body)[0] == 201  # the slot is free again
    assert not any(f.startswith(STEP.format(1)) for f in files_under(os.path.join(limited.root, "busy")))


def test_concurrent_uploads_respect_max_uploads(limited: AgentProc) -> None:
    """A burst of simultaneous uploads cannot get past ``--max-uploads 1``: the agent takes the
    slot in the same step as its 503 check (no await between them). A race there would be lost
    most of the time, so the test sends a few bursts."""
    n = 6
    for burst in range(4):
        wait_idle(limited)
        socks = [socket.create_connection((HOST, limited.port), timeout=10) for _ in range(n)]
        heads = [
            (
                f"PUT /v1/o/burst/{okey(burst + 1, i)} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {TOKEN}\r\n{CSUM}: {checksum(b'x')}\r\nContent-Length: 500000\r\n\r\nabc"
            ).encode()
            for i in range(n)
        ]
        try:
            for s, head in zip(socks, heads):
                s.sendall(head)
            time.sleep(0.2)  # let the agent take all of them in
            in_flight = health(limited)["uploads_in_flight"]
            statuses = [read_status(s, 0.5) for s in socks]  # 503 at once; 0: accepted, still waiting
        finally:
            for s in socks:
                s.close()
        accepted = n - statuses.count(503)
        assert in_flight <= 1 and accepted <= 1, (
            f"burst {burst}: --max-uploads 1 but {in_flight} uploads in flight; statuses {statuses}"
        )
    wait_idle(limited)
    assert [f for f in files_under(os.path.join(limited.root, "burst")) if not f.startswith(".tmp-")] == []


def test_partial_request_head_is_dropped(limited: AgentProc) -> None:
    """A client that sends half a request head is dropped within seconds, not kept for aiohttp's
    keep-alive timeout (3630 s): slow clients cannot hold connections open without bound."""
    s = socket.create_connection((HOST, limited.port), timeout=10)
    with s:
        s.sendall(b"PUT /v1/o/slow/x/y HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        status = read_status(s, 6)
        elapsed = time.monotonic() - t0
    assert status in (400, 408, None) and elapsed < 5, (
        f"connection with a half-sent head still open after {elapsed:.1f} s"
    )


# ======================================================================== 8. free-space reserve
@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory, peer_token_file: str) -> Iterator[AgentProc]:
    """An agent whose free-space reserve no disk can meet: every upload gets 507 at once."""
    base = tmp_path_factory.mktemp("full")
    with agent(base / "root", token_file=peer_token_file, args=["--reserve-free-bytes", str(10**18)]) as a:
        yield a


def test_free_space_reserve_507(full: AgentProc, tmp_path: Any) -> None:
    local = str(tmp_path / "local")
    body = os.urandom(20000)
    status, _, text = request(full.port, "PUT", "/v1/o/full/" + okey(1), body)
    assert status == 507, text
    assert health(full)["reserve_free_bytes"] == 10**18
    model, opt = make_state(seed=13)
    peer = full.url("full")
    with mirror([local, peer], health_interval_s=60) as m:
        h = m.save(1, model, opt)
        with pytest.raises(SaveFailedError):
            h.result(timeout=60)
        st = settle(h)
        assert st[local].state == "committed"
        assert st[peer].state == "failed" and "507" in str(st[peer].error)
    assert files_under(full.root) == []


def test_fast_failing_peer_does_not_fail_the_next_save_while_local_still_writes(full: AgentProc, tmp_path: Any) -> None:
    """A peer that fails fast does not make the next save() raise while another replica of the
    same save is still writing: that replica then commits, the step is durable and training goes on."""
    local = FaultyReplica(LocalReplica(str(tmp_path / "local")), delay_s=0.3)  # a slow local disk
    peer = full.url("fast-fail")
    model, opt = make_state(seed=21)
    with mirror([local, peer], health_interval_s=60) as m:
        h1 = m.save(1, model, opt)
        wait_until(h1.done, 10, 0.005, "the save to fail on the peer")  # not observed: no result()
        assert states(h1)[local.url] == "pending", "precondition: the local replica is still writing"
        train(model, opt, seed=22)
        try:
            h2 = m.save(2, model, opt)
        except SaveFailedError as exc:
            pytest.fail(f"save(2) raised although step 1 commits on the local replica: {exc}")
        assert settle(h1)[local.url].state == "committed"
        assert states(h2.result(timeout=60))[local.url] == "committed"


# ==================================================================== 9. faults on the wire
def test_slow_connection_still_commits(peer_agent: AgentProc, tmp_path: Any) -> None:
    local = str(tmp_path / "local")
    with TcpProxy(peer_agent.port, mode="delay", delay_s=0.004) as proxy:
        peer = proxy.url("slow")
        model, opt = make_state(seed=14)
        snap = snapshot(model, opt)
        with mirror([local, peer]) as m:
            h = m.save(1, model, opt)
            assert h.stall_s < 1.0
            assert states(h.result(timeout=60)) == {local: "committed", peer: "committed"}
        assert proxy.stats.upstream_bytes > h.nbytes
        assert os.path.isfile(os.path.join(peer_agent.root, "slow", STEP.format(1), "COMMIT.json"))
        res = restore_from([peer], snap, step=1)
        assert set(res.sources.values()) == {peer}


def _assert_nothing_partial_visible(ns_root: str, step: int, local: str) -> None:
    """Every object the agent shows for ``step`` is complete: byte for byte the local replica's
    copy (the same save wrote both). Objects that finished before the link broke may be there
    (small objects finish first since objects are cut at tensor boundaries); a half-received one
    never is, and the step has no commit record there."""
    step_root = os.path.join(ns_root, STEP.format(step))
    visible = (
        [f for f in files_under(step_root) if not os.path.basename(f).startswith(".tmp-")]
        if os.path.isdir(step_root)
        else []
    )
    assert "COMMIT.json" not in visible, visible
    local_step = os.path.join(local, STEP.format(step))
    for f in visible:
        with open(os.path.join(step_root, f), "rb") as a, open(os.path.join(local_step, f), "rb") as b:
            assert a.read() == b.read(), f"partial object visible on the agent: {f}"


def test_stalled_connection_fails_peer_fast_and_keeps_training(peer_agent: AgentProc, tmp_path: Any) -> None:
    local = str(tmp_path / "local")
    ns_root = os.path.join(peer_agent.root, "stall")
    with TcpProxy(peer_agent.port, mode="stall", after_bytes=256 << 10) as proxy:
        peer = proxy.url("stall")
        model, opt = make_state(seed=15)
        with mirror([local, peer], peer={"timeout_s": 1}, health_interval_s=60) as m:
            t0 = time.monotonic()
            h = m.save(1, model, opt)
            assert h.stall_s < 0.5, f"save() blocked training for {h.stall_s:.2f} s"
            with pytest.raises(SaveFailedError):
                h.result(timeout=30)
            failed_after = time.monotonic() - t0
            assert proxy.stalled.is_set()
            st = settle(h)
            assert st[local].state == "committed"
            assert st[peer].state == "failed" and isinstance(st[peer].error, OSError), st[peer]
            assert failed_after < 15
            assert m.health()[peer].startswith("degraded")
            _assert_nothing_partial_visible(ns_root, 1, local)

            train(model, opt, seed=16)
            h2 = m.save(2, model, opt)  # no exception; the degraded peer is skipped
            assert h2.stall_s < 0.5
            assert states(h2.result(timeout=30)) == {local: "committed", peer: "skipped"}
        # The agent drops the stalled uploads after its idle timeout (2 s): no temp file stays.
        wait_until(lambda: temp_files(ns_root) == [], 10, 0.05, "the stalled uploads' temp files to be removed")
        _assert_nothing_partial_visible(ns_root, 1, local)


def test_stalled_peer_does_not_hold_the_next_save_for_every_object(peer_agent: AgentProc, tmp_path: Any) -> None:
    """Once the first object put to a stalled peer times out, the save does not wait for every
    other queued put to time out too: the staging buffer (and the next save()) is held for about
    one timeout_s, not ceil(objects / io_threads) * timeout_s."""
    local = str(tmp_path / "local")
    with TcpProxy(peer_agent.port, mode="stall", after_bytes=64 << 10) as proxy:
        peer = proxy.url("stall2")
        model, opt = make_state(seed=17)
        with mirror(
            [local, peer],
            peer={"timeout_s": 1},
            object_bytes=512 << 10,
            io_threads=2,
            health_interval_s=60,
            slow_replica_timeout_s=None,  # the puts' own failure is tested (test_slow_replica.py: the drop)
        ) as m:
            h1 = m.save(1, model, opt)
            train(model, opt, seed=18)
            h2 = m.save(2, model, opt)  # waits for the staging buffer of step 1
            proxy.set("forward")  # the link is back: step 2 can reach the peer
            assert isinstance(h1.exception(timeout=60), SaveFailedError)
            # Save 2 chose its replicas after its wait, which step 1's failure ended: the peer
            # was degraded by then (not written to again until a probe finds it answering).
            assert states(h2.result(timeout=60)) == {local: "committed", peer: "skipped"}
    assert h2.wait_s < 2.5, f"the next save() waited {h2.wait_s:.1f} s for a peer with a 1 s timeout"


def test_reset_connection_fails_peer_and_nothing_partial(peer_agent: AgentProc, tmp_path: Any) -> None:
    local = str(tmp_path / "local")
    ns_root = os.path.join(peer_agent.root, "reset")
    with TcpProxy(peer_agent.port, mode="reset", after_bytes=300 << 10) as proxy:
        peer = proxy.url("reset")
        model, opt = make_state(seed=19)
        with mirror([local, peer], health_interval_s=60) as m:
            t0 = time.monotonic()
            h = m.save(1, model, opt)
            assert h.stall_s < 0.5
            with pytest.raises(SaveFailedError):
                h.result(timeout=30)
            assert time.monotonic() - t0 < 10, "a reset must fail the peer at once, not after a timeout"
            assert proxy.stats.resets >= 1
            st = settle(h)
            assert st[local].state == "committed"
            assert st[peer].state == "failed" and isinstance(st[peer].error, OSError), st[peer]
            assert m.health()[peer].startswith("degraded")
            train(model, opt, seed=20)
            assert states(m.save(2, model, opt).result(timeout=30))[local] == "committed"
    _assert_nothing_partial_visible(ns_root, 1, local)
    wait_until(lambda: temp_files(ns_root) == [], 5, 0.05, "the reset uploads' temp files to be removed")


# ========================================================================= 10. health, SIGTERM
def test_health_endpoint(peer_agent: AgentProc) -> None:
    doc = health(peer_agent)
    assert doc["version"] == ckptmirror.__version__
    assert isinstance(doc["free_bytes"], int) and doc["free_bytes"] > 0
    assert doc["uploads_in_flight"] == 0
    assert PeerReplica(peer_agent.url("h"), token=TOKEN).health()["version"] == ckptmirror.__version__


def test_sigterm_exits_zero_promptly(tmp_path: Any, peer_token_file: str) -> None:
    a = start_agent(tmp_path / "agent", token_file=peer_token_file)
    conn = http.client.HTTPConnection(HOST, a.port, timeout=5)
    try:
        conn.request("GET", "/v1/health", headers={"Authorization": f"Bearer {TOKEN}"})
        assert conn.getresponse().read()  # an idle kept-alive connection stays open
        a.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert a.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
    finally:
        conn.close()
        terminate(a.proc, 1)
    assert '"shutting down"' in a.log()


def test_sigterm_with_a_stalled_upload_exits_promptly(tmp_path: Any, peer_token_file: str) -> None:
    """SIGTERM exits promptly with a stalled upload in flight: shutdown does not wait for the
    handler (aiohttp's 60 s shutdown timeout) nor for the upload's idle timeout, and the upload's
    temp file is removed."""
    a = start_agent(tmp_path / "agent", token_file=peer_token_file, args=["--idle-timeout-s", "20"])
    try:
        s = send_head(
            a.port,
            "PUT",
            "/v1/o/term/" + okey(1),
            {"Authorization": f"Bearer {TOKEN}", CSUM: checksum(b"x"), "Content-Length": "900000"},
            b"abc",
        )
        with s:
            wait_until(lambda: temp_files(a.root), 3, 0.01, "the upload's temp file")
            a.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            try:
                code = a.proc.wait(6)
            except subprocess.TimeoutExpired:
                code = None
            elapsed = time.monotonic() - t0
    finally:
        terminate(a.proc, 1)
    assert code == 0 and elapsed < 5, f"SIGTERM with a stalled upload: exit {code} after {elapsed:.1f} s"
    assert temp_files(a.root) == []


def test_a_client_that_stops_reading_a_download_is_dropped(tmp_path: Any, peer_token_file: str) -> None:
    """A GET whose client never reads held the agent's chunk, descriptor and connection for
    good (100 such clients: +1.2 GB of agent memory, a fault-proxy campaign found). The agent
    gives each chunk --idle-timeout-s, then closes the connection: the client gets part of the
    object and then the end of the stream, not the whole object once it reads again."""
    size = 24 << 20  # far more than the socket buffers on both sides hold
    with agent(tmp_path / "root", token_file=peer_token_file, args=["--idle-timeout-s", "1"]) as a:
        r = PeerReplica(a.url("slow"), token=TOKEN)
        key = okey(1, 0)
        r.put(key, os.urandom(size))
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        s.connect((HOST, a.port))
        try:
            s.sendall(f"GET /v1/o/slow/{key} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
            time.sleep(4)  # reads nothing for 4 x --idle-timeout-s
            s.settimeout(10)
            got = 0
            while True:
                try:
                    chunk = s.recv(1 << 20)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += len(chunk)
        finally:
            s.close()
        assert got < size, f"the agent waited for the client and sent all {got} bytes"
        assert r.get(key, size) is not None  # other clients are served as before
