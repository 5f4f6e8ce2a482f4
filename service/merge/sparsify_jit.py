"""numba kernel of DARE's random mask (`sparsify.random_mask`): the same hash, in one pass with native uint64 arithmetic.

The torch path needs a dozen full-range int64 passes per mask; this one measured several times
faster. Without numba `available()` is False and `sparsify` keeps its torch path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kinship_service.kinship import cpu_kernel_jit

_KERNEL: Any = None


def available() -> bool:
    """Whether numba imported (the kernel compiles on first use)."""
    return cpu_kernel_jit.available()


def _build() -> Any:
    @cpu_kernel_jit.jit(nogil=True)
    def mask(out: Any, key: np.uint64, start: np.uint64, limit: np.uint64) -> None:  # pragma: no cover - compiled
        golden = np.uint64(0x9E3779B97F4A7C15)
        m1 = np.uint64(0xBF58476D1CE4E5B9)
        m2 = np.uint64(0x94D049BB133111EB)
        for i in range(out.shape[0]):
            z = (start + np.uint64(i) + np.uint64(1)) * golden + key
            z = (z ^ (z >> np.uint64(30))) * m1
            z = (z ^ (z >> np.uint64(27))) * m2
            z = z ^ (z >> np.uint64(31))
            out[i] = (z >> np.uint64(11)) < limit

    return mask


def random_mask(key: int, start: int, stop: int, limit: int) -> torch.Tensor:
    """Kept elements [start, stop) of one stream: `(h >> 11) < limit` (bool)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build()
    out = np.empty(stop - start, dtype=np.bool_)
    _KERNEL(out, np.uint64(key), np.uint64(start), np.uint64(limit))
    return torch.from_numpy(out)
