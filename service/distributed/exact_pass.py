"""The exact pass on Ray: the plan's tensors cut into contiguous ranges, one Ray task per range, partials reduced here.

Each task opens the same checkpoint paths (shared storage), runs `exact.partial_moments` over its
range (the very math of the local pass) and returns its float64 sums: per layer group the count,
per-model sums, Gram matrix and direct squared distances, plus, when the caller sketches
fingerprints, its (n, W) float64 CountSketch and per-group statistics. The sketch and every sum are
linear in the elements, so adding the partials in range order gives the single-node pass up to
float64 summation order (~1e-15 relative). Tasks return plain NumPy arrays and numbers; an error
the service knows (InvalidArgument, FailedPrecondition, ...) comes back as data and is raised again here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kinship_service import errors
from kinship_service.cache.observer import FingerprintObserver
from kinship_service.checkpoints.safetensors_header import TensorInfo
from kinship_service.checkpoints.sources import Checkpoint
from kinship_service.checkpoints.streaming import CheckpointReader, ReadStats
from kinship_service.distributed import cluster
from kinship_service.errors import InvalidArgument, KinshipError
from kinship_service.kinship.exact import (
    ChunkObserver,
    ComparisonPlan,
    ExactKinship,
    PassPartial,
    TensorPlan,
    kinship_from_partial,
    no_common_tensors,
    partial_moments,
    plan_comparison,
    reduce_partials,
    resolve_device,
)
from kinship_service.kinship.fingerprint import GroupStats
from kinship_service.kinship.similarity import PairwiseMoments

Wire = dict[str, Any]


def split_ranges(tensors: Sequence[TensorPlan], parts: int) -> list[list[TensorPlan]]:
    """Cut `tensors` (in order) into at most `parts` contiguous, non-empty ranges of about equal element counts."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    sizes = [int(np.prod(t.shape)) for t in tensors]
    total = sum(sizes)
    ranges: list[list[TensorPlan]] = []
    current: list[TensorPlan] = []
    done = 0
    for tensor, size in zip(tensors, sizes, strict=True):
        current.append(tensor)
        done += size
        # Close the range once it reaches its share of the elements (the last range takes the rest).
        if len(ranges) < parts - 1 and done * parts >= total * (len(ranges) + 1):
            ranges.append(current)
            current = []
    if current:
        ranges.append(current)
    return ranges


def pass_range(
    checkpoints: Sequence[Checkpoint],
    headers: Sequence[dict[str, TensorInfo]],
    tensors: Sequence[TensorPlan],
    device: str,
    chunk_bytes: int,
    use_cpu_kernel: bool,
    sketch: bool,
) -> Wire:
    """One range of a pass, where it runs (a Ray task): its partial sums as plain data (see the module docstring)."""
    try:
        where = resolve_device(device)
        stats = ReadStats()
        readers = [CheckpointReader(c, stats, h) for c, h in zip(checkpoints, headers, strict=True)]
        observer = FingerprintObserver(len(checkpoints) - 1, where) if sketch else None
        partial = partial_moments(
            readers,
            tensors,
            device=where,
            chunk_bytes=chunk_bytes,
            observers=[observer] if observer is not None else [],
            use_cpu_kernel=use_cpu_kernel,
        )
        wire: Wire = {
            "moments": {
                g: (m.count, m.sums.cpu().numpy(), m.gram.cpu().numpy(), m.sq_dist.cpu().numpy()) for g, m in partial.moments.items()
            },
            "tensors_by_group": dict(partial.tensors_by_group),
            "bytes_by_file": dict(stats.bytes_by_file),
            "reads_by_tensor": dict(stats.reads_by_tensor),
        }
        if observer is not None:
            observer.flush()
            wire["sketch"] = observer.sketch.sketch.cpu().numpy()
            wire["stats"] = [{g: (s.count, s.sum, s.sum_squares) for g, s in groups.items()} for groups in observer.stats.groups]
        return wire
    except KinshipError as exc:  # the service's own errors travel as data: their class, reason and field survive
        return {"error": (type(exc).__name__, exc.message, exc.reason, exc.field)}


def _partial_from_wire(wire: Wire, n: int, device: torch.device) -> PassPartial:
    moments: dict[str, PairwiseMoments] = {}
    for group, (count, sums, gram, sq_dist) in wire["moments"].items():
        m = PairwiseMoments(n, device=device)
        m.count = int(count)
        m.sums = torch.from_numpy(np.array(sums)).to(device)
        m.gram = torch.from_numpy(np.array(gram)).to(device)
        m.sq_dist = torch.from_numpy(np.array(sq_dist)).to(device)
        moments[group] = m
    return PassPartial(moments, dict(wire["tensors_by_group"]))


def _raise_if_error(wire: Wire) -> None:
    if "error" in wire:
        name, message, reason, field = wire["error"]
        kind = getattr(errors, name, None)
        if not (isinstance(kind, type) and issubclass(kind, KinshipError)):
            kind = errors.Internal
        raise kind(message, reason=reason, field=field)


_REMOTE: dict[str, Any] = {}


def _remote_pass_range() -> Any:
    """`pass_range` as a Ray remote function (made once, after `cluster.connect`)."""
    if "pass_range" not in _REMOTE:
        _REMOTE["pass_range"] = cluster.ray_module().remote(num_cpus=1, max_retries=0)(pass_range)
    return _REMOTE["pass_range"]


def distributed_exact_kinship(
    base: Checkpoint,
    models: Sequence[Checkpoint],
    *,
    headers: Sequence[dict[str, TensorInfo]],
    plan: ComparisonPlan | None = None,
    leading_slice: bool = False,
    device: str = "cpu",
    chunk_bytes: int = 256 * 2**20,
    check_cancelled: Callable[[], None] = lambda: None,
    observers: Sequence[ChunkObserver] = (),
    stats: ReadStats | None = None,
    use_cpu_kernel: bool = True,
    tasks: int = 0,
    timeout: float = 600.0,
) -> ExactKinship:
    """`exact.exact_kinship` with its tensors split across `tasks` Ray tasks (0: one per CPU of the cluster).

    `observers` may hold `FingerprintObserver`s only: each task sketches its range and the sketches
    and statistics are added into them. Needs `cluster.connect` first. A task error, a dead worker
    or more than `timeout` seconds end the pass with UNAVAILABLE (reasons RAY_*), cancelling the tasks.
    """
    started = time.perf_counter()
    if len(models) < 2:
        raise InvalidArgument("kinship needs at least two models", field="models")
    sketching = [o for o in observers if isinstance(o, FingerprintObserver)]
    if len(sketching) != len(observers):
        raise ValueError("distributed_exact_kinship: only FingerprintObserver observers are supported")
    checkpoints = (base, *models)
    n = len(models)
    if plan is None:
        plan = plan_comparison(headers, [c.label for c in checkpoints], leading_slice)
    if not plan.tensors:
        raise no_common_tensors()
    stats = stats if stats is not None else ReadStats()
    ranges = split_ranges(plan.tensors, tasks or cluster.cluster_cpus())
    ray = cluster.ray_module()
    checkpoints_ref, headers_ref = ray.put(list(checkpoints)), ray.put(list(headers))
    remote = _remote_pass_range()
    refs = [
        remote.remote(checkpoints_ref, headers_ref, tensors, device, chunk_bytes, use_cpu_kernel, bool(sketching))
        for tensors in ranges
    ]
    wires = cluster.wait_all(refs, what="the exact pass", timeout=timeout, check_cancelled=check_cancelled)
    for wire in wires:
        _raise_if_error(wire)
    here = torch.device("cpu")
    partial = reduce_partials([_partial_from_wire(w, n, here) for w in wires], n, here)
    for wire in wires:
        for file, nbytes in wire["bytes_by_file"].items():
            stats.bytes_by_file[file] += nbytes
        for key, count in wire["reads_by_tensor"].items():
            stats.reads_by_tensor[key] += count
        for observer in sketching:
            observer.sketch.sketch += torch.from_numpy(np.array(wire["sketch"])).to(observer.sketch.sketch.device)
            for i, groups in enumerate(wire["stats"]):
                for group, (count, total, squares) in groups.items():
                    target = observer.stats.groups[i].setdefault(group, GroupStats())
                    target.count += count
                    target.sum += total
                    target.sum_squares += squares
    result = kinship_from_partial(partial, plan, models, stats, here, started)
    result.device = "ray"  # the metrics' device label (kinship_exact_seconds{device="ray"})
    return result
