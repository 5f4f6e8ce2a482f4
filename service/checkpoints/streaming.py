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
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kinship_service.checkpoints.dtypes import DTYPES, ITEMSIZE
from kinship_service.checkpoints.safetensors_header import TensorInfo, corrupt_error, read_checkpoint_headers
from kinship_service.checkpoints.sources import Checkpoint
from kinship_service.errors import FailedPrecondition


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


class CheckpointReader:
    """Streams one checkpoint's tensors, laid out as `safetensors_header` read and validated them."""

    def __init__(self, checkpoint: Checkpoint, stats: ReadStats | None = None, tensors: dict[str, TensorInfo] | None = None) -> None:
        """`tensors`: the checkpoint's validated header entries when the caller has them (e.g.
        `CheckpointIdentity.headers`), so the plan and the reads share one reading of the headers."""
        self.checkpoint = checkpoint
        self.stats = stats if stats is not None else ReadStats()
        self._infos = tensors

    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's header entry, by name (validated headers, read once per file state)."""
        if self._infos is None:
            self._infos = read_checkpoint_headers(self.checkpoint).tensors
        return self._infos

    def read_chunks(
        self, name: str, *, max_elements: int, shape: tuple[int, ...] | None = None
    ) -> Generator[torch.Tensor, None, None]:
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
                index = (slice(start, stop), *tail)
                with safe_open(str(info.file), framework="pt") as handle:
                    chunk = handle.get_slice(name)[index]
                    self.stats.add(info.file, name, chunk.numel() * itemsize, start == 0)
                    yield chunk
        except (SafetensorError, OSError) as exc:
            raise corrupt_error(info.file, self.checkpoint.label, str(exc)) from None
