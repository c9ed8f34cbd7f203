"""Shared fixtures: real servers on 127.0.0.1 (an S3 server and a peer agent, each started once
per session), fresh buckets and namespaces per test, S3Replica objects closed at teardown, and
the uninterrupted reference run of the DDP example (run once for the files that compare with it).

The helpers these build on are in ``_helpers.py`` (generic) and ``_agent.py`` (the peer agent).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _agent import AgentProc, agent, write_token
from _helpers import REPO, S3Bucket, answers, free_port, point_aws_at, torchrun

if TYPE_CHECKING:
    from ckptmirror.replicas.s3 import S3Replica

#: Set to an S3 endpoint URL (e.g. one CI started) to use it instead of starting moto here.
ENV_S3_ENDPOINT = "CKPTMIRROR_TEST_S3_ENDPOINT"
#: S3's minimum part size: the part size of the S3Replica objects the tests make.
S3_PART_BYTES = 5 << 20


# ------------------------------------------------------------------------------------ S3
@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Endpoint URL of an S3 server: ``$CKPTMIRROR_TEST_S3_ENDPOINT``, else a moto server process."""
    endpoint = os.environ.get(ENV_S3_ENDPOINT)
    if endpoint:
        yield endpoint
        return
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
def make_bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """``make_bucket(prefix="ckptmirror")`` creates a bucket on the test server and returns its name;
    the AWS environment points at that server. Buckets still there at teardown are emptied and removed."""
    point_aws_at(monkeypatch, moto_server)
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server)
    made: list[str] = []

    def make(prefix: str = "ckptmirror") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)
        made.append(name)
        return name

    yield make
    # Leave nothing behind (the server may be shared, and moto keeps everything in memory).
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for name in made:
        if name not in existing:
            continue  # the test deleted it
        for u in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=u["Key"], UploadId=u["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=obj["Key"])
        client.delete_bucket(Bucket=name)


@pytest.fixture
def s3_url(make_bucket: Callable[[str], str]) -> str:
    """``s3://<fresh bucket>/run``, with the AWS environment pointing at the test server."""
    return f"s3://{make_bucket('ckptmirror')}/run"


@pytest.fixture
def bucket(s3_url: str, moto_server: str) -> S3Bucket:
    """A boto3 view of the bucket and prefix of ``s3_url``."""
    return S3Bucket(s3_url, moto_server)


@pytest.fixture
def make_s3() -> Iterator[Callable[..., S3Replica]]:
    """``make_s3(url, **options)``: S3Replica objects (5 MiB parts, 10 s timeout, 2 retries unless
    given), caller-owned (a Mirror does not close them), closed at teardown. They store objects
    raw unless given ``compression="zstd"`` (the S3 default), so that tests can compare S3's bytes
    with a local replica's; tests/test_compression.py covers the compressed default."""
    from ckptmirror.replicas.s3 import S3Replica

    made: list[S3Replica] = []

    def make(url: str, compression: str = "none", **kw: Any) -> S3Replica:
        r = S3Replica(url, **{"part_bytes": S3_PART_BYTES, "timeout_s": 10, "retries": 2, **kw})
        r.compression = compression
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


# ---------------------------------------------------------------------------- peer agent
@pytest.fixture(scope="session")
def peer_token_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A token file (mode 0600) holding ``_agent.TOKEN``."""
    return write_token(tmp_path_factory.mktemp("token") / "token")


@pytest.fixture(scope="session")
def peer_agent(tmp_path_factory: pytest.TempPathFactory, peer_token_file: str) -> Iterator[AgentProc]:
    """One ``ckptmirror serve`` process for the session (token ``_agent.TOKEN``, idle timeout 2 s,
    no free-space reserve: the tests must not depend on how full the temp disk is; default
    limits otherwise); every test uses namespaces of its own."""
    base = tmp_path_factory.mktemp("peer-agent")
    args = ["--idle-timeout-s", "2", "--reserve-free-bytes", "0"]
    with agent(base / "root", token_file=peer_token_file, args=args) as a:
        yield a


@pytest.fixture
def peer_url(peer_agent: AgentProc) -> str:
    """``peer://127.0.0.1:PORT/<fresh namespace>`` on the session's agent."""
    return peer_agent.url(f"ns-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def no_peer_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """``CKPTMIRROR_PEER_TOKEN`` unset: clients get their token only where the test gives one."""
    from ckptmirror.replicas.peer import TOKEN_ENV

    monkeypatch.delenv(TOKEN_ENV, raising=False)


# --------------------------------------------------------------------------- torchrun DDP
@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference of the DDP example (``examples/torchrun_ddp.py``): 2 ranks under real
    torchrun, 20 steps, saving every 5 to its default replicas (``node{node_rank}-local`` and
    ``shared``), never interrupted. Its loss logs and final digests are what a crashed or
    resumed run must reproduce; checkpointing does not change the training, so one run serves
    tests/test_distributed.py and tests/test_distributed_s3.py. Tests only read it."""
    root = tmp_path_factory.mktemp("ddp-ref")
    torchrun(str(REPO / "examples" / "torchrun_ddp.py"), "--ckpt", str(root), "--steps", "20")
    return root
