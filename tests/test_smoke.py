"""The server starts, answers health checks and one Kinship call."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.both_layouts  # each server test also runs through the front (conftest)


def test_health_serving(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "kinship.v1.KinshipService"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_kinship_roundtrip(client, family):
    paths = family["paths"]
    result = client.kinship(str(paths["base"]), [str(paths["m0"]), str(paths["m1"])])
    assert result.mode == "exact"
    assert len(result.pairs) == 1
    assert 0.3 < result.pairs[0].values.pcc < 0.7
