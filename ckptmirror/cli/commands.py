"""The operator commands of the ``ckptmirror`` command line: their parsers, and running them.

The commands are :mod:`ckptmirror.ops` functions; :mod:`ckptmirror.cli.render` prints their
results. This module imports neither until a command runs, so building the parser is cheap.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

#: Commands implemented in :mod:`ckptmirror.ops` (the rest: demo, serve).
OPS_COMMANDS = ("ls", "verify", "repair", "prune", "inspect", "export")

_URLS_HELP = (
    "replica URLs: /path, file:///path, peer://HOST:PORT/NS, s3://BUCKET/PREFIX (several: each is checked on its own)"
)
_ENV_NOTE = (
    "Replica options come from the environment: CKPTMIRROR_PEER_TOKEN for peer:// agents, the usual\n"
    "AWS_* variables (AWS_ENDPOINT_URL for S3-compatible servers) for s3://.\n"
)
_EXIT_NOTE = (
    "exit status:\n"
    "  0  every committed step verified on every replica\n"
    "  1  damage: a missing, truncated or corrupt object, a bad commit record or manifest, or a\n"
    "     step that verifies nowhere (lagging copies or unreachable replicas may be there too)\n"
    "  2  usage error, or no damage found but a replica could not be reached (what it holds is\n"
    "     unknown)\n"
    "  3  no damage, but a replica lags: a step committed on another replica is absent or only\n"
    "     partly written there (a writer stopped between its per-replica commits);\n"
    "     'ckptmirror repair' completes it\n"
)


def _nonneg_int(text: str) -> int:
    """argparse type: a whole number >= 0 (steps and ranks)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v}")
    return v


def _pos_int(text: str) -> int:
    """argparse type: a whole number >= 1 (--keep, --threads)."""
    v = _nonneg_int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


#: Units ``--scrub-max-age`` takes after its number (none: seconds).
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration_s(text: str) -> float:
    """argparse type: a duration >= 0 in seconds, or with a unit: ``90``, ``30m``, ``12h``, ``1d``."""
    t = text.strip().lower()
    scale = _DURATION_UNITS.get(t[-1:], 0) if t else 0
    number = t[:-1] if scale else t
    try:
        v = float(number) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 3600, 90s, 30m, 12h or 1d, got {text!r}"
        ) from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a duration >= 0, got {text!r}")
    return v


#: ``add(name, help, description, epilog)``: a subcommand parser with the common options and URLs.
_AddCommand = Callable[[str, str, str, str], argparse.ArgumentParser]


def _add_reading(p: argparse.ArgumentParser, threads_help: str) -> None:
    """``--threads`` and ``--no-progress``, for the commands that read object data (a bar shows
    on stderr only when it is a terminal)."""
    p.add_argument("--threads", type=_pos_int, default=4, help=threads_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")


def _add_ls(add: _AddCommand) -> None:
    """``ls``: the steps on the replicas, from commit records, manifests and listings."""
    ls = add(
        "ls",
        "list steps: where each is committed, size, age, torn saves and garbage",
        "List every step on the replicas: which replicas hold a committed copy, its size, when it\n"
        "was saved, and what is torn (objects without a commit) or garbage (temp files, objects no\n"
        "commit names). Reads commit records, manifests and key listings only, never tensor data.",
        "examples:\n  ckptmirror ls /data/ckpt/run1\n"
        "  ckptmirror ls /nvme/ckpt/run1 peer://node7:7070/run1 --json | jq '.steps[-1]'\n\n"
        + _ENV_NOTE
        + "exit status: 0 ok, 2 usage error or a replica unreachable\n",
    )
    ls.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def _add_verify(add: _AddCommand) -> None:
    """``verify``: every object of every committed step, each replica on its own."""
    verify = add(
        "verify",
        "check every object of every committed step on every replica",
        "Check the committed steps on every replica, each replica on its own, exactly as a restore\n"
        "would read them: commit record, rank manifests (pinned by size and checksum), and every\n"
        "object's size and xxh3 checksum. Prints a table per step, replica and rank, and names every\n"
        "missing, truncated or corrupt object with its replica. Objects are read in parallel with\n"
        "bounded memory (--threads buffers of one object each); a progress bar shows on a terminal.\n\n"
        "Damage and lagging replicas are reported apart (sections DAMAGE and LAGGING; with --json,\n"
        '"status", "damage" and "lagging"): a lagging replica lacks a step the others committed,\n'
        "which is not corruption and which 'ckptmirror repair' completes.\n\n"
        "peer agents that scrub (ckptmirror serve --scrub-interval) have re-read and re-hashed their\n"
        "objects already: for a peer:// replica, an object is not pulled over the network when the\n"
        "agent's result for its step is at most --scrub-max-age old and about the commit stored there\n"
        "now (same commit record checksum, same rank manifest checksums). Steps saved or repaired since\n"
        "the agent's last check are read as usual. The output says which objects were 'scrubbed by\n"
        "agent at TIME' and which were read; damage the agent found counts as damage (exit status 1).",
        "examples:\n  ckptmirror verify /data/ckpt/run1 /backup/ckpt/run1\n"
        "  ckptmirror verify /data/ckpt/run1 --step 4000\n"
        "  ckptmirror verify /data/ckpt/run1 --quick          # manifests, presence, sizes\n"
        "  ckptmirror verify /nvme/ckpt/run1 peer://node7:7070/run1 --scrub-max-age 6h\n"
        "  ckptmirror verify peer://node7:7070/run1 --no-scrub-results   # read every byte\n"
        "  ckptmirror verify s3://bucket/run1 --json > report.json\n\n" + _ENV_NOTE + _EXIT_NOTE,
    )
    verify.add_argument("--step", type=_nonneg_int, help="only this step")
    verify.add_argument(
        "--quick", action="store_true", help="check manifests, presence and sizes only; do not read object data"
    )
    verify.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    verify.add_argument(
        "--keep",
        type=_pos_int,
        metavar="N",
        help="the job's keep_last: a step older than the newest N (and not pinned) that a replica lacks is "
        "retention's to remove there, not lagging (after one replica was down while the others pruned)",
    )
    verify.add_argument(
        "--scrub-max-age",
        type=_duration_s,
        default=None,
        metavar="AGE",
        help="use a peer agent's scrub results at most AGE old (seconds, or 30m, 12h, 1d; default 1d; 0: never)",
    )
    verify.add_argument(
        "--no-scrub-results",
        action="store_true",
        help="read every object of peer replicas too, whatever their agents' scrub results (as --scrub-max-age 0)",
    )
    _add_reading(verify, "objects read at once (default 4)")


def _add_repair(add: _AddCommand) -> None:
    """``repair``: copy what is missing or corrupt from where it verifies, then commit."""
    repair = add(
        "repair",
        "copy missing or corrupt objects from replicas where they verify, then commit",
        "For every step committed on at least one replica, verify every replica in full, copy each\n"
        "missing, truncated or corrupt object (then each bad rank manifest) from a replica where it\n"
        "verifies, and write the commit record last where it is missing (this completes a torn save)\n"
        "or does not parse. An object that verifies is never overwritten. Idempotent: a second run\n"
        "finds nothing to do. Afterwards 'verify' exits 0 wherever a good copy existed.\n"
        "Run it when no training job is writing to these replicas. Progress bars (verify, copy) show\n"
        "on stderr when it is a terminal (--no-progress: none).",
        "examples:\n  ckptmirror repair /nvme/ckpt/run1 /backup/ckpt/run1 --dry-run\n"
        "  ckptmirror repair /nvme/ckpt/run1 peer://node7:7070/run1   # after replacing node7's disk\n"
        "  ckptmirror repair --partial /nvme/ckpt/run1 peer://node8:7070/run1/node7   # from its ring namespace\n\n"
        + _ENV_NOTE
        + "exit status: 0 repaired (or nothing to do), 1 something could not be repaired, "
        "2 usage error or a replica unreachable\n",
    )
    repair.add_argument("--step", type=_nonneg_int, help="only this step")
    repair.add_argument("--dry-run", action="store_true", help="show what would be copied and committed; write nothing")
    repair.add_argument("--json", action="store_true", help="print one JSON document")
    repair.add_argument(
        "--keep",
        type=_pos_int,
        metavar="N",
        help="the job's keep_last: do not copy a step older than the newest N (and not pinned) to a replica "
        "that lacks it (its retention removed it; copying it back would undo that)",
    )
    repair.add_argument(
        "--partial",
        action="store_true",
        help="a replica without a step gets only the ranks the (partial) replicas holding it hold, with a "
        "share record: to rebuild a node-local disk from its node's ring_peer namespace",
    )
    _add_reading(repair, "objects read or copied at once (default 4)")


def _add_prune(add: _AddCommand) -> None:
    """``prune``: keep the newest N committed steps; remove torn saves and leftovers."""
    prune = add(
        "prune",
        "remove old committed steps beyond --keep, torn saves and leftovers",
        "On each replica keep the newest N committed steps and remove older ones (the commit record\n"
        "first); the newest committed step is never removed. Also remove torn saves older than the\n"
        "newest committed step and leftovers inside kept steps (temp files, objects no commit\n"
        "names). Torn saves newer than the newest commit may be a save in progress: they stay unless\n"
        "--all-torn. Steps a job pinned (Mirror.pin, e.g. Lightning's best checkpoint) stay and do not\n"
        "count towards --keep, unless --ignore-pins. Committed steps are removed only if a step that\n"
        "stays verifies in full (every object's checksum: that one step is read).",
        "examples:\n  ckptmirror prune /data/ckpt/run1 --keep 3 --dry-run\n"
        "  ckptmirror prune /nvme/ckpt/run1 s3://bucket/run1 --keep 5\n\n"
        + _ENV_NOTE
        + "exit status: 0 ok, 1 refused (no kept step verifies) or a delete failed, "
        "2 usage error or a replica unreachable (or one that stopped answering)\n",
    )
    prune.add_argument(
        "--keep", type=_pos_int, required=True, metavar="N", help="committed steps to keep per replica (>= 1)"
    )
    prune.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")
    prune.add_argument(
        "--all-torn",
        action="store_true",
        help="also remove torn saves newer than the newest commit (no job may be writing)",
    )
    prune.add_argument(
        "--ignore-pins",
        action="store_true",
        help="also remove steps a job pinned (Mirror.pin: a best or top-k checkpoint); they count towards --keep",
    )
    prune.add_argument("--json", action="store_true", help="print one JSON document")


def _add_inspect(add: _AddCommand) -> None:
    """``inspect``: the state tree of one step, from its manifests."""
    inspect = add(
        "inspect",
        "show the state tree of a step: keys, dtypes, shapes, bytes, per rank",
        "Show the tree of the saved state of a step (default: the newest committed): key paths,\n"
        "dtypes, shapes and bytes of every tensor, and plain values, per rank. Reads manifests only.",
        "examples:\n  ckptmirror inspect /data/ckpt/run1\n  ckptmirror inspect /data/ckpt/run1 --step 4000 --rank 0\n"
        "  ckptmirror inspect /data/ckpt/run1 --json | jq -r '.ranks[0].entries[].name'\n\n"
        + _ENV_NOTE
        + "exit status: 0 ok, 1 the step cannot be read, 2 usage error or no replica could be listed\n"
        "(an unreachable replica among several is a WARNING; the others are used)\n",
    )
    inspect.add_argument("--step", type=_nonneg_int, help="the step (default: newest committed)")
    inspect.add_argument("--rank", type=_nonneg_int, help="only this rank (default: all)")
    inspect.add_argument("--json", action="store_true", help="print one JSON document")


def _add_export(add: _AddCommand) -> None:
    """``export``: one rank of one step as a safetensors or torch file."""
    export = add(
        "export",
        "write one step as a safetensors or torch file for other tools",
        "Load one rank of a step (verified as a restore verifies it) and write it as one file.\n"
        "Nested keys become dotted names (model.fc1.weight, optim.state.0.exp_avg).\n"
        "  safetensors: tensors; plain values as JSON strings in the metadata; tensors sharing\n"
        "               storage are cloned; bytes values are dropped (listed in the output).\n"
        "  torch:       torch.save of a flat dict of plain tensors and plain values; it loads with\n"
        "               torch.load(path, weights_only=True).\n"
        "A progress bar of the bytes read shows on stderr when it is a terminal (--no-progress: none).",
        "examples:\n  ckptmirror export /data/ckpt/run1 --step 4000 --format safetensors -o model.safetensors\n"
        "  ckptmirror export /data/ckpt/run1 --format torch -o last.pt     # newest step that verifies\n\n"
        + _ENV_NOTE
        + "exit status: 0 written, 1 the step cannot be read or written, 2 usage error or no replica\n"
        "could be listed (an unreachable replica among several is a WARNING; the others are used)\n",
    )
    export.add_argument("--step", type=_nonneg_int, help="the step (default: the newest that verifies)")
    export.add_argument("--format", choices=("safetensors", "torch"), required=True, help="file format")
    export.add_argument("-o", "--output", required=True, metavar="PATH", help="file to write")
    export.add_argument("--rank", type=_nonneg_int, default=0, help="rank to export (default 0)")
    export.add_argument("--force", action="store_true", help="replace PATH if it exists")
    export.add_argument("--json", action="store_true", help="print what was written as JSON")
    _add_reading(export, "objects read at once (default 4)")


#: The operator commands' parser builders, in the order ``--help`` lists them.
_COMMANDS: tuple[Callable[[_AddCommand], None], ...] = (
    _add_ls,
    _add_verify,
    _add_repair,
    _add_prune,
    _add_inspect,
    _add_export,
)


def add_ops_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the parsers of the operator commands (:data:`OPS_COMMANDS`) to ``sub``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log what the library does (on stderr)")
    raw = argparse.RawDescriptionHelpFormatter

    def add(name: str, help_: str, description: str, epilog: str) -> argparse.ArgumentParser:
        # Every operator command takes its replicas first, as positional URLs.
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_, description=description, epilog=epilog, formatter_class=raw, parents=[common]
        )
        p.add_argument("urls", nargs="+", metavar="URL", help=_URLS_HELP)
        return p

    for add_command in _COMMANDS:
        add_command(add)


def _setup_logging(verbose: bool, show_warnings: bool) -> None:
    """Library logging on stderr, one prefix per line; repeated calls replace our handler."""
    log = logging.getLogger("ckptmirror")
    for h in [h for h in log.handlers if getattr(h, "_ckptmirror_cli", False)]:
        log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._ckptmirror_cli = True  # type: ignore[attr-defined]  # a marker attribute on a stdlib handler, found again above
    handler.setFormatter(logging.Formatter("ckptmirror: %(levelname)s: %(message)s"))
    log.addHandler(handler)
    # verify reports failed reads itself; the reader's per-object warnings would repeat them.
    # Commands that change replicas (repair, prune) show WARNINGs: what they could not do.
    log.setLevel(logging.INFO if verbose else logging.WARNING if show_warnings else logging.CRITICAL)
    log.propagate = False


def _one_line(exc: BaseException) -> str:
    """``exc`` as one line; our own errors without their class name (their text says enough)."""
    from ..errors import CkptMirrorError

    text = str(exc) if isinstance(exc, CkptMirrorError) else f"{type(exc).__name__}: {exc}"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def run_ops(args: argparse.Namespace) -> int:
    """Run the operator command ``args.command``; return its exit status.

    Errors are one line on stderr: status 2 for usage errors and unreachable replicas, 1 for
    anything else (the command's own statuses are in its ``--help``).
    """
    from ..errors import ReplicaUnavailableError
    from ..ops import UsageError
    from ..ops._common import reject_memory_url
    from .render import run_command

    _setup_logging(args.verbose, args.command in ("export", "inspect", "prune", "repair"))
    try:
        # Before any replica is opened: a memory:// URL is a mistake, not an empty replica.
        for u in args.urls:
            reject_memory_url(u)
        return run_command(args)
    except KeyboardInterrupt:
        print(f"ckptmirror {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (``| head``): stop quietly.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (UsageError, ReplicaUnavailableError) as exc:
        print(f"ckptmirror {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # one clear line, no traceback
        print(f"ckptmirror {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
