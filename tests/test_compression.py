"""Per-replica compression (format version 3): the zstd byte-plane codec on the save and restore paths.

* a replica with ``compression="zstd"`` holds objects as ``.zst`` files listed in a placement
  record; restore from it alone is bit-exact for every dtype; a raw replica next to it holds raw bytes;
* S3 (moto, a real S3 server) compresses by default; a URL's storage option turns it off;
* each object is encoded once however many replicas compress it;
* corrupt stored bytes, stored bytes that decode to the wrong data, and a damaged placement
  record are each caught, and the restore falls back to the other replica; ``verify`` reports them;
* bad options name the replica and the accepted values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import assert_bit_exact, files_under, stored_key

import ckptmirror
from ckptmirror import Mirror
from ckptmirror.format import writer_of
from ckptmirror.ops import verify
from ckptmirror.placement import Placement, Stored, parse_placement

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


def state_of_every_dtype(seed: int) -> dict[str, Any]:
    """Tensors of every dtype, with NaN payloads, infinities and -0.0 among the floats, plus
    tensors large enough to get objects of their own and small ones grouped together."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for i, dt in enumerate(DTYPES):
        n = 5000 if i % 2 else 37  # large (own objects) and small (grouped)
        if dt.is_floating_point or dt.is_complex:
            t = (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dt)
            if dt.is_floating_point and dt.itemsize >= 2:
                t[:3] = torch.tensor([float("nan"), float("-inf"), -0.0], dtype=torch.float64).to(dt)
        elif dt == torch.bool:
            t = torch.randint(0, 2, (n,), generator=g).bool()
        else:
            info = torch.iinfo(dt)
            t = torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dt)
        out[str(dt)] = t
    # a NaN with a payload, by its bits: the codec works on integer views
    out["nan_payload"] = torch.tensor([0x7FC12345, 0xFFA00001 - (1 << 32), 1], dtype=torch.int32).view(torch.float32)
    out["trained_bf16"] = (torch.randn(64, 256, generator=g) * 0.02).to(torch.bfloat16)
    return out


def save(urls: list[Any], state: dict[str, Any], step: int = 1, **kw: Any) -> None:
    with Mirror(urls, object_bytes=16 << 10, **kw) as m:
        m.save_state(step, state).result(timeout=60)


def load(urls: list[Any], step: int | None = None) -> tuple[int, Any]:
    with Mirror(urls) as m:
        got = m.load_state(step, require=True)
        assert got is not None
        return got


def zstd_opts(*roots: Path) -> dict[str, dict[str, Any]]:
    return {str(r): {"compression": "zstd"} for r in roots}


def placements(root: Path, step: int = 1) -> list[Placement]:
    out = []
    for rel in files_under(root):
        if rel.endswith(".place.json") and rel.startswith(f"step-{step:012d}/"):
            out.append(parse_placement((root / rel).read_bytes(), rel))
    return out


def test_zstd_replica_round_trips_every_dtype_bit_exact(tmp_path: Path) -> None:
    raw, comp = tmp_path / "raw", tmp_path / "zstd"
    state = state_of_every_dtype(1)
    save([str(raw), str(comp)], state, storage_options=zstd_opts(comp))
    zst = [f for f in files_under(comp) if f.endswith(".zst")]
    assert zst, "the compressing replica stored no compressed object"
    assert not any(f.endswith(".zst") for f in files_under(raw)), "the raw replica compressed"
    (p,) = placements(comp)
    assert {s.key for s in p.entries.values()} == set(zst)
    assert all(s.codec == "zstd" for s in p.entries.values())
    for only in (raw, comp):
        step, got = load([str(only)])
        assert step == 1
        assert_bit_exact(got, state, f"from {only.name}: ")
    # Fewer bytes where it matters: bf16 weights and floats compress, the codec never grows an object.
    stored = sum((comp / f).stat().st_size for f in files_under(comp) if f.endswith((".zst", ".bin")))
    plain = sum((raw / f).stat().st_size for f in files_under(raw) if f.endswith(".bin"))
    assert stored < plain


def test_objects_are_encoded_once_for_every_replica_that_compresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptmirror import codec

    calls: list[int] = []
    real = codec.encode

    def counting(data: Any, segments: Any, **kw: Any) -> bytes:
        calls.append(len(data))
        return real(data, segments, **kw)

    monkeypatch.setattr(codec, "encode", counting)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    state = state_of_every_dtype(2)
    save([str(a), str(b), str(c)], state, storage_options=zstd_opts(a, b))
    on_a = {f: (a / f).read_bytes() for f in files_under(a) if f.endswith(".zst")}
    assert on_a and on_a == {f: (b / f).read_bytes() for f in files_under(b) if f.endswith(".zst")}
    objects = [f for f in files_under(c) if f.endswith(".bin")]
    assert len(calls) == len(objects), f"{len(calls)} encodes for {len(objects)} objects and two zstd replicas"


def test_s3_compresses_by_default_and_a_url_option_turns_it_off(
    tmp_path: Path, moto_server: str, make_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from _helpers import point_aws_at

    point_aws_at(monkeypatch, moto_server)
    url = f"s3://{make_bucket()}/run"
    state = state_of_every_dtype(3)
    local = tmp_path / "local"
    with Mirror([str(local), url], object_bytes=16 << 10) as m:
        assert [r.compression for r in m.replicas] == ["none", "zstd"]
        m.save_state(1, state).result(timeout=60)
        keys = m.replicas[1].list_prefix("step-000000000001")
    assert any(k.endswith(".zst") for k in keys) and any(k.endswith(".place.json") for k in keys)
    step, got = load([url])
    assert step == 1
    assert_bit_exact(got, state, "from S3: ")
    with Mirror([url], storage_options={url: {"compression": "none"}}, object_bytes=16 << 10) as m:
        assert m.replicas[0].compression == "none"
        m.save_state(2, state).result(timeout=60)
        keys = m.replicas[0].list_prefix("step-000000000002")
    # Raw, and step 2 references nothing from step 1 (another process: it knows no earlier save).
    assert not any(k.endswith((".zst", ".place.json")) for k in keys)
    assert verify([url]).exit_code == 0


def _compressed(root: Path) -> tuple[str, Stored, Placement]:
    """A compressed object of step 1 on ``root``: its home key, its stored form, its placement."""
    (p,) = placements(root)
    home = sorted(p.entries)[0]
    return home, p.entries[home], p


def test_corrupt_stored_bytes_are_caught_and_the_other_replica_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw, comp = tmp_path / "raw", tmp_path / "zstd"
    state = state_of_every_dtype(4)
    save([str(comp), str(raw)], state, storage_options=zstd_opts(comp))
    home, st, _ = _compressed(comp)
    path = comp / st.key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with Mirror([str(comp), str(raw)]) as m:
        res = m.load_state(require=True)
    assert res is not None
    assert_bit_exact(res[1], state)
    assert any(home in r.getMessage() and "do not match their checksum" in r.getMessage() for r in caplog.records)
    report = verify([str(comp)])
    assert report.exit_code != 0
    assert home in json.dumps(report.to_dict()) or st.key in json.dumps(report.to_dict())
    # Alone, the compressing replica cannot serve step 1, and the caller's state is untouched.
    with pytest.raises(ckptmirror.NoValidCheckpointError):
        load([str(comp)])


def test_stored_bytes_that_decode_to_wrong_data_are_caught(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A placement whose stored checksum matches the stored bytes, but they are another
    object's: only the decoded checksum (pinned by the manifest) can tell."""
    raw, comp = tmp_path / "raw", tmp_path / "zstd"
    g = torch.Generator().manual_seed(5)
    # two bf16 tensors of 16 KiB objects: a donor object decodes to the victim's size, other bytes
    state = {k: torch.randn(16384, generator=g).to(torch.bfloat16) for k in ("a", "b")}
    save([str(comp), str(raw)], state, storage_options=zstd_opts(comp))
    (p,) = placements(comp)
    homes = sorted(p.entries)
    assert len(homes) == 4
    victim, donor = p.entries[homes[0]], p.entries[homes[1]]
    (comp / victim.key).write_bytes((comp / donor.key).read_bytes())
    entries = dict(p.entries)
    entries[homes[0]] = Stored(victim.key, "zstd", donor.size, donor.checksum)
    (comp / p.key).write_bytes(Placement(p.step, p.rank, p.token, entries).to_json())
    with Mirror([str(comp), str(raw)]) as m:
        res = m.load_state(require=True)
    assert res is not None
    assert_bit_exact(res[1], state)
    assert any(homes[0] in r.getMessage() and "decoded" in r.getMessage() for r in caplog.records)


def test_a_damaged_placement_record_is_reported_and_the_other_replica_serves(tmp_path: Path) -> None:
    raw, comp = tmp_path / "raw", tmp_path / "zstd"
    state = state_of_every_dtype(6)
    save([str(comp), str(raw)], state, storage_options=zstd_opts(comp))
    (p,) = placements(comp)
    path = comp / p.key
    text = path.read_bytes().replace(b'"zstd"', b'"zstf"', 1)
    path.write_bytes(text)
    with Mirror([str(comp), str(raw)]) as m:
        res = m.load_state(require=True)
    assert res is not None
    assert_bit_exact(res[1], state)
    report = verify([str(comp)])
    assert report.exit_code != 0
    assert "place.json" in json.dumps(report.to_dict())


def test_incompressible_objects_are_stored_raw_without_a_placement_entry(tmp_path: Path) -> None:
    comp = tmp_path / "zstd"
    noise = torch.randint(0, 256, (200_000,), dtype=torch.uint8)  # random bytes: nothing to gain
    save([str(comp)], {"noise": noise}, storage_options=zstd_opts(comp))
    assert not any(f.endswith(".zst") for f in files_under(comp))
    assert_bit_exact(load([str(comp)])[1], {"noise": noise})


def test_bad_compression_options_name_the_replica(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"compression='lz4' for .*'none', 'zstd' or 'auto'"):
        Mirror([str(tmp_path)], storage_options={"file": {"compression": "lz4"}})
    with pytest.raises(ValueError, match="compression_level=0"):
        Mirror([str(tmp_path)], storage_options={"file": {"compression": "zstd", "compression_level": 0}})
    with pytest.raises(ValueError, match="incremental='no'"):
        Mirror([str(tmp_path)], storage_options={"file": {"incremental": "no"}})


def test_writer_of_knows_the_new_file_names() -> None:
    assert writer_of("step-000000000001/rank-00002/o000003-0123abcd.zst") == (2, "0123abcd")
    assert writer_of("step-000000000001/rank-00002-0123abcd.place.json") == (2, "0123abcd")
    assert writer_of("step-000000000001/rank-00002/o000003-0123abcd.zip") is None


def test_stored_key_helper_resolves_compressed_objects(tmp_path: Path) -> None:
    comp = tmp_path / "zstd"
    save([str(comp)], state_of_every_dtype(7), storage_options=zstd_opts(comp))
    home, st, _ = _compressed(comp)
    assert stored_key(comp, home) == st.key != home


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_repair_heals_a_damaged_compressed_object_from_a_raw_replica(tmp_path: Path, damage: str) -> None:
    from ckptmirror.ops import repair

    raw, comp = tmp_path / "raw", tmp_path / "zstd"
    state = state_of_every_dtype(8)
    save([str(comp), str(raw)], state, storage_options=zstd_opts(comp))
    home, st, _ = _compressed(comp)
    if damage == "corrupt":
        (comp / st.key).write_bytes(b"\x00" * st.size)  # same size, wrong bytes
    elif damage == "truncated":
        (comp / st.key).write_bytes((comp / st.key).read_bytes()[: st.size // 2])
    else:
        (comp / st.key).unlink()
    # Named as what it is, under the manifest's key, saying where the compressed bytes lie (it
    # once said "missing ... .bin: not found" for each of the three).
    (problem,) = verify([str(comp)]).damage
    assert (problem.key, problem.kind) == (home, damage), problem
    assert f"stored as {st.key}" in problem.detail, problem
    report = repair([str(raw), str(comp)], storage_options=zstd_opts(comp))
    assert any(a.key == home and a.done for a in report.actions), report.actions
    assert verify([str(comp)]).exit_code == 0
    (p,) = placements(comp)
    assert home not in p.entries  # now raw under its own name
    assert_bit_exact(load([str(comp)])[1], state, "from the repaired replica: ")
