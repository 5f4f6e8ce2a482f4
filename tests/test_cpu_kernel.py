"""The fused CPU kernel against an independent float64 NumPy reference written here, and against
PairwiseMoments.update (the torch path it replaces); its fingerprints (sketch and group statistics,
computed in the same pass) against a CountSketch reference written here and FingerprintObserver."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from kinship_service.kinship import cpu_kernel, cpu_kernel_jit  # noqa: E402
from kinship_service.kinship.similarity import PairwiseMoments, similarities  # noqa: E402

REL = 1e-9
# Chunk lengths around the kernel's tile (<= 1024) and work-item (65536) boundaries.
LENGTHS = (1, 7, 1023, 65537, 200_003)
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def family(n: int, length: int, dtype: torch.dtype, *, seed: int, spread: float = 0.01) -> list[torch.Tensor]:
    """A base row and n model rows (base + correlated noise) in `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(length, generator=generator, dtype=torch.float64) * 0.05
    shared = torch.randn(length, generator=generator, dtype=torch.float64) * spread
    models = [base + shared + torch.randn(length, generator=generator, dtype=torch.float64) * spread for _ in range(n)]
    return [t.to(dtype) for t in (base, *models)]


def reference(rows: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Sums, Gram matrix and direct squared distances of the task vectors, in float64 NumPy."""
    values = [r.reshape(-1).to(torch.float64).numpy() for r in rows]
    deltas = np.stack([v - values[0] for v in values[1:]])
    n = deltas.shape[0]
    sq = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            diff = deltas[i] - deltas[j]
            sq[i, j] = np.dot(diff, diff)
    return {"sums": deltas.sum(axis=1), "gram": deltas @ deltas.T, "sq_dist": sq, "count": deltas.shape[1]}


def reference_metrics(rows: list[torch.Tensor]) -> dict[tuple[int, int], tuple[float, float, float]]:
    values = [r.reshape(-1).to(torch.float64).numpy() for r in rows]
    deltas = [v - values[0] for v in values[1:]]
    out = {}
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            x, y = deltas[i], deltas[j]
            out[(i, j)] = (
                float(np.corrcoef(x, y)[0, 1]),
                float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))),
                float(np.linalg.norm(x - y)),
            )
    return out


def fused(rows: list[torch.Tensor], pieces: int = 1) -> PairwiseMoments:
    moments = PairwiseMoments(len(rows) - 1)
    length = rows[0].numel()
    bounds = np.linspace(0, length, pieces + 1).astype(int)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=False):
        cpu_kernel.accumulate([r.reshape(-1)[start:stop] for r in rows], moments)
    return moments


def assert_moments_close(moments: PairwiseMoments, expected: dict[str, np.ndarray], rel: float) -> None:
    assert moments.count == expected["count"]
    for name in ("sums", "gram", "sq_dist"):
        got = getattr(moments, name).numpy()
        want = expected[name]
        scale = np.abs(want).max() or 1.0
        # Entrywise relative error, except entries that are ~0 relative to the largest.
        error = np.abs(got - want) / np.maximum(np.abs(want), scale * 1e-6)
        assert error.max() <= rel, f"{name}: relative error {error.max():.3g}\ngot  {got}\nwant {want}"


def test_available_with_numba_installed():
    assert cpu_kernel.available()
    assert cpu_kernel.warm_up() >= 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_statistics_match_numpy_reference(dtype, n):
    rows = family(n, 200_003, dtype, seed=n)
    assert_moments_close(fused(rows), reference(rows), REL)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("n", [1, 4, 6, 9])
def test_odd_lengths_and_group_sizes(length, n):
    """Every group layout of the kernel (groups of 4 models, cross passes 4 x 2) on awkward lengths."""
    rows = family(n, length, torch.bfloat16, seed=length + n)
    assert_moments_close(fused(rows), reference(rows), REL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_similarities_match_reference_metrics(dtype):
    rows = family(3, 65_537 * 3, dtype, seed=11)
    result = similarities(fused(rows, pieces=4))
    expected = reference_metrics(rows)
    for i, j, pcc, cosine, euclidean in result.pairs():
        for got, want, metric in zip((pcc, cosine, euclidean), expected[(i, j)], ("pcc", "cosine", "euclidean"), strict=False):
            assert math.isclose(got, want, rel_tol=REL, abs_tol=0.0), f"{metric} {i},{j}: {got!r} vs {want!r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_near_identical_models_keep_precision(dtype):
    """Kinship above 0.99999: the direct squared distance keeps the Euclidean distance's digits."""
    generator = torch.Generator().manual_seed(5)
    length = 150_001
    base = torch.randn(length, generator=generator, dtype=torch.float64) * 0.05
    a = base + torch.randn(length, generator=generator, dtype=torch.float64) * 0.01
    b = a + torch.randn(length, generator=generator, dtype=torch.float64) * 1e-5
    c = base + torch.randn(length, generator=generator, dtype=torch.float64) * 0.01
    rows = [t.to(dtype) for t in (base, a, b, c)]
    expected = reference_metrics(rows)
    assert expected[(0, 1)][0] > 0.99999
    result = similarities(fused(rows, pieces=3))
    for i, j, pcc, cosine, euclidean in result.pairs():
        for got, want in zip((pcc, cosine, euclidean), expected[(i, j)], strict=False):
            assert math.isclose(got, want, rel_tol=REL, abs_tol=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_equals_torch_path(dtype, n):
    """The same statistics as PairwiseMoments.update fed float64 deltas (to ~1e-12)."""
    rows = family(n, 100_000, dtype, seed=20 + n)
    torch_path = PairwiseMoments(n)
    torch_path.update(torch.stack([r.double() - rows[0].double() for r in rows[1:]]))
    expected = {name: getattr(torch_path, name).numpy() for name in ("sums", "gram", "sq_dist")}
    expected["count"] = torch_path.count
    assert_moments_close(fused(rows, pieces=2), expected, 1e-12)


def test_fp16_every_finite_bit_pattern_converts_exactly():
    """Subnormals, signed zeros and the largest halves are widened without rounding."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    halves = bits.view(torch.float16)
    finite = halves[torch.isfinite(halves)]
    zero = torch.zeros_like(finite)
    rows = [zero, finite, -finite]
    moments = fused(rows)
    values = finite.to(torch.float64).numpy()
    assert moments.sums[0].item() == pytest.approx(math.fsum(values), rel=1e-12, abs=1e-300)
    assert moments.gram[0, 0].item() == pytest.approx(math.fsum(values * values), rel=1e-12)
    assert moments.sq_dist[0, 1].item() == pytest.approx(math.fsum((2 * values) ** 2), rel=1e-12)


def test_bf16_subnormals_and_extremes():
    values = torch.tensor([1e-40, -1e-40, 3.0e38, -3.0e38, 0.0, -0.0, 1.5], dtype=torch.float32).to(torch.bfloat16)
    rows = [torch.zeros_like(values), values, values * 0]
    assert_moments_close(fused(rows), reference(rows), 1e-12)


def test_non_finite_values_propagate():
    rows = family(2, 1000, torch.bfloat16, seed=3)
    rows[1] = rows[1].clone()
    rows[1][500] = float("inf")
    moments = fused(rows)
    assert not math.isfinite(moments.gram[0, 0].item())
    assert not math.isfinite(moments.sq_dist[0, 1].item())


def test_mixed_and_fp8_dtypes_are_widened_exactly():
    rows = family(3, 70_001, torch.float32, seed=4)
    mixed = [rows[0].to(torch.bfloat16), rows[1], rows[2].to(torch.float16), rows[3].to(torch.float64)]
    assert_moments_close(fused(mixed), reference(mixed), REL)
    fp8 = [r.to(torch.float8_e4m3fn) for r in family(2, 5_000, torch.float32, seed=6, spread=0.5)]
    assert_moments_close(fused(fp8), reference(fp8), REL)


def test_rows_from_separate_buffers_and_strided_views():
    """Rows are independent tensors (like separate memory maps); non-contiguous ones are copied."""
    rows = family(3, 4_000, torch.bfloat16, seed=8)
    strided = [torch.stack([r, r]).T.reshape(-1)[::2] if i % 2 else r for i, r in enumerate(rows)]
    assert not strided[1].is_contiguous()
    shaped = [r.reshape(40, 100) for r in rows]
    expected = reference(rows)
    assert_moments_close(fused(strided), expected, REL)
    assert_moments_close(fused(shaped), expected, REL)


def test_result_does_not_depend_on_thread_count():
    """Work items are fixed-size and reduced in order: bit-identical on 1 or 2 threads."""
    rows = family(5, 300_000, torch.bfloat16, seed=9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(rows)
        torch.set_num_threads(2)
        two = fused(rows)
    finally:
        torch.set_num_threads(before)
    for name in ("sums", "gram", "sq_dist"):
        assert torch.equal(getattr(one, name), getattr(two, name))


def test_concurrent_callers_get_their_own_results():
    """The server runs passes on several gRPC threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    families = [family(3, 150_000, torch.bfloat16, seed=30 + i) for i in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda rows: fused(rows, pieces=3), families))
    for rows, moments in zip(families, results, strict=False):
        assert_moments_close(moments, reference(rows), REL)


def test_without_numba_the_torch_path_is_signalled():
    """numba is optional: available() is False, warm_up() a no-op, accumulate() says what to use."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch\n"
        "from kinship_service.kinship import cpu_kernel as k\n"
        "from kinship_service.kinship.similarity import PairwiseMoments\n"
        "assert not k.available() and k.warm_up() == 0.0\n"
        "try:\n"
        "    k.accumulate([torch.zeros(3)] * 3, PairwiseMoments(2))\n"
        "except RuntimeError as e:\n"
        "    assert 'PairwiseMoments.update' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_accumulates_onto_existing_moments():
    rows = family(3, 10_000, torch.float32, seed=12)
    moments = fused(rows, pieces=5)
    assert_moments_close(moments, reference(rows), REL)
    cpu_kernel.accumulate([r[:0] for r in rows], moments)  # empty chunk: no change
    assert moments.count == 10_000


def test_bad_rows_are_rejected():
    rows = family(2, 100, torch.float32, seed=1)
    with pytest.raises(ValueError, match="expected 3 rows"):
        cpu_kernel.accumulate(rows[:2], PairwiseMoments(2))
    with pytest.raises(ValueError, match="same number of elements"):
        cpu_kernel.accumulate([rows[0], rows[1], rows[2][:50]], PairwiseMoments(2))


# -- fingerprints in the same pass ----------------------------------------------------------
from kinship_service.cache.registry import FingerprintObserver  # noqa: E402
from kinship_service.checkpoints.sources import LocalPath, resolve  # noqa: E402
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint  # noqa: E402
from kinship_service.config import ConfigError, Settings  # noqa: E402
from kinship_service.kinship.exact import exact_kinship  # noqa: E402
from kinship_service.kinship.fingerprint import SKETCH_WIDTH, SketchBuilder, StatsBuilder, block_params, sign_table  # noqa: E402


def countsketch_reference(deltas: np.ndarray, name: str, offset: int, width: int) -> np.ndarray:
    """The fingerprint.py definition, element by element in float64: bucket (lo + r_j) mod W, sign S[lo] * s_j."""
    signs = sign_table(width).numpy()
    out = np.zeros((deltas.shape[0], width))
    positions = offset + np.arange(deltas.shape[1])
    blocks, lo = positions // width, positions % width
    for block in np.unique(blocks):
        rotation, sign = block_params(name, int(block), width)
        mask = blocks == block
        buckets = (lo[mask] + rotation) % width
        for i in range(deltas.shape[0]):
            np.add.at(out[i], buckets, sign * signs[lo[mask]] * deltas[i, mask])
    return out


# The fused kernel sums each chunk's sketch terms per bucket in float32 (cpu_kernel: at most a few
# hundred terms per bucket per chunk, each add rounded by at most 2**-24 of the partial sum) before
# adding them to the float64 sketch: within 1e-6 of the largest bucket, against a sketch error of
# 0.002 (fingerprint.py). The statistics stay float64 throughout.
FUSED_SKETCH_REL = 1e-6


def assert_sketch_close(got: np.ndarray, want: np.ndarray, rel: float = FUSED_SKETCH_REL) -> None:
    scale = np.abs(want).max()
    assert scale > 0
    error = np.abs(got - want).max() / scale
    assert error <= rel, f"sketch: relative error {error:.3g}"


def assert_stats_close(got: StatsBuilder, want: StatsBuilder, rel: float = 1e-12) -> None:
    for mine, theirs in zip(got.groups, want.groups, strict=False):
        assert list(mine) == list(theirs)  # the same groups, in the same order
        for group, stats in theirs.items():
            assert mine[group].count == stats.count
            assert math.isclose(mine[group].sum_squares, stats.sum_squares, rel_tol=rel)
            # A sum of deltas may nearly cancel: compare on the scale of its terms.
            scale = math.sqrt(stats.sum_squares * stats.count)
            assert abs(mine[group].sum - stats.sum) <= rel * scale


# (name, group, length, offset of the first chunk); chunks cut at these fractions.
PIECES = [("a.weight", "layers.0", 5_000, 0), ("b.weight", "layers.0", 3_001, 1_020), ("c.bias", "embed", 70_000, 65_530)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [1024, SKETCH_WIDTH])
def test_fused_sketch_and_stats_match_reference_and_observer(dtype, width):
    """Several tensors, chunks crossing sketch blocks (width 1024: dozens of blocks; 2**18 near its edge)."""
    n = 3
    fused = cpu_kernel.FusedFingerprint(SketchBuilder(n, width=width), StatsBuilder(n))
    observer = FingerprintObserver(n, "cpu", staging_bytes=1 << 16)
    observer.sketch = SketchBuilder(n, width=width)
    expected = np.zeros((n, width))
    moments: dict[str, PairwiseMoments] = {}
    for index, (name, group, length, offset) in enumerate(PIECES):
        if width == SKETCH_WIDTH:
            offset += SKETCH_WIDTH - 40_000  # the 70 000-element tensor crosses into block 1
        rows = family(n, length, dtype, seed=40 + index)
        deltas = np.stack([r.double().numpy() - rows[0].double().numpy() for r in rows[1:]])
        expected += countsketch_reference(deltas, name, offset, width)
        cuts = [0, 1, length // 3, length // 3 + 1023, length]
        group_moments = moments.setdefault(group, PairwiseMoments(n))
        plan = TensorPlanLike(name, group)
        for start, stop in zip(cuts[:-1], cuts[1:], strict=False):
            cpu_kernel.accumulate([r[start:stop] for r in rows], group_moments, sketch=fused, tensor=name, offset=offset + start)
            observer.observe(plan, offset + start, torch.from_numpy(deltas[:, start:stop]).contiguous())
    fused.finish(moments)
    observer.flush()
    got = fused.builder.sketch.numpy()
    assert_sketch_close(got, expected)
    assert_sketch_close(got, observer.sketch.sketch.numpy())
    assert_stats_close(fused.stats, observer.stats)


class TensorPlanLike:
    """What FingerprintObserver.observe reads of a TensorPlan: its name and group."""

    def __init__(self, name: str, group: str) -> None:
        self.name, self.group = name, group


def test_sketch_does_not_depend_on_threads_or_chunking():
    """Work items own disjoint bucket ranges: bit-identical on 1 or 2 threads; any chunking, the same to rounding."""
    n = 2
    rows = family(n, 600_000, torch.bfloat16, seed=50)
    sketches = []
    before = torch.get_num_threads()
    try:
        for threads, pieces in ((1, 1), (2, 1), (2, 7)):
            torch.set_num_threads(threads)
            fused = cpu_kernel.FusedFingerprint(SketchBuilder(n), StatsBuilder(n))
            moments = PairwiseMoments(n)
            bounds = np.linspace(0, 600_000, pieces + 1).astype(int)
            for start, stop in zip(bounds[:-1], bounds[1:], strict=False):
                cpu_kernel.accumulate([r[start:stop] for r in rows], moments, sketch=fused, tensor="t", offset=int(start) + 9)
            fused.finish({"g": moments})
            sketches.append(fused.builder.sketch.numpy().copy())
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(sketches[0], sketches[1])
    assert_sketch_close(sketches[2], sketches[0])  # other chunks: other float32 partial sums


def test_fused_observer_supports_only_what_it_can_fill():
    observer = FingerprintObserver(2, "cpu")
    fused = cpu_kernel.fused_observer(observer)
    assert fused is not None and fused.builder is observer.sketch and fused.stats is observer.stats

    class Opaque:  # no fused_target(): its observe() could do anything
        def observe(self, tensor, offset, deltas):
            pass

    assert cpu_kernel.fused_observer(Opaque()) is None
    assert cpu_kernel.fused_observer(object()) is None
    with pytest.raises(ValueError, match="tensor name"):
        cpu_kernel.accumulate(family(2, 10, torch.float32, seed=1), PairwiseMoments(2), sketch=fused)


class RecordingObserver:
    """A fingerprint observer that opts in to the fused kernel (`fused_target`) and counts `observe` calls."""

    def __init__(self, n: int) -> None:
        self.sketch = SketchBuilder(n)
        self.stats = StatsBuilder(n)
        self.calls = 0

    def fused_target(self):
        return self.sketch, self.stats

    def observe(self, tensor, offset, deltas):
        self.calls += 1
        self.sketch.add(tensor.name, offset, deltas)
        self.stats.add(tensor.group, deltas)


def _checkpoints(root, dtype, *, grow: bool):
    """Base and three models; embed/lm_head (4500 x 64) span two sketch blocks. With `grow`, model 2
    has 8 more vocabulary rows and 8 more MLP columns (leading slices: non-contiguous chunks)."""
    shape = LlamaShape(vocab_size=4500, hidden_size=64, intermediate_size=96, num_layers=2)
    base = make_base(shape, seed=60)
    models = make_family(base, 3, rho=0.5, seed=61)
    if grow:
        grown = dict(models[2])
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            grown[name] = torch.cat([grown[name], torch.randn(8, 64)])
        name = "model.layers.0.mlp.down_proj.weight"
        grown[name] = torch.cat([grown[name], torch.randn(grown[name].shape[0], 8)], dim=1)
        models[2] = grown
    dirs = [save_checkpoint(t, root / label, dtype=dtype) for t, label in zip((base, *models), ("base", "m0", "m1", "m2"), strict=False)]
    return [resolve(LocalPath(str(d)), [root]) for d in dirs]


@pytest.mark.parametrize("dtype,grow", [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)])
def test_exact_pass_fuses_fingerprints_like_the_torch_path(tmp_path, dtype, grow):
    """exact_kinship on real files: kernel + fused fingerprint == torch loop + FingerprintObserver."""
    checkpoints = _checkpoints(tmp_path, dtype, grow=grow)
    # A small chunk budget: many chunks per tensor, cut at row boundaries that cross sketch blocks.
    options = dict(leading_slice=grow, chunk_bytes=4 * 2**20 // 7)
    fast = RecordingObserver(3)
    fast_result = exact_kinship(checkpoints[0], checkpoints[1:], observers=[fast], **options)
    assert fast.calls == 0  # the kernel did the observer's work
    slow = FingerprintObserver(3, "cpu")
    slow_result = exact_kinship(checkpoints[0], checkpoints[1:], observers=[slow], use_cpu_kernel=False, **options)
    slow.flush()
    assert_sketch_close(fast.sketch.sketch.numpy(), slow.sketch.sketch.numpy())
    assert_stats_close(fast.stats, slow.stats)
    assert set(fast.stats.groups[0]) == set(fast_result.by_group)
    assert any(t.sliced for t in fast_result.plan.tensors) == grow
    for (_i, _j, *got), (_, _, *want) in zip(fast_result.overall.pairs(), slow_result.overall.pairs(), strict=False):
        for a, b in zip(got, want, strict=False):
            assert math.isclose(a, b, rel_tol=1e-9)


def test_torch_path_when_disabled_or_not_fusable(tmp_path):
    checkpoints = _checkpoints(tmp_path, torch.bfloat16, grow=False)
    disabled = RecordingObserver(3)
    exact_kinship(checkpoints[0], checkpoints[1:], observers=[disabled], use_cpu_kernel=False)
    assert disabled.calls > 0
    two = [RecordingObserver(3), RecordingObserver(3)]  # more than one observer: torch loop
    exact_kinship(checkpoints[0], checkpoints[1:], observers=two)
    assert all(o.calls > 0 for o in two)


@pytest.mark.parametrize("raw,value", [("1", True), ("0", False), ("true", True), ("False", False), ("yes", True), ("no", False)])
def test_cpu_kernel_setting(raw, value):
    assert Settings.from_env({"KINSHIP_CPU_KERNEL": raw}).cpu_kernel is value
    assert Settings.from_env({}).cpu_kernel is True


def test_cpu_kernel_setting_rejects_other_values():
    with pytest.raises(ConfigError, match="KINSHIP_CPU_KERNEL"):
        Settings.from_env({"KINSHIP_CPU_KERNEL": "maybe"})


def test_mixed_dtypes_and_fp16_are_sketched_too():
    """The widened-in-pieces path (a bf16 base with fp32 models) and fp16 rows feed the sketch as well."""
    n = 2
    for rows in (
        [r.to(torch.bfloat16) if i == 0 else r for i, r in enumerate(family(n, 70_001, torch.float32, seed=70))],
        family(n, 70_001, torch.float16, seed=71),
    ):
        fused = cpu_kernel.FusedFingerprint(SketchBuilder(n, width=4096), StatsBuilder(n))
        moments = PairwiseMoments(n)
        cpu_kernel.accumulate(rows, moments, sketch=fused, tensor="w", offset=4000)
        fused.finish({"g": moments})
        deltas = np.stack([r.double().numpy() - rows[0].double().numpy() for r in rows[1:]])
        assert_sketch_close(fused.builder.sketch.numpy(), countsketch_reference(deltas, "w", 4000, 4096))
        assert fused.stats.groups[1]["g"].count == 70_001
        assert math.isclose(fused.stats.groups[1]["g"].sum_squares, float(deltas[1] @ deltas[1]), rel_tol=1e-12)


def test_read_only_prefilled_cache_is_copied_to_a_writable_place(tmp_path):
    """The image's NUMBA_CACHE_DIR under a read-only root filesystem: numba only uses a writable cache,
    so its content is copied under TMPDIR first (os.access is patched: tests may run as root)."""
    prefilled = tmp_path / "image-cache"
    (prefilled / "sub").mkdir(parents=True)
    (prefilled / "sub" / "entry.nbi").write_text("index")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code = (
        "import os\n"
        f"read_only = {str(prefilled)!r}\n"
        "real = os.access\n"
        "os.access = lambda path, mode, **kw: False if str(path) == read_only and mode == os.W_OK else real(path, mode, **kw)\n"
        "from kinship_service.kinship import cpu_kernel\n"
        "print(os.environ['NUMBA_CACHE_DIR'])\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(prefilled), "TMPDIR": str(scratch)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    copy = scratch / "kinship-numba-cache"
    assert out.stdout.strip() == str(copy / cpu_kernel_jit.kernel_cache_name())  # a folder per version of the kernels
    assert (copy / "sub" / "entry.nbi").read_text() == "index"


def test_numba_cache_folder_is_named_by_the_kernels_sources(tmp_path):
    """numba checks only each function's own file; the folder per digest of kinship/ and merge/ catches inlined edits."""
    code = "import os\nfrom kinship_service.kinship import cpu_kernel\nprint(os.environ['NUMBA_CACHE_DIR'])\n"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    chosen = first.stdout.strip()
    assert chosen == str(tmp_path / "cache" / cpu_kernel_jit.kernel_cache_name())
    # A child process inherits the setting as it is: the name is not appended twice.
    again = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NUMBA_CACHE_DIR": chosen}, capture_output=True, text=True, timeout=120, check=True)
    assert again.stdout.strip() == chosen
    name = cpu_kernel_jit.kernel_cache_name()
    assert name.startswith("kinship-kernels-") and len(name) == len("kinship-kernels-") + 16
