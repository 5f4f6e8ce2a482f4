"""ShouldStop: whether a merging loop should stop, with its evidence (the paper's early-stop rule).

Hu et al. (arXiv 2410.12613), section 4.2: stop when kinship among the top models
saturates. Pure functions over a validated population (`population.py`) and a kinship
lookup; no I/O.

- **Stop reasons**: KINSHIP_SATURATED when the aggregated top-k kinship is at or above
  the threshold (at or below it for Euclidean distance); TOPK_UNCHANGED when the top-k
  set equals the previous one; GAIN_PLATEAU when each of the last `gain_window` merged
  members gained less than `gain_threshold`; NO_EXPECTED_GAIN (when `min_expected_gain` is
  given) when no top-k pair left to merge has an expected gain at or above it under the
  gain model fitted on the history (`gain_model.py`), once the history has
  `min_gain_history` points (or when no such pair is left).
- **Aggregation** (`aggregate`): MEAN is the paper's n-model kinship; MIN and MAX are in
  terms of relatedness, so for Euclidean distance MIN takes the largest distance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

from kinship_service.errors import InvalidArgument
from kinship_service.guidance.gain_model import GainModel, fitted_gain_model, resolve_prior_strength
from kinship_service.guidance.population import (
    EUCLIDEAN,
    PCC,
    KinshipLookup,
    KinshipMatrix,
    Member,
    MemberGain,
    Pair,
    merge_gains,
    merged_pair_set,
    pair_key,
    relatedness,
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
NO_EXPECTED_GAIN = "no_expected_gain"

DEFAULT_GAIN_THRESHOLD = 0.0
DEFAULT_MIN_GAIN_HISTORY = 3
"""History points NO_EXPECTED_GAIN needs by default: fewer say little beyond the prior."""


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
    gain_model: GainModel | None = None
    """Set when NO_EXPECTED_GAIN is enabled."""
    best_expected_gain: float | None = None
    """The highest expected gain among the top-k pairs left to merge (NO_EXPECTED_GAIN enabled, such a pair exists)."""
    best_candidate: Pair | None = None
    """That pair, better-ranked member first."""


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
    min_expected_gain: float | None = None,
    min_gain_history: int = 0,
    gain_prior_strength: float | None = None,
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
    if min_expected_gain is not None and not math.isfinite(min_expected_gain):
        raise InvalidArgument(
            f"min_expected_gain must be finite (leave it unset to disable NO_EXPECTED_GAIN), got {min_expected_gain}",
            field="min_expected_gain",
        )
    if min_gain_history < 0:
        raise InvalidArgument(f"min_gain_history must be >= 0 (0 means {DEFAULT_MIN_GAIN_HISTORY}), got {min_gain_history}", field="min_gain_history")
    resolve_prior_strength(gain_prior_strength)
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
    merged_pairs: Iterable[Pair] = (),
    min_expected_gain: float | None = None,
    min_gain_history: int = 0,
    gain_prior_strength: float | None = None,
    history_kinship: Mapping[Pair, float] | None = None,
) -> StopDecision:
    """Whether a merging loop should stop, with every reason that fired and its evidence.

    `kinship` must answer for every pair of top-k members. `previous_top_k` empty disables
    TOPK_UNCHANGED; `gain_window` 0 disables GAIN_PLATEAU, which needs at least
    `gain_window` merged members to fire. `min_expected_gain` None disables NO_EXPECTED_GAIN;
    `history_kinship` (known values, e.g. of earlier merges' parents) feeds its gain model.
    """
    validate_population(members, top_k)
    threshold, gain_limit = validate_stop_options(
        members,
        metric=metric,
        previous_top_k=previous_top_k,
        kinship_threshold=kinship_threshold,
        aggregation=aggregation,
        gain_window=gain_window,
        gain_threshold=gain_threshold,
        min_expected_gain=min_expected_gain,
        min_gain_history=min_gain_history,
        gain_prior_strength=gain_prior_strength,
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
    model = None
    expected_best: float | None = None
    expected_pair: Pair | None = None
    if min_expected_gain is not None:
        values = dict(history_kinship or {})
        values.update({pair_key(a, b): matrix.value(a, b) for a, b in combinations(top, 2)})
        model = fitted_gain_model(members, values, metric, resolve_prior_strength(gain_prior_strength))
        expected_best, expected_pair = _best_candidate(members, top, matrix, model, merged_pair_set(members, merged_pairs), metric)
        needed = min_gain_history or DEFAULT_MIN_GAIN_HISTORY
        if model.history < needed:
            parts.append(f"gain model has {model.history} merges, fewer than min_gain_history={needed}")
        elif expected_pair is None:
            reasons.append(NO_EXPECTED_GAIN)
            parts.append(f"every top-{top_k} pair was merged already")
        elif expected_best is not None and expected_best < min_expected_gain:
            reasons.append(NO_EXPECTED_GAIN)
            parts.append(
                f"best expected gain {expected_best:+.4g} ({expected_pair[0]} x {expected_pair[1]}) < {min_expected_gain:g}; {model.describe()}"
            )
        else:
            parts.append(
                f"best expected gain {expected_best:+.4g} ({expected_pair[0]} x {expected_pair[1]}) >= {min_expected_gain:g}; {model.describe()}"
            )
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
        gain_model=model,
        best_expected_gain=expected_best,
        best_candidate=expected_pair,
    )


def _best_candidate(
    members: Sequence[Member], top: Sequence[str], matrix: KinshipMatrix, model: GainModel, merged: set[Pair], metric: str
) -> tuple[float | None, Pair | None]:
    """The top-k pair left to merge with the highest expected gain (ties: the earlier pair in top-k order)."""
    scores = {m.name: float(m.score) for m in members if m.score is not None}
    best: tuple[float | None, Pair | None] = (None, None)
    for a, b in combinations(top, 2):
        if pair_key(a, b) in merged:
            continue
        gain = model.expected_gain(relatedness(matrix.value(a, b), metric), abs(scores[a] - scores[b]))
        if best[0] is None or gain > best[0]:
            best = (gain, (a, b))
    return best
