"""A merge method's numeric parameters: what each one is, its range, and their per-model and global settings.

mergekit gives every numeric parameter as a *parameter setting* (a constant, a layer gradient or
filtered entries; `slerp.InterpolationSpec` holds all three forms), either globally (`parameters:`
at the top of a config, for every model) or per model (a model's own `parameters:`, which win).
`MethodParameters` holds both, plus the method's switches (`normalize`, `rescale`) and DARE's
seed; `ParameterSpec` says what a method takes and the valid range of each value. Pure data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kinship_service.errors import InvalidArgument
from kinship_service.merge.slerp import InterpolationSpec

Scope = Literal["global", "model"]
"""`global`: one setting for the whole merge (t, lambda); `model`: one per merged model (weight, density)."""


@dataclass(frozen=True)
class ParameterSpec:
    """One numeric parameter of a method: its scope, default and valid range."""

    name: str
    scope: Scope
    default: float | None = None
    """None: required (mergekit has no default either)."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    """Whether `low` itself is excluded (density: (0, 1])."""

    def describe_range(self) -> str:
        """The range as text for error messages, e.g. `(0, 1]`."""
        left = "(" if self.low_open or math.isinf(self.low) else "["
        right = ")" if math.isinf(self.high) else "]"
        return f"{left}{self.low:g}, {self.high:g}{right}"

    def check_value(self, value: float, field: str) -> None:
        """INVALID_ARGUMENT naming `field` unless `value` is finite and in range."""
        below = value <= self.low if self.low_open else value < self.low
        if not math.isfinite(value) or below or value > self.high:
            raise InvalidArgument(
                f"{field}: {self.name} values must be finite numbers in {self.describe_range()}, got {value!r}", field=field
            )

    def check(self, spec: InterpolationSpec, field: str) -> None:
        """INVALID_ARGUMENT naming the entry unless every entry has values, all in range, and no NUL in filters."""
        if not spec.entries:
            raise InvalidArgument(f"{field} has no entries: give a number, a list of anchors, or filtered entries", field=field)
        for i, entry in enumerate(spec.entries):
            where = f"{field}.entries[{i}]"
            if not entry.anchors:
                raise InvalidArgument(f"{where} has no value: give a constant or at least one anchor", field=where)
            for value in entry.anchors:
                self.check_value(value, where)
            if "\x00" in entry.filter:
                raise InvalidArgument(f"{where}.filter contains a NUL byte", field=where)


def _specs_to_json(specs: Mapping[str, InterpolationSpec]) -> dict[str, Any]:
    return {name: spec.to_json() for name, spec in sorted(specs.items())}


def _specs_from_json(data: Mapping[str, Any]) -> dict[str, InterpolationSpec]:
    return {str(name): InterpolationSpec.from_json(value) for name, value in data.items()}


@dataclass(frozen=True)
class MethodParameters:
    """A merge's parameter settings: global ones, each model's own, the switches and the seed."""

    global_settings: Mapping[str, InterpolationSpec] = field(default_factory=dict)
    """By parameter name; a per-model parameter given here applies to every model without its own."""
    model_settings: tuple[Mapping[str, InterpolationSpec], ...] = ()
    """One mapping per merged model, in model order (empty: none gives its own)."""
    normalize: bool | None = None
    """None: the method's default (mergekit's)."""
    rescale: bool | None = None
    """DARE: rescale each sparsified task vector to its L1 norm; None: the method's default."""
    seed: int = 0
    """DARE: the seed of the random masks (masks depend on it, the tensor, the model and the element only)."""

    def setting(self, name: str, model: int | None) -> InterpolationSpec | None:
        """The setting of `name` for model `model` (its own, else the global one), or the global one."""
        if model is not None and model < len(self.model_settings) and name in self.model_settings[model]:
            return self.model_settings[model][name]
        return self.global_settings.get(name)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (job records, idempotency)."""
        return {
            "global": _specs_to_json(self.global_settings),
            "models": [_specs_to_json(m) for m in self.model_settings],
            "normalize": self.normalize,
            "rescale": self.rescale,
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MethodParameters:
        """The parameters `to_json` described."""
        return cls(
            _specs_from_json(data.get("global", {})),
            tuple(_specs_from_json(m) for m in data.get("models", [])),
            data.get("normalize"),
            data.get("rescale"),
            int(data.get("seed", 0)),
        )


def model_key(name: str, model: int) -> str:
    """The key of a per-model parameter in a planned tensor's resolved parameters (`weight.0`)."""
    return f"{name}.{model}"


def per_model(values: Mapping[str, float], name: str, count: int) -> list[float]:
    """The resolved values of per-model parameter `name` for models 0..count-1."""
    return [values[model_key(name, i)] for i in range(count)]


def probe_names(settings: Sequence[InterpolationSpec]) -> list[str]:
    """Tensor names that reach each entry of the settings first: every filter, and a name no filter matches.

    Used to check sums of weights before a merge starts, without the models' tensor names.
    """
    names = {entry.filter for spec in settings for entry in spec.entries if entry.filter}
    return sorted(names) + ["\x00"]
