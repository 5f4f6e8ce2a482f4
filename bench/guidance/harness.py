"""Does the advice pay? Merging bots on trained model families, through the real server, over many seeds.

    nice -n 10 python -m bench.guidance.harness                       # 20 seeds: a, b and c
    python -m bench.guidance.harness --seeds 5 --strategies a,b --json results.json
    python -m bench.guidance.harness --advice 'lean={"first_rank": {"max_greedy": 5}}' --strategies a,lean
    nice -n 10 python -m bench.guidance.harness --strategies slerp,linear,ties,suggested --baseline slerp

For each seed it trains (or reuses, cached under `--workdir`) a family from
`bench/guidance/family.py`: a mid-training base and six specialists. The foundation models
are the specialists; the bots see dev scores only, and each strategy reports its best-dev
model's test score. Strategies:

- `a`: plain top-k greedy to the top-k fixpoint (no kinship);
- `b`: the paper's algorithm with the service's default RankCandidates / ShouldStop;
- any `--advice NAME=JSON` (default `c`, DEFAULT_ADVICE): the same bot with options
  forwarded to RankCandidates / ShouldStop (keys: see `bots.Advice`);
- `slerp`, `linear`, `ties`, `dare_ties`, `dare_linear`, `suggested`: one bot (METHOD_BOT:
  same ranking, same stop rule) that differs only in the merge method: that fixed method for
  every merge (equal weights, TIES/DARE density 0.5), or `suggested`, each pair merged with
  the method and parameters of its recommendation's method advice. `--baseline slerp`
  compares them against fixed SLERP.

Merges are SLERP jobs of a real `python -m kinship_service` started for the run (its cache
and log under `<workdir>/runs/`, removed at the end). Merged checkpoints and their scores
stay under `<workdir>/merges/<family>/`, so a rerun or another strategy reuses a merge of
the same recipe instead of making it again (the merge still counts for every strategy that
asks for it). It prints merges, best dev and best
test per seed and strategy, then per strategy against `a`: merges saved, test points gained
and the two-sided sign test over seeds (ties dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench.guidance` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench._server import start_server
from bench.guidance.bots import BOT_METHODS, Advice, ModelStore, Outcome, run_advised, run_greedy
from bench.guidance.evaluate import Evaluator
from bench.guidance.family import FamilySpec, ensure_family
from bench.guidance.model import TinyLlamaShape
from bench.guidance.stats import Comparison, compare
from kinship_client import KinshipClient

DEFAULT_ADVICE: dict[str, Any] = {
    # Generation 1: rank every foundation pair by task ceiling, merge the best five (not all 15).
    "first_rank": {"max_greedy": 5, "greedy_order": "task_ceiling"},
    # Later: the two greedy pairs of highest expected score, plus the most complementary partner
    # of the best model among the six best, merged with the score-weighted SLERP factor.
    "rank": {
        "exploration": "complementary",
        "exploration_pool": 6,
        "greedy_order": "expected_score",
        "estimate_gain": True,
        "max_greedy": 2,
        "slerp_factor": "score_weighted",
    },
    # Stop when the top-k stops changing; kinship saturation (0.9) stopped too early on this family.
    "stop": {"kinship_threshold": 0.999},
    "task_scores": True,
    "known_kinship": True,
    "use_suggested_t": True,
}
"""Strategy c's options: the best combination the harness found (docs/population.md, "Does the advice pay?")."""

METHOD_BOT: dict[str, Any] = {
    key: value for key, value in DEFAULT_ADVICE.items() if key not in ("use_suggested_t",)
} | {"rank": {k: v for k, v in DEFAULT_ADVICE["rank"].items() if k != "slerp_factor"}}
"""The bot of the method strategies: c without the score-weighted SLERP factor (c10 of docs/population.md), so
every method merges with equal weights and only the method differs."""


def run_seed(
    seed: int, spec: FamilySpec, workdir: Path, client: KinshipClient, strategies: dict[str, Advice | None], top_k: int, max_generations: int
) -> dict[str, Outcome]:
    """Every strategy on one seed's family; None in `strategies` is plain greedy."""
    family = ensure_family(seed, spec, workdir)
    evaluator = Evaluator(seed, spec)
    store = ModelStore(client, evaluator, workdir / "merges", family.directory.name)
    foundation = {task: store.add_foundation(task, path) for task, path in family.specialists.items()}
    outcomes = {}
    for name, advice in strategies.items():
        if advice is None:
            outcomes[name] = run_greedy(store, foundation, top_k, max_generations)
        else:
            outcomes[name] = run_advised(name, store, client, str(family.base), foundation, advice, max_generations)
    return outcomes


def summarize(results: Sequence[dict[str, Outcome]], baseline: str) -> dict[str, Comparison]:
    """Each strategy against `baseline` over the seeds."""
    out = {}
    for name in results[0]:
        out[name] = compare(
            name,
            [r[name].merges for r in results],
            [r[name].best_dev for r in results],
            [r[name].best_test for r in results],
            [r[baseline].merges for r in results],
            [r[baseline].best_test for r in results],
        )
    return out


def format_tables(seeds: Sequence[int], results: Sequence[dict[str, Outcome]], comparisons: dict[str, Comparison], baseline: str) -> str:
    """The per-seed table and the aggregate table, in Markdown."""
    names = list(results[0])
    lines = ["| seed | " + " | ".join(f"{n}: merges / dev / test" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for seed, result in zip(seeds, results, strict=True):
        cells = [f"{result[n].merges} / {result[n].best_dev:.2f} / {result[n].best_test:.2f}{_mix(result[n].methods)}" for n in names]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| strategy | merges (mean) | saved vs {baseline} | best dev | best test | test vs {baseline} | better / equal / worse | sign test p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in comparisons.items():
        per_seed = c.merges_saved_per_seed
        saved = f"{100 * c.merges_saved:.1f} % ({100 * min(per_seed):.0f} to {100 * max(per_seed):.0f} %)"
        lines.append(
            f"| {name} | {c.mean_merges:.1f} | {saved if name != baseline else '-'} | {c.mean_best_dev:.2f} | {c.mean_best_test:.2f} | "
            + (f"{c.mean_test_gain:+.3f} | {c.wins} / {c.ties} / {c.losses} | {c.sign_p:.3g} |" if name != baseline else "- | - | - |")
        )
    return "\n".join(lines)


def _mix(methods: Mapping[str, int]) -> str:
    """` (ties 3, slerp 12)` when a strategy merged with more than one method, else nothing."""
    if len(methods) <= 1:
        return ""
    return " (" + ", ".join(f"{m} {n}" for m, n in sorted(methods.items(), key=lambda x: (-x[1], x[0]))) + ")"


def _advice_arg(text: str) -> tuple[str, Advice]:
    name, sep, body = text.partition("=")
    if not sep or body.strip()[:1] not in ("{", "@"):
        name, body = "c", text
    if body.startswith("@"):
        body = Path(body[1:]).read_text()
    return name, Advice.from_json(json.loads(body))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20, help="how many seeds (families), from --first-seed")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--strategies", default="a,b,c", help="comma-separated: a, b and advice names")
    parser.add_argument("--advice", action="append", default=[], metavar="[NAME=]JSON", help="an advised strategy (JSON or @file); repeat")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kinship-guidance"), help="family cache and run files")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every result as JSON here ('-': stdout)")
    parser.add_argument("--baseline", default=None, help="the strategy the others are compared with (default: a when run, else the first)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--max-generations", type=int, default=20, help="a guard; the bots normally stop long before")
    sizes = parser.add_argument_group("family sizes (defaults: FamilySpec's)")
    sizes.add_argument("--hidden", type=int, default=None)
    sizes.add_argument("--layers", type=int, default=None)
    sizes.add_argument("--length", type=int, default=None)
    sizes.add_argument("--base-steps", type=int, default=None)
    sizes.add_argument("--specialist-steps", type=int, default=None)
    sizes.add_argument("--eval-per-task", type=int, default=None)
    args = parser.parse_args(argv)

    spec = FamilySpec()
    shape_changes = {k: v for k, v in {"hidden_size": args.hidden, "num_hidden_layers": args.layers}.items() if v is not None}
    if "hidden_size" in shape_changes:
        shape_changes["intermediate_size"] = 2 * shape_changes["hidden_size"]
    spec_changes = {
        k: v
        for k, v in {
            "length": args.length,
            "base_steps": args.base_steps,
            "specialist_steps": args.specialist_steps,
            "eval_per_task": args.eval_per_task,
        }.items()
        if v is not None
    }
    spec = replace(spec, shape=replace(TinyLlamaShape(), **shape_changes), **spec_changes)

    advice = {"b": Advice(top_k=args.top_k), "c": Advice.from_json({"top_k": args.top_k, **DEFAULT_ADVICE})}
    advice |= {m: Advice.from_json({"top_k": args.top_k, **METHOD_BOT, "method": m}) for m in BOT_METHODS}
    for text in args.advice:
        try:
            name, parsed = _advice_arg(text)
        except (ValueError, TypeError, OSError) as exc:
            parser.error(f"--advice {text}: {exc}")
        advice[name] = parsed
    strategies: dict[str, Advice | None] = {}
    for name in args.strategies.split(","):
        if name == "a":
            strategies[name] = None
        elif name in advice:
            strategies[name] = advice[name]
        else:
            parser.error(f"unknown strategy {name!r}: use a, b, c, {', '.join(BOT_METHODS)} or a name given with --advice")
    baseline = args.baseline or ("a" if "a" in strategies else next(iter(strategies)))
    if baseline not in strategies:
        parser.error(f"--baseline {baseline!r} is not among --strategies {args.strategies}")

    workdir = args.workdir.resolve()
    run_dir = workdir / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    (workdir / "merges").mkdir(exist_ok=True)
    env = {
        "KINSHIP_HOST": "127.0.0.1",
        "KINSHIP_PORT": "0",
        "KINSHIP_METRICS_PORT": "0",
        "KINSHIP_ALLOWED_ROOTS": str(workdir),
        "KINSHIP_OUTPUT_ROOT": str(workdir / "merges"),
        "KINSHIP_CACHE_DIR": str(run_dir / "cache"),
        "KINSHIP_LOG_LEVEL": "WARNING",
        "KINSHIP_DEVICE": "cpu",
    }
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results: list[dict[str, Outcome]] = []
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run `finally`: stop the server, remove the run files
    process, address = start_server(env, run_dir / "server.log")
    try:
        with KinshipClient(address, timeout=600) as client:
            for seed in seeds:
                outcome = run_seed(seed, spec, workdir, client, strategies, args.top_k, args.max_generations)
                results.append(outcome)
                print(
                    f"seed {seed}: "
                    + "; ".join(f"{n} {o.merges} merges, dev {o.best_dev:.2f}, test {o.best_test:.2f} ({o.stop})" for n, o in outcome.items()),
                    flush=True,
                )
    finally:
        process.terminate()
        process.wait(60)
        shutil.rmtree(run_dir, ignore_errors=True)
    comparisons = summarize(results, baseline)
    print()
    print(format_tables(seeds, results, comparisons, baseline))
    print(f"\n{len(seeds)} seeds in {time.monotonic() - started:.0f} s")
    if args.json:
        document = {
            "spec": asdict(spec),
            "top_k": args.top_k,
            "baseline": baseline,
            "strategies": {n: (a.to_json() if a is not None else "greedy") for n, a in strategies.items()},
            "seeds": [{"seed": s, **{n: o.to_json() for n, o in r.items()}} for s, r in zip(seeds, results, strict=True)],
            "aggregate": {n: c.to_json() for n, c in comparisons.items()},
        }
        text = json.dumps(document, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
