"""Exact kinship against an independent float64 NumPy reference written here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kinship_service.checkpoints.sources import LocalPath, resolve
from kinship_service.checkpoints.streaming import ReadStats
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint
from kinship_service.kinship.exact import exact_kinship

from .conftest import SMALL

REL = 1e-9


def _load(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def reference(base_dir: Path, model_dirs: list[Path], names: list[str], slices: dict[str, tuple[int, ...]] | None = None):
    """Task vectors flattened in float64 and every pair's PCC, cosine, Euclidean distance (NumPy)."""
    slices = slices or {}
    base = _load(base_dir)
    deltas = []
    for directory in model_dirs:
        model = _load(directory)
        parts = []
        for name in names:
            index = tuple(slice(0, d) for d in slices[name]) if name in slices else ...
            a = model[name][index].to(torch.float64).numpy()
            b = base[name][index].to(torch.float64).numpy()
            parts.append((a - b).ravel())
        deltas.append(np.concatenate(parts))
    pairs = {}
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            x, y = deltas[i], deltas[j]
            pcc = float(np.corrcoef(x, y)[0, 1])
            cos = float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))
            ed = float(np.linalg.norm(x - y))
            pairs[(i, j)] = (pcc, cos, ed)
    return pairs


def assert_close(result_pairs, expected) -> None:
    assert len(result_pairs) == len(expected)
    for pair in result_pairs:
        exp = expected[(pair.first, pair.second)]
        got = (pair.values.pcc, pair.values.cosine, pair.values.euclidean)
        for g, e, metric in zip(got, exp, ("pcc", "cosine", "euclidean"), strict=False):
            assert math.isclose(g, e, rel_tol=REL, abs_tol=0.0), f"{metric} of {pair.first},{pair.second}: {g!r} vs {e!r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_four_models_all_metrics_match_reference(client, model_root, dtype):
    base = make_base(SMALL, seed=3)
    models = make_family(base, 4, rho=0.3, seed=4)
    base_dir = save_checkpoint(base, model_root / "base", dtype=dtype)
    dirs = [save_checkpoint(m, model_root / f"m{i}", dtype=dtype) for i, m in enumerate(models)]
    result = client.kinship(str(base_dir), [str(d) for d in dirs], mode="exact")
    names = sorted(SMALL.tensor_shapes())
    expected = reference(base_dir, dirs, names)
    assert_close(result.pairs, expected)
    mean = [sum(v[m] for v in expected.values()) / len(expected) for m in range(3)]
    assert math.isclose(result.mean.pcc, mean[0], rel_tol=REL)
    assert math.isclose(result.mean.cosine, mean[1], rel_tol=REL)
    assert math.isclose(result.mean.euclidean, mean[2], rel_tol=REL)
    assert result.tensors_compared == len(names)
    assert result.elements_compared == SMALL.num_parameters
    assert result.skipped == []


def test_near_identical_models_keep_precision(client, model_root):
    """Kinship above 0.99999, where |a|^2 + |b|^2 - 2ab loses most digits of the distance."""
    base = make_base(SMALL, seed=5)
    (m0,) = make_family(base, 1, rho=0.0, scale=0.01, seed=6)
    generator = torch.Generator().manual_seed(7)
    m1 = {k: v + 1e-5 * torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in m0.items()}
    third = make_family(base, 1, rho=0.0, seed=8)[0]
    dirs = [model_root / "base", model_root / "a", model_root / "b", model_root / "c"]
    save_checkpoint({k: v.double() for k, v in base.items()}, dirs[0])
    save_checkpoint({k: v.double() for k, v in m0.items()}, dirs[1])
    save_checkpoint(m1, dirs[2])
    save_checkpoint({k: v.double() for k, v in third.items()}, dirs[3])
    result = client.kinship(str(dirs[0]), [str(d) for d in dirs[1:]], mode="exact")
    expected = reference(dirs[0], dirs[1:], sorted(SMALL.tensor_shapes()))
    assert expected[(0, 1)][0] > 0.99999
    assert_close(result.pairs, expected)


def _resized_family(model_root: Path):
    """Base and two models; model b's vocabulary grew by 8 rows and it is sharded in 3 files."""
    base = make_base(SMALL, seed=9)
    a, b = make_family(base, 2, rho=0.6, seed=10)
    grown = dict(b)
    generator = torch.Generator().manual_seed(11)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = torch.randn(8, SMALL.hidden_size, generator=generator) * 0.02
        grown[name] = torch.cat([b[name], extra])
    dirs = [
        save_checkpoint(base, model_root / "base", dtype=torch.bfloat16),
        save_checkpoint(a, model_root / "a", dtype=torch.bfloat16, shards=2),
        save_checkpoint(grown, model_root / "b", dtype=torch.bfloat16, shards=3),
    ]
    return dirs


def test_sharded_resized_vocabulary_is_skipped_by_default(client, model_root):
    dirs = _resized_family(model_root)
    result = client.kinship(str(dirs[0]), [str(dirs[1]), str(dirs[2])], mode="exact")
    resized = {"model.embed_tokens.weight", "lm_head.weight"}
    assert {name for name, reason, _ in result.skipped} == resized
    assert all(reason == "shape_mismatch" for _, reason, _ in result.skipped)
    names = sorted(set(SMALL.tensor_shapes()) - resized)
    assert_close(result.pairs, reference(dirs[0], dirs[1:], names))


def test_sharded_resized_vocabulary_leading_slice(client, model_root):
    dirs = _resized_family(model_root)
    result = client.kinship(str(dirs[0]), [str(dirs[1]), str(dirs[2])], mode="exact", shape_mismatch="leading_slice")
    assert result.skipped == []
    assert sorted(result.sliced) == ["lm_head.weight", "model.embed_tokens.weight"]
    slices = {n: (SMALL.vocab_size, SMALL.hidden_size) for n in result.sliced}
    assert_close(result.pairs, reference(dirs[0], dirs[1:], sorted(SMALL.tensor_shapes()), slices))


def test_missing_and_integer_tensors_are_reported(client, model_root):
    base = make_base(SMALL, seed=12)
    a, b = make_family(base, 2, rho=0.5, seed=13)
    a = dict(a)
    del a["model.layers.1.mlp.up_proj.weight"]
    for tensors in (base, a, b):
        tensors["position_ids"] = torch.arange(16)
    dirs = [save_checkpoint(t, model_root / n) for t, n in ((base, "base"), (a, "a"), (b, "b"))]
    result = client.kinship(str(dirs[0]), [str(dirs[1]), str(dirs[2])], mode="exact")
    reasons = {name: reason for name, reason, _ in result.skipped}
    assert reasons == {"model.layers.1.mlp.up_proj.weight": "missing", "position_ids": "not_floating"}
    names = sorted(set(SMALL.tensor_shapes()) - {"model.layers.1.mlp.up_proj.weight"})
    assert_close(result.pairs, reference(dirs[0], dirs[1:], names))


def test_per_layer_breakdown_matches_reference(client, family):
    paths = family["paths"]
    result = client.kinship(str(paths["base"]), [str(paths["m0"]), str(paths["m1"])], mode="exact", per_layer=True)
    groups = {layer.group: layer for layer in result.layers}
    assert set(groups) == {"embed", "layers.0", "layers.1", "head"}
    layer0 = sorted(n for n in SMALL.tensor_shapes() if n.startswith("model.layers.0."))
    expected = reference(paths["base"], [paths["m0"], paths["m1"]], layer0)
    assert_close(groups["layers.0"].pairs, expected)
    assert groups["layers.0"].tensors == len(layer0)
    assert sum(layer.elements for layer in result.layers) == result.elements_compared


def test_one_pass_reads_every_file_once(model_root):
    """n models: each tensor of each checkpoint file is read exactly once, whatever the number of pairs."""
    shape = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2)
    base = make_base(shape, seed=14)
    models = make_family(base, 5, rho=0.4, seed=15)
    base_ck = resolve(LocalPath(str(save_checkpoint(base, model_root / "base", shards=2))), [model_root])
    model_cks = [resolve(LocalPath(str(save_checkpoint(m, model_root / f"m{i}", shards=2))), [model_root]) for i, m in enumerate(models)]
    stats = ReadStats()
    # A tiny chunk budget forces many chunks per tensor: still one read of each tensor.
    result = exact_kinship(base_ck, model_cks, chunk_bytes=4096 * 8 * 6, stats=stats)
    assert len(result.overall.pairs()) == 10
    files = [f for ck in (base_ck, *model_cks) for f in ck.files]
    assert set(stats.bytes_by_file) == {str(f) for f in files}
    assert set(stats.reads_by_tensor.values()) == {1}
    assert len(stats.reads_by_tensor) == 6 * len(shape.tensor_shapes())
    data_bytes = shape.num_parameters * 4
    assert stats.total_bytes == 6 * data_bytes
    for ck in (base_ck, *model_cks):
        assert sum(stats.bytes_by_file[str(f)] for f in ck.files) == data_bytes


def test_bytes_read_reported_over_grpc(client, family):
    paths = family["paths"]
    result = client.kinship(str(paths["base"]), [str(paths[k]) for k in ("m0", "m1", "m2")], mode="exact")
    assert result.bytes_read == 4 * SMALL.num_parameters * 4
    assert result.device == "cpu"


def test_partials_of_tensor_ranges_reduce_to_the_whole_pass(model_root):
    """The distributed seam: moments of disjoint tensor ranges, reduced, equal one pass (and the reference)."""
    from kinship_service.checkpoints.streaming import CheckpointReader
    from kinship_service.kinship.exact import partial_moments, plan_comparison, reduce_partials
    from kinship_service.kinship.similarity import PairwiseMoments, similarities

    shape = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2)
    base = make_base(shape, seed=31)
    models = make_family(base, 3, rho=0.3, seed=32)
    base_dir = save_checkpoint(base, model_root / "base")
    model_dirs = [save_checkpoint(m, model_root / f"m{i}") for i, m in enumerate(models)]
    checkpoints = [resolve(LocalPath(str(d)), [model_root]) for d in (base_dir, *model_dirs)]
    readers = [CheckpointReader(c) for c in checkpoints]
    plan = plan_comparison([r.tensors() for r in readers], ["base", "m0", "m1", "m2"], False)
    cut = len(plan.tensors) // 3
    ranges = [plan.tensors[:cut], plan.tensors[cut : 2 * cut], plan.tensors[2 * cut :]]
    parts = [partial_moments(readers, r, device=torch.device("cpu"), chunk_bytes=1 << 20) for r in ranges]
    reduced = reduce_partials(parts, 3)
    total = PairwiseMoments(3)
    for m in reduced.moments.values():
        total.merge(m)
    whole = exact_kinship(checkpoints[0], checkpoints[1:])
    assert reduced.tensors_by_group == whole.tensors_by_group
    got = similarities(total)
    names = [t.name for t in plan.tensors]
    expected = reference(base_dir, model_dirs, names)
    for (i, j), (pcc, cos, euc) in expected.items():
        assert got.pcc[i][j] == pytest.approx(pcc, rel=1e-10)
        assert got.pcc[i][j] == pytest.approx(whole.overall.pcc[i][j], rel=1e-12)
        assert got.cosine[i][j] == pytest.approx(cos, rel=1e-10)
        assert got.euclidean[i][j] == pytest.approx(euc, rel=1e-10)
