"""Merge guidance in one import: the names the gRPC layer uses, from the modules that define them.

The logic lives in three modules, one concern each (all pure functions, no I/O):

- `population.py`: members, the validation of a population and of the request's pairs,
  known kinship, previous top-k and threshold; top-k, merge gains, merged pairs.
- `rank.py`: RankCandidates (the paper's Algorithm 1: greedy pairs and the exploration merge).
- `stop.py`: ShouldStop (the early-stop rule: saturation, unchanged top-k, gain plateau).

Code outside `guidance/` may import from here (`recommend.rank_candidates`,
`recommend.Member`, ...) or from the defining module; both name the same objects.
"""

from __future__ import annotations

from kinship_service.guidance.population import (
    COSINE,
    DEFAULT_KINSHIP_THRESHOLD,
    EUCLIDEAN,
    MAX_TOP_K,
    METRICS,
    PCC,
    KinshipLookup,
    KinshipMatrix,
    Member,
    MemberGain,
    Pair,
    checkpoint_description,
    lookup,
    merge_gains,
    merged_pair_set,
    pair_key,
    relatedness,
    resolve_threshold,
    select_top_k,
    self_kinship,
    top_k_pairs,
    validate_known,
    validate_pairs,
    validate_population,
    validate_previous_top_k,
    validate_top_k,
)
from kinship_service.guidance.rank import EXPLORATION, GREEDY, Ranking, Recommendation, rank_candidates
from kinship_service.guidance.stop import (
    AGGREGATIONS,
    DEFAULT_GAIN_THRESHOLD,
    GAIN_PLATEAU,
    KINSHIP_SATURATED,
    MAX,
    MEAN,
    MIN,
    TOPK_UNCHANGED,
    StopDecision,
    aggregate,
    is_saturated,
    recent_merge_gains,
    should_stop,
    validate_stop_options,
)

__all__ = [
    "AGGREGATIONS",
    "COSINE",
    "DEFAULT_GAIN_THRESHOLD",
    "DEFAULT_KINSHIP_THRESHOLD",
    "EUCLIDEAN",
    "EXPLORATION",
    "GAIN_PLATEAU",
    "GREEDY",
    "KINSHIP_SATURATED",
    "MAX",
    "MAX_TOP_K",
    "MEAN",
    "METRICS",
    "MIN",
    "PCC",
    "TOPK_UNCHANGED",
    "KinshipLookup",
    "KinshipMatrix",
    "Member",
    "MemberGain",
    "Pair",
    "Ranking",
    "Recommendation",
    "StopDecision",
    "aggregate",
    "checkpoint_description",
    "is_saturated",
    "lookup",
    "merge_gains",
    "merged_pair_set",
    "pair_key",
    "rank_candidates",
    "recent_merge_gains",
    "relatedness",
    "resolve_threshold",
    "select_top_k",
    "self_kinship",
    "should_stop",
    "top_k_pairs",
    "validate_known",
    "validate_pairs",
    "validate_population",
    "validate_previous_top_k",
    "validate_stop_options",
    "validate_top_k",
]
