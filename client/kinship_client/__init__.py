"""Client for the model-kinship gRPC service (needs only grpcio and protobuf)."""

from .client import (
    KinshipClient,
    KinshipResult,
    KinshipRpcError,
    LayerResult,
    Pair,
    Values,
    checkpoint_label,
    checkpoint_ref,
)
from .merge import MergeError, MergeJobInfo, MergeOperation
from .population import (
    KinshipMatrix,
    Member,
    MemberGain,
    Population,
    PopulationFileError,
    RankResult,
    Recommendation,
    StopResult,
    load_population,
)

__all__ = [
    "KinshipClient",
    "KinshipResult",
    "KinshipRpcError",
    "LayerResult",
    "Pair",
    "Values",
    "checkpoint_label",
    "checkpoint_ref",
    "KinshipMatrix",
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
]
