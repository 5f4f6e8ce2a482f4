"""Proto translation for RankCandidates and ShouldStop: requests to validated queries, results to responses.

No I/O: the servicer (heavy path) and the front's cache-only answers (`light.py`) both
turn a request into a `RankQuery` / `StopQuery` (validated by `recommend`, in one
order, so both layouts give the same statuses), gather the kinship its
`PopulationQuery` asks for, and answer with the query's `response`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kinship_client.v1 import common_pb2, recommend_pb2
from kinship_service.checkpoints.sources import CheckpointSpec
from kinship_service.errors import InvalidArgument
from kinship_service.guidance import advice, population, rank, stop
from kinship_service.guidance.advice import RankOptions
from kinship_service.guidance.gain_model import GainModel
from kinship_service.guidance.population import KinshipMatrix, Member, MemberGain, Pair
from kinship_service.guidance.rank import Ranking
from kinship_service.guidance.stop import StopDecision
from kinship_service.kinship.modes import AUTO, EXACT, FINGERPRINT, NONE, KinshipMode, ModeUsed
from kinship_service.kinship.population import MemberCheckpoint
from kinship_service.server.refs import spec_from_ref

_METRICS: dict[int, str] = {
    common_pb2.METRIC_UNSPECIFIED: population.PCC,
    common_pb2.METRIC_PCC: population.PCC,
    common_pb2.METRIC_COSINE: population.COSINE,
    common_pb2.METRIC_EUCLIDEAN: population.EUCLIDEAN,
}
_METRIC_ENUMS = {population.PCC: common_pb2.METRIC_PCC, population.COSINE: common_pb2.METRIC_COSINE, population.EUCLIDEAN: common_pb2.METRIC_EUCLIDEAN}
_MODES: dict[int, KinshipMode] = {
    common_pb2.KINSHIP_MODE_UNSPECIFIED: AUTO,
    common_pb2.KINSHIP_MODE_AUTO: AUTO,
    common_pb2.KINSHIP_MODE_EXACT: EXACT,
    common_pb2.KINSHIP_MODE_FINGERPRINT: FINGERPRINT,
}
_MODE_ENUMS: dict[ModeUsed, common_pb2.KinshipMode] = {
    EXACT: common_pb2.KINSHIP_MODE_EXACT,
    FINGERPRINT: common_pb2.KINSHIP_MODE_FINGERPRINT,
    NONE: common_pb2.KINSHIP_MODE_UNSPECIFIED,
}
_AGGREGATIONS: dict[int, str] = {
    recommend_pb2.AGGREGATION_UNSPECIFIED: stop.MEAN,
    recommend_pb2.AGGREGATION_MEAN: stop.MEAN,
    recommend_pb2.AGGREGATION_MIN: stop.MIN,
    recommend_pb2.AGGREGATION_MAX: stop.MAX,
}
_GREEDY_ORDERS: dict[int, advice.GreedyOrder] = {
    recommend_pb2.GREEDY_ORDER_UNSPECIFIED: "mean_score",
    recommend_pb2.GREEDY_ORDER_MEAN_SCORE: "mean_score",
    recommend_pb2.GREEDY_ORDER_EXPECTED_SCORE: "expected_score",
    recommend_pb2.GREEDY_ORDER_TASK_CEILING: "task_ceiling",
}
_EXPLORATION_RULES: dict[int, advice.ExplorationRule] = {
    recommend_pb2.EXPLORATION_RULE_UNSPECIFIED: "latest_generation",
    recommend_pb2.EXPLORATION_RULE_LATEST_GENERATION: "latest_generation",
    recommend_pb2.EXPLORATION_RULE_OUTSIDE_LINEAGE: "outside_lineage",
    recommend_pb2.EXPLORATION_RULE_COMPLEMENTARY: "complementary",
    recommend_pb2.EXPLORATION_RULE_NONE: "none",
}
_SLERP_FACTORS: dict[int, advice.SlerpFactor] = {
    recommend_pb2.SLERP_FACTOR_UNSPECIFIED: "none",
    recommend_pb2.SLERP_FACTOR_EVEN: "even",
    recommend_pb2.SLERP_FACTOR_SCORE_WEIGHTED: "score_weighted",
}
_KINDS = {rank.GREEDY: recommend_pb2.RECOMMENDATION_KIND_GREEDY, rank.EXPLORATION: recommend_pb2.RECOMMENDATION_KIND_EXPLORATION}
_REASONS = {
    stop.KINSHIP_SATURATED: recommend_pb2.STOP_REASON_KINSHIP_SATURATED,
    stop.TOPK_UNCHANGED: recommend_pb2.STOP_REASON_TOPK_UNCHANGED,
    stop.GAIN_PLATEAU: recommend_pb2.STOP_REASON_GAIN_PLATEAU,
    stop.NO_EXPECTED_GAIN: recommend_pb2.STOP_REASON_NO_EXPECTED_GAIN,
}


def metric_of(value: int) -> str:
    """The request's Metric enum as a `recommend` metric name (unspecified: PCC)."""
    if value not in _METRICS:
        raise InvalidArgument(f"unknown metric {value}; use PCC, COSINE or EUCLIDEAN", field="metric")
    return _METRICS[value]


def mode_of(value: int) -> KinshipMode:
    """The request's KinshipMode as `auto`, `exact` or `fingerprint` (unspecified: auto)."""
    if value not in _MODES:
        raise InvalidArgument(f"unknown kinship mode {value}; use EXACT, FINGERPRINT or AUTO", field="mode")
    return _MODES[value]


def aggregation_of(value: int) -> str:
    """The request's Aggregation as `mean`, `min` or `max` (unspecified: mean)."""
    if value not in _AGGREGATIONS:
        raise InvalidArgument(f"unknown aggregation {value}; use MEAN, MIN or MAX", field="aggregation")
    return _AGGREGATIONS[value]


_Name = TypeVar("_Name", bound=str)


def _enum_of(table: Mapping[int, _Name], value: int, field: str, allowed: str) -> _Name:
    """The option name of enum `value`; InvalidArgument naming `field` for a value outside the enum."""
    if value not in table:
        raise InvalidArgument(f"unknown {field} {value}; use {allowed} (or leave it unset for the default)", field=field)
    return table[value]


def rank_options_of(request: recommend_pb2.RankCandidatesRequest) -> RankOptions:
    """The request's advice options (unknown enum values: InvalidArgument naming the field)."""
    greedy_order = _enum_of(_GREEDY_ORDERS, request.greedy_order, "greedy_order", "MEAN_SCORE, EXPECTED_SCORE or TASK_CEILING")
    exploration = _enum_of(
        _EXPLORATION_RULES, request.exploration, "exploration", "LATEST_GENERATION, OUTSIDE_LINEAGE, COMPLEMENTARY or NONE"
    )
    slerp_factor = _enum_of(_SLERP_FACTORS, request.slerp_factor, "slerp_factor", "EVEN or SCORE_WEIGHTED")
    return RankOptions(
        greedy_order=greedy_order,
        max_greedy=request.max_greedy,
        greedy_fraction=request.greedy_fraction if request.HasField("greedy_fraction") else None,
        exploration=exploration,
        exploration_pool=request.exploration_pool,
        estimate_gain=request.estimate_gain,
        gain_prior_strength=request.gain_prior_strength if request.HasField("gain_prior_strength") else None,
        slerp_factor=slerp_factor,
    )


def _checkpoint_description(ref: common_pb2.CheckpointRef) -> str | None:
    which = ref.WhichOneof("source")
    description: str | None = None
    if which == "path":
        description = population.checkpoint_description("path", ref.path)
    elif which == "hub":
        description = population.checkpoint_description("hub", f"{ref.hub.repo_id}@{ref.hub.revision or 'main'}")
    return description


def members_of(messages: Sequence[recommend_pb2.PopulationMember]) -> list[Member]:
    """PopulationMember protos as `population.Member`s (unset optional fields become None)."""
    out = []
    for m in messages:
        has = m.HasField
        parents = m.parents
        tasks = m.task_scores
        out.append(
            Member(
                m.name,
                m.score if has("score") else None,
                m.generation if has("generation") else None,
                tuple(parents) if parents else (),
                _checkpoint_description(m.checkpoint) if has("checkpoint") else None,
                tuple(tasks) if tasks else (),
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


def gain_model_proto(model: GainModel) -> recommend_pb2.GainModel:
    """A GainModel proto."""
    return recommend_pb2.GainModel(
        history=model.history,
        skipped=model.skipped,
        intercept=model.intercept,
        kinship_slope=model.kinship_slope,
        score_gap_slope=model.score_gap_slope,
        kinship_center=model.kinship_center,
        score_gap_center=model.score_gap_center,
        prior_strength=model.prior_strength,
    )


def _recommendation_proto(r: rank.Recommendation) -> recommend_pb2.Recommendation:
    message = recommend_pb2.Recommendation(
        pair=recommend_pb2.MemberPair(first=r.first, second=r.second),
        kind=_KINDS[r.kind],
        kinship=r.kinship,
        mean_score=r.mean_score,
        reason=r.reason,
    )
    for name in ("expected_gain", "expected_score", "complementarity", "task_ceiling", "suggested_t"):
        value = getattr(r, name)
        if value is not None:
            setattr(message, name, value)
    return message


def rank_response(ranking: Ranking, mode_used: ModeUsed) -> recommend_pb2.RankCandidatesResponse:
    """The RankCandidatesResponse of a ranking."""
    response = recommend_pb2.RankCandidatesResponse(
        recommendations=[_recommendation_proto(r) for r in ranking.recommendations],
        top_k=ranking.top_k,
        matrix=matrix_proto(ranking.matrix),
        gains=[_gain_proto(g) for g in ranking.gains],
        mode_used=_MODE_ENUMS[mode_used],
    )
    if ranking.gain_model is not None:
        response.gain_model.CopyFrom(gain_model_proto(ranking.gain_model))
    return response


def stop_response(decision: StopDecision, mode_used: ModeUsed) -> recommend_pb2.ShouldStopResponse:
    """The ShouldStopResponse of a decision."""
    response = recommend_pb2.ShouldStopResponse(
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
    if decision.gain_model is not None:
        response.gain_model.CopyFrom(gain_model_proto(decision.gain_model))
    if decision.best_expected_gain is not None:
        response.best_expected_gain = decision.best_expected_gain
    if decision.best_candidate is not None:
        first, second = decision.best_candidate
        response.best_candidate.CopyFrom(recommend_pb2.MemberPair(first=first, second=second))
    return response



# -- validated requests -------------------------------------------------------------------------
@dataclass(frozen=True)
class PopulationQuery:
    """The kinship a validated RankCandidates / ShouldStop request needs: every pair of its top-k members.

    With an exploration pool larger than the top-k (RankCandidates' `exploration_pool`), also
    the pairs of the best model with the pool's other members (`pairs`).
    """

    base: CheckpointSpec | None
    members: tuple[MemberCheckpoint, ...]
    """The top-k members, best first, then the pool's members beyond the top-k."""
    metric: str
    mode: KinshipMode
    known: dict[Pair, float]
    pairs: tuple[Pair, ...] | None = None
    """The pairs needed; None means every pair of `members`."""

    def needed_pairs(self) -> list[Pair]:
        """The pairs whose kinship the answer needs."""
        if self.pairs is not None:
            return list(self.pairs)
        return [population.pair_key(a.name, b.name) for a, b in itertools.combinations(self.members, 2)]

    @property
    def all_known(self) -> bool:
        """Whether the caller gave every needed value (nothing to compute)."""
        return all(pair in self.known for pair in self.needed_pairs())

    def key(self) -> tuple[object, ...]:
        """Equal for identical computations (admission coalesces them)."""
        return ("population", self.base, self.members, self.metric, self.mode, tuple(sorted(self.known.items())), self.pairs)


def _population_query(
    request: recommend_pb2.RankCandidatesRequest | recommend_pb2.ShouldStopRequest,
    top: Sequence[str],
    metric: str,
    known: dict[Pair, float],
    extra: Sequence[str] = (),
) -> PopulationQuery:
    """The kinship query of every pair of `top`, plus the best model with each of `extra`."""
    base = spec_from_ref(request.base, "base") if request.HasField("base") else None
    members = member_checkpoints(request.members, [*top, *extra], spec_from_ref)
    pairs = None
    if extra:
        pairs = tuple(population.top_k_pairs(top)) + tuple(population.pair_key(top[0], name) for name in extra)
    return PopulationQuery(base, tuple(members), metric, mode_of(request.mode), known, pairs)


@dataclass(frozen=True)
class RankQuery:
    """A validated RankCandidatesRequest."""

    kinship: PopulationQuery
    members: list[Member]
    top_k: int
    merged: set[Pair]
    options: RankOptions = RankOptions()

    def response(self, values: dict[Pair, float], mode_used: ModeUsed) -> recommend_pb2.RankCandidatesResponse:
        """The response, given the kinship of every top-k (and exploration pool) pair."""
        ranking = rank.rank_candidates(
            self.members,
            self.top_k,
            population.lookup(values),
            metric=self.kinship.metric,
            merged_pairs=self.merged,
            options=self.options,
            history_kinship={**self.kinship.known, **values},
        )
        return rank_response(ranking, mode_used)


def rank_query(request: recommend_pb2.RankCandidatesRequest) -> RankQuery:
    """Validate a RankCandidatesRequest (InvalidArgument naming the field at fault)."""
    metric = metric_of(request.metric)
    mode_of(request.mode)
    options = rank_options_of(request)
    members = members_of(request.members)
    names = [m.name for m in population.validate_population(members, request.top_k).values()]
    merged = population.validate_pairs(pairs_of(request.merged_pairs), names, field="merged_pairs")
    known = population.validate_known(known_of(request.known_kinship), names, metric)
    options.validate(members, request.top_k)
    top = population.select_top_k(members, request.top_k)
    pool = options.pool_size(request.top_k) if options.exploration != "none" else request.top_k
    extra = population.select_top_k(members, pool)[request.top_k :]
    return RankQuery(_population_query(request, top, metric, known, extra), members, request.top_k, merged, options)


@dataclass(frozen=True)
class StopQuery:
    """A validated ShouldStopRequest."""

    kinship: PopulationQuery
    members: list[Member]
    top_k: int
    previous_top_k: list[str]
    kinship_threshold: float | None
    aggregation: str
    gain_window: int
    gain_threshold: float | None
    merged: set[Pair]
    min_expected_gain: float | None
    min_gain_history: int
    gain_prior_strength: float | None

    def response(self, values: dict[Pair, float], mode_used: ModeUsed) -> recommend_pb2.ShouldStopResponse:
        """The response, given the kinship of every top-k pair."""
        decision = stop.should_stop(
            self.members,
            self.top_k,
            population.lookup(values),
            metric=self.kinship.metric,
            previous_top_k=self.previous_top_k,
            kinship_threshold=self.kinship_threshold,
            aggregation=self.aggregation,
            gain_window=self.gain_window,
            gain_threshold=self.gain_threshold,
            merged_pairs=self.merged,
            min_expected_gain=self.min_expected_gain,
            min_gain_history=self.min_gain_history,
            gain_prior_strength=self.gain_prior_strength,
            history_kinship={**self.kinship.known, **values},
        )
        return stop_response(decision, mode_used)


def stop_query(request: recommend_pb2.ShouldStopRequest) -> StopQuery:
    """Validate a ShouldStopRequest, options included (cheap errors before any weights are read)."""
    metric = metric_of(request.metric)
    mode_of(request.mode)
    aggregation = aggregation_of(request.aggregation)
    members = members_of(request.members)
    names = [m.name for m in population.validate_population(members, request.top_k).values()]
    known = population.validate_known(known_of(request.known_kinship), names, metric)
    previous = list(request.previous_top_k)
    threshold = request.kinship_threshold if request.HasField("kinship_threshold") else None
    gain_threshold = request.gain_threshold if request.HasField("gain_threshold") else None
    min_expected_gain = request.min_expected_gain if request.HasField("min_expected_gain") else None
    prior = request.gain_prior_strength if request.HasField("gain_prior_strength") else None
    stop.validate_stop_options(
        members,
        metric=metric,
        previous_top_k=previous,
        kinship_threshold=threshold,
        aggregation=aggregation,
        gain_window=request.gain_window,
        gain_threshold=gain_threshold,
        min_expected_gain=min_expected_gain,
        min_gain_history=request.min_gain_history,
        gain_prior_strength=prior,
    )
    merged = population.validate_pairs(pairs_of(request.merged_pairs), names, field="merged_pairs")
    top = population.select_top_k(members, request.top_k)
    return StopQuery(
        _population_query(request, top, metric, known),
        members,
        request.top_k,
        previous,
        threshold,
        aggregation,
        request.gain_window,
        gain_threshold,
        merged,
        min_expected_gain,
        request.min_gain_history,
        prior,
    )
