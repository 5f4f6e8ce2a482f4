"""Stored deltas: a registered checkpoint's lossless task vector, chunk by chunk, and kinship passes over them.

A stored delta (RegisterCheckpoint) is one cache entry per chunk (`delta.py` encodes
them) plus a manifest written last, so a delta without its manifest is never used. A
pass over stored deltas gives the same float64 task vectors as a pass over the weights
without reading the base; a chunk found evicted or damaged mid-pass raises
DeltaUnavailable (the caller falls back to the weights) and drops the manifest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from kinship_service.cache.delta import EncodedChunk, decode_delta, from_bytes, to_parts
from kinship_service.cache.keys import chunk_key, delta_key
from kinship_service.cache.plans import TensorList
from kinship_service.cache.store import CacheStore
from kinship_service.errors import FailedPrecondition
from kinship_service.kinship.exact import ComparisonPlan
from kinship_service.kinship.similarity import PairwiseMoments
from kinship_service.server import metrics

DELTA_CHUNK_ELEMENTS = 4 * 2**20
"""Elements per stored delta chunk (one cache file each)."""


@dataclass
class Manifest:
    """What a stored delta holds: its tensors, the element count of each chunk, its size and tensor set."""

    tensors: list[tuple[str, tuple[int, ...], list[int]]]
    """(name, shape, element count of each stored chunk)."""
    nbytes: int
    tensor_set: str

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"tensors": [[n, list(s), c] for n, s, c in self.tensors], "nbytes": self.nbytes, "tensor_set": self.tensor_set}
        ).encode()

    @classmethod
    def from_bytes(cls, payload: memoryview) -> Manifest:
        doc = json.loads(bytes(payload))
        return cls([(n, tuple(s), list(c)) for n, s, c in doc["tensors"]], int(doc["nbytes"]), doc["tensor_set"])


class DeltaUnavailable(Exception):
    """A stored delta turned out incomplete (evicted or corrupt chunk) mid-pass."""


@dataclass
class DeltaMoments:
    """What a pass over stored deltas accumulates: moments per layer group and tensors per group."""

    moments: dict[str, PairwiseMoments]
    tensors_by_group: dict[str, int]


class DeltaStore:
    """Stored deltas by (base identity, checkpoint identity), in the cache store."""

    def __init__(self, store: CacheStore) -> None:
        self.store = store

    def storable(self, plan: ComparisonPlan) -> bool:
        """Deltas (about 4 bytes per element) are stored when they take at most a quarter of the cache."""
        return plan.elements * 4 <= self.store.size_limit // 4

    def manifest(self, base_id: str, ckpt_id: str) -> Manifest | None:
        """The manifest of a stored delta, or None (a damaged one is dropped)."""
        key = delta_key(base_id, ckpt_id)
        payload = self.store.get(key)
        if payload is None:
            return None
        try:
            return Manifest.from_bytes(payload)
        except (ValueError, KeyError, TypeError):
            self.store.delete(key)
            metrics.CACHE_CORRUPT.inc()
            return None

    def manifests(self, base_id: str, ckpt_ids: Sequence[str], tensors: TensorList) -> list[Manifest] | None:
        """The manifests of every checkpoint over exactly `tensors` (an unsliced plan's), or None (then no delta pass)."""
        found = []
        for ckpt_id in ckpt_ids:
            manifest = self.manifest(base_id, ckpt_id)
            if manifest is None or [(n, s) for n, s, _ in manifest.tensors] != tensors:
                return None
            found.append(manifest)
        return found

    def complete(self, base_id: str, ckpt_id: str, manifest: Manifest) -> bool:
        """Whether every chunk the manifest lists is still stored."""
        return all(
            self.store.contains(chunk_key(base_id, ckpt_id, t, c))
            for t, (_n, _s, counts) in enumerate(manifest.tensors)
            for c in range(len(counts))
        )

    def put_chunk(self, base_id: str, ckpt_id: str, tensor: int, chunk: int, encoded: EncodedChunk) -> int:
        """Store one chunk (write the manifest after the last); the bytes stored."""
        return self.store.put(chunk_key(base_id, ckpt_id, tensor, chunk), to_parts(encoded))

    def put_manifest(self, base_id: str, ckpt_id: str, manifest: Manifest) -> None:
        """Store the manifest, which makes the delta usable."""
        self.store.put(delta_key(base_id, ckpt_id), manifest.to_bytes())

    def _decoded_chunks(self, base_id: str, ckpt_id: str, t_index: int, counts: Sequence[int]) -> Iterator[torch.Tensor]:
        for c_index, count in enumerate(counts):
            key = chunk_key(base_id, ckpt_id, t_index, c_index)
            payload = self.store.get(key)
            if payload is None:
                self.store.delete(delta_key(base_id, ckpt_id))
                raise DeltaUnavailable(f"chunk {key} is missing or damaged")
            try:
                chunk = from_bytes(payload)
            except (ValueError, KeyError, TypeError):
                self.store.delete(key)
                self.store.delete(delta_key(base_id, ckpt_id))
                raise DeltaUnavailable(f"chunk {key} does not parse") from None
            if chunk.numel != count:
                self.store.delete(delta_key(base_id, ckpt_id))
                raise DeltaUnavailable(f"chunk {key} has {chunk.numel} elements, expected {count}")
            yield decode_delta(chunk)

    def moments(
        self,
        base_id: str,
        ckpt_ids: Sequence[str],
        plan: ComparisonPlan,
        manifests: Sequence[Manifest],
        *,
        chunk_bytes: int,
        device: torch.device,
        check_cancelled: Callable[[], None],
    ) -> DeltaMoments:
        """Pairwise moments of the checkpoints' stored task vectors over `plan` (the base is not read).

        Raises DeltaUnavailable when a chunk is missing, damaged or short.
        """
        n = len(ckpt_ids)
        max_elements = max(4096, chunk_bytes // (8 * (n + 1)))
        buffer = torch.empty((n, max_elements), dtype=torch.float64, device=device)
        moments: dict[str, PairwiseMoments] = {}
        tensors_by_group: dict[str, int] = {}
        for t_index, tensor in enumerate(plan.tensors):
            check_cancelled()
            group = moments.setdefault(tensor.group, PairwiseMoments(n, device=device))
            tensors_by_group[tensor.group] = tensors_by_group.get(tensor.group, 0) + 1
            streams = [
                self._decoded_chunks(base_id, ckpt_id, t_index, manifest.tensors[t_index][2])
                for ckpt_id, manifest in zip(ckpt_ids, manifests, strict=False)
            ]
            pending: list[torch.Tensor] = [torch.empty(0, dtype=torch.float64)] * n
            remaining = math.prod(tensor.shape)
            while remaining > 0:
                step = min(max_elements, remaining)
                for row in range(n):
                    filled = 0
                    while filled < step:
                        if pending[row].numel() == 0:
                            nxt = next(streams[row], None)
                            if nxt is None:
                                raise DeltaUnavailable(f"stored delta of {tensor.name} is short")
                            pending[row] = nxt
                        take = min(step - filled, pending[row].numel())
                        buffer[row, filled : filled + take].copy_(pending[row][:take])
                        pending[row] = pending[row][take:]
                        filled += take
                group.update(buffer[:, :step])
                remaining -= step
                check_cancelled()
        return DeltaMoments(moments, tensors_by_group)

    def read(self, base_id: str, ckpt_id: str) -> Iterator[tuple[str, Iterator[EncodedChunk]]]:
        """A stored delta, tensor by tensor (chunks of EncodedChunk); FailedPrecondition when there is none."""
        manifest = self.manifest(base_id, ckpt_id)
        if manifest is None:
            raise FailedPrecondition("no stored delta for this checkpoint and base; call RegisterCheckpoint", reason="DELTA_MISSING")

        def chunks(t_index: int, counts: list[int]) -> Iterator[EncodedChunk]:
            for c_index in range(len(counts)):
                payload = self.store.get(chunk_key(base_id, ckpt_id, t_index, c_index))
                if payload is None:
                    raise FailedPrecondition("a stored delta chunk was evicted or damaged; register again", reason="DELTA_MISSING")
                yield from_bytes(payload)

        for t_index, (name, _shape, counts) in enumerate(manifest.tensors):
            yield name, chunks(t_index, counts)
