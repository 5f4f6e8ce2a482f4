"""Kinship math: similarities between task vectors, from statistics gathered in one pass.

Pure functions over tensors, no I/O. A streaming pass feeds chunks of the n task
vectors (`deltas[i] = theta_i - theta_base`, float64) to `PairwiseMoments.update`,
which keeps for every pair exactly what PCC, cosine and Euclidean distance need:

- element count, per-model sums and the Gram matrix of cross products (PCC, cosine);
- the squared distance `sum((d_i - d_j)^2)` accumulated directly, not derived as
  `|d_i|^2 + |d_j|^2 - 2<d_i, d_j>`, which cancels catastrophically when two models
  are nearly identical (kinship above 0.9999).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

METRICS = ("pcc", "cosine", "euclidean")

# Tensor-name patterns, the one definition for kinship's layer groups and the merge's layer order.
LAYER_NAME = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
"""A numbered decoder layer in a tensor name (`model.layers.3.`, `h.3.`, `blocks.3.`, `layer.3.`); group 1 is its number."""
EMBEDDING_NAME = re.compile(r"embed|wte|wpe|tok_embeddings|word_embeddings")
"""Token and position embeddings: group `embed` of the breakdown; before the first layer in a merge."""
FINAL_NAME = re.compile(r"lm_head|(?:^|\.)norm\.|ln_f|final_layer_norm|(?:^|\.)output\.")
"""The final norm and the output head (`lm_head`, `norm.`, `ln_f`, `output.`): group `head` of the breakdown."""


def layer_group(name: str) -> str:
    """The per-layer breakdown group of a tensor name: `layers.N`, `embed`, `head` or `other`."""
    match = LAYER_NAME.search(name)
    if match:
        return f"layers.{int(match.group(1))}"
    if EMBEDDING_NAME.search(name):
        return "embed"
    if FINAL_NAME.search(name):
        return "head"
    return "other"


def layer_index(name: str) -> int | None:
    """The decoder layer number in a tensor name, or None outside numbered layers."""
    match = LAYER_NAME.search(name)
    return int(match.group(1)) if match else None


class PairwiseMoments:
    """Sufficient statistics of n task vectors for every pairwise similarity."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.n = n
        self.count = 0
        self.sums = torch.zeros(n, dtype=torch.float64, device=device)
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.sq_dist = torch.zeros(n, n, dtype=torch.float64, device=device)
        self._scratch: torch.Tensor | None = None

    def update(self, deltas: torch.Tensor) -> None:
        """Add a chunk: `deltas` is (n, k) float64, row i holding k elements of task vector i."""
        if deltas.dtype != torch.float64 or deltas.dim() != 2 or deltas.shape[0] != self.n:
            raise ValueError(f"expected ({self.n}, k) float64 deltas, got {tuple(deltas.shape)} {deltas.dtype}")
        k = deltas.shape[1]
        if k == 0:
            return
        self.count += k
        self.sums += deltas.sum(dim=1)
        self.gram.addmm_(deltas, deltas.T)
        if self.n < 2:
            return
        if self._scratch is None or self._scratch.shape[1] < k:
            self._scratch = torch.empty(self.n - 1, k, dtype=torch.float64, device=deltas.device)
        for i in range(self.n - 1):
            # Rows i+1.. minus row i at once: the squared distances of n-1-i pairs in two ops.
            diff = self._scratch[: self.n - 1 - i, :k]
            torch.sub(deltas[i + 1 :], deltas[i], out=diff)
            squared = torch.linalg.vecdot(diff, diff)
            self.sq_dist[i, i + 1 :] += squared
            self.sq_dist[i + 1 :, i] += squared

    def merge(self, other: PairwiseMoments) -> None:
        """Add another accumulator's statistics (disjoint elements)."""
        self.count += other.count
        self.sums += other.sums.to(self.sums.device)
        self.gram += other.gram.to(self.gram.device)
        self.sq_dist += other.sq_dist.to(self.sq_dist.device)

    def subset(self, indices: Sequence[int]) -> PairwiseMoments:
        """The statistics of a subset of the models."""
        out = PairwiseMoments(len(indices), device=self.sums.device)
        index = torch.tensor(list(indices), device=self.sums.device)
        out.count = self.count
        out.sums = self.sums[index].clone()
        out.gram = self.gram[index][:, index].clone()
        out.sq_dist = self.sq_dist[index][:, index].clone()
        return out


@dataclass(frozen=True)
class Similarities:
    """n x n matrices of each metric (nested lists, float64); undefined entries are NaN."""

    pcc: list[list[float]]
    cosine: list[list[float]]
    euclidean: list[list[float]]
    norms: list[float]
    means: list[float]
    count: int

    def pairs(self) -> list[tuple[int, int, float, float, float]]:
        """Every pair i < j in row-major order as (i, j, pcc, cosine, euclidean)."""
        n = len(self.norms)
        return [(i, j, self.pcc[i][j], self.cosine[i][j], self.euclidean[i][j]) for i in range(n) for j in range(i + 1, n)]

    def mean(self) -> tuple[float, float, float]:
        """The n-model kinship: mean over all pairs, per metric (eq. 3 of the paper)."""
        pairs = self.pairs()
        if not pairs:
            return (math.nan, math.nan, math.nan)
        count = len(pairs)
        return (sum(p[2] for p in pairs) / count, sum(p[3] for p in pairs) / count, sum(p[4] for p in pairs) / count)

    def undefined_models(self) -> list[int]:
        """Models whose task vector is constant (zero variance), making PCC undefined."""
        return [i for i in range(len(self.norms)) if any(math.isnan(self.pcc[i][j]) for j in range(len(self.norms)) if j != i)]


def similarities(moments: PairwiseMoments) -> Similarities:
    """PCC, cosine and Euclidean distance for every pair; NaN where a similarity is undefined."""
    n = moments.n
    count = moments.count
    sums = moments.sums.cpu().tolist()
    gram = moments.gram.cpu().tolist()
    sq = moments.sq_dist.cpu().tolist()
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    means = [s / count if count else math.nan for s in sums]
    # Centred second moments, scaled by count: count*Sxy - Sx*Sy.
    cov = [[count * gram[i][j] - sums[i] * sums[j] for j in range(n)] for i in range(n)]
    pcc = [[math.nan] * n for _ in range(n)]
    cosine = [[math.nan] * n for _ in range(n)]
    euclid = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            denominator = cov[i][i] * cov[j][j]
            if count > 0 and cov[i][i] > 0 and cov[j][j] > 0:
                pcc[i][j] = 1.0 if i == j else _clamp(cov[i][j] / math.sqrt(denominator))
            if norms[i] > 0 and norms[j] > 0:
                cosine[i][j] = 1.0 if i == j else _clamp(gram[i][j] / (norms[i] * norms[j]))
            if i != j:
                euclid[i][j] = math.sqrt(max(sq[i][j], 0.0))
    return Similarities(pcc=pcc, cosine=cosine, euclidean=euclid, norms=norms, means=means, count=count)


def _clamp(value: float) -> float:
    return max(-1.0, min(1.0, value))
