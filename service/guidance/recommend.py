"""Merge recommendations and stop signals: the paper's Algorithm 1 and early-stop rule as pure functions.

Hu et al., "Exploring Model Kinship for Merging Large Language Models" (arXiv 2410.12613),
Algorithm 1 (top-k greedy merging with model kinship) and section 4.2 (early stop when
kinship among the top models saturates). No gRPC, no I/O: kinship values come in through
a lookup (`KinshipLookup`, a callable `(name_a, name_b) -> value`), so these functions run
on numbers alone, for example the paper's own Table 2.

The rules, in one place:

- **Validation** (`validate_population`, `validate_pairs`, `validate_known`,
  `validate_previous_top_k`): every problem is an `InvalidArgument` naming the request
  field at fault, e.g. `members[3].score` or `top_k`.
- **Merge gain** (eq. 5): `score - mean(parent scores)` for every member with parents.
- **Top-k**: members by score, descending; equal scores by name (Unicode code points,
  ascending), so the result does not depend on the order of the population.
- **Already merged**: the pairs the caller lists, plus the parents of every two-parent
  member (merging them again would reproduce that member).
- **Greedy recommendations**: every pair of top-k members not merged yet, except the
  exploration pair (listed once, as EXPLORATION). Ordered by the pair's mean score
  (descending), then kinship (ascending: least related first), then the two names.
- **Exploration** (Algorithm 1, lines 10-12): `best` is the top-ranked model; the
  candidates are the other top-k models. When members carry generations, candidates of
  the latest generation in the population (the algorithm's G_{i-1}) are preferred; the
  rest of the top-k follow. Within each tier the candidate with the lowest kinship to
  `best` comes first (ties: higher rank first). The first candidate whose pair with
  `best` was not merged yet is the pick; when every such pair was merged there is no
  exploration recommendation.
- **"Lower kinship"** means less related: lower PCC or cosine, but a *larger* Euclidean
  distance. Sorting, exploration and aggregation all follow this, see `relatedness`.
- **Stop reasons**: KINSHIP_SATURATED when the aggregated top-k kinship is at or above
  the threshold (at or below it for Euclidean distance); TOPK_UNCHANGED when the top-k
  set equals the previous one; GAIN_PLATEAU when each of the last `gain_window` merged
  members gained less than `gain_threshold`.
"""

from __future__ import annotations

import math
import os.path
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

from kinship_service.errors import InvalidArgument

PCC = "pcc"
COSINE = "cosine"
EUCLIDEAN = "euclidean"
METRICS = (PCC, COSINE, EUCLIDEAN)

MEAN = "mean"
MIN = "min"
MAX = "max"
AGGREGATIONS = (MEAN, MIN, MAX)

GREEDY = "greedy"
EXPLORATION = "exploration"

KINSHIP_SATURATED = "kinship_saturated"
TOPK_UNCHANGED = "topk_unchanged"
GAIN_PLATEAU = "gain_plateau"

DEFAULT_KINSHIP_THRESHOLD = 0.9
"""The paper's saturation level for PCC and cosine (section 4.2)."""
DEFAULT_GAIN_THRESHOLD = 0.0

Pair = tuple[str, str]
"""An unordered pair of member names in canonical (sorted) order; see `pair_key`."""
KinshipLookup = Callable[[str, str], float]
"""Kinship between two members by name, under one metric."""


def pair_key(a: str, b: str) -> Pair:
    """The canonical key of the unordered pair {a, b}."""
    return (a, b) if a <= b else (b, a)


def relatedness(value: float, metric: str) -> float:
    """A value that grows with kinship: the value itself for PCC and cosine, minus the distance for Euclidean."""
    return -value if metric == EUCLIDEAN else value


def self_kinship(metric: str) -> float:
    """The diagonal of a kinship matrix: 1 for PCC and cosine, 0 for Euclidean distance."""
    return 0.0 if metric == EUCLIDEAN else 1.0


@dataclass(frozen=True)
class Member:
    """One model of a population, as the pure logic sees it."""

    name: str
    score: float | None
    """Evaluation score (average task performance); None when the caller left it out."""
    generation: int | None = None
    """Merge generation, 0 for foundation models; None when not given."""
    parents: tuple[str, ...] = ()
    """Names of the members it was merged from."""
    checkpoint: str | None = None
    """A comparable description of its checkpoint (e.g. `path:/m/a`), used to reject the same
    checkpoint listed twice; None when the member has no checkpoint."""


@dataclass(frozen=True)
class MemberGain:
    """Merge gain of a merged member (eq. 5)."""

    name: str
    gain: float
    generation: int | None


@dataclass(frozen=True)
class KinshipMatrix:
    """A square kinship matrix between named members (row-major, symmetric)."""

    names: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]
    metric: str

    @classmethod
    def build(cls, names: Sequence[str], kinship: KinshipLookup, metric: str) -> KinshipMatrix:
        """Fill the matrix from a lookup (each pair looked up once; the diagonal from the metric)."""
        n = len(names)
        rows = [[self_kinship(metric)] * n for _ in range(n)]
        for i, j in combinations(range(n), 2):
            rows[i][j] = rows[j][i] = float(kinship(names[i], names[j]))
        return cls(tuple(names), tuple(tuple(r) for r in rows), metric)

    def value(self, a: str, b: str) -> float:
        """The kinship of members `a` and `b`."""
        return self.values[self.names.index(a)][self.names.index(b)]

    def pair_values(self) -> list[float]:
        """Every off-diagonal pair i < j, row-major."""
        n = len(self.names)
        return [self.values[i][j] for i, j in combinations(range(n), 2)]

    def flat(self) -> list[float]:
        """Row-major values, len(names)^2 entries."""
        return [v for row in self.values for v in row]


@dataclass(frozen=True)
class Recommendation:
    """A recommended merge. `first` ranks above `second` in the top-k."""

    first: str
    second: str
    kind: str
    kinship: float
    mean_score: float
    reason: str


@dataclass(frozen=True)
class Ranking:
    """The answer of `rank_candidates`."""

    recommendations: list[Recommendation]
    """Greedy recommendations in order, then the exploration merge (if any)."""
    top_k: list[str]
    matrix: KinshipMatrix
    gains: list[MemberGain]

    @property
    def exploration(self) -> Recommendation | None:
        """The exploration recommendation, when there is one."""
        return next((r for r in self.recommendations if r.kind == EXPLORATION), None)


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


# -- Validation --------------------------------------------------------------------------


def validate_population(members: Sequence[Member], top_k: int, *, field: str = "members") -> dict[str, Member]:
    """Check a population and `top_k`; return the members by name.

    Rejects: fewer than two members; empty or duplicate names; the same checkpoint twice;
    missing or non-finite scores; negative generations, or generations on some members but
    not others; parents that are not members, repeated, the member itself, or (with
    generations) not of an earlier generation; `top_k` outside [2, len(members)].
    """
    if len(members) < 2:
        raise InvalidArgument(f"a population needs at least two members, got {len(members)}", field=field)
    by_name: dict[str, Member] = {}
    index_of: dict[str, int] = {}
    checkpoints: dict[str, int] = {}
    with_generation = [m.generation is not None for m in members]
    any_generation = any(with_generation)  # once: inside the loop it made validation quadratic
    for i, member in enumerate(members):
        if not member.name or not member.name.strip():
            raise InvalidArgument("every member needs a non-empty name", field=f"{field}[{i}].name")
        if member.name in by_name:
            raise InvalidArgument(
                f"duplicate member name {member.name!r} (also {field}[{index_of[member.name]}]); names must be unique",
                reason="DUPLICATE_MEMBER",
                field=f"{field}[{i}].name",
            )
        if member.checkpoint is not None:
            if member.checkpoint in checkpoints:
                raise InvalidArgument(
                    f"member {member.name!r} has the same checkpoint as {field}[{checkpoints[member.checkpoint]}]; "
                    "list each model once",
                    reason="DUPLICATE_MEMBER",
                    field=f"{field}[{i}].checkpoint",
                )
            checkpoints[member.checkpoint] = i
        if member.score is None:
            raise InvalidArgument(
                f"member {member.name!r} has no score; every member needs its evaluation score "
                "(the service never evaluates models)",
                reason="MISSING_SCORE",
                field=f"{field}[{i}].score",
            )
        if not math.isfinite(member.score):
            raise InvalidArgument(
                f"member {member.name!r} has score {member.score}; scores must be finite numbers",
                reason="NON_FINITE_SCORE",
                field=f"{field}[{i}].score",
            )
        if member.generation is not None and member.generation < 0:
            raise InvalidArgument(
                f"member {member.name!r} has generation {member.generation}; use 0 for foundation models",
                field=f"{field}[{i}].generation",
            )
        if any_generation and member.generation is None:
            first = with_generation.index(True)
            raise InvalidArgument(
                f"member {member.name!r} has no generation but {field}[{first}] has one; give it for every member or none",
                field=f"{field}[{i}].generation",
            )
        by_name[member.name] = member
        index_of[member.name] = i
    for i, member in enumerate(members):
        seen: set[str] = set()
        for k, parent in enumerate(member.parents):
            where = f"{field}[{i}].parents[{k}]"
            if parent not in by_name:
                raise InvalidArgument(
                    f"parent {parent!r} of member {member.name!r} is not in the population; add it (with its score) "
                    "or leave it out of parents",
                    reason="UNKNOWN_PARENT",
                    field=where,
                )
            if parent == member.name:
                raise InvalidArgument(f"member {member.name!r} lists itself as a parent", field=where)
            if parent in seen:
                raise InvalidArgument(f"member {member.name!r} lists parent {parent!r} twice", field=where)
            seen.add(parent)
            parent_generation = by_name[parent].generation
            if member.generation is not None and parent_generation is not None and parent_generation >= member.generation:
                raise InvalidArgument(
                    f"member {member.name!r} (generation {member.generation}) has parent {parent!r} of generation "
                    f"{parent_generation}; a parent must come from an earlier generation",
                    field=where,
                )
    validate_top_k(top_k, len(members))
    return by_name


MAX_TOP_K = 256
"""Largest top_k: its k (k - 1) / 2 pairs are enumerated and their kinship computed in one pass."""


def validate_top_k(top_k: int, population_size: int, *, field: str = "top_k") -> None:
    """`top_k` must be in [2, min(population_size, MAX_TOP_K)]: kinship needs a pair, and the pairs must stay countable."""
    if not 2 <= top_k <= population_size:
        raise InvalidArgument(
            f"top_k must be between 2 and the population size ({population_size}), got {top_k}",
            reason="TOP_K_OUT_OF_RANGE",
            field=field,
        )
    if top_k > MAX_TOP_K:
        raise InvalidArgument(
            f"top_k is {top_k}; at most {MAX_TOP_K} models are compared at once ({MAX_TOP_K * (MAX_TOP_K - 1) // 2} pairs)",
            reason="TOP_K_OUT_OF_RANGE",
            field=field,
        )


def validate_pairs(pairs: Sequence[tuple[str, str]], names: Iterable[str], *, field: str = "merged_pairs") -> set[Pair]:
    """Check that each pair names two different members; return the canonical pairs."""
    known = set(names)
    out: set[Pair] = set()
    for i, (first, second) in enumerate(pairs):
        out.add(_checked_pair(first, second, known, f"{field}[{i}]"))
    return out


def _checked_pair(first: str, second: str, names: set[str], where: str) -> Pair:
    for side, name in (("first", first), ("second", second)):
        if name not in names:
            raise InvalidArgument(f"{name!r} is not a member of the population", reason="UNKNOWN_MEMBER", field=f"{where}.{side}")
    if first == second:
        raise InvalidArgument(f"a pair needs two different members, got {first!r} twice", field=f"{where}.second")
    return pair_key(first, second)


def validate_known(
    known: Sequence[tuple[str, str, float]], names: Iterable[str], metric: str, *, field: str = "known_kinship"
) -> dict[Pair, float]:
    """Check caller-supplied kinship values (members exist, finite, in the metric's range, no conflicts).

    One cheap combined test per value; a value failing it goes through `_checked_known`,
    which raises the precise error.
    """
    members = set(names)
    out: dict[Pair, float] = {}
    # Finite and in range in one chained comparison (NaN and infinities fail it).
    low, high = (0.0, sys.float_info.max) if metric == EUCLIDEAN else (-1.0 - 1e-9, 1.0 + 1e-9)
    for i, (first, second, value) in enumerate(known):
        if first in members and second in members and first != second and low <= value <= high:
            key = (first, second) if first <= second else (second, first)
        else:
            key = _checked_known(i, first, second, value, members, metric, field)
        previous = out.get(key)
        if previous is not None and previous != value:
            raise InvalidArgument(
                f"pair ({first}, {second}) is given twice with different values ({previous} and {value})",
                field=f"{field}[{i}].value",
            )
        out[key] = value
    return out


def _checked_known(i: int, first: str, second: str, value: float, members: set[str], metric: str, field: str) -> Pair:
    """Every check of one known kinship value, in order: raises the first that fails, else returns the pair's key."""
    key = _checked_pair(first, second, members, f"{field}[{i}].pair")
    where = f"{field}[{i}].value"
    if not math.isfinite(value):
        raise InvalidArgument(f"kinship of ({first}, {second}) is {value}; values must be finite", field=where)
    if metric == EUCLIDEAN and value < 0:
        raise InvalidArgument(f"a Euclidean distance cannot be negative, got {value}", field=where)
    if metric != EUCLIDEAN and not -1.0 - 1e-9 <= value <= 1.0 + 1e-9:
        raise InvalidArgument(f"{metric} kinship must be in [-1, 1], got {value}", field=where)
    return key


def validate_previous_top_k(previous: Sequence[str], names: Iterable[str], *, field: str = "previous_top_k") -> None:
    """The previous top-k must name distinct members (Algorithm 1 only ever adds models)."""
    members = set(names)
    seen: set[str] = set()
    for i, name in enumerate(previous):
        if name not in members:
            raise InvalidArgument(
                f"{name!r} is not a member of the population; the previous top-k must still be in it",
                reason="UNKNOWN_MEMBER",
                field=f"{field}[{i}]",
            )
        if name in seen:
            raise InvalidArgument(f"{name!r} is listed twice", field=f"{field}[{i}]")
        seen.add(name)


def resolve_threshold(threshold: float | None, metric: str, *, field: str = "kinship_threshold") -> float:
    """The saturation threshold: 0.9 by default for PCC and cosine; required for Euclidean distance."""
    if threshold is None:
        if metric == EUCLIDEAN:
            raise InvalidArgument(
                "kinship_threshold is required with the EUCLIDEAN metric: distances have the scale of the weights, "
                "so there is no meaningful default; give the distance at or below which models count as saturated",
                field=field,
            )
        return DEFAULT_KINSHIP_THRESHOLD
    if not math.isfinite(threshold):
        raise InvalidArgument(f"kinship_threshold must be finite, got {threshold}", field=field)
    if metric == EUCLIDEAN and threshold < 0:
        raise InvalidArgument(f"a Euclidean distance threshold cannot be negative, got {threshold}", field=field)
    if metric != EUCLIDEAN and not -1.0 <= threshold <= 1.0:
        raise InvalidArgument(f"a {metric} threshold must be in [-1, 1], got {threshold}", field=field)
    return threshold


def checkpoint_description(kind: str, location: str) -> str:
    """A comparable description of a checkpoint reference for duplicate detection (`path:` paths normalised)."""
    if kind == "path":
        return "path:" + os.path.normpath(location)
    return f"{kind}:{location}"


# -- Gains, top-k, merged pairs -----------------------------------------------------------


def merge_gains(members: Sequence[Member]) -> list[MemberGain]:
    """Merge gain (eq. 5) of every member with parents, in population order."""
    scores = {m.name: m.score for m in members}
    gains = []
    for member in members:
        if not member.parents or member.score is None:
            continue
        parent_scores = [scores[p] for p in member.parents]
        if any(s is None for s in parent_scores):
            continue
        mean = math.fsum(s for s in parent_scores if s is not None) / len(parent_scores)
        gains.append(MemberGain(member.name, member.score - mean, member.generation))
    return gains


def select_top_k(members: Sequence[Member], top_k: int) -> list[str]:
    """The `top_k` best members by score, best first; equal scores ordered by name (ascending)."""
    ranked = sorted(members, key=lambda m: (-(m.score if m.score is not None else -math.inf), m.name))
    return [m.name for m in ranked[:top_k]]


def merged_pair_set(members: Sequence[Member], merged_pairs: Iterable[Pair] = ()) -> set[Pair]:
    """Pairs already merged: those given plus the parents of every two-parent member."""
    merged = {pair_key(*p) for p in merged_pairs}
    merged.update(pair_key(*m.parents) for m in members if len(m.parents) == 2)
    return merged


def top_k_pairs(names: Sequence[str]) -> list[Pair]:
    """Every pair among `names`, canonical keys: the kinship values RankCandidates and ShouldStop need."""
    return [pair_key(a, b) for a, b in combinations(names, 2)]


def lookup(values: Mapping[Pair, float]) -> KinshipLookup:
    """A KinshipLookup over a dict keyed by canonical pairs."""

    def get(a: str, b: str) -> float:
        return values[pair_key(a, b)]

    return get


# -- RankCandidates ------------------------------------------------------------------------


def rank_candidates(
    members: Sequence[Member],
    top_k: int,
    kinship: KinshipLookup,
    *,
    metric: str = PCC,
    merged_pairs: Iterable[Pair] = (),
) -> Ranking:
    """Which pairs to merge next: greedy pairs among the top-k and one exploration merge.

    `kinship` must answer for every pair of top-k members (`top_k_pairs(select_top_k(...))`).
    """
    validate_population(members, top_k)
    by_name = {m.name: m for m in members}
    top = select_top_k(members, top_k)
    rank = {name: i for i, name in enumerate(top)}
    merged = merged_pair_set(members, merged_pairs)
    matrix = KinshipMatrix.build(top, kinship, metric)

    def mean_score(a: str, b: str) -> float:
        return (float(by_name[a].score) + float(by_name[b].score)) / 2.0  # type: ignore[arg-type]

    exploration = _exploration(members, top, matrix, merged, metric, mean_score)
    taken = {pair_key(exploration.first, exploration.second)} if exploration else set()
    greedy = []
    for a, b in combinations(top, 2):
        if pair_key(a, b) in merged or pair_key(a, b) in taken:
            continue
        value = matrix.value(a, b)
        greedy.append(
            Recommendation(
                a,
                b,
                GREEDY,
                value,
                mean_score(a, b),
                f"greedy: both in the top-{top_k} (ranks {rank[a] + 1} and {rank[b] + 1}) and not merged yet; "
                f"mean score {mean_score(a, b):.6g}, {metric} kinship {value:.4f}",
            )
        )
    greedy.sort(key=lambda r: (-r.mean_score, relatedness(r.kinship, metric), r.first, r.second))
    recommendations = greedy + ([exploration] if exploration else [])
    return Ranking(recommendations=recommendations, top_k=top, matrix=matrix, gains=merge_gains(members))


def _exploration(
    members: Sequence[Member],
    top: Sequence[str],
    matrix: KinshipMatrix,
    merged: set[Pair],
    metric: str,
    mean_score: Callable[[str, str], float],
) -> Recommendation | None:
    """Algorithm 1, lines 10-12: the best model with its least-kin top-k candidate (see the module doc)."""
    best = top[0]
    generations = {m.name: m.generation for m in members}
    latest = max((g for g in generations.values() if g is not None), default=None)
    candidates = list(top[1:])
    order = {name: i for i, name in enumerate(top)}

    def least_kin_first(names: list[str]) -> list[str]:
        return sorted(names, key=lambda c: (relatedness(matrix.value(best, c), metric), order[c]))

    if latest is not None:
        preferred = [c for c in candidates if generations[c] == latest]
        tiers = [preferred, [c for c in candidates if generations[c] != latest]]
    else:
        tiers = [candidates]
    ordered = [c for tier in tiers for c in least_kin_first(tier)]
    overall_least = least_kin_first(candidates)[0]
    for candidate in ordered:
        if pair_key(best, candidate) in merged:
            continue
        value = matrix.value(best, candidate)
        where = "among the top-k candidates"
        if latest is not None:
            where = (
                f"among the top-k candidates of the latest generation ({latest})"
                if generations[candidate] == latest
                else f"among the top-k candidates (none of the latest generation, {latest}, was available)"
            )
        skipped = ordered[: ordered.index(candidate)]
        note = f"; skipped {', '.join(skipped)} (already merged with {best})" if skipped else ""
        if candidate != overall_least and not skipped:
            note += f"; preferred over {overall_least} because it is from the latest generation"
        return Recommendation(
            best,
            candidate,
            EXPLORATION,
            value,
            mean_score(best, candidate),
            f"exploration: {candidate} has the lowest {metric} kinship to the best model {best} "
            f"({value:.4f}) {where}{note}",
        )
    return None


# -- ShouldStop ----------------------------------------------------------------------------


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
) -> StopDecision:
    """Whether a merging loop should stop, with every reason that fired and its evidence.

    `kinship` must answer for every pair of top-k members. `previous_top_k` empty disables
    TOPK_UNCHANGED; `gain_window` 0 disables GAIN_PLATEAU, which needs at least
    `gain_window` merged members to fire.
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
