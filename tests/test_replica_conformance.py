"""One conformance suite for every replica backend, plus what only S3 can get wrong.

Every test taking ``backend`` runs against: a local directory (LocalReplica, and again with
its ``direct_io`` option), an in-memory
store (MemoryReplica), a real moto S3 server on 127.0.0.1 (S3Replica), a local directory
through fsspec (FsspecReplica), and a real ``ckptmirror serve`` agent process on 127.0.0.1
(PeerReplica; the session's agent of conftest.py, one namespace per test).

Commit records are written with ``commit()`` (a peer agent refuses them through ``put()``) and
are real ones (:func:`_commit_record`) naming a rank manifest and an object written first
(:func:`_write_step`): a peer agent accepts a commit only when everything it names is present
and verifies; the other backends store any bytes.

The S3 tests at the end inject faults by wrapping ``S3Replica._send``, the one place a request
leaves the replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from _agent import AgentProc
from _helpers import S3Bucket, free_port, takes_o_direct
from botocore.exceptions import ClientError

from ckptmirror import Mirror
from ckptmirror.checksum import checksum
from ckptmirror.errors import (
    CorruptObjectError,
    ManifestError,
    ObjectMissingError,
    ReplicaConfigError,
    ReplicaError,
    ReplicaPermissionError,
    ReplicaUnavailableError,
    StepExistsError,
)
from ckptmirror.format import (
    CommitRecord,
    LeafRecord,
    ObjectRecord,
    RankManifest,
    RankRef,
    StorageRecord,
    commit_key,
    object_key,
    rank_manifest_key,
    step_dir,
)
from ckptmirror.replicas import LocalReplica, MemoryReplica, Replica, open_replica
from ckptmirror.replicas.fsspec_replica import FsspecReplica
from ckptmirror.replicas.peer import TOKEN_ENV, PeerReplica
from ckptmirror.replicas.s3 import S3Replica

MiB = 1 << 20
PART = 5 * MiB  # S3's minimum part size


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    name: str
    url: str  # what open_replica() and Mirror() accept
    make: Callable[..., Replica]  # a new client on the same storage


@pytest.fixture(params=["local", "local-direct", "memory", "s3", "fsspec", "peer"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Backend]:
    name = request.param
    if name == "local":
        yield Backend(name, str(tmp_path / "replica"), lambda **kw: LocalReplica(str(tmp_path / "replica"), **kw))
    elif name == "local-direct":  # the direct_io option (O_DIRECT writes); its URL form gets it from storage_options
        if not takes_o_direct(tmp_path):
            pytest.skip(f"{tmp_path} refuses O_DIRECT")
        yield Backend(
            name, str(tmp_path / "replica"), lambda **kw: LocalReplica(str(tmp_path / "replica"), direct_io=True, **kw)
        )
    elif name == "memory":
        url = f"memory://conformance-{uuid.uuid4().hex}"
        yield Backend(name, url, lambda: MemoryReplica(url))
        MemoryReplica.reset(url.split("://", 1)[1])
    elif name == "s3":
        url = request.getfixturevalue("s3_url")
        make_s3 = request.getfixturevalue("make_s3")
        yield Backend(name, url, lambda **kw: make_s3(url, **{"retries": 5, **kw}))  # the default retries
    elif name == "fsspec":
        url = f"fsspec+file://{tmp_path / 'replica'}"
        yield Backend(name, url, lambda **kw: FsspecReplica(url, **kw))
    else:
        agent: AgentProc = request.getfixturevalue("peer_agent")
        url = request.getfixturevalue("peer_url")
        # open_replica(url) and Mirror([url]) take the agent's token from the environment.
        request.getfixturevalue("monkeypatch").setenv(TOKEN_ENV, agent.token)
        yield Backend(name, url, lambda **kw: PeerReplica(url, **{"token": agent.token, "timeout_s": 10, **kw}))


@pytest.fixture
def replica(backend: Backend) -> Iterator[Replica]:
    r = backend.make()
    yield r
    if backend.name == "local-direct":
        assert isinstance(r, LocalReplica) and r.direct_io, "O_DIRECT was refused: the case ran buffered"
    r.close()


def _payload(n: int, seed: int = 0) -> bytes:
    return (
        torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()
    )


TOKEN = "0123abcd"  # the writer's per-save token in object and manifest names
OBJ = object_key(1, 0, 0, TOKEN)
MANIFEST = rank_manifest_key(1, 0, TOKEN)
COMMIT = commit_key(1)


def _manifest(step: int, data: bytes) -> bytes:
    """A rank manifest of ``step`` whose one object (rank 0, index 0) holds ``data``."""
    obj = ObjectRecord(object_key(step, 0, 0, TOKEN), len(data), checksum(data))
    # One uint8 tensor over the whole stream: storages must tile the objects' bytes (format v2).
    storage = StorageRecord(0, len(data))
    leaf = LeafRecord("tensor", 0, "uint8", (len(data),), (1,), 0)
    structure = {"t": "tensor", "i": 0}
    return RankManifest(step, 0, 1, (obj,), (storage,), (leaf,), structure, created_unix=0.0).to_json()


def _write_step(r: Replica, step: int = 1, data: bytes = b"abc") -> None:
    """The object and the rank manifest that :func:`_commit_record` names."""
    r.put(object_key(step, 0, 0, TOKEN), data)
    r.put(rank_manifest_key(step, 0, TOKEN), _manifest(step, data))


def _commit_record(step: int = 1, data: bytes = b"abc", writer: int = 0) -> bytes:
    """A valid commit record of ``step`` pinning :func:`_write_step`'s manifest; records of
    different ``writer`` values differ (in their creation time)."""
    manifest = _manifest(step, data)
    ref = RankRef(0, rank_manifest_key(step, 0, TOKEN), len(manifest), checksum(manifest))
    return CommitRecord(step, 1, (ref,), created_unix=float(writer)).to_json()


# ------------------------------------------------------------------------ the contract


def test_put_get_read_into_round_trip(replica: Replica) -> None:
    data = _payload(1000)
    replica.put(OBJ, data)
    replica.put(MANIFEST, b'{"x": 1}')
    assert replica.get(MANIFEST, 1 << 20) == b'{"x": 1}'
    assert replica.size(OBJ) == 1000
    out = bytearray(1000)
    replica.read_into(OBJ, memoryview(out))
    assert bytes(out) == data
    empty = object_key(1, 0, 1, TOKEN)
    replica.put(empty, b"")
    assert replica.size(empty) == 0
    replica.read_into(empty, memoryview(bytearray(0)))


def test_multipart_object_from_a_view_of_a_larger_buffer(backend: Backend, replica: Replica) -> None:
    # ~12 MiB in 5 MiB parts on S3; the data is a window of a bigger buffer, as the writer passes it.
    big = bytearray(_payload(13 * MiB, seed=1))
    n = 12 * MiB + 12345
    replica.put(OBJ, memoryview(big)[777 : 777 + n])
    assert replica.size(OBJ) == n
    dest = torch.zeros(n + 64, dtype=torch.uint8)  # read into a window of a bigger tensor, like the reader
    replica.read_into(OBJ, memoryview(dest.numpy())[32 : 32 + n])
    assert dest.numpy()[32 : 32 + n].tobytes() == bytes(big[777 : 777 + n])
    assert not dest[:32].any() and not dest[32 + n :].any()
    if backend.name == "s3":  # a second client with other part sizes reads it the same
        other = backend.make(part_bytes=6 * MiB, max_concurrency=2)
        out = bytearray(n)
        other.read_into(OBJ, memoryview(out))
        assert out == big[777 : 777 + n]


def test_read_into_size_mismatch_is_corrupt(replica: Replica) -> None:
    replica.put(OBJ, _payload(100))
    for wrong in (99, 101, 0):
        with pytest.raises(CorruptObjectError) as ei:
            replica.read_into(OBJ, memoryview(bytearray(wrong)))
        assert OBJ in str(ei.value)


def test_get_refuses_objects_over_max_bytes(replica: Replica) -> None:
    replica.put(MANIFEST, b"x" * 100)
    with pytest.raises(CorruptObjectError):
        replica.get(MANIFEST, 99)
    assert replica.get(MANIFEST, 100) == b"x" * 100


def test_missing_object(replica: Replica) -> None:
    assert replica.size(OBJ) is None
    with pytest.raises(ObjectMissingError) as ei:
        replica.get(OBJ, 100)
    assert isinstance(ei.value, FileNotFoundError) and OBJ in str(ei.value)


def test_read_into_missing_object(replica: Replica) -> None:
    with pytest.raises(FileNotFoundError):
        replica.read_into(OBJ, memoryview(bytearray(10)))


def test_commit_is_create_if_absent(replica: Replica) -> None:
    _write_step(replica)
    first, second = _commit_record(writer=1), _commit_record(writer=2)
    replica.commit(COMMIT, first)
    with pytest.raises(StepExistsError) as ei:
        replica.commit(COMMIT, second)
    assert isinstance(ei.value, FileExistsError) and ei.value.step == 1
    assert replica.get(COMMIT, 1 << 16) == first


def test_listing(replica: Replica) -> None:
    assert replica.list_steps() == []
    assert replica.list_prefix(step_dir(1)) == []
    keys = [
        object_key(1, 0, 0, TOKEN),
        object_key(1, 0, 1, TOKEN),
        rank_manifest_key(1, 0, TOKEN),
        commit_key(1),
        object_key(2, 3, 0, TOKEN),
    ]
    _write_step(replica)  # keys[0] and keys[2]
    replica.put(keys[1], b"x")
    replica.commit(keys[3], _commit_record())
    replica.put(keys[4], b"x")
    assert replica.list_steps() == [step_dir(1), step_dir(2)]
    assert replica.list_prefix(step_dir(1)) == sorted(keys[:4])
    assert replica.list_prefix(step_dir(2)) == [object_key(2, 3, 0, TOKEN)]
    assert replica.list_prefix(f"{step_dir(2)}/rank-00003") == [object_key(2, 3, 0, TOKEN)]


def test_delete_and_delete_prefix(replica: Replica) -> None:
    _write_step(replica)  # OBJ and MANIFEST
    replica.commit(COMMIT, _commit_record())
    replica.put(object_key(2, 0, 0, TOKEN), b"x")
    replica.delete(COMMIT)
    replica.delete(COMMIT)  # absent: ignored
    assert replica.size(COMMIT) is None
    replica.delete_prefix(step_dir(1))
    replica.delete_prefix(step_dir(7))  # absent: ignored
    assert replica.list_prefix(step_dir(1)) == []
    assert replica.size(OBJ) is None
    assert replica.list_steps() == [step_dir(2)]
    assert replica.size(object_key(2, 0, 0, TOKEN)) == 1


BAD_KEYS = [
    "../escape",
    "step-000000000001/../../x",
    "/abs/path",
    "a\x00b",
    "a//b",
    "a\\b",
    "",
    "./x",
    "step/..",
    "x\n",
]
OPS: dict[str, Callable[[Replica, str], Any]] = {
    "put": lambda r, k: r.put(k, b"x"),
    "commit": lambda r, k: r.commit(k, b"x"),
    "get": lambda r, k: r.get(k, 10),
    "read_into": lambda r, k: r.read_into(k, memoryview(bytearray(1))),
    "size": lambda r, k: r.size(k),
    "list_prefix": lambda r, k: r.list_prefix(k),
    "delete": lambda r, k: r.delete(k),
    "delete_prefix": lambda r, k: r.delete_prefix(k),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_unsafe_keys_rejected_before_the_backend(backend: Backend, replica: Replica, op: str) -> None:
    # The network backends fail the test if a request leaves the replica at all.
    if isinstance(replica, S3Replica):

        async def no_s3_requests(method: str, **kw: Any) -> Any:
            raise AssertionError(f"{method} sent for an unsafe key")

        replica._send = no_s3_requests  # type: ignore[method-assign]
    elif isinstance(replica, PeerReplica):

        def no_peer_requests(method: str, path: str, *args: Any, **kw: Any) -> Any:
            raise AssertionError(f"{method} {path} sent for an unsafe key")

        replica._request = no_peer_requests  # type: ignore[method-assign]
    for key in BAD_KEYS:
        with pytest.raises(ManifestError):
            OPS[op](replica, key)
    vars(replica).pop("_send", None)  # requests may go out again
    vars(replica).pop("_request", None)
    assert replica.list_steps() == []


def test_another_client_sees_writes_at_once(backend: Backend, replica: Replica) -> None:
    # Listing caches (s3fs's dircache, fsspec's) must never hide a step another client wrote.
    assert replica.list_steps() == [] and replica.size(COMMIT) is None
    other = backend.make()
    _write_step(other, data=b"abc")  # OBJ and MANIFEST
    record = _commit_record(data=b"abc")
    other.commit(COMMIT, record)
    assert replica.list_steps() == [step_dir(1)]
    assert replica.list_prefix(step_dir(1)) == sorted([OBJ, MANIFEST, COMMIT])
    assert replica.size(OBJ) == 3 and replica.size(COMMIT) == len(record)
    other.delete(COMMIT)
    assert replica.size(COMMIT) is None
    other.delete_prefix(step_dir(1))
    assert replica.list_steps() == []
    other.close()


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(64, 64)
        self.b = torch.nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("by", ["url", "object"])
def test_mirror_save_restore(backend: Backend, by: str) -> None:
    if by == "url" and backend.name == "local-direct":
        pytest.skip("a bare URL opens a plain local replica: the 'local' case")
    target = backend.url if by == "url" else backend.make()
    torch.manual_seed(0)
    model = _Net()
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 64)).sum().backward()
    optim.step()
    with Mirror([target], keep_last=2, object_bytes=4096) as m:  # several objects per step
        for step in (1, 2, 3):
            m.save(step, model, optim, extra={"step": step}).result()
        m.wait()  # retention runs after the commit
        assert m.steps() == [2, 3]
    fresh = _Net()
    fresh_optim = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    with Mirror([target if by == "object" else backend.url]) as m:
        got = m.restore(fresh, fresh_optim)
    assert got is not None and got.step == 3 and got.extra == {"step": 3}
    for (k, v), (_, w) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(v, w), k
    assert fresh_optim.state_dict()["state"][0]["exp_avg"].equal(optim.state_dict()["state"][0]["exp_avg"])


def test_open_replica_dispatch(backend: Backend) -> None:
    if backend.name == "local-direct":
        pytest.skip("a bare URL opens a plain local replica: the 'local' case")
    r = open_replica(backend.url)
    expected = {
        "local": LocalReplica,
        "local-direct": LocalReplica,
        "memory": MemoryReplica,
        "s3": S3Replica,
        "fsspec": FsspecReplica,
        "peer": PeerReplica,
    }[backend.name]
    assert type(r) is expected
    r.close()


# ---------------------------------------------------------------------- S3 only


def _client_error(code: str, status: int, op: str = "PutObject") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": f"injected {code}"}, "ResponseMetadata": {"HTTPStatusCode": status}}, op
    )


class _Injecting(S3Replica):
    """S3Replica whose requests go through ``self.hook(method, kwargs, send)``."""

    backoff_s = 0.01

    def __init__(self, url: str, hook: Callable[..., Any], **kw: Any) -> None:
        super().__init__(url, **{"part_bytes": PART, "timeout_s": 10, **kw})
        self.hook = hook
        self.calls: list[str] = []

    async def _send(self, method: str, **kwargs: Any) -> Any:
        self.calls.append(method)
        return await self.hook(method, kwargs, super()._send)


def _nothing_left(bucket: S3Bucket) -> None:
    """No object under the prefix, and no open multipart upload in the bucket."""
    assert bucket.sizes() == {}
    assert bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []) == []


def test_s3_missing_bucket_is_a_config_error_and_named(s3_url: str) -> None:
    r = S3Replica("s3://no-such-bucket-ckptmirror/run", retries=0)
    for op in (r.list_steps, lambda: r.put(OBJ, b"x"), lambda: r.get(OBJ, 10), lambda: r.delete_prefix(step_dir(1))):
        with pytest.raises(ReplicaConfigError, match="no-such-bucket-ckptmirror"):
            op()


def test_s3_endpoint_down_is_unavailable_fast(s3_url: str) -> None:
    port = free_port()  # nobody listens on it
    r = S3Replica(s3_url, endpoint_url=f"http://127.0.0.1:{port}", timeout_s=2, retries=1)
    t0 = time.monotonic()
    for op in (r.list_steps, lambda: r.put(OBJ, b"x"), lambda: r.size(OBJ), lambda: r.commit(COMMIT, b"c")):
        with pytest.raises(ReplicaUnavailableError, match="reach the endpoint"):
            op()
    assert time.monotonic() - t0 < 10


def test_s3_multipart_failure_leaves_nothing(s3_url: str, bucket: S3Bucket) -> None:
    async def hook(method: str, kw: dict[str, Any], send: Any) -> Any:
        if method == "upload_part" and kw["PartNumber"] == 2:
            raise _client_error("InvalidPart", 400, "UploadPart")  # not retryable
        return await send(method, **kw)

    r = _Injecting(s3_url, hook, max_concurrency=1)
    with pytest.raises(ReplicaError, match="InvalidPart"):
        r.put(OBJ, _payload(12 * MiB))
    assert "abort_multipart_upload" in r.calls and "complete_multipart_upload" not in r.calls
    assert r.size(OBJ) is None
    _nothing_left(bucket)


def test_s3_completion_error_aborts(s3_url: str, bucket: S3Bucket) -> None:
    # A CompleteMultipartUpload that answers 200 with an error body reaches us as an error
    # (botocore turns it into a 500): retried, then the upload is aborted.
    async def hook(method: str, kw: dict[str, Any], send: Any) -> Any:
        if method == "complete_multipart_upload":
            raise _client_error("InternalError", 500, "CompleteMultipartUpload")
        return await send(method, **kw)

    r = _Injecting(s3_url, hook, retries=2)
    with pytest.raises(ReplicaError, match="InternalError"):
        r.put(OBJ, _payload(11 * MiB))
    assert r.calls.count("complete_multipart_upload") == 3
    _nothing_left(bucket)

    async def no_etag(method: str, kw: dict[str, Any], send: Any) -> Any:
        return {} if method == "complete_multipart_upload" else await send(method, **kw)

    r = _Injecting(s3_url, no_etag)
    with pytest.raises(ReplicaError, match="without an ETag"):
        r.put(OBJ, _payload(11 * MiB))
    _nothing_left(bucket)


def test_s3_throttling_is_retried_with_backoff(s3_url: str) -> None:
    failures = {"n": 2}

    async def hook(method: str, kw: dict[str, Any], send: Any) -> Any:
        if method == "put_object" and failures["n"]:
            failures["n"] -= 1
            raise _client_error("SlowDown", 503)
        return await send(method, **kw)

    r = _Injecting(s3_url, hook, retries=3)
    r.put(OBJ, b"data")
    assert r.calls.count("put_object") == 3 and r.get(OBJ, 10) == b"data"

    # Throttling is not counted against `retries`: a server that throttles every other request
    # still takes every write and read (with six attempts, a 50% SlowDown failed within ~3 s).
    seen = {"n": 0}

    async def half(method: str, kw: dict[str, Any], send: Any) -> Any:
        seen["n"] += 1
        if seen["n"] % 2 or seen["n"] <= 6:  # six in a row first, then every other one
            raise _client_error("SlowDown", 503)
        return await send(method, **kw)

    r = _Injecting(s3_url, half, retries=0)
    r.put(OBJ, b"half")
    assert r.calls.count("put_object") == 8
    assert r.get(OBJ, 10) == b"half"

    # Throttled for the whole budget: an outage (the replica is skipped, degraded and probed),
    # naming the throttling as the last error.
    async def always(method: str, kw: dict[str, Any], send: Any) -> Any:
        raise _client_error("SlowDown", 503)

    r = _Injecting(s3_url, always, retries=2, connect_timeout_s=1.0, timeout_s=None)
    t0 = time.monotonic()
    with pytest.raises(ReplicaUnavailableError, match="time budget.*SlowDown"):
        r.put(OBJ, b"data")
    assert 0.5 < time.monotonic() - t0 < 5 and r.calls.count("put_object") > 3


def test_s3_other_errors_keep_their_retry_limit(s3_url: str) -> None:
    async def always(method: str, kw: dict[str, Any], send: Any) -> Any:
        raise _client_error("InternalError", 500)

    r = _Injecting(s3_url, always, retries=2)
    with pytest.raises(ReplicaError, match="transient server error.*after 3 attempts") as ei:
        r.put(OBJ, b"data")
    assert not isinstance(ei.value, ReplicaUnavailableError) and r.calls.count("put_object") == 3


def test_s3_answers_without_content_length_are_read_and_checked(s3_url: str) -> None:
    # A gateway that re-sends GET bodies chunked gives no Content-Length (a bare KeyError before).
    async def chunked(method: str, kw: dict[str, Any], send: Any) -> Any:
        resp = await send(method, **kw)
        if method == "get_object":
            resp.pop("ContentLength", None)
        return resp

    r = _Injecting(s3_url, chunked)
    small, big = _payload(1000), _payload(3 * PART + 17)
    r.put(OBJ, small)
    assert r.get(OBJ, 1000) == small
    with pytest.raises(CorruptObjectError, match="more than the 999 bytes allowed"):
        r.get(OBJ, 999)
    out = bytearray(len(small))
    r.read_into(OBJ, memoryview(out))
    assert bytes(out) == small
    r.put(OBJ, big)  # ranged reads
    out = bytearray(len(big))
    r.read_into(OBJ, memoryview(out))
    assert bytes(out) == big

    async def no_head_size(method: str, kw: dict[str, Any], send: Any) -> Any:
        resp = await send(method, **kw)
        if method == "head_object":
            resp.pop("ContentLength", None)
        return resp

    r = _Injecting(s3_url, no_head_size)
    with pytest.raises(ReplicaError, match="HEAD answered without a Content-Length") as ei:
        r.size(OBJ)
    assert OBJ in str(ei.value)


def test_s3_bare_400_on_head_names_the_credentials_and_region(s3_url: str) -> None:
    async def expired(method: str, kw: dict[str, Any], send: Any) -> Any:
        raise _client_error("400", 400, "HeadObject")  # what botocore makes of a bodiless 400

    r = _Injecting(s3_url, expired)
    with pytest.raises(ReplicaPermissionError, match="expired or invalid session token.*AWS_SESSION_TOKEN.*region"):
        r.size(OBJ)

    async def bad_argument(method: str, kw: dict[str, Any], send: Any) -> Any:
        raise _client_error("InvalidArgument", 400)  # a 400 with a code of its own: not that

    r = _Injecting(s3_url, bad_argument)
    with pytest.raises(ReplicaError, match="InvalidArgument") as ei2:
        r.put(OBJ, b"x")
    assert not isinstance(ei2.value, ReplicaPermissionError)


def test_s3_a_stalled_upload_start_is_cut_at_the_connect_budget(s3_url: str) -> None:
    # CreateMultipartUpload is one small request: a stalled one is cut after connect_timeout_s and
    # retried, not left to wait out the budget of the whole (large) object.
    stalled = {"n": 1}

    async def hook(method: str, kw: dict[str, Any], send: Any) -> Any:
        if method == "create_multipart_upload" and stalled["n"]:
            stalled["n"] -= 1
            await asyncio.sleep(60)
        return await send(method, **kw)

    r = _Injecting(s3_url, hook, connect_timeout_s=1.0, min_bytes_per_s=1 << 20, timeout_s=None)
    data = _payload(3 * PART)  # a budget of 1 s + 3 x PART at 1 MiB/s
    t0 = time.monotonic()
    r.put(OBJ, data)
    took = time.monotonic() - t0
    # At least one retry (a loaded machine's moto may answer the retry after the 1 s budget too:
    # one CI run saw 3), and the whole put within the object's budget, not the 60 s stall.
    assert r.calls.count("create_multipart_upload") >= 2 and took < 1.0 + 3 * PART / (1 << 20), took
    assert r.size(OBJ) == len(data)


def test_s3_access_denied_names_bucket_and_key(s3_url: str) -> None:
    async def hook(method: str, kw: dict[str, Any], send: Any) -> Any:
        raise _client_error("AccessDenied", 403, "GetObject")

    r = _Injecting(s3_url, hook)
    with pytest.raises(ReplicaError, match="permission denied") as ei:
        r.get(OBJ, 10)
    bucket = s3_url.split("/")[2]
    assert f"s3://{bucket}/run/{OBJ}" in str(ei.value) and r.calls == ["get_object"]  # not retried


def test_s3_every_attempt_has_a_timeout(s3_url: str) -> None:
    async def stall(method: str, kw: dict[str, Any], send: Any) -> Any:
        import asyncio

        await asyncio.sleep(30)

    r = _Injecting(s3_url, stall, timeout_s=0.2, retries=1)
    t0 = time.monotonic()
    with pytest.raises(ReplicaError, match="timed out after 2 attempts"):
        r.size(OBJ)
    assert time.monotonic() - t0 < 5


def test_s3_delete_prefix_aborts_abandoned_uploads(s3_url: str, bucket: S3Bucket) -> None:
    bucket.client.create_multipart_upload(Bucket=bucket.name, Key=bucket.full(OBJ))  # a writer killed mid-upload
    bucket.client.create_multipart_upload(Bucket=bucket.name, Key=bucket.full(object_key(2, 0, 0, TOKEN)))
    S3Replica(s3_url).delete_prefix(step_dir(1))
    left = [u["Key"] for u in bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])]
    assert left == [bucket.full(object_key(2, 0, 0, TOKEN))]


def test_s3_concurrent_commits_exactly_one_wins(s3_url: str) -> None:
    writers = [S3Replica(s3_url) for _ in range(4)]
    for i, w in enumerate(writers):  # each probes conditional-write support before the race
        w.commit(commit_key(1000 + i), b"warm-up")

    def run(i: int, w: S3Replica, step: int, barrier: threading.Barrier, outcome: dict[int, str]) -> None:
        barrier.wait()
        try:
            w.commit(commit_key(step), f"writer {i}".encode())
            outcome[i] = "won"
        except StepExistsError:
            outcome[i] = "lost"

    for step in range(1, 11):
        barrier = threading.Barrier(len(writers))
        outcome: dict[int, str] = {}
        threads = [threading.Thread(target=run, args=(i, w, step, barrier, outcome)) for i, w in enumerate(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, o in outcome.items() if o == "won"]
        assert len(winners) == 1 and len(outcome) == len(writers), outcome
        assert writers[0].get(commit_key(step), 100) == f"writer {winners[0]}".encode()


def test_s3_commit_falls_back_when_conditional_writes_are_ignored(
    s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # moto honours If-None-Match; a server that silently ignores it is simulated by dropping it.
    async def ignore(method: str, kw: dict[str, Any], send: Any) -> Any:
        kw.pop("IfNoneMatch", None)
        return await send(method, **kw)

    r = _Injecting(s3_url, ignore)
    with caplog.at_level(logging.WARNING, logger="ckptmirror"):
        r.commit(COMMIT, b"first")
        with pytest.raises(StepExistsError):
            r.commit(COMMIT, b"second")
        r.commit(commit_key(2), b"another")
    warnings = [rec for rec in caplog.records if "conditional writes" in rec.getMessage()]
    assert len(warnings) == 1 and "ignored If-None-Match" in warnings[0].getMessage()
    assert r.get(COMMIT, 100) == b"first"
    assert r.list_steps() == [step_dir(1), step_dir(2)]  # the probe object left nothing behind

    async def not_implemented(method: str, kw: dict[str, Any], send: Any) -> Any:
        if "IfNoneMatch" in kw:
            raise _client_error("NotImplemented", 501)
        return await send(method, **kw)

    r = _Injecting(s3_url, not_implemented)
    r.commit(commit_key(3), b"c")
    with pytest.raises(StepExistsError):
        r.commit(commit_key(3), b"d")


def test_s3_retried_commit_that_landed_is_not_a_conflict(s3_url: str) -> None:
    # The first PUT reaches the server but its answer is lost; the retry gets 412 for our own commit.
    lost = {"n": 1}

    async def hook(method: str, kw: dict[str, Any], send: Any) -> Any:
        out = await send(method, **kw)
        if method == "put_object" and kw.get("Key", "").endswith("COMMIT.json") and lost["n"]:
            lost["n"] -= 1
            raise ConnectionResetError("answer lost")
        return out

    r = _Injecting(s3_url, hook)
    r.commit(COMMIT, b"mine")
    assert r.get(COMMIT, 100) == b"mine"


def test_s3_uses_standard_aws_environment(s3_url: str, moto_server: str) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == moto_server
    r = S3Replica(s3_url)  # no explicit endpoint or credentials
    r.put(OBJ, b"x")
    assert r.fs.endpoint_url is None and r.size(OBJ) == 1
