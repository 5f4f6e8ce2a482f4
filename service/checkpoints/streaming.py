"""Tensor streaming: read a checkpoint's tensors one at a time, in bounded chunks, with safetensors.

Each chunk is read through its own short-lived `safe_open`, so the memory map (and
the page-cache pages it pins in our RSS) is released as soon as the chunk is done:
a 70B checkpoint streams through the same few hundred MiB as a 1B one. Every byte
read is counted in a `ReadStats`, which tests use to prove one-pass reading and
the server exports as a metric.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kinship_service.checkpoints.sources import Checkpoint
from kinship_service.errors import FailedPrecondition

# safetensors dtype names -> torch dtypes (those torch can hold).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOATING = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's header entry."""

    name: str
    dtype: str
    """safetensors dtype name, e.g. `BF16`."""
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE.get(self.dtype, 1)

    @property
    def is_floating(self) -> bool:
        return self.dtype in FLOATING


@dataclass
class ReadStats:
    """Bytes and tensor reads per file; thread-safe."""

    bytes_by_file: Counter[str] = field(default_factory=Counter)
    reads_by_tensor: Counter[tuple[str, str]] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, file: Path, name: str, nbytes: int, first_chunk: bool) -> None:
        with self._lock:
            self.bytes_by_file[str(file)] += nbytes
            if first_chunk:
                self.reads_by_tensor[(str(file), name)] += 1

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(self.bytes_by_file.values())


def _open_error(file: Path, label: str, exc: Exception) -> FailedPrecondition:
    return FailedPrecondition(
        f"{file.name} of {label} is not a readable safetensors file ({exc}); re-save it with "
        "safetensors.torch.save_file or re-download it",
        reason="CORRUPT_SAFETENSORS",
    )


class CheckpointReader:
    """Reads one checkpoint's headers and streams its tensors."""

    def __init__(self, checkpoint: Checkpoint, stats: ReadStats | None = None) -> None:
        self.checkpoint = checkpoint
        self.stats = stats if stats is not None else ReadStats()
        self._infos: dict[str, TensorInfo] | None = None

    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's header entry, by name (reads only the headers)."""
        if self._infos is None:
            self._infos = self._read_headers()
        return self._infos

    def _read_headers(self) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        label = self.checkpoint.label
        for file in self.checkpoint.files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        piece = handle.get_slice(name)
                        if name in infos:
                            raise FailedPrecondition(
                                f"tensor {name} of {label} appears in both {infos[name].file.name} and {file.name}",
                                reason="DUPLICATE_TENSOR",
                            )
                        infos[name] = TensorInfo(name, piece.get_dtype(), tuple(piece.get_shape()), file)
            except (SafetensorError, OSError, ValueError) as exc:
                raise _open_error(file, label, exc) from None
        for name, file in self.checkpoint.weight_map.items():
            if name not in infos or infos[name].file != file:
                raise FailedPrecondition(
                    f"the index of {label} places tensor {name} in {file.name}, but that shard does not hold it",
                    reason="BAD_INDEX",
                )
        return infos

    def read_chunks(
        self, name: str, *, max_elements: int, shape: tuple[int, ...] | None = None
    ) -> Iterator[torch.Tensor]:
        """Yield tensor `name` (or its leading slice of `shape`) in chunks along dimension 0.

        Each chunk holds at most `max_elements` elements (at least one row) in the stored
        dtype. It may be a view of a memory map that is closed when the next chunk is
        requested, so copy what you keep. Mapping each chunk separately keeps the
        file pages this process holds (and its RSS) bounded by one chunk per file.
        """
        info = self.tensors()[name]
        target = tuple(info.shape) if shape is None else tuple(shape)
        if info.dtype not in DTYPES:
            raise FailedPrecondition(
                f"tensor {name} of {self.checkpoint.label} has dtype {info.dtype}, which this server cannot read",
                reason="UNSUPPORTED_DTYPE",
            )
        itemsize = ITEMSIZE[info.dtype]
        try:
            if len(target) == 0:
                with safe_open(str(info.file), framework="pt") as handle:
                    self.stats.add(info.file, name, itemsize, True)
                    yield handle.get_tensor(name)
                return
            row_elements = max(1, math.prod(target[1:]))
            rows = max(1, max_elements // row_elements)
            tail = tuple(slice(0, d) for d in target[1:])
            if target[0] == 0:
                self.stats.add(info.file, name, 0, True)
            for start in range(0, target[0], rows):
                stop = min(start + rows, target[0])
                with safe_open(str(info.file), framework="pt") as handle:
                    chunk = handle.get_slice(name)[(slice(start, stop), *tail)]
                    self.stats.add(info.file, name, chunk.numel() * itemsize, start == 0)
                    yield chunk
        except (SafetensorError, OSError) as exc:
            raise _open_error(info.file, self.checkpoint.label, exc) from None

    def read_tensor(self, name: str) -> torch.Tensor:
        """Read one whole tensor (a copy owned by the caller)."""
        info = self.tensors()[name]
        parts = [c.clone() for c in self.read_chunks(name, max_elements=max(1, info.numel))]
        if len(info.shape) == 0:
            return parts[0]
        return torch.cat(parts) if len(parts) != 1 else parts[0]
