"""The fingerprint observer: an exact pass sketches and summarises its task vectors as it goes.

Every full pass carries one, so the fingerprints of its models cost no extra read.
"""

from __future__ import annotations

import torch

from kinship_service.kinship.exact import TensorPlan
from kinship_service.kinship.fingerprint import SketchBuilder, StatsBuilder


class FingerprintObserver:
    """Sketches and summarises every chunk of an exact pass (fingerprints for free).

    The pass hands over cache-sized blocks (64 Ki elements on CPU); consecutive blocks of
    one tensor are staged into a larger buffer first, so the per-call overhead of the
    sketch and statistics is paid per megabytes, not per block. Call `flush()` at the end.
    """

    def __init__(self, n: int, device: torch.device | str, staging_bytes: int = 64 * 2**20) -> None:
        self.sketch = SketchBuilder(n, device=device)
        self.stats = StatsBuilder(n)
        self._capacity = max(1 << 16, staging_bytes // (8 * n))
        self._staging = torch.empty((n, self._capacity), dtype=torch.float64, device=device)
        self._tensor: TensorPlan | None = None
        self._start = 0
        self._filled = 0

    def observe(self, tensor: TensorPlan, offset: int, deltas: torch.Tensor) -> None:
        """Take elements [offset, offset + k) of `tensor` of every model ((n, k) float64)."""
        k = deltas.shape[1]
        if k >= self._capacity:
            self.flush()
            self._emit(tensor, offset, deltas)
            return
        if self._tensor is not tensor or offset != self._start + self._filled or self._filled + k > self._capacity:
            self.flush()
            self._tensor, self._start = tensor, offset
        self._staging[:, self._filled : self._filled + k].copy_(deltas)
        self._filled += k

    def fused_target(self) -> tuple[SketchBuilder, StatsBuilder]:
        """The builders, for `cpu_kernel.fused_observer`: its kernel does `observe`'s work in the same read."""
        self.flush()
        return self.sketch, self.stats

    def flush(self) -> None:
        """Sketch what is staged."""
        if self._tensor is not None and self._filled:
            self._emit(self._tensor, self._start, self._staging[:, : self._filled])
        self._tensor, self._filled = None, 0

    def _emit(self, tensor: TensorPlan, offset: int, deltas: torch.Tensor) -> None:
        self.sketch.add(tensor.name, offset, deltas)
        self.stats.add(tensor.group, deltas)
