"""The main job: make small Llama-shaped checkpoints, start kinship-server on them, drive it with the client.

The family: a base and four fine-tunes whose task vectors are built to have known
kinship: `sibling-a`/`sibling-b` share 90% of their task vector, `cousin` shares 40%
with them, `stranger` nothing. The server runs as a real subprocess with its default
settings except the directories it may use (all under ./demo-output).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from kinship_client import KinshipClient
from kinship_client.cli import format_kinship_table
from kinship_service.synthetic import LlamaShape, make_base, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-output"
SHAPE = LlamaShape(vocab_size=1024, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4, num_kv_heads=2)


def make_checkpoints(models_dir: Path) -> dict[str, Path]:
    """Base + fine-tunes whose task vectors mix shared and private directions in known proportions."""
    generator = torch.Generator().manual_seed(2024)
    base = make_base(SHAPE, seed=0)
    shared = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
    family_dir = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}

    def finetune(weights: dict[str, float]) -> dict[str, torch.Tensor]:
        private = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
        sources = {"shared": shared, "family": family_dir, "private": private}
        return {
            name: weight + 0.01 * sum(math.sqrt(w) * sources[s][name] for s, w in weights.items())
            for name, weight in base.items()
        }

    recipes = {
        "sibling-a": {"shared": 0.4, "family": 0.5, "private": 0.1},
        "sibling-b": {"shared": 0.4, "family": 0.5, "private": 0.1},
        "cousin": {"shared": 0.4, "private": 0.6},
        "stranger": {"private": 1.0},
    }
    paths = {"base": save_checkpoint(base, models_dir / "base", dtype=torch.bfloat16, config=SHAPE.config(torch.bfloat16))}
    for name, recipe in recipes.items():
        paths[name] = save_checkpoint(
            finetune(recipe), models_dir / name, dtype=torch.bfloat16, shards=2, config=SHAPE.config(torch.bfloat16)
        )
    return paths


def start_server(env_overrides: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, **env_overrides}
    process = subprocess.Popen(
        [sys.executable, "-m", "kinship_service"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("kinship-server listening on "):
            return process, line.rsplit(" ", 1)[1].strip()
    raise SystemExit("kinship-server exited before it was ready; see its log above")


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    models_dir = OUT / "models"
    print(f"== making {SHAPE.num_parameters / 1e6:.1f}M-parameter Llama-shaped checkpoints in {models_dir}")
    paths = make_checkpoints(models_dir)
    process, address = start_server(
        {
            "KINSHIP_HOST": "127.0.0.1",
            "KINSHIP_PORT": "0",
            "KINSHIP_METRICS_PORT": "0",
            "KINSHIP_ALLOWED_ROOTS": str(OUT),
            "KINSHIP_CACHE_DIR": str(OUT / "cache"),
            "KINSHIP_OUTPUT_ROOT": str(OUT / "merges"),
            "KINSHIP_LOG_FORMAT": "text",
            "KINSHIP_LOG_LEVEL": "WARNING",
        }
    )
    print(f"== kinship-server is listening on {address}")
    try:
        with KinshipClient(address, timeout=300) as client:
            client.wait_ready()
            models = [str(paths[n]) for n in ("sibling-a", "sibling-b", "cousin", "stranger")]
            print("\n== Kinship (exact, one streaming pass over all five checkpoints)")
            result = client.kinship(str(paths["base"]), models, mode="exact", per_layer=True)
            print(format_kinship_table(result, names=["sibling-a", "sibling-b", "cousin", "stranger"]))
    finally:
        process.terminate()
        process.wait(timeout=30)
    print("\n== done; the server shut down cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
