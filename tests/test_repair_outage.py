"""repair stops copying to a replica that stopped answering during the run.

Each copy to a target that does not answer waits out its own time budget: a fault-proxy
campaign measured 45-66 s for a 100 MB state (and hours, at that rate, for a large one), and an
exit code of 1 (something could not be repaired) where the documented one for a replica that
stopped answering is 2. Now the first copy that meets the outage marks the target down; the
copies after it are skipped at once, saying why, and the exit code is 2.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from ckptmirror import Mirror, ops
from ckptmirror.errors import ReplicaUnavailableError
from ckptmirror.format import step_dir
from ckptmirror.replicas import FaultyReplica, LocalReplica

OBJ = 4 << 10


def test_repair_skips_copies_to_a_target_that_stopped_answering(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    state = {f"t{i}": torch.full((1024,), float(i)) for i in range(40)}  # 40 objects of 4 KiB
    with Mirror([str(a), str(b)], object_bytes=OBJ) as m:
        m.save_state(1, state).result(timeout=60)
    for f in sorted((b / step_dir(1)).rglob("*"), reverse=True):  # b lost the step
        f.unlink() if f.is_file() else f.rmdir()
    (b / step_dir(1)).rmdir()
    tried = 0
    lock = threading.Lock()

    def dead(phase: str, key: str) -> None:
        nonlocal tried
        if phase.startswith("put"):
            with lock:
                tried += 1
            raise ReplicaUnavailableError("put: no answer within its time budget (injected)", replica=str(b), key=key)

    target = FaultyReplica(LocalReplica(str(b)), on_phase=dead)
    report = ops.repair([LocalReplica(str(a)), target], threads=2)
    assert report.exit_code == 2, report
    assert str(b) in report.unreachable, report.unreachable
    copies = [x for x in report.actions if x.action == "copy"]
    assert len(copies) >= 40 and not any(x.done for x in copies)
    skipped = [x for x in copies if x.error and "stopped answering during this run" in x.error]
    assert tried <= 4 and len(skipped) >= len(copies) - 4, (tried, len(skipped), len(copies))
