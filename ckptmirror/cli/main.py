"""The ``ckptmirror`` command line: the parser, ``demo`` and ``serve``.

The operator commands (ls, verify, repair, prune, inspect, export) are defined in
:mod:`ckptmirror.cli.commands` and print through :mod:`ckptmirror.cli.render`; the library behind
them (:mod:`ckptmirror.ops`) is imported only when one of them runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .._version import __version__
from ..replicas._peer_protocol import (
    DEFAULT_MIN_UPLOAD_BYTES_PER_S,
    DEFAULT_PORT,
    DEFAULT_SCRUB_BYTES_PER_S,
    DEFAULT_UPLOAD_RATE_WINDOW_S,
    TOKEN_ENV,
    read_token_file,
)
from .commands import OPS_COMMANDS, add_ops_commands, run_ops

#: The agent's log levels (``serve --log-level``); the agent maps them to logging levels.
SERVE_LOG_LEVELS = ("debug", "info", "warning", "error")

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
    demo.add_argument(
        "--steps",
        type=int,
        default=40,
        help="training steps the child would run in all; it is SIGKILLed at step max(2*SAVE_EVERY+1, STEPS*3//4)",
    )
    demo.add_argument("--save-every", type=int, default=5, help="save every N steps")
    _add_serve(sub)
    add_ops_commands(sub)
    return parser


def _add_serve(sub: argparse._SubParsersAction[Any]) -> None:
    """The ``serve`` subcommand: the peer agent."""
    serve = sub.add_parser(
        "serve",
        help="run the peer agent that stores replicas for other nodes",
        # Raw formatting (for the examples): the paragraphs are wrapped by hand.
        description="Run the peer agent. Writers reach it as peer://HOST:PORT/NAMESPACE. It verifies\n"
        "every object's size and checksum while receiving, writes with fsync+rename, and accepts a\n"
        "commit only when everything the commit names is present and verified.\n\n"
        f"token: --token-file FILE, else the environment variable {TOKEN_ENV};\n"
        "--token-file wins when both are set. Clients present the same token (PeerReplica token=,\n"
        f"token_file= or {TOKEN_ENV}). Without a token the agent only listens on loopback.\n\n"
        "per-namespace tokens: --namespace-token PREFIX=FILE (repeatable) makes the token in FILE\n"
        "valid only on the namespace PREFIX and those under it (PREFIX/...): one job's token cannot\n"
        "read, write, list or delete another job's namespace (403). The --token-file token stays\n"
        "valid on every namespace (an admin token, e.g. for 'ckptmirror verify'); leave it out to\n"
        "have none. With namespace tokens, a namespace under no PREFIX is open to the admin token only.\n\n"
        "slow uploads: an upload must deliver --min-upload-bytes-per-s over every window of\n"
        "--upload-rate-window-s seconds spent waiting for it (the first window is its grace period),\n"
        "else it is cut (408), its temp file removed and its slot freed.\n\n"
        "metrics: GET /metrics (Prometheus text format) needs a token whenever the agent has one:\n"
        "the --token-file token, or the read-only token of --metrics-token-file, which is valid on\n"
        "/metrics and /v1/health only (never on the data). Namespace tokens cannot read /metrics.\n\n"
        "scrubbing: --scrub-interval S re-reads and re-hashes every committed step (commit records,\n"
        "rank manifests, objects) against their recorded sizes and checksums, a pass every S seconds,\n"
        "at most --scrub-bytes-per-s. Damaged files are named on /metrics, /v1/health and the log;\n"
        "GET /v1/scrub/NAMESPACE gives the latest results to 'ckptmirror verify'.\n\n"
        "log: JSON lines on stderr (info by default; -v adds one line per request). Once listening,\n"
        'it prints one line on stdout: {"listening": "HOST:PORT"}.\n\n'
        "exit status: 0 after SIGTERM/SIGINT, 2 for a usage error (one line on stderr), 1 otherwise.",
        epilog="examples:\n  ckptmirror serve --root /var/lib/ckptmirror\n"
        "  ckptmirror serve --root /dev/shm/ckpt --host 0.0.0.0 --token-file /etc/ckptmirror/token  # RAM tier\n"
        "  ckptmirror serve --root /var/lib/ckptmirror --host 0.0.0.0 \\\n"
        "      --namespace-token job-a=/etc/ckptmirror/a.token --namespace-token job-b=/etc/ckptmirror/b.token\n"
        "  ckptmirror serve --root /var/lib/ckptmirror --host 0.0.0.0 --token-file /etc/ckptmirror/token \\\n"
        "      --metrics-token-file /etc/ckptmirror/metrics.token --scrub-interval 86400 --scrub-bytes-per-s 50000000\n"
        f"  {TOKEN_ENV}=... ckptmirror serve --root /var/lib/ckptmirror --host 0.0.0.0 --port 7070\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--root", required=True, help="directory that holds the replicas (a tmpfs gives a RAM tier)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need a token)"
    )
    serve.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (0 picks a free one; default {DEFAULT_PORT})"
    )
    serve.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"file holding the shared secret clients must present (wins over {TOKEN_ENV}); "
        "with --namespace-token, the admin token valid on every namespace",
    )
    serve.add_argument(
        "--namespace-token",
        action="append",
        default=[],
        metavar="PREFIX=FILE",
        help="the token in FILE is valid only on namespace PREFIX and below (repeatable)",
    )
    serve.add_argument(
        "--metrics-token-file",
        metavar="FILE",
        help="file holding a read-only token valid on GET /metrics and /v1/health only (for a Prometheus scraper)",
    )
    serve.add_argument(
        "--scrub-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="re-read and re-hash everything stored, a pass every S seconds (default 0: off)",
    )
    serve.add_argument(
        "--scrub-bytes-per-s",
        type=int,
        default=DEFAULT_SCRUB_BYTES_PER_S,
        metavar="N",
        help=f"the scrubber reads at most N bytes/s (default {DEFAULT_SCRUB_BYTES_PER_S} = 32 MiB/s)",
    )
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
        "--min-upload-bytes-per-s",
        type=int,
        default=DEFAULT_MIN_UPLOAD_BYTES_PER_S,
        help="cut an upload slower than this over a window; 0 turns it off "
        f"(default {DEFAULT_MIN_UPLOAD_BYTES_PER_S} = 64 KiB/s)",
    )
    serve.add_argument(
        "--upload-rate-window-s",
        type=float,
        default=DEFAULT_UPLOAD_RATE_WINDOW_S,
        help=f"window the minimum upload rate is measured over, and grace period of every upload "
        f"(default {DEFAULT_UPLOAD_RATE_WINDOW_S:g})",
    )
    serve.add_argument(
        "--no-fsync", action="store_true", help="skip fsync (only for a tmpfs root, where it is a no-op anyway)"
    )
    serve.add_argument(
        "--direct-io",
        action="store_true",
        help="write received objects with O_DIRECT, past the page cache (Linux; see docs/replicas/local.md)",
    )
    log_opts = serve.add_mutually_exclusive_group()
    log_opts.add_argument("-v", "--verbose", action="store_true", help="log at debug level: one line per request")
    log_opts.add_argument(
        "--log-level", choices=SERVE_LOG_LEVELS, default=None, help="level of the agent's log (default info)"
    )


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
            return _serve(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, no traceback, non-zero status
        print(f"ckptmirror {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


class _ServeUsageError(Exception):
    """A ``serve`` option that cannot work: one line on stderr, exit status 2."""


def _read_token(option: str, token_file: str) -> str:
    """The token in ``token_file``; a usage error naming ``option`` (the option as given, with
    the path) if it cannot be read or is empty."""
    try:
        token = read_token_file(token_file)
    except FileNotFoundError:
        raise _ServeUsageError(f"{option}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _ServeUsageError(f"{option}: cannot read it: {why}") from None
    if not token:
        raise _ServeUsageError(f"{option} is empty: write the shared token into it")
    return token


def _serve_namespace_tokens(specs: Sequence[str]) -> dict[str, str]:
    """``{prefix: token}`` from the ``--namespace-token PREFIX=FILE`` options (the agent checks the prefixes)."""
    out: dict[str, str] = {}
    for spec in specs:
        prefix, sep, path = spec.partition("=")
        prefix = prefix.strip("/")
        if not sep or not prefix or not path:
            raise _ServeUsageError(f"--namespace-token {spec!r}: expected PREFIX=FILE, e.g. job-a=/etc/job-a.token")
        if prefix in out:
            raise _ServeUsageError(f"--namespace-token {prefix!r} is given twice")
        out[prefix] = _read_token(f"--namespace-token {prefix}={path}", path)
    return out


def _serve_token(token_file: str | None) -> str | None:
    """The agent's token: ``--token-file`` wins, else the environment variable, else None."""
    if token_file:
        return _read_token(f"--token-file {token_file}", token_file)
    env = os.environ.get(TOKEN_ENV)
    if env is None:
        return None
    if not env.strip():
        # An empty variable is most likely a mistake; serving without a token would hide it.
        raise _ServeUsageError(f"{TOKEN_ENV} is set but empty: set it to the shared token, or unset it")
    return env.strip()


def _serve(args: argparse.Namespace) -> int:
    """Run ``ckptmirror serve``; usage errors are one line on stderr and exit status 2."""
    from ..replicas.peer_agent import AgentConfigError
    from ..replicas.peer_agent import serve as run_agent

    level = "debug" if args.verbose else (args.log_level or "info")
    try:
        run_agent(
            args.root,
            args.host,
            args.port,
            token=_serve_token(args.token_file),
            namespace_tokens=_serve_namespace_tokens(args.namespace_token),
            metrics_token=(
                _read_token(f"--metrics-token-file {args.metrics_token_file}", args.metrics_token_file)
                if args.metrics_token_file
                else None
            ),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            log_level=level,
            max_object_bytes=args.max_object_bytes,
            reserve_free_bytes=args.reserve_free_bytes,
            max_uploads=args.max_uploads,
            idle_timeout_s=args.idle_timeout_s,
            min_upload_bytes_per_s=args.min_upload_bytes_per_s,
            upload_rate_window_s=args.upload_rate_window_s,
            scrub_interval_s=args.scrub_interval,
            scrub_bytes_per_s=args.scrub_bytes_per_s,
            fsync=not args.no_fsync,
            direct_io=args.direct_io,
        )
    except (_ServeUsageError, AgentConfigError) as exc:
        print(f"ckptmirror serve: error: {exc} (see 'ckptmirror serve --help')", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
