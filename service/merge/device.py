"""Moving merge ranges between the host and a CUDA device: pinned buffers, asynchronous copies, one stream per merge.

The runner reads every range on the CPU (`os.preadv` into its buffers) and writes every output
range from the CPU; on CUDA the methods' torch code runs on the device in between. Host buffers
are then pinned, so `non_blocking` copies are truly asynchronous, and every piece of a merge's
device work (on all its worker threads) goes to one CUDA stream of its own: stream order alone
keeps the reused device buffers safe, and the server's other device work (exact passes) is not
serialised behind it. Two host-side hazards remain, both handled here:

- an upload reads its pinned source after `copy_` returns: before a thread reads the next range
  into that buffer it waits for its last upload (`before_host_write`), so the read of range i+1
  overlaps the math of range i;
- a download lands after `copy_` returns: `download` waits for it before the writer sees the bytes.

Waits block the thread (`blocking` events) instead of spinning a core, and release the GIL.

On CPU every operation is the identity or a plain allocation: the code path the methods run is the
same on both devices.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


class DeviceTransfers:
    """Host buffers, uploads and downloads of one merge on `device` (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._stream: Any = None
        self._local = threading.local()

    def empty(self, numel: int, dtype: torch.dtype, on_device: bool) -> torch.Tensor:
        """A new flat buffer: on the device, or on the host (pinned when the device is CUDA)."""
        if on_device:
            return torch.empty(numel, dtype=dtype, device=self.device)
        return torch.empty(numel, dtype=dtype, pin_memory=self.cuda)

    @contextmanager
    def stream(self) -> Iterator[None]:
        """The merge's CUDA stream as the calling thread's current stream (nothing on CPU)."""
        if not self.cuda:
            yield
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        with torch.cuda.stream(self._stream):
            yield

    def on_stream(self, fn: Callable[[T], R]) -> Callable[[T], R]:
        """`fn` running its device work on the merge's stream (for the worker threads; `fn` itself on CPU)."""
        if not self.cuda:
            return fn

        def wrapped(argument: T) -> R:
            with self.stream():
                return fn(argument)

        return wrapped

    def upload(self, chunk: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Copy a host chunk into the device buffer `target` (same dtype and size) without waiting.

        Only a pinned chunk is copied asynchronously; a pageable one (a reader's own buffer, a cut
        slice) is copied before this returns, so its owner may reuse it at once."""
        target.copy_(chunk, non_blocking=chunk.is_pinned())
        event = getattr(self._local, "uploaded", None)
        if event is None:
            event = self._local.uploaded = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
        event.record()  # on the current (the merge's) stream, after the copy
        return target

    def before_host_write(self) -> None:
        """Wait until this thread's last upload has read its pinned source (nothing on CPU or when none is pending)."""
        if self.cuda:
            event = getattr(self._local, "uploaded", None)
            if event is not None:
                event.synchronize()

    def release(self) -> None:
        """Hand the merge's freed device buffers back to the driver (other processes may need the memory)."""
        if self.cuda:
            torch.cuda.empty_cache()

    def download(self, result: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Copy a device result into the host buffer `target` (same dtype and size) and wait for it."""
        target.copy_(result, non_blocking=True)
        done = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
        done.record()
        done.synchronize()
        return target
