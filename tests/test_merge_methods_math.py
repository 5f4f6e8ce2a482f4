"""linear, task_arithmetic, ties, dare_ties, dare_linear and model_stock through the real runner, against float64 references.

References are in `merge_method_refs` (written from mergekit 0.1.5's definitions, not from the
service's code). Inputs are real safetensors checkpoints; outputs are read back with safetensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from .merge_method_refs import (
    as_f64,
    assert_close_f32,
    bf16_ulps,
    ref_dare_mask,
    ref_linear,
    ref_model_stock,
    ref_task_vectors,
    ref_topk_mask,
    run_method,
)

NAMES = {"model.embed_tokens.weight": (40, 24), "model.layers.0.mlp.up_proj.weight": (48, 130), "model.norm.weight": (24,)}
"""Tensors of several ranges at chunk_elements 4096 (the mlp one: 6240 elements, two ranges)."""


def _family(count: int, seed: int, spread: float = 0.1) -> list[dict[str, torch.Tensor]]:
    """A base and `count` fine-tunes with correlated task vectors (float32)."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in NAMES.items()}
    shared = {n: torch.randn(s, generator=g) * spread for n, s in NAMES.items()}
    return [base] + [{n: base[n] + 0.5 * shared[n] + torch.randn(base[n].shape, generator=g) * spread for n in NAMES} for _ in range(count)]


def _arrays(models: list[dict[str, torch.Tensor]], name: str, dtype: torch.dtype = torch.float32) -> list[np.ndarray]:
    return [as_f64(m[name].to(dtype)) for m in models]


def _scale(arrays: list[np.ndarray]) -> np.ndarray:
    return sum(np.abs(a) for a in arrays)


def test_linear_matches_the_reference_with_per_model_weights(tmp_path: Path) -> None:
    models = _family(3, seed=1)[1:]
    out = run_method(tmp_path, "linear", models, model_settings=[{"weight": 0.5}, {"weight": 0.3}, {"weight": 1.2}])
    for name in NAMES:
        xs = _arrays(models, name)
        assert_close_f32(out[name], ref_linear(xs, [0.5, 0.3, 1.2]), _scale(xs), name)


def test_linear_without_normalize_is_the_weighted_sum(tmp_path: Path) -> None:
    models = _family(2, seed=2)[1:]
    out = run_method(tmp_path, "linear", models, global_settings={"weight": 0.7}, normalize=False)
    for name in NAMES:
        xs = _arrays(models, name)
        assert_close_f32(out[name], ref_linear(xs, [0.7, 0.7], normalize=False), _scale(xs), name)


def test_linear_of_identical_models_gives_the_model(tmp_path: Path) -> None:
    model = _family(1, seed=3)[1]
    out = run_method(tmp_path, "linear", [model, model, model], model_settings=[{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}])
    for name in NAMES:
        torch.testing.assert_close(out[name], model[name], rtol=1e-6, atol=0)


def test_task_arithmetic_matches_the_reference(tmp_path: Path) -> None:
    family = _family(2, seed=4)
    out = run_method(tmp_path, "task_arithmetic", family, model_settings=[{"weight": 0.8}, {"weight": -0.3}], global_settings={"lambda": 1.5})
    for name in NAMES:
        base, *xs = _arrays(family, name)
        ref = ref_task_vectors(base, xs, [0.8, -0.3], lam=1.5)
        assert_close_f32(out[name], ref, _scale([base, *xs]), name)


def test_task_arithmetic_with_weight_zero_gives_the_base(tmp_path: Path) -> None:
    family = _family(2, seed=5)
    out = run_method(tmp_path, "task_arithmetic", family, global_settings={"weight": 0.0})
    for name in NAMES:
        assert torch.equal(out[name], family[0][name])


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_ties_matches_the_reference(tmp_path: Path, density: float) -> None:
    family = _family(3, seed=6)
    weights = [1.0, 0.5, 0.8]
    out = run_method(
        tmp_path, "ties", family, model_settings=[{"weight": w} for w in weights], global_settings={"density": density}
    )
    for name in NAMES:
        base, *xs = _arrays(family, name)
        masks = [ref_topk_mask(x - base, density) for x in xs]
        ref = ref_task_vectors(base, xs, weights, masks=masks, consensus=True, normalize=True)
        assert_close_f32(out[name], ref, _scale([base, *xs]), name)


def test_ties_breaks_ties_at_the_threshold_in_element_order(tmp_path: Path) -> None:
    """Task vectors of a few distinct magnitudes: the k-th largest is shared by many elements across ranges.

    The base is on a grid of 1/64 so every task vector is exact in float32 as in float64 (the
    majority sign of opposite deltas that cancel is then exactly 0, i.e. +, on both sides)."""
    g = torch.Generator().manual_seed(7)
    base = {n: torch.round(torch.randn(s, generator=g) * 64) / 64 for n, s in NAMES.items()}
    models = [{n: base[n] + torch.randint(-2, 3, s, generator=g).float() * 0.25 for n, s in NAMES.items()} for _ in range(2)]
    family = [base, *models]
    out = run_method(tmp_path, "ties", family, global_settings={"weight": 1.0, "density": 0.45}, chunk_elements=1024)
    for name in NAMES:
        b, *xs = _arrays(family, name)
        masks = [ref_topk_mask(x - b, 0.45) for x in xs]
        assert_close_f32(out[name], ref_task_vectors(b, xs, [1.0, 1.0], masks=masks, consensus=True, normalize=True), _scale([b, *xs]), name)


def test_ties_with_density_one_and_one_model_gives_base_plus_delta(tmp_path: Path) -> None:
    family = _family(1, seed=8)
    out = run_method(tmp_path, "ties", family, global_settings={"weight": 0.6, "density": 1.0})
    for name in NAMES:
        base, x = _arrays(family, name)
        assert_close_f32(out[name], base + (x - base), np.abs(base) + np.abs(x), name)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_matches_the_reference_mask(tmp_path: Path, method: str) -> None:
    family = _family(2, seed=9)
    weights, densities = [0.7, 0.4], [0.5, 0.8]
    out = run_method(
        tmp_path, method, family, model_settings=[{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)], seed=42
    )
    for name in NAMES:
        base, *xs = _arrays(family, name)
        masks = [ref_dare_mask(42, name, m, base.size, densities[m]).reshape(base.shape) for m in range(2)]
        ref = ref_task_vectors(base, xs, weights, masks=masks, rescale=True, consensus=method == "dare_ties")
        assert_close_f32(out[name], ref, _scale([base, *xs]) * 3, name)


def test_dare_is_statistically_right_and_reproducible(tmp_path: Path) -> None:
    """One large tensor: the kept fraction is within 5 sigma of density, and the rescaled task vector keeps its mean."""
    g = torch.Generator().manual_seed(10)
    shape = (400, 500)
    base = {"w": torch.randn(shape, generator=g)}
    model = {"w": base["w"] + 0.01 + 0.002 * torch.rand(shape, generator=g)}  # a task vector with a clear mean
    density = 0.3
    common = {"global_settings": {"weight": 1.0, "density": density}, "seed": 7}
    out = run_method(tmp_path, "dare_linear", [base, model], tag="a", **common)  # type: ignore[arg-type]
    delta = as_f64(model["w"]) - as_f64(base["w"])
    merged = as_f64(out["w"]) - as_f64(base["w"])
    kept = np.abs(merged) > 1e-4
    n = kept.size
    assert abs(kept.mean() - density) < 5 * np.sqrt(density * (1 - density) / n)
    assert abs(merged.mean() / delta.mean() - 1) < 0.01  # L1 rescaling preserves the mean of a positive task vector
    again = run_method(tmp_path, "dare_linear", [base, model], tag="b", chunk_elements=1 << 16, threads=1, **common)  # type: ignore[arg-type]
    assert torch.equal(again["w"], out["w"])  # independent of chunking and threads
    other = run_method(tmp_path, "dare_linear", [base, model], tag="c", global_settings=common["global_settings"], seed=8)  # type: ignore[arg-type]
    assert not torch.equal(other["w"], out["w"])


def test_model_stock_matches_the_reference(tmp_path: Path) -> None:
    family = _family(3, seed=11)
    out = run_method(tmp_path, "model_stock", family)
    for name in NAMES:
        base, *xs = _arrays(family, name)
        assert_close_f32(out[name], ref_model_stock(base, xs), _scale([base, *xs]), name)


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("linear", {"weight": 0.5}),
        ("task_arithmetic", {"weight": 0.5}),
        ("ties", {"weight": 0.5, "density": 0.4}),
        ("dare_ties", {"weight": 0.5, "density": 0.4}),
        ("model_stock", {}),
    ],
)
def test_bf16_outputs_are_within_one_ulp(tmp_path: Path, method: str, settings: dict[str, float]) -> None:
    family = _family(2, seed=12)
    inputs = family[1:] if method == "linear" else family
    out = run_method(tmp_path, method, inputs, global_settings=settings, dtype=torch.bfloat16, seed=3)
    for name in NAMES:
        arrays = _arrays(inputs, name, torch.bfloat16)
        if method == "linear":
            ref = ref_linear(arrays, [0.5, 0.5])
        elif method == "model_stock":
            ref = ref_model_stock(arrays[0], arrays[1:])
        else:
            base, *xs = arrays
            density = settings["density"] if "density" in settings else 1.0
            if method == "ties":
                masks = [ref_topk_mask(x - base, density) for x in xs]
            elif method == "dare_ties":
                masks = [ref_dare_mask(3, name, m, base.size, density).reshape(base.shape) for m in range(2)]
            else:
                masks = None
            ref = ref_task_vectors(
                base, xs, [0.5, 0.5], masks=masks, consensus=method != "task_arithmetic", normalize=method == "ties", rescale=method == "dare_ties"
            )
        assert out[name].dtype == torch.bfloat16
        assert bf16_ulps(out[name], ref) <= 1, name


def test_leading_slice_merges_the_common_rows(tmp_path: Path) -> None:
    family = _family(2, seed=13)
    grown = dict(family[2])
    grown["model.embed_tokens.weight"] = torch.cat([family[2]["model.embed_tokens.weight"], torch.randn(3, 24)])
    inputs = [family[0], family[1], grown]
    out = run_method(tmp_path, "task_arithmetic", inputs, global_settings={"weight": 0.5}, leading_slice=True)
    name = "model.embed_tokens.weight"
    base, *xs = _arrays(family, name)
    assert tuple(out[name].shape) == NAMES[name]
    assert_close_f32(out[name], ref_task_vectors(base, xs, [0.5, 0.5]), _scale([base, *xs]), name)
