"""The numba-compiled loops of the exact pass: tiles of stored rows in, float64 moments and sketch partial sums out.

`cpu_kernel.py` drives them (work items, threads, the reduction of their partials); this
module is only the compiled arithmetic, imported when `cpu_kernel_jit.available()`. A work
item is `SUPER_BLOCK` elements of a chunk (`moments_kernel`) or one span of sketch buckets
(`sketch_kernel`); either walks its elements in L1-sized tiles: `_load_tile` widens the base
and model elements of a tile to float64 (bf16/fp16 from their bits, so nothing is rounded)
and subtracts the base, then `_tile_stats` adds every per-model sum, Gram entry and direct
squared distance `sum((d_i - d_j)^2)` of the tile to the work item's partials, reading each
tile row once per group of four models (`_self4`, `_cross4x2`: register-blocked, vectorised).

The `*_from_files` kernels do the same from open files: each thread `pread`s the piece of every
row it is about to use into its own cache-sized buffer (`_read_rows`) and runs the same tiles over
it, so the bytes go from the page cache to L2 once and are used there, instead of being copied into
chunk-sized buffers in DRAM and read back. Their tiles are the in-memory kernels' tiles, in the
same order: the results are bit-identical.

Annotations here document what the driver passes; numba types the arguments at each call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numba.np.numpy_support import carray

from kinship_service.kinship.cpu_kernel_direct import direct1, direct2, direct3, direct4
from kinship_service.kinship.cpu_kernel_jit import (
    BF16,
    FASTMATH,
    FP16,
    call_pread,
    f32_from_bits,
    f64_from_half_bits,
    jit,
    pointer,
)

SUPER_BLOCK = 1 << 16
"""Elements per parallel work item. Fixed (not derived from the thread count) so the
summation order, hence every bit of the result, is the same on any machine."""
DIRECT_STEP = 1 << 15
"""Elements the tile-free loops (`tile_free`) sum in registers between two additions to a work
item's partials (the tiled loops add every tile, 512 elements: 8-10 % slower for bf16 on AMD
Zen 4). The `*_from_files` kernels' pieces are multiples of it, so both sum alike."""


@jit(fastmath=FASTMATH)
def _widen(src: npt.NDArray[Any], kind: int, base: npt.NDArray[np.float64], k: int, out: npt.NDArray[np.float64]) -> None:
    """out[:k] = float64(src[:k]) - base[:k], the widening exact for every stored dtype."""
    if kind == BF16:
        # bf16 is the upper half of a float32: shift its bits up, reinterpret, widen.
        for t in range(k):
            out[t] = np.float64(f32_from_bits(np.uint32(src[t]) << np.uint32(16))) - base[t]
    elif kind == FP16:
        for t in range(k):
            out[t] = f64_from_half_bits(np.uint16(src[t])) - base[t]
    else:
        for t in range(k):
            out[t] = np.float64(src[t]) - base[t]

@jit(fastmath=FASTMATH)
def _self4(tile: npt.NDArray[np.float64], r0: int, r1: int, r2: int, r3: int, k: int) -> tuple[float, ...]:
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

@jit(fastmath=FASTMATH)
def _self3(tile: npt.NDArray[np.float64], r0: int, r1: int, r2: int, k: int) -> tuple[float, ...]:
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

@jit(fastmath=FASTMATH)
def _self2(tile: npt.NDArray[np.float64], r0: int, r1: int, k: int) -> tuple[float, ...]:
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

@jit(fastmath=FASTMATH)
def _self1(tile: npt.NDArray[np.float64], r0: int, k: int) -> tuple[float, ...]:
    """_self4 for one row: its sum and squared norm."""
    a = tile[r0]
    sa = gaa = 0.0
    for t in range(k):
        x = a[t]
        sa += x
        gaa += x * x
    return (sa, gaa)

@jit()
def _add_self(acc: npt.NDArray[np.float64], n: int, m: int, size: int, stats: tuple[float, ...], gram: npt.NDArray[np.int64], sq: npt.NDArray[np.int64]) -> None:
    """Add a _selfK result for models m..m+size-1 into acc; gram/sq[i, j] locate entries in stats."""
    for i in range(size):
        acc[m + i] += stats[i]
        for j in range(i, size):
            acc[n + (m + i) * n + m + j] += stats[gram[i, j]]
            if j > i:
                acc[n + n * n + (m + i) * n + m + j] += stats[sq[i, j]]

@jit(fastmath=FASTMATH)
def _cross4x2(tile: npt.NDArray[np.float64], r0: int, r1: int, r2: int, r3: int, c0: int, c1: int, k: int) -> tuple[float, ...]:
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

@jit(fastmath=FASTMATH)
def _signed(signs: npt.NDArray[np.int8], lo: int, sign: float, k: int, out: npt.NDArray[np.float64]) -> None:
    """out[:k] = sign * S[lo:lo+k] as float64 (+-1.0), shared by the n rows of a tile."""
    s = signs[lo : lo + k]
    for u in range(k):
        out[u] = sign * np.float64(s[u])

@jit(fastmath=FASTMATH)
def _sketch_add(out: npt.NDArray[np.float64], factor: npt.NDArray[np.float64], delta: npt.NDArray[np.float64], k: int) -> None:
    """out[:k] += factor[:k] * delta[:k] (exact products: +-delta)."""
    for u in range(k):
        out[u] += factor[u] * delta[u]

@jit(fastmath=FASTMATH)
def _tile_stats(tile: npt.NDArray[np.float64], n: int, k: int, acc: npt.NDArray[np.float64]) -> None:
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

@jit(fastmath=FASTMATH)
def _load_tile(addresses: npt.NDArray[np.int64], like: npt.NDArray[Any], kind: int, start: int, k: int, tile: npt.NDArray[np.float64]) -> None:
    """Tile row 0 = the base's elements start..start+k-1 (float64), rows 1..n = the deltas."""
    n = addresses.size - 1
    itemsize = like.itemsize
    base = tile[0]
    source = carray(pointer(addresses[0] + start * itemsize, like), (k,))
    _widen(source, kind, tile[n + 1], k, base)
    for i in range(n):
        source = carray(pointer(addresses[i + 1] + start * itemsize, like), (k,))
        _widen(source, kind, base, k, tile[i + 1])

@jit(fastmath=FASTMATH)
def _direct_stats(addresses: npt.NDArray[np.int64], like: npt.NDArray[Any], start: int, k: int, acc: npt.NDArray[np.float64]) -> None:
    """The statistics of elements start..start+k-1 of bf16 rows (n <= 4) without a tile (`cpu_kernel_direct`)."""
    n = addresses.size - 1
    b = carray(pointer(addresses[0] + start * 2, like), (k,))
    r0 = carray(pointer(addresses[1] + start * 2, like), (k,))
    if n == 1:
        _add_self(acc, n, 0, 1, direct1(b, r0, k), _GRAM1, _SQ1)
        return
    r1 = carray(pointer(addresses[2] + start * 2, like), (k,))
    if n == 2:
        _add_self(acc, n, 0, 2, direct2(b, r0, r1, k), _GRAM2, _SQ2)
        return
    r2 = carray(pointer(addresses[3] + start * 2, like), (k,))
    if n == 3:
        _add_self(acc, n, 0, 3, direct3(b, r0, r1, r2, k), _GRAM3, _SQ3)
        return
    r3 = carray(pointer(addresses[4] + start * 2, like), (k,))
    _add_self(acc, n, 0, 4, direct4(b, r0, r1, r2, r3, k), _GRAM4, _SQ4)


@jit(fastmath=FASTMATH)
def tile_free(kind: int, n: int) -> bool:
    """Whether rows of `kind` for n models take the tile-free loops (`cpu_kernel_direct`; sketched, `cpu_kernel_runs`)."""
    return kind == BF16 and n <= 4


@jit(fastmath=FASTMATH)
def _stats(addresses: npt.NDArray[np.int64], like: npt.NDArray[Any], kind: int, start: int, k: int, tile: npt.NDArray[np.float64], acc: npt.NDArray[np.float64]) -> None:
    """Add the statistics of elements start..start+k-1 (one tile) to acc: tile-free when `tile_free`, else through the float64 tile."""
    n = addresses.size - 1
    if tile_free(kind, n):
        _direct_stats(addresses, like, start, k, acc)
    else:
        _load_tile(addresses, like, kind, start, k, tile)
        _tile_stats(tile, n, k, acc)


@jit(fastmath=FASTMATH)
def _sketch_tile(
    tile: npt.NDArray[np.float64], n: int, k: int, factor: npt.NDArray[np.float64], buckets: npt.NDArray[np.float32],
    bucket: int, signs: npt.NDArray[np.int8], lo: int, sign: float,
) -> None:
    """Add the tile's k deltas (`_load_tile`) to buckets[:, bucket:bucket+k] with signs sign * S[lo:lo+k]."""
    _signed(signs, lo, sign, k, factor)
    for i in range(n):
        _sketch_add(buckets[i, bucket : bucket + k], factor, tile[i + 1], k)


@jit(fastmath=FASTMATH)
def add_span(sketch: npt.NDArray[np.float64], buckets: npt.NDArray[np.float32], b0: int) -> None:
    """Fold a work item's float32 bucket sums into the float64 sketch, at buckets b0.. of every row."""
    for i in range(buckets.shape[0]):
        target, source = sketch[i, b0 : b0 + buckets.shape[1]], buckets[i]
        for u in range(buckets.shape[1]):
            target[u] += source[u]


@jit(nogil=True, fastmath=FASTMATH)
def moments_kernel(
    addresses: npt.NDArray[np.int64],
    like: npt.NDArray[Any],
    kind: int,
    length: int,
    tile_elements: int,
    partials: npt.NDArray[np.float64],
    first: int,
    last: int,
) -> None:
    """Fused statistics of work items first..last-1 of one chunk (runs without the GIL).

    addresses[i] is where row i's elements start (rows[0] the base, then n models;
    each `length` elements of like.dtype). partials[b] receives work item b's
    [sums (n) | gram (n*n, upper triangle) | sq_dist (n*n, strict upper triangle)].
    """
    n = addresses.size - 1
    direct = tile_free(kind, n)
    step = DIRECT_STEP if direct else tile_elements
    for block in range(first, last):
        # Tile rows: 0 the base values, 1..n the deltas, n + 1 zeros (padding of groups).
        tile = np.zeros((n + 2, 1 if direct else tile_elements), dtype=np.float64)
        acc = partials[block]
        acc[:] = 0.0
        stop = min(length, (block + 1) * SUPER_BLOCK)
        for start in range(block * SUPER_BLOCK, stop, step):
            k = min(step, stop - start)
            _stats(addresses, like, kind, start, k, tile, acc)

@jit(nogil=True, fastmath=FASTMATH)
def sketch_kernel(
    addresses: npt.NDArray[np.int64],
    like: npt.NDArray[Any],
    kind: int,
    tile_elements: int,
    partials: npt.NDArray[np.float64],
    first: int,
    last: int,
    item_span: npt.NDArray[np.int64],
    item_first: npt.NDArray[np.int64],
    seg_start: npt.NDArray[np.int64],
    seg_length: npt.NDArray[np.int64],
    seg_lo: npt.NDArray[np.int64],
    seg_sign: npt.NDArray[np.float64],
    seg_bucket: npt.NDArray[np.int64],
    sketch: npt.NDArray[np.float64],
    signs: npt.NDArray[np.int8],
    span: int,
) -> None:
    """The statistics AND the sketch of work items first..last-1 of one chunk (without the GIL).

    Work item w owns sketch buckets [item_span[w] * span, +span): its segments
    item_first[w]..item_first[w+1]-1 are the runs of the chunk's elements (from every
    sketch block) hashed there: seg_length[s] elements from chunk index seg_start[s],
    at sign-table index seg_lo[s], block sign seg_sign[s], bucket seg_bucket[s] of the
    span. Their sketch is summed in a small local buffer and added to `sketch` once,
    so work items never add to the same bucket (no races) and each bucket is
    read-modified-written once per chunk, not once per sketch block. (bf16 rows of at most
    four models take `cpu_kernel_runs.runs_kernel` instead.)
    """
    n = addresses.size - 1
    for w in range(first, last):
        tile = np.zeros((n + 2, tile_elements), dtype=np.float64)
        factor = np.empty(tile_elements, dtype=np.float64)
        local = np.zeros((n, span), dtype=np.float32)
        acc = partials[w]
        acc[:] = 0.0
        for s in range(item_first[w], item_first[w + 1]):
            for offset in range(0, seg_length[s], tile_elements):
                k = min(tile_elements, seg_length[s] - offset)
                _load_tile(addresses, like, kind, seg_start[s] + offset, k, tile)  # the tile: `_sketch_tile` reads its deltas
                _tile_stats(tile, n, k, acc)
                _sketch_tile(tile, n, k, factor, local, seg_bucket[s] + offset, signs, seg_lo[s] + offset, seg_sign[s])
        add_span(sketch, local, item_span[w] * span)


# _read_rows's status codes (status[0]); status[1] is the row, status[2] the file offset.
READ_OK, READ_SHORT, READ_FAILED = 0, 1, 2


@jit()
def _read_rows(
    pread: int,
    fds: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    at: int,
    nbytes: int,
    local: npt.NDArray[np.int64],
    status: npt.NDArray[np.int64],
) -> bool:
    """Read bytes [offsets[i] + at, + nbytes) of every row i's file to address local[i]; False (and status set) on a short read or error."""
    for i in range(fds.size):
        done = 0
        while done < nbytes:
            got = call_pread(pread, fds[i], local[i] + done, nbytes - done, offsets[i] + at + done)
            if got <= 0:
                status[0] = READ_SHORT if got == 0 else READ_FAILED
                status[1] = i
                status[2] = offsets[i] + at + done
                return False
            done += got
    return True


@jit(nogil=True, fastmath=FASTMATH)
def moments_kernel_from_files(
    pread: int,
    fds: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    local: npt.NDArray[np.int64],
    piece: int,
    like: npt.NDArray[Any],
    kind: int,
    length: int,
    tile_elements: int,
    partials: npt.NDArray[np.float64],
    first: int,
    last: int,
    status: npt.NDArray[np.int64],
) -> None:
    """`moments_kernel` over `length` elements of like.dtype at file offsets `offsets[i]` of files `fds[i]` (without the GIL).

    Each work item is read `piece` elements at a time (a multiple of the tile, and of DIRECT_STEP
    for the tile-free loops) into this
    thread's row buffers at addresses `local` (n + 1 rows of `piece` elements), then tiled as
    `moments_kernel` tiles it. On a short read or an error, stops with `status` set (`_read_rows`).
    """
    n = fds.size - 1
    itemsize = like.itemsize
    direct = tile_free(kind, n)
    step = DIRECT_STEP if direct else tile_elements
    for block in range(first, last):
        tile = np.zeros((n + 2, 1 if direct else tile_elements), dtype=np.float64)
        acc = partials[block]
        acc[:] = 0.0
        stop = min(length, (block + 1) * SUPER_BLOCK)
        for begin in range(block * SUPER_BLOCK, stop, piece):
            count = min(piece, stop - begin)
            if not _read_rows(pread, fds, offsets, begin * itemsize, count * itemsize, local, status):
                return
            for start in range(0, count, step):
                k = min(step, count - start)
                _stats(local, like, kind, start, k, tile, acc)


@jit(nogil=True, fastmath=FASTMATH)
def sketch_kernel_from_files(
    pread: int,
    fds: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    local: npt.NDArray[np.int64],
    like: npt.NDArray[Any],
    kind: int,
    tile_elements: int,
    partials: npt.NDArray[np.float64],
    first: int,
    last: int,
    item_span: npt.NDArray[np.int64],
    item_first: npt.NDArray[np.int64],
    seg_start: npt.NDArray[np.int64],
    seg_length: npt.NDArray[np.int64],
    seg_lo: npt.NDArray[np.int64],
    seg_sign: npt.NDArray[np.float64],
    seg_bucket: npt.NDArray[np.int64],
    sketch: npt.NDArray[np.float64],
    signs: npt.NDArray[np.int8],
    span: int,
    status: npt.NDArray[np.int64],
) -> None:
    """`sketch_kernel` reading each segment (at most `span` elements) from the files into the row buffers at `local` first.

    As `moments_kernel_from_files`: `fds`, `offsets`, `local` (n + 1 rows of at least `span`
    elements) and `status`. A work item's sketch is added to `sketch` only when all its reads
    succeeded. (bf16 rows of at most four models take `cpu_kernel_runs.runs_kernel_from_files`.)
    """
    n = fds.size - 1
    itemsize = like.itemsize
    for w in range(first, last):
        tile = np.zeros((n + 2, tile_elements), dtype=np.float64)
        factor = np.empty(tile_elements, dtype=np.float64)
        buckets = np.zeros((n, span), dtype=np.float32)
        acc = partials[w]
        acc[:] = 0.0
        for s in range(item_first[w], item_first[w + 1]):
            length = seg_length[s]
            if not _read_rows(pread, fds, offsets, seg_start[s] * itemsize, length * itemsize, local, status):
                return
            for offset in range(0, length, tile_elements):
                k = min(tile_elements, length - offset)
                _load_tile(local, like, kind, offset, k, tile)
                _tile_stats(tile, n, k, acc)
                _sketch_tile(tile, n, k, factor, buckets, seg_bucket[s] + offset, signs, seg_lo[s] + offset, seg_sign[s])
        add_span(sketch, buckets, item_span[w] * span)
