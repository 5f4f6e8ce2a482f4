"""Cache keys: one function per kind of entry, all derived from content identities.

An entry's key names everything its value depends on (schema version, fingerprint
parameters, the identities of base and checkpoints, the compared tensor set), so a
changed checkpoint, a new sketch width or another tensor set simply misses.
"""

from __future__ import annotations

import re

from kinship_service.kinship.exact import ComparisonPlan
from kinship_service.kinship.fingerprint import FINGERPRINT_VERSION, SKETCH_SEED, SKETCH_WIDTH, tensor_set_key

SCHEMA = "v1"

COMMIT = re.compile(r"[0-9a-f]{40}")
"""A full Hub commit hash (a revision that pins its content)."""


def fingerprint_key(base: str, ckpt: str) -> str:
    """The fingerprint of checkpoint `ckpt` against base `base` (identities)."""
    return f"fp/{SCHEMA}.{FINGERPRINT_VERSION}.{SKETCH_WIDTH}.{SKETCH_SEED}/{base}/{ckpt}"


def delta_key(base: str, ckpt: str) -> str:
    """The manifest of a stored delta (written after its chunks)."""
    return f"delta/{SCHEMA}/{base}/{ckpt}"


def chunk_key(base: str, ckpt: str, tensor: int, chunk: int) -> str:
    """Chunk `chunk` of tensor number `tensor` (in plan order) of a stored delta."""
    return f"dchunk/{SCHEMA}/{base}/{ckpt}/{tensor}/{chunk}"


def pair_key(base: str, a: str, b: str, plan_key: str) -> str:
    """The exact similarities of a pair of checkpoints (either order) over one tensor set."""
    first, second = sorted((a, b))
    return f"pair/{SCHEMA}/{base}/{first}/{second}/{plan_key}"


def hubref_key(repo_id: str, commit: str) -> str:
    """The record of a Hub checkpoint at a commit (identity and headers), for when it leaves the Hub cache."""
    return f"hubref/{SCHEMA}/{repo_id}@{commit}"


def plan_key(plan: ComparisonPlan) -> str:
    """Digest of the tensor set a pass compares (names, shapes, and which were sliced)."""
    return tensor_set_key([(t.name + ("#sliced" if t.sliced else ""), t.shape) for t in plan.tensors])
