"""A commit record that reached some nodes only: several ranks restore the step, and save on.

Node-local replicas (each rank lists its own node's disk). Rank 1 is SIGKILLed after the ranks
decided to commit step 1 and before it wrote its copy of the record; rank 0 wrote its copy. Step 1
is recoverable (the record pins both ranks' manifests, and rank 1's manifest and objects are
durable on its own disk), so a restart must restore it on both ranks. Before, rank 1 saw no step
1 and the ranks settled on step 0; the job then trained step 1 again, rank 0 refused its save
(StepExistsError: committed on its disk) while rank 1 waited for it, and from then on the ranks'
saves never matched again: the job could not checkpoint any more (a kill campaign found it).
"""

from __future__ import annotations

from pathlib import Path

from _helpers import torchrun

CHILD = Path(__file__).resolve().parent / "_torn_commit_child.py"


def test_a_commit_record_on_one_node_only_is_restored_by_every_rank(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    torchrun(str(CHILD), "save", str(root), timeout=180, check=False)  # rank 1 dies by design
    assert (root / "node0" / "step-000000000001" / "COMMIT.json").exists()
    assert not (root / "node1" / "step-000000000001" / "COMMIT.json").exists()
    out = torchrun(str(CHILD), "resume", str(root), timeout=180).stdout
    for rank in (0, 1):
        assert f"rank {rank}: restored 1 exact True" in out, out
        for s in (2, 3):
            assert f"rank {rank}: save {s} committed" in out, out
