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
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from kinship_service.errors import InvalidArgument
from kinship_service.kinship.similarity import layer_index

DOT_THRESHOLD = 0.9995
"""|cos| above which the two tensors count as colinear and are interpolated linearly (mergekit)."""
NORM_EPS = 1e-8
"""Norms at or below this leave the vector unnormalised (mergekit's `normalize`)."""
ROW = 256
"""Elements per float32 partial dot product before accumulation in float64."""

_PRE_LAYER = re.compile(r"embed|wte|wpe|tok_embeddings|word_embeddings")


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
        return cls((FactorEntry("", (float(value),)),))

    def to_json(self) -> list[dict[str, Any]]:
        """A JSON-able form (persistence, model cards)."""
        return [{"filter": e.filter, "anchors": list(e.anchors), "gradient": e.gradient} for e in self.entries]

    @classmethod
    def from_json(cls, data: Sequence[dict[str, Any]]) -> InterpolationSpec:
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
        return 0.0 if _PRE_LAYER.search(name) else 1.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, index / (num_layers - 1))


def resolve_t(spec: InterpolationSpec, name: str, num_layers: int) -> float:
    """The t of tensor `name`: the first entry whose filter occurs in the name, at its layer fraction.

    Raises InvalidArgument when no entry matches (add an entry without filter as the fallback).
    """
    fraction = layer_fraction(name, num_layers)
    for entry in spec.entries:
        if entry.filter in name:
            return entry.value_at(fraction)
    raise InvalidArgument(
        f"no entry of t matches tensor {name}; add an entry without a filter as the fallback", field="t"
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
            self.aa += float(torch.dot(a64, a64))
            self.bb += float(torch.dot(b64, b64))
            self.ab += float(torch.dot(a64, b64))
            return
        full = n - n % ROW
        if full:
            # (rows, 2, ROW) @ (rows, ROW, 2): each row's 2x2 Gram matrix from float32 dot products
            # of 256 elements, then summed in float64.
            rows = pair[:, :full].view(2, -1, ROW).transpose(0, 1)
            gram = torch.bmm(rows, rows.transpose(1, 2)).sum(dim=0, dtype=torch.float64)
            self.aa += float(gram[0, 0])
            self.bb += float(gram[1, 1])
            self.ab += float(gram[0, 1])
        if full < n:
            rest = pair[:, full:].double()
            self.aa += float(torch.dot(rest[0], rest[0]))
            self.bb += float(torch.dot(rest[1], rest[1]))
            self.ab += float(torch.dot(rest[0], rest[1]))

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


# --------------------------------------------------------------------------------------------
# mergekit YAML
# --------------------------------------------------------------------------------------------

_DTYPE_NAMES = {
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
}


def dtype_name(text: str, field: str) -> str:
    """A dtype spelling (`bfloat16`, `float16`, `float32` and short forms) -> safetensors name."""
    key = str(text).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise InvalidArgument(f"{field}: unsupported dtype {text!r}; use bfloat16, float16 or float32", field=field)
    return _DTYPE_NAMES[key]


@dataclass(frozen=True)
class MergekitConfig:
    """What the service takes from a mergekit SLERP configuration."""

    model_a: str
    """`base_model` (t = 0)."""
    model_b: str
    t: InterpolationSpec
    dtype: str | None
    """mergekit's `dtype`: inputs are rounded to it before merging (safetensors name)."""
    out_dtype: str | None
    """mergekit's `out_dtype` (safetensors name)."""
    num_layers: int | None
    """The layer count of the slice (`layer_range` end), when the config gives one."""


def _setting_entries(setting: Any, where: str) -> list[FactorEntry]:
    """mergekit's ParameterSetting for t -> entries (a constant, a gradient, or conditional entries)."""

    def scalar_or_gradient(value: Any, at: str) -> tuple[tuple[float, ...], bool]:
        if isinstance(value, bool):
            raise InvalidArgument(f"{at}: t must be a number or a list of numbers, got {value!r}", field="mergekit_yaml")
        if isinstance(value, (int, float)):
            return (float(value),), False
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return tuple(float(v) for v in value), True
        raise InvalidArgument(f"{at}: t must be a number or a non-empty list of numbers, got {value!r}", field="mergekit_yaml")

    def conditional(item: dict[str, Any], at: str) -> FactorEntry:
        if "value" not in item:
            raise InvalidArgument(f"{at}: a conditional t entry needs `value`", field="mergekit_yaml")
        unknown = set(item) - {"value", "filter"}
        if unknown:
            raise InvalidArgument(f"{at}: unknown keys {sorted(unknown)} in a t entry", field="mergekit_yaml")
        raw_filter = item.get("filter")
        filter_text = "" if raw_filter in (None, "*") else str(raw_filter)
        anchors, gradient = scalar_or_gradient(item["value"], at)
        return FactorEntry(filter_text, anchors, gradient)

    if isinstance(setting, dict):
        return [conditional(setting, where)]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        return [conditional(e, f"{where}[{i}]") for i, e in enumerate(setting)]
    anchors, gradient = scalar_or_gradient(setting, where)
    return [FactorEntry("", anchors, gradient)]


def _model_name(value: Any, where: str) -> str:
    if isinstance(value, dict) and "model" in value:  # mergekit also accepts {model: ..., lora: ...}
        if value.get("lora"):
            raise InvalidArgument(f"{where}: LoRA references are not supported; merge the adapter first", field="mergekit_yaml")
        value = value["model"]
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{where}: expected a model name, got {value!r}", field="mergekit_yaml")
    if "+" in value:
        raise InvalidArgument(f"{where}: LoRA references (`model+lora`) are not supported", field="mergekit_yaml")
    return value.strip()


MAX_YAML_NODES = 10_000
"""Values a mergekit_yaml document may hold once its aliases are expanded (real configs hold tens)."""


def _check_expanded_size(doc: Any) -> None:
    """INVALID_ARGUMENT for a document that expands to more than MAX_YAML_NODES values.

    YAML aliases let a few hundred bytes stand for billions of values ("billion laughs"), or a
    structure that contains itself; anything that walks, prints or compares such a document
    would never finish. Counting with a bounded walk stops after MAX_YAML_NODES steps.
    """
    stack = [doc]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise InvalidArgument(
                f"mergekit_yaml expands to more than {MAX_YAML_NODES} values (YAML aliases?); send a plain SLERP config",
                reason="YAML_TOO_LARGE",
                field="mergekit_yaml",
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def parse_mergekit_yaml(text: str) -> MergekitConfig:
    """Read a mergekit SLERP configuration (`slices:` or `models:` form) into our structures.

    Supported: `merge_method: slerp`, `base_model`, two models over the same full layer range in a
    single slice (or the `models:` list), `parameters.t` at the top level or on the slice (slice
    entries are tried first, then the top-level ones, as mergekit does), `dtype` and `out_dtype`.
    Anything else mergekit can express (several slices, layer stacking, tokenizer surgery) is
    INVALID_ARGUMENT naming the part.
    """
    try:
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise InvalidArgument(f"mergekit_yaml is not valid YAML: {str(exc)[:500]}", field="mergekit_yaml") from None
    _check_expanded_size(doc)
    if not isinstance(doc, dict):
        raise InvalidArgument("mergekit_yaml must be a mapping with merge_method, base_model and models or slices", field="mergekit_yaml")
    method = str(doc.get("merge_method", "")).lower()
    if method != "slerp":
        raise InvalidArgument(f"mergekit_yaml: merge_method must be slerp, got {doc.get('merge_method')!r}", field="mergekit_yaml")
    unsupported = {"tokenizer_source", "tokenizer", "modules", "chat_template"} & {k for k, v in doc.items() if v}
    if unsupported:
        raise InvalidArgument(f"mergekit_yaml: {sorted(unsupported)} are not supported by this service", field="mergekit_yaml")
    if "base_model" not in doc:
        raise InvalidArgument("mergekit_yaml: base_model is required for slerp (it is model A, t = 0)", field="mergekit_yaml")
    base = _model_name(doc["base_model"], "base_model")

    slices, models = doc.get("slices"), doc.get("models")
    if bool(slices) == bool(models):
        raise InvalidArgument("mergekit_yaml: give exactly one of `slices` or `models`", field="mergekit_yaml")
    entries: list[FactorEntry] = []
    num_layers: int | None = None
    if slices:
        if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
            raise InvalidArgument(
                "mergekit_yaml: exactly one slice is supported (layer stacking across slices is not)", field="mergekit_yaml"
            )
        sources = slices[0].get("sources")
        if not isinstance(sources, list) or not sources:
            raise InvalidArgument("mergekit_yaml: slices[0].sources must list the models", field="mergekit_yaml")
        names = []
        ranges = set()
        for i, source in enumerate(sources):
            if not isinstance(source, dict):
                raise InvalidArgument(f"mergekit_yaml: slices[0].sources[{i}] must be a mapping", field="mergekit_yaml")
            names.append(_model_name(source.get("model"), f"slices[0].sources[{i}].model"))
            layer_range = source.get("layer_range")
            if layer_range is not None:
                if (
                    not isinstance(layer_range, list)
                    or len(layer_range) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
                ):
                    raise InvalidArgument(f"mergekit_yaml: slices[0].sources[{i}].layer_range must be [start, end]", field="mergekit_yaml")
                ranges.add(tuple(layer_range))
        if len(ranges) > 1:
            raise InvalidArgument("mergekit_yaml: both sources must use the same layer_range", field="mergekit_yaml")
        if ranges:
            start, end = ranges.pop()
            if start != 0 or end <= 0:
                raise InvalidArgument(
                    "mergekit_yaml: only a full layer range [0, num_layers] is supported", field="mergekit_yaml"
                )
            num_layers = end
        slice_params = slices[0].get("parameters") or {}
        if not isinstance(slice_params, dict):
            raise InvalidArgument("mergekit_yaml: slices[0].parameters must be a mapping", field="mergekit_yaml")
        if "t" in slice_params:
            entries += _setting_entries(slice_params["t"], "slices[0].parameters.t")
    else:
        if not isinstance(models, list):
            raise InvalidArgument("mergekit_yaml: models must be a list", field="mergekit_yaml")
        names = [_model_name(m, f"models[{i}]") for i, m in enumerate(models)]
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument("mergekit_yaml: parameters must be a mapping", field="mergekit_yaml")
    if "t" in params:
        entries += _setting_entries(params["t"], "parameters.t")
    if not entries:
        raise InvalidArgument("mergekit_yaml: parameters.t is required for slerp", field="mergekit_yaml")

    others = [n for n in dict.fromkeys(names) if n != base]
    if len(others) != 1 or len(set(names) | {base}) != 2:
        raise InvalidArgument(
            f"mergekit_yaml: slerp merges exactly two models, base_model and one other; got {sorted(set(names) | {base})}",
            field="mergekit_yaml",
        )
    spec = validate_spec(InterpolationSpec(tuple(entries)), field="mergekit_yaml")
    dtype = dtype_name(doc["dtype"], "mergekit_yaml.dtype") if doc.get("dtype") else None
    out_dtype = dtype_name(doc["out_dtype"], "mergekit_yaml.out_dtype") if doc.get("out_dtype") else None
    return MergekitConfig(base, others[0], spec, dtype, out_dtype, num_layers)


def describe_spec(spec: InterpolationSpec) -> str:
    """A one-line human form of t, e.g. `self_attn: [0, 0.5, 1]; *: 0.5`."""

    def value(entry: FactorEntry) -> str:
        text = ", ".join(f"{a:g}" for a in entry.anchors)
        return f"[{text}]" if entry.gradient else text

    return "; ".join(f"{e.filter or '*'}: {value(e)}" for e in spec.entries)


def resolve_table(spec: InterpolationSpec, names: Iterable[str], num_layers: int) -> dict[str, float]:
    """t for each name (convenience for planning and tests)."""
    return {name: resolve_t(spec, name, num_layers) for name in names}
