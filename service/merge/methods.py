"""Merge methods, dispatched through one table (as mergekit's `merge_methods/`).

A `MergeMethod` says what the planner and the runner need to know of a method: its name, how
many models it takes and whether it needs a base, which numeric parameters it takes (global or
per model, each a mergekit parameter setting: filters and layer gradients, resolved per tensor
by the planner) with their ranges and defaults, its switches, and its per-tensor kernel, written
against `context.MergeContext` only. The runner dispatches every tensor made from the models to
`merge_tensor`; tensors copied from one model or checked identical are the runner's own work.

The runner's inputs are in the method's order: `slerp` takes A and B; the task-vector methods
(`task_arithmetic`, `ties`, `dare_ties`, `dare_linear`, `model_stock`) take the base first, then
the merged models; `linear` takes the merged models only. A trained method such as DAM, whose
coefficients are tensors rather than numbers, would read them through its own kernel from the
context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kinship_service.errors import InvalidArgument
from kinship_service.merge.context import TensorMerge
from kinship_service.merge.model_stock import merge_model_stock_tensor
from kinship_service.merge.parameters import ParameterSpec, model_key, probe_names
from kinship_service.merge.slerp import resolve_t
from kinship_service.merge.slerp_stream import merge_slerp_tensor
from kinship_service.merge.task_vectors import merge_linear_tensor, merge_task_vector_tensor

if TYPE_CHECKING:
    from kinship_service.merge.plan import MergeSettings

WEIGHT_SUM_EPS = 1e-8
"""|sum of weights| below which normalizing would divide by zero (mergekit's own threshold)."""


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: what it takes, how its parameters are checked and resolved, and its per-tensor kernel."""

    name: str
    """The name in requests and in mergekit's `merge_method`."""
    merge_tensor: TensorMerge
    """Makes one planned tensor from the models' tensors (see `context.MergeContext`)."""
    parameters: tuple[ParameterSpec, ...] = ()
    """Numeric parameters, each a mergekit parameter setting resolved per tensor."""
    min_models: int = 2
    """Merged models at least (the base not counted)."""
    max_models: int | None = None
    """Merged models at most; None: no limit."""
    needs_base: bool = False
    """Whether a base model is required besides the merged models (task vectors are taken against it)."""
    normalize: bool | None = None
    """The default of `normalize`; None: the method has no such switch."""
    rescale: bool | None = None
    """The default of `rescale` (DARE's L1 rescaling); None: no such switch."""
    seeded: bool = False
    """Whether `seed` is used (random masks)."""
    consensus: bool = False
    """TIES's majority sign: only task-vector elements agreeing with the sign of their weighted sum are merged."""
    sparsification: str | None = None
    """How task vectors are sparsified to `density`: `magnitude` (TIES: top-k), `random` (DARE), None."""
    validate: Callable[[MergeMethod, MergeSettings], None] | None = None
    """Extra checks beyond ranges (INVALID_ARGUMENT naming the field)."""

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The numeric parameters' names."""
        return tuple(p.name for p in self.parameters)

    def spec(self, name: str) -> ParameterSpec:
        """The ParameterSpec called `name` (KeyError when the method has none)."""
        return next(p for p in self.parameters if p.name == name)

    def base_inputs(self) -> int:
        """How many runner inputs come before the merged models (1 when the base is an input)."""
        return 1 if self.needs_base else 0

    def check(self, settings: MergeSettings) -> None:
        """Validate `settings` for this method (INVALID_ARGUMENT naming the field)."""
        given = settings.method_parameters
        count = settings.model_count
        for parameter in self.parameters:
            if parameter.scope == "global":
                spec = settings.parameters.get(parameter.name)
                if spec is None and parameter.default is None:
                    raise InvalidArgument(f"the {self.name} merge needs the parameter {parameter.name}", field=parameter.name)
                if spec is not None:
                    parameter.check(spec, parameter.name)
                continue
            for model in range(count):
                spec = given.setting(parameter.name, model)
                field = f"models[{model}].{parameter.name}"
                if spec is None and parameter.default is None:
                    raise InvalidArgument(
                        f"the {self.name} merge needs {parameter.name} for every model: give it globally or for models[{model}]",
                        field=field,
                    )
                if spec is not None:
                    parameter.check(spec, field)
        unknown = sorted(set(given.global_settings) - set(self.parameter_names))
        for model_settings in given.model_settings:
            unknown += sorted(set(model_settings) - {p.name for p in self.parameters if p.scope == "model"})
        if unknown:
            raise InvalidArgument(
                f"the {self.name} merge does not take {', '.join(sorted(set(unknown)))}; it takes: "
                f"{', '.join(self.parameter_names) or 'no numeric parameters'}",
                field=sorted(set(unknown))[0],
            )
        if given.normalize is not None and self.normalize is None:
            raise InvalidArgument(f"the {self.name} merge has no normalize switch", field="normalize")
        if given.rescale is not None and self.rescale is None:
            raise InvalidArgument(f"the {self.name} merge has no rescale switch (only dare_ties and dare_linear)", field="rescale")
        if self.validate is not None:
            self.validate(self, settings)

    def resolve(self, settings: MergeSettings, parameter: ParameterSpec, model: int | None, name: str, num_layers: int) -> float:
        """One parameter's value for tensor `name` (mergekit's filters and layer gradients)."""
        spec = settings.parameters.get(parameter.name) if model is None else settings.method_parameters.setting(parameter.name, model)
        if spec is None:
            assert parameter.default is not None  # check() refused missing required parameters
            return parameter.default
        field = parameter.name if model is None else f"models[{model}].{parameter.name}"
        return resolve_t(spec, name, num_layers, field)

    def tensor_parameters(self, settings: MergeSettings, name: str, num_layers: int) -> Mapping[str, float]:
        """The method's parameters resolved for tensor `name`: global ones by name, per-model ones as `weight.0`."""
        values: dict[str, float] = {}
        for parameter in self.parameters:
            if parameter.scope == "global":
                values[parameter.name] = self.resolve(settings, parameter, None, name, num_layers)
            else:
                for model in range(settings.model_count):
                    values[model_key(parameter.name, model)] = self.resolve(settings, parameter, model, name, num_layers)
        if self.weights_must_not_cancel(settings):
            total = sum(values[model_key("weight", m)] for m in range(settings.model_count))
            if abs(total) < WEIGHT_SUM_EPS:
                raise InvalidArgument(
                    f"the weights of tensor {name} sum to {total:g}; with normalize the merge would divide by zero: "
                    "change the weights or turn normalize off",
                    field="weight",
                )
        return values

    def flag(self, given: bool | None, default: bool | None) -> bool:
        """A switch's value: as given, else the method's default (False when it has none)."""
        return bool(default) if given is None else given

    def normalizes(self, settings: MergeSettings) -> bool:
        """Whether this merge divides by the sum of the weights."""
        return self.normalize is not None and self.flag(settings.method_parameters.normalize, self.normalize)

    def rescales(self, settings: MergeSettings) -> bool:
        """Whether DARE's sparsified task vectors are rescaled to their L1 norm."""
        return self.rescale is not None and self.flag(settings.method_parameters.rescale, self.rescale)

    def weights_must_not_cancel(self, settings: MergeSettings) -> bool:
        """Whether a zero sum of weights is an error: normalizing by the plain sum (TIES's per-element divisor is safe)."""
        return "weight" in self.parameter_names and self.normalizes(settings) and not self.consensus


def _check_weight_sums(method: MergeMethod, settings: MergeSettings) -> None:
    """INVALID_ARGUMENT before the merge starts when the weights cancel for some tensor (probed on every filter)."""
    if not method.weights_must_not_cancel(settings):
        return
    count = settings.model_count
    specs = [s for s in (settings.method_parameters.setting("weight", m) for m in range(count)) if s is not None]
    layers = sorted({len(e.anchors) for s in specs for e in s.entries if e.gradient} | {2})
    for name in probe_names(specs):
        # A gradient is linear between its anchors: the sum of non-negative ones is zero somewhere
        # only if it is zero at an anchor position, so probing each position finds it.
        for anchors in layers:
            for position in range(anchors):
                fraction = position / (anchors - 1)
                total = 0.0
                for m in range(count):
                    spec = settings.method_parameters.setting("weight", m)
                    assert spec is not None
                    entry = next((e for e in spec.entries if e.filter in name), None)
                    total += entry.value_at(fraction) if entry is not None else math.nan
                if abs(total) < WEIGHT_SUM_EPS:
                    where = f" for tensors matching {name!r}" if name != "\x00" else ""
                    raise InvalidArgument(
                        f"the weights sum to {total:g}{where}; with normalize the merge would divide by zero: "
                        "change the weights or turn normalize off",
                        field="weight",
                    )


T = ParameterSpec("t", "global", None, 0.0, 1.0)
LAMBDA = ParameterSpec("lambda", "global", 1.0)
WEIGHT = ParameterSpec("weight", "model")
NON_NEGATIVE_WEIGHT = ParameterSpec("weight", "model", None, 0.0)
DENSITY = ParameterSpec("density", "model", 1.0, 0.0, 1.0, low_open=True)

SLERP = MergeMethod(name="slerp", merge_tensor=merge_slerp_tensor, parameters=(T,), min_models=2, max_models=2)
"""Spherical interpolation of model A (t = 0) and model B (t = 1), as mergekit 0.1.5's `slerp`."""
LINEAR = MergeMethod(
    name="linear", merge_tensor=merge_linear_tensor, parameters=(NON_NEGATIVE_WEIGHT,), normalize=True, validate=_check_weight_sums
)
"""Weighted average of the models (model soups): `sum w_i x_i / sum w_i` (without normalize: `sum w_i x_i`)."""
TASK_ARITHMETIC = MergeMethod(
    name="task_arithmetic",
    merge_tensor=merge_task_vector_tensor,
    parameters=(WEIGHT, LAMBDA),
    min_models=1,
    needs_base=True,
    normalize=False,
    validate=_check_weight_sums,
)
"""`base + lambda * sum w_i (x_i - base)` (divided by `sum w_i` with normalize)."""
TIES = MergeMethod(
    name="ties",
    merge_tensor=merge_task_vector_tensor,
    parameters=(WEIGHT, DENSITY, LAMBDA),
    min_models=1,
    needs_base=True,
    normalize=True,
    consensus=True,
    sparsification="magnitude",
)
"""TIES: each task vector keeps its `density` largest magnitudes, then elements agreeing with the majority sign are averaged."""
DARE_TIES = MergeMethod(
    name="dare_ties",
    merge_tensor=merge_task_vector_tensor,
    parameters=(WEIGHT, DENSITY, LAMBDA),
    min_models=1,
    needs_base=True,
    normalize=False,
    rescale=True,
    seeded=True,
    consensus=True,
    sparsification="random",
)
"""DARE with TIES's sign consensus: random drops to `density`, rescaled to the task vector's L1 norm."""
DARE_LINEAR = MergeMethod(
    name="dare_linear",
    merge_tensor=merge_task_vector_tensor,
    parameters=(WEIGHT, DENSITY, LAMBDA),
    min_models=1,
    needs_base=True,
    normalize=False,
    rescale=True,
    seeded=True,
    sparsification="random",
    validate=_check_weight_sums,
)
"""DARE then task arithmetic: random drops to `density`, rescaled, summed with the weights."""
MODEL_STOCK = MergeMethod(name="model_stock", merge_tensor=merge_model_stock_tensor, min_models=2, needs_base=True)
"""Model Stock: the average of the models pulled toward the base by the mean cosine of their task vectors."""

METHODS: dict[str, MergeMethod] = {
    method.name: method for method in (SLERP, LINEAR, TASK_ARITHMETIC, TIES, DARE_TIES, DARE_LINEAR, MODEL_STOCK)
}
"""Every merge method the service runs, by name."""


def get_method(name: str) -> MergeMethod:
    """The method called `name`; INVALID_ARGUMENT listing the known ones otherwise."""
    method = METHODS.get(name)
    if method is None:
        raise InvalidArgument(f"unknown merge method {name!r}; use one of: {', '.join(sorted(METHODS))}", field="merge_method")
    return method
