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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

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


def rank_candidates(
    members: Sequence[Member],
    top_k: int,
    kinship: KinshipLookup,
    *,
    metric: str = PCC,
    merged_pairs: Iterable[Pair] = (),
    validated: bool = False,
) -> Ranking:
    """Which pairs to merge next: greedy pairs among the top-k and one exploration merge.

    `kinship` must answer for every pair of top-k members (`top_k_pairs(select_top_k(...))`).
    `validated`: the caller has checked `members` and `top_k` with `validate_population` already
    (recommend_rpc's queries do, before gathering kinship), so they are not checked twice.
    """
    if not validated:
        validate_population(members, top_k)
    scores = {m.name: float(m.score) for m in members if m.score is not None}  # all of them, once validated
    top = select_top_k(members, top_k)
    rank = {name: i for i, name in enumerate(top)}
    merged = merged_pair_set(members, merged_pairs)
    matrix = KinshipMatrix.build(top, kinship, metric)

    def mean_score(a: str, b: str) -> float:
        return (scores[a] + scores[b]) / 2.0

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
