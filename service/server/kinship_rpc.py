"""Proto translation for Kinship: a request to a validated query, an outcome to its response.

No logic and no I/O: the servicer (heavy path) and the front's cache-only answers
(`light.py`) both validate with `kinship_query` and answer with `kinship_response`, so
the two layouts give the same statuses and the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kinship_client.v1 import common_pb2, kinship_pb2
from kinship_service.cache.registry import KinshipOutcome
from kinship_service.checkpoints.sources import CheckpointSpec
from kinship_service.errors import InvalidArgument
from kinship_service.kinship.exact import SKIP_MISSING, SKIP_NOT_FLOATING, SKIP_SHAPE, ExactKinship
from kinship_service.kinship.modes import AUTO, EXACT, FINGERPRINT, KinshipMode
from kinship_service.kinship.sign_conflict import mean_sign_conflict
from kinship_service.kinship.similarity import Similarities
from kinship_service.server.refs import spec_from_ref

MODES: dict[int, KinshipMode] = {
    common_pb2.KINSHIP_MODE_UNSPECIFIED: AUTO,
    common_pb2.KINSHIP_MODE_AUTO: AUTO,
    common_pb2.KINSHIP_MODE_EXACT: EXACT,
    common_pb2.KINSHIP_MODE_FINGERPRINT: FINGERPRINT,
}
"""The request's KinshipMode enum as a mode (unspecified: auto)."""

_SKIP_REASONS = {
    SKIP_MISSING: kinship_pb2.SKIP_REASON_MISSING,
    SKIP_SHAPE: kinship_pb2.SKIP_REASON_SHAPE_MISMATCH,
    SKIP_NOT_FLOATING: kinship_pb2.SKIP_REASON_NOT_FLOATING,
}


@dataclass(frozen=True)
class KinshipQuery:
    """A validated KinshipRequest, as `KinshipCache.kinship` takes it."""

    base: CheckpointSpec
    models: list[CheckpointSpec]
    mode: KinshipMode
    leading_slice: bool
    per_layer: bool
    sign_conflict: bool = False


def kinship_query(request: kinship_pb2.KinshipRequest) -> KinshipQuery:
    """Validate a KinshipRequest (InvalidArgument naming the field at fault)."""
    if not request.HasField("base"):
        raise InvalidArgument("base is required: the checkpoint the models were fine-tuned from", field="base")
    if len(request.models) < 2:
        raise InvalidArgument(f"kinship needs at least two models, got {len(request.models)}", field="models")
    mode = MODES.get(request.mode)
    if mode is None:
        raise InvalidArgument(f"unknown kinship mode {request.mode}; use EXACT, FINGERPRINT or AUTO", field="mode")
    # Resolved (and confined to the allowed roots) by the cache layer, which can also answer
    # for Hub checkpoints pinned to a commit that have left the Hub cache.
    base = spec_from_ref(request.base, "base")
    models = [spec_from_ref(m, f"models[{i}]") for i, m in enumerate(request.models)]
    policy = request.shape_mismatch_policy
    if policy == common_pb2.SHAPE_MISMATCH_POLICY_ERROR:
        raise InvalidArgument("kinship takes SKIP or LEADING_SLICE, not ERROR", field="shape_mismatch_policy")
    if request.sign_conflict and mode == FINGERPRINT:
        raise InvalidArgument(
            "sign conflict is measured by the exact pass (a fingerprint keeps no coordinate's sign); "
            "use mode EXACT or AUTO with sign_conflict",
            field="sign_conflict",
        )
    leading = policy == common_pb2.SHAPE_MISMATCH_POLICY_LEADING_SLICE
    return KinshipQuery(base, models, mode, leading, request.per_layer, request.sign_conflict)


def values_proto(pcc: float, cosine: float, euclidean: float) -> common_pb2.KinshipValues:
    """A KinshipValues proto."""
    return common_pb2.KinshipValues(pcc=pcc, cosine=cosine, euclidean=euclidean)


def _pairs_proto(sims: Similarities) -> list[kinship_pb2.PairKinship]:
    return [
        kinship_pb2.PairKinship(first=i, second=j, values=values_proto(p, c, e)) for i, j, p, c, e in sims.pairs()
    ]


def kinship_response(outcome: KinshipOutcome, *, per_layer: bool) -> kinship_pb2.KinshipResponse:
    """The KinshipResponse of an outcome: values, what was compared, the mode used and the identities."""
    response = exact_response(outcome.result, per_layer=per_layer)
    response.mode_used = common_pb2.KINSHIP_MODE_FINGERPRINT if outcome.mode_used == FINGERPRINT else common_pb2.KINSHIP_MODE_EXACT
    for summary, identity in zip(response.models, outcome.identities, strict=False):
        summary.identity = identity
    return response


def exact_response(result: ExactKinship, *, per_layer: bool) -> kinship_pb2.KinshipResponse:
    """The KinshipResponse of a result (mode EXACT, no identities)."""
    sims = result.overall
    response = kinship_pb2.KinshipResponse(
        pairs=_pairs_proto(sims),
        mean=values_proto(*sims.mean()),
        mode_used=common_pb2.KINSHIP_MODE_EXACT,
        tensors_compared=len(result.plan.tensors),
        elements_compared=sims.count,
        sliced_tensors=[t.name for t in result.plan.tensors if t.sliced],
        skipped=[
            kinship_pb2.SkippedTensor(name=s.name, reason=_SKIP_REASONS[s.reason], detail=s.detail) for s in result.plan.skipped
        ],
        models=[
            kinship_pb2.ModelSummary(index=i, delta_norm=sims.norms[i], delta_mean=sims.means[i])
            for i in range(len(sims.norms))
        ],
        bytes_read=result.bytes_read,
        device=result.device,
        seconds=result.seconds,
    )
    if result.sign_conflict is not None:
        for pair in response.pairs:
            pair.sign_conflict = result.sign_conflict[pair.first][pair.second]
        response.mean_sign_conflict = mean_sign_conflict(result.sign_conflict)
    if per_layer:
        for group, group_sims in result.by_group.items():
            response.layers.append(
                kinship_pb2.LayerKinship(
                    group=group,
                    tensors=result.tensors_by_group[group],
                    elements=group_sims.count,
                    pairs=_pairs_proto(group_sims),
                    mean=values_proto(*group_sims.mean()),
                )
            )
    return response
