"""The merging bots the harness compares, each driving the real server through the client.

- `greedy`: plain top-k greedy (Algorithm 1 without kinship): generation 1 merges every
  foundation pair, then each generation merges every not-yet-merged pair of the k best
  models, until the top-k set stops changing. It never asks the service for advice.
- `advised`: the paper's algorithm as `examples/evolve.py` runs it (ShouldStop after each
  generation, RankCandidates' greedy pairs plus the exploration merge). With no options it
  is the service's default advice (strategy b); `Advice` forwards options to both RPCs
  (strategy c).

Merges of the same recipe (same parents, method and parameters) are made once per seed and
shared by all strategies and reruns (`ModelStore`): a strategy is charged every merge it asks
for, shared or not. `Advice.method` picks the merge method: SLERP (default), a fixed other
method with equal weights, or `suggested`: each pair with the method and parameters its
recommendation's `method_advice` names (RankCandidates with `suggest_method`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from bench.guidance.evaluate import Evaluator, mean
from kinship_client import KinshipClient, Member, Recommendation


@dataclass(frozen=True)
class Record:
    """A model of the seed: its recipe, checkpoint directory and per-task dev accuracies."""

    recipe: str
    path: str
    dev_tasks: tuple[float, ...]

    @property
    def dev(self) -> float:
        return mean(self.dev_tasks)


class ModelStore:
    """Every model of one seed by recipe: foundation models, and merges made through StartMerge.

    A merge is made once per recipe and kept with its scores under `<merges>/<family key>/`
    (the server's output root), so reruns and other strategies reuse it without asking the
    server again; a merge without its score file (an interrupted run) is made again.
    """

    def __init__(self, client: KinshipClient, evaluator: Evaluator, merges: Path, family_key: str) -> None:
        self.client = client
        self.evaluator = evaluator
        self.directory = merges / family_key
        self.family_key = family_key
        self.records: dict[str, Record] = {}
        self.tests: dict[str, tuple[float, ...]] = {}
        self.server_merges = 0

    def test(self, record: Record) -> tuple[float, ...]:
        """Per-task test accuracies, computed only for models some strategy reports (never shown to a bot)."""
        if record.recipe not in self.tests:
            scores = self._scores_file(record.recipe)
            saved = json.loads(scores.read_text()) if scores.is_file() else {}
            if "test_tasks" in saved:
                self.tests[record.recipe] = tuple(saved["test_tasks"])
            else:
                self.tests[record.recipe] = self.evaluator.test(record.path)
                if saved:
                    _write_json(scores, {**saved, "test_tasks": list(self.tests[record.recipe])})
        return self.tests[record.recipe]

    def add_foundation(self, name: str, path: Path) -> Record:
        record = Record(name, str(path), self.evaluator.dev(path))
        self.records[name] = record
        return record

    def _scores_file(self, recipe: str) -> Path:
        return self.directory / f"{_digest(recipe)}.json"

    def merge(
        self, first: Record, second: Record, t: float, method: str = "slerp", parameters: Mapping[str, float] | None = None, base: str = ""
    ) -> Record:
        """A merge of first and second, by the server unless already made.

        SLERP at `t` (t weighs `second`); any other method with `parameters` (mergekit's `weight`,
        `density`: the same for both models) and `base` (needed by task-vector methods).
        """
        parameters = {"t": t} if method == "slerp" else dict(parameters or {})
        recipe = recipe_of(first.recipe, second.recipe, method, parameters)
        if recipe in self.records:
            return self.records[recipe]
        scores = self._scores_file(recipe)
        if scores.is_file():
            saved = json.loads(scores.read_text())
            record = Record(recipe, saved["path"], tuple(saved["dev_tasks"]))
        else:
            output = f"{self.family_key}/{_digest(recipe)}"
            if method == "slerp":
                operation = self.client.merge(first.path, second.path, t=parameters["t"], output_path=output, request_id=output, overwrite=True)
            else:
                if method in TASK_VECTOR_METHODS and not base:
                    raise ValueError(f"the {method} merge needs the base")
                operation = self.client.merge(
                    None,
                    None,
                    method=method,  # type: ignore[arg-type]
                    models=[first.path, second.path],
                    base=base if method in TASK_VECTOR_METHODS else None,
                    weight=parameters.get("weight"),
                    density=parameters.get("density"),
                    output_path=output,
                    request_id=output,
                    overwrite=True,
                )
            info = operation.wait()
            if info.state != "succeeded":
                raise RuntimeError(f"merge {recipe} ended {info.state}: {info.error}")
            self.server_merges += 1
            record = Record(recipe, info.output_path, self.evaluator.dev(info.output_path))
            _write_json(scores, {"recipe": recipe, "path": record.path, "dev_tasks": list(record.dev_tasks)})
        self.records[recipe] = record
        return record


BotMethod = Literal["slerp", "linear", "ties", "dare_ties", "dare_linear", "suggested"]
"""How an advised bot merges: one fixed method for every pair, or each recommendation's suggestion."""
BOT_METHODS: tuple[str, ...] = get_args(BotMethod)
TASK_VECTOR_METHODS = ("ties", "dare_ties", "dare_linear", "task_arithmetic")
"""Methods that need the base (they merge task vectors)."""


def recipe_of(first: str, second: str, method: str, parameters: Mapping[str, float]) -> str:
    """The recipe key of a merge: SLERP keeps the form `slerp(a,b,t)`; others list their sorted parameters."""
    if method == "slerp":
        return f"slerp({first},{second},{parameters.get('t', 0.5):.6g})"
    listed = ",".join(f"{k}={v:.6g}" for k, v in sorted(parameters.items()))
    return f"{method}({first},{second};{listed})"


def _digest(recipe: str) -> str:
    return hashlib.sha256(recipe.encode()).hexdigest()[:20]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@dataclass
class Model:
    """A member of one strategy's population."""

    name: str
    record: Record
    generation: int
    parents: tuple[str, ...] = ()
    parent_kinship: float | None = None

    @property
    def dev(self) -> float:
        return self.record.dev


@dataclass
class Outcome:
    """What one strategy did on one seed."""

    strategy: str
    merges: int
    best: str
    best_recipe: str
    best_dev: float
    best_test: float
    generations: int
    stop: str
    best_test_tasks: tuple[float, ...] = ()
    methods: Mapping[str, int] = field(default_factory=dict)
    """Merges by method (the suggested strategy mixes them)."""
    advice_seen: tuple[tuple[float, float | None, str], ...] = ()
    """(kinship, sign conflict, suggested method) of every suggested merge, to study the thresholds."""

    def to_json(self) -> dict[str, Any]:
        return {
            "methods": dict(self.methods),
            "advice_seen": [list(x) for x in self.advice_seen],
            "merges": self.merges,
            "best": self.best,
            "best_recipe": self.best_recipe,
            "best_dev": self.best_dev,
            "best_test": self.best_test,
            "best_test_tasks": list(self.best_test_tasks),
            "generations": self.generations,
            "stop": self.stop,
        }


def _outcome(
    store: ModelStore,
    strategy: str,
    models: Mapping[str, Model],
    merges: int,
    generations: int,
    stop: str,
    methods: Mapping[str, int] | None = None,
    advice_seen: tuple[tuple[float, float | None, str], ...] = (),
) -> Outcome:
    """The strategy's result: its best model by dev score (ties: the smaller name), reported on test."""
    best = max(models.values(), key=lambda m: (m.dev, _neg_name(m.name)))
    test = store.test(best.record)
    return Outcome(
        strategy, merges, best.name, best.record.recipe, best.dev, mean(test), generations, stop, test, dict(methods or {"slerp": merges}), advice_seen
    )


def _neg_name(name: str) -> tuple[int, ...]:
    """Sort key that makes max() prefer the smaller name on equal scores."""
    return tuple(-ord(c) for c in name)


def top_k(models: Mapping[str, Model], k: int) -> list[str]:
    """The k best models by dev score (ties: name ascending), best first, as the service orders them."""
    return [m.name for m in sorted(models.values(), key=lambda m: (-m.dev, m.name))[:k]]


def run_greedy(store: ModelStore, foundation: Mapping[str, Record], k: int, max_generations: int) -> Outcome:
    """Plain top-k greedy to the top-k fixpoint (no kinship, no service advice)."""
    models = {name: Model(name, record, 0) for name, record in foundation.items()}
    merged: set[frozenset[str]] = set()
    merges = 0

    def generation(number: int, pairs: list[tuple[str, str]]) -> None:
        nonlocal merges
        for j, (a, b) in enumerate(pairs, 1):
            name = f"model-{number}-{j}"
            record = store.merge(models[a].record, models[b].record, 0.5)
            models[name] = Model(name, record, number, (a, b))
            merged.add(frozenset((a, b)))
            merges += 1

    generation(1, list(itertools.combinations(foundation, 2)))
    current = top_k(models, k)
    number, stop = 1, "max_generations"
    while number < max_generations:
        pairs = [(a, b) for a, b in itertools.combinations(current, 2) if frozenset((a, b)) not in merged]
        if not pairs:
            stop = "exhausted"
            break
        number += 1
        generation(number, pairs)
        previous, current = current, top_k(models, k)
        if set(current) == set(previous):
            stop = "topk_unchanged"
            break
    return _outcome(store, "greedy", models, merges, number, stop)


@dataclass(frozen=True)
class Advice:
    """Options of the advised bot: forwarded to RankCandidates and ShouldStop.

    `rank` goes to every RankCandidates call, `first_rank` (merged over `rank`) to generation
    1's; `stop` to every ShouldStop call. `task_scores` sends each member's per-task dev
    scores; `known_kinship` sends the parents' kinship of every merge (as RankCandidates
    reported it), so the gain model sees the whole history; `merged_pairs` sends the pairs
    merged so far to ShouldStop; `use_suggested_t` merges with the recommendation's
    `suggested_t` when it has one; `topk_unchanged` false stops sending the previous top-k, which
    turns ShouldStop's TOPK_UNCHANGED rule off. `method` (`BOT_METHODS`): every merge with that
    method and equal weights (`weight` 1 for linear and TIES, which normalize; 1/2 for DARE, which
    does not), `density` for TIES/DARE; `suggested` asks
    RankCandidates for `suggest_method` (with `method_options`) and merges each pair as its
    `method_advice` says. Keys the client does not know fail at the call with TypeError, so a typo
    never passes silently.
    """

    rank: Mapping[str, Any] = field(default_factory=dict)
    first_rank: Mapping[str, Any] = field(default_factory=dict)
    stop: Mapping[str, Any] = field(default_factory=dict)
    top_k: int = 3
    task_scores: bool = False
    known_kinship: bool = False
    merged_pairs: bool = False
    use_suggested_t: bool = False
    topk_unchanged: bool = True
    method: BotMethod = "slerp"
    density: float = 0.5
    method_options: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in BOT_METHODS:
            raise ValueError(f"unknown method {self.method!r}; allowed: {', '.join(BOT_METHODS)}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")

    def merge_of(self, rec: Recommendation) -> tuple[str, dict[str, float]]:
        """The method and parameters this bot merges `rec` with (SLERP's `t` is the caller's)."""
        if self.method == "suggested":
            if rec.method_advice is None:
                raise RuntimeError(f"recommendation {rec.first} x {rec.second} has no method advice (suggest_method not sent?)")
            return rec.method_advice.method, dict(rec.method_advice.parameters)
        if self.method == "slerp":
            return "slerp", {}
        if self.method == "linear":
            return "linear", {"weight": 1.0}
        if self.method == "ties":
            return "ties", {"weight": 1.0, "density": self.density}
        # DARE's mergekit default is normalize false: weights 1/2 make it an average of the (rescaled) task vectors.
        return self.method, {"weight": 0.5, "density": self.density}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Advice:
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown advice key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.__dict__.items()}


def _members(models: Mapping[str, Model], with_task_scores: bool) -> list[Member]:
    out = []
    for m in models.values():
        extra: dict[str, Any] = {}
        if with_task_scores:
            extra["task_scores"] = m.record.dev_tasks
        out.append(Member(m.name, m.dev, m.record.path, m.generation, m.parents, **extra))
    return out


def run_advised(
    strategy: str,
    store: ModelStore,
    client: KinshipClient,
    base: str,
    foundation: Mapping[str, Record],
    advice: Advice,
    max_generations: int,
) -> Outcome:
    """The paper's loop with the service's advice (examples/evolve.py's), options from `advice`."""
    models = {name: Model(name, record, 0) for name, record in foundation.items()}
    previous_top_k: list[str] = []
    merged: list[tuple[str, str]] = []
    methods: dict[str, int] = {}
    seen: list[tuple[float, float | None, str]] = []
    merges, number, stop = 0, 0, "max_generations"
    while True:
        members = _members(models, advice.task_scores)
        known = [(*m.parents, m.parent_kinship) for m in models.values() if advice.known_kinship and m.parent_kinship is not None]
        if number >= 1:
            stop_options = dict(advice.stop)
            if advice.merged_pairs:
                stop_options["merged_pairs"] = merged
            decision = client.should_stop(
                members,
                top_k=min(advice.top_k, len(members)),
                base=base,
                previous_top_k=previous_top_k if advice.topk_unchanged else [],
                known_kinship=known,
                **stop_options,
            )
            if decision.stop:
                stop = ",".join(decision.reasons)
                break
        if number >= max_generations:
            break
        number += 1
        k = len(foundation) if number == 1 else min(advice.top_k, len(members))
        options = {**advice.rank, **(advice.first_rank if number == 1 else {})}
        if advice.method == "suggested":
            options.update(suggest_method=True, method_options=dict(advice.method_options) or None)
        ranking = client.rank_candidates(members, top_k=k, base=base, known_kinship=known, **options)
        if not ranking.recommendations:
            stop = "exhausted"
            break
        previous_top_k = ranking.top_k if number > 1 else []
        for j, rec in enumerate(ranking.recommendations, 1):
            t = getattr(rec, "suggested_t", None) if advice.use_suggested_t else None
            method, parameters = advice.merge_of(rec)
            if method == "slerp" and "t" in parameters and t is None:
                t = parameters["t"]  # the advice's SLERP factor, unless the bot takes the recommendation's suggested_t
            name = f"model-{number}-{j}"
            record = store.merge(models[rec.first].record, models[rec.second].record, 0.5 if t is None else t, method, parameters, base)
            models[name] = Model(name, record, number, (rec.first, rec.second), rec.kinship)
            merged.append((rec.first, rec.second))
            methods[method] = methods.get(method, 0) + 1
            if rec.method_advice is not None:
                seen.append((rec.kinship, rec.method_advice.sign_conflict, method))
            merges += 1
    return _outcome(store, strategy, models, merges, number, stop, methods, tuple(seen))
