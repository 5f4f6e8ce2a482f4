"""The trained benchmark family: a base stopped mid-training on every task, and one specialist per task.

    python -m bench.guidance.family --seed 0 --workdir /tmp/kinship-guidance   # train (or reuse) and print scores

Everything is deterministic per seed (one CPU thread, deterministic algorithms, one RNG
stream per purpose): the same seed and `FamilySpec` give bit-identical checkpoints. A
family is cached on disk under `<workdir>/families/<key>` (seed, spec and FAMILY_VERSION),
written to a temporary directory and renamed when complete, so reruns never retrain and an
interrupted training leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.guidance.model import TinyLlama, TinyLlamaShape, save_checkpoint
from bench.guidance.tasks import TASK_NAMES, answer_slice, dev_and_test, stream_seed, train_batch

FAMILY_VERSION = 1
"""Bump when training or the tasks change: cached families of another version are not reused."""


@dataclass(frozen=True)
class FamilySpec:
    """Sizes of one family. The defaults train a seed in about 15 CPU seconds on one core."""

    shape: TinyLlamaShape = field(default_factory=TinyLlamaShape)
    length: int = 8
    """Input digits per example (sequences are 2 * length + 2 tokens)."""
    base_steps: int = 150
    """Mixture steps of the base: stopped mid-training, so it knows every task partly."""
    specialist_steps: int = 80
    """Fine-tuning steps of each specialist on its one task."""
    batch: int = 64
    base_lr: float = 3e-3
    specialist_lr: float = 1e-3
    eval_per_task: int = 160
    """Dev and test examples per task (each)."""

    def key(self, seed: int) -> str:
        """The cache directory name of this spec's family for `seed`."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"v{FAMILY_VERSION}-{digest}-seed{seed}"


@dataclass(frozen=True)
class Family:
    """Checkpoint directories of a trained family."""

    seed: int
    spec: FamilySpec
    directory: Path
    base: Path
    specialists: dict[str, Path]
    """Task name -> its specialist."""


def _deterministic() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def _answer_loss(model: TinyLlama, sequences: torch.Tensor, length: int) -> torch.Tensor:
    logits = model(sequences[:, :-1])[:, answer_slice(length)]
    targets = sequences[:, answer_slice(length).start + 1 :]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _train(
    model: TinyLlama, tasks: tuple[int, ...], steps: int, lr: float, spec: FamilySpec, generator: torch.Generator, held_out: torch.Tensor
) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:  # linear warm-up over the first tenth, then constant
            group["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 10))
        batch = train_batch(generator, tasks, spec.batch, spec.length, held_out)
        loss = _answer_loss(model, batch, spec.length)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    model.eval()


def train_family(seed: int, spec: FamilySpec, directory: Path) -> None:
    """Train the base and one specialist per task into `directory` (base/, <task>/, family.json)."""
    _deterministic()
    dev, test = dev_and_test(seed, spec.eval_per_task, spec.length)
    held_out = torch.cat([dev.keys, test.keys])
    torch.manual_seed(stream_seed(seed, "init"))
    base = TinyLlama(spec.shape)
    all_tasks = tuple(range(len(TASK_NAMES)))
    _train(base, all_tasks, spec.base_steps, spec.base_lr, spec, torch.Generator().manual_seed(stream_seed(seed, "train", "base")), held_out)
    save_checkpoint(base, directory / "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    for t, task in enumerate(TASK_NAMES):
        specialist = TinyLlama(spec.shape)
        specialist.load_state_dict(base_state)
        generator = torch.Generator().manual_seed(stream_seed(seed, "train", task))
        _train(specialist, (t,), spec.specialist_steps, spec.specialist_lr, spec, generator, held_out)
        save_checkpoint(specialist, directory / task)
    (directory / "family.json").write_text(
        json.dumps({"seed": seed, "version": FAMILY_VERSION, "spec": asdict(spec), "tasks": list(TASK_NAMES)}, indent=2)
    )


def ensure_family(seed: int, spec: FamilySpec, workdir: Path) -> Family:
    """The family of `seed` under `workdir`, trained first unless a complete copy is cached."""
    directory = workdir / "families" / spec.key(seed)
    if not (directory / "family.json").is_file():
        tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            train_family(seed, spec, tmp)
            try:
                tmp.rename(directory)
            except OSError:  # another process finished the same family first: keep its copy
                if not (directory / "family.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Family(seed, spec, directory, directory / "base", {task: directory / task for task in TASK_NAMES})


def main() -> None:
    parser = argparse.ArgumentParser(description="Train (or reuse) one benchmark family and print its scores.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kinship-guidance"))
    args = parser.parse_args()
    from bench.guidance.evaluate import Evaluator, mean

    spec = FamilySpec()
    started = time.monotonic()
    family = ensure_family(args.seed, spec, args.workdir)
    print(f"family {family.directory} ready in {time.monotonic() - started:.1f} s")
    evaluator = Evaluator(args.seed, spec)
    for name, path in [("base", family.base), *family.specialists.items()]:
        dev, test = evaluator.dev(path), evaluator.test(path)
        tasks = " ".join(f"{t}={a:5.1f}" for t, a in zip(TASK_NAMES, dev, strict=True))
        print(f"{name:12s} dev {mean(dev):6.2f} test {mean(test):6.2f}  {tasks}")


if __name__ == "__main__":
    main()
