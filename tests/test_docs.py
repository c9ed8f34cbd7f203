"""The documentation site (mkdocs.yml, docs/): every page of the nav exists, ``mkdocs build
--strict`` passes offline, and what the pages state about the command line and the environment
matches the code: every ``ckptmirror ...`` command in a code block parses, every option named
on the agent and operator pages exists, and docs/configuration.md's table is
``ckptmirror.config.ENVIRONMENT`` (plus the variables other tools set), complete.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckptmirror.cli.main import build_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
MKDOCS_YML = REPO / "mkdocs.yml"
PACKAGE = REPO / "ckptmirror"
CONFIG_PAGE = DOCS / "configuration.md"

#: Read by ``ckptmirror demo`` only to hand its child process the servers it started.
DEMO_INTERNAL = {"CKPTMIRROR_DEMO_PEER", "CKPTMIRROR_DEMO_S3"}


# ---------------------------------------------------------------------------------- helpers
def _walk_nav(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from _walk_nav(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from _walk_nav(value)


def nav_pages() -> list[str]:
    """The pages of mkdocs.yml's nav, relative to docs/ (YAML if PyYAML is there, else the lines)."""
    text = MKDOCS_YML.read_text(encoding="utf-8")
    try:
        import yaml
    except ImportError:
        nav = text.split("\nnav:", 1)[1]
        return re.findall(r"^\s*-\s.*?(\S+\.md)\s*$", nav, flags=re.MULTILINE)
    return [p for p in _walk_nav(yaml.safe_load(text)["nav"]) if p.endswith(".md")]


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def code_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        yield m.group(1), m.group(2)


def shell_lines(body: str) -> Iterator[str]:
    """The logical lines of a shell block (backslash continuations joined)."""
    yield from body.replace("\\\n", " ").splitlines()


def ckptmirror_argv(line: str) -> list[str] | None:
    """The arguments of a ``ckptmirror ...`` command line (after ``VAR=value`` prefixes), or None."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words or words[0] != "ckptmirror":
        return None
    return words[1:]


def option_strings(parser: Any) -> set[str]:
    """Every option string of ``parser`` and of its subcommands."""
    out: set[str] = set()
    for action in parser._actions:
        out.update(action.option_strings)
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict):  # the subcommands
            for sub in choices.values():
                out.update(option_strings(sub))
    return out


def subparser(name: str) -> Any:
    parser = build_parser()
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and name in choices:
            return choices[name]
    raise AssertionError(f"no subcommand {name}")


def config_table_rows() -> list[list[str]]:
    """The body rows of docs/configuration.md's table, as stripped cells."""
    rows = []
    for line in CONFIG_PAGE.read_text(encoding="utf-8").splitlines():
        if line.startswith("|") and not re.match(r"^\|[-| :]+\|$", line):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows[1:]  # the header


def env_names_read_by_the_package() -> set[str]:
    """Variable names the package reads by literal name, or defines as CKPTMIRROR_* constants."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        src = path.read_text(encoding="utf-8")
        names.update(re.findall(r"os\.environ(?:\.get\(|\[)\s*[\"']([A-Za-z_][A-Za-z0-9_]*)[\"']", src))
        names.update(re.findall(r"getenv\(\s*[\"']([A-Za-z_][A-Za-z0-9_]*)[\"']", src))
        names.update(re.findall(r"[\"'](CKPTMIRROR_[A-Z0-9_]+)[\"']", src))
    return names - DEMO_INTERNAL


# -------------------------------------------------------------------------------- the nav
def test_every_nav_page_exists() -> None:
    pages = nav_pages()
    assert len(pages) >= 15, f"nav looks truncated: {pages}"
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav that do not exist under docs/: {missing}"
    assert len(pages) == len(set(pages)), f"a page is in the nav twice: {pages}"


def test_every_page_is_in_the_nav() -> None:
    nav = set(nav_pages())
    orphans = [str(p.relative_to(DOCS)) for p in doc_pages() if str(p.relative_to(DOCS)) not in nav]
    assert not orphans, f"pages under docs/ missing from mkdocs.yml's nav: {orphans}"


def test_the_site_covers_the_issue() -> None:
    pages = set(nav_pages())
    for page in (
        "index.md",
        "getting-started.md",
        "replicas/local.md",
        "replicas/peer.md",
        "replicas/s3.md",
        "replicas/fsspec.md",
        "agent.md",
        "operations.md",
        "integrations.md",
        "configuration.md",
        "deploy.md",
        "reliability.md",
        "benchmarks.md",
        "FORMAT.md",
        "ARCHITECTURE.md",
    ):
        assert page in pages, f"{page} is not in the nav"
    bench = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    for chart in sorted(DOCS.glob("*.png")):
        assert f"]({chart.name})" in bench, f"docs/benchmarks.md does not show {chart.name}"


def test_the_site_fetches_nothing_at_build_time() -> None:
    text = MKDOCS_YML.read_text(encoding="utf-8")
    assert re.search(r"^\s+font: false\s*$", text, flags=re.MULTILINE), "theme.font must be false (no Google Fonts)"
    plugins = re.search(r"^plugins:\n((?:\s+- .*\n)+)", text, flags=re.MULTILINE)
    assert plugins is not None
    names = re.findall(r"- (\S+)", plugins.group(1))
    assert set(names) <= {"search"}, f"plugins other than search may fetch from the internet: {names}"


# ------------------------------------------------------------------------------ the build
@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs and mkdocs-material are not installed (pip install mkdocs mkdocs-material)",
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(MKDOCS_YML), "--site-dir", str(site)],
        cwd=REPO,  # the snippets' base path: examples/deploy/ is included from the repository root
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    for page in nav_pages():
        stem = page[: -len(".md")]
        out = site / (stem[: -len("index")] if stem.endswith("index") else stem + "/") / "index.html"
        assert out.is_file(), f"{page} was not built ({out})"
    html = "\n".join(p.read_text(encoding="utf-8") for p in site.rglob("*.html"))
    assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html
    deploy = (site / "deploy" / "index.html").read_text(encoding="utf-8")
    for included in ("LoadCredential=token:", "HEALTHCHECK", "ckptmirror.ring_peer", "srun --overlap"):
        assert included in deploy, f"docs/deploy.md did not include the file holding {included!r}"


# -------------------------------------------------------------------- the command line
def documented_commands() -> list[tuple[str, list[str]]]:
    out = []
    for page in doc_pages():
        for lang, body in code_blocks(page.read_text(encoding="utf-8")):
            if lang not in ("bash", "sh", "console", "shell", ""):
                continue
            for line in shell_lines(body):
                for command in re.split(r"\s(?:&&|\|\||;|\|)\s", line.strip()):  # one command of a chain
                    argv = ckptmirror_argv(command.strip())
                    if argv is not None:
                        out.append((f"{page.relative_to(REPO)}: {command.strip()}", argv))
    return out


def test_documented_commands_parse() -> None:
    commands = documented_commands()
    assert len(commands) >= 20, f"expected the pages' ckptmirror commands, found {len(commands)}"
    seen = set()
    for where, argv in commands:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{where}: ckptmirror does not accept it (exit {exc.code})")
        seen.add(args.command)
    assert {"serve", "ls", "verify", "repair", "prune", "inspect", "export", "demo"} <= seen


@pytest.mark.parametrize(
    ("page", "commands"),
    [("agent.md", ["serve", "verify"]), ("operations.md", ["ls", "verify", "repair", "prune", "inspect", "export"])],
)
def test_options_named_on_the_page_exist(page: str, commands: list[str]) -> None:
    text = (DOCS / page).read_text(encoding="utf-8")
    named = set(re.findall(r"`(--?[a-z][a-z0-9-]*)", text))
    known: set[str] = set()
    for c in commands:
        known |= option_strings(subparser(c))
    unknown = sorted(named - known)
    assert not unknown, f"docs/{page} names options that ckptmirror {'/'.join(commands)} does not have: {unknown}"


def test_agent_page_lists_every_serve_option() -> None:
    text = (DOCS / "agent.md").read_text(encoding="utf-8")
    options = {o for o in option_strings(subparser("serve")) if o.startswith("--") and o != "--help"}
    missing = sorted(o for o in options if f"`{o}" not in text)
    assert not missing, f"docs/agent.md does not document: {missing}"


# --------------------------------------------------------------------- the environment
def test_configuration_page_has_one_table() -> None:
    text = CONFIG_PAGE.read_text(encoding="utf-8")
    separators = re.findall(r"^\|[-| :]+\|$", text, flags=re.MULTILINE)
    assert len(separators) == 1, f"docs/configuration.md must have exactly one table, has {len(separators)}"


def test_configuration_table_is_the_config_module() -> None:
    rows = config_table_rows()
    documented = [(r[0].strip("`"), r[1], r[2]) for r in rows if re.fullmatch(r"`CKPTMIRROR_[A-Z0-9_]+`", r[0])]
    config = pytest.importorskip("ckptmirror.config", reason="ckptmirror.config is not there")
    expected = [(v.name, v.meaning, v.default) for v in config.ENVIRONMENT]
    if documented != expected:
        table = "\n".join(f"| `{n}` | {m} | {d} |" for n, m, d in expected)
        pytest.fail(f"docs/configuration.md's CKPTMIRROR_* rows are not ckptmirror.config.ENVIRONMENT; use:\n{table}")


def test_every_documented_variable_is_read_by_the_package() -> None:
    read = env_names_read_by_the_package()
    cells = " ".join(r[0] for r in config_table_rows())
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", cells))
    # The AWS_* row names the standard variables that s3fs/botocore read, not the package itself.
    unread = sorted(n for n in documented - read if not n.startswith("AWS_"))
    assert not unread, f"docs/configuration.md documents variables nothing in ckptmirror/ reads: {unread}"


def test_every_variable_the_package_reads_is_documented() -> None:
    text = CONFIG_PAGE.read_text(encoding="utf-8")
    missing = sorted(n for n in env_names_read_by_the_package() if f"`{n}`" not in text)
    assert not missing, f"ckptmirror/ reads environment variables docs/configuration.md does not name: {missing}"


#: ``m.NAME(ARGS)`` in a table cell of the README or docs/usage.md: a Mirror method's signature.
_MIRROR_CALL = re.compile(r"`m\.(\w+)\(([^)`]*)\)")


@pytest.mark.parametrize("page", ["README.md", "docs/usage.md"])
def test_documented_mirror_signatures_match_the_code(page: str) -> None:
    """Names, order and the ``*`` before keyword-only arguments: ``m.restore(model, optim, 1)``
    read off a signature without the ``*`` is a TypeError (found by an audit of the docs)."""
    import inspect

    from ckptmirror import Mirror

    text = (REPO / page).read_text()
    seen = 0
    for name, args in _MIRROR_CALL.findall(text):
        method = getattr(Mirror, name, None)
        assert callable(method), f"{page}: m.{name}() is not a Mirror method"
        params = list(inspect.signature(method).parameters.values())[1:]  # without self
        documented = [a.split("=")[0].strip() for a in args.split(",") if a.strip()]
        if not documented or any(not re.fullmatch(r"\w+|\*", d) for d in documented):
            continue  # a call with values (an example), not a signature
        real: list[str] = []
        for p in params:
            if p.kind is p.KEYWORD_ONLY and "*" not in real:
                real.append("*")
            real.append(p.name)
        if documented != real[: len(documented)]:  # a prefix: trailing optional arguments may go unnamed
            raise AssertionError(f"{page}: m.{name}({args}) but the code has ({', '.join(real)})")
        seen += 1
    assert seen >= 6, f"{page}: only {seen} signatures found"
