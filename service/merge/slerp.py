"""SLERP merge math, compatible with mergekit 0.1.5's `slerp` method. Pure: tensors in, tensors out, no I/O.

Per tensor (mergekit's `slerp()`):

- flatten A and B; their L2 norms, with a norm <= 1e-8 counting as 1 (mergekit leaves such a
  vector unnormalised);
- `dot = <a, b> / (|a| |b|)`, clamped to [-1, 1];
- `|dot| > 0.9995`: linear interpolation `(1 - t) a + t b`;
- else `theta = acos(dot)` and `sin(theta - t theta) / sin(theta) * a + sin(t theta) / sin(theta) * b`,
  applied to the un-normalised tensors.

The three reductions (`<a,a>`, `<b,b>`, `<a,b>`) are accumulated in float64 from float32 partial
dot products over rows of 256 elements, so they stay accurate to about 1e-8 relative to the norms
however large the tensor (mergekit's one-shot float32 `np.linalg.norm` drifts by ~1e-4 on tens of
millions of elements). The interpolation itself runs in float32 like mergekit, or in float64 when
an input is float64 (mergekit always uses float32 there).

`t` resolution follows mergekit's `evaluate_setting` and planner: a list of entries, the first whose
filter is a substring of the tensor name wins (an empty filter matches every name, so it belongs
last as the fallback); an entry's anchors are interpolated at the tensor's layer fraction
`layer / (num_layers - 1)`. Tensors before the layers (embeddings) use fraction 0 and tensors after
them (final norm, lm_head) fraction 1, as mergekit's planner does; a model with a single layer uses
fraction 1 for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kinship_service.errors import InvalidArgument
from kinship_service.kinship.similarity import EMBEDDING_NAME, layer_index

DOT_THRESHOLD = 0.9995
"""|cos| above which the two tensors count as colinear and are interpolated linearly (mergekit)."""
NORM_EPS = 1e-8
"""Norms at or below this leave the vector unnormalised (mergekit's `normalize`)."""
ROW = 256
"""Elements per float32 partial dot product before accumulation in float64."""

# --------------------------------------------------------------------------------------------
# The interpolation factor t
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactorEntry:
    """One entry of `t`: a constant (one anchor, `gradient=False`) or anchors across the layers."""

    filter: str
    """Substring of tensor names this entry applies to; empty matches every tensor."""
    anchors: tuple[float, ...]
    gradient: bool = False

    def value_at(self, fraction: float) -> float:
        """The entry's value at a layer fraction in [0, 1] (mergekit's gradient interpolation)."""
        return interpolate_anchors(self.anchors, fraction)


@dataclass(frozen=True)
class InterpolationSpec:
    """The whole `t`: entries tried in order."""

    entries: tuple[FactorEntry, ...]

    @classmethod
    def constant(cls, value: float) -> InterpolationSpec:
        """One value for every tensor."""
        return cls((FactorEntry("", (float(value),)),))

    def to_json(self) -> list[dict[str, Any]]:
        """A JSON-able form (persistence, model cards)."""
        return [{"filter": e.filter, "anchors": list(e.anchors), "gradient": e.gradient} for e in self.entries]

    @classmethod
    def from_json(cls, data: Sequence[dict[str, Any]]) -> InterpolationSpec:
        """The spec `to_json` described."""
        return cls(tuple(FactorEntry(str(d["filter"]), tuple(float(a) for a in d["anchors"]), bool(d["gradient"])) for d in data))

    def to_mergekit(self) -> Any:
        """mergekit's YAML form of these parameters (`parameters.t`)."""

        def value(entry: FactorEntry) -> Any:
            return list(entry.anchors) if entry.gradient else entry.anchors[0]

        if len(self.entries) == 1 and not self.entries[0].filter:
            return value(self.entries[0])
        out = []
        for entry in self.entries:
            item: dict[str, Any] = {"value": value(entry)}
            if entry.filter:
                item = {"filter": entry.filter, **item}
            out.append(item)
        return out


def validate_spec(spec: InterpolationSpec, field: str = "t") -> InterpolationSpec:
    """Raise InvalidArgument unless every entry has anchors, all finite and in [0, 1]."""
    if not spec.entries:
        raise InvalidArgument("t has no entries: give a number, a list of anchors, or filtered entries", field=field)
    for i, entry in enumerate(spec.entries):
        where = f"{field}.entries[{i}]"
        if not entry.anchors:
            raise InvalidArgument(f"{where} has no value: give a constant or at least one anchor", field=where)
        for value in entry.anchors:
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise InvalidArgument(f"{where}: t values must be finite numbers in [0, 1], got {value!r}", field=where)
        if "\x00" in entry.filter:
            raise InvalidArgument(f"{where}.filter contains a NUL byte", field=where)
    return spec


def interpolate_anchors(anchors: Sequence[float], fraction: float) -> float:
    """mergekit's gradient: `scaled = fraction * (n - 1)`, linear between neighbouring anchors."""
    if len(anchors) == 1:
        return float(anchors[0])
    scaled = fraction * (len(anchors) - 1)
    i0 = int(scaled)
    i1 = min(len(anchors) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * anchors[i0] + frac * anchors[i1]


def layer_fraction(name: str, num_layers: int) -> float:
    """Where a tensor sits along the layers, in [0, 1], as mergekit's planner assigns it.

    Layer L of N: `L / (N - 1)` (1 when N == 1). Outside numbered layers: 0 for embeddings
    (mergekit's pre-weights), 1 for everything else (final norm, lm_head: its post-weights).
    """
    index = layer_index(name)
    if index is None:
        return 0.0 if EMBEDDING_NAME.search(name) else 1.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, index / (num_layers - 1))


def resolve_t(spec: InterpolationSpec, name: str, num_layers: int, parameter: str = "t") -> float:
    """The value of tensor `name`: the first entry whose filter occurs in the name, at its layer fraction.

    mergekit resolves every parameter setting this way (`parameter` names it in errors; slerp's is t).
    Raises InvalidArgument when no entry matches (add an entry without filter as the fallback).
    """
    fraction = layer_fraction(name, num_layers)
    for entry in spec.entries:
        if entry.filter in name:
            return entry.value_at(fraction)
    raise InvalidArgument(
        f"no entry of {parameter} matches tensor {name}; add an entry without a filter as the fallback", field=parameter
    )


# --------------------------------------------------------------------------------------------
# SLERP of one tensor
# --------------------------------------------------------------------------------------------


def working_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


class SlerpStats:
    """Accumulates `<a,a>`, `<b,b>`, `<a,b>` in float64 over consecutive chunks of two tensors."""

    def __init__(self) -> None:
        self.aa = 0.0
        self.bb = 0.0
        self.ab = 0.0
        self.count = 0

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add a chunk: `a` and `b` are flat float32 or float64 tensors of equal length."""
        if a.shape != b.shape or a.dim() != 1:
            raise ValueError(f"chunks must be flat and equal in length, got {tuple(a.shape)} and {tuple(b.shape)}")
        self.update_pair(torch.stack((a, b)))

    def update_pair(self, pair: torch.Tensor) -> None:
        """Add a chunk given as a (2, k) tensor: row 0 from A, row 1 from B (rows may be strided views)."""
        if pair.dim() != 2 or pair.shape[0] != 2:
            raise ValueError(f"expected a (2, k) chunk, got {tuple(pair.shape)}")
        n = pair.shape[1]
        self.count += n
        if pair.dtype == torch.float64:
            a64, b64 = pair[0], pair[1]
            self._add(torch.stack((torch.dot(a64, a64), torch.dot(b64, b64), torch.dot(a64, b64))))
            return
        full = n - n % ROW
        if full:
            # (rows, 2, ROW) @ (rows, ROW, 2): each row's 2x2 Gram matrix from float32 dot products
            # of 256 elements, then summed in float64.
            rows = pair[:, :full].view(2, -1, ROW).transpose(0, 1)
            gram = torch.bmm(rows, rows.transpose(1, 2)).sum(dim=0, dtype=torch.float64)
            self._add(torch.stack((gram[0, 0], gram[1, 1], gram[0, 1])))
        if full < n:
            rest = pair[:, full:].double()
            self._add(torch.stack((torch.dot(rest[0], rest[0]), torch.dot(rest[1], rest[1]), torch.dot(rest[0], rest[1]))))

    def _add(self, sums: torch.Tensor) -> None:
        """Add `<a,a>`, `<b,b>`, `<a,b>` given as one float64 tensor (one copy from a CUDA device, not three)."""
        aa, bb, ab = sums.tolist()
        self.aa += aa
        self.bb += bb
        self.ab += ab

    @classmethod
    def total(cls, parts: Iterable[SlerpStats]) -> SlerpStats:
        """The sum of partial statistics, added in the given order (deterministic)."""
        out = cls()
        for part in parts:
            out.aa += part.aa
            out.bb += part.bb
            out.ab += part.ab
            out.count += part.count
        return out

    def coefficients(self, t: float) -> Coefficients:
        """The SLERP weights of A and B at `t` from the accumulated reductions."""
        return slerp_coefficients(self.aa, self.bb, self.ab, t)


@dataclass(frozen=True)
class Coefficients:
    """`out = ca * a + cb * b`; `linear` says the colinear fallback was taken."""

    ca: float
    cb: float
    linear: bool
    dot: float


def slerp_coefficients(aa: float, bb: float, ab: float, t: float) -> Coefficients:
    """The SLERP weights of A and B from the reductions `<a,a>`, `<b,b>`, `<a,b>` (float64)."""
    norm_a = math.sqrt(max(aa, 0.0))
    norm_b = math.sqrt(max(bb, 0.0))
    scale_a = norm_a if norm_a > NORM_EPS else 1.0
    scale_b = norm_b if norm_b > NORM_EPS else 1.0
    dot = ab / (scale_a * scale_b)
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        return Coefficients(1.0 - t, t, True, dot)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    theta_t = theta * t
    return Coefficients(math.sin(theta - theta_t) / sin_theta, math.sin(theta_t) / sin_theta, False, dot)


def combine(a: torch.Tensor, b: torch.Tensor, coefficients: Coefficients, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """`ca * a + cb * b` in the inputs' (working) dtype, each product rounded as mergekit's numpy does.

    `scratch`, when given, is a buffer like `b` that may be overwritten; the result reuses `a`'s
    storage only when `a` is not needed afterwards, so callers pass copies they own.
    """
    out = torch.mul(a, coefficients.ca)
    if scratch is None:
        scratch = torch.mul(b, coefficients.cb)
    else:
        torch.mul(b, coefficients.cb, out=scratch)
    return out.add_(scratch)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, Coefficients]:
    """SLERP of two whole tensors of one shape, in the working dtype (float32, or float64)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    work = working_dtype(a.dtype, b.dtype)
    fa = a.reshape(-1).to(work)
    fb = b.reshape(-1).to(work)
    stats = SlerpStats()
    stats.update(fa, fb)
    coefficients = stats.coefficients(t)
    return combine(fa, fb, coefficients).view(a.shape), coefficients


def describe_spec(spec: InterpolationSpec) -> str:
    """A one-line human form of t, e.g. `self_attn: [0, 0.5, 1]; *: 0.5`."""

    def value(entry: FactorEntry) -> str:
        text = ", ".join(f"{a:g}" for a in entry.anchors)
        return f"[{text}]" if entry.gradient else text

    return "; ".join(f"{e.filter or '*'}: {value(e)}" for e in spec.entries)

