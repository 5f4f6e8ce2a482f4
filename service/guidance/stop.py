"""ShouldStop: whether a merging loop should stop, with its evidence (the paper's early-stop rule).

Hu et al. (arXiv 2410.12613), section 4.2: stop when kinship among the top models
saturates. Pure functions over a validated population (`population.py`) and a kinship
lookup; no I/O.

- **Stop reasons**: KINSHIP_SATURATED when the aggregated top-k kinship is at or above
  the threshold (at or below it for Euclidean distance); TOPK_UNCHANGED when the top-k
  set equals the previous one; GAIN_PLATEAU when each of the last `gain_window` merged
  members gained less than `gain_threshold`.
- **Aggregation** (`aggregate`): MEAN is the paper's n-model kinship; MIN and MAX are in
  terms of relatedness, so for Euclidean distance MIN takes the largest distance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kinship_service.errors import InvalidArgument
from kinship_service.guidance.population import (
    EUCLIDEAN,
    PCC,
    KinshipLookup,
    KinshipMatrix,
    Member,
    MemberGain,
    merge_gains,
    resolve_threshold,
    select_top_k,
    validate_population,
    validate_previous_top_k,
)

MEAN = "mean"
MIN = "min"
MAX = "max"
AGGREGATIONS = (MEAN, MIN, MAX)

KINSHIP_SATURATED = "kinship_saturated"
TOPK_UNCHANGED = "topk_unchanged"
GAIN_PLATEAU = "gain_plateau"

DEFAULT_GAIN_THRESHOLD = 0.0


@dataclass(frozen=True)
class StopDecision:
    """The answer of `should_stop`, with its evidence."""

    stop: bool
    reasons: list[str]
    top_k: list[str]
    aggregated_kinship: float
    kinship_threshold: float
    aggregation: str
    matrix: KinshipMatrix
    recent_gains: list[MemberGain]
    summary: str



def aggregate(values: Sequence[float], aggregation: str, metric: str) -> float:
    """Reduce pairwise kinship to one number.

    MEAN is the paper's n-model kinship. MIN means "every pair must be saturated" and MAX
    "any saturated pair suffices", in terms of relatedness: for Euclidean distance MIN takes
    the largest distance and MAX the smallest.
    """
    if not values:
        raise ValueError("no kinship values to aggregate")
    if aggregation == MEAN:
        return math.fsum(values) / len(values)
    least_related = max if metric == EUCLIDEAN else min
    most_related = min if metric == EUCLIDEAN else max
    if aggregation == MIN:
        return least_related(values)
    if aggregation == MAX:
        return most_related(values)
    raise ValueError(f"unknown aggregation {aggregation!r}")


def is_saturated(value: float, threshold: float, metric: str) -> bool:
    """At or above the threshold for PCC and cosine; at or below it for Euclidean distance."""
    return value <= threshold if metric == EUCLIDEAN else value >= threshold


def recent_merge_gains(members: Sequence[Member], window: int) -> list[MemberGain]:
    """The gains of the last `window` merged members: by generation (when given), then population order."""
    if window <= 0:
        return []
    gains = merge_gains(members)
    ordered = sorted(gains, key=lambda g: g.generation if g.generation is not None else 0)  # stable
    return ordered[-window:]


def validate_stop_options(
    members: Sequence[Member],
    *,
    metric: str,
    previous_top_k: Sequence[str],
    kinship_threshold: float | None,
    aggregation: str,
    gain_window: int,
    gain_threshold: float | None,
) -> tuple[float, float]:
    """Check ShouldStop's options; return the kinship and gain thresholds to use (defaults filled in)."""
    validate_previous_top_k(previous_top_k, (m.name for m in members))
    threshold = resolve_threshold(kinship_threshold, metric)
    if aggregation not in AGGREGATIONS:
        raise InvalidArgument(f"unknown aggregation {aggregation!r}; use mean, min or max", field="aggregation")
    if gain_window < 0:
        raise InvalidArgument(f"gain_window must be >= 0 (0 disables the rule), got {gain_window}", field="gain_window")
    gain_limit = DEFAULT_GAIN_THRESHOLD if gain_threshold is None else gain_threshold
    if not math.isfinite(gain_limit):
        raise InvalidArgument(f"gain_threshold must be finite, got {gain_limit}", field="gain_threshold")
    return threshold, gain_limit


def should_stop(
    members: Sequence[Member],
    top_k: int,
    kinship: KinshipLookup,
    *,
    metric: str = PCC,
    previous_top_k: Sequence[str] = (),
    kinship_threshold: float | None = None,
    aggregation: str = MEAN,
    gain_window: int = 0,
    gain_threshold: float | None = None,
    validated: bool = False,
) -> StopDecision:
    """Whether a merging loop should stop, with every reason that fired and its evidence.

    `kinship` must answer for every pair of top-k members. `previous_top_k` empty disables
    TOPK_UNCHANGED; `gain_window` 0 disables GAIN_PLATEAU, which needs at least
    `gain_window` merged members to fire. `validated`: the caller has checked the population
    (`validate_population`) and these options (`validate_stop_options`) already, as
    recommend_rpc's queries do, so they are not checked twice.
    """
    if validated:
        threshold = resolve_threshold(kinship_threshold, metric)
        gain_limit = DEFAULT_GAIN_THRESHOLD if gain_threshold is None else gain_threshold
    else:
        validate_population(members, top_k)
        threshold, gain_limit = validate_stop_options(
            members,
            metric=metric,
            previous_top_k=previous_top_k,
            kinship_threshold=kinship_threshold,
            aggregation=aggregation,
            gain_window=gain_window,
            gain_threshold=gain_threshold,
        )

    top = select_top_k(members, top_k)
    matrix = KinshipMatrix.build(top, kinship, metric)
    value = aggregate(matrix.pair_values(), aggregation, metric)
    reasons: list[str] = []
    comparison = "<=" if metric == EUCLIDEAN else ">="
    failed = ">" if metric == EUCLIDEAN else "<"
    label = f"{aggregation} {metric} kinship of the top-{top_k} {value:.4f}"
    if is_saturated(value, threshold, metric):
        reasons.append(KINSHIP_SATURATED)
        parts = [f"{label} {comparison} {threshold:g}"]
    else:
        parts = [f"{label} {failed} {threshold:g}"]
    if previous_top_k:
        if set(previous_top_k) == set(top):
            reasons.append(TOPK_UNCHANGED)
            parts.append("top-k unchanged since the previous generation")
        else:
            parts.append("top-k changed")
    recent = recent_merge_gains(members, gain_window)
    if gain_window > 0:
        if len(recent) == gain_window and all(g.gain < gain_limit for g in recent):
            reasons.append(GAIN_PLATEAU)
            parts.append(f"the last {gain_window} merges all gained < {gain_limit:g}")
        elif len(recent) < gain_window:
            parts.append(f"only {len(recent)} merged members, fewer than gain_window={gain_window}")
        else:
            best_gain = max(g.gain for g in recent)
            parts.append(f"best gain of the last {gain_window} merges {best_gain:.4g} >= {gain_limit:g}")
    stop = bool(reasons)
    summary = ("stop (" + ", ".join(reasons) + "): " if stop else "continue: ") + "; ".join(parts)
    return StopDecision(
        stop=stop,
        reasons=reasons,
        top_k=top,
        aggregated_kinship=value,
        kinship_threshold=threshold,
        aggregation=aggregation,
        matrix=matrix,
        recent_gains=recent,
        summary=summary,
    )
