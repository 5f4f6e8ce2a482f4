"""Fused CPU kernel for the exact pass: one read of the stored rows, everything accumulated in float64.

`accumulate(rows, moments)` does what `moments.update(rows[1:] - rows[0])` does in
float64, without float64 copies of the chunk, a subtraction pass or ~10 torch ops per
block: a numba kernel walks the chunk in L1-sized tiles, converts the base and model
elements of a tile to float64 (bf16/fp16 from their bits, so nothing is rounded),
subtracts the base, and adds every per-model sum, Gram entry and direct squared
distance `sum((d_i - d_j)^2)` of the tile to per-work-item partials, reading each tile
row once per group of four models (register-blocked, vectorised). Work items are
shared among `torch.get_num_threads()` threads (the kernel releases the GIL) and
their partials reduced in order, so the result does not depend on the thread count.

With `sketch=` (a `FusedFingerprint`, from `fused_observer`), the same tiles also feed
the task-vector fingerprint of the pass (`fingerprint.py`): each element, while in L1,
is added as `s_j * S[lo] * d` to bucket `(lo + r_j) mod W` of its model's CountSketch,
with the block keys `(r_j, s_j)` computed in Python by `fingerprint.block_params` and
passed as arrays. A sketched chunk's work items are bucket ranges (each gathers the
runs of elements of every sketch block that hash there), so threads never add to the
same bucket (no races, no atomics, no per-thread copies of the sketch) and the result
does not depend on the thread count. The per-group statistics of the `StatsBuilder`
are the moments' count, sums and Gram diagonal, so they cost nothing.

numba is optional: `available()` is False when it cannot be imported, and the caller
keeps the torch path (`PairwiseMoments.update`, and the observers' `observe`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from kinship_service.kinship.fingerprint import GroupStats, SketchBuilder, StatsBuilder, block_params, sign_table
from kinship_service.kinship.similarity import PairwiseMoments

# Elements per parallel work item. Fixed (not derived from the thread count) so the
# summation order, hence every bit of the result, is the same on any machine.
SUPER_BLOCK = 1 << 16
# The n + 2 float64 tile rows (base, n deltas, a zero row) fit in this much L1 (see _tile_elements).
TILE_L1_BYTES = 32 * 1024
# Work items of a chunk are handed out in this many runs per thread (load balancing).
PIECES_PER_THREAD = 4
# Mixed or exotic dtypes (fp8, a bf16 base with fp32 models) are widened exactly with
# torch in pieces of this many elements, so the temporary copy stays small.
WIDEN_PIECE = 1 << 20
# Sketch buckets per work item of a sketched chunk (their n float64 partial sums stay in L2).
SKETCH_SPAN = 4096

# How the loader reads a row (the kernel's `kind` argument).
_FLOAT, _BF16, _FP16 = 0, 1, 2
_KIND = {torch.float32: _FLOAT, torch.float64: _FLOAT, torch.bfloat16: _BF16, torch.float16: _FP16}


def _ensure_cache_dir() -> None:
    """Point numba's on-disk cache at a writable place when the default would not be.

    numba caches next to this source file, else in a per-user cache dir; in a read-only
    container neither may be writable. `NUMBA_CACHE_DIR`, when set and writable, wins;
    when set but read-only (the image's pre-filled cache under a read-only root
    filesystem: numba only uses a cache it can write), it is copied to a writable place.
    """
    configured = os.environ.get("NUMBA_CACHE_DIR")
    fallback = os.path.join(tempfile.gettempdir(), "kinship-numba-cache")
    if configured:
        if os.access(configured, os.W_OK) or not os.path.isdir(configured):
            return
        try:
            shutil.copytree(configured, fallback, dirs_exist_ok=True)
            os.environ["NUMBA_CACHE_DIR"] = fallback
        except OSError:
            pass  # _jit then compiles without an on-disk cache
        return
    if os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK):
        return
    try:
        os.makedirs(fallback, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = fallback
    except OSError:
        pass  # _jit then compiles without an on-disk cache


_ensure_cache_dir()
try:
    import numba
    from numba import njit
except ImportError as exc:  # optional dependency: the torch path stays
    numba = None
    _IMPORT_ERROR: str | None = f"numba is not importable ({exc})"
else:
    _IMPORT_ERROR = None

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """The threads (besides the caller's) that run shares of a chunk; created on first use."""
    global _executor
    if _executor is None:
        with _lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="kinship-kernel")
    return _executor


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
    def _f64_from_half_bits(typingctx, bits):  # type: ignore[no-untyped-def]
        """The IEEE half with these uint16 bits, widened to float64 (exact; F16C where present)."""
        sig = types.float64(types.uint16)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.fpext(builder.bitcast(args[0], _ir.HalfType()), _ir.DoubleType())

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
        """out[:k] = float64(src[:k]) - base[:k], the widening exact for every stored dtype."""
        if kind == _BF16:
            # bf16 is the upper half of a float32: shift its bits up, reinterpret, widen.
            for t in range(k):
                out[t] = np.float64(_f32_from_bits(np.uint32(src[t]) << np.uint32(16))) - base[t]
        elif kind == _FP16:
            for t in range(k):
                out[t] = _f64_from_half_bits(np.uint16(src[t])) - base[t]
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
    def _self3(tile, r0, r1, r2, k):  # type: ignore[no-untyped-def]
        """_self4 for three rows: 3 sums, 6 Gram entries, 3 squared distances."""
        a, b, c = tile[r0], tile[r1], tile[r2]
        sa = sb = sc = 0.0
        gaa = gab = gac = gbb = gbc = gcc = 0.0
        qab = qac = qbc = 0.0
        for t in range(k):
            x, y, z = a[t], b[t], c[t]
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

    @_jit(fastmath=_FASTMATH)
    def _self2(tile, r0, r1, k):  # type: ignore[no-untyped-def]
        """_self4 for two rows: 2 sums, 3 Gram entries, 1 squared distance."""
        a, b = tile[r0], tile[r1]
        sa = sb = gaa = gab = gbb = qab = 0.0
        for t in range(k):
            x, y = a[t], b[t]
            sa += x
            sb += y
            gaa += x * x
            gab += x * y
            gbb += y * y
            e = x - y
            qab += e * e
        return (sa, sb, gaa, gab, gbb, qab)

    @_jit(fastmath=_FASTMATH)
    def _self1(tile, r0, k):  # type: ignore[no-untyped-def]
        """_self4 for one row: its sum and squared norm."""
        a = tile[r0]
        sa = gaa = 0.0
        for t in range(k):
            x = a[t]
            sa += x
            gaa += x * x
        return (sa, gaa)

    @_jit()
    def _add_self(acc, n, m, size, stats, gram, sq):  # type: ignore[no-untyped-def]
        """Add a _selfK result for models m..m+size-1 into acc; gram/sq[i, j] locate entries in stats."""
        for i in range(size):
            acc[m + i] += stats[i]
            for j in range(i, size):
                acc[n + (m + i) * n + m + j] += stats[gram[i, j]]
                if j > i:
                    acc[n + n * n + (m + i) * n + m + j] += stats[sq[i, j]]

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

    # Where a _selfK result holds the Gram entry / squared distance of its rows i <= j.
    _GRAM4 = np.array([[4, 5, 6, 7], [0, 8, 9, 10], [0, 0, 11, 12], [0, 0, 0, 13]], dtype=np.int64)
    _SQ4 = np.array([[0, 14, 15, 16], [0, 0, 17, 18], [0, 0, 0, 19], [0, 0, 0, 0]], dtype=np.int64)
    _GRAM3 = np.array([[3, 4, 5], [0, 6, 7], [0, 0, 8]], dtype=np.int64)
    _SQ3 = np.array([[0, 9, 10], [0, 0, 11], [0, 0, 0]], dtype=np.int64)
    _GRAM2 = np.array([[2, 3], [0, 4]], dtype=np.int64)
    _SQ2 = np.array([[0, 5], [0, 0]], dtype=np.int64)
    _GRAM1 = np.array([[1]], dtype=np.int64)
    _SQ1 = np.array([[0]], dtype=np.int64)

    @_jit(fastmath=_FASTMATH)
    def _signed(signs, lo, sign, k, out):  # type: ignore[no-untyped-def]
        """out[:k] = sign * S[lo:lo+k] as float64 (+-1.0), shared by the n rows of a tile."""
        s = signs[lo : lo + k]
        for u in range(k):
            out[u] = sign * np.float64(s[u])

    @_jit(fastmath=_FASTMATH)
    def _sketch_add(out, factor, delta, k):  # type: ignore[no-untyped-def]
        """out[:k] += factor[:k] * delta[:k] (exact products: +-delta)."""
        for u in range(k):
            out[u] += factor[u] * delta[u]

    @_jit(fastmath=_FASTMATH)
    def _tile_stats(tile, n, k, acc):  # type: ignore[no-untyped-def]
        """Add the sums, Gram entries and squared distances of tile rows 1..n (k elements) to acc."""
        zero = n + 1
        for g in range((n + 3) // 4):
            m = 4 * g  # models m..m+3 are tile rows m+1..m+4; only the last group may be smaller
            size = min(4, n - m)
            if size == 4:
                _add_self(acc, n, m, 4, _self4(tile, m + 1, m + 2, m + 3, m + 4, k), _GRAM4, _SQ4)
            elif size == 3:
                _add_self(acc, n, m, 3, _self3(tile, m + 1, m + 2, m + 3, k), _GRAM3, _SQ3)
            elif size == 2:
                _add_self(acc, n, m, 2, _self2(tile, m + 1, m + 2, k), _GRAM2, _SQ2)
            else:
                _add_self(acc, n, m, 1, _self1(tile, m + 1, k), _GRAM1, _SQ1)
            for h in range(m + 4, n, 2):  # later models, two at a time
                other = h + 2 if h + 1 < n else zero  # an odd last model pairs with zeros
                cross = _cross4x2(tile, m + 1, m + 2, m + 3, m + 4, h + 1, other, k)
                for i in range(4):  # group g is full, since later models exist
                    for j in range(2):
                        if h + j < n:
                            acc[n + (m + i) * n + h + j] += cross[4 * j + i]
                            acc[n + n * n + (m + i) * n + h + j] += cross[8 + 4 * j + i]

    @_jit(fastmath=_FASTMATH)
    def _load_tile(addresses, like, kind, start, k, tile):  # type: ignore[no-untyped-def]
        """Tile row 0 = the base's elements start..start+k-1 (float64), rows 1..n = the deltas."""
        n = addresses.size - 1
        itemsize = like.itemsize
        base = tile[0]
        source = carray(_pointer(addresses[0] + start * itemsize, like), (k,))
        _widen(source, kind, tile[n + 1], k, base)
        for i in range(n):
            source = carray(_pointer(addresses[i + 1] + start * itemsize, like), (k,))
            _widen(source, kind, base, k, tile[i + 1])

    @_jit(nogil=True, fastmath=_FASTMATH)
    def _kernel(addresses, like, kind, length, tile_elements, partials, first, last):  # type: ignore[no-untyped-def]
        """Fused statistics of work items first..last-1 of one chunk (runs without the GIL).

        addresses[i] is where row i's elements start (rows[0] the base, then n models;
        each `length` elements of like.dtype). partials[b] receives work item b's
        [sums (n) | gram (n*n, upper triangle) | sq_dist (n*n, strict upper triangle)].
        """
        n = addresses.size - 1
        for block in range(first, last):
            # Tile rows: 0 the base values, 1..n the deltas, n + 1 zeros (padding of groups).
            tile = np.zeros((n + 2, tile_elements), dtype=np.float64)
            acc = partials[block]
            acc[:] = 0.0
            stop = min(length, (block + 1) * SUPER_BLOCK)
            for start in range(block * SUPER_BLOCK, stop, tile_elements):
                k = min(tile_elements, stop - start)
                _load_tile(addresses, like, kind, start, k, tile)
                _tile_stats(tile, n, k, acc)

    @_jit(nogil=True, fastmath=_FASTMATH)
    def _span_kernel(addresses, like, kind, tile_elements, partials, first, last, item_span, item_first, seg_start, seg_length, seg_lo, seg_sign, seg_bucket, sketch, signs, span):  # type: ignore[no-untyped-def]
        """The statistics AND the sketch of work items first..last-1 of one chunk (without the GIL).

        Work item w owns sketch buckets [item_span[w] * span, +span): its segments
        item_first[w]..item_first[w+1]-1 are the runs of the chunk's elements (from every
        sketch block) hashed there: seg_length[s] elements from chunk index seg_start[s],
        at sign-table index seg_lo[s], block sign seg_sign[s], bucket seg_bucket[s] of the
        span. Their sketch is summed in a small local buffer and added to `sketch` once,
        so work items never add to the same bucket (no races) and each bucket is
        read-modified-written once per chunk, not once per sketch block.
        """
        n = addresses.size - 1
        for w in range(first, last):
            tile = np.zeros((n + 2, tile_elements), dtype=np.float64)
            factor = np.empty(tile_elements, dtype=np.float64)
            local = np.zeros((n, span), dtype=np.float64)
            acc = partials[w]
            acc[:] = 0.0
            for s in range(item_first[w], item_first[w + 1]):
                for offset in range(0, seg_length[s], tile_elements):
                    k = min(tile_elements, seg_length[s] - offset)
                    _load_tile(addresses, like, kind, seg_start[s] + offset, k, tile)
                    _tile_stats(tile, n, k, acc)
                    bucket = seg_bucket[s] + offset
                    _signed(signs, seg_lo[s] + offset, seg_sign[s], k, factor)
                    for i in range(n):
                        _sketch_add(local[i, bucket : bucket + k], factor, tile[i + 1], k)
            b0 = item_span[w] * span
            for i in range(n):
                target, source = sketch[i, b0 : b0 + span], local[i]
                for u in range(span):
                    target[u] += source[u]


def _as_numpy(row: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a contiguous 1-D CPU row; bf16 and fp16 as their uint16 bits."""
    if row.dtype in (torch.bfloat16, torch.float16):
        return row.detach().view(torch.int16).numpy().view(np.uint16)
    return row.detach().numpy()


def _tile_elements(n: int) -> int:
    """A power-of-two tile length whose n + 2 float64 rows fit in TILE_L1_BYTES (at least 256)."""
    tile = max(256, TILE_L1_BYTES // (8 * (n + 2)))
    return min(1 << (tile.bit_length() - 1), SUPER_BLOCK)


class FusedFingerprint:
    """The sketch and statistics of a `FingerprintObserver`, filled by the fused kernel instead.

    Wraps the observer's `SketchBuilder` (its (n, W) float64 sketch is updated in place)
    and `StatsBuilder`. Pass it as `accumulate(..., sketch=self, tensor=name, offset=o)`
    for every chunk, then call `finish(moments_by_group)` once at the end of the pass:
    it sets each group's count, sum and sum of squares from the group's moments (count,
    sums, Gram diagonal: the same float64 sums the observer would have computed).
    Afterwards the builders hold what `observe` on every chunk and `flush()` would have
    left, up to float64 summation order (~1e-16 relative; deterministic, whatever the
    thread count).

    A sketched chunk is cut by sketch bucket, not by position: work item w owns buckets
    [w * SKETCH_SPAN, (w + 1) * SKETCH_SPAN) and takes, from every sketch block the chunk
    touches, the run of elements hashed there. So threads never add to one bucket, and
    each bucket is updated once per chunk from a small cache-resident buffer instead of
    once per sketch block (the n * 16 bytes of read-modify-write per element would cost
    more than the statistics).
    """

    def __init__(self, sketch: SketchBuilder, stats: StatsBuilder) -> None:
        self.builder = sketch
        self.stats = stats
        self.n = sketch.n
        self.width = sketch.width
        self.span = min(SKETCH_SPAN, sketch.width)
        self.signs = sign_table(sketch.width, sketch.seed).numpy().astype(np.int8)
        self.target = sketch.sketch.numpy()

    def keys(self, tensor: str, offset: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Rotations and signs of the sketch blocks that elements [offset, offset + length) of `tensor` touch."""
        first, last = offset // self.width, (offset + max(length, 1) - 1) // self.width
        params = [block_params(tensor, j, self.width, self.builder.seed) for j in range(first, last + 1)]
        return (np.array([r for r, _ in params], dtype=np.int64), np.array([g for _, g in params], dtype=np.float64))

    def segments(self, tensor: str, offset: int, length: int) -> tuple[np.ndarray, ...]:
        """The work items of a chunk (elements [offset, offset + length) of `tensor`) and their runs.

        Returns (item_span, item_first, seg_start, seg_length, seg_lo, seg_sign,
        seg_bucket): see `_span_kernel`. Spans no element hashes to are left out.
        """
        width, span = self.width, self.span
        rotations, block_signs = self.keys(tensor, offset, length)
        blocks = rotations.size
        origin = (offset // width + np.arange(blocks, dtype=np.int64)) * width - offset  # chunk index of lo = 0
        lo_min = np.maximum(0, -origin)
        lo_max = np.minimum(width, length - origin)
        spans = np.arange(width // span, dtype=np.int64)
        first_lo = (spans[:, None] * span - rotations[None, :]) % width  # (spans, blocks): lo of the span's bucket 0
        # Each (span, block) pair is at most two runs of lo: up to the end of the block, then from 0.
        run_lo = np.stack([first_lo, np.zeros_like(first_lo)], axis=2)
        run_hi = np.stack([np.minimum(first_lo + span, width), first_lo + span - width], axis=2)
        run_bucket = np.stack([np.zeros_like(first_lo), width - first_lo], axis=2)
        lo = np.maximum(run_lo, lo_min[None, :, None])
        hi = np.minimum(run_hi, lo_max[None, :, None])
        keep = hi > lo
        span_of, block_of, _ = np.nonzero(keep)  # C order: by span, then block, then run
        seg_lo = lo[keep]
        seg_length = hi[keep] - seg_lo
        seg_bucket = run_bucket[keep] + (seg_lo - run_lo[keep])
        seg_start = origin[block_of] + seg_lo
        item_span, item_first = np.unique(span_of, return_index=True)
        item_first = np.append(item_first, span_of.size).astype(np.int64)
        return (
            item_span.astype(np.int64),
            item_first,
            seg_start.astype(np.int64),
            seg_length.astype(np.int64),
            seg_lo.astype(np.int64),
            block_signs[block_of].astype(np.float64),
            seg_bucket.astype(np.int64),
        )

    def finish(self, moments: dict[str, PairwiseMoments]) -> None:
        """End of the pass: set the per-group statistics from `moments` (the sketch is already in place)."""
        for group, m in moments.items():  # insertion order = first tensor of each group, as observe() would
            if m.count == 0:
                continue
            sums = m.sums.tolist()
            squares = m.gram.diagonal().tolist()
            for i in range(self.n):
                stats = self.stats.groups[i].setdefault(group, GroupStats())
                stats.count += m.count
                stats.sum += sums[i]
                stats.sum_squares += squares[i]


def fused_observer(observer: object) -> FusedFingerprint | None:
    """A `FusedFingerprint` doing `observer`'s work inside the kernel, or None when it cannot.

    Supported: observers with a `fused_target()` method returning their
    (SketchBuilder, StatsBuilder) after flushing what they staged (as
    `registry.FingerprintObserver` does). None as well when numba is missing or the
    sketch is not a CPU float64 (n, W) tensor.
    """
    if numba is None:
        return None
    target = getattr(observer, "fused_target", None)
    if not callable(target):
        return None
    sketch, stats = target()
    if not isinstance(sketch, SketchBuilder) or not isinstance(stats, StatsBuilder) or stats.n != sketch.n:
        return None
    tensor = sketch.sketch
    if tensor.device.type != "cpu" or tensor.dtype != torch.float64 or not tensor.is_contiguous() or tuple(tensor.shape) != (sketch.n, sketch.width):
        return None
    return FusedFingerprint(sketch, stats)


def accumulate(
    rows: Sequence[torch.Tensor],
    moments: PairwiseMoments,
    *,
    sketch: FusedFingerprint | None = None,
    tensor: str | None = None,
    offset: int = 0,
) -> None:
    """Add a chunk to `moments` as `moments.update((rows[1:] - rows[0]).double())` would, fused.

    rows[0] is the base chunk and rows[1:] the n models' chunks: CPU tensors with equal
    element counts (flattened), each in its stored dtype, possibly from different memory
    maps. `moments` must live on the CPU. With `sketch`, the deltas are also sketched as
    elements [offset, offset + k) of tensor `tensor` (see `FusedFingerprint`). Raises
    RuntimeError when numba is unavailable (check `available()` first) and ValueError on
    mismatched rows.
    """
    if numba is None:
        raise RuntimeError(f"{_IMPORT_ERROR}; use PairwiseMoments.update")
    n = moments.n
    if sketch is not None and (tensor is None or sketch.n != n or offset < 0):
        raise ValueError("a sketched chunk needs its tensor name, a non-negative offset and a sketch of as many models")
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
        _run([f.contiguous() for f in flat], _KIND[flat[0].dtype], n, length, moments, sketch, tensor, offset)
        return
    # Mixed or exotic dtypes: widen exactly to one native dtype, a piece at a time.
    wide = torch.float64 if torch.float64 in dtypes else torch.float32
    for start in range(0, length, WIDEN_PIECE):
        stop = min(length, start + WIDEN_PIECE)
        _run([f[start:stop].to(wide) for f in flat], _FLOAT, n, stop - start, moments, sketch, tensor, offset + start)


def _run(
    rows: list[torch.Tensor],
    kind: int,
    n: int,
    length: int,
    moments: PairwiseMoments,
    sketch: FusedFingerprint | None = None,
    tensor: str | None = None,
    offset: int = 0,
) -> None:
    arrays = [_as_numpy(r) for r in rows]  # kept referenced until the kernel returns
    addresses = np.array([a.ctypes.data for a in arrays], dtype=np.int64)
    like = np.empty(0, dtype=arrays[0].dtype)  # only its dtype matters: one compiled kernel per dtype
    blocks = (length + SUPER_BLOCK - 1) // SUPER_BLOCK
    tile = _tile_elements(n)
    segments: tuple[np.ndarray, ...] = ()
    if sketch is not None:
        segments = sketch.segments(tensor or "", offset, length)
        blocks = segments[0].size  # work items: the sketch spans the chunk hashes to
    partials = np.empty((blocks, n + 2 * n * n), dtype=np.float64)
    threads = min(blocks, max(1, torch.get_num_threads()))
    # Runs of work items, several per thread, taken in turn by the pool's threads and this
    # one: a thread the OS parks on a busy machine holds up little. The kernel drops the
    # GIL, and idle threads block instead of spinning (an OpenMP pool would fight torch's).
    pieces = min(blocks, PIECES_PER_THREAD * threads)
    bounds = [blocks * i // pieces for i in range(pieces + 1)]
    taken = itertools.count()  # next() on it is atomic under the GIL

    def work() -> None:
        while (piece := next(taken)) < pieces:
            if sketch is None:
                _kernel(addresses, like, kind, length, tile, partials, bounds[piece], bounds[piece + 1])
            else:
                _span_kernel(
                    addresses, like, kind, tile, partials, bounds[piece], bounds[piece + 1],
                    *segments, sketch.target, sketch.signs, sketch.span,
                )  # fmt: skip

    futures = [_pool().submit(work) for _ in range(threads - 1)]
    work()
    for future in futures:
        future.result()
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
        fused = FusedFingerprint(SketchBuilder(2, width=1024), StatsBuilder(2))
        accumulate([base, base + 1, base + 2], PairwiseMoments(2), sketch=fused, tensor="warm-up", offset=1023)
    return time.perf_counter() - started
