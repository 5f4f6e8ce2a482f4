"""The safetensors format, written as a stream: a header computed up front, then tensor bytes at their offsets.

We write the format ourselves (8-byte little-endian header length, a JSON header with dtype,
shape and data_offsets, then the raw bytes) instead of calling `safetensors.torch.save_file`:
that function takes a dict of every tensor of the file in memory, which for a 5 GB shard is
exactly what a merge must avoid. The header is computed from the plan, so the bytes can follow
as they are produced, from any thread and in any order (`SafetensorsWriter.write_at`). The result
is read back by `safetensors.safe_open` in the tests.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kinship_service.checkpoints.dtypes import ITEMSIZE
from kinship_service.errors import Internal

if sys.byteorder != "little":  # safetensors is little-endian; we write raw memory
    raise ImportError("the merge writer needs a little-endian machine")


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a file's header: its name, safetensors dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in the data section."""
        return int(math.prod(self.shape) * ITEMSIZE[self.dtype])


def safetensors_header(entries: Sequence[HeaderEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header for tensors stored back to back in `entries` order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Writes one safetensors file: the header first, then tensor bytes placed at their offsets
    from any thread (`write_at`).

    `finish()` checks every declared byte arrived, then fsyncs and closes; `abort()` closes
    without any guarantee (the caller deletes the temporary directory).
    """

    def __init__(self, path: Path, entries: Sequence[HeaderEntry], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.entries = list(entries)
        self.expected = sum(e.nbytes for e in self.entries)
        self.written = 0
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        header = safetensors_header(self.entries, metadata)
        self._data_start = len(header)
        try:
            self._write_all(header)
        except BaseException:
            self.abort()
            raise

    def _write_all(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def write_at(self, offset: int, data: memoryview | bytes) -> None:
        """Write tensor bytes at `offset` of the data section (thread-safe; any order)."""
        view = memoryview(data).cast("B")
        size = view.nbytes
        if offset < 0 or offset + size > self.expected:
            raise Internal(f"{self.path.name}: a write at {offset} falls outside the declared tensor bytes")
        position = self._data_start + offset
        while view:
            n = os.pwrite(self._fd, view, position)
            view = view[n:]
            position += n
        with self._lock:
            self.written += size

    def finish(self) -> None:
        """Check that every declared byte was written, then fsync and close the file."""
        if self.written != self.expected:
            raise Internal(f"{self.path.name}: wrote {self.written} of {self.expected} tensor bytes")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def abort(self) -> None:
        """Close the file without any check (the caller removes the temporary directory)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous tensor (no copy)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data
