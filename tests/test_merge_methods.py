"""The merge-method registry: lookup, parameter validation and per-tensor resolution through the planner."""

from __future__ import annotations

from pathlib import Path

import pytest

from kinship_service.checkpoints.safetensors_header import TensorInfo
from kinship_service.errors import InvalidArgument
from kinship_service.merge.methods import METHODS, SLERP, get_method
from kinship_service.merge.plan import KIND_COPY_A, KIND_MERGE, MergeSettings, plan_merge
from kinship_service.merge.slerp import FactorEntry, InterpolationSpec


def test_methods_are_registered_with_their_shapes() -> None:
    assert get_method("slerp") is SLERP
    assert set(METHODS) == {"slerp", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "model_stock"}
    assert (SLERP.min_models, SLERP.max_models, SLERP.needs_base, SLERP.parameter_names) == (2, 2, False, ("t",))
    shapes = {name: (m.min_models, m.max_models, m.needs_base) for name, m in METHODS.items()}
    assert shapes["linear"] == (2, None, False) and shapes["model_stock"] == (2, None, True) and shapes["ties"] == (1, None, True)


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(InvalidArgument, match="unknown merge method 'nuslerp'; use one of: dare_linear, dare_ties, linear"):
        get_method("nuslerp")


def test_invalid_parameter_is_refused_naming_it() -> None:
    with pytest.raises(InvalidArgument, match=r"t values must be finite numbers in \[0, 1\]"):
        SLERP.check(MergeSettings(t=InterpolationSpec.constant(1.5)))


def _info(name: str, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name=name, dtype="F32", shape=shape, file=Path("/nonexistent"))


def test_plan_resolves_the_method_parameters_per_tensor() -> None:
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"]
    infos = {n: _info(n, (4, 4)) for n in names}
    extra = {"model.norm.weight": _info("model.norm.weight", (4,))}
    spec = InterpolationSpec((FactorEntry("mlp", (0.0, 1.0), True), FactorEntry("", (0.25,))))
    plan = plan_merge({**infos, **extra}, infos, MergeSettings(t=spec), None)
    kinds = {t.name: (t.kind, dict(t.parameters)) for t in plan.tensors}
    assert kinds == {
        "model.embed_tokens.weight": (KIND_MERGE, {"t": 0.25}),
        "model.layers.0.mlp.up_proj.weight": (KIND_MERGE, {"t": 0.0}),
        "model.layers.1.mlp.up_proj.weight": (KIND_MERGE, {"t": 1.0}),
        "lm_head.weight": (KIND_MERGE, {"t": 0.25}),
        "model.norm.weight": (KIND_COPY_A, {}),
    }
    assert [t.name for t in plan.tensors][0] == "model.embed_tokens.weight"
