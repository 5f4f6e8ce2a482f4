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
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import grpc

from kinship_client.v1 import kinship_pb2, merge_pb2, recommend_pb2, service_pb2_grpc
from kinship_service.cache.registration import Registration
from kinship_service.cache.registry import KinshipCache, KinshipOutcome
from kinship_service.checkpoints.sources import CheckpointSpec, resolve
from kinship_service.config import Settings
from kinship_service.errors import Cancelled, DeadlineExceeded, Internal, InvalidArgument, KinshipError, to_rpc_status
from kinship_service.guidance.population import Pair, pair_key
from kinship_service.kinship.exact import resolve_device
from kinship_service.kinship.modes import EXACT, FINGERPRINT, ModeUsed
from kinship_service.kinship.population import pairwise_kinship
from kinship_service.server import kinship_rpc, merge_rpc, metrics, recommend_rpc
from kinship_service.server.admission import Admission
from kinship_service.server.recommend_rpc import PopulationQuery
from kinship_service.server.refs import spec_from_ref
from kinship_service.state.backend import open_job_manager

log = logging.getLogger("kinship.api")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def rpc_status(method: str, exc: BaseException) -> grpc.Status:
    """The status a failed RPC answers: the rich status of a KinshipError, else INTERNAL (details only in the log)."""
    if isinstance(exc, KinshipError):
        log.info("rpc failed", extra={"rpc": method, "code": exc.code.name, "reason": exc.reason, "detail": exc.message})
        return to_rpc_status(exc)
    incident = uuid.uuid4().hex[:12]
    log.error("internal error", extra={"rpc": method, "incident": incident}, exc_info=exc)
    return to_rpc_status(Internal(f"internal error (incident {incident}); the server log has the details", reason="INTERNAL"))


def _already_aborted(context: grpc.ServicerContext, exc: BaseException) -> bool:
    """Whether `exc` is grpc's own exception of a call the body aborted already (let grpc finish it)."""
    return context.code() is not None and not isinstance(exc, KinshipError)  # type: ignore[attr-defined]  # grpc-stubs lack ServicerContext.code()


def rpc_method(func: F) -> F:
    """Run a unary RPC body, turning exceptions into gRPC statuses."""

    @functools.wraps(func)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return func(self, request, context)
        except Exception as exc:  # every failure must become a status
            if _already_aborted(context, exc):
                raise
            context.abort_with_status(rpc_status(func.__name__, exc))

    return cast(F, wrapper)


def rpc_stream_method(func: F) -> F:
    """Run a server-streaming RPC body, turning exceptions into gRPC statuses."""

    @functools.wraps(func)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from func(self, request, context)
        except Exception as exc:
            if _already_aborted(context, exc):
                raise
            context.abort_with_status(rpc_status(func.__name__, exc))

    return cast(F, wrapper)


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


class KinshipServicer(service_pb2_grpc.KinshipServiceServicer):
    """kinship.v1.KinshipService: every RPC, heavy work admitted and coalesced (admission.py)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.kinship_cache = KinshipCache(settings, self.device)  # fingerprints, deltas and pair results
        self.jobs = open_job_manager(settings)  # this server's SQLite registry, or the cluster's (KINSHIP_STATE_URL)
        self.jobs.start()
        # Heavy work (exact passes, registrations) runs on a bounded executor with coalescing
        # (admission.py); half the handler threads at most may wait on it, so light calls always run.
        self.admission = Admission(settings.heavy_workers, settings.heavy_queue, max_waiters=settings.max_workers // 2)
        self.jobs.output_registrar = self._register_merge_output

    def _run_heavy(self, key: Any, work: Callable[[Callable[[], None]], T], context: grpc.ServicerContext, kind: str) -> T:
        """Run `work(check)` on the heavy executor (admitted, coalesced)."""
        return self.admission.run(key, work, cancellation_check(context), kind=kind)

    def _register_merge_output(self, output: CheckpointSpec, base: CheckpointSpec) -> None:
        """Cache a finished merge's fingerprint and delta (StartMergeRequest.base)."""
        # The output lies under KINSHIP_OUTPUT_ROOT, which need not be an allowed read root.
        self.kinship_cache.register(resolve(output, [self.settings.output_root], "output_path"), base)

    # -- Kinship -----------------------------------------------------------------------
    @rpc_method
    def Kinship(self, request: kinship_pb2.KinshipRequest, context: grpc.ServicerContext) -> kinship_pb2.KinshipResponse:
        query = kinship_rpc.kinship_query(request)

        def compute(check: Callable[[], None]) -> KinshipOutcome:
            return self.kinship_cache.kinship(
                query.base,
                query.models,
                mode=query.mode,
                leading_slice=query.leading_slice,
                per_layer=query.per_layer,
                sign_conflict=query.sign_conflict,
                check_cancelled=check,
            )

        if query.mode == FINGERPRINT:  # light: cached fingerprints only, never a pass
            outcome = compute(cancellation_check(context))
        else:  # EXACT and AUTO may read weights or stored deltas: heavy, admitted and coalesced
            key = ("Kinship", request.SerializeToString(deterministic=True))
            outcome = self._run_heavy(key, compute, context, "kinship")
        return kinship_rpc.kinship_response(outcome, per_layer=query.per_layer)

    # -- RankCandidates and ShouldStop (logic in recommend.py, protos in recommend_rpc.py) --
    def _top_k_kinship(self, query: PopulationQuery, context: grpc.ServicerContext) -> tuple[dict[Pair, float], ModeUsed]:
        """Kinship of every top-k pair: `known_kinship` first, the rest from one computation over the needed members."""

        def compute(check: Callable[[], None]) -> tuple[dict[Pair, float], ModeUsed]:
            return pairwise_kinship(
                self.settings.allowed_roots,
                query.base,
                query.members,
                query.metric,
                query.mode,
                query.known,
                self.kinship_cache.compute,
                check,
                pairs=query.pairs,
            )

        if query.mode == FINGERPRINT or query.all_known:
            return compute(cancellation_check(context))  # light: every value given, or fingerprints only
        return self._run_heavy(query.key(), compute, context, "population")

    @rpc_method
    def RankCandidates(
        self, request: recommend_pb2.RankCandidatesRequest, context: grpc.ServicerContext
    ) -> recommend_pb2.RankCandidatesResponse:
        query = recommend_rpc.rank_query(request)
        values, mode_used = self._top_k_kinship(query.kinship, context)
        conflicts = self._top_k_sign_conflict(query, context) if query.can_measure_sign_conflict else None
        return query.response(values, mode_used, conflicts)

    def _top_k_sign_conflict(self, query: recommend_rpc.RankQuery, context: grpc.ServicerContext) -> dict[Pair, float]:
        """The sign conflict of every top-k pair, for method advice (one exact pass, or the cache)."""
        members = query.kinship.members
        base = query.kinship.base
        assert base is not None  # can_measure_sign_conflict

        def compute(check: Callable[[], None]) -> dict[Pair, float]:
            outcome = self.kinship_cache.kinship(
                base, [m.spec for m in members if m.spec is not None], mode=EXACT, sign_conflict=True, check_cancelled=check
            )
            matrix = outcome.result.sign_conflict or []
            return {
                pair_key(members[i].name, members[j].name): matrix[i][j]
                for i in range(len(members))
                for j in range(i + 1, len(members))
            }

        return self._run_heavy(("SignConflict", *query.kinship.key()), compute, context, "population")

    @rpc_method
    def ShouldStop(self, request: recommend_pb2.ShouldStopRequest, context: grpc.ServicerContext) -> recommend_pb2.ShouldStopResponse:
        query = recommend_rpc.stop_query(request)
        return query.response(*self._top_k_kinship(query.kinship, context))

    @rpc_method
    def RegisterCheckpoint(
        self, request: kinship_pb2.RegisterCheckpointRequest, context: grpc.ServicerContext
    ) -> kinship_pb2.RegisterCheckpointResponse:
        if not request.HasField("checkpoint"):
            raise InvalidArgument("checkpoint is required: the model to register", field="checkpoint")
        if not request.HasField("base"):
            raise InvalidArgument("base is required: the checkpoint the model was fine-tuned from", field="base")
        checkpoint = spec_from_ref(request.checkpoint, "checkpoint")
        base = spec_from_ref(request.base, "base")

        def register(check: Callable[[], None]) -> Registration:
            reg = self.kinship_cache.register(checkpoint, base, check_cancelled=check)
            metrics.BYTES_READ.inc(reg.bytes_read)  # once, however many callers share the registration
            return reg

        key = ("RegisterCheckpoint", request.SerializeToString(deterministic=True))
        reg = self._run_heavy(key, register, context, "register")
        return kinship_pb2.RegisterCheckpointResponse(
            identity=reg.identity,
            base_identity=reg.base_identity,
            already_registered=reg.already_registered,
            tensors=reg.tensors,
            elements=reg.elements,
            size_bytes=reg.size_bytes,
            delta_sum=reg.delta_sum,
            delta_sum_squares=reg.delta_sum_squares,
            layer_norms=[kinship_pb2.LayerNorm(group=g, norm=v) for g, v in reg.layer_norms],
            fingerprint_bytes=reg.fingerprint_bytes,
            delta_bytes=reg.delta_bytes,
            seconds=reg.seconds,
        )

    # -- Merge jobs (SLERP) ----------------------------------------------------------------
    @rpc_method
    def StartMerge(self, request: merge_pb2.StartMergeRequest, context: grpc.ServicerContext) -> merge_pb2.StartMergeResponse:
        merge = merge_rpc.merge_request(request, self.settings.allowed_roots)
        return merge_pb2.StartMergeResponse(job=merge_rpc.job_proto(self.jobs.submit(merge)))

    @rpc_method
    def GetMergeJob(self, request: merge_pb2.GetMergeJobRequest, context: grpc.ServicerContext) -> merge_pb2.GetMergeJobResponse:
        return merge_pb2.GetMergeJobResponse(job=merge_rpc.job_proto(self.jobs.get(request.job_id)))

    @rpc_method
    def ListMergeJobs(self, request: merge_pb2.ListMergeJobsRequest, context: grpc.ServicerContext) -> merge_pb2.ListMergeJobsResponse:
        jobs, token = self.jobs.list(request.page_size, request.page_token, merge_rpc.state_filter(request.state))
        return merge_pb2.ListMergeJobsResponse(jobs=[merge_rpc.job_proto(j) for j in jobs], next_page_token=token)

    @rpc_method
    def CancelMergeJob(self, request: merge_pb2.CancelMergeJobRequest, context: grpc.ServicerContext) -> merge_pb2.CancelMergeJobResponse:
        return merge_pb2.CancelMergeJobResponse(job=merge_rpc.job_proto(self.jobs.cancel(request.job_id)))

    @rpc_stream_method
    def WatchMergeJob(self, request: merge_pb2.WatchMergeJobRequest, context: grpc.ServicerContext) -> Iterator[merge_pb2.WatchMergeJobResponse]:
        for record in self.jobs.watch(request.job_id, context.is_active):
            yield merge_pb2.WatchMergeJobResponse(job=merge_rpc.job_proto(record))
