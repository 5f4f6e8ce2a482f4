"""`kinship`: the command-line client.

    kinship kinship --base /models/base /models/a /models/b        # table
    kinship --target host:50051 kinship --json --base ... A B       # JSON for machines
    kinship rank population.yaml --top-k 3                          # which pairs to merge next
    kinship should-stop population.yaml --exit-code                 # stop (exit 3) or continue (0)

Connection options come before the subcommand; `KINSHIP_TARGET`, `KINSHIP_TOKEN`
and `KINSHIP_TLS_CA` set their defaults. Exit status: 0 on success, 1 when the
server answers with an error (printed with its gRPC code and reason), 2 for usage
errors (a bad argument, a value that is not valid UTF-8, an unreadable file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .choices import (
    AGGREGATIONS,
    EXPLORATION_RULES,
    GREEDY_ORDERS,
    KINSHIP_SHAPE_MISMATCHES,
    METRICS,
    MODES,
    SLERP_FACTORS,
)
from .client import KinshipClient
from .errors import KinshipRpcError
from .merge_cli import NotUtf8, add_merge_commands, wire_text
from .population import (
    KinshipMatrix,
    MemberGain,
    Population,
    PopulationFileError,
    RankResult,
    StopResult,
    load_population,
)
from .results import KinshipResult


def _fmt(value: float, width: int = 9) -> str:
    if math.isnan(value):
        return "nan".rjust(width)
    return f"{value:{width}.6f}"


def format_kinship_table(result: KinshipResult, names: Sequence[str] | None = None) -> str:
    """A human-readable table of a KinshipResult (`names` overrides the model labels)."""
    lines = []
    names = list(names) if names is not None else result.models
    width = max(len(n) for n in names)
    lines.append(f"{'model A'.ljust(width)}  {'model B'.ljust(width)}  {'PCC':>9}  {'cosine':>9}  {'euclidean':>11}")
    for pair in result.pairs:
        lines.append(
            f"{names[pair.first].ljust(width)}  {names[pair.second].ljust(width)}  "
            f"{_fmt(pair.values.pcc)}  {_fmt(pair.values.cosine)}  {_fmt(pair.values.euclidean, 11)}"
        )
    lines.append(
        f"{'mean over pairs'.ljust(2 * width + 2)}  {_fmt(result.mean.pcc)}  {_fmt(result.mean.cosine)}  "
        f"{_fmt(result.mean.euclidean, 11)}"
    )
    lines.append(
        f"mode={result.mode} device={result.device} tensors={result.tensors_compared} "
        f"elements={result.elements_compared} bytes_read={result.bytes_read} seconds={result.seconds:.3f}"
    )
    for name, reason, detail in result.skipped:
        lines.append(f"skipped {name}: {reason} ({detail})")
    for name in result.sliced:
        lines.append(f"compared on common leading slice: {name}")
    for layer in result.layers:
        lines.append(
            f"  {layer.group:<12} tensors={layer.tensors:<4} mean PCC={_fmt(layer.mean.pcc)} cosine={_fmt(layer.mean.cosine)}"
        )
    return "\n".join(lines)


def kinship_to_json(result: KinshipResult) -> dict[str, Any]:
    """A KinshipResult as the JSON document `kinship kinship --json` prints."""
    return {
        "models": result.models,
        "pairs": [
            {"first": p.first, "second": p.second, "pcc": p.values.pcc, "cosine": p.values.cosine, "euclidean": p.values.euclidean}
            for p in result.pairs
        ],
        "mean": vars(result.mean),
        "mode": result.mode,
        "tensors_compared": result.tensors_compared,
        "elements_compared": result.elements_compared,
        "skipped": [{"name": n, "reason": r, "detail": d} for n, r, d in result.skipped],
        "sliced": result.sliced,
        "layers": [
            {"group": l.group, "tensors": l.tensors, "elements": l.elements, "mean": vars(l.mean)} for l in result.layers
        ],
        "bytes_read": result.bytes_read,
        "device": result.device,
        "seconds": result.seconds,
    }


def _print_json(data: Any) -> None:
    # NaN is not JSON: write null so any parser reads the output.
    print(json.dumps(_nan_to_none(data), indent=2, default=str))


def _nan_to_none(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _nan_to_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_nan_to_none(v) for v in data]
    return data


def cmd_kinship(client: KinshipClient, args: argparse.Namespace) -> int:
    """`kinship kinship`: print the kinship of the models as a table or JSON; returns the exit status."""
    result = client.kinship(
        args.base,
        args.models,
        mode=args.mode,
        per_layer=args.per_layer,
        shape_mismatch=args.shape_mismatch,
        timeout=args.timeout,
    )
    if args.json:
        _print_json(kinship_to_json(result))
    else:
        print(format_kinship_table(result))
    return 0


def cmd_register(client: KinshipClient, args: argparse.Namespace) -> int:
    """`kinship register`: register a checkpoint against a base and print the registration."""
    reg = client.register_checkpoint(args.checkpoint, args.base, timeout=args.timeout)
    if args.json:
        data = {k: v for k, v in vars(reg).items() if k != "raw"}
        _print_json(data)
        return 0
    state = "already registered" if reg.already_registered else "registered"
    print(f"{args.checkpoint}: {state}, identity {reg.identity} (base {reg.base_identity})")
    print(
        f"tensors={reg.tensors} elements={reg.elements} size_bytes={reg.size_bytes} "
        f"delta_norm={math.sqrt(max(reg.delta_sum_squares, 0.0)):.6g} "
        f"delta_mean={(reg.delta_sum / reg.elements if reg.elements else float('nan')):.6g}"
    )
    print(f"fingerprint_bytes={reg.fingerprint_bytes} delta_bytes={reg.delta_bytes} seconds={reg.seconds:.3f}")
    for group, norm in reg.layer_norms.items():
        print(f"  {group:<12} norm={norm:.6g}")
    return 0


def format_matrix(matrix: KinshipMatrix) -> list[str]:
    """A kinship matrix as aligned text rows."""
    width = max([len(n) for n in matrix.names] + [9])
    lines = [f"kinship matrix ({matrix.metric}):", " " * width + "  " + "  ".join(n.rjust(width) for n in matrix.names)]
    for name, row in zip(matrix.names, matrix.values, strict=False):
        lines.append(name.ljust(width) + "  " + "  ".join(_fmt(v, width) for v in row))
    return lines


def _gains_lines(title: str, gains: Sequence[MemberGain]) -> list[str]:
    if not gains:
        return []
    lines = [title]
    for g in gains:
        generation = f" (generation {g.generation})" if g.generation is not None else ""
        lines.append(f"  {g.name}: {g.gain:+.4f}{generation}")
    return lines


def _mode_line(mode: str) -> str:
    return "mode=none (every kinship value came from known_kinship)" if mode == "unspecified" else f"mode={mode}"


def format_rank(result: RankResult, population: Population) -> str:
    """Human-readable RankCandidates output."""
    scores = {m.name: m.score for m in population.members}
    lines = ["top-k: " + ", ".join(f"{n} ({scores.get(n)})" for n in result.top_k)]
    if not result.recommendations:
        lines.append("no recommendations: every pair among the top-k was merged already")
    width = max([len(n) for n in result.top_k] + [6])
    lines.append(f" #  {'kind':<12} {'first'.ljust(width)}  {'second'.ljust(width)}  {'mean score':>10}  {'kinship':>9}")
    for i, r in enumerate(result.recommendations, 1):
        lines.append(
            f"{i:>2}  {r.kind:<12} {r.first.ljust(width)}  {r.second.ljust(width)}  {r.mean_score:>10.4f}  {_fmt(r.kinship)}"
        )
        lines.append(f"    {r.reason}")
    lines += format_matrix(result.matrix)
    lines += _gains_lines("merge gains:", result.gains)
    lines.append(_mode_line(result.mode))
    return "\n".join(lines)


def format_stop(result: StopResult) -> str:
    """Human-readable ShouldStop output."""
    lines = [("STOP" if result.stop else "CONTINUE") + (": " + ", ".join(result.reasons) if result.reasons else ""), result.summary]
    lines.append(f"top-k: {', '.join(result.top_k)}")
    lines.append(f"aggregated kinship {result.aggregated_kinship:.6f}, threshold {result.kinship_threshold:g}")
    lines += format_matrix(result.matrix)
    lines += _gains_lines("recent merge gains:", result.recent_gains)
    lines.append(_mode_line(result.mode))
    return "\n".join(lines)


def _matrix_json(matrix: KinshipMatrix) -> dict[str, Any]:
    return {"names": matrix.names, "values": matrix.values, "metric": matrix.metric}


def _gain_json(gain: MemberGain) -> dict[str, Any]:
    return {"name": gain.name, "gain": gain.gain, "generation": gain.generation}


def rank_to_json(result: RankResult) -> dict[str, Any]:
    """A RankResult as the JSON document `kinship rank --json` prints."""
    optional = ("expected_gain", "expected_score", "complementarity", "task_ceiling", "suggested_t")
    doc: dict[str, Any] = {
        "recommendations": [
            {k: getattr(r, k) for k in ("first", "second", "kind", "kinship", "mean_score", "reason")}
            | {k: getattr(r, k) for k in optional if getattr(r, k) is not None}
            for r in result.recommendations
        ],
        "top_k": result.top_k,
        "matrix": _matrix_json(result.matrix),
        "gains": [_gain_json(g) for g in result.gains],
        "mode": result.mode,
    }
    if result.gain_model is not None:
        doc["gain_model"] = vars(result.gain_model)
    return doc


def stop_to_json(result: StopResult) -> dict[str, Any]:
    """A StopResult as the JSON document `kinship should-stop --json` prints."""
    doc: dict[str, Any] = {
        "stop": result.stop,
        "reasons": result.reasons,
        "summary": result.summary,
        "top_k": result.top_k,
        "aggregated_kinship": result.aggregated_kinship,
        "kinship_threshold": result.kinship_threshold,
        "matrix": _matrix_json(result.matrix),
        "recent_gains": [_gain_json(g) for g in result.recent_gains],
        "mode": result.mode,
    }
    if result.gain_model is not None:
        doc["gain_model"] = vars(result.gain_model)
    if result.best_candidate is not None:
        doc["best_candidate"] = list(result.best_candidate)
        doc["best_expected_gain"] = result.best_expected_gain
    return doc


def _load_population(args: argparse.Namespace) -> tuple[Population, int]:
    """The population file and the top-k to use (flag, else the file's `top_k`)."""
    population = load_population(args.population)
    top_k = args.top_k if args.top_k is not None else population.top_k
    if top_k is None:
        raise PopulationFileError(f"{args.population}: give --top-k or a top_k key in the file")
    return population, top_k


def cmd_rank(client: KinshipClient, args: argparse.Namespace) -> int:
    """`kinship rank`: print which pairs of the population to merge next; 2 when the file is bad."""
    try:
        population, top_k = _load_population(args)
    except PopulationFileError as exc:
        print(f"kinship: {exc}", file=sys.stderr)
        return 2
    result = client.rank_candidates(
        population.members,
        top_k=top_k,
        base=args.base or population.base,
        merged_pairs=population.merged_pairs,
        metric=args.metric,
        mode=args.mode,
        known_kinship=population.known_kinship,
        greedy_order=args.greedy_order,
        max_greedy=args.max_greedy,
        greedy_fraction=args.greedy_fraction,
        exploration=args.exploration,
        exploration_pool=args.exploration_pool,
        estimate_gain=args.estimate_gain,
        gain_prior_strength=args.gain_prior_strength,
        slerp_factor=args.slerp_factor,
        timeout=args.timeout,
    )
    if args.json:
        _print_json(rank_to_json(result))
    else:
        print(format_rank(result, population))
    return 0


def cmd_should_stop(client: KinshipClient, args: argparse.Namespace) -> int:
    """`kinship should-stop`: print the decision; 3 for stop with --exit-code, 2 when the file is bad."""
    try:
        population, top_k = _load_population(args)
    except PopulationFileError as exc:
        print(f"kinship: {exc}", file=sys.stderr)
        return 2
    result = client.should_stop(
        population.members,
        top_k=top_k,
        base=args.base or population.base,
        previous_top_k=population.previous_top_k,
        kinship_threshold=args.threshold,
        aggregation=args.aggregation,
        metric=args.metric,
        gain_window=args.gain_window,
        gain_threshold=args.gain_threshold,
        mode=args.mode,
        known_kinship=population.known_kinship,
        merged_pairs=population.merged_pairs,
        min_expected_gain=args.min_expected_gain,
        min_gain_history=args.min_gain_history,
        gain_prior_strength=args.gain_prior_strength,
        timeout=args.timeout,
    )
    if args.json:
        _print_json(stop_to_json(result))
    else:
        print(format_stop(result))
    return 3 if args.exit_code and result.stop else 0


def build_parser() -> argparse.ArgumentParser:
    """The `kinship` argument parser, with every subcommand.

    Values sent to the server (paths, names, ids, the token) go through `wire_text`, which
    raises `NotUtf8` for text that is not valid UTF-8; `main` reports it as a usage error.
    """
    parser = argparse.ArgumentParser(
        prog="kinship", description="Client of the model-kinship gRPC service.", allow_abbrev=False  # `merge --t` is not `--target`
    )
    parser.add_argument(
        "--target", type=wire_text("--target"), default=os.environ.get("KINSHIP_TARGET", "localhost:50051"), help="server host:port"
    )
    parser.add_argument("--token", type=wire_text("--token"), default=os.environ.get("KINSHIP_TOKEN"), help="bearer token (or KINSHIP_TOKEN)")
    parser.add_argument("--tls-ca", default=os.environ.get("KINSHIP_TLS_CA"), help="CA bundle (PEM): use TLS")
    parser.add_argument("--tls-cert", default=os.environ.get("KINSHIP_TLS_CERT"), help="client certificate (PEM), mutual TLS")
    parser.add_argument("--tls-key", default=os.environ.get("KINSHIP_TLS_KEY"), help="client private key (PEM), mutual TLS")
    parser.add_argument("--timeout", type=float, default=None, help="deadline per call in seconds (default 600)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("kinship", help="kinship between models' task vectors against a base")
    p.add_argument("--base", type=wire_text("--base"), required=True, help="base checkpoint: server path or hf://owner/name[@rev]")
    p.add_argument("models", type=wire_text("models"), nargs="+", help="two or more checkpoints")
    p.add_argument("--mode", choices=MODES, default="auto")
    p.add_argument("--per-layer", action="store_true", help="add a per-layer-group breakdown")
    p.add_argument("--shape-mismatch", choices=KINSHIP_SHAPE_MISMATCHES, default="skip")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_kinship)

    p = sub.add_parser("register", help="cache a checkpoint's fingerprint and delta against a base ahead of time")
    p.add_argument("--base", type=wire_text("--base"), required=True, help="base checkpoint: server path or hf://owner/name[@rev]")
    p.add_argument("checkpoint", type=wire_text("checkpoint"), help="the checkpoint to register")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_register)

    for name, help_text, func in (
        ("rank", "which pairs of a population to merge next (RankCandidates)", cmd_rank),
        ("should-stop", "whether a merging loop should stop (ShouldStop)", cmd_should_stop),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text + "; the population file format is in docs/population.md")
        p.add_argument("population", help="population file (.json, or .yaml/.yml with PyYAML installed)")
        p.add_argument("--top-k", type=int, default=None, help="top-k size (default: the file's top_k)")
        p.add_argument("--base", type=wire_text("--base"), default=None, help="base checkpoint (default: the file's base)")
        p.add_argument("--metric", choices=METRICS, default="pcc")
        p.add_argument("--mode", choices=MODES, default="auto")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
        p.set_defaults(func=func)
        p.add_argument("--gain-prior-strength", type=float, default=None, help="gain model prior in pseudo-merges (default 2)")
        if name == "rank":
            p.add_argument("--greedy-order", choices=GREEDY_ORDERS, default="mean_score")
            p.add_argument("--max-greedy", type=int, default=0, help="keep only the N most promising greedy pairs (0: all)")
            p.add_argument("--greedy-fraction", type=float, default=None, help="keep this fraction of the greedy pairs")
            p.add_argument("--exploration", choices=EXPLORATION_RULES, default="latest_generation")
            p.add_argument("--exploration-pool", type=int, default=0, help="exploration partner among the best N (0: top-k)")
            p.add_argument("--estimate-gain", action="store_true", help="expected gain per pair from the population's history")
            p.add_argument("--slerp-factor", choices=SLERP_FACTORS, default="none", help="suggest a SLERP t per pair")
        if name == "should-stop":
            p.add_argument("--min-expected-gain", type=float, default=None, help="NO_EXPECTED_GAIN below this (default: off)")
            p.add_argument("--min-gain-history", type=int, default=0, help="merges NO_EXPECTED_GAIN needs (0: 3)")
            p.add_argument("--threshold", type=float, default=None, help="kinship threshold (default 0.9; required for euclidean)")
            p.add_argument("--aggregation", choices=AGGREGATIONS, default="mean")
            p.add_argument("--gain-window", type=int, default=0, help="GAIN_PLATEAU over the last N merges (0: off)")
            p.add_argument("--gain-threshold", type=float, default=None, help="GAIN_PLATEAU fires below this gain (default 0)")
            p.add_argument("--exit-code", action="store_true", help="exit with status 3 when the answer is stop")
    add_merge_commands(sub)
    return parser


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `kinship` command line (`argv` defaults to sys.argv[1:]); returns the exit status.

    Usage errors return 2 with one line on stderr (argparse's own errors also print the usage);
    server errors return 1 with the gRPC code, the reason (docs/errors.md) and the field.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except NotUtf8 as exc:
        print(f"kinship: {exc}", file=sys.stderr)
        return 2
    func: Callable[[KinshipClient, argparse.Namespace], int] = args.func
    try:
        client = KinshipClient(
            args.target,
            token=args.token,
            root_certificates=_read(args.tls_ca),
            private_key=_read(args.tls_key),
            certificate_chain=_read(args.tls_cert),
        )
    except OSError as exc:
        print(f"kinship: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            return func(client, args)
        except KinshipRpcError as exc:
            field = f" (field {exc.field})" if exc.field else ""
            reason = f" {exc.reason}" if exc.reason else ""  # looked up in docs/errors.md
            print(f"kinship: {exc.code.name}{reason}: {exc.message}{field}", file=sys.stderr)
            return 1
        except ValueError as exc:  # a bad argument the client refused before calling (its message names it)
            print(f"kinship: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
