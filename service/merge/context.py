"""What a merge method's per-tensor kernel may use of the runner: its sources, buffers, workers and output.

`MergeRunner` implements this protocol; a method (`methods.MergeMethod.merge_tensor`) is written
against it only, so methods never reach into the runner's internals and the runner has no
method-specific branch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from kinship_service.merge.inputs import TensorSource
    from kinship_service.merge.plan import MergeSettings, PlannedTensor
    from kinship_service.merge.safetensors_writer import SafetensorsWriter

T = TypeVar("T")

Span = tuple[int, int]
"""A range [start, stop) of a tensor's flat elements."""


class MergeContext(Protocol):
    """The runner, as a method's per-tensor kernel sees it."""

    @property
    def settings(self) -> MergeSettings:
        """The merge's settings (dtypes, mergekit's compute cast, parameters)."""
        ...

    @property
    def use_cpu_kernel(self) -> bool:
        """Whether fused numba kernels may be used where they support the dtypes."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the math runs: `cpu`, or a CUDA device (ranges are read and written on the host either way)."""
        ...

    @property
    def chunk(self) -> int:
        """Elements per range (a multiple of 256, cache-sized)."""
        ...

    def check_cancelled(self) -> None:
        """Raise Cancelled when the job was cancelled or the server stops."""
        ...

    def sources(self, name: str) -> list[TensorSource]:
        """Where tensor `name` lives in each input model, in model order (A, B, ...)."""
        ...

    def buffer(self, key: str, dtype: torch.dtype, numel: int, *, on_device: bool = False) -> torch.Tensor:
        """A reusable buffer of the calling thread's own, of `numel` elements; on the merge's device with `on_device`."""
        ...

    def to_device(self, chunk: torch.Tensor, key: str) -> torch.Tensor:
        """A host chunk (from `read_range`) on the merge's device, in a reusable buffer called `key` (itself on CPU)."""
        ...

    def to_host(self, result: torch.Tensor, key: str) -> torch.Tensor:
        """A device result, complete, in the host buffer called `key`, for `write` (itself on CPU)."""
        ...

    def read_range(self, source: TensorSource, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of a tensor in its stored dtype, in a reusable buffer of this thread."""
        ...

    def chunks(self, source: TensorSource, key: str, shape: tuple[int, ...], sliced: bool) -> Iterator[torch.Tensor]:
        """Flat chunks of a tensor (or its leading slice of `shape`) in its stored dtype; each valid until the next."""
        ...

    def map(self, fn: Callable[[Span], T], ranges: list[Span]) -> list[T]:
        """Run `fn` over ranges on the worker threads; results in range order, the first error raised."""
        ...

    def write(self, writer: SafetensorsWriter, offset: int, chunk: torch.Tensor, sink: torch.Tensor | None, element: int) -> None:
        """Write an output chunk at byte `offset` of the file's data and mirror it into the observer's tensor."""
        ...

    def sink(self, tensor: PlannedTensor) -> torch.Tensor | None:
        """A whole-tensor buffer for the tensor observer, or None when nobody observes."""
        ...

    def observe(self, tensor: PlannedTensor, sink: torch.Tensor | None) -> None:
        """Mark `tensor` done: hand it to the observer and report progress."""
        ...

    def tally(self, outcome: str) -> None:
        """Count a per-tensor outcome the model card reports (slerp: `linear` or `slerp`)."""
        ...


TensorMerge = Callable[[MergeContext, "SafetensorsWriter", int, "PlannedTensor"], None]
"""A method's per-tensor kernel: `(context, writer, byte offset of the tensor in the file's data, tensor)`."""
