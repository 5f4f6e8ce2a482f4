"""The gRPC layer: translate kinship.v1 protos to calls of the domain modules and back.

No math and no file access here. Each RPC validates its request, calls one domain
function and builds its response; `KinshipError`s become rich gRPC statuses
(`rpc_method`), anything unexpected becomes INTERNAL with the details only in the
server log.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from kinship_client.v1 import common_pb2, kinship_pb2, merge_pb2, recommend_pb2, service_pb2_grpc
from kinship_service.cache.registry import AUTO, EXACT, FINGERPRINT, KinshipCache
from kinship_service.checkpoints.sources import CheckpointSpec, LocalPath, resolve
from kinship_service.config import Settings
from kinship_service.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    KinshipError,
    NeedsHeavyWork,
    to_rpc_status,
)
from kinship_service.guidance import recommend
from kinship_service.jobs.manager import MergeJobManager
from kinship_service.kinship.exact import SKIP_MISSING, SKIP_NOT_FLOATING, SKIP_SHAPE, ExactKinship, resolve_device
from kinship_service.kinship.population import pairwise_kinship
from kinship_service.kinship.similarity import Similarities
from kinship_service.server import merge_rpc, metrics, recommend_rpc
from kinship_service.server.admission import Admission
from kinship_service.server.refs import spec_from_ref

log = logging.getLogger("kinship.api")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

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
        except NeedsHeavyWork:
            raise
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


def values_proto(pcc: float, cosine: float, euclidean: float) -> common_pb2.KinshipValues:
    return common_pb2.KinshipValues(pcc=pcc, cosine=cosine, euclidean=euclidean)


def _pairs_proto(sims: Similarities) -> list[kinship_pb2.PairKinship]:
    return [
        kinship_pb2.PairKinship(first=i, second=j, values=values_proto(p, c, e)) for i, j, p, c, e in sims.pairs()
    ]


class KinshipServicer(service_pb2_grpc.KinshipServiceServicer):
    """kinship.v1.KinshipService."""

    jobs: MergeJobManager

    def __init__(self, settings: Settings, *, light_only: bool = False) -> None:
        """`light_only`: the front process's servicer (front.py): no merge jobs, no heavy executor;
        where a call needs heavy work it raises NeedsHeavyWork and the front forwards the call."""
        self.settings = settings
        self.device = resolve_device(settings.device)
        # Fingerprints, deltas and pair results (issue 3); other RPCs may call
        # self.kinship_cache.fingerprint_matrix(base, checkpoints, metric).
        self.kinship_cache = KinshipCache(settings, self.device)
        self.admission: Admission | None = None
        if light_only:  # (no `jobs` attribute: the front forwards every merge-job RPC)
            return
        self.jobs = MergeJobManager(settings)
        self.jobs.start()
        # Heavy work (exact passes, registrations) runs on a bounded executor with coalescing
        # (admission.py); half the handler threads at most may wait on it, so light calls always run.
        self.admission = Admission(settings.heavy_workers, settings.heavy_queue, max_waiters=settings.max_workers // 2)
        self.jobs.output_registrar = self._register_merge_output

    def _run_heavy(self, key: Any, work: Callable[..., T], context: grpc.ServicerContext, kind: str) -> T:
        """Run `work(check)` on the heavy executor (admitted, coalesced).

        A light-only servicer (the front) runs `work(check, light_only=True)` instead, inline: the
        work answers from the cache alone or raises NeedsHeavyWork, and front.py forwards the call.
        """
        if self.admission is None:
            return work(cancellation_check(context), light_only=True)
        return self.admission.run(key, work, cancellation_check(context), kind=kind)

    def _register_merge_output(self, output: LocalPath, base: CheckpointSpec) -> None:
        """Cache a finished merge's fingerprint and delta (StartMergeRequest.base)."""
        # The output lies under KINSHIP_OUTPUT_ROOT, which need not be an allowed read root.
        self.kinship_cache.register(resolve(output, [self.settings.output_root], "output_path"), base)

    # -- Kinship -----------------------------------------------------------------------
    @rpc_method
    def Kinship(self, request: kinship_pb2.KinshipRequest, context: grpc.ServicerContext) -> kinship_pb2.KinshipResponse:
        if not request.HasField("base"):
            raise InvalidArgument("base is required: the checkpoint the models were fine-tuned from", field="base")
        if len(request.models) < 2:
            raise InvalidArgument(
                f"kinship needs at least two models, got {len(request.models)}", field="models"
            )
        mode = _MODES.get(request.mode)
        if mode is None:
            raise InvalidArgument(f"unknown kinship mode {request.mode}; use EXACT, FINGERPRINT or AUTO", field="mode")
        # Resolved (and confined to the allowed roots) by the cache layer, which can also answer
        # for Hub checkpoints pinned to a commit that have left the Hub cache.
        base = spec_from_ref(request.base, "base")
        models = [spec_from_ref(m, f"models[{i}]") for i, m in enumerate(request.models)]
        policy = request.shape_mismatch_policy
        if policy == common_pb2.SHAPE_MISMATCH_POLICY_ERROR:
            raise InvalidArgument("kinship takes SKIP or LEADING_SLICE, not ERROR", field="shape_mismatch_policy")

        def compute(check: Callable[[], None], light_only: bool = False) -> Any:
            outcome = self.kinship_cache.kinship(
                base,
                models,
                mode=mode,
                leading_slice=policy == common_pb2.SHAPE_MISMATCH_POLICY_LEADING_SLICE,
                per_layer=request.per_layer,
                check_cancelled=check,
                light_only=light_only,
            )
            if outcome.source == "pass":  # weights were read (recorded once, however many callers share it)
                _record_exact(outcome.result)
            return outcome

        if mode == FINGERPRINT:  # light: cached fingerprints only, never a pass
            outcome = compute(cancellation_check(context))
        else:  # EXACT and AUTO may read weights or stored deltas: heavy, admitted and coalesced
            key = ("Kinship", request.SerializeToString(deterministic=True))
            outcome = self._run_heavy(key, compute, context, "kinship")
        response = kinship_response(outcome.result, per_layer=request.per_layer)
        response.mode_used = common_pb2.KINSHIP_MODE_FINGERPRINT if outcome.mode_used == FINGERPRINT else common_pb2.KINSHIP_MODE_EXACT
        for summary, identity in zip(response.models, outcome.identities, strict=False):
            summary.identity = identity
        return response

    # -- RankCandidates and ShouldStop (logic in recommend.py, protos in recommend_rpc.py) --
    def _top_k_kinship(
        self, request: Any, top: list[str], metric: str, known: dict[recommend.Pair, float], context: grpc.ServicerContext
    ) -> tuple[dict[recommend.Pair, float], str]:
        """Kinship of every top-k pair: `known_kinship` first, the rest from one pass over the needed members."""
        base = spec_from_ref(request.base, "base") if request.HasField("base") else None
        members = recommend_rpc.member_checkpoints(request.members, top, spec_from_ref)
        mode = recommend_rpc.mode_of(request.mode)

        def compute(check: Callable[[], None], light_only: bool = False) -> tuple[dict[recommend.Pair, float], str]:
            return pairwise_kinship(
                self.settings,
                self.device,
                base,
                members,
                metric,
                mode,
                known,
                check,
                on_exact=_record_exact,
                compute=functools.partial(self.kinship_cache.compute, light_only=light_only),
            )

        if mode == FINGERPRINT or all(recommend.pair_key(a, b) in known for a, b in itertools.combinations(top, 2)):
            return compute(cancellation_check(context))  # light: every value given, or fingerprints only
        key = ("population", base, tuple(members), metric, mode, tuple(sorted(known.items())))
        return self._run_heavy(key, compute, context, "population")

    @rpc_method
    def RankCandidates(
        self, request: recommend_pb2.RankCandidatesRequest, context: grpc.ServicerContext
    ) -> recommend_pb2.RankCandidatesResponse:
        metric = recommend_rpc.metric_of(request.metric)
        recommend_rpc.mode_of(request.mode)
        members = recommend_rpc.members_of(request.members)
        names = [m.name for m in recommend.validate_population(members, request.top_k).values()]
        merged = recommend.validate_pairs(recommend_rpc.pairs_of(request.merged_pairs), names, field="merged_pairs")
        known = recommend.validate_known(recommend_rpc.known_of(request.known_kinship), names, metric)
        top = recommend.select_top_k(members, request.top_k)
        values, mode_used = self._top_k_kinship(request, top, metric, known, context)
        ranking = recommend.rank_candidates(
            members, request.top_k, recommend.lookup(values), metric=metric, merged_pairs=merged
        )
        return recommend_rpc.rank_response(ranking, mode_used)

    @rpc_method
    def ShouldStop(self, request: recommend_pb2.ShouldStopRequest, context: grpc.ServicerContext) -> recommend_pb2.ShouldStopResponse:
        metric = recommend_rpc.metric_of(request.metric)
        recommend_rpc.mode_of(request.mode)
        aggregation = recommend_rpc.aggregation_of(request.aggregation)
        members = recommend_rpc.members_of(request.members)
        names = [m.name for m in recommend.validate_population(members, request.top_k).values()]
        known = recommend.validate_known(recommend_rpc.known_of(request.known_kinship), names, metric)
        options: dict[str, Any] = dict(
            metric=metric,
            previous_top_k=list(request.previous_top_k),
            kinship_threshold=request.kinship_threshold if request.HasField("kinship_threshold") else None,
            aggregation=aggregation,
            gain_window=request.gain_window,
            gain_threshold=request.gain_threshold if request.HasField("gain_threshold") else None,
        )
        recommend.validate_stop_options(members, **options)  # cheap errors before any weights are read
        top = recommend.select_top_k(members, request.top_k)
        values, mode_used = self._top_k_kinship(request, top, metric, known, context)
        decision = recommend.should_stop(members, request.top_k, recommend.lookup(values), **options)
        return recommend_rpc.stop_response(decision, mode_used)

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

        def register(check: Callable[[], None], light_only: bool = False) -> Any:
            if light_only:  # a registration always reads the weights
                raise NeedsHeavyWork("register")
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


_MODES = {
    common_pb2.KINSHIP_MODE_UNSPECIFIED: AUTO,
    common_pb2.KINSHIP_MODE_AUTO: AUTO,
    common_pb2.KINSHIP_MODE_EXACT: EXACT,
    common_pb2.KINSHIP_MODE_FINGERPRINT: FINGERPRINT,
}


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

