"""The exact pass's loops for bf16 rows and at most four models, widening in registers (no float64 tile).

`cpu_kernel_compiled` tiles the general case: it widens a tile of every row to float64 in L1,
then reads the tile back for the statistics. For bf16 (the usual LLM checkpoint) and n <= 4 (one
register-blocked group, no cross terms) these loops read the stored bits and widen them where
they are used instead: the tile's stores (one float64 store per row and element; without them
the loop for 3 models ran 1.6x faster on AMD Zen 4, rows in L2) go away, and the sketch
adds its deltas without a tile either. Same formulas, same tiles, the same float64 values; the
result layout is `cpu_kernel_compiled`'s `_selfK`. The sketch's terms are float32 (`_bf16_32`:
the bf16 widened exactly, the delta rounded only when base and model differ by more than 2**16
in magnitude) into float32 buckets, summed per chunk (see `cpu_kernel`). `sketch_pair` adds two segments hashed to
the same buckets in one pass over them (the loops `sketch_add_pair*`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numba.np.numpy_support import carray

from kinship_service.kinship.cpu_kernel_jit import FASTMATH, f32_from_bits, jit, pointer


@jit(fastmath=FASTMATH)
def _bf16(bits: np.uint16) -> np.float64:
    """The bf16 with these bits, as float64 (exact: the upper half of a float32)."""
    value: np.float64 = np.float64(f32_from_bits(np.uint32(bits) << np.uint32(16)))
    return value


@jit(fastmath=FASTMATH)
def _bf16_32(bits: np.uint16) -> np.float32:
    """The bf16 with these bits, as float32 (exact), for the sketch's float32 terms."""
    value: np.float32 = f32_from_bits(np.uint32(bits) << np.uint32(16))
    return value


@jit(fastmath=FASTMATH)
def direct4(b: npt.NDArray[np.uint16], r0: Any, r1: Any, r2: Any, r3: Any, k: int) -> tuple[float, ...]:
    """`_self4` of the task vectors rows - b (bf16 bits), widened in registers."""
    sa = sb = sc = sd = 0.0
    gaa = gab = gac = gad = gbb = gbc = gbd = gcc = gcd = gdd = 0.0
    qab = qac = qad = qbc = qbd = qcd = 0.0
    for t in range(k):
        base = _bf16(b[t])
        x, y, z, w = _bf16(r0[t]) - base, _bf16(r1[t]) - base, _bf16(r2[t]) - base, _bf16(r3[t]) - base
        sa += x
        sb += y
        sc += z
        sd += w
        gaa += x * x
        gab += x * y
        gac += x * z
        gad += x * w
        gbb += y * y
        gbc += y * z
        gbd += y * w
        gcc += z * z
        gcd += z * w
        gdd += w * w
        e = x - y
        qab += e * e
        e = x - z
        qac += e * e
        e = x - w
        qad += e * e
        e = y - z
        qbc += e * e
        e = y - w
        qbd += e * e
        e = z - w
        qcd += e * e
    return (sa, sb, sc, sd, gaa, gab, gac, gad, gbb, gbc, gbd, gcc, gcd, gdd, qab, qac, qad, qbc, qbd, qcd)


@jit(fastmath=FASTMATH)
def direct3(b: npt.NDArray[np.uint16], r0: Any, r1: Any, r2: Any, k: int) -> tuple[float, ...]:
    """`_self3` of the task vectors rows - b (bf16 bits), widened in registers."""
    sa = sb = sc = 0.0
    gaa = gab = gac = gbb = gbc = gcc = 0.0
    qab = qac = qbc = 0.0
    for t in range(k):
        base = _bf16(b[t])
        x, y, z = _bf16(r0[t]) - base, _bf16(r1[t]) - base, _bf16(r2[t]) - base
        sa += x
        sb += y
        sc += z
        gaa += x * x
        gab += x * y
        gac += x * z
        gbb += y * y
        gbc += y * z
        gcc += z * z
        e = x - y
        qab += e * e
        e = x - z
        qac += e * e
        e = y - z
        qbc += e * e
    return (sa, sb, sc, gaa, gab, gac, gbb, gbc, gcc, qab, qac, qbc)


@jit(fastmath=FASTMATH)
def direct2(b: npt.NDArray[np.uint16], r0: Any, r1: Any, k: int) -> tuple[float, ...]:
    """`_self2` of the task vectors rows - b (bf16 bits), widened in registers."""
    sa = sb = gaa = gab = gbb = qab = 0.0
    for t in range(k):
        base = _bf16(b[t])
        x, y = _bf16(r0[t]) - base, _bf16(r1[t]) - base
        sa += x
        sb += y
        gaa += x * x
        gab += x * y
        gbb += y * y
        e = x - y
        qab += e * e
    return (sa, sb, gaa, gab, gbb, qab)


@jit(fastmath=FASTMATH)
def direct1(b: npt.NDArray[np.uint16], r0: Any, k: int) -> tuple[float, ...]:
    """`_self1` of the task vector r0 - b (bf16 bits), widened in registers."""
    sa = gaa = 0.0
    for t in range(k):
        x = _bf16(r0[t]) - _bf16(b[t])
        sa += x
        gaa += x * x
    return (sa, gaa)


@jit(fastmath=FASTMATH)
def sketch_add_direct(
    out: npt.NDArray[np.float64], signs: npt.NDArray[np.int8], lo: int, sign: float, b: npt.NDArray[np.uint16], row: Any, k: int
) -> None:
    """out[:k] += sign * S[lo:lo+k] * (row - b)[:k] (bf16 bits): the tiled kernel's `_signed` and `_sketch_add`, in registers."""
    s, g = signs[lo : lo + k], np.float32(sign)
    for u in range(k):
        out[u] += (g * np.float32(s[u])) * (_bf16_32(row[u]) - _bf16_32(b[u]))


@jit(fastmath=FASTMATH)
def sketch_add_direct2(
    out_a: npt.NDArray[np.float64],
    out_b: npt.NDArray[np.float64],
    signs: npt.NDArray[np.int8],
    lo: int,
    sign: float,
    b: npt.NDArray[np.uint16],
    row_a: Any,
    row_b: Any,
    k: int,
) -> None:
    """`sketch_add_direct` of two rows in one loop: the signs and the base are converted once for both."""
    s, g = signs[lo : lo + k], np.float32(sign)
    for u in range(k):
        factor = g * np.float32(s[u])
        base = _bf16_32(b[u])
        out_a[u] += factor * (_bf16_32(row_a[u]) - base)
        out_b[u] += factor * (_bf16_32(row_b[u]) - base)


# No "reassoc" here: each bucket must add segment j's term before segment j + 1's, as two
# separate read-modify-writes would (the same bits), only without the store in between.
_IN_ORDER = {"contract"}


@jit(fastmath=_IN_ORDER)
def sketch_add_pair(
    out: npt.NDArray[np.float64],
    signs: npt.NDArray[np.int8],
    lo_a: int,
    sign_a: float,
    b_a: npt.NDArray[np.uint16],
    row_a: Any,
    lo_b: int,
    sign_b: float,
    b_b: npt.NDArray[np.uint16],
    row_b: Any,
    k: int,
) -> None:
    """`sketch_add_direct` of two segments hashed to the same k buckets, a's term added before b's: one load and store per bucket, not two."""
    s_a, g_a = signs[lo_a : lo_a + k], np.float32(sign_a)
    s_b, g_b = signs[lo_b : lo_b + k], np.float32(sign_b)
    for u in range(k):
        first = out[u] + (g_a * np.float32(s_a[u])) * (_bf16_32(row_a[u]) - _bf16_32(b_a[u]))
        out[u] = first + (g_b * np.float32(s_b[u])) * (_bf16_32(row_b[u]) - _bf16_32(b_b[u]))


@jit(fastmath=_IN_ORDER)
def sketch_add_pair2(
    out_a: npt.NDArray[np.float64],
    out_b: npt.NDArray[np.float64],
    signs: npt.NDArray[np.int8],
    lo_1: int,
    sign_1: float,
    b_1: npt.NDArray[np.uint16],
    row_a1: Any,
    row_b1: Any,
    lo_2: int,
    sign_2: float,
    b_2: npt.NDArray[np.uint16],
    row_a2: Any,
    row_b2: Any,
    k: int,
) -> None:
    """`sketch_add_pair` of two models (a, b) in one loop: each segment's signs and base are converted once for both."""
    s_1, g_1 = signs[lo_1 : lo_1 + k], np.float32(sign_1)
    s_2, g_2 = signs[lo_2 : lo_2 + k], np.float32(sign_2)
    for u in range(k):
        f_1 = g_1 * np.float32(s_1[u])
        f_2 = g_2 * np.float32(s_2[u])
        base_1 = _bf16_32(b_1[u])
        base_2 = _bf16_32(b_2[u])
        first = out_a[u] + f_1 * (_bf16_32(row_a1[u]) - base_1)
        out_a[u] = first + f_2 * (_bf16_32(row_a2[u]) - base_2)
        first = out_b[u] + f_1 * (_bf16_32(row_b1[u]) - base_1)
        out_b[u] = first + f_2 * (_bf16_32(row_b2[u]) - base_2)


@jit(fastmath=FASTMATH)
def sketch_pair(
    first: npt.NDArray[np.int64],
    second: npt.NDArray[np.int64],
    like: npt.NDArray[Any],
    k: int,
    buckets: npt.NDArray[np.float32],
    bucket: int,
    signs: npt.NDArray[np.int8],
    lo_a: int,
    sign_a: float,
    lo_b: int,
    sign_b: float,
) -> None:
    """Add two segments of k bf16 elements (rows at `first`, then at `second`) to buckets[:, bucket:bucket+k], the first's terms first."""
    n = first.size - 1
    b_a = carray(pointer(first[0], like), (k,))
    b_b = carray(pointer(second[0], like), (k,))
    for i in range(0, n - 1, 2):  # two models per loop, then the odd one
        sketch_add_pair2(
            buckets[i, bucket : bucket + k], buckets[i + 1, bucket : bucket + k], signs,
            lo_a, sign_a, b_a, carray(pointer(first[i + 1], like), (k,)), carray(pointer(first[i + 2], like), (k,)),
            lo_b, sign_b, b_b, carray(pointer(second[i + 1], like), (k,)), carray(pointer(second[i + 2], like), (k,)),
            k,
        )  # fmt: skip
    if n % 2:
        row_a = carray(pointer(first[n], like), (k,))
        row_b = carray(pointer(second[n], like), (k,))
        sketch_add_pair(buckets[n - 1, bucket : bucket + k], signs, lo_a, sign_a, b_a, row_a, lo_b, sign_b, b_b, row_b, k)
