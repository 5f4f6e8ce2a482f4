"""The synthetic tasks of the benchmark family: token layout, examples, and disjoint dev/test/train data.

Every example is `[BOS, TASK_t, x_1..x_n, SEP, y_1..y_n]` over digits 0-9; the model is
scored on predicting `y` (teacher forcing), so a task's accuracy is the share of answer
digits it gets right. The tasks differ in kind (position, order, arithmetic, memory), so a
specialist fine-tuned on one does not solve another and merges can combine skills.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

DIGITS = 10
"""Symbols 0..9 are the digits; the tokens after them are special."""
TASK_NAMES = ("copy", "reverse", "sort", "increment", "running_max", "prefix_sum")
"""The tasks, one specialist each; their order fixes the task tokens."""
TaskName = Literal["copy", "reverse", "sort", "increment", "running_max", "prefix_sum"]
TASK_TOKEN0 = DIGITS
SEP = TASK_TOKEN0 + len(TASK_NAMES)
BOS = SEP + 1
VOCAB_SIZE = 40
"""Tokens 0..BOS are used; the rest of the vocabulary stays untrained, like reserved tokens."""

Stream = Literal["train", "dev", "test"]


def _answer(task: str, x: torch.Tensor) -> torch.Tensor:
    """The answer digits of `task` for inputs `x` (int64, shape [batch, n])."""
    if task == "copy":
        return x.clone()
    if task == "reverse":
        return x.flip(1)
    if task == "sort":
        return x.sort(dim=1).values
    if task == "increment":
        return (x + 1) % DIGITS
    if task == "running_max":
        return x.cummax(dim=1).values
    if task == "prefix_sum":
        return x.cumsum(dim=1) % DIGITS
    raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASK_NAMES)}")


ANSWERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {t: (lambda x, t=t: _answer(t, x)) for t in TASK_NAMES}


def stream_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one RNG stream (family seed + purpose), independent across purposes."""
    text = "/".join([str(seed), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def input_keys(task_index: int, x: torch.Tensor) -> torch.Tensor:
    """One int64 per example identifying (task, input digits): used to keep data sets disjoint."""
    weights = DIGITS ** torch.arange(x.shape[1] - 1, -1, -1, dtype=torch.int64)
    return task_index * DIGITS ** x.shape[1] + (x * weights).sum(dim=1)


def encode(task_index: int, x: torch.Tensor) -> torch.Tensor:
    """Full sequences `[BOS, TASK, x, SEP, y]` for inputs `x` of task `task_index`."""
    batch = x.shape[0]
    y = ANSWERS[TASK_NAMES[task_index]](x)
    bos = torch.full((batch, 1), BOS, dtype=torch.int64)
    task = torch.full((batch, 1), TASK_TOKEN0 + task_index, dtype=torch.int64)
    sep = torch.full((batch, 1), SEP, dtype=torch.int64)
    return torch.cat([bos, task, x, sep, y], dim=1)


def answer_slice(length: int) -> slice:
    """Positions whose next-token logits predict the answer digits, for inputs of `length` digits."""
    return slice(length + 2, 2 * length + 2)


@dataclass(frozen=True)
class EvalSet:
    """Scored examples of every task: `sequences[t]` is [examples, 2n + 2] for task `TASK_NAMES[t]`."""

    sequences: tuple[torch.Tensor, ...]
    keys: torch.Tensor
    """Input keys of all its examples (see `input_keys`)."""


def _draw(generator: torch.Generator, count: int, length: int) -> torch.Tensor:
    return torch.randint(0, DIGITS, (count, length), generator=generator, dtype=torch.int64)


def eval_set(seed: int, stream: Literal["dev", "test"], per_task: int, length: int, exclude: torch.Tensor | None = None) -> EvalSet:
    """`per_task` distinct examples of every task from the `stream` RNG stream, none with a key in `exclude`.

    Dev and test come from different streams; the test set is drawn with the dev keys
    excluded, so the two never share an example.
    """
    sequences, keys = [], []
    for t in range(len(TASK_NAMES)):
        generator = torch.Generator().manual_seed(stream_seed(seed, stream, t))
        chosen = torch.empty((0, length), dtype=torch.int64)
        chosen_keys = torch.empty((0,), dtype=torch.int64)
        while chosen.shape[0] < per_task:
            x = _draw(generator, per_task, length)
            k = input_keys(t, x)
            keep = ~torch.isin(k, chosen_keys)
            if exclude is not None:
                keep &= ~torch.isin(k, exclude)
            # Within one draw, keep the first occurrence of a key only.
            _, first = _first_occurrences(k)
            keep &= first
            chosen = torch.cat([chosen, x[keep]])[:per_task]
            chosen_keys = torch.cat([chosen_keys, k[keep]])[:per_task]
        sequences.append(encode(t, chosen))
        keys.append(chosen_keys)
    return EvalSet(tuple(sequences), torch.cat(keys))


def _first_occurrences(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique keys, mask of the first occurrence of each key)."""
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    is_first_sorted = torch.ones_like(sorted_keys, dtype=torch.bool)
    is_first_sorted[1:] = sorted_keys[1:] != sorted_keys[:-1]
    mask = torch.zeros_like(keys, dtype=torch.bool)
    mask[order[is_first_sorted]] = True
    return sorted_keys[is_first_sorted], mask


def dev_and_test(seed: int, per_task: int, length: int) -> tuple[EvalSet, EvalSet]:
    """The dev set (the bot's scores) and the disjoint test set (reported, never used for selection)."""
    dev = eval_set(seed, "dev", per_task, length)
    test = eval_set(seed, "test", per_task, length, exclude=dev.keys)
    return dev, test


def train_batch(
    generator: torch.Generator, tasks: tuple[int, ...], batch: int, length: int, held_out: torch.Tensor
) -> torch.Tensor:
    """A training batch mixing `tasks` evenly, with every dev/test input (`held_out` keys) removed."""
    parts = []
    per_task = max(1, batch // len(tasks))
    for t in tasks:
        x = _draw(generator, per_task, length)
        x = x[~torch.isin(input_keys(t, x), held_out)]
        parts.append(encode(t, x))
    return torch.cat(parts)
