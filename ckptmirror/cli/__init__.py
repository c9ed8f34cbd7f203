"""The ``ckptmirror`` command line.

- :mod:`~ckptmirror.cli.main`: the parser and the entry point (``ckptmirror``, ``python -m ckptmirror``);
- :mod:`~ckptmirror.cli.commands`: the operator commands' arguments (ls, verify, repair, prune,
  inspect, export), run through :mod:`ckptmirror.ops`;
- :mod:`~ckptmirror.cli.render`: how their reports print (tables, ``--json``);
- :mod:`~ckptmirror.cli.demo`: ``ckptmirror demo``, the README's first command.
"""

from .main import OPS_COMMANDS, build_parser, main

__all__ = ["OPS_COMMANDS", "build_parser", "main"]
