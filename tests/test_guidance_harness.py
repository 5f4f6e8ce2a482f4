"""The guidance benchmark (bench/guidance): its trained family, its data, its statistics, and the harness end to end.

The harness runs on one tiny seed through a real server it starts itself; the full
benchmark (20 seeds) is not part of the test command.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.guidance import harness
from bench.guidance.family import FamilySpec, ensure_family, train_family
from bench.guidance.model import TinyLlama, TinyLlamaShape, load_checkpoint, save_checkpoint
from bench.guidance.stats import compare, sign_test
from bench.guidance.tasks import BOS, DIGITS, SEP, TASK_NAMES, TASK_TOKEN0, dev_and_test, input_keys, train_batch

TINY = FamilySpec(
    shape=TinyLlamaShape(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
    length=4,
    base_steps=8,
    specialist_steps=4,
    batch=24,
    eval_per_task=24,
)

REFERENCE = {
    "copy": lambda x: list(x),
    "reverse": lambda x: list(reversed(x)),
    "sort": lambda x: sorted(x),
    "increment": lambda x: [(v + 1) % 10 for v in x],
    "running_max": lambda x: [max(x[: i + 1]) for i in range(len(x))],
    "prefix_sum": lambda x: [sum(x[: i + 1]) % 10 for i in range(len(x))],
}


def _examples(sequences: torch.Tensor, length: int) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """(task token, input digits, answer digits) of every encoded sequence."""
    out = []
    for row in sequences.tolist():
        assert row[0] == BOS and row[length + 2] == SEP
        out.append((row[1], tuple(row[2 : length + 2]), tuple(row[length + 3 :])))
    return out


def test_dev_and_test_are_disjoint_distinct_and_answered_right() -> None:
    dev, test = dev_and_test(seed=3, per_task=200, length=3)  # 1000 possible inputs per task: collisions are certain
    for t, task in enumerate(TASK_NAMES):
        dev_examples = _examples(dev.sequences[t], 3)
        test_examples = _examples(test.sequences[t], 3)
        assert len(dev_examples) == len(test_examples) == 200
        dev_inputs = {x for _, x, _ in dev_examples}
        test_inputs = {x for _, x, _ in test_examples}
        assert len(dev_inputs) == 200 and len(test_inputs) == 200  # no repeats within a set
        assert not dev_inputs & test_inputs
        for token, x, y in dev_examples + test_examples:
            assert token == TASK_TOKEN0 + t
            assert list(y) == REFERENCE[task](list(x))
    # Different seeds give different sets; the same seed the same.
    again, _ = dev_and_test(seed=3, per_task=200, length=3)
    other, _ = dev_and_test(seed=4, per_task=200, length=3)
    assert all(torch.equal(a, b) for a, b in zip(dev.sequences, again.sequences, strict=True))
    assert not torch.equal(dev.sequences[0], other.sequences[0])


def test_training_batches_never_contain_a_held_out_input() -> None:
    dev, test = dev_and_test(seed=1, per_task=300, length=3)
    held_out = torch.cat([dev.keys, test.keys])
    forbidden = {(row[1], tuple(row[2:5])) for s in dev.sequences + test.sequences for row in s.tolist()}
    generator = torch.Generator().manual_seed(0)
    seen = 0
    for _ in range(20):
        for row in train_batch(generator, tuple(range(len(TASK_NAMES))), 120, 3, held_out).tolist():
            assert (row[1], tuple(row[2:5])) not in forbidden
            seen += 1
    assert seen > 700  # about 40 % of the 2400 draws survive (600 of 1000 inputs per task are held out)
    assert input_keys(0, torch.tensor([[1, 2, 3]])).item() == 123


def test_family_is_deterministic_per_seed_and_saved_as_hf_llama(tmp_path: Path) -> None:
    train_family(5, TINY, tmp_path / "one")
    train_family(5, TINY, tmp_path / "two")
    train_family(6, TINY, tmp_path / "three")
    for name in ["base", *TASK_NAMES]:
        first = (tmp_path / "one" / name / "model.safetensors").read_bytes()
        assert first == (tmp_path / "two" / name / "model.safetensors").read_bytes(), name
        assert first != (tmp_path / "three" / name / "model.safetensors").read_bytes(), name
    weights = load_file(str(tmp_path / "one" / "base" / "model.safetensors"))
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(TINY.shape.num_hidden_layers):
        p = f"model.layers.{i}."
        expected |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"} | {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    assert set(weights) == expected
    config = json.loads((tmp_path / "one" / "base" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["hidden_size"] == 16 and config["num_key_value_heads"] == 2 and config["vocab_size"] == 40
    # Specialists moved away from the base (non-zero task vectors), each its own way.
    base = weights["lm_head.weight"]
    heads = [load_file(str(tmp_path / "one" / t / "model.safetensors"))["lm_head.weight"] for t in TASK_NAMES]
    assert all(not torch.equal(h, base) for h in heads)
    assert all(not torch.equal(a, b) for a, b in itertools.combinations(heads, 2))


def _reference_llama_logits(weights: dict[str, torch.Tensor], config: dict[str, object], tokens: torch.Tensor) -> torch.Tensor:
    """LlamaForCausalLM's forward pass in float64, written from the architecture's definition."""
    w = {k: v.double() for k, v in weights.items()}
    h, heads, eps = int(config["hidden_size"]), int(config["num_attention_heads"]), float(config["rms_norm_eps"])  # type: ignore[arg-type]
    d = h // heads
    n = tokens.shape[1]

    def rms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return g * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    inv = 1.0 / float(config["rope_theta"]) ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # type: ignore[arg-type]
    angle = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]  # [n, d/2]
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rope(x: torch.Tensor) -> torch.Tensor:  # x [b, heads, n, d]; pairs (i, i + d/2) rotate together
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    x = w["model.embed_tokens.weight"][tokens]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(int(config["num_hidden_layers"])):  # type: ignore[call-overload]
        p = f"model.layers.{i}."
        y = rms(x, w[p + "input_layernorm.weight"])
        q, k, v = (
            (y @ w[p + f"self_attn.{z}_proj.weight"].T).view(*y.shape[:2], heads, d).transpose(1, 2) for z in "qkv"
        )
        q, k = rope(q), rope(k)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1) @ v
        x = x + attention.transpose(1, 2).reshape(*y.shape) @ w[p + "self_attn.o_proj.weight"].T
        y = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = y @ w[p + "mlp.gate_proj.weight"].T, y @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def test_saved_model_computes_llama(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaShape(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4))
    with torch.no_grad():  # move norms off 1 so they are tested too
        for name, p in model.named_parameters():
            p.add_(0.3 * torch.randn_like(p) if "norm" in name else 2.0 * p)
    save_checkpoint(model, tmp_path / "m")
    tokens = torch.randint(0, 40, (3, 11))
    loaded = load_checkpoint(tmp_path / "m")
    with torch.no_grad():
        got = loaded(tokens).double()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    expected = _reference_llama_logits(load_file(str(tmp_path / "m" / "model.safetensors")), config, tokens)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_sign_test_exact_values() -> None:
    # Two-sided: 2 * P(X <= min) under Binomial(n, 1/2).
    assert sign_test(10, 1) == pytest.approx(2 * (1 + 11) / 2**11)  # n = 11: C(11,0) + C(11,1)
    assert sign_test(15, 5) == pytest.approx(2 * (1 + 20 + 190 + 1140 + 4845 + 15504) / 2**20)  # 0.0414
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(6, 0) == pytest.approx(2 / 64) and sign_test(0, 6) == pytest.approx(2 / 64)
    with pytest.raises(ValueError):
        sign_test(-1, 2)


def test_compare_counts_ties_and_saved_merges() -> None:
    c = compare("x", [10, 20, 30], [1.0, 2.0, 3.0], [50.0, 60.5, 70.0], [20, 20, 40], [50.0, 60.0, 71.0])
    assert c.wins == 1 and c.ties == 1 and c.losses == 1
    assert c.merges_saved == pytest.approx(1 - 60 / 80)
    assert c.merges_saved_per_seed == pytest.approx((0.5, 0.0, 0.25))
    assert c.mean_test_gain == pytest.approx((0.0 + 0.5 - 1.0) / 3)
    assert c.sign_p == 1.0


def test_harness_end_to_end_on_one_tiny_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.json"
    advice = json.dumps({"first_rank": {"max_greedy": 4}, "stop": {"gain_window": 2}})
    argv = ["--seeds", "1", "--first-seed", "2", "--workdir", str(tmp_path / "work"), "--json", str(out), "--strategies", "a,b,c,lean"]
    argv += ["--advice", f"lean={advice}", "--hidden", "16", "--layers", "1", "--length", "4"]
    argv += ["--base-steps", "8", "--specialist-steps", "4", "--eval-per-task", "24", "--max-generations", "4"]
    assert harness.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| seed |" in printed and "sign test p" in printed
    result = json.loads(out.read_text())
    seed = result["seeds"][0]
    assert seed["seed"] == 2 and set(result["aggregate"]) == {"a", "b", "c", "lean"}
    foundation = len(TASK_NAMES)
    pairs = foundation * (foundation - 1) // 2
    assert seed["a"]["merges"] >= pairs and seed["b"]["merges"] >= pairs  # generation 1 merges every foundation pair
    assert seed["lean"]["merges"] >= 4 and seed["c"]["merges"] >= 5  # generation 1 keeps the best 4 / 5 pairs
    assert result["strategies"]["c"]["rank"]["exploration"] == "complementary"  # c is the harness's default advice
    for name in ("a", "b", "c", "lean"):
        entry = seed[name]
        assert 0.0 <= entry["best_test"] <= 100.0 and 0.0 <= entry["best_dev"] <= 100.0
        assert entry["best_test"] == pytest.approx(sum(entry["best_test_tasks"]) / foundation)
        aggregate = result["aggregate"][name]
        assert aggregate["merges_saved"] == pytest.approx(1 - entry["merges"] / seed["a"]["merges"])
        assert aggregate["mean_test_gain"] == pytest.approx(entry["best_test"] - seed["a"]["best_test"])
    # The family was cached: the trained checkpoints are there, the run's server files are not.
    family = ensure_family(2, replace(FamilySpec(), **_tiny_changes()), tmp_path / "work")
    assert (family.directory / "family.json").is_file()
    assert not any((tmp_path / "work" / "runs").iterdir())
    assert DIGITS == 10


def _tiny_changes() -> dict[str, object]:
    """The spec the end-to-end test's command line builds."""
    return {
        "shape": TinyLlamaShape(hidden_size=16, intermediate_size=32, num_hidden_layers=1),
        "length": 4,
        "base_steps": 8,
        "specialist_steps": 4,
        "eval_per_task": 24,
    }


def test_method_strategies_differ_only_in_the_merge_method(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    argv = ["--seeds", "1", "--first-seed", "3", "--workdir", str(tmp_path / "work"), "--json", str(out)]
    argv += ["--strategies", "slerp,ties,suggested", "--baseline", "slerp", "--hidden", "16", "--layers", "1", "--length", "4"]
    argv += ["--base-steps", "8", "--specialist-steps", "4", "--eval-per-task", "24", "--max-generations", "2"]
    assert harness.main(argv) == 0
    result = json.loads(out.read_text())
    seed = result["seeds"][0]
    assert result["baseline"] == "slerp" and set(result["aggregate"]) == {"slerp", "ties", "suggested"}
    assert seed["slerp"]["methods"] == {"slerp": seed["slerp"]["merges"]}
    assert seed["ties"]["methods"] == {"ties": seed["ties"]["merges"]}
    suggested = seed["suggested"]
    assert sum(suggested["methods"].values()) == suggested["merges"] and set(suggested["methods"]) <= {"linear", "ties", "slerp"}
    assert len(suggested["advice_seen"]) == suggested["merges"]
    for kinship, conflict, method in suggested["advice_seen"]:  # the documented rules, at their default thresholds
        assert conflict is not None and 0.0 <= conflict <= 1.0
        assert method == ("ties" if conflict >= 0.45 else "linear" if kinship >= 0.9 else "slerp")
    # The same ranking: generation 1 merges the same five pairs whatever the method.
    assert min(seed[n]["merges"] for n in ("slerp", "ties", "suggested")) >= 5
    for name in ("ties", "suggested"):
        aggregate = result["aggregate"][name]
        assert aggregate["mean_test_gain"] == pytest.approx(seed[name]["best_test"] - seed["slerp"]["best_test"])
    assert result["strategies"]["suggested"]["method"] == "suggested" and result["strategies"]["ties"]["density"] == 0.5


def test_advice_method_and_recipes() -> None:
    from bench.guidance.bots import Advice, recipe_of

    assert recipe_of("x", "y", "slerp", {"t": 0.5}) == "slerp(x,y,0.5)"  # the form merges were cached under before methods
    assert recipe_of("x", "y", "ties", {"weight": 1.0, "density": 0.5}) == "ties(x,y;density=0.5,weight=1)"
    with pytest.raises(ValueError, match="suggested"):
        Advice.from_json({"method": "stock"})
    with pytest.raises(ValueError, match="density"):
        Advice.from_json({"method": "ties", "density": 0.0})
