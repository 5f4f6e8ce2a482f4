"""The fused SLERP kernels (slerp_kernel.py) against the torch path and a float64 reference written here.

- Interpolation: given the same coefficients, the kernel's output is bit-identical to the merge
  torch path (`slerp_stream.finish_slerp` on float32 copies), for every stored dtype,
  mixed input dtypes, every output dtype, the intermediate cast, the SLERP and linear branches,
  t = 0, t = 1, odd lengths (vector tails) and zero tensors.
- Reductions: `<a,a>`, `<b,b>`, `<a,b>` equal a float64 NumPy reference to ~1e-12 (every product of
  stored values is exact in float64), and the coefficients they give match the reference's.
- Whole merges with the kernels on and off (Settings.cpu_kernel): same branches, bf16 outputs
  within 1 ulp of each other and identical almost everywhere.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kinship_service.checkpoints.sources import LocalPath, resolve
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, save_checkpoint
from kinship_service.merge import slerp_kernel
from kinship_service.merge.model_card import ModelCard
from kinship_service.merge.plan import MergeSettings
from kinship_service.merge.runner import MergeRunner
from kinship_service.merge.slerp import Coefficients, FactorEntry, InterpolationSpec, slerp_coefficients
from kinship_service.merge.slerp_stream import finish_slerp

pytestmark = pytest.mark.skipif(not slerp_kernel.available(), reason="numba is not installed: the merge uses torch")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def ref_reductions(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    x = a.double().numpy()
    y = b.double().numpy()
    return float(np.dot(x, x)), float(np.dot(y, y)), float(np.dot(x, y))


def ref_coefficients(aa: float, bb: float, ab: float, t: float) -> tuple[float, float, bool]:
    """mergekit's SLERP weights in float64, written out here."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    dot = ab / ((na if na > 1e-8 else 1.0) * (nb if nb > 1e-8 else 1.0))
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > 0.9995:
        return 1.0 - t, t, True
    theta = math.acos(dot)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta), False


def torch_path(a: torch.Tensor, b: torch.Tensor, coefficients: Coefficients, out_dtype: torch.dtype, intermediate: torch.dtype) -> torch.Tensor:
    """What the merge's torch path writes for this chunk (float32 pair, then `finish_slerp`)."""
    pair = torch.stack((a.float(), b.float()))
    out = torch.empty(a.numel(), dtype=out_dtype)
    finish_slerp(pair, coefficients, out, intermediate)
    return out


def kernel_path(a: torch.Tensor, b: torch.Tensor, coefficients: Coefficients, out_dtype: torch.dtype, intermediate: torch.dtype) -> torch.Tensor:
    out = torch.empty(a.numel(), dtype=out_dtype)
    slerp_kernel.interpolate(a, b, coefficients, out, intermediate)
    return out


def inputs(n: int, dtype_a: torch.dtype, dtype_b: torch.dtype, seed: int, colinear: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g) * 0.02
    b = a + 0.0005 * torch.randn(n, generator=g) if colinear else torch.randn(n, generator=g) * 0.03
    return a.to(dtype_a), b.to(dtype_b)


@pytest.mark.parametrize("dtype_a,dtype_b", [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_interpolation_is_bit_identical_to_the_torch_path(dtype_a: torch.dtype, dtype_b: torch.dtype, out_dtype: torch.dtype) -> None:
    for n, colinear, t in itertools.product((4099, 33, 1), (False, True), (0.0, 0.3, 1.0)):
        a, b = inputs(n, dtype_a, dtype_b, seed=n + int(colinear), colinear=colinear)
        coefficients = slerp_coefficients(*ref_reductions(a, b), t)
        if n > 1:
            assert coefficients.linear == colinear
        intermediate = dtype_a  # the merge's: model A's dtype (mergekit casts the result to it first)
        expected = torch_path(a, b, coefficients, out_dtype, intermediate)
        got = kernel_path(a, b, coefficients, out_dtype, intermediate)
        assert torch.equal(got, expected), (n, colinear, t, int((got != expected).sum()))


@pytest.mark.parametrize("intermediate", DTYPES)
def test_intermediate_cast_is_applied_as_the_torch_path_does(intermediate: torch.dtype) -> None:
    """A float32 result rounded to bf16 (or fp16) before an fp16/fp32 output, as mergekit's cast."""
    a, b = inputs(2048, torch.float32, torch.float32, seed=5, colinear=False)
    coefficients = slerp_coefficients(*ref_reductions(a, b), 0.4)
    for out_dtype in DTYPES:
        expected = torch_path(a, b, coefficients, out_dtype, intermediate)
        assert torch.equal(kernel_path(a, b, coefficients, out_dtype, intermediate), expected), out_dtype


def test_bf16_rounding_ties_overflow_and_specials_match_torch() -> None:
    """Round-to-nearest-even ties, values that round up to the next binade or to inf, subnormals, inf."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x7F7F7FFF, 0xBF818000, 0x00000001, 0x7F800000, 0xFF800000], dtype=torch.int64)
    a = bits.to(torch.int32).view(torch.float32)
    b = torch.zeros_like(a)
    one = Coefficients(1.0, 0.0, True, 1.0)
    expected = torch_path(a, b, one, torch.bfloat16, torch.float32)
    got = kernel_path(a, b, one, torch.bfloat16, torch.float32)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    assert torch.equal(got.view(torch.int16), a.to(torch.bfloat16).view(torch.int16))


def test_nan_stays_nan() -> None:
    a = torch.tensor([float("nan"), 1.0, float("inf")], dtype=torch.float32)
    b = torch.tensor([1.0, float("nan"), float("-inf")], dtype=torch.float32)
    for out_dtype in DTYPES:
        got = kernel_path(a, b, Coefficients(0.5, 0.5, True, 1.0), out_dtype, torch.float32)
        assert bool(got.float().isnan().all()), out_dtype


@pytest.mark.parametrize("dtype_a,dtype_b", [(d, d) for d in DTYPES] + [(torch.float16, torch.float32)])
def test_reductions_match_a_float64_reference(dtype_a: torch.dtype, dtype_b: torch.dtype) -> None:
    for n in (100_003, 7, 0):
        a, b = inputs(n, dtype_a, dtype_b, seed=n, colinear=False)
        got = slerp_kernel.reduce_pair(a, b)
        ref = ref_reductions(a, b)
        assert got == pytest.approx(ref, rel=1e-12, abs=1e-300), n
        stats = slerp_kernel.reduce_stats(a, b)
        assert stats.count == n
        if n:
            ca, cb, linear = ref_coefficients(*ref, 0.3)
            coefficients = stats.coefficients(0.3)
            assert coefficients.linear == linear
            assert coefficients.ca == pytest.approx(ca, rel=1e-9) and coefficients.cb == pytest.approx(cb, rel=1e-9)


def test_zero_norm_tensors() -> None:
    """A zero tensor counts as unnormalised (norm <= 1e-8): dot 0, the SLERP branch at theta = pi/2."""
    z = torch.zeros(1000, dtype=torch.bfloat16)
    b, _ = inputs(1000, torch.bfloat16, torch.bfloat16, seed=1, colinear=False)
    aa, bb, ab = slerp_kernel.reduce_pair(z, b)
    assert aa == 0.0 and ab == 0.0 and bb == pytest.approx(ref_reductions(b, b)[1], rel=1e-12)
    for t in (0.0, 0.5, 1.0):
        coefficients = slerp_coefficients(aa, bb, ab, t)
        ca, cb, linear = ref_coefficients(aa, bb, ab, t)
        assert coefficients.linear == linear is False
        assert (coefficients.ca, coefficients.cb) == pytest.approx((ca, cb), abs=1e-15)
        for left, right in ((z, b), (b, z), (z, z)):
            expected = torch_path(left, right, coefficients, torch.bfloat16, torch.bfloat16)
            assert torch.equal(kernel_path(left, right, coefficients, torch.bfloat16, torch.bfloat16), expected)


def test_unsupported_dtypes_stay_on_torch() -> None:
    assert slerp_kernel.supports(torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16)
    assert not slerp_kernel.supports(torch.float64, torch.float32, torch.float32, torch.float64)
    assert not slerp_kernel.supports(torch.float32, torch.float32, torch.float64, torch.float32)


# --------------------------------------------------------------------------------------------
# Whole merges, kernels on and off
# --------------------------------------------------------------------------------------------

SHAPE = LlamaShape(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=3)
SPEC = InterpolationSpec((FactorEntry("self_attn", (0.0, 0.6, 1.0), True), FactorEntry("", (0.35,))))


def _merge(tmp_path: Path, dtype: torch.dtype, out_dtype: str | None, use_cpu_kernel: bool, chunk_elements: int) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    root = tmp_path / "models"
    if not (root / "b").exists():
        a = make_base(SHAPE, seed=3)
        g = torch.Generator().manual_seed(4)
        b = {n: (torch.randn(w.shape, generator=g) * 0.05 if "self_attn" in n else w + 0.001 * torch.randn(w.shape, generator=g)) for n, w in a.items()}
        save_checkpoint(a, root / "a", dtype=dtype, config=SHAPE.config(dtype))
        save_checkpoint(b, root / "b", dtype=dtype, shards=2, config=SHAPE.config(dtype))
    roots = (root,)
    runner = MergeRunner(
        resolve(LocalPath(str(root / "a")), roots),
        resolve(LocalPath(str(root / "b")), roots),
        MergeSettings(t=SPEC, out_dtype=out_dtype),
        chunk_elements=chunk_elements,
        allowed_roots=roots,
        use_cpu_kernel=use_cpu_kernel,
    )
    name = f"out-{use_cpu_kernel}-{out_dtype}-{chunk_elements}"
    summary = runner.run(tmp_path / f".kinship-tmp-{name}", tmp_path / name, overwrite=False, card=ModelCard("a", "b", "", "", SPEC))
    tensors = {}
    for file in sorted((tmp_path / name).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors, (summary.linear_tensors, summary.slerp_tensors)


@pytest.mark.parametrize("chunk_elements", [1 << 20, 256], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, None), (torch.float32, "F32"), (torch.float16, "BF16")])
def test_merge_with_kernels_matches_the_torch_path(tmp_path: Path, chunk_elements: int, dtype: torch.dtype, out_dtype: str | None) -> None:
    fast, counts_fast = _merge(tmp_path, dtype, out_dtype, True, chunk_elements)
    slow, counts_slow = _merge(tmp_path, dtype, out_dtype, False, chunk_elements)
    assert counts_fast == counts_slow and min(counts_fast) > 0  # both branches taken, the same tensors
    assert set(fast) == set(slow)
    total = same = 0
    for name, got in fast.items():
        expected = slow[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if got.dtype == torch.float32:  # coefficients differ by ~1e-9 relative at most
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
        else:  # bf16: ordered bit patterns at most 1 apart (a result straddling a rounding boundary)
            order = lambda x: x.view(torch.int16).int()  # noqa: E731 (all values here are finite)
            assert int((order(got) - order(expected)).abs().max()) <= 1, name
        total += got.numel()
        same += int((got == expected).sum())
    assert same / total > 0.999
