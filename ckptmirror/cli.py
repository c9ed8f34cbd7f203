"""The ``ckptmirror`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptmirror",
        description="Replicated, checksummed, asynchronous checkpoints for PyTorch training.",
        epilog="Run 'ckptmirror COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"ckptmirror {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train a small model with async saves, kill it, restore, check bit-exactness",
        description="Train a small model on the CPU in a child process that saves asynchronously, "
        "SIGKILL it mid-run, restore the newest committed step in a fresh process state, "
        "and check it is bit-exact against an uninterrupted run.",
        epilog="example: ckptmirror demo --dir /tmp/ckptmirror-demo --steps 40",
    )
    demo.add_argument("--dir", default=None, help="where to keep the replicas (default: a temporary directory)")
    demo.add_argument("--steps", type=int, default=40, help="training steps before the simulated crash")
    demo.add_argument("--save-every", type=int, default=5, help="save every N steps")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.dir, args.steps, args.save_every)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, no traceback, non-zero status
        print(f"ckptmirror {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
