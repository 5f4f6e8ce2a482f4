"""Malformed safetensors headers: our verdict equals safetensors' own, and every entry point answers
FAILED_PRECONDITION CORRUPT_SAFETENSORS naming the file, before any other verdict about the request.

The tables are cross-checked against the installed `safetensors` (`safe_open`): every malformed
kind is one it rejects, every tricky-but-valid kind is one it accepts with the same tensors.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from safetensors import SafetensorError, safe_open

from kinship_client import KinshipClient, KinshipRpcError, Member
from kinship_service.checkpoints.safetensors_header import MAX_HEADER_BYTES, read_header
from kinship_service.checkpoints.synthetic import make_base, save_checkpoint
from kinship_service.errors import FailedPrecondition

from .conftest import SMALL

pytestmark = pytest.mark.both_layouts  # each server test also runs through the front (conftest)


def _entry(dtype: object, shape: object, offsets: object) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _file(header: dict[str, object] | bytes, data: bytes = b"", declared: int | None = None) -> Callable[[Path], None]:
    """A writer of a file with this JSON header (or raw header bytes), data section and declared length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()

    def write(path: Path) -> None:
        path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)

    return write


def _sparse_over_limit(path: Path) -> None:
    """A header length one past safetensors' limit, in a (sparse) file big enough to hold it."""
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
        handle.truncate(8 + MAX_HEADER_BYTES + 16)


W = _entry("F32", [2], [0, 8])
EIGHT = b"\0" * 8

MALFORMED: dict[str, Callable[[Path], None]] = {
    "empty_file": lambda p: p.write_bytes(b""),
    "short_length_prefix": lambda p: p.write_bytes(b"\x01\x02"),
    "huge_declared_length": _file({"w": W}, EIGHT, 2**62),
    "header_over_limit": _sparse_over_limit,
    "length_past_end": _file({"w": W}, EIGHT, 10**6),
    "not_utf8": _file(b'{"\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', EIGHT),
    "not_json": _file(b"{{{{", b""),
    "json_not_object": _file(b"[1, 2, 3]"),
    "deep_nesting": _file(b"[" * 100000 + b"]" * 100000),
    "nesting_past_serde_limit": _file(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + b"[" * 126 + b"]" * 126 + b"}}", EIGHT),
    "nan_in_header": _file(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}', EIGHT),
    "lone_surrogate": _file(b'{"__metadata__":{"k":"\\udc00"}}'),
    "unknown_dtype": _file({"w": _entry("Q13", [2], [0, 8])}, EIGHT),
    "shape_string": _file({"w": _entry("F32", "12", [0, 48])}, b"\0" * 48),
    "shape_float": _file({"w": _entry("F32", [2.9], [0, 8])}, EIGHT),
    "shape_integral_float": _file({"w": _entry("F32", [2.0], [0, 8])}, EIGHT),
    "shape_bool": _file({"w": _entry("F32", [True], [0, 4])}, b"\0" * 4),
    "shape_negative": _file({"w": _entry("F32", [-2], [0, 8])}, EIGHT),
    "shape_overflow": _file({"w": _entry("F32", [2**40, 2**40], [0, 8])}, EIGHT),
    "missing_data_offsets": _file({"w": {"dtype": "F32", "shape": [2]}}, EIGHT),
    "three_data_offsets": _file({"w": _entry("F32", [2], [0, 8, 8])}, EIGHT),
    "duplicate_field": _file(b'{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', EIGHT),
    "overlapping_offsets": _file({"a": W, "b": _entry("F32", [2], [4, 12])}, b"\0" * 12),
    "gapped_offsets": _file({"a": _entry("F32", [1], [0, 4]), "b": _entry("F32", [1], [8, 12])}, b"\0" * 12),
    "not_from_zero": _file({"w": _entry("F32", [1], [4, 8])}, EIGHT),
    "reversed_offsets": _file({"w": _entry("F32", [0], [8, 0])}, EIGHT),
    "span_disagrees_with_shape": _file({"w": _entry("F32", [4], [0, 8])}, EIGHT),
    "sub_byte_misaligned": _file({"w": _entry("F4", [3], [0, 2])}, b"\0" * 2),
    "offsets_past_end": _file({"w": _entry("F32", [1000], [0, 4000])}, EIGHT),
    "trailing_bytes": _file({"w": W}, b"\0" * 12),
    "metadata_not_strings": _file({"__metadata__": {"format": 1}, "w": W}, EIGHT),
    "metadata_not_map": _file({"__metadata__": ["pt"], "w": W}, EIGHT),
    "tensor_entry_not_object": _file({"w": 7}),
}

# Odd but valid: safetensors accepts each, so must we, with the same tensors and shapes.
VALID: dict[str, Callable[[Path], None]] = {
    "empty_header": _file({}),
    "unknown_field": _file({"w": {**W, "note": [1.5, {"deep": None}]}}, EIGHT),
    "metadata_null": _file({"__metadata__": None, "w": W}, EIGHT),
    "entries_out_of_order": _file({"b": _entry("F32", [1], [4, 8]), "a": _entry("F32", [1], [0, 4])}, EIGHT),
    "zero_size_tensors": _file({"z": _entry("F32", [0, 3], [4, 4]), "a": _entry("F32", [1], [0, 4]), "b": _entry("F32", [1], [4, 8])}, EIGHT),
    "repeated_name_last_wins": _file(b'{"w":{"dtype":"F32","shape":[9],"data_offsets":[0,36]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', EIGHT),
    "dtype_map_form": _file(b'{"w":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}', EIGHT),
    "nesting_at_serde_limit": _file(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + b"[" * 125 + b"]" * 125 + b"}}", EIGHT),
    "whitespace_around": _file(b'  {"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}  \n', EIGHT),
    "packed_f4": _file({"w": _entry("F4", [4], [0, 2])}, b"\0" * 2),
    "scalar_and_unsigned": _file({"s": _entry("F64", [], [0, 8]), "u": _entry("U16", [2], [8, 12]), "v": _entry("U64", [1], [12, 20])}, b"\0" * 20),
    "big_int_in_unknown_field": _file({"w": {**W, "x": 10**30}}, EIGHT),
}


def _safetensors_verdict(path: Path) -> dict[str, list[int]] | None:
    """What safetensors makes of the file: tensor shapes by name, or None when it rejects it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError):  # its refusal is the verdict we compare with
        return None


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_header_is_rejected_like_safetensors(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"bad-{kind}.safetensors"
    MALFORMED[kind](path)
    assert _safetensors_verdict(path) is None, "the table must only hold files safetensors rejects"
    with pytest.raises(FailedPrecondition) as info:
        read_header(path, "the-label")
    assert info.value.reason == "CORRUPT_SAFETENSORS"
    assert path.name in info.value.message and "the-label" in info.value.message
    assert "re-download" in info.value.message


@pytest.mark.parametrize("kind", sorted(VALID))
def test_odd_but_valid_header_is_accepted_like_safetensors(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"ok-{kind}.safetensors"
    VALID[kind](path)
    expected = _safetensors_verdict(path)
    assert expected is not None, "the table must only hold files safetensors accepts"
    header = read_header(path, "the-label")
    assert {name: list(info.shape) for name, info in header.tensors.items()} == expected
    for name, info in header.tensors.items():
        begin, end = header.byte_range(name)
        assert end - begin == info.nbytes and header.data_start <= begin <= end <= path.stat().st_size


def test_header_is_parsed_once_per_file_state(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _file({"w": W}, EIGHT)(path)
    first = read_header(path, "x")
    assert read_header(path, "x") is first and read_header(path, "x", first.state) is first
    _file({"w": _entry("F32", [1], [0, 4])}, b"\0" * 4)(path)  # rewritten: a new state, read again
    again = read_header(path, "x")
    assert again is not first and again.tensors["w"].shape == (1,)


# --------------------------------------------------------------------------------------------
# Every entry point, through a real server
# --------------------------------------------------------------------------------------------


@pytest.fixture
def corrupt_root(model_root: Path) -> dict[str, Path]:
    """Good base, m0 and m1, and one directory per malformed kind holding `model.safetensors`."""
    base = make_base(SMALL, seed=50)
    paths = {
        "base": save_checkpoint(base, model_root / "base"),
        "m0": save_checkpoint({k: v + 0.01 for k, v in base.items()}, model_root / "m0"),
        "m1": save_checkpoint({k: v * 1.01 for k, v in base.items()}, model_root / "m1"),
    }
    for kind, write in MALFORMED.items():
        directory = model_root / f"bad-{kind}"
        directory.mkdir()
        write(directory / "model.safetensors")
        paths[kind] = directory
    return paths


def _kinship(mode: str) -> Callable[[KinshipClient, dict[str, Path], Path, str], object]:
    return lambda c, p, bad, _k: c.kinship(str(p["base"]), [str(p["m0"]), str(bad)], mode=mode, timeout=60)


def _members(p: dict[str, Path], bad: Path) -> list[Member]:
    return [Member("m0", 3.0, str(p["m0"]), 1), Member("m1", 2.0, str(p["m1"]), 1), Member("bad", 1.0, str(bad), 1)]


ENTRY_POINTS: dict[str, Callable[[KinshipClient, dict[str, Path], Path, str], object]] = {
    "kinship_exact": _kinship("exact"),
    "kinship_auto": _kinship("auto"),
    "kinship_fingerprint": _kinship("fingerprint"),
    "kinship_corrupt_base": lambda c, p, bad, _k: c.kinship(str(bad), [str(p["m0"]), str(p["m1"])], mode="exact", timeout=60),
    "register_checkpoint": lambda c, p, bad, _k: c.register_checkpoint(str(bad), str(p["base"]), timeout=60),
    "register_against_corrupt_base": lambda c, p, bad, _k: c.register_checkpoint(str(p["m0"]), str(bad), timeout=60),
    "rank_candidates": lambda c, p, bad, _k: c.rank_candidates(_members(p, bad), top_k=3, base=str(p["base"]), timeout=60),
    "should_stop": lambda c, p, bad, _k: c.should_stop(_members(p, bad), top_k=3, base=str(p["base"]), timeout=60),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_names_the_corrupt_file(client: KinshipClient, corrupt_root: dict[str, Path], entry: str) -> None:
    for kind in sorted(MALFORMED):
        bad = corrupt_root[kind]
        with pytest.raises(KinshipRpcError) as info:
            ENTRY_POINTS[entry](client, corrupt_root, bad, kind)
        error = info.value
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CORRUPT_SAFETENSORS"), (kind, error)
        assert "model.safetensors" in error.message and f"bad-{kind}" in error.message, (kind, error.message)
    result = client.kinship(str(corrupt_root["base"]), [str(corrupt_root["m0"]), str(corrupt_root["m1"])], mode="exact")
    assert len(result.pairs) == 1


def test_start_merge_names_the_corrupt_file(client: KinshipClient, corrupt_root: dict[str, Path]) -> None:
    """StartMerge: FAILED_PRECONDITION CORRUPT_SAFETENSORS naming the file at once, and no job is created."""
    jobs_before = {job.job_id for job in client.list_merge_jobs(page_size=1000)[0]}
    for kind in sorted(MALFORMED):
        bad = corrupt_root[kind]
        with pytest.raises(KinshipRpcError) as raised:
            client.start_merge(str(corrupt_root["m0"]), str(bad), t=0.5, output_path=f"out-{kind}")
        error = raised.value
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CORRUPT_SAFETENSORS"), (kind, error)
        assert "model.safetensors" in error.message and f"bad-{kind}" in error.message, (kind, error.message)
    assert {job.job_id for job in client.list_merge_jobs(page_size=1000)[0]} == jobs_before
    done = client.merge(str(corrupt_root["m0"]), str(corrupt_root["m1"]), t=0.5, output_path="good").wait(timeout=60)
    assert done.state == "succeeded", done.error


def test_merge_copies_unsigned_integer_tensors_bit_for_bit(client: KinshipClient, model_root: Path) -> None:
    """U16/U32/U64 tensors (valid safetensors dtypes) pass through a merge unchanged."""
    base = make_base(SMALL, seed=51)
    extra = {
        "model.u16": torch.tensor([0, 1, 65535, 12345], dtype=torch.uint16),
        "model.u32": torch.tensor([0, 2**32 - 1, 7], dtype=torch.uint32),
        "model.u64": torch.tensor([0, 2**63 + 5, 2**64 - 1], dtype=torch.uint64),
    }
    pa = save_checkpoint(dict(base, **extra), model_root / "ua")
    pb = save_checkpoint(dict({k: v * 1.01 for k, v in base.items()}, **extra), model_root / "ub")
    info = client.merge(str(pa), str(pb), t=0.5, output_path="unsigned").wait(timeout=120)
    assert info.state == "succeeded", info.error
    with safe_open(str(Path(info.output_path) / "model.safetensors"), framework="pt") as handle:
        for name, tensor in extra.items():
            got = handle.get_tensor(name)
            assert got.dtype == tensor.dtype and torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)), name


def test_merge_of_a_sub_byte_float_tensor_fails_with_a_reason(client: KinshipClient, model_root: Path) -> None:
    """F4 is a valid safetensors dtype torch cannot hold: the merge job fails UNSUPPORTED_DTYPE, never INTERNAL."""
    base = make_base(SMALL, seed=52)
    pa = save_checkpoint(base, model_root / "f4a")
    pb = save_checkpoint({k: v * 1.01 for k, v in base.items()}, model_root / "f4b")
    for path in (pa, pb):
        file = path / "model.safetensors"
        raw = file.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        end = max(entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__")
        header["model.packed_f4"] = {"dtype": "F4", "shape": [4], "data_offsets": [end, end + 2]}
        body = json.dumps(header).encode()
        body += b" " * (-len(body) % 8)
        file.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + length :] + b"\x12\x34")
    info = client.merge(str(pa), str(pb), t=0.5, output_path="f4").wait(timeout=120)
    assert info.state == "failed" and info.error is not None, info
    assert info.error.reason == "UNSUPPORTED_DTYPE" and "model.packed_f4" in info.error.message, info.error
