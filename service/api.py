"""The gRPC layer: translate kinship.v1 protos to calls of the domain modules and back.

No math and no file access here. Each RPC validates its request, calls one domain
function and builds its response; `KinshipError`s become rich gRPC statuses
(`rpc_method`), anything unexpected becomes INTERNAL with the details only in the
server log.
"""

from __future__ import annotations

import functools
import logging
import threading
import uuid
from typing import Any, Callable, Iterator, TypeVar

import grpc

from kinship_client.v1 import common_pb2, kinship_pb2, merge_pb2, recommend_pb2, service_pb2_grpc

from . import metrics
from .config import Settings
from .errors import Cancelled, DeadlineExceeded, Internal, InvalidArgument, KinshipError, to_rpc_status
from .exact import SKIP_MISSING, SKIP_NOT_FLOATING, SKIP_SHAPE, ExactKinship, exact_kinship, resolve_device
from .kinship_math import Similarities
from .sources import CheckpointSpec, HubRepo, LocalPath, resolve

log = logging.getLogger("kinship.api")

F = TypeVar("F", bound=Callable[..., Any])

_SKIP_REASONS = {
    SKIP_MISSING: kinship_pb2.SKIP_REASON_MISSING,
    SKIP_SHAPE: kinship_pb2.SKIP_REASON_SHAPE_MISMATCH,
    SKIP_NOT_FLOATING: kinship_pb2.SKIP_REASON_NOT_FLOATING,
}


def _abort(context: grpc.ServicerContext, method: str, exc: BaseException) -> None:
    if isinstance(exc, KinshipError):
        log.info("rpc failed", extra={"rpc": method, "code": exc.code.name, "reason": exc.reason, "detail": exc.message})
        context.abort_with_status(to_rpc_status(exc))
    incident = uuid.uuid4().hex[:12]
    log.exception("internal error", extra={"rpc": method, "incident": incident})
    context.abort_with_status(
        to_rpc_status(Internal(f"internal error (incident {incident}); the server log has the details", reason="INTERNAL"))
    )


def rpc_method(func: F) -> F:
    """Run a unary RPC body, turning exceptions into gRPC statuses."""

    @functools.wraps(func)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return func(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure must become a status
            if context.code() is not None and not isinstance(exc, KinshipError):
                raise  # already aborted (abort raises); let grpc finish it
            _abort(context, func.__name__, exc)

    return wrapper  # type: ignore[return-value]


def rpc_stream_method(func: F) -> F:
    """Run a server-streaming RPC body, turning exceptions into gRPC statuses."""

    @functools.wraps(func)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from func(self, request, context)
        except Exception as exc:  # noqa: BLE001
            if context.code() is not None and not isinstance(exc, KinshipError):
                raise
            _abort(context, func.__name__, exc)

    return wrapper  # type: ignore[return-value]


def cancellation_check(context: grpc.ServicerContext) -> Callable[[], None]:
    """A callable that raises when the caller cancelled or the deadline passed."""
    done = threading.Event()
    context.add_callback(done.set)

    def check() -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the deadline passed before the work finished; the work was stopped")
        if done.is_set() or not context.is_active():
            raise Cancelled("the call was cancelled; the work was stopped")

    return check


def spec_from_ref(ref: common_pb2.CheckpointRef, field: str) -> CheckpointSpec:
    """A CheckpointRef proto as a domain reference; INVALID_ARGUMENT when unset."""
    which = ref.WhichOneof("source")
    if which == "path":
        return LocalPath(ref.path)
    if which == "hub":
        if not ref.hub.repo_id:
            raise InvalidArgument("hub.repo_id is empty", field=f"{field}.hub.repo_id")
        return HubRepo(ref.hub.repo_id, ref.hub.revision)
    raise InvalidArgument(f"{field} is not set: give a local path or a Hub repo", field=field)


def values_proto(pcc: float, cosine: float, euclidean: float) -> common_pb2.KinshipValues:
    return common_pb2.KinshipValues(pcc=pcc, cosine=cosine, euclidean=euclidean)


def _pairs_proto(sims: Similarities) -> list[kinship_pb2.PairKinship]:
    return [
        kinship_pb2.PairKinship(first=i, second=j, values=values_proto(p, c, e)) for i, j, p, c, e in sims.pairs()
    ]


class KinshipServicer(service_pb2_grpc.KinshipServiceServicer):
    """kinship.v1.KinshipService."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)

    # -- Kinship -----------------------------------------------------------------------
    @rpc_method
    def Kinship(self, request: kinship_pb2.KinshipRequest, context: grpc.ServicerContext) -> kinship_pb2.KinshipResponse:
        if not request.HasField("base"):
            raise InvalidArgument("base is required: the checkpoint the models were fine-tuned from", field="base")
        if len(request.models) < 2:
            raise InvalidArgument(
                f"kinship needs at least two models, got {len(request.models)}", field="models"
            )
        if request.mode == common_pb2.KINSHIP_MODE_FINGERPRINT:
            raise InvalidArgument(
                "FINGERPRINT mode needs the fingerprint cache, which this server does not have yet; use EXACT",
                reason="MODE_UNAVAILABLE",
                field="mode",
            )
        roots = self.settings.allowed_roots
        base = resolve(spec_from_ref(request.base, "base"), roots, "base")
        models = [resolve(spec_from_ref(m, f"models[{i}]"), roots, f"models[{i}]") for i, m in enumerate(request.models)]
        policy = request.shape_mismatch_policy
        if policy == common_pb2.SHAPE_MISMATCH_POLICY_ERROR:
            raise InvalidArgument("kinship takes SKIP or LEADING_SLICE, not ERROR", field="shape_mismatch_policy")
        result = exact_kinship(
            base,
            models,
            leading_slice=policy == common_pb2.SHAPE_MISMATCH_POLICY_LEADING_SLICE,
            device=self.device,
            chunk_bytes=self.settings.chunk_bytes,
            check_cancelled=cancellation_check(context),
        )
        _record_exact(result)
        return kinship_response(result, per_layer=request.per_layer)

    # -- Later issues ------------------------------------------------------------------
    def _unimplemented(self, context: grpc.ServicerContext, what: str) -> None:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not implemented by this server version yet")

    def RankCandidates(self, request: recommend_pb2.RankCandidatesRequest, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "RankCandidates")

    def ShouldStop(self, request: recommend_pb2.ShouldStopRequest, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "ShouldStop")

    def RegisterCheckpoint(self, request: kinship_pb2.RegisterCheckpointRequest, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "RegisterCheckpoint")

    def StartMerge(self, request: merge_pb2.StartMergeRequest, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "StartMerge")

    def GetMergeJob(self, request: merge_pb2.GetMergeJobRequest, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "GetMergeJob")

    def ListMergeJobs(self, request: merge_pb2.ListMergeJobsRequest, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "ListMergeJobs")

    def CancelMergeJob(self, request: merge_pb2.CancelMergeJobRequest, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "CancelMergeJob")

    def WatchMergeJob(self, request: merge_pb2.WatchMergeJobRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        self._unimplemented(context, "WatchMergeJob")
        yield from ()


def _record_exact(result: ExactKinship) -> None:
    metrics.BYTES_READ.inc(result.bytes_read)
    metrics.TENSORS_COMPARED.inc(len(result.plan.tensors))
    metrics.ELEMENTS_COMPARED.inc(result.overall.count)
    metrics.EXACT_SECONDS.labels(result.device).observe(result.seconds)
    if result.seconds > 0:
        metrics.EXACT_BYTES_PER_SECOND.set(result.bytes_read / result.seconds)


def kinship_response(result: ExactKinship, *, per_layer: bool) -> kinship_pb2.KinshipResponse:
    """The KinshipResponse of an exact pass."""
    sims = result.overall
    response = kinship_pb2.KinshipResponse(
        pairs=_pairs_proto(sims),
        mean=values_proto(*sims.mean()),
        mode_used=common_pb2.KINSHIP_MODE_EXACT,
        tensors_compared=len(result.plan.tensors),
        elements_compared=sims.count,
        sliced_tensors=[t.name for t in result.plan.tensors if t.sliced],
        skipped=[
            kinship_pb2.SkippedTensor(name=s.name, reason=_SKIP_REASONS[s.reason], detail=s.detail) for s in result.plan.skipped
        ],
        models=[
            kinship_pb2.ModelSummary(index=i, delta_norm=sims.norms[i], delta_mean=sims.means[i])
            for i in range(len(sims.norms))
        ],
        bytes_read=result.bytes_read,
        device=result.device,
        seconds=result.seconds,
    )
    if per_layer:
        for group, group_sims in result.by_group.items():
            response.layers.append(
                kinship_pb2.LayerKinship(
                    group=group,
                    tensors=result.tensors_by_group[group],
                    elements=group_sims.count,
                    pairs=_pairs_proto(group_sims),
                    mean=values_proto(*group_sims.mean()),
                )
            )
    return response

