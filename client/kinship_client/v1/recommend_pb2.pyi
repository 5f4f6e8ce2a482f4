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

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_KINSHIP_SATURATED: _ClassVar[StopReason]
    STOP_REASON_TOPK_UNCHANGED: _ClassVar[StopReason]
    STOP_REASON_GAIN_PLATEAU: _ClassVar[StopReason]

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_UNSPECIFIED: _ClassVar[Aggregation]
    AGGREGATION_MEAN: _ClassVar[Aggregation]
    AGGREGATION_MIN: _ClassVar[Aggregation]
    AGGREGATION_MAX: _ClassVar[Aggregation]
RECOMMENDATION_KIND_UNSPECIFIED: RecommendationKind
RECOMMENDATION_KIND_GREEDY: RecommendationKind
RECOMMENDATION_KIND_EXPLORATION: RecommendationKind
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_KINSHIP_SATURATED: StopReason
STOP_REASON_TOPK_UNCHANGED: StopReason
STOP_REASON_GAIN_PLATEAU: StopReason
AGGREGATION_UNSPECIFIED: Aggregation
AGGREGATION_MEAN: Aggregation
AGGREGATION_MIN: Aggregation
AGGREGATION_MAX: Aggregation

class PopulationMember(_message.Message):
    __slots__ = ("name", "checkpoint", "score", "generation", "parents")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    checkpoint: _common_pb2.CheckpointRef
    score: float
    generation: int
    parents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., checkpoint: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., score: _Optional[float] = ..., generation: _Optional[int] = ..., parents: _Optional[_Iterable[str]] = ...) -> None: ...

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

class Recommendation(_message.Message):
    __slots__ = ("pair", "kind", "kinship", "mean_score", "reason", "method_advice")
    PAIR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KINSHIP_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    METHOD_ADVICE_FIELD_NUMBER: _ClassVar[int]
    pair: MemberPair
    kind: RecommendationKind
    kinship: float
    mean_score: float
    reason: str
    method_advice: MethodAdvice
    def __init__(self, pair: _Optional[_Union[MemberPair, _Mapping]] = ..., kind: _Optional[_Union[RecommendationKind, str]] = ..., kinship: _Optional[float] = ..., mean_score: _Optional[float] = ..., reason: _Optional[str] = ..., method_advice: _Optional[_Union[MethodAdvice, _Mapping]] = ...) -> None: ...

class MethodAdvice(_message.Message):
    __slots__ = ("method", "parameters", "reason", "sign_conflict")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIGN_CONFLICT_FIELD_NUMBER: _ClassVar[int]
    method: str
    parameters: _containers.ScalarMap[str, float]
    reason: str
    sign_conflict: float
    def __init__(self, method: _Optional[str] = ..., parameters: _Optional[_Mapping[str, float]] = ..., reason: _Optional[str] = ..., sign_conflict: _Optional[float] = ...) -> None: ...

class RankCandidatesRequest(_message.Message):
    __slots__ = ("base", "members", "merged_pairs", "top_k", "metric", "mode", "known_kinship", "suggest_method", "linear_kinship_threshold", "ties_sign_conflict_threshold", "ties_density", "slerp_t")
    BASE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MERGED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    KNOWN_KINSHIP_FIELD_NUMBER: _ClassVar[int]
    SUGGEST_METHOD_FIELD_NUMBER: _ClassVar[int]
    LINEAR_KINSHIP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TIES_SIGN_CONFLICT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TIES_DENSITY_FIELD_NUMBER: _ClassVar[int]
    SLERP_T_FIELD_NUMBER: _ClassVar[int]
    base: _common_pb2.CheckpointRef
    members: _containers.RepeatedCompositeFieldContainer[PopulationMember]
    merged_pairs: _containers.RepeatedCompositeFieldContainer[MemberPair]
    top_k: int
    metric: _common_pb2.Metric
    mode: _common_pb2.KinshipMode
    known_kinship: _containers.RepeatedCompositeFieldContainer[KnownKinship]
    suggest_method: bool
    linear_kinship_threshold: float
    ties_sign_conflict_threshold: float
    ties_density: float
    slerp_t: float
    def __init__(self, base: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., members: _Optional[_Iterable[_Union[PopulationMember, _Mapping]]] = ..., merged_pairs: _Optional[_Iterable[_Union[MemberPair, _Mapping]]] = ..., top_k: _Optional[int] = ..., metric: _Optional[_Union[_common_pb2.Metric, str]] = ..., mode: _Optional[_Union[_common_pb2.KinshipMode, str]] = ..., known_kinship: _Optional[_Iterable[_Union[KnownKinship, _Mapping]]] = ..., suggest_method: _Optional[bool] = ..., linear_kinship_threshold: _Optional[float] = ..., ties_sign_conflict_threshold: _Optional[float] = ..., ties_density: _Optional[float] = ..., slerp_t: _Optional[float] = ...) -> None: ...

class RankCandidatesResponse(_message.Message):
    __slots__ = ("recommendations", "top_k", "matrix", "gains", "mode_used")
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    GAINS_FIELD_NUMBER: _ClassVar[int]
    MODE_USED_FIELD_NUMBER: _ClassVar[int]
    recommendations: _containers.RepeatedCompositeFieldContainer[Recommendation]
    top_k: _containers.RepeatedScalarFieldContainer[str]
    matrix: KinshipMatrix
    gains: _containers.RepeatedCompositeFieldContainer[MemberGain]
    mode_used: _common_pb2.KinshipMode
    def __init__(self, recommendations: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ..., top_k: _Optional[_Iterable[str]] = ..., matrix: _Optional[_Union[KinshipMatrix, _Mapping]] = ..., gains: _Optional[_Iterable[_Union[MemberGain, _Mapping]]] = ..., mode_used: _Optional[_Union[_common_pb2.KinshipMode, str]] = ...) -> None: ...

class ShouldStopRequest(_message.Message):
    __slots__ = ("base", "members", "top_k", "previous_top_k", "kinship_threshold", "aggregation", "metric", "gain_window", "gain_threshold", "mode", "known_kinship")
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
    def __init__(self, base: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., members: _Optional[_Iterable[_Union[PopulationMember, _Mapping]]] = ..., top_k: _Optional[int] = ..., previous_top_k: _Optional[_Iterable[str]] = ..., kinship_threshold: _Optional[float] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ..., metric: _Optional[_Union[_common_pb2.Metric, str]] = ..., gain_window: _Optional[int] = ..., gain_threshold: _Optional[float] = ..., mode: _Optional[_Union[_common_pb2.KinshipMode, str]] = ..., known_kinship: _Optional[_Iterable[_Union[KnownKinship, _Mapping]]] = ...) -> None: ...

class ShouldStopResponse(_message.Message):
    __slots__ = ("stop", "reasons", "top_k", "aggregated_kinship", "kinship_threshold", "matrix", "recent_gains", "summary", "mode_used")
    STOP_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    AGGREGATED_KINSHIP_FIELD_NUMBER: _ClassVar[int]
    KINSHIP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    RECENT_GAINS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    MODE_USED_FIELD_NUMBER: _ClassVar[int]
    stop: bool
    reasons: _containers.RepeatedScalarFieldContainer[StopReason]
    top_k: _containers.RepeatedScalarFieldContainer[str]
    aggregated_kinship: float
    kinship_threshold: float
    matrix: KinshipMatrix
    recent_gains: _containers.RepeatedCompositeFieldContainer[MemberGain]
    summary: str
    mode_used: _common_pb2.KinshipMode
    def __init__(self, stop: _Optional[bool] = ..., reasons: _Optional[_Iterable[_Union[StopReason, str]]] = ..., top_k: _Optional[_Iterable[str]] = ..., aggregated_kinship: _Optional[float] = ..., kinship_threshold: _Optional[float] = ..., matrix: _Optional[_Union[KinshipMatrix, _Mapping]] = ..., recent_gains: _Optional[_Iterable[_Union[MemberGain, _Mapping]]] = ..., summary: _Optional[str] = ..., mode_used: _Optional[_Union[_common_pb2.KinshipMode, str]] = ...) -> None: ...
