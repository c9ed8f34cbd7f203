"""First-hour traps of the peer replica and ``ckptmirror serve`` (issue 9).

- A missing or wrong token is a configuration error (ReplicaPermissionError, raised by
  ``Mirror()`` at construction), never an outage that is retried; the message names the replica,
  where the token came from, and where the agent's token comes from.
- A peer where nothing listens is an outage: ``Mirror()`` constructs with the peer degraded (a
  WARNING that says how to start the agent) and saves commit on the other replicas.
- ``ckptmirror serve`` usage errors: exit status 2, one line on stderr, no traceback and no
  exception class name. The token may come from ``CKPTMIRROR_PEER_TOKEN``; ``--token-file`` wins.
  ``-v`` / ``--log-level`` set the agent's log level.

Everything runs against real ``ckptmirror serve`` processes (``tests/_agent.py``) on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _agent import TOKEN, AgentProc, agent, free_port, wait_until, write_token

import ckptmirror
from ckptmirror.errors import (
    ReplicaConfigError,
    ReplicaError,
    ReplicaPermissionError,
    ReplicaUnavailableError,
)
from ckptmirror.replicas.peer import TOKEN_ENV, PeerReplica

STEP1 = "step-000000000001"
#: An exception class name in a message (``ValueError:``, ``FileNotFoundError``): a CLI usage
#: error must not show one, it reads as a crash.
CLASS_NAME = re.compile(r"\b_?[A-Z][A-Za-z]*(Error|Exception)\b")


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's environment must not hand the clients (or agents) a token by accident.
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_token(tmp_path_factory.mktemp("token") / "token")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, token_file: str) -> Iterator[AgentProc]:
    """One agent that requires ``TOKEN``, default log level; tests use their own namespaces."""
    with agent(tmp_path_factory.mktemp("guarded") / "root", token_file=token_file) as a:
        yield a


@contextlib.contextmanager
def captured(logger: str = "ckptmirror") -> Iterator[list[logging.LogRecord]]:
    """The records ``logger`` emits inside the block (a handler of our own, so a logger that does
    not propagate, as the CLI sets it up, is captured too)."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = _Keep(logging.DEBUG)
    log = logging.getLogger(logger)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def state() -> dict[str, Any]:
    """A small state to save: a tensor, a plain value."""
    return {"w": torch.arange(4096, dtype=torch.float32), "epoch": 3}


def serve_env(**extra: str) -> dict[str, str]:
    """The environment for a ``ckptmirror serve`` subprocess: ours, without a token unless given."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env.update(extra)
    return env


def run_serve(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ckptmirror serve ARGS`` to completion (a usage error must end it at once)."""
    return subprocess.run(
        [sys.executable, "-m", "ckptmirror", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env if env is not None else serve_env(),
    )


def assert_usage_error(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status 2, nothing on stdout, one line on stderr that holds every needle; the line."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "listening" not in p.stdout, p.stdout  # it never started serving
    assert len(lines) == 1, p.stderr
    line = lines[0]
    assert "Traceback" not in p.stderr
    assert not CLASS_NAME.search(line), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def log_lines(a: AgentProc) -> list[dict[str, Any]]:
    """The agent's JSON log lines so far."""
    return [json.loads(line) for line in a.log().splitlines() if line.startswith("{")]


# ============================================================ 1. wrong or missing token
def test_wrong_token_raises_permission_error_at_construction(guarded: AgentProc, tmp_path: Path) -> None:
    local, peer = str(tmp_path / "a"), guarded.url("wrong-token")
    with pytest.raises(ReplicaPermissionError) as info:
        ckptmirror.Mirror([local, peer], storage_options={"peer": {"token": "wrong"}})
    exc = info.value
    # A configuration error, not an outage: never retried or skipped as a degraded replica.
    assert isinstance(exc, ReplicaConfigError) and isinstance(exc, PermissionError)
    assert not isinstance(exc, ReplicaUnavailableError)
    msg = str(exc)
    assert exc.replica == peer and peer in msg, msg
    assert "the token given as token=" in msg, msg  # which token was used
    assert "HTTP 403" in msg, msg
    for fix in ("token=", TOKEN_ENV, "token_file=", "--token-file"):
        assert fix in msg, (fix, msg)
    # The agent stored nothing for the rejected client.
    assert not os.path.exists(os.path.join(guarded.root, "wrong-token"))


def test_missing_token_says_none_was_given(guarded: AgentProc, tmp_path: Path) -> None:
    peer = guarded.url("no-token")
    with pytest.raises(ReplicaPermissionError) as info:
        ckptmirror.Mirror([str(tmp_path / "a"), peer])
    msg = str(info.value)
    assert info.value.replica == peer and peer in msg
    assert "none was given" in msg and "HTTP 401" in msg, msg
    assert "--token-file" in msg and TOKEN_ENV in msg, msg


@pytest.mark.parametrize("source", ["token", "env", "token_file"])
def test_permission_error_names_where_the_token_came_from(
    source: str, guarded: AgentProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = guarded.url("sources")
    options: dict[str, Any] = {"timeout_s": 5}
    if source == "token":
        options["token"] = "not-it"
        expected = "the token given as token="
    elif source == "env":
        monkeypatch.setenv(TOKEN_ENV, "not-it")
        expected = f"the token from the environment variable {TOKEN_ENV}"
    else:
        options["token_file"] = write_token(tmp_path / "other-token", "not-it")
        expected = f"the token read from token_file={options['token_file']!r}"
    r = PeerReplica(url, **options)
    try:
        with pytest.raises(ReplicaPermissionError, match=re.escape(expected)):
            r.list_steps()
        # HEAD answers have no body: still a permission error with the token named.
        with pytest.raises(ReplicaPermissionError, match=re.escape(expected)):
            r.size(f"{STEP1}/COMMIT.json")
    finally:
        r.close()


def test_token_given_in_several_places_uses_the_option_first(
    guarded: AgentProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """token= beats token_file= beats the environment (as the README says)."""
    monkeypatch.setenv(TOKEN_ENV, "wrong-from-env")
    good_file = write_token(tmp_path / "good")
    for options in ({"token": TOKEN, "token_file": str(tmp_path / "absent")}, {"token_file": good_file}):
        r = PeerReplica(guarded.url("order"), timeout_s=5, **options)
        try:
            assert r.list_steps() == []
        finally:
            r.close()


def test_unreadable_token_file_is_a_config_error_naming_it(guarded: AgentProc, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-token")
    with pytest.raises(ReplicaConfigError) as info:
        ckptmirror.Mirror([str(tmp_path / "a"), guarded.url("tf")], storage_options={"peer": {"token_file": missing}})
    assert not isinstance(info.value, ReplicaUnavailableError)
    msg = str(info.value)
    assert f"token_file={missing!r}" in msg and "No such file" in msg, msg


def test_a_path_the_agent_refuses_is_not_blamed_on_the_token(guarded: AgentProc, tmp_path: Path) -> None:
    """403 for a symlink out of the root: a permission error, without the token advice."""
    outside = tmp_path / "outside"
    outside.mkdir()
    ns = Path(guarded.root) / "symlinked"
    ns.mkdir()
    os.symlink(outside, ns / STEP1)
    r = PeerReplica(guarded.url("symlinked"), token=TOKEN, timeout_s=5)
    try:
        with pytest.raises(ReplicaPermissionError) as info:
            r.list_prefix(STEP1)
    finally:
        r.close()
    msg = str(info.value)
    assert "HTTP 403" in msg and "symlink" in msg, msg
    assert "--token-file" not in msg and "refused the token" not in msg, msg


# ============================================================== 2. nothing listening
def test_nothing_listening_constructs_degraded_and_saves_locally(tmp_path: Path) -> None:
    port = free_port()
    local, peer = str(tmp_path / "a"), f"peer://127.0.0.1:{port}/ns"
    hint = f"ckptmirror serve --root DIR --port {port} --token-file FILE"

    # The replica alone: an outage (retried by the prober), whose message shows the command.
    r = PeerReplica(peer, token=TOKEN, timeout_s=5)
    try:
        with pytest.raises(ReplicaUnavailableError) as info:
            r.list_steps()
    finally:
        r.close()
    assert not isinstance(info.value, ReplicaConfigError)
    assert f"127.0.0.1:{port}" in str(info.value) and hint in str(info.value), str(info.value)

    with captured() as records:
        m = ckptmirror.Mirror([local, peer], storage_options={"peer": {"token": TOKEN}}, health_interval_s=60)
    try:
        warnings = [rec.getMessage() for rec in records if rec.levelno == logging.WARNING]
        assert any(peer in w and hint in w for w in warnings), warnings
        assert m.health()[local] == "ok"
        assert m.health()[peer].startswith("degraded") and hint in m.health()[peer], m.health()
        h = m.save_state(1, state()).result(timeout=60)
        assert {u: s.state for u, s in h.replicas.items()} == {local: "committed", peer: "skipped"}
        loaded = m.load_state()
        assert loaded is not None and loaded[0] == 1
        assert torch.equal(loaded[1]["w"], state()["w"]) and loaded[1]["epoch"] == 3
    finally:
        m.close(raise_errors=False)
    assert os.path.isfile(os.path.join(local, STEP1, "COMMIT.json"))


# ============================================================ 3. `ckptmirror serve` usage
def test_non_loopback_without_a_token_is_a_usage_error(tmp_path: Path) -> None:
    root = tmp_path / "never"
    line = assert_usage_error(run_serve(["--root", str(root), "--host", "0.0.0.0", "--port", "0"]), "0.0.0.0")
    assert "--token-file" in line and TOKEN_ENV in line, line
    assert not root.exists()


def test_missing_token_file_names_the_flag_and_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "token")
    root = tmp_path / "never"
    assert_usage_error(
        run_serve(["--root", str(root), "--port", "0", "--token-file", missing]), "--token-file", missing
    )
    assert not root.exists()


def test_empty_token_file_is_a_usage_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    assert_usage_error(
        run_serve(["--root", str(tmp_path / "r"), "--port", "0", "--token-file", str(empty)]),
        "--token-file",
        str(empty),
        "empty",
    )


def test_token_file_that_is_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    assert_usage_error(
        run_serve(["--root", str(tmp_path / "r"), "--port", "0", "--token-file", str(tmp_path)]),
        "--token-file",
        str(tmp_path),
    )


def test_empty_token_variable_is_a_usage_error(tmp_path: Path) -> None:
    p = run_serve(["--root", str(tmp_path / "r"), "--port", "0"], env=serve_env(**{TOKEN_ENV: " "}))
    assert_usage_error(p, TOKEN_ENV, "empty")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["-v", "--log-level", "info"], "--log-level"),
        (["--log-level", "chatty"], "chatty"),
        (["--port", "seventy"], "--port"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], needle: str, tmp_path: Path) -> None:
    assert_usage_error(run_serve(["--root", str(tmp_path / "r"), *args]), needle)


def test_port_in_use_is_one_line(guarded: AgentProc, tmp_path: Path, token_file: str) -> None:
    p = run_serve(["--root", str(tmp_path / "r"), "--port", str(guarded.port), "--token-file", token_file])
    assert_usage_error(p, f"127.0.0.1:{guarded.port}", "another agent")
    assert guarded.proc.poll() is None  # the first agent is untouched


def test_help_documents_the_token_precedence() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "ckptmirror", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert TOKEN_ENV in text and "--token-file wins" in text, text
    assert "--log-level {debug,info,warning,error}" in text and "-v, --verbose" in text, text


# ====================================================== 4. token from the environment
def _saves(url: str, tmp_path: Path, name: str, token: str) -> str:
    """Save step 1 to a local replica and ``url`` with ``token``; the peer's state."""
    with ckptmirror.Mirror(
        [str(tmp_path / name), url], storage_options={"peer": {"token": token, "timeout_s": 10}}
    ) as m:
        h = m.save_state(1, state()).result(timeout=60)
    return h.replicas[url].state


def test_agent_takes_its_token_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_token = "token-from-the-environment-42"
    monkeypatch.setenv(TOKEN_ENV, env_token)  # inherited by the agent process only...
    with agent(tmp_path / "root", token_file=None) as a:
        monkeypatch.delenv(TOKEN_ENV)  # ...the clients below get their token (or none) explicitly
        assert _saves(a.url("env"), tmp_path, "a", env_token) == "committed"
        assert os.path.isfile(os.path.join(a.root, "env", STEP1, "COMMIT.json"))
        with pytest.raises(ReplicaPermissionError, match="none was given"):
            ckptmirror.Mirror([str(tmp_path / "b"), a.url("env")])
        with pytest.raises(ReplicaPermissionError, match="refused the token given as token="):
            ckptmirror.Mirror([str(tmp_path / "c"), a.url("env")], storage_options={"peer": {"token": "nope"}})
        assert [rec["auth"] for rec in log_lines(a) if rec["msg"] == "listening"] == [True]


def test_token_file_wins_over_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file_token = "token-from-the-file-0042"
    token_file = write_token(tmp_path / "token", file_token)
    monkeypatch.setenv(TOKEN_ENV, "token-from-the-environment-42")
    with agent(tmp_path / "root", token_file=token_file) as a:
        monkeypatch.delenv(TOKEN_ENV)
        assert _saves(a.url("both"), tmp_path, "a", file_token) == "committed"
        with pytest.raises(ReplicaPermissionError):
            ckptmirror.Mirror(
                [str(tmp_path / "b"), a.url("both")],
                storage_options={"peer": {"token": "token-from-the-environment-42"}},
            )


# ====================================================================== 5. log level
def _requests_logged(a: AgentProc) -> list[dict[str, Any]]:
    return [rec for rec in log_lines(a) if rec["msg"] == "request"]


def test_verbose_logs_every_request(tmp_path: Path, token_file: str) -> None:
    with agent(tmp_path / "root", token_file=token_file, args=["-v"]) as a:
        r = PeerReplica(a.url("v"), token=TOKEN, timeout_s=5)
        try:
            r.health()
            r.put(f"{STEP1}/x.bin", b"payload")
        finally:
            r.close()
        seen = wait_until(lambda: _requests_logged(a) if len(_requests_logged(a)) >= 2 else None, 10)
        assert {(rec["method"], rec["path"], rec["status"]) for rec in seen} >= {
            ("GET", "/v1/health", 200),
            ("PUT", f"/v1/o/v/{STEP1}/x.bin", 201),
        }, seen
        assert all(rec["level"] == "debug" for rec in seen)


def test_default_level_is_info_without_request_lines(guarded: AgentProc) -> None:
    r = PeerReplica(guarded.url("info"), token=TOKEN, timeout_s=5)
    try:
        r.put(f"{STEP1}/y.bin", b"payload")
    finally:
        r.close()
    wait_until(lambda: any(rec["msg"] == "stored" and rec["ns"] == "info" for rec in log_lines(guarded)), 10)
    assert _requests_logged(guarded) == []
    assert any(rec["msg"] == "listening" for rec in log_lines(guarded))


def test_log_level_warning_keeps_only_warnings(tmp_path: Path, token_file: str) -> None:
    with agent(tmp_path / "root", token_file=token_file, args=["--log-level", "warning"]) as a:
        good = PeerReplica(a.url("w"), token=TOKEN, timeout_s=5)
        bad = PeerReplica(a.url("w"), token="wrong", timeout_s=5)
        try:
            good.put(f"{STEP1}/z.bin", b"payload")
            with pytest.raises(ReplicaError):
                bad.health()
        finally:
            good.close()
            bad.close()
        lines = wait_until(lambda: log_lines(a) or None, 10)
        assert [rec["msg"] for rec in lines] == ["rejected: wrong token"], lines
        assert os.path.isfile(os.path.join(a.root, "w", STEP1, "z.bin"))  # the put did happen
