"""The peer agent over TLS: ``ckptmirror serve --tls-cert/--tls-key`` and ``peers://`` clients.

A self-signed certificate for 127.0.0.1 / localhost is made with the ``openssl`` CLI; clients
trust it through ``cafile=``. A client without that CA, and a plain-HTTP client on the TLS port,
must fail with a ckptmirror error (not hang), and the agent must refuse half a TLS setup.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _agent import HOST, TOKEN, AgentProc, agent, serve_command
from _helpers import assert_bit_exact, make_state, snapshot

import ckptmirror
from ckptmirror.errors import ReplicaError, SaveFailedError
from ckptmirror.replicas.peer import PeerReplica

pytestmark = [
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI"),
    pytest.mark.usefixtures("no_peer_token_env"),
]

DIMS = (256, 512, 128)  # the model of make_state: ~1.3 MB of parameters and momentum buffers
OBJECT_BYTES = 256 << 10  # several objects per step
CERT_ERROR = "CERTIFICATE_VERIFY_FAILED"


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(cert.pem, key.pem): a self-signed certificate for IP 127.0.0.1 and DNS localhost."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    cmd = [
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"openssl failed ({p.returncode}): {p.stderr}"
    return str(cert), str(key)


@pytest.fixture(scope="module")
def tls_agent(
    tmp_path_factory: pytest.TempPathFactory, tls_pair: tuple[str, str], peer_token_file: str
) -> Iterator[AgentProc]:
    cert, key = tls_pair
    base = tmp_path_factory.mktemp("tls-agent")
    # --reserve-free-bytes 0: the test must not depend on how full the temp disk is.
    with agent(
        base / "root",
        token_file=peer_token_file,
        args=["--tls-cert", cert, "--tls-key", key, "--reserve-free-bytes", "0"],
    ) as a:
        yield a


def peers_url(a: AgentProc, namespace: str) -> str:
    return f"peers://{HOST}:{a.port}/{namespace}"


def plain_url(a: AgentProc, namespace: str) -> str:
    return a.url(namespace)


# --------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("key", ["peers", "peer"])  # "peer" covers peers:// too (was silently ignored)
def test_save_and_restore_through_a_tls_peer(
    tls_agent: AgentProc, tls_pair: tuple[str, str], tmp_path: Path, key: str
) -> None:
    cert, _ = tls_pair
    local = tmp_path / "local"
    url = peers_url(tls_agent, f"roundtrip-{key}")
    opts = {key: {"cafile": cert, "token": TOKEN}}
    model, opt = make_state(1, DIMS)
    snap = snapshot(model, opt)
    with ckptmirror.Mirror([str(local), url], storage_options=opts, object_bytes=OBJECT_BYTES) as m:
        assert m.health() == {str(local): "ok", url: "ok"}
        h = m.save(3, model, opt, extra={"epoch": 1})
        h.result(timeout=60)
        assert {u: s.state for u, s in h.replicas.items()} == {str(local): "committed", url: "committed"}
    # The bytes really went over TLS into the agent's root.
    assert any((Path(tls_agent.root) / f"roundtrip-{key}").rglob("*.bin"))

    shutil.rmtree(local)  # the node-local copy is gone: only the TLS peer has the checkpoint
    fresh, fresh_opt = make_state(4242, DIMS)
    with ckptmirror.Mirror([str(local), url], storage_options=opts, object_bytes=OBJECT_BYTES) as m:
        res = m.restore(fresh, fresh_opt)
    assert res is not None and res.step == 3 and res.extra == {"epoch": 1}
    assert res.sources and set(res.sources.values()) == {url}
    assert_bit_exact(snapshot(fresh, fresh_opt), snap)


def test_client_without_the_ca_fails_certificate_verification(tls_agent: AgentProc, tmp_path: Path) -> None:
    url = peers_url(tls_agent, "no-ca")
    r = PeerReplica(url, token=TOKEN, timeout_s=5)
    try:
        t0 = time.monotonic()
        with pytest.raises(ReplicaError) as info:  # ReplicaUnavailableError is a ReplicaError
            r.list_steps()
        assert time.monotonic() - t0 < 5
        assert CERT_ERROR in str(info.value) or "certificate verify failed" in str(info.value), str(info.value)
        assert info.value.replica == url
    finally:
        r.close()

    # Through a Mirror: the peer starts degraded, and a save that needs it fails naming the cause.
    model, opt = make_state(2, DIMS)
    m = ckptmirror.Mirror([url], storage_options={"peers": {"token": TOKEN, "timeout_s": 5}}, object_bytes=OBJECT_BYTES)
    try:
        assert "certificate verify failed" in m.health()[url], m.health()
        h = m.save(1, model, opt)
        with pytest.raises(SaveFailedError) as failed:
            h.result(timeout=30)
        assert isinstance(failed.value.failures[url], ReplicaError)
        assert "certificate verify failed" in str(failed.value), str(failed.value)
    finally:
        m.close(raise_errors=False)


def test_plain_http_client_on_the_tls_port_fails_cleanly(tls_agent: AgentProc, tls_pair: tuple[str, str]) -> None:
    url = plain_url(tls_agent, "plain")
    r = PeerReplica(url, token=TOKEN, timeout_s=2)
    try:
        t0 = time.monotonic()
        with pytest.raises(ReplicaError) as info:
            r.list_steps()
        elapsed = time.monotonic() - t0
        # Two attempts (one retry on a fresh connection) at most: no hang past the timeouts.
        assert elapsed < 2 * 2 + 1, f"took {elapsed:.1f} s"
        assert info.value.replica == url
    finally:
        r.close()
    # The agent is unharmed and still serves TLS clients.
    assert tls_agent.proc.poll() is None
    ok = PeerReplica(peers_url(tls_agent, "plain"), token=TOKEN, cafile=tls_pair[0], timeout_s=5)
    try:
        assert ok.health()["version"] == ckptmirror.__version__
    finally:
        ok.close()


@pytest.mark.parametrize("which", ["--tls-cert", "--tls-key"])
def test_agent_refuses_half_a_tls_setup(
    which: str, tls_pair: tuple[str, str], peer_token_file: str, tmp_path: Path
) -> None:
    cert, key = tls_pair
    cmd = serve_command() + [
        "serve",
        "--root",
        str(tmp_path / "root"),
        "--host",
        HOST,
        "--port",
        "0",
        "--token-file",
        peer_token_file,
    ]
    cmd += [which, cert if which == "--tls-cert" else key]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode != 0
    assert "listening" not in p.stdout, p.stdout  # it never started serving
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "--tls-cert and --tls-key go together" in lines[0], lines[0]
    assert "Traceback" not in p.stderr
