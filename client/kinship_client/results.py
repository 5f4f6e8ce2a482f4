"""Kinship and registration results, as plain dataclasses built from the responses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .choices import (
    METRICS,
    Metric,
    ModeUsed,
    SkipReason,
    choice,
)
from .v1 import common_pb2, kinship_pb2


@dataclass(frozen=True)
class Values:
    """PCC, cosine similarity and Euclidean distance."""

    pcc: float
    cosine: float
    euclidean: float

    @classmethod
    def from_proto(cls, message: common_pb2.KinshipValues) -> Values:
        """The Values of a KinshipValues proto."""
        return cls(message.pcc, message.cosine, message.euclidean)


@dataclass(frozen=True)
class Pair:
    """Kinship between models `first` and `second` (indices into the request's models)."""

    first: int
    second: int
    values: Values
    sign_conflict: float | None = None
    """Magnitude-weighted fraction of coordinates where the task vectors disagree in sign, when asked for."""


@dataclass(frozen=True)
class LayerResult:
    """Kinship over one layer group."""

    group: str
    tensors: int
    elements: int
    pairs: list[Pair]
    mean: Values


@dataclass(frozen=True)
class KinshipResult:
    """The answer of Kinship. `raw` is the response proto."""

    models: list[str]
    pairs: list[Pair]
    mean: Values
    mode: ModeUsed
    tensors_compared: int
    elements_compared: int
    skipped: list[tuple[str, SkipReason, str]]
    """(tensor name, why it was left out, detail) for every tensor not compared."""
    sliced: list[str]
    layers: list[LayerResult]
    bytes_read: int
    device: str
    seconds: float
    raw: kinship_pb2.KinshipResponse = field(repr=False)
    mean_sign_conflict: float | None = None
    """The mean sign conflict over pairs, when asked for (`sign_conflict=True`)."""

    def matrix(self, metric: Metric = "pcc") -> list[list[float]]:
        """The n x n matrix of one metric (`pcc`, `cosine` or `euclidean`).

        Raises:
            ValueError: `metric` is not one of these (the message lists them).
        """
        metric = choice("metric", metric, METRICS)
        n = len(self.models)
        diagonal = 0.0 if metric == "euclidean" else 1.0
        out = [[diagonal if i == j else float("nan") for j in range(n)] for i in range(n)]
        for pair in self.pairs:
            value = getattr(pair.values, metric)
            out[pair.first][pair.second] = out[pair.second][pair.first] = value
        return out


@dataclass(frozen=True)
class Registration:
    """The answer of RegisterCheckpoint. `raw` is the response proto."""

    identity: str
    base_identity: str
    already_registered: bool
    tensors: int
    elements: int
    size_bytes: int
    delta_sum: float
    delta_sum_squares: float
    layer_norms: dict[str, float]
    fingerprint_bytes: int
    delta_bytes: int
    seconds: float
    raw: kinship_pb2.RegisterCheckpointResponse = field(repr=False)


def pairs_from_proto(messages: Sequence[kinship_pb2.PairKinship]) -> list[Pair]:
    """The pairs of a response, as `Pair`s."""
    return [
        Pair(p.first, p.second, Values.from_proto(p.values), p.sign_conflict if p.HasField("sign_conflict") else None)
        for p in messages
    ]
