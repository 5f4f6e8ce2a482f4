"""Merge methods, dispatched through one table (as mergekit's `merge_methods/`).

A `MergeMethod` says what the planner and the runner need to know of a method: its name, how
many models it takes and whether it needs a base, which parameters it takes (each a mergekit
parameter setting: filters and layer gradients, resolved per tensor by the planner) and how they
are validated, and its per-tensor kernel, written against `context.MergeContext` only. The runner
dispatches every tensor made from the models to `merge_tensor`; tensors copied from one model or
checked identical are the runner's own work and do not depend on the method.

`slerp` is the only entry today. The next ones fit without touching the runner: linear,
task_arithmetic, ties, dare_ties, dare_linear and model_stock take n models and a base
(`min_models`/`max_models`, `needs_base`) and per-tensor weights or densities (`parameters`);
a trained method such as DAM, whose coefficients are tensors rather than numbers, would read
them through its own kernel from the context.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kinship_service.errors import InvalidArgument
from kinship_service.merge.context import TensorMerge
from kinship_service.merge.slerp import resolve_t, validate_spec
from kinship_service.merge.slerp_stream import merge_slerp_tensor

if TYPE_CHECKING:
    from kinship_service.merge.plan import MergeSettings


def _validate_parameters(method: MergeMethod, settings: MergeSettings) -> None:
    """INVALID_ARGUMENT unless the settings give each of the method's parameters, each valid."""
    given = settings.parameters
    for name in method.parameters:
        if name not in given:
            raise InvalidArgument(f"the {method.name} merge needs the parameter {name}", field=name)
        validate_spec(given[name], field=name)


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: what it takes, how its parameters are checked and resolved, and its per-tensor kernel."""

    name: str
    """The name in requests and in mergekit's `merge_method`."""
    merge_tensor: TensorMerge
    """Makes one planned tensor from the models' tensors (see `context.MergeContext`)."""
    parameters: tuple[str, ...] = ()
    """Parameters the method takes, each a mergekit parameter setting resolved per tensor."""
    min_models: int = 2
    max_models: int = 2
    needs_base: bool = False
    """Whether a base model is required besides the merged models (task vectors are taken against it)."""
    validate: Callable[[MergeMethod, MergeSettings], None] = _validate_parameters
    """Raises InvalidArgument naming the field when the settings do not suit the method."""

    def check(self, settings: MergeSettings) -> None:
        """Validate `settings` for this method (INVALID_ARGUMENT naming the field)."""
        self.validate(self, settings)

    def tensor_parameters(self, settings: MergeSettings, name: str, num_layers: int) -> Mapping[str, float]:
        """The method's parameters resolved for tensor `name` (mergekit's filters and layer gradients)."""
        given = settings.parameters
        return {parameter: resolve_t(given[parameter], name, num_layers, parameter) for parameter in self.parameters}


SLERP = MergeMethod(name="slerp", merge_tensor=merge_slerp_tensor, parameters=("t",), min_models=2, max_models=2)
"""Spherical interpolation of model A (the base, t = 0) and model B (t = 1), as mergekit 0.1.5's `slerp`."""

METHODS: dict[str, MergeMethod] = {method.name: method for method in (SLERP,)}
"""Every merge method the service runs, by name."""


def get_method(name: str) -> MergeMethod:
    """The method called `name`; INVALID_ARGUMENT listing the known ones otherwise."""
    method = METHODS.get(name)
    if method is None:
        raise InvalidArgument(f"unknown merge method {name!r}; use one of: {', '.join(sorted(METHODS))}", field="merge_method")
    return method
