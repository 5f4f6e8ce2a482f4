"""Method advice: which merge method (and parameters) suits a recommended pair, from kinship and sign conflict.

Pure rules over what the service measures, checked in this order:

1. **High sign conflict -> `ties`** with `density`: when the task vectors disagree in sign on
   at least `ties_sign_conflict` of their mass (`kinship/sign_conflict.py`), averaging cancels
   that mass out; TIES (Yadav et al., 2023) trims each delta to its largest `density` share and
   elects one sign per coordinate, which is what it exists for.
2. **High kinship -> `linear`** (equal weights): when the pair's PCC or cosine is at least
   `linear_kinship`, the models are similar and plain averaging is competitive (DAM,
   Gauthier-Caron et al., arXiv 2410.08371; Model Soups).
3. **Otherwise -> `slerp`** with `t` = `slerp_t`: interpolation along the arc keeps the norm
   of dissimilar task vectors that a straight average would shrink.

The kinship rule needs PCC or cosine (a Euclidean distance has the weights' scale, no
universal threshold), so with the Euclidean metric only rules 1 and 3 apply. Without a sign
conflict (no base or checkpoint to measure it) rule 1 is skipped and the reason says so.
Off unless a request sets `suggest_method`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from kinship_service.errors import InvalidArgument
from kinship_service.guidance.population import EUCLIDEAN

AdvisedMethod = Literal["linear", "ties", "slerp"]
"""The methods advice chooses from (mergekit names)."""

DEFAULT_LINEAR_KINSHIP = 0.9
DEFAULT_TIES_SIGN_CONFLICT = 0.45
"""Chosen on dev scores of the trained family (docs/merge-methods.md): at 0.35 TIES was suggested for
every weakly related pair and lost 0.78 dev points against SLERP; at 0.45 (close to the 0.5 of
independent task vectors) only for strongly conflicting ones."""
DEFAULT_TIES_DENSITY = 0.5
DEFAULT_SLERP_T = 0.5


@dataclass(frozen=True)
class MethodAdviceOptions:
    """Thresholds and parameters of the advice (defaults above)."""

    linear_kinship: float = DEFAULT_LINEAR_KINSHIP
    ties_sign_conflict: float = DEFAULT_TIES_SIGN_CONFLICT
    ties_density: float = DEFAULT_TIES_DENSITY
    slerp_t: float = DEFAULT_SLERP_T


@dataclass(frozen=True)
class MethodAdvice:
    """A suggested merge method, its mergekit parameters and why."""

    method: AdvisedMethod
    parameters: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    sign_conflict: float | None = None


def method_advice_options(
    linear_kinship: float | None = None,
    ties_sign_conflict: float | None = None,
    ties_density: float | None = None,
    slerp_t: float | None = None,
) -> MethodAdviceOptions:
    """Validated options (None: the default); InvalidArgument naming the field out of range."""
    checks = (
        ("linear_kinship_threshold", linear_kinship, DEFAULT_LINEAR_KINSHIP, -1.0, 1.0, True),
        ("ties_sign_conflict_threshold", ties_sign_conflict, DEFAULT_TIES_SIGN_CONFLICT, 0.0, 1.0, True),
        ("ties_density", ties_density, DEFAULT_TIES_DENSITY, 0.0, 1.0, False),
        ("slerp_t", slerp_t, DEFAULT_SLERP_T, 0.0, 1.0, True),
    )
    values: list[float] = []
    for name, value, default, low, high, low_inclusive in checks:
        if value is None:
            values.append(default)
            continue
        above_low = value >= low if low_inclusive else value > low
        if not (math.isfinite(value) and above_low and value <= high):
            interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}]"
            raise InvalidArgument(f"{name} must be in {interval}, got {value!r}", field=name)
        values.append(value)
    return MethodAdviceOptions(*values)


def advise_method(kinship: float, metric: str, sign_conflict: float | None, options: MethodAdviceOptions) -> MethodAdvice:
    """The suggested method for a pair of kinship `kinship` (under `metric`) and sign conflict (None: unknown)."""
    if sign_conflict is not None and sign_conflict >= options.ties_sign_conflict:
        return MethodAdvice(
            "ties",
            {"density": options.ties_density, "weight": 1.0},
            f"sign conflict {sign_conflict:.3f} >= {options.ties_sign_conflict:g}: averaging would cancel that share "
            f"of the task vectors' mass; TIES keeps the top {options.ties_density:g} of each delta and elects one sign",
            sign_conflict,
        )
    unknown = "" if sign_conflict is not None else " (sign conflict unknown: give the base and both checkpoints to measure it)"
    if metric != EUCLIDEAN and kinship >= options.linear_kinship:
        return MethodAdvice(
            "linear",
            {"weight": 1.0},
            f"kinship {kinship:.3f} >= {options.linear_kinship:g}: the models are similar, where plain averaging "
            f"is competitive (DAM, arXiv 2410.08371){unknown}",
            sign_conflict,
        )
    why = (
        f"kinship {kinship:.3f} < {options.linear_kinship:g}"
        if metric != EUCLIDEAN
        else "Euclidean distance has no universal threshold for averaging"
    )
    return MethodAdvice(
        "slerp",
        {"t": options.slerp_t},
        f"{why}: SLERP keeps the norm of dissimilar task vectors that averaging would shrink{unknown}",
        sign_conflict,
    )
