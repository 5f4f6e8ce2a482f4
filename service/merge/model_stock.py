"""The `model_stock` per-tensor kernel (Jang et al., arXiv 2403.19522), as mergekit 0.1.5's (`filter_wise: false`).

Per tensor, with the base `w0`, the n >= 2 models `w_i` and their task vectors `d_i = w_i - w0`:
`cos` is the mean over pairs i < j of `<d_i, d_j> / max(|d_i| |d_j|, 1e-6)` (each clamped to
[-1, 1]); `t = n cos / (1 + (n - 1) cos)`, or 0 where `|1 + (n - 1) cos| < 1e-6` (mergekit keeps
the base there); the output `t * mean(w_i) + (1 - t) * w0`. The Gram matrix of the task vectors is
accumulated in float64 in a first pass over the ranges (in range order: deterministic), the
output computed in float32 (float64 for float64 inputs) in a second.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from kinship_service.merge.streams import TensorInputs

if TYPE_CHECKING:
    from kinship_service.merge.context import MergeContext, Span
    from kinship_service.merge.plan import PlannedTensor
    from kinship_service.merge.safetensors_writer import SafetensorsWriter

NORM_PRODUCT_MIN = 1e-6
SINGULAR = 1e-6


def stock_ratio(gram: torch.Tensor) -> float:
    """model_stock's `t` from the (n, n) Gram matrix of the task vectors (pure)."""
    n = gram.shape[0]
    norms = [math.sqrt(max(float(gram[i, i]), 0.0)) for i in range(n)]
    cosines = [
        min(1.0, max(-1.0, float(gram[i, j]) / max(norms[i] * norms[j], NORM_PRODUCT_MIN))) for i in range(n) for j in range(i + 1, n)
    ]
    cos = sum(cosines) / len(cosines)
    denominator = 1 + (n - 1) * cos
    return 0.0 if abs(denominator) < SINGULAR else n * cos / denominator


def merge_model_stock_tensor(ctx: MergeContext, writer: SafetensorsWriter, base: int, tensor: PlannedTensor) -> None:
    """model_stock of one planned tensor (inputs: the base, then the models) into `writer` at byte `base`."""
    inputs = TensorInputs(ctx, tensor)
    models = inputs.count - 1

    def gram(span: Span) -> torch.Tensor:
        stack = inputs.load(span)
        deltas = stack[1:].sub(stack[0]).to(torch.float64)
        return deltas @ deltas.T

    t = stock_ratio(inputs.fold(gram, torch.add).cpu())  # one copy from the device, not one per element

    def write(span: Span) -> None:
        stack = inputs.load(span)
        average = stack[1:].sum(dim=0).div_(models)
        inputs.write(writer, base, span, average.mul_(t).add_(stack[0], alpha=1 - t))

    inputs.map(write)
    ctx.tally("merged")
    inputs.done()
