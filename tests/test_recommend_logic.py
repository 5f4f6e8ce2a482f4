"""Pure logic of RankCandidates and ShouldStop (kinship_service.guidance: population, rank, stop), on the paper's own numbers.

No gRPC and no checkpoints: kinship values are given as numbers.
"""

from __future__ import annotations

import math

import pytest

from kinship_service.errors import InvalidArgument
from kinship_service.guidance import population, rank, stop
from kinship_service.guidance.population import Member, pair_key

# Hu et al., "Exploring Model Kinship for Merging Large Language Models" (arXiv 2410.12613),
# Table 2, "Greedy Strategy" (Mistral-7B; Avg. = average task performance; Kinship = PCC
# between the two parents of each merged model). Foundation models: MetaMath 63.72,
# Instruct 61.82, Open-chat 66.28. The table does not name the parents; they follow from its
# Gain column (gain = Avg. - mean of the parents' Avg., eq. 5), which the first test checks.
#   name        generation  Avg.   parents                      Gain    Kinship (of the parents)
TABLE_2_GREEDY = [
    ("metamath", 0, 63.72, (), None, None),
    ("instruct", 0, 61.82, (), None, None),
    ("open-chat", 0, 66.28, (), None, None),
    ("model-1-1", 1, 62.17, ("metamath", "instruct"), -0.60, 0.01),
    ("model-1-2", 1, 64.02, ("instruct", "open-chat"), -0.03, -0.02),
    ("model-1-3", 1, 66.84, ("metamath", "open-chat"), +1.84, 0.05),
    ("model-2-1", 2, 68.72, ("model-1-3", "open-chat"), +2.16, 0.93),
    ("model-2-2", 2, 61.47, ("model-1-3", "model-1-2"), -3.96, 0.57),
    ("model-2-3", 2, 61.32, ("open-chat", "model-1-2"), -3.83, 0.58),
    ("model-3-1", 3, 68.59, ("model-2-1", "open-chat"), +1.09, 0.95),
    ("model-3-2", 3, 67.74, ("model-2-1", "model-1-3"), -0.04, 0.93),
    ("model-4-1", 4, 68.51, ("model-2-1", "model-3-1"), -0.14, 0.98),
    ("model-4-2", 4, 68.04, ("model-2-1", "model-3-2"), -0.19, 0.98),
    ("model-4-3", 4, 68.53, ("model-3-1", "model-3-2"), +0.37, 0.94),
]
TOP_K = 3  # three foundation models, three merges per greedy generation


def greedy_population(through_generation: int) -> list[Member]:
    """The greedy run's population after `through_generation` generations."""
    return [
        Member(name, score, generation, parents)
        for name, generation, score, parents, _, _ in TABLE_2_GREEDY
        if generation <= through_generation
    ]


def known_kinship() -> dict[tuple[str, str], float]:
    """Every kinship value the table reports, keyed by the (canonical) parent pair."""
    return {pair_key(*parents): kinship for _, _, _, parents, _, kinship in TABLE_2_GREEDY if kinship is not None}


def stop_at_generation(generation: int, **options: object) -> stop.StopDecision:
    """ShouldStop as asked before merging generation `generation`.

    The table's Kinship column of generation g is the kinship among the top-k that were
    merged to make generation g, i.e. the top-k of the population through generation g-1.
    So the check "at generation g" is ShouldStop on that population, with exactly those values.
    """
    return stop.should_stop(
        greedy_population(generation - 1), TOP_K, population.lookup(known_kinship()), **options  # type: ignore[arg-type]
    )


def test_table_gains_match_the_paper():
    gains = {g.name: g.gain for g in population.merge_gains(greedy_population(4))}
    for name, _, _, parents, gain, _ in TABLE_2_GREEDY:
        if parents:
            # The paper rounds Avg. and Gain to 0.01; x.xx5 may round either way.
            assert gains[name] == pytest.approx(gain, abs=0.0051), name


def test_each_greedy_generation_merged_the_previous_top_k():
    # Sanity of the encoding: generation g's parents are exactly the pairs of the top-3 before it.
    for generation in (2, 3, 4):
        top = population.select_top_k(greedy_population(generation - 1), TOP_K)
        merged_now = {pair_key(*p) for _, g, _, p, _, _ in TABLE_2_GREEDY if g == generation}
        assert merged_now <= set(population.top_k_pairs(top))


def test_generation_2_does_not_stop():
    decision = stop_at_generation(2)
    assert not decision.stop
    assert decision.reasons == []
    assert decision.top_k == ["model-1-3", "open-chat", "model-1-2"]
    assert decision.aggregated_kinship == pytest.approx((0.93 + 0.57 + 0.58) / 3)
    assert decision.kinship_threshold == 0.9
    assert decision.summary.startswith("continue")


def test_stops_by_generation_4_with_kinship_saturated():
    decisions = {g: stop_at_generation(g) for g in (2, 3, 4)}
    first_stop = min(g for g, d in decisions.items() if d.stop)
    assert first_stop <= 4
    assert stop.KINSHIP_SATURATED in decisions[4].reasons
    assert decisions[4].top_k == ["model-2-1", "model-3-1", "model-3-2"]
    assert decisions[4].aggregated_kinship == pytest.approx((0.98 + 0.98 + 0.94) / 3)
    # Already before generation 3 the top-3 (model-2-1, model-1-3, open-chat) are saturated:
    # (0.95 + 0.93 + 0.93) / 3 = 0.937 >= 0.9. The greedy run indeed gained nothing after it.
    assert decisions[3].stop and decisions[3].reasons == [stop.KINSHIP_SATURATED]
    assert decisions[4].matrix.value("model-2-1", "model-3-2") == 0.98


def test_aggregations_on_the_table():
    assert stop_at_generation(3, aggregation=stop.MIN).aggregated_kinship == pytest.approx(0.93)
    assert stop_at_generation(3, aggregation=stop.MAX).aggregated_kinship == pytest.approx(0.95)
    # MIN at generation 2 is 0.57; MAX 0.93 fires on the one saturated pair.
    assert not stop_at_generation(2, aggregation=stop.MIN).stop
    assert stop_at_generation(2, aggregation=stop.MAX).stop


def test_topk_unchanged_and_gain_plateau_on_the_table():
    before_4 = population.select_top_k(greedy_population(3), TOP_K)
    after_4 = greedy_population(4)
    # Algorithm 1's loop condition: the top-3 changed in generation 4 (model-4-3 entered).
    decision = stop.should_stop(after_4, TOP_K, population.lookup(_with_gen4_kinship()), previous_top_k=before_4)
    assert stop.TOPK_UNCHANGED not in decision.reasons
    same = stop.should_stop(
        after_4, TOP_K, population.lookup(_with_gen4_kinship()), previous_top_k=decision.top_k, kinship_threshold=0.999
    )
    assert same.reasons == [stop.TOPK_UNCHANGED]
    # Generation 4's three merges gained -0.14, -0.19, +0.37: below 0.5 all, not all below 0.
    plateau = stop.should_stop(
        after_4, TOP_K, population.lookup(_with_gen4_kinship()), gain_window=3, gain_threshold=0.5, kinship_threshold=0.999
    )
    assert plateau.reasons == [stop.GAIN_PLATEAU]
    assert [g.name for g in plateau.recent_gains] == ["model-4-1", "model-4-2", "model-4-3"]
    no_plateau = stop.should_stop(
        after_4, TOP_K, population.lookup(_with_gen4_kinship()), gain_window=3, kinship_threshold=0.999
    )
    assert not no_plateau.stop
    # A window longer than the merges so far never fires.
    assert stop.GAIN_PLATEAU not in stop.should_stop(
        greedy_population(1), TOP_K, population.lookup(known_kinship()), gain_window=4, gain_threshold=10.0
    ).reasons


def _with_gen4_kinship() -> dict[tuple[str, str], float]:
    # After generation 4 the top-3 is model-2-1, model-3-1, model-4-3; the table reports only
    # (model-2-1, model-3-1) = 0.98. The two others are stand-ins for this rule test.
    values = known_kinship()
    values[pair_key("model-2-1", "model-4-3")] = 0.97
    values[pair_key("model-3-1", "model-4-3")] = 0.99
    return values


def test_rank_candidates_on_the_table_after_generation_2():
    ranking = rank.rank_candidates(greedy_population(2), TOP_K, population.lookup(known_kinship()))
    assert ranking.top_k == ["model-2-1", "model-1-3", "open-chat"]
    # (model-1-3, open-chat) made model-2-1, so it is not recommended again. Of the best
    # model's partners, model-1-3 (0.93) is less kin than open-chat (0.95): no top-3 member
    # is from generation 2 besides the best, so the rule falls back to the whole top-3.
    exploration = ranking.exploration
    assert exploration is not None
    assert (exploration.first, exploration.second) == ("model-2-1", "model-1-3")
    assert exploration.kinship == 0.93
    assert [(r.first, r.second, r.kind) for r in ranking.recommendations] == [
        ("model-2-1", "open-chat", rank.GREEDY),
        ("model-2-1", "model-1-3", rank.EXPLORATION),
    ]
    assert ranking.recommendations[0].mean_score == pytest.approx((68.72 + 66.28) / 2)


def _kin_population() -> tuple[list[Member], dict[tuple[str, str], float]]:
    members = [
        Member("a", 10.0, 0),
        Member("b", 9.0, 0),
        Member("c", 8.0, 0),
        Member("ab", 12.0, 1, ("a", "b")),
        Member("ac", 11.0, 1, ("a", "c")),
        Member("bc", 9.5, 1, ("b", "c")),
    ]
    kin = {
        pair_key("ab", "ac"): 0.8,
        pair_key("ab", "bc"): 0.3,
        pair_key("ab", "a"): 0.9,
        pair_key("ab", "b"): 0.1,
        pair_key("ac", "bc"): 0.5,
        pair_key("ac", "a"): 0.6,
        pair_key("ac", "b"): 0.2,
        pair_key("bc", "a"): 0.4,
        pair_key("bc", "b"): 0.7,
        pair_key("a", "b"): 0.0,
    }
    return members, kin


def test_exploration_pick_is_the_lowest_kinship_model():
    members, kin = _kin_population()
    # Top-4: ab 12, ac 11, a 10, bc 9.5. Best ab; candidates from the latest generation (1):
    # ac (0.8) and bc (0.3) -> bc, although a (0.9) and b are top-k/elsewhere.
    ranking = rank.rank_candidates(members, 4, population.lookup(kin))
    assert ranking.top_k == ["ab", "ac", "a", "bc"]
    assert ranking.exploration is not None
    assert (ranking.exploration.first, ranking.exploration.second) == ("ab", "bc")
    # Without generations every top-k candidate counts: still bc (0.3 < 0.8 < 0.9).
    plain = [Member(m.name, m.score, None, m.parents) for m in members]
    assert rank.rank_candidates(plain, 4, population.lookup(kin)).exploration.second == "bc"  # type: ignore[union-attr]
    # Lower kin values elsewhere change the pick accordingly.
    kin[pair_key("ab", "ac")] = 0.05
    assert rank.rank_candidates(members, 4, population.lookup(kin)).exploration.second == "ac"  # type: ignore[union-attr]


def test_exploration_skips_merged_pairs_and_greedy_order():
    members, kin = _kin_population()
    ranking = rank.rank_candidates(members, 4, population.lookup(kin), merged_pairs=[("ab", "bc")])
    exploration = ranking.exploration
    assert exploration is not None and exploration.second == "ac"  # next least-kin of generation 1
    assert "skipped bc" in exploration.reason
    greedy = [(r.first, r.second) for r in ranking.recommendations if r.kind == rank.GREEDY]
    # Not recommended: (ab, bc) merged, (ab, ac) is the exploration. A parent with its child
    # (ac, a) is a new pair and stays, as in Algorithm 1 ("every pair in S").
    # Mean scores: ab+a 11, ac+a 10.5, ac+bc 10.25, a+bc 9.75.
    assert greedy == [("ab", "a"), ("ac", "a"), ("ac", "bc"), ("a", "bc")]
    # Every pair of the best with a candidate merged: no exploration.
    done = rank.rank_candidates(
        members, 4, population.lookup(kin), merged_pairs=[("ab", "bc"), ("ab", "ac"), ("ab", "a")]
    )
    assert done.exploration is None
    assert [(r.first, r.second) for r in done.recommendations] == [("ac", "a"), ("ac", "bc"), ("a", "bc")]


def test_greedy_ties_by_kinship_then_names():
    members = [Member("p", 5.0), Member("q", 3.0), Member("r", 4.0), Member("s", 4.0)]
    kin = {pair_key(a, b): 0.5 for a, b in [("p", "q"), ("p", "r"), ("p", "s"), ("q", "r"), ("q", "s"), ("r", "s")]}
    kin[pair_key("p", "q")] = 0.1
    kin[pair_key("r", "s")] = 0.2
    ranking = rank.rank_candidates(members, 4, population.lookup(kin), merged_pairs=[("p", "q")])
    # Top-4 by score, r before s by name at 4.0. Exploration from p: q merged; r, s both 0.5 -> r (rank).
    assert ranking.top_k == ["p", "r", "s", "q"]
    assert ranking.exploration is not None and ranking.exploration.second == "r"
    # Means: p+s 4.5, r+s 4.0, r+q 3.5 (0.5), s+q 3.5 (0.5) -> names.
    assert [(r.first, r.second) for r in ranking.recommendations] == [
        ("p", "s"), ("r", "s"), ("r", "q"), ("s", "q"), ("p", "r")
    ]
    # Euclidean: lower kinship means a larger distance, so the farther pair comes first.
    dist = {k: 1.0 for k in kin}
    dist[pair_key("s", "q")] = 3.0
    euclid = rank.rank_candidates(members, 4, population.lookup(dist), metric=population.EUCLIDEAN, merged_pairs=[("p", "q")])
    tied = [(r.first, r.second) for r in euclid.recommendations if r.mean_score == 3.5]
    assert tied == [("s", "q"), ("r", "q")]


def test_euclidean_saturation_is_distance_at_or_below_threshold():
    members = [Member("x", 3.0), Member("y", 2.0), Member("z", 1.0)]
    dist = {pair_key("x", "y"): 0.1, pair_key("x", "z"): 0.2, pair_key("y", "z"): 0.3}
    decision = stop.should_stop(members, 3, population.lookup(dist), metric=population.EUCLIDEAN, kinship_threshold=0.2)
    assert decision.stop and decision.aggregated_kinship == pytest.approx(0.2)
    # MIN ("every pair saturated") takes the largest distance; MAX the smallest.
    assert not stop.should_stop(
        members, 3, population.lookup(dist), metric=population.EUCLIDEAN, kinship_threshold=0.2, aggregation=stop.MIN
    ).stop
    assert stop.should_stop(
        members, 3, population.lookup(dist), metric=population.EUCLIDEAN, kinship_threshold=0.1, aggregation=stop.MAX
    ).stop
    with pytest.raises(InvalidArgument) as info:
        stop.should_stop(members, 3, population.lookup(dist), metric=population.EUCLIDEAN)
    assert info.value.field == "kinship_threshold"


def test_top_k_ties_are_broken_by_name():
    members = [Member("b", 1.0), Member("a", 1.0), Member("c", 2.0)]
    assert population.select_top_k(members, 2) == ["c", "a"]
    assert population.select_top_k(list(reversed(members)), 2) == ["c", "a"]


def test_merged_pairs_include_parents():
    members, _ = _kin_population()
    assert population.merged_pair_set(members, [("bc", "ab")]) == {
        ("a", "b"), ("a", "c"), ("b", "c"), ("ab", "bc")
    }


@pytest.mark.parametrize(
    "members, top_k, field",
    [
        ([Member("a", 1.0)], 2, "members"),
        ([Member("a", 1.0), Member("a", 2.0)], 2, "members[1].name"),
        ([Member("a", 1.0), Member("", 2.0)], 2, "members[1].name"),
        ([Member("a", 1.0), Member("b", None)], 2, "members[1].score"),
        ([Member("a", 1.0), Member("b", 2.0), Member("c", math.nan)], 2, "members[2].score"),
        ([Member("a", math.inf), Member("b", 2.0)], 2, "members[0].score"),
        ([Member("a", 1.0), Member("b", 2.0, parents=("a", "z"))], 2, "members[1].parents[1]"),
        ([Member("a", 1.0), Member("b", 2.0, parents=("b",))], 2, "members[1].parents[0]"),
        ([Member("a", 1.0), Member("b", 2.0, parents=("a", "a"))], 2, "members[1].parents[1]"),
        ([Member("a", 1.0, 0), Member("b", 2.0)], 2, "members[1].generation"),
        ([Member("a", 1.0, -1), Member("b", 2.0, 0)], 2, "members[0].generation"),
        ([Member("a", 1.0, 1), Member("b", 2.0, 1, ("a",))], 2, "members[1].parents[0]"),
        ([Member("a", 1.0, checkpoint="path:/m/a"), Member("b", 2.0, checkpoint="path:/m/a")], 2, "members[1].checkpoint"),
        ([Member("a", 1.0), Member("b", 2.0)], 1, "top_k"),
        ([Member("a", 1.0), Member("b", 2.0)], 3, "top_k"),
        ([Member("a", 1.0), Member("b", 2.0)], 0, "top_k"),
    ],
)
def test_validation_names_the_field(members, top_k, field):
    with pytest.raises(InvalidArgument) as info:
        population.validate_population(members, top_k)
    assert info.value.field == field
    assert info.value.message


def test_validation_of_pairs_known_values_and_options():
    names = ["a", "b", "c"]
    with pytest.raises(InvalidArgument) as info:
        population.validate_pairs([("a", "b"), ("a", "zz")], names)
    assert info.value.field == "merged_pairs[1].second"
    with pytest.raises(InvalidArgument) as info:
        population.validate_pairs([("c", "c")], names)
    assert info.value.field == "merged_pairs[0].second"
    with pytest.raises(InvalidArgument) as info:
        population.validate_known([("a", "b", 0.5), ("b", "c", math.nan)], names, population.PCC)
    assert info.value.field == "known_kinship[1].value"
    with pytest.raises(InvalidArgument) as info:
        population.validate_known([("a", "b", 1.5)], names, population.PCC)
    assert info.value.field == "known_kinship[0].value"
    with pytest.raises(InvalidArgument) as info:
        population.validate_known([("a", "b", 0.5), ("b", "a", 0.6)], names, population.PCC)
    assert info.value.field == "known_kinship[1].value"
    with pytest.raises(InvalidArgument) as info:
        population.validate_known([("x", "b", 0.5)], names, population.PCC)
    assert info.value.field == "known_kinship[0].pair.first"
    members = [Member(n, 1.0) for n in names]
    for options, field in [
        ({"previous_top_k": ["a", "q"]}, "previous_top_k[1]"),
        ({"previous_top_k": ["a", "a"]}, "previous_top_k[1]"),
        ({"kinship_threshold": math.nan}, "kinship_threshold"),
        ({"kinship_threshold": 1.5}, "kinship_threshold"),
        ({"gain_window": -1}, "gain_window"),
        ({"gain_threshold": math.inf}, "gain_threshold"),
    ]:
        with pytest.raises(InvalidArgument) as info:
            stop.should_stop(members, 2, lambda a, b: 0.5, **options)  # type: ignore[arg-type]
        assert info.value.field == field, options


def test_known_values_every_refusal_and_the_edges():
    """validate_known takes a one-comparison fast path; every refusal must still be the precise one."""
    names = ["a", "b", "c"]
    cases = [
        ([("a", "zz", 0.5)], population.PCC, "known_kinship[0].pair.second"),
        ([("a", "a", 0.5)], population.PCC, "known_kinship[0].pair.second"),
        ([("a", "b", math.inf)], population.COSINE, "known_kinship[0].value"),
        ([("a", "b", -1.5)], population.COSINE, "known_kinship[0].value"),
        ([("a", "b", 0.5), ("c", "a", -0.1)], population.EUCLIDEAN, "known_kinship[1].value"),
        ([("a", "b", math.inf)], population.EUCLIDEAN, "known_kinship[0].value"),
        ([("a", "b", math.nan)], population.EUCLIDEAN, "known_kinship[0].value"),
        ([("a", "b", 2.0), ("b", "a", 3.0)], population.EUCLIDEAN, "known_kinship[1].value"),
    ]
    for known, metric, field in cases:
        with pytest.raises(InvalidArgument) as info:
            population.validate_known(known, names, metric)
        assert info.value.field == field, (known, metric)
    accepted = population.validate_known(
        [("b", "a", 1.0 + 1e-9), ("a", "b", 1.0 + 1e-9), ("c", "a", -1.0 - 1e-9)], names, population.PCC
    )
    assert accepted == {("a", "b"): 1.0 + 1e-9, ("a", "c"): -1.0 - 1e-9}
    assert population.validate_known([("a", "b", 0.0), ("b", "c", 1e300)], names, population.EUCLIDEAN) == {
        ("a", "b"): 0.0,
        ("b", "c"): 1e300,
    }
