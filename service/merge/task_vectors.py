"""Per-tensor kernels of `linear` and of mergekit's generalized task arithmetic (`task_arithmetic`, `ties`, `dare_ties`, `dare_linear`).

mergekit 0.1.5's semantics, computed in float32 (float64 when an input is float64) range by range:

- `linear`: `sum_i w_i x_i / sum_i w_i` (no division without `normalize`); the result is rounded
  to the first model's dtype, then to the output dtype.
- task vectors `d_i = x_i - base`, each sparsified to its `density`: TIES keeps its k largest
  magnitudes, DARE a reproducible random subset (`sparsify`), rescaled with `rescale` by
  `L1(d_i) / L1(kept d_i)` (mergekit's `RescaleNorm.l1`, skipped when either is below 1e-7);
  then weighted, `d_i *= w_i`;
- TIES's consensus (`ties`, `dare_ties`): the majority sign of each element is the sign of
  `sum_i d_i` (mergekit's "sum" method, 0 counting as +); only elements of that sign are summed,
  and the normalize divisor is the sum of the weights of the models kept for that element (1
  where none is);
- otherwise `mixed = sum_i d_i`, the divisor `sum_i w_i` (1 when below 1e-8);
- `mixed /= divisor` with `normalize`, `mixed *= lambda`, the output `base + mixed` rounded to
  the base's dtype, then to the output dtype.

Global quantities of a tensor take a first pass over its ranges before the one that writes: the
L1 norms of DARE's rescaling (one pass), TIES's exact magnitude thresholds (two histogram passes;
the second also yields, per range, how many elements equal the threshold, for tie breaking; the
torch path and a tensor with too many distinct values in the threshold's bin count them in a third).
Each pass reads every input's range again from the page cache: memory stays n x one range. Partial
sums are added in range order, so the output does not depend on the thread count. On float32
stacks (every merge but float64 ones) the passes are the fused numba kernels of
`task_vectors_jit`, bit for bit these torch ops; `use_cpu_kernel=False` keeps torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from kinship_service.merge import sparsify, task_vectors_jit
from kinship_service.merge.parameters import per_model
from kinship_service.merge.streams import GROUP_RANGES, TensorInputs, weights_column

if TYPE_CHECKING:
    from kinship_service.merge.context import MergeContext, Span
    from kinship_service.merge.plan import PlannedTensor
    from kinship_service.merge.safetensors_writer import SafetensorsWriter

L1_EPS = 1e-7
"""Norms below which DARE's rescaling is skipped (mergekit's `eps`)."""
WEIGHT_EPS = 1e-8
"""|sum of weights| below which the plain divisor counts as 1 (mergekit)."""
HELD_LOW_VALUES = 1 << 22
"""(value, count) pairs of TIES's low pass held per tensor for tie breaking; past it, ties are counted in a pass of their own."""
ALL_KEPT = 1 << 62
"""A quota no tensor reaches: every element equal to the threshold is kept."""


def merge_linear_tensor(ctx: MergeContext, writer: SafetensorsWriter, base: int, tensor: PlannedTensor) -> None:
    """`linear` of one planned tensor of the models into `writer` at byte `base` of its data section."""
    from kinship_service.merge.methods import get_method

    inputs = TensorInputs(ctx, tensor)
    weights = per_model(tensor.parameters, "weight", inputs.count)
    normalize = get_method(ctx.settings.method).normalizes(ctx.settings)
    column = weights_column(weights, inputs.work, ctx.device)
    total = sum(weights)

    def combine(span: Span) -> None:
        stack = inputs.load(span)
        result = stack.mul_(column).sum(dim=0)
        if normalize:
            result.div_(total)
        inputs.write(writer, base, span, result)

    inputs.map(combine)
    ctx.tally("merged")
    inputs.done()


class _TaskVectors:
    """One tensor's task-vector merge: its parameters, the per-tensor statistics of its first passes, and the final pass."""

    def __init__(self, ctx: MergeContext, tensor: PlannedTensor) -> None:
        from kinship_service.merge.methods import get_method

        self.method = get_method(ctx.settings.method)
        self.inputs = TensorInputs(ctx, tensor)
        self.models = self.inputs.count - 1
        self.weights = per_model(tensor.parameters, "weight", self.models)
        densities = per_model(tensor.parameters, "density", self.models) if "density" in self.method.parameter_names else []
        self.densities = densities or [1.0] * self.models
        self.lam = tensor.parameters.get("lambda", 1.0)
        # Made once per tensor: on CUDA each small host-to-device tensor would wait for the stream.
        self.weight_column = weights_column(self.weights, self.inputs.work, ctx.device)
        total = sum(self.weights)
        self.plain_divisor = torch.tensor(1.0 if abs(total) < WEIGHT_EPS else total, dtype=self.inputs.work, device=ctx.device)
        self.use_kernel = ctx.use_cpu_kernel
        self.fused = self.use_kernel and task_vectors_jit.available() and self.inputs.work == torch.float32
        """Whether the passes run as the numba kernels of `task_vectors_jit` (float32 stacks), else as torch ops."""
        self.normalize = self.method.normalizes(ctx.settings)
        self.rescale = self.method.rescales(ctx.settings)
        seed = ctx.settings.method_parameters.seed
        self.keys = [sparsify.mask_key(seed, tensor.name, m) for m in range(self.models)]
        self.sparse = [m for m in range(self.models) if self.method.sparsification and self.densities[m] < 1]
        """Models whose task vector is sparsified (density < 1)."""
        self.scales = [1.0] * self.models
        self.thresholds: dict[int, sparsify.Threshold] = {}
        self.equal_before: list[list[int]] = []
        """Per range, per sparsified model: elements equal to its threshold in earlier ranges (tie breaking)."""

    def deltas(self, span: Span) -> torch.Tensor:
        """The (models, k) task vectors of a range, in the stack buffer."""
        stack = self.inputs.load(span)
        stack[1:].sub_(stack[0])
        return stack

    def mask(self, delta: torch.Tensor, model: int, span: Span, index: int) -> torch.Tensor:
        """Which elements of model `model`'s task-vector range survive sparsification (bool)."""
        if self.method.sparsification == "random":
            return sparsify.random_mask(self.keys[model], span[0], span[1], self.densities[model], self.use_kernel, delta.device)
        limit = self.thresholds[model]
        before = self.equal_before[index][self.sparse.index(model)] if self.equal_before else 0
        return sparsify.magnitude_mask(sparsify.magnitude_bits(delta), limit, before)

    # -- first passes ----------------------------------------------------------------------------
    def measure_l1(self) -> None:
        """DARE's rescaling: per sparsified model, L1 of its task vector and of its kept part (float64, range order)."""
        keys = [self.keys[m] for m in self.sparse]
        limits = [sparsify.random_limit(self.densities[m]) for m in self.sparse]

        def l1(span: Span) -> torch.Tensor:
            if self.fused:
                return task_vectors_jit.l1_sums(self.inputs.load(span), self.sparse, keys, limits, span[0])
            stack = self.deltas(span)
            out = torch.zeros(len(self.sparse), 2, dtype=torch.float64, device=stack.device)
            for row, model in enumerate(self.sparse):
                delta = stack[1 + model]
                out[row, 0] = delta.abs().sum(dtype=torch.float64)
                out[row, 1] = delta.abs().mul_(self.mask(delta, model, span, 0)).sum(dtype=torch.float64)
            return out

        sums = self.inputs.fold(l1, torch.add)
        for row, model in enumerate(self.sparse):
            before, after = float(sums[row, 0]), float(sums[row, 1])
            if before >= L1_EPS and after >= L1_EPS:
                self.scales[model] = before / after

    def select_thresholds(self) -> None:
        """TIES: the exact magnitude threshold of each sparsified model's task vector (radix selection)."""
        numel = self.inputs.numel

        def high(span: Span) -> torch.Tensor:
            if self.fused:
                return task_vectors_jit.high_histograms(self.inputs.load(span), self.sparse, sparsify.HIGH_BINS)
            stack = self.deltas(span)
            return torch.stack([sparsify.high_histogram(sparsify.magnitude_bits(stack[1 + m])) for m in self.sparse])

        highs = self.inputs.fold(high, torch.add)
        ks = [sparsify.keep_count(self.densities[m], numel) for m in self.sparse]
        bins = [sparsify.high_bin(highs[row], k) for row, k in enumerate(ks)]
        if self.fused:
            if self._fused_low_pass(bins, ks):
                return
        else:

            def low(span: Span) -> torch.Tensor:
                stack = self.deltas(span)
                return torch.stack(
                    [sparsify.low_histogram(sparsify.magnitude_bits(stack[1 + m]), bins[row][0]) for row, m in enumerate(self.sparse)]
                )

            lows = self.inputs.fold(low, torch.add)
            for row, model in enumerate(self.sparse):
                self.thresholds[model] = sparsify.threshold(bins[row][0], bins[row][1], lows[row], ks[row])
            if all(t.all_equal_kept for t in self.thresholds.values()):
                return

        def equal(span: Span) -> list[int]:
            stack = self.deltas(span)
            return [
                int((sparsify.magnitude_bits(stack[1 + m]) == self.thresholds[m].bits).sum()) for m in self.sparse
            ]

        running = [0] * len(self.sparse)
        for counts in self.inputs.map(equal):
            self.equal_before.append(list(running))
            running = [r + c for r, c in zip(running, counts, strict=True)]

    def _fused_low_pass(self, bins: list[tuple[int, int]], ks: list[int]) -> bool:
        """TIES's low pass as a kernel: thresholds, and the ties before each range from the same pass.

        False when the (value, count) pairs held for tie breaking outgrew HELD_LOW_VALUES and ties
        must be broken: the thresholds are set, the ties are left to the caller's counting pass.
        """
        highs = [high for high, _ in bins]
        lows = [np.zeros(sparsify.LOW_BINS, dtype=np.int64) for _ in self.sparse]
        held: list[list[tuple[np.ndarray, np.ndarray]]] | None = []
        pairs = 0
        ranges = self.inputs.ranges
        for i in range(0, len(ranges), GROUP_RANGES):
            for parts in self.inputs.ctx.map(lambda span: task_vectors_jit.low_histograms(self.inputs.load(span), self.sparse, highs),
                                             ranges[i : i + GROUP_RANGES]):
                for row, (values, counts) in enumerate(parts):
                    lows[row][values] += counts  # values are distinct within a range
                    pairs += values.size
                if held is not None:
                    held.append(parts)
                    if pairs > HELD_LOW_VALUES:
                        held = None
        for row, model in enumerate(self.sparse):
            self.thresholds[model] = sparsify.threshold(bins[row][0], bins[row][1], torch.from_numpy(lows[row]), ks[row])
        if all(t.all_equal_kept for t in self.thresholds.values()):
            return True
        if held is None:
            return False
        running = [0] * len(self.sparse)
        for parts in held:
            self.equal_before.append(list(running))
            for row, (values, counts) in enumerate(parts):
                low = self.thresholds[self.sparse[row]].bits & 0xFFFF
                running[row] += int(counts[values == low].sum())
        return True

    # -- the pass that writes --------------------------------------------------------------------
    def combine(self, span: Span, index: int) -> torch.Tensor:
        """`base + lambda * mixed / divisor` of one range (working dtype)."""
        if self.fused:
            return self._combine_fused(span, index)
        stack = self.deltas(span)
        base, deltas = stack[0], stack[1:]
        for model in self.sparse:
            delta = deltas[model]
            delta.mul_(self.mask(delta, model, span, index))
            if self.scales[model] != 1.0:
                delta.mul_(self.scales[model])
        weights = self.weight_column
        deltas.mul_(weights)
        if self.method.consensus:
            majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
            agree = deltas.sign() == majority
            mixed = (deltas * agree).sum(dim=0)
            divisor = (weights * agree).sum(dim=0)
            divisor.masked_fill_(divisor == 0, 1)  # as `divisor[divisor == 0] = 1`, without a device sync
        else:
            mixed = deltas.sum(dim=0)
            divisor = self.plain_divisor
        if self.normalize:
            mixed /= divisor
        if self.lam != 1:
            mixed *= self.lam
        return mixed.add_(base)

    def _combine_fused(self, span: Span, index: int) -> torch.Tensor:
        """`combine` as one kernel pass over the range (float32, bit for bit the torch ops for up to 4 models)."""
        stack = self.inputs.load(span)
        out = self.inputs.ctx.buffer("mixed", torch.float32, span[1] - span[0])
        kinds = [task_vectors_jit.DENSE] * self.models
        bits, quotas, before = [0] * self.models, [0] * self.models, [0] * self.models
        for row, model in enumerate(self.sparse):
            if self.method.sparsification == "random":
                kinds[model] = task_vectors_jit.RANDOM
                continue
            limit = self.thresholds[model]
            kinds[model] = task_vectors_jit.MAGNITUDE
            bits[model] = limit.bits
            quotas[model] = ALL_KEPT if limit.all_equal_kept else limit.quota
            before[model] = self.equal_before[index][row] if self.equal_before else 0
        total = sum(self.weights)
        task_vectors_jit.combine(
            stack,
            out,
            kinds=kinds,
            weights=self.weights,
            scales=self.scales,
            keys=self.keys,
            limits=[sparsify.random_limit(d) for d in self.densities],
            bits=bits,
            quotas=quotas,
            before=before,
            start=span[0],
            consensus=self.method.consensus,
            normalize=self.normalize,
            divisor=1.0 if abs(total) < WEIGHT_EPS else total,
            lam=self.lam,
        )
        return out


def merge_task_vector_tensor(ctx: MergeContext, writer: SafetensorsWriter, base: int, tensor: PlannedTensor) -> None:
    """A generalized task-arithmetic merge of one planned tensor (inputs: the base, then the models)."""
    merge = _TaskVectors(ctx, tensor)
    if merge.sparse and merge.method.sparsification == "magnitude":
        merge.select_thresholds()
    if merge.sparse and merge.rescale:
        merge.measure_l1()
    index_of = {span: i for i, span in enumerate(merge.inputs.ranges)}

    def write(span: Span) -> None:
        merge.inputs.write(writer, base, span, merge.combine(span, index_of[span]))

    merge.inputs.map(write)
    ctx.tally("merged")
    merge.inputs.done()
