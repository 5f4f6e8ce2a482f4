"""The error every failed call raises: the gRPC status, the server's reason and the field at fault."""

from __future__ import annotations

import grpc


class KinshipRpcError(Exception):
    """An RPC failed. `code` is the grpc.StatusCode; `reason` and `field` come from the server's details.

    `reason` is one of the UPPER_SNAKE reasons in docs/errors.md (empty when the server sent
    none); `retry_after` is the server's suggested delay in seconds, when it gave one.
    """

    def __init__(
        self, code: grpc.StatusCode, message: str, reason: str = "", field: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.field = field
        self.retry_after = retry_after

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> KinshipRpcError:
        """The KinshipRpcError of a failed call, with the reason, field and retry delay of its rich status."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = error.details() if hasattr(error, "details") else str(error)
        reason, field_name, retry_after = _rich_details(error)
        return cls(code, message or "", reason, field_name, retry_after)


def _rich_details(error: grpc.RpcError) -> tuple[str, str, float | None]:
    """ErrorInfo reason, BadRequest field and RetryInfo delay, when the server sent them.

    Decoding needs googleapis-common-protos (installed with grpcio-status); without it
    the client still works and these are empty.
    """
    try:
        # googleapis-common-protos ships no type information (and no stubs are installed).
        from google.rpc import error_details_pb2, status_pb2
    except ImportError:
        return "", "", None
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    raw = next((item.value for item in (trailers or ()) if item.key == "grpc-status-details-bin"), None)
    if raw is None:
        return "", "", None
    status = status_pb2.Status.FromString(raw)
    reason, field_name, retry_after = "", "", None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            field_name = field_name or info.metadata.get("field", "")
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field_name = bad.field_violations[0].field
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    return reason, field_name, retry_after
