"""The advice options of RankCandidates and ShouldStop as pure functions, on constructed populations.

Expected answers are worked out by hand in the comments, or (the gain model) by an
independent float64 NumPy least-squares solve of the same ridge problem written as an
augmented system, never by the code under test.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from kinship_service.errors import InvalidArgument
from kinship_service.guidance import advice, population, rank, stop
from kinship_service.guidance.advice import RankOptions
from kinship_service.guidance.gain_model import GainPoint, fit_gain_model, gain_history
from kinship_service.guidance.population import Member, pair_key


def ridge_reference(points: list[tuple[float, float, float]], lam: float) -> tuple[float, float, float, float, float]:
    """(intercept, kinship slope, gap slope, kinship centre, gap centre) by lstsq on the augmented system.

    Rows [1, k - kc, g - gc] -> gain, plus the prior's rows sqrt(lam) [1, 0, 0],
    sqrt(lam var_k) [0, 1, 0], sqrt(lam var_g) [0, 0, 1] -> 0.
    """
    data = np.array(points, dtype=np.float64)
    k, g, y = data[:, 0], data[:, 1], data[:, 2]
    kc, gc = k.mean(), g.mean()
    rows = np.column_stack([np.ones_like(k), k - kc, g - gc])
    prior = np.diag([math.sqrt(lam), math.sqrt(lam * k.var()), math.sqrt(lam * g.var())])
    a = np.vstack([rows, prior])
    b = np.concatenate([y, np.zeros(3)])
    solution = np.linalg.lstsq(a, b, rcond=None)[0]
    return float(solution[0]), float(solution[1]), float(solution[2]), float(kc), float(gc)


# -- the gain model ---------------------------------------------------------------------------------


def test_gain_model_matches_an_independent_ridge_solve() -> None:
    points = [(0.1, 2.0, 1.5), (0.3, 0.5, 0.9), (0.5, 1.0, 0.2), (0.8, 0.2, -0.4), (0.9, 3.0, -1.1), (0.2, 1.2, 0.7)]
    for lam in (0.0, 0.5, 2.0, 10.0):
        model = fit_gain_model([GainPoint(f"c{i}", k, g, y) for i, (k, g, y) in enumerate(points)], lam)
        intercept, k_slope, g_slope, kc, gc = ridge_reference(points, lam)
        assert model.history == 6 and model.prior_strength == lam
        assert model.intercept == pytest.approx(intercept, rel=1e-10, abs=1e-12)
        assert model.kinship_slope == pytest.approx(k_slope, rel=1e-10, abs=1e-12)
        assert model.score_gap_slope == pytest.approx(g_slope, rel=1e-10, abs=1e-12)
        assert (model.kinship_center, model.score_gap_center) == pytest.approx((kc, gc), rel=1e-12)
        # a prediction is the linear form at the point
        assert model.expected_gain(0.4, 1.0) == pytest.approx(intercept + k_slope * (0.4 - kc) + g_slope * (1.0 - gc), rel=1e-10)


def test_gain_model_recovers_an_exact_plane_without_prior_and_stays_near_zero_without_history() -> None:
    # gain = 1 - 2 k + 0.5 gap exactly: plain least squares recovers it.
    raw = [(0.0, 0.0), (0.5, 1.0), (1.0, 0.0), (0.2, 3.0)]
    points = [GainPoint(f"c{i}", k, g, 1.0 - 2.0 * k + 0.5 * g) for i, (k, g) in enumerate(raw)]
    model = fit_gain_model(points, 0.0)
    assert model.expected_gain(0.0, 0.0) == pytest.approx(1.0, abs=1e-12)
    assert model.kinship_slope == pytest.approx(-2.0, abs=1e-12)
    assert model.score_gap_slope == pytest.approx(0.5, abs=1e-12)
    empty = fit_gain_model([], 2.0)
    assert (empty.history, empty.expected_gain(0.3, 5.0)) == (0, 0.0)
    # one point, prior 2: intercept = gain / (1 + 2), no spread so no slopes
    single = fit_gain_model([GainPoint("c", 0.5, 1.0, 3.0)], 2.0)
    assert (single.intercept, single.kinship_slope, single.score_gap_slope) == (1.0, 0.0, 0.0)


def test_collinear_features_keep_the_kinship_slope_only() -> None:
    # gap = 2 k exactly; gain = -k: the kinship feature alone, plain least squares -> slope -1.
    points = [GainPoint(f"c{i}", k, 2.0 * k, -k) for i, k in enumerate([0.1, 0.4, 0.7])]
    model = fit_gain_model(points, 0.0)
    assert model.kinship_slope == pytest.approx(-1.0, abs=1e-12)
    assert model.score_gap_slope == 0.0


def history_population() -> tuple[list[Member], dict[tuple[str, str], float]]:
    """Foundations f1..f4 and three merges whose gain falls as the parents' kinship rises."""
    members = [
        Member("f1", 6.0, generation=0),
        Member("f2", 5.0, generation=0),
        Member("f3", 4.0, generation=0),
        Member("f4", 3.0, generation=0),
        Member("m1", 7.5, generation=1, parents=("f1", "f2")),  # gain 2.0 at kinship 0.1
        Member("m2", 5.0, generation=1, parents=("f1", "f3")),  # gain 0.0 at kinship 0.5
        Member("m3", 4.0, generation=1, parents=("f2", "f4")),  # gain 0.0 at kinship 0.5 ...
        Member("m4", 3.0, generation=1, parents=("f3", "f4")),  # gain -0.5 at kinship 0.9
    ]
    kinship = {pair_key("f1", "f2"): 0.1, pair_key("f1", "f3"): 0.5, pair_key("f3", "f4"): 0.9}  # (f2, f4) unknown
    return members, kinship


def test_gain_history_uses_two_parent_members_with_known_parents_kinship() -> None:
    members, kinship = history_population()
    points, skipped = gain_history(members, kinship, population.PCC)
    assert skipped == 1  # m3: its parents' kinship is not known
    assert [(p.child, p.relatedness, p.score_gap, p.gain) for p in points] == [
        ("m1", 0.1, 1.0, 2.0),
        ("m2", 0.5, 2.0, 0.0),
        ("m4", 0.9, 1.0, -0.5),
    ]
    euclid, _ = gain_history(members, kinship, population.EUCLIDEAN)
    assert [p.relatedness for p in euclid] == [-0.1, -0.5, -0.9]  # minus the distance


# -- RankCandidates options --------------------------------------------------------------------------

FOUNDATION_KIN = {
    pair_key("a", "b"): 0.6, pair_key("a", "c"): 0.5, pair_key("a", "d"): 0.1,
    pair_key("b", "c"): 0.4, pair_key("b", "d"): 0.3, pair_key("c", "d"): 0.2,
}  # fmt: skip


def foundations() -> list[Member]:
    return [Member("a", 10.0, generation=0), Member("b", 9.0, generation=0), Member("c", 8.0, generation=0), Member("d", 7.0, generation=0)]


def pairs(ranking: rank.Ranking) -> list[tuple[str, str, str]]:
    return [(r.first, r.second, r.kind) for r in ranking.recommendations]


def test_generation_one_keeps_only_the_most_promising_pairs() -> None:
    lookup = population.lookup(FOUNDATION_KIN)
    # Exploration: a with its least-kin foundation, d (0.1). Greedy candidates by mean score:
    # (a,b) 9.5, (a,c) 9.0, (b,c) 8.5, (b,d) 8.0, (c,d) 7.5.
    full = rank.rank_candidates(foundations(), 4, lookup)
    assert pairs(full) == [("a", "b", "greedy"), ("a", "c", "greedy"), ("b", "c", "greedy"), ("b", "d", "greedy"),
                           ("c", "d", "greedy"), ("a", "d", "exploration")]  # fmt: skip
    capped = rank.rank_candidates(foundations(), 4, lookup, options=RankOptions(max_greedy=2))
    assert pairs(capped) == [("a", "b", "greedy"), ("a", "c", "greedy"), ("a", "d", "exploration")]
    assert "mean score rank 1 of 5 candidate pairs (keeping the best 2)" in capped.recommendations[0].reason
    # ceil(0.5 x 5) = 3; with max_greedy 2 the smaller count wins
    assert len(rank.rank_candidates(foundations(), 4, lookup, options=RankOptions(greedy_fraction=0.5)).recommendations) == 4
    both = rank.rank_candidates(foundations(), 4, lookup, options=RankOptions(greedy_fraction=0.5, max_greedy=2))
    assert len(both.recommendations) == 3
    plain = rank.rank_candidates(foundations(), 4, lookup, options=RankOptions(exploration="none", max_greedy=1))
    assert pairs(plain) == [("a", "b", "greedy")]
    assert advice.kept_count(5, 0, None) == 5 and advice.kept_count(5, 0, 0.2) == 1 and advice.kept_count(5, 9, 1.0) == 5


def test_defaults_give_the_papers_answer_and_reasons() -> None:
    lookup = population.lookup(FOUNDATION_KIN)
    default = rank.rank_candidates(foundations(), 4, lookup)
    explicit = rank.rank_candidates(foundations(), 4, lookup, options=RankOptions())
    assert default == explicit and default.gain_model is None
    for r in default.recommendations:
        assert (r.expected_gain, r.complementarity, r.suggested_t) == (None, None, None)
        assert "expected gain" not in r.reason and "rank 1 of" not in r.reason


def test_expected_score_order_follows_the_fitted_history() -> None:
    members, kinship = history_population()
    # top-4: m1 7.5, f1 6.0, f2 5.0, m2 5.0 (ties by name: f2 < m2). Kinship among them:
    top_kin = dict(kinship)
    top_kin.update({pair_key("m1", "f1"): 0.9, pair_key("m1", "f2"): 0.9, pair_key("m1", "m2"): 0.2,
                    pair_key("f2", "m2"): 0.3, pair_key("f1", "m2"): 0.8})  # fmt: skip
    options = RankOptions(greedy_order="expected_score", exploration="none", gain_prior_strength=1.0)
    ranking = rank.rank_candidates(members, 4, population.lookup(top_kin), options=options, history_kinship=kinship)
    assert ranking.top_k == ["m1", "f1", "f2", "m2"]
    model = ranking.gain_model
    assert model is not None and model.history == 3 and model.skipped == 1
    # The history points (kinship, score gap, gain): m1 (0.1, 1, 2.0), m2 (0.5, 2, 0.0), m4 (0.9, 1, -0.5).
    intercept, k_slope, g_slope, kc, gc = ridge_reference([(0.1, 1.0, 2.0), (0.5, 2.0, 0.0), (0.9, 1.0, -0.5)], 1.0)
    scores = {m.name: m.score for m in members}

    def expected(a: str, b: str) -> float:
        gain = intercept + k_slope * (top_kin[pair_key(a, b)] - kc) + g_slope * (abs(scores[a] - scores[b]) - gc)  # type: ignore[operator]
        return (scores[a] + scores[b]) / 2 + gain  # type: ignore[operator]

    merged = {pair_key("f1", "f2")}  # m1's parents
    want = sorted((p for p in combinations(ranking.top_k, 2) if pair_key(*p) not in merged), key=lambda p: -expected(*p))
    assert [(r.first, r.second) for r in ranking.recommendations] == want
    for r in ranking.recommendations:
        assert r.expected_score == pytest.approx(expected(r.first, r.second), rel=1e-10)
        assert r.expected_gain == pytest.approx(expected(r.first, r.second) - r.mean_score, rel=1e-9, abs=1e-12)
        assert f"expected gain {r.expected_gain:+.4g}" in r.reason
    # Low kinship predicts gain here: (m1, m2) at 0.2 outranks (m1, f1) at 0.9 despite a lower mean score.
    order = [(r.first, r.second) for r in ranking.recommendations]
    assert order.index(("m1", "m2")) < order.index(("m1", "f1"))
    # estimate_gain alone keeps the mean-score order but fills the numbers
    filled = rank.rank_candidates(members, 4, population.lookup(top_kin), options=RankOptions(estimate_gain=True, gain_prior_strength=1.0),
                                  history_kinship=kinship)  # fmt: skip
    assert [r.mean_score for r in filled.recommendations if r.kind == "greedy"] == sorted(
        (r.mean_score for r in filled.recommendations if r.kind == "greedy"), reverse=True
    )
    assert all(r.expected_gain is not None for r in filled.recommendations)


def lineage_population() -> list[Member]:
    return [
        Member("f1", 5.0, generation=0),
        Member("f2", 5.5, generation=0),
        Member("f3", 6.0, generation=0),
        Member("f4", 4.0, generation=0),
        Member("m12", 7.0, generation=1, parents=("f1", "f2")),
        Member("m34", 6.5, generation=1, parents=("f3", "f4")),
        Member("m13", 6.8, generation=1, parents=("f1", "f3")),
        Member("b", 8.0, generation=2, parents=("m12", "m13")),
    ]


def test_lineage_is_ancestors_and_descendants() -> None:
    members = lineage_population()
    assert advice.lineage("b", members) == {"m12", "m13", "f1", "f2", "f3"}
    assert advice.lineage("m12", members) == {"f1", "f2", "b"}
    assert advice.lineage("f4", members) == {"m34"}
    cyclic = [Member("x", 1.0, parents=("y",)), Member("y", 2.0, parents=("x",))]
    assert advice.lineage("x", cyclic) == {"y"}


def test_exploration_outside_the_best_models_line_of_descent() -> None:
    members = lineage_population()
    # Best b (8.0); by score: b, m12 7.0, m13 6.8, m34 6.5, f3 6.0, f2 5.5, f1 5.0, f4 4.0.
    kin = {pair_key(x, y): 0.5 for x, y in combinations([m.name for m in members], 2)}
    kin[pair_key("b", "m12")] = 0.3  # Algorithm 1 would pick the least-kin top-k candidate: m12
    kin[pair_key("b", "m34")] = 0.7
    kin[pair_key("b", "f4")] = 0.2
    lookup = population.lookup(kin)
    paper = rank.rank_candidates(members, 3, lookup)
    assert paper.exploration is not None and paper.exploration.second == "m12"
    # Within the top-3 (b, m12, m13) everything is b's lineage: no exploration.
    assert rank.rank_candidates(members, 3, lookup, options=RankOptions(exploration="outside_lineage")).exploration is None
    # Pool of 5 (adds m34 and f3): f3 is b's ancestor, m34 is outside -> m34 despite kinship 0.7.
    pooled = rank.rank_candidates(members, 3, lookup, options=RankOptions(exploration="outside_lineage", exploration_pool=5))
    assert pooled.exploration is not None and (pooled.exploration.first, pooled.exploration.second) == ("b", "m34")
    assert "outside b's line of descent" in pooled.exploration.reason and "left out m12, m13, f3" in pooled.exploration.reason
    assert pooled.exploration.kinship == 0.7
    # Pool of 8: f4 is outside too and less kin (0.2) -> f4; once merged with b, m34.
    wide = rank.rank_candidates(members, 3, lookup, options=RankOptions(exploration="outside_lineage", exploration_pool=8))
    assert wide.exploration is not None and wide.exploration.second == "f4"
    after = rank.rank_candidates(
        members, 3, lookup, merged_pairs=[("b", "f4")], options=RankOptions(exploration="outside_lineage", exploration_pool=8)
    )
    assert after.exploration is not None and after.exploration.second == "m34" and "skipped f4" in after.exploration.reason
    # The pool widens Algorithm 1's rule too: latest generation (2) has only b, so all the pool by kinship.
    latest = rank.rank_candidates(members, 3, lookup, options=RankOptions(exploration_pool=8))
    assert latest.exploration is not None and latest.exploration.second == "f4"


def test_complementary_partner_and_task_ceiling() -> None:
    members = [
        Member("best", 7.0, task_scores=(9.0, 9.0, 3.0)),
        Member("near", 6.5, task_scores=(8.0, 8.0, 3.5)),  # adds (0 + 0 + 0.5) / 3 where best is weak
        Member("far", 5.0, task_scores=(3.0, 3.0, 9.0)),  # adds (0 + 0 + 6) / 3 = 2
        Member("low", 4.0, task_scores=(4.0, 4.0, 4.0)),  # adds 1 / 3
    ]
    kin = {pair_key(x, y): 0.5 for x, y in combinations(["best", "near", "far", "low"], 2)}
    kin[pair_key("best", "near")] = 0.1  # the paper's rule would take the least kin: near
    lookup = population.lookup(kin)
    assert rank.rank_candidates(members, 4, lookup).exploration.second == "near"  # type: ignore[union-attr]
    ranking = rank.rank_candidates(members, 4, lookup, options=RankOptions(exploration="complementary"))
    explore = ranking.exploration
    assert explore is not None and explore.second == "far"
    assert explore.complementarity == pytest.approx(2.0) and explore.task_ceiling == pytest.approx(9.0)
    assert "most complementary" in explore.reason and "complementarity 2" in explore.reason
    near = next(r for r in ranking.recommendations if (r.first, r.second) == ("best", "near"))
    assert near.complementarity == pytest.approx(0.5 / 3) and near.task_ceiling == pytest.approx(21.5 / 3)
    # Task-ceiling order of every pair: (best,far) 27/3, (near,far) 25/3, (best,low) 22/3,
    # (best,near) 21.5/3, (near,low) 20/3, (far,low) 17/3.
    ceiling = rank.rank_candidates(members, 4, lookup, options=RankOptions(greedy_order="task_ceiling", exploration="none"))
    assert [(r.first, r.second) for r in ceiling.recommendations] == [
        ("best", "far"), ("near", "far"), ("best", "low"), ("best", "near"), ("near", "low"), ("far", "low"),
    ]  # fmt: skip
    assert [r.task_ceiling for r in ceiling.recommendations] == pytest.approx([27 / 3, 25 / 3, 22 / 3, 21.5 / 3, 20 / 3, 17 / 3])
    assert advice.complementarity([1.0, 5.0], [3.0, 2.0]) == 1.0 and advice.task_ceiling([1.0, 5.0], [3.0, 2.0]) == 4.0


def test_suggested_slerp_factor() -> None:
    lookup = population.lookup(FOUNDATION_KIN)
    # scores 10, 9, 8, 7: range 3. (a, b): 0.5 + 0.25 (9 - 10) / 3 = 0.41666...
    weighted = rank.rank_candidates(foundations(), 4, lookup, options=RankOptions(slerp_factor="score_weighted"))
    by_pair = {(r.first, r.second): r.suggested_t for r in weighted.recommendations}
    assert by_pair[("a", "b")] == pytest.approx(0.5 - 0.25 / 3)
    assert by_pair[("a", "d")] == pytest.approx(0.25)  # the whole range: the most lean
    assert "suggested SLERP t 0.4167 (weight of b" in weighted.recommendations[0].reason
    even = rank.rank_candidates(foundations(), 4, lookup, options=RankOptions(slerp_factor="even"))
    assert {r.suggested_t for r in even.recommendations} == {0.5}
    assert advice.suggested_t("score_weighted", 3.0, 3.0, 0.0) == 0.5 and advice.suggested_t("none", 1.0, 0.0, 1.0) is None


# -- ShouldStop's NO_EXPECTED_GAIN ----------------------------------------------------------------


def test_no_expected_gain_fires_when_every_candidate_is_too_related() -> None:
    members, kinship = history_population()
    # top-3: m1, f1, f2; (f1, f2) is m1's parents. Candidates: (m1, f1) and (m1, f2).
    kin = dict(kinship)
    kin.update({pair_key("m1", "f1"): 0.95, pair_key("m1", "f2"): 0.9})
    lookup = population.lookup(kin)
    intercept, k_slope, g_slope, kc, gc = ridge_reference([(0.1, 1.0, 2.0), (0.5, 2.0, 0.0), (0.9, 1.0, -0.5)], 2.0)
    expected = {
        ("m1", "f1"): intercept + k_slope * (0.95 - kc) + g_slope * (1.5 - gc),
        ("m1", "f2"): intercept + k_slope * (0.9 - kc) + g_slope * (2.5 - gc),
    }
    best_pair = max(expected, key=expected.__getitem__)
    assert expected[best_pair] < 0  # the history says high kinship loses
    decision = stop.should_stop(members, 3, lookup, min_expected_gain=0.0, history_kinship=kinship)
    assert decision.reasons == [stop.NO_EXPECTED_GAIN] and decision.stop
    assert decision.best_candidate == best_pair
    assert decision.best_expected_gain == pytest.approx(expected[best_pair], rel=1e-10)
    assert decision.gain_model is not None and decision.gain_model.history == 3
    assert "best expected gain" in decision.summary and "fitted on 3 merges, 1 left out" in decision.summary
    # A threshold below the best estimate: continue.
    assert not stop.should_stop(members, 3, lookup, min_expected_gain=expected[best_pair] - 0.01, history_kinship=kinship).stop
    # History shorter than asked: the rule does not fire.
    short = stop.should_stop(members, 3, lookup, min_expected_gain=0.0, min_gain_history=4, history_kinship=kinship)
    assert not short.stop and "fewer than min_gain_history=4" in short.summary
    # Every top-k pair merged: nothing left to gain.
    done = stop.should_stop(
        members, 3, lookup, min_expected_gain=0.0, merged_pairs=[("m1", "f1"), ("m1", "f2")], history_kinship=kinship
    )
    assert done.reasons == [stop.NO_EXPECTED_GAIN] and done.best_candidate is None and "merged already" in done.summary
    # Off by default.
    off = stop.should_stop(members, 3, lookup, history_kinship=kinship)
    assert off.gain_model is None and stop.NO_EXPECTED_GAIN not in off.reasons


# -- validation ---------------------------------------------------------------------------------------


def test_bad_task_scores_and_options_name_the_field() -> None:
    lookup = population.lookup(FOUNDATION_KIN)
    ms = foundations()
    tasks = [Member(m.name, m.score, generation=0, task_scores=(1.0, 2.0)) for m in ms]
    cases = [
        ("lengths differ", tasks[:2] + [Member("c", 8.0, generation=0, task_scores=(1.0,))] + tasks[3:], {}, "members[2].task_scores",
         "TASK_SCORES_MISMATCH"),
        ("missing on one", tasks[:3] + [Member("d", 7.0, generation=0)], {}, "members[3].task_scores", "TASK_SCORES_MISMATCH"),
        ("NaN", tasks[:1] + [Member("b", 9.0, generation=0, task_scores=(1.0, math.nan))] + tasks[2:], {}, "members[1].task_scores[1]",
         "NON_FINITE_SCORE"),
        ("infinite", [Member("a", 10.0, generation=0, task_scores=(math.inf, 1.0))] + tasks[1:], {}, "members[0].task_scores[0]",
         "NON_FINITE_SCORE"),
        ("max_greedy", ms, {"max_greedy": -1}, "max_greedy", "INVALID_ARGUMENT"),
        ("fraction 0", ms, {"greedy_fraction": 0.0}, "greedy_fraction", "INVALID_ARGUMENT"),
        ("fraction > 1", ms, {"greedy_fraction": 1.5}, "greedy_fraction", "INVALID_ARGUMENT"),
        ("fraction NaN", ms, {"greedy_fraction": math.nan}, "greedy_fraction", "INVALID_ARGUMENT"),
        ("pool 1", ms, {"exploration_pool": 1}, "exploration_pool", "INVALID_ARGUMENT"),
        ("pool too large", ms, {"exploration_pool": 5}, "exploration_pool", "INVALID_ARGUMENT"),
        ("prior negative", ms, {"gain_prior_strength": -1.0}, "gain_prior_strength", "INVALID_ARGUMENT"),
        ("prior infinite", ms, {"gain_prior_strength": math.inf}, "gain_prior_strength", "INVALID_ARGUMENT"),
        ("ceiling without tasks", ms, {"greedy_order": "task_ceiling"}, "greedy_order", "TASK_SCORES_REQUIRED"),
        ("complementary without tasks", ms, {"exploration": "complementary"}, "exploration", "TASK_SCORES_REQUIRED"),
    ]  # fmt: skip
    for description, members, options, field, reason in cases:
        with pytest.raises(InvalidArgument) as info:
            rank.rank_candidates(members, 4, lookup, options=RankOptions(**options))  # type: ignore[arg-type]
        assert (info.value.field, info.value.reason) == (field, reason), description
    with pytest.raises(ValueError, match="latest_generation, outside_lineage"):
        rank.rank_candidates(ms, 4, lookup, options=RankOptions(exploration="sideways"))  # type: ignore[arg-type]
    for kwargs, field in (
        ({"min_expected_gain": math.nan}, "min_expected_gain"),
        ({"min_expected_gain": -math.inf}, "min_expected_gain"),
        ({"min_gain_history": -1}, "min_gain_history"),
        ({"gain_prior_strength": -0.5}, "gain_prior_strength"),
    ):
        with pytest.raises(InvalidArgument) as info:
            stop.should_stop(ms, 3, lookup, **kwargs)  # type: ignore[arg-type]
        assert info.value.field == field, kwargs
