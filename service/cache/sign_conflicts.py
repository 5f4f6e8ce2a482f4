"""Stored sign conflicts: per pair of checkpoints, base and tensor set, beside the pair results.

Kept apart from `answers.PairResults` (whose records predate it) so that pair results
cached before sign conflict existed still answer requests that do not ask for it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from kinship_service.cache.keys import SCHEMA, plan_key
from kinship_service.cache.store import CacheStore
from kinship_service.kinship.exact import ComparisonPlan
from kinship_service.server import metrics

_VALUE = struct.Struct("<d")


def sign_conflict_key(base: str, a: str, b: str, key_of_plan: str) -> str:
    """The sign conflict of a pair of checkpoints (symmetric, so either order) over one tensor set."""
    first, second = sorted((a, b))
    return f"signc/{SCHEMA}/{base}/{first}/{second}/{key_of_plan}"


class SignConflicts:
    """Sign-conflict fractions per pair in the cache store."""

    def __init__(self, store: CacheStore) -> None:
        self.store = store

    def get(self, base_id: str, ids: Sequence[str], plan: ComparisonPlan) -> list[list[float]] | None:
        """The n x n matrix of `ids` over `plan` when every pair is stored, else None (a damaged entry is dropped)."""
        key_of_plan = plan_key(plan)
        n = len(ids)
        matrix = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                key = sign_conflict_key(base_id, ids[i], ids[j], key_of_plan)
                payload = self.store.get(key)
                if payload is None:
                    return None
                value = _VALUE.unpack(payload)[0] if len(payload) == _VALUE.size else math.nan
                if not 0.0 <= value <= 1.0:
                    self.store.delete(key)
                    metrics.CACHE_CORRUPT.inc()
                    return None
                matrix[i][j] = matrix[j][i] = value
        return matrix

    def put(self, base_id: str, ids: Sequence[str], plan: ComparisonPlan, matrix: Sequence[Sequence[float]]) -> None:
        """Store every pair's value of `matrix` (a pass over `plan`)."""
        key_of_plan = plan_key(plan)
        n = len(ids)
        items = [
            (sign_conflict_key(base_id, ids[i], ids[j], key_of_plan), _VALUE.pack(float(matrix[i][j])))
            for i in range(n)
            for j in range(i + 1, n)
        ]
        self.store.put_many(items)
