"""A newcomer's traps on resume: typo'd paths, bad URLs, wrapped models.

Each test drives the public API the way the README does and checks that a mistake is loud
(a WARNING or an error naming the replica and the fix) instead of a silent fresh start.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

import ckptmirror
from ckptmirror import Mirror, StateMismatchError, StepNotFoundError


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_restore_from_a_mistyped_path_creates_nothing_and_warns(tmp_path, caplog) -> None:
    typo = tmp_path / "data" / "ckpt" / "rnu1"
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.WARNING, logger="ckptmirror"), Mirror([str(typo)]) as m:
        assert m.restore(model) is None
        assert m.load_state() is None
    assert not typo.exists() and not (tmp_path / "data").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no committed checkpoint" in w and str(typo) in w for w in warnings), warnings
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_require_raises_step_not_found_naming_every_replica(tmp_path) -> None:
    a, b = tmp_path / "nvme" / "run1", tmp_path / "backup" / "run1"
    with Mirror([str(a), str(b)]) as m:
        with pytest.raises(StepNotFoundError) as exc:
            m.restore(_model(), require=True)
        assert str(a) in str(exc.value) and str(b) in str(exc.value)
        assert exc.value.replicas == [str(a), str(b)] and exc.value.step is None
        assert isinstance(exc.value, FileNotFoundError)
        with pytest.raises(StepNotFoundError):
            m.load_state(require=True)
    assert not a.exists() and not b.exists()


def test_require_restores_when_a_step_exists(tmp_path) -> None:
    root = tmp_path / "fresh"  # the first save creates the directory
    src = _model(1)
    with Mirror([str(root)]) as m:
        m.save(3, src).result(timeout=30)
    assert root.is_dir()
    dst = _model(2)
    with Mirror([str(root)]) as m:
        res = m.restore(dst, require=True)
    assert res is not None and res.step == 3
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_module_level_restore_takes_require(tmp_path) -> None:
    ckptmirror.init([str(tmp_path / "none")])
    try:
        with pytest.raises(StepNotFoundError):
            ckptmirror.restore(_model(), require=True)
    finally:
        ckptmirror.close()


@pytest.mark.parametrize(
    ("url", "suggestion"),
    [("s4://bucket/run1", "s3://"), ("pear://node1:7070/run1", "peer://"), ("memroy://x", "memory://")],
)
def test_unknown_scheme_suggests_the_closest(tmp_path, url: str, suggestion: str) -> None:
    with pytest.raises(ValueError) as exc:
        Mirror([str(tmp_path / "a"), url])
    assert suggestion in str(exc.value) and url in str(exc.value)
    # A misconfiguration like any other (the docs' error tree), and still a ValueError.
    assert isinstance(exc.value, ckptmirror.ReplicaURLError) and isinstance(exc.value, ckptmirror.ReplicaConfigError)


@pytest.mark.parametrize(
    ("url", "fixed"),
    [
        ("peer:/host:7070/x", "peer://host:7070/x"),
        ("file//data/x", "file://data/x"),
        ("s3:bucket/run1", "s3://bucket/run1"),
    ],
)
def test_malformed_url_is_an_error_not_a_relative_path(tmp_path, monkeypatch, url: str, fixed: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ckptmirror.ReplicaURLError) as exc:
        Mirror([url])
    assert fixed in str(exc.value) and isinstance(exc.value, ValueError)
    assert os.listdir(tmp_path) == []  # nothing was created relative to the working directory


@pytest.mark.parametrize("url", ["peer://127.0.0.1:/run1", "peers://node1:/run1"])
def test_a_peer_url_with_an_empty_port_is_refused_not_taken_as_the_default(url: str) -> None:
    with pytest.raises(ckptmirror.ReplicaURLError, match="peer://host:port/namespace") as exc:
        Mirror([url])
    assert url in str(exc.value)
    from ckptmirror.replicas.peer import PeerReplica

    assert PeerReplica(url.replace(":/run1", "/run1")).port == 7070  # no colon: the default port


def test_a_known_fsspec_protocol_without_its_package_names_the_replica(tmp_path) -> None:
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ckptmirror.ReplicaConfigError, match=r"replica gs://bkt/run1: .*gcsfs") as exc:
        Mirror([str(tmp_path / "a"), "gs://bkt/run1"])
    assert isinstance(exc.value.__cause__, ImportError)
    assert not (tmp_path / "a").exists() or not os.listdir(tmp_path / "a")


@pytest.mark.parametrize(
    ("url", "key"),
    [("peers://h:1/ns", "peer"), ("s3a://bucket/p", "s3"), ("peer://h:1/ns", "peer"), ("s3://b/p", "s3")],
)
def test_storage_options_by_backend_scheme_cover_its_variants(url: str, key: str) -> None:
    from ckptmirror.replicas import options_for

    assert options_for(url, {key: {"x": 1}}) == {"x": 1}
    # the exact scheme, then the full URL, win over the backend's
    assert options_for(url, {key: {"x": 1}, url.split("://")[0]: {"x": 2}}) == {"x": 2}
    assert options_for(url, {key: {"x": 1}, url: {"x": 3}}) == {"x": 3}
    assert options_for(url, {"file": {"x": 1}}) is None


class _Wrapper(torch.nn.Module):
    """Stands for DistributedDataParallel / torch.compile: the state dict keys gain a prefix."""

    def __init__(self, inner: torch.nn.Module, attr: str) -> None:
        super().__init__()
        setattr(self, attr, inner)


@pytest.mark.parametrize("attr", ["module", "_orig_mod"])
def test_key_prefix_mismatch_names_the_prefix(tmp_path, attr: str) -> None:
    with Mirror([str(tmp_path)]) as m:
        m.save(1, _model()).result(timeout=30)
        wrapped = _Wrapper(_model(5), attr)
        before = [p.detach().clone() for p in wrapped.parameters()]
        with pytest.raises(StateMismatchError) as exc:
            m.restore(wrapped)
        msg = str(exc.value)
        assert f"'{attr}.'" in msg and "unwrapped" in msg, msg
        assert all(torch.equal(a, b) for a, b in zip(before, wrapped.parameters()))
        # The other direction: saved wrapped, restored plain.
        m.save(2, _Wrapper(_model(), attr)).result(timeout=30)
        with pytest.raises(StateMismatchError) as exc:
            m.restore(_model())
        assert f"'{attr}.'" in str(exc.value)


def test_unrelated_key_mismatch_suggests_strict_false(tmp_path) -> None:
    with Mirror([str(tmp_path)]) as m:
        m.save(1, _model()).result(timeout=30)
        other = torch.nn.Sequential(
            torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2)
        )
        with pytest.raises(StateMismatchError) as exc:
            m.restore(other)
        assert "strict=False" in str(exc.value) and "state['model']['3.weight']" in str(exc.value)


@pytest.mark.parametrize("url", ["s3://", "peer://", "peer://h:notaport/x", "peer://h:1/{rnak}"])
def test_every_unusable_url_is_a_replica_url_error(url: str) -> None:
    # A review found these were plain ValueErrors, which `except ReplicaConfigError` missed.
    with pytest.raises(ckptmirror.ReplicaURLError) as exc:
        Mirror([url])
    assert url in str(exc.value)


def test_one_local_store_given_twice_is_refused(tmp_path) -> None:
    # /x, /x/, file:///x and a symlink to /x are one store: a save would write the same files
    # twice and count one copy as two (and a failed save's cleanup on one would delete the
    # other's committed step).
    d = tmp_path / "r"
    d.mkdir()
    (tmp_path / "link").symlink_to(d)
    for other in (f"{d}/", f"file://{d}", str(tmp_path / "link")):
        with pytest.raises(ckptmirror.ReplicaURLError, match="more than once"):
            Mirror([str(d), other])
    with Mirror([str(d), str(tmp_path / "other")]):
        pass
