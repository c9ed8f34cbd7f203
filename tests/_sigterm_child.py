"""A training process for tests/test_sigterm.py: step 1 saved, then a slow save of step 2.

Usage: python tests/_sigterm_child.py ROOT DELAY_S [in-save]
The replica sleeps DELAY_S per object put (a slow disk) from step 2 on (step 1 is written at full
speed: it only has to be there), so step 2 is still being written when the test sends SIGTERM.
Prints "saving 2" once step 2's snapshot is taken, then trains forever.

``in-save``: the process sends itself SIGTERM from inside ``save(2)`` (a state_dict hook of the
model, so the handler runs between two bytecodes of that call, before anything is queued), as
a launcher's SIGTERM that lands while the training thread is copying the state does.
"""

from __future__ import annotations

import sys
import time

import torch

import ckptmirror
from ckptmirror.replicas import FaultyReplica, LocalReplica


def main() -> None:
    root, delay = sys.argv[1], float(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    replica = FaultyReplica(LocalReplica(root))
    m = ckptmirror.Mirror([replica], object_bytes=64 << 10, on_sigterm="flush", sigterm_timeout_s=60)
    m.save(1, model).result(timeout=120)
    replica.delay_s = delay  # the slow disk: step 2's puts (and its commit) wait DELAY_S each
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if sys.argv[3:] == ["in-save"]:
        import os
        import signal

        model.register_state_dict_post_hook(lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    m.save(2, model)
    print("saving 2", flush=True)
    while True:  # "training": the SIGTERM arrives here
        time.sleep(0.05)


if __name__ == "__main__":
    main()
