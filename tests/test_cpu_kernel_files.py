"""The fused kernel reading the checkpoint files itself (`cpu_kernel.accumulate_from_files`).

Real safetensors files written here. It must give the very bits of the in-memory kernel
(`accumulate` on the same elements, chunked alike: same tiles, same order), whatever the thread
count, with and without the sketch; match an independent float64 NumPy reference; and answer a
file that shrinks under the read with CHECKPOINT_CHANGED, leaving the moments as they were.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("numba")

from kinship_service.checkpoints.sources import LocalPath, resolve  # noqa: E402
from kinship_service.checkpoints.streaming import CheckpointReader, OpenTensor, ReadStats  # noqa: E402
from kinship_service.errors import FailedPrecondition  # noqa: E402
from kinship_service.kinship import cpu_kernel  # noqa: E402
from kinship_service.kinship.fingerprint import SketchBuilder, StatsBuilder, block_params, sign_table  # noqa: E402
from kinship_service.kinship.similarity import PairwiseMoments  # noqa: E402

SHAPE = (1_000, 203)  # 203,000 elements: several work items and a ragged last one


def _family(root: Path, dtype: torch.dtype, n: int, seed: int) -> tuple[list[Path], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=generator, dtype=torch.float64) * 0.05
    rows = [base] + [base + torch.randn(SHAPE, generator=generator, dtype=torch.float64) * 0.01 for _ in range(n)]
    stored = [r.to(dtype) for r in rows]
    dirs = []
    for i, tensor in enumerate(stored):
        directory = root / f"c{i}"
        directory.mkdir()
        # Another tensor first, so the compared one starts at a non-zero offset of the file.
        save_file({"a.first": torch.ones(7, dtype=dtype), "b.weight": tensor}, str(directory / "model.safetensors"))
        dirs.append(directory)
    return dirs, stored


def _readers(root: Path, dirs: list[Path]) -> list[CheckpointReader]:
    return [CheckpointReader(resolve(LocalPath(str(d)), [root]), ReadStats()) for d in dirs]


def _reference(stored: list[torch.Tensor]) -> dict[str, np.ndarray]:
    values = [t.reshape(-1).double().numpy() for t in stored]
    deltas = np.stack([v - values[0] for v in values[1:]])
    n = deltas.shape[0]
    sq = np.array([[np.dot(deltas[i] - deltas[j], deltas[i] - deltas[j]) for j in range(n)] for i in range(n)])
    return {"sums": deltas.sum(axis=1), "gram": deltas @ deltas.T, "sq_dist": sq}


def _from_files(
    files: list[OpenTensor], n: int, cuts: list[int], sketch: cpu_kernel.FusedFingerprint | None, mapped_reads: bool
) -> PairwiseMoments:
    moments = PairwiseMoments(n)
    for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
        cpu_kernel.accumulate_from_files(
            files, start, stop - start, moments, sketch=sketch, tensor="b.weight", mapped_reads=mapped_reads
        )
    return moments


# Both ways the kernel reads: the ranges mapped (the default on Linux) and `pread` into its buffers.
READS = [pytest.param(True, id="mapped"), pytest.param(False, id="pread")]


# bf16 with n <= 4 takes the tile-free loops (cpu_kernel_direct), the rest the float64 tile.
CASES = [
    (torch.bfloat16, 1),
    (torch.bfloat16, 2),
    (torch.bfloat16, 3),
    (torch.bfloat16, 4),
    (torch.bfloat16, 5),
    (torch.float16, 3),
    (torch.float32, 2),
    (torch.float64, 3),
]


@pytest.mark.parametrize("dtype,n", CASES)
@pytest.mark.parametrize("sketched", [False, True])
@pytest.mark.parametrize("mapped_reads", READS)
def test_reading_the_files_gives_the_bits_of_the_in_memory_kernel(
    tmp_path: Path, dtype: torch.dtype, n: int, sketched: bool, mapped_reads: bool
) -> None:
    dirs, stored = _family(tmp_path, dtype, n, seed=1)
    cuts = [0, 65_536 + 203 * 7, 203_000]
    flat = [t.reshape(-1) for t in stored]
    width = 4096 if sketched else 0
    memory_sketch = cpu_kernel.FusedFingerprint(SketchBuilder(n, width=width), StatsBuilder(n)) if sketched else None
    in_memory = PairwiseMoments(n)
    for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
        cpu_kernel.accumulate(
            [f[start:stop] for f in flat], in_memory, sketch=memory_sketch, tensor="b.weight", offset=start
        )
    readers = _readers(tmp_path, dirs)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            file_sketch = (
                cpu_kernel.FusedFingerprint(SketchBuilder(n, width=width), StatsBuilder(n)) if sketched else None
            )
            with ExitStack() as stack:
                files = [stack.enter_context(r.open_tensor("b.weight")) for r in readers]
                assert all(f is not None for f in files) and cpu_kernel.reads_files(files)
                moments = _from_files(files, n, cuts, file_sketch, mapped_reads)
            results.append((moments, file_sketch))
    finally:
        torch.set_num_threads(before)
    expected = _reference(stored)
    for moments, file_sketch in results:
        assert moments.count == 203_000
        for name in ("sums", "gram", "sq_dist"):
            assert torch.equal(getattr(moments, name), getattr(in_memory, name)), name
            want = expected[name]
            scale = max(np.abs(want).max(), 1e-300)
            assert np.abs(getattr(moments, name).numpy() - want).max() <= 1e-9 * scale, name
        if sketched:
            assert file_sketch is not None and memory_sketch is not None
            assert torch.equal(file_sketch.builder.sketch, memory_sketch.builder.sketch)
            assert file_sketch.builder.sketch.abs().max() > 0


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_sketched_runs_pair_blocks_and_take_every_element_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    """bf16, n <= 4 (`cpu_kernel_runs`): spans narrower than the sketch, so blocks' runs wrap inside spans as in real passes."""
    dirs, stored = _family(tmp_path, torch.bfloat16, n, seed=5)
    width = 2**15
    # Spans of 4,096 buckets, 8 per block: as in real passes (16 spans of 16,384 per block of 2**18),
    # most blocks reach a span in one run, the block whose rotation wraps there in two.
    monkeypatch.setattr(cpu_kernel, "SKETCH_BUCKETS_L2_BYTES", 4 * n * cpu_kernel.SKETCH_SPAN_MIN)
    assert cpu_kernel.sketch_span(n, width) == width // 8
    cuts = [0, 65_536 + 203 * 7, 203_000]
    flat = [t.reshape(-1) for t in stored]
    memory_sketch = cpu_kernel.FusedFingerprint(SketchBuilder(n, width=width), StatsBuilder(n))
    in_memory = PairwiseMoments(n)
    for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
        cpu_kernel.accumulate(
            [f[start:stop] for f in flat], in_memory, sketch=memory_sketch, tensor="b.weight", offset=start
        )
    # The plan of the second chunk: every element once, in the bucket its block hashes it to.
    offset, length = cuts[1], cuts[2] - cuts[1]
    item_span, item_first_run, bucket, run_length, run_a, lo_a, sign_a, run_b, lo_b, sign_b = memory_sketch.runs(
        "b.weight", offset, length
    )
    span = memory_sketch.span
    taken = np.zeros(length, dtype=np.int64)
    paired = 0
    for w in range(item_span.size):
        for r in range(item_first_run[w], item_first_run[w + 1]):
            for start, lo, sign in ((run_a[r], lo_a[r], sign_a[r]), (run_b[r], lo_b[r], sign_b[r])):
                if start < 0:
                    continue
                elements = np.arange(start, start + run_length[r])
                taken[elements] += 1
                block, position = np.divmod(offset + elements, width)
                rotation, block_sign = block_params("b.weight", int(block[0]), width)
                assert (block == block[0]).all() and sign == block_sign and lo == position[0]
                hashed = (position + rotation) % width
                assert np.array_equal(hashed, item_span[w] * span + bucket[r] + np.arange(run_length[r]))
            paired += run_length[r] if run_b[r] >= 0 else 0
    assert (taken == 1).all()
    assert 2 * paired >= 0.9 * length  # runs without a partner: only where the chunk cuts a block
    readers = _readers(tmp_path, dirs)
    for mapped_reads in (True, False):
        file_sketch = cpu_kernel.FusedFingerprint(SketchBuilder(n, width=width), StatsBuilder(n))
        with ExitStack() as stack:
            files = [stack.enter_context(r.open_tensor("b.weight")) for r in readers]
            moments = _from_files(files, n, cuts, file_sketch, mapped_reads)
        for name in ("sums", "gram", "sq_dist"):
            assert torch.equal(getattr(moments, name), getattr(in_memory, name)), name
        assert torch.equal(file_sketch.builder.sketch, memory_sketch.builder.sketch), f"mapped_reads={mapped_reads}"
    expected = _reference(stored)
    for name in ("sums", "gram", "sq_dist"):
        want = expected[name]
        assert np.abs(getattr(in_memory, name).numpy() - want).max() <= 1e-9 * max(np.abs(want).max(), 1e-300), name
    # and the sketch is the float64 reference's: element e of block j in bucket (e + r_j) mod width, sign s_j * S[e]
    deltas = np.stack([f.double().numpy() - flat[0].double().numpy() for f in flat[1:]])
    signs = sign_table(width).numpy()
    reference = np.zeros((n, width))
    for block in range((deltas.shape[1] + width - 1) // width):
        rotation, sign = block_params("b.weight", block, width)
        part = deltas[:, block * width : (block + 1) * width]
        lo = np.arange(part.shape[1])
        np.add.at(reference, (slice(None), (lo + rotation) % width), sign * signs[lo] * part)
    np.testing.assert_allclose(
        memory_sketch.builder.sketch.numpy(), reference, rtol=0, atol=1e-6 * np.abs(reference).max()  # float32 partial sums per chunk
    )


@pytest.mark.parametrize("mapped_reads", READS)
def test_a_file_shrinking_under_the_kernel_is_checkpoint_changed(tmp_path: Path, mapped_reads: bool) -> None:
    n = 2
    dirs, _stored = _family(tmp_path, torch.bfloat16, n, seed=2)
    readers = _readers(tmp_path, dirs)
    target = dirs[2] / "model.safetensors"
    with ExitStack() as stack:
        files = [stack.enter_context(r.open_tensor("b.weight")) for r in readers]
        assert all(f is not None for f in files)
        # Validated and opened; now the last model's file ends in the middle of the tensor.
        os.truncate(target, target.stat().st_size - 100_000)
        for sketched in (False, True):
            moments = PairwiseMoments(n)
            sketch = cpu_kernel.FusedFingerprint(SketchBuilder(n), StatsBuilder(n)) if sketched else None
            with pytest.raises(FailedPrecondition) as excinfo:
                cpu_kernel.accumulate_from_files(
                    files, 0, 203_000, moments, sketch=sketch, tensor="b.weight", mapped_reads=mapped_reads
                )
            assert excinfo.value.reason == "CHECKPOINT_CHANGED", excinfo.value
            assert "model.safetensors of" in str(excinfo.value) and "c2" in str(excinfo.value)
            assert moments.count == 0 and not moments.gram.any()  # nothing half-added
        # The untouched part still reads.
        moments = PairwiseMoments(n)
        cpu_kernel.accumulate_from_files(files, 0, 1_000, moments, mapped_reads=mapped_reads)
        assert moments.count == 1_000


def test_what_the_kernel_cannot_read_is_refused(tmp_path: Path) -> None:
    dirs, _stored = _family(tmp_path, torch.bfloat16, 2, seed=3)
    readers = _readers(tmp_path, dirs)
    with ExitStack() as stack:
        files = [stack.enter_context(r.open_tensor("b.weight")) for r in readers]
        with readers[0].open_tensor("b.weight", (1_000, 100)) as sliced:
            assert sliced is None  # trailing dimensions sliced: not one byte range
        with pytest.raises(ValueError, match="not inside every tensor"):
            cpu_kernel.accumulate_from_files(files, 200_000, 3_001, PairwiseMoments(2))
        with pytest.raises(ValueError, match="expected 3 tensors"):
            cpu_kernel.accumulate_from_files(files[:2], 0, 10, PairwiseMoments(2))
