"""numba kernels of the task-vector merges (`task_vectors`): each pass over a range in one loop, bit for bit the torch path.

The torch path of `ties`, `dare_ties` and `dare_linear` makes a dozen full-range temporaries per
model and pass (the deltas, `|delta|`, its bit patterns, shifted, widened, masks, products, sums);
these kernels read the (n, k) float32 stack of a range once per pass and keep everything else in
registers:

- `high_histograms`: TIES's histogram of the high 16 bits of `|x_m - base|`'s float32 bit patterns;
- `low_histograms`: the low 16 bits inside the selected high bin, returned per range as
  (value, count) pairs, so the count of elements equal to the final threshold in every range
  (tie breaking) needs no pass of its own;
- `l1_sums`: DARE's L1 norms of each task vector and of its kept part (float64 accumulators);
- `combine`: mask, rescale, weight, TIES's majority sign, divisor, normalize, lambda and base.

Bit for bit: the histograms and masks are integer work, identical to `sparsify`'s torch ops;
`combine` does the same float32 operations in the same order as `_TaskVectors.combine`
(torch sums an (n, k) stack over dim 0 row by row from 0 for n <= 4; for more models torch's
tail handling differs from a row-by-row sum on a few elements, by float32 rounding).
`l1_sums` sums in float64 in element order, torch in its own order: the two rescaling factors
agree to float64 rounding (far below the float32 rounding they are then used at). float32 stacks
only; float64 merges keep the torch path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from kinship_service.kinship import cpu_kernel_jit

DENSE, RANDOM, MAGNITUDE = 0, 1, 2
"""How each model's task vector is sparsified in `combine` (its `kinds` entry)."""
BLOCK = 2048
"""Elements `combine` takes at a time: the models' rows of a block stay in the L1 cache."""

def available() -> bool:
    """Whether numba imported (the kernels compile on first use, then load from numba's cache); else torch."""
    return cpu_kernel_jit.available()


if cpu_kernel_jit.available():
    from llvmlite import ir
    from numba import types

    from kinship_service.kinship.cpu_kernel_jit import intrinsic, jit

    def _f32_bits_typing(typingctx: Any, value: Any) -> tuple[Any, Callable[..., Any]]:
        """Typing and code generation of `_f32_bits`."""
        sig = types.uint32(types.float32)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], ir.IntType(32))

        return sig, codegen

    _f32_bits: Callable[[np.float32], np.uint32] = intrinsic(_f32_bits_typing)
    """The uint32 bits of a float32 (no conversion)."""

    @jit(nogil=True, inline="always")
    def _magnitude(x: Any, b: Any) -> Any:  # pragma: no cover - compiled
        """The float32 bit pattern of |x - b| (sign bit cleared, as torch's abs)."""
        return _f32_bits(np.float32(x - b)) & np.uint32(0x7FFFFFFF)

    @jit(nogil=True, inline="always")
    def _kept(key: Any, element: Any, limit: Any) -> Any:  # pragma: no cover - compiled
        """DARE's hash of element `element` of a stream (sparsify's module docstring)."""
        z = (element + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15) + key
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        return (z >> np.uint64(11)) < limit

    @jit(nogil=True)
    def _high_histograms(flat: Any, stride: Any, k: Any, rows: Any, out: Any) -> None:  # pragma: no cover - compiled
        for r in range(rows.shape[0]):
            at = rows[r] * stride
            for e in range(k):
                out[r, _magnitude(flat[at + e], flat[e]) >> np.uint32(16)] += 1

    @jit(nogil=True)
    def _low_histograms(
        flat: Any, stride: Any, k: Any, rows: Any, highs: Any, scratch: Any, values: Any, counts: Any, distinct: Any
    ) -> None:  # pragma: no cover - compiled
        """Per model row: the distinct low 16 bits inside bin `highs[r]` into `values[r, :distinct[r]]`, counts alongside."""
        for r in range(rows.shape[0]):
            at = rows[r] * stride
            high = np.uint32(highs[r])
            found = 0
            for e in range(k):
                bits = _magnitude(flat[at + e], flat[e])
                if bits >> np.uint32(16) == high:
                    low = bits & np.uint32(0xFFFF)
                    if scratch[low] == 0:
                        values[r, found] = low
                        found += 1
                    scratch[low] += 1
            for i in range(found):
                counts[r, i] = scratch[values[r, i]]
                scratch[values[r, i]] = 0
            distinct[r] = found

    @jit(nogil=True)
    def _l1_sums(flat: Any, stride: Any, k: Any, rows: Any, keys: Any, limits: Any, start: Any, out: Any) -> None:  # pragma: no cover - compiled
        for r in range(rows.shape[0]):
            at = rows[r] * stride
            total = 0.0
            part = 0.0
            for e in range(k):
                size = np.float64(abs(np.float32(flat[at + e] - flat[e])))
                total += size
                if _kept(keys[r], np.uint64(start + e), limits[r]):
                    part += size
            out[r, 0] = total
            out[r, 1] = part

    @jit(nogil=True)
    def _tie_cutoff(flat: Any, stride: Any, k: Any, row: Any, bits: Any, room: Any) -> Any:  # pragma: no cover - compiled
        """The element index before which a range's elements equal to the threshold are kept (the first `room` of them)."""
        if room <= 0:
            return 0
        if room >= k:
            return k  # a range holds at most k equal elements: all of them are kept
        at = row * stride
        seen = 0
        for e in range(k):
            if _magnitude(flat[at + e], flat[e]) == bits:
                seen += 1
                if seen == room:
                    return e + 1
        return k

    @jit(nogil=True)
    def _combine(
        flat: Any,
        stride: Any,
        k: Any,
        out: Any,
        kinds: Any,
        weights: Any,
        scales: Any,
        keys: Any,
        limits: Any,
        bits: Any,
        quotas: Any,
        before: Any,
        start: Any,
        consensus: Any,
        normalize: Any,
        divisor_all: Any,
        lam: Any,
        apply_lam: Any,
    ) -> None:  # pragma: no cover - compiled
        # Blocks of BLOCK elements, each step a loop over one model's row (vectorisable), so the
        # per-element order of the float operations is the torch path's: over models, row by row.
        models = kinds.shape[0]
        one = np.float32(1.0)
        zero = np.float32(0.0)
        cutoffs = np.zeros(models, np.int64)
        for m in range(models):
            if kinds[m] == MAGNITUDE:
                cutoffs[m] = _tie_cutoff(flat, stride, k, m + 1, bits[m], quotas[m] - before[m])
        deltas = np.empty((models, BLOCK), np.float32)
        mixed = np.empty(BLOCK, np.float32)
        total = np.empty(BLOCK, np.float32)
        divisor = np.empty(BLOCK, np.float32)
        for first in range(0, k, BLOCK):
            n = min(BLOCK, k - first)
            for m in range(models):
                at = (m + 1) * stride + first
                kind = kinds[m]
                scale = scales[m] if kind != DENSE else one
                weight = weights[m]
                row = deltas[m]
                if kind == RANDOM:
                    key = keys[m]
                    limit = limits[m]
                    for j in range(n):
                        d = np.float32(flat[at + j] - flat[first + j])
                        d = d * (one if _kept(key, np.uint64(start + first + j), limit) else zero)
                        row[j] = (d * scale) * weight
                elif kind == MAGNITUDE:
                    threshold = bits[m]
                    cut = cutoffs[m] - first
                    for j in range(n):
                        d = np.float32(flat[at + j] - flat[first + j])
                        size = _f32_bits(d) & np.uint32(0x7FFFFFFF)
                        keep = size > threshold or (size == threshold and j < cut)
                        d = d * (one if keep else zero)
                        row[j] = (d * scale) * weight
                else:
                    for j in range(n):
                        row[j] = np.float32(flat[at + j] - flat[first + j]) * weight
            for j in range(n):
                mixed[j] = zero
            if consensus:
                for j in range(n):
                    total[j] = zero
                    divisor[j] = zero
                for m in range(models):
                    row = deltas[m]
                    for j in range(n):
                        total[j] = total[j] + row[j]
                for m in range(models):
                    row = deltas[m]
                    weight = weights[m]
                    for j in range(n):
                        d = row[j]
                        majority = one if total[j] >= zero else -one
                        sign = one if d > zero else (-one if d < zero else zero)
                        agree = one if sign == majority else zero
                        mixed[j] = mixed[j] + d * agree
                        divisor[j] = divisor[j] + weight * agree
                for j in range(n):
                    if divisor[j] == zero:
                        divisor[j] = one
            else:
                for m in range(models):
                    row = deltas[m]
                    for j in range(n):
                        mixed[j] = mixed[j] + row[j]
                for j in range(n):
                    divisor[j] = divisor_all
            for j in range(n):
                value = mixed[j]
                if normalize:
                    value = value / divisor[j]
                if apply_lam:
                    value = value * lam
                out[first + j] = value + flat[first + j]


def _flat(stack: torch.Tensor) -> tuple[npt.NDArray[np.float32], int, int]:
    """A (n, k) float32 stack as one flat array from its first element to its last, its row stride and k.

    The runner's stack is a view of the first k columns of a wider buffer; flattening it keeps one
    array layout (1-D, contiguous) for every range, so each kernel compiles (and caches) once.
    """
    if stack.stride(1) != 1 or stack.stride(0) < stack.shape[1]:
        stack = stack.contiguous()
    rows, k = stack.shape
    stride = stack.stride(0)
    span = (rows - 1) * stride + k
    return torch.as_strided(stack, (span,), (1,)).numpy(), stride, k


def _rows(models: list[int]) -> npt.NDArray[np.int64]:
    """Stack rows of task-vector models (row 0 is the base)."""
    return np.asarray([1 + m for m in models], dtype=np.int64)


def high_histograms(stack: torch.Tensor, models: list[int], bins: int) -> torch.Tensor:
    """Per model of `models`: counts of the high 16 bits of |x_m - base| over one range's stack ((len(models), bins) int64)."""
    out = np.zeros((len(models), bins), dtype=np.int64)
    _high_histograms(*_flat(stack), _rows(models), out)
    return torch.from_numpy(out)


def low_histograms(
    stack: torch.Tensor, models: list[int], highs: list[int]
) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """Per model: the distinct low 16 bits of |x_m - base| inside its high bin over one range, and their counts."""
    k = stack.shape[1]
    width = min(k, 1 << 16)
    values = np.empty((len(models), width), dtype=np.int64)
    counts = np.empty((len(models), width), dtype=np.int64)
    distinct = np.zeros(len(models), dtype=np.int64)
    scratch = np.zeros(1 << 16, dtype=np.int64)
    _low_histograms(*_flat(stack), _rows(models), np.asarray(highs, dtype=np.int64), scratch, values, counts, distinct)
    return [(values[r, : distinct[r]].copy(), counts[r, : distinct[r]].copy()) for r in range(len(models))]


def l1_sums(stack: torch.Tensor, models: list[int], keys: list[int], limits: list[int], start: int) -> torch.Tensor:
    """Per model: float64 L1 of |x_m - base| and of its part DARE keeps, over one range ((len(models), 2))."""
    out = np.zeros((len(models), 2), dtype=np.float64)
    _l1_sums(
        *_flat(stack),
        _rows(models), np.asarray(keys, dtype=np.uint64), np.asarray(limits, dtype=np.uint64), np.uint64(start), out
    )
    return torch.from_numpy(out)


def combine(
    stack: torch.Tensor,
    out: torch.Tensor,
    *,
    kinds: list[int],
    weights: list[float],
    scales: list[float],
    keys: list[int],
    limits: list[int],
    bits: list[int],
    quotas: list[int],
    before: list[int],
    start: int,
    consensus: bool,
    normalize: bool,
    divisor: float,
    lam: float,
) -> None:
    """`base + lambda * mixed / divisor` of one range's float32 stack into `out` (float32, k), as `_TaskVectors.combine`.

    Per model: `kinds` (DENSE, RANDOM with `keys`/`limits`, MAGNITUDE with threshold `bits`, `quotas`
    of elements equal to it and `before` of them in earlier ranges), `weights`, `scales` (DARE's
    rescaling). `divisor`: the plain divisor when there is no consensus.
    """
    f32 = np.float32
    _combine(
        *_flat(stack),
        out.numpy(),
        np.asarray(kinds, dtype=np.int64),
        np.asarray(weights, dtype=f32),
        np.asarray(scales, dtype=f32),
        np.asarray(keys, dtype=np.uint64),
        np.asarray(limits, dtype=np.uint64),
        np.asarray(bits, dtype=np.uint32),
        np.asarray(quotas, dtype=np.int64),
        np.asarray(before, dtype=np.int64),
        np.uint64(start),
        consensus,
        normalize,
        f32(divisor),
        f32(lam),
        lam != 1,
    )


def warm_up() -> float:
    """Compile (or load from numba's cache) every kernel here and DARE's mask; returns the seconds taken."""
    from kinship_service.merge import sparsify_jit

    started = time.perf_counter()
    stack = torch.zeros(3, 8)
    high_histograms(stack, [0, 1], 1 << 15)
    low_histograms(stack, [0, 1], [0, 0])
    l1_sums(stack, [0, 1], [1, 2], [1, 1], 0)
    combine(
        stack,
        torch.empty(8),
        kinds=[RANDOM, MAGNITUDE],
        weights=[1.0, 1.0],
        scales=[1.0, 1.0],
        keys=[1, 2],
        limits=[1, 1],
        bits=[0, 0],
        quotas=[1, 1],
        before=[0, 0],
        start=0,
        consensus=True,
        normalize=True,
        divisor=1.0,
        lam=1.0,
    )
    sparsify_jit.random_mask(1, 0, 8, 1)
    return time.perf_counter() - started
