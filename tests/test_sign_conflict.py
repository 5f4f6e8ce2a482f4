"""Sign conflict: the accumulator, and the Kinship RPC's exact pass, against a float64 NumPy reference written here."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch

from kinship_client import KinshipRpcError
from kinship_service.checkpoints.synthetic import make_base, make_family, save_checkpoint
from kinship_service.kinship.sign_conflict import SignConflictMoments

from .conftest import SMALL
from .test_kinship_exact import _load


def reference_conflict(x: np.ndarray, y: np.ndarray) -> float:
    """sum(|x|+|y| where x*y < 0) / sum(|x|+|y|), coordinate by coordinate in float64."""
    mass = np.abs(x) + np.abs(y)
    disagree = np.sign(x) * np.sign(y) < 0
    return float(mass[disagree].sum() / mass.sum())


def test_accumulator_matches_reference_over_blocks_with_zeros() -> None:
    rng = np.random.default_rng(7)
    deltas = rng.standard_normal((4, 10_000))
    deltas[:, ::7] = 0.0  # zeros never conflict but count in the denominator
    deltas[1] = 0.5 * deltas[0] + rng.standard_normal(10_000)  # a correlated pair: less conflict
    moments = SignConflictMoments(4)
    for start in range(0, 10_000, 3_333):
        moments.update(torch.from_numpy(deltas[:, start : start + 3_333]))
    got = moments.fractions()
    for i in range(4):
        assert got[i][i] == 0.0
        for j in range(4):
            if i != j:
                assert math.isclose(got[i][j], reference_conflict(deltas[i], deltas[j]), rel_tol=1e-12)
    assert got[0][1] < got[0][2]


def test_identities() -> None:
    d = torch.tensor([[1.0, -2.0, 3.0, 0.0], [1.0, -2.0, 3.0, 0.0], [-1.0, 2.0, -3.0, 0.0]], dtype=torch.float64)
    moments = SignConflictMoments(3)
    moments.update(d)
    got = moments.fractions()
    assert got[0][1] == 0.0  # identical task vectors never disagree
    assert got[0][2] == 1.0  # opposite ones always do
    with pytest.raises(ValueError, match=r"\(3, k\)"):
        moments.update(d[:2])


@pytest.mark.both_layouts
def test_kinship_rpc_returns_and_caches_sign_conflict(client, model_root) -> None:
    base = make_base(SMALL, seed=11)
    models = make_family(base, 3, rho=0.4, seed=12)
    base_dir = save_checkpoint(base, model_root / "base", dtype=torch.bfloat16)
    dirs = [save_checkpoint(m, model_root / f"m{i}", dtype=torch.bfloat16) for i, m in enumerate(models)]
    names = sorted(SMALL.tensor_shapes())
    base_t = _load(base_dir)
    flat = []
    for d in dirs:
        tensors = _load(d)
        flat.append(np.concatenate([(tensors[n].double() - base_t[n].double()).numpy().ravel() for n in names]))
    plain = client.kinship(str(base_dir), [str(d) for d in dirs], mode="exact")
    assert all(p.sign_conflict is None for p in plain.pairs) and plain.mean_sign_conflict is None
    result = client.kinship(str(base_dir), [str(d) for d in dirs], mode="auto", sign_conflict=True)
    assert result.mode == "exact" and result.bytes_read > 0  # pair results were cached, sign conflict was not
    expected = {(p.first, p.second): reference_conflict(flat[p.first], flat[p.second]) for p in result.pairs}
    for pair in result.pairs:
        assert pair.sign_conflict is not None
        assert math.isclose(pair.sign_conflict, expected[(pair.first, pair.second)], rel_tol=1e-9)
    assert result.mean_sign_conflict is not None
    assert math.isclose(result.mean_sign_conflict, sum(expected.values()) / 3, rel_tol=1e-9)
    again = client.kinship(str(base_dir), [str(d) for d in dirs], mode="exact", sign_conflict=True)
    assert again.bytes_read == 0
    assert [p.sign_conflict for p in again.pairs] == [p.sign_conflict for p in result.pairs]
    with pytest.raises(KinshipRpcError) as error:
        client.kinship(str(base_dir), [str(d) for d in dirs], mode="fingerprint", sign_conflict=True)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and error.value.field == "sign_conflict"
