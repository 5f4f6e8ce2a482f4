"""Run a merge plan to disk: tensor by tensor, range by range, into a temporary directory renamed into place.

Memory stays bounded by a few cache-sized chunk buffers per worker, whatever the model size:
each output chunk goes straight to its place in its shard file (`pwrite`); no tensor, shard or
model is ever held. Tensors made from the models go to the method's per-tensor kernel
(`methods`), which uses this runner through `context.MergeContext`; copies and identity-checked
tensors are done here. A failed, cancelled or killed merge never leaves a directory that looks
finished (`output`).

On a CUDA device (`KINSHIP_DEVICE`) ranges are still read on the CPU, into pinned buffers, moved
with `non_blocking` copies and merged by the methods' torch code on the device; results come back
into pinned buffers for the writer (`device`). The workers share one CUDA stream, so one worker's
read or write overlaps another's math on the device.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from kinship_service.checkpoints.dtypes import DTYPES, ITEMSIZE
from kinship_service.checkpoints.safetensors_header import SafetensorsHeader, read_header
from kinship_service.checkpoints.sources import INDEX_FILE, Checkpoint
from kinship_service.checkpoints.streaming import CheckpointReader
from kinship_service.errors import AlreadyExists, FailedPrecondition
from kinship_service.merge.context import Span
from kinship_service.merge.device import DeviceTransfers
from kinship_service.merge.inputs import TensorSource
from kinship_service.merge.methods import MergeMethod, get_method
from kinship_service.merge.model_card import ModelCard
from kinship_service.merge.output import fsync_dir, publish, remove_tree, write_json_file
from kinship_service.merge.plan import (
    KIND_EQUAL,
    KIND_MERGE,
    MergePlan,
    MergeSettings,
    PlannedTensor,
    plan_merge,
    read_config,
)
from kinship_service.merge.safetensors_writer import HeaderEntry, SafetensorsWriter, tensor_bytes
from kinship_service.merge.side_files import write_side_files
from kinship_service.merge.torch_threads import TorchThreads, pin_one_torch_thread

T = TypeVar("T")

ROW_ALIGN = 256
"""Ranges start at multiples of this many elements (the reductions' float32 row length)."""
DEVICE_RANGE_FACTOR = 8
"""On CUDA a range holds this many times `chunk_elements` (2M elements at the server's 256K): each
range costs a few kernel launches and synchronisations per input, which dominate small ranges.
Device memory stays bounded whatever the model size: a worker holds its float32 stack, the stored
copies and the method's temporaries, about 50 bytes per range element for a base and 3 models
(100 MiB), so 200-300 MiB for the two workers."""

ProgressFn = Callable[["Progress"], None]
TensorObserver = Callable[[str, torch.Tensor], None]


@dataclass(frozen=True)
class Progress:
    """How far a merge is, in tensors and output bytes."""

    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class MergeSummary:
    """What a finished merge produced."""

    output_dir: Path
    files: list[str]
    tensors: int
    bytes_written: int
    linear_tensors: int
    """Tensors that took the colinear (linear interpolation) fallback."""
    slerp_tensors: int
    seconds: float
    device: str = "cpu"
    """Where the math ran (`cpu`, `cuda:0`)."""


class MergeRunner:
    """Executes a MergePlan into a temporary directory and renames it into place.

    A merged tensor is cut into ranges of `chunk_elements`; `threads` workers (each doing its torch
    math single-threaded, so no OpenMP barrier waits on a busy machine) read, reduce, interpolate
    and `pwrite` their ranges at their final offsets, so reading, math and writing of different
    ranges overlap. Implements `context.MergeContext` for the method's per-tensor kernel.
    """

    def __init__(
        self,
        checkpoint_a: Checkpoint,
        checkpoint_b: Checkpoint,
        settings: MergeSettings,
        *,
        chunk_elements: int = 1 << 18,
        allowed_roots: Sequence[Path] = (),
        progress: ProgressFn | None = None,
        check_cancelled: Callable[[], None] | None = None,
        on_tensor: TensorObserver | None = None,
        threads: int = 2,
        use_cpu_kernel: bool = True,
        more_checkpoints: Sequence[Checkpoint] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        """`threads`: math workers. `chunk_elements`: elements per range (cache-sized works best).
        `on_tensor(name, tensor)` sees every output tensor, whole, in the output dtype.
        `use_cpu_kernel` (Settings.cpu_kernel): SLERP chunks go through the fused numba kernels of
        `slerp_kernel` when numba is available and the dtypes have one; else torch.
        `more_checkpoints`: inputs after A and B for methods of more models; the inputs are in the
        method's order (`methods`: the base first for task-vector methods), and the first one's
        config.json and side files go with the output. `device`: where the math runs (`cpu`, or a
        CUDA device: the methods' torch path there, numba kernels off)."""
        self.a = checkpoint_a
        self.b = checkpoint_b
        self.checkpoints = [checkpoint_a, checkpoint_b, *more_checkpoints]
        self.settings = settings
        self.method: MergeMethod = get_method(settings.method)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # `cuda`: the current device, named
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.transfers = DeviceTransfers(self.device)
        factor = DEVICE_RANGE_FACTOR if self.device.type == "cuda" else 1
        self.chunk = max(ROW_ALIGN, chunk_elements // ROW_ALIGN * ROW_ALIGN) * factor
        self.allowed_roots = tuple(allowed_roots)
        self.progress = progress
        self._check_cancelled = check_cancelled or (lambda: None)
        self.on_tensor = on_tensor
        self.threads = max(1, threads)
        self.use_cpu_kernel = use_cpu_kernel and self.device.type == "cpu"  # numba kernels are CPU-only
        self.readers = [CheckpointReader(c) for c in self.checkpoints]
        self.reader_a, self.reader_b = self.readers[0], self.readers[1]
        self._headers: dict[Path, SafetensorsHeader] = {}
        self._fds: dict[Path, int] = {}
        self._buffers: dict[tuple[str, torch.dtype, bool], torch.Tensor] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.outcomes: Counter[str] = Counter()
        """Per-tensor outcomes the method tallied (slerp: `linear`, `slerp`)."""
        self._tensors_done = 0
        self._bytes_done = 0
        self._plan: MergePlan | None = None

    @property
    def linear(self) -> int:
        """Tensors that took SLERP's colinear (linear interpolation) fallback so far."""
        return self.outcomes["linear"]

    @property
    def slerped(self) -> int:
        """Tensors interpolated spherically so far."""
        return self.outcomes["slerp"]

    # -- planning ------------------------------------------------------------------------------
    def plan(self) -> MergePlan:
        """Read both checkpoints' headers and plan the merge (raises on any incompatibility)."""
        if self._plan is None:
            infos = [reader.tensors() for reader in self.readers]
            self._plan = plan_merge(infos[0], infos[1], self.settings, read_config(self.a), infos[2:])
        return self._plan

    # -- the MergeContext a method's kernel uses ------------------------------------------------
    def check_cancelled(self) -> None:
        """Raise Cancelled when the job was cancelled or the server stops."""
        self._check_cancelled()

    def tally(self, outcome: str) -> None:
        """Count a per-tensor outcome (called by the method's kernel from the driving thread)."""
        self.outcomes[outcome] += 1

    def buffer(self, key: str, dtype: torch.dtype, numel: int, *, on_device: bool = False) -> torch.Tensor:
        """A reusable buffer of the calling thread's own (main thread: the shared held buffers).

        `on_device`: on the merge's device (the same buffer as the host one on CPU); host buffers
        are pinned when the device is CUDA, so copies to and from it can be asynchronous."""
        device_side = on_device and self.device.type != "cpu"
        buffers = self._buffers if threading.current_thread() is threading.main_thread() else self._thread_buffers()
        buf = buffers.get((key, dtype, device_side))
        if buf is None or buf.numel() < numel:
            buf = self.transfers.empty(max(numel, 1), dtype, device_side)
            buffers[(key, dtype, device_side)] = buf
        return buf[:numel]

    def to_device(self, chunk: torch.Tensor, key: str) -> torch.Tensor:
        """A host chunk (from `read_range`) on the merge's device: itself on CPU, else an asynchronous copy."""
        if self.device.type == "cpu":
            return chunk
        return self.transfers.upload(chunk, self.buffer(key, chunk.dtype, chunk.numel(), on_device=True))

    def to_host(self, result: torch.Tensor, key: str) -> torch.Tensor:
        """A device result in a host buffer, complete, for the writer: itself on CPU."""
        if self.device.type == "cpu":
            return result
        return self.transfers.download(result, self.buffer(key, result.dtype, result.numel()))

    def _thread_buffers(self) -> dict[tuple[str, torch.dtype, bool], torch.Tensor]:
        buffers: dict[tuple[str, torch.dtype, bool], torch.Tensor] | None = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        return buffers

    def sources(self, name: str) -> list[TensorSource]:
        """Where tensor `name` lives in each input, in input order (A, B, ...)."""
        return [self._source(reader, name) for reader in self.readers]

    def _source(self, reader: CheckpointReader, name: str) -> TensorSource:
        info = reader.tensors()[name]
        header = self._headers.get(info.file)
        if header is None:
            header = self._headers[info.file] = read_header(info.file, reader.checkpoint.label)
            self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        if header.tensors.get(name) != info:
            raise FailedPrecondition(f"tensor {name} changed in {info.file.name}; was the file rewritten?", reason="CHECKPOINT_CHANGED")
        return TensorSource(reader, info, header, self._fds[info.file])

    def read_range(self, source: TensorSource, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of a tensor in its stored dtype, in a reusable buffer of this thread."""
        dtype = DTYPES[source.info.dtype]
        itemsize = ITEMSIZE[source.info.dtype]
        count = stop - start
        buf = self.buffer(key, dtype, max(count, 1))[:count]
        self.transfers.before_host_write()  # an earlier asynchronous upload may still read this buffer
        nbytes = count * itemsize
        view = tensor_bytes(buf)
        offset = source.byte_range()[0] + start * itemsize
        done = 0
        while done < nbytes:
            got = os.preadv(source.fd, [view[done:]], offset + done)
            if got <= 0:
                raise FailedPrecondition(
                    f"{source.info.file.name} of {source.reader.checkpoint.label} ended inside tensor "
                    f"{source.info.name}; the file was truncated or rewritten during the merge",
                    reason="CHECKPOINT_CHANGED",
                )
            done += got
        source.reader.stats.add(source.info.file, source.info.name, nbytes, start == 0)
        return buf

    def chunks(self, source: TensorSource, key: str, shape: tuple[int, ...], sliced: bool) -> Iterator[torch.Tensor]:
        """Flat chunks of a tensor (or its leading slice of `shape`) in its stored dtype; each valid until the next."""
        if sliced:
            for chunk in source.reader.read_chunks(source.info.name, max_elements=self.chunk, shape=shape):
                yield chunk.reshape(-1)
            return
        numel = source.info.numel
        for start in range(0, max(numel, 1), self.chunk):
            yield self.read_range(source, key, start, min(start + self.chunk, numel))

    def write(self, writer: SafetensorsWriter, offset: int, chunk: torch.Tensor, sink: torch.Tensor | None, element: int) -> None:
        """Write an output chunk at byte `offset` of the file's data and mirror it into the observer's tensor."""
        writer.write_at(offset, tensor_bytes(chunk))
        if sink is not None:
            sink.view(-1)[element : element + chunk.numel()].copy_(chunk.reshape(-1))
        with self._lock:
            self._bytes_done += chunk.numel() * chunk.element_size()

    def sink(self, tensor: PlannedTensor) -> torch.Tensor | None:
        """A whole-tensor buffer for `on_tensor`, or None when nobody observes."""
        return torch.empty(tensor.shape, dtype=DTYPES[tensor.dtype]) if self.on_tensor is not None else None

    def map(self, fn: Callable[[Span], T], ranges: list[Span]) -> list[T]:
        """Run `fn` over ranges on the worker threads; results in range order, the first error raised."""
        assert self._pool is not None
        if len(ranges) == 1:
            return [fn(ranges[0])]
        return list(self._pool.map(self.transfers.on_stream(fn), ranges))

    def observe(self, tensor: PlannedTensor, sink: torch.Tensor | None) -> None:
        """Mark `tensor` done: hand it to `on_tensor` and report progress."""
        self._tensors_done += 1
        if sink is not None and self.on_tensor is not None:
            self.on_tensor(tensor.name, sink)
        self._report()

    def _report(self) -> None:
        if self.progress is not None and self._plan is not None:
            self.progress(Progress(self._tensors_done, len(self._plan.tensors), self._bytes_done, self._plan.total_bytes))

    # -- tensors that do not depend on the method ----------------------------------------------
    def _copy(self, writer: SafetensorsWriter, base: int, tensor: PlannedTensor, reader: CheckpointReader) -> None:
        source = self._source(reader, tensor.name)
        out_dtype = DTYPES[tensor.dtype]
        sink = self.sink(tensor)
        element = 0
        for chunk in self.chunks(source, "a", tensor.shape, False):
            self.check_cancelled()
            if source.info.dtype != tensor.dtype:
                chunk = chunk.to(out_dtype)
            self.write(writer, base + element * ITEMSIZE[tensor.dtype], chunk, sink, element)
            element += chunk.numel()
        self.observe(tensor, sink)

    def _equal(self, writer: SafetensorsWriter, base: int, tensor: PlannedTensor) -> None:
        sources = self.sources(tensor.name)
        sink = self.sink(tensor)
        element = 0
        streams = [self.chunks(source, f"in{i}", tensor.shape, False) for i, source in enumerate(sources)]
        for chunks in zip(*streams, strict=False):
            self.check_cancelled()
            if not all(torch.equal(chunks[0], other) for other in chunks[1:]):
                between = "model A and model B" if len(sources) == 2 else "the inputs"
                raise FailedPrecondition(
                    f"non-floating tensor {tensor.name} differs between {between}; it can only be copied when identical",
                    reason="NON_FLOATING_MISMATCH",
                )
            self.write(writer, base + element * ITEMSIZE[tensor.dtype], chunks[0], sink, element)
            element += chunks[0].numel()
        self.observe(tensor, sink)

    # -- the whole run -------------------------------------------------------------------------
    def run(self, tmp_dir: Path, final_dir: Path, *, overwrite: bool, card: ModelCard) -> MergeSummary:
        """Write everything into `tmp_dir` (created here), then rename it to `final_dir`.

        On any failure or cancellation `tmp_dir` is removed and `final_dir` is untouched.
        """
        started = time.monotonic()
        plan = self.plan()
        if final_dir.exists() and not overwrite:
            raise AlreadyExists(f"{final_dir} already exists; set overwrite to replace it", reason="OUTPUT_EXISTS", field="output_path")
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir.mkdir()
        threads = TorchThreads(1).__enter__()
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="merge-math", initializer=pin_one_torch_thread)
        try:
            self._report()
            with self.transfers.stream():
                files = self._write_weights(tmp_dir, plan)
            files += write_side_files(tmp_dir, self.a, self.allowed_roots, plan, card.render(plan, self.linear, self.slerped))
            fsync_dir(tmp_dir)
            self.check_cancelled()
            publish(tmp_dir, final_dir, overwrite)
        except BaseException:
            self._pool.shutdown(wait=True, cancel_futures=True)  # no worker may still write into tmp_dir
            remove_tree(tmp_dir)
            raise
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            threads.__exit__()
            self.close()
        return MergeSummary(
            final_dir,
            sorted(files),
            len(plan.tensors),
            self._bytes_done,
            self.linear,
            self.slerped,
            time.monotonic() - started,
            str(self.device),
        )

    def close(self) -> None:
        """Close the input files and drop the buffers (run() does it; safe to call again)."""
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._buffers.clear()
        self._local = threading.local()
        self.transfers.release()

    def _write_weights(self, tmp_dir: Path, plan: MergePlan) -> list[str]:
        assert self._pool is not None
        names = plan.shard_names()
        weight_map: dict[str, str] = {}
        writers: list[SafetensorsWriter] = []
        finishing: list[Future[None]] = []
        try:
            for file_name, shard in zip(names, plan.shards, strict=False):
                entries = [HeaderEntry(t.name, t.dtype, t.shape) for t in shard]
                writer = SafetensorsWriter(tmp_dir / file_name, entries, {"format": "pt"})
                writers.append(writer)
                base = 0
                for tensor in shard:
                    self.check_cancelled()
                    if tensor.kind == KIND_MERGE:
                        self.method.merge_tensor(self, writer, base, tensor)
                    elif tensor.kind == KIND_EQUAL:
                        self._equal(writer, base, tensor)
                    else:
                        self._copy(writer, base, tensor, self.readers[tensor.source])
                    weight_map[tensor.name] = file_name
                    base += tensor.nbytes
                finishing.append(self._pool.submit(writer.finish))  # fsync while the next shard is computed
            for future in finishing:
                future.result()
        except BaseException:
            for future in finishing:
                future.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            for writer in writers:
                writer.abort()
            raise
        if len(names) > 1:
            index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            write_json_file(tmp_dir / INDEX_FILE, index)
            names = names + [INDEX_FILE]
        return names
