"""The merge runner's device path: every method's torch code on `cpu` and, where CUDA is present, on `cuda`.

On CPU these tests run the device-generic path (`use_cpu_kernel=False`: the torch code the CUDA
path runs, with the host/device moves as identities) against the float64 references of
`merge_method_refs`; with CUDA they also run it on the device (pinned reads, asynchronous copies,
one stream shared by the worker threads) against the same references and against the CPU result,
and check what could differ on a GPU: DARE's int64 hash, TIES's histograms, bounded device memory.
`scripts/device_check.sh` runs them on a machine with a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from kinship_client import KinshipClient
from kinship_service.checkpoints.synthetic import save_checkpoint
from kinship_service.distributed.merge import worker_device
from kinship_service.errors import FailedPrecondition
from kinship_service.merge import sparsify
from kinship_service.server import metrics
from kinship_service.server.main import RunningServer

from .merge_method_refs import (
    as_f64,
    assert_close_f32,
    bf16_ulps,
    read_all,
    ref_dare_mask,
    ref_linear,
    ref_model_stock,
    ref_task_vectors,
    ref_topk_mask,
    run_method,
)
from .test_slerp import ref_slerp

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (scripts/device_check.sh runs these on one)")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

NAMES = {"model.embed_tokens.weight": (64, 40), "model.layers.0.mlp.up_proj.weight": (96, 130), "model.norm.weight": (40,)}
"""At chunk_elements 1024 the mlp tensor is 13 ranges on CPU and 2 on CUDA (8x ranges there): worker threads either way."""
CHUNK = 1024
WEIGHTS = [0.5, 0.25, 0.75]
"""Binary fractions: with 0.3 and 0.8 a bf16 element's weighted deltas 0.25 * 0.3 and -0.09375 * 0.8 sum to
-1.4e-17 in the float64 reference but to 0 in float32 (counted +), flipping TIES's majority sign there."""
SEED = 5

CASES: dict[str, dict[str, float]] = {
    "slerp": {"t": 0.3},
    "linear": {},
    "task_arithmetic": {"lambda": 0.8},
    "ties": {"density": 0.4},
    "dare_ties": {"density": 0.4},
    "dare_linear": {"density": 0.6},
    "model_stock": {},
}
"""Each method's global parameters; the task-vector methods and linear also get per-model WEIGHTS."""


def _family(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """A base and `count` fine-tunes with correlated task vectors (float32)."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in NAMES.items()}
    shared = {n: torch.randn(s, generator=g) * 0.1 for n, s in NAMES.items()}
    return [base] + [{n: base[n] + 0.5 * shared[n] + torch.randn(base[n].shape, generator=g) * 0.1 for n in NAMES} for _ in range(count)]


def _inputs(method: str) -> list[dict[str, torch.Tensor]]:
    family = _family(3, seed=21)
    if method == "slerp":
        return family[1:3]
    return family[1:] if method == "linear" else family


def _merge(tmp_path: Path, method: str, device: str, dtype: torch.dtype, tag: str) -> dict[str, torch.Tensor]:
    inputs = _inputs(method)
    weighted = method not in ("slerp", "model_stock")
    return run_method(
        tmp_path,
        method,
        inputs,
        global_settings=CASES[method],
        model_settings=[{"weight": w} for w in WEIGHTS] if weighted else (),
        seed=SEED,
        dtype=dtype,
        chunk_elements=CHUNK,
        device=device,
        use_cpu_kernel=False,
        tag=tag,
    )


def _reference(method: str, arrays: list[np.ndarray], name: str) -> np.ndarray:
    """The float64 reference of `method` on the inputs' arrays (method order)."""
    settings = CASES[method]
    if method == "slerp":
        return ref_slerp(arrays[0], arrays[1], settings["t"])[0]
    if method == "linear":
        return ref_linear(arrays, WEIGHTS)
    base, *xs = arrays
    if method == "model_stock":
        return ref_model_stock(base, xs)
    density = settings.get("density", 1.0)
    masks = None
    if method == "ties":
        masks = [ref_topk_mask(x - base, density) for x in xs]
    elif method.startswith("dare"):
        masks = [ref_dare_mask(SEED, name, m, base.size, density).reshape(base.shape) for m in range(len(xs))]
    return ref_task_vectors(
        base,
        xs,
        WEIGHTS,
        masks=masks,
        rescale=method.startswith("dare"),
        consensus=method in ("ties", "dare_ties"),
        normalize=method == "ties",
        lam=settings.get("lambda", 1.0),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(CASES))
def test_device_path_matches_the_float64_reference(tmp_path: Path, method: str, device: str) -> None:
    inputs = _inputs(method)
    out = _merge(tmp_path, method, device, torch.float32, "f32")
    for name in NAMES:
        arrays = [as_f64(m[name]) for m in inputs]
        assert out[name].dtype == torch.float32
        assert_close_f32(out[name], _reference(method, arrays, name), sum(np.abs(a) for a in arrays), f"{method} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(CASES))
def test_device_path_bf16_is_within_one_ulp(tmp_path: Path, method: str, device: str) -> None:
    inputs = _inputs(method)
    out = _merge(tmp_path, method, device, torch.bfloat16, "bf16")
    for name in NAMES:
        arrays = [as_f64(m[name].to(torch.bfloat16)) for m in inputs]
        assert out[name].dtype == torch.bfloat16
        assert bf16_ulps(out[name], _reference(method, arrays, name)) <= 1, f"{method} {name}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", sorted(CASES))
def test_cuda_result_equals_the_cpu_torch_path(tmp_path: Path, method: str, dtype: torch.dtype) -> None:
    """Same elementwise float32 math on both devices; only reduction order (norms, dot products, L1) and
    fused multiply-adds may differ: at most 2 float32 ulps (plus 1e-7 of the terms where they cancel), 1 bf16 ulp."""
    cpu = _merge(tmp_path, method, "cpu", dtype, "cpu")
    cuda = _merge(tmp_path, method, "cuda", dtype, "cuda")
    inputs = _inputs(method)
    for name in NAMES:
        if dtype == torch.bfloat16:
            assert bf16_ulps(cuda[name], as_f64(cpu[name])) <= 1, f"{method} {name}"
            continue
        got, want = as_f64(cuda[name]).reshape(-1), as_f64(cpu[name]).reshape(-1)
        scale = sum(np.abs(as_f64(m[name])) for m in inputs).reshape(-1)
        slack = 2 * np.spacing(np.abs(want).astype(np.float32)).astype(np.float64) + 1e-7 * scale
        assert (np.abs(got - want) <= slack).all(), f"{method} {name}: worst {np.max(np.abs(got - want))}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start", [0, 777, (1 << 40) + 3])
def test_dare_mask_is_bit_identical_on_any_device(device: str, start: int) -> None:
    """The torch int64 hash on `device` against NumPy's uint64 one: wrap-around, shifts and masks agree."""
    name = "model.layers.3.mlp.down_proj.weight"
    key = sparsify.mask_key(11, name, 2)
    count = 50_000
    mask = sparsify.random_mask(key, start, start + count, 0.37, use_kernel=False, device=device)
    assert mask.device.type == device and mask.dtype == torch.bool
    if start < 1 << 20:
        expected = ref_dare_mask(11, name, 2, start + count, 0.37)[start:]
    else:  # the reference from element `start` on, without materialising 2**40 elements
        with np.errstate(over="ignore"):
            from .merge_method_refs import _mix

            index = np.arange(start + 1, start + count + 1, dtype=np.uint64)
            stream = _mix(index * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key))
        expected = (stream >> np.uint64(11)) < np.uint64(int(0.37 * (1 << 53)))
    assert np.array_equal(mask.cpu().numpy(), expected)


@needs_cuda
def test_ties_histograms_and_masks_on_cuda_equal_cpu() -> None:
    """bincount, boolean selection and the tie-breaking cumsum give the same integers on CUDA."""
    g = torch.Generator().manual_seed(4)
    delta = (torch.randn(300_000, generator=g) * 20).round() / 20  # many equal magnitudes: ties at the threshold
    bits = sparsify.magnitude_bits(delta)
    bits_cuda = sparsify.magnitude_bits(delta.cuda())
    assert torch.equal(bits_cuda.cpu(), bits)
    high = sparsify.high_histogram(bits)
    assert torch.equal(sparsify.high_histogram(bits_cuda).cpu(), high)
    k = sparsify.keep_count(0.3, delta.numel())
    bin_, above = sparsify.high_bin(high, k)
    low = sparsify.low_histogram(bits, bin_)
    assert torch.equal(sparsify.low_histogram(bits_cuda, bin_).cpu(), low)
    limit = sparsify.threshold(bin_, above, low, k)
    assert not limit.all_equal_kept  # the tie-breaking path
    mask = sparsify.magnitude_mask(bits, limit, 5)
    assert torch.equal(sparsify.magnitude_mask(bits_cuda, limit, 5).cpu(), mask)


def _peak_device_bytes(tmp_path: Path, rows: int, tag: str) -> int:
    """Peak device memory of a bf16 TIES merge of three models with one (rows, 4096) tensor."""
    g = torch.Generator().manual_seed(9)
    name = "model.layers.0.mlp.up_proj.weight"
    base = torch.randn(rows, 4096, generator=g)
    inputs = [{name: base}] + [{name: base + torch.randn(rows, 4096, generator=g) * 0.01} for _ in range(2)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = run_method(
        tmp_path,
        "ties",
        inputs,
        global_settings={"weight": 0.5, "density": 0.5},
        dtype=torch.bfloat16,
        chunk_elements=1 << 15,
        device="cuda",
        use_cpu_kernel=False,
        tag=tag,
    )
    assert out[name].shape == (rows, 4096)
    return torch.cuda.max_memory_allocated() - before


@needs_cuda
def test_device_memory_stays_bounded_by_a_few_ranges(tmp_path: Path) -> None:
    """Ranges of 256K elements (32K x the device factor 8): the peak does not grow with the tensor (both hold the
    same 16 ranges' histograms at once, GROUP_RANGES), and stays at half the larger tensor in float32 (128 MiB) or less."""
    smaller = _peak_device_bytes(tmp_path, 4096, "16m")  # 64 ranges
    larger = _peak_device_bytes(tmp_path, 8192, "32m")  # 128 ranges
    assert larger <= 1.25 * smaller + 2 * 2**20, f"peak grew with the tensor: {smaller / 2**20:.1f} -> {larger / 2**20:.1f} MiB"
    assert larger < 64 * 2**20, f"peak device memory {larger / 2**20:.1f} MiB"


def test_ray_merge_worker_device() -> None:
    assert worker_device(0.0, [0]) == "cpu"  # no GPUs asked for: CPU even on a GPU node
    with pytest.raises(FailedPrecondition) as err:
        worker_device(1.0, [])
    assert err.value.reason == "MERGE_DEVICE_UNAVAILABLE"
    if CUDA:
        assert worker_device(0.5, ["3"]) == "cuda:0"  # Ray's CUDA_VISIBLE_DEVICES=3 is torch's cuda:0
    else:
        with pytest.raises(FailedPrecondition, match="torch sees no CUDA device"):
            worker_device(0.5, ["3"])


def test_merge_job_on_the_servers_device_matches_the_reference(
    server_factory: Callable[..., RunningServer], model_root: Path
) -> None:
    """KINSHIP_DEVICE=auto through a real server: the job runs on CUDA where present (else CPU), same answer,
    and `kinship_merge_seconds` counts it under that device."""
    family = _family(2, seed=31)
    paths = [str(save_checkpoint(t, model_root / f"job-{i}")) for i, t in enumerate(family)]
    device = "cuda:0" if CUDA else "cpu"
    labels = {"method": "dare_ties", "device": device}
    before = metrics.REGISTRY.get_sample_value("kinship_merge_seconds_count", labels) or 0.0
    with KinshipClient(server_factory(device="auto").address, timeout=120) as client:
        op = client.merge(None, None, method="dare_ties", base=paths[0], models=paths[1:], weight=0.5, density=0.5,
                          seed=SEED, output_path="device-job", dtype="float32")
        info = op.wait(timeout=300)
    assert info.state == "succeeded", info
    assert metrics.REGISTRY.get_sample_value("kinship_merge_seconds_count", labels) == before + 1  # timed on its device
    out = read_all(Path(info.output_path))
    for name in NAMES:
        base, *xs = [as_f64(t[name]) for t in family]
        masks = [ref_dare_mask(SEED, name, m, base.size, 0.5).reshape(base.shape) for m in range(2)]
        ref = ref_task_vectors(base, xs, [0.5, 0.5], masks=masks, rescale=True, consensus=True)
        assert_close_f32(out[name], ref, np.abs(base) + sum(np.abs(x) for x in xs), name)
