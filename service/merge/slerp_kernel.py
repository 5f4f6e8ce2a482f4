"""Fused CPU kernels for the SLERP merge: each reads a pair of input chunks once, in their stored dtype.

The torch path of `merge/writer.py` converts both chunks to float32 (two passes), computes the
reductions with a batched matmul, and later converts again, scales, adds and rounds to the
output dtype (four more passes). Here:

- `reduce_pair(a, b)`: `<a,a>`, `<b,b>`, `<a,b>` of two flat chunks (bf16, fp16 or fp32, read by
  their bits and widened in registers) accumulated in float64. Every product of two bf16, fp16
  or fp32 values is exact in float64, so the sums are at least as accurate as `SlerpStats`'
  float32 row dot products (they differ from them by ~1e-9 relative, far below anything that
  shows in a bf16 or fp16 output; the linear/SLERP branch can only flip for |cos| within
  ~1e-9 of the 0.9995 threshold).
- `interpolate(a, b, coefficients, out, intermediate)`: `ca * a + cb * b` written straight into
  the output chunk, with torch's exact float32 arithmetic: `x = fl32(a * fl32(ca))`, then
  `fma(b, fl32(cb), x)` (ATen's vectorised `add(..., alpha=)` fuses it; probed once, see
  `_torch_fuses`), rounded to the intermediate dtype (model A's, when it is neither float32
  nor the output dtype: mergekit's cast) and then to the output dtype: bf16 by
  round-to-nearest-even exactly as `c10::BFloat16`, fp16 by the IEEE conversion. Given the
  same coefficients the output is bit-identical to `MergeRunner._finish_slerp` (NaN payloads
  aside).

Both kernels release the GIL, so the merge's worker threads run them in parallel. numba is
optional: `available()` is False without it (`kinship/cpu_kernel_jit.py` imports it), and the merge
keeps its torch path. Float64 inputs (and anything else unusual) also stay on torch
(`supports`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from kinship_service.kinship import cpu_kernel_jit
from kinship_service.kinship.cpu_kernel_jit import BF16, FLOAT, FP16, as_numpy
from kinship_service.merge.slerp import Coefficients, SlerpStats

_KIND = {torch.float32: FLOAT, torch.bfloat16: BF16, torch.float16: FP16}
_NONE = -1

log = logging.getLogger(__name__)

if cpu_kernel_jit.available():
    from llvmlite import ir
    from numba import types

    from kinship_service.kinship.cpu_kernel_jit import f32_from_bits, intrinsic, jit

    def _bits_from_f32_typing(typingctx: Any, value: Any) -> tuple[Any, Callable[..., Any]]:
        """Typing and code generation of `_bits_from_f32`."""
        sig = types.uint32(types.float32)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], ir.IntType(32))

        return sig, codegen

    _bits_from_f32: Callable[[np.float32], np.uint32] = intrinsic(_bits_from_f32_typing)
    """The uint32 bits of a float32 (no conversion)."""

    def _f32_from_half_bits_typing(typingctx: Any, bits: Any) -> tuple[Any, Callable[..., Any]]:
        """Typing and code generation of `_f32_from_half_bits`."""
        sig = types.float32(types.uint16)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return sig, codegen

    _f32_from_half_bits: Callable[[np.uint16], np.float32] = intrinsic(_f32_from_half_bits_typing)
    """The IEEE half with these uint16 bits, widened to float32 (exact; F16C where present)."""

    def _half_bits_from_f32_typing(typingctx: Any, value: Any) -> tuple[Any, Callable[..., Any]]:
        """Typing and code generation of `_half_bits_from_f32`."""
        sig = types.uint16(types.float32)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

        return sig, codegen

    _half_bits_from_f32: Callable[[np.float32], np.uint16] = intrinsic(_half_bits_from_f32_typing)
    """float32 -> IEEE half (round to nearest even), as its uint16 bits."""

    def _fma32_typing(typingctx: Any, x: Any, y: Any, z: Any) -> tuple[Any, Callable[..., Any]]:
        """Typing and code generation of `_fma32`."""
        sig = types.float32(types.float32, types.float32, types.float32)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            f32 = ir.FloatType()
            fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
            return builder.call(fn, args)

        return sig, codegen

    _fma32: Callable[[np.float32, np.float32, np.float32], np.float32] = intrinsic(_fma32_typing)
    """x * y + z with one rounding (llvm.fma.f32; vectorised to vfmadd)."""

    @jit(inline="always")
    def _load(x: npt.NDArray[Any], kind: int, i: int) -> np.float32:
        """Element i of a stored row as float32 (exact): bf16/fp16 from their uint16 bits."""
        if kind == BF16:
            return f32_from_bits(np.uint32(x[i]) << np.uint32(16))
        if kind == FP16:
            return _f32_from_half_bits(np.uint16(x[i]))
        return np.float32(x[i])  # type: ignore[no-any-return]  # numpy's scalar stubs are untyped under Python 3.10

    @jit(inline="always")
    def _bf16_bits(r: np.float32) -> np.uint16:
        """float32 -> bfloat16 bits, round to nearest even (c10::BFloat16's round_to_nearest_even)."""
        if r != r:
            return np.uint16(0x7FC0)  # type: ignore[no-any-return]  # numpy's scalar stubs are untyped under Python 3.10
        u = _bits_from_f32(r)
        return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))  # type: ignore[no-any-return]  # numpy's scalar stubs are untyped under Python 3.10

    @jit(inline="always")
    def _round_to(r: np.float32, kind: int) -> np.float32:
        """float32 r rounded to `kind` and widened back to float32 (mergekit's intermediate cast)."""
        if kind == BF16:
            return f32_from_bits(np.uint32(_bf16_bits(r)) << np.uint32(16))
        if kind == FP16:
            return _f32_from_half_bits(_half_bits_from_f32(r))
        return r

    @jit(inline="always")
    def _store(out: npt.NDArray[Any], kind: int, i: int, r: np.float32) -> None:
        if kind == BF16:
            out[i] = _bf16_bits(r)
        elif kind == FP16:
            out[i] = _half_bits_from_f32(r)
        else:
            out[i] = r

    @jit(inline="always", fastmath={"reassoc", "contract"})
    def _reduce_loop(a: npt.NDArray[Any], b: npt.NDArray[Any], ka: int, kb: int, n: int) -> tuple[float, float, float]:
        aa = 0.0
        bb = 0.0
        ab = 0.0
        for i in range(n):
            x = np.float64(_load(a, ka, i))
            y = np.float64(_load(b, kb, i))
            aa += x * x
            bb += y * y
            ab += x * y
        return aa, bb, ab

    @jit(nogil=True, fastmath={"reassoc", "contract"})
    def _reduce(a: npt.NDArray[Any], b: npt.NDArray[Any], ka: int, kb: int, result: npt.NDArray[np.float64]) -> None:
        """result[:] = (<a,a>, <b,b>, <a,b>) in float64; float64 reassociation only (no nnan/ninf)."""
        n = a.size
        if ka == BF16 and kb == BF16:
            aa, bb, ab = _reduce_loop(a, b, BF16, BF16, n)
        elif ka == FP16 and kb == FP16:
            aa, bb, ab = _reduce_loop(a, b, FP16, FP16, n)
        elif ka == FLOAT and kb == FLOAT:
            aa, bb, ab = _reduce_loop(a, b, FLOAT, FLOAT, n)
        else:
            aa, bb, ab = _reduce_loop(a, b, ka, kb, n)
        result[0] = aa
        result[1] = bb
        result[2] = ab

    @jit(inline="always")
    def _interp_loop(
        a: npt.NDArray[Any],
        b: npt.NDArray[Any],
        out: npt.NDArray[Any],
        ka: int,
        kb: int,
        km: int,
        ko: int,
        ca: np.float32,
        cb: np.float32,
        fused: bool,
        n: int,
    ) -> None:
        for i in range(n):
            x = _load(a, ka, i) * ca
            y = _load(b, kb, i)
            if fused:
                r = _fma32(y, cb, x)
            else:
                r = x + np.float32(y * cb)
            _store(out, ko, i, _round_to(r, km))

    # No fastmath here: every float32 operation must round exactly as torch's does.
    @jit(nogil=True)
    def _interpolate(
        a: npt.NDArray[Any],
        b: npt.NDArray[Any],
        out: npt.NDArray[Any],
        ka: int,
        kb: int,
        km: int,
        ko: int,
        ca: np.float32,
        cb: np.float32,
        fused: bool,
    ) -> None:
        """out[i] = round_ko(round_km(fma(b[i], cb, fl32(a[i] * ca)))) for every i."""
        n = a.size
        if fused and km == _NONE and ka == kb and ka == ko:
            if ka == BF16:
                _interp_loop(a, b, out, BF16, BF16, _NONE, BF16, ca, cb, True, n)
            elif ka == FP16:
                _interp_loop(a, b, out, FP16, FP16, _NONE, FP16, ca, cb, True, n)
            else:
                _interp_loop(a, b, out, FLOAT, FLOAT, _NONE, FLOAT, ca, cb, True, n)
        elif fused and km == _NONE and ka == kb and ka == FLOAT:
            if ko == BF16:
                _interp_loop(a, b, out, FLOAT, FLOAT, _NONE, BF16, ca, cb, True, n)
            else:
                _interp_loop(a, b, out, FLOAT, FLOAT, _NONE, ko, ca, cb, True, n)
        else:
            _interp_loop(a, b, out, ka, kb, km, ko, ca, cb, fused, n)


def available() -> bool:
    """Whether the kernels can run here (numba importable); else the merge uses its torch path."""
    return cpu_kernel_jit.available()


_checked: dict[tuple[torch.dtype, ...], bool] = {}


def supports(dtype_a: torch.dtype, dtype_b: torch.dtype, out_dtype: torch.dtype, intermediate: torch.dtype) -> bool:
    """Whether these stored, output and intermediate dtypes have a working kernel (float64 stays on torch).

    The first time per combination the kernels run on a few elements (compiling them, or loading
    numba's cache); if that fails the combination stays on torch (logged once) instead of failing merges.
    """
    key = (dtype_a, dtype_b, out_dtype, intermediate)
    if not available() or not all(d in _KIND for d in key):
        return False
    ok = _checked.get(key)
    if ok is None:
        try:
            a, b = torch.zeros(4, dtype=dtype_a), torch.ones(4, dtype=dtype_b)
            reduce_pair(a, b)
            interpolate(a, b, Coefficients(0.5, 0.5, False, 0.0), torch.empty(4, dtype=out_dtype), intermediate)
            ok = True
        except Exception:  # a numba/LLVM problem on this machine: the torch path still works
            log.exception("SLERP kernel unavailable for %s; merging with torch", key)
            ok = False
        _checked[key] = ok
    return ok


_probe_lock = threading.Lock()
_fuses: bool | None = None


def _torch_fuses() -> bool:
    """Whether this torch fuses `add(x, y, alpha=c)` into one FMA (its vectorised CPU kernels do
    where the CPU has FMA), so the kernel rounds exactly as the torch path would here."""
    global _fuses
    if _fuses is None:
        with _probe_lock:
            if _fuses is None:
                x = torch.full((64,), -1.0, dtype=torch.float32)
                y = torch.full((64,), 1.0 + 2.0**-23, dtype=torch.float32)
                c = 1.0 - 2.0**-23
                # y * c = 1 - 2^-46 exactly: fused, -1 + y*c is -2^-46; rounded first, y*c is 1 and the sum 0.
                _fuses = bool((torch.add(x, y, alpha=c) != 0.0).all())
    return _fuses


def reduce_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """`(<a,a>, <b,b>, <a,b>)` of two flat chunks of equal length in their stored dtypes, in float64."""
    if a.numel() != b.numel():
        raise ValueError(f"chunks differ in length: {a.numel()} vs {b.numel()}")
    result = np.zeros(3, dtype=np.float64)
    if a.numel():
        _reduce(as_numpy(a), as_numpy(b), _KIND[a.dtype], _KIND[b.dtype], result)
    return float(result[0]), float(result[1]), float(result[2])


def reduce_stats(a: torch.Tensor, b: torch.Tensor) -> SlerpStats:
    """`reduce_pair` as a `SlerpStats` of the chunk (to be summed in chunk order with `SlerpStats.total`)."""
    stats = SlerpStats()
    stats.aa, stats.bb, stats.ab = reduce_pair(a, b)
    stats.count = a.numel()
    return stats


def interpolate(a: torch.Tensor, b: torch.Tensor, coefficients: Coefficients, out: torch.Tensor, intermediate: torch.dtype) -> None:
    """`out = ca * a + cb * b` from flat chunks in their stored dtypes, rounded as the torch path rounds.

    `intermediate` is the dtype mergekit casts the result to before the output dtype (model A's, or
    the configured `dtype`); it only matters when it is neither float32 nor `out`'s dtype.
    """
    if not (a.numel() == b.numel() == out.numel()):
        raise ValueError(f"chunks differ in length: {a.numel()}, {b.numel()}, {out.numel()}")
    if not a.numel():
        return
    middle = _KIND[intermediate] if intermediate not in (torch.float32, out.dtype) else _NONE
    _interpolate(
        as_numpy(a),
        as_numpy(b),
        as_numpy(out),
        _KIND[a.dtype],
        _KIND[b.dtype],
        middle,
        _KIND[out.dtype],
        np.float32(coefficients.ca),
        np.float32(coefficients.cb),
        _torch_fuses(),
    )


def warm_up() -> float:
    """Compile (or load from numba's cache) the kernels for the usual dtypes; returns the seconds taken."""
    started = time.perf_counter()
    coefficients = Coefficients(0.5, 0.5, False, 0.0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        a = torch.zeros(8, dtype=dtype)
        reduce_pair(a, a)
        for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
            interpolate(a, a, coefficients, torch.empty(8, dtype=out_dtype), dtype)
    return time.perf_counter() - started
