"""SLERP math and t resolution against an independent float64 NumPy reference written here.

The reference follows mergekit 0.1.5's `slerp()` (normalise by the L2 norm unless it is <= 1e-8,
dot clamped, |dot| > 0.9995 -> linear, else the sine formula on the un-normalised tensors) but in
float64 throughout. Merged checkpoints are produced by the real merge writer and read back with
safetensors.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kinship_service.checkpoints.sources import LocalPath, resolve
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, save_checkpoint
from kinship_service.errors import InvalidArgument
from kinship_service.merge.mergekit_config import parse_mergekit_yaml
from kinship_service.merge.model_card import ModelCard
from kinship_service.merge.plan import MergeSettings
from kinship_service.merge.runner import MergeRunner
from kinship_service.merge.slerp import (
    FactorEntry,
    InterpolationSpec,
    SlerpStats,
    layer_fraction,
    resolve_t,
    slerp,
)


def ref_slerp(a: np.ndarray, b: np.ndarray, t: float) -> tuple[np.ndarray, bool]:
    """float64 SLERP as mergekit defines it; returns (result, took_linear_branch)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na, nb = math.sqrt(float(np.sum(a * a))), math.sqrt(float(np.sum(b * b)))
    an = a / na if na > 1e-8 else a
    bn = b / nb if nb > 1e-8 else b
    dot = float(np.clip(np.sum(an * bn), -1.0, 1.0))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b, True
    theta = math.acos(dot)
    return math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b, False


def assert_f32_close(ours: torch.Tensor, a: np.ndarray, b: np.ndarray, ref: np.ndarray, name: str = "") -> None:
    """rtol 1e-5 against the float64 reference; near-cancelling elements get an absolute slack of
    1e-6 of the terms' magnitude (float32 rounding of the two products alone is ~1e-7 of it)."""
    got = ours.double().numpy().reshape(-1)
    ref = ref.reshape(-1)
    scale = np.abs(a.reshape(-1)) + np.abs(b.reshape(-1))
    bad = np.abs(got - ref) > 1e-5 * np.abs(ref) + 1e-6 * scale
    assert not bad.any(), f"{name}: {bad.sum()} elements off, worst {np.max(np.abs(got - ref))}"


def bf16_order(x: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns mapped to integers in value order, so adjacent bf16 values differ by 1."""
    bits = x.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_bf16_within_1ulp(ours: torch.Tensor, ref: np.ndarray, name: str = "") -> None:
    assert ours.dtype == torch.bfloat16
    expected = torch.from_numpy(np.ascontiguousarray(ref)).to(torch.bfloat16).reshape(ours.shape)
    diff = (bf16_order(ours) - bf16_order(expected)).abs()
    assert int(diff.max()) <= 1, f"{name}: {int((diff > 1).sum())} elements more than 1 ulp off"


# --------------------------------------------------------------------------------------------
# The per-tensor function
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_branch_matches_reference(t: float) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 70, generator=g)
    b = torch.randn(300, 70, generator=g) + 0.3 * a
    ours, coefficients = slerp(a, b, t)
    ref, linear = ref_slerp(a.numpy(), b.numpy(), t)
    assert not linear and not coefficients.linear
    assert ours.dtype == torch.float32 and ours.shape == a.shape
    assert_f32_close(ours, a.numpy(), b.numpy(), ref)


def test_linear_fallback_for_nearly_colinear_and_antiparallel_tensors() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5000, generator=g)
    for b in (a + 1e-3 * torch.randn(5000, generator=g), -2.0 * a):
        ours, coefficients = slerp(a, b, 0.3)
        ref, linear = ref_slerp(a.numpy(), b.numpy(), 0.3)
        assert linear and coefficients.linear
        assert_f32_close(ours, a.numpy(), b.numpy(), ref)


def test_zero_norm_tensor_is_not_normalised() -> None:
    a = torch.zeros(64)
    b = torch.linspace(-1, 1, 64)
    ours, _ = slerp(a, b, 0.4)
    ref, linear = ref_slerp(a.numpy(), b.numpy(), 0.4)
    assert not linear  # dot = 0 -> theta = pi/2
    assert_f32_close(ours, a.numpy(), b.numpy(), ref)


def test_float64_inputs_compute_in_float64() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1000, dtype=torch.float64, generator=g)
    b = torch.randn(1000, dtype=torch.float64, generator=g)
    ours, _ = slerp(a, b, 0.7)
    ref, _ = ref_slerp(a.numpy(), b.numpy(), 0.7)
    assert ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12, atol=1e-14)


def test_reductions_are_float64_accurate_on_large_tensors() -> None:
    """A one-shot float32 dot over millions of elements drifts; the chunked float64 accumulation must not."""
    g = torch.Generator().manual_seed(4)
    n = 4_000_003  # not a multiple of the row length
    a = torch.randn(n, generator=g) + 0.5
    b = a + 0.02 * torch.randn(n, generator=g)
    stats = SlerpStats()
    for start in range(0, n, 1_000_000):
        stats.update(a[start : start + 1_000_000], b[start : start + 1_000_000])
    a64, b64 = a.double().numpy(), b.double().numpy()
    for got, want in ((stats.aa, a64 @ a64), (stats.bb, b64 @ b64), (stats.ab, a64 @ b64)):
        assert abs(got - want) <= 1e-7 * abs(want)
    assert stats.count == n


# --------------------------------------------------------------------------------------------
# t resolution
# --------------------------------------------------------------------------------------------

GRADIENT = InterpolationSpec((FactorEntry("", (0.0, 0.5, 0.3, 0.7, 1.0), True),))
# mergekit's documented example: attention and MLP get opposite gradients, everything else 0.5.
FILTERED = InterpolationSpec(
    (
        FactorEntry("self_attn", (0.0, 0.5, 0.3, 0.7, 1.0), True),
        FactorEntry("mlp", (1.0, 0.5, 0.7, 0.3, 0.0), True),
        FactorEntry("", (0.5,), False),
    )
)

# (spec, num_layers, tensor name, expected t), worked out by hand:
# layer L of N has fraction L/(N-1); with 5 anchors, scaled = fraction * 4, linear between anchors.
T_TABLE = [
    (InterpolationSpec.constant(0.3), 4, "model.layers.2.mlp.up_proj.weight", 0.3),
    (InterpolationSpec.constant(0.3), 4, "lm_head.weight", 0.3),
    (GRADIENT, 5, "model.layers.0.self_attn.q_proj.weight", 0.0),  # scaled 0
    (GRADIENT, 5, "model.layers.1.self_attn.q_proj.weight", 0.5),  # scaled 1
    (GRADIENT, 5, "model.layers.2.mlp.down_proj.weight", 0.3),  # scaled 2
    (GRADIENT, 5, "model.layers.4.input_layernorm.weight", 1.0),  # scaled 4
    (GRADIENT, 4, "model.layers.1.self_attn.o_proj.weight", 0.5 - 0.2 / 3),  # 1/3*4 = 1.333: 0.5 + 0.333*(0.3-0.5)
    (GRADIENT, 4, "model.layers.2.self_attn.o_proj.weight", 0.3 + 0.8 / 3),  # 2.667: 0.3 + 0.667*(0.7-0.3)
    (GRADIENT, 4, "model.embed_tokens.weight", 0.0),  # before the layers: fraction 0
    (GRADIENT, 4, "model.norm.weight", 1.0),  # after the layers: fraction 1 (mergekit's post-weights)
    (GRADIENT, 4, "lm_head.weight", 1.0),
    (GRADIENT, 1, "model.layers.0.mlp.up_proj.weight", 1.0),  # a single layer: mergekit uses t = 1
    (FILTERED, 5, "model.layers.1.self_attn.k_proj.weight", 0.5),
    (FILTERED, 5, "model.layers.1.mlp.gate_proj.weight", 0.5),
    (FILTERED, 5, "model.layers.3.self_attn.v_proj.weight", 0.7),
    (FILTERED, 5, "model.layers.3.mlp.gate_proj.weight", 0.3),
    (FILTERED, 5, "model.layers.3.post_attention_layernorm.weight", 0.5),  # fallback
    (FILTERED, 5, "model.embed_tokens.weight", 0.5),
    (FILTERED, 5, "lm_head.weight", 0.5),
    (FILTERED, 3, "model.layers.1.self_attn.q_proj.weight", 0.3),  # fraction 0.5 -> scaled 2
    (FILTERED, 3, "model.layers.1.mlp.up_proj.weight", 0.7),
    # gpt2-style names: h.N counts as a layer, wte is an embedding, ln_f comes after the layers
    (GRADIENT, 5, "transformer.h.3.attn.c_attn.weight", 0.7),
    (GRADIENT, 5, "transformer.wte.weight", 0.0),
    (GRADIENT, 5, "transformer.ln_f.weight", 1.0),
]


@pytest.mark.parametrize(("spec", "num_layers", "name", "expected"), T_TABLE)
def test_t_resolution_table(spec: InterpolationSpec, num_layers: int, name: str, expected: float) -> None:
    assert resolve_t(spec, name, num_layers) == pytest.approx(expected, abs=1e-12)


def test_first_matching_filter_wins_and_missing_fallback_is_an_error() -> None:
    spec = InterpolationSpec((FactorEntry("proj", (0.1,)), FactorEntry("q_proj", (0.9,))))
    assert resolve_t(spec, "model.layers.0.self_attn.q_proj.weight", 2) == pytest.approx(0.1)
    with pytest.raises(InvalidArgument, match="no entry of t matches"):
        resolve_t(spec, "model.norm.weight", 2)


def test_layer_fraction() -> None:
    assert layer_fraction("model.layers.3.mlp.up_proj.weight", 7) == pytest.approx(0.5)
    assert layer_fraction("model.embed_tokens.weight", 7) == 0.0
    assert layer_fraction("lm_head.weight", 7) == 1.0


MERGEKIT_YAML = """
slices:
  - sources:
      - model: org/model-a
        layer_range: [0, 32]
      - model: org/model-b
        layer_range: [0, 32]
merge_method: slerp
base_model: org/model-a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_parse_mergekit_yaml_slices_form() -> None:
    config = parse_mergekit_yaml(MERGEKIT_YAML)
    assert (config.model_a, config.model_b) == ("org/model-a", "org/model-b")
    assert config.t == FILTERED
    assert config.dtype == "BF16" and config.out_dtype is None and config.num_layers == 32
    # layer 8 of 32: fraction 8/31, scaled 1.032..., between anchors 1 and 2
    frac = 8 / 31 * 4 - 1
    assert resolve_t(config.t, "model.layers.8.self_attn.q_proj.weight", 32) == pytest.approx(0.5 + frac * (0.3 - 0.5))


def test_parse_mergekit_yaml_models_form_and_slice_parameters_first() -> None:
    text = """
merge_method: slerp
base_model: a
models:
  - model: a
  - model: b
parameters:
  t: 0.25
out_dtype: float16
"""
    config = parse_mergekit_yaml(text)
    assert config.t == InterpolationSpec.constant(0.25) and config.out_dtype == "F16" and config.num_layers is None
    text2 = """
merge_method: slerp
base_model: a
slices:
  - sources: [{model: a, layer_range: [0, 4]}, {model: b, layer_range: [0, 4]}]
    parameters:
      t: [{filter: mlp, value: 0.9}]
parameters:
  t: 0.1
"""
    config2 = parse_mergekit_yaml(text2)
    assert resolve_t(config2.t, "model.layers.1.mlp.up_proj.weight", 4) == pytest.approx(0.9)
    assert resolve_t(config2.t, "model.layers.1.self_attn.q_proj.weight", 4) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("merge_method: nuslerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\nparameters: {t: 0.5}", "merge_method must be one of"),
        ("merge_method: slerp\nmodels: [{model: a}, {model: b}]\nparameters: {t: 0.5}", "base_model"),
        ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\nparameters: {t: 0.5}", "exactly two"),
        ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]", "parameters.t"),
        ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\nparameters: {t: 1.5}", r"\[0, 1\]"),
        ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\nparameters: {t: [x]}", "number"),
        (
            "merge_method: slerp\nbase_model: a\nslices:\n - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]\n"
            " - sources: [{model: a, layer_range: [2, 4]}, {model: b, layer_range: [2, 4]}]\nparameters: {t: 0.5}",
            "one slice",
        ),
        ("{{{", "YAML"),
    ],
)
def test_parse_mergekit_yaml_rejects(text: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse_mergekit_yaml(text)


# --------------------------------------------------------------------------------------------
# Whole checkpoints through the merge writer
# --------------------------------------------------------------------------------------------

SHAPE = LlamaShape(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2)
SPEC = InterpolationSpec((FactorEntry("self_attn", (0.0, 0.6, 1.0), True), FactorEntry("", (0.35,), False)))


def expected_t(name: str, num_layers: int = SHAPE.num_layers) -> float:
    """SPEC's t for a tensor, worked out independently of the code under test."""
    match = re.search(r"layers\.(\d+)\.", name)
    if "self_attn" in name:
        frac = int(match.group(1)) / (num_layers - 1)  # type: ignore[union-attr]
        scaled = frac * 2
        i0 = min(int(scaled), 1)
        f = scaled - i0
        anchors = (0.0, 0.6, 1.0)
        return (1 - f) * anchors[i0] + f * anchors[i0 + 1]
    return 0.35


def _pair(tmp_path: Path, dtype: torch.dtype) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor], bool]:
    """A and B: attention tensors independent (SLERP branch), the rest near-colinear (linear branch)."""
    a = make_base(SHAPE, seed=10)
    g = torch.Generator().manual_seed(11)
    b = {}
    for name, w in a.items():
        noise = torch.randn(w.shape, generator=g) * w.std().clamp_min(1e-3)
        b[name] = noise if "self_attn" in name else w + 0.001 * noise
    root = tmp_path / "models"
    pa = save_checkpoint(a, root / "a", dtype=dtype, config=SHAPE.config(dtype))
    pb = save_checkpoint(b, root / "b", dtype=dtype, shards=2, config=SHAPE.config(dtype))
    return pa, pb, a, b, True


def _run(tmp_path: Path, pa: Path, pb: Path, out_dtype: str | None, chunk_elements: int = 4096) -> Path:
    roots = (tmp_path / "models",)
    ca, cb = resolve(LocalPath(str(pa)), roots), resolve(LocalPath(str(pb)), roots)
    runner = MergeRunner(ca, cb, MergeSettings(t=SPEC, out_dtype=out_dtype, max_shard_bytes=60_000), chunk_elements=chunk_elements, allowed_roots=roots)
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    summary = runner.run(tmp_path / "out" / ".kinship-tmp-x", out, overwrite=False, card=ModelCard("a", "b", "", "", SPEC))
    assert summary.linear_tensors > 0 and summary.slerp_tensors > 0  # both branches exercised
    return out


def _read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


@pytest.mark.parametrize("chunk_elements", [1 << 20, 256], ids=["one-chunk", "many-chunks"])
def test_float32_output_within_rtol_1e5_of_float64_reference(tmp_path: Path, chunk_elements: int) -> None:
    """Both ways a tensor is processed: in one chunk read once, or in ranges read twice by the workers."""
    pa, pb, a, b, _ = _pair(tmp_path, torch.float32)
    merged = _read_all(_run(tmp_path, pa, pb, "F32", chunk_elements))
    assert set(merged) == set(a)
    branches = set()
    for name, out in merged.items():
        assert out.dtype == torch.float32 and tuple(out.shape) == tuple(a[name].shape)
        ref, linear = ref_slerp(a[name].numpy(), b[name].numpy(), expected_t(name))
        branches.add(linear)
        assert_f32_close(out, a[name].numpy(), b[name].numpy(), ref, name)
    assert branches == {True, False}


def test_bf16_output_at_most_one_ulp_from_reference(tmp_path: Path) -> None:
    pa, pb, a, b, _ = _pair(tmp_path, torch.bfloat16)
    merged = _read_all(_run(tmp_path, pa, pb, None))  # unspecified: A's dtype (bf16)
    branches = set()
    for name, out in merged.items():
        a16 = a[name].to(torch.bfloat16).double().numpy()
        b16 = b[name].to(torch.bfloat16).double().numpy()
        ref, linear = ref_slerp(a16, b16, expected_t(name))
        branches.add(linear)
        assert_bf16_within_1ulp(out, ref, name)
    assert branches == {True, False}


def test_f32_inputs_to_bf16_output_at_most_one_ulp(tmp_path: Path) -> None:
    pa, pb, a, b, _ = _pair(tmp_path, torch.float32)
    merged = _read_all(_run(tmp_path, pa, pb, "BF16"))
    for name, out in merged.items():
        ref, _ = ref_slerp(a[name].numpy(), b[name].numpy(), expected_t(name))
        assert_bf16_within_1ulp(out, ref, name)


def test_tensor_observer_sees_every_output_tensor(tmp_path: Path) -> None:
    """`on_tensor` (for the fingerprint cache) gets each output tensor whole, equal to what was written."""
    pa, pb, a, _, _ = _pair(tmp_path, torch.float32)
    roots = (tmp_path / "models",)
    seen: dict[str, torch.Tensor] = {}
    runner = MergeRunner(
        resolve(LocalPath(str(pa)), roots),
        resolve(LocalPath(str(pb)), roots),
        MergeSettings(t=SPEC, out_dtype="BF16"),
        chunk_elements=1024,
        allowed_roots=roots,
        on_tensor=lambda name, tensor: seen.__setitem__(name, tensor.clone()),
    )
    out = tmp_path / "observed"
    runner.run(tmp_path / ".kinship-tmp-o", out, overwrite=False, card=ModelCard("a", "b", "", "", SPEC))
    written = _read_all(out)
    assert set(seen) == set(written) == set(a)
    for name, tensor in written.items():
        assert torch.equal(seen[name], tensor), name


def mergekit_float32_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """mergekit 0.1.5's own arithmetic, re-typed here: numpy float32 throughout, no clamping."""
    v0, v1 = a.astype(np.float32), b.astype(np.float32)
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    u0 = v0 / n0 if n0 > 1e-8 else v0
    u1 = v1 / n1 if n1 > 1e-8 else v1
    dot = np.sum(u0 * u1)
    if np.abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta_0 = np.arccos(dot)
    sin_theta_0 = np.sin(theta_0)
    theta_t = theta_0 * t
    s0 = np.sin(theta_0 - theta_t) / sin_theta_0
    s1 = np.sin(theta_t) / sin_theta_0
    return s0 * v0 + s1 * v1


def test_bf16_output_matches_mergekit_arithmetic_bit_for_bit_almost_everywhere(tmp_path: Path) -> None:
    """Against mergekit's float32 arithmetic (not our float64 reference): bf16 outputs agree bit for
    bit except where the two float32 results straddle a bf16 rounding boundary (then by 1 ulp)."""
    pa, pb, a, b, _ = _pair(tmp_path, torch.bfloat16)
    merged = _read_all(_run(tmp_path, pa, pb, None))
    total = same = 0
    for name, out in merged.items():
        a16 = a[name].to(torch.bfloat16).float().numpy()
        b16 = b[name].to(torch.bfloat16).float().numpy()
        theirs = torch.from_numpy(np.ascontiguousarray(mergekit_float32_slerp(a16, b16, expected_t(name)))).to(torch.bfloat16)
        diff = (bf16_order(out) - bf16_order(theirs.reshape(out.shape))).abs()
        assert int(diff.max()) <= 1, name
        total += diff.numel()
        same += int((diff == 0).sum())
    assert same / total > 0.999, f"only {same}/{total} elements identical to mergekit's arithmetic"
