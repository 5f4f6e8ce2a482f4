"""Kinship among the members of a merging population: the values the caller already has, plus one exact pass.

RankCandidates and ShouldStop need the kinship of every pair of top-k members. Values the
caller sent (`known_kinship`) are used as given; the remaining pairs come from ONE exact
streaming pass over the base and only the members that appear in a missing pair, so every
needed checkpoint is read once whatever the number of pairs.

This is the seam for the fingerprint cache: pass `compute` (a `KinshipBackend`, for
example a wrapper of `registry.KinshipCache.kinship`) and FINGERPRINT and AUTO go through
it. Without it (the default) FINGERPRINT is FAILED_PRECONDITION and AUTO means EXACT.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Protocol

import torch

from kinship_service.checkpoints.sources import Checkpoint, CheckpointSpec, resolve
from kinship_service.config import Settings
from kinship_service.errors import FailedPrecondition, InvalidArgument
from kinship_service.guidance.recommend import EUCLIDEAN, PCC, Pair, pair_key
from kinship_service.kinship.exact import ExactKinship, exact_kinship

EXACT = "exact"
FINGERPRINT = "fingerprint"
AUTO = "auto"
NONE = "none"
"""`mode_used` when every value came from the caller and nothing was computed."""


class KinshipBackend(Protocol):
    """Computes kinship among checkpoints against a base in a mode; returns the result and the mode used."""

    def __call__(
        self, base: Checkpoint, models: Sequence[Checkpoint], mode: str, check_cancelled: Callable[[], None]
    ) -> tuple[ExactKinship, str]: ...


@dataclass(frozen=True)
class MemberCheckpoint:
    """A population member's checkpoint, with the request field to blame for problems with it."""

    name: str
    spec: CheckpointSpec | None
    """None when the request gave no checkpoint for the member."""
    field: str
    """For example `members[3].checkpoint`."""


def pairwise_kinship(
    settings: Settings,
    device: torch.device | str,
    base_spec: CheckpointSpec | None,
    members: Sequence[MemberCheckpoint],
    metric: str,
    mode: str,
    known: Mapping[Pair, float],
    check_cancelled: Callable[[], None] = lambda: None,
    *,
    base_field: str = "base",
    on_exact: Callable[[ExactKinship], None] | None = None,
    compute: KinshipBackend | None = None,
) -> tuple[dict[Pair, float], str]:
    """Kinship under `metric` for every pair of `members`, and the mode used (`exact`, `fingerprint` or `none`).

    `known` values win over computed ones; `none` means nothing had to be computed. The
    missing pairs come from one computation over the base and the members they involve:
    `compute` when given, else one exact pass (`exact_kinship`). Raises InvalidArgument
    when a value must be computed but the base or a member's checkpoint is missing,
    FailedPrecondition for FINGERPRINT mode without `compute`, and whatever resolving and
    reading the checkpoints raises (NotFound, PermissionDenied, ...). `on_exact` sees the
    exact pass's result (for metrics; not called when `compute` is given).
    """
    if mode not in (EXACT, FINGERPRINT, AUTO):
        raise InvalidArgument(f"unknown kinship mode {mode!r}", field="mode")
    values: dict[Pair, float] = {}
    missing: list[Pair] = []
    for a, b in combinations([m.name for m in members], 2):
        key = pair_key(a, b)
        if key in known:
            values[key] = known[key]
        else:
            missing.append(key)
    if not missing:
        return values, NONE
    if mode == FINGERPRINT and compute is None:
        raise FailedPrecondition(
            f"{len(missing)} kinship value(s) must be computed and FINGERPRINT mode needs the fingerprint cache, "
            "which this server does not have yet; use EXACT or AUTO, or send the values in known_kinship",
            reason="MODE_UNAVAILABLE",
        )
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
    roots = settings.allowed_roots
    base = resolve(base_spec, roots, base_field)
    checkpoints = [resolve(m.spec, roots, m.field) for m in needed if m.spec is not None]
    try:
        if compute is not None:
            result, mode_used = compute(base, checkpoints, mode, check_cancelled)
        else:
            result = exact_kinship(
                base,
                checkpoints,
                device=device,
                chunk_bytes=settings.chunk_bytes,
                check_cancelled=check_cancelled,
                use_cpu_kernel=settings.cpu_kernel,
            )
            mode_used = EXACT
            if on_exact is not None:
                on_exact(result)
    except InvalidArgument as exc:
        if exc.field != "models":
            raise
        raise _in_member_terms(exc, needed) from None
    matrix = {PCC: result.overall.pcc, EUCLIDEAN: result.overall.euclidean}.get(metric, result.overall.cosine)
    index = {m.name: i for i, m in enumerate(needed)}
    for a, b in missing:
        values[(a, b)] = float(matrix[index[a]][index[b]])
    return values, mode_used


def _in_member_terms(exc: InvalidArgument, needed: Sequence[MemberCheckpoint]) -> InvalidArgument:
    """Re-word an exact-pass error about `models[i]` in terms of the request's members."""
    message = exc.message
    fields = []
    for i in reversed(range(len(needed))):  # reversed: models[12] before models[1]
        token = f"models[{i}]"
        if token in message:
            prefix = needed[i].field.rsplit(".", 1)[0]
            message = message.replace(token, f"{prefix} ({needed[i].name!r})")
            fields.append(needed[i].field)
    return InvalidArgument(message, reason=exc.reason, field=fields[-1] if fields else "members")
