"""The advice options of RankCandidates and ShouldStop through a real server (both layouts), bad inputs included.

Kinship comes from generated checkpoints (groups of known relatedness, see
test_recommend_rpc) and is checked against an independent float64 NumPy computation;
the gain model against an independent least-squares solve (`ridge_reference`). A last test
checks that the front's cache-only answer (light.py) equals the heavy path's, option for option.
"""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest

from kinship_client import KinshipClient, KinshipRpcError, Member
from kinship_client.v1 import common_pb2, recommend_pb2
from kinship_service.cache.registry import KinshipCache
from kinship_service.checkpoints.synthetic import make_base
from kinship_service.config import Settings
from kinship_service.server import recommend_rpc
from kinship_service.server.light import LightAnswers

from .conftest import SMALL
from .test_advice_logic import ridge_reference
from .test_recommend_rpc import make_grouped, reference, save_all

pytestmark = pytest.mark.both_layouts


@pytest.fixture
def family(model_root: Path) -> dict[str, object]:
    """Group A (a1, a2, a3) and group B (b1, b2): within-group PCC ~0.9, across ~0.2."""
    base = make_base(SMALL, seed=0)
    models = make_grouped(base, {"A": ["a1", "a2", "a3"], "B": ["b1", "b2"]}, shared=0.2, group=0.7, seed=5)
    paths = save_all(model_root, base, models)
    return {"paths": paths, "ref": reference(paths, ["a1", "a2", "a3", "b1", "b2"])["pcc"]}


def lineage_members(paths: dict[str, str]) -> list[Member]:
    """Best a1 (gen 2) descends from a2 and a3, a2 from a3 and b2; b1 from b2 and c0 (no checkpoint)."""
    return [
        Member("a1", 8.0, paths["a1"], 2, ("a2", "a3"), (9.0, 9.0, 2.0)),
        Member("a2", 7.0, paths["a2"], 1, ("a3", "b2"), (8.0, 8.0, 5.0)),
        Member("b1", 6.5, paths["b1"], 1, ("b2", "c0"), (5.0, 5.0, 6.0)),
        Member("a3", 6.0, paths["a3"], 0, (), (6.0, 6.0, 6.0)),
        Member("b2", 5.0, paths["b2"], 0, (), (2.0, 3.0, 10.0)),
        Member("c0", 3.0, None, 0, (), (1.0, 1.0, 1.0)),
    ]


OPTIONS: dict[str, object] = {
    "greedy_order": "expected_score",
    "max_greedy": 1,
    "exploration": "complementary",
    "exploration_pool": 5,
    "estimate_gain": True,
    "gain_prior_strength": 1.0,
    "slerp_factor": "score_weighted",
}


def test_rank_candidates_options_through_the_server(client, family):
    paths, pcc = family["paths"], family["ref"]
    members = lineage_members(paths)
    history = {("a3", "b2"): pcc[("a3", "b2")], ("a2", "a3"): pcc[("a2", "a3")]}  # (b2, c0) stays unknown
    result = client.rank_candidates(members, top_k=3, base=paths["base"], known_kinship=history, **OPTIONS)
    assert result.top_k == ["a1", "a2", "b1"] and result.mode == "exact"
    # Complementarity to a1 (9, 9, 2) in the pool of 5: a2 1, b1 4/3, a3 4/3, b2 (0 + 0 + 8) / 3: b2,
    # outside the top-3, its kinship to a1 computed from its checkpoint.
    explore = result.exploration
    assert explore is not None and (explore.first, explore.second) == ("a1", "b2")
    assert explore.kinship == pytest.approx(pcc[("a1", "b2")], rel=1e-9, abs=1e-12)
    assert explore.complementarity == pytest.approx(8 / 3) and explore.task_ceiling == pytest.approx(28 / 3)
    assert "most complementary" in explore.reason
    # Gain model: a2 (kinship of a3, b2; gain 7 - 5.5) and a1 (kinship of a2, a3; gain 8 - 6.5); b1 left out.
    model = result.gain_model
    assert model is not None and (model.history, model.skipped, model.prior_strength) == (2, 1, 1.0)
    points = [(pcc[("a3", "b2")], 1.0, 1.5), (pcc[("a2", "a3")], 1.0, 1.5)]
    intercept, k_slope, g_slope, kc, gc = ridge_reference(points, 1.0)
    assert model.intercept == pytest.approx(intercept, rel=1e-9)
    assert model.kinship_slope == pytest.approx(k_slope, rel=1e-6, abs=1e-9)
    scores = {m.name: m.score for m in members}
    for r in result.recommendations:
        gap = abs(scores[r.first] - scores[r.second])  # type: ignore[operator]
        want = intercept + k_slope * (pcc[(r.first, r.second)] - kc) + g_slope * (gap - gc)
        assert r.expected_gain == pytest.approx(want, rel=1e-6, abs=1e-9)
        assert r.expected_score == pytest.approx(r.mean_score + want, rel=1e-9)
        # score range 8 - 3 = 5: t = 0.5 + 0.25 (second - first) / 5
        assert r.suggested_t == pytest.approx(0.5 + 0.25 * (scores[r.second] - scores[r.first]) / 5)  # type: ignore[operator]
        assert "expected gain" in r.reason and "suggested SLERP t" in r.reason and "complementarity" in r.reason
    # One greedy pair kept: the best expected score among (a1, a2) [a2 x a3 merged a1], (a1, b1), (a2, b1).
    assert len(result.greedy) == 1
    candidates = [("a1", "a2"), ("a1", "b1"), ("a2", "b1")]

    def expected_score(a: str, b: str) -> float:
        gap = abs(scores[a] - scores[b])  # type: ignore[operator]
        return (scores[a] + scores[b]) / 2 + intercept + k_slope * (pcc[(a, b)] - kc) + g_slope * (gap - gc)  # type: ignore[operator]

    best = max(candidates, key=lambda p: expected_score(*p))
    assert (result.greedy[0].first, result.greedy[0].second) == best
    assert "keeping the best 1" in result.greedy[0].reason
    # The defaults answer as before: no numbers, Algorithm 1's exploration (latest generation 2 is a1 alone,
    # so the least kin of the top-3: b1).
    plain = client.rank_candidates(members, top_k=3, base=paths["base"])
    assert plain.gain_model is None and all(r.expected_gain is None and r.suggested_t is None for r in plain.recommendations)
    assert plain.exploration is not None and plain.exploration.second == "b1"
    # Outside the lineage (a2, a3, b2 are a1's ancestors): b1.
    outside = client.rank_candidates(members, top_k=3, base=paths["base"], exploration="outside_lineage", exploration_pool=5)
    assert outside.exploration is not None and outside.exploration.second == "b1"
    assert "left out a2, a3, b2" in outside.exploration.reason


def known_history() -> tuple[list[Member], dict[tuple[str, str], float]]:
    members = [
        Member("f1", 6.0, generation=0),
        Member("f2", 5.0, generation=0),
        Member("f3", 4.0, generation=0),
        Member("f4", 3.0, generation=0),
        Member("m1", 7.5, generation=1, parents=("f1", "f2")),
        Member("m2", 5.0, generation=1, parents=("f1", "f3")),
        Member("m4", 3.0, generation=1, parents=("f3", "f4")),
    ]
    known = {("f1", "f2"): 0.1, ("f1", "f3"): 0.5, ("f3", "f4"): 0.9, ("m1", "f1"): 0.95, ("m1", "f2"): 0.9}
    return members, known


def test_should_stop_no_expected_gain_through_the_server(client):
    members, known = known_history()
    decision = client.should_stop(members, top_k=3, known_kinship=known, min_expected_gain=0.0)
    intercept, k_slope, g_slope, kc, gc = ridge_reference([(0.1, 1.0, 2.0), (0.5, 2.0, 0.0), (0.9, 1.0, -0.5)], 2.0)
    gains = {
        ("m1", "f1"): intercept + k_slope * (0.95 - kc) + g_slope * (1.5 - gc),
        ("m1", "f2"): intercept + k_slope * (0.9 - kc) + g_slope * (2.5 - gc),
    }
    pair = max(gains, key=gains.__getitem__)
    assert decision.stop and decision.reasons == ["no_expected_gain"]
    assert decision.best_candidate == pair
    assert decision.best_expected_gain == pytest.approx(gains[pair], rel=1e-10)
    assert decision.gain_model is not None and decision.gain_model.history == 3
    assert "best expected gain" in decision.summary
    kept = client.should_stop(members, top_k=3, known_kinship=known, min_expected_gain=gains[pair] - 0.01)
    assert not kept.stop and kept.best_candidate == pair
    merged = client.should_stop(members, top_k=3, known_kinship=known, min_expected_gain=0.0, merged_pairs=[pair], min_gain_history=3)
    assert merged.best_candidate is not None and merged.best_candidate != pair
    off = client.should_stop(members, top_k=3, known_kinship=known)
    assert off.gain_model is None and off.best_expected_gain is None and not off.stop


def _raw(client, method: str, request: object) -> None:
    client._call(getattr(client.stub, method), request, 30)  # noqa: SLF001 - enums outside the client's names


def test_bad_advice_inputs_are_invalid_argument_naming_the_field(client):
    members, known = known_history()
    tasks = [Member(m.name, m.score, generation=m.generation, parents=m.parents, task_scores=(1.0, 2.0)) for m in members]
    with_tasks = {"top_k": 3, "known_kinship": known}
    bad_members = [
        (tasks[:2] + [Member("f3", 4.0, generation=0, task_scores=(1.0,))] + tasks[3:], "members[2].task_scores", "TASK_SCORES_MISMATCH"),
        (tasks[:6] + [Member("m4", 3.0, generation=1, parents=("f3", "f4"))], "members[6].task_scores", "TASK_SCORES_MISMATCH"),
        (tasks[:1] + [Member("f2", 5.0, generation=0, task_scores=(math.nan, 1.0))] + tasks[2:], "members[1].task_scores[0]",
         "NON_FINITE_SCORE"),
        ([Member("f1", 6.0, generation=0, task_scores=(1.0, -math.inf))] + tasks[1:], "members[0].task_scores[1]", "NON_FINITE_SCORE"),
        (tasks + [Member("x", 1.0, generation=2, parents=("m1", "ghost"), task_scores=(1.0, 2.0))], "members[7].parents[1]",
         "UNKNOWN_PARENT"),
    ]  # fmt: skip
    for rpc in (client.rank_candidates, client.should_stop):
        for population, field, reason in bad_members:
            with pytest.raises(KinshipRpcError) as info:
                rpc(population, **with_tasks)
            assert (info.value.code, info.value.field, info.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, field, reason)
    rank_options = [
        ({"max_greedy": -1}, "max_greedy", "INVALID_ARGUMENT"),
        ({"greedy_fraction": 0.0}, "greedy_fraction", "INVALID_ARGUMENT"),
        ({"greedy_fraction": 1.01}, "greedy_fraction", "INVALID_ARGUMENT"),
        ({"greedy_fraction": math.nan}, "greedy_fraction", "INVALID_ARGUMENT"),
        ({"exploration_pool": 1}, "exploration_pool", "INVALID_ARGUMENT"),
        ({"exploration_pool": 8}, "exploration_pool", "INVALID_ARGUMENT"),
        ({"gain_prior_strength": -1.0}, "gain_prior_strength", "INVALID_ARGUMENT"),
        ({"kinship_weight": math.inf}, "kinship_weight", "INVALID_ARGUMENT"),
        ({"gain_prior_strength": math.inf}, "gain_prior_strength", "INVALID_ARGUMENT"),
        ({"greedy_order": "task_ceiling"}, "greedy_order", "TASK_SCORES_REQUIRED"),
        ({"exploration": "complementary"}, "exploration", "TASK_SCORES_REQUIRED"),
    ]
    for kwargs, field, reason in rank_options:
        with pytest.raises(KinshipRpcError) as info:
            client.rank_candidates(members, **with_tasks, **kwargs)
        assert (info.value.code, info.value.field, info.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, field, reason), kwargs
    stop_options = [
        ({"min_expected_gain": math.nan}, "min_expected_gain"),
        ({"min_expected_gain": math.inf}, "min_expected_gain"),
        ({"min_gain_history": -2}, "min_gain_history"),
        ({"gain_prior_strength": -0.1}, "gain_prior_strength"),
        ({"merged_pairs": [("m1", "nobody")]}, "merged_pairs[0].second"),
    ]
    for kwargs, field in stop_options:
        with pytest.raises(KinshipRpcError) as info:
            client.should_stop(members, **with_tasks, **kwargs)
        assert (info.value.code, info.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, field), kwargs
    # Enum values outside the proto's (a newer or broken client): the field, never a crash.
    request = recommend_pb2.RankCandidatesRequest(
        members=[recommend_pb2.PopulationMember(name=m.name, score=m.score) for m in members],
        top_k=3,
        known_kinship=[recommend_pb2.KnownKinship(pair=recommend_pb2.MemberPair(first=a, second=b), value=v) for (a, b), v in known.items()],
    )
    for field in ("greedy_order", "exploration", "slerp_factor"):
        bad = recommend_pb2.RankCandidatesRequest()
        bad.CopyFrom(request)
        setattr(bad, field, 77)
        with pytest.raises(KinshipRpcError) as info:
            _raw(client, "RankCandidates", bad)
        assert (info.value.code, info.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, field)
    # The client refuses unknown names before any call.
    for kwargs in ({"greedy_order": "best"}, {"exploration": "random"}, {"slerp_factor": "half"}):
        with pytest.raises(ValueError, match="is not allowed"):
            client.rank_candidates(members, **with_tasks, **kwargs)
    # The server lives on.
    assert client.should_stop(members, top_k=3, known_kinship=known).top_k == ["m1", "f1", "f2"]


def test_light_answer_equals_the_heavy_answer_option_for_option(server_factory, family, model_root, tmp_path):
    """The front's cache-only answerer gives the heavy path's response once the pair results are cached."""
    paths, pcc = family["paths"], family["ref"]
    heavy = server_factory()
    members = lineage_members(paths)
    history = {("a3", "b2"): pcc[("a3", "b2")], ("a2", "a3"): pcc[("a2", "a3")]}
    settings = Settings(allowed_roots=(model_root,), cache_dir=tmp_path / "cache")  # the heavy server's cache
    light = LightAnswers(settings, KinshipCache(settings, "cpu"))
    with KinshipClient(heavy.address, timeout=120) as client:
        for options in (OPTIONS, {"exploration": "outside_lineage", "exploration_pool": 5, "max_greedy": 2}, {}):
            computed = client.rank_candidates(members, top_k=3, base=paths["base"], known_kinship=history, mode="exact", **options)
            answered = light.rank_candidates(recommend_rpc.rank_query(computed_request(members, paths["base"], history, options)))
            assert answered is not None, options  # every pair result is cached now
            assert answered == computed.raw, options
        stop_kwargs = {"min_expected_gain": 0.5, "merged_pairs": [("a1", "b1")]}
        decided = client.should_stop(members, top_k=3, base=paths["base"], known_kinship=history, mode="exact", **stop_kwargs)
        request = recommend_pb2.ShouldStopRequest.FromString(decided_request(members, paths["base"], history))
        request.min_expected_gain = 0.5
        request.merged_pairs.add(first="a1", second="b1")
        assert light.should_stop(recommend_rpc.stop_query(request)) == decided.raw


def _member_protos(members: list[Member]) -> list[recommend_pb2.PopulationMember]:
    out = []
    for m in members:
        message = recommend_pb2.PopulationMember(name=m.name, score=m.score, parents=list(m.parents), task_scores=list(m.task_scores))
        if m.checkpoint is not None:
            message.checkpoint.path = m.checkpoint
        if m.generation is not None:
            message.generation = m.generation
        out.append(message)
    return out


def _known_protos(known: dict[tuple[str, str], float]) -> list[recommend_pb2.KnownKinship]:
    return [recommend_pb2.KnownKinship(pair=recommend_pb2.MemberPair(first=a, second=b), value=v) for (a, b), v in known.items()]


def computed_request(members, base, known, options) -> recommend_pb2.RankCandidatesRequest:
    """The request the typed client sends for these options, built by hand (no private client API)."""
    names = {"mean_score": 1, "expected_score": 2, "task_ceiling": 3}
    rules = {"latest_generation": 1, "outside_lineage": 2, "complementary": 3, "none": 4}
    factors = {"none": 0, "even": 1, "score_weighted": 2}
    request = recommend_pb2.RankCandidatesRequest(
        base=common_pb2.CheckpointRef(path=base),
        members=_member_protos(members),
        top_k=3,
        metric=common_pb2.METRIC_PCC,
        mode=common_pb2.KINSHIP_MODE_EXACT,
        known_kinship=_known_protos(known),
        greedy_order=names[str(options.get("greedy_order", "mean_score"))],
        max_greedy=int(options.get("max_greedy", 0)),  # type: ignore[call-overload]
        exploration=rules[str(options.get("exploration", "latest_generation"))],
        exploration_pool=int(options.get("exploration_pool", 0)),  # type: ignore[call-overload]
        estimate_gain=bool(options.get("estimate_gain", False)),
        slerp_factor=factors[str(options.get("slerp_factor", "none"))],
    )
    if "gain_prior_strength" in options:
        request.gain_prior_strength = float(options["gain_prior_strength"])  # type: ignore[arg-type]
    return request


def decided_request(members, base, known) -> bytes:
    return recommend_pb2.ShouldStopRequest(
        base=common_pb2.CheckpointRef(path=base),
        members=_member_protos(members),
        top_k=3,
        aggregation=recommend_pb2.AGGREGATION_MEAN,
        metric=common_pb2.METRIC_PCC,
        mode=common_pb2.KINSHIP_MODE_EXACT,
        known_kinship=_known_protos(known),
    ).SerializeToString()


def test_a_wider_exploration_pool_needs_only_the_best_models_kinship_to_it(client):
    members, known = known_history()
    # top-3: m1, f1, f2 (known). Pool of 5 adds m2 and f3: only (m1, m2) and (m1, f3) are needed.
    pool_known = {**known, ("m1", "m2"): 0.3, ("m1", "f3"): 0.2}
    result = client.rank_candidates(members, top_k=3, known_kinship=pool_known, exploration="outside_lineage", exploration_pool=5)
    assert result.mode == "unspecified"  # nothing computed, no checkpoint needed
    # m1's lineage: f1, f2 (ancestors); outside in the pool: m2 (0.3) and f3 (0.2): f3.
    assert result.exploration is not None and (result.exploration.second, result.exploration.kinship) == ("f3", 0.2)
    with pytest.raises(KinshipRpcError) as info:  # without (m1, f3) the server would have to compute it
        client.rank_candidates(members, top_k=3, known_kinship={**known, ("m1", "m2"): 0.3}, exploration_pool=5)
    assert (info.value.code, info.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CHECKPOINT_REQUIRED")


def test_cli_advice_flags_and_task_scores_in_population_files(server, capsys, tmp_path):
    import json

    from kinship_client import cli, load_population

    members, known = known_history()
    doc = {
        "top_k": 3,
        "members": [
            {"name": m.name, "score": m.score, "generation": m.generation, "parents": list(m.parents), "task_scores": [m.score, 1.0]}
            for m in members
        ],
        "known_kinship": [[a, b, v] for (a, b), v in known.items()],
    }
    path = tmp_path / "population.json"
    path.write_text(json.dumps(doc))
    assert load_population(path).members[0].task_scores == (6.0, 1.0)
    flags = ["--estimate-gain", "--slerp-factor", "even", "--max-greedy", "1", "--greedy-order", "task_ceiling", "--exploration", "none",
             "--kinship-weight", "0.5"]  # fmt: skip
    assert cli.main(["--target", server.address, "rank", str(path), "--json", *flags]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert len(ranked["recommendations"]) == 1 and ranked["recommendations"][0]["suggested_t"] == 0.5
    assert ranked["gain_model"]["history"] == 3 and "task_ceiling" in ranked["recommendations"][0]
    assert cli.main(["--target", server.address, "should-stop", str(path), "--min-expected-gain", "0", "--exit-code", "--json"]) == 3
    decided = json.loads(capsys.readouterr().out)
    assert decided["reasons"] == ["no_expected_gain"] and decided["gain_model"]["history"] == 3
    bad = tmp_path / "bad.json"
    doc["members"][1]["task_scores"] = [1.0]  # type: ignore[index]
    bad.write_text(json.dumps(doc))
    assert cli.main(["--target", server.address, "rank", str(bad)]) == 1
    assert "TASK_SCORES_MISMATCH" in capsys.readouterr().err
