"""The exact pass's loops for bf16 rows and at most four models, widening in registers (no float64 tile).

`cpu_kernel_compiled` tiles the general case: it widens a tile of every row to float64 in L1,
then reads the tile back for the statistics. For bf16 (the usual LLM checkpoint) and n <= 4 (one
register-blocked group, no cross terms) these loops read the stored bits and widen them where
they are used instead: the tile's stores (one float64 store per row and element; without them
the loop for 3 models ran 1.6x faster on AMD Zen 4, rows in L2) go away. Same formulas, the
same float64 values; the result layout is `cpu_kernel_compiled`'s `_selfK`.

`direct<n>` are the statistics alone. `sketched<n>` take two runs of elements hashed to the same
sketch buckets (`cpu_kernel_runs` plans them) and add, from the same loads, both runs'
statistics and their sketch terms: float32 (`_bf16_32`: the bf16 widened exactly, the delta
rounded only when base and model differ by more than 2**16 in magnitude) into float32 buckets,
summed per chunk (see `cpu_kernel`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from kinship_service.kinship.cpu_kernel_jit import FASTMATH, f32_from_bits, jit


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


# The sketched loops below add run a's and run b's elements of model i to the same buckets:
# o_i[u] += g_a S_a[u] (r_i - b)[u] + g_b S_b[u] (q_i - c)[u], float32 terms (`_bf16_32`), and
# return `direct<n>` of both runs' deltas (float64, exact) summed. One bucket read-modify-write
# serves two elements, and the statistics' loads and widening serve the sketch: on AMD Zen 4 the
# sketched loop for 3 models ran as fast as `direct3` alone. A run without a partner passes rows
# of zeros as run b (its deltas are then exactly 0 and add nothing).


@jit(fastmath=FASTMATH)
def sketched4(
    b: Any, r0: Any, r1: Any, r2: Any, r3: Any, c: Any, q0: Any, q1: Any, q2: Any, q3: Any, k: int,
    o0: Any, o1: Any, o2: Any, o3: Any, s_a: Any, g_a: float, s_b: Any, g_b: float,
) -> tuple[float, ...]:
    """`direct4` of runs (b; r0..r3) and (c; q0..q3), k elements each, and their sketch terms into o0..o3."""
    sa = sb = sc = sd = 0.0
    gaa = gab = gac = gad = gbb = gbc = gbd = gcc = gcd = gdd = 0.0
    qab = qac = qad = qbc = qbd = qcd = 0.0
    ga, gb = np.float32(g_a), np.float32(g_b)
    for u in range(k):
        fa, fb = ga * np.float32(s_a[u]), gb * np.float32(s_b[u])
        base_a, base_b = _bf16_32(b[u]), _bf16_32(c[u])
        xa, ya, za, wa = _bf16_32(r0[u]), _bf16_32(r1[u]), _bf16_32(r2[u]), _bf16_32(r3[u])
        xb, yb, zb, wb = _bf16_32(q0[u]), _bf16_32(q1[u]), _bf16_32(q2[u]), _bf16_32(q3[u])
        o0[u] = o0[u] + fa * (xa - base_a) + fb * (xb - base_b)
        o1[u] = o1[u] + fa * (ya - base_a) + fb * (yb - base_b)
        o2[u] = o2[u] + fa * (za - base_a) + fb * (zb - base_b)
        o3[u] = o3[u] + fa * (wa - base_a) + fb * (wb - base_b)
        ta, tb = np.float64(base_a), np.float64(base_b)
        x, y, z, w = np.float64(xa) - ta, np.float64(ya) - ta, np.float64(za) - ta, np.float64(wa) - ta
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
        x, y, z, w = np.float64(xb) - tb, np.float64(yb) - tb, np.float64(zb) - tb, np.float64(wb) - tb
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
def sketched3(
    b: Any, r0: Any, r1: Any, r2: Any, c: Any, q0: Any, q1: Any, q2: Any, k: int,
    o0: Any, o1: Any, o2: Any, s_a: Any, g_a: float, s_b: Any, g_b: float,
) -> tuple[float, ...]:
    """`direct3` of runs (b; r0..r2) and (c; q0..q2), k elements each, and their sketch terms into o0..o2."""
    sa = sb = sc = 0.0
    gaa = gab = gac = gbb = gbc = gcc = 0.0
    qab = qac = qbc = 0.0
    ga, gb = np.float32(g_a), np.float32(g_b)
    for u in range(k):
        fa, fb = ga * np.float32(s_a[u]), gb * np.float32(s_b[u])
        base_a, base_b = _bf16_32(b[u]), _bf16_32(c[u])
        xa, ya, za = _bf16_32(r0[u]), _bf16_32(r1[u]), _bf16_32(r2[u])
        xb, yb, zb = _bf16_32(q0[u]), _bf16_32(q1[u]), _bf16_32(q2[u])
        o0[u] = o0[u] + fa * (xa - base_a) + fb * (xb - base_b)
        o1[u] = o1[u] + fa * (ya - base_a) + fb * (yb - base_b)
        o2[u] = o2[u] + fa * (za - base_a) + fb * (zb - base_b)
        wa, wb = np.float64(base_a), np.float64(base_b)
        x, y, z = np.float64(xa) - wa, np.float64(ya) - wa, np.float64(za) - wa
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
        x, y, z = np.float64(xb) - wb, np.float64(yb) - wb, np.float64(zb) - wb
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
def sketched2(
    b: Any, r0: Any, r1: Any, c: Any, q0: Any, q1: Any, k: int, o0: Any, o1: Any, s_a: Any, g_a: float, s_b: Any, g_b: float
) -> tuple[float, ...]:
    """`direct2` of runs (b; r0, r1) and (c; q0, q1), k elements each, and their sketch terms into o0, o1."""
    sa = sb = gaa = gab = gbb = qab = 0.0
    ga, gb = np.float32(g_a), np.float32(g_b)
    for u in range(k):
        fa, fb = ga * np.float32(s_a[u]), gb * np.float32(s_b[u])
        base_a, base_b = _bf16_32(b[u]), _bf16_32(c[u])
        xa, ya, xb, yb = _bf16_32(r0[u]), _bf16_32(r1[u]), _bf16_32(q0[u]), _bf16_32(q1[u])
        o0[u] = o0[u] + fa * (xa - base_a) + fb * (xb - base_b)
        o1[u] = o1[u] + fa * (ya - base_a) + fb * (yb - base_b)
        ta, tb = np.float64(base_a), np.float64(base_b)
        x, y = np.float64(xa) - ta, np.float64(ya) - ta
        sa += x
        sb += y
        gaa += x * x
        gab += x * y
        gbb += y * y
        e = x - y
        qab += e * e
        x, y = np.float64(xb) - tb, np.float64(yb) - tb
        sa += x
        sb += y
        gaa += x * x
        gab += x * y
        gbb += y * y
        e = x - y
        qab += e * e
    return (sa, sb, gaa, gab, gbb, qab)


@jit(fastmath=FASTMATH)
def sketched1(b: Any, r0: Any, c: Any, q0: Any, k: int, o0: Any, s_a: Any, g_a: float, s_b: Any, g_b: float) -> tuple[float, ...]:
    """`direct1` of runs (b; r0) and (c; q0), k elements each, and their sketch terms into o0."""
    sa = gaa = 0.0
    ga, gb = np.float32(g_a), np.float32(g_b)
    for u in range(k):
        base_a, base_b = _bf16_32(b[u]), _bf16_32(c[u])
        row_a, row_b = _bf16_32(r0[u]), _bf16_32(q0[u])
        o0[u] = o0[u] + (ga * np.float32(s_a[u])) * (row_a - base_a) + (gb * np.float32(s_b[u])) * (row_b - base_b)
        x = np.float64(row_a) - np.float64(base_a)
        sa += x
        gaa += x * x
        x = np.float64(row_b) - np.float64(base_b)
        sa += x
        gaa += x * x
    return (sa, gaa)
