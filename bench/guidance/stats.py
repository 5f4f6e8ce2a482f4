"""Comparisons of a strategy against the plain greedy baseline over seeds, and the exact sign test."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TIE = 1e-9
"""Test scores closer than this count as a tie (the same model chosen)."""


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial sign test p-value (ties already dropped); 1.0 with no untied seeds."""
    if wins < 0 or losses < 0:
        raise ValueError("wins and losses must be >= 0")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2.0 * tail / 2**n)


@dataclass(frozen=True)
class Comparison:
    """A strategy against the baseline, over the same seeds."""

    strategy: str
    seeds: int
    mean_merges: float
    baseline_mean_merges: float
    merges_saved: float
    """1 - total merges / baseline's total merges (share of merges saved)."""
    merges_saved_per_seed: tuple[float, ...]
    mean_best_dev: float
    mean_best_test: float
    mean_test_gain: float
    """Mean over seeds of (best test - baseline's best test), points."""
    wins: int
    ties: int
    losses: int
    sign_p: float

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "merges_saved_per_seed": list(self.merges_saved_per_seed)}


def compare(
    strategy: str,
    merges: Sequence[int],
    best_dev: Sequence[float],
    best_test: Sequence[float],
    baseline_merges: Sequence[int],
    baseline_test: Sequence[float],
) -> Comparison:
    """Merges saved, test points gained and the sign test of `strategy` against the baseline, seed by seed."""
    n = len(merges)
    if not (n == len(best_dev) == len(best_test) == len(baseline_merges) == len(baseline_test)) or n == 0:
        raise ValueError("every sequence needs one entry per seed, at least one seed")
    diffs = [t - b for t, b in zip(best_test, baseline_test, strict=True)]
    wins = sum(d > TIE for d in diffs)
    losses = sum(d < -TIE for d in diffs)
    return Comparison(
        strategy=strategy,
        seeds=n,
        mean_merges=sum(merges) / n,
        baseline_mean_merges=sum(baseline_merges) / n,
        merges_saved=1.0 - sum(merges) / sum(baseline_merges),
        merges_saved_per_seed=tuple(1.0 - m / b for m, b in zip(merges, baseline_merges, strict=True)),
        mean_best_dev=sum(best_dev) / n,
        mean_best_test=sum(best_test) / n,
        mean_test_gain=sum(diffs) / n,
        wins=wins,
        ties=n - wins - losses,
        losses=losses,
        sign_p=sign_test(wins, losses),
    )
