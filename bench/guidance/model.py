"""A tiny Llama decoder in plain torch, saved and loaded as an ordinary Hugging Face checkpoint.

The module tree mirrors transformers' LlamaForCausalLM, so `state_dict()` has the HF tensor
names (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...,
`lm_head.weight`) and `config.json` has LlamaForCausalLM's fields: the service's kinship and
SLERP merges treat it like any Llama checkpoint. RoPE uses HF's rotate-half layout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from bench.guidance.tasks import BOS


@dataclass(frozen=True)
class TinyLlamaShape:
    """Dimensions of the decoder (HF LlamaConfig names)."""

    vocab_size: int = 40
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def config(self) -> dict[str, object]:
        """config.json of a LlamaForCausalLM with these dimensions (float32, untied head)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **asdict(self),
            "num_key_value_heads": self.num_attention_heads,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
            "bos_token_id": BOS,
            "eos_token_id": BOS,
        }


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Attention(nn.Module):
    def __init__(self, shape: TinyLlamaShape) -> None:
        super().__init__()
        h = shape.hidden_size
        self.heads = shape.num_attention_heads
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, hidden))  # type: ignore[no-any-return]


class MLP(nn.Module):
    def __init__(self, shape: TinyLlamaShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # type: ignore[no-any-return]


class DecoderLayer(nn.Module):
    def __init__(self, shape: TinyLlamaShape) -> None:
        super().__init__()
        self.self_attn = Attention(shape)
        self.mlp = MLP(shape)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))  # type: ignore[no-any-return]


class Decoder(nn.Module):
    def __init__(self, shape: TinyLlamaShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(shape) for _ in range(shape.num_hidden_layers)])
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)


class TinyLlama(nn.Module):
    """LlamaForCausalLM's computation: embeddings, pre-norm attention + SwiGLU blocks, final norm, head."""

    def __init__(self, shape: TinyLlamaShape) -> None:
        super().__init__()
        self.shape = shape
        self.model = Decoder(shape)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        head_dim = shape.hidden_size // shape.num_attention_heads
        inv_freq = 1.0 / shape.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits, [batch, length, vocab]."""
        positions = torch.arange(tokens.shape[1], dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))  # type: ignore[no-any-return]


def save_checkpoint(model: TinyLlama, directory: Path) -> Path:
    """Write `config.json` and `model.safetensors` (float32, HF names) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(model.shape.config(), indent=2) + "\n")
    return directory


def load_checkpoint(directory: str | Path) -> TinyLlama:
    """A TinyLlama from a checkpoint directory (its config.json and every `*.safetensors` shard)."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    fields = TinyLlamaShape.__dataclass_fields__
    shape = TinyLlamaShape(**{k: config[k] for k in fields if k in config})
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    model = TinyLlama(shape)
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    return model.eval()
