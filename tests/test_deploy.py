"""The deployment recipes of examples/deploy/, checked as far as one machine allows.

- systemd units: ``systemd-analyze verify`` (skipped where it is missing or cannot run), the
  settings the recipes promise (credentials, restart policy, limits, sandbox), every
  ``ExecStart`` accepted by ``ckptmirror serve``'s own parser, and the disk unit's command line
  starting a real agent that answers its health check;
- the Containerfile: ``ENTRYPOINT`` + ``CMD`` is a valid ``ckptmirror serve`` command, its
  ``HEALTHCHECK`` runs the copied ``healthcheck.py`` against the agent's health route with the
  read-only token, and both run for real (an agent from that command, the check against it);
- the Slurm script: ``bash -n``, its ``ckptmirror serve``, health check and ``torchrun`` lines
  parse, and it runs end to end on this machine with stand-ins for ``srun`` and ``scontrol``
  (one node, two CPU ranks): saves reach the node's disk and the ring peer, and after the disk is
  lost the next run resumes from the peer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _agent import HOST, AgentProc, raw_request, serve_command, start_agent, terminate, write_token
from _helpers import free_port

from ckptmirror.cli.main import build_parser
from ckptmirror.replicas import _peer_protocol as wire

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "examples" / "deploy"
UNITS = sorted(DEPLOY.glob("*.service"))
CONTAINERFILE = DEPLOY / "Containerfile"
SBATCH = DEPLOY / "slurm_train.sbatch"
HEALTHCHECK = DEPLOY / "healthcheck.py"

#: What systemd puts in place of the specifiers the units use (for a system service).
CREDS = "/run/credentials/ckptmirror-agent.service"
SPECIFIERS = {"%d": CREDS, "%S": "/var/lib", "%t": "/run", "%%": "%"}


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_serve(argv: list[str], where: str) -> Any:
    """``ckptmirror serve`` arguments parsed by the real parser (a failure names ``where``)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `ckptmirror {shlex.join(argv)}` is not accepted (exit {exc.code})")
    assert args.command == "serve", f"{where}: not a serve command: {argv}"
    return args


def option_value(argv: list[str], option: str) -> str | None:
    for i, word in enumerate(argv):
        if word == option and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    return None


def replace_values(argv: list[str], values: dict[str, str]) -> list[str]:
    """``argv`` with the value of each option in ``values`` replaced (the option must be there)."""
    out = list(argv)
    for option, value in values.items():
        i = out.index(option)
        out[i + 1] = value
    return out


def healthcheck(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *argv], capture_output=True, text=True, timeout=timeout)


def start_serve(args: list[str]) -> AgentProc:
    """A real agent from the options of a ``ckptmirror serve`` command (their --port must be 0)."""
    assert option_value(args, "--port") == "0"
    root = option_value(args, "--root")
    assert root is not None
    # start_agent puts --root/--host/--port first; ours come after them and win (argparse: last).
    return start_agent(root, token_file=None, host=option_value(args, "--host") or HOST, args=args)


# ------------------------------------------------------------------------------ systemd
def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections: (key, value) pairs in order (keys may repeat), continuations joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    logical = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None and "=" in line, f"{path.name}: cannot parse {line!r}"
        key, value = line.split("=", 1)
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= expected once, found {found}"
    return found[0]


def exec_start(unit: dict[str, list[tuple[str, str]]]) -> list[str]:
    line = one(unit, "Service", "ExecStart")
    for spec, value in SPECIFIERS.items():
        line = line.replace(spec, value)
    return shlex.split(line)


def test_there_are_units() -> None:
    assert {u.name for u in UNITS} >= {"ckptmirror-agent.service", "ckptmirror-agent-ram.service"}


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_unit_settings_and_exec_start(path: Path) -> None:
    unit = parse_unit(path)
    argv = exec_start(unit)
    assert Path(argv[0]).name == "ckptmirror", f"ExecStart runs {argv[0]}, not the ckptmirror script"
    args = parse_serve(argv[1:], path.name)

    # The tokens come from systemd credentials, never from the command line or the environment.
    creds = {v.split(":", 1)[0]: v.split(":", 1)[1] for v in values(unit, "Service", "LoadCredential")}
    assert args.token_file and args.metrics_token_file, "the unit must set --token-file and --metrics-token-file"
    for option in (args.token_file, args.metrics_token_file):
        assert option.startswith(CREDS + "/"), f"{option}: not under the credentials directory (%d)"
        assert option.rsplit("/", 1)[1] in creds, f"{option}: no LoadCredential= of that name"
    assert not values(unit, "Service", "Environment"), "no token (or anything else) through Environment="
    assert args.host == "0.0.0.0", "a node's agent serves the other nodes"

    assert one(unit, "Service", "Restart") == "on-failure"
    assert "2" in one(unit, "Service", "RestartPreventExitStatus").split(), "usage errors (exit 2) are not retried"
    for key in ("MemoryMax", "LimitNOFILE", "CPUQuota"):
        assert one(unit, "Service", key), f"{key}= is empty"
    sandbox = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateDevices": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictNamespaces": "yes",
    }
    for key, want in sandbox.items():
        assert one(unit, "Service", key) == want, f"{key}= should be {want!r}"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"

    if args.no_fsync:  # the RAM tier: its root is the unit's runtime directory, a tmpfs
        runtime = one(unit, "Service", "RuntimeDirectory")
        assert args.root == f"/run/{runtime}", f"--root {args.root} is not the RuntimeDirectory /run/{runtime}"
        assert one(unit, "Service", "RuntimeDirectoryPreserve") == "restart", "a crash-restart must keep the RAM tier"
    else:  # on a disk: the unit's state directory
        state = one(unit, "Service", "StateDirectory")
        assert args.root == f"/var/lib/{state}", f"--root {args.root} is not the StateDirectory /var/lib/{state}"


def _verify_works(tmp_path: Path, analyze: str) -> bool:
    probe = tmp_path / "probe.service"
    probe.write_text(f"[Unit]\nDescription=probe\n[Service]\nExecStart={sys.executable} -c pass\n")
    r = subprocess.run([analyze, "verify", "--man=no", str(probe)], capture_output=True, text=True, timeout=60)
    return r.returncode == 0 and "probe.service" not in r.stderr


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); the unit settings are checked above")
    if not _verify_works(tmp_path, analyze):
        pytest.skip("systemd-analyze verify does not work on this machine (a trivial unit fails it)")
    # verify checks that ExecStart's program exists: point it at this environment's ckptmirror.
    script = serve_command()
    if len(script) != 1:
        pytest.skip("no ckptmirror console script in this environment (pip install -e .)")
    copies = []
    for unit in UNITS:
        text = unit.read_text(encoding="utf-8")
        assert "ExecStart=/opt/ckptmirror/bin/ckptmirror " in text, f"{unit.name}: ExecStart moved; update this test"
        copy = tmp_path / unit.name
        copy.write_text(text.replace("ExecStart=/opt/ckptmirror/bin/ckptmirror ", f"ExecStart={script[0]} "))
        copies.append(copy)
    r = subprocess.run([analyze, "verify", "--man=no", *map(str, copies)], capture_output=True, text=True, timeout=120)
    complaints = [line for line in r.stderr.splitlines() if any(u.name in line for u in UNITS)]
    assert r.returncode == 0 and not complaints, f"systemd-analyze verify:\n{r.stdout}\n{r.stderr}"


def test_disk_unit_command_starts_an_agent_its_health_check_reaches(tmp_path: Path) -> None:
    """The disk unit's ExecStart, with the credentials and state directory moved under tmp_path and
    port 0, runs: the agent listens beyond loopback (its tokens allow it) and answers /v1/health."""
    unit = parse_unit(DEPLOY / "ckptmirror-agent.service")
    argv = exec_start(unit)[2:]  # the options after `ckptmirror serve`
    token = write_token(tmp_path / "token", "admin-token-0123456789")
    metrics = write_token(tmp_path / "metrics-token", "metrics-token-0123456789")
    args = replace_values(
        argv,
        {"--root": str(tmp_path / "state"), "--port": "0", "--token-file": token, "--metrics-token-file": metrics},
    )
    a = start_serve(args)
    try:
        r = healthcheck(["--token-file", metrics, f"127.0.0.1:{a.port}"])
        assert r.returncode == 0 and " ok version=" in r.stdout, (r.stdout, r.stderr, a.log())
        assert "scrub_damaged=0" in r.stdout, "the unit turns the scrubber on"
    finally:
        terminate(a.proc)
    assert a.proc.returncode == 0, "SIGTERM is a clean exit (Restart=on-failure does not restart it)"


# ---------------------------------------------------------------------------- container
def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuations joined, comment lines dropped."""
    out = []
    logical = ""
    for raw in CONTAINERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        instruction, _, rest = line.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    assert not logical, "a continuation line at the end of the Containerfile"
    return out


def instruction(name: str) -> list[str]:
    return [args for inst, args in containerfile() if inst == name]


def exec_form(text: str, what: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{what} must be the exec form"
    return value


def container_serve_argv() -> list[str]:
    (entrypoint,) = instruction("ENTRYPOINT")
    (cmd,) = instruction("CMD")
    return exec_form(entrypoint, "ENTRYPOINT") + exec_form(cmd, "CMD")


def container_healthcheck_argv() -> list[str]:
    (hc,) = instruction("HEALTHCHECK")
    options, sep, command = hc.partition("CMD ")
    assert sep, "HEALTHCHECK needs a CMD"
    for opt in options.split():
        assert re.fullmatch(r"--(interval|timeout|start-period|start-interval|retries)=\S+", opt), opt
    return exec_form(command, "HEALTHCHECK CMD")


def test_containerfile_build_steps() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]
    runs = " ".join(instruction("RUN"))
    assert re.search(r"pip install .*-c constraints\.txt", runs), "install with the constraints file"
    for _, args in [(i, a) for i, a in containerfile() if i == "COPY"]:
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository (build context: the root)"
    (user,) = instruction("USER")
    assert user.split(":")[0] not in ("root", "0"), "the agent must not run as root"
    argv = container_serve_argv()
    assert argv[0] == "ckptmirror", "ENTRYPOINT must run the ckptmirror console script"
    args = parse_serve(argv[1:], "Containerfile ENTRYPOINT + CMD")
    assert instruction("EXPOSE") == [str(args.port)], "EXPOSE the port the agent listens on"
    assert args.host == "0.0.0.0"
    for option in (args.token_file, args.metrics_token_file):
        assert option and option.startswith("/run/secrets/"), f"{option}: tokens come from secrets"


def test_containerfile_healthcheck_is_the_copied_script_on_the_health_route() -> None:
    hc = container_healthcheck_argv()
    copies = {shlex.split(a)[-1]: shlex.split(a)[0] for i, a in containerfile() if i == "COPY"}
    assert hc[0] == "python" and copies.get(hc[1]) == "examples/deploy/healthcheck.py", hc
    mod = load_module(HEALTHCHECK)
    assert mod.HEALTH_PATH == wire.HEALTH_PATH, "healthcheck.py must GET the agent's health route"
    opts = mod.build_parser().parse_args(hc[2:])
    serve = parse_serve(container_serve_argv()[1:], "Containerfile")
    assert opts.token_file == serve.metrics_token_file, "the health check uses the read-only metrics token"
    assert opts.agents == [f"127.0.0.1:{serve.port}"]


def test_container_command_and_healthcheck_run(tmp_path: Path) -> None:
    """ENTRYPOINT + CMD (paths moved under tmp_path, port 0) starts an agent; the HEALTHCHECK
    command passes against it, fails with a wrong token and against a port nobody listens on."""
    serve = container_serve_argv()
    admin = write_token(tmp_path / "ckptmirror_token", "admin-token-0123456789")
    metrics = write_token(tmp_path / "ckptmirror_metrics_token", "metrics-token-0123456789")
    args = replace_values(
        serve[2:],  # the options after `ckptmirror serve`
        {"--root": str(tmp_path / "data"), "--port": "0", "--token-file": admin, "--metrics-token-file": metrics},
    )
    a = start_serve(args)
    try:
        hc = container_healthcheck_argv()[2:]
        addr = f"127.0.0.1:{a.port}"
        run = [metrics if w.startswith("/run/secrets/") else addr if w.startswith("127.0.0.1:") else w for w in hc]
        r = healthcheck(run)
        assert r.returncode == 0, (r.stdout, r.stderr, a.log())

        # The route answers the read-only token, and refuses no token: the HEALTHCHECK needs one.
        status, _, body = raw_request(a.port, "GET", wire.HEALTH_PATH, token="metrics-token-0123456789")
        assert status == 200 and "version" in json.loads(body)
        assert raw_request(a.port, "GET", wire.HEALTH_PATH, token=None)[0] == 401

        wrong = write_token(tmp_path / "wrong", "not-the-token-0123456789")
        r = healthcheck(["--token-file", wrong, addr])
        assert r.returncode == 1 and "HTTP 403" in r.stdout, r.stdout
    finally:
        terminate(a.proc)
    r = healthcheck(["--token-file", metrics, "--timeout", "2", f"127.0.0.1:{free_port()}"])
    assert r.returncode == 1 and "down" in r.stdout


def test_healthcheck_waits_for_a_late_agent(tmp_path: Path) -> None:
    """--wait retries until the agent answers (as the Slurm script needs for agents starting)."""
    port = free_port()
    token = write_token(tmp_path / "token", "admin-token-0123456789")
    proc = subprocess.Popen(
        [sys.executable, str(HEALTHCHECK), "--token-file", token, "--wait", "60", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        a = start_agent(tmp_path / "root", token_file=token, port=port)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            terminate(a.proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and f"127.0.0.1:{port} ok" in out, (out, err)


# -------------------------------------------------------------------------------- Slurm
#: Values for the variables of the sbatch script's command lines when they are parsed alone.
SBATCH_VARS = {
    "AGENT_ROOT": "/dev/shm/ckptmirror-agent-42",
    "AGENT_PORT": "7070",
    "TOKEN_FILE": "/home/u/.config/ckptmirror/token",
    "SLURM_JOB_ID": "42",
    "SLURM_NNODES": "4",
    "SLURM_NODEID": "0",
    "GPUS_PER_NODE": "8",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29501",
    "REPO": str(REPO),
}


def sbatch_logical_lines() -> list[str]:
    """The script's command lines: continuations joined, comments and blank lines dropped."""
    lines = SBATCH.read_text(encoding="utf-8").replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def substitute(text: str) -> str:
    def var(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in SBATCH_VARS, f"add {name} to SBATCH_VARS"
        return SBATCH_VARS[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", var, text)


def test_sbatch_is_valid_bash() -> None:
    r = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_sbatch_serve_health_and_torchrun_lines_parse() -> None:
    lines = sbatch_logical_lines()
    serve = [line for line in lines if "ckptmirror serve" in line]
    assert len(serve) == 1, serve
    words = shlex.split(substitute(serve[0].split("ckptmirror serve", 1)[1]))
    words = words[: next((i for i, w in enumerate(words) if w in (">", "2>", "&")), len(words))]
    args = parse_serve(["serve", *words], "slurm_train.sbatch")
    assert args.host == "0.0.0.0" and args.token_file == SBATCH_VARS["TOKEN_FILE"]

    hc = [line for line in lines if "healthcheck.py" in line and line.strip().startswith("python")]
    assert len(hc) == 1, hc
    hc_words = shlex.split(substitute(hc[0].replace('"${AGENT_ADDRS[@]}"', "node0:7070 node1:7070")))
    opts = load_module(HEALTHCHECK).build_parser().parse_args(hc_words[2:])
    assert opts.token_file == args.token_file and opts.wait > 0

    inner = re.search(r"'exec torchrun (.*?) \"\$@\"'", SBATCH.read_text(encoding="utf-8"))
    assert inner is not None, "the torchrun command line moved; update this test"
    from torch.distributed.run import get_args_parser

    targs = get_args_parser().parse_args([*shlex.split(substitute(inner.group(1))), "train.py"])
    assert targs.node_rank == 0 and targs.master_addr == "node0" and targs.nnodes == "4"
    assert targs.rdzv_backend == "static", "the static rendezvous keeps every rank on its node"


def _run_sbatch(env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        ["bash", str(SBATCH)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the agent and torchrun are in its process group
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"slurm_train.sbatch did not finish within {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _json_lines(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        if line.startswith("{"):
            yield json.loads(line)


@pytest.fixture
def slurm_shims(tmp_path: Path) -> Path:
    """``srun`` (drops its options, runs the command as node 0) and ``scontrol show hostnames``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "while [[ $# -gt 0 && $1 == -* ]]; do shift; done\n"
        "export SLURM_NODEID=${SLURM_NODEID:-0} SLURM_PROCID=0\n"
        'exec "$@"\n'
    )
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n[[ $1 == show && $2 == hostnames ]] || exit 2\necho 127.0.0.1\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def test_sbatch_runs_end_to_end_and_resumes_from_the_peer(tmp_path: Path, slurm_shims: Path) -> None:
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("no torchrun next to this Python")
    agent_port = free_port()
    local = tmp_path / "local"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CKPTMIRROR_"))},
        "PATH": os.pathsep.join([str(slurm_shims), os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        "REPO": str(REPO),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "deploytest",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "node0",
        "AGENT_PORT": str(agent_port),
        "AGENT_ROOT": str(tmp_path / "agent"),  # a disk root: kept after the job, as the script says
        "CKPTMIRROR_TOKEN_FILE": str(tmp_path / "cfg" / "token"),  # made by the script
        "CKPT_LOCAL": str(local),
        "GPUS_PER_NODE": "2",
        "MASTER_PORT_BASE": str(free_port() - 1),
        "TRAIN_ARGS": "--steps 6 --save-every 2 --width 32",
    }
    peer = f"peer://127.0.0.1:{agent_port}/deploytest/node0"
    disk = str(local / "deploytest" / "node0")

    r = _run_sbatch(env, tmp_path)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert f"127.0.0.1:{agent_port} ok" in r.stdout, "the script waits for the agent's health first"
    (done,) = [d for d in _json_lines(r.stdout) if "done" in d]
    assert done["replica_steps"] == {disk: [2, 4, 6], peer: [2, 4, 6]}
    assert (tmp_path / "cfg" / "token").stat().st_mode & 0o077 == 0, "the token file is private"

    # The node's disk is lost: the next job resumes from the ring peer's copy.
    shutil.rmtree(local)
    r = _run_sbatch({**env, "SLURM_JOB_ID": "4243", "TRAIN_ARGS": "--steps 8 --save-every 2 --width 32"}, tmp_path)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    (resumed,) = [d for d in _json_lines(r.stdout) if "resumed_from" in d]
    assert resumed == {"resumed_from": 6, "sources": [peer]}
    (done,) = [d for d in _json_lines(r.stdout) if "done" in d]
    assert done["replica_steps"] == {disk: [8], peer: [4, 6, 8]}
