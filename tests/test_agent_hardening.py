"""The peer agent's holes from issue 11, closed (items 3, 4 and the agent part of 6).

- Commit records are written only through ``PUT /v1/commit/`` (verified, create-if-absent):
  ``PUT /v1/o/`` refuses any name with a ``COMMIT.json`` segment, so a commit can be neither
  forged (an unverifiable record with a matching checksum header) nor replaced.
- Names (any segment) starting with ``.`` are the agent's own (temp files of uploads in
  progress): every route refuses them, and listings never show them, so nobody reads another
  upload's partial bytes or deletes its temp file from under it.
- A minimum upload rate: clients trickling a byte a second held every upload slot for as long
  as they liked (the idle timeout bounds one read, and a byte a second never trips it). Now
  they are cut after the rate window, their temp files removed and their slots freed.
- Per-namespace tokens (``--namespace-token PREFIX=FILE``): one job's token cannot read, write,
  list or delete another job's namespace; the ``--token-file`` token is the admin token.

Every test runs real ``ckptmirror serve`` processes (``tests/_agent.py``) on 127.0.0.1 and talks
to them with raw HTTP (http.client, sockets) as a hostile client would, or through the library.
Each is bounded in time by socket timeouts and ``wait_until`` deadlines.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _agent import HOST, TOKEN, AgentProc, agent, files_under, raw_request, temp_files, wait_until, write_token

import ckptmirror
from ckptmirror.checksum import checksum
from ckptmirror.errors import ReplicaPermissionError
from ckptmirror.replicas._peer_protocol import WRONG_NAMESPACE_TEXT, WRONG_TOKEN_TEXT
from ckptmirror.replicas.peer import TOKEN_ENV, PeerReplica
from ckptmirror.replicas.peer_agent import UploadPace

CSUM = "X-Ckptmirror-Checksum"
DEPTH = "X-Ckptmirror-Namespace-Depth"
STEP1 = "step-000000000001"
#: The rate rule of the ``paced`` agent: 1000 bytes/s over windows of 2 s (the first is the grace).
MIN_RATE, WINDOW_S = 1000, 2.0
TOKEN_A, TOKEN_B, TOKEN_T = "token-of-job-a-0123456789", "token-of-job-b-9876543210", "token-of-team-x-555"


@pytest.fixture(autouse=True)
def _no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A token in the developer's environment must not reach the clients (or agents) by accident.
    monkeypatch.delenv(TOKEN_ENV, raising=False)


# ------------------------------------------------------------------------------ raw HTTP
def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    token: str | None = TOKEN,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, bytes]:
    """(status, body) of one request (see :func:`_agent.raw_request`)."""
    status, _, data = raw_request(port, method, path, body, token=token, headers=headers, timeout=timeout)
    return status, data


def start_upload(port: int, path: str, length: int, first: bytes, token: str = TOKEN) -> socket.socket:
    """A raw PUT whose head and first body bytes are sent; the caller sends the rest (or not)."""
    s = socket.create_connection((HOST, port), timeout=10)
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"{CSUM}: {checksum(b'x')}\r\nContent-Length: {length}\r\n\r\n"
    )
    s.sendall(head.encode() + first)
    return s


def read_status(s: socket.socket, timeout: float) -> int | None:
    """The status of the answer on ``s``; None if the agent closed without one; 0 if it neither
    answered nor closed within ``timeout`` seconds."""
    s.settimeout(timeout)
    buf = b""
    while b"\r\n" not in buf:
        try:
            chunk = s.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return None
        except TimeoutError:
            return 0
        if not chunk:
            return None
        buf += chunk
    return int(buf.split(b" ", 2)[1])


def health(a: AgentProc) -> dict[str, Any]:
    status, body = request(a.port, "GET", "/v1/health")
    assert status == 200, body
    return dict(json.loads(body))


def log_lines(a: AgentProc) -> list[dict[str, Any]]:
    """The agent's JSON log lines so far."""
    return [json.loads(line) for line in a.log().splitlines() if line.startswith("{")]


def okey(step: int, index: int = 0) -> str:
    return f"step-{step:012d}/rank-00000/o{index:06d}.bin"


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_token(tmp_path_factory.mktemp("token") / "token")


@pytest.fixture(scope="module")
def paced(tmp_path_factory: pytest.TempPathFactory, token_file: str) -> Iterator[AgentProc]:
    """An agent with a fast rate rule (1000 bytes/s over 2 s windows), a long idle timeout (so
    that only the rate rule can cut a trickling client), 16 upload slots (the default)."""
    args = [
        "--reserve-free-bytes",
        "0",
        "--idle-timeout-s",
        "30",
        "--min-upload-bytes-per-s",
        str(MIN_RATE),
        "--upload-rate-window-s",
        str(WINDOW_S),
    ]
    with agent(tmp_path_factory.mktemp("paced") / "root", token_file=token_file, args=args) as a:
        yield a


def _ns_token_args(base: Path) -> list[str]:
    out = []
    for prefix, token in (("job-a", TOKEN_A), ("job-b", TOKEN_B), ("teams/x", TOKEN_T)):
        out += ["--namespace-token", f"{prefix}={write_token(base / (prefix.replace('/', '_') + '.token'), token)}"]
    return out


@pytest.fixture(scope="module")
def scoped(tmp_path_factory: pytest.TempPathFactory, token_file: str) -> Iterator[AgentProc]:
    """Namespace tokens for ``job-a``, ``job-b`` and ``teams/x``, and the admin token ``TOKEN``."""
    base = tmp_path_factory.mktemp("scoped")
    args = ["--reserve-free-bytes", "0", *_ns_token_args(base)]
    with agent(base / "root", token_file=token_file, args=args) as a:
        yield a


@pytest.fixture(scope="module")
def scoped_no_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    """Namespace tokens only: no admin token at all."""
    base = tmp_path_factory.mktemp("scoped-no-admin")
    args = ["--reserve-free-bytes", "0", *_ns_token_args(base)]
    with agent(base / "root", token_file=None, args=args) as a:
        yield a


def small_state() -> dict[str, Any]:
    return {"w": torch.arange(4096, dtype=torch.float32), "epoch": 3}


def save_step(url: str, token: str, step: int = 1) -> None:
    """Save ``small_state()`` as ``step`` to the peer ``url`` alone, and check it committed."""
    with ckptmirror.Mirror([url], storage_options={"peer": {"token": token, "timeout_s": 10}}) as m:
        h = m.save_state(step, small_state()).result(timeout=60)
    assert h.replicas[url].state == "committed", h.replicas


def load(url: str, token: str) -> dict[str, Any]:
    """The newest step's state on the peer ``url`` (step 1 expected)."""
    with ckptmirror.Mirror([url], storage_options={"peer": {"token": token, "timeout_s": 10}}) as m:
        res = m.load_state()
    assert res is not None and res[0] == 1, res
    return dict(res[1])


# ============================================================ 1. commit records, dot names
def test_commit_record_cannot_be_forged_or_replaced_through_the_object_route(paced: AgentProc) -> None:
    ns = fresh("forge")
    url = f"{paced.url_base}/{ns}"
    ns_root = os.path.join(paced.root, ns)
    commit_path = os.path.join(ns_root, STEP1, "COMMIT.json")

    # Before anything is committed: an unverifiable record with a matching checksum header.
    forged = json.dumps({"kind": "ckptmirror.commit", "step": 1, "world_size": 1, "ranks": []}).encode()
    status, text = request(paced.port, "PUT", f"/v1/o/{ns}/{STEP1}/COMMIT.json", forged)
    assert status == 400 and b"/v1/commit/" in text, (status, text)
    assert not os.path.exists(ns_root), files_under(ns_root)

    # A real, verified commit; then try to replace it, and to block a later step's commit with a
    # directory named like a commit record.
    save_step(url, TOKEN)
    with open(commit_path, "rb") as f:
        genuine = f.read()
    for path in (
        f"/v1/o/{ns}/{STEP1}/COMMIT.json",
        f"/v1/o/{ns}/step-000000000002/COMMIT.json/x",
    ):
        status, text = request(paced.port, "PUT", path, forged)
        assert status == 400 and b"commit records" in text, (path, status, text)
    # With a deeper namespace split the key still ends in COMMIT.json: still refused.
    status, _ = request(paced.port, "PUT", f"/v1/o/{ns}/{STEP1}/COMMIT.json", forged, headers={DEPTH: "2"})
    assert status == 400
    with open(commit_path, "rb") as f:
        assert f.read() == genuine
    assert not os.path.exists(os.path.join(ns_root, "step-000000000002"))
    # The verified route still refuses to replace it (412), and the step still restores.
    assert request(paced.port, "PUT", f"/v1/commit/{ns}/{STEP1}/COMMIT.json", forged)[0] in (400, 409, 412)
    got = load(url, TOKEN)
    assert torch.equal(got["w"], small_state()["w"])


@pytest.mark.parametrize(
    "name",
    [
        ".hidden",
        f"{STEP1}/.tmp-0123456789abcdef0123456789abcdef-o000000.bin",
        f"{STEP1}/rank-00000/.x.bin",
        f".{STEP1}/rank-00000/o000000.bin",
    ],
)
def test_dot_names_are_refused_on_every_route(paced: AgentProc, name: str) -> None:
    ns = fresh("dot")
    before = files_under(paced.root)
    body = b"dot-name-body" * 10
    for method, path, data in [
        ("PUT", f"/v1/o/{ns}/{name}", body),
        ("PUT", f"/v1/commit/{ns}/{name}", body),
        ("GET", f"/v1/o/{ns}/{name}", None),
        ("HEAD", f"/v1/o/{ns}/{name}", None),
        ("DELETE", f"/v1/o/{ns}/{name}", None),
        ("GET", f"/v1/list/{ns}/{name}", None),
        ("DELETE", f"/v1/prefix/{ns}/{name}", None),
        # A namespace starting with a dot is refused too.
        ("PUT", f"/v1/o/.{ns}/{okey(1)}", body),
        ("GET", f"/v1/steps/.{ns}", None),
        ("GET", f"/v1/list/.{ns}/{STEP1}", None),
    ]:
        status, text = request(paced.port, method, path, data)
        assert status == 400, (method, path, status, text)
        if method != "HEAD":
            assert b"starting with '.'" in text, (method, path, text)
    assert files_under(paced.root) == before, "a refused request changed the agent's root"


def test_another_uploads_temp_file_cannot_be_read_listed_or_deleted(paced: AgentProc) -> None:
    """The partial bytes of an upload in progress stay invisible, and refusing to delete its temp
    file leaves that upload intact: it completes once the rest of its body arrives."""
    ns = fresh("partial")
    ns_root = os.path.join(paced.root, ns)
    sibling = os.urandom(3000)
    assert request(paced.port, "PUT", f"/v1/o/{ns}/{okey(1, 1)}", sibling)[0] == 201

    secret = b"PARTIAL-SECRET-" * 20  # 300 bytes, well above the rate rule's first window
    full = secret + os.urandom(700)
    s = socket.create_connection((HOST, paced.port), timeout=10)
    with s:
        head = (
            f"PUT /v1/o/{ns}/{okey(1, 0)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"{CSUM}: {checksum(full)}\r\nContent-Length: {len(full)}\r\n\r\n"
        )
        s.sendall(head.encode() + secret)
        tmp = wait_until(lambda: temp_files(ns_root), 5, 0.01, "the upload's temp file")[0].replace(os.sep, "/")
        wait_until(lambda: os.path.getsize(os.path.join(ns_root, tmp)) == len(secret), 5, 0.01, "partial bytes on disk")

        status, text = request(paced.port, "GET", f"/v1/o/{ns}/{tmp}")
        assert status == 400 and b"PARTIAL-SECRET" not in text, (status, text)
        status, _ = request(paced.port, "GET", f"/v1/o/{ns}/{tmp}", headers={"Range": "bytes=0-9"})
        assert status == 400
        assert request(paced.port, "HEAD", f"/v1/o/{ns}/{tmp}")[0] == 400
        for prefix in (STEP1, f"{STEP1}/rank-00000"):
            status, listing = request(paced.port, "GET", f"/v1/list/{ns}/{prefix}")
            assert status == 200 and json.loads(listing) == [okey(1, 1)], listing
        assert PeerReplica(f"{paced.url_base}/{ns}", token=TOKEN).list_prefix(STEP1) == [okey(1, 1)]
        assert request(paced.port, "DELETE", f"/v1/o/{ns}/{tmp}")[0] == 400
        assert os.path.exists(os.path.join(ns_root, tmp)), "a refused DELETE removed the temp file"

        s.sendall(full[len(secret) :])
        assert read_status(s, 10) == 201
    status, got = request(paced.port, "GET", f"/v1/o/{ns}/{okey(1, 0)}")
    assert status == 200 and got == full
    assert temp_files(ns_root) == []


# ========================================================================= 2. slow uploads
def _trickle(socks: list[socket.socket], stop: threading.Event, every_s: float) -> None:
    """Send one byte to every socket each ``every_s`` seconds until ``stop`` (or all are closed)."""
    alive = list(socks)
    while alive and not stop.wait(every_s):
        for s in list(alive):
            try:
                s.sendall(b"x")
            except OSError:
                alive.remove(s)  # cut by the agent


def test_trickling_clients_are_cut_and_their_slots_freed(paced: AgentProc) -> None:
    """Issue 11 item 4: 16 clients sending 1 byte per second held every slot for over 60 s and a
    legitimate upload got 503. Now they are cut one rate window after they start (the grace
    period), and the legitimate upload goes through."""
    ns = fresh("slowloris")
    ns_root = os.path.join(paced.root, ns)
    wait_until(lambda: health(paced)["uploads_in_flight"] == 0, 10, 0.05, "no upload in flight")
    slots = 16  # the agent's --max-uploads (the default)
    socks = [start_upload(paced.port, f"/v1/o/{ns}/{okey(1, i)}", 100_000, b"x") for i in range(slots)]
    stop = threading.Event()
    feeder = threading.Thread(target=_trickle, args=(socks, stop, 1.0), daemon=True)
    try:
        t0 = time.monotonic()
        wait_until(lambda: health(paced)["uploads_in_flight"] == slots, 5, 0.02, "every slot to be taken")
        feeder.start()
        body = os.urandom(50_000)
        legit = f"/v1/o/{ns}/{okey(2)}"
        status, _ = request(paced.port, "PUT", legit, body)
        assert status == 503, "the slots were not all taken: the test would show nothing"

        def accepted() -> bool:
            return request(paced.port, "PUT", legit, body)[0] == 201

        wait_until(accepted, WINDOW_S + 6, 0.2, "the legitimate upload to be accepted")
        elapsed = time.monotonic() - t0
        assert elapsed < WINDOW_S + 6, f"the legitimate upload waited {elapsed:.1f} s"

        # Each was told why (the agent drains their trickle instead of resetting the connection,
        # which would discard the answer).
        statuses = [read_status(s, 10) for s in socks]
        assert statuses == [408] * slots, statuses
    finally:
        stop.set()
        if feeder.is_alive():
            feeder.join(5)
        for s in socks:
            s.close()

    wait_until(lambda: health(paced)["uploads_in_flight"] == 0, 5, 0.05, "every slot to be free")
    # Nothing partial is visible or left behind: the legitimate object only.
    wait_until(lambda: temp_files(ns_root) == [], 5, 0.05, "the cut uploads' temp files to be removed")
    assert [f.replace(os.sep, "/") for f in files_under(ns_root)] == [okey(2)]
    for i in range(slots):
        assert request(paced.port, "HEAD", f"/v1/o/{ns}/{okey(1, i)}")[0] == 404
    status, listing = request(paced.port, "GET", f"/v1/list/{ns}/{STEP1}")
    assert status in (200, 404) and (status == 404 or json.loads(listing) == [])
    cuts = [d for d in log_lines(paced) if d.get("msg") == "upload too slow, cut" and d.get("ns") == ns]
    assert len(cuts) == slots, cuts
    assert all(d["window_bytes"] < MIN_RATE * WINDOW_S and d["received"] < 10 for d in cuts), cuts


def test_slow_but_steady_upload_above_the_minimum_completes(paced: AgentProc) -> None:
    """An upload slower than the network allows but above the minimum rate spans several windows
    and completes; the last window needs only the rest of the body."""
    ns = fresh("steady")
    body = os.urandom(3 * 1500 * 4 + 100)  # ~6 s at 3000 bytes/s: three windows, the last one short
    s = socket.create_connection((HOST, paced.port), timeout=10)
    with s:
        head = (
            f"PUT /v1/o/{ns}/{okey(1)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"{CSUM}: {checksum(body)}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        s.sendall(head.encode())
        t0 = time.monotonic()
        for pos in range(0, len(body), 1500):
            s.sendall(body[pos : pos + 1500])
            time.sleep(0.5)
        assert read_status(s, 10) == 201
        assert time.monotonic() - t0 > 2 * WINDOW_S  # it did span more than the grace window
    status, got = request(paced.port, "GET", f"/v1/o/{ns}/{okey(1)}")
    assert status == 200 and got == body


def test_upload_pace_rule() -> None:
    """The rule itself: judged only at the end of each window (the first is the grace period),
    against the minimum or the rest of the body, whichever is less; 0 turns it off."""
    p = UploadPace(1000, 2.0, 10_000)
    assert p.time_left() == 2.0
    assert p.record(1.9, 0)  # nothing yet, but the grace window has not ended
    assert not p.record(0.2, 1999)  # window over with 1999 < 2000 bytes
    p = UploadPace(1000, 2.0, 10_000)
    assert p.record(2.0, 2000) and p.time_left() == 2.0 and p.left == 8000  # the next window starts
    assert p.record(2.5, 2000)
    p = UploadPace(1000, 2.0, 2500)
    assert p.record(2.0, 2000) and p.record(2.0, 500)  # the tail needs only its 500 bytes
    off = UploadPace(0, 2.0, 10_000)
    assert off.record(1e6, 0) and off.time_left() == float("inf")


# ========================================================================= 3. namespace tokens
def _every_route(ns: str, body: bytes, depth: int = 1) -> list[tuple[str, str, bytes | None, dict[str, str]]]:
    """(method, path, body, headers) of every namespaced route on ``ns``."""
    h = {DEPTH: str(depth)}
    return [
        ("PUT", f"/v1/o/{ns}/{okey(1)}", body, h),
        ("GET", f"/v1/o/{ns}/{okey(1)}", None, h),
        ("HEAD", f"/v1/o/{ns}/{okey(1)}", None, h),
        ("GET", f"/v1/list/{ns}/{STEP1}", None, h),
        ("GET", f"/v1/steps/{ns}", None, h),
        ("PUT", f"/v1/commit/{ns}/{STEP1}/COMMIT.json", b"{}", h),
        ("DELETE", f"/v1/o/{ns}/{okey(1)}", None, h),
        ("DELETE", f"/v1/prefix/{ns}/{STEP1}", None, h),
    ]


def _assert_denied(a: AgentProc, ns: str, token: str | None, depth: int = 1) -> None:
    """Every route on ``ns`` with ``token`` is refused (401 without one, 403 with one)."""
    for method, path, data, headers in _every_route(ns, b"intruder" * 64, depth):
        status, text = request(a.port, method, path, data, token=token, headers=headers)
        expect = 401 if token is None else 403
        assert status == expect, (token, method, path, status, text)


def _plant(a: AgentProc, ns: str) -> bytes:
    """An object ``okey(1)`` in ``ns``, written straight to the agent's disk (a victim's data)."""
    body = os.urandom(2000)
    path = os.path.join(a.root, *ns.split("/"), *okey(1).split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(body)
    return body


def test_namespace_tokens_confine_each_job_to_its_namespace(scoped: AgentProc) -> None:
    bodies = {ns: _plant(scoped, ns) for ns in ("job-a", "job-b")}
    before = {ns: files_under(os.path.join(scoped.root, ns)) for ns in bodies}
    # Both directions: A on B, B on A; and neither on a name that merely starts like theirs.
    for token, other in ((TOKEN_A, "job-b"), (TOKEN_B, "job-a"), (TOKEN_A, "job-ab"), (TOKEN_T, "teams/y")):
        status, text = request(scoped.port, "GET", f"/v1/steps/{other}", token=token)
        assert status == 403 and text.decode().startswith(WRONG_NAMESPACE_TEXT), (status, text)
        _assert_denied(scoped, other, token, depth=len(other.split("/")))
    for ns, body in bodies.items():
        assert files_under(os.path.join(scoped.root, ns)) == before[ns], "a refused request changed " + ns
        with open(os.path.join(scoped.root, ns, *okey(1).split("/")), "rb") as f:
            assert f.read() == body
    assert not os.path.exists(os.path.join(scoped.root, "job-ab"))
    # "job-a/../job-b" must not pass as a namespace under job-a.
    status, _ = request(scoped.port, "GET", f"/v1/o/job-a/%2e%2e/job-b/{okey(1)}", token=TOKEN_A, headers={DEPTH: "3"})
    assert status in (400, 403, 404), status

    # Each token works on its own namespace and below it, on every route.
    for token, ns, depth in ((TOKEN_A, "job-a", 1), (TOKEN_B, "job-b", 1), (TOKEN_A, "job-a/node3", 2)):
        body = os.urandom(1000)
        h = {DEPTH: str(depth)}
        assert request(scoped.port, "PUT", f"/v1/o/{ns}/{okey(2)}", body, token=token, headers=h)[0] == 201
        assert request(scoped.port, "GET", f"/v1/o/{ns}/{okey(2)}", token=token, headers=h) == (200, body)
        assert request(scoped.port, "GET", f"/v1/steps/{ns}", token=token)[0] == 200
        assert request(scoped.port, "GET", f"/v1/list/{ns}/step-000000000002", token=token, headers=h)[0] == 200
        assert request(scoped.port, "DELETE", f"/v1/o/{ns}/{okey(2)}", token=token, headers=h)[0] == 204
        # A commit reaches the record's check (400: "{}" is not a commit record), not a 403.
        status, text = request(
            scoped.port, "PUT", f"/v1/commit/{ns}/{STEP1}/COMMIT.json", b"{}", token=token, headers=h
        )
        assert status == 400 and b"ManifestError" in text, (status, text)
    # A nested prefix: teams/x's token on teams/x/..., and on nothing else.
    assert request(scoped.port, "GET", "/v1/steps/teams/x/run1", token=TOKEN_T)[0] == 200
    assert request(scoped.port, "GET", "/v1/steps/teams", token=TOKEN_T)[0] == 403
    # Any known token may read the health document (it names no namespace); unknown ones may not.
    assert request(scoped.port, "GET", "/v1/health", token=TOKEN_A)[0] == 200
    status, text = request(scoped.port, "GET", "/v1/steps/job-a", token="not-a-token")
    assert status == 403 and text.decode() == WRONG_TOKEN_TEXT
    _assert_denied(scoped, "job-a", None)


def test_admin_token_reaches_every_namespace(scoped: AgentProc) -> None:
    """The ``--token-file`` token stays valid everywhere: on each job's namespace and on one that
    no namespace token covers (which no namespace token may reach)."""
    for ns in ("job-a", "job-b", "unscoped"):
        body = os.urandom(1500)
        assert request(scoped.port, "PUT", f"/v1/o/{ns}/{okey(3)}", body)[0] == 201
        assert request(scoped.port, "GET", f"/v1/o/{ns}/{okey(3)}") == (200, body)
        assert request(scoped.port, "DELETE", f"/v1/o/{ns}/{okey(3)}")[0] == 204
    for token in (TOKEN_A, TOKEN_B, TOKEN_T):
        _assert_denied(scoped, "unscoped", token)


def test_without_an_admin_token_only_namespace_tokens_open_anything(scoped_no_admin: AgentProc) -> None:
    a = scoped_no_admin
    body = os.urandom(1000)
    assert request(a.port, "PUT", f"/v1/o/job-a/{okey(1)}", body, token=TOKEN_A)[0] == 201
    assert request(a.port, "GET", f"/v1/o/job-a/{okey(1)}", token=TOKEN_A) == (200, body)
    _assert_denied(a, "job-a", TOKEN_B)
    _assert_denied(a, "job-b", TOKEN_A)
    for token in (TOKEN_A, TOKEN_B, TOKEN, None):
        _assert_denied(a, "unscoped", token)  # no namespace token covers it, and there is no admin
    assert request(a.port, "GET", "/v1/health", token=None)[0] == 401
    assert not os.path.exists(os.path.join(a.root, "unscoped"))


def test_library_with_namespace_tokens(scoped: AgentProc) -> None:
    """Through the library: job A saves and restores with its token; with job A's token, a Mirror
    on job B's namespace fails at construction with a permission error (not an outage)."""
    url_a = f"{scoped.url_base}/job-a/{fresh('run')}"
    save_step(url_a, TOKEN_A)
    assert torch.equal(load(url_a, TOKEN_A)["w"], small_state()["w"])
    assert torch.equal(load(url_a, TOKEN)["w"], small_state()["w"])  # the admin reads it too
    url_b = f"{scoped.url_base}/job-b/{fresh('run')}"
    with pytest.raises(ReplicaPermissionError, match="403"):
        ckptmirror.Mirror([url_b], storage_options={"peer": {"token": TOKEN_A, "timeout_s": 10}})
    with pytest.raises(ReplicaPermissionError):
        PeerReplica(url_b, token=TOKEN_A, timeout_s=10).list_steps()


# ======================================================================= 4. serve options
def run_serve(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    return subprocess.run(
        [sys.executable, "-m", "ckptmirror", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
    )


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--min-upload-bytes-per-s", "-1"], ["--min-upload-bytes-per-s"]),
        (["--upload-rate-window-s", "0"], ["--upload-rate-window-s"]),
        (["--namespace-token", "job-a"], ["--namespace-token", "PREFIX=FILE"]),
        (["--namespace-token", "job-a=/nonexistent/token"], ["--namespace-token", "/nonexistent/token"]),
        (["--namespace-token", ".hidden=TOKENFILE"], ["--namespace-token", ".hidden"]),
        (["--namespace-token", "a/../b=TOKENFILE"], ["--namespace-token", "a/../b"]),
        (["--namespace-token", "a=TOKENFILE", "--namespace-token", "a=TOKENFILE"], ["twice"]),
    ],
)
def test_bad_serve_options_are_usage_errors(
    extra: list[str], needles: list[str], tmp_path: Path, token_file: str
) -> None:
    root = tmp_path / "never"
    args = [a.replace("TOKENFILE", token_file) for a in extra]
    p = run_serve(["--root", str(root), "--port", "0", *args])
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "listening" not in p.stdout, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not root.exists()


def test_help_documents_the_new_options() -> None:
    p = run_serve(["--help"])
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    for needle in (
        "--namespace-token PREFIX=FILE",
        "admin token",
        "--min-upload-bytes-per-s",
        "--upload-rate-window-s",
        "grace period",
        "default 65536",
    ):
        assert needle in text, (needle, text)
