"""Method advice: the rules on constructed inputs, and RankCandidates(suggest_method) end to end."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch

from kinship_client import KinshipRpcError, Member
from kinship_service.checkpoints.synthetic import make_base, save_checkpoint
from kinship_service.errors import InvalidArgument
from kinship_service.guidance.method_advice import MethodAdviceOptions, advise_method, method_advice_options

from .conftest import SMALL
from .test_sign_conflict import reference_conflict

OPTIONS = MethodAdviceOptions()


def test_high_sign_conflict_suggests_ties_with_density() -> None:
    advice = advise_method(0.95, "pcc", 0.46, method_advice_options(ties_density=0.3))
    assert advice.method == "ties" and advice.parameters == {"density": 0.3, "weight": 1.0}
    assert advice.sign_conflict == 0.46 and "sign conflict 0.460" in advice.reason
    assert advise_method(0.95, "pcc", 0.4, OPTIONS).method == "linear"  # below the default 0.45


def test_high_kinship_low_conflict_suggests_linear() -> None:
    advice = advise_method(0.92, "cosine", 0.1, OPTIONS)
    assert advice.method == "linear" and advice.parameters == {"weight": 1.0}
    assert "DAM" in advice.reason


def test_otherwise_slerp_with_t_and_unknown_conflict_said() -> None:
    advice = advise_method(0.5, "pcc", None, method_advice_options(slerp_t=0.3))
    assert advice.method == "slerp" and advice.parameters == {"t": 0.3}
    assert "sign conflict unknown" in advice.reason and advice.sign_conflict is None


def test_euclidean_never_takes_the_kinship_rule() -> None:
    assert advise_method(0.99, "euclidean", 0.1, OPTIONS).method == "slerp"
    assert advise_method(0.99, "euclidean", 0.9, OPTIONS).method == "ties"


def test_thresholds_are_inclusive() -> None:
    assert advise_method(0.9, "pcc", 0.0, OPTIONS).method == "linear"
    assert advise_method(0.0, "pcc", 0.45, OPTIONS).method == "ties"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ties_density": 0.0}, "ties_density"),
        ({"ties_density": 1.5}, "ties_density"),
        ({"ties_sign_conflict": -0.1}, "ties_sign_conflict_threshold"),
        ({"linear_kinship": math.nan}, "linear_kinship_threshold"),
        ({"slerp_t": 2.0}, "slerp_t"),
    ],
)
def test_options_out_of_range_name_the_field(kwargs, field) -> None:
    with pytest.raises(InvalidArgument) as error:
        method_advice_options(**kwargs)
    assert error.value.field == field


def _two_opposed_one_aligned(model_root):
    """a and b share most of their task vector (aligned), c is -a plus noise (sign conflict near 1 with a)."""
    base = make_base(SMALL, seed=21)
    generator = torch.Generator().manual_seed(22)
    direction = {k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    noise = {name: {k: 0.002 * torch.randn(v.shape, generator=generator) for k, v in base.items()} for name in "abc"}
    models = {
        "a": {k: base[k] + direction[k] + noise["a"][k] for k in base},
        "b": {k: base[k] + direction[k] + noise["b"][k] for k in base},
        "c": {k: base[k] - direction[k] + noise["c"][k] for k in base},
    }
    paths = {"base": str(save_checkpoint(base, model_root / "base"))}
    flat = {}
    for name, tensors in models.items():
        paths[name] = str(save_checkpoint(tensors, model_root / name))
    from .test_kinship_exact import _load

    base_t = _load(model_root / "base")
    names = sorted(base_t)
    for name in models:
        t = _load(model_root / name)
        flat[name] = np.concatenate([(t[n].double() - base_t[n].double()).numpy().ravel() for n in names])
    return paths, flat


@pytest.mark.both_layouts
def test_rank_candidates_suggests_methods_from_measured_sign_conflict(client, model_root) -> None:
    paths, flat = _two_opposed_one_aligned(model_root)
    members = [Member(n, s, paths[n]) for n, s in (("a", 0.6), ("b", 0.5), ("c", 0.4))]
    plain = client.rank_candidates(members, top_k=3, base=paths["base"])
    assert all(r.method_advice is None for r in plain.recommendations)
    ranked = client.rank_candidates(members, top_k=3, base=paths["base"], suggest_method=True, mode="exact")
    by_pair = {frozenset((r.first, r.second)): r for r in ranked.recommendations}
    ab = by_pair[frozenset("ab")].method_advice
    ac = by_pair[frozenset("ac")].method_advice
    assert ab is not None and ac is not None
    assert ab.sign_conflict is not None and math.isclose(ab.sign_conflict, reference_conflict(flat["a"], flat["b"]), rel_tol=1e-9)
    assert ac.sign_conflict is not None and math.isclose(ac.sign_conflict, reference_conflict(flat["a"], flat["c"]), rel_tol=1e-9)
    assert ab.method == "linear"  # PCC about 0.96, little conflict
    assert ac.method == "ties" and ac.parameters["density"] == 0.5


@pytest.mark.both_layouts
def test_rank_candidates_advice_options_are_checked(client, model_root) -> None:
    paths, _ = _two_opposed_one_aligned(model_root)
    members = [Member(n, s, paths[n]) for n, s in (("a", 0.6), ("b", 0.5), ("c", 0.4))]
    with pytest.raises(KinshipRpcError) as error:
        client.rank_candidates(members, top_k=3, base=paths["base"], suggest_method=True, method_options={"ties_density": 0})
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and error.value.field == "ties_density"
    with pytest.raises(KinshipRpcError) as error:
        client.rank_candidates(members, top_k=3, base=paths["base"], method_options={"slerp_t": 0.2})
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and error.value.field == "slerp_t"
    with pytest.raises(ValueError, match="ties_density"):
        client.rank_candidates(members, top_k=3, base=paths["base"], method_options={"density": 0.5})
