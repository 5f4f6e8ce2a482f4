"""One planned tensor of n inputs, read range by range into a working-dtype stack: what the n-model kernels share.

A range of the output tensor's flat elements is loaded from every input into one (n, k) buffer of
the thread's own (float32, or float64 when an input is float64; rounded to mergekit's `dtype`
first when a config sets it), so a kernel's memory is n x one range whatever the model size.
Ranges of a leading-slice tensor are whole rows of the output shape: a row of an input whose
inner dimensions are larger is read whole and cut to the common slice.

On a CUDA merge the stack lives on the device: each input's range is read on the host, copied
over (`MergeContext.to_device`) and converted there; results come back through `to_host`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

from kinship_service.checkpoints.dtypes import DTYPES, ITEMSIZE
from kinship_service.merge.slerp import working_dtype

if TYPE_CHECKING:
    from kinship_service.merge.context import MergeContext, Span
    from kinship_service.merge.inputs import TensorSource
    from kinship_service.merge.plan import PlannedTensor
    from kinship_service.merge.safetensors_writer import SafetensorsWriter

T = TypeVar("T")

GROUP_RANGES = 16
"""Ranges whose partial results are held at once when a pass returns large partials (histograms)."""


class TensorInputs:
    """Ranges of one planned tensor from every input, in the working dtype, and the output written back."""

    def __init__(self, ctx: MergeContext, tensor: PlannedTensor) -> None:
        self.ctx = ctx
        self.tensor = tensor
        self.sources: list[TensorSource] = ctx.sources(tensor.name)
        self.work = working_dtype(*(DTYPES[s.info.dtype] for s in self.sources))
        compute_cast = ctx.settings.compute_cast
        self.cast = DTYPES[compute_cast] if compute_cast else None
        self.intermediate = DTYPES[compute_cast or self.sources[0].info.dtype]
        """The dtype mergekit rounds the result to before the output dtype (the first input's, or `dtype`)."""
        self.out_dtype = DTYPES[tensor.dtype]
        self.numel = math.prod(tensor.shape)
        self.inner = math.prod(tensor.shape[1:]) if tensor.sliced and tensor.shape else 1
        step = max(self.inner, ctx.chunk // self.inner * self.inner)
        self.step = step
        self.ranges: list[Span] = [(s, min(s + step, self.numel)) for s in range(0, self.numel, step)] or [(0, 0)]
        self.sink = ctx.sink(tensor)

    @property
    def count(self) -> int:
        """Inputs."""
        return len(self.sources)

    def load(self, span: Span) -> torch.Tensor:
        """Elements [start, stop) of every input as an (n, k) working-dtype stack (the thread's own buffer)."""
        start, stop = span
        self.ctx.check_cancelled()
        k = stop - start
        stack = self.ctx.buffer("stack", self.work, self.count * self.step, on_device=True).view(self.count, self.step)[:, :k]
        for row, source in enumerate(self.sources):
            chunk = self.ctx.to_device(self._read(source, row, start, stop), f"in{row}")
            if self.cast is not None and chunk.dtype != self.cast:
                chunk = chunk.to(self.cast)  # mergekit rounds inputs to `dtype` first
            stack[row].copy_(chunk)
        return stack

    def _read(self, source: TensorSource, row: int, start: int, stop: int) -> torch.Tensor:
        key = f"in{row}"
        if not self.tensor.sliced or tuple(source.info.shape[1:]) == tuple(self.tensor.shape[1:]):
            return self.ctx.read_range(source, key, start, stop)  # rows of the slice are rows of the input
        rows0, rows1 = start // self.inner, stop // self.inner
        inner = math.prod(source.info.shape[1:])
        block = self.ctx.read_range(source, key, rows0 * inner, rows1 * inner).view(rows1 - rows0, *source.info.shape[1:])
        cut = block[(slice(None),) + tuple(slice(0, n) for n in self.tensor.shape[1:])]
        return cut.reshape(-1)

    def write(self, writer: SafetensorsWriter, base: int, span: Span, result: torch.Tensor) -> None:
        """Round a working-dtype result as mergekit does (first input's dtype, then the output's) and write it."""
        start, stop = span
        if self.intermediate not in (result.dtype, self.out_dtype):
            result = result.to(self.intermediate)
        out = self.ctx.buffer("out", self.out_dtype, stop - start, on_device=True)
        out.copy_(result)
        self.ctx.write(writer, base + start * ITEMSIZE[self.tensor.dtype], self.ctx.to_host(out, "out"), self.sink, start)

    def map(self, fn: Callable[[Span], T]) -> list[T]:
        """`fn` over every range on the worker threads, results in range order."""
        return self.ctx.map(fn, self.ranges)

    def fold(self, fn: Callable[[Span], T], add: Callable[[T, T], T]) -> T:
        """`fn` over every range, partials added in range order, at most GROUP_RANGES of them held at once."""
        total: T | None = None
        for i in range(0, len(self.ranges), GROUP_RANGES):
            for part in self.ctx.map(fn, self.ranges[i : i + GROUP_RANGES]):
                total = part if total is None else add(total, part)
        assert total is not None
        return total

    def done(self) -> None:
        """Mark the tensor written (observer, progress)."""
        self.ctx.observe(self.tensor, self.sink)


def weights_column(values: Sequence[float], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-model values as an (n, 1) column that broadcasts over a stack's rows (on the stack's device)."""
    return torch.tensor(list(values), dtype=dtype, device=device).view(-1, 1)
