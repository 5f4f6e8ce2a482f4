"""Fingerprint accuracy (issue 3): kinship estimated from sketches vs an independent float64 reference.

Stated bound (service/fingerprint.py): the normalised sketch estimate of the cosine
has standard deviation about (1 - c^2) / sqrt(W) <= 1/512 for W = 2**18, and PCC
inherits it (times ~1 for task vectors with a small mean), so |error| <= 0.01 for
PCC and cosine is a 5-sigma event. The test checks the bound on 200+ random pairs
drawn from families whose kinship spreads over [-0.2, 1.0].
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kinship_service.kinship.fingerprint import (
    SKETCH_WIDTH,
    Fingerprint,
    SketchBuilder,
    StatsBuilder,
    build_fingerprints,
    clear_dot_memo,
    estimate,
)
from kinship_service.kinship.similarity import layer_group

BOUND = 0.01
# Tensor names and shapes of a small decoder; about 1.1M elements, four times the sketch width.
SHAPES = {
    "model.embed_tokens.weight": (640, 256),
    "model.layers.0.self_attn.q_proj.weight": (256, 256),
    "model.layers.0.mlp.up_proj.weight": (704, 256),
    "model.layers.0.input_layernorm.weight": (256,),
    "model.layers.1.self_attn.q_proj.weight": (256, 256),
    "model.layers.1.mlp.down_proj.weight": (256, 704),
    "model.norm.weight": (256,),
    "lm_head.weight": (640, 256),
}


def make_population(coefficients: list[float], seed: int) -> torch.Tensor:
    """Task vectors d_i = a_i * shared + sqrt(1 - a_i^2) * private_i (+ small means and per-tensor scales).

    Pairwise correlation is about a_i * a_j, negative when the shared component enters
    with opposite signs. Returns (n, total) float64, tensors laid out in sorted name order.
    """
    generator = torch.Generator().manual_seed(seed)
    total = sum(math.prod(s) for s in SHAPES.values())
    scales = torch.cat(
        [torch.full((math.prod(SHAPES[name]),), 0.5 + k * 0.25, dtype=torch.float64) for k, name in enumerate(sorted(SHAPES))]
    )
    shared = torch.randn(total, generator=generator, dtype=torch.float64)
    rows = []
    for a in coefficients:
        private = torch.randn(total, generator=generator, dtype=torch.float64)
        mean = 0.02 * torch.randn((), generator=generator, dtype=torch.float64)
        rows.append((a * shared + math.sqrt(1.0 - a * a) * private + mean) * scales * 1e-3)
    return torch.stack(rows)


def sketch(vectors: torch.Tensor, chunk: int) -> list[Fingerprint]:
    """Fingerprints of task vectors laid out in sorted tensor order, fed in chunks of `chunk` elements."""
    n = vectors.shape[0]
    builder, stats = SketchBuilder(n), StatsBuilder(n)
    offset = 0
    tensors = []
    for name in sorted(SHAPES):
        size = math.prod(SHAPES[name])
        tensors.append((name, SHAPES[name]))
        for start in range(0, size, chunk):
            stop = min(size, start + chunk)
            part = vectors[:, offset + start : offset + stop]
            builder.add(name, start, part)
            stats.add(layer_group(name), part)
        offset += size
    return build_fingerprints(builder.sketch, stats, tensors)


def reference(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCC, cosine and Euclidean distance matrices of the rows of `data`, in float64 NumPy (independent of the service)."""
    centred = data - data.mean(axis=1, keepdims=True)
    cov = centred @ centred.T
    gram = data @ data.T
    sd, norms = np.sqrt(np.diag(cov)), np.sqrt(np.diag(gram))
    squared = norms[:, None] ** 2 + norms[None, :] ** 2 - 2 * gram
    return cov / np.outer(sd, sd), gram / np.outer(norms, norms), np.sqrt(np.maximum(squared, 0.0))


def test_fingerprint_error_bound_on_random_pairs() -> None:
    rng = np.random.default_rng(11)
    errors_pcc, errors_cos, errors_ed, kinships, normalised = [], [], [], [], []
    for family in range(3):
        # Coefficients from -0.45 to 0.9995: pair kinship a_i * a_j spans about [-0.45, 1.0].
        coefficients = list(rng.uniform(-0.45, 1.0, size=12)) + [0.9995, 0.999, -0.45]
        vectors = make_population(coefficients, seed=100 + family)
        fingerprints = sketch(vectors, chunk=int(rng.integers(20_000, 300_000)))
        estimated = estimate(fingerprints)
        pccs, coss, eds = reference(vectors.numpy())
        n = len(coefficients)
        for i in range(n):
            for j in range(i + 1, n):
                pcc, cos, ed = float(pccs[i, j]), float(coss[i, j]), float(eds[i, j])
                if not -0.2 <= pcc <= 1.0:
                    continue
                kinships.append(pcc)
                errors_pcc.append(abs(estimated.pcc[i][j] - pcc))
                errors_cos.append(abs(estimated.cosine[i][j] - cos))
                errors_ed.append(abs(estimated.euclidean[i][j] - ed) / ed)
                normalised.append((estimated.cosine[i][j] - cos) / (1.0 - cos * cos))
    assert len(kinships) >= 200
    assert min(kinships) < -0.15 and max(kinships) > 0.99, "pairs spread over [-0.2, 1.0]"
    assert max(errors_pcc) <= BOUND, max(errors_pcc)
    assert max(errors_cos) <= BOUND, max(errors_cos)
    # The stated standard deviation (1 - c^2) / sqrt(W), checked with room for sampling noise.
    spread = float(np.std(normalised)) * math.sqrt(SKETCH_WIDTH)
    assert spread < 1.3, spread
    # Euclidean distance: relative error |a||b| * err(c) / ED, small for these families.
    assert max(errors_ed) < 0.02


def test_sketch_does_not_depend_on_chunking_and_norms_are_exact() -> None:
    vectors = make_population([0.3, -0.2, 0.9], seed=5)
    a = sketch(vectors, chunk=7_919)
    b = sketch(vectors, chunk=1_000_000)
    for x, y in zip(a, b, strict=False):
        assert torch.allclose(x.sketch, y.sketch, rtol=1e-6, atol=1e-12)
    data = vectors.numpy()
    for i, fp in enumerate(a):
        total = fp.total
        assert total.count == data.shape[1]
        assert total.sum_squares == pytest.approx(float(data[i] @ data[i]), rel=1e-12)
        assert total.sum == pytest.approx(float(data[i].sum()), rel=1e-9)
    assert set(a[0].groups) == {"embed", "layers.0", "layers.1", "head"}


def test_identical_task_vectors_estimate_exactly_one() -> None:
    vectors = make_population([0.5, 0.5], seed=9)
    vectors[1] = vectors[0]
    estimated = estimate(sketch(vectors, chunk=50_000))
    assert estimated.pcc[0][1] == pytest.approx(1.0, abs=1e-9)
    assert estimated.cosine[0][1] == pytest.approx(1.0, abs=1e-9)
    assert estimated.euclidean[0][1] == pytest.approx(0.0, abs=1e-6)


def test_fingerprint_size_is_fixed() -> None:
    fps = sketch(make_population([0.1, 0.2], seed=1), chunk=100_000)
    assert fps[0].nbytes == 4 * SKETCH_WIDTH == 2**20  # 1 MiB whatever the model size


def _bits(similarities) -> list[str]:
    """Every number of an estimate as its exact float64 bits (== would equate 0.0 with -0.0)."""
    values = [x for m in (similarities.pcc, similarities.cosine, similarities.euclidean) for row in m for x in row]
    return [float(x).hex() for x in values + similarities.norms + similarities.means]


def test_memoised_sketch_dot_products_are_bit_identical() -> None:
    """The FINGERPRINT path memoises sketch dot products: the answers must be exactly the fresh ones."""
    fps = sketch(make_population([0.3, 0.6, -0.2, 0.8], seed=11), chunk=100_000)
    clear_dot_memo()
    fresh = estimate(fps)
    assert _bits(estimate(fps)) == _bits(fresh)  # every dot product from the memo
    clear_dot_memo()
    fresh_reversed = estimate(fps[::-1])
    assert _bits(estimate(fps[::-1])) == _bits(fresh_reversed)
    assert _bits(estimate(fps)) == _bits(fresh)  # pairs memoised in the other order
    # Against the Gram matrix computed here with NumPy: the estimate's cosine is its ratio.
    sketches = np.stack([fp.sketch.numpy() for fp in fps])
    for a in sketches:  # the memo keys pairs unordered: it relies on np.dot being exactly symmetric
        for b in sketches:
            assert float(np.dot(a, b)).hex() == float(np.dot(b, a)).hex()
    gram = np.array([[float(np.dot(a, b)) for b in sketches] for a in sketches])
    cosine = gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    assert np.allclose(np.array(fresh.cosine), cosine, rtol=0, atol=1e-12)
    # A sketch changed in place (or replaced) must not be answered from the memo.
    before = estimate(fps[:2])
    fps[0].sketch.mul_(-1.0)
    edited = estimate(fps[:2])
    assert edited.cosine[0][1] == -before.cosine[0][1]
    fps[1].sketch = fps[0].sketch.clone()
    assert estimate(fps[:2]).cosine[0][1] == pytest.approx(1.0, abs=1e-12)
    clear_dot_memo()
    assert estimate(fps[:2]).cosine[0][1] == pytest.approx(1.0, abs=1e-12)
