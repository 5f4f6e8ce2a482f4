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
from kinship_client.population import Member
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, save_checkpoint

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


NAMES = ["sibling-a", "sibling-b", "cousin", "stranger"]
SCORES = {"sibling-a": 61.0, "sibling-b": 63.5, "cousin": 60.2, "stranger": 58.9}


def drive(client: KinshipClient, paths: dict[str, Path]) -> None:
    """Every RPC once, on the demo family."""
    base = str(paths["base"])
    models = [str(paths[n]) for n in NAMES]

    print("\n== Kinship (EXACT: one streaming pass over all five checkpoints)")
    result = client.kinship(base, models, mode="exact", per_layer=True)
    print(format_kinship_table(result, names=NAMES))

    print("\n== RegisterCheckpoint (fingerprint + lossless delta, ahead of time)")
    for name in NAMES:
        reg = client.register_checkpoint(str(paths[name]), base)
        print(
            f"{name:<10} identity {reg.identity[:16]}...  {reg.elements} elements, "
            f"fingerprint {reg.fingerprint_bytes / 2**20:.2f} MiB, delta {reg.delta_bytes / 2**20:.2f} MiB, "
            f"already registered: {reg.already_registered}"
        )

    print("\n== Kinship (FINGERPRINT: estimated from the cached sketches, no weights read)")
    estimate = client.kinship(base, models, mode="fingerprint")
    print(format_kinship_table(estimate, names=NAMES))

    members = [Member(name=n, checkpoint=str(paths[n]), score=SCORES[n], generation=0) for n in NAMES]
    print("\n== RankCandidates (top-3 greedy pairs + one exploration merge)")
    ranking = client.rank_candidates(members, top_k=3, base=base)
    print(f"top-3: {', '.join(ranking.top_k)}  (kinship mode {ranking.mode})")
    for rec in ranking.recommendations:
        print(f"  {rec.kind:<11} {rec.first} + {rec.second}  kinship {rec.kinship:.4f}: {rec.reason}")

    print("\n== ShouldStop (generation 0)")
    decision = client.should_stop(members, top_k=3, base=base)
    print(f"  stop={decision.stop}: {decision.summary}")

    print("\n== StartMerge + WatchMergeJob (SLERP of the recommended greedy pair, registered against the base)")
    best = ranking.greedy[0]
    operation = client.merge(
        str(paths[best.first]), str(paths[best.second]), t=[0.0, 0.5, 1.0], output_path="gen1-merge", base=base
    )
    job = operation.wait(on_progress=lambda info: None)
    print(f"  job {job.job_id}: {job.state}, {job.tensors_done}/{job.tensors_total} tensors -> {job.output_path}")
    print("  GetMergeJob:", client.get_merge_job(job.job_id).state)
    cancelled = client.start_merge(str(paths["cousin"]), str(paths["stranger"]), t=0.5, output_path="to-cancel")
    print("  CancelMergeJob:", client.cancel_merge_job(cancelled.job_id).state)
    jobs, _ = client.list_merge_jobs(page_size=10)
    print("  ListMergeJobs:", ", ".join(f"{j.job_id[:8]}={j.state}" for j in jobs))

    print("\n== ShouldStop after generation 1 (the merged child scores best)")
    members.append(
        Member(name="gen1", checkpoint=job.output_path, score=64.1, generation=1, parents=(best.first, best.second))
    )
    decision = client.should_stop(members, top_k=3, base=base, previous_top_k=ranking.top_k, gain_window=1)
    print(f"  stop={decision.stop}: {decision.summary}")
    print(f"  gains: {', '.join(f'{g.name} {g.gain:+.2f}' for g in decision.recent_gains) or 'none in window'}")


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
            drive(client, paths)
    finally:
        process.terminate()
        process.wait(timeout=60)
    print("\n== done; the server shut down cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
