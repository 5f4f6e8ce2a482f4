"""Errors the service raises, each mapped to one gRPC status code.

Every failure a user can cause is a `KinshipError` subclass carrying the status
code, a machine-readable `reason` (UPPER_SNAKE, as google.rpc.ErrorInfo) and, for
INVALID_ARGUMENT, the request field at fault. The gRPC layer turns them into rich
statuses (`to_rpc_status`); anything else is a bug and becomes INTERNAL without
leaking a stack trace to the caller.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "kinship.v1.KinshipService"


class KinshipError(Exception):
    """Base of every error the service reports to callers."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field
        self.retry_after_seconds = retry_after_seconds


class InvalidArgument(KinshipError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(KinshipError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class PermissionDenied(KinshipError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PATH_NOT_ALLOWED"


class FailedPrecondition(KinshipError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class AlreadyExists(KinshipError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class ResourceExhausted(KinshipError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Cancelled(KinshipError):
    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class DeadlineExceeded(KinshipError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Unavailable(KinshipError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Internal(KinshipError):
    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


def status_code_number(code: grpc.StatusCode) -> int:
    """The google.rpc.Code number of a grpc.StatusCode."""
    return int(code.value[0])


MAX_MESSAGE_BYTES = 1024
"""Longest status message (UTF-8 bytes). Messages quote request values (paths, ids) and travel in
trailers, which clients refuse beyond a few KiB: a longer one would reach the caller as a garbled
RESOURCE_EXHAUSTED instead of the real status."""


def clip_message(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`text`, cut to at most `limit` UTF-8 bytes (marked) so it fits in a status trailer."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    return raw[: limit - 16].decode("utf-8", "ignore") + " ...(truncated)"


def to_rpc_status(error: KinshipError) -> grpc.Status:
    """A rich gRPC status: one ErrorInfo, plus BadRequest or RetryInfo when they apply (AIP-193)."""
    details: list[any_pb2.Any] = []
    message = clip_message(error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)
    if error.field:
        info.metadata["field"] = clip_message(error.field, 256)
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if error.field and error.code == grpc.StatusCode.INVALID_ARGUMENT:
        bad = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=clip_message(error.field, 256), description=message)]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    if error.retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_seconds * 1e9))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)
    status = status_pb2.Status(code=status_code_number(error.code), message=message, details=details)
    return rpc_status.to_status(status)


assert code_pb2.INVALID_ARGUMENT == status_code_number(grpc.StatusCode.INVALID_ARGUMENT)
