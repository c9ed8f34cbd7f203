"""The ``ckptmirror`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Callable, NoReturn, Sequence

from ._version import __version__

#: Commands implemented in :mod:`ckptmirror.ops` (the rest: demo, serve).
OPS_COMMANDS = ("ls", "verify", "repair", "prune", "inspect", "export")


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
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need --token-file)")
    serve.add_argument("--port", type=int, default=7070, help="port (0 picks a free one; default 7070)")
    serve.add_argument("--token-file", help="file holding the shared secret clients must present")
    serve.add_argument("--tls-cert", help="TLS certificate (PEM)")
    serve.add_argument("--tls-key", help="TLS private key (PEM)")
    serve.add_argument("--max-object-bytes", type=int, default=16 << 30, help="largest object accepted (default 16 GiB)")
    serve.add_argument("--reserve-free-bytes", type=int, default=1 << 30, help="refuse uploads that would leave less free space (default 1 GiB)")
    serve.add_argument("--max-uploads", type=int, default=16, help="concurrent uploads (default 16)")
    serve.add_argument("--idle-timeout-s", type=float, default=30.0, help="drop an upload that sends nothing for this long (default 30)")
    serve.add_argument("--no-fsync", action="store_true", help="skip fsync (only for a tmpfs root, where it is a no-op anyway)")
    _add_ops_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckptmirror`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in OPS_COMMANDS:
        return _run_ops(args)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.dir, args.steps, args.save_every)
        if args.command == "serve":
            from .agent import serve as run_agent

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


# ------------------------------------------------------------------ operator commands

_URLS_HELP = "replica URLs: /path, file:///path, peer://HOST:PORT/NS, s3://BUCKET/PREFIX (several: each is checked on its own)"
_ENV_NOTE = (
    "Replica options come from the environment: CKPTMIRROR_PEER_TOKEN for peer:// agents, the usual\n"
    "AWS_* variables (AWS_ENDPOINT_URL for S3-compatible servers) for s3://.\n"
)
_EXIT_NOTE = "exit status: 0 ok, 1 problems found, 2 usage error or a replica unreachable\n"


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v}")
    return v


def _pos_int(text: str) -> int:
    v = _nonneg_int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


def _add_ops_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log what the library does (on stderr)")
    raw = argparse.RawDescriptionHelpFormatter

    def add(name: str, help_: str, description: str, epilog: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description, epilog=epilog, formatter_class=raw, parents=[common])
        return p

    ls = add(
        "ls",
        "list steps: where each is committed, size, age, torn saves and garbage",
        "List every step on the replicas: which replicas hold a committed copy, its size, when it\n"
        "was saved, and what is torn (objects without a commit) or garbage (temp files, objects no\n"
        "commit names). Reads commit records, manifests and key listings only, never tensor data.",
        "examples:\n  ckptmirror ls /data/ckpt/run1\n  ckptmirror ls /nvme/ckpt/run1 peer://node7:7070/run1 --json | jq '.steps[-1]'\n\n"
        + _ENV_NOTE + "exit status: 0 ok, 2 usage error or a replica unreachable\n",
    )
    ls.add_argument("urls", nargs="+", metavar="URL", help=_URLS_HELP)
    ls.add_argument("--json", action="store_true", help="print one JSON document instead of a table")

    verify = add(
        "verify",
        "check every object of every committed step on every replica",
        "Check the committed steps on every replica, each replica on its own, exactly as a restore\n"
        "would read them: commit record, rank manifests (pinned by size and checksum), and every\n"
        "object's size and xxh3 checksum. Prints a table per step, replica and rank, and names every\n"
        "missing, truncated or corrupt object with its replica. Objects are read in parallel with\n"
        "bounded memory (--threads buffers of one object each); a progress bar shows on a terminal.",
        "examples:\n  ckptmirror verify /data/ckpt/run1 /backup/ckpt/run1\n  ckptmirror verify /data/ckpt/run1 --step 4000\n"
        "  ckptmirror verify /data/ckpt/run1 --quick          # manifests, presence, sizes\n"
        "  ckptmirror verify s3://bucket/run1 --json > report.json\n\n" + _ENV_NOTE + _EXIT_NOTE,
    )
    verify.add_argument("urls", nargs="+", metavar="URL", help=_URLS_HELP)
    verify.add_argument("--step", type=_nonneg_int, help="only this step")
    verify.add_argument("--quick", action="store_true", help="check manifests, presence and sizes only; do not read object data")
    verify.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    verify.add_argument("--threads", type=_pos_int, default=4, help="objects read at once (default 4)")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")

    repair = add(
        "repair",
        "copy missing or corrupt objects from replicas where they verify, then commit",
        "For every step committed on at least one replica, verify every replica in full, copy each\n"
        "missing, truncated or corrupt object (then each bad rank manifest) from a replica where it\n"
        "verifies, and write the commit record last where it is missing (this completes a torn save)\n"
        "or does not parse. An object that verifies is never overwritten. Idempotent: a second run\n"
        "finds nothing to do. Afterwards 'verify' exits 0 wherever a good copy existed.\n"
        "Run it when no training job is writing to these replicas.",
        "examples:\n  ckptmirror repair /nvme/ckpt/run1 /backup/ckpt/run1 --dry-run\n"
        "  ckptmirror repair /nvme/ckpt/run1 peer://node7:7070/run1   # after replacing node7's disk\n\n"
        + _ENV_NOTE + "exit status: 0 repaired (or nothing to do), 1 something could not be repaired, 2 usage error or a replica unreachable\n",
    )
    repair.add_argument("urls", nargs="+", metavar="URL", help=_URLS_HELP)
    repair.add_argument("--step", type=_nonneg_int, help="only this step")
    repair.add_argument("--dry-run", action="store_true", help="show what would be copied and committed; write nothing")
    repair.add_argument("--json", action="store_true", help="print one JSON document")
    repair.add_argument("--threads", type=_pos_int, default=4, help="objects read or copied at once (default 4)")
    repair.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")

    prune = add(
        "prune",
        "remove old committed steps beyond --keep, torn saves and leftovers",
        "On each replica keep the newest N committed steps and remove older ones (the commit record\n"
        "first); the newest committed step is never removed. Also remove torn saves older than the\n"
        "newest committed step and leftovers inside kept steps (temp files, objects no commit\n"
        "names). Torn saves newer than the newest commit may be a save in progress: they stay unless\n"
        "--all-torn. Committed steps are removed only if a step that stays passes a quick verify.",
        "examples:\n  ckptmirror prune /data/ckpt/run1 --keep 3 --dry-run\n  ckptmirror prune /nvme/ckpt/run1 s3://bucket/run1 --keep 5\n\n"
        + _ENV_NOTE + "exit status: 0 ok, 1 refused (no kept step verifies) or a delete failed, 2 usage error or a replica unreachable\n",
    )
    prune.add_argument("urls", nargs="+", metavar="URL", help=_URLS_HELP)
    prune.add_argument("--keep", type=_pos_int, required=True, metavar="N", help="committed steps to keep per replica (>= 1)")
    prune.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")
    prune.add_argument("--all-torn", action="store_true", help="also remove torn saves newer than the newest commit (no job may be writing)")
    prune.add_argument("--json", action="store_true", help="print one JSON document")

    inspect = add(
        "inspect",
        "show the state tree of a step: keys, dtypes, shapes, bytes, per rank",
        "Show the tree of the saved state of a step (default: the newest committed): key paths,\n"
        "dtypes, shapes and bytes of every tensor, and plain values, per rank. Reads manifests only.",
        "examples:\n  ckptmirror inspect /data/ckpt/run1\n  ckptmirror inspect /data/ckpt/run1 --step 4000 --rank 0\n"
        "  ckptmirror inspect /data/ckpt/run1 --json | jq -r '.ranks[0].entries[].name'\n\n" + _ENV_NOTE
        + "exit status: 0 ok, 1 the step cannot be read, 2 usage error or a replica unreachable\n",
    )
    inspect.add_argument("urls", nargs="+", metavar="URL", help=_URLS_HELP)
    inspect.add_argument("--step", type=_nonneg_int, help="the step (default: newest committed)")
    inspect.add_argument("--rank", type=_nonneg_int, help="only this rank (default: all)")
    inspect.add_argument("--json", action="store_true", help="print one JSON document")

    export = add(
        "export",
        "write one step as a safetensors or torch file for other tools",
        "Load one rank of a step (verified as a restore verifies it) and write it as one file.\n"
        "Nested keys become dotted names (model.fc1.weight, optim.state.0.exp_avg).\n"
        "  safetensors: tensors; plain values as JSON strings in the metadata; tensors sharing\n"
        "               storage are cloned; bytes values are dropped (listed in the output).\n"
        "  torch:       torch.save of a flat dict of plain tensors and plain values; it loads with\n"
        "               torch.load(path, weights_only=True).",
        "examples:\n  ckptmirror export /data/ckpt/run1 --step 4000 --format safetensors -o model.safetensors\n"
        "  ckptmirror export /data/ckpt/run1 --format torch -o last.pt     # newest step that verifies\n\n"
        + _ENV_NOTE + "exit status: 0 written, 1 the step cannot be read or written, 2 usage error or a replica unreachable\n",
    )
    export.add_argument("urls", nargs="+", metavar="URL", help=_URLS_HELP)
    export.add_argument("--step", type=_nonneg_int, help="the step (default: the newest that verifies)")
    export.add_argument("--format", choices=("safetensors", "torch"), required=True, help="file format")
    export.add_argument("-o", "--output", required=True, metavar="PATH", help="file to write")
    export.add_argument("--rank", type=_nonneg_int, default=0, help="rank to export (default 0)")
    export.add_argument("--force", action="store_true", help="replace PATH if it exists")
    export.add_argument("--json", action="store_true", help="print what was written as JSON")


def _setup_logging(verbose: bool, show_warnings: bool) -> None:
    log = logging.getLogger("ckptmirror")
    for h in [h for h in log.handlers if getattr(h, "_ckptmirror_cli", False)]:
        log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._ckptmirror_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("ckptmirror: %(levelname)s: %(message)s"))
    log.addHandler(handler)
    # verify/repair report failed reads themselves; the reader's per-object warnings would repeat them.
    log.setLevel(logging.INFO if verbose else logging.WARNING if show_warnings else logging.CRITICAL)
    log.propagate = False


def _one_line(exc: BaseException) -> str:
    from .errors import CkptMirrorError

    text = str(exc) if isinstance(exc, CkptMirrorError) else f"{type(exc).__name__}: {exc}"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def _run_ops(args: argparse.Namespace) -> int:
    from . import ops
    from .errors import ReplicaUnavailableError

    _setup_logging(args.verbose, args.command in ("export", "inspect"))
    try:
        for u in args.urls:
            if u.lower().startswith("memory://"):
                raise ops.UsageError(f"{u}: memory:// replicas live inside one Python process; the command line cannot see them")
        return _OPS[args.command](args, ops)
    except KeyboardInterrupt:
        print(f"ckptmirror {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (``| head``): stop quietly.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (ops.UsageError, ReplicaUnavailableError) as exc:
        print(f"ckptmirror {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # one clear line, no traceback
        print(f"ckptmirror {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _progress(args: argparse.Namespace) -> Any:
    """A tqdm bar factory when stderr is a terminal and tqdm is installed; else None."""
    if getattr(args, "no_progress", False) or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None

    def make(total: int, unit: str, desc: str) -> Any:
        return tqdm(total=total, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    return make


# -- rendering ---------------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{int(v)} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{n} B"


def _when(ts: float | None) -> str:
    if ts is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _age(ts: float | None) -> str:
    if ts is None:
        return "?"
    d = max(0.0, time.time() - ts)
    for unit, secs in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= secs:
            return f"{int(d // secs)}{unit}"
    return f"{int(d)}s"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "") -> list[str]:
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]


def _legend(urls: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    tags = {u: f"[{i + 1}]" for i, u in enumerate(urls)}
    return tags, ["replicas:"] + [f"  {tags[u]} {u}" for u in urls]


def _emit(lines: Sequence[str]) -> None:
    sys.stdout.write("\n".join(lines) + "\n")


def _unreachable_lines(unreachable: dict[str, str], tags: dict[str, str]) -> list[str]:
    return [f"UNREACHABLE {tags.get(u, '')} {u}: {e}" for u, e in unreachable.items()]


def _cmd_ls(args: argparse.Namespace, ops: Any) -> int:
    res = ops.ls(args.urls)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return res.exit_code
    tags, lines = _legend(res.replicas)
    if not res.steps:
        lines.append("no steps")
    else:
        rows = []
        for s in res.steps:
            cells = ["?" if u in res.unreachable else "committed" if u in s.committed_on else "torn" if u in s.torn_on else "-" for u in res.replicas]
            note = "no committed copy" if not s.committed_on else (s.error or "")
            rows.append([s.step, *cells, _size(s.bytes), s.objects if s.objects is not None else "?", s.world_size or "?", _when(s.created_unix), _age(s.created_unix), note])
        lines += _table(["STEP", *[tags[u] for u in res.replicas], "SIZE", "OBJECTS", "RANKS", "SAVED", "AGE", "NOTE"], rows)
        garbage = [(s, u, keys) for s in res.steps for u, keys in s.garbage.items()]
        if garbage:
            lines.append("garbage and incomplete copies (see 'ckptmirror prune' and 'ckptmirror repair'):")
            for s, u, keys in garbage:
                what = ("incomplete copy ('ckptmirror repair' completes it)" if s.committed_on else "interrupted save") if u in s.torn_on else "leftovers"
                lines.append(f"  {tags[u]} step {s.step}: {what}, {len(keys)} key(s): " + ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else ""))
    lines += _unreachable_lines(dict(res.unreachable), tags)
    _emit(lines)
    return res.exit_code


def _cmd_verify(args: argparse.Namespace, ops: Any) -> int:
    res = ops.verify(args.urls, step=args.step, quick=args.quick, threads=args.threads, progress=_progress(args))
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return res.exit_code
    tags, lines = _legend(res.replicas)
    mode = "quick: manifests, presence, sizes" if res.quick else "full: every byte read and checksummed"
    for s in res.steps:
        head = f"step {s.step}: {s.world_size or '?'} rank(s), {s.objects if s.objects is not None else '?'} objects, {_size(s.bytes)}, saved {_when(s.created_unix)} ({_age(s.created_unix)} ago)"
        lines.append("")
        lines.append(head + ("" if s.recoverable else "  -- NOT RECOVERABLE from these replicas"))
        rows = []
        for rc in s.replicas:
            label = f"{tags[rc.replica]} {rc.replica}"
            if not rc.ranks:
                status = {"absent": "LAGGING (not here)", "torn": "LAGGING (torn here)"}.get(rc.status, "BAD commit")
                rows.append([label, "-", "-", "-", status])
            for rk in rc.ranks:
                status = "ok" if rk.ok else "BAD"
                rows.append([label, rk.rank, f"{rk.verified}/{rk.objects}", _size(rk.bytes), status])
        lines += _table(["REPLICA", "RANK", "OBJECTS OK", "BYTES", "STATUS"], rows, "  ")
    problems = res.problems
    if problems:
        lines.append("")
        lines.append("problems:")
        lines += [f"  {p}" for p in problems]
    torn = {u: v for u, v in res.torn.items() if v}
    if torn:
        lines.append("")
        lines.append("garbage (interrupted saves, not corruption; see 'ckptmirror prune'):")
        lines += [f"  {tags[u]} torn steps {list(v)}" for u, v in torn.items()]
    lines += _unreachable_lines(dict(res.unreachable), tags)
    lines.append("")
    n = len(res.steps)
    if res.exit_code == 0:
        lines.append(f"OK: {n} step(s) verified on {len(res.replicas)} replica(s) ({mode})" if n else "OK: no checkpoints on these replicas")
    else:
        kinds: dict[str, int] = {}
        for p in problems:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        summary = ", ".join(f"{c} {k}" for k, c in sorted(kinds.items()))
        if problems:
            msg = f"FAILED: {len(problems)} problem(s) ({summary}) in {n} step(s) ({mode})"
            if res.unreachable:
                msg += f"; {len(res.unreachable)} replica(s) unreachable"
        else:
            msg = f"INCOMPLETE: {len(res.unreachable)} replica(s) unreachable; {n} step(s) verified on the others ({mode})"
        if problems and all(s.recoverable for s in res.steps) and len(res.replicas) > 1:
            msg += "; 'ckptmirror repair' can fix them from the good copies"
        lines.append(msg)
    _emit(lines)
    return res.exit_code


def _cmd_repair(args: argparse.Namespace, ops: Any) -> int:
    res = ops.repair(args.urls, step=args.step, dry_run=args.dry_run, threads=args.threads, progress=_progress(args))
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return res.exit_code
    tags, lines = _legend(res.replicas)
    verb = "would " if res.dry_run else ""
    for a in res.actions:
        if a.action == "copy":
            text = f"{verb}copy   {a.key} {tags.get(a.source or '', '?')} -> {tags[a.replica]}  ({_size(a.bytes)}; was {a.reason})"
        else:
            text = f"{verb}{a.action} {a.key} on {tags[a.replica]}  ({a.reason})"
        if a.error:
            text = f"FAILED {text}: {a.error}"
        lines.append(text)
    for p in res.unrecoverable:
        lines.append(f"CANNOT REPAIR {p}")
    lines += _unreachable_lines(dict(res.unreachable), tags)
    copies = sum(1 for a in res.actions if a.action == "copy" and (a.done or res.dry_run))
    commits = sum(1 for a in res.actions if a.action != "copy" and (a.done or res.dry_run))
    if not res.actions and not res.unrecoverable:
        lines.append(f"nothing to repair: {len(res.steps)} step(s) verify on every replica")
    else:
        lines.append(f"{'would copy' if res.dry_run else 'copied'} {copies} object(s), {'would commit' if res.dry_run else 'committed'} {commits} step copy(ies)"
                     + (f"; {len(res.unrecoverable)} problem(s) cannot be repaired" if res.unrecoverable else ""))
    _emit(lines)
    return res.exit_code


def _steps_text(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"


def _cmd_prune(args: argparse.Namespace, ops: Any) -> int:
    res = ops.prune(args.urls, keep=args.keep, dry_run=args.dry_run, all_torn=args.all_torn)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return res.exit_code
    verb = "would remove" if res.dry_run else "removed"
    lines: list[str] = []
    if res.refused:
        lines.append(f"kept every committed step: {res.refused}")
    for p in res.replicas:
        garbage = f"{len(p.removed_garbage)} key(s)" + (": " + ", ".join(p.removed_garbage[:3]) + (" ..." if len(p.removed_garbage) > 3 else "") if p.removed_garbage else "")
        rows = [
            ("kept steps", _steps_text(p.kept)),
            (f"{verb} steps", _steps_text(p.removed_steps)),
            (f"{verb} torn saves", _steps_text(p.removed_torn)),
            (f"{verb} leftovers", garbage),
        ]
        if p.skipped_torn:
            rows.append(("left torn saves", f"{_steps_text(p.skipped_torn)} (newer than the newest commit, maybe a save in progress; --all-torn removes them)"))
        rows += [("FAILED", e) for e in p.errors]
        width = max(len(a) for a, _ in rows)
        lines.append(f"{p.replica}:")
        lines += [f"  {a.ljust(width)}  {b}" for a, b in rows]
    lines += [f"UNREACHABLE {u}: {e}" for u, e in res.unreachable.items()]
    _emit(lines)
    return res.exit_code


def _leaf_text(leaf: Any) -> str:
    shape = "[" + ", ".join(map(str, leaf.shape)) + "]"
    extra = []
    if leaf.kind == "ndarray":
        extra.append("numpy")
    if leaf.parameter:
        extra.append("parameter")
    elif leaf.requires_grad:
        extra.append("requires_grad")
    if leaf.shared:
        extra.append(f"shares storage {leaf.storage}")
    return f"{leaf.dtype:<10} {shape:<16} {_size(leaf.nbytes):>10}" + (f"  ({', '.join(extra)})" if extra else "")


def _value_text(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _tree_lines(node: Any, label: str, depth: int, is_leaf: Callable[[Any], bool], out: list[tuple[str, str]]) -> None:
    pad = "  " * depth
    if is_leaf(node):
        out.append((pad + label, _leaf_text(node)))
    elif isinstance(node, dict) and node:
        out.append((pad + label, ""))
        for k, v in node.items():
            _tree_lines(v, str(k), depth + 1, is_leaf, out)
    elif type(node) in (list, tuple) and node:
        out.append((pad + label, f"({type(node).__name__} of {len(node)})"))
        for i, v in enumerate(node):
            _tree_lines(v, str(i), depth + 1, is_leaf, out)
    else:
        out.append((pad + label, _value_text(node)))


def _cmd_inspect(args: argparse.Namespace, ops: Any) -> int:
    res = ops.inspect(args.urls, step=args.step, rank=args.rank)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    lines = [f"step {res.step}: {res.world_size} rank(s), saved {_when(res.created_unix)} ({_age(res.created_unix)} ago)"]
    for rt in res.ranks:
        tensors = [e for e in rt.entries if e.leaf is not None]
        lines.append(f"rank {rt.rank}: {len(tensors)} tensor(s), {_size(rt.stream_bytes)} in {rt.objects} object(s)")
        rows: list[tuple[str, str]] = []
        tree = rt.tree
        if isinstance(tree, dict) and tree:
            for k, v in tree.items():
                _tree_lines(v, str(k), 1, lambda x: isinstance(x, ops.LeafInfo), rows)
        else:
            _tree_lines(tree, "state", 1, lambda x: isinstance(x, ops.LeafInfo), rows)
        width = max((len(a) for a, _ in rows), default=0)
        lines += [f"{a.ljust(width)}  {b}".rstrip() for a, b in rows]
    _emit(lines)
    return 0


def _cmd_export(args: argparse.Namespace, ops: Any) -> int:
    res = ops.export(args.urls, args.output, format=args.format, step=args.step, rank=args.rank, overwrite=args.force)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    where = "metadata" if res.format == "safetensors" else "the dict"
    lines = [f"wrote {res.path} ({res.format}): step {res.step}, rank {res.rank}, {res.tensors} tensor(s), {_size(res.tensor_bytes)}, {len(res.values)} plain value(s) in {where}"]
    if res.cloned:
        lines.append(f"cloned {len(res.cloned)} tensor(s) that shared storage or were not contiguous: " + ", ".join(res.cloned[:5]) + (" ..." if len(res.cloned) > 5 else ""))
    for d in res.dropped:
        lines.append(f"dropped {d}")
    _emit(lines)
    return 0


_OPS: dict[str, Callable[[argparse.Namespace, Any], int]] = {
    "ls": _cmd_ls,
    "verify": _cmd_verify,
    "repair": _cmd_repair,
    "prune": _cmd_prune,
    "inspect": _cmd_inspect,
    "export": _cmd_export,
}


if __name__ == "__main__":
    sys.exit(main())
