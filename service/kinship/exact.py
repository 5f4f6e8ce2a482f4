"""Exact kinship: one streaming pass over a base and n models.

For each compared tensor, the base and every model are read chunk by chunk in
lockstep; the chunk's task vectors (`model - base`, in float64 on the compute
device) feed one `PairwiseMoments` per layer group. Every checkpoint file is read
once per request whatever n is, and memory stays at a few chunk buffers.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kinship_service.checkpoints.dtypes import ITEMSIZE
from kinship_service.checkpoints.safetensors_header import TensorInfo
from kinship_service.checkpoints.sources import Checkpoint
from kinship_service.checkpoints.streaming import CheckpointReader, ReadStats, chunk_elements
from kinship_service.errors import InvalidArgument
from kinship_service.kinship import cpu_kernel
from kinship_service.kinship.similarity import PairwiseMoments, Similarities, layer_group, similarities

# Elements per float64 compute block on CPU: (n + 1) rows of it stay in L2/L3 between ops.
COMPUTE_BLOCK_ELEMENTS = 1 << 16

SKIP_MISSING = "missing"
SKIP_SHAPE = "shape_mismatch"
SKIP_NOT_FLOATING = "not_floating"


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to compare and the (possibly sliced) shape to compare it over."""

    name: str
    shape: tuple[int, ...]
    sliced: bool
    group: str


@dataclass(frozen=True)
class Skipped:
    """A tensor left out of the comparison."""

    name: str
    reason: str
    detail: str


@dataclass
class ComparisonPlan:
    """Which tensors a pass compares, and which it skips and why."""

    tensors: list[TensorPlan]
    skipped: list[Skipped]

    @property
    def elements(self) -> int:
        total = 0
        for t in self.tensors:
            count = 1
            for d in t.shape:
                count *= d
            total += count
        return total


def plan_comparison(headers: Sequence[dict[str, TensorInfo]], labels: Sequence[str], leading_slice: bool) -> ComparisonPlan:
    """Decide the tensor set: tensors in every checkpoint with one shape; others skipped or sliced.

    `headers[0]` is the base. Tensors are compared in sorted name order, which fixes
    the flattening order of the task vectors.
    """
    all_names = sorted(set().union(*(h.keys() for h in headers)))
    tensors: list[TensorPlan] = []
    skipped: list[Skipped] = []
    for name in all_names:
        lacking = [labels[i] for i, h in enumerate(headers) if name not in h]
        if lacking:
            skipped.append(Skipped(name, SKIP_MISSING, "missing from " + ", ".join(lacking)))
            continue
        infos = [h[name] for h in headers]
        if not all(info.is_floating for info in infos):
            skipped.append(Skipped(name, SKIP_NOT_FLOATING, "dtypes " + ", ".join(sorted({i.dtype for i in infos}))))
            continue
        shapes = {info.shape for info in infos}
        if len(shapes) == 1:
            tensors.append(TensorPlan(name, infos[0].shape, False, layer_group(name)))
            continue
        ranks = {len(s) for s in shapes}
        detail = "shapes " + ", ".join(f"{labels[i]}: {list(info.shape)}" for i, info in enumerate(infos))
        if leading_slice and len(ranks) == 1:
            common = tuple(min(dims) for dims in zip(*shapes, strict=False))
            if all(d > 0 for d in common):
                tensors.append(TensorPlan(name, common, True, layer_group(name)))
                continue
        skipped.append(Skipped(name, SKIP_SHAPE, detail))
    return ComparisonPlan(tensors, skipped)


class ChunkObserver(Protocol):
    """Sees every chunk of task vectors of a pass (fingerprinting hooks in here)."""

    def observe(self, tensor: TensorPlan, offset: int, deltas: torch.Tensor) -> None:
        """`deltas` is (n, k) float64: elements [offset, offset + k) of `tensor` for each model."""


@dataclass
class ExactKinship:
    """The result of one exact pass."""

    overall: Similarities
    by_group: dict[str, Similarities]
    tensors_by_group: dict[str, int]
    plan: ComparisonPlan
    bytes_read: int
    device: str
    seconds: float
    stats: ReadStats = field(repr=False, default_factory=ReadStats)
    sign_conflict: list[list[float]] | None = None
    """The n x n sign-conflict matrix (`sign_conflict.py`) when it was asked for, else None."""


def resolve_device(setting: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; otherwise the named device."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"KINSHIP_DEVICE={setting} but CUDA is not available on this machine")
    return device


def _lockstep(readers: Sequence[CheckpointReader], tensor: TensorPlan, max_elements: int) -> Iterator[list[torch.Tensor]]:
    streams = [r.read_chunks(tensor.name, max_elements=max_elements, shape=tensor.shape if tensor.sliced else None) for r in readers]
    try:
        while True:
            chunks = []
            for stream in streams:
                chunk = next(stream, None)
                if chunk is None:
                    return
                chunks.append(chunk)
            yield chunks
    finally:
        for stream in streams:
            stream.close()


def no_common_tensors() -> InvalidArgument:
    """The error of a comparison whose plan holds no tensor (the models do not share the base's tensors)."""
    return InvalidArgument(
        "no floating tensor is shared, with one shape, by the base and every model; check that the models "
        "were fine-tuned from this base (or ask for shape_mismatch_policy=LEADING_SLICE)",
        reason="NO_COMMON_TENSORS",
        field="models",
    )


def exact_kinship(
    base: Checkpoint,
    models: Sequence[Checkpoint],
    *,
    leading_slice: bool = False,
    device: torch.device | str = "cpu",
    chunk_bytes: int = 256 * 2**20,
    check_cancelled: Callable[[], None] = lambda: None,
    observers: Sequence[ChunkObserver] = (),
    stats: ReadStats | None = None,
    use_cpu_kernel: bool = True,
    headers: Sequence[dict[str, TensorInfo]] | None = None,
    plan: ComparisonPlan | None = None,
) -> ExactKinship:
    """Compute PCC, cosine and Euclidean distance between the task vectors of `models` against `base`.

    Raises InvalidArgument when fewer than two models are given, when no tensor is
    shared with the base, or when a task vector is all zeros (similarity undefined).
    `check_cancelled` is called between chunks and should raise to abort the pass.
    On CPU, with `use_cpu_kernel` (Settings.cpu_kernel) and numba present, the fused
    kernel (`cpu_kernel.py`) does the math, and the fingerprint observer's work too,
    when every observer is one it can fuse (`cpu_kernel.fused_observer`); else torch.

    `headers`: the validated header entries of base and models (in that order) when the caller
    has them, e.g. from their identities; `plan`: the comparison plan the caller made from those
    same headers. Given, the pass neither reads the headers again nor plans a second time, so
    what the caller checked (and caches under) is exactly what is compared. Without them the
    pass reads the headers (`safetensors_header`) and plans itself.
    """
    started = time.perf_counter()
    if len(models) < 2:
        raise InvalidArgument("kinship needs at least two models", field="models")
    device = torch.device(device)
    stats = stats if stats is not None else ReadStats()
    checkpoints = (base, *models)
    if headers is not None and len(headers) != len(checkpoints):
        raise ValueError(f"exact_kinship: {len(headers)} headers given for {len(checkpoints)} checkpoints")
    readers = [CheckpointReader(c, stats, None if headers is None else headers[i]) for i, c in enumerate(checkpoints)]
    tensor_headers = [r.tensors() for r in readers]
    if plan is None:
        plan = plan_comparison(tensor_headers, [c.label for c in checkpoints], leading_slice)
    if not plan.tensors:
        raise no_common_tensors()
    partial = partial_moments(
        readers, plan.tensors, device=device, chunk_bytes=chunk_bytes, check_cancelled=check_cancelled,
        observers=observers, use_cpu_kernel=use_cpu_kernel,
    )
    return kinship_from_partial(partial, plan, models, stats, device, started)


@dataclass
class PassPartial:
    """The float64 sums of a pass over some tensors: one `PairwiseMoments` per layer group, and tensor counts.

    Partials over disjoint tensor sets add up (`reduce_partials`) to the pass over their union.
    """

    moments: dict[str, PairwiseMoments]
    tensors_by_group: dict[str, int]


def reduce_partials(partials: Sequence[PassPartial], n: int, device: torch.device | str = "cpu") -> PassPartial:
    """Add partials over disjoint tensor sets, in the order given (deterministic float64 sums)."""
    moments: dict[str, PairwiseMoments] = {}
    tensors_by_group: dict[str, int] = {}
    for partial in partials:
        for group, group_moments in partial.moments.items():
            moments.setdefault(group, PairwiseMoments(n, device=device)).merge(group_moments)
        for group, count in partial.tensors_by_group.items():
            tensors_by_group[group] = tensors_by_group.get(group, 0) + count
    return PassPartial(moments, tensors_by_group)


def kinship_from_partial(
    partial: PassPartial,
    plan: ComparisonPlan,
    models: Sequence[Checkpoint],
    stats: ReadStats,
    device: torch.device,
    started: float,
) -> ExactKinship:
    """The result of a pass from its (reduced) partial sums; raises InvalidArgument for zero or constant task vectors."""
    return _result(partial.moments, partial.tensors_by_group, plan, models, stats, device, started)


def partial_moments(
    readers: Sequence[CheckpointReader],
    tensors: Sequence[TensorPlan],
    *,
    device: torch.device,
    chunk_bytes: int,
    check_cancelled: Callable[[], None] = lambda: None,
    observers: Sequence[ChunkObserver] = (),
    use_cpu_kernel: bool = True,
) -> PassPartial:
    """The float64 sums of base and models (`readers[0]` is the base) over `tensors`, read chunk by chunk in lockstep.

    The math of every exact pass, local or one tensor range of a distributed one (`kinship_service.distributed`).
    """
    n = len(readers) - 1
    tensor_headers = [r.tensors() for r in readers]
    # Reads: chunk_bytes / (n + 1) bytes per checkpoint per chunk, into each reader's reusable buffer.
    itemsize = max((ITEMSIZE[h[t.name].dtype] for h in tensor_headers for t in tensors), default=1)
    read_elements = max(256, chunk_bytes // ((n + 1) * itemsize))
    moments: dict[str, PairwiseMoments] = {}
    tensors_by_group: dict[str, int] = {}
    fused = _fused_kernel(device, observers, use_cpu_kernel)
    if fused is not None:
        sketch = fused[0] if fused else None
        with cpu_kernel.mapped_pass():
            for tensor in tensors:
                check_cancelled()
                group = moments.setdefault(tensor.group, PairwiseMoments(n, device=device))
                tensors_by_group[tensor.group] = tensors_by_group.get(tensor.group, 0) + 1
                if _fused_from_files(readers, tensor, group, sketch, read_elements, check_cancelled):
                    continue
                offset = 0
                for chunks in _lockstep(readers, tensor, read_elements):
                    cpu_kernel.accumulate(chunks, group, sketch=sketch, tensor=tensor.name, offset=offset)
                    offset += chunks[0].numel()
                    check_cancelled()
        if sketch is not None:
            sketch.finish(moments)
        return PassPartial(moments, tensors_by_group)
    if not tensors:
        return PassPartial(moments, tensors_by_group)
    # Math: float64 blocks small enough to stay in the CPU cache between the ops that use them.
    block = COMPUTE_BLOCK_ELEMENTS if device.type == "cpu" else max(256, chunk_bytes // (8 * (n + 1)))
    widest_row = max(math.prod(t.shape[1:]) for t in tensors)
    buffer = torch.empty((n + 1, max(block, min(widest_row, read_elements))), dtype=torch.float64, device=device)
    block = buffer.shape[1]
    for tensor in tensors:
        check_cancelled()
        group = moments.setdefault(tensor.group, PairwiseMoments(n, device=device))
        tensors_by_group[tensor.group] = tensors_by_group.get(tensor.group, 0) + 1
        offset = 0
        for chunks in _lockstep(readers, tensor, read_elements):
            flat = [c.reshape(-1) for c in chunks]
            size = flat[0].numel()
            for start in range(0, size, block):
                k = min(block, size - start)
                for row, values in enumerate(flat):
                    buffer[row, :k].copy_(values[start : start + k])
                deltas = buffer[1:, :k]
                deltas.sub_(buffer[0, :k])
                group.update(deltas)
                for observer in observers:
                    observer.observe(tensor, offset, deltas)
                offset += k
            check_cancelled()
    return PassPartial(moments, tensors_by_group)


def _fused_from_files(
    readers: Sequence[CheckpointReader],
    tensor: TensorPlan,
    group: PairwiseMoments,
    sketch: cpu_kernel.FusedFingerprint | None,
    max_elements: int,
    check_cancelled: Callable[[], None],
) -> bool:
    """Feed `tensor` to the fused kernel reading the files itself (`cpu_kernel.accumulate_from_files`), chunk by chunk.

    False, having read nothing, when it cannot: trailing dimensions sliced, or mixed or exotic
    dtypes (the caller then reads chunks into memory). Chunks are the ones `read_chunks` would
    cut (whole rows), so the sums are the same bits either way; when the kernel maps the files,
    at most `cpu_kernel.MAPPED_CHUNK_BYTES` of them (mapped pages count in the RSS).
    """
    shape = tensor.shape if tensor.sliced else None
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(reader.open_tensor(tensor.name, shape)) for reader in readers]
        files = [o for o in opened if o is not None]
        if len(files) != len(readers) or not cpu_kernel.reads_files(files):
            return False
        total = files[0].elements
        step = chunk_elements(tensor.shape, min(max_elements, cpu_kernel.mapped_chunk_elements(files)))
        if total == 0:
            for reader, file in zip(readers, files, strict=True):
                reader.count(file, 0, True)
        for start in range(0, total, step):
            count = min(step, total - start)
            cpu_kernel.accumulate_from_files(files, start, count, group, sketch=sketch, tensor=tensor.name)
            for reader, file in zip(readers, files, strict=True):
                reader.count(file, count, start == 0)
            check_cancelled()
    return True


def _fused_kernel(
    device: torch.device, observers: Sequence[ChunkObserver], enabled: bool
) -> list[cpu_kernel.FusedFingerprint] | None:
    """The observers as fused-kernel targets ([] when none), or None: use the torch loop.

    None unless enabled, on CPU, numba is present and every observer (at most one) is a
    fingerprint observer the kernel can fill itself (`cpu_kernel.fused_observer`).
    """
    if not enabled or device.type != "cpu" or not cpu_kernel.available() or len(observers) > 1:
        return None
    targets = [cpu_kernel.fused_observer(o) for o in observers]
    if any(t is None for t in targets):
        return None
    return [t for t in targets if t is not None]


def _result(
    moments: dict[str, PairwiseMoments],
    tensors_by_group: dict[str, int],
    plan: ComparisonPlan,
    models: Sequence[Checkpoint],
    stats: ReadStats,
    device: torch.device,
    started: float,
) -> ExactKinship:
    n = len(models)
    total = PairwiseMoments(n, device=device)
    for group_moments in moments.values():
        total.merge(group_moments)
    overall = similarities(total)
    _require_defined(overall, models)
    return ExactKinship(
        overall=overall,
        by_group={g: similarities(m) for g, m in sorted(moments.items(), key=lambda kv: _group_key(kv[0]))},
        tensors_by_group=tensors_by_group,
        plan=plan,
        bytes_read=stats.total_bytes,
        device=str(device),
        seconds=time.perf_counter() - started,
        stats=stats,
    )


def _require_defined(result: Similarities, models: Sequence[Checkpoint]) -> None:
    zero = [i for i, norm in enumerate(result.norms) if norm == 0.0]
    if zero:
        names = ", ".join(f"models[{i}] ({models[i].label})" for i in zero)
        raise InvalidArgument(
            f"the task vector of {names} is all zeros over the compared tensors (the model equals the base), "
            "so its similarity is undefined",
            reason="ZERO_TASK_VECTOR",
            field="models",
        )
    constant = result.undefined_models()
    if constant:
        names = ", ".join(f"models[{i}] ({models[i].label})" for i in constant)
        raise InvalidArgument(
            f"the task vector of {names} is constant, so its Pearson correlation is undefined",
            reason="CONSTANT_TASK_VECTOR",
            field="models",
        )


def _group_key(group: str) -> tuple[int, int, str]:
    order = {"embed": 0, "other": 2, "head": 3}
    if group.startswith("layers."):
        return (1, int(group.split(".")[1]), group)
    return (order.get(group, 4), 0, group)
