"""A typed Python client for kinship.v1.KinshipService.

    from kinship_client import KinshipClient

    with KinshipClient("localhost:50051") as client:
        result = client.kinship("/models/base", ["/models/a", "/models/b"])
        print(result.mean.pcc)

Checkpoints are given as local paths on the server (`/models/a`) or Hub references
(`hf://owner/name` or `hf://owner/name@revision`). Every failure raises
`KinshipRpcError`, which carries the gRPC status code, the server's reason and the
request field at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import grpc

from .v1 import common_pb2, kinship_pb2, service_pb2_grpc

CheckpointLike = Union[str, common_pb2.CheckpointRef]

DEFAULT_TIMEOUT = 600.0
DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20

_MODES = {
    "auto": common_pb2.KINSHIP_MODE_AUTO,
    "exact": common_pb2.KINSHIP_MODE_EXACT,
    "fingerprint": common_pb2.KINSHIP_MODE_FINGERPRINT,
}
_POLICIES = {
    "skip": common_pb2.SHAPE_MISMATCH_POLICY_SKIP,
    "leading_slice": common_pb2.SHAPE_MISMATCH_POLICY_LEADING_SLICE,
    "error": common_pb2.SHAPE_MISMATCH_POLICY_ERROR,
}


class KinshipRpcError(Exception):
    """An RPC failed. `code` is the grpc.StatusCode; `reason` and `field` come from the server's details."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", field: str = "", retry_after: float | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.field = field
        self.retry_after = retry_after

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "KinshipRpcError":
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
        from google.rpc import error_details_pb2, status_pb2
    except ImportError:
        return "", "", None
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    raw = next((value for key, value in (trailers or ()) if key == "grpc-status-details-bin"), None)
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


def checkpoint_ref(value: CheckpointLike) -> common_pb2.CheckpointRef:
    """`/path`, `hf://owner/name[@revision]` or a CheckpointRef -> CheckpointRef."""
    if isinstance(value, common_pb2.CheckpointRef):
        return value
    text = str(value)
    if text.startswith("hf://"):
        repo, _, revision = text[len("hf://") :].partition("@")
        return common_pb2.CheckpointRef(hub=common_pb2.HubCheckpoint(repo_id=repo, revision=revision))
    return common_pb2.CheckpointRef(path=text)


def checkpoint_label(ref: common_pb2.CheckpointRef) -> str:
    """The inverse of checkpoint_ref, for display."""
    if ref.WhichOneof("source") == "hub":
        return f"hf://{ref.hub.repo_id}" + (f"@{ref.hub.revision}" if ref.hub.revision else "")
    return ref.path


@dataclass(frozen=True)
class Values:
    """PCC, cosine similarity and Euclidean distance."""

    pcc: float
    cosine: float
    euclidean: float

    @classmethod
    def from_proto(cls, message: common_pb2.KinshipValues) -> "Values":
        return cls(message.pcc, message.cosine, message.euclidean)


@dataclass(frozen=True)
class Pair:
    """Kinship between models `first` and `second` (indices into the request's models)."""

    first: int
    second: int
    values: Values


@dataclass(frozen=True)
class LayerResult:
    """Kinship over one layer group."""

    group: str
    tensors: int
    elements: int
    pairs: list[Pair]
    mean: Values


@dataclass(frozen=True)
class KinshipResult:
    """The answer of Kinship. `raw` is the response proto."""

    models: list[str]
    pairs: list[Pair]
    mean: Values
    mode: str
    tensors_compared: int
    elements_compared: int
    skipped: list[tuple[str, str, str]]
    sliced: list[str]
    layers: list[LayerResult]
    bytes_read: int
    device: str
    seconds: float
    raw: kinship_pb2.KinshipResponse = field(repr=False)

    def matrix(self, metric: str = "pcc") -> list[list[float]]:
        """The n x n matrix of one metric (`pcc`, `cosine` or `euclidean`)."""
        n = len(self.models)
        diagonal = 0.0 if metric == "euclidean" else 1.0
        out = [[diagonal if i == j else float("nan") for j in range(n)] for i in range(n)]
        for pair in self.pairs:
            value = getattr(pair.values, metric)
            out[pair.first][pair.second] = out[pair.second][pair.first] = value
        return out


def _pairs(messages: Sequence[kinship_pb2.PairKinship]) -> list[Pair]:
    return [Pair(p.first, p.second, Values.from_proto(p.values)) for p in messages]


class KinshipClient:
    """A connection to a kinship server. Use as a context manager, or call close()."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.Channel | None = None,
    ) -> None:
        """Connect to `target` (host:port).

        `token` sends `authorization: Bearer <token>` on every call. `root_certificates`
        turns on TLS (PEM of the CA); add `private_key` and `certificate_chain` for mutual TLS.
        """
        self.timeout = timeout
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 60_000),
        ]
        if channel is not None:
            self._channel = channel
        elif root_certificates is not None or private_key is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = service_pb2_grpc.KinshipServiceStub(self._channel)

    def __enter__(self) -> "KinshipClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise KinshipRpcError.from_rpc_error(error) from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel is connected (raises KinshipRpcError UNAVAILABLE on timeout)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise KinshipRpcError(grpc.StatusCode.UNAVAILABLE, f"server not reachable within {timeout}s") from None

    def kinship(
        self,
        base: CheckpointLike,
        models: Sequence[CheckpointLike],
        *,
        mode: str = "auto",
        per_layer: bool = False,
        shape_mismatch: str = "skip",
        timeout: float | None = None,
    ) -> KinshipResult:
        """Kinship between the task vectors of `models` (at least two) against `base`.

        `mode` is `auto`, `exact` or `fingerprint`; `shape_mismatch` is `skip` or
        `leading_slice`; `per_layer` adds a per-layer-group breakdown.
        """
        request = kinship_pb2.KinshipRequest(
            base=checkpoint_ref(base),
            models=[checkpoint_ref(m) for m in models],
            mode=_MODES[mode],
            shape_mismatch_policy=_POLICIES[shape_mismatch],
            per_layer=per_layer,
        )
        response: kinship_pb2.KinshipResponse = self._call(self.stub.Kinship, request, timeout)
        return KinshipResult(
            models=[checkpoint_label(m) for m in request.models],
            pairs=_pairs(response.pairs),
            mean=Values.from_proto(response.mean),
            mode=common_pb2.KinshipMode.Name(response.mode_used).removeprefix("KINSHIP_MODE_").lower(),
            tensors_compared=response.tensors_compared,
            elements_compared=response.elements_compared,
            skipped=[(s.name, kinship_pb2.SkipReason.Name(s.reason).removeprefix("SKIP_REASON_").lower(), s.detail) for s in response.skipped],
            sliced=list(response.sliced_tensors),
            layers=[
                LayerResult(l.group, l.tensors, l.elements, _pairs(l.pairs), Values.from_proto(l.mean)) for l in response.layers
            ],
            bytes_read=response.bytes_read,
            device=response.device,
            seconds=response.seconds,
            raw=response,
        )
