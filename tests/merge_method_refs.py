"""float64 NumPy references of mergekit 0.1.5's merge methods, written independently of the service, and a runner helper.

Each reference follows mergekit's definitions (merge_methods/linear.py, generalized_task_arithmetic.py,
model_stock.py, sparsify.py) in float64; TIES's top-k compares magnitudes in float32 as mergekit
does, ties broken by element order; DARE's mask is the documented hash of `sparsify`'s module
docstring, re-implemented here with NumPy's uint64 arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from kinship_service.checkpoints.sources import LocalPath, resolve
from kinship_service.checkpoints.synthetic import save_checkpoint
from kinship_service.merge.model_card import ModelCard
from kinship_service.merge.parameters import MethodParameters
from kinship_service.merge.plan import MergeSettings
from kinship_service.merge.runner import MergeRunner
from kinship_service.merge.slerp import InterpolationSpec

U64 = np.uint64


def ref_linear(models: Sequence[np.ndarray], weights: Sequence[float], normalize: bool = True) -> np.ndarray:
    """`sum w_i x_i (/ sum w_i)` in float64."""
    out = sum(w * np.asarray(x, np.float64) for w, x in zip(weights, models, strict=True))
    return out / sum(weights) if normalize else out


def ref_topk_mask(delta: np.ndarray, density: float) -> np.ndarray:
    """mergekit's magnitude(): the k = max(1, int(density * n)) largest float32 magnitudes, first ones first among equals."""
    flat = delta.reshape(-1)
    if density >= 1:
        return np.ones(delta.shape, bool)
    k = max(1, int(density * flat.size))
    magnitude = np.abs(flat).astype(np.float32)
    order = np.argsort(-magnitude, kind="stable")
    mask = np.zeros(flat.shape, bool)
    mask[order[:k]] = True
    return mask.reshape(delta.shape)


def _mix(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> U64(30))
    z = z * U64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> U64(27))
    z = z * U64(0x94D049BB133111EB)
    return z ^ (z >> U64(31))


def ref_dare_mask(seed: int, name: str, model: int, numel: int, density: float) -> np.ndarray:
    """The documented DARE mask: splitmix64 of (seed, fnv1a64(name NUL model), element)."""
    if density >= 1:
        return np.ones(numel, bool)
    h = 0xCBF29CE484222325
    for byte in f"{name}\x00{model}".encode():
        h = ((h ^ byte) * 0x100000001B3) % (1 << 64)
    with np.errstate(over="ignore"):
        key = _mix(np.array([(seed % (1 << 64)) ^ h], dtype=U64))[0]
        index = np.arange(1, numel + 1, dtype=U64)
        stream = _mix(index * U64(0x9E3779B97F4A7C15) + key)
    return (stream >> U64(11)) < U64(int(density * (1 << 53)))


def ref_task_vectors(
    base: np.ndarray,
    models: Sequence[np.ndarray],
    weights: Sequence[float],
    *,
    masks: Sequence[np.ndarray] | None = None,
    rescale: bool = False,
    consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
) -> np.ndarray:
    """mergekit's generalized task arithmetic in float64 with the given sparsification masks."""
    base = np.asarray(base, np.float64)
    deltas = []
    for i, x in enumerate(models):
        d = np.asarray(x, np.float64) - base
        if masks is not None:
            kept = d * masks[i]
            if rescale:
                before, after = np.abs(d).sum(), np.abs(kept).sum()
                if before >= 1e-7 and after >= 1e-7:
                    kept = kept * (before / after)
            d = kept
        deltas.append(d * weights[i])
    stack = np.stack(deltas)
    w = np.array(weights, np.float64).reshape((-1,) + (1,) * base.ndim)
    if consensus:
        majority = np.where(stack.sum(axis=0) >= 0, 1.0, -1.0)
        agree = np.sign(stack) == majority
        mixed = (stack * agree).sum(axis=0)
        divisor = (w * agree).sum(axis=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stack.sum(axis=0)
        divisor = w.sum()
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def ref_model_stock(base: np.ndarray, models: Sequence[np.ndarray]) -> np.ndarray:
    """mergekit's model_stock (filter_wise false) in float64."""
    w0 = np.asarray(base, np.float64).reshape(-1)
    ws = [np.asarray(x, np.float64).reshape(-1) for x in models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norm = np.linalg.norm(offsets[i]) * np.linalg.norm(offsets[j])
            cosines.append(np.clip(offsets[i] @ offsets[j] / max(norm, 1e-6), -1, 1))
    cos = float(np.mean(cosines))
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    t = 0.0 if abs(denominator) < 1e-6 else n * cos / denominator
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(np.shape(base))


def as_f64(tensor: torch.Tensor) -> np.ndarray:
    """A tensor of any float dtype as a float64 array."""
    return tensor.to(torch.float64).numpy()


def assert_close_f32(ours: torch.Tensor, ref: np.ndarray, scale: np.ndarray, name: str = "") -> None:
    """rtol 1e-5 against the float64 reference, with an absolute slack of 1e-6 of the terms' magnitude `scale`
    (float32 rounding of the terms alone is ~1e-7 of it where the sum cancels)."""
    got = as_f64(ours).reshape(-1)
    ref = np.asarray(ref, np.float64).reshape(-1)
    bad = np.abs(got - ref) > 1e-5 * np.abs(ref) + 1e-6 * np.asarray(scale, np.float64).reshape(-1)
    assert not bad.any(), f"{name}: {bad.sum()} of {bad.size} elements off, worst {np.max(np.abs(got - ref))}"


def bf16_ulps(ours: torch.Tensor, ref: np.ndarray) -> int:
    """The largest distance in bfloat16 ulps between our bf16 output and the float64 reference rounded to bf16."""

    def ordered(t: torch.Tensor) -> np.ndarray:
        bits = t.contiguous().view(torch.int16).numpy().astype(np.int64)
        return np.where(bits < 0, -(bits & 0x7FFF), bits)

    rounded = torch.from_numpy(np.asarray(ref, np.float64)).to(torch.float32).to(torch.bfloat16)
    return int(np.max(np.abs(ordered(ours.reshape(-1)) - ordered(rounded.reshape(-1)))))


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def run_method(
    tmp_path: Path,
    method: str,
    inputs: Sequence[Mapping[str, torch.Tensor]],
    *,
    global_settings: Mapping[str, float | InterpolationSpec] | None = None,
    model_settings: Sequence[Mapping[str, float]] = (),
    normalize: bool | None = None,
    rescale: bool | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    out_dtype: str | None = None,
    chunk_elements: int = 4096,
    threads: int = 2,
    leading_slice: bool = False,
    tag: str = "out",
    use_cpu_kernel: bool = True,
) -> dict[str, torch.Tensor]:
    """Save `inputs` (the method's order: base first for task-vector methods), merge them with the real runner, read the output.

    `use_cpu_kernel`: False runs the torch path instead of the numba kernels."""

    def spec(value: float | InterpolationSpec) -> InterpolationSpec:
        return value if isinstance(value, InterpolationSpec) else InterpolationSpec.constant(value)

    root = tmp_path / "models"
    paths = [save_checkpoint(tensors, root / f"{tag}-in{i}", dtype=dtype) for i, tensors in enumerate(inputs)]
    roots = (root,)
    checkpoints = [resolve(LocalPath(str(p)), roots) for p in paths]
    from kinship_service.merge.methods import get_method

    models = len(inputs) - get_method(method).base_inputs()
    parameters = MethodParameters(
        {k: spec(v) for k, v in (global_settings or {}).items()},
        tuple({k: spec(v) for k, v in m.items()} for m in model_settings),
        normalize,
        rescale,
        seed,
    )
    settings = MergeSettings(
        out_dtype=out_dtype, method=method, method_parameters=parameters, model_count=models, leading_slice=leading_slice
    )
    runner = MergeRunner(
        checkpoints[0],
        checkpoints[1],
        settings,
        more_checkpoints=checkpoints[2:],
        chunk_elements=chunk_elements,
        allowed_roots=roots,
        threads=threads,
        use_cpu_kernel=use_cpu_kernel,
    )
    out = tmp_path / "merged" / tag
    out.parent.mkdir(exist_ok=True)
    card = ModelCard("", "", "", "", InterpolationSpec.constant(0.0), method=method, models=tuple((str(p), "") for p in paths))
    runner.run(tmp_path / "merged" / f".kinship-tmp-{tag}", out, overwrite=False, card=card)
    return read_all(out)
