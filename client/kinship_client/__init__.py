"""Client for the model-kinship gRPC service (needs only grpcio and protobuf).

The `Literal` aliases (`Mode`, `Metric`, `Dtype`, ...) name the closed sets of strings the
client takes and returns; a value outside them raises `ValueError` listing the allowed ones.
Every reason a server error can carry is in docs/errors.md.
"""

from .choices import (
    Aggregation,
    Dtype,
    ExplorationRule,
    GreedyOrder,
    JobState,
    KinshipShapeMismatch,
    MergeShapeMismatch,
    Metric,
    Mode,
    ModeUsed,
    RecommendationKind,
    SkipReason,
    SlerpFactor,
    StopReason,
)
from .client import KinshipClient
from .errors import KinshipRpcError
from .merge import MergeError, MergeJobInfo, MergeOperation, TLike
from .population import (
    GainModel,
    KinshipMatrix,
    KnownKinshipLike,
    Member,
    MemberGain,
    Population,
    PopulationFileError,
    RankResult,
    Recommendation,
    StopResult,
    load_population,
)
from .refs import CheckpointLike, checkpoint_label, checkpoint_ref
from .results import KinshipResult, LayerResult, Pair, Registration, Values

__all__ = [
    "KinshipClient",
    "KinshipResult",
    "KinshipRpcError",
    "LayerResult",
    "Pair",
    "Registration",
    "Values",
    "checkpoint_label",
    "checkpoint_ref",
    "CheckpointLike",
    "GainModel",
    "KinshipMatrix",
    "KnownKinshipLike",
    "Member",
    "MemberGain",
    "Population",
    "PopulationFileError",
    "RankResult",
    "Recommendation",
    "StopResult",
    "load_population",
    "MergeError",
    "MergeJobInfo",
    "MergeOperation",
    "TLike",
    "Aggregation",
    "Dtype",
    "ExplorationRule",
    "GreedyOrder",
    "JobState",
    "KinshipShapeMismatch",
    "MergeShapeMismatch",
    "Metric",
    "Mode",
    "ModeUsed",
    "RecommendationKind",
    "SkipReason",
    "SlerpFactor",
    "StopReason",
]
