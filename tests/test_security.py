"""Bearer-token auth, TLS and mutual TLS, and request size limits, against a real server on loopback.

The certificates come from a throwaway CA generated here with `cryptography`; a second,
unrelated CA stands in for an attacker's.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kinship_client import KinshipClient, KinshipRpcError
from kinship_client.v1 import kinship_pb2, service_pb2_grpc
from kinship_service.config import ConfigError, Settings
from kinship_service.server import metrics
from kinship_service.server.main import serve

x509 = pytest.importorskip("cryptography.x509", reason="pip install cryptography (test extra) for the TLS tests")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from .free_ports import free_port  # noqa: E402

TOKEN = "s3cret-token-for-tests"


# -- a test PKI --------------------------------------------------------------------------------
@dataclass
class Identity:
    key_pem: bytes
    cert_pem: bytes
    key_file: Path
    cert_file: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class TestCA:
    """A self-signed CA that issues server and client certificates into a directory."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.cert_file = directory / f"{name}-ca.pem"
        self.cert_file.write_bytes(self.cert_pem)

    def issue(self, common_name: str, *, server: bool) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        identity = Identity(
            _key_pem(key),
            cert.public_bytes(serialization.Encoding.PEM),
            self.directory / f"{common_name}.key",
            self.directory / f"{common_name}.pem",
        )
        identity.key_file.write_bytes(identity.key_pem)
        identity.key_file.chmod(0o600)
        identity.cert_file.write_bytes(identity.cert_pem)
        return identity


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    directory = tmp_path_factory.mktemp("pki")
    ca = TestCA(directory, "test")
    rogue = TestCA(directory, "rogue")
    return {
        "ca": ca,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "rogue_client": rogue.issue("rogue-client", server=False),
        "rogue_ca": rogue,
    }


def _health(address: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def _kinship_ok(client: KinshipClient, family: dict) -> None:
    paths = family["paths"]
    result = client.kinship(str(paths["base"]), [str(paths["m0"]), str(paths["m1"])], mode="exact")
    assert len(result.pairs) == 1 and result.tensors_compared > 0


# -- bearer tokens -----------------------------------------------------------------------------
def test_no_token_is_unauthenticated_and_server_lives_on(server_factory, family):
    running = server_factory(auth_token=TOKEN)
    with KinshipClient(running.address, timeout=30) as client:
        with pytest.raises(KinshipRpcError) as err:
            _kinship_ok(client, family)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.reason == "TOKEN_MISSING"
    assert "authorization: Bearer" in err.value.message
    with KinshipClient(running.address, timeout=30, token=TOKEN) as client:
        _kinship_ok(client, family)


@pytest.mark.parametrize("header", ["Bearer wrong-token", "Bearer " + TOKEN + "x", "Basic " + TOKEN, "Bearer ", TOKEN])
def test_wrong_token_is_unauthenticated(server_factory, family, header):
    running = server_factory(auth_token=TOKEN)
    paths = family["paths"]
    request = kinship_pb2.KinshipRequest()
    request.base.path = str(paths["base"])
    for name in ("m0", "m1"):
        request.models.add().path = str(paths[name])
    with grpc.insecure_channel(running.address) as channel:
        stub = service_pb2_grpc.KinshipServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Kinship(request, timeout=30, metadata=(("authorization", header),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The same channel works with the right token: one refusal changes nothing.
        assert stub.Kinship(request, timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),)).tensors_compared > 0


def test_wrong_token_through_client(server_factory, family):
    running = server_factory(auth_token=TOKEN)
    with KinshipClient(running.address, timeout=30, token="not-" + TOKEN) as client:
        with pytest.raises(KinshipRpcError) as err:
            _kinship_ok(client, family)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.reason == "TOKEN_INVALID"


def test_right_token_works(server_factory, family):
    running = server_factory(auth_token=TOKEN)
    with KinshipClient(running.address, timeout=60, token=TOKEN) as client:
        _kinship_ok(client, family)


def test_unknown_method_without_token_is_unauthenticated(server_factory):
    running = server_factory(auth_token=TOKEN)
    with grpc.insecure_channel(running.address) as channel:
        call = channel.unary_unary("/kinship.v1.KinshipService/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_refusals_are_counted_in_metrics(server_factory, family):
    running = server_factory(auth_token=TOKEN)
    labels = {"grpc_type": "unary", "grpc_service": "kinship.v1.KinshipService", "grpc_method": "Kinship", "grpc_code": "Unauthenticated"}

    def refused() -> float:
        return metrics.REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0

    before = refused()
    with KinshipClient(running.address, timeout=30) as client:
        with pytest.raises(KinshipRpcError):
            _kinship_ok(client, family)
    assert refused() == before + 1


def test_health_and_reflection_stay_open(server_factory):
    running = server_factory(auth_token=TOKEN)
    assert _health(running.address) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(running.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert "kinship.v1.KinshipService" in names and "grpc.health.v1.Health" in names


def test_token_file_and_rotation(server_factory, family, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")  # Secret files often end with a newline
    running = server_factory(auth_token_file=token_file)
    with KinshipClient(running.address, timeout=60, token="first-token") as client:
        _kinship_ok(client, family)
    token_file.write_text("second-token-longer\n")  # rotated: a different size, so the change is seen
    with KinshipClient(running.address, timeout=60, token="first-token") as client:
        with pytest.raises(KinshipRpcError) as err:
            _kinship_ok(client, family)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with KinshipClient(running.address, timeout=60, token="second-token-longer") as client:
        _kinship_ok(client, family)


def test_empty_or_missing_token_file_stops_start_up(server_factory, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        server_factory(auth_token_file=empty)
    with pytest.raises(ConfigError, match="cannot read"):
        server_factory(auth_token_file=tmp_path / "missing")


# -- TLS and mutual TLS ------------------------------------------------------------------------
def test_tls(server_factory, family, pki):
    srv = pki["server"]
    running = server_factory(tls_cert_file=srv.cert_file, tls_key_file=srv.key_file)
    with KinshipClient(running.address, timeout=60, root_certificates=pki["ca"].cert_pem) as client:
        _kinship_ok(client, family)
    # A client that does not trust the server's CA refuses the connection.
    with KinshipClient(running.address, timeout=10, root_certificates=pki["rogue_ca"].cert_pem) as client:
        with pytest.raises(KinshipRpcError) as err:
            _kinship_ok(client, family)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    # Plaintext against a TLS port gets nowhere.
    with KinshipClient(running.address, timeout=10) as client:
        with pytest.raises(KinshipRpcError) as err:
            _kinship_ok(client, family)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_tls_with_token(server_factory, family, pki):
    srv = pki["server"]
    running = server_factory(tls_cert_file=srv.cert_file, tls_key_file=srv.key_file, auth_token=TOKEN)
    ca = pki["ca"].cert_pem
    with KinshipClient(running.address, timeout=30, root_certificates=ca) as client:
        with pytest.raises(KinshipRpcError) as err:
            _kinship_ok(client, family)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with KinshipClient(running.address, timeout=60, root_certificates=ca, token=TOKEN) as client:
        _kinship_ok(client, family)


def test_mutual_tls(server_factory, family, pki):
    srv, cli, rogue = pki["server"], pki["client"], pki["rogue_client"]
    health_port = free_port()
    running = server_factory(
        tls_cert_file=srv.cert_file,
        tls_key_file=srv.key_file,
        tls_client_ca_file=pki["ca"].cert_file,
        health_port=health_port,
    )
    ca = pki["ca"].cert_pem
    with KinshipClient(
        running.address, timeout=60, root_certificates=ca, private_key=cli.key_pem, certificate_chain=cli.cert_pem
    ) as client:
        _kinship_ok(client, family)
    # No client certificate, or one from another CA: the handshake fails.
    for key, chain in ((None, None), (rogue.key_pem, rogue.cert_pem)):
        with KinshipClient(
            running.address, timeout=10, root_certificates=ca, private_key=key, certificate_chain=chain
        ) as client:
            with pytest.raises(KinshipRpcError) as err:
                _kinship_ok(client, family)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    # Kubernetes' native gRPC probe speaks plaintext: it uses the health-only port.
    assert _health(f"127.0.0.1:{health_port}") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        call = channel.unary_unary("/kinship.v1.KinshipService/Kinship")
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the API itself is not on the health port


def test_healthcheck_module(server_factory, pki, capsys):
    from kinship_service.server import healthcheck

    running = server_factory()
    assert healthcheck.main(["--address", running.address]) == 0
    assert "SERVING" in capsys.readouterr().out
    srv = pki["server"]
    tls = server_factory(tls_cert_file=srv.cert_file, tls_key_file=srv.key_file)
    assert healthcheck.main(["--address", tls.address, "--tls", "--ca-file", str(pki["ca"].cert_file)]) == 0
    running.stop(0)
    assert healthcheck.main(["--address", running.address, "--timeout", "2"]) == 1
    assert "unhealthy" in capsys.readouterr().err


def test_bad_certificate_files_stop_start_up(server_factory, tmp_path, pki):
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM"):
        server_factory(tls_cert_file=not_pem, tls_key_file=pki["server"].key_file)
    with pytest.raises(ConfigError, match="cannot read"):
        server_factory(tls_cert_file=tmp_path / "missing.pem", tls_key_file=pki["server"].key_file)


def test_tls_settings_must_come_in_pairs(pki):
    with pytest.raises(ConfigError, match="both"):
        Settings.from_env({"KINSHIP_TLS_CERT_FILE": str(pki["server"].cert_file)})
    with pytest.raises(ConfigError, match="needs"):
        Settings.from_env({"KINSHIP_TLS_CLIENT_CA_FILE": str(pki["ca"].cert_file)})


# -- request size limits -----------------------------------------------------------------------
def test_oversized_request_is_resource_exhausted_and_server_lives_on(server_factory, family):
    running = server_factory(max_message_bytes=64 * 1024)
    huge = "/" + "x" * (256 * 1024)  # a 256 KiB path: four times the server's limit
    with KinshipClient(running.address, timeout=30, max_message_bytes=4 * 2**20) as client:
        with pytest.raises(KinshipRpcError) as err:
            client.kinship(huge, [huge, huge])
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        _kinship_ok(client, family)  # the same server still answers


def test_settings_limit_is_read_from_env():
    assert Settings.from_env({"KINSHIP_MAX_MESSAGE_BYTES": "1MiB"}).max_message_bytes == 2**20


def test_serve_refuses_misconfigured_tls_before_binding(tmp_path, pki):
    settings = Settings.from_env(
        {},
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        tls_cert_file=tmp_path / "nope.pem",
        tls_key_file=pki["server"].key_file,
    )
    with pytest.raises(ConfigError):
        serve(settings)


def test_cli_with_mutual_tls_and_token(server_factory, family, pki, capsys):
    from kinship_client import cli

    srv, cli_id = pki["server"], pki["client"]
    running = server_factory(
        tls_cert_file=srv.cert_file, tls_key_file=srv.key_file, tls_client_ca_file=pki["ca"].cert_file, auth_token=TOKEN
    )
    paths = family["paths"]
    common = ["--target", running.address, "--tls-ca", str(pki["ca"].cert_file), "--tls-cert", str(cli_id.cert_file),
              "--tls-key", str(cli_id.key_file)]
    command = ["kinship", "--base", str(paths["base"]), str(paths["m0"]), str(paths["m1"]), "--json"]
    assert cli.main(common + ["--token", TOKEN] + command) == 0
    assert '"pcc"' in capsys.readouterr().out
    assert cli.main(common + command) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
