"""The SLERP method's per-tensor kernel: one tensor of two models, streamed in ranges, read twice, written in place.

Each tensor is read in chunks twice (once for the norms and the dot product, once to
interpolate; a tensor that fits one chunk is read once), which measured twice as fast as keeping
whole converted tensors between the passes, since everything stays in the CPU cache and the
second read comes from the page cache. Ranges are processed by the runner's worker threads; with
numba (Settings.cpu_kernel) `slerp_kernel`'s fused kernels do the math instead, reading the stored
chunks directly (one pass for the reductions, one writing the output dtype; bit-identical
interpolation). The partial reductions are summed in range order: the output does not depend on
the thread count or timing. On a CUDA merge the pair buffer and the math are on the device
(`MergeContext.to_device`, `to_host`); the fused kernels are CPU-only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from kinship_service.checkpoints.dtypes import DTYPES, ITEMSIZE
from kinship_service.merge import slerp_kernel
from kinship_service.merge.slerp import Coefficients, SlerpStats, working_dtype

if TYPE_CHECKING:
    from kinship_service.merge.context import MergeContext, Span
    from kinship_service.merge.inputs import TensorSource
    from kinship_service.merge.plan import PlannedTensor
    from kinship_service.merge.safetensors_writer import SafetensorsWriter

KERNEL_RANGE_FACTOR = 4
"""Elements of a SLERP range on the fused-kernel path, in units of `chunk_elements`: the stored
chunks and the output (6 bytes per element for bf16) of 4x the elements hold less than 2x the
bytes of a torch range (its stored chunks, float32 pair and output: 14), and measured faster
(fewer per-range Python steps and syscalls; 1.72 vs 2.14 CPU-seconds on the 537M bench)."""

Loaded = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""A range of both tensors: a (2, k) working-dtype pair (torch path) or the two stored chunks (kernel path)."""


def load_pair(pair: torch.Tensor, chunk_a: torch.Tensor, chunk_b: torch.Tensor, compute_cast: str | None) -> None:
    """Copy two stored chunks into the rows of a working-dtype pair buffer, rounded to mergekit's `dtype` first if set."""
    cast = DTYPES[compute_cast] if compute_cast else None
    for row, chunk in ((0, chunk_a), (1, chunk_b)):
        if cast is not None and chunk.dtype != cast:
            chunk = chunk.to(cast)  # mergekit rounds inputs to `dtype` first
        pair[row].copy_(chunk)


def combine_pair(pair: torch.Tensor, coefficients: Coefficients) -> torch.Tensor:
    """`ca * a + cb * b` in place in the pair buffer (row 0 returned).

    torch may fuse `+ cb * b` into one multiply-add, so an element can differ from mergekit's
    separately rounded float32 products by one float32 ulp (far below a bf16 ulp).
    """
    return pair[0].mul_(coefficients.ca).add_(pair[1], alpha=coefficients.cb)


def finish_slerp(pair: torch.Tensor, coefficients: Coefficients, out: torch.Tensor, intermediate: torch.dtype) -> None:
    """`ca * a + cb * b` of a (2, k) chunk into `out` (clobbers the chunk)."""
    if intermediate not in (pair.dtype, out.dtype):
        # mergekit casts the result to model A's dtype (or its `dtype`) before the output dtype.
        out.copy_(combine_pair(pair, coefficients).to(intermediate))
    else:  # the sum is rounded straight into the output dtype: one pass less
        torch.add(pair[0].mul_(coefficients.ca), pair[1], alpha=coefficients.cb, out=out)


def _tally(ctx: MergeContext, coefficients: Coefficients) -> None:
    ctx.tally("linear" if coefficients.linear else "slerp")


def merge_slerp_tensor(ctx: MergeContext, writer: SafetensorsWriter, base: int, tensor: PlannedTensor) -> None:
    """SLERP one planned tensor of models A and B into `writer` at byte `base` of its data section."""
    source_a, source_b = ctx.sources(tensor.name)
    work = working_dtype(DTYPES[source_a.info.dtype], DTYPES[source_b.info.dtype])
    if tensor.sliced:
        _slerp_sliced(ctx, writer, base, tensor, source_a, source_b, work)
        return
    settings = ctx.settings
    numel = math.prod(tensor.shape)
    out_dtype = DTYPES[tensor.dtype]
    out_size = ITEMSIZE[tensor.dtype]
    intermediate = DTYPES[settings.compute_cast or source_a.info.dtype]
    sink = ctx.sink(tensor)
    # The fused kernels read the stored chunks directly (one pass each for the reductions and
    # the interpolation); float64 inputs and mergekit's `dtype` cast stay on torch.
    kernel = (
        ctx.use_cpu_kernel
        and settings.compute_cast is None
        and slerp_kernel.supports(DTYPES[source_a.info.dtype], DTYPES[source_b.info.dtype], out_dtype, intermediate)
    )
    # Without the float32 pair buffer a kernel range needs far fewer bytes per element, so it
    # takes KERNEL_RANGE_FACTOR times more elements: fewer per-range Python steps and syscalls.
    chunk = ctx.chunk
    step = chunk * KERNEL_RANGE_FACTOR if kernel else chunk
    ranges = [(s, min(s + step, numel)) for s in range(0, numel, step)] or [(0, 0)]

    def load(span: Span) -> Loaded:
        # Chunks stay cache-sized: reading a range again from the page cache is cheaper than
        # keeping whole converted tensors in memory between the two passes.
        start, stop = span
        ctx.check_cancelled()
        if kernel:
            return ctx.read_range(source_a, "a", start, stop), ctx.read_range(source_b, "b", start, stop)
        pair = ctx.buffer("pair", work, 2 * chunk, on_device=True).view(2, chunk)[:, : stop - start]
        chunk_a = ctx.to_device(ctx.read_range(source_a, "a", start, stop), "a")
        chunk_b = ctx.to_device(ctx.read_range(source_b, "b", start, stop), "b")
        load_pair(pair, chunk_a, chunk_b, settings.compute_cast)
        return pair

    def reduce_loaded(loaded: Loaded) -> SlerpStats:
        if isinstance(loaded, tuple):
            return slerp_kernel.reduce_stats(*loaded)
        stats = SlerpStats()
        stats.update_pair(loaded)
        return stats

    def reduce(span: Span) -> SlerpStats:
        return reduce_loaded(load(span))

    def interpolate(span: Span, pair: Loaded | None = None) -> None:
        start, stop = span
        pair = load(span) if pair is None else pair
        if isinstance(pair, tuple):
            out = ctx.buffer("out", out_dtype, stop - start)
            slerp_kernel.interpolate(pair[0], pair[1], coefficients, out, intermediate)
        else:
            out = ctx.buffer("out", out_dtype, stop - start, on_device=True)
            finish_slerp(pair, coefficients, out, intermediate)
            out = ctx.to_host(out, "out")
        ctx.write(writer, base + start * out_size, out, sink, start)

    if len(ranges) == 1:  # one chunk: read once, keep it for the second pass
        pair = load(ranges[0])
        stats = reduce_loaded(pair)
    else:
        stats = SlerpStats.total(ctx.map(reduce, ranges))
    coefficients = stats.coefficients(tensor.parameter("t"))
    _tally(ctx, coefficients)
    if len(ranges) == 1:
        if numel:
            interpolate(ranges[0], pair)
    else:
        ctx.map(interpolate, ranges)
    ctx.observe(tensor, sink)


def _slerp_sliced(
    ctx: MergeContext,
    writer: SafetensorsWriter,
    base: int,
    tensor: PlannedTensor,
    source_a: TensorSource,
    source_b: TensorSource,
    work: torch.dtype,
) -> None:
    """The common leading slice of differently shaped tensors: row chunks, sequentially, read twice."""
    chunk = max(ctx.chunk, math.prod(tensor.shape[1:]))
    pair_buf = ctx.buffer("pair", work, 2 * chunk, on_device=True).view(2, chunk)
    compute_cast = ctx.settings.compute_cast

    def pairs() -> Iterator[torch.Tensor]:
        chunks_a = ctx.chunks(source_a, "a", tensor.shape, True)
        chunks_b = ctx.chunks(source_b, "b", tensor.shape, True)
        for chunk_a, chunk_b in zip(chunks_a, chunks_b, strict=False):
            ctx.check_cancelled()
            pair = pair_buf[:, : chunk_a.numel()]
            load_pair(pair, ctx.to_device(chunk_a, "a"), ctx.to_device(chunk_b, "b"), compute_cast)
            yield pair

    stats = SlerpStats()
    for pair in pairs():
        stats.update_pair(pair)
    coefficients = stats.coefficients(tensor.parameter("t"))
    _tally(ctx, coefficients)
    intermediate = DTYPES[compute_cast or source_a.info.dtype]
    sink = ctx.sink(tensor)
    element = 0
    for pair in pairs():
        out = ctx.buffer("out", DTYPES[tensor.dtype], pair.shape[1], on_device=True)
        finish_slerp(pair, coefficients, out, intermediate)
        ctx.write(writer, base + element * ITEMSIZE[tensor.dtype], ctx.to_host(out, "out"), sink, element)
        element += pair.shape[1]
    ctx.observe(tensor, sink)
