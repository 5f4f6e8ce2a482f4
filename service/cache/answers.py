"""Cache-only answers: kinship from stored pair results or from fingerprints, never reading weights.

Each answerer returns a result, or None when the cache cannot answer (then a pass is
needed). Bad input found on the way (a zero or constant task vector) raises the same
KinshipError the exact pass would. `kinship_result` is the one assembly of an
ExactKinship from cached parts; the delta pass uses it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kinship_service.cache.codecs import PairEntry, PairRecord, pair_entry, similarities_of_pairs, swapped
from kinship_service.cache.fingerprints import FingerprintCache
from kinship_service.cache.keys import pair_key, plan_key
from kinship_service.cache.plans import PlanFacts
from kinship_service.cache.resolution import Resolved
from kinship_service.cache.store import CacheStore
from kinship_service.kinship.exact import ComparisonPlan, ExactKinship, _group_key, _require_defined
from kinship_service.kinship.fingerprint import Fingerprint, estimate
from kinship_service.kinship.similarity import Similarities
from kinship_service.server import metrics


def kinship_result(
    overall: Similarities,
    by_group: Mapping[str, Similarities],
    tensors_by_group: dict[str, int],
    plan: ComparisonPlan,
    device: torch.device | str,
    *,
    check: Sequence[Resolved] | None = None,
    seconds: float = 0.0,
) -> ExactKinship:
    """An ExactKinship from cached parts (no bytes read); layer groups in model order.

    `check`: the models, when the values are new (not stored results of a pass that
    checked them): InvalidArgument when a task vector is zero or constant.
    """
    if check is not None:
        _require_defined(overall, check)  # type: ignore[arg-type]  # reads .label only; see the report on exact._require_defined
    return ExactKinship(
        overall=overall,
        by_group={g: by_group[g] for g in sorted(by_group, key=_group_key)},
        tensors_by_group=tensors_by_group,
        plan=plan,
        bytes_read=0,
        device=str(device),
        seconds=seconds,
    )


class PairResults:
    """Exact similarities per pair of checkpoints, base and tensor set, in the cache store."""

    def __init__(self, store: CacheStore) -> None:
        self.store = store

    def answer(self, base_id: str, ids: Sequence[str], plan: ComparisonPlan, facts: PlanFacts, device: torch.device) -> ExactKinship | None:
        """The kinship of `ids` over `plan` when every pair's result is stored, else None (a damaged entry is dropped)."""
        key_of_plan = plan_key(plan)
        n = len(ids)
        per_group: dict[str, dict[tuple[int, int], PairEntry]] = {}
        for i in range(n):
            for j in range(i + 1, n):
                key = pair_key(base_id, ids[i], ids[j], key_of_plan)
                payload = self.store.get(key)
                if payload is None:
                    return None
                try:
                    record = PairRecord.from_bytes(payload)
                except (ValueError, KeyError, TypeError, IndexError):
                    self.store.delete(key)
                    metrics.CACHE_CORRUPT.inc()
                    return None
                swap = record.ids[0] != ids[i]
                for group, entry in record.groups.items():
                    per_group.setdefault(group, {})[(i, j)] = swapped(entry) if swap else entry
        overall = similarities_of_pairs(per_group.pop("*"), n)
        tensors_by_group = dict(facts.tensors_by_group)
        by_group = {g: similarities_of_pairs(per_group[g], n) for g in tensors_by_group if g in per_group}
        return kinship_result(overall, by_group, tensors_by_group, plan, device)

    def put(self, base_id: str, ids: Sequence[str], plan: ComparisonPlan, result: ExactKinship) -> None:
        """Store every pair's result of `result` (a pass over `plan`)."""
        key_of_plan = plan_key(plan)
        n = len(ids)
        items: list[tuple[str, bytes]] = []
        for i in range(n):
            for j in range(i + 1, n):
                groups = {"*": pair_entry(result.overall, i, j)}
                for group, sims in result.by_group.items():
                    groups[group] = pair_entry(sims, i, j)
                record = PairRecord((ids[i], ids[j]), groups)
                items.append((pair_key(base_id, ids[i], ids[j], key_of_plan), record.to_bytes()))
        self.store.put_many(items)


def usable_fingerprints(
    fingerprints: FingerprintCache, base_id: str, ids: Sequence[str], facts: PlanFacts
) -> tuple[list[Fingerprint], list[int]]:
    """The fingerprints of `ids` over exactly the plan's tensor set, and the indices of those missing."""
    tensors = facts.tensor_list
    sliced = facts.sliced
    fps: list[Fingerprint] = []
    missing: list[int] = []
    for i, ckpt_id in enumerate(ids):
        fp = fingerprints.get(base_id, ckpt_id)
        if fp is None or sliced or fp.tensors != tensors:
            missing.append(i)
        else:
            fps.append(fp)
    return fps, missing


def from_fingerprints(fps: Sequence[Fingerprint], plan: ComparisonPlan, facts: PlanFacts, models: Sequence[Resolved]) -> ExactKinship:
    """Estimated kinship of the models from their fingerprints (no per-layer breakdown)."""
    return kinship_result(estimate(fps), {}, dict(facts.tensors_by_group), plan, "cpu", check=models)


