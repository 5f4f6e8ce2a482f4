"""Optional bearer-token authentication and TLS credentials for the gRPC server.

With `KINSHIP_AUTH_TOKEN` (or `KINSHIP_AUTH_TOKEN_FILE`, e.g. a Kubernetes Secret
mount) set, every RPC must carry `authorization: Bearer <token>`; the comparison is
constant-time (`hmac.compare_digest`). The health and reflection services stay open
so that Kubernetes probes and `grpcurl list` work without credentials. A token file
is re-read when it changes (Secret rotation) without a restart.

TLS comes from PEM files (`KINSHIP_TLS_CERT_FILE`, `KINSHIP_TLS_KEY_FILE`); with
`KINSHIP_TLS_CLIENT_CA_FILE` clients must present a certificate signed by that CA
(mutual TLS).
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from kinship_service.config import ConfigError, Settings
from kinship_service.errors import KinshipError, to_rpc_status

log = logging.getLogger("kinship.auth")

# Services reachable without a token: probes and discovery must work unauthenticated.
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


class Unauthenticated(KinshipError):
    """The call carries no valid bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class TokenSource:
    """The expected token: a fixed string, or a file re-read whenever its mtime or size changes."""

    def __init__(self, token: str = "", path: Path | None = None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._token = token.encode()
        if path is not None:
            self._reload()
        if not self._token:
            raise ConfigError("the API token is empty: set KINSHIP_AUTH_TOKEN or point KINSHIP_AUTH_TOKEN_FILE at a non-empty file")

    def _reload(self) -> None:
        assert self._path is not None
        try:
            stat = os.stat(self._path)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            token = self._path.read_text().strip().encode()
        except OSError as exc:
            if self._stamp is None:
                raise ConfigError(f"KINSHIP_AUTH_TOKEN_FILE: cannot read {self._path}: {exc}") from None
            log.warning("cannot re-read the token file; keeping the previous token", extra={"error": str(exc)})
            return
        if not token:
            if self._stamp is None:
                raise ConfigError(f"KINSHIP_AUTH_TOKEN_FILE: {self._path} is empty")
            log.warning("the token file is empty; keeping the previous token")
            return
        self._token, self._stamp = token, stamp

    def current(self) -> bytes:
        """The token callers must present now."""
        if self._path is not None:
            with self._lock:
                self._reload()
        return self._token


def token_source(settings: Settings) -> TokenSource | None:
    """The configured token source, or None when authentication is off."""
    if settings.auth_token_file is not None:
        return TokenSource(path=settings.auth_token_file)
    if settings.auth_token:
        return TokenSource(settings.auth_token)
    return None


def _presented_token(metadata: Any) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, credential = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                return None
            return credential.strip().encode()
    return None


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (UNAUTHENTICATED), except health and reflection."""

    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: grpc.HandlerCallDetails) -> Any:
        method: str = handler_call_details.method
        service = method.split("/")[1] if method.count("/") >= 2 else ""
        if service in OPEN_SERVICES:
            return continuation(handler_call_details)
        error = token_error(handler_call_details.invocation_metadata, self._tokens)
        if error is None:
            return continuation(handler_call_details)
        log.info("unauthenticated call refused", extra={"rpc": method, "reason": error.reason})
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: refuse it too, so callers without a token learn nothing
            return _deny_unary(error, None, None)
        if handler.unary_unary or handler.stream_unary:
            return _deny_unary(error, handler.request_deserializer, handler.response_serializer, handler.stream_unary is not None)
        return _deny_stream(error, handler.request_deserializer, handler.response_serializer, handler.stream_stream is not None)


def token_error(metadata: Any, tokens: TokenSource) -> KinshipError | None:
    """The UNAUTHENTICATED error for a call's metadata, or None when it carries the valid token."""
    presented = _presented_token(metadata)
    if presented is None:
        return Unauthenticated(
            "this server requires an API token: send the metadata `authorization: Bearer <token>` "
            "(KinshipClient(token=...) or `kinship --token`)",
            reason="TOKEN_MISSING",
        )
    if not hmac.compare_digest(presented, tokens.current()):
        return Unauthenticated("the API token is not valid: check the token you were given", reason="TOKEN_INVALID")
    return None


def _deny_unary(error: KinshipError, deserializer: Any, serializer: Any, client_streaming: bool = False) -> grpc.RpcMethodHandler[Any, Any]:
    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort_with_status(to_rpc_status(error))

    factory = grpc.stream_unary_rpc_method_handler if client_streaming else grpc.unary_unary_rpc_method_handler
    return factory(deny, request_deserializer=deserializer, response_serializer=serializer)


def _deny_stream(error: KinshipError, deserializer: Any, serializer: Any, client_streaming: bool = False) -> grpc.RpcMethodHandler[Any, Any]:
    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort_with_status(to_rpc_status(error))
        yield  # pragma: no cover - makes this a generator; abort raises first

    factory = grpc.stream_stream_rpc_method_handler if client_streaming else grpc.unary_stream_rpc_method_handler
    return factory(deny, request_deserializer=deserializer, response_serializer=serializer)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files (mutual TLS with a client CA), or None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None

    def read(path: Path, variable: str) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{variable}: cannot read {path}: {exc}") from None
        if b"-----BEGIN" not in data:
            raise ConfigError(f"{variable}: {path} is not a PEM file (expected -----BEGIN ...)")
        return data

    key = read(settings.tls_key_file, "KINSHIP_TLS_KEY_FILE")
    chain = read(settings.tls_cert_file, "KINSHIP_TLS_CERT_FILE")
    client_ca = None
    if settings.tls_client_ca_file is not None:
        client_ca = read(settings.tls_client_ca_file, "KINSHIP_TLS_CLIENT_CA_FILE")
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None)
