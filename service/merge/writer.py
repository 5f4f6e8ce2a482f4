"""Stream a SLERP merge of two checkpoints to disk: tensor by tensor, chunk by chunk, never half-written.

Memory stays bounded by a few cache-sized chunk buffers per worker, whatever the model size:
each tensor is read in chunks twice (once for the norms and the dot product, once to
interpolate; a tensor that fits one chunk is read once), which measured twice as fast as
keeping whole converted tensors between the passes, since everything stays in the CPU cache and
the second read comes from the page cache. Each output chunk goes straight to its place in its
shard file (`pwrite`): no tensor, shard or model is ever held. Ranges of a tensor are processed
by a few worker threads, each doing its torch math single-threaded; with numba (Settings.cpu_kernel)
`slerp_kernel`'s fused kernels do that math instead, reading the stored chunks directly (one pass
for the reductions, one writing the output dtype; bit-identical interpolation).

We write the safetensors format ourselves (8-byte little-endian header length, a JSON header with
dtype, shape and data_offsets, then the raw bytes) instead of calling `safetensors.torch.save_file`:
that function takes a dict of every tensor of the file in memory, which for a 5 GB shard is exactly
what this module must avoid. The header is computed up front from the plan, so the bytes can follow
as they are produced. The result is read back by `safetensors.safe_open` in the tests.

Tensor bytes are read with `os.preadv` at the offsets of the safetensors header (parsed once per
file; `CheckpointReader` validated the files first): one copy from the page cache into a reusable
chunk buffer, no memory map to pin pages in our RSS or to SIGBUS when a file shrinks under us.

Everything goes into a temporary directory next to the output, each file fsynced, then the
directory is fsynced and renamed into place: a failed, cancelled or killed merge never leaves a
directory that looks finished.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kinship_service import __version__
from kinship_service.checkpoints.safetensors_header import read_header
from kinship_service.checkpoints.sources import INDEX_FILE, SINGLE_FILE, Checkpoint
from kinship_service.checkpoints.streaming import DTYPES, FLOATING, ITEMSIZE, CheckpointReader, TensorInfo
from kinship_service.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument, PermissionDenied
from kinship_service.kinship.similarity import layer_index
from kinship_service.merge import slerp_kernel
from kinship_service.merge.slerp import (
    Coefficients,
    InterpolationSpec,
    SlerpStats,
    describe_spec,
    resolve_t,
    working_dtype,
)

if sys.byteorder != "little":  # safetensors is little-endian; we write raw memory
    raise ImportError("merge_writer needs a little-endian machine")

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
TMP_PREFIX = ".kinship-tmp-"
TRASH_PREFIX = ".kinship-trash-"
DTYPE_CONFIG_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
# Files copied from model A besides the weights: tokenizer and generation settings.
COPIED_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "*.tiktoken",
    "chat_template*",
    "generation_config.json",
    "preprocessor_config.json",
)
_PRE_LAYER = re.compile(r"embed|wte|wpe|tok_embeddings|word_embeddings")

ProgressFn = Callable[["Progress"], None]
TensorObserver = Callable[[str, torch.Tensor], None]


# --------------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------------


def resolve_output_dir(output_root: Path, output_path: str) -> Path:
    """The absolute output directory for a request's `output_path`, confined to the output root.

    Relative paths are taken under the root; an absolute path is accepted only when it lies under
    the root. Symlinks are resolved first, so none can lead outside. The root itself is refused.
    """
    if not output_path:
        raise InvalidArgument("output_path is required: a directory name under the server's output root", field="output_path")
    if "\x00" in output_path:
        raise InvalidArgument("output_path contains a NUL byte", field="output_path")
    if len(os.fsencode(output_path)) > 4000 or any(len(os.fsencode(p)) > 255 for p in Path(output_path).parts):
        raise InvalidArgument(
            "output_path is too long: use directory names of at most 255 bytes and a path of at most 4000 bytes",
            reason="PATH_TOO_LONG",
            field="output_path",
        )
    root = Path(os.path.realpath(output_root))
    target = Path(os.path.realpath(root / os.path.expanduser(output_path)))
    if target == root or not target.is_relative_to(root):
        raise PermissionDenied(
            f"output_path {output_path!r} leaves the output root; give a directory name under it "
            f"(KINSHIP_OUTPUT_ROOT={output_root})",
            field="output_path",
        )
    if any(part.startswith((TMP_PREFIX, TRASH_PREFIX)) for part in target.relative_to(root).parts):
        raise InvalidArgument(f"output_path may not use the reserved prefixes {TMP_PREFIX} or {TRASH_PREFIX}", field="output_path")
    return target


def temp_dir_for(final_dir: Path, job_id: str) -> Path:
    """Where a job writes before the rename: a hidden sibling of the output (same file system)."""
    return final_dir.parent / f"{TMP_PREFIX}{job_id}"


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists (best effort for cleanup)."""
    shutil.rmtree(path, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# The safetensors format
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


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
    """Writes one safetensors file: the header first, then tensor bytes appended in header order
    (`write`) or placed at their offsets from any thread (`write_at`).

    `finish()` checks every declared byte arrived, then flushes and fsyncs; `abort()` closes
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

    def write(self, data: memoryview | bytes) -> None:
        """Append tensor bytes."""
        size = memoryview(data).nbytes
        if self.written + size > self.expected:
            raise Internal(f"{self.path.name}: more tensor bytes than the header declares")
        self._write_all(data)
        self.written += size

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
        if self.written != self.expected:
            raise Internal(f"{self.path.name}: wrote {self.written} of {self.expected} tensor bytes")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous tensor (no copy)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def write_json_file(path: Path, data: object) -> None:
    write_bytes_file(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_bytes_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileOffsets:
    """Data offsets of every tensor of a safetensors file, from its validated header (`safetensors_header`)."""

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        header = read_header(path, label)
        self.data_start = header.data_start
        self.offsets = header.offsets


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

KIND_SLERP = "slerp"
KIND_COPY_A = "copy_a"
KIND_COPY_B = "copy_b"
KIND_EQUAL = "equal"


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor and how it is made."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    """Output dtype (safetensors name)."""
    t: float | None = None
    sliced: bool = False
    """Built from the common leading slice of differently shaped inputs."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class MergeSettings:
    """What to merge and how, as resolved by the job layer."""

    t: InterpolationSpec
    out_dtype: str | None = None
    """Output dtype of floating tensors (safetensors name); None keeps model A's (per tensor)."""
    compute_cast: str | None = None
    """mergekit's `dtype`: round inputs to this dtype before merging (YAML configs only)."""
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    leading_slice: bool = False
    num_layers: int | None = None
    """Layer count for t gradients; None reads config.json, else the tensor names."""


@dataclass
class MergePlan:
    tensors: list[PlannedTensor]
    shards: list[list[PlannedTensor]]
    num_layers: int
    config_dtype: str
    """The dtype named in the output config.json (`torch_dtype`)."""

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def shard_names(self) -> list[str]:
        if len(self.shards) == 1:
            return [SINGLE_FILE]
        n = len(self.shards)
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _order_key(name: str) -> tuple[int, int, str]:
    index = layer_index(name)
    if index is not None:
        return (1, index, name)
    return (0, 0, name) if _PRE_LAYER.search(name) else (2, 0, name)


def read_config(checkpoint: Checkpoint) -> dict[str, object] | None:
    """Model A's config.json, or None when it has none (or it is unreadable)."""
    path = checkpoint.directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def count_layers(names: Sequence[str], config: dict[str, object] | None) -> int:
    """The decoder layer count: config.json's `num_hidden_layers` when consistent, else from the names."""
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    from_names = max(indices) + 1 if indices else 0
    configured = (config or {}).get("num_hidden_layers")
    if isinstance(configured, int) and not isinstance(configured, bool) and configured >= from_names:
        return configured
    return from_names


def plan_merge(
    infos_a: dict[str, TensorInfo], infos_b: dict[str, TensorInfo], settings: MergeSettings, config_a: dict[str, object] | None
) -> MergePlan:
    """Decide every output tensor, its dtype, t and shard; raise before anything is written.

    Floating tensors in both models are SLERPed (shapes must match unless `leading_slice`);
    non-floating ones must be identical and are copied; a tensor in one model only passes through.
    """
    names = sorted(set(infos_a) | set(infos_b), key=_order_key)
    num_layers = settings.num_layers if settings.num_layers is not None else count_layers(names, config_a)
    if settings.num_layers is not None:
        found = count_layers(names, None)
        if found and found != settings.num_layers:
            raise InvalidArgument(
                f"the mergekit layer_range covers {settings.num_layers} layers but the models have {found}; "
                "only full-range slerp merges are supported",
                field="mergekit_yaml",
            )
    planned: list[PlannedTensor] = []
    for name in names:
        a, b = infos_a.get(name), infos_b.get(name)
        if a is not None and b is not None:
            if a.is_floating != b.is_floating:
                raise FailedPrecondition(
                    f"tensor {name} is {a.dtype} in model A but {b.dtype} in model B; they cannot be merged",
                    reason="DTYPE_MISMATCH",
                )
            if not a.is_floating:
                if a.shape != b.shape or a.dtype != b.dtype:
                    raise FailedPrecondition(
                        f"non-floating tensor {name} differs between the models ({a.dtype}{list(a.shape)} vs "
                        f"{b.dtype}{list(b.shape)}); it can only be copied when identical",
                        reason="NON_FLOATING_MISMATCH",
                    )
                planned.append(PlannedTensor(name, KIND_EQUAL, a.shape, a.dtype))
                continue
            for info in (a, b):
                if info.dtype not in DTYPES:
                    raise FailedPrecondition(f"tensor {name} has dtype {info.dtype}, which this server cannot merge", reason="UNSUPPORTED_DTYPE")
            shape, sliced = a.shape, False
            if a.shape != b.shape:
                if not settings.leading_slice or len(a.shape) != len(b.shape):
                    hint = (
                        "; the ranks differ, so no common slice exists"
                        if len(a.shape) != len(b.shape)
                        else "; set shape_mismatch_policy to LEADING_SLICE to merge the common leading slice"
                    )
                    raise FailedPrecondition(
                        f"tensor {name} has shape {list(a.shape)} in model A but {list(b.shape)} in model B{hint}",
                        reason="SHAPE_MISMATCH",
                    )
                shape, sliced = tuple(min(x, y) for x, y in zip(a.shape, b.shape, strict=False)), True
            t = resolve_t(settings.t, name, num_layers)
            planned.append(PlannedTensor(name, KIND_SLERP, shape, settings.out_dtype or a.dtype, t, sliced))
        else:
            info = a if a is not None else b
            assert info is not None
            dtype = settings.out_dtype if (settings.out_dtype and info.is_floating) else info.dtype
            if info.dtype not in DTYPES and dtype != info.dtype:
                raise FailedPrecondition(f"tensor {name} has dtype {info.dtype}, which this server cannot convert", reason="UNSUPPORTED_DTYPE")
            planned.append(PlannedTensor(name, KIND_COPY_A if a is not None else KIND_COPY_B, info.shape, dtype))
    if not planned:
        raise FailedPrecondition("the models hold no tensors", reason="EMPTY_CHECKPOINT")
    limit = settings.max_shard_bytes if settings.max_shard_bytes > 0 else DEFAULT_MAX_SHARD_BYTES
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in planned:
        if shards[-1] and size + tensor.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    floating = [t.dtype for t in planned if t.dtype in FLOATING]
    config_dtype = settings.out_dtype or (max(set(floating), key=floating.count) if floating else "F32")
    return MergePlan(planned, shards, num_layers, config_dtype)


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def _in_fresh_thread(fn: Callable[[], object]) -> object:
    box: list[object] = []
    thread = threading.Thread(target=lambda: box.append(fn()), name="torch-threads")
    thread.start()
    thread.join()
    return box[0] if box else None


class _TorchThreads:
    """Use `n` torch threads in the calling thread only, for the duration of a `with` block.

    With ATen's OpenMP backend the thread count is per OS thread, but `torch.set_num_threads` also
    stores a process-wide default that threads created later adopt; we put that default back from
    a throwaway thread, so the server's other threads are unaffected. With another backend the
    setting is process-wide, so we leave it alone.
    """

    _openmp: bool | None = None

    def __init__(self, n: int) -> None:
        self.n = n
        self._own = 0
        self._global = 0

    @classmethod
    def supported(cls) -> bool:
        if cls._openmp is None:
            cls._openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
        return cls._openmp

    def __enter__(self) -> _TorchThreads:
        if self.n > 0 and self.supported():
            self._own = torch.get_num_threads()  # also runs ATen's lazy per-thread initialisation first
            self._global = int(_in_fresh_thread(torch.get_num_threads))  # type: ignore[arg-type]
            torch.set_num_threads(self.n)
            _in_fresh_thread(lambda: torch.set_num_threads(self._global))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own:
            torch.set_num_threads(self._own)
            _in_fresh_thread(lambda: torch.set_num_threads(self._global))


def _pin_one_torch_thread() -> None:
    """Thread-pool initializer: this worker does its torch math single-threaded (see _TorchThreads)."""
    if _TorchThreads.supported():
        # get_num_threads() first: it runs ATen's lazy per-thread initialisation, which would
        # otherwise reset this thread to the process default at its first parallel op.
        torch.get_num_threads()
        default = int(_in_fresh_thread(torch.get_num_threads))  # type: ignore[arg-type]
        torch.set_num_threads(1)
        _in_fresh_thread(lambda: torch.set_num_threads(default))


@dataclass(frozen=True)
class Progress:
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


@dataclass
class _Source:
    """Where a tensor's bytes live in one checkpoint."""

    reader: CheckpointReader
    info: TensorInfo
    offsets: _FileOffsets
    fd: int

    def byte_range(self) -> tuple[int, int]:
        begin, end = self.offsets.offsets[self.info.name]
        return self.offsets.data_start + begin, self.offsets.data_start + end


class MergeRunner:
    """Executes a MergePlan into a temporary directory and renames it into place.

    A SLERP tensor is cut into ranges of `chunk_elements`; `threads` workers (each doing its torch
    math single-threaded, so no OpenMP barrier waits on a busy machine) read, reduce, interpolate
    and `pwrite` their ranges at their final offsets, so reading, math and writing of different
    ranges overlap. The partial reductions are summed in range order: the output does not depend
    on the thread count or timing.
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
    ) -> None:
        """`threads`: math workers. `chunk_elements`: elements per range (cache-sized works best).
        `on_tensor(name, tensor)` sees every output tensor, whole, in the output dtype.
        `use_cpu_kernel` (Settings.cpu_kernel): SLERP chunks go through the fused numba kernels of
        `slerp_kernel` when numba is available and the dtypes have one; else torch."""
        self.a = checkpoint_a
        self.b = checkpoint_b
        self.settings = settings
        self.chunk = max(ROW_ALIGN, chunk_elements // ROW_ALIGN * ROW_ALIGN)
        self.allowed_roots = tuple(allowed_roots)
        self.progress = progress
        self.check_cancelled = check_cancelled or (lambda: None)
        self.on_tensor = on_tensor
        self.threads = max(1, threads)
        self.use_cpu_kernel = use_cpu_kernel
        self.reader_a = CheckpointReader(checkpoint_a)
        self.reader_b = CheckpointReader(checkpoint_b)
        self._offsets: dict[Path, _FileOffsets] = {}
        self._fds: dict[Path, int] = {}
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.linear = 0
        self.slerped = 0
        self._tensors_done = 0
        self._bytes_done = 0
        self._plan: MergePlan | None = None

    # -- planning ------------------------------------------------------------------------------
    def plan(self) -> MergePlan:
        """Read both checkpoints' headers and plan the merge (raises on any incompatibility)."""
        if self._plan is None:
            self._plan = plan_merge(self.reader_a.tensors(), self.reader_b.tensors(), self.settings, read_config(self.a))
        return self._plan

    # -- buffers and reading -------------------------------------------------------------------
    def _buffer(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A reusable buffer of the calling thread's own (main thread: the shared held buffers)."""
        buffers = self._buffers if threading.current_thread() is threading.main_thread() else self._thread_buffers()
        buf = buffers.get((key, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype)
            buffers[(key, dtype)] = buf
        return buf[:numel]

    def _thread_buffers(self) -> dict[tuple[str, torch.dtype], torch.Tensor]:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        return buffers

    def _source(self, reader: CheckpointReader, name: str) -> _Source:
        info = reader.tensors()[name]
        offsets = self._offsets.get(info.file)
        if offsets is None:
            offsets = self._offsets[info.file] = _FileOffsets(info.file, reader.checkpoint.label)
            self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        if name not in offsets.offsets:
            raise FailedPrecondition(f"tensor {name} vanished from {info.file.name}; was the file rewritten?", reason="CHECKPOINT_CHANGED")
        source = _Source(reader, info, offsets, self._fds[info.file])
        begin, end = source.byte_range()
        if end - begin != info.nbytes:
            raise FailedPrecondition(f"tensor {name} in {info.file.name} has an inconsistent size", reason="CORRUPT_SAFETENSORS")
        return source

    def _read_range(self, source: _Source, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of a tensor in its stored dtype, in a reusable buffer of this thread."""
        dtype = DTYPES[source.info.dtype]
        itemsize = ITEMSIZE[source.info.dtype]
        count = stop - start
        buf = self._buffer(key, dtype, max(count, 1))[:count]
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

    def _chunks(self, source: _Source, key: str, shape: tuple[int, ...], sliced: bool) -> Iterator[torch.Tensor]:
        """Flat chunks of a tensor (or its leading slice of `shape`) in its stored dtype; each valid until the next."""
        if sliced:
            for chunk in source.reader.read_chunks(source.info.name, max_elements=self.chunk, shape=shape):
                yield chunk.reshape(-1)
            return
        numel = source.info.numel
        for start in range(0, max(numel, 1), self.chunk):
            yield self._read_range(source, key, start, min(start + self.chunk, numel))

    # -- writing -------------------------------------------------------------------------------
    def _write(self, writer: SafetensorsWriter, offset: int, chunk: torch.Tensor, sink: torch.Tensor | None, element: int) -> None:
        """Write an output chunk at byte `offset` of the file's data and mirror it into the observer's tensor."""
        writer.write_at(offset, tensor_bytes(chunk))
        if sink is not None:
            sink.view(-1)[element : element + chunk.numel()].copy_(chunk.reshape(-1))
        with self._lock:
            self._bytes_done += chunk.numel() * chunk.element_size()

    def _sink(self, tensor: PlannedTensor) -> torch.Tensor | None:
        return torch.empty(tensor.shape, dtype=DTYPES[tensor.dtype]) if self.on_tensor is not None else None

    def _map(self, fn: Callable[[tuple[int, int]], object], ranges: list[tuple[int, int]]) -> list[object]:
        """Run `fn` over ranges on the worker threads; results in range order, the first error raised."""
        assert self._pool is not None
        if len(ranges) == 1:
            return [fn(ranges[0])]
        return list(self._pool.map(fn, ranges))

    # -- per-tensor work -----------------------------------------------------------------------
    def _copy(self, writer: SafetensorsWriter, base: int, tensor: PlannedTensor, reader: CheckpointReader) -> None:
        source = self._source(reader, tensor.name)
        out_dtype = DTYPES[tensor.dtype]
        sink = self._sink(tensor)
        element = 0
        for chunk in self._chunks(source, "a", tensor.shape, False):
            self.check_cancelled()
            if source.info.dtype != tensor.dtype:
                chunk = chunk.to(out_dtype)
            self._write(writer, base + element * ITEMSIZE[tensor.dtype], chunk, sink, element)
            element += chunk.numel()
        self._observe(tensor, sink)

    def _equal(self, writer: SafetensorsWriter, base: int, tensor: PlannedTensor) -> None:
        source_a = self._source(self.reader_a, tensor.name)
        source_b = self._source(self.reader_b, tensor.name)
        sink = self._sink(tensor)
        element = 0
        for chunk_a, chunk_b in zip(self._chunks(source_a, "a", tensor.shape, False), self._chunks(source_b, "b", tensor.shape, False), strict=False):
            self.check_cancelled()
            if not torch.equal(chunk_a, chunk_b):
                raise FailedPrecondition(
                    f"non-floating tensor {tensor.name} differs between model A and model B; it can only be copied when identical",
                    reason="NON_FLOATING_MISMATCH",
                )
            self._write(writer, base + element * ITEMSIZE[tensor.dtype], chunk_a, sink, element)
            element += chunk_a.numel()
        self._observe(tensor, sink)

    def _load_pair(self, pair: torch.Tensor, chunk_a: torch.Tensor, chunk_b: torch.Tensor) -> None:
        cast = DTYPES[self.settings.compute_cast] if self.settings.compute_cast else None
        for row, chunk in ((0, chunk_a), (1, chunk_b)):
            if cast is not None and chunk.dtype != cast:
                chunk = chunk.to(cast)  # mergekit rounds inputs to `dtype` first
            pair[row].copy_(chunk)

    def _finish_slerp(self, pair: torch.Tensor, coefficients: Coefficients, out: torch.Tensor, intermediate: torch.dtype) -> None:
        """`ca * a + cb * b` of a (2, k) chunk into `out` (clobbers the chunk)."""
        if intermediate not in (pair.dtype, out.dtype):
            # mergekit casts the result to model A's dtype (or its `dtype`) before the output dtype.
            out.copy_(self._combine(pair, coefficients).to(intermediate))
        else:  # the sum is rounded straight into the output dtype: one pass less
            torch.add(pair[0].mul_(coefficients.ca), pair[1], alpha=coefficients.cb, out=out)

    def _count(self, coefficients: Coefficients) -> None:
        if coefficients.linear:
            self.linear += 1
        else:
            self.slerped += 1

    def _slerp(self, writer: SafetensorsWriter, base: int, tensor: PlannedTensor) -> None:
        source_a = self._source(self.reader_a, tensor.name)
        source_b = self._source(self.reader_b, tensor.name)
        work = working_dtype(DTYPES[source_a.info.dtype], DTYPES[source_b.info.dtype])
        if tensor.sliced:
            self._slerp_sliced(writer, base, tensor, source_a, source_b, work)
            return
        numel = math.prod(tensor.shape)
        out_dtype = DTYPES[tensor.dtype]
        out_size = ITEMSIZE[tensor.dtype]
        intermediate = DTYPES[self.settings.compute_cast or source_a.info.dtype]
        sink = self._sink(tensor)
        # The fused kernels read the stored chunks directly (one pass each for the reductions and
        # the interpolation); float64 inputs and mergekit's `dtype` cast stay on torch.
        kernel = (
            self.use_cpu_kernel
            and self.settings.compute_cast is None
            and slerp_kernel.supports(DTYPES[source_a.info.dtype], DTYPES[source_b.info.dtype], out_dtype, intermediate)
        )
        # Without the float32 pair buffer a kernel range needs far fewer bytes per element, so it
        # takes KERNEL_RANGE_FACTOR times more elements: fewer per-range Python steps and syscalls.
        step = self.chunk * KERNEL_RANGE_FACTOR if kernel else self.chunk
        ranges = [(s, min(s + step, numel)) for s in range(0, numel, step)] or [(0, 0)]

        def load(span: tuple[int, int]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            # Chunks stay cache-sized: reading a range again from the page cache is cheaper than
            # keeping whole converted tensors in memory between the two passes.
            start, stop = span
            self.check_cancelled()
            if kernel:
                return self._read_range(source_a, "a", start, stop), self._read_range(source_b, "b", start, stop)
            pair = self._buffer("pair", work, 2 * self.chunk).view(2, self.chunk)[:, : stop - start]
            self._load_pair(pair, self._read_range(source_a, "a", start, stop), self._read_range(source_b, "b", start, stop))
            return pair

        def reduce_loaded(loaded: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> SlerpStats:
            if isinstance(loaded, tuple):
                return slerp_kernel.reduce_stats(*loaded)
            stats = SlerpStats()
            stats.update_pair(loaded)
            return stats

        def reduce(span: tuple[int, int]) -> SlerpStats:
            return reduce_loaded(load(span))

        def interpolate(span: tuple[int, int], pair: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
            start, stop = span
            pair = load(span) if pair is None else pair
            out = self._buffer("out", out_dtype, stop - start)
            if isinstance(pair, tuple):
                slerp_kernel.interpolate(pair[0], pair[1], coefficients, out, intermediate)
            else:
                self._finish_slerp(pair, coefficients, out, intermediate)
            self._write(writer, base + start * out_size, out, sink, start)

        if len(ranges) == 1:  # one chunk: read once, keep it for the second pass
            pair = load(ranges[0])
            stats = reduce_loaded(pair)
        else:
            stats = SlerpStats.total(self._map(reduce, ranges))  # type: ignore[arg-type]
        assert tensor.t is not None
        coefficients = stats.coefficients(tensor.t)
        self._count(coefficients)
        if len(ranges) == 1:
            if numel:
                interpolate(ranges[0], pair)
        else:
            self._map(interpolate, ranges)
        self._observe(tensor, sink)

    def _slerp_sliced(
        self, writer: SafetensorsWriter, base: int, tensor: PlannedTensor, source_a: _Source, source_b: _Source, work: torch.dtype
    ) -> None:
        """The common leading slice of differently shaped tensors: row chunks, sequentially, read twice."""
        chunk = max(self.chunk, math.prod(tensor.shape[1:]))
        pair_buf = self._buffer("pair", work, 2 * chunk).view(2, chunk)

        def pairs() -> Iterator[torch.Tensor]:
            for chunk_a, chunk_b in zip(self._chunks(source_a, "a", tensor.shape, True), self._chunks(source_b, "b", tensor.shape, True), strict=False):
                self.check_cancelled()
                pair = pair_buf[:, : chunk_a.numel()]
                self._load_pair(pair, chunk_a, chunk_b)
                yield pair

        stats = SlerpStats()
        for pair in pairs():
            stats.update_pair(pair)
        assert tensor.t is not None
        coefficients = stats.coefficients(tensor.t)
        self._count(coefficients)
        intermediate = DTYPES[self.settings.compute_cast or source_a.info.dtype]
        sink = self._sink(tensor)
        element = 0
        for pair in pairs():
            out = self._buffer("out", DTYPES[tensor.dtype], pair.shape[1])
            self._finish_slerp(pair, coefficients, out, intermediate)
            self._write(writer, base + element * ITEMSIZE[tensor.dtype], out, sink, element)
            element += pair.shape[1]
        self._observe(tensor, sink)

    @staticmethod
    def _combine(pair: torch.Tensor, coefficients: Coefficients) -> torch.Tensor:
        """`ca * a + cb * b` in place in the pair buffer (row 0 returned).

        torch may fuse `+ cb * b` into one multiply-add, so an element can differ from mergekit's
        separately rounded float32 products by one float32 ulp (far below a bf16 ulp).
        """
        return pair[0].mul_(coefficients.ca).add_(pair[1], alpha=coefficients.cb)

    def _observe(self, tensor: PlannedTensor, sink: torch.Tensor | None) -> None:
        self._tensors_done += 1
        if sink is not None and self.on_tensor is not None:
            self.on_tensor(tensor.name, sink)
        self._report()

    def _report(self) -> None:
        if self.progress is not None and self._plan is not None:
            self.progress(Progress(self._tensors_done, len(self._plan.tensors), self._bytes_done, self._plan.total_bytes))

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
        threads = _TorchThreads(1).__enter__()
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="merge-math", initializer=_pin_one_torch_thread)
        try:
            self._report()
            files = self._write_weights(tmp_dir, plan)
            files += self._write_side_files(tmp_dir, plan, card)
            fsync_dir(tmp_dir)
            self.check_cancelled()
            self._publish(tmp_dir, final_dir, overwrite)
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
            final_dir, sorted(files), len(plan.tensors), self._bytes_done, self.linear, self.slerped, time.monotonic() - started
        )

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._buffers.clear()
        self._local = threading.local()

    def _write_weights(self, tmp_dir: Path, plan: MergePlan) -> list[str]:
        assert self._pool is not None
        names = plan.shard_names()
        weight_map: dict[str, str] = {}
        writers: list[SafetensorsWriter] = []
        finishing = []
        try:
            for file_name, shard in zip(names, plan.shards, strict=False):
                entries = [HeaderEntry(t.name, t.dtype, t.shape) for t in shard]
                writer = SafetensorsWriter(tmp_dir / file_name, entries, {"format": "pt"})
                writers.append(writer)
                base = 0
                for tensor in shard:
                    self.check_cancelled()
                    if tensor.kind == KIND_SLERP:
                        self._slerp(writer, base, tensor)
                    elif tensor.kind == KIND_EQUAL:
                        self._equal(writer, base, tensor)
                    else:
                        self._copy(writer, base, tensor, self.reader_a if tensor.kind == KIND_COPY_A else self.reader_b)
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

    def _write_side_files(self, tmp_dir: Path, plan: MergePlan, card: ModelCard) -> list[str]:
        written = []
        config = read_config(self.a)
        if config is not None:
            dtype_text = DTYPE_CONFIG_NAMES.get(plan.config_dtype, plan.config_dtype.lower())
            config["torch_dtype"] = dtype_text
            if "dtype" in config:  # newer transformers write `dtype`
                config["dtype"] = dtype_text
            write_json_file(tmp_dir / "config.json", config)
            written.append("config.json")
        for source in self._side_files():
            write_bytes_file(tmp_dir / source.name, source.read_bytes())
            written.append(source.name)
        write_bytes_file(tmp_dir / "README.md", card.render(plan, self.linear, self.slerped).encode())
        written.append("README.md")
        return written

    def _side_files(self) -> list[Path]:
        """Model A's tokenizer and generation files, refusing any whose target leaves A's allowed area."""
        directory = self.a.directory
        if self.a.revision:  # Hub snapshot: files are symlinks into the repo's blob store
            allowed = [Path(os.path.realpath(directory.parent.parent))]
        else:
            allowed = [Path(os.path.realpath(r)) for r in self.allowed_roots] or [Path(os.path.realpath(directory))]
        found: dict[str, Path] = {}
        for pattern in COPIED_FILE_PATTERNS:
            for path in sorted(directory.glob(pattern)):
                if path.name in found or path.name in ("config.json", "README.md") or not path.is_file():
                    continue
                real = Path(os.path.realpath(path))
                if not any(real == root or real.is_relative_to(root) for root in allowed):
                    raise PermissionDenied(f"{path.name} of model A links outside the allowed roots; refusing to copy it")
                found[path.name] = path
        return list(found.values())

    def _publish(self, tmp_dir: Path, final_dir: Path, overwrite: bool) -> None:
        trash: Path | None = None
        if final_dir.exists() or final_dir.is_symlink():
            if not overwrite:
                raise AlreadyExists(f"{final_dir} appeared while merging; set overwrite to replace it", reason="OUTPUT_EXISTS", field="output_path")
            trash = final_dir.parent / f"{TRASH_PREFIX}{tmp_dir.name.removeprefix(TMP_PREFIX)}"
            os.rename(final_dir, trash)
        os.rename(tmp_dir, final_dir)
        fsync_dir(final_dir.parent)
        if trash is not None:
            if trash.is_dir() and not trash.is_symlink():
                remove_tree(trash)
            else:
                trash.unlink(missing_ok=True)


ROW_ALIGN = 256
KERNEL_RANGE_FACTOR = 4
"""Elements of a SLERP range on the fused-kernel path, in units of `chunk_elements`: the stored
chunks and the output (6 bytes per element for bf16) of 4x the elements hold less than 2x the
bytes of a torch range (its stored chunks, float32 pair and output: 14), and measured faster
(fewer per-range Python steps and syscalls; 1.72 vs 2.14 CPU-seconds on the 537M bench)."""


# --------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    """What README.md records about a merge."""

    model_a: str
    model_b: str
    revision_a: str
    revision_b: str
    spec: InterpolationSpec
    job_id: str = ""
    created: float = field(default_factory=time.time)

    def render(self, plan: MergePlan, linear: int, slerped: int) -> str:
        import yaml

        mergekit = {
            "merge_method": "slerp",
            "base_model": self.model_a,
            "models": [{"model": self.model_a}, {"model": self.model_b}],
            "parameters": {"t": self.spec.to_mergekit()},
            "out_dtype": DTYPE_CONFIG_NAMES.get(plan.config_dtype, plan.config_dtype),
        }
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        front = yaml.safe_dump({"base_model": [self.model_a, self.model_b], "tags": ["merge", "slerp", "model-kinship"]}, sort_keys=False)
        rows = [
            f"| A (t = 0, base) | `{self.model_a}` | {self.revision_a or 'local'} |",
            f"| B (t = 1) | `{self.model_b}` | {self.revision_b or 'local'} |",
        ]
        return "\n".join(
            [
                "---",
                front.rstrip(),
                "---",
                "",
                "# SLERP merge",
                "",
                f"Made by the model-kinship service version {__version__} on {when}"
                + (f" (job `{self.job_id}`)." if self.job_id else "."),
                "",
                "## Inputs",
                "",
                "| model | reference | revision |",
                "| --- | --- | --- |",
                *rows,
                "",
                "## Parameters",
                "",
                f"- t: {describe_spec(self.spec)}",
                f"- layers: {plan.num_layers}; output dtype: {DTYPE_CONFIG_NAMES.get(plan.config_dtype, plan.config_dtype)}",
                f"- tensors: {len(plan.tensors)} ({slerped} spherical, {linear} linear fallback, "
                f"{sum(1 for t in plan.tensors if t.kind != KIND_SLERP)} copied), "
                f"{len(plan.shards)} shard(s), {plan.total_bytes} bytes",
                "",
                "Equivalent mergekit configuration:",
                "",
                "```yaml",
                yaml.safe_dump(mergekit, sort_keys=False).rstrip(),
                "```",
                "",
            ]
        )
