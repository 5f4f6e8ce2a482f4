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

__all__ = [
    "KinshipClient",
    "KinshipResult",
    "KinshipRpcError",
    "LayerResult",
    "Pair",
    "Values",
    "checkpoint_label",
    "checkpoint_ref",
]
