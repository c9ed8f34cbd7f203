"""A peer agent whose disk fills up: on a real (small, tmpfs) filesystem, with real agents.

What must hold: the free-space reserve counts the uploads already admitted (two that fit only one
at a time are not both admitted) and gives their bytes back however they end; a disk that fills
anyway answers 507 (not 500) with the root, the free space and the fix, and leaves no temp file;
the client reads a 507 as ENOSPC, and its ``probe_write`` keeps a full peer degraded until there
is room again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _agent import HOST, TOKEN, AgentProc, TcpProxy, agent, raw_request, temp_files, wait_until
from _helpers import fill_disk, small_tmpfs

from ckptmirror.checksum import checksum
from ckptmirror.errors import ReplicaError
from ckptmirror.health import ReplicaHealth
from ckptmirror.replicas import _peer_protocol as wire
from ckptmirror.replicas.peer import PeerReplica
from ckptmirror.replicas.peer_agent import SpaceLedger

pytestmark = pytest.mark.usefixtures("no_peer_token_env")

MIB = 1 << 20
DISK_BYTES = 16 * MIB
CSUM = "X-Ckptmirror-Checksum"


def okey(step: int, index: int = 0) -> str:
    return f"step-{step:012d}/rank-00000/o{index:06d}.bin"


# ----------------------------------------------------------------------------- fixtures
StartAgent = Callable[..., AgentProc]


@pytest.fixture
def full_agent(tmp_path: os.PathLike[str], peer_token_file: str) -> Iterator[StartAgent]:
    """Start an agent whose root is a fresh 16 MiB tmpfs (its log next to it, not on it: the log
    would eat the space the test measures). Stopped, then unmounted, at teardown."""
    with contextlib.ExitStack() as stack:

        def start(*args: str) -> AgentProc:
            root = stack.enter_context(small_tmpfs(os.path.join(os.fspath(tmp_path), "disk"), DISK_BYTES >> 20))
            base = ["--reserve-free-bytes", "0", "--idle-timeout-s", "20", "--upload-rate-window-s", "30"]
            # Flags given later win: a test's own args override the defaults above.
            return stack.enter_context(agent(root, token_file=peer_token_file, args=[*base, *args]))

        yield start


def health(a: AgentProc) -> dict[str, Any]:
    status, _, body = raw_request(a.port, "GET", "/v1/health")
    assert status == 200, body
    return dict(json.loads(body))


def start_upload(port: int, key: str, body: bytes, sent: int, ns: str = "ns") -> socket.socket:
    """A raw upload of ``body`` as ``ns/key`` with only its first ``sent`` bytes sent (the rest
    follows with ``sock.sendall``)."""
    s = socket.create_connection((HOST, port), timeout=10)
    head = (
        f"PUT /v1/o/{ns}/{key} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"{CSUM}: {checksum(body)}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    s.sendall(head.encode() + body[:sent])
    return s


def read_response(s: socket.socket, timeout: float) -> tuple[int, str]:
    """(status, body) of the answer on ``s``; (0, "") if none came within ``timeout`` seconds."""
    s.settimeout(timeout)
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return (0, "") if not buf else (int(buf.split(b" ", 2)[1]), "")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    except TimeoutError:
        return 0, ""
    return int(buf.split(b" ", 2)[1]), rest.decode("utf-8", "replace")


def send_rest(s: socket.socket, body: bytes, sent: int) -> None:
    """Send the rest of a raw upload; the agent may have answered (and stopped reading) already."""
    with contextlib.suppress(OSError):
        s.sendall(body[sent:])


def wait_admitted(a: AgentProc, uploads: int = 1) -> dict[str, Any]:
    return wait_until(
        lambda: (h := health(a))["uploads_in_flight"] == uploads and h.get(wire.RESERVED_BYTES_FIELD, 0) > 0 and h,
        10,
        0.02,
        f"{uploads} upload(s) to be admitted",
    )


def wait_released(a: AgentProc) -> dict[str, Any]:
    return wait_until(
        lambda: (h := health(a))["uploads_in_flight"] == 0 and h.get(wire.RESERVED_BYTES_FIELD) == 0 and h,
        30,
        0.05,
        "the agent to hold no upload and no reserved bytes",
    )


# ===================================================================== (a) in-flight reservation
def test_two_uploads_that_fit_only_one_at_a_time_are_not_both_admitted(full_agent: StartAgent) -> None:
    a = full_agent()
    body_a, body_b = os.urandom(10 * MIB), os.urandom(10 * MIB)  # 16 MiB disk: each fits, not both
    sa = start_upload(a.port, okey(1, 0), body_a, 64 << 10)
    try:
        h = wait_admitted(a)
        assert 0 < h[wire.RESERVED_BYTES_FIELD] <= len(body_a), h
        sb = start_upload(a.port, okey(1, 1), body_b, 0)
        with sb:
            status, text = read_response(sb, 10)
        assert status == 507, f"the second upload was admitted while the first still had {h} to write: {text!r}"
        assert "uploads in flight" in text and a.root in text and "ckptmirror prune" in text, text
        send_rest(sa, body_a, 64 << 10)
        status, text = read_response(sa, 30)
        assert status == 201, text
    finally:
        sa.close()
    wait_released(a)
    assert temp_files(a.root) == []
    status, _, got = raw_request(a.port, "GET", f"/v1/o/ns/{okey(1, 0)}", timeout=30)
    assert status == 200 and got == body_a


def _end_by(how: str, a: AgentProc, s: socket.socket, body: bytes, sent: int) -> None:
    """End the admitted upload on ``s`` the way ``how`` says, and check the agent's answer."""
    if how == "success":
        send_rest(s, body, sent)
        assert read_response(s, 30)[0] == 201
    elif how == "checksum":  # a body that does not match its checksum header: 422
        send_rest(s, bytes(len(body) - sent), 0)
        assert read_response(s, 30)[0] == 422
    elif how == "disconnect":  # the client goes away mid-body
        s.close()
    elif how == "idle":  # the client sends nothing more: cut after the idle timeout (408)
        status, _ = read_response(s, 30)
        assert status in (408, 0), status  # 0: the agent closed without an answer the client read
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["success", "checksum", "disconnect", "idle"])
def test_an_upload_gives_its_reserved_bytes_back_however_it_ends(full_agent: StartAgent, how: str) -> None:
    a = full_agent("--idle-timeout-s", "2") if how == "idle" else full_agent()
    body = os.urandom(10 * MIB)
    sent = 1 * MIB
    s = start_upload(a.port, okey(2), body, sent)
    try:
        wait_admitted(a)
        # What it has written is on the disk (in free_bytes): no longer counted as to come.
        wait_until(
            lambda: health(a)[wire.RESERVED_BYTES_FIELD] == len(body) - sent, 10, 0.02, "the sent bytes to be written"
        )
        _end_by(how, a, s, body, sent)
    finally:
        s.close()
    h = wait_released(a)
    assert temp_files(a.root) == []
    # What is free now is free for the next upload: nothing of the last one is still held.
    room = h["free_bytes"] - MIB
    body2 = os.urandom(room)
    status, _, text = raw_request(a.port, "PUT", f"/v1/o/ns/{okey(3)}", body2, timeout=60)
    assert status == 201, (how, h, text)


# ========================================================== (b) a real ENOSPC while writing
def test_disk_full_while_writing_is_507_naming_root_free_space_and_fix(full_agent: StartAgent) -> None:
    a = full_agent()
    body = os.urandom(4 * MIB)
    sent = 256 << 10
    s = start_upload(a.port, okey(4), body, sent)
    try:
        wait_until(lambda: temp_files(a.root), 10, 0.02, "the agent to create the upload's temp file")
        filler = fill_disk(a.root)  # another writer takes the rest of the disk: the reserve could not know
        send_rest(s, body, sent)
        status, text = read_response(s, 30)
    finally:
        s.close()
    assert status == 507, f"HTTP {status}: {text}"
    assert "[ENOSPC]" in text and a.root in text and "bytes free now" in text, text
    assert "ckptmirror prune" in text and "keep_last" in text, text
    assert temp_files(a.root) == [], "the temp file of the failed upload is still there"
    h = wait_released(a)
    assert h["uploads_in_flight"] == 0, h
    assert "out of space, upload dropped" in a.log()
    os.unlink(filler)
    status, _, text2 = raw_request(a.port, "PUT", f"/v1/o/ns/{okey(4)}", body, timeout=60)
    assert status == 201, text2
    assert raw_request(a.port, "GET", f"/v1/o/ns/{okey(4)}", timeout=30)[2] == body


def test_disk_full_while_writing_reaches_the_client_as_enospc(full_agent: StartAgent) -> None:
    a = full_agent()
    body = os.urandom(4 * MIB)
    failed: list[BaseException] = []
    with TcpProxy(a.port, mode="delay", delay_s=0.05) as proxy:  # a slow link: the disk fills meanwhile
        r = PeerReplica(proxy.url("ns"), token=TOKEN, connect_timeout_s=30)

        def put() -> None:
            try:
                r.put(okey(5), body)
            except BaseException as exc:  # noqa: BLE001 - checked below
                failed.append(exc)

        t = threading.Thread(target=put)
        t.start()
        try:
            wait_until(lambda: temp_files(a.root), 20, 0.02, "the agent to create the upload's temp file")
            filler = fill_disk(a.root)
        finally:
            proxy.set("forward")
            t.join(60)
        r.close()
    assert not t.is_alive()
    assert failed, "the put succeeded on a full disk"
    exc = failed[0]
    assert isinstance(exc, ReplicaError) and exc.errno == errno.ENOSPC, repr(exc)
    assert "507" in str(exc) and "ckptmirror prune" in str(exc), exc
    assert temp_files(a.root) == []
    wait_released(a)
    os.unlink(filler)
    r = PeerReplica(a.url("ns"), token=TOKEN)
    try:
        r.put(okey(5), body)  # fits again
        out = bytearray(len(body))
        r.read_into(okey(5), memoryview(out))
        assert bytes(out) == body
    finally:
        r.close()


# ============================================================ (c) probe_write on a full agent
def test_probe_write_refuses_while_the_agent_is_full_and_passes_once_freed(full_agent: StartAgent) -> None:
    a = full_agent("--reserve-free-bytes", str(MIB))
    r = PeerReplica(a.url("ns"), token=TOKEN)
    try:
        r.probe_write(4 * MIB)  # 16 MiB disk, 1 MiB reserve: room
        filler = fill_disk(a.root, leave_bytes=2 * MIB)
        with pytest.raises(ReplicaError) as got:
            r.probe_write(4 * MIB)
        msg = str(got.value)
        assert got.value.errno == errno.ENOSPC, msg
        assert f"reserve_free_bytes={MIB}" in msg and f"need_bytes={4 * MIB}" in msg and "free_bytes=" in msg, msg
        assert "ckptmirror prune" in msg, msg
        os.unlink(filler)
        r.probe_write(4 * MIB)

        # An upload admitted and not written yet takes its bytes from what the probe sees.
        body = os.urandom(10 * MIB)
        s = start_upload(a.port, okey(6), body, 64 << 10)
        try:
            wait_admitted(a)
            with pytest.raises(ReplicaError) as got:
                r.probe_write(8 * MIB)  # 16 - 1 reserve - ~10 in flight < 8
            assert got.value.errno == errno.ENOSPC and f"{wire.RESERVED_BYTES_FIELD}=" in str(got.value), got.value
        finally:
            s.close()  # the upload goes away: its bytes come back
        wait_released(a)
        r.probe_write(8 * MIB)
    finally:
        r.close()


def test_a_full_peer_stays_degraded_until_there_is_room(full_agent: StartAgent) -> None:
    """The health check, with a real agent: a 507 marks the peer as refusing writes, pings alone
    do not bring it back, freeing space does."""
    a = full_agent()
    r = PeerReplica(a.url("ns"), token=TOKEN)
    h = ReplicaHealth([r], interval_s=0.05)
    try:
        filler = fill_disk(a.root, leave_bytes=MIB)
        need = 4 * MIB
        with pytest.raises(ReplicaError) as got:
            r.put(okey(7), os.urandom(need))
        assert got.value.errno == errno.ENOSPC, got.value
        h.mark(r, got.value, need_bytes=need)
        h.start()
        time.sleep(1.0)  # twenty probes: each ping answers
        assert r.url in h.degraded(), h.summary()
        assert "need_bytes" in h.degraded()[r.url], h.summary()
        os.unlink(filler)
        wait_until(lambda: r.url not in h.degraded(), 10, 0.05, "the peer to come back once freed")
        r.put(okey(7), os.urandom(need))
    finally:
        h.stop(10)
        r.close()


def test_a_read_only_agent_disk_stays_degraded_until_it_is_writable_again(full_agent: StartAgent) -> None:
    """A read-only remount under a running agent: the upload's 500 names EROFS, the client keeps
    that errno, the health document says so, and the peer stays degraded until it is writable."""
    a = full_agent()
    r = PeerReplica(a.url("ns"), token=TOKEN)
    h = ReplicaHealth([r], interval_s=0.05)
    subprocess.run(["mount", "-o", "remount,ro", a.root], check=True)
    try:
        with pytest.raises(ReplicaError) as got:
            r.put(okey(8), os.urandom(MIB))
        assert got.value.errno == errno.EROFS, got.value
        assert r.health()[wire.WRITE_ERROR_FIELD] == "EROFS"
        with pytest.raises(ReplicaError) as probe:
            r.probe_write(MIB)
        assert probe.value.errno == errno.EROFS and "read-write" in str(probe.value), probe.value
        h.mark(r, got.value, need_bytes=MIB)
        h.start()
        time.sleep(1.0)  # twenty probes: each ping answers
        assert r.url in h.degraded(), h.summary()
    finally:
        subprocess.run(["mount", "-o", "remount,rw", a.root], check=True)
    try:
        wait_until(lambda: r.url not in h.degraded(), 10, 0.05, "the peer to come back once writable")
        assert r.health()[wire.WRITE_ERROR_FIELD] is None
        r.put(okey(8), os.urandom(MIB))
    finally:
        h.stop(10)
        r.close()


# ======================================================================= (d) the error mapping
def test_507_reads_as_enospc_at_the_client() -> None:
    exc = wire.error_for_status(507, "out of space: [ENOSPC] ...", replica="peer://h:1/ns", key="k")
    assert isinstance(exc, ReplicaError) and exc.errno == errno.ENOSPC
    assert "507" in str(exc) and "[ENOSPC]" in str(exc) and "peer://h:1/ns" in str(exc)
    other = wire.error_for_status(500, "ReplicaError: ... [EIO] ...", replica="r", key="k")
    assert isinstance(other, ReplicaError) and other.errno is None  # not a full disk: pings bring it back
    # A read-only or forbidden agent disk refuses every write: the client takes that errno from
    # the text (it has no other), so the health check asks for a write probe, not a ping alone.
    for name in ("EROFS", "EACCES"):
        ro = wire.error_for_status(500, f"ReplicaError: write failed: [{name}] ...", replica="r", key="k")
        assert ro.errno == getattr(errno, name), (name, ro)


@pytest.mark.parametrize(
    ("err", "status"), [(errno.ENOSPC, 507), (errno.EDQUOT, 507), (errno.EIO, 500), (errno.EROFS, 500)]
)
def test_agent_status_of_a_disk_error(err: int, status: int) -> None:
    exc = ReplicaError("write failed", replica="namespace ns", key="k", errno=err)
    assert wire.status_for(exc) == status
    text = wire.error_text(exc)
    assert f"[{errno.errorcode[err]}]" in text, text
    named = ReplicaError(f"write failed: [{errno.errorcode[err]}] x", errno=err)
    assert wire.error_text(named).count(errno.errorcode[err]) == 1  # not named twice


class _Doc(PeerReplica):
    """A peer whose health document is given (agents of other versions)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        super().__init__("peer://127.0.0.1:1/ns", token="t")
        self.doc = doc

    def health(self) -> dict[str, Any]:
        return self.doc


@pytest.mark.parametrize(
    ("doc", "need", "full"),
    [
        ({"free_bytes": 10, "reserve_free_bytes": 2, wire.RESERVED_BYTES_FIELD: 3}, 5, False),
        ({"free_bytes": 10, "reserve_free_bytes": 2, wire.RESERVED_BYTES_FIELD: 3}, 6, True),
        ({"free_bytes": 10, "reserve_free_bytes": 2}, 8, False),  # an older agent: nothing in flight counted
        ({"free_bytes": 10, "reserve_free_bytes": 2}, 9, True),
        ({"version": "0.1"}, 1 << 40, False),  # no free space reported: nothing to go by
    ],
)
def test_probe_write_reads_the_health_document(doc: dict[str, Any], need: int, full: bool) -> None:
    r = _Doc(doc)
    if not full:
        r.probe_write(need)
        return
    with pytest.raises(ReplicaError) as got:
        r.probe_write(need)
    assert got.value.errno == errno.ENOSPC and f"need_bytes={need}" in str(got.value)


def test_space_ledger_counts_promises_made_while_a_check_reads_the_free_space() -> None:
    ledger = SpaceLedger()
    first = ledger.promise(100)
    mark = ledger.mark()
    first.wrote(40)  # written while the free space was read: may show in it or not
    second = ledger.promise(50)  # admitted meanwhile
    second.release()  # and gone again: its writes may still show in the number read
    assert ledger.others_since(mark) == 150
    assert ledger.pending == 60
    first.release()
    first.release()
    assert ledger.pending == 0
