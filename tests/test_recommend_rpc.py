"""RankCandidates and ShouldStop end to end: real server, real client, generated checkpoints.

Families are built so their kinship is known by construction: each task vector mixes a
direction shared by everyone, one shared by its group and a private one, with fixed
weights, so within-group PCC is about shared + group and across groups about shared.
Expected values come from an independent float64 NumPy computation over the saved files.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kinship_client import KinshipRpcError, Member
from kinship_service.checkpoints.synthetic import make_base, save_checkpoint

from .conftest import SMALL

pytestmark = pytest.mark.both_layouts  # each server test also runs through the front (conftest)


def make_grouped(
    base: dict[str, torch.Tensor], groups: dict[str, list[str]], *, shared: float, group: float, seed: int, scale: float = 0.01
) -> dict[str, dict[str, torch.Tensor]]:
    """Models whose task vectors are sqrt(shared)*S + sqrt(group)*G_g + sqrt(rest)*P_i."""
    generator = torch.Generator().manual_seed(seed)
    common = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
    models = {}
    for _group_name, names in groups.items():
        direction = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
        for name in names:
            models[name] = {
                k: base[k]
                + scale
                * (
                    math.sqrt(shared) * common[k]
                    + math.sqrt(group) * direction[k]
                    + math.sqrt(1.0 - shared - group) * torch.randn(base[k].shape, generator=generator)
                )
                for k in base
            }
    return models


def save_all(root: Path, base: dict[str, torch.Tensor], models: dict[str, dict[str, torch.Tensor]]) -> dict[str, str]:
    paths = {"base": str(save_checkpoint(base, root / "base"))}
    for name, tensors in models.items():
        paths[name] = str(save_checkpoint(tensors, root / name))
    return paths


def reference(paths: dict[str, str], names: list[str]) -> dict[str, dict[tuple[str, str], float]]:
    """Float64 PCC, cosine and Euclidean distance of the task vectors, from the files, with NumPy."""
    base = load_file(str(Path(paths["base"]) / "model.safetensors"))
    keys = sorted(base)
    deltas = {}
    for name in names:
        model = load_file(str(Path(paths[name]) / "model.safetensors"))
        deltas[name] = np.concatenate(
            [model[k].to(torch.float64).numpy().ravel() - base[k].to(torch.float64).numpy().ravel() for k in keys]
        )
    out: dict[str, dict[tuple[str, str], float]] = {"pcc": {}, "cosine": {}, "euclidean": {}}
    for a, b in combinations(names, 2):
        x, y = deltas[a], deltas[b]
        xc, yc = x - x.mean(), y - y.mean()
        for key, value in (
            ("pcc", float(xc @ yc / math.sqrt((xc @ xc) * (yc @ yc)))),
            ("cosine", float(x @ y / math.sqrt((x @ x) * (y @ y)))),
            ("euclidean", float(np.sqrt(((x - y) ** 2).sum()))),
        ):
            out[key][(a, b)] = out[key][(b, a)] = value
    return out



@pytest.fixture
def grouped(model_root: Path) -> dict[str, object]:
    """Group A (a1, a2, a3) and group B (b1, b2): within-group PCC ~0.9, across ~0.2."""
    base = make_base(SMALL, seed=0)
    models = make_grouped(base, {"A": ["a1", "a2", "a3"], "B": ["b1", "b2"]}, shared=0.2, group=0.7, seed=3)
    paths = save_all(model_root, base, models)
    return {"paths": paths, "ref": reference(paths, ["a1", "a2", "a3", "b1", "b2"])}


def population(paths: dict[str, str]) -> list[Member]:
    return [
        Member("a1", 10.0, paths["a1"], 1),
        Member("a2", 9.0, paths["a2"], 1),
        Member("b1", 8.5, paths["b1"], 1),
        Member("a3", 8.0, paths["a3"], 0),
        Member("b2", 7.0, None, 0),  # outside the top-4: needs no checkpoint
    ]


def test_rank_candidates_pairs_and_exploration(client, grouped):
    paths, ref = grouped["paths"], grouped["ref"]
    pcc = ref["pcc"]
    # The construction: within group about 0.9, across about 0.2 (finite-sample noise ~0.01).
    assert all(0.85 < pcc[p] < 0.95 for p in [("a1", "a2"), ("a1", "a3"), ("a2", "a3"), ("b1", "b2")])
    assert all(0.1 < pcc[(a, "b1")] < 0.3 for a in ("a1", "a2", "a3"))

    result = client.rank_candidates(population(paths), top_k=4, base=paths["base"], merged_pairs=[("a3", "a1")])
    assert result.top_k == ["a1", "a2", "b1", "a3"]
    assert result.mode == "exact"
    # Exploration: the best (a1) with its least-kin candidate of the latest generation (1):
    # b1 (across groups, ~0.2) rather than a2 (~0.9).
    assert result.exploration is not None
    assert (result.exploration.first, result.exploration.second) == ("a1", "b1")
    assert result.exploration.kinship == pytest.approx(pcc[("a1", "b1")], rel=1e-9, abs=1e-12)
    # Greedy: every other not-yet-merged top-4 pair, by mean score: (a1,a3) was merged and
    # (a1,b1) is the exploration.
    assert [(r.first, r.second) for r in result.greedy] == [("a1", "a2"), ("a2", "b1"), ("a2", "a3"), ("b1", "a3")]
    assert [r.mean_score for r in result.greedy] == [9.5, 8.75, 8.5, 8.25]
    for r in result.recommendations:
        assert r.kinship == pytest.approx(pcc[(r.first, r.second)], rel=1e-9, abs=1e-12)
        assert r.reason
    assert result.recommendations[-1].kind == "exploration"
    # The matrix of the top-4.
    assert result.matrix.names == ["a1", "a2", "b1", "a3"]
    for a, b in combinations(result.matrix.names, 2):
        assert result.matrix.value(a, b) == pytest.approx(pcc[(a, b)], rel=1e-9, abs=1e-12)
        assert result.matrix.value(b, a) == result.matrix.value(a, b)
    assert result.matrix.value("a1", "a1") == 1.0


def test_rank_candidates_other_metrics_and_known_values(client, grouped):
    paths, ref = grouped["paths"], grouped["ref"]
    members = population(paths)
    euclid = client.rank_candidates(members, top_k=4, base=paths["base"], metric="euclidean")
    assert euclid.matrix.metric == "euclidean"
    # Least kin = farthest: b1 is the farthest from a1 as well.
    assert euclid.exploration is not None and euclid.exploration.second == "b1"
    assert euclid.exploration.kinship == pytest.approx(ref["euclidean"][("a1", "b1")], rel=1e-9)
    assert euclid.matrix.value("a1", "a1") == 0.0
    cosine = client.rank_candidates(members, top_k=2, base=paths["base"], metric="cosine")
    assert cosine.matrix.value("a1", "a2") == pytest.approx(ref["cosine"][("a1", "a2")], rel=1e-9)

    # Known values are used as given; the rest are computed.
    partial = client.rank_candidates(members, top_k=3, base=paths["base"], known_kinship={("a2", "a1"): 0.0})
    assert partial.matrix.value("a1", "a2") == 0.0
    assert partial.matrix.value("a2", "b1") == pytest.approx(ref["pcc"][("a2", "b1")], rel=1e-9)
    assert partial.exploration is not None and partial.exploration.second == "a2"  # 0.0 < ~0.2
    # Everything known: no base, no checkpoints, nothing computed.
    bare = [Member(m.name, m.score, None, m.generation) for m in members]
    known = [("a1", "a2", 0.9), ("a1", "b1", 0.1), ("a2", "b1", 0.3)]
    offline = client.rank_candidates(bare, top_k=3, known_kinship=known)
    assert offline.mode == "unspecified"
    assert offline.exploration is not None and offline.exploration.second == "b1"


def make_generation(base, seed: int, rho_within: float, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    # Each generation draws its own directions, so kinship across generations is ~0.
    return make_grouped(base, {"g": names}, shared=0.0, group=rho_within, seed=seed)


def test_should_stop_fires_when_constructed_kinship_crosses_threshold(client, model_root):
    base = make_base(SMALL, seed=0)
    # A population growing over three generations; each new one scores higher and is more
    # kin: top-3 PCC about 0.5, then 0.85, then 0.95. At the default 0.9 the loop must go
    # on after generations 0 and 1 and stop after generation 2.
    plan = [(0, 0.5, 1.0), (1, 0.85, 2.0), (2, 0.95, 3.0)]
    models: dict[str, dict[str, torch.Tensor]] = {}
    members: list[Member] = []
    paths = {"base": str(save_checkpoint(base, model_root / "base"))}
    decisions = []
    previous: list[str] = []
    for generation, rho, score in plan:
        names = [f"g{generation}-{i}" for i in range(3)]
        new = make_generation(base, 10 + generation, rho, names)
        models.update(new)
        for i, name in enumerate(names):
            paths[name] = str(save_checkpoint(new[name], model_root / name))
            members.append(Member(name, score + 0.1 * i, paths[name], generation))
        decision = client.should_stop(members, top_k=3, base=paths["base"], previous_top_k=previous)
        expected_top = sorted(names, reverse=True)  # the new generation, best first
        assert decision.top_k == expected_top
        ref = reference(paths, expected_top)["pcc"]
        expected = sum(ref[p] for p in combinations(expected_top, 2)) / 3
        assert decision.aggregated_kinship == pytest.approx(expected, rel=1e-9)
        assert decision.kinship_threshold == 0.9
        assert decision.stop == (expected >= 0.9)
        decisions.append(decision)
        previous = decision.top_k
    assert [d.stop for d in decisions] == [False, False, True]
    assert decisions[2].reasons == ["kinship_saturated"]
    assert decisions[2].summary.startswith("stop (kinship_saturated)")
    assert decisions[0].summary.startswith("continue")

    # Exactly at the crossing: just below the aggregate it stops, just above it does not.
    last = decisions[1]
    for aggregation in ("mean", "min", "max"):
        value = client.should_stop(members[:6], top_k=3, base=paths["base"], aggregation=aggregation).aggregated_kinship
        ref = reference(paths, last.top_k)["pcc"]
        pairs = [ref[p] for p in combinations(last.top_k, 2)]
        assert value == pytest.approx({"mean": sum(pairs) / 3, "min": min(pairs), "max": max(pairs)}[aggregation], rel=1e-9)
        below = client.should_stop(members[:6], top_k=3, base=paths["base"], aggregation=aggregation, kinship_threshold=value - 1e-9)
        above = client.should_stop(members[:6], top_k=3, base=paths["base"], aggregation=aggregation, kinship_threshold=value + 1e-9)
        assert below.stop and below.reasons == ["kinship_saturated"]
        assert not above.stop and above.reasons == []
    # Euclidean: saturation is a distance at or below the threshold.
    distance = client.should_stop(members[:6], top_k=3, base=paths["base"], metric="euclidean", kinship_threshold=0.0)
    assert not distance.stop
    close = client.should_stop(
        members[:6], top_k=3, base=paths["base"], metric="euclidean", kinship_threshold=distance.aggregated_kinship + 1e-9
    )
    assert close.stop


def test_should_stop_topk_unchanged_and_gain_plateau(client, grouped):
    paths, ref = grouped["paths"], grouped["ref"]
    members = population(paths)[:4] + [
        Member("m1", 7.5, None, 2, ("a1", "a2")),  # gain 7.5 - 9.5 = -2
        Member("m2", 8.9, None, 2, ("a2", "b1")),  # gain 8.9 - 8.75 = 0.15
    ]
    # m2 has no checkpoint but enters the top-3 (8.9 > 8.5): its kinship is given; (a1, a2) is computed.
    known = {("m2", "a1"): 0.5, ("a2", "m2"): 0.6}
    options = dict(top_k=3, base=paths["base"], known_kinship=known, gain_window=2, kinship_threshold=0.99)
    decision = client.should_stop(members, previous_top_k=["b1", "a1", "a2"], gain_threshold=0.2, **options)
    assert decision.top_k == ["a1", "a2", "m2"]
    assert decision.reasons == ["gain_plateau"]
    assert [(g.name, round(g.gain, 9)) for g in decision.recent_gains] == [("m1", -2.0), ("m2", 0.15)]
    assert decision.aggregated_kinship == pytest.approx((ref["pcc"][("a1", "a2")] + 0.5 + 0.6) / 3, rel=1e-9)
    assert decision.mode == "exact"
    # The same top-3 as the previous generation (in any order), and the plateau rule off at threshold 0.
    same = client.should_stop(members, previous_top_k=["m2", "a1", "a2"], **options)
    assert same.stop and same.reasons == ["topk_unchanged"]
    assert "best gain of the last 2 merges 0.15" in same.summary


@pytest.fixture
def known_members(grouped) -> tuple[list[Member], str]:
    return population(grouped["paths"]), grouped["paths"]["base"]


BAD_INPUTS = [
    # (description, members transform, call kwargs, field)
    ("duplicate names", lambda ms: ms + [Member("a1", 1.0, None, 0)], {}, "members[5].name"),
    ("duplicate checkpoints", lambda ms: ms[:4] + [Member("b2", 7.0, ms[0].checkpoint, 0)], {}, "members[4].checkpoint"),
    ("missing score", lambda ms: ms[:2] + [Member("b1", None, ms[2].checkpoint, 1)] + ms[3:], {}, "members[2].score"),
    ("NaN score", lambda ms: ms[:3] + [Member("a3", float("nan"), ms[3].checkpoint, 0)] + ms[4:], {}, "members[3].score"),
    ("infinite score", lambda ms: [Member("a1", float("inf"), ms[0].checkpoint, 1)] + ms[1:], {}, "members[0].score"),
    ("unknown parent", lambda ms: ms + [Member("c", 1.0, None, 2, ("a1", "zz"))], {}, "members[5].parents[1]"),
    ("top_k too small", lambda ms: ms, {"top_k": 1}, "top_k"),
    ("top_k too large", lambda ms: ms, {"top_k": 6}, "top_k"),
    ("one member", lambda ms: ms[:1], {"top_k": 2}, "members"),
    ("no checkpoint", lambda ms: [Member("a1", 10.0, None, 1)] + ms[1:], {}, "members[0].checkpoint"),
]


@pytest.mark.parametrize("rpc", ["rank_candidates", "should_stop"])
def test_bad_input_is_invalid_argument_naming_the_field(client, known_members, rpc):
    members, base = known_members
    call = getattr(client, rpc)
    for description, transform, kwargs, field in BAD_INPUTS:
        options = {"top_k": 4, "base": base, **kwargs}
        with pytest.raises(KinshipRpcError) as info:
            call(transform(list(members)), **options)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, description
        assert info.value.field == field, description
        assert info.value.message, description
    # RPC-specific fields.
    specific = (
        [({"merged_pairs": [("a1", "nope")]}, "merged_pairs[0].second")]
        if rpc == "rank_candidates"
        else [
            ({"previous_top_k": ["a1", "ghost"]}, "previous_top_k[1]"),
            ({"kinship_threshold": float("nan")}, "kinship_threshold"),
            ({"kinship_threshold": 2.0}, "kinship_threshold"),
            ({"metric": "euclidean"}, "kinship_threshold"),
            ({"gain_window": -1}, "gain_window"),
        ]
    )
    specific += [
        ({"known_kinship": [("a1", "a2", float("nan"))]}, "known_kinship[0].value"),
        ({"known_kinship": [("a1", "x", 0.5)]}, "known_kinship[0].pair.second"),
        ({"base": None}, "base"),
    ]
    for kwargs, field in specific:
        with pytest.raises(KinshipRpcError) as info:
            call(members, **{"top_k": 4, "base": base, **kwargs})
        assert (info.value.code, info.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, field), kwargs
    # Other failures keep their own codes.
    with pytest.raises(KinshipRpcError) as info:
        call(members, top_k=4, base=base, mode="fingerprint")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    outside = [Member("a1", 10.0, "/etc", 1)] + members[1:]
    with pytest.raises(KinshipRpcError) as info:
        call(outside, top_k=4, base=base)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.field == "members[0].checkpoint"
    # The server lives on.
    assert call(members, top_k=4, base=base).top_k == ["a1", "a2", "b1", "a3"]


def test_member_equal_to_base_names_the_member(client, grouped):
    paths = grouped["paths"]
    members = population(paths)
    members[1] = Member("a2", 9.0, paths["base"], 1)
    with pytest.raises(KinshipRpcError) as info:
        client.rank_candidates(members, top_k=3, base=paths["base"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == "members[1].checkpoint"
    assert "'a2'" in info.value.message


EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "population-example.yaml"


def test_example_population_file_parses_and_runs_through_the_cli(server, capsys, tmp_path):
    import json

    from kinship_client import cli, load_population

    population = load_population(EXAMPLE)
    assert population.top_k == 3 and len(population.members) == 9
    assert population.members[6].parents == ("model-1-3", "open-chat")
    assert population.known_kinship[0] == ("model-2-1", "open-chat", 0.95)
    # JSON carries the same document.
    as_json = tmp_path / "population.json"
    import yaml

    as_json.write_text(json.dumps(yaml.safe_load(EXAMPLE.read_text())))
    assert load_population(as_json) == population

    assert cli.main(["--target", server.address, "rank", str(EXAMPLE), "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert ranked["top_k"] == ["model-2-1", "model-1-3", "open-chat"]
    assert [(r["first"], r["second"], r["kind"]) for r in ranked["recommendations"]] == [
        ("model-2-1", "open-chat", "greedy"),
        ("model-2-1", "model-1-3", "exploration"),
    ]
    assert ranked["mode"] == "unspecified"  # every value came from the file

    assert cli.main(["--target", server.address, "should-stop", str(EXAMPLE), "--exit-code"]) == 3
    out = capsys.readouterr().out
    assert out.startswith("STOP: kinship_saturated")
    assert cli.main(["--target", server.address, "rank", str(EXAMPLE)]) == 0
    assert "exploration" in capsys.readouterr().out
    # Usage and server errors.
    assert cli.main(["--target", server.address, "rank", str(tmp_path / "missing.yaml")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"members": [{"name": "a", "score": 1.0}, {"name": "a", "score": 2.0}], "top_k": 2}))
    assert cli.main(["--target", server.address, "rank", str(bad)]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_population_file_errors(tmp_path):
    from kinship_client import PopulationFileError, load_population

    cases = {
        "list.json": "[]",
        "nomembers.json": '{"members": []}',
        "badscore.json": '{"members": [{"name": "a", "score": "high"}]}',
        "unknown.json": '{"members": [{"name": "a", "score": 1}], "extra": 1}',
        "badpair.json": '{"members": [{"name": "a", "score": 1}], "merged_pairs": [["a"]]}',
        "badyaml.yaml": "members: [",
        "broken.json": "{",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(PopulationFileError) as info:
            load_population(path)
        assert name in str(info.value)


def test_docs_python_example_runs(server, monkeypatch):
    import re

    docs = EXAMPLE.parent / "population.md"
    blocks = re.findall(r"```python\n(.*?)```", docs.read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(EXAMPLE.parent.parent)
    for code in blocks:
        exec(compile(code.replace("localhost:50051", server.address), str(docs), "exec"), {})


def test_population_files_without_pyyaml(tmp_path, monkeypatch):
    import json
    import sys

    from kinship_client import PopulationFileError, load_population

    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now raises ImportError
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"members": [{"name": "a", "score": 1}, {"name": "b", "score": 2.5}], "top_k": 2}))
    assert [m.score for m in load_population(path).members] == [1.0, 2.5]
    with pytest.raises(PopulationFileError, match="PyYAML"):
        load_population(EXAMPLE)
