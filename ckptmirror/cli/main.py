"""The ``ckptmirror`` command line: the parser, ``demo`` and ``serve``.

The operator commands (ls, verify, repair, prune, inspect, export) are defined in
:mod:`ckptmirror.cli.commands` and print through :mod:`ckptmirror.cli.render`; the library behind
them (:mod:`ckptmirror.ops`) is imported only when one of them runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from .._version import __version__
from .commands import OPS_COMMANDS, add_ops_commands, run_ops

__all__ = ["OPS_COMMANDS", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``ckptmirror`` argument parser with every subcommand."""
    parser = _Parser(
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
    serve = sub.add_parser(
        "serve",
        help="run the peer agent that stores replicas for other nodes",
        description="Run the peer agent. Writers reach it as peer://HOST:PORT/NAMESPACE. It verifies "
        "every object's size and checksum while receiving, writes with fsync+rename, and accepts a "
        "commit only when everything the commit names is present and verified.",
        epilog="examples:\n  ckptmirror serve --root /var/lib/ckptmirror\n"
        "  ckptmirror serve --root /dev/shm/ckpt --host 0.0.0.0 --token-file /etc/ckptmirror/token  # RAM tier\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--root", required=True, help="directory that holds the replicas (a tmpfs gives a RAM tier)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need --token-file)"
    )
    serve.add_argument("--port", type=int, default=7070, help="port (0 picks a free one; default 7070)")
    serve.add_argument("--token-file", help="file holding the shared secret clients must present")
    serve.add_argument("--tls-cert", help="TLS certificate (PEM)")
    serve.add_argument("--tls-key", help="TLS private key (PEM)")
    serve.add_argument(
        "--max-object-bytes", type=int, default=16 << 30, help="largest object accepted (default 16 GiB)"
    )
    serve.add_argument(
        "--reserve-free-bytes",
        type=int,
        default=1 << 30,
        help="refuse uploads that would leave less free space (default 1 GiB)",
    )
    serve.add_argument("--max-uploads", type=int, default=16, help="concurrent uploads (default 16)")
    serve.add_argument(
        "--idle-timeout-s",
        type=float,
        default=30.0,
        help="drop an upload that sends nothing for this long (default 30)",
    )
    serve.add_argument(
        "--no-fsync", action="store_true", help="skip fsync (only for a tmpfs root, where it is a no-op anyway)"
    )
    add_ops_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckptmirror`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in OPS_COMMANDS:
        return run_ops(args)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.dir, args.steps, args.save_every)
        if args.command == "serve":
            from ..replicas.peer_agent import serve as run_agent

            token = None
            if args.token_file:
                with open(args.token_file, encoding="utf-8") as f:
                    token = f.read().strip()
                if not token:
                    raise ValueError(f"token file {args.token_file} is empty")
            run_agent(
                args.root,
                args.host,
                args.port,
                token=token,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                max_object_bytes=args.max_object_bytes,
                reserve_free_bytes=args.reserve_free_bytes,
                max_uploads=args.max_uploads,
                idle_timeout_s=args.idle_timeout_s,
                fsync=not args.no_fsync,
            )
            return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, no traceback, non-zero status
        print(f"ckptmirror {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
