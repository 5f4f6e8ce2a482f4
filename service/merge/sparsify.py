"""Sparsifying task vectors chunk by chunk: TIES's exact top-k by magnitude and DARE's reproducible random masks. Pure math.

**Magnitude (TIES).** mergekit keeps the `k = max(1, int(density * numel))` elements of largest
`|delta|` (compared in float32) of each whole tensor. Streaming, the k-th largest magnitude is
found exactly by a radix selection over the float32 bit patterns of `|delta|` (for non-negative
floats the bit pattern orders like the value): a histogram of the high 16 bits over all chunks
picks the bin holding the k-th largest, a histogram of the low 16 bits inside that bin picks the
exact threshold. Elements above it are kept; of those equal to it, the first ones in element
order fill the quota (mergekit's unstable sort keeps an arbitrary subset of such ties; this one
is reproducible). Memory: two histograms per model, never a whole tensor.

**Random (DARE).** Element `e` of model `m`'s task vector in tensor `name` is kept when
`u < density`, `u = (h >> 11) / 2**53` and `h = splitmix64(key + (e + 1) * 0x9E3779B97F4A7C15)`,
`key = splitmix64(seed ^ fnv1a64(name + "\\0" + str(m)))` (all mod 2**64): the mask depends on
the seed, the tensor, the model and the element only, never on chunking, threads or device.
mergekit draws `torch.bernoulli` masks instead, which no seed makes reproducible across runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kinship_service.merge import sparsify_jit

HIGH_BINS = 1 << 15
"""Bins of the high 16 bits of a non-negative float32 (its sign bit is 0)."""
LOW_BINS = 1 << 16

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1


def magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """`|delta|` in float32 as int32 bit patterns, ordered as the magnitudes (mergekit compares in float32)."""
    return delta.abs().to(torch.float32).view(torch.int32)


def keep_count(density: float, numel: int) -> int:
    """mergekit's `k` of a tensor: `max(1, int(density * numel))` (all of it at density >= 1)."""
    return numel if density >= 1 else max(1, int(density * numel))


@dataclass(frozen=True)
class Threshold:
    """Which elements of one task vector TIES keeps: bit patterns above `bits`, and the first `quota` equal to it."""

    bits: int
    quota: int
    equal: int
    """Elements equal to the threshold in the whole tensor (ties need breaking when `quota < equal`)."""

    @property
    def all_equal_kept(self) -> bool:
        """Whether every element equal to the threshold is kept (no tie breaking needed)."""
        return self.quota >= self.equal


def high_histogram(bits: torch.Tensor) -> torch.Tensor:
    """Counts of the high 16 bits of one chunk's magnitudes (int64, HIGH_BINS)."""
    return torch.bincount((bits >> 16).to(torch.int64), minlength=HIGH_BINS)


def low_histogram(bits: torch.Tensor, high: int) -> torch.Tensor:
    """Counts of the low 16 bits of the chunk's magnitudes whose high 16 bits are `high` (int64, LOW_BINS)."""
    inside = bits[(bits >> 16) == high]
    return torch.bincount((inside & 0xFFFF).to(torch.int64), minlength=LOW_BINS)


def _select(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element (1-based) and how many elements lie in higher bins."""
    counts = histogram.tolist()
    above = 0
    for index in range(len(counts) - 1, -1, -1):
        if above + counts[index] >= k:
            return index, above
        above += counts[index]
    raise ValueError(f"k = {k} exceeds the {above} counted elements")


def high_bin(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """From the whole tensor's high histogram: the bin of the k-th largest magnitude and the count above that bin."""
    return _select(histogram, k)


def threshold(high: int, above_high: int, low_hist: torch.Tensor, k: int) -> Threshold:
    """The exact threshold from the low histogram of bin `high` (which `above_high` elements exceed)."""
    low, above_low = _select(low_hist, k - above_high)
    equal = int(low_hist[low])
    return Threshold((high << 16) | low, k - above_high - above_low, equal)


def magnitude_mask(bits: torch.Tensor, limit: Threshold, equal_before: int) -> torch.Tensor:
    """The kept elements of one chunk (bool): above the threshold, or equal to it within the quota.

    `equal_before`: elements equal to the threshold in the chunks before this one.
    """
    keep = bits > limit.bits
    if limit.all_equal_kept:
        return keep | (bits == limit.bits)
    equal = bits == limit.bits
    rank = torch.cumsum(equal.to(torch.int64), 0) + equal_before
    return keep | (equal & (rank <= limit.quota))


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch holds it."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(z: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplications wrap mod 2**64)."""
    z = z ^ _shr(z, 30)
    z = z * _signed(MIX1)
    z = z ^ _shr(z, 27)
    z = z * _signed(MIX2)
    return z ^ _shr(z, 31)


def _mix_int(z: int) -> int:
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def fnv1a64(data: bytes) -> int:
    """64-bit FNV-1a of `data`."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return h


def mask_key(seed: int, name: str, model: int) -> int:
    """The stream key of model `model`'s mask in tensor `name`."""
    return _mix_int((seed & MASK64) ^ fnv1a64(f"{name}\x00{model}".encode()))


def random_limit(density: float) -> int:
    """The bound `(h >> 11)` stays under for a kept element: `u < density` with `u = (h >> 11) / 2**53`."""
    return int(density * (1 << 53))


def random_mask(
    key: int, start: int, stop: int, density: float, use_kernel: bool = True, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """DARE's kept elements [start, stop) of one stream (bool) on `device`: `u < density`, see the module docstring.

    With numba (`use_kernel`, on CPU) one fused pass (`sparsify_jit`); else torch int64 ops,
    bit-identical on any device: int64 `*` wraps mod 2**64 (two's complement) on CPU and CUDA
    alike, `^` and `&` act on the bits, and `_shr` masks the sign bits an arithmetic shift copies.
    """
    limit = random_limit(density)
    if use_kernel and torch.device(device).type == "cpu" and sparsify_jit.available():
        return sparsify_jit.random_mask(key, start, stop, limit)
    index = torch.arange(start + 1, stop + 1, dtype=torch.int64, device=device)
    h = _mix(index * _signed(GOLDEN) + _signed(key))
    return _shr(h, 11) < limit
