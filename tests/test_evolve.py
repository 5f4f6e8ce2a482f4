"""examples/evolve.py end to end: a real server merges, ranks and stops on small generated checkpoints."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kinship_client import KinshipClient
from kinship_service.checkpoints.synthetic import make_base, make_family, save_checkpoint

from .conftest import SMALL

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "evolve.py"


def load_example():
    spec = importlib.util.spec_from_file_location("evolve_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or shards), with safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


class StandInEvaluation:
    """A deterministic 'benchmark': 100 x cosine between a model's task vector and a hidden target.

    The target is the sum of the foundation task vectors, so merges that combine them score
    higher, like the paper's learning stage. Computed in float64 from the weights on disk.
    """

    def __init__(self, base: dict[str, torch.Tensor], foundation: list[dict[str, torch.Tensor]]) -> None:
        self.names = sorted(base)
        self.base = torch.cat([base[n].double().ravel() for n in self.names])
        self.target = sum(torch.cat([m[n].double().ravel() for n in self.names]) - self.base for m in foundation)
        self.calls: list[str] = []

    def __call__(self, path: str) -> float:
        self.calls.append(path)
        weights = read_weights(path)
        delta = torch.cat([weights[n].double().ravel() for n in self.names]) - self.base
        return float(100.0 * (delta @ self.target) / (delta.norm() * self.target.norm()))


def test_evolve_runs_algorithm_1_until_should_stop(server_factory, model_root, tmp_path):
    merges = tmp_path / "merges"
    merges.mkdir()
    server = server_factory(allowed_roots=(model_root, merges), output_root=merges)
    base = make_base(SMALL, seed=0)
    family = make_family(base, 3, rho=0.2, seed=7)
    foundation = {}
    for name, model in zip(["alpha", "beta", "gamma"], family, strict=False):
        foundation[name] = str(save_checkpoint(model, model_root / name, config=SMALL.config(torch.float32)))
    base_path = str(save_checkpoint(base, model_root / "base", config=SMALL.config(torch.float32)))
    evaluate = StandInEvaluation(base, family)
    evolve = load_example()
    lines: list[str] = []
    with KinshipClient(server.address, timeout=120) as client:
        result = evolve.evolve(
            client, base_path, foundation, evaluate, top_k=3, output_prefix="run1", max_generations=6, log=lines.append
        )

    # It stopped because ShouldStop said so, not at the generation limit.
    assert result.stop_reasons and set(result.stop_reasons) <= {"kinship_saturated", "topk_unchanged", "gain_plateau"}
    last = result.generations[-1]
    assert last.decision.startswith("stop (")
    assert all(not r.decision.startswith("stop") for r in result.generations[:-1])
    # Generation 1 merged every pair of the three foundation models.
    first = [m for m in result.models.values() if m.generation == 1]
    assert {frozenset(m.parents) for m in first} == {
        frozenset(p) for p in [("alpha", "beta"), ("alpha", "gamma"), ("beta", "gamma")]
    }
    # Every merged model exists under the output root, was evaluated once, and its gain is
    # its score minus its parents' mean.
    merged = [m for m in result.models.values() if m.parents]
    assert result.merges == len(merged) >= 3
    assert len(evaluate.calls) == len(result.models)
    for m in merged:
        assert Path(m.path).is_dir() and Path(m.path).resolve().is_relative_to(merges.resolve())
        parents = [result.models[p] for p in m.parents]
        assert m.gain == pytest.approx(m.score - sum(p.score for p in parents) / 2, abs=1e-12)
        assert m.score == pytest.approx(evaluate(m.path), abs=1e-12)  # deterministic
        assert -1.0 <= m.parent_kinship <= 1.0
    # The merge of two equally scored orthogonal-ish models lies between them: SLERP at t=0.5.
    ab = next(m for m in first if set(m.parents) == {"alpha", "beta"})
    w_ab = read_weights(ab.path)
    w_a = read_weights(foundation["alpha"])
    w_b = read_weights(foundation["beta"])
    name = "model.layers.0.mlp.up_proj.weight"
    a, b = w_a[name].double().ravel(), w_b[name].double().ravel()
    dot = float((a / a.norm()) @ (b / b.norm()))
    theta = math.acos(max(-1.0, min(1.0, dot)))
    expected = (math.sin(theta / 2) / math.sin(theta)) * (a + b)
    assert torch.allclose(w_ab[name].double().ravel(), expected, rtol=1e-5, atol=1e-7)
    # Merging improved on the foundation models (the stand-in rewards combining them).
    assert result.best.generation >= 1
    assert result.best.score > max(result.models[n].score for n in foundation)

    tree = "\n".join(lines)
    assert "generation 0 (foundation)" in tree and "generation 1: top-3 pcc kinship" in tree
    assert f"best: {result.best.name}" in tree
    assert "stopped after generation " in tree and "gain" in tree and "└── " in tree
    # The final population feeds straight into RankCandidates / ShouldStop.
    population = result.population()
    with KinshipClient(server.address, timeout=120) as client:
        again = client.should_stop(population.members, top_k=3, base=base_path, previous_top_k=population.previous_top_k)
    assert again.stop


def test_evolve_command_line(server_factory, model_root, tmp_path, capsys, monkeypatch):
    merges = tmp_path / "merges"
    merges.mkdir()
    server = server_factory(allowed_roots=(model_root, merges), output_root=merges)
    base = make_base(SMALL, seed=1)
    family = make_family(base, 2, rho=0.5, seed=2)
    args = ["--target", server.address, "--base", str(save_checkpoint(base, model_root / "base"))]
    for name, model in zip(["x", "y"], family, strict=False):
        args += ["--model", f"{name}={save_checkpoint(model, model_root / name)}"]
    # A user's evaluation module on the import path.
    (tmp_path / "user_eval.py").write_text(
        "from pathlib import Path\n"
        "from safetensors.torch import load_file\n"
        "def score(path):\n"
        "    weights = load_file(str(sorted(Path(path).glob('*.safetensors'))[0]))\n"
        "    return float(-weights['lm_head.weight'].double().abs().sum())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out_file = tmp_path / "population.json"
    evolve = load_example()
    code = evolve.main(
        args + ["--evaluate", "user_eval:score", "--output-prefix", "cli", "--max-generations", "3",
                "--population-out", str(out_file)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "generation 1" in printed and "best: " in printed
    from kinship_client import load_population

    population = load_population(out_file)
    assert {m.name for m in population.members} >= {"x", "y", "model-1-1"}


def test_evolve_runs_with_another_method(server_factory, model_root, tmp_path):
    merges = tmp_path / "merges"
    merges.mkdir()
    server = server_factory(allowed_roots=(model_root, merges), output_root=merges)
    base = make_base(SMALL, seed=0)
    family = make_family(base, 2, rho=0.2, seed=8)
    foundation = {n: str(save_checkpoint(m, model_root / n, config=SMALL.config(torch.float32))) for n, m in zip(["a", "b"], family, strict=True)}
    base_path = str(save_checkpoint(base, model_root / "base", config=SMALL.config(torch.float32)))
    evolve = load_example()
    with KinshipClient(server.address, timeout=120) as client:
        evolve.evolve(
            client, base_path, foundation, StandInEvaluation(base, family), method="ties", output_prefix="ties", max_generations=1,
            log=lambda _line: None,
        )
    cards = sorted(merges.glob("ties/*/README.md"))
    assert cards and all("merge_method: ties" in card.read_text() for card in cards)


def _aligned_pair_and_opposed(model_root: Path) -> tuple[str, dict[str, str], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """a and b share most of their task vector (kinship near 1, little sign conflict); c is -a plus noise (conflict near 1)."""
    base = make_base(SMALL, seed=31)
    generator = torch.Generator().manual_seed(32)
    direction = {k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    noise = {n: {k: 0.002 * torch.randn(v.shape, generator=generator) for k, v in base.items()} for n in "abc"}
    sign = {"a": 1.0, "b": 1.0, "c": -1.0}
    models = {n: {k: base[k] + sign[n] * direction[k] + noise[n][k] for k in base} for n in "abc"}
    config = SMALL.config(torch.float32)
    base_path = str(save_checkpoint(base, model_root / "base", config=config))
    paths = {n: str(save_checkpoint(m, model_root / n, config=config)) for n, m in models.items()}
    return base_path, paths, models, base


def test_evolve_merges_each_pair_with_its_suggested_method(server_factory, model_root, tmp_path):
    from .merge_method_refs import ref_linear, ref_task_vectors, ref_topk_mask

    merges = tmp_path / "merges"
    merges.mkdir()
    server = server_factory(allowed_roots=(model_root, merges), output_root=merges)
    base_path, paths, models, base = _aligned_pair_and_opposed(model_root)
    evolve = load_example()
    lines: list[str] = []
    with KinshipClient(server.address, timeout=120) as client:
        result = evolve.evolve(
            client, base_path, paths, StandInEvaluation(base, list(models.values())), method="suggested",
            output_prefix="suggested", max_generations=1, log=lines.append,
        )
    merged = {frozenset(m.parents): m for m in result.models.values() if m.parents}
    assert set(merged) == {frozenset("ab"), frozenset("ac"), frozenset("bc")}  # generation 1: every foundation pair
    assert merged[frozenset("ab")].method == "linear"  # PCC near 1, little sign conflict
    assert merged[frozenset("ac")].method == "ties" and merged[frozenset("bc")].method == "ties"  # opposed task vectors
    assert any("ties" in line and "sign conflict" in line for line in lines)  # the advice's reason is logged
    for pair, model in merged.items():
        card = (Path(model.path) / "README.md").read_text()
        assert f"merge_method: {model.method}" in card
        got = read_weights(model.path)
        first, second = sorted(pair)
        for name, tensor in got.items():
            x, y, b = (t[name].double().numpy() for t in (models[first], models[second], base))
            if model.method == "linear":
                expected = ref_linear([x, y], [1.0, 1.0])
            else:  # ties, density 0.5, weight 1 (the advice's parameters), mergekit's normalize default
                masks = [ref_topk_mask(m - b, 0.5) for m in (x, y)]
                expected = ref_task_vectors(b, [x, y], [1.0, 1.0], masks=masks, consensus=True, normalize=True)
            scale = np.abs(x) + np.abs(y) + np.abs(b)
            bad = np.abs(tensor.double().numpy() - expected) > 1e-5 * np.abs(expected) + 1e-6 * scale
            assert not bad.any(), (pair, name, int(bad.sum()))


def test_evolve_method_option_needs_suggested(capsys):
    evolve = load_example()
    argv = ["--base", "/b", "--model", "x=/x", "--model", "y=/y", "--evaluate", "m:f"]
    with pytest.raises(SystemExit) as exit_:
        evolve.main([*argv, "--method-option", "ties_density=0.3"])
    assert exit_.value.code == 2 and "needs --method suggested" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evolve.main([*argv, "--method", "suggested", "--method-option", "density=0.3"])
    assert "ties_sign_conflict_threshold" in capsys.readouterr().err
    with pytest.raises(ValueError, match="suggested"):
        evolve.evolve(None, "/b", {"x": "/x", "y": "/y"}, lambda _p: 0.0, method="slerp", method_options={"ties_density": 0.3})


def test_evolve_command_line_with_the_suggested_method(server_factory, model_root, tmp_path, capsys, monkeypatch):
    merges = tmp_path / "merges"
    merges.mkdir()
    server = server_factory(allowed_roots=(model_root, merges), output_root=merges)
    base_path, paths, _, _ = _aligned_pair_and_opposed(model_root)
    (tmp_path / "user_eval_suggested.py").write_text(
        "from pathlib import Path\n"
        "from safetensors.torch import load_file\n"
        "def score(path):\n"
        "    weights = load_file(str(sorted(Path(path).glob('*.safetensors'))[0]))\n"
        "    return float(weights['lm_head.weight'].double().sum())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["--target", server.address, "--base", base_path, "--evaluate", "user_eval_suggested:score", "--output-prefix", "cli-sugg"]
    args += [arg for name, path in paths.items() for arg in ("--model", f"{name}={path}")]
    args += ["--max-generations", "1", "--method", "suggested", "--method-option", "linear_kinship_threshold=1.0"]
    assert load_example().main(args) == 0
    printed = capsys.readouterr().out
    cards = {card.parent.name: card.read_text() for card in merges.glob("cli-sugg/*/README.md")}
    assert len(cards) == 3  # generation 1: every pair of the three
    # linear needs kinship 1.0 now: the aligned pair is merged with SLERP, the opposed pairs with TIES
    assert sum("merge_method: ties" in c for c in cards.values()) == 2
    assert sum("merge_method: slerp" in c for c in cards.values()) == 1
    assert "sign conflict" in printed and "kinship" in printed and " slerp" in printed
