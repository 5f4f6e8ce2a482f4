"""Sign conflict between task vectors: how much of their mass TIES' sign election would have to resolve.

For task vectors d_i and d_j over the same coordinates, the sign conflict is the
magnitude-weighted fraction of coordinates where they disagree in sign:

    conflict(i, j) = sum_{c: d_i[c] * d_j[c] < 0} (|d_i[c]| + |d_j[c]|)  /  sum_c (|d_i[c]| + |d_j[c]|)

Coordinates where either delta is zero never conflict but still count in the
denominator. 0 means the deltas never pull a weight in opposite directions (averaging
loses nothing to cancellation); 0.5 is what two independent symmetric task vectors give;
1 means they always disagree. TIES (Yadav et al., 2023) exists to resolve exactly these
coordinates by electing one sign per coordinate.

Accumulation in float64 without a per-pair loop over elements: with p = max(d, 0),
m = max(-d, 0) (so |d| = p + m) and the indicators P = [d > 0], N = [d < 0],
the conflicting mass is  p_i.N_j + m_i.P_j + P_i.m_j + N_i.p_j,  i.e. C + C^T with
C = p @ N^T + m @ P^T: two (n, k) x (k, n) products per block. The denominator is
|d_i|_1 + |d_j|_1. Pure math over tensors, no I/O; `SignConflictObserver` plugs it into
the exact pass (`exact.ChunkObserver`), which then runs its torch loop (the fused CPU
kernel does not carry it), so only requests asking for sign conflict pay for it.

The CountSketch fingerprint cannot estimate it: each bucket sums many signed
coordinates, so the signs of individual coordinates are not kept.
"""

from __future__ import annotations

import torch

from kinship_service.kinship.exact import TensorPlan


class SignConflictMoments:
    """Running float64 sums of the conflicting mass per pair and of each model's L1 norm."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        if n < 1:
            raise ValueError(f"SignConflictMoments needs at least one model, got n={n}")
        self.n = n
        self.conflict = torch.zeros((n, n), dtype=torch.float64, device=device)
        self.l1 = torch.zeros(n, dtype=torch.float64, device=device)

    def update(self, deltas: torch.Tensor) -> None:
        """Add a block of task vectors, (n, k) float64 (row i: model i)."""
        if deltas.dim() != 2 or deltas.shape[0] != self.n:
            raise ValueError(f"deltas must be ({self.n}, k), got {tuple(deltas.shape)}")
        d = deltas.to(torch.float64)
        positive = d.clamp(min=0.0)
        negative = (-d).clamp(min=0.0)
        is_positive = (d > 0).to(torch.float64)
        is_negative = (d < 0).to(torch.float64)
        half = positive @ is_negative.T + negative @ is_positive.T
        self.conflict += half + half.T
        self.l1 += positive.sum(dim=1) + negative.sum(dim=1)

    def merge(self, other: SignConflictMoments) -> None:
        """Add another accumulator's sums (same models)."""
        self.conflict += other.conflict.to(self.conflict.device)
        self.l1 += other.l1.to(self.l1.device)

    def fractions(self) -> list[list[float]]:
        """The n x n sign-conflict matrix (diagonal 0; a pair whose deltas are both all zero: 0)."""
        total = self.l1[:, None] + self.l1[None, :]
        values = torch.where(total > 0, self.conflict / torch.where(total > 0, total, 1.0), 0.0)
        values.fill_diagonal_(0.0)
        matrix: list[list[float]] = values.cpu().tolist()
        return matrix


class SignConflictObserver:
    """An exact-pass observer accumulating the sign conflict of every pair of its models."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.moments = SignConflictMoments(n, device)

    def observe(self, tensor: TensorPlan, offset: int, deltas: torch.Tensor) -> None:
        """Take elements [offset, offset + k) of `tensor` of every model ((n, k) float64)."""
        self.moments.update(deltas)

    def fractions(self) -> list[list[float]]:
        """The n x n sign-conflict matrix of what was observed."""
        return self.moments.fractions()


def mean_sign_conflict(matrix: list[list[float]]) -> float:
    """The mean over pairs i < j of a sign-conflict matrix (0.0 for fewer than two models)."""
    n = len(matrix)
    values = [matrix[i][j] for i in range(n) for j in range(i + 1, n)]
    return sum(values) / len(values) if values else 0.0
