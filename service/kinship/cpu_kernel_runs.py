"""The sketched exact pass for bf16 rows and at most four models: statistics and sketch in one loop, two runs per bucket.

A sketched chunk's work item owns a span of sketch buckets and takes, from every sketch block
the chunk touches, the elements hashed into the span (`FusedFingerprint.segments`: one run per
block, two where the block's rotation wraps inside the span). `plan_runs` pairs the blocks of
a work item in order, (first, second), (third, fourth), ...: the two blocks' elements hashed to
one bucket are added to it in one step (`cpu_kernel_direct.sketched<n>`), and the statistics
come from the same loads. A stretch of buckets only one block of a pair reaches (where a chunk
starts or ends inside a block, an odd last block) is a run of its own, paired with rows of zeros.

The plan depends only on the chunk's position in the tensor, so the mapped, `pread` and
in-memory kernels below add the same terms in the same order: the same bits, on any thread count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numba.np.numpy_support import carray

from kinship_service.kinship.cpu_kernel_compiled import (
    _GRAM1,
    _GRAM2,
    _GRAM3,
    _GRAM4,
    _SQ1,
    _SQ2,
    _SQ3,
    _SQ4,
    _add_self,
    _read_rows,
    add_span,
)
from kinship_service.kinship.cpu_kernel_direct import sketched1, sketched2, sketched3, sketched4
from kinship_service.kinship.cpu_kernel_jit import FASTMATH, jit, pointer

_NONE = -1  # run_b of a run without a partner


@jit()
def _cover(x: int, first: int, last: int, seg_bucket: npt.NDArray[np.int64], seg_length: npt.NDArray[np.int64]) -> int:
    """The segment among first..last-1 whose buckets hold bucket x, else -1 (a block's segments never overlap)."""
    for s in range(first, last):
        if seg_bucket[s] <= x < seg_bucket[s] + seg_length[s]:
            return s
    return _NONE


@jit()
def plan_runs(
    item_first: npt.NDArray[np.int64],
    seg_start: npt.NDArray[np.int64],
    seg_length: npt.NDArray[np.int64],
    seg_lo: npt.NDArray[np.int64],
    seg_sign: npt.NDArray[np.float64],
    seg_bucket: npt.NDArray[np.int64],
    seg_block: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[Any], ...]:
    """The runs of every work item from its segments (`FusedFingerprint.segments`, plus each segment's sketch block).

    Returns (item_first_run, run_bucket, run_length, run_a, run_lo_a, run_sign_a, run_b,
    run_lo_b, run_sign_b): run r covers buckets [run_bucket[r], + run_length[r]) of its work
    item's span with chunk elements from run_a[r] (sign-table index run_lo_a[r], block sign
    run_sign_a[r]) and, unless run_b[r] is -1, from run_b[r] (the next block's, added second).
    """
    items = item_first.size - 1
    most = 2 * seg_start.size + 1  # each boundary of a segment starts at most one run
    item_first_run = np.zeros(items + 1, dtype=np.int64)
    bucket, length = np.empty(most, dtype=np.int64), np.empty(most, dtype=np.int64)
    run_a, lo_a = np.empty(most, dtype=np.int64), np.empty(most, dtype=np.int64)
    run_b, lo_b = np.empty(most, dtype=np.int64), np.empty(most, dtype=np.int64)
    sign_a, sign_b = np.empty(most, dtype=np.float64), np.empty(most, dtype=np.float64)
    edges = np.empty(8, dtype=np.int64)
    r = 0
    for w in range(items):
        item_first_run[w] = r
        s, end = item_first[w], item_first[w + 1]
        while s < end:
            first_end = s + 1
            while first_end < end and seg_block[first_end] == seg_block[s]:
                first_end += 1
            second_end = first_end
            while second_end < end and seg_block[second_end] == seg_block[first_end]:
                second_end += 1
            count = 0
            for t in range(s, second_end):  # every segment's first and last bucket + 1
                edges[count], edges[count + 1] = seg_bucket[t], seg_bucket[t] + seg_length[t]
                count += 2
            ordered = np.unique(edges[:count])
            for e in range(ordered.size - 1):
                x, y = ordered[e], ordered[e + 1]
                a = _cover(x, s, first_end, seg_bucket, seg_length)
                b = _cover(x, first_end, second_end, seg_bucket, seg_length)
                if a == _NONE:
                    a, b = b, _NONE
                if a == _NONE:
                    continue
                bucket[r], length[r] = x, y - x
                run_a[r], lo_a[r], sign_a[r] = seg_start[a] + x - seg_bucket[a], seg_lo[a] + x - seg_bucket[a], seg_sign[a]
                if b == _NONE:
                    run_b[r], lo_b[r], sign_b[r] = _NONE, lo_a[r], 0.0
                else:
                    run_b[r], lo_b[r], sign_b[r] = seg_start[b] + x - seg_bucket[b], seg_lo[b] + x - seg_bucket[b], seg_sign[b]
                r += 1
            s = second_end
    item_first_run[items] = r
    return (item_first_run, bucket[:r], length[:r], run_a[:r], lo_a[:r], sign_a[:r], run_b[:r], lo_b[:r], sign_b[:r])


@jit(fastmath=FASTMATH)
def _sketched(
    a: npt.NDArray[np.int64], b: npt.NDArray[np.int64], like: npt.NDArray[Any], k: int, buckets: npt.NDArray[np.float32],
    bucket: int, signs: npt.NDArray[np.int8], lo_a: int, sign_a: float, lo_b: int, sign_b: float, acc: npt.NDArray[np.float64],
) -> None:
    """Add the statistics of runs a and b (rows at those addresses, k elements) to acc and their sketch to buckets[:, bucket:]."""
    n = a.size - 1
    s_a, s_b = signs[lo_a : lo_a + k], signs[lo_b : lo_b + k]

    def row(rows: npt.NDArray[np.int64], i: int) -> Any:
        return carray(pointer(rows[i], like), (k,))

    def out(i: int) -> Any:
        return buckets[i, bucket : bucket + k]

    if n == 1:
        stats1 = sketched1(row(a, 0), row(a, 1), row(b, 0), row(b, 1), k, out(0), s_a, sign_a, s_b, sign_b)
        _add_self(acc, n, 0, 1, stats1, _GRAM1, _SQ1)
    elif n == 2:
        stats2 = sketched2(row(a, 0), row(a, 1), row(a, 2), row(b, 0), row(b, 1), row(b, 2), k, out(0), out(1), s_a, sign_a, s_b, sign_b)
        _add_self(acc, n, 0, 2, stats2, _GRAM2, _SQ2)
    elif n == 3:
        stats3 = sketched3(
            row(a, 0), row(a, 1), row(a, 2), row(a, 3), row(b, 0), row(b, 1), row(b, 2), row(b, 3), k,
            out(0), out(1), out(2), s_a, sign_a, s_b, sign_b,
        )  # fmt: skip
        _add_self(acc, n, 0, 3, stats3, _GRAM3, _SQ3)
    else:
        stats4 = sketched4(
            row(a, 0), row(a, 1), row(a, 2), row(a, 3), row(a, 4), row(b, 0), row(b, 1), row(b, 2), row(b, 3), row(b, 4), k,
            out(0), out(1), out(2), out(3), s_a, sign_a, s_b, sign_b,
        )  # fmt: skip
        _add_self(acc, n, 0, 4, stats4, _GRAM4, _SQ4)


@jit(fastmath=FASTMATH)
def _run(
    a: npt.NDArray[np.int64], b: npt.NDArray[np.int64], like: npt.NDArray[Any], tile_elements: int, length: int,
    buckets: npt.NDArray[np.float32], bucket: int, signs: npt.NDArray[np.int8], lo_a: int, sign_a: float, lo_b: int,
    sign_b: float, acc: npt.NDArray[np.float64],
) -> None:
    """`_sketched` of a run, a tile at a time (the statistics' partial sums go to acc once per tile)."""
    for offset in range(0, length, tile_elements):
        k = min(tile_elements, length - offset)
        _sketched(a + offset * 2, b + offset * 2, like, k, buckets, bucket + offset, signs, lo_a + offset, sign_a, lo_b + offset, sign_b, acc)


@jit(nogil=True, fastmath=FASTMATH)
def runs_kernel(
    addresses: npt.NDArray[np.int64], like: npt.NDArray[Any], tile_elements: int, partials: npt.NDArray[np.float64],
    first: int, last: int, item_span: npt.NDArray[np.int64], item_first_run: npt.NDArray[np.int64],
    run_bucket: npt.NDArray[np.int64], run_length: npt.NDArray[np.int64], run_a: npt.NDArray[np.int64],
    run_lo_a: npt.NDArray[np.int64], run_sign_a: npt.NDArray[np.float64], run_b: npt.NDArray[np.int64],
    run_lo_b: npt.NDArray[np.int64], run_sign_b: npt.NDArray[np.float64], sketch: npt.NDArray[np.float64],
    signs: npt.NDArray[np.int8], span: int,
) -> None:
    """The statistics and sketch of work items first..last-1 of a chunk of bf16 rows at `addresses` (without the GIL).

    As `cpu_kernel_compiled.sketch_kernel`, from the runs of `plan_runs`: each work item sums its
    span's sketch in a float32 buffer and adds it to `sketch` once (work items own disjoint spans).
    """
    n = addresses.size - 1
    zeros = np.zeros(span, dtype=np.uint16)  # run b of a run without a partner: deltas 0
    a, b = np.empty(n + 1, dtype=np.int64), np.empty(n + 1, dtype=np.int64)
    for w in range(first, last):
        buckets = np.zeros((n, span), dtype=np.float32)
        acc = partials[w]
        acc[:] = 0.0
        for r in range(item_first_run[w], item_first_run[w + 1]):
            for i in range(n + 1):
                a[i] = addresses[i] + run_a[r] * 2
                b[i] = zeros.ctypes.data if run_b[r] == _NONE else addresses[i] + run_b[r] * 2
            _run(a, b, like, tile_elements, run_length[r], buckets, run_bucket[r], signs, run_lo_a[r], run_sign_a[r], run_lo_b[r], run_sign_b[r], acc)
        add_span(sketch, buckets, item_span[w] * span)


@jit(nogil=True, fastmath=FASTMATH)
def runs_kernel_from_files(
    pread: int, fds: npt.NDArray[np.int64], offsets: npt.NDArray[np.int64], local: npt.NDArray[np.int64], like: npt.NDArray[Any],
    tile_elements: int, partials: npt.NDArray[np.float64], first: int, last: int, item_span: npt.NDArray[np.int64],
    item_first_run: npt.NDArray[np.int64], run_bucket: npt.NDArray[np.int64], run_length: npt.NDArray[np.int64],
    run_a: npt.NDArray[np.int64], run_lo_a: npt.NDArray[np.int64], run_sign_a: npt.NDArray[np.float64],
    run_b: npt.NDArray[np.int64], run_lo_b: npt.NDArray[np.int64], run_sign_b: npt.NDArray[np.float64],
    sketch: npt.NDArray[np.float64], signs: npt.NDArray[np.int8], span: int, status: npt.NDArray[np.int64],
) -> None:
    """`runs_kernel` reading each run's elements from the files (`pread`) into the row buffers at `local` first.

    `local`: n + 1 rows of 2 * span bf16 elements (run a's elements, then run b's); `status` as
    `cpu_kernel_compiled.moments_kernel_from_files`'s. A work item's sketch is added to `sketch`
    only when all its reads succeeded.
    """
    n = fds.size - 1
    zeros = np.zeros(span, dtype=np.uint16)
    second = local + span * 2
    b = np.empty(n + 1, dtype=np.int64)
    for w in range(first, last):
        buckets = np.zeros((n, span), dtype=np.float32)
        acc = partials[w]
        acc[:] = 0.0
        for r in range(item_first_run[w], item_first_run[w + 1]):
            length = run_length[r]
            if not _read_rows(pread, fds, offsets, run_a[r] * 2, length * 2, local, status):
                return
            if run_b[r] == _NONE:
                b[:] = zeros.ctypes.data
            elif not _read_rows(pread, fds, offsets, run_b[r] * 2, length * 2, second, status):
                return
            else:
                b[:] = second
            _run(local, b, like, tile_elements, length, buckets, run_bucket[r], signs, run_lo_a[r], run_sign_a[r], run_lo_b[r], run_sign_b[r], acc)
        add_span(sketch, buckets, item_span[w] * span)
