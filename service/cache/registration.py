"""RegisterCheckpoint's pass: one read of base + checkpoint storing the fingerprint and the lossless delta.

The delta's chunks are written as they are encoded, its manifest last (after the files
were found unchanged), so an interrupted or invalidated registration leaves no usable
delta behind.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kinship_service.cache.delta import EncodedChunk, encode
from kinship_service.cache.deltas import DELTA_CHUNK_ELEMENTS, DeltaStore, Manifest
from kinship_service.cache.fingerprints import FingerprintCache
from kinship_service.cache.plans import skipped_tuples, tensor_list
from kinship_service.cache.resolution import Resolver
from kinship_service.checkpoints.identity import CheckpointIdentity
from kinship_service.checkpoints.sources import Checkpoint
from kinship_service.checkpoints.streaming import CheckpointReader, ReadStats
from kinship_service.errors import FailedPrecondition
from kinship_service.kinship import cpu_kernel
from kinship_service.kinship.cpu_kernel import FusedFingerprint
from kinship_service.kinship.exact import ComparisonPlan, _fused_from_files, _group_key, _lockstep
from kinship_service.kinship.fingerprint import (
    Fingerprint,
    SketchBuilder,
    StatsBuilder,
    build_fingerprints,
    tensor_set_key,
)
from kinship_service.kinship.similarity import PairwiseMoments


@dataclass
class Registration:
    """What RegisterCheckpoint reports."""

    identity: str
    base_identity: str
    already_registered: bool
    tensors: int
    elements: int
    size_bytes: int
    delta_sum: float
    delta_sum_squares: float
    layer_norms: list[tuple[str, float]]
    fingerprint_bytes: int
    delta_bytes: int
    seconds: float
    bytes_read: int = 0


def registration(
    base: CheckpointIdentity,
    ident: CheckpointIdentity,
    fp: Fingerprint,
    manifest: Manifest | None,
    already: bool,
    started: float,
    bytes_read: int,
) -> Registration:
    """The Registration of a stored fingerprint (and delta, when `manifest` is given)."""
    total = fp.total
    return Registration(
        identity=ident.identity,
        base_identity=base.identity,
        already_registered=already,
        tensors=len(fp.tensors),
        elements=total.count,
        size_bytes=ident.size_bytes,
        delta_sum=total.sum,
        delta_sum_squares=total.sum_squares,
        layer_norms=[(g, fp.groups[g].norm) for g in sorted(fp.groups, key=_group_key)],
        fingerprint_bytes=fp.nbytes,
        delta_bytes=manifest.nbytes if manifest is not None else 0,
        seconds=time.perf_counter() - started,
        bytes_read=bytes_read,
    )


@dataclass
class RegistrationStores:
    """Where a registration pass writes, and what checks the files it read."""

    deltas: DeltaStore
    fingerprints: FingerprintCache
    resolver: Resolver


FUSED_REGISTER_ELEMENTS = 1 << 26
"""Elements per chunk of the fingerprint-only pass when the kernel reads the files itself (no delta
chunks to match; mapped reads cap it at `cpu_kernel.MAPPED_CHUNK_BYTES`). The delta's 4 Mi-element
chunks left one model's chunk 4 sketch work items for 2 threads: 0.59 -> 0.49 CPU-s per 509M pass."""


def register_pass(
    base_ckpt: Checkpoint,
    ckpt: Checkpoint,
    base_ident: CheckpointIdentity,
    ident: CheckpointIdentity,
    plan: ComparisonPlan,
    stores: RegistrationStores,
    *,
    device: torch.device,
    stats: ReadStats,
    check_cancelled: Callable[[], None],
    use_cpu_kernel: bool = True,
) -> tuple[Fingerprint, Manifest | None]:
    """Read base and checkpoint once over `plan`; store the fingerprint and, when it fits, the delta.

    On CPU, with `use_cpu_kernel` (Settings.cpu_kernel) and numba present, the sketch and the
    statistics come from the exact pass's fused kernel (`cpu_kernel.accumulate` with one model:
    widening, delta, sums and sketch in one read of each chunk, on every core); when no delta is
    stored the kernel reads the files itself (`exact._fused_from_files`), else the chunks are read
    into memory and the float64 delta is made in torch from them. Else everything is torch.
    Raises FailedPrecondition (CHECKPOINT_CHANGED) when a file changed during the pass
    (nothing usable is stored then).
    """
    readers = [CheckpointReader(base_ckpt, stats, base_ident.headers), CheckpointReader(ckpt, stats, ident.headers)]
    sketch = SketchBuilder(1, device=device)
    group_stats = StatsBuilder(1)
    store_delta = stores.deltas.storable(plan)
    manifest_tensors: list[tuple[str, tuple[int, ...], list[int]]] = []
    delta_bytes = 0
    widest = max(max(1, math.prod(t.shape[1:])) for t in plan.tensors)
    read_elements = max(DELTA_CHUNK_ELEMENTS, widest)
    fused = FusedFingerprint(sketch, group_stats) if use_cpu_kernel and device.type == "cpu" and cpu_kernel.available() else None
    moments: dict[str, PairwiseMoments] = {}
    with cpu_kernel.mapped_pass():  # the kernel's last mapped chunk is unmapped when the loop ends
        for t_index, tensor in enumerate(plan.tensors):
            check_cancelled()
            if fused is not None and not store_delta:
                # Fingerprint only: the kernel reads the files itself, as the exact pass does (no
                # chunk buffers in DRAM), in larger chunks than the loop below (the same sums to rounding).
                group = moments.setdefault(tensor.group, PairwiseMoments(1))
                if _fused_from_files(readers, tensor, group, fused, FUSED_REGISTER_ELEMENTS, check_cancelled):
                    continue
            counts: list[int] = []
            offset = 0
            for c_index, (base_chunk, model_chunk) in enumerate(_lockstep(readers, tensor, read_elements)):
                size = base_chunk.numel()
                if fused is not None:
                    group = moments.setdefault(tensor.group, PairwiseMoments(1))
                    cpu_kernel.accumulate([base_chunk, model_chunk], group, sketch=fused, tensor=tensor.name, offset=offset)
                if store_delta or fused is None:
                    base64 = base_chunk.reshape(-1).to(device=device, dtype=torch.float64)
                    model = model_chunk.reshape(-1).to(device)
                    d64 = model.to(torch.float64) - base64
                    if fused is None:
                        row = d64.unsqueeze(0)
                        sketch.add(tensor.name, offset, row)
                        group_stats.add(tensor.group, row)
                    if store_delta:
                        encoded = encode(model, base64, d64)
                        encoded = EncodedChunk(encoded.dtype, encoded.delta.cpu(), encoded.patch_index.cpu(), encoded.patch_bits.cpu())
                        delta_bytes += stores.deltas.put_chunk(base_ident.identity, ident.identity, t_index, c_index, encoded)
                counts.append(size)
                offset += size
                check_cancelled()
            manifest_tensors.append((tensor.name, tuple(tensor.shape), counts))
    if fused is not None:
        fused.finish(moments)
    fp = build_fingerprints(sketch.sketch, group_stats, tensor_list(plan), [skipped_tuples(plan.skipped)])[0]
    if not stores.resolver.unchanged([base_ident, ident]):
        raise FailedPrecondition(
            f"{ckpt.label} or its base changed while it was being registered; register it again once it is written",
            reason="CHECKPOINT_CHANGED",
        )
    manifest = None
    if store_delta:
        manifest = Manifest(manifest_tensors, delta_bytes, tensor_set_key(tensor_list(plan)))
        stores.deltas.put_manifest(base_ident.identity, ident.identity, manifest)
    stores.fingerprints.put(base_ident.identity, ident.identity, fp)
    return fp, manifest
