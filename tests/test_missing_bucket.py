"""A bucket that is gone when a replacement process starts: an outage when other replicas hold the run.

RELIABILITY #15 ("S3 server restarted and empty: training goes on with the other replicas; the
reader tolerates it") held only inside the process that had used the bucket: a fresh process
(a replacement node, a torchrun restart) opening ``Mirror([local, s3])`` got
``ReplicaConfigError`` ("bucket does not exist") and could not resume from its local disk until
someone recreated the bucket. A missing bucket is still an error where nothing else holds the
run (a typo in a new job's URL must not pass silently); where another replica holds committed
steps it is an outage (``ReplicaMissingError`` in the listing, a WARNING naming the bucket and the
fix), the replica is degraded, and it is used again once the bucket exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _helpers import S3Bucket, assert_bit_exact, ck_warnings, wait_until

from ckptmirror import Mirror, ReplicaConfigError, ReplicaMissingError, ops
from ckptmirror.replicas import LocalReplica
from ckptmirror.replicas.s3 import S3Replica
from ckptmirror.restore.discover import list_steps


def state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g).to(torch.bfloat16)}


def test_a_fresh_process_resumes_past_a_lost_bucket(
    tmp_path: Path,
    s3_url: str,
    moto_server: str,
    make_s3: Callable[..., S3Replica],
    caplog: pytest.LogCaptureFixture,
) -> None:
    local = str(tmp_path / "local")
    with Mirror([local, make_s3(s3_url)], keep_last=None) as m:
        for s in (1, 2):
            m.save_state(s, state(s)).result(timeout=60)
    bucket = S3Bucket(s3_url, moto_server)
    bucket.wipe()
    bucket.client.delete_bucket(Bucket=bucket.name)  # a test server restarted empty
    # The operator's view: verify reaches the holder and reports the bucket as unreachable.
    report = ops.verify([LocalReplica(local), make_s3(s3_url)])
    assert report.exit_code == 2 and list(report.unreachable) == [s3_url], report.unreachable
    assert "does not exist" in report.unreachable[s3_url]
    # A replacement process: new replica objects, which have never seen the bucket.
    s3 = make_s3(s3_url)
    with caplog.at_level(logging.WARNING, logger="ckptmirror"), Mirror([local, s3], health_interval_s=0.1) as m:
        said = " ".join(ck_warnings(caplog))
        assert f"bucket {bucket.name!r} does not exist" in said and "aws s3 mb" in said, said
        assert local in said  # which replica holds the run
        assert m.health()[s3.url].startswith("degraded")
        loaded = m.load_state()
        assert loaded is not None and loaded[0] == 2
        assert_bit_exact(loaded[1], state(2))
        h3 = m.save_state(3, state(3))
        h3.result(timeout=60)
        assert {u: st.state for u, st in h3.replicas.items()} == {local: "committed", s3.url: "skipped"}
        bucket.client.create_bucket(Bucket=bucket.name)  # the operator recreates it
        wait_until(lambda: m.health()[s3.url] == "ok", 30, what="S3 to be probed back")
        h4 = m.save_state(4, state(4))
        h4.result(timeout=60)
        assert {st.state for st in h4.replicas.values()} == {"committed"}
    with Mirror([make_s3(s3_url)]) as back:
        assert back.steps() == [4]
        loaded = back.load_state()
        assert loaded is not None and loaded[0] == 4
        assert_bit_exact(loaded[1], state(4))


def test_a_missing_bucket_is_still_an_error_where_nothing_holds_the_run(
    tmp_path: Path, make_bucket: Callable[[str], str], make_s3: Callable[..., S3Replica]
) -> None:
    typo = f"s3://{make_bucket('ckptmirror')}-typo/run"  # never created
    with pytest.raises(ReplicaMissingError, match="does not exist") as err:
        Mirror([str(tmp_path / "local"), make_s3(typo)])
    assert isinstance(err.value, ReplicaConfigError)  # what code that caught it before still catches
    assert "fix the replica URL" in str(err.value)
    # The listing alone, as restore and the operator commands see it: raised, not an empty run.
    with pytest.raises(ReplicaMissingError):
        list_steps([make_s3(typo)], timeout_s=5)
