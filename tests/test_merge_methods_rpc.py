"""StartMerge with a method through the real server: results against the float64 references, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from kinship_client import KinshipClient, KinshipRpcError
from kinship_client.cli import main as cli_main
from kinship_service.checkpoints.synthetic import save_checkpoint
from kinship_service.server.main import RunningServer

from .merge_method_refs import as_f64, assert_close_f32, read_all, ref_dare_mask, ref_task_vectors, ref_topk_mask

SHAPES = {"model.embed_tokens.weight": (32, 16), "model.layers.0.mlp.up_proj.weight": (40, 16), "model.norm.weight": (16,)}


@pytest.fixture
def trio(model_root: Path) -> dict[str, object]:
    """A base and three fine-tunes (float32) under the server's allowed root."""
    g = torch.Generator().manual_seed(3)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    models = [{n: base[n] + 0.1 * torch.randn(base[n].shape, generator=g) for n in SHAPES} for _ in range(3)]
    paths = [str(save_checkpoint(t, model_root / name)) for t, name in zip([base, *models], ["base", "m0", "m1", "m2"], strict=True)]
    return {"tensors": [base, *models], "base": paths[0], "models": paths[1:]}


def test_ties_through_the_server_matches_the_reference(client: KinshipClient, trio: dict[str, object], server: object) -> None:
    models = trio["models"]
    assert isinstance(models, list)
    op = client.merge(
        None, None, method="ties", base=trio["base"], models=models, weight=0.7, weights=[None, 0.4, None], density=0.5,
        output_path="ties", dtype="float32",
    )
    info = op.wait(timeout=120)
    assert info.state == "succeeded", info
    assert info.raw.method == "ties" and len(info.raw.models) == 3
    out = read_all(Path(info.output_path))
    tensors = trio["tensors"]
    assert isinstance(tensors, list)
    for name in SHAPES:
        base, *xs = [as_f64(t[name]) for t in tensors]
        masks = [ref_topk_mask(x - base, 0.5) for x in xs]
        ref = ref_task_vectors(base, xs, [0.7, 0.4, 0.7], masks=masks, consensus=True, normalize=True)
        assert_close_f32(out[name], ref, np.abs(base) + sum(np.abs(x) for x in xs), name)
    assert "merge_method: ties" in (Path(info.output_path) / "README.md").read_text()


def _refused(client: KinshipClient, **kwargs: object) -> KinshipRpcError:
    with pytest.raises(KinshipRpcError) as caught:
        client.start_merge(None, None, output_path="x", **kwargs)  # type: ignore[arg-type]
    return caught.value


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "ties", "weight": 1.0, "density": 1.5}, "density"),
        ({"method": "ties", "weight": 1.0, "density": 0.0}, "density"),
        ({"method": "linear", "weight": -0.5, "no_base": True}, "weight"),
        ({"method": "linear", "weights": [0.0, 0.0, 0.0], "no_base": True}, "weight"),
        ({"method": "task_arithmetic", "weights": [0.5, -0.5, 0.0], "normalize": True}, "weight"),
        ({"method": "ties", "weight": 1.0, "no_base": True}, "base"),
        ({"method": "dare_ties", "weight": 1.0, "repeat": True}, "models[1]"),
        ({"method": "model_stock", "one": True}, "models"),
        ({"method": "linear", "one": True, "weight": 1.0, "no_base": True}, "models"),
        ({"method": "task_arithmetic", "density": 0.5, "weight": 1.0}, "task_arithmetic"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    client: KinshipClient, trio: dict[str, object], kwargs: dict[str, object], field: str
) -> None:
    models = list(trio["models"])  # type: ignore[call-overload]
    if kwargs.pop("repeat", False):
        models = [models[0], models[0]]
    if kwargs.pop("one", False):
        models = models[:1]
    base = None if kwargs.pop("no_base", False) else trio["base"]
    try:
        error = _refused(client, base=base, models=models, **kwargs)
    except ValueError as exc:  # the client refuses a parameter the method does not take before sending
        assert field in str(exc)
        return
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert field in error.field, error


def test_shapes_that_differ_are_shape_mismatch(client: KinshipClient, trio: dict[str, object], model_root: Path) -> None:
    tensors = trio["tensors"]
    assert isinstance(tensors, list)
    grown = dict(tensors[2])
    grown["model.norm.weight"] = torch.randn(20)
    path = str(save_checkpoint(grown, model_root / "grown"))
    op = client.merge(None, None, method="task_arithmetic", base=trio["base"], models=[trio["models"][0], path], weight=0.5, output_path="sm")  # type: ignore[index]
    info = op.wait(timeout=120)
    assert info.state == "failed" and info.error is not None and info.error.reason == "SHAPE_MISMATCH", info


def test_cli_merges_with_any_method(trio: dict[str, object], server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    models = trio["models"]
    assert isinstance(models, list)
    argv = ["--target", server.address, "merge", "--quiet", "--json", "--method", "dare_linear", "--base", str(trio["base"])]
    argv += [*models[:2], "--weights", "0.6", "0.4", "--density", "0.7", "--seed", "5", "--dtype", "float32", "--out", "cli-dare"]
    assert cli_main(argv) == 0
    out = read_all(Path(json.loads(capsys.readouterr().out)["output_path"]))
    tensors = trio["tensors"]
    assert isinstance(tensors, list)
    for name in SHAPES:
        base, *xs = [as_f64(t[name]) for t in tensors[:3]]
        masks = [ref_dare_mask(5, name, m, base.size, 0.7).reshape(base.shape) for m in range(2)]
        ref = ref_task_vectors(base, xs, [0.6, 0.4], masks=masks, rescale=True)
        assert_close_f32(out[name], ref, 3 * (np.abs(base) + sum(np.abs(x) for x in xs)), name)
    assert cli_main(["--target", server.address, "merge", "--method", "ties", "--base", str(trio["base"]), models[0], "--out", "y"]) != 0
    assert "weight" in capsys.readouterr().err


def test_mergekit_yaml_of_ties_with_per_model_parameters(client: KinshipClient, trio: dict[str, object]) -> None:
    base, models = trio["base"], trio["models"]
    assert isinstance(models, list)
    text = f"""
merge_method: ties
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 1]}}
      - {{model: {models[0]}, layer_range: [0, 1], parameters: {{weight: 0.9, density: 0.6}}}}
      - {{model: {models[1]}, layer_range: [0, 1], parameters: {{weight: 0.3}}}}
parameters: {{density: 0.4, normalize: true, int8_mask: true}}
dtype: float32
"""
    info = client.merge(None, None, mergekit_yaml=text, output_path="yaml-ties").wait(timeout=120)
    assert info.state == "succeeded", info
    out = read_all(Path(info.output_path))
    tensors = trio["tensors"]
    assert isinstance(tensors, list)
    for name in SHAPES:
        b, *xs = [as_f64(t[name]) for t in tensors[:3]]
        masks = [ref_topk_mask(xs[0] - b, 0.6), ref_topk_mask(xs[1] - b, 0.4)]
        ref = ref_task_vectors(b, xs, [0.9, 0.3], masks=masks, consensus=True, normalize=True)
        assert_close_f32(out[name], ref, np.abs(b) + sum(np.abs(x) for x in xs), name)
    error = _refused(client, mergekit_yaml=text.replace("parameters: {weight: 0.3}", "parameters: {weight: 0.3, gamma: 1}"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "gamma" in error.message
