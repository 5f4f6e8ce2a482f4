"""Where an input tensor's bytes live: the data offsets of each safetensors file, and one tensor's byte range.

The merge reads tensor bytes with `os.preadv` at these offsets (parsed once per file;
`CheckpointReader` validated the files first): one copy from the page cache into a reusable
chunk buffer, no memory map to pin pages in our RSS or to SIGBUS when a file shrinks under us.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from kinship_service.checkpoints.streaming import CheckpointReader, TensorInfo
from kinship_service.errors import FailedPrecondition


class _FileOffsets:
    """Data offsets of every tensor of a safetensors file, from its header (parsed once)."""

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                raise FailedPrecondition(f"{path.name} of {label} is truncated", reason="CORRUPT_SAFETENSORS")
            (length,) = struct.unpack("<Q", head)
            if length > 100 * 2**20:
                raise FailedPrecondition(f"{path.name} of {label} declares a {length}-byte header", reason="CORRUPT_SAFETENSORS")
            try:
                header = json.loads(handle.read(length))
            except ValueError as exc:
                raise FailedPrecondition(f"{path.name} of {label}: unreadable header ({exc})", reason="CORRUPT_SAFETENSORS") from None
        self.data_start = 8 + length
        self.offsets = {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}



@dataclass
class TensorSource:
    """Where one input tensor's bytes live in one checkpoint, with an open descriptor of its file."""

    reader: CheckpointReader
    info: TensorInfo
    offsets: _FileOffsets
    fd: int

    def byte_range(self) -> tuple[int, int]:
        """The tensor's [begin, end) byte positions in its file."""
        begin, end = self.offsets.offsets[self.info.name]
        return self.offsets.data_start + begin, self.offsets.data_start + end
