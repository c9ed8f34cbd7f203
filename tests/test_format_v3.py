"""Format version 3: placement records, and version-2 steps still read.

* ``tests/data/v2_step``, written by ckptmirror before version 3 (commit c3875eb), restores
  bit-exact and verifies, from a raw and from a compressing replica configuration alike; a
  version-3 save next to it commits and both steps restore;
* a version-3 step's manifest is the same document on every replica (the commit pins it), while
  each replica's placement record says how that replica stores the objects;
* a placement record is validated like a manifest: damaged, renamed, pointing into a newer step,
  or naming a codec its key's suffix contradicts, it is refused with the field named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _helpers import files_under
from test_format_v2 import assert_identical, v1_fixture_state

import ckptmirror
from ckptmirror import format as fmt
from ckptmirror.errors import ManifestError
from ckptmirror.ops import verify
from ckptmirror.placement import Placement, Stored, parse_placement

DATA = Path(__file__).resolve().parent / "data"
V2_STEP = DATA / "v2_step"


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_v2_fixture_restores_bit_exact_and_verifies(tmp_path: Path, compression: str) -> None:
    root = tmp_path / "v2"
    shutil.copytree(V2_STEP, root)
    commit = json.loads((root / fmt.commit_key(9)).read_bytes())
    assert commit["format_version"] == 2, "the fixture must stay a version-2 step"
    assert not any(f.endswith((".place.json", ".zst")) for f in files_under(root))
    opts = {"file": {"compression": compression}}
    with ckptmirror.Mirror([str(root)], storage_options=opts) as m:
        step, state = m.load_state()
        assert step == 9
        assert_identical(state, v1_fixture_state())
        # A version-3 save next to it (compressed or not): both steps restore.
        m.save_state(10, v1_fixture_state())
        m.wait()
    with ckptmirror.Mirror([str(root)]) as m:
        assert m.steps() == [9, 10]
        for s in (9, 10):
            got = m.load_state(s, require=True)
            assert got is not None
            assert_identical(got[1], v1_fixture_state())
    # Written as today's version (4 since the state tree's tensors nodes; placements since 3).
    assert json.loads((root / fmt.commit_key(10)).read_bytes())["format_version"] == fmt.FORMAT_VERSION >= 3
    assert verify([str(root)]).exit_code == 0


def test_the_manifest_is_the_same_on_every_replica_the_placements_differ(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(256, 256, generator=g).to(torch.bfloat16), "b": torch.randn(256, generator=g)}
    with ckptmirror.Mirror(
        [str(a), str(b)], object_bytes=32 << 10, storage_options={str(b): {"compression": "zstd"}}
    ) as m:
        m.save_state(1, state).result(timeout=60)
    manifests = [f for f in files_under(a) if f.endswith(".json") and "/rank-" in f and not f.endswith(".place.json")]
    assert manifests and all((a / f).read_bytes() == (b / f).read_bytes() for f in manifests)
    assert (a / fmt.commit_key(1)).read_bytes() == (b / fmt.commit_key(1)).read_bytes()
    assert not any(f.endswith(".place.json") for f in files_under(a))
    assert any(f.endswith(".place.json") for f in files_under(b))


PKEY = "step-000000000005/rank-00001-0123abcd.place.json"
HOME = "step-000000000005/rank-00001/o000002-0123abcd.bin"


def placement(**changes: object) -> bytes:
    entry = Stored("step-000000000005/rank-00001/o000002-0123abcd.zst", "zstd", 10, "xxh3_64:" + "0" * 16)
    return Placement(5, 1, "0123abcd", {HOME: entry}).to_json()


def test_placement_round_trips() -> None:
    p = parse_placement(placement(), PKEY)
    assert p.entries[HOME].codec == "zstd" and p.key == PKEY
    assert p.references() == set()
    older = Stored("step-000000000003/rank-00001/o000002-fedcba98.bin", "none", 10, "xxh3_64:" + "1" * 16)
    q = Placement(5, 1, "0123abcd", {HOME: older})
    assert parse_placement(q.to_json(), PKEY).references() == {older.key}


def _resign(doc: dict[str, object]) -> bytes:
    """Re-checksum an edited document, so that the check under test is the one that trips."""
    from ckptmirror.checksum import checksum

    doc.pop("self_checksum", None)
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    doc["self_checksum"] = checksum(body)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda d: d["objects"]["key"].__setitem__(0, "step-000000000007/rank-00001/o000002-0123abcd.zst"),
            "newer step",
        ),
        (lambda d: d["objects"]["key"].__setitem__(0, "step-000000000005/rank-00001/o000002-0123abcd.bin"), "suffix"),
        (lambda d: d["objects"]["codec"].__setitem__(0, "lz4"), "unknown codec"),
        (lambda d: d["objects"]["home"].__setitem__(0, "step-000000000005/rank-00002/o000002-0123abcd.bin"), "home"),
        (lambda d: d["objects"]["key"].__setitem__(0, "../../etc/passwd"), "objects.key"),
        (lambda d: d.__setitem__("step", 6), "name"),
        (lambda d: d["objects"]["size"].__setitem__(0, -1), "objects.size"),
    ],
)
def test_bad_placements_are_refused_naming_the_field(edit: object, match: str) -> None:
    doc = json.loads(placement())
    edit(doc)  # type: ignore[operator]
    with pytest.raises(ManifestError, match=match):
        parse_placement(_resign(doc), PKEY)


def test_a_damaged_placement_fails_its_own_checksum() -> None:
    data = placement().replace(b'"size":[10]', b'"size":[11]')
    with pytest.raises(ManifestError, match="own checksum"):
        parse_placement(data, PKEY)
    with pytest.raises(ManifestError, match="not a placement record name"):
        parse_placement(placement(), "step-000000000005/rank-00001-0123abcd.json")
