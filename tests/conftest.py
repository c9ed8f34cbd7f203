"""Shared fixtures: real servers on 127.0.0.1, started once per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

#: Set to an S3 endpoint URL (e.g. one CI started) to use it instead of starting moto here.
ENV_S3_ENDPOINT = "CKPTMIRROR_TEST_S3_ENDPOINT"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Endpoint URL of an S3 server: ``$CKPTMIRROR_TEST_S3_ENDPOINT``, else a moto server process."""
    endpoint = os.environ.get(ENV_S3_ENDPOINT)
    if endpoint:
        yield endpoint
        return
    pytest.importorskip("moto.server", reason="S3 tests need moto[server]")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while not _answers(endpoint):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(
                        f"moto server on port {port} did not start:\n{log.read().decode(errors='replace')[-2000:]}"
                    )
                time.sleep(0.1)
            yield endpoint
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def s3_url(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``s3://<fresh bucket>/run``, with the AWS environment pointing at the test server."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    nowhere = os.path.join(tempfile.gettempdir(), f"no-aws-config-{uuid.uuid4().hex}")
    monkeypatch.setenv("AWS_CONFIG_FILE", nowhere)  # keep the developer's ~/.aws out of the tests
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server)
    bucket = f"ckptmirror-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/run"
    # Leave nothing behind (the server may be shared, and moto keeps everything in memory).
    for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)
