"""The safetensors dtype table: every dtype safetensors 0.8 knows, its size, its torch dtype, and whether kinship compares it.

One table serves header validation (sizes in bits, since F4 and F6 pack several values a
byte), reading (torch dtypes), the kinship plan and the merge (which dtypes are floating).
A dtype torch cannot hold (F4, F6_*) has no torch dtype: its tensors pass validation and are
skipped by kinship, but cannot be read into tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dtype:
    """One safetensors dtype."""

    name: str
    """The safetensors name, e.g. `BF16`."""
    bits: int
    """Bits per element (safetensors' `bitsize`)."""
    torch_dtype: torch.dtype | None
    """The torch dtype holding it, or None where torch has none (sub-byte floats)."""
    floating: bool
    """Compared by kinship and interpolated by merges (weights); others are copied or skipped."""

    @property
    def itemsize(self) -> int | None:
        """Bytes per element, or None for sub-byte dtypes."""
        return self.bits // 8 if self.bits % 8 == 0 else None


_TABLE = (
    Dtype("BOOL", 8, torch.bool, False),
    Dtype("F4", 4, None, False),
    Dtype("F6_E2M3", 6, None, False),
    Dtype("F6_E3M2", 6, None, False),
    Dtype("U8", 8, torch.uint8, False),
    Dtype("I8", 8, torch.int8, False),
    Dtype("F8_E5M2", 8, torch.float8_e5m2, True),
    Dtype("F8_E4M3", 8, torch.float8_e4m3fn, True),
    # Scale and "fnuz" float8 formats are not kinship-compared weights (as before this table).
    Dtype("F8_E8M0", 8, torch.float8_e8m0fnu, False),
    Dtype("F8_E4M3FNUZ", 8, torch.float8_e4m3fnuz, False),
    Dtype("F8_E5M2FNUZ", 8, torch.float8_e5m2fnuz, False),
    Dtype("I16", 16, torch.int16, False),
    Dtype("U16", 16, torch.uint16, False),
    Dtype("F16", 16, torch.float16, True),
    Dtype("BF16", 16, torch.bfloat16, True),
    Dtype("I32", 32, torch.int32, False),
    Dtype("U32", 32, torch.uint32, False),
    Dtype("F32", 32, torch.float32, True),
    Dtype("C64", 64, torch.complex64, False),
    Dtype("F64", 64, torch.float64, True),
    Dtype("I64", 64, torch.int64, False),
    Dtype("U64", 64, torch.uint64, False),
)

SAFETENSORS_DTYPES: dict[str, Dtype] = {d.name: d for d in _TABLE}
"""Every dtype name safetensors accepts in a header, by name."""
DTYPES: dict[str, torch.dtype] = {d.name: d.torch_dtype for d in _TABLE if d.torch_dtype is not None}
"""safetensors name -> torch dtype, for the dtypes torch can hold."""
ITEMSIZE: dict[str, int] = {d.name: d.bits // 8 for d in _TABLE if d.bits % 8 == 0}
"""safetensors name -> bytes per element, for the byte-sized dtypes."""
FLOATING = frozenset(d.name for d in _TABLE if d.floating)
"""The dtypes kinship compares and merges interpolate."""


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `dtype` and `shape` takes in a safetensors file (sub-byte dtypes packed)."""
    return math.prod(shape) * SAFETENSORS_DTYPES[dtype].bits // 8
