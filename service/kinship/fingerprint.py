"""Task-vector fingerprints: a fixed-size sketch plus exact statistics, and kinship estimated from two of them.

Pure math over tensors, no I/O.

Sketch
------
A CountSketch of width ``W = 2**18`` in which every element of the task vector is
hashed by its global position, ``(tensor name, offset within the tensor)``, so the
sketch does not depend on how a pass chunks the tensors or on which other
checkpoints it reads. Positions are cut into blocks of ``W`` elements; element
``lo`` of block ``j`` of tensor ``name`` goes to bucket ``(lo + r) mod W`` with sign
``S[lo] * s``, where ``S`` is a fixed random sign table of length ``W`` and the
block's rotation ``r`` and sign ``s`` come from a keyed BLAKE2b hash of
``(seed, name, j)``. The seed is the same for every checkpoint, so all sketches are
comparable. A block then costs two dense ``addcmul_`` calls: hashing runs at memory
speed (no per-element hash, no scatter).

Hash properties: two elements of one block never collide (a block is a signed
permutation of the buckets), two elements of different blocks collide with
probability exactly ``1/W`` (uniform rotations), and the product of their signs is a
uniform random sign (independent block signs, or the random table within a block).
These are the pairwise properties the CountSketch variance below rests on.

Estimation and error bound
--------------------------
Let ``a``, ``b`` be two task vectors (same tensor set), ``c = cos(a, b)``. The single
row estimate ``<Sa, Sb>`` of ``<a, b>`` is unbiased with variance
``(|a|^2 |b|^2 + <a,b>^2 - 2 sum a_i^2 b_i^2) / W <= (1 + c^2) |a|^2 |b|^2 / W``. We use
the *normalised* (ratio) estimator ``c_hat = <Sa, Sb> / (|Sa| |Sb|)``: the fluctuation
of the sketch norms cancels the part of the noise along ``a`` and ``b``, and for
dense task vectors (no handful of coordinates carrying the norm) the delta method
gives

    sd(c_hat - c)  ~=  (1 - c^2) / sqrt(W)  <=  1 / sqrt(W) = 0.00195   (W = 2**18)

(the un-normalised estimate divided by exact norms would have ``sqrt(1 + c^2)`` in
place of ``1 - c^2``: worse everywhere, 0.0028 at c = 1). The cross product is then
``G_ab = c_hat * |a| |b|`` with the EXACT norms, and PCC and Euclidean distance use
the exact element count, sums and sums of squares:

    PCC = (n G_ab - S_a S_b) / sqrt((n G_aa - S_a^2)(n G_bb - S_b^2))
    ED  = sqrt(G_aa + G_bb - 2 G_ab)

so ``|PCC error| ~= |c_hat - c| * kappa`` with ``kappa = 1 / sqrt((1 - m_a)(1 - m_b))``,
``m = S^2 / (n G)`` the fraction of the task vector's energy in its mean (below 1e-3
for real and synthetic task vectors: kappa ~= 1), and
``|ED error| ~= |a||b| |c_hat - c| / ED``.

An absolute error of 0.01 is therefore at least 5.1 standard deviations for every
c in [-1, 1]: about 3e-7 probability per estimate under the (CLT) Gaussian
approximation, so none in the test's 200+ pairs. Bytes per checkpoint: the sketch
is ``W`` float32 = 1 MiB, plus a few KiB of statistics and the tensor list,
whatever the model size.
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from kinship_service.kinship.similarity import Similarities

SKETCH_WIDTH = 2**18
"""Buckets per sketch (a power of two). See the module docstring for the error bound."""
SKETCH_SEED = 0x6B696E73
"""The one seed shared by every fingerprint, so any two sketches are comparable."""
FINGERPRINT_VERSION = 1
"""Bumped whenever the sketch layout or hashing changes (old fingerprints become misses)."""


@lru_cache(maxsize=4)
def sign_table(width: int = SKETCH_WIDTH, seed: int = SKETCH_SEED) -> torch.Tensor:
    """The fixed random +-1 table S (float64, length `width`) shared by every block."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (width,), generator=generator, dtype=torch.int64).mul_(2).sub_(1).to(torch.float64)


@lru_cache(maxsize=1 << 16)
def block_params(name: str, block: int, width: int = SKETCH_WIDTH, seed: int = SKETCH_SEED) -> tuple[int, float]:
    """The rotation (0 <= r < width) and sign (+-1.0) of block `block` of tensor `name`."""
    digest = hashlib.blake2b(
        name.encode("utf-8") + b"\x00" + struct.pack("<QQ", block, width), key=struct.pack("<Q", seed), digest_size=16
    ).digest()
    rotation = int.from_bytes(digest[:8], "little") % width
    sign = 1.0 if digest[8] & 1 else -1.0
    return rotation, sign


class SketchBuilder:
    """Accumulates the sketches of n task vectors from chunks, in float64.

    Any chunking gives the same sketch (up to float64 summation order): the bucket and
    sign of an element depend only on (tensor name, offset).
    """

    def __init__(self, n: int, width: int = SKETCH_WIDTH, seed: int = SKETCH_SEED, device: torch.device | str = "cpu") -> None:
        if width <= 0 or width & (width - 1):
            raise ValueError("the sketch width must be a power of two")
        self.n = n
        self.width = width
        self.seed = seed
        self.sketch = torch.zeros(n, width, dtype=torch.float64, device=device)
        self._signs = sign_table(width, seed).to(device)

    def add(self, name: str, offset: int, deltas: torch.Tensor) -> None:
        """Add elements [offset, offset + k) of tensor `name`: `deltas` is (n, k) float64."""
        if deltas.dim() != 2 or deltas.shape[0] != self.n:
            raise ValueError(f"expected ({self.n}, k) deltas, got {tuple(deltas.shape)}")
        width = self.width
        k = deltas.shape[1]
        position = offset
        end = offset + k
        while position < end:
            block, lo = divmod(position, width)
            length = min(end, (block + 1) * width) - position
            rotation, sign = block_params(name, block, width, self.seed)
            source = deltas[:, position - offset : position - offset + length]
            signs = self._signs[lo : lo + length]
            start = (lo + rotation) % width
            first = min(length, width - start)
            self.sketch[:, start : start + first].addcmul_(source[:, :first], signs[:first], value=sign)
            if first < length:
                self.sketch[:, : length - first].addcmul_(source[:, first:], signs[first:], value=sign)
            position += length


@dataclass
class GroupStats:
    """Exact statistics of a task vector over one layer group (or all of it)."""

    count: int = 0
    sum: float = 0.0
    sum_squares: float = 0.0

    @property
    def norm(self) -> float:
        return math.sqrt(max(self.sum_squares, 0.0))


class StatsBuilder:
    """Exact per-model count, sum and sum of squares, per layer group, from chunks."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.groups: list[dict[str, GroupStats]] = [{} for _ in range(n)]

    def add(self, group: str, deltas: torch.Tensor) -> None:
        """Add a chunk of group `group`: `deltas` is (n, k) float64."""
        k = deltas.shape[1]
        sums = deltas.sum(dim=1).tolist()
        squares = [float(torch.dot(row, row)) for row in deltas]  # n BLAS dots: faster than vecdot here
        for i in range(self.n):
            stats = self.groups[i].setdefault(group, GroupStats())
            stats.count += k
            stats.sum += sums[i]
            stats.sum_squares += squares[i]


@dataclass
class Fingerprint:
    """A task vector's fingerprint: its sketch and exact statistics, for one tensor set."""

    sketch: torch.Tensor
    """(W,) float32 CountSketch of the task vector."""
    groups: dict[str, GroupStats]
    """Exact statistics per layer group (`layers.N`, `embed`, `head`, `other`)."""
    tensors: list[tuple[str, tuple[int, ...]]]
    """The tensors sketched, in flattening order, with their shapes."""
    width: int = SKETCH_WIDTH
    seed: int = SKETCH_SEED
    version: int = FINGERPRINT_VERSION
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    """Tensors of the checkpoint or base left out, as (name, reason, detail)."""

    @property
    def total(self) -> GroupStats:
        """The statistics of the whole task vector (the groups summed, in order)."""
        count, total, squares = 0, 0.0, 0.0  # locals: a property read on every FINGERPRINT request
        for stats in self.groups.values():
            count += stats.count
            total += stats.sum
            squares += stats.sum_squares
        return GroupStats(count, total, squares)

    @property
    def nbytes(self) -> int:
        return self.sketch.numel() * self.sketch.element_size()

    def comparable_with(self, other: Fingerprint) -> bool:
        """Same sketch parameters and the same tensor set (so the same flattened positions)."""
        return (self.width, self.seed, self.version, self.tensors) == (other.width, other.seed, other.version, other.tensors)


def tensor_set_key(tensors: Sequence[tuple[str, Sequence[int]]]) -> str:
    """A short digest of a tensor set (names and shapes, in order)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, shape in tensors:
        digest.update(name.encode("utf-8") + b"\x00" + ",".join(str(int(d)) for d in shape).encode() + b"\x01")
    return digest.hexdigest()


_WORKSPACE_LOCK = threading.Lock()
_WORKSPACE: list[torch.Tensor] = []


def _workspace(n: int, width: int) -> torch.Tensor:
    """A reused (n, width) float32 buffer: a fresh 100 MiB tensor per call costs more in page faults than the matmul."""
    if not _WORKSPACE or _WORKSPACE[0].numel() < n * width:
        _WORKSPACE[:] = [torch.empty(max(n, 128) * width, dtype=torch.float32)]
    return _WORKSPACE[0][: n * width].view(n, width)


def _clamp(value: float, low: float, high: float) -> float:
    """torch.clamp on one float: NaN stays NaN."""
    return value if math.isnan(value) else min(high, max(low, value))


_DOT_MEMO_ENTRIES = 1 << 14
"""Sketch dot products kept (a few hundred bytes each): all pairs of ~180 fingerprints."""
_DOT_LOCK = threading.Lock()
_DotEntry = tuple["weakref.ref[torch.Tensor]", int, "weakref.ref[torch.Tensor]", int, float]
_DOT_MEMO: OrderedDict[tuple[int, int], _DotEntry] = OrderedDict()


def _sketch_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """`float(np.dot(a, b))` of two float32 CPU sketches, memoised (bounded LRU).

    Cached fingerprints come back as the same objects request after request, so the
    1 MiB dot products of the FINGERPRINT hot path are computed once per pair. An
    entry holds weak references to the two tensors and their in-place version
    counters: it only answers for those very tensor objects, unmodified (a sketch
    edited in place, or a new tensor at a reused address, misses). The pair is
    unordered: float32 products commute exactly and the kernel sums them in index
    order, so np.dot(b, a) is bit-identical to np.dot(a, b).
    """
    if id(a) > id(b):
        a, b = b, a
    key = (id(a), id(b))
    try:
        version_a, version_b = a._version, b._version
    except RuntimeError:  # inference-mode tensors have no version counter: no memo for them
        return float(np.dot(a.numpy(), b.numpy()))
    with _DOT_LOCK:
        hit = _DOT_MEMO.get(key)
        if hit is not None and hit[0]() is a and hit[1] == version_a and hit[2]() is b and hit[3] == version_b:
            _DOT_MEMO.move_to_end(key)
            return hit[4]
    value = float(np.dot(a.numpy(), b.numpy()))
    with _DOT_LOCK:
        _DOT_MEMO[key] = (weakref.ref(a), version_a, weakref.ref(b), version_b, value)
        _DOT_MEMO.move_to_end(key)
        while len(_DOT_MEMO) > _DOT_MEMO_ENTRIES:
            _DOT_MEMO.popitem(last=False)
    return value


def clear_dot_memo() -> None:
    """Forget every memoised sketch dot product (tests compare memoised and fresh results)."""
    with _DOT_LOCK:
        _DOT_MEMO.clear()


def _estimate_small(fingerprints: Sequence[Fingerprint], totals: Sequence[GroupStats], count: int) -> Similarities:
    """`estimate` for a few fingerprints (the FINGERPRINT RPC hot path) in plain floats, the same formulas.

    A few float32 dot products and scalar arithmetic: tens of microseconds, where the
    vectorised n x n path costs hundreds in per-op overhead. NumPy's dot, not torch.dot:
    torch.dot fans out to the intra-op thread pool, which costs milliseconds per call when
    the cores are busy (heavy work, other processes). The same kernel gives the diagonal,
    so identical sketches give exactly 1. The dot products are memoised (`_sketch_dot`):
    a repeated pair costs a dictionary look-up, with the bit-identical value.
    """
    n = len(fingerprints)
    nan = math.nan
    sketches = [fp.sketch for fp in fingerprints]
    gram = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            gram[i][j] = gram[j][i] = _sketch_dot(sketches[i], sketches[j])
    sketch_norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    norms = [t.norm for t in totals]
    sums = [t.sum for t in totals]
    squares = [t.sum_squares for t in totals]
    var = [count * squares[i] - sums[i] * sums[i] for i in range(n)]
    pcc = [[nan] * n for _ in range(n)]
    cosine = [[nan] * n for _ in range(n)]
    euclid = [[0.0] * n for _ in range(n)]
    for i in range(n):
        cosine[i][i] = 1.0 if norms[i] > 0 else nan
        pcc[i][i] = 1.0 if var[i] > 0 and count > 0 else nan
        for j in range(n):
            if i == j:
                continue
            denominator = sketch_norms[i] * sketch_norms[j]
            cos_hat = _clamp(gram[i][j] / denominator, -1.0, 1.0) if denominator > 0 else nan
            both = norms[i] > 0 and norms[j] > 0
            cos = cos_hat if both else nan
            cross = cos * (norms[i] * norms[j])
            if var[i] > 0 and var[j] > 0 and both and count > 0:
                value = (count * cross - sums[i] * sums[j]) / math.sqrt(max(var[i] * var[j], 1e-300))
                pcc[i][j] = _clamp(value, -1.0, 1.0)
            pair_squares = squares[i] + squares[j]
            if both:
                distance = pair_squares - 2.0 * cross
                euclid[i][j] = nan if math.isnan(cos) else math.sqrt(max(distance, 0.0))
            else:
                euclid[i][j] = math.sqrt(max(pair_squares, 0.0))
            cosine[i][j] = cos
    return Similarities(
        pcc=pcc,
        cosine=cosine,
        euclidean=euclid,
        norms=norms,
        means=[t.sum / count if count else nan for t in totals],
        count=count,
    )


def estimate(fingerprints: Sequence[Fingerprint]) -> Similarities:
    """Estimated PCC, cosine and Euclidean matrices of n comparable fingerprints.

    The sketch gives each pair's normalised cross product (the ratio estimator);
    norms, sums and counts are exact. Raises ValueError when the fingerprints are not
    comparable. Undefined entries (zero or constant task vectors) are NaN.
    """
    n = len(fingerprints)
    if n == 0:
        return Similarities([], [], [], [], [], 0)
    first = fingerprints[0]
    for fp in fingerprints[1:]:
        if not fp.comparable_with(first):
            raise ValueError("fingerprints over different tensor sets or sketch parameters are not comparable")
    totals = [fp.total for fp in fingerprints]
    count = totals[0].count
    if n <= 8:
        return _estimate_small(fingerprints, totals, count)
    with _WORKSPACE_LOCK:
        sketches = _workspace(n, first.width)
        torch.stack([fp.sketch for fp in fingerprints], out=sketches)
        gram_hat = (sketches @ sketches.T).to(torch.float64)
    sketch_norms = gram_hat.diagonal().clamp_min(0).sqrt()
    denominator = torch.outer(sketch_norms, sketch_norms)
    nan = torch.full_like(gram_hat, math.nan)
    cos_hat = torch.where(denominator > 0, gram_hat / denominator, nan).clamp_(-1.0, 1.0)
    # The exact statistics; every n x n formula below is vectorised (n = 100 in milliseconds).
    norms = torch.tensor([t.norm for t in totals], dtype=torch.float64)
    sums = torch.tensor([t.sum for t in totals], dtype=torch.float64)
    squares = torch.tensor([t.sum_squares for t in totals], dtype=torch.float64)
    var = count * squares - sums * sums
    nonzero = norms > 0
    both = torch.outer(nonzero, nonzero)
    cosine = torch.where(both, cos_hat, nan)
    cross = cosine * torch.outer(norms, norms)
    defined = torch.outer(var > 0, var > 0) & both & (count > 0)
    pcc_value = (count * cross - torch.outer(sums, sums)) / torch.outer(var, var).clamp_min(1e-300).sqrt()
    pcc = torch.where(defined, pcc_value.clamp(-1.0, 1.0), nan)
    pair_squares = squares[:, None] + squares[None, :]
    euclid = torch.where(both, (pair_squares - 2.0 * cross).clamp_min(0.0).sqrt(), pair_squares.clamp_min(0.0).sqrt())
    euclid = torch.where(both & cosine.isnan(), nan, euclid)
    eye = torch.eye(n, dtype=torch.bool)
    cosine = torch.where(eye, torch.where(nonzero, 1.0, math.nan).expand(n, n), cosine)
    pcc = torch.where(eye, torch.where((var > 0) & (count > 0), 1.0, math.nan).expand(n, n), pcc)
    euclid = euclid.masked_fill(eye, 0.0)
    return Similarities(
        pcc=pcc.tolist(),
        cosine=cosine.tolist(),
        euclidean=euclid.tolist(),
        norms=norms.tolist(),
        means=[t.sum / count if count else math.nan for t in totals],
        count=count,
    )


def build_fingerprints(
    sketches: torch.Tensor,
    stats: StatsBuilder,
    tensors: Sequence[tuple[str, Sequence[int]]],
    skipped: Sequence[Sequence[tuple[str, str, str]]] | None = None,
) -> list[Fingerprint]:
    """Package a pass's sketches (n, W) and statistics as n Fingerprints."""
    tensor_list = [(name, tuple(int(d) for d in shape)) for name, shape in tensors]
    return [
        Fingerprint(
            sketch=sketches[i].to(torch.float32).cpu().clone(),
            groups=dict(stats.groups[i]),
            tensors=tensor_list,
            width=sketches.shape[1],
            skipped=list(skipped[i]) if skipped is not None else [],
        )
        for i in range(sketches.shape[0])
    ]
