"""RankCandidates' advice options beyond Algorithm 1: their names, validation and the pure rules they use.

- **Lineage** (`lineage`): a member's ancestors (its parents, their parents, ...) and its
  descendants; OUTSIDE_LINEAGE exploration skips both.
- **Complementarity** (`complementarity`): mean over tasks of max(0, second - first), what
  the second model adds where the first is weak; **task ceiling** (`task_ceiling`): mean
  over tasks of the better of the two.
- **SLERP factor** (`suggested_t`): the weight of the pair's second model.
- **Selection** (`kept_count`): how many greedy pairs `max_greedy` / `greedy_fraction` keep.

Defaults (`RankOptions()`) are the paper's behaviour. Pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from kinship_service.errors import InvalidArgument
from kinship_service.guidance.gain_model import resolve_prior_strength
from kinship_service.guidance.population import Member

GreedyOrder = Literal["mean_score", "expected_score", "task_ceiling"]
ExplorationRule = Literal["latest_generation", "outside_lineage", "complementary", "none"]
SlerpFactor = Literal["none", "even", "score_weighted"]
GREEDY_ORDERS: tuple[GreedyOrder, ...] = ("mean_score", "expected_score", "task_ceiling")
EXPLORATION_RULES: tuple[ExplorationRule, ...] = ("latest_generation", "outside_lineage", "complementary", "none")
SLERP_FACTORS: tuple[SlerpFactor, ...] = ("none", "even", "score_weighted")

SLERP_LEAN = 0.25
"""How far SCORE_WEIGHTED moves t from 0.5 for the population's whole score range."""


@dataclass(frozen=True)
class RankOptions:
    """RankCandidates' advice options; the defaults are Algorithm 1 as the paper has it."""

    greedy_order: GreedyOrder = "mean_score"
    max_greedy: int = 0
    """Keep at most this many greedy pairs; 0 keeps all."""
    greedy_fraction: float | None = None
    """Keep ceil(fraction x count) greedy pairs; None keeps all."""
    exploration: ExplorationRule = "latest_generation"
    exploration_pool: int = 0
    """Best-scoring members that may be the exploration partner (the best included); 0 means top_k."""
    estimate_gain: bool = False
    gain_prior_strength: float | None = None
    slerp_factor: SlerpFactor = "none"

    @property
    def wants_gain(self) -> bool:
        """Whether recommendations carry expected gains (asked for, or needed by the order)."""
        return self.estimate_gain or self.greedy_order == "expected_score"

    def validate(self, members: Sequence[Member], top_k: int) -> float:
        """Check the options against a validated population; return the gain prior strength to use.

        Raises InvalidArgument naming the option's request field; ValueError for a name outside
        the closed sets (the gRPC layer maps enums, so only direct callers can hit it).
        """
        for value, allowed, name in (
            (self.greedy_order, GREEDY_ORDERS, "greedy_order"),
            (self.exploration, EXPLORATION_RULES, "exploration"),
            (self.slerp_factor, SLERP_FACTORS, "slerp_factor"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        if self.max_greedy < 0:
            raise InvalidArgument(f"max_greedy must be >= 0 (0 keeps every greedy pair), got {self.max_greedy}", field="max_greedy")
        fraction = self.greedy_fraction
        if fraction is not None and not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise InvalidArgument(f"greedy_fraction must be in (0, 1] (leave it unset to keep all), got {fraction}", field="greedy_fraction")
        pool = self.exploration_pool
        if pool != 0 and not 2 <= pool <= len(members):
            raise InvalidArgument(
                f"exploration_pool must be 0 (= top_k) or between 2 and the population size ({len(members)}), got {pool}",
                field="exploration_pool",
            )
        has_tasks = bool(members) and bool(members[0].task_scores)
        if self.greedy_order == "task_ceiling" and not has_tasks:
            raise InvalidArgument(
                "greedy_order TASK_CEILING needs task_scores on every member; send them or use another order",
                reason="TASK_SCORES_REQUIRED",
                field="greedy_order",
            )
        if self.exploration == "complementary" and not has_tasks:
            raise InvalidArgument(
                "exploration COMPLEMENTARY needs task_scores on every member; send them or use another rule",
                reason="TASK_SCORES_REQUIRED",
                field="exploration",
            )
        return resolve_prior_strength(self.gain_prior_strength)

    def pool_size(self, top_k: int) -> int:
        """How many best-scoring members the exploration partner may come from (the best included)."""
        return self.exploration_pool or top_k


def kept_count(count: int, max_greedy: int, fraction: float | None) -> int:
    """How many of `count` greedy pairs to keep: the smaller of `max_greedy` (0: all) and ceil(fraction x count)."""
    kept = count
    if max_greedy > 0:
        kept = min(kept, max_greedy)
    if fraction is not None:
        kept = min(kept, math.ceil(fraction * count - 1e-9))
    return kept


def ancestors(name: str, parents: Mapping[str, Sequence[str]]) -> set[str]:
    """Every ancestor of `name`: its parents, their parents, and so on (cycles tolerated)."""
    seen: set[str] = set()
    todo = list(parents.get(name, ()))
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(parents.get(current, ()))
    seen.discard(name)
    return seen


def lineage(name: str, members: Sequence[Member]) -> set[str]:
    """The line of descent of `name`: its ancestors and its descendants (itself excluded)."""
    parents = {m.name: m.parents for m in members}
    descendants = {m.name for m in members if name in ancestors(m.name, parents)}
    return (ancestors(name, parents) | descendants) - {name}


def complementarity(first: Sequence[float], second: Sequence[float]) -> float:
    """Mean over tasks of max(0, second - first): what `second` adds where `first` is weak."""
    return math.fsum(max(0.0, b - a) for a, b in zip(first, second, strict=True)) / len(first)


def task_ceiling(first: Sequence[float], second: Sequence[float]) -> float:
    """Mean over tasks of the better of the two task scores."""
    return math.fsum(max(a, b) for a, b in zip(first, second, strict=True)) / len(first)


def suggested_t(factor: SlerpFactor, first_score: float, second_score: float, score_range: float) -> float | None:
    """The SLERP factor (weight of `second`) for a pair; None for `none`.

    `score_weighted`: 0.5 + SLERP_LEAN x (second - first) / score_range, clamped to
    [0.5 - SLERP_LEAN, 0.5 + SLERP_LEAN]; 0.5 when every score is equal.
    """
    if factor == "none":
        return None
    if factor == "even" or score_range <= 0.0:
        return 0.5
    lean = SLERP_LEAN * (second_score - first_score) / score_range
    return 0.5 + max(-SLERP_LEAN, min(SLERP_LEAN, lean))
