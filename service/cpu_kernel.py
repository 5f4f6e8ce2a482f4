"""Fused CPU kernel for the exact pass: one read of the stored rows, everything accumulated in float64.

`accumulate(rows, moments)` does what `moments.update(rows[1:] - rows[0])` does in
float64, without float64 copies of the chunk, a subtraction pass or ~10 torch ops per
block: a numba kernel walks the chunk in L1-sized tiles, converts the base and model
elements of a tile to float64 (bf16/fp16 from their bits, so nothing is rounded),
subtracts the base, and adds every per-model sum, Gram entry and direct squared
distance `sum((d_i - d_j)^2)` of the tile to per-block partials. Partials are reduced
in block order, so the result does not depend on the number of threads.

numba is optional: `available()` is False when it cannot be imported, and the caller
keeps the torch path (`PairwiseMoments.update`).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .kinship_math import PairwiseMoments

# Elements per parallel work item. Fixed (not derived from the thread count) so the
# summation order, hence every bit of the result, is the same on any machine.
SUPER_BLOCK = 1 << 16
# The n + 1 float64 tile rows of one work item together fit in this much L1 (see _tile_elements).
TILE_L1_BYTES = 32 * 1024
# Mixed or exotic dtypes (fp8, a bf16 base with fp32 models) are widened exactly with
# torch in pieces of this many elements, so the temporary copy stays small.
WIDEN_PIECE = 1 << 20

# How the loader reads a row (the kernel's `kind` argument).
_FLOAT, _BF16, _FP16 = 0, 1, 2
_KIND = {torch.float32: _FLOAT, torch.float64: _FLOAT, torch.bfloat16: _BF16, torch.float16: _FP16}


def _ensure_cache_dir() -> None:
    """Point numba's on-disk cache at a writable place when the default would not be.

    numba caches next to this source file, else in a per-user cache dir; in a read-only
    container neither may be writable. `NUMBA_CACHE_DIR`, when set, wins.
    """
    if os.environ.get("NUMBA_CACHE_DIR") or os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK):
        return
    fallback = os.path.join(tempfile.gettempdir(), "kinship-numba-cache")
    try:
        os.makedirs(fallback, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = fallback
    except OSError:
        pass  # _jit then compiles without an on-disk cache


_ensure_cache_dir()
try:
    import numba
    from numba import njit, prange
except ImportError as exc:  # optional dependency: the torch path stays
    numba = None
    _IMPORT_ERROR: str | None = f"numba is not importable ({exc})"
else:
    _IMPORT_ERROR = None

_lock = threading.Lock()


def available() -> bool:
    """Whether the fused kernel can run here (numba importable); else use `PairwiseMoments.update`."""
    return numba is not None


if numba is not None:
    from llvmlite import ir as _ir
    from numba import carray, types
    from numba.extending import intrinsic

    # Reorder and fuse float64 additions only (vectorised reductions, FMA): no nnan/ninf,
    # so NaN and inf still propagate. Reassociation changes rounding far below 1e-12.
    _FASTMATH = {"reassoc", "contract"}

    def _jit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
        def wrap(fn: Callable[..., Any]) -> Any:
            try:
                return njit(cache=True, **options)(fn)
            except RuntimeError:  # no writable cache location: compile in memory at warm-up
                return njit(cache=False, **options)(fn)

        return wrap

    @intrinsic
    def _f32_from_bits(typingctx, bits):  # type: ignore[no-untyped-def]
        """Reinterpret a uint32 as the float32 with those bits (no conversion)."""
        sig = types.float32(types.uint32)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(args[0], _ir.FloatType())

        return sig, codegen

    @intrinsic
    def _pointer(typingctx, address, like):  # type: ignore[no-untyped-def]
        """The integer `address` as a pointer to elements of `like`'s dtype."""
        sig = types.CPointer(like.dtype)(address, like)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    @_jit(fastmath=_FASTMATH)
    def _widen(src, kind, base, k, out):  # type: ignore[no-untyped-def]
        """out[:k] = float64(src[:k]) - base[:k], exactly (base None-like when kind < 0: no subtraction)."""
        if kind == _BF16:
            # bf16 is the upper half of a float32: shift its bits up, reinterpret, widen.
            for t in range(k):
                out[t] = np.float64(_f32_from_bits(np.uint32(src[t]) << np.uint32(16))) - base[t]
        elif kind == _FP16:
            # IEEE half from its bits: normals and inf/nan by moving the fields into a
            # float32, subnormals (exponent 0) as mantissa * 2^-24.
            for t in range(k):
                h = np.uint32(src[t])
                exponent = h & np.uint32(0x7C00)
                mantissa = h & np.uint32(0x3FF)
                rebiased = np.uint32(0x7F800000) if exponent == np.uint32(0x7C00) else (exponent << np.uint32(13)) + np.uint32(0x38000000)
                normal = np.float64(_f32_from_bits(rebiased | (mantissa << np.uint32(13))))
                value = np.float64(mantissa) * 5.9604644775390625e-08 if exponent == np.uint32(0) else normal
                out[t] = (-value if h & np.uint32(0x8000) else value) - base[t]
        else:
            for t in range(k):
                out[t] = np.float64(src[t]) - base[t]

    @_jit(fastmath=_FASTMATH)
    def _self4(tile, r0, r1, r2, r3, k):  # type: ignore[no-untyped-def]
        """One read of four delta rows: their 4 sums, 10 Gram entries and 6 squared distances."""
        a, b, c, d = tile[r0], tile[r1], tile[r2], tile[r3]
        sa = sb = sc = sd = 0.0
        gaa = gab = gac = gad = gbb = gbc = gbd = gcc = gcd = gdd = 0.0
        qab = qac = qad = qbc = qbd = qcd = 0.0
        for t in range(k):
            x, y, z, w = a[t], b[t], c[t], d[t]
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

    @_jit(fastmath=_FASTMATH)
    def _cross4x2(tile, r0, r1, r2, r3, c0, c1, k):  # type: ignore[no-untyped-def]
        """One read of rows r0..r3 and c0, c1: their 8 cross Gram entries and 8 squared distances."""
        a, b, c, d = tile[r0], tile[r1], tile[r2], tile[r3]
        u, v = tile[c0], tile[c1]
        gau = gbu = gcu = gdu = gav = gbv = gcv = gdv = 0.0
        qau = qbu = qcu = qdu = qav = qbv = qcv = qdv = 0.0
        for t in range(k):
            x, y, z, w, p, q = a[t], b[t], c[t], d[t], u[t], v[t]
            gau += x * p
            gbu += y * p
            gcu += z * p
            gdu += w * p
            gav += x * q
            gbv += y * q
            gcv += z * q
            gdv += w * q
            e = x - p
            qau += e * e
            e = y - p
            qbu += e * e
            e = z - p
            qcu += e * e
            e = w - p
            qdu += e * e
            e = x - q
            qav += e * e
            e = y - q
            qbv += e * e
            e = z - q
            qcv += e * e
            e = w - q
            qdv += e * e
        return (gau, gbu, gcu, gdu, gav, gbv, gcv, gdv, qau, qbu, qcu, qdu, qav, qbv, qcv, qdv)

    # Where _self4's result holds the Gram entry / squared distance of its rows i <= j.
    _GRAM4 = np.array([[4, 5, 6, 7], [0, 8, 9, 10], [0, 0, 11, 12], [0, 0, 0, 13]], dtype=np.int64)
    _SQ4 = np.array([[0, 14, 15, 16], [0, 0, 17, 18], [0, 0, 0, 19], [0, 0, 0, 0]], dtype=np.int64)

    @_jit(parallel=True, nogil=True, fastmath=_FASTMATH)
    def _kernel(addresses, like, kind, length, tile_elements, partials):  # type: ignore[no-untyped-def]
        """Fused statistics of one chunk.

        addresses[i] is where row i's elements start (rows[0] the base, then n models;
        each `length` elements of like.dtype). partials[b] receives work item b's
        [sums (n) | gram (n*n, upper triangle) | sq_dist (n*n, strict upper triangle)].
        """
        n = addresses.size - 1
        groups = (n + 3) // 4
        itemsize = like.itemsize
        blocks = (length + SUPER_BLOCK - 1) // SUPER_BLOCK
        for block in prange(blocks):
            # Tile rows: 0 the base values, 1..n the deltas, n + 1 zeros (padding of groups).
            tile = np.zeros((n + 2, tile_elements), dtype=np.float64)
            zero = n + 1
            acc = partials[block]
            acc[:] = 0.0
            stop = min(length, (block + 1) * SUPER_BLOCK)
            for start in range(block * SUPER_BLOCK, stop, tile_elements):
                k = min(tile_elements, stop - start)
                base = tile[0]
                source = carray(_pointer(addresses[0] + start * itemsize, like), (k,))
                _widen(source, kind, tile[zero], k, base)
                for i in range(n):
                    source = carray(_pointer(addresses[i + 1] + start * itemsize, like), (k,))
                    _widen(source, kind, base, k, tile[i + 1])
                for g in range(groups):
                    m = 4 * g  # models m..m+3 (tile rows m+1..m+4); missing ones read the zero row
                    rows = (m + 1, m + 2 if m + 1 < n else zero, m + 3 if m + 2 < n else zero, m + 4 if m + 3 < n else zero)
                    stats = _self4(tile, rows[0], rows[1], rows[2], rows[3], k)
                    for i in range(4):
                        if m + i < n:
                            acc[m + i] += stats[i]
                            for j in range(i, 4):
                                if m + j < n:
                                    acc[n + (m + i) * n + m + j] += stats[_GRAM4[i, j]]
                                    if j > i:
                                        acc[n + n * n + (m + i) * n + m + j] += stats[_SQ4[i, j]]
                    for h in range(m + 4, n, 2):  # later models, two at a time
                        other = h + 2 if h + 1 < n else zero
                        cross = _cross4x2(tile, rows[0], rows[1], rows[2], rows[3], h + 1, other, k)
                        for i in range(4):
                            if m + i < n:
                                for j in range(2):
                                    if h + j < n:
                                        acc[n + (m + i) * n + h + j] += cross[4 * j + i]
                                        acc[n + n * n + (m + i) * n + h + j] += cross[8 + 4 * j + i]

def _as_numpy(row: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a contiguous 1-D CPU row; bf16 and fp16 as their uint16 bits."""
    if row.dtype in (torch.bfloat16, torch.float16):
        return row.view(torch.int16).numpy().view(np.uint16)
    return row.numpy()


def _tile_elements(n: int) -> int:
    """A power-of-two tile length whose n + 2 float64 rows fit in TILE_L1_BYTES (at least 256)."""
    tile = max(256, TILE_L1_BYTES // (8 * (n + 2)))
    return min(1 << (tile.bit_length() - 1), SUPER_BLOCK)


def accumulate(rows: Sequence[torch.Tensor], moments: PairwiseMoments) -> None:
    """Add a chunk to `moments` as `moments.update((rows[1:] - rows[0]).double())` would, fused.

    rows[0] is the base chunk and rows[1:] the n models' chunks: CPU tensors with equal
    element counts (flattened), each in its stored dtype, possibly from different memory
    maps. `moments` must live on the CPU. Raises RuntimeError when numba is unavailable
    (check `available()` first) and ValueError on mismatched rows.
    """
    if numba is None:
        raise RuntimeError(f"{_IMPORT_ERROR}; use PairwiseMoments.update")
    n = moments.n
    if len(rows) != n + 1:
        raise ValueError(f"expected {n + 1} rows (the base and {n} models), got {len(rows)}")
    flat = [r.reshape(-1) for r in rows]
    length = flat[0].numel()
    if any(f.numel() != length for f in flat):
        raise ValueError("rows must have the same number of elements: " + ", ".join(str(f.numel()) for f in flat))
    if any(f.device.type != "cpu" for f in flat) or moments.sums.device.type != "cpu":
        raise ValueError("the fused kernel runs on CPU tensors and CPU moments only")
    if length == 0:
        return
    dtypes = {f.dtype for f in flat}
    if len(dtypes) == 1 and flat[0].dtype in _KIND:
        _run([f.contiguous() for f in flat], _KIND[flat[0].dtype], n, length, moments)
        return
    # Mixed or exotic dtypes: widen exactly to one native dtype, a piece at a time.
    wide = torch.float64 if torch.float64 in dtypes else torch.float32
    for start in range(0, length, WIDEN_PIECE):
        stop = min(length, start + WIDEN_PIECE)
        _run([f[start:stop].to(wide) for f in flat], _FLOAT, n, stop - start, moments)


def _run(rows: list[torch.Tensor], kind: int, n: int, length: int, moments: PairwiseMoments) -> None:
    arrays = [_as_numpy(r) for r in rows]  # kept referenced until the kernel returns
    addresses = np.array([a.ctypes.data for a in arrays], dtype=np.int64)
    blocks = (length + SUPER_BLOCK - 1) // SUPER_BLOCK
    partials = np.empty((blocks, n + 2 * n * n), dtype=np.float64)
    with _lock:  # one parallel kernel at a time: each already uses every core
        _kernel(addresses, arrays[0], kind, length, _tile_elements(n), partials)
    # Plain numpy on views of the moments' tensors: no torch op (and no wake-up of torch's
    # thread pool) per chunk.
    total = partials.sum(axis=0)
    gram = total[n : n + n * n].reshape(n, n)
    sq = total[n + n * n :].reshape(n, n)
    upper = np.triu_indices(n, 1)
    diagonal = np.diag_indices(n)
    moments.count += length
    moments.sums.numpy()[:] += total[:n]
    moments_gram = moments.gram.numpy()
    moments_gram[diagonal] += gram[diagonal]
    moments_gram[upper] += gram[upper]
    moments_gram[upper[::-1]] += gram[upper]
    moments_sq = moments.sq_dist.numpy()
    moments_sq[upper] += sq[upper]
    moments_sq[upper[::-1]] += sq[upper]

def warm_up() -> float:
    """Compile (or load from numba's disk cache) the kernel for every stored dtype; returns seconds.

    Call at server start so the first request does not pay the compile time (seconds).
    Returns 0.0 at once when numba is unavailable.
    """
    started = time.perf_counter()
    if numba is None:
        return 0.0
    for dtype in _KIND:
        base = torch.zeros(3, dtype=dtype)
        accumulate([base, base + 1, base + 2], PairwiseMoments(2))
    return time.perf_counter() - started
