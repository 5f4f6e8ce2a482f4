"""The merge-gain model: expected gain of a merge, fitted on the population's own history.

Hu et al. (arXiv 2410.12613, Table 1) find that |merge gain| falls as the parents' kinship
rises. Each member with exactly two parents whose kinship is known is one history point:
its gain (eq. 5: score minus the parents' mean score) against two features, the parents'
relatedness (kinship, or minus the distance for Euclidean; see `relatedness`) and the
absolute difference of the parents' scores.

The fit is ridge least squares on the centred features. `prior_strength` (lambda, in
pseudo-observations) pulls the intercept towards zero gain and each slope towards zero,
scaled by its feature's variance so the pull does not depend on the feature's units:

    minimise  sum_i (g_i - b0 - b . (x_i - xbar))^2 + lambda b0^2 + lambda sum_j var_j b_j^2

Centring decouples the intercept: b0 = sum(g) / (n + lambda); the slopes solve the 2 x 2
system (Xc'Xc + lambda diag(var)) b = Xc' g. A feature without spread in the history gets
slope 0; when the two features are collinear the score-gap feature is dropped. With no
history every expected gain is 0; with a short one it stays near the history's mean.
Pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kinship_service.errors import InvalidArgument
from kinship_service.guidance.population import Member, Pair, pair_key, relatedness

DEFAULT_PRIOR_STRENGTH = 2.0
"""Pseudo-observations of the prior: two merges' worth of "no gain expected"."""

_COLLINEAR = 1e-12
"""Relative determinant below which the two features count as collinear."""


@dataclass(frozen=True)
class GainPoint:
    """One merge of the history: the child, its parents' features and its gain."""

    child: str
    relatedness: float
    score_gap: float
    gain: float


@dataclass(frozen=True)
class GainModel:
    """A fitted model; `expected_gain` evaluates it (see the module doc for the formula)."""

    history: int
    skipped: int
    intercept: float
    kinship_slope: float
    score_gap_slope: float
    kinship_center: float
    score_gap_center: float
    prior_strength: float

    def expected_gain(self, relatedness_value: float, score_gap: float) -> float:
        """The expected gain of merging two models with this relatedness and score difference."""
        return (
            self.intercept
            + self.kinship_slope * (relatedness_value - self.kinship_center)
            + self.score_gap_slope * (score_gap - self.score_gap_center)
        )

    def describe(self) -> str:
        """The model in one line, for reasons and summaries."""
        if self.history == 0:
            return f"no merge history (prior of {self.prior_strength:g} pseudo-merges: expected gain 0)"
        skipped = f", {self.skipped} left out (parents' kinship unknown)" if self.skipped else ""
        return (
            f"fitted on {self.history} merges{skipped}: gain = {self.intercept:+.4g} "
            f"{self.kinship_slope:+.4g} x (kinship - {self.kinship_center:.4g}) "
            f"{self.score_gap_slope:+.4g} x (score gap - {self.score_gap_center:.4g})"
        )


def resolve_prior_strength(value: float | None, *, field: str = "gain_prior_strength") -> float:
    """The prior strength to use: the default when unset; else finite and >= 0."""
    if value is None:
        return DEFAULT_PRIOR_STRENGTH
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"gain_prior_strength must be a finite number >= 0 (pseudo-observations), got {value}", field=field)
    return value


def gain_history(members: Sequence[Member], kinship: Mapping[Pair, float], metric: str) -> tuple[list[GainPoint], int]:
    """The history points (two-parent members whose parents' kinship is in `kinship`), and how many were left out."""
    scores = {m.name: m.score for m in members}
    points: list[GainPoint] = []
    skipped = 0
    for member in members:
        if len(member.parents) != 2 or member.score is None:
            continue
        a, b = member.parents
        score_a, score_b = scores[a], scores[b]
        value = kinship.get(pair_key(a, b))
        if score_a is None or score_b is None or value is None:
            skipped += 1
            continue
        points.append(GainPoint(member.name, relatedness(value, metric), abs(score_a - score_b), member.score - (score_a + score_b) / 2.0))
    return points, skipped


def fit_gain_model(points: Sequence[GainPoint], prior_strength: float = DEFAULT_PRIOR_STRENGTH, *, skipped: int = 0) -> GainModel:
    """Ridge least squares of gain on (relatedness, score gap), centred, with the prior of the module doc."""
    n = len(points)
    if n == 0:
        return GainModel(0, skipped, 0.0, 0.0, 0.0, 0.0, 0.0, prior_strength)
    lam = prior_strength
    k_center = math.fsum(p.relatedness for p in points) / n
    g_center = math.fsum(p.score_gap for p in points) / n
    ks = [p.relatedness - k_center for p in points]
    gs = [p.score_gap - g_center for p in points]
    ys = [p.gain for p in points]
    intercept = math.fsum(ys) / (n + lam)
    s_kk = math.fsum(k * k for k in ks)
    s_gg = math.fsum(g * g for g in gs)
    s_kg = math.fsum(k * g for k, g in zip(ks, gs, strict=True))
    s_ky = math.fsum(k * y for k, y in zip(ks, ys, strict=True))
    s_gy = math.fsum(g * y for g, y in zip(gs, ys, strict=True))
    # The prior's term per slope: lambda times the feature's variance (s_jj / n).
    a_kk = s_kk * (1.0 + lam / n)
    a_gg = s_gg * (1.0 + lam / n)
    use_k = s_kk > 0.0
    use_g = s_gg > 0.0
    det = a_kk * a_gg - s_kg * s_kg
    if use_k and use_g and det <= _COLLINEAR * a_kk * a_gg:
        use_g = False  # collinear: the kinship feature alone carries the paper's finding
    if use_k and use_g:
        k_slope = (a_gg * s_ky - s_kg * s_gy) / det
        g_slope = (a_kk * s_gy - s_kg * s_ky) / det
    else:
        k_slope = s_ky / a_kk if use_k else 0.0
        g_slope = s_gy / a_gg if use_g else 0.0
    return GainModel(n, skipped, intercept, k_slope, g_slope, k_center, g_center, prior_strength)


def fitted_gain_model(members: Sequence[Member], kinship: Mapping[Pair, float], metric: str, prior_strength: float) -> GainModel:
    """The gain model of a population: `gain_history` then `fit_gain_model`."""
    points, skipped = gain_history(members, kinship, metric)
    return fit_gain_model(points, prior_strength, skipped=skipped)
