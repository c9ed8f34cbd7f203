"""The restore path, in the order the data takes it. Nothing here imports the save path.

1. :mod:`~ckptmirror.restore.discover`: list the committed (and torn) steps on every replica.
2. :mod:`~ckptmirror.restore.choose`: try steps newest first, agree across ranks, fall back.
3. :mod:`~ckptmirror.restore.fetch`: read commit, manifest and objects from the replica that
   holds verifying copies (checksums on every byte).
4. :mod:`~ckptmirror.restore.check`: validate a manifest before any tensor is touched.
5. :mod:`~ckptmirror.restore.match`: match the stored leaves to the caller's tensors, and
   decide where each storage's bytes land.
6. :mod:`~ckptmirror.restore.fill`: read the objects (:mod:`~ckptmirror.restore.reads`) and
   fill the caller's tensors in place (:mod:`~ckptmirror.restore.undo`: all or nothing).
"""
