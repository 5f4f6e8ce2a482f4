"""Fused CPU kernel for the exact pass: one read of the stored rows, the statistics accumulated in float64.

`accumulate(rows, moments)` does what `moments.update(rows[1:] - rows[0])` does in
float64, without float64 copies of the chunk, a subtraction pass or ~10 torch ops per
block: a numba kernel walks the chunk in L1-sized tiles, converts the base and model
elements of a tile to float64 (bf16/fp16 from their bits, so nothing is rounded),
subtracts the base, and adds every per-model sum, Gram entry and direct squared
distance `sum((d_i - d_j)^2)` of the tile to per-work-item partials, reading each tile
row once per group of four models (register-blocked, vectorised). Work items are
shared among `torch.get_num_threads()` threads (the kernel releases the GIL) and
their partials reduced in order, so the result does not depend on the thread count.

With `sketch=` (a `FusedFingerprint`, from `fused_observer`), the same tiles also feed
the task-vector fingerprint of the pass (`fingerprint.py`): each element, while in L1,
is added as `s_j * S[lo] * d` to bucket `(lo + r_j) mod W` of its model's CountSketch,
with the block keys `(r_j, s_j)` computed in Python by `fingerprint.block_params` and
passed as arrays. A sketched chunk's work items are bucket ranges (each gathers the
runs of elements of every sketch block that hash there), so threads never add to the
same bucket (no races, no atomics, no per-thread copies of the sketch) and the result
does not depend on the thread count. A work item sums its chunk's terms per bucket in float32
(exact bf16 widening and float32 deltas; at most a few hundred adds per bucket per chunk), then
adds them to the float64 sketch: within ~1e-6 of the float64 sums, against the sketch's own
0.002, and 0.17 CPU-s less per exact pass of the benchmark than float64 buckets (half the L2
traffic, twice the SIMD width). The per-group statistics of the `StatsBuilder`
are the moments' count, sums and Gram diagonal, so they cost nothing.

`accumulate_from_files` does the same from open files (`CheckpointReader.open_tensor`): it maps
the chunk's byte ranges read-only (`checkpoints/mapped.py`) and runs the in-memory loops on the
page-cache pages, or, without maps, each thread `pread`s the pieces it is about to use into its
own L2-sized buffers inside the compiled loop; the same tiles in the same order (the same bits). bf16 rows of at most four models skip the
float64 tile altogether (`cpu_kernel_direct.py`: widened in registers), and their sketched chunks
add statistics and sketch in one loop over two sketch blocks at a time (`cpu_kernel_runs.py`).

This module is the driver: it checks the rows, cuts a chunk into work items, runs them on a
thread pool and reduces their partials into the moments. The compiled loops are in
`cpu_kernel_compiled.py`, numba's set-up (cache dir, import, bit intrinsics) in
`cpu_kernel_jit.py`. numba is optional: `available()` is False when it cannot be imported,
and the caller keeps the torch path (`PairwiseMoments.update`, and the observers' `observe`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from kinship_service.checkpoints import mapped
from kinship_service.checkpoints.streaming import OpenTensor
from kinship_service.kinship import cpu_kernel_jit
from kinship_service.kinship.cpu_kernel_jit import BF16, FLOAT, FP16, as_numpy
from kinship_service.kinship.fingerprint import GroupStats, SketchBuilder, StatsBuilder, block_params, sign_table
from kinship_service.kinship.similarity import PairwiseMoments

if cpu_kernel_jit.available():
    from kinship_service.kinship.cpu_kernel_compiled import (
        DIRECT_STEP,
        READ_OK,
        READ_SHORT,
        SUPER_BLOCK,
        moments_kernel,
        moments_kernel_from_files,
        sketch_kernel,
        sketch_kernel_from_files,
        tile_free,
    )
    from kinship_service.kinship.cpu_kernel_jit import PREAD_ADDRESS
    from kinship_service.kinship.cpu_kernel_runs import plan_runs, runs_kernel, runs_kernel_from_files

# The n + 2 float64 tile rows (base, n deltas, a zero row) fit in this much L1 (see _tile_elements).
TILE_L1_BYTES = 32 * 1024
# Work items of a chunk are handed out in this many runs per thread (load balancing).
PIECES_PER_THREAD = 4
# Mixed or exotic dtypes (fp8, a bf16 base with fp32 models) are widened exactly with
# torch in pieces of this many elements, so the temporary copy stays small.
WIDEN_PIECE = 1 << 20
# Sketch buckets per work item of a sketched chunk: its n float32 rows of partial sums take at
# most this much L2 (at least SKETCH_SPAN_MIN buckets, at most SKETCH_SPAN_MAX: a chunk has
# width / span work items to share among threads). Larger spans mean longer runs per read: on
# AMD EPYC (Zen 4, 1 MiB L2), 3 models, spans of 32,768 buckets (64 KiB reads of bf16) took
# 0.66-0.69 CPU-s per sketched exact pass of the benchmark, 16,384 0.70-0.71; 4,096 cost 0.6 CPU-s
# more (the tiled loops). The span changes no bucket's terms or their order, only the
# statistics' summation order (fixed: it does not depend on the thread count).
SKETCH_BUCKETS_L2_BYTES = 512 * 1024
SKETCH_SPAN_MIN = 4096
SKETCH_SPAN_MAX = 32768
# `cpu_kernel_runs` adds a run's float64 statistics to the work item's partials every this many
# elements (the loop keeps them in registers in between; 512, the tiled loops' tile, cost 0.1
# CPU-s more per sketched pass of the benchmark than a whole span's run at a time).
RUN_TILE_ELEMENTS = SKETCH_SPAN_MAX
# accumulate_from_files: a thread's n + 1 row buffers (one piece of every row) take at most this much L2.
READ_L2_BYTES = 512 * 1024
# accumulate_from_files mapping the files: the chunk's mapped pages count in the process's RSS (as
# file pages) until it is unmapped, so passes cut mapped chunks at this many bytes over all rows
# (`mapped_chunk_elements`; with DEFER_UNMAP two chunks are mapped at a time). 256 MiB chunks
# (KINSHIP_CHUNK_BYTES) held +230 MiB of RSS; 128 MiB chunks were as fast on the benchmark's
# sketched pass (64 MiB: 4-5 % slower, the per-chunk work, with and without DEFER_UNMAP).
MAPPED_CHUNK_BYTES = 128 * 2**20
# Mapped chunks are unmapped while the next chunk's kernel already runs (`mapped.unmap_deferred`).
DEFER_UNMAP = True

# How the loader reads a row (the kernel's `kind` argument).
_KIND = {torch.float32: FLOAT, torch.float64: FLOAT, torch.bfloat16: BF16, torch.float16: FP16}


_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """The threads (besides the caller's) that run shares of a chunk; created on first use."""
    global _executor
    if _executor is None:
        with _lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="kinship-kernel")
    return _executor


def available() -> bool:
    """Whether the fused kernel can run here (numba importable); else use `PairwiseMoments.update`."""
    return cpu_kernel_jit.available()


def _tile_elements(n: int) -> int:
    """A power-of-two tile length whose n + 2 float64 rows fit in TILE_L1_BYTES (at least 256)."""
    tile = max(256, TILE_L1_BYTES // (8 * (n + 2)))
    return min(1 << (tile.bit_length() - 1), SUPER_BLOCK)


def sketch_span(n: int, width: int) -> int:
    """Buckets per work item of a sketched chunk: a power of two, n float32 rows within SKETCH_BUCKETS_L2_BYTES, at most `width`."""
    fit = min(SKETCH_SPAN_MAX, max(SKETCH_SPAN_MIN, SKETCH_BUCKETS_L2_BYTES // (4 * max(1, n))))
    return min(1 << (fit.bit_length() - 1), width)


class FusedFingerprint:
    """The sketch and statistics of a `FingerprintObserver`, filled by the fused kernel instead.

    Wraps the observer's `SketchBuilder` (its (n, W) float64 sketch is updated in place)
    and `StatsBuilder`. Pass it as `accumulate(..., sketch=self, tensor=name, offset=o)`
    for every chunk, then call `finish(moments_by_group)` once at the end of the pass:
    it sets each group's count, sum and sum of squares from the group's moments (count,
    sums, Gram diagonal: the same float64 sums the observer would have computed).
    Afterwards the builders hold what `observe` on every chunk and `flush()` would have
    left, up to summation order and the float32 partial sums of each chunk's sketch terms
    (~1e-7 relative; the statistics ~1e-16; deterministic, whatever the thread count).

    A sketched chunk is cut by sketch bucket, not by position: work item w owns buckets
    [w * span, (w + 1) * span) (`sketch_span`) and takes, from every sketch block the chunk
    touches, the run of elements hashed there. So threads never add to one bucket, and
    each bucket is updated once per chunk from a small cache-resident buffer instead of
    once per sketch block (the n * 16 bytes of read-modify-write per element would cost
    more than the statistics).
    """

    def __init__(self, sketch: SketchBuilder, stats: StatsBuilder) -> None:
        self.builder = sketch
        self.stats = stats
        self.n = sketch.n
        self.width = sketch.width
        self.span = sketch_span(sketch.n, sketch.width)
        self.signs = sign_table(sketch.width, sketch.seed).numpy().astype(np.int8)
        self.target = sketch.sketch.numpy()

    def keys(self, tensor: str, offset: int, length: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Rotations and signs of the sketch blocks that elements [offset, offset + length) of `tensor` touch."""
        first, last = offset // self.width, (offset + max(length, 1) - 1) // self.width
        params = [block_params(tensor, j, self.width, self.builder.seed) for j in range(first, last + 1)]
        return (np.array([r for r, _ in params], dtype=np.int64), np.array([g for _, g in params], dtype=np.float64))

    def segments(self, tensor: str, offset: int, length: int) -> tuple[npt.NDArray[Any], ...]:
        """The work items of a chunk (elements [offset, offset + length) of `tensor`) and their runs.

        Returns (item_span, item_first, seg_start, seg_length, seg_lo, seg_sign,
        seg_bucket): see `cpu_kernel_compiled.sketch_kernel`. Spans no element hashes to are left out.
        """
        return self._segments(tensor, offset, length)[:7]

    def runs(self, tensor: str, offset: int, length: int) -> tuple[npt.NDArray[Any], ...]:
        """The work items of a chunk as `cpu_kernel_runs.runs_kernel` takes them: (item_span, then `plan_runs`'s arrays)."""
        item_span, item_first, *segments = self._segments(tensor, offset, length)
        return (item_span, *plan_runs(item_first, *segments))

    def _segments(self, tensor: str, offset: int, length: int) -> tuple[npt.NDArray[Any], ...]:
        """`segments`, and each segment's sketch block (the chunk's first block is 0) last."""
        width, span = self.width, self.span
        rotations, block_signs = self.keys(tensor, offset, length)
        blocks = rotations.size
        origin = (offset // width + np.arange(blocks, dtype=np.int64)) * width - offset  # chunk index of lo = 0
        lo_min = np.maximum(0, -origin)
        lo_max = np.minimum(width, length - origin)
        spans = np.arange(width // span, dtype=np.int64)
        first_lo = (spans[:, None] * span - rotations[None, :]) % width  # (spans, blocks): lo of the span's bucket 0
        # Each (span, block) pair is at most two runs of lo: up to the end of the block, then from 0.
        run_lo = np.stack([first_lo, np.zeros_like(first_lo)], axis=2)
        run_hi = np.stack([np.minimum(first_lo + span, width), first_lo + span - width], axis=2)
        run_bucket = np.stack([np.zeros_like(first_lo), width - first_lo], axis=2)
        lo = np.maximum(run_lo, lo_min[None, :, None])
        hi = np.minimum(run_hi, lo_max[None, :, None])
        keep = hi > lo
        span_of, block_of, _ = np.nonzero(keep)  # C order: by span, then block, then run
        seg_lo = lo[keep]
        seg_length = hi[keep] - seg_lo
        seg_bucket = run_bucket[keep] + (seg_lo - run_lo[keep])
        seg_start = origin[block_of] + seg_lo
        item_span, item_first = np.unique(span_of, return_index=True)
        item_first = np.append(item_first, span_of.size).astype(np.int64)
        return (
            item_span.astype(np.int64),
            item_first,
            seg_start.astype(np.int64),
            seg_length.astype(np.int64),
            seg_lo.astype(np.int64),
            block_signs[block_of].astype(np.float64),
            seg_bucket.astype(np.int64),
            block_of.astype(np.int64),
        )

    def finish(self, moments: dict[str, PairwiseMoments]) -> None:
        """End of the pass: set the per-group statistics from `moments` (the sketch is already in place)."""
        for group, m in moments.items():  # insertion order = first tensor of each group, as observe() would
            if m.count == 0:
                continue
            sums = m.sums.tolist()
            squares = m.gram.diagonal().tolist()
            for i in range(self.n):
                stats = self.stats.groups[i].setdefault(group, GroupStats())
                stats.count += m.count
                stats.sum += sums[i]
                stats.sum_squares += squares[i]


def fused_observer(observer: object) -> FusedFingerprint | None:
    """A `FusedFingerprint` doing `observer`'s work inside the kernel, or None when it cannot.

    Supported: observers with a `fused_target()` method returning their
    (SketchBuilder, StatsBuilder) after flushing what they staged (as
    `cache/registry.FingerprintObserver` does). None as well when numba is missing or the
    sketch is not a CPU float64 (n, W) tensor.
    """
    if not available():
        return None
    target = getattr(observer, "fused_target", None)
    if not callable(target):
        return None
    sketch, stats = target()
    if not isinstance(sketch, SketchBuilder) or not isinstance(stats, StatsBuilder) or stats.n != sketch.n:
        return None
    tensor = sketch.sketch
    if tensor.device.type != "cpu" or tensor.dtype != torch.float64 or not tensor.is_contiguous() or tuple(tensor.shape) != (sketch.n, sketch.width):
        return None
    return FusedFingerprint(sketch, stats)


def accumulate(
    rows: Sequence[torch.Tensor],
    moments: PairwiseMoments,
    *,
    sketch: FusedFingerprint | None = None,
    tensor: str | None = None,
    offset: int = 0,
) -> None:
    """Add a chunk to `moments` as `moments.update((rows[1:] - rows[0]).double())` would, fused.

    rows[0] is the base chunk and rows[1:] the n models' chunks: CPU tensors with equal
    element counts (flattened), each in its stored dtype, possibly from different memory
    maps. `moments` must live on the CPU. With `sketch`, the deltas are also sketched as
    elements [offset, offset + k) of tensor `tensor` (see `FusedFingerprint`). Raises
    RuntimeError when numba is unavailable (check `available()` first) and ValueError on
    mismatched rows.
    """
    if not available():
        raise RuntimeError(f"{cpu_kernel_jit.IMPORT_ERROR}; use PairwiseMoments.update")
    n = moments.n
    if sketch is not None and (tensor is None or sketch.n != n or offset < 0):
        raise ValueError("a sketched chunk needs its tensor name, a non-negative offset and a sketch of as many models")
    if len(rows) != n + 1:
        raise ValueError(f"expected {n + 1} rows (the base and {n} models), got {len(rows)}")
    flat = [r.reshape(-1) for r in rows]
    length = flat[0].numel()
    if any(f.numel() != length for f in flat):
        raise ValueError("rows must have the same number of elements: " + ", ".join(str(f.numel()) for f in flat))
    if any(f.device.type != "cpu" for f in flat) or moments.sums.device.type != "cpu":
        raise ValueError("the fused kernel runs on CPU tensors and CPU moments only")
    if length == 0:
        return
    dtypes = {f.dtype for f in flat}
    if len(dtypes) == 1 and flat[0].dtype in _KIND:
        _run([f.contiguous() for f in flat], _KIND[flat[0].dtype], n, length, moments, sketch, tensor, offset)
        return
    # Mixed or exotic dtypes: widen exactly to one native dtype, a piece at a time.
    wide = torch.float64 if torch.float64 in dtypes else torch.float32
    for start in range(0, length, WIDEN_PIECE):
        stop = min(length, start + WIDEN_PIECE)
        _run([f[start:stop].to(wide) for f in flat], FLOAT, n, stop - start, moments, sketch, tensor, offset + start)


def _run(
    rows: list[torch.Tensor],
    kind: int,
    n: int,
    length: int,
    moments: PairwiseMoments,
    sketch: FusedFingerprint | None = None,
    tensor: str | None = None,
    offset: int = 0,
) -> None:
    arrays = [as_numpy(r) for r in rows]  # kept referenced until the kernel returns
    addresses = np.array([a.ctypes.data for a in arrays], dtype=np.int64)
    like = np.empty(0, dtype=arrays[0].dtype)  # only its dtype matters: one compiled kernel per dtype
    _reduce(_partials(addresses, like, kind, n, length, sketch, tensor, offset), n, length, moments)


def _partials(
    addresses: npt.NDArray[np.int64],
    like: npt.NDArray[Any],
    kind: int,
    n: int,
    length: int,
    sketch: FusedFingerprint | None,
    tensor: str | None,
    offset: int,
    meanwhile: Callable[[], None] | None = None,
) -> npt.NDArray[np.float64]:
    """The work items' partial sums of `length` elements of the n + 1 rows at `addresses` (sketched as elements offset.. of `tensor`)."""
    blocks = (length + SUPER_BLOCK - 1) // SUPER_BLOCK
    tile = _tile_elements(n)
    segments: tuple[npt.NDArray[Any], ...] = ()
    runs = sketch is not None and tile_free(kind, n)
    if sketch is not None:
        segments = sketch.runs(tensor or "", offset, length) if runs else sketch.segments(tensor or "", offset, length)
        blocks = segments[0].size  # work items: the sketch spans the chunk hashes to
    partials = np.empty((blocks, n + 2 * n * n), dtype=np.float64)

    def runner() -> Callable[[int, int], None]:
        def run(first: int, last: int) -> None:
            if sketch is None:
                moments_kernel(addresses, like, kind, length, tile, partials, first, last)
            elif runs:
                runs_kernel(addresses, like, RUN_TILE_ELEMENTS, partials, first, last, *segments, sketch.target, sketch.signs, sketch.span)
            else:
                sketch_kernel(addresses, like, kind, tile, partials, first, last, *segments, sketch.target, sketch.signs, sketch.span)

        return run

    _in_parallel(blocks, runner, meanwhile)
    return partials


def _in_parallel(blocks: int, runner: Callable[[], Callable[[int, int], None]], meanwhile: Callable[[], None] | None = None) -> None:
    """Run work items 0..blocks-1 as `runner()(first, last)` calls on this thread and the pool's (one runner per thread).

    `meanwhile` runs on this thread once the pool's threads have their work, before this thread
    joins it (the unmapping of the previous chunk, `checkpoints.mapped.unmap_deferred`).

    Runs of work items, several per thread, taken in turn by the pool's threads and this
    one: a thread the OS parks on a busy machine holds up little. The kernels drop the
    GIL, and idle threads block instead of spinning (an OpenMP pool would fight torch's).
    """
    if blocks <= 0:
        return
    threads = min(blocks, max(1, torch.get_num_threads()))
    pieces = min(blocks, PIECES_PER_THREAD * threads)
    bounds = [blocks * i // pieces for i in range(pieces + 1)]
    taken = itertools.count()  # next() on it is atomic under the GIL

    def work() -> None:
        run = runner()
        while (piece := next(taken)) < pieces:
            run(bounds[piece], bounds[piece + 1])

    futures = [_pool().submit(work) for _ in range(threads - 1)]
    try:
        if meanwhile is not None:
            meanwhile()
        work()
    finally:
        for future in futures:
            future.exception()  # every thread done before the buffers go or an error is raised
    for future in futures:
        future.result()


def _reduce(partials: npt.NDArray[np.float64], n: int, length: int, moments: PairwiseMoments) -> None:
    """Add the work items' partials, in order, to `moments`.

    Plain numpy on views of the moments' tensors: no torch op (and no wake-up of torch's
    thread pool) per chunk.
    """
    total = partials.sum(axis=0)
    gram = total[n : n + n * n].reshape(n, n)
    sq = total[n + n * n :].reshape(n, n)
    upper = np.triu_indices(n, 1)
    diagonal = np.diag_indices(n)
    moments.count += length
    moments.sums.numpy()[:] += total[:n]
    moments_gram = moments.gram.numpy()
    moments_gram[diagonal] += gram[diagonal]
    moments_gram[upper] += gram[upper]
    moments_gram[upper[::-1]] += gram[upper]
    moments_sq = moments.sq_dist.numpy()
    moments_sq[upper] += sq[upper]
    moments_sq[upper[::-1]] += sq[upper]


def reads_files(tensors: Sequence[OpenTensor]) -> bool:
    """Whether `accumulate_from_files` takes these open tensors (numba present, one dtype it reads natively)."""
    return available() and bool(tensors) and len({t.dtype for t in tensors}) == 1 and tensors[0].dtype in _KIND


def _piece_elements(n: int, itemsize: int, tile: int) -> int:
    """Elements per row read at a time: a power of two whose n + 1 rows fit in READ_L2_BYTES, between
    a tile (DIRECT_STEP for the tile-free loops) and a work item."""
    fit = max(tile, READ_L2_BYTES // ((n + 1) * itemsize))
    return min(1 << (fit.bit_length() - 1), SUPER_BLOCK)


def accumulate_from_files(
    tensors: Sequence[OpenTensor],
    start: int,
    count: int,
    moments: PairwiseMoments,
    *,
    sketch: FusedFingerprint | None = None,
    tensor: str | None = None,
    mapped_reads: bool | None = None,
) -> None:
    """`accumulate` of elements [start, start + count) of open tensors (base first), read by the kernel itself.

    Where `checkpoints.mapped` is available (64-bit Linux; `mapped_reads` None), the ranges are
    mapped and the kernel reads the page-cache pages in place (`_accumulate_mapped`). Else, or with
    `mapped_reads=False`, each thread reads the pieces it is about to use (`pread`, no GIL) into its
    own buffers of READ_L2_BYTES, so the bytes travel from the page cache to L2 once. Either way:
    same tiles, same order, the same bits as `accumulate` on those elements. With `sketch`, they are sketched as elements [start, start + count) of tensor
    `tensor`. Take only tensors `reads_files` accepts. A read that ends early is
    CHECKPOINT_CHANGED, one that fails CHECKPOINT_UNREADABLE (`OpenTensor.read_failed`); the
    moments are then left as they were (the sketch may hold part of the chunk: discard it).
    """
    n = moments.n
    if not reads_files(tensors):
        raise ValueError("accumulate_from_files takes open tensors of one dtype the kernel reads (reads_files)")
    if len(tensors) != n + 1:
        raise ValueError(f"expected {n + 1} tensors (the base and {n} models), got {len(tensors)}")
    if sketch is not None and (tensor is None or sketch.n != n):
        raise ValueError("a sketched chunk needs its tensor name and a sketch of as many models")
    if start < 0 or count < 0 or any(start + count > t.elements for t in tensors):
        raise ValueError(f"elements [{start}, {start + count}) are not inside every tensor")
    if count == 0:
        return
    dtype = tensors[0].dtype
    like = np.empty(0, dtype=np.uint16 if dtype in (torch.bfloat16, torch.float16) else torch.empty(0, dtype=dtype).numpy().dtype)
    itemsize = like.itemsize
    if (mapped_reads if mapped_reads is not None else mapped.available()) and _accumulate_mapped(
        tensors, start, count, moments, like, sketch, tensor
    ):
        return
    for t in tensors:
        t.prefetch(start, count)
    fds = np.array([t.fd for t in tensors], dtype=np.int64)
    offsets = np.array([t.begin + start * itemsize for t in tensors], dtype=np.int64)
    kind = _KIND[dtype]
    tile = _tile_elements(n)
    segments: tuple[npt.NDArray[Any], ...] = ()
    direct = tile_free(kind, n)
    runs = sketch is not None and direct
    if sketch is None:
        blocks = (count + SUPER_BLOCK - 1) // SUPER_BLOCK
        row = _piece_elements(n, itemsize, DIRECT_STEP if direct else tile)
    else:
        segments = sketch.runs(tensor or "", start, count) if runs else sketch.segments(tensor or "", start, count)
        blocks = segments[0].size
        row = 2 * sketch.span if runs else sketch.span
    partials = np.empty((blocks, n + 2 * n * n), dtype=np.float64)
    statuses: list[npt.NDArray[np.int64]] = []
    buffers: list[npt.NDArray[Any]] = []  # each thread's row buffers, alive until every kernel returned

    def runner() -> Callable[[int, int], None]:
        buffer = np.empty((n + 1, row), dtype=like.dtype)  # this thread's rows, reused for every piece
        buffers.append(buffer)
        local = buffer.ctypes.data + np.arange(n + 1, dtype=np.int64) * (row * itemsize)
        status = np.zeros(3, dtype=np.int64)
        statuses.append(status)

        def run(first: int, last: int) -> None:
            if status[0] != READ_OK:
                return  # this thread's read failed: the chunk is lost, skip the rest
            if sketch is None:
                moments_kernel_from_files(PREAD_ADDRESS, fds, offsets, local, row, like, kind, count, tile, partials, first, last, status)
            elif runs:
                runs_kernel_from_files(
                    PREAD_ADDRESS, fds, offsets, local, like, RUN_TILE_ELEMENTS, partials, first, last, *segments, sketch.target, sketch.signs, sketch.span, status
                )  # fmt: skip
            else:
                sketch_kernel_from_files(
                    PREAD_ADDRESS, fds, offsets, local, like, kind, tile, partials, first, last,
                    *segments, sketch.target, sketch.signs, sketch.span, status,
                )  # fmt: skip

        return run

    _in_parallel(blocks, runner)
    for status in statuses:
        if status[0] != READ_OK:
            raise tensors[int(status[1])].read_failed(int(status[2]), short=status[0] == READ_SHORT)
    _reduce(partials, n, count, moments)


@contextlib.contextmanager
def mapped_pass() -> Iterator[None]:
    """Around a pass's calls of `accumulate_from_files`: the last chunk's deferred unmapping is done when it ends."""
    try:
        yield
    finally:
        mapped.unmap_deferred()


def mapped_chunk_elements(tensors: Sequence[OpenTensor]) -> int:
    """The most elements per chunk `accumulate_from_files` should be given when it maps: MAPPED_CHUNK_BYTES over all rows (no limit when it reads by `pread`)."""
    if not tensors or not mapped.available():
        return 1 << 62
    return max(SUPER_BLOCK, MAPPED_CHUNK_BYTES // (len(tensors) * tensors[0].itemsize))


def _accumulate_mapped(
    tensors: Sequence[OpenTensor],
    start: int,
    count: int,
    moments: PairwiseMoments,
    like: npt.NDArray[Any],
    sketch: FusedFingerprint | None,
    tensor: str | None,
) -> bool:
    """`accumulate_from_files` with the ranges mapped (`checkpoints.mapped`): the kernel reads the page cache in place, no copy.

    The same in-memory kernels as `accumulate` over the same chunk: the same bits as the `pread`
    path. A range whose file shrank under the kernel (zeros mapped by the SIGBUS guard, or the
    file now shorter) is CHECKPOINT_CHANGED and leaves `moments` as they were. False, having
    done nothing, when the system refuses the maps (the caller reads with `pread` instead).
    """
    n, itemsize = moments.n, like.itemsize
    offsets = [t.begin + start * itemsize for t in tensors]
    window = mapped.map_rows([t.fd for t in tensors], offsets, count * itemsize, defer_unmap=DEFER_UNMAP)
    if window is None:
        return False
    with window as rows:
        addresses = np.array(rows.addresses, dtype=np.int64)
        partials = _partials(addresses, like, _KIND[tensors[0].dtype], n, count, sketch, tensor, start, mapped.unmap_deferred)
        faulted = rows.faulted()
    for i, t in enumerate(tensors):
        if i in faulted or os.fstat(t.fd).st_size < offsets[i] + count * itemsize:
            raise t.read_failed(offsets[i], short=True)
    _reduce(partials, n, count, moments)
    return True


def warm_up() -> float:
    """Compile (or load from numba's disk cache) the kernel for every stored dtype; returns seconds.

    Call at server start so the first request does not pay the compile time (seconds).
    Returns 0.0 at once when numba is unavailable.
    """
    started = time.perf_counter()
    if not available():
        return 0.0
    mapped.guard()  # compiles the SIGBUS handler of mapped reads (a fraction of a second)
    for dtype in _KIND:
        base = torch.zeros(3, dtype=dtype)
        accumulate([base, base + 1, base + 2], PairwiseMoments(2))
        fused = FusedFingerprint(SketchBuilder(2, width=1024), StatsBuilder(2))
        accumulate([base, base + 1, base + 2], PairwiseMoments(2), sketch=fused, tensor="warm-up", offset=1023)
    return time.perf_counter() - started
