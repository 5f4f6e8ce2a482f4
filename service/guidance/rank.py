"""RankCandidates: which pairs of a population to merge next (the paper's Algorithm 1).

Hu et al. (arXiv 2410.12613), Algorithm 1: top-k greedy merging with model kinship. Pure
functions over a validated population (`population.py`) and a kinship lookup; no I/O.

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
- **Advice options** (`advice.RankOptions`; the defaults are the above): the greedy order
  (mean score, expected score from the fitted gain model, task ceiling) and how many greedy
  pairs to keep; the exploration rule (latest generation, outside the best model's lineage,
  most complementary, none) over the best `exploration_pool` members; expected gains
  (`gain_model.py`), complementarity and a suggested SLERP factor per recommendation, each
  with its numbers in the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

from kinship_service.guidance import advice
from kinship_service.guidance.advice import RankOptions
from kinship_service.guidance.gain_model import GainModel, fitted_gain_model
from kinship_service.guidance.population import (
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
    select_top_k,
    validate_population,
)

GREEDY = "greedy"
EXPLORATION = "exploration"


@dataclass(frozen=True)
class Recommendation:
    """A recommended merge. `first` ranks above `second` in the top-k.

    The optional numbers are filled when the options ask for them (see `advice.RankOptions`).
    """

    first: str
    second: str
    kind: str
    kinship: float
    mean_score: float
    reason: str
    expected_gain: float | None = None
    expected_score: float | None = None
    complementarity: float | None = None
    task_ceiling: float | None = None
    suggested_t: float | None = None


@dataclass(frozen=True)
class Ranking:
    """The answer of `rank_candidates`."""

    recommendations: list[Recommendation]
    """Greedy recommendations in order, then the exploration merge (if any)."""
    top_k: list[str]
    matrix: KinshipMatrix
    gains: list[MemberGain]
    gain_model: GainModel | None = None
    """The fitted gain model, when the options ask for expected gains."""

    @property
    def exploration(self) -> Recommendation | None:
        """The exploration recommendation, when there is one."""
        return next((r for r in self.recommendations if r.kind == EXPLORATION), None)


@dataclass(frozen=True)
class _Details:
    """The optional numbers of one pair and the clause of its reason that states them."""

    expected_gain: float | None = None
    expected_score: float | None = None
    complementarity: float | None = None
    task_ceiling: float | None = None
    suggested_t: float | None = None
    text: str = ""


@dataclass
class _Context:
    """What every pair's details are computed from."""

    members: Sequence[Member]
    scores: dict[str, float]
    kinship: KinshipLookup
    metric: str
    options: RankOptions
    model: GainModel | None
    tasks: dict[str, tuple[float, ...]] = field(default_factory=dict)
    score_range: float = 0.0

    def mean_score(self, a: str, b: str) -> float:
        return (self.scores[a] + self.scores[b]) / 2.0

    def details(self, a: str, b: str) -> _Details:
        """Expected gain, complementarity and suggested t of the pair (a, b), as the options ask."""
        parts: list[str] = []
        gain = expected = comp = ceiling = None
        if self.model is not None:
            gain = self.model.expected_gain(relatedness(self.kinship(a, b), self.metric), abs(self.scores[a] - self.scores[b]))
            expected = self.mean_score(a, b) + gain
            parts.append(f"expected gain {gain:+.4g} (expected score {expected:.6g}; gain model of {self.model.history} merges)")
        if self.tasks:
            comp = advice.complementarity(self.tasks[a], self.tasks[b])
            ceiling = advice.task_ceiling(self.tasks[a], self.tasks[b])
            parts.append(f"complementarity {comp:.4g} (what {b} adds on tasks where {a} is weaker), task ceiling {ceiling:.6g}")
        t = advice.suggested_t(self.options.slerp_factor, self.scores[a], self.scores[b], self.score_range)
        if t is not None:
            how = "even" if self.options.slerp_factor == "even" else "leaning towards the better-scoring parent"
            parts.append(f"suggested SLERP t {t:.4f} (weight of {b}; {how})")
        text = "".join(f"; {p}" for p in parts)
        return _Details(gain, expected, comp, ceiling, t, text)


def rank_candidates(
    members: Sequence[Member],
    top_k: int,
    kinship: KinshipLookup,
    *,
    metric: str = PCC,
    merged_pairs: Iterable[Pair] = (),
    options: RankOptions | None = None,
    history_kinship: Mapping[Pair, float] | None = None,
) -> Ranking:
    """Which pairs to merge next: greedy pairs among the top-k and one exploration merge.

    `kinship` must answer for every pair of top-k members and for the best model with each
    member of the exploration pool. `history_kinship` (known values, e.g. of earlier
    merges' parents) feeds the gain model beside those.
    """
    validate_population(members, top_k)
    options = options or RankOptions()
    prior = options.validate(members, top_k)
    scores = {m.name: float(m.score) for m in members if m.score is not None}  # all of them, once validated
    top = select_top_k(members, top_k)
    rank = {name: i for i, name in enumerate(top)}
    merged = merged_pair_set(members, merged_pairs)
    matrix = KinshipMatrix.build(top, kinship, metric)
    model = None
    if options.wants_gain:
        values = dict(history_kinship or {})
        values.update({pair_key(a, b): matrix.value(a, b) for a, b in combinations(top, 2)})
        model = fitted_gain_model(members, values, metric, prior)
    context = _Context(members, scores, kinship, metric, options, model)
    if members[0].task_scores:
        context.tasks = {m.name: m.task_scores for m in members}
    if options.slerp_factor != "none":
        context.score_range = max(scores.values()) - min(scores.values())

    pool = select_top_k(members, options.pool_size(top_k))
    exploration = _exploration(context, top, pool, merged)
    taken = {pair_key(exploration.first, exploration.second)} if exploration else set()
    candidates = []
    for a, b in combinations(top, 2):
        if pair_key(a, b) in merged or pair_key(a, b) in taken:
            continue
        value = matrix.value(a, b)
        candidates.append((a, b, value, context.details(a, b)))
    candidates.sort(key=lambda c: (-_order_value(context, c[0], c[1], c[3]), relatedness(c[2], metric), c[0], c[1]))
    kept = advice.kept_count(len(candidates), options.max_greedy, options.greedy_fraction)
    default_order = options.greedy_order == "mean_score" and kept == len(candidates)
    greedy = []
    for i, (a, b, value, details) in enumerate(candidates[:kept]):
        reason = (
            f"greedy: both in the top-{top_k} (ranks {rank[a] + 1} and {rank[b] + 1}) and not merged yet; "
            f"mean score {context.mean_score(a, b):.6g}, {metric} kinship {value:.4f}"
        )
        if not default_order:
            reason += f"; {options.greedy_order.replace('_', ' ')} rank {i + 1} of {len(candidates)} candidate pairs"
            if kept < len(candidates):
                reason += f" (keeping the best {kept})"
        greedy.append(_recommendation(a, b, GREEDY, value, context, reason + details.text, details))
    recommendations = greedy + ([exploration] if exploration else [])
    return Ranking(recommendations=recommendations, top_k=top, matrix=matrix, gains=merge_gains(members), gain_model=model)


def _order_value(context: _Context, a: str, b: str, details: _Details) -> float:
    """The value the greedy order sorts by, descending."""
    order = context.options.greedy_order
    if order == "expected_score" and details.expected_score is not None:
        return details.expected_score
    if order == "task_ceiling" and details.task_ceiling is not None:
        return details.task_ceiling
    return context.mean_score(a, b)


def _recommendation(a: str, b: str, kind: str, value: float, context: _Context, reason: str, details: _Details) -> Recommendation:
    return Recommendation(
        a,
        b,
        kind,
        value,
        context.mean_score(a, b),
        reason,
        details.expected_gain,
        details.expected_score,
        details.complementarity,
        details.task_ceiling,
        details.suggested_t,
    )


def _exploration(context: _Context, top: Sequence[str], pool: Sequence[str], merged: set[Pair]) -> Recommendation | None:
    """The exploration merge under the options' rule (Algorithm 1's by default, see the module doc)."""
    rule = context.options.exploration
    if rule == "none":
        return None
    if rule == "latest_generation":
        return _latest_generation(context, top, pool, merged)
    best = pool[0]
    order = {name: i for i, name in enumerate(pool)}
    metric = context.metric

    def kin(c: str) -> float:
        return context.kinship(best, c)

    where = f"the best {len(pool)} members" if len(pool) != len(top) else f"the top-{len(top)}"
    if rule == "outside_lineage":
        related = advice.lineage(best, context.members)
        candidates = sorted((c for c in pool[1:] if c not in related), key=lambda c: (relatedness(kin(c), metric), order[c]))
        excluded = [c for c in pool[1:] if c in related]
        for candidate in candidates:
            if pair_key(best, candidate) in merged:
                continue
            skipped = candidates[: candidates.index(candidate)]
            note = f"; left out {', '.join(excluded)} (ancestors or descendants of {best})" if excluded else ""
            note += f"; skipped {', '.join(skipped)} (already merged with {best})" if skipped else ""
            reason = (
                f"exploration: {candidate} has the lowest {metric} kinship to the best model {best} ({kin(candidate):.4f}) "
                f"among {where} outside {best}'s line of descent{note}"
            )
            return _explore(best, candidate, context, reason)
        return None
    # complementary: what the candidate adds where the best model is weak, then least kin, then rank
    tasks = context.tasks
    candidates = sorted(
        pool[1:], key=lambda c: (-advice.complementarity(tasks[best], tasks[c]), relatedness(kin(c), metric), order[c])
    )
    for candidate in candidates:
        if pair_key(best, candidate) in merged:
            continue
        skipped = candidates[: candidates.index(candidate)]
        note = f"; skipped {', '.join(skipped)} (already merged with {best})" if skipped else ""
        reason = (
            f"exploration: {candidate} is the most complementary to the best model {best} among {where} "
            f"({metric} kinship {kin(candidate):.4f}){note}"
        )
        return _explore(best, candidate, context, reason)
    return None


def _explore(best: str, candidate: str, context: _Context, reason: str) -> Recommendation:
    details = context.details(best, candidate)
    return _recommendation(best, candidate, EXPLORATION, context.kinship(best, candidate), context, reason + details.text, details)


def _latest_generation(context: _Context, top: Sequence[str], pool: Sequence[str], merged: set[Pair]) -> Recommendation | None:
    """Algorithm 1, lines 10-12: the best model with its least-kin candidate (see the module doc)."""
    best = top[0]
    metric = context.metric
    generations = {m.name: m.generation for m in context.members}
    latest = max((g for g in generations.values() if g is not None), default=None)
    candidates = list(pool[1:])
    order = {name: i for i, name in enumerate(pool)}
    kin: Callable[[str], float] = lambda c: context.kinship(best, c)  # noqa: E731 - one short lookup

    def least_kin_first(names: list[str]) -> list[str]:
        return sorted(names, key=lambda c: (relatedness(kin(c), metric), order[c]))

    if not candidates:
        return None
    if latest is not None:
        preferred = [c for c in candidates if generations[c] == latest]
        tiers = [preferred, [c for c in candidates if generations[c] != latest]]
    else:
        tiers = [candidates]
    ordered = [c for tier in tiers for c in least_kin_first(tier)]
    overall_least = least_kin_first(candidates)[0]
    group = "top-k candidates" if len(pool) == len(top) else f"candidates among the best {len(pool)} members"
    for candidate in ordered:
        if pair_key(best, candidate) in merged:
            continue
        value = kin(candidate)
        where = f"among the {group}"
        if latest is not None:
            where = (
                f"among the {group} of the latest generation ({latest})"
                if generations[candidate] == latest
                else f"among the {group} (none of the latest generation, {latest}, was available)"
            )
        skipped = ordered[: ordered.index(candidate)]
        note = f"; skipped {', '.join(skipped)} (already merged with {best})" if skipped else ""
        if candidate != overall_least and not skipped:
            note += f"; preferred over {overall_least} because it is from the latest generation"
        reason = f"exploration: {candidate} has the lowest {metric} kinship to the best model {best} ({value:.4f}) {where}{note}"
        return _explore(best, candidate, context, reason)
    return None
