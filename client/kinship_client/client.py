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

from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TypeVar

import grpc

from .choices import (
    MODE_USED_NAMES,
    SKIP_REASON_NAMES,
    Aggregation,
    Dtype,
    ExplorationRule,
    GreedyOrder,
    JobState,
    KinshipShapeMismatch,
    MergeShapeMismatch,
    Metric,
    Mode,
    SlerpFactor,
    aggregation_value,
    dtype_value,
    exploration_rule_value,
    greedy_order_value,
    job_state_value,
    kinship_shape_mismatch_value,
    merge_shape_mismatch_value,
    metric_value,
    mode_value,
    received,
    slerp_factor_value,
)
from .errors import KinshipRpcError
from .merge import MergeJobInfo, MergeOperation, TLike, interpolation_factor, iter_watch
from .population import KnownKinshipLike, Member, RankResult, StopResult, known_kinship_triples
from .refs import CheckpointLike, checkpoint_label, checkpoint_ref
from .results import KinshipResult, LayerResult, Registration, Values, pairs_from_proto
from .v1 import kinship_pb2, merge_pb2, recommend_pb2, service_pb2_grpc

DEFAULT_TIMEOUT = 600.0
DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20

_Response = TypeVar("_Response")



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
        # grpcio-tools generates no type information for *_pb2_grpc.py.
        self.stub = service_pb2_grpc.KinshipServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> KinshipClient:
        """The client itself; the channel is closed when the block ends."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Close the channel."""
        self.close()

    def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        self._channel.close()

    def _call(self, method: Callable[..., _Response], request: object, timeout: float | None) -> _Response:
        """Call a unary method with the client's deadline and metadata; gRPC errors become KinshipRpcError."""
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

    # -- merge jobs ----------------------------------------------------------------------
    def _merge_request(
        self,
        model_a: CheckpointLike | None,
        model_b: CheckpointLike | None,
        t: TLike | None,
        output_path: str,
        dtype: Dtype | None,
        request_id: str | None,
        overwrite: bool,
        max_shard_bytes: int,
        shape_mismatch: MergeShapeMismatch,
        mergekit_yaml: str | None,
        base: CheckpointLike | None = None,
    ) -> merge_pb2.StartMergeRequest:
        """The StartMergeRequest of start_merge's arguments (raises ValueError for a bad one)."""
        request = merge_pb2.StartMergeRequest(
            request_id=request_id or "",
            output_path=output_path,
            dtype=dtype_value(dtype),
            max_shard_bytes=max_shard_bytes,
            shape_mismatch_policy=merge_shape_mismatch_value(shape_mismatch),
            overwrite=overwrite,
        )
        if base is not None:
            request.base.CopyFrom(checkpoint_ref(base, "base"))
        if mergekit_yaml:
            request.mergekit_yaml = mergekit_yaml
        else:
            if model_a is None or model_b is None:
                raise ValueError("give model_a and model_b, or mergekit_yaml")
            request.model_a.CopyFrom(checkpoint_ref(model_a, "model_a"))
            request.model_b.CopyFrom(checkpoint_ref(model_b, "model_b"))
            request.t.CopyFrom(interpolation_factor(0.5 if t is None else t))
        return request

    def start_merge(
        self,
        model_a: CheckpointLike | None,
        model_b: CheckpointLike | None,
        *,
        t: TLike = 0.5,
        output_path: str,
        dtype: Dtype | None = None,
        request_id: str | None = None,
        overwrite: bool = False,
        max_shard_bytes: int = 0,
        shape_mismatch: MergeShapeMismatch = "error",
        mergekit_yaml: str | None = None,
        base: CheckpointLike | None = None,
        timeout: float | None = None,
    ) -> MergeJobInfo:
        """Start a SLERP merge of `model_a` (t = 0) and `model_b` (t = 1) into `output_path` (under the server's output root).

        Returns at once with the queued job. `t`: a float, a list of layer anchors, or a list of
        `{"filter": ..., "value": ...}` entries. `dtype`: bfloat16, float16 or float32 (default: A's).
        `request_id` makes the call idempotent. `mergekit_yaml` (the text of a mergekit slerp
        config) replaces model_a, model_b and t. `base`: cache the merged model's fingerprint
        against this base before the job succeeds, so kinship questions about it are instant.

        Raises:
            ValueError: a bad `dtype`, `shape_mismatch` or `t`, a path that is not UTF-8, or
                neither both models nor `mergekit_yaml` (the message lists what is allowed).
            KinshipRpcError: the server refused the merge (see docs/errors.md for its reasons).
        """
        request = self._merge_request(
            model_a, model_b, t, output_path, dtype, request_id, overwrite, max_shard_bytes, shape_mismatch, mergekit_yaml, base
        )
        response: merge_pb2.StartMergeResponse = self._call(self.stub.StartMerge, request, timeout)
        return MergeJobInfo.from_proto(response.job)

    def merge(
        self,
        model_a: CheckpointLike | None,
        model_b: CheckpointLike | None,
        *,
        t: TLike = 0.5,
        output_path: str,
        dtype: Dtype | None = None,
        request_id: str | None = None,
        overwrite: bool = False,
        max_shard_bytes: int = 0,
        shape_mismatch: MergeShapeMismatch = "error",
        mergekit_yaml: str | None = None,
        base: CheckpointLike | None = None,
        timeout: float | None = None,
    ) -> MergeOperation:
        """Like start_merge, returning a MergeOperation: `op.wait()` follows the job to its end.

        Raises:
            ValueError, KinshipRpcError: as start_merge.
        """
        info = self.start_merge(
            model_a,
            model_b,
            t=t,
            output_path=output_path,
            dtype=dtype,
            request_id=request_id,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
            shape_mismatch=shape_mismatch,
            mergekit_yaml=mergekit_yaml,
            base=base,
            timeout=timeout,
        )
        return MergeOperation(self, info)

    def get_merge_job(self, job_id: str, *, timeout: float | None = None) -> MergeJobInfo:
        """The job's current state and progress.

        Raises:
            KinshipRpcError: NOT_FOUND `JOB_NOT_FOUND` for an unknown job, or another server error.
        """
        response: merge_pb2.GetMergeJobResponse = self._call(self.stub.GetMergeJob, merge_pb2.GetMergeJobRequest(job_id=job_id), timeout)
        return MergeJobInfo.from_proto(response.job)

    def list_merge_jobs(
        self, page_size: int = 0, page_token: str = "", state: JobState | None = None, *, timeout: float | None = None
    ) -> tuple[list[MergeJobInfo], str]:
        """One page of jobs, newest first, and the token of the next page ('' on the last).

        `state` keeps only jobs in that state (None: every state).

        Raises:
            ValueError: `state` is not a job state (the message lists them).
            KinshipRpcError: the server answered with an error (a bad page token, for example).
        """
        request = merge_pb2.ListMergeJobsRequest(page_size=page_size, page_token=page_token, state=job_state_value(state))
        response: merge_pb2.ListMergeJobsResponse = self._call(self.stub.ListMergeJobs, request, timeout)
        return [MergeJobInfo.from_proto(j) for j in response.jobs], response.next_page_token

    def cancel_merge_job(self, job_id: str, *, timeout: float | None = None) -> MergeJobInfo:
        """Cancel a job; returns it cancelled, or in its final state when it had already ended.

        Raises:
            KinshipRpcError: NOT_FOUND `JOB_NOT_FOUND`, FAILED_PRECONDITION `JOB_NOT_OWNED`, or another server error.
        """
        response: merge_pb2.CancelMergeJobResponse = self._call(self.stub.CancelMergeJob, merge_pb2.CancelMergeJobRequest(job_id=job_id), timeout)
        return MergeJobInfo.from_proto(response.job)

    def watch_merge_job(self, job_id: str, *, timeout: float | None = None) -> Iterator[MergeJobInfo]:
        """Updates of a job as they happen; the iterator ends after its final state.

        Raises:
            KinshipRpcError: the job is unknown, the stream broke, or its deadline passed.
        """
        try:
            stream = self.stub.WatchMergeJob(
                merge_pb2.WatchMergeJobRequest(job_id=job_id),
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
            yield from iter_watch(stream)
        except grpc.RpcError as error:
            raise KinshipRpcError.from_rpc_error(error) from None

    def kinship(
        self,
        base: CheckpointLike,
        models: Sequence[CheckpointLike],
        *,
        mode: Mode = "auto",
        per_layer: bool = False,
        shape_mismatch: KinshipShapeMismatch = "skip",
        timeout: float | None = None,
    ) -> KinshipResult:
        """Kinship between the task vectors of `models` (at least two) against `base`.

        `mode` is `auto`, `exact` or `fingerprint`; `shape_mismatch` is `skip` or
        `leading_slice`; `per_layer` adds a per-layer-group breakdown.

        Raises:
            ValueError: a bad `mode` or `shape_mismatch` (the message lists the allowed values),
                or a path that is not valid UTF-8.
            KinshipRpcError: the server answered with an error (see docs/errors.md).
        """
        request = kinship_pb2.KinshipRequest(
            base=checkpoint_ref(base, "base"),
            models=[checkpoint_ref(m, f"models[{i}]") for i, m in enumerate(models)],
            mode=mode_value(mode),
            shape_mismatch_policy=kinship_shape_mismatch_value(shape_mismatch),
            per_layer=per_layer,
        )
        response: kinship_pb2.KinshipResponse = self._call(self.stub.Kinship, request, timeout)
        return KinshipResult(
            models=[checkpoint_label(m) for m in request.models],
            pairs=pairs_from_proto(response.pairs),
            mean=Values.from_proto(response.mean),
            mode=received(MODE_USED_NAMES, response.mode_used, "kinship mode"),
            tensors_compared=response.tensors_compared,
            elements_compared=response.elements_compared,
            skipped=[(s.name, received(SKIP_REASON_NAMES, s.reason, "skip reason"), s.detail) for s in response.skipped],
            sliced=list(response.sliced_tensors),
            layers=[
                LayerResult(l.group, l.tensors, l.elements, pairs_from_proto(l.pairs), Values.from_proto(l.mean)) for l in response.layers
            ],
            bytes_read=response.bytes_read,
            device=response.device,
            seconds=response.seconds,
            raw=response,
        )

    # -- RankCandidates and ShouldStop --------------------------------------------------
    def _population(
        self, members: Sequence[Member], known_kinship: KnownKinshipLike
    ) -> tuple[list[recommend_pb2.PopulationMember], list[recommend_pb2.KnownKinship]]:
        """The members and known kinship as protos (raises ValueError for a checkpoint path that is not UTF-8)."""
        protos = []
        for i, m in enumerate(members):
            message = recommend_pb2.PopulationMember(name=m.name, parents=list(m.parents), task_scores=list(m.task_scores))
            if m.checkpoint is not None:
                message.checkpoint.CopyFrom(checkpoint_ref(m.checkpoint, f"members[{i}].checkpoint"))
            if m.score is not None:
                message.score = m.score
            if m.generation is not None:
                message.generation = m.generation
            protos.append(message)
        known = [
            recommend_pb2.KnownKinship(pair=recommend_pb2.MemberPair(first=a, second=b), value=v)
            for a, b, v in known_kinship_triples(known_kinship)
        ]
        return protos, known

    def rank_candidates(
        self,
        members: Sequence[Member],
        *,
        top_k: int,
        base: CheckpointLike | None = None,
        merged_pairs: Sequence[tuple[str, str]] = (),
        metric: Metric = "pcc",
        mode: Mode = "auto",
        known_kinship: KnownKinshipLike = (),
        greedy_order: GreedyOrder = "mean_score",
        max_greedy: int = 0,
        greedy_fraction: float | None = None,
        exploration: ExplorationRule = "latest_generation",
        exploration_pool: int = 0,
        estimate_gain: bool = False,
        gain_prior_strength: float | None = None,
        slerp_factor: SlerpFactor = "none",
        timeout: float | None = None,
    ) -> RankResult:
        """Which pairs of the population to merge next (greedy pairs among the top-k, then one exploration merge).

        `base` is needed unless every kinship value among the top-k is in `known_kinship`
        (`{(a, b): value}` or `[(a, b, value)]`). `metric`: pcc, cosine or euclidean.
        The advice options (defaults: Algorithm 1 as the paper has it; docs/population.md):
        `greedy_order` (mean_score, expected_score, task_ceiling) with `max_greedy` /
        `greedy_fraction` to keep only the most promising greedy pairs; `exploration`
        (latest_generation, outside_lineage, complementary, none) among the best
        `exploration_pool` members (0: top_k); `estimate_gain` fills each recommendation's
        expected gain from a model fitted on the population's history (`gain_prior_strength`
        pseudo-observations, default 2); `slerp_factor` (none, even, score_weighted)
        fills `suggested_t`.

        Raises:
            ValueError: a bad `metric`, `mode`, `greedy_order`, `exploration` or `slerp_factor`
                (the message lists the allowed values), or a checkpoint path that is not valid UTF-8.
            KinshipRpcError: the server answered with an error (population rules, missing
                fingerprints, ...: see docs/errors.md).
        """
        protos, known = self._population(members, known_kinship)
        request = recommend_pb2.RankCandidatesRequest(
            members=protos,
            merged_pairs=[recommend_pb2.MemberPair(first=a, second=b) for a, b in merged_pairs],
            top_k=top_k,
            metric=metric_value(metric),
            mode=mode_value(mode),
            known_kinship=known,
            greedy_order=greedy_order_value(greedy_order),
            max_greedy=max_greedy,
            exploration=exploration_rule_value(exploration),
            exploration_pool=exploration_pool,
            estimate_gain=estimate_gain,
            slerp_factor=slerp_factor_value(slerp_factor),
        )
        if base is not None:
            request.base.CopyFrom(checkpoint_ref(base, "base"))
        if greedy_fraction is not None:
            request.greedy_fraction = greedy_fraction
        if gain_prior_strength is not None:
            request.gain_prior_strength = gain_prior_strength
        response: recommend_pb2.RankCandidatesResponse = self._call(self.stub.RankCandidates, request, timeout)
        return RankResult.from_proto(response)

    def should_stop(
        self,
        members: Sequence[Member],
        *,
        top_k: int,
        base: CheckpointLike | None = None,
        previous_top_k: Sequence[str] = (),
        kinship_threshold: float | None = None,
        aggregation: Aggregation = "mean",
        metric: Metric = "pcc",
        gain_window: int = 0,
        gain_threshold: float | None = None,
        mode: Mode = "auto",
        known_kinship: KnownKinshipLike = (),
        merged_pairs: Sequence[tuple[str, str]] = (),
        min_expected_gain: float | None = None,
        min_gain_history: int = 0,
        gain_prior_strength: float | None = None,
        timeout: float | None = None,
    ) -> StopResult:
        """Whether the merging loop should stop, with every reason that fired and the evidence.

        KINSHIP_SATURATED: `aggregation` (mean, min or max) of the top-k kinship reaches
        `kinship_threshold` (0.9 by default; required for euclidean, where it is a distance
        ceiling). TOPK_UNCHANGED: the top-k equals `previous_top_k` (when given).
        GAIN_PLATEAU: the last `gain_window` merged members all gained < `gain_threshold` (0).
        NO_EXPECTED_GAIN (when `min_expected_gain` is given): no top-k pair left to merge (not in
        `merged_pairs`, not the parents of a member) is expected to gain `min_expected_gain`
        under the gain model fitted on the history, once it has `min_gain_history` points (0: 3).

        Raises:
            ValueError: a bad `aggregation`, `metric` or `mode` (the message lists the allowed
                values), or a checkpoint path that is not valid UTF-8.
            KinshipRpcError: the server answered with an error (see docs/errors.md).
        """
        protos, known = self._population(members, known_kinship)
        request = recommend_pb2.ShouldStopRequest(
            members=protos,
            top_k=top_k,
            previous_top_k=list(previous_top_k),
            aggregation=aggregation_value(aggregation),
            metric=metric_value(metric),
            gain_window=gain_window,
            mode=mode_value(mode),
            known_kinship=known,
            merged_pairs=[recommend_pb2.MemberPair(first=a, second=b) for a, b in merged_pairs],
            min_gain_history=min_gain_history,
        )
        if base is not None:
            request.base.CopyFrom(checkpoint_ref(base, "base"))
        if min_expected_gain is not None:
            request.min_expected_gain = min_expected_gain
        if gain_prior_strength is not None:
            request.gain_prior_strength = gain_prior_strength
        if kinship_threshold is not None:
            request.kinship_threshold = kinship_threshold
        if gain_threshold is not None:
            request.gain_threshold = gain_threshold
        response: recommend_pb2.ShouldStopResponse = self._call(self.stub.ShouldStop, request, timeout)
        return StopResult.from_proto(response)

    def register_checkpoint(self, checkpoint: CheckpointLike, base: CheckpointLike, *, timeout: float | None = None) -> Registration:
        """Compute and cache `checkpoint`'s fingerprint and lossless delta against `base` ahead of time.

        Later FINGERPRINT / AUTO kinship queries about it answer without reading weights.

        Raises:
            ValueError: a path that is not valid UTF-8.
            KinshipRpcError: the server answered with an error (see docs/errors.md).
        """
        request = kinship_pb2.RegisterCheckpointRequest(
            checkpoint=checkpoint_ref(checkpoint, "checkpoint"), base=checkpoint_ref(base, "base")
        )
        response: kinship_pb2.RegisterCheckpointResponse = self._call(self.stub.RegisterCheckpoint, request, timeout)
        return Registration(
            identity=response.identity,
            base_identity=response.base_identity,
            already_registered=response.already_registered,
            tensors=response.tensors,
            elements=response.elements,
            size_bytes=response.size_bytes,
            delta_sum=response.delta_sum,
            delta_sum_squares=response.delta_sum_squares,
            layer_norms={n.group: n.norm for n in response.layer_norms},
            fingerprint_bytes=response.fingerprint_bytes,
            delta_bytes=response.delta_bytes,
            seconds=response.seconds,
            raw=response,
        )
