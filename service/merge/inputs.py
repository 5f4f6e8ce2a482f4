"""Where an input tensor's bytes live: one tensor's byte range in its validated safetensors file.

The merge reads tensor bytes with `os.preadv` at the offsets of the one header reader
(`checkpoints.safetensors_header`, which validated every span against shape and dtype): one copy from the page cache into a reusable
chunk buffer, no memory map to pin pages in our RSS or to SIGBUS when a file shrinks under us.
"""

from __future__ import annotations

from dataclasses import dataclass

from kinship_service.checkpoints.safetensors_header import SafetensorsHeader, TensorInfo
from kinship_service.checkpoints.streaming import CheckpointReader


@dataclass
class TensorSource:
    """Where one input tensor's bytes live in one checkpoint, with an open descriptor of its file."""

    reader: CheckpointReader
    info: TensorInfo
    header: SafetensorsHeader
    fd: int

    def byte_range(self) -> tuple[int, int]:
        """The tensor's [begin, end) byte positions in its file."""
        return self.header.byte_range(self.info.name)
