"""Hostile input: arbitrary Kinship requests and hostile safetensors headers get documented statuses.

The server must answer every request with a status from DOCUMENTED_CODES within the
deadline, never crash, and never read outside its allowed roots.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kinship_client.v1 import common_pb2, kinship_pb2, service_pb2_grpc
from kinship_service.checkpoints.synthetic import make_base, save_checkpoint

from .conftest import SMALL

pytestmark = pytest.mark.both_layouts  # each server test also runs through the front (conftest)

DOCUMENTED_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

TRICKY_PATHS = [
    "",
    "..",
    "../../../../etc/passwd",
    "/etc/shadow",
    "/proc/self/environ",
    "a\x00b",
    "\u202e/evil",
    "models/../../secret",
    "~/.ssh/id_rsa",
    "//" + "a" * 4000,
]


def path_strategy(root: Path) -> st.SearchStrategy[str]:
    inside = st.sampled_from([str(root / "base"), str(root / "m0"), str(root / "m1"), str(root / "hostile")])
    joined = st.builds(lambda a, b: str(root / a / b), st.text(max_size=30), st.sampled_from(["..", "../..", ".", "x"]))
    return st.one_of(inside, st.sampled_from(TRICKY_PATHS), st.text(max_size=200), joined)


def ref_strategy(root: Path) -> st.SearchStrategy[common_pb2.CheckpointRef]:
    by_path = path_strategy(root).map(lambda p: common_pb2.CheckpointRef(path=p))
    by_hub = st.builds(
        lambda repo, rev: common_pb2.CheckpointRef(hub=common_pb2.HubCheckpoint(repo_id=repo, revision=rev)),
        st.one_of(st.text(max_size=100), st.sampled_from(["a/b", "../x", "/abs", "org/" + "n" * 300])),
        st.text(max_size=50),
    )
    return st.one_of(by_path, by_hub, st.just(common_pb2.CheckpointRef()))


@pytest.fixture
def hostile_root(model_root: Path, tmp_path: Path) -> Path:
    base = make_base(SMALL, seed=40)
    save_checkpoint(base, model_root / "base")
    save_checkpoint({k: v + 0.01 for k, v in base.items()}, model_root / "m0")
    save_checkpoint({k: v * 1.01 for k, v in base.items()}, model_root / "m1")
    (model_root / "hostile").mkdir()
    secret = tmp_path / "secret"
    save_checkpoint(base, secret)
    (model_root / "escape").symlink_to(secret)
    return model_root


def test_arbitrary_kinship_requests_get_documented_codes(server, hostile_root):
    channel = grpc.insecure_channel(server.address)
    stub = service_pb2_grpc.KinshipServiceStub(channel)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        base=st.one_of(st.none(), ref_strategy(hostile_root)),
        models=st.lists(ref_strategy(hostile_root), max_size=12),
        mode=st.integers(min_value=-3, max_value=10),
        policy=st.integers(min_value=-3, max_value=10),
        per_layer=st.booleans(),
    )
    def check(base, models, mode, policy, per_layer):
        request = kinship_pb2.KinshipRequest(models=models, mode=mode, shape_mismatch_policy=policy, per_layer=per_layer)
        if base is not None:
            request.base.CopyFrom(base)
        try:
            stub.Kinship(request, timeout=20)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            assert "Traceback" not in (error.details() or "")
        assert code in DOCUMENTED_CODES, (code, request)

    try:
        check()
        # Alive and well afterwards.
        ok = stub.Kinship(
            kinship_pb2.KinshipRequest(
                base=common_pb2.CheckpointRef(path=str(hostile_root / "base")),
                models=[common_pb2.CheckpointRef(path=str(hostile_root / n)) for n in ("m0", "m1")],
                mode=common_pb2.KINSHIP_MODE_EXACT,
            ),
            timeout=30,
        )
        assert len(ok.pairs) == 1
    finally:
        channel.close()


def test_symlink_escape_is_denied(client, hostile_root):
    from kinship_client import KinshipRpcError

    with pytest.raises(KinshipRpcError) as info:
        client.kinship(str(hostile_root / "base"), [str(hostile_root / "m0"), str(hostile_root / "escape")])
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED


def _write_raw(path: Path, header: dict | bytes, data: bytes = b"", declared_length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if declared_length is None else declared_length
    path.write_bytes(struct.pack("<Q", length) + raw + data)


HOSTILE_HEADERS = {
    "huge_declared_length": lambda p: _write_raw(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 2**62),
    "length_past_end": lambda p: _write_raw(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**6),
    "offsets_past_end": lambda p: _write_raw(p, {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 8),
    "overlapping_offsets": lambda p: _write_raw(
        p,
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    ),
    "shape_disagrees_with_offsets": lambda p: _write_raw(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
    "unknown_dtype": lambda p: _write_raw(p, {"w": {"dtype": "Q13", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "negative_shape": lambda p: _write_raw(p, {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "huge_shape": lambda p: _write_raw(p, {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8),
    "not_json": lambda p: _write_raw(p, b"\xff\xfe{{{{", b""),
    "json_not_object": lambda p: _write_raw(p, b"[1, 2, 3]", b""),
    "deep_nesting": lambda p: _write_raw(p, b"[" * 100000 + b"]" * 100000, b""),
    "empty_file": lambda p: p.write_bytes(b""),
    "short_length_prefix": lambda p: p.write_bytes(b"\x01\x02"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_HEADERS))
def test_hostile_safetensors_headers(client, hostile_root, kind):
    from kinship_client import KinshipRpcError

    target = hostile_root / "hostile" / "model.safetensors"
    HOSTILE_HEADERS[kind](target)
    with pytest.raises(KinshipRpcError) as info:
        client.kinship(str(hostile_root / "base"), [str(hostile_root / "m0"), str(hostile_root / "hostile")], timeout=30)
    assert info.value.code in {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT}, info.value
    assert "model.safetensors" in info.value.message or info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    result = client.kinship(str(hostile_root / "base"), [str(hostile_root / "m0"), str(hostile_root / "m1")], mode="exact")
    assert len(result.pairs) == 1
