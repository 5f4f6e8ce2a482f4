"""Every bad Kinship input gets a precise status, and the server keeps answering afterwards."""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from kinship_client import KinshipClient, KinshipRpcError
from kinship_client.v1 import common_pb2, kinship_pb2, service_pb2_grpc
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint
from kinship_service.server import metrics

pytestmark = pytest.mark.both_layouts  # each server test also runs through the front (conftest)

MEDIUM = LlamaShape(vocab_size=1024, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2)


def still_serving(client: KinshipClient, family) -> None:
    paths = family["paths"]
    result = client.kinship(str(paths["base"]), [str(paths["m0"]), str(paths["m1"])], mode="exact")
    assert len(result.pairs) == 1


def expect(client: KinshipClient, code: grpc.StatusCode, base, models, match: str = "", field: str | None = None, **kw):
    with pytest.raises(KinshipRpcError) as info:
        client.kinship(base, models, **kw)
    error = info.value
    assert error.code == code, error
    assert match in error.message
    if field is not None:
        assert error.field == field
    assert "Traceback" not in error.message
    return error


def test_missing_base_and_too_few_models(client, family):
    paths = family["paths"]
    with pytest.raises(KinshipRpcError) as info:
        client._call(client.stub.Kinship, kinship_pb2.KinshipRequest(), None)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "base"
    expect(client, grpc.StatusCode.INVALID_ARGUMENT, str(paths["base"]), [str(paths["m0"])], "at least two", field="models")
    request = kinship_pb2.KinshipRequest(
        base=common_pb2.CheckpointRef(path=str(paths["base"])),
        models=[common_pb2.CheckpointRef(path=str(paths["m0"])), common_pb2.CheckpointRef()],
    )
    with pytest.raises(KinshipRpcError) as info:
        client._call(client.stub.Kinship, request, None)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "models[1]"
    still_serving(client, family)


def test_rich_status_details(server, family):
    paths = family["paths"]
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.KinshipServiceStub(channel)
        request = kinship_pb2.KinshipRequest(base=common_pb2.CheckpointRef(path=str(paths["base"])))
        with pytest.raises(grpc.RpcError) as info:
            stub.Kinship(request, timeout=30)
    status = rpc_status.from_call(info.value)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    kinds = {}
    for detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if detail.Is(cls.DESCRIPTOR):
                message = cls()
                detail.Unpack(message)
                kinds[cls.__name__] = message
    assert kinds["ErrorInfo"].domain == "kinship.v1.KinshipService"
    assert kinds["ErrorInfo"].reason == "INVALID_ARGUMENT"
    assert kinds["BadRequest"].field_violations[0].field == "models"


def test_unknown_and_forbidden_paths(client, family, model_root, tmp_path):
    paths = family["paths"]
    base, m0 = str(paths["base"]), str(paths["m0"])
    expect(client, grpc.StatusCode.NOT_FOUND, base, [m0, str(model_root / "nope")], "does not exist", field="models[1]")
    expect(client, grpc.StatusCode.PERMISSION_DENIED, base, [m0, "/etc"], "outside", field="models[1]")
    expect(client, grpc.StatusCode.PERMISSION_DENIED, str(model_root / ".." / ".."), [m0, m0], field="base")
    expect(client, grpc.StatusCode.NOT_FOUND, base, [m0, "hf://nobody/nothing"], field="models[1]")
    still_serving(client, family)


def test_bad_files(client, family, model_root):
    paths = family["paths"]
    base, m0 = str(paths["base"]), str(paths["m0"])
    (model_root / "weights.txt").write_text("not weights")
    expect(client, grpc.StatusCode.INVALID_ARGUMENT, base, [m0, str(model_root / "weights.txt")], "not a .safetensors")
    pickled = model_root / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(3)}, pickled / "pytorch_model.bin")
    expect(client, grpc.StatusCode.FAILED_PRECONDITION, base, [m0, str(pickled)], "Convert")
    corrupt = model_root / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{")
    expect(client, grpc.StatusCode.FAILED_PRECONDITION, base, [m0, str(corrupt)], "model.safetensors of")
    truncated = save_checkpoint(family["models"][1], model_root / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    expect(client, grpc.StatusCode.FAILED_PRECONDITION, base, [m0, str(truncated)], "model.safetensors of")
    still_serving(client, family)


def test_undefined_similarity(client, family, model_root):
    paths = family["paths"]
    base, m0 = str(paths["base"]), str(paths["m0"])
    stranger = save_checkpoint({"other.weight": torch.ones(4, 4)}, model_root / "stranger")
    expect(client, grpc.StatusCode.INVALID_ARGUMENT, base, [m0, str(stranger)], "no floating tensor")
    expect(client, grpc.StatusCode.INVALID_ARGUMENT, base, [base, base], "all zeros")
    expect(client, grpc.StatusCode.INVALID_ARGUMENT, base, [m0, base], "models[1]")
    still_serving(client, family)



@pytest.fixture
def slow_setup(server_factory, model_root, family):
    """A server whose exact pass takes seconds: a tiny chunk budget over a few-million-parameter family."""
    base = make_base(MEDIUM, seed=30)
    models = make_family(base, 3, rho=0.5, seed=31)
    dirs = [save_checkpoint(base, model_root / "slow-base")]
    dirs += [save_checkpoint(m, model_root / f"slow-{i}") for i, m in enumerate(models)]
    server = server_factory(chunk_bytes=256 * 8 * 4)
    return server, [str(d) for d in dirs]


def _wait_idle(timeout: float = 5.0) -> float:
    """Seconds until no Kinship RPC is in flight on the server (the pass stopped)."""
    gauge = metrics.IN_FLIGHT.labels("Kinship")
    started = time.monotonic()
    while gauge._value.get() > 0:
        if time.monotonic() - started > timeout:
            raise AssertionError("the exact pass kept running after the call ended")
        time.sleep(0.01)
    return time.monotonic() - started


def test_deadline_stops_the_work(slow_setup, family):
    server, dirs = slow_setup
    with KinshipClient(server.address) as client:
        started = time.monotonic()
        with pytest.raises(KinshipRpcError) as info:
            client.kinship(dirs[0], dirs[1:], mode="exact", timeout=0.3)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_idle()
        assert time.monotonic() - started < 3.0
        still_serving(client, family)


def test_client_cancellation_stops_the_work(slow_setup, family):
    server, dirs = slow_setup
    with KinshipClient(server.address) as client:
        request = kinship_pb2.KinshipRequest(
            base=common_pb2.CheckpointRef(path=dirs[0]),
            models=[common_pb2.CheckpointRef(path=d) for d in dirs[1:]],
            mode=common_pb2.KINSHIP_MODE_EXACT,
        )
        future = client.stub.Kinship.future(request, timeout=60)
        time.sleep(0.3)
        assert future.cancel()
        _wait_idle()
        still_serving(client, family)
