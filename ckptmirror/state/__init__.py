"""The training state as ckptmirror sees it, used by save and restore alike.

- :mod:`~ckptmirror.state.tree`: flatten a nested state into tensor leaves plus a JSON
  structure, and back (no pickle: plain values are JSON, tensors raw bytes);
- :mod:`~ckptmirror.state.decode`: the way back (``unflatten``) and the dtypes' sizes, without
  torch (the operator commands check manifests with it);
- :mod:`~ckptmirror.state.targets`: the :class:`~ckptmirror.state.targets.Stateful` protocol,
  and preparing and checking the caller's model and optimizer before a restore;
- :mod:`~ckptmirror.state.reshard`: mapping stored shards (DTensor) onto another layout.
"""
