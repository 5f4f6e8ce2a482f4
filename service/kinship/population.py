"""Kinship among the members of a merging population: the values the caller already has, plus one computation.

RankCandidates and ShouldStop need the kinship of every pair of top-k members. Values the
caller sent (`known_kinship`) are used as given; the remaining pairs come from ONE
computation over the base and only the members that appear in a missing pair (a
`KinshipBackend`, the cache's `KinshipCache.compute`: pair results, stored deltas,
fingerprints or one exact pass), so every needed checkpoint is read at most once
whatever the number of pairs. `cached_pairwise_kinship` does the same with a
cache-only backend and answers None where a pass would be needed (the front process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Protocol

from kinship_service.checkpoints.sources import Checkpoint, CheckpointSpec, resolve
from kinship_service.errors import InvalidArgument
from kinship_service.guidance.population import EUCLIDEAN, PCC, Pair, pair_key
from kinship_service.kinship.exact import ExactKinship
from kinship_service.kinship.modes import NONE, KinshipMode, ModeUsed


class KinshipBackend(Protocol):
    """Computes kinship among checkpoints against a base in a mode; returns the result and the mode used."""

    def __call__(
        self, base: Checkpoint, models: Sequence[Checkpoint], mode: KinshipMode, check_cancelled: Callable[[], None]
    ) -> tuple[ExactKinship, ModeUsed]: ...


class CachedKinshipBackend(Protocol):
    """Like KinshipBackend from a cache alone: None where the answer needs a pass over weights or deltas."""

    def __call__(self, base: Checkpoint, models: Sequence[Checkpoint], mode: KinshipMode) -> tuple[ExactKinship, ModeUsed] | None: ...


@dataclass(frozen=True)
class MemberCheckpoint:
    """A population member's checkpoint, with the request field to blame for problems with it."""

    name: str
    spec: CheckpointSpec | None
    """None when the request gave no checkpoint for the member."""
    field: str
    """For example `members[3].checkpoint`."""


@dataclass
class _Missing:
    """The pairs the caller gave no value for, and the checkpoints that computing them takes."""

    values: dict[Pair, float]
    """The known values of the pairs."""
    pairs: list[Pair]
    needed: list[MemberCheckpoint]
    """The members in a missing pair, in member order (the models of the computation)."""
    base: Checkpoint | None = None
    checkpoints: tuple[Checkpoint, ...] = ()

    def filled(self, result: ExactKinship, metric: str) -> dict[Pair, float]:
        """Every value: the known ones and the missing ones from `result` (models in `needed` order)."""
        matrix = {PCC: result.overall.pcc, EUCLIDEAN: result.overall.euclidean}.get(metric, result.overall.cosine)
        index = {m.name: i for i, m in enumerate(self.needed)}
        for a, b in self.pairs:
            self.values[(a, b)] = float(matrix[index[a]][index[b]])
        return self.values


def _missing(
    allowed_roots: Sequence[Path],
    base_spec: CheckpointSpec | None,
    members: Sequence[MemberCheckpoint],
    known: Mapping[Pair, float],
    base_field: str,
    pairs: Sequence[Pair] | None = None,
) -> _Missing:
    """The pairs to compute (`pairs`, or every pair of `members`), their members' checkpoints resolved.

    InvalidArgument when a needed checkpoint or the base is not given.
    """
    values: dict[Pair, float] = {}
    missing: list[Pair] = []
    for a, b in combinations([m.name for m in members], 2) if pairs is None else pairs:
        key = pair_key(a, b)
        if key in known:
            values[key] = known[key]
        else:
            missing.append(key)
    if not missing:
        return _Missing(values, missing, [])
    needed_names = {name for pair in missing for name in pair}
    needed = [m for m in members if m.name in needed_names]
    for member in needed:
        if member.spec is None:
            partners = sorted({b if a == member.name else a for a, b in missing if member.name in (a, b)})
            raise InvalidArgument(
                f"member {member.name!r} has no checkpoint, and its kinship with {', '.join(partners)} is not in "
                "known_kinship; give its checkpoint or those values",
                reason="CHECKPOINT_REQUIRED",
                field=member.field,
            )
    if base_spec is None:
        raise InvalidArgument(
            "base is required to compute kinship (the checkpoint the members were fine-tuned from), unless every "
            "needed value is given in known_kinship",
            field=base_field,
        )
    base = resolve(base_spec, allowed_roots, base_field)
    checkpoints = tuple(resolve(m.spec, allowed_roots, m.field) for m in needed if m.spec is not None)
    return _Missing(values, missing, needed, base, checkpoints)


def pairwise_kinship(
    allowed_roots: Sequence[Path],
    base_spec: CheckpointSpec | None,
    members: Sequence[MemberCheckpoint],
    metric: str,
    mode: KinshipMode,
    known: Mapping[Pair, float],
    compute: KinshipBackend,
    check_cancelled: Callable[[], None] = lambda: None,
    *,
    base_field: str = "base",
    pairs: Sequence[Pair] | None = None,
) -> tuple[dict[Pair, float], ModeUsed]:
    """Kinship under `metric` for every pair of `members` (or only `pairs`), and the mode used (`exact`, `fingerprint` or `none`).

    `known` values win over computed ones; `none` means nothing had to be computed. The
    missing pairs come from one `compute` over the base and the members they involve.
    Raises InvalidArgument when a value must be computed but the base or a member's
    checkpoint is missing, and whatever resolving, reading and `compute` raise
    (NotFound, PermissionDenied, FailedPrecondition, ...), in terms of the members.
    """
    todo = _missing(allowed_roots, base_spec, members, known, base_field, pairs)
    if todo.base is None:
        return todo.values, NONE
    with _in_member_terms(todo.needed):
        result, mode_used = compute(todo.base, todo.checkpoints, mode, check_cancelled)
    return todo.filled(result, metric), mode_used


def cached_pairwise_kinship(
    allowed_roots: Sequence[Path],
    base_spec: CheckpointSpec | None,
    members: Sequence[MemberCheckpoint],
    metric: str,
    mode: KinshipMode,
    known: Mapping[Pair, float],
    lookup: CachedKinshipBackend,
    *,
    base_field: str = "base",
    pairs: Sequence[Pair] | None = None,
) -> tuple[dict[Pair, float], ModeUsed] | None:
    """`pairwise_kinship` with a cache-only backend: the same answer and errors, or None where a pass is needed."""
    todo = _missing(allowed_roots, base_spec, members, known, base_field, pairs)
    if todo.base is None:
        return todo.values, NONE
    with _in_member_terms(todo.needed):
        found = lookup(todo.base, todo.checkpoints, mode)
    if found is None:
        return None
    result, mode_used = found
    return todo.filled(result, metric), mode_used


@contextmanager
def _in_member_terms(needed: Sequence[MemberCheckpoint]) -> Iterator[None]:
    """Re-word errors about `models[i]` of the computation in terms of the request's members."""
    try:
        yield
    except InvalidArgument as exc:
        if exc.field != "models":
            raise
        message = exc.message
        fields = []
        for i in reversed(range(len(needed))):  # reversed: models[12] before models[1]
            token = f"models[{i}]"
            if token in message:
                prefix = needed[i].field.rsplit(".", 1)[0]
                message = message.replace(token, f"{prefix} ({needed[i].name!r})")
                fields.append(needed[i].field)
        raise InvalidArgument(message, reason=exc.reason, field=fields[-1] if fields else "members") from None
