"""The first hour with an S3 replica: a misconfiguration fails ``Mirror()`` at once, an outage does not.

Against real servers on 127.0.0.1: the session moto server (``moto_server``, ``make_bucket``,
``s3_url`` in conftest.py), and, for credentials, a second moto server this module starts with
authentication on (moto in server mode accepts any credentials until its
``/moto-api/reset-auth`` endpoint sets ``INITIAL_NO_AUTH_ACTION_COUNT``; the users and the
bucket are made before that, while it still accepts anything). Nothing is mocked: every error
here is the one botocore or s3fs reports for a real answer, or for a real missing answer.

* no such bucket -> :class:`ReplicaConfigError` from ``Mirror()``, naming the bucket and how to
  create it (before: the replica was listed as unreachable and skipped for the whole run);
* unknown key id, wrong secret, a user without rights, no credentials at all ->
  :class:`ReplicaPermissionError` from ``Mirror()``, naming the replica and where credentials
  come from;
* nothing listening at the endpoint (refused, DNS, no answer) -> ``Mirror()`` starts with a
  WARNING and the replica degraded, saves commit on the local replica, and every message names
  the endpoint it tried and ``AWS_ENDPOINT_URL``.

The same for the generic fsspec backend (``fsspec+s3://``), which also must not create a
missing bucket.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from _helpers import answers, ck_warnings, free_port, make_net, point_aws_at
from botocore.exceptions import ClientError

from ckptmirror import Mirror
from ckptmirror.errors import (
    ReplicaConfigError,
    ReplicaError,
    ReplicaPermissionError,
    ReplicaUnavailableError,
)
from ckptmirror.format import commit_key
from ckptmirror.replicas import LocalReplica
from ckptmirror.replicas.fsspec_replica import FsspecReplica
from ckptmirror.replicas.s3 import S3Replica

#: S3 replica options that make an unreachable endpoint fail in about a second, not minutes.
FAST = {"timeout_s": 1.0, "retries": 0}
#: For tests where the server answers and the point is how its answer is classified: no retries,
#: and a budget a loaded machine's moto answers within (FAST's 1 s cut a slow answer in CI,
#: which then read as an outage instead of the answer under test).
ANSWERED = {"timeout_s": 10.0, "retries": 0}
#: The same for s3fs under the fsspec backend (botocore's own timeouts and retries).
FAST_FSSPEC = {
    "skip_instance_cache": True,  # s3fs caches instances by options, not by the AWS_* environment
    "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}},
}
CREDENTIAL_FIX = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "storage_options")


# ----------------------------------------------------------------------------- servers
@dataclass
class AuthServer:
    """A moto server that checks every request's signature against its IAM users."""

    endpoint: str
    bucket: str
    admin: tuple[str, str]  # (key id, secret) of a user allowed everything
    nobody: tuple[str, str]  # a known user with no permissions at all

    def client(self, creds: tuple[str, str]) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=creds[0],
            aws_secret_access_key=creds[1],
            region_name="us-east-1",
        )


@pytest.fixture(scope="module")
def auth_moto() -> Iterator[AuthServer]:
    pytest.importorskip("moto.server", reason="S3 tests need moto[server]")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while not answers(endpoint):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"moto server did not start:\n{log.read().decode(errors='replace')[-2000:]}")
                time.sleep(0.1)
            # Set up while the server still accepts anything.
            setup = {"endpoint_url": endpoint, "region_name": "us-east-1"}
            creds = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
            iam = boto3.client("iam", **setup, **creds)
            bucket = "ckptmirror-auth"
            boto3.client("s3", **setup, **creds).create_bucket(Bucket=bucket)
            allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
            keys = {}
            for user in ("admin", "nobody"):
                iam.create_user(UserName=user)
                if user == "admin":
                    iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps(allow_all))
                k = iam.create_access_key(UserName=user)["AccessKey"]
                keys[user] = (k["AccessKeyId"], k["SecretAccessKey"])
            # From here on every request must be signed by a known user with the right permissions.
            req = urllib.request.Request(
                f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
            )
            urllib.request.urlopen(req, timeout=10).close()
            yield AuthServer(endpoint, bucket, keys["admin"], keys["nobody"])
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def hung_endpoint() -> Iterator[str]:
    """An endpoint that accepts TCP connections (the kernel does, from the backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------------------- 1. no such bucket
def test_missing_bucket_fails_the_mirror_at_construction(
    tmp_path: Path, moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_aws_at(monkeypatch, moto_server)
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    url = f"s3://{bucket}/x"
    t0 = time.monotonic()
    with pytest.raises(ReplicaConfigError) as ei:
        Mirror([str(tmp_path / "a"), url])  # default options: what a first run uses
    assert time.monotonic() - t0 < 10
    err = ei.value
    assert not isinstance(err, (ReplicaPermissionError, ReplicaUnavailableError))
    assert err.replica == url
    msg = str(err)
    assert url in msg and f"bucket {bucket!r} does not exist on {moto_server}" in msg
    assert f"aws s3 mb s3://{bucket} --endpoint-url {moto_server}" in msg and "fix the replica URL" in msg
    assert "attempts" not in msg  # answered once, not retried: waiting does not create a bucket
    assert not (tmp_path / "a").exists()  # nothing was saved anywhere


def test_missing_bucket_is_a_config_error_on_every_operation(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    point_aws_at(monkeypatch, moto_server)
    r = S3Replica(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run", **ANSWERED)
    try:
        for op in (r.list_steps, lambda: r.put("x", b"1"), lambda: r.get("x", 10), lambda: r.delete_prefix("x")):
            with pytest.raises(ReplicaConfigError, match="does not exist.*aws s3 mb"):
                op()
    finally:
        r.close()


def test_fsspec_missing_bucket_is_a_config_error_and_is_not_created(
    tmp_path: Path, moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_aws_at(monkeypatch, moto_server)
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    url = f"fsspec+s3://{bucket}/run"
    with pytest.raises(ReplicaConfigError) as ei:
        Mirror([str(tmp_path / "a"), url], storage_options={"fsspec+s3": FAST_FSSPEC})
    msg = str(ei.value)
    assert ei.value.replica == url and url in msg
    assert f"bucket {bucket!r} does not exist" in msg and f"aws s3 mb s3://{bucket}" in msg
    # Before, s3fs's makedirs created it, in whatever account and region the credentials pick.
    with pytest.raises(ClientError) as missing:
        boto3.client("s3", endpoint_url=moto_server).head_bucket(Bucket=bucket)
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


@pytest.mark.parametrize("backend", ["s3", "fsspec"])
def test_bucket_that_vanishes_after_use_is_an_outage_not_a_config_error(
    moto_server: str, make_bucket: Callable[[str], str], backend: str
) -> None:
    """A bucket deleted mid-run (or a server restarted without its data) must not make a
    restore raise as if the URL were wrong: the replica worked, and recreating the bucket fixes it."""
    bucket = make_bucket("ckptmirror-vanish")

    def make() -> S3Replica | FsspecReplica:
        if backend == "s3":
            return S3Replica(f"s3://{bucket}/run", **ANSWERED)
        return FsspecReplica(f"fsspec+s3://{bucket}/run", **FAST_FSSPEC)

    used, fresh = make(), None
    try:
        assert used.list_steps() == []
        boto3.client("s3", endpoint_url=moto_server).delete_bucket(Bucket=bucket)
        with pytest.raises(ReplicaUnavailableError, match=f"bucket '{bucket}' does not exist.*any more") as ei:
            used.list_steps()
        assert not isinstance(ei.value, ReplicaConfigError) and "recreate it" in str(ei.value)
        fresh = make()  # a client that never saw it cannot tell a deleted bucket from a typo
        with pytest.raises(ReplicaConfigError, match="fix the replica URL"):
            fresh.list_steps()
    finally:
        for r in (used, fresh):
            if r is not None:
                r.close()


def test_fsspec_existing_bucket_with_a_new_prefix_is_an_empty_replica(tmp_path: Path, s3_url: str) -> None:
    """The bucket check must not mistake a fresh prefix for a missing bucket."""
    url = "fsspec+" + s3_url.rsplit("/", 1)[0] + f"/fresh-{uuid.uuid4().hex[:8]}"
    local = str(tmp_path / "a")
    with Mirror([local, url], storage_options={"fsspec+s3": FAST_FSSPEC}) as m:
        assert set(m.health().values()) == {"ok"}
        h = m.save(1, make_net(8, 1))
        h.result(timeout=60)
        assert {u: st.state for u, st in h.replicas.items()} == {local: "committed", url: "committed"}


# --------------------------------------------------------------------- 2. credentials
@pytest.mark.parametrize(
    "who, code",
    [
        ("unknown key id", "InvalidAccessKeyId"),
        ("wrong secret", "SignatureDoesNotMatch"),
        ("user without rights", "AccessDenied"),
    ],
)
def test_refused_credentials_fail_the_mirror_at_construction(
    tmp_path: Path, auth_moto: AuthServer, monkeypatch: pytest.MonkeyPatch, who: str, code: str
) -> None:
    creds = {
        "unknown key id": ("AKIANOBODYKNOWSTHIS1", "secret"),
        "wrong secret": (auth_moto.nobody[0], "not-the-secret"),
        "user without rights": auth_moto.nobody,
    }[who]
    point_aws_at(monkeypatch, auth_moto.endpoint, *creds)
    url = f"s3://{auth_moto.bucket}/run"
    with pytest.raises(ReplicaPermissionError) as ei:
        Mirror([str(tmp_path / "a"), url], storage_options={"s3": {**ANSWERED, "retries": 2}})
    err = ei.value
    assert isinstance(err, ReplicaConfigError) and isinstance(err, PermissionError)
    msg = str(err)
    assert err.replica == url and url in msg and code in msg and "permission denied" in msg
    for fix in CREDENTIAL_FIX:
        assert fix in msg, f"{fix} missing from: {msg}"
    assert f"bucket policy of {auth_moto.bucket!r}" in msg
    assert "attempts" not in msg  # refused once, not retried


def test_accepted_credentials_save_on_the_auth_server(
    tmp_path: Path, auth_moto: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: the same server, a user it accepts, everything works."""
    point_aws_at(monkeypatch, auth_moto.endpoint, *auth_moto.admin)
    prefix = f"ok-{uuid.uuid4().hex[:8]}"
    url = f"s3://{auth_moto.bucket}/{prefix}"
    with Mirror([str(tmp_path / "a"), url], storage_options={"s3": {**FAST, "timeout_s": 10}}) as m:
        assert set(m.health().values()) == {"ok"}
        m.save(1, make_net(8, 1)).result(timeout=60)
    key = f"{prefix}/{commit_key(1)}"
    assert auth_moto.client(auth_moto.admin).head_object(Bucket=auth_moto.bucket, Key=key)["ContentLength"] > 0
    with pytest.raises(ClientError, match="403"):  # and the server does refuse the others (HEAD: a bare 403)
        auth_moto.client(auth_moto.nobody).head_object(Bucket=auth_moto.bucket, Key=key)


def test_no_credentials_at_all_fail_the_mirror_at_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing listens there: if credentials were found after all, the test fails on "cannot reach".
    point_aws_at(monkeypatch, f"http://127.0.0.1:{free_port()}")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in os.environ if n.startswith("AWS_CONTAINER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup (a 1 s timeout each)
    url = "s3://ckptmirror-any/run"
    with pytest.raises(ReplicaPermissionError) as ei:
        Mirror([str(tmp_path / "a"), url], storage_options={"s3": FAST})
    msg = str(ei.value)
    assert url in msg and "no usable AWS credentials" in msg
    assert "AWS_ACCESS_KEY_ID" in msg and "AWS_PROFILE" in msg and "anon=True" in msg


def test_fsspec_refused_credentials_fail_the_mirror_at_construction(
    tmp_path: Path, auth_moto: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_aws_at(monkeypatch, auth_moto.endpoint, *auth_moto.nobody)
    url = f"fsspec+s3://{auth_moto.bucket}/run"
    with pytest.raises(ReplicaPermissionError) as ei:
        Mirror([str(tmp_path / "a"), url], storage_options={"fsspec+s3": FAST_FSSPEC})
    msg = str(ei.value)
    assert ei.value.replica == url and url in msg and "permission denied" in msg
    assert "AWS_ACCESS_KEY_ID" in msg and "storage_options" in msg


# -------------------------------------------------------------- 3. nothing at the endpoint
def test_unreachable_endpoint_starts_degraded_and_saves_go_on_locally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on
    point_aws_at(monkeypatch, nowhere)  # AWS_ENDPOINT_URL: the usual way to get it wrong
    url = "s3://ckptmirror-any/run"
    local = str(tmp_path / "a")
    t0 = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="ckptmirror"),
        Mirror([local, url], storage_options={"s3": FAST}, health_interval_s=60) as m,
    ):
        assert time.monotonic() - t0 < 10
        warned = [w for w in ck_warnings(caplog) if url in w]
        assert warned, "constructing with an unreachable replica must log a WARNING naming it"
        assert nowhere in warned[0] and "AWS_ENDPOINT_URL" in warned[0]
        health = m.health()
        assert health[local] == "ok"
        assert health[url].startswith("degraded") and "ReplicaUnavailableError" in health[url]
        assert nowhere in health[url] and "AWS_ENDPOINT_URL" in health[url]
        h = m.save(1, make_net(8, 1))
        h.result(timeout=30)
        assert h.replicas[local].state == "committed" and h.replicas[url].state == "skipped"
    assert LocalReplica(local).size(commit_key(1)) is not None


@pytest.mark.parametrize("how", ["refused", "dns", "no answer"])
def test_unreachable_endpoint_is_an_outage_naming_the_endpoint(
    hung_endpoint: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    endpoint = {
        "refused": f"http://127.0.0.1:{free_port()}",
        "dns": "http://ckptmirror-no-such-host.invalid:9000",  # .invalid never resolves (RFC 2606)
        "no answer": hung_endpoint,
    }[how]
    point_aws_at(monkeypatch, endpoint)
    url = "s3://ckptmirror-any/run"
    r = S3Replica(url, **FAST)
    t0 = time.monotonic()
    try:
        with pytest.raises(ReplicaUnavailableError) as ei:
            r.list_steps()
    finally:
        r.close()
    assert time.monotonic() - t0 < 10
    assert not isinstance(ei.value, ReplicaConfigError)  # an outage: retried later, not raised by Mirror()
    msg = str(ei.value)
    assert url in msg and f"endpoint {endpoint}" in msg and "AWS_ENDPOINT_URL" in msg


def test_fsspec_unreachable_endpoint_starts_degraded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    point_aws_at(monkeypatch, f"http://127.0.0.1:{free_port()}")
    url = "fsspec+s3://ckptmirror-any/run"
    r = FsspecReplica(url, **FAST_FSSPEC)
    with pytest.raises(ReplicaUnavailableError, match="cannot reach.*AWS_ENDPOINT_URL"):
        r.list_steps()  # before: botocore's EndpointConnectionError, not even a ReplicaError
    local = str(tmp_path / "a")
    with Mirror([local, url], storage_options={"fsspec+s3": FAST_FSSPEC}, health_interval_s=60) as m:
        assert m.health()[url].startswith("degraded")
        h = m.save(1, make_net(8, 1))
        h.result(timeout=30)
        assert h.replicas[local].state == "committed" and h.replicas[url].state == "skipped"
        assert isinstance(h.replicas[url].error, ReplicaError)


def test_a_connection_dropped_mid_request_is_an_outage_not_damage() -> None:
    """A reset or a short body (the link dropped while an object's bytes came in) is an outage:
    verify lists the replica as unavailable (exit 2) instead of calling intact objects
    "unreadable" damage (exit 1), as a fault-proxy campaign found it did."""
    import aiohttp
    from botocore.exceptions import IncompleteReadError

    from ckptmirror.errors import ReplicaUnavailableError
    from ckptmirror.replicas._s3_errors import classify

    for exc in (
        ConnectionResetError(104, "Connection reset by peer"),
        aiohttp.ClientPayloadError("Response payload is not completed"),
        IncompleteReadError(actual_bytes=10, expected_bytes=100),
    ):
        verdict = classify(exc)
        assert verdict is not None and verdict.error is ReplicaUnavailableError, (exc, verdict)
        assert verdict.retry, exc  # still retried while the operation's budget lasts
