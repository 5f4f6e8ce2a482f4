"""Lossless task-vector deltas: encode a chunk of a checkpoint against its base, decode it back.

Pure functions over tensors, no I/O.

A chunk of model weights `m` (dtype T) and base weights `b` becomes:

- `D`: the float64 task vector `d = fl64(m - b)` (exactly what an exact kinship pass
  computes) stored in the narrowest of (T, float32, float64) that holds every element
  of `d` bit for bit (checked on the bit patterns, so NaN payloads and -0.0 count).
  Decoding `D` to float64 gives `d` exactly, so kinship from stored deltas equals
  kinship from the weights.
- patches: the positions where `cast_T(fl64(b + d))` is not bit-identical to `m`,
  with the raw bits of `m` there. Float subtraction is not always invertible (an
  exponent gap beyond 53 - p bits rounds `m - b`; `-0.0 - 0.0 = -0.0` but
  `0.0 + -0.0 = +0.0`; NaN payloads; inf - inf), so those elements are stored raw.

Why reconstruction is bit-exact: `reconstruct` evaluates `cast_T(fl64(b + D))` with
the same IEEE-754 operations (float64 addition, correctly rounded; round-to-nearest-
even cast) that `encode` evaluated and compared with `m`'s bit patterns, and then
overwrites every position where that comparison failed with `m`'s own bits. Every
element is therefore either verified equal at encode time or copied raw.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a contiguous tensor, as a signed integer tensor of the same item size."""
    return tensor.contiguous().view(_INT_VIEW[tensor.element_size()])


@dataclass
class EncodedChunk:
    """One chunk of a stored delta."""

    dtype: torch.dtype
    """The model's dtype T."""
    delta: torch.Tensor
    """1-D: the task vector in its storage dtype (T, float32 or float64)."""
    patch_index: torch.Tensor
    """1-D int64 positions where reconstruction needs the raw model bits."""
    patch_bits: torch.Tensor
    """1-D raw model values at those positions (dtype T)."""

    @property
    def numel(self) -> int:
        return self.delta.numel()


def _narrowest_exact(d64: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    want = bits(d64)
    candidates = sorted({model_dtype, torch.float32, torch.float64}, key=lambda t: torch.empty(0, dtype=t).element_size())
    for dtype in candidates:
        if dtype == torch.float64:
            return d64.clone()
        stored = d64.to(dtype)
        if torch.equal(bits(stored.to(torch.float64)), want):
            return stored
    return d64.clone()  # pragma: no cover - float64 is always a candidate


def encode(model: torch.Tensor, base64: torch.Tensor, d64: torch.Tensor | None = None) -> EncodedChunk:
    """Encode `model` (any float dtype) against `base64` (the base chunk in float64), both of k elements.

    `d64` is the float64 task vector `model - base` when the caller already has it.
    """
    model = model.reshape(-1)
    base64 = base64.reshape(-1)
    if d64 is None:
        d64 = model.to(torch.float64) - base64
    d64 = d64.reshape(-1)
    stored = _narrowest_exact(d64, model.dtype)
    rebuilt = (base64 + d64).to(model.dtype)
    mismatch = bits(rebuilt) != bits(model)
    index = mismatch.nonzero().reshape(-1)
    return EncodedChunk(model.dtype, stored, index, model.contiguous()[index].clone())


def decode_delta(chunk: EncodedChunk) -> torch.Tensor:
    """The float64 task vector of a chunk (bit-identical to `fl64(model - base)`)."""
    return chunk.delta.to(torch.float64)


def reconstruct(chunk: EncodedChunk, base64: torch.Tensor) -> torch.Tensor:
    """The model's weights of a chunk, bit for bit, from the base chunk (float64) and the stored delta."""
    out = (base64.reshape(-1) + chunk.delta.to(torch.float64)).to(chunk.dtype)
    if chunk.patch_index.numel():
        bits(out)[chunk.patch_index] = bits(chunk.patch_bits)
    return out


_LEN = struct.Struct("<I")


def to_parts(chunk: EncodedChunk) -> list[memoryview]:
    """Serialise a chunk as buffers (a JSON header then raw arrays), without joining them."""
    meta = {
        "dtype": DTYPE_NAMES[chunk.dtype],
        "storage": DTYPE_NAMES[chunk.delta.dtype],
        "k": chunk.delta.numel(),
        "patches": chunk.patch_index.numel(),
    }
    head = json.dumps(meta).encode()
    head += b" " * (-(len(head) + _LEN.size) % 8)  # keep the arrays 8-byte aligned
    parts = [memoryview(_LEN.pack(len(head)) + head)]
    for tensor in (chunk.delta, chunk.patch_index, chunk.patch_bits):
        if tensor.numel():
            parts.append(tensor.contiguous().view(torch.uint8).numpy().data)
    return parts


def from_bytes(payload: memoryview) -> EncodedChunk:
    """Parse a chunk written by `to_parts`; raises ValueError when it does not add up."""
    (length,) = _LEN.unpack_from(payload)
    meta = json.loads(bytes(payload[_LEN.size : _LEN.size + length]))
    dtype = DTYPES_BY_NAME[meta["dtype"]]
    storage = DTYPES_BY_NAME[meta["storage"]]
    k, patches = int(meta["k"]), int(meta["patches"])
    offset = _LEN.size + length
    sizes = [
        (storage, k),
        (torch.int64, patches),
        (dtype, patches),
    ]
    total = offset + sum(torch.empty(0, dtype=t).element_size() * n for t, n in sizes)
    if total != len(payload):
        raise ValueError(f"delta chunk has {len(payload)} bytes, expected {total}")
    tensors = []
    for dtype_i, count in sizes:
        nbytes = torch.empty(0, dtype=dtype_i).element_size() * count
        if count:
            raw = torch.frombuffer(payload, dtype=torch.uint8, count=nbytes, offset=offset)
            tensors.append(raw.view(dtype_i))
        else:
            tensors.append(torch.empty(0, dtype=dtype_i))
        offset += nbytes
    return EncodedChunk(dtype, tensors[0], tensors[1], tensors[2])
