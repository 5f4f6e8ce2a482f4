"""A complete merging bot: top-k greedy merging with model kinship (Hu et al., Algorithm 1) against the service.

    python examples/evolve.py --target localhost:50051 --base /models/base \\
        --model metamath=/models/metamath --model instruct=/models/instruct --model open-chat=/models/open-chat \\
        --evaluate my_evals:average_score --top-k 3

The loop (Algorithm 1 of arXiv 2410.12613, with the service doing the kinship work):

1. Evaluate the foundation models. Generation 1 merges every pair of them.
2. After each generation, ask ShouldStop (kinship saturation of the top-k, top-k unchanged
   since the previous generation, optional gain plateau). Stop when it says so.
3. Otherwise ask RankCandidates for the top-k: every not-yet-merged pair (greedy) plus the
   exploration merge of the best model with its least-kin candidate. Merge each pair with
   SLERP through StartMerge (the merges of one generation are queued together), evaluate the
   results, and add them to the population as the next generation.

`--method NAME` merges every pair with another method (docs/merge-methods.md); `--method
suggested` asks RankCandidates for method advice (`suggest_method`, thresholds from
`--method-option NAME=VALUE`) and merges each pair with the method and parameters its
recommendation suggests (ties, linear or slerp, from sign conflict and kinship).

Evaluation is yours: `evaluate(path) -> score` gets the merged checkpoint's directory as the
server reports it (absolute, on the server's disk), so run the bot where that path is
readable (or map it), and return the average task performance (higher is better). From the
command line, `--evaluate module:function` names it.

The server must be able to read what it writes: its `KINSHIP_OUTPUT_ROOT` has to lie inside
`KINSHIP_ALLOWED_ROOTS`. Each merge uses the request id `<output prefix>/<model name>`, so a
bot restarted with the same `--output-prefix` picks up the jobs it had already started.
Needs only the client package (`kinship_client`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kinship_client import KinshipClient, Member, Population, Recommendation
from kinship_client.client import METHOD_OPTIONS
from kinship_client.merge import MERGE_METHODS, MergeOperation
from kinship_client.population import population_to_json

Evaluate = Callable[[str], float]
"""The user's evaluation: checkpoint directory -> score (average task performance, higher is better)."""

SUGGESTED = "suggested"
"""The `method` that merges each pair as its recommendation's method advice says."""
EVOLVE_METHODS: tuple[str, ...] = (*MERGE_METHODS, SUGGESTED)


@dataclass
class Model:
    """A model of the evolving population."""

    name: str
    path: str
    score: float
    generation: int
    parents: tuple[str, ...] = ()
    kind: str = "foundation"
    """`foundation`, or the recommendation kind that produced it (`greedy` or `exploration`)."""
    parent_kinship: float | None = None
    """Kinship between its parents, as RankCandidates reported it."""
    gain: float | None = None
    """Its score minus the mean of its parents' scores (eq. 5)."""
    method: str = ""
    """The merge method that made it (empty for foundation models)."""


@dataclass
class GenerationRecord:
    """What happened after one generation was evaluated."""

    generation: int
    top_k: list[str]
    aggregated_kinship: float
    decision: str


@dataclass
class Evolution:
    """The outcome of a run."""

    models: dict[str, Model]
    generations: list[GenerationRecord]
    stop_reasons: list[str]
    """ShouldStop's reasons, or `exhausted` (nothing left to merge) or `max_generations`."""
    summary: str
    merges: int
    metric: str = "pcc"
    base: str = ""
    top_k: int = 0
    previous_top_k: list[str] = field(default_factory=list)

    @property
    def best(self) -> Model:
        """The best-scoring model (ties: the earlier one)."""
        return max(self.models.values(), key=lambda m: m.score)

    def population(self) -> Population:
        """The final population, in the population-file format of `kinship rank` / `kinship should-stop`."""
        return Population(
            members=_members(self.models.values()),
            base=self.base,
            top_k=self.top_k,
            previous_top_k=list(self.previous_top_k),
        )


class EvolutionError(RuntimeError):
    """A merge did not succeed or the evaluation failed; the run stops."""


def _members(models: Iterable[Model]) -> list[Member]:
    return [Member(m.name, m.score, m.path, m.generation, m.parents) for m in models]


def evolve(
    client: KinshipClient,
    base: str,
    foundation: Mapping[str, str],
    evaluate: Evaluate,
    *,
    top_k: int = 3,
    t: float = 0.5,
    method: str = "slerp",
    density: float = 0.5,
    method_options: Mapping[str, float] | None = None,
    output_prefix: str | None = None,
    max_generations: int = 10,
    metric: str = "pcc",
    kinship_threshold: float | None = None,
    aggregation: str = "mean",
    gain_window: int = 0,
    gain_threshold: float | None = None,
    exploration: bool = True,
    dtype: str | None = None,
    merge_timeout: float | None = None,
    log: Callable[[str], None] = print,
) -> Evolution:
    """Run top-k greedy merging with model kinship until ShouldStop says stop (or `max_generations`).

    `foundation` maps names to checkpoint paths (server paths or `hf://` references), at least two.
    Merges are written under `<output_prefix>/<name>` in the server's output root. `method`: one of
    EVOLVE_METHODS; `suggested` merges each pair with its recommendation's method advice
    (`method_options`: the advice thresholds, see METHOD_OPTIONS).
    """
    if method not in EVOLVE_METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(EVOLVE_METHODS)}")
    if method_options and method != SUGGESTED:
        raise ValueError("method_options are the thresholds of method advice: use them with method='suggested'")
    if len(foundation) < 2:
        raise ValueError("evolve needs at least two foundation models")
    if top_k < 2:
        raise ValueError("top_k must be at least 2")
    prefix = output_prefix or f"evolve-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    models: dict[str, Model] = {}
    for name, path in foundation.items():
        models[name] = Model(name, path, _evaluate(evaluate, name, path), 0)
        log(f"evaluated {name}: {models[name].score:.4f}")
    generations: list[GenerationRecord] = []
    previous_top_k: list[str] = []
    merges = 0
    generation = 0
    reasons: list[str] = []
    summary = ""
    while True:
        if generation >= 1:
            members = _members(models.values())
            decision = client.should_stop(
                members,
                top_k=min(top_k, len(members)),
                base=base,
                previous_top_k=previous_top_k,
                kinship_threshold=kinship_threshold,
                aggregation=aggregation,
                metric=metric,
                gain_window=gain_window,
                gain_threshold=gain_threshold,
            )
            generations.append(GenerationRecord(generation, decision.top_k, decision.aggregated_kinship, decision.summary))
            log(f"after generation {generation}: {decision.summary}")
            if decision.stop:
                reasons, summary = decision.reasons, decision.summary
                break
        if generation >= max_generations:
            reasons, summary = ["max_generations"], f"stopped at max_generations={max_generations} without a stop signal"
            break
        generation += 1
        members = _members(models.values())
        # Algorithm 1: generation 1 merges every pair of the foundation models; later ones the top-k.
        k = len(foundation) if generation == 1 else min(top_k, len(members))
        advice: dict[str, Any] = {"suggest_method": True, "method_options": method_options} if method == SUGGESTED else {}
        ranking = client.rank_candidates(members, top_k=k, base=base, metric=metric, **advice)
        chosen = ranking.recommendations if exploration else ranking.greedy
        if not chosen:
            reasons, summary = ["exhausted"], f"every pair among the top-{k} was merged already; nothing left to try"
            break
        previous_top_k = ranking.top_k if generation > 1 else []  # S_prev is empty before the loop starts
        new = _merge_generation(
            client, models, chosen, generation, prefix, t, dtype, merge_timeout, evaluate, log, (method, base, density)
        )
        merges += len(new)
        for model in new:
            models[model.name] = model
    evolution = Evolution(
        models=models,
        generations=generations,
        stop_reasons=reasons,
        summary=summary,
        merges=merges,
        metric=metric,
        base=base,
        top_k=top_k,
        previous_top_k=previous_top_k,
    )
    log(format_family_tree(evolution))
    return evolution


def merge_plan(rec: Recommendation, method: str, t: float, density: float) -> tuple[str, dict[str, float]]:
    """The method and parameters of `rec`'s merge: the recommendation's advice for `suggested`, else `method`
    with SLERP's `t` or weights (1 - t, t) and `density` for TIES/DARE."""
    if method == SUGGESTED:
        if rec.method_advice is None:
            raise EvolutionError(f"{rec.first} x {rec.second}: RankCandidates gave no method advice (server too old?)")
        return rec.method_advice.method, dict(rec.method_advice.parameters)
    if method == "slerp":
        return "slerp", {"t": t}
    parameters: dict[str, float] = {} if method == "model_stock" else {"weight_a": 1.0 - t, "weight_b": t}
    if method in ("ties", "dare_ties", "dare_linear"):
        parameters["density"] = density
    return method, parameters


def _start(
    client: KinshipClient, method: str, parameters: Mapping[str, float], base: str, a: str, b: str, output: str, dtype: str | None
) -> MergeOperation:
    """Start the merge of A and B with `method` and mergekit `parameters` (`t` for SLERP; `weight` for both
    models or `weight_a`/`weight_b`; `density`)."""
    if method == "slerp":
        return client.merge(a, b, t=parameters.get("t", 0.5), output_path=output, dtype=dtype, request_id=output)
    options: dict[str, Any] = {"method": method, "models": [a, b], "base": base}
    if "weight_a" in parameters:
        options["weights"] = [parameters["weight_a"], parameters["weight_b"]]
    elif "weight" in parameters:
        options["weight"] = parameters["weight"]
    if "density" in parameters:
        options["density"] = parameters["density"]
    return client.merge(None, None, output_path=output, dtype=dtype, request_id=output, **options)


def _merge_generation(
    client: KinshipClient,
    models: Mapping[str, Model],
    chosen: Sequence[Recommendation],
    generation: int,
    prefix: str,
    t: float,
    dtype: str | None,
    merge_timeout: float | None,
    evaluate: Evaluate,
    log: Callable[[str], None],
    how: tuple[str, str, float] = ("slerp", "", 0.5),
) -> list[Model]:
    """Queue every merge of a generation, then wait for each, evaluate it and compute its gain."""
    operations = []
    for j, rec in enumerate(chosen, 1):
        name = f"model-{generation}-{j}"
        a, b = models[rec.first], models[rec.second]
        output = f"{prefix}/{name}"
        method, base, density = how
        merge_method, parameters = merge_plan(rec, method, t, density)
        operation = _start(client, merge_method, parameters, base, a.path, b.path, output, dtype)
        why = f"; {rec.method_advice.reason}" if method == SUGGESTED and rec.method_advice is not None else ""
        log(f"merging {name} = {a.name} x {b.name} ({rec.kind}, kinship {rec.kinship:.4f}, {merge_method}{why})")
        operations.append((name, rec, operation, merge_method))
    new = []
    for name, rec, operation, merge_method in operations:
        info = operation.wait(timeout=merge_timeout)
        if info.state != "succeeded":
            raise EvolutionError(f"merge {name} ({rec.first} x {rec.second}) ended {info.state}: {info.error}")
        score = _evaluate(evaluate, name, info.output_path)
        parent_mean = (models[rec.first].score + models[rec.second].score) / 2.0
        new.append(
            Model(
                name,
                info.output_path,
                score,
                generation,
                (rec.first, rec.second),
                rec.kind,
                rec.kinship,
                score - parent_mean,
                merge_method,
            )
        )
        log(f"evaluated {name}: {score:.4f} (gain {score - parent_mean:+.4f})")
    return new


def _evaluate(evaluate: Evaluate, name: str, path: str) -> float:
    try:
        score = float(evaluate(path))
    except Exception as exc:  # noqa: BLE001 - the user's code; report which model failed
        raise EvolutionError(f"evaluating {name} ({path}) failed: {exc}") from exc
    if score != score or score in (float("inf"), float("-inf")):
        raise EvolutionError(f"evaluating {name} ({path}) returned {score}; scores must be finite")
    return score


def format_family_tree(evolution: Evolution) -> str:
    """The population per generation (scores, gains, parents' kinship), the stop reason and the best model's ancestry."""
    lines = []
    by_generation: dict[int, list[Model]] = {}
    for model in evolution.models.values():
        by_generation.setdefault(model.generation, []).append(model)
    records = {r.generation: r for r in evolution.generations}
    width = max(len(m.name) for m in evolution.models.values())
    for generation in sorted(by_generation):
        header = f"generation {generation}" + (" (foundation)" if generation == 0 else "")
        record = records.get(generation)
        if record is not None:
            header += f": top-{len(record.top_k)} {evolution.metric} kinship {record.aggregated_kinship:.4f}"
        lines.append(header)
        for m in by_generation[generation]:
            line = f"  {m.name.ljust(width)}  score {m.score:9.4f}"
            if m.parents:
                line += (
                    f"  gain {m.gain:+8.4f}  kinship {m.parent_kinship:7.4f}  {m.kind:<11}  {m.method:<11}  "
                    f"= {' x '.join(m.parents)}"
                )
            lines.append(line)
    last = max(by_generation)
    lines.append(f"stopped after generation {last} ({', '.join(evolution.stop_reasons)}): {evolution.summary}; {evolution.merges} merges")
    best = evolution.best
    lines.append(f"best: {best.name} score {best.score:.4f}")
    lines.extend(_ancestry(evolution.models, best.name, "", ""))
    return "\n".join(lines)


def _ancestry(models: Mapping[str, Model], name: str, first: str, rest: str) -> list[str]:
    model = models[name]
    lines = [f"{first}{name} ({model.score:.4f})"]
    for i, parent in enumerate(model.parents):
        last = i == len(model.parents) - 1
        lines.extend(_ancestry(models, parent, rest + ("└── " if last else "├── "), rest + ("    " if last else "│   ")))
    return lines


def load_callable(spec: str) -> Evaluate:
    """`package.module:function` -> the function."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--evaluate takes module:function, got {spec!r}")
    function = getattr(importlib.import_module(module_name), attribute)
    if not callable(function):
        raise ValueError(f"{spec} is not callable")
    return function  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="localhost:50051", help="server host:port")
    parser.add_argument("--token", default=None, help="bearer token")
    parser.add_argument("--base", required=True, help="the base all foundation models were fine-tuned from")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a foundation model (repeat)")
    parser.add_argument("--evaluate", required=True, metavar="MODULE:FUNCTION", help="your evaluation: path -> score")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--t", type=float, default=0.5, help="SLERP factor of every merge (other methods: B's weight, A's is 1 - t)")
    parser.add_argument(
        "--method",
        choices=EVOLVE_METHODS,
        default="slerp",
        help="merge method of every merge (docs/merge-methods.md); suggested: each recommendation's method advice",
    )
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"a method-advice threshold with --method suggested ({', '.join(METHOD_OPTIONS)}); repeat",
    )
    parser.add_argument("--density", type=float, default=0.5, help="density of ties, dare_ties and dare_linear merges")
    parser.add_argument("--max-generations", type=int, default=10)
    parser.add_argument("--metric", choices=["pcc", "cosine", "euclidean"], default="pcc")
    parser.add_argument("--threshold", type=float, default=None, help="kinship saturation threshold (default 0.9)")
    parser.add_argument("--aggregation", choices=["mean", "min", "max"], default="mean")
    parser.add_argument("--gain-window", type=int, default=0, help="also stop when the last N merges gained too little")
    parser.add_argument("--gain-threshold", type=float, default=None)
    parser.add_argument("--no-exploration", action="store_true", help="plain greedy strategy (no exploration merge)")
    parser.add_argument("--output-prefix", default=None, help="merges go to <prefix>/<name> under the server's output root")
    parser.add_argument("--dtype", default=None, help="merge output dtype (default: model A's)")
    parser.add_argument("--population-out", default=None, help="write the final population file (JSON) here")
    args = parser.parse_args(argv)
    foundation = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--model takes NAME=PATH, got {item!r}")
        foundation[name] = path
    method_options = {}
    for item in args.method_option:
        name, sep, value = item.partition("=")
        if args.method != SUGGESTED:
            parser.error("--method-option needs --method suggested")
        if not sep or name not in METHOD_OPTIONS:
            parser.error(f"--method-option takes NAME=VALUE with NAME one of {', '.join(METHOD_OPTIONS)}, got {item!r}")
        try:
            method_options[name] = float(value)
        except ValueError:
            parser.error(f"--method-option {item}: {value!r} is not a number")
    sys.path.insert(0, str(Path.cwd()))
    try:
        evaluate = load_callable(args.evaluate)
    except (ImportError, AttributeError, ValueError) as exc:
        parser.error(f"--evaluate {args.evaluate}: {exc}")
    with KinshipClient(args.target, token=args.token) as client:
        evolution = evolve(
            client,
            args.base,
            foundation,
            evaluate,
            top_k=args.top_k,
            t=args.t,
            method=args.method,
            density=args.density,
            method_options=method_options or None,
            output_prefix=args.output_prefix,
            max_generations=args.max_generations,
            metric=args.metric,
            kinship_threshold=args.threshold,
            aggregation=args.aggregation,
            gain_window=args.gain_window,
            gain_threshold=args.gain_threshold,
            exploration=not args.no_exploration,
            dtype=args.dtype,
        )
    if args.population_out:
        Path(args.population_out).write_text(json.dumps(population_to_json(evolution.population()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
