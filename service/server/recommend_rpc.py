"""Proto translation for RankCandidates and ShouldStop: requests to `recommend` inputs, results to responses.

No logic and no I/O: `api.py` orchestrates (validate, gather kinship, decide) and calls
these to convert at the edges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kinship_client.v1 import common_pb2, recommend_pb2
from kinship_service.checkpoints.sources import CheckpointSpec
from kinship_service.errors import InvalidArgument
from kinship_service.guidance import recommend
from kinship_service.guidance.recommend import KinshipMatrix, Member, MemberGain, Ranking, StopDecision
from kinship_service.kinship.population import AUTO, EXACT, FINGERPRINT, NONE, MemberCheckpoint

_METRICS: dict[int, str] = {
    common_pb2.METRIC_UNSPECIFIED: recommend.PCC,
    common_pb2.METRIC_PCC: recommend.PCC,
    common_pb2.METRIC_COSINE: recommend.COSINE,
    common_pb2.METRIC_EUCLIDEAN: recommend.EUCLIDEAN,
}
_METRIC_ENUMS = {recommend.PCC: common_pb2.METRIC_PCC, recommend.COSINE: common_pb2.METRIC_COSINE, recommend.EUCLIDEAN: common_pb2.METRIC_EUCLIDEAN}
_MODES: dict[int, str] = {
    common_pb2.KINSHIP_MODE_UNSPECIFIED: AUTO,
    common_pb2.KINSHIP_MODE_AUTO: AUTO,
    common_pb2.KINSHIP_MODE_EXACT: EXACT,
    common_pb2.KINSHIP_MODE_FINGERPRINT: FINGERPRINT,
}
_MODE_ENUMS = {
    EXACT: common_pb2.KINSHIP_MODE_EXACT,
    FINGERPRINT: common_pb2.KINSHIP_MODE_FINGERPRINT,
    NONE: common_pb2.KINSHIP_MODE_UNSPECIFIED,
}
_AGGREGATIONS: dict[int, str] = {
    recommend_pb2.AGGREGATION_UNSPECIFIED: recommend.MEAN,
    recommend_pb2.AGGREGATION_MEAN: recommend.MEAN,
    recommend_pb2.AGGREGATION_MIN: recommend.MIN,
    recommend_pb2.AGGREGATION_MAX: recommend.MAX,
}
_KINDS = {recommend.GREEDY: recommend_pb2.RECOMMENDATION_KIND_GREEDY, recommend.EXPLORATION: recommend_pb2.RECOMMENDATION_KIND_EXPLORATION}
_REASONS = {
    recommend.KINSHIP_SATURATED: recommend_pb2.STOP_REASON_KINSHIP_SATURATED,
    recommend.TOPK_UNCHANGED: recommend_pb2.STOP_REASON_TOPK_UNCHANGED,
    recommend.GAIN_PLATEAU: recommend_pb2.STOP_REASON_GAIN_PLATEAU,
}


def metric_of(value: int) -> str:
    """The request's Metric enum as a `recommend` metric name (unspecified: PCC)."""
    if value not in _METRICS:
        raise InvalidArgument(f"unknown metric {value}; use PCC, COSINE or EUCLIDEAN", field="metric")
    return _METRICS[value]


def mode_of(value: int) -> str:
    """The request's KinshipMode as `auto`, `exact` or `fingerprint` (unspecified: auto)."""
    if value not in _MODES:
        raise InvalidArgument(f"unknown kinship mode {value}; use EXACT, FINGERPRINT or AUTO", field="mode")
    return _MODES[value]


def aggregation_of(value: int) -> str:
    """The request's Aggregation as `mean`, `min` or `max` (unspecified: mean)."""
    if value not in _AGGREGATIONS:
        raise InvalidArgument(f"unknown aggregation {value}; use MEAN, MIN or MAX", field="aggregation")
    return _AGGREGATIONS[value]


def _checkpoint_description(ref: common_pb2.CheckpointRef) -> str | None:
    which = ref.WhichOneof("source")
    if which == "path":
        return recommend.checkpoint_description("path", ref.path)
    if which == "hub":
        return recommend.checkpoint_description("hub", f"{ref.hub.repo_id}@{ref.hub.revision or 'main'}")
    return None


def members_of(messages: Sequence[recommend_pb2.PopulationMember]) -> list[Member]:
    """PopulationMember protos as `recommend.Member`s (unset optional fields become None)."""
    out = []
    for m in messages:
        has = m.HasField
        parents = m.parents
        out.append(
            Member(
                m.name,
                m.score if has("score") else None,
                m.generation if has("generation") else None,
                tuple(parents) if parents else (),
                _checkpoint_description(m.checkpoint) if has("checkpoint") else None,
            )
        )
    return out


def member_checkpoints(
    messages: Sequence[recommend_pb2.PopulationMember],
    names: Sequence[str],
    spec_of: Callable[[common_pb2.CheckpointRef, str], CheckpointSpec],
) -> list[MemberCheckpoint]:
    """The checkpoints of the members named in `names` (in that order), for `pairwise_kinship`."""
    index = {m.name: i for i, m in enumerate(messages)}
    out = []
    for name in names:
        i = index[name]
        message = messages[i]
        field = f"members[{i}].checkpoint"
        spec = spec_of(message.checkpoint, field) if message.HasField("checkpoint") else None
        out.append(MemberCheckpoint(name, spec, field))
    return out


def pairs_of(messages: Sequence[recommend_pb2.MemberPair]) -> list[tuple[str, str]]:
    """MemberPair protos as name tuples."""
    return [(p.first, p.second) for p in messages]


def known_of(messages: Sequence[recommend_pb2.KnownKinship]) -> list[tuple[str, str, float]]:
    """KnownKinship protos as (first, second, value) tuples."""
    out = []
    for k in messages:
        pair = k.pair  # each access of a sub-message builds a wrapper: once per item, not twice
        out.append((pair.first, pair.second, k.value))
    return out


def matrix_proto(matrix: KinshipMatrix) -> recommend_pb2.KinshipMatrix:
    """A KinshipMatrix proto."""
    return recommend_pb2.KinshipMatrix(names=list(matrix.names), values=matrix.flat(), metric=_METRIC_ENUMS[matrix.metric])


def _gain_proto(gain: MemberGain) -> recommend_pb2.MemberGain:
    message = recommend_pb2.MemberGain(name=gain.name, gain=gain.gain)
    if gain.generation is not None:
        message.generation = gain.generation
    return message


def rank_response(ranking: Ranking, mode_used: str) -> recommend_pb2.RankCandidatesResponse:
    """The RankCandidatesResponse of a ranking."""
    return recommend_pb2.RankCandidatesResponse(
        recommendations=[
            recommend_pb2.Recommendation(
                pair=recommend_pb2.MemberPair(first=r.first, second=r.second),
                kind=_KINDS[r.kind],
                kinship=r.kinship,
                mean_score=r.mean_score,
                reason=r.reason,
            )
            for r in ranking.recommendations
        ],
        top_k=ranking.top_k,
        matrix=matrix_proto(ranking.matrix),
        gains=[_gain_proto(g) for g in ranking.gains],
        mode_used=_MODE_ENUMS[mode_used],
    )


def stop_response(decision: StopDecision, mode_used: str) -> recommend_pb2.ShouldStopResponse:
    """The ShouldStopResponse of a decision."""
    return recommend_pb2.ShouldStopResponse(
        stop=decision.stop,
        reasons=[_REASONS[r] for r in decision.reasons],
        top_k=decision.top_k,
        aggregated_kinship=decision.aggregated_kinship,
        kinship_threshold=decision.kinship_threshold,
        matrix=matrix_proto(decision.matrix),
        recent_gains=[_gain_proto(g) for g in decision.recent_gains],
        summary=decision.summary,
        mode_used=_MODE_ENUMS[mode_used],
    )

