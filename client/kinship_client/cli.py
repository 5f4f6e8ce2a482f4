"""`kinship`: the command-line client.

    kinship kinship --base /models/base /models/a /models/b        # table
    kinship --target host:50051 kinship --json --base ... A B       # JSON for machines

Connection options come before the subcommand; `KINSHIP_TARGET`, `KINSHIP_TOKEN`
and `KINSHIP_TLS_CA` set their defaults. Exit status: 0 on success, 1 when the
server answers with an error (printed with its gRPC code), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .client import KinshipClient, KinshipResult, KinshipRpcError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kinship", description="Client of the model-kinship gRPC service.")
    parser.add_argument("--target", default=os.environ.get("KINSHIP_TARGET", "localhost:50051"), help="server host:port")
    parser.add_argument("--token", default=os.environ.get("KINSHIP_TOKEN"), help="bearer token (or KINSHIP_TOKEN)")
    parser.add_argument("--tls-ca", default=os.environ.get("KINSHIP_TLS_CA"), help="CA bundle (PEM): use TLS")
    parser.add_argument("--tls-cert", default=os.environ.get("KINSHIP_TLS_CERT"), help="client certificate (PEM), mutual TLS")
    parser.add_argument("--tls-key", default=os.environ.get("KINSHIP_TLS_KEY"), help="client private key (PEM), mutual TLS")
    parser.add_argument("--timeout", type=float, default=None, help="deadline per call in seconds (default 600)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("kinship", help="kinship between models' task vectors against a base")
    p.add_argument("--base", required=True, help="base checkpoint: server path or hf://owner/name[@rev]")
    p.add_argument("models", nargs="+", help="two or more checkpoints")
    p.add_argument("--mode", choices=["auto", "exact", "fingerprint"], default="auto")
    p.add_argument("--per-layer", action="store_true", help="add a per-layer-group breakdown")
    p.add_argument("--shape-mismatch", choices=["skip", "leading_slice"], default="skip")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_kinship)
    return parser


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
            print(f"kinship: {exc.code.name}: {exc.message}{field}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
