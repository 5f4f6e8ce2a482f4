"""`kinship-healthcheck` / `python -m kinship_service.server.healthcheck`: ask a server's gRPC health service.

Exits 0 when the server answers SERVING, 1 otherwise (NOT_SERVING, unreachable, error),
printing one line that says which. The Dockerfile's HEALTHCHECK and the Helm chart's
`helm test` Pod run it. It imports neither torch nor the service code, so it starts fast.

By default it asks `127.0.0.1` on `KINSHIP_HEALTH_PORT` when that is set (plaintext,
health only), else on `KINSHIP_PORT` (default 50051). When the server uses TLS on its
main port and no health port is set, it connects with TLS, trusting
`KINSHIP_HEALTHCHECK_CA_FILE` (default: the server's own certificate file, which works
for a self-signed one); with mutual TLS set `KINSHIP_HEALTH_PORT` instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORT = 50051  # mirrors kinship_service.config.DEFAULT_PORT without importing the service


def _default_address(environ: Mapping[str, str]) -> tuple[str, bool]:
    """(host:port, use TLS) from the server's own KINSHIP_* variables."""
    health_port = environ.get("KINSHIP_HEALTH_PORT", "")
    if health_port not in ("", "0"):
        return f"127.0.0.1:{health_port}", False
    port = environ.get("KINSHIP_PORT") or str(DEFAULT_PORT)
    return f"127.0.0.1:{port}", bool(environ.get("KINSHIP_TLS_CERT_FILE"))


def check(address: str, service: str = "", timeout: float = 5.0, root_certificates: bytes | None = None, tls: bool = False) -> int:
    """The HealthCheckResponse status of `service` at `address` (raises grpc.RpcError when unreachable)."""
    if tls:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        # types-grpcio-health-checking declares no methods on HealthStub (they are set in its __init__).
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=False)  # type: ignore[attr-defined]
        return int(response.status)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when SERVING, else 1."""
    default_address, default_tls = _default_address(os.environ)
    parser = argparse.ArgumentParser(prog="kinship-healthcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=default_address, help=f"host:port of the server (default {default_address})")
    parser.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    parser.add_argument("--tls", action="store_true", default=default_tls, help="connect with TLS")
    parser.add_argument("--ca-file", type=Path, default=None, help="PEM CA to trust for --tls")
    args = parser.parse_args(argv)
    root = None
    if args.tls:
        ca_file = args.ca_file or os.environ.get("KINSHIP_HEALTHCHECK_CA_FILE") or os.environ.get("KINSHIP_TLS_CERT_FILE")
        if ca_file:
            try:
                root = Path(ca_file).read_bytes()
            except OSError as exc:
                print(f"unhealthy: cannot read CA file {ca_file}: {exc}", file=sys.stderr)
                return 1
    try:
        status = check(args.address, args.service, args.timeout, root, args.tls)
    except grpc.RpcError as error:
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else str(error)
        print(f"unhealthy: {args.address}: {code.name if code else 'ERROR'}: {details}", file=sys.stderr)
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    if status == health_pb2.HealthCheckResponse.SERVING:
        print(f"healthy: {args.address} {args.service or '(server)'} {name}")
        return 0
    print(f"unhealthy: {args.address} {args.service or '(server)'} {name}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
