"""Configuration by environment: the table, the parsers, explicit arguments winning, and a whole
training script configured by the environment alone (a subprocess)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _helpers import REPO

import ckptmirror
from ckptmirror import EnvConfigError, Mirror, config, shutdown
from ckptmirror.replicas.peer import TOKEN_ENV

PACKAGE = REPO / "ckptmirror"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No CKPTMIRROR_* variable from the outer environment, and the ckptmirror logger's level
    put back afterwards (a test here changes it on purpose)."""
    for row in config.ENVIRONMENT:
        monkeypatch.delenv(row.name, raising=False)
    logger = logging.getLogger("ckptmirror")
    level = logger.level
    yield
    logger.setLevel(level)


def test_environment_table_lists_every_variable_the_package_reads() -> None:
    names = [row.name for row in config.ENVIRONMENT]
    assert len(names) == len(set(names))
    for row in config.ENVIRONMENT:
        assert isinstance(row, tuple) and len(row) == 3 and all(isinstance(x, str) and x for x in row)
        assert row.name.startswith("CKPTMIRROR_")
    constants = {v for k, v in vars(config).items() if k.startswith("ENV_") and isinstance(v, str)}
    assert constants == set(names)
    # The names live in one place: the other modules take theirs from the table's constants.
    assert ckptmirror.ENV_REPLICAS == config.ENV_REPLICAS
    assert shutdown.ENV == config.ENV_ON_SIGTERM
    assert config.ENV_PEER_TOKEN == TOKEN_ENV
    # Any CKPTMIRROR_* name written in the package's source is in the table (the demo's own
    # variables excepted: the demo sets them for its child processes, no user sets them).
    found = set()
    for path in PACKAGE.rglob("*.py"):
        found.update(re.findall(r"\bCKPTMIRROR_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert {n for n in found if not n.startswith("CKPTMIRROR_DEMO_")} <= set(names)


@pytest.mark.usefixtures("clean_env")
def test_keep_last_from_env_and_explicit_arguments_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Mirror([str(tmp_path / "a")]) as m:
        assert m.keep_last is None  # unset: keep everything
    monkeypatch.setenv(config.ENV_KEEP_LAST, " 2 ")
    with Mirror([str(tmp_path / "a")]) as m:
        assert m.keep_last == 2
        for s in range(1, 5):
            m.save(s, torch.nn.Linear(2, 2)).result(timeout=30)
        m.wait()
        assert m.steps() == [3, 4]
    with Mirror([str(tmp_path / "a")], keep_last=None) as m:
        assert m.keep_last is None  # an explicit None is an argument too
    with Mirror([str(tmp_path / "a")], keep_last=5) as m:
        assert m.keep_last == 5
    monkeypatch.setenv(config.ENV_KEEP_LAST, "None")
    assert config.keep_last() is None


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("value", ["0", "-1", "two", "2.5"])
def test_bad_keep_last_names_the_variable_before_anything_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(config.ENV_KEEP_LAST, value)
    with pytest.raises(EnvConfigError, match=rf"CKPTMIRROR_KEEP_LAST={value!r}.*integer >= 1.*'none'") as err:
        Mirror([str(tmp_path / "never")])
    assert isinstance(err.value, ValueError)
    assert not (tmp_path / "never").exists()
    with Mirror([str(tmp_path / "x")], keep_last=3) as m:  # an explicit argument does not read it
        assert m.keep_last == 3


@pytest.mark.usefixtures("clean_env")
def test_log_level_sets_only_the_ckptmirror_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    logger = logging.getLogger("ckptmirror")
    logger.setLevel(logging.NOTSET)
    with Mirror([str(tmp_path)]):
        assert logger.level == logging.NOTSET  # unset: left alone
    monkeypatch.setenv(config.ENV_LOG_LEVEL, "debug")
    with Mirror([str(tmp_path)]):
        assert logger.level == logging.DEBUG
    assert (root.level, root.handlers) == (root_level, root_handlers)
    assert logger.handlers == []  # formatting and output stay the application's
    monkeypatch.setenv(config.ENV_LOG_LEVEL, "LOUD")
    with pytest.raises(EnvConfigError, match="CKPTMIRROR_LOG_LEVEL='LOUD'.*DEBUG, INFO, WARNING, ERROR, CRITICAL"):
        Mirror([str(tmp_path)])


@pytest.mark.usefixtures("clean_env")
def test_on_sigterm_env_and_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.on_sigterm() is None
    monkeypatch.setenv(config.ENV_ON_SIGTERM, "later")
    with pytest.raises(EnvConfigError, match=r"\$CKPTMIRROR_ON_SIGTERM='later'.*'flush' or 'none'"):
        Mirror([str(tmp_path)])
    with Mirror([str(tmp_path)], on_sigterm="none"):  # the argument wins: the variable is not read
        pass
    with pytest.raises(ValueError, match=r"on_sigterm='soon'.*'flush' or 'none'"):
        config.on_sigterm("soon")
    monkeypatch.setenv(config.ENV_ON_SIGTERM, "FLUSH")
    assert shutdown.resolve(None) == "flush" and shutdown.resolve("off") is None


@pytest.mark.usefixtures("clean_env")
def test_replicas_and_progress_interval_parsers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.replicas() == []
    monkeypatch.setenv(config.ENV_REPLICAS, " /a , file:///b ,,")
    assert config.replicas() == ["/a", "file:///b"]
    assert config.progress_interval_s() == config.DEFAULT_PROGRESS_INTERVAL_S
    monkeypatch.setenv(config.ENV_PROGRESS_INTERVAL_S, "0.5")
    assert config.progress_interval_s() == 0.5
    for bad in ("0", "-3", "nan", "inf", "fast"):
        monkeypatch.setenv(config.ENV_PROGRESS_INTERVAL_S, bad)
        with pytest.raises(EnvConfigError, match="CKPTMIRROR_PROGRESS_INTERVAL_S"):
            config.progress_interval_s()


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("name", "value"),
    [(config.ENV_PROGRESS_INTERVAL_S, "-1"), (config.ENV_BACKGROUND_NICE, "20")],
)
def test_a_bad_value_read_later_fails_when_the_mirror_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """The progress interval is read by restores, the nice value by the background threads; a
    job that only saves must still hear of a bad value at Mirror(), not never."""
    monkeypatch.setenv(name, value)
    with pytest.raises(EnvConfigError, match=rf"{name}={value!r} is not accepted"):
        Mirror([str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("value", "says"),
    [(" , ", "comma-separated replica URLs"), ("s4://x/y", "unsupported replica URL scheme 's4'")],
)
def test_a_bad_replicas_variable_is_an_env_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setattr(ckptmirror, "_default", None)
    monkeypatch.setenv(config.ENV_REPLICAS, value)
    with pytest.raises(EnvConfigError, match=rf"CKPTMIRROR_REPLICAS={value!r} is not accepted: .*{says}"):
        ckptmirror.get_mirror()
    monkeypatch.setenv(config.ENV_REPLICAS, "")  # empty: unset, the default (none configured)
    with pytest.raises(ckptmirror.CkptMirrorError, match="no replicas configured") as err:
        ckptmirror.get_mirror()
    assert not isinstance(err.value, EnvConfigError)


CHILD = textwrap.dedent(
    """
    import json, logging, sys
    import torch
    import ckptmirror

    # The application configures logging itself, at WARNING; the library must not undo that.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Linear(32, 32)

    mode = sys.argv[1]
    model = net(0)
    if mode == "train":
        assert ckptmirror.restore(model) is None  # a fresh run
        for step in range(1, 5):
            with torch.no_grad():
                model.weight.add_(1.0)
            ckptmirror.save(step, model, extra={"step": step})
        ckptmirror.wait()
    else:
        res = ckptmirror.restore(model, require=True)
        expected = net(0)
        with torch.no_grad():
            for _ in range(4):  # the same float additions as the training run
                expected.weight.add_(1.0)
        assert torch.equal(model.weight, expected.weight) and res.extra == {"step": 4}
    m = ckptmirror.get_mirror()
    print(json.dumps({
        "steps": m.steps(),
        "keep_last": m.keep_last,
        "replicas": [r.url for r in m.replicas],
        "logger_level": logging.getLogger("ckptmirror").level,
        "root_level": logging.getLogger().level,
    }))
    ckptmirror.close()
    """
)


def test_a_script_configured_by_the_environment_alone(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTMIRROR_")}
    env.update(
        {
            config.ENV_REPLICAS: f"{a},file://{b}",
            config.ENV_KEEP_LAST: "2",
            config.ENV_LOG_LEVEL: "INFO",
            config.ENV_PROGRESS_INTERVAL_S: "60",
            "PYTHONPATH": str(REPO),
        }
    )

    def run(mode: str) -> tuple[dict[str, object], str]:
        p = subprocess.run(
            [sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr

    out, err = run("train")
    assert out["replicas"] == [str(a), f"file://{b}"]
    assert out["keep_last"] == 2 and out["steps"] == [3, 4]  # retention from CKPTMIRROR_KEEP_LAST
    for d in (a, b):
        assert sorted(p.parent.name for p in d.glob("step-*/COMMIT.json")) == [
            "step-000000000003",
            "step-000000000004",
        ]
    assert out["logger_level"] == logging.INFO and out["root_level"] == logging.WARNING

    out, err = run("restore")
    assert out["steps"] == [3, 4]
    # INFO lines of ckptmirror reach the application's handler; the root logger stays at WARNING.
    assert "INFO ckptmirror restored step 4" in err, err
    assert "INFO ckptmirror restore of step 4: read " in err, err
