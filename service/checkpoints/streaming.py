"""Tensor streaming: read a checkpoint's tensors one at a time, in bounded chunks, by offset.

A chunk is read with `os.preadv` at the byte offsets of the validated header
(`safetensors_header`, the same reading the plan and the identity were made from) into a
buffer the reader reuses for every chunk: one copy from the page cache, no memory map, so
this process holds at most one chunk per checkpoint whatever the model size, no header is
parsed again per chunk, and a file truncated under a live read is a short read, answered
FAILED_PRECONDITION `CHECKPOINT_CHANGED`, not a SIGBUS that kills the process. Large reads
are split across a small thread pool (`preadv` releases the GIL), so the copy uses every
core. Every byte read is counted in a `ReadStats`, which tests use to prove one-pass
reading and the server exports as a metric.

`CheckpointReader.open_tensor` hands out a tensor's open file and byte range instead, for a
reader that reads by offset itself (the fused kernel, `kinship/cpu_kernel.accumulate_from_files`,
maps the range read-only under `checkpoints/mapped.py`'s SIGBUS guard, or reads cache-sized pieces
inside its compiled loop); `read_failed` turns what such a reader saw into the same
CHECKPOINT_CHANGED / CHECKPOINT_UNREADABLE errors.
"""

from __future__ import annotations

import math
import os
import threading
from collections import Counter
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kinship_service.checkpoints.dtypes import DTYPES, ITEMSIZE
from kinship_service.checkpoints.safetensors_header import TensorInfo, read_checkpoint_headers, read_header
from kinship_service.checkpoints.sources import Checkpoint
from kinship_service.errors import FailedPrecondition

# Reads larger than this are cut into pieces of this size, read in parallel.
READ_PIECE_BYTES = 8 * 2**20

_pool_lock = threading.Lock()
_read_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """The threads (besides the caller's) that read pieces of a large chunk; created on first use."""
    global _read_pool
    if _read_pool is None:
        with _pool_lock:
            if _read_pool is None:
                _read_pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="kinship-read")
    return _read_pool


@contextmanager
def _validated_file(info: TensorInfo, begin: int, label: str) -> Iterator[int]:
    """`info.file` open for reading, closed on exit; CHECKPOINT_CHANGED when it cannot be opened or is
    now too short to hold the tensor where the validated header placed it."""
    try:
        fd = os.open(info.file, os.O_RDONLY)
    except OSError:
        raise changed_error(info, label) from None
    try:
        if os.fstat(fd).st_size < begin + info.nbytes:
            raise changed_error(info, label)
        yield fd
    finally:
        os.close(fd)


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


def changed_error(info: TensorInfo, label: str) -> FailedPrecondition:
    """CHECKPOINT_CHANGED: the file no longer holds tensor `info` where its validated header said."""
    return FailedPrecondition(
        f"{info.file.name} of {label} ended inside tensor {info.name} (or is gone): the file was truncated or "
        "rewritten while it was read; retry once the file is completely written",
        reason="CHECKPOINT_CHANGED",
    )


def _read_exactly(fd: int, view: memoryview, offset: int, info: TensorInfo, label: str) -> None:
    """Fill `view` from file offset `offset`; a short read (the file shrank) is CHECKPOINT_CHANGED."""
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise FailedPrecondition(
                f"{info.file.name} of {label} cannot be read ({exc.strerror or exc}); check the disk and the file",
                reason="CHECKPOINT_UNREADABLE",
            ) from None
        if got <= 0:
            raise changed_error(info, label)
        done += got


def read_into(fd: int, out: torch.Tensor, offset: int, info: TensorInfo, label: str) -> None:
    """Fill contiguous CPU tensor `out` with the file's bytes from `offset`, in parallel pieces when large."""
    view = out.reshape(-1).view(torch.uint8).numpy().data if out.numel() else memoryview(b"")
    size = len(view)
    if size <= READ_PIECE_BYTES:
        _read_exactly(fd, view, offset, info, label)
        return
    bounds = list(range(0, size, READ_PIECE_BYTES)) + [size]
    futures = [_pool().submit(_read_exactly, fd, view[a:b], offset + a, info, label) for a, b in zip(bounds[1:-1], bounds[2:], strict=True)]
    try:
        _read_exactly(fd, view[: bounds[1]], offset, info, label)
    finally:
        for future in futures:
            future.exception()  # wait for every piece before `out` is reused or raised past
    for future in futures:
        future.result()


@dataclass(frozen=True)
class OpenTensor:
    """A tensor's elements as one byte range of an open file: `elements` items of `dtype` from byte `begin` of `fd`."""

    fd: int
    begin: int
    elements: int
    dtype: torch.dtype
    itemsize: int
    info: TensorInfo
    label: str

    def prefetch(self, start: int, count: int) -> None:
        """Ask the kernel to read elements [start, start + count) ahead (cold files are then read in large sequential pieces)."""
        if count > 0 and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, self.begin + start * self.itemsize, count * self.itemsize, os.POSIX_FADV_WILLNEED)

    def read_failed(self, offset: int, short: bool) -> FailedPrecondition:
        """The error of a read of this tensor at file `offset` that ended early (`short`) or failed.

        A failure is read again here, to name the OS's reason; should it succeed now, the error
        still says the read failed once.
        """
        if short:
            return changed_error(self.info, self.label)
        probe = bytearray(min(4096, max(1, self.begin + self.elements * self.itemsize - offset)))
        try:
            _read_exactly(self.fd, memoryview(probe), offset, self.info, self.label)
        except FailedPrecondition as exc:
            return exc
        return FailedPrecondition(
            f"{self.info.file.name} of {self.label} could not be read at byte {offset}; check the disk and the file",
            reason="CHECKPOINT_UNREADABLE",
        )


def chunk_elements(shape: tuple[int, ...], max_elements: int) -> int:
    """Elements per chunk of a tensor of `shape` read along dimension 0: whole rows, at most `max_elements` (at least one row)."""
    row = max(1, math.prod(shape[1:])) if shape else 1
    return max(1, max_elements // row) * row


class CheckpointReader:
    """Streams one checkpoint's tensors, laid out as `safetensors_header` read and validated them."""

    def __init__(self, checkpoint: Checkpoint, stats: ReadStats | None = None, tensors: dict[str, TensorInfo] | None = None) -> None:
        """`tensors`: the checkpoint's validated header entries when the caller has them (e.g.
        `CheckpointIdentity.headers`), so the plan and the reads share one reading of the headers."""
        self.checkpoint = checkpoint
        self.stats = stats if stats is not None else ReadStats()
        self._infos = tensors
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's header entry, by name (validated headers, read once per file state)."""
        if self._infos is None:
            self._infos = read_checkpoint_headers(self.checkpoint).tensors
        return self._infos

    def _buffer(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """The reader's reusable buffer of `dtype`, at least `numel` elements (grown, never shrunk)."""
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(dtype, None)  # free the old one before allocating its successor
            buf = self._buffers[dtype] = torch.empty(max(numel, 1), dtype=dtype)
        return buf[:numel]

    def _begin(self, info: TensorInfo) -> int:
        if info.begin >= 0:
            return info.begin
        # An entry without its offset (built by hand): ask the header reader (memoised on the file's state).
        return read_header(info.file, self.checkpoint.label).tensors[info.name].begin

    @contextmanager
    def open_tensor(self, name: str, shape: tuple[int, ...] | None = None) -> Iterator[OpenTensor | None]:
        """Tensor `name` (or its leading slice of `shape`) as an open file and byte range, closed on exit.

        None when those elements are not one byte range (trailing dimensions sliced) or the dtype
        cannot be read: use `read_chunks` then. Raises CHECKPOINT_CHANGED when the file no longer
        holds the tensor where the validated header placed it. Count what is read with `count`.
        """
        info = self.tensors()[name]
        target = tuple(info.shape) if shape is None else tuple(shape)
        if info.dtype not in DTYPES or tuple(target[1:]) != tuple(info.shape[1:]):
            yield None
            return
        label = self.checkpoint.label
        begin = self._begin(info)
        with _validated_file(info, begin, label) as fd:
            yield OpenTensor(fd, begin, math.prod(target), DTYPES[info.dtype], ITEMSIZE[info.dtype], info, label)

    def count(self, tensor: OpenTensor, elements: int, first_chunk: bool) -> None:
        """Count `elements` of `tensor` as read (by whoever read them from `open_tensor`'s file)."""
        self.stats.add(tensor.info.file, tensor.info.name, elements * tensor.itemsize, first_chunk)

    def read_chunks(
        self, name: str, *, max_elements: int, shape: tuple[int, ...] | None = None
    ) -> Generator[torch.Tensor, None, None]:
        """Yield tensor `name` (or its leading slice of `shape`) in chunks along dimension 0.

        Each chunk holds at most `max_elements` elements (at least one row) in the stored
        dtype, shaped (rows, *trailing dims). It lives in a buffer this reader reuses for the
        next chunk, so copy what you keep. Raises CHECKPOINT_CHANGED when the file no longer
        holds the tensor where the validated header placed it.
        """
        info = self.tensors()[name]
        target = tuple(info.shape) if shape is None else tuple(shape)
        if info.dtype not in DTYPES:
            raise FailedPrecondition(
                f"tensor {name} of {self.checkpoint.label} has dtype {info.dtype}, which this server cannot read",
                reason="UNSUPPORTED_DTYPE",
            )
        dtype, itemsize, label = DTYPES[info.dtype], ITEMSIZE[info.dtype], self.checkpoint.label
        begin = self._begin(info)
        with _validated_file(info, begin, label) as fd:
            if len(target) == 0:
                out = self._buffer(dtype, 1)
                read_into(fd, out, begin, info, label)
                self.stats.add(info.file, name, itemsize, True)
                yield out.reshape(())
                return
            stored_row = math.prod(info.shape[1:])
            row_elements = max(1, math.prod(target[1:]))
            rows = max(1, max_elements // row_elements)
            contiguous = tuple(target[1:]) == tuple(info.shape[1:])
            if target[0] == 0:
                self.stats.add(info.file, name, 0, True)
            for start in range(0, target[0], rows):
                stop = min(start + rows, target[0])
                offset = begin + start * stored_row * itemsize
                if contiguous:
                    chunk = self._buffer(dtype, (stop - start) * row_elements).view(stop - start, *target[1:])
                    read_into(fd, chunk, offset, info, label)
                else:
                    # Trailing dimensions sliced: read whole stored rows, keep their leading corner.
                    whole = torch.empty((stop - start, *info.shape[1:]), dtype=dtype)
                    read_into(fd, whole, offset, info, label)
                    index = (slice(None), *(slice(0, d) for d in target[1:]))
                    corner = whole[index]
                    chunk = self._buffer(dtype, corner.numel()).view(corner.shape)
                    chunk.copy_(corner)
                    del whole, corner
                self.stats.add(info.file, name, chunk.numel() * itemsize, start == 0)
                yield chunk
