from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecommendationKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECOMMENDATION_KIND_UNSPECIFIED: _ClassVar[RecommendationKind]
    RECOMMENDATION_KIND_GREEDY: _ClassVar[RecommendationKind]
    RECOMMENDATION_KIND_EXPLORATION: _ClassVar[RecommendationKind]

class GreedyOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GREEDY_ORDER_UNSPECIFIED: _ClassVar[GreedyOrder]
    GREEDY_ORDER_MEAN_SCORE: _ClassVar[GreedyOrder]
    GREEDY_ORDER_EXPECTED_SCORE: _ClassVar[GreedyOrder]
    GREEDY_ORDER_TASK_CEILING: _ClassVar[GreedyOrder]

class ExplorationRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPLORATION_RULE_UNSPECIFIED: _ClassVar[ExplorationRule]
    EXPLORATION_RULE_LATEST_GENERATION: _ClassVar[ExplorationRule]
    EXPLORATION_RULE_OUTSIDE_LINEAGE: _ClassVar[ExplorationRule]
    EXPLORATION_RULE_COMPLEMENTARY: _ClassVar[ExplorationRule]
    EXPLORATION_RULE_NONE: _ClassVar[ExplorationRule]

class SlerpFactor(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLERP_FACTOR_UNSPECIFIED: _ClassVar[SlerpFactor]
    SLERP_FACTOR_EVEN: _ClassVar[SlerpFactor]
    SLERP_FACTOR_SCORE_WEIGHTED: _ClassVar[SlerpFactor]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_KINSHIP_SATURATED: _ClassVar[StopReason]
    STOP_REASON_TOPK_UNCHANGED: _ClassVar[StopReason]
    STOP_REASON_GAIN_PLATEAU: _ClassVar[StopReason]
    STOP_REASON_NO_EXPECTED_GAIN: _ClassVar[StopReason]

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_UNSPECIFIED: _ClassVar[Aggregation]
    AGGREGATION_MEAN: _ClassVar[Aggregation]
    AGGREGATION_MIN: _ClassVar[Aggregation]
    AGGREGATION_MAX: _ClassVar[Aggregation]
RECOMMENDATION_KIND_UNSPECIFIED: RecommendationKind
RECOMMENDATION_KIND_GREEDY: RecommendationKind
RECOMMENDATION_KIND_EXPLORATION: RecommendationKind
GREEDY_ORDER_UNSPECIFIED: GreedyOrder
GREEDY_ORDER_MEAN_SCORE: GreedyOrder
GREEDY_ORDER_EXPECTED_SCORE: GreedyOrder
GREEDY_ORDER_TASK_CEILING: GreedyOrder
EXPLORATION_RULE_UNSPECIFIED: ExplorationRule
EXPLORATION_RULE_LATEST_GENERATION: ExplorationRule
EXPLORATION_RULE_OUTSIDE_LINEAGE: ExplorationRule
EXPLORATION_RULE_COMPLEMENTARY: ExplorationRule
EXPLORATION_RULE_NONE: ExplorationRule
SLERP_FACTOR_UNSPECIFIED: SlerpFactor
SLERP_FACTOR_EVEN: SlerpFactor
SLERP_FACTOR_SCORE_WEIGHTED: SlerpFactor
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_KINSHIP_SATURATED: StopReason
STOP_REASON_TOPK_UNCHANGED: StopReason
STOP_REASON_GAIN_PLATEAU: StopReason
STOP_REASON_NO_EXPECTED_GAIN: StopReason
AGGREGATION_UNSPECIFIED: Aggregation
AGGREGATION_MEAN: Aggregation
AGGREGATION_MIN: Aggregation
AGGREGATION_MAX: Aggregation

class PopulationMember(_message.Message):
    __slots__ = ("name", "checkpoint", "score", "generation", "parents", "task_scores")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    TASK_SCORES_FIELD_NUMBER: _ClassVar[int]
    name: str
    checkpoint: _common_pb2.CheckpointRef
    score: float
    generation: int
    parents: _containers.RepeatedScalarFieldContainer[str]
    task_scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., checkpoint: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., score: _Optional[float] = ..., generation: _Optional[int] = ..., parents: _Optional[_Iterable[str]] = ..., task_scores: _Optional[_Iterable[float]] = ...) -> None: ...

class MemberPair(_message.Message):
    __slots__ = ("first", "second")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    SECOND_FIELD_NUMBER: _ClassVar[int]
    first: str
    second: str
    def __init__(self, first: _Optional[str] = ..., second: _Optional[str] = ...) -> None: ...

class KnownKinship(_message.Message):
    __slots__ = ("pair", "value")
    PAIR_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    pair: MemberPair
    value: float
    def __init__(self, pair: _Optional[_Union[MemberPair, _Mapping]] = ..., value: _Optional[float] = ...) -> None: ...

class KinshipMatrix(_message.Message):
    __slots__ = ("names", "values", "metric")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    values: _containers.RepeatedScalarFieldContainer[float]
    metric: _common_pb2.Metric
    def __init__(self, names: _Optional[_Iterable[str]] = ..., values: _Optional[_Iterable[float]] = ..., metric: _Optional[_Union[_common_pb2.Metric, str]] = ...) -> None: ...

class MemberGain(_message.Message):
    __slots__ = ("name", "gain", "generation")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GAIN_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    gain: float
    generation: int
    def __init__(self, name: _Optional[str] = ..., gain: _Optional[float] = ..., generation: _Optional[int] = ...) -> None: ...

class GainModel(_message.Message):
    __slots__ = ("history", "skipped", "intercept", "kinship_slope", "score_gap_slope", "kinship_center", "score_gap_center", "prior_strength")
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    INTERCEPT_FIELD_NUMBER: _ClassVar[int]
    KINSHIP_SLOPE_FIELD_NUMBER: _ClassVar[int]
    SCORE_GAP_SLOPE_FIELD_NUMBER: _ClassVar[int]
    KINSHIP_CENTER_FIELD_NUMBER: _ClassVar[int]
    SCORE_GAP_CENTER_FIELD_NUMBER: _ClassVar[int]
    PRIOR_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    history: int
    skipped: int
    intercept: float
    kinship_slope: float
    score_gap_slope: float
    kinship_center: float
    score_gap_center: float
    prior_strength: float
    def __init__(self, history: _Optional[int] = ..., skipped: _Optional[int] = ..., intercept: _Optional[float] = ..., kinship_slope: _Optional[float] = ..., score_gap_slope: _Optional[float] = ..., kinship_center: _Optional[float] = ..., score_gap_center: _Optional[float] = ..., prior_strength: _Optional[float] = ...) -> None: ...

class Recommendation(_message.Message):
    __slots__ = ("pair", "kind", "kinship", "mean_score", "reason", "expected_gain", "expected_score", "complementarity", "task_ceiling", "suggested_t")
    PAIR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KINSHIP_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_GAIN_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    COMPLEMENTARITY_FIELD_NUMBER: _ClassVar[int]
    TASK_CEILING_FIELD_NUMBER: _ClassVar[int]
    SUGGESTED_T_FIELD_NUMBER: _ClassVar[int]
    pair: MemberPair
    kind: RecommendationKind
    kinship: float
    mean_score: float
    reason: str
    expected_gain: float
    expected_score: float
    complementarity: float
    task_ceiling: float
    suggested_t: float
    def __init__(self, pair: _Optional[_Union[MemberPair, _Mapping]] = ..., kind: _Optional[_Union[RecommendationKind, str]] = ..., kinship: _Optional[float] = ..., mean_score: _Optional[float] = ..., reason: _Optional[str] = ..., expected_gain: _Optional[float] = ..., expected_score: _Optional[float] = ..., complementarity: _Optional[float] = ..., task_ceiling: _Optional[float] = ..., suggested_t: _Optional[float] = ...) -> None: ...

class RankCandidatesRequest(_message.Message):
    __slots__ = ("base", "members", "merged_pairs", "top_k", "metric", "mode", "known_kinship", "greedy_order", "max_greedy", "greedy_fraction", "exploration", "exploration_pool", "estimate_gain", "gain_prior_strength", "slerp_factor")
    BASE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MERGED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    KNOWN_KINSHIP_FIELD_NUMBER: _ClassVar[int]
    GREEDY_ORDER_FIELD_NUMBER: _ClassVar[int]
    MAX_GREEDY_FIELD_NUMBER: _ClassVar[int]
    GREEDY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_POOL_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_GAIN_FIELD_NUMBER: _ClassVar[int]
    GAIN_PRIOR_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    SLERP_FACTOR_FIELD_NUMBER: _ClassVar[int]
    base: _common_pb2.CheckpointRef
    members: _containers.RepeatedCompositeFieldContainer[PopulationMember]
    merged_pairs: _containers.RepeatedCompositeFieldContainer[MemberPair]
    top_k: int
    metric: _common_pb2.Metric
    mode: _common_pb2.KinshipMode
    known_kinship: _containers.RepeatedCompositeFieldContainer[KnownKinship]
    greedy_order: GreedyOrder
    max_greedy: int
    greedy_fraction: float
    exploration: ExplorationRule
    exploration_pool: int
    estimate_gain: bool
    gain_prior_strength: float
    slerp_factor: SlerpFactor
    def __init__(self, base: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., members: _Optional[_Iterable[_Union[PopulationMember, _Mapping]]] = ..., merged_pairs: _Optional[_Iterable[_Union[MemberPair, _Mapping]]] = ..., top_k: _Optional[int] = ..., metric: _Optional[_Union[_common_pb2.Metric, str]] = ..., mode: _Optional[_Union[_common_pb2.KinshipMode, str]] = ..., known_kinship: _Optional[_Iterable[_Union[KnownKinship, _Mapping]]] = ..., greedy_order: _Optional[_Union[GreedyOrder, str]] = ..., max_greedy: _Optional[int] = ..., greedy_fraction: _Optional[float] = ..., exploration: _Optional[_Union[ExplorationRule, str]] = ..., exploration_pool: _Optional[int] = ..., estimate_gain: _Optional[bool] = ..., gain_prior_strength: _Optional[float] = ..., slerp_factor: _Optional[_Union[SlerpFactor, str]] = ...) -> None: ...

class RankCandidatesResponse(_message.Message):
    __slots__ = ("recommendations", "top_k", "matrix", "gains", "mode_used", "gain_model")
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    GAINS_FIELD_NUMBER: _ClassVar[int]
    MODE_USED_FIELD_NUMBER: _ClassVar[int]
    GAIN_MODEL_FIELD_NUMBER: _ClassVar[int]
    recommendations: _containers.RepeatedCompositeFieldContainer[Recommendation]
    top_k: _containers.RepeatedScalarFieldContainer[str]
    matrix: KinshipMatrix
    gains: _containers.RepeatedCompositeFieldContainer[MemberGain]
    mode_used: _common_pb2.KinshipMode
    gain_model: GainModel
    def __init__(self, recommendations: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ..., top_k: _Optional[_Iterable[str]] = ..., matrix: _Optional[_Union[KinshipMatrix, _Mapping]] = ..., gains: _Optional[_Iterable[_Union[MemberGain, _Mapping]]] = ..., mode_used: _Optional[_Union[_common_pb2.KinshipMode, str]] = ..., gain_model: _Optional[_Union[GainModel, _Mapping]] = ...) -> None: ...

class ShouldStopRequest(_message.Message):
    __slots__ = ("base", "members", "top_k", "previous_top_k", "kinship_threshold", "aggregation", "metric", "gain_window", "gain_threshold", "mode", "known_kinship", "merged_pairs", "min_expected_gain", "min_gain_history", "gain_prior_strength")
    BASE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_TOP_K_FIELD_NUMBER: _ClassVar[int]
    KINSHIP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    GAIN_WINDOW_FIELD_NUMBER: _ClassVar[int]
    GAIN_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    KNOWN_KINSHIP_FIELD_NUMBER: _ClassVar[int]
    MERGED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    MIN_EXPECTED_GAIN_FIELD_NUMBER: _ClassVar[int]
    MIN_GAIN_HISTORY_FIELD_NUMBER: _ClassVar[int]
    GAIN_PRIOR_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    base: _common_pb2.CheckpointRef
    members: _containers.RepeatedCompositeFieldContainer[PopulationMember]
    top_k: int
    previous_top_k: _containers.RepeatedScalarFieldContainer[str]
    kinship_threshold: float
    aggregation: Aggregation
    metric: _common_pb2.Metric
    gain_window: int
    gain_threshold: float
    mode: _common_pb2.KinshipMode
    known_kinship: _containers.RepeatedCompositeFieldContainer[KnownKinship]
    merged_pairs: _containers.RepeatedCompositeFieldContainer[MemberPair]
    min_expected_gain: float
    min_gain_history: int
    gain_prior_strength: float
    def __init__(self, base: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., members: _Optional[_Iterable[_Union[PopulationMember, _Mapping]]] = ..., top_k: _Optional[int] = ..., previous_top_k: _Optional[_Iterable[str]] = ..., kinship_threshold: _Optional[float] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ..., metric: _Optional[_Union[_common_pb2.Metric, str]] = ..., gain_window: _Optional[int] = ..., gain_threshold: _Optional[float] = ..., mode: _Optional[_Union[_common_pb2.KinshipMode, str]] = ..., known_kinship: _Optional[_Iterable[_Union[KnownKinship, _Mapping]]] = ..., merged_pairs: _Optional[_Iterable[_Union[MemberPair, _Mapping]]] = ..., min_expected_gain: _Optional[float] = ..., min_gain_history: _Optional[int] = ..., gain_prior_strength: _Optional[float] = ...) -> None: ...

class ShouldStopResponse(_message.Message):
    __slots__ = ("stop", "reasons", "top_k", "aggregated_kinship", "kinship_threshold", "matrix", "recent_gains", "summary", "mode_used", "gain_model", "best_expected_gain", "best_candidate")
    STOP_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    AGGREGATED_KINSHIP_FIELD_NUMBER: _ClassVar[int]
    KINSHIP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    RECENT_GAINS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    MODE_USED_FIELD_NUMBER: _ClassVar[int]
    GAIN_MODEL_FIELD_NUMBER: _ClassVar[int]
    BEST_EXPECTED_GAIN_FIELD_NUMBER: _ClassVar[int]
    BEST_CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    stop: bool
    reasons: _containers.RepeatedScalarFieldContainer[StopReason]
    top_k: _containers.RepeatedScalarFieldContainer[str]
    aggregated_kinship: float
    kinship_threshold: float
    matrix: KinshipMatrix
    recent_gains: _containers.RepeatedCompositeFieldContainer[MemberGain]
    summary: str
    mode_used: _common_pb2.KinshipMode
    gain_model: GainModel
    best_expected_gain: float
    best_candidate: MemberPair
    def __init__(self, stop: _Optional[bool] = ..., reasons: _Optional[_Iterable[_Union[StopReason, str]]] = ..., top_k: _Optional[_Iterable[str]] = ..., aggregated_kinship: _Optional[float] = ..., kinship_threshold: _Optional[float] = ..., matrix: _Optional[_Union[KinshipMatrix, _Mapping]] = ..., recent_gains: _Optional[_Iterable[_Union[MemberGain, _Mapping]]] = ..., summary: _Optional[str] = ..., mode_used: _Optional[_Union[_common_pb2.KinshipMode, str]] = ..., gain_model: _Optional[_Union[GainModel, _Mapping]] = ..., best_expected_gain: _Optional[float] = ..., best_candidate: _Optional[_Union[MemberPair, _Mapping]] = ...) -> None: ...
