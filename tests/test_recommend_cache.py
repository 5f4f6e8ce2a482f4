"""RankCandidates and ShouldStop answer from cached fingerprints (FINGERPRINT mode) once checkpoints are registered."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from kinship_client import KinshipRpcError
from kinship_client.population import Member
from kinship_service.checkpoints.synthetic import make_base, make_family, save_checkpoint

from .conftest import SMALL

pytestmark = pytest.mark.both_layouts  # each server test also runs through the front (conftest)


def test_rank_and_stop_from_fingerprints(client, model_root):
    base = make_base(SMALL, seed=60)
    models = make_family(base, 3, rho=0.6, seed=61)
    base_dir = save_checkpoint(base, model_root / "base")
    dirs = [save_checkpoint(m, model_root / f"m{i}") for i, m in enumerate(models)]
    members = [Member(name=f"m{i}", checkpoint=str(d), score=60.0 + i) for i, d in enumerate(dirs)]

    with pytest.raises(KinshipRpcError) as info:
        client.rank_candidates(members, top_k=3, base=str(base_dir), mode="fingerprint")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION

    for d in dirs:
        client.register_checkpoint(str(d), str(base_dir))
    ranking = client.rank_candidates(members, top_k=3, base=str(base_dir), mode="fingerprint")
    assert ranking.mode == "fingerprint"
    deltas = {f"m{i}": np.concatenate([(m[k].double() - base[k].double()).numpy().ravel() for k in sorted(base)]) for i, m in enumerate(models)}
    for rec in ranking.recommendations:
        expected = float(np.corrcoef(deltas[rec.first], deltas[rec.second])[0, 1])
        assert abs(rec.kinship - expected) < 0.01
    decision = client.should_stop(members, top_k=3, base=str(base_dir), mode="fingerprint", kinship_threshold=0.5)
    assert decision.mode == "fingerprint"
    assert decision.stop and decision.reasons == ["kinship_saturated"]
    # AUTO: the stored deltas give exact values (a pass over them; through the front it is forwarded),
    # then the stored pair results answer the same question again (in the front itself)
    for _ in range(2):
        exact = client.rank_candidates(members, top_k=3, base=str(base_dir), mode="auto")
        assert exact.mode == "exact"
        for rec in exact.recommendations:
            expected = float(np.corrcoef(deltas[rec.first], deltas[rec.second])[0, 1])
            assert abs(rec.kinship - expected) < 1e-9
