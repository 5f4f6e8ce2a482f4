"""Small Llama-shaped checkpoints with known task vectors, for the demo, tests and benchmarks.

A family is a base plus fine-tunes whose task vectors mix one shared direction with
private noise: `delta_i = scale * (sqrt(rho) * shared + sqrt(1 - rho) * private_i)`,
so any two members have task-vector correlation close to `rho` by construction.
Files are written like `save_pretrained` does: `model.safetensors`, or shards with
`model.safetensors.index.json`, plus `config.json` and tokenizer files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaShape:
    """Dimensions of a Llama-style decoder."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    tie_embeddings: bool = False

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight's name and shape, as in transformers' LlamaForCausalLM."""
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_heads * self.num_kv_heads
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}."
            shapes.update(
                {
                    p + "self_attn.q_proj.weight": (h, h),
                    p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h),
                    p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (i, h),
                    p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i),
                    p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,),
                }
            )
        shapes["model.norm.weight"] = (h,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())

    def config(self, dtype: torch.dtype) -> dict[str, object]:
        """A transformers-style config.json."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


def shape_for_parameters(target: int, num_layers: int = 8, vocab_size: int = 32000) -> LlamaShape:
    """A LlamaShape with about `target` parameters (for benchmarks)."""
    hidden = 64
    while LlamaShape(vocab_size, hidden * 2, int(hidden * 2 * 2.75) // 8 * 8, num_layers, 8, 4).num_parameters < target:
        hidden *= 2
    low, high = hidden, hidden * 2
    while high - low > 64:
        mid = (low + high) // 2 // 64 * 64
        if LlamaShape(vocab_size, mid, int(mid * 2.75) // 8 * 8, num_layers, 8, 4).num_parameters < target:
            low = mid
        else:
            high = mid
    return LlamaShape(vocab_size, high, int(high * 2.75) // 8 * 8, num_layers, 8, 4)


def make_base(shape: LlamaShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 base weights (norm weights near 1, like a trained model)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, dims in shape.tensor_shapes().items():
        if len(dims) == 1:
            tensors[name] = 1.0 + 0.05 * torch.randn(dims, generator=generator)
        else:
            tensors[name] = torch.randn(dims, generator=generator) * (1.0 / math.sqrt(dims[-1]))
    return tensors


def make_family(
    base: Mapping[str, torch.Tensor], n: int, rho: float, *, scale: float = 0.01, seed: int = 1
) -> list[dict[str, torch.Tensor]]:
    """n fine-tunes of `base` whose task vectors correlate pairwise with about `rho` (0 <= rho <= 1)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError("rho must be in [0, 1]")
    generator = torch.Generator().manual_seed(seed)
    shared = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
    models = []
    for _ in range(n):
        model = {}
        for name, weight in base.items():
            private = torch.randn(weight.shape, generator=generator)
            delta = math.sqrt(rho) * shared[name] + math.sqrt(1.0 - rho) * private
            model[name] = weight + scale * delta
        models.append(model)
    return models


def write_family_streaming(
    root: Path,
    shape: LlamaShape,
    n_models: int,
    *,
    rho: float = 0.5,
    scale: float = 0.01,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> list[Path]:
    """Write `root/base` and `root/m0..` one decoder layer (shard) at a time, for models too big to build in memory.

    Returns [base, m0, m1, ...]. Memory stays at one layer's tensors for every checkpoint.
    """
    names = list(shape.tensor_shapes())
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = f"layer{int(parts[2]):04d}" if parts[1] == "layers" else "other"
        groups.setdefault(key, []).append(name)
    keys = sorted(groups)
    dirs = [Path(root) / "base", *(Path(root) / f"m{i}" for i in range(n_models))]
    weight_maps: list[dict[str, str]] = [{} for _ in dirs]
    generator = torch.Generator().manual_seed(seed)
    shapes = shape.tensor_shapes()
    for index, key in enumerate(keys):
        file = f"model-{index + 1:05d}-of-{len(keys):05d}.safetensors"
        base = {}
        for name in groups[key]:
            dims = shapes[name]
            if len(dims) == 1:
                base[name] = 1.0 + 0.05 * torch.randn(dims, generator=generator)
            else:
                base[name] = torch.randn(dims, generator=generator) * (1.0 / math.sqrt(dims[-1]))
        shared = {name: torch.randn(t.shape, generator=generator) for name, t in base.items()}
        outputs = [base] + [
            {
                name: t + scale * (math.sqrt(rho) * shared[name] + math.sqrt(1 - rho) * torch.randn(t.shape, generator=generator))
                for name, t in base.items()
            }
            for _ in range(n_models)
        ]
        for directory, tensors, weight_map in zip(dirs, outputs, weight_maps, strict=False):
            directory.mkdir(parents=True, exist_ok=True)
            save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(directory / file), metadata={"format": "pt"})
            weight_map.update({name: file for name in tensors})
        del base, shared, outputs
    for directory, weight_map in zip(dirs, weight_maps, strict=False):
        index_doc = {"metadata": {}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
        (directory / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    return dirs


def save_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    directory: Path,
    *,
    dtype: torch.dtype | None = None,
    shards: int = 1,
    config: Mapping[str, object] | None = None,
) -> Path:
    """Write tensors as a Hugging Face style checkpoint directory; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    names = sorted(cast)
    if shards <= 1:
        save_file(cast, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        per_shard = math.ceil(len(names) / shards)
        weight_map: dict[str, str] = {}
        total = 0
        for index in range(shards):
            part = names[index * per_shard : (index + 1) * per_shard]
            file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: cast[k] for k in part}, str(directory / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in part})
            total += sum(cast[k].numel() * cast[k].element_size() for k in part)
        index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(dict(config), indent=2))
        (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
        (directory / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return directory
