"""The benchmark's evaluation: per-task answer accuracy of a checkpoint on the dev and test sets.

The bot sees only dev scores; test scores are reported and never used for selection.
Score = mean per-task accuracy in points (0-100).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.guidance.family import FamilySpec
from bench.guidance.model import TinyLlama, load_checkpoint
from bench.guidance.tasks import EvalSet, answer_slice, dev_and_test


def mean(tasks: tuple[float, ...]) -> float:
    """The score: mean per-task accuracy, points."""
    return sum(tasks) / len(tasks)


def task_accuracies(model: TinyLlama, data: EvalSet, length: int) -> tuple[float, ...]:
    """Share of answer digits predicted right (argmax, teacher forcing) per task, in points.

    All tasks go through one forward pass (their sequences have one length).
    """
    answers = answer_slice(length)
    sequences = torch.cat(data.sequences)
    with torch.inference_mode():
        predicted = model(sequences[:, :-1])[:, answers].argmax(-1)
    correct = (predicted == sequences[:, answers.start + 1 :]).double().mean(dim=1)
    sizes = [s.shape[0] for s in data.sequences]
    return tuple(100.0 * part.mean().item() for part in correct.split(sizes))


class Evaluator:
    """Scores checkpoints of one family's seed on its dev set (the bot's) or test set (reported only)."""

    def __init__(self, seed: int, spec: FamilySpec) -> None:
        torch.set_num_threads(1)
        self.length = spec.length
        self.dev_set, self.test_set = dev_and_test(seed, spec.eval_per_task, spec.length)

    def dev(self, path: str | Path) -> tuple[float, ...]:
        """Per-task dev accuracies of the checkpoint at `path`."""
        return task_accuracies(load_checkpoint(path), self.dev_set, self.length)

    def test(self, path: str | Path) -> tuple[float, ...]:
        """Per-task test accuracies of the checkpoint at `path`."""
        return task_accuracies(load_checkpoint(path), self.test_set, self.length)
