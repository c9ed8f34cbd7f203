"""A replacement node resumes from S3: 2-rank DDP under real torchrun (gloo, CPU) with a
node-local replica and an S3 replica (a moto server, see ``conftest.py``).

The job checkpoints to both; the node-local directory is then deleted (the node is lost and a
fresh one takes its place), and the job resumes from the S3 copy with exactly the losses and
final state of a run that was never interrupted.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _helpers import REPO, read_losses, torchrun

import ckptmirror

EXAMPLE = REPO / "examples" / "torchrun_ddp.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def test_replacement_node_resumes_from_s3_with_identical_losses(
    s3_url: str, tmp_path: Path, ddp_reference: Path
) -> None:
    # The reference: 20 steps, never interrupted (conftest.py's ddp_reference, shared with
    # tests/test_distributed.py: where it checkpoints does not change its losses).
    ref, run = ddp_reference, tmp_path / "run"
    run.mkdir()
    local = str(run / "node{node_rank}-local")

    # The job: 10 steps, checkpoints (every 5) to the node-local directory and to S3.
    torchrun(str(EXAMPLE), "--ckpt", str(run), "--steps", "10", "--replicas", f"{local},{s3_url}", timeout=120)
    assert (run / "node0-local").is_dir()
    with ckptmirror.Mirror([s3_url]) as m:
        assert m.steps()[-1] == 10, f"step 10 must be committed on S3: {m.steps()}"

    # The node is lost: its disk is gone. A fresh node runs the job on to step 20.
    shutil.rmtree(run / "node0-local")
    torchrun(str(EXAMPLE), "--ckpt", str(run), "--steps", "20", "--replicas", f"{local},{s3_url}", timeout=120)

    for rank in (0, 1):
        want, want_events = read_losses(ref / f"losses-rank{rank}.jsonl", once=True)
        got, events = read_losses(run / f"losses-rank{rank}.jsonl", once=True)
        resumed = [e for e in events if "resumed_from" in e]
        assert len(resumed) == 1, f"rank {rank}: {events}"
        assert resumed[0]["resumed_from"] == 10, f"rank {rank}: {resumed}"
        assert resumed[0]["sources"] == [s3_url], f"rank {rank}: restored from {resumed[0]['sources']}, not only S3"
        assert sorted(got) == list(range(1, 21)), f"rank {rank}: steps logged {sorted(got)}"
        assert sorted(want) == list(range(1, 21))
        diff = {s: (got[s], want[s]) for s in want if got[s] != want[s]}
        assert not diff, f"rank {rank}: losses differ from the uninterrupted run: {diff}"
        # And the final model + optimizer state is bit-identical (xxh3 over every tensor).
        digest = [e["final_digest"] for e in events if "final_digest" in e][-1]
        assert digest == [e["final_digest"] for e in want_events if "final_digest" in e][-1], (
            f"rank {rank}: final state differs"
        )

    # The resumed run checkpointed again to both replicas.
    assert (run / "node0-local").is_dir()
    with ckptmirror.Mirror([s3_url]) as m:
        assert m.steps()[-1] == 20, m.steps()
