"""numba for the fused CPU kernels: where its cache lives, whether it imports, and the bit-level primitives.

Shared by the exact pass's kernels (`cpu_kernel_compiled.py`) and the SLERP merge's
(`merge/slerp_kernel.py`). Importing this module points numba's on-disk cache at a writable
place first (`_ensure_cache_dir`), then imports numba; numba is optional, so `available()`
says whether it did, and the callers keep their torch paths when it did not.

When numba is present this module also defines `jit` (njit with the on-disk cache, or in
memory where no cache location is writable), `intrinsic` (numba's, typed for callers) and
the LLVM intrinsics numba lacks: `f32_from_bits`, `f64_from_half_bits`, `pointer`, and
`call_pread`, which calls libc's `pread` through its address (`PREAD_ADDRESS`), so a kernel reads
file bytes straight into its cache-sized buffers without the GIL. The address is an argument, not
a constant in the compiled code: numba can still cache the kernels on disk.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

# How a kernel reads a stored row (its `kind` argument): floats as they are, bf16 and fp16
# from their uint16 bits.
FLOAT, BF16, FP16 = 0, 1, 2


def kernel_cache_name() -> str:
    """The cache folder's name for this code: a digest of every module of `kinship/` and `merge/`.

    numba's disk cache checks only the source file of each compiled function, not the files of
    the functions it inlines, so an edit of `cpu_kernel_direct.py` would leave the kernels of
    `cpu_kernel_compiled.py` running stale code. A folder per digest makes any edit a fresh cache.
    """
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder in ("kinship", "merge"):
        directory = os.path.join(package, folder)
        for name in sorted(n for n in os.listdir(directory) if n.endswith(".py")):
            with open(os.path.join(directory, name), "rb") as source:
                digest.update(name.encode() + b"\0" + source.read())
    return f"kinship-kernels-{digest.hexdigest()[:16]}"


def _ensure_cache_dir() -> None:
    """Point numba's on-disk cache at a writable folder of this code's own (`kernel_cache_name`).

    `NUMBA_CACHE_DIR`, when set and writable, holds that folder; when set but read-only (the
    image's pre-filled cache under a read-only root filesystem: numba only uses a cache it can
    write), it is copied to a writable place first. Unset, the folder goes under the package's
    `__pycache__` (where numba would cache), else under the temporary directory. Child processes
    inherit the setting as it is (the name is not appended twice).
    """
    name = kernel_cache_name()
    configured = os.environ.get("NUMBA_CACHE_DIR")
    fallback = os.path.join(tempfile.gettempdir(), "kinship-numba-cache")
    if configured and os.path.basename(os.path.normpath(configured)) == name:
        return
    if configured:
        if os.access(configured, os.W_OK) or not os.path.isdir(configured):
            os.environ["NUMBA_CACHE_DIR"] = os.path.join(configured, name)
            return
        try:
            shutil.copytree(configured, fallback, dirs_exist_ok=True)
            os.environ["NUMBA_CACHE_DIR"] = os.path.join(fallback, name)
        except OSError:
            pass  # jit then compiles without an on-disk cache
        return
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (os.path.join(package, "__pycache__"), fallback):
        try:
            os.makedirs(root, exist_ok=True)
        except OSError:
            continue
        if os.access(root, os.W_OK):
            os.environ["NUMBA_CACHE_DIR"] = os.path.join(root, name)
            return
    # nowhere writable: jit compiles without an on-disk cache


_ensure_cache_dir()
try:
    from numba import njit
except ImportError as exc:  # optional dependency: the torch paths stay
    IMPORT_ERROR: str | None = f"numba is not importable ({exc})"
else:
    IMPORT_ERROR = None


def available() -> bool:
    """Whether the fused kernels can run here (numba importable); else the callers use torch."""
    return IMPORT_ERROR is None


def as_numpy(row: torch.Tensor) -> npt.NDArray[Any]:
    """A zero-copy numpy view of a flat contiguous CPU tensor, for a kernel; bf16 and fp16 as their uint16 bits."""
    if not row.is_contiguous() or row.dim() != 1:
        raise ValueError("the kernels take flat contiguous chunks")
    if row.dtype in (torch.bfloat16, torch.float16):
        return row.detach().view(torch.int16).numpy().view(np.uint16)
    return row.detach().numpy()


if IMPORT_ERROR is None:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic as _numba_intrinsic

    FASTMATH = {"reassoc", "contract"}
    """Reorder and fuse float64 additions only (vectorised reductions, FMA): no nnan/ninf, so NaN
    and inf still propagate. Reassociation changes rounding far below 1e-12."""

    def jit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
        """numba's `njit(**options)` with its on-disk cache; in memory when no cache location is writable.

        The compiled function is typed `Any`: numba types its arguments at each call, not from
        annotations.
        """

        def wrap(fn: Callable[..., Any]) -> Any:
            try:
                return njit(cache=True, **options)(fn)
            except RuntimeError:  # no writable cache location: compile in memory at warm-up
                return njit(cache=False, **options)(fn)

        return wrap

    def intrinsic(fn: Callable[..., tuple[Any, Callable[..., Any]]]) -> Any:
        """numba's `@intrinsic`: compiled code calls the result without the typing context argument."""
        return _numba_intrinsic(fn)

    def _f32_from_bits_typing(typingctx: Any, bits: Any) -> tuple[Any, Callable[..., Any]]:
        """Typing and code generation of `f32_from_bits`."""
        sig = types.float32(types.uint32)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], ir.FloatType())

        return sig, codegen

    f32_from_bits: Callable[[np.uint32], np.float32] = intrinsic(_f32_from_bits_typing)
    """Reinterpret a uint32 as the float32 with those bits (no conversion)."""

    def _f64_from_half_bits_typing(typingctx: Any, bits: Any) -> tuple[Any, Callable[..., Any]]:
        """Typing and code generation of `f64_from_half_bits`."""
        sig = types.float64(types.uint16)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.DoubleType())

        return sig, codegen

    f64_from_half_bits: Callable[[np.uint16], np.float64] = intrinsic(_f64_from_half_bits_typing)
    """The IEEE half with these uint16 bits, widened to float64 (exact; F16C where present)."""

    def _pointer_typing(typingctx: Any, address: Any, like: Any) -> tuple[Any, Callable[..., Any]]:
        """Typing and code generation of `pointer`."""
        sig = types.CPointer(like.dtype)(address, like)  # type: ignore[no-untyped-call]  # numba leaves CPointer's __init__ unannotated

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    pointer: Callable[[Any, npt.NDArray[Any]], Any] = intrinsic(_pointer_typing)
    """The integer `address` as a pointer to elements of `like`'s dtype."""

    PREAD_ADDRESS: int = ctypes.cast(ctypes.CDLL(None).pread, ctypes.c_void_p).value or 0
    """Where libc's `pread(int fd, void *buf, size_t count, off_t offset)` is, for `call_pread` (Linux, 64-bit off_t)."""

    def _call_pread_typing(typingctx: Any, function: Any, fd: Any, address: Any, count: Any, offset: Any) -> tuple[Any, Callable[..., Any]]:
        """Typing and code generation of `call_pread`."""
        sig = types.int64(types.int64, types.int64, types.int64, types.int64, types.int64)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            i64, byte_pointer = ir.IntType(64), ir.IntType(8).as_pointer()
            prototype = ir.FunctionType(i64, [ir.IntType(32), byte_pointer, i64, i64])
            target = builder.inttoptr(args[0], prototype.as_pointer())
            return builder.call(target, [builder.trunc(args[1], ir.IntType(32)), builder.inttoptr(args[2], byte_pointer), args[3], args[4]])

        return sig, codegen

    call_pread: Callable[[int, int, int, int, int], int] = intrinsic(_call_pread_typing)
    """`pread(fd, address, count, offset)` through the function at `PREAD_ADDRESS` (the first argument):
    bytes read, 0 at the end of the file, -1 on an error. Releases nothing itself: call it from a nogil kernel."""
