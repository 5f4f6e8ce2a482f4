"""The numba kernels of the task-vector merges (`merge/task_vectors_jit.py`) against the torch path: bit for bit.

Whole merges through the real runner, once with the kernels and once with `use_cpu_kernel=False`
(torch ops), compared bit pattern by bit pattern; and the histogram kernels against `sparsify`'s
torch functions. Tensors of odd sizes and several ranges, so tails and tie breaking across ranges
are covered.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kinship_service.merge import sparsify, task_vectors, task_vectors_jit

from .merge_method_refs import run_method

pytestmark = pytest.mark.skipif(not task_vectors_jit.available(), reason="numba is not importable")

SHAPES = {"model.embed_tokens.weight": (61, 37), "model.layers.0.mlp.up_proj.weight": (33, 130), "model.norm.weight": (37,)}
"""Odd sizes: ranges of 1024 elements end in partial ones."""


def _family(count: int, seed: int, quantized: bool) -> list[dict[str, torch.Tensor]]:
    """A base and `count` fine-tunes; `quantized`: task vectors of a few magnitudes (many ties at the TIES threshold)."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    if quantized:
        base = {n: torch.round(b * 64) / 64 for n, b in base.items()}
        return [base] + [{n: base[n] + torch.randint(-2, 3, s, generator=g).float() * 0.25 for n, s in SHAPES.items()} for _ in range(count)]
    shared = {n: torch.randn(s, generator=g) * 0.05 for n, s in SHAPES.items()}
    return [base] + [{n: base[n] + shared[n] + torch.randn(s, generator=g) * 0.05 for n, s in SHAPES.items()} for _ in range(count)]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (so +0 and -0 differ)."""
    return tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32)


def _assert_same_bits(tmp_path: Path, method: str, inputs: list[dict[str, torch.Tensor]], **kwargs: object) -> None:
    fused = run_method(tmp_path, method, inputs, tag="fused", **kwargs)  # type: ignore[arg-type]
    plain = run_method(tmp_path, method, inputs, tag="plain", use_cpu_kernel=False, **kwargs)  # type: ignore[arg-type]
    for name in SHAPES:
        assert torch.equal(_bits(fused[name]), _bits(plain[name])), f"{method}: {name} differs between the kernel and torch paths"


@pytest.mark.parametrize("models", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantized", [False, True])
def test_ties_kernels_give_the_torch_bits(tmp_path: Path, models: int, dtype: torch.dtype, quantized: bool) -> None:
    family = _family(models, seed=models, quantized=quantized)
    weights = [1.0, 0.5, 0.8, 0.3][:models]
    densities = [0.45, 0.3, 0.7, 0.5][:models]
    _assert_same_bits(
        tmp_path,
        "ties",
        family,
        model_settings=[{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)],
        dtype=dtype,
        chunk_elements=1024,
    )


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "task_arithmetic"])
@pytest.mark.parametrize("models", [1, 3])
def test_dare_and_task_arithmetic_kernels_give_the_torch_bits(tmp_path: Path, method: str, models: int) -> None:
    family = _family(models, seed=10 + models, quantized=False)
    settings = [{"weight": w} for w in [0.7, 0.4, 1.1][:models]]
    if method != "task_arithmetic":
        settings = [dict(s, density=d) for s, d in zip(settings, [0.5, 0.8, 0.3], strict=False)]
    _assert_same_bits(
        tmp_path, method, family, model_settings=settings, global_settings={"lambda": 0.9}, seed=5, dtype=torch.bfloat16, chunk_elements=1024
    )


def test_ties_with_normalize_off_and_lambda_gives_the_torch_bits(tmp_path: Path) -> None:
    family = _family(3, seed=20, quantized=True)
    _assert_same_bits(tmp_path, "ties", family, global_settings={"weight": 0.6, "density": 0.4, "lambda": 1.3}, normalize=False)


def test_ties_counts_ties_in_a_pass_of_their_own_past_the_held_pairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no (value, count) pairs held, tie breaking falls back to its counting pass: the same bits."""
    family = _family(2, seed=21, quantized=True)
    monkeypatch.setattr(task_vectors, "HELD_LOW_VALUES", 0)
    _assert_same_bits(tmp_path, "ties", family, global_settings={"weight": 1.0, "density": 0.45}, chunk_elements=1024)


def test_histogram_kernels_match_the_torch_histograms() -> None:
    g = torch.Generator().manual_seed(3)
    stack = torch.randn(4, 5000, generator=g)
    stack[2] = stack[0] + torch.randint(-3, 4, (5000,), generator=g).float() * 2.0**-10  # few distinct magnitudes
    stack[3, :100] = stack[0, :100]  # zero deltas
    view = stack[:, :4999]  # a strided range, as the runner's stack buffer
    models = [0, 1, 2]
    highs = task_vectors_jit.high_histograms(view, models, sparsify.HIGH_BINS)
    for row, model in enumerate(models):
        bits = sparsify.magnitude_bits(view[1 + model] - view[0])
        assert torch.equal(highs[row], sparsify.high_histogram(bits))
    bins = [int(torch.argmax(highs[row])) for row in range(len(models))]
    for row, (values, counts) in enumerate(task_vectors_jit.low_histograms(view, models, bins)):
        bits = sparsify.magnitude_bits(view[1 + models[row]] - view[0])
        dense = np.zeros(sparsify.LOW_BINS, dtype=np.int64)
        dense[values] += counts
        assert len(set(values.tolist())) == values.size
        assert np.array_equal(dense, sparsify.low_histogram(bits, bins[row]).numpy())


def test_l1_kernel_matches_torch_to_float64_rounding() -> None:
    g = torch.Generator().manual_seed(4)
    stack = torch.randn(3, 70_001, generator=g)
    keys = [sparsify.mask_key(9, "w", m) for m in range(2)]
    limits = [sparsify.random_limit(d) for d in (0.3, 0.9)]
    sums = task_vectors_jit.l1_sums(stack, [0, 1], keys, limits, 1234).numpy()
    for row in range(2):
        delta = (stack[1 + row] - stack[0]).double()
        mask = sparsify.random_mask(keys[row], 1234, 1234 + 70_001, (0.3, 0.9)[row], use_kernel=False)
        np.testing.assert_allclose(sums[row], [float(delta.abs().sum()), float((delta.abs() * mask).sum())], rtol=1e-12)


def test_warm_up_compiles_every_kernel() -> None:
    assert task_vectors_jit.warm_up() >= 0
