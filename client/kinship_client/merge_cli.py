"""The merge commands of the `kinship` CLI.

    kinship merge /models/a /models/b --t 0.5 --out merged/ab             # waits, progress bar on stderr
    kinship merge A B --t "self_attn=0,0.5,1;mlp=1,0.5,0;0.5" --out x --dtype bfloat16
    kinship merge --mergekit-config slerp.yml --out x                       # a mergekit slerp config
    kinship merge --method ties --base B M1 M2 --weight 1 --density 0.5 --out t  # any method (docs/merge-methods.md)
    kinship jobs list [--state running] [--all]
    kinship jobs get JOB | kinship jobs cancel JOB | kinship jobs watch JOB

`--t` takes a number, comma-separated layer anchors (`0,0.5,1`), filtered entries separated by
`;` (`FILTER=VALUES`, an entry without `FILTER=` is the fallback), or JSON in the client's forms.
Exit status: 0 when the job succeeded (or was started with --no-wait), 1 when it failed or was
cancelled, 130 when interrupted (the job keeps running on the server).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from .choices import JOB_STATES, MERGE_SHAPE_MISMATCHES
from .client import KinshipClient
from .merge import MERGE_METHODS, MergeJobInfo, MethodOptions, TLike, format_bytes, format_eta


class NotUtf8(Exception):
    """A command-line value bound for the server is not valid UTF-8 (undecodable bytes in argv).

    Deliberately not a ValueError: argparse turns those into its own error and would not name
    the bytes; `main` prints this one line and exits 2.
    """

    def __init__(self, argument: str, value: str) -> None:
        raw = value.encode("utf-8", "surrogateescape")
        super().__init__(
            f"argument {argument}: {raw!r} is not valid UTF-8; the server takes UTF-8 paths and names: "
            "rename the file or give a UTF-8 path"
        )
        self.argument = argument


def wire_text(argument: str) -> Callable[[str], str]:
    """An argparse `type` for a value sent to the server: the text itself, or NotUtf8 naming `argument`."""

    def convert(value: str) -> str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise NotUtf8(argument, value) from None
        return value

    return convert


def parse_t(text: str) -> TLike:
    """`--t` text -> the client's t forms (float, anchors, or filtered entries).

    Raises:
        ValueError: the text is none of the forms (not a number, or not valid JSON).
    """
    text = text.strip()
    if text.startswith(("[", "{")):
        value: object = json.loads(text)
        if isinstance(value, dict):
            return [value]
        if isinstance(value, list):
            return value
        raise ValueError(f"{text!r} is not a JSON list or object")

    def values(part: str) -> float | list[float]:
        numbers = [float(v) for v in part.split(",") if v.strip()]
        if not numbers:
            raise ValueError(f"no value in {part!r}")
        return numbers[0] if len(numbers) == 1 and "," not in part else numbers

    entries = [e for e in text.split(";") if e.strip()]
    if len(entries) == 1 and "=" not in entries[0]:
        return values(entries[0])
    out: list[Mapping[str, Any]] = []
    for entry in entries:
        name, sep, rest = entry.partition("=")
        out.append({"filter": name.strip(), "value": values(rest)} if sep else {"value": values(name)})
    return out


def _job_json(info: MergeJobInfo) -> dict[str, Any]:
    data = {k: v for k, v in vars(info).items() if k not in ("raw", "error")}
    data["error"] = vars(info.error) if info.error else None
    return data


def format_job(info: MergeJobInfo) -> str:
    """One job as a line of text (and its error on a second line)."""
    line = (
        f"{info.job_id}  {info.state:<9}  {info.fraction * 100:5.1f}%  tensors {info.tensors_done}/{info.tensors_total}  "
        f"{format_bytes(info.bytes_done)}/{format_bytes(info.bytes_total)}  {info.output_path}"
    )
    if info.error:
        line += f"\n  error: {info.error.code} {info.error.reason}: {info.error.message}"
    return line


class ProgressBar:
    """A one-line progress bar on stderr (a line per update when stderr is not a terminal)."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        """Draw on `stream` (default stderr), `width` characters wide."""
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = ""
        self._last_time = 0.0

    def __call__(self, info: MergeJobInfo) -> None:
        """Show one update."""
        filled = int(self.width * info.fraction)
        bar = "#" * filled + "-" * (self.width - filled)
        text = (
            f"[{bar}] {info.fraction * 100:5.1f}% {info.state:<9} {format_bytes(info.bytes_done)}/"
            f"{format_bytes(info.bytes_total)} tensors {info.tensors_done}/{info.tensors_total} ETA {format_eta(info.eta_seconds)}"
        )
        if self.tty:
            self.stream.write("\r" + text.ljust(len(self._last)))
            if info.done:
                self.stream.write("\n")
        elif info.done or time.monotonic() - self._last_time >= 2.0 or info.state != self._last.split(" ")[-1]:
            self.stream.write(text + "\n")
            self._last_time = time.monotonic()
        self.stream.flush()
        self._last = text


def _finish(info: MergeJobInfo, as_json: bool) -> int:
    if as_json:
        print(json.dumps(_job_json(info), indent=2))
    else:
        print(format_job(info))
    return 0 if info.state == "succeeded" else 1


def _follow(client: KinshipClient, job_id: str, args: argparse.Namespace, op_wait: Callable[..., MergeJobInfo] | None = None) -> int:
    bar = ProgressBar() if not args.quiet else None
    try:
        if op_wait is None:
            info = client.get_merge_job(job_id)
            for info in client.watch_merge_job(job_id, timeout=10 * 24 * 3600.0):
                if bar:
                    bar(info)
        else:
            info = op_wait(on_progress=bar)
    except KeyboardInterrupt:
        print(f"\nkinship: stopped following; job {job_id} keeps running (kinship jobs cancel {job_id})", file=sys.stderr)
        return 130
    return _finish(info, args.json)


def cmd_merge(client: KinshipClient, args: argparse.Namespace) -> int:
    """`kinship merge`: start a merge job and follow it (or print its id with --no-wait); returns the exit status."""
    try:
        yaml_text = Path(args.mergekit_config).read_text(encoding="utf-8") if args.mergekit_config else None
    except (OSError, UnicodeDecodeError) as exc:
        print(f"kinship merge: cannot read --mergekit-config {args.mergekit_config}: {exc}", file=sys.stderr)
        return 2
    if args.method is not None:
        return _merge_method(client, args, yaml_text)
    if yaml_text is None and len(args.models) != 2:
        print("kinship merge: give two models A B (or --mergekit-config FILE)", file=sys.stderr)
        return 2
    if yaml_text is not None and args.models:
        print("kinship merge: the models come from --mergekit-config; do not also list them", file=sys.stderr)
        return 2
    try:
        t = parse_t(args.t)
    except ValueError as exc:
        print(f"kinship merge: bad --t: {exc}", file=sys.stderr)
        return 2
    model_a, model_b = (args.models + [None, None])[:2]
    op = client.merge(
        model_a,
        model_b,
        t=t,
        output_path=args.out,
        dtype=args.dtype,
        request_id=args.request_id,
        overwrite=args.overwrite,
        max_shard_bytes=args.max_shard_bytes,
        shape_mismatch=args.shape_mismatch,
        mergekit_yaml=yaml_text,
        timeout=args.timeout,
    )
    print(f"started merge job {op.job_id} -> {op.info.output_path}", file=sys.stderr)
    if args.no_wait:
        if args.json:
            print(json.dumps(_job_json(op.info), indent=2))
        else:
            print(op.job_id)
        return 0
    return _follow(client, op.job_id, args, op.wait)


def _merge_method(client: KinshipClient, args: argparse.Namespace, yaml_text: str | None) -> int:
    """`kinship merge --method NAME [--base B] M1 M2 ...`: any method, its parameters from the options."""
    if yaml_text is not None:
        print("kinship merge: --method and --mergekit-config exclude each other (the config names its method)", file=sys.stderr)
        return 2
    try:
        weights = [parse_t(w) for w in args.weights] if args.weights else None
        densities = [parse_t(d) for d in args.densities] if args.densities else None
        options = MethodOptions(
            args.method,
            args.models,
            weight=parse_t(args.weight) if args.weight is not None else None,
            weights=weights,
            density=parse_t(args.density) if args.density is not None else None,
            densities=densities,
            lambda_=parse_t(args.lambda_) if args.lambda_ is not None else None,
            t=parse_t(args.t) if args.method == "slerp" else None,
            normalize=args.normalize,
            rescale=args.rescale,
            seed=args.seed,
        )
        op = client.merge(
            None,
            None,
            output_path=args.out,
            dtype=args.dtype,
            request_id=args.request_id,
            overwrite=args.overwrite,
            max_shard_bytes=args.max_shard_bytes,
            shape_mismatch=args.shape_mismatch,
            base=args.base,
            method=options,
            timeout=args.timeout,
        )
    except ValueError as exc:
        print(f"kinship merge: {exc}", file=sys.stderr)
        return 2
    print(f"started {args.method} merge job {op.job_id} -> {op.info.output_path}", file=sys.stderr)
    if args.no_wait:
        print(json.dumps(_job_json(op.info), indent=2) if args.json else op.job_id)
        return 0
    return _follow(client, op.job_id, args, op.wait)


def cmd_jobs(client: KinshipClient, args: argparse.Namespace) -> int:
    """`kinship jobs list|get|cancel|watch`; returns the exit status (1 for a failed or cancelled job)."""
    if args.jobs_command == "list":
        token, jobs = args.page_token, []
        while True:
            page, token = client.list_merge_jobs(args.page_size, token, args.state, timeout=args.timeout)
            jobs += page
            if not args.all or not token:
                break
        if args.json:
            print(json.dumps({"jobs": [_job_json(j) for j in jobs], "next_page_token": token}, indent=2))
        else:
            for job in jobs:
                print(format_job(job))
            if token:
                print(f"more: kinship jobs list --page-token {token}", file=sys.stderr)
        return 0
    if args.jobs_command == "get":
        info = client.get_merge_job(args.job_id, timeout=args.timeout)
        print(json.dumps(_job_json(info), indent=2) if args.json else format_job(info))
        return 0
    if args.jobs_command == "cancel":
        return _finish(client.cancel_merge_job(args.job_id, timeout=args.timeout), args.json)
    return _follow(client, args.job_id, args)


def add_merge_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `merge` and `jobs` on the CLI's subparsers."""
    p = sub.add_parser("merge", help="merge models as a server job: SLERP of A and B, or --method NAME")
    p.add_argument("models", type=wire_text("MODEL"), nargs="*", metavar="MODEL", help="A and B (or the models of --method): server paths or hf://owner/name[@rev]")
    p.add_argument("--t", default="0.5", help="interpolation factor: 0.5 | 0,0.5,1 | 'self_attn=0,1;0.5' | JSON")
    p.add_argument("--out", type=wire_text("--out"), required=True, help="output directory, relative to the server's output root")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="output dtype (default: A's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--max-shard-bytes", type=int, default=0, help="bytes per output shard (default 5 GB)")
    p.add_argument("--shape-mismatch", choices=MERGE_SHAPE_MISMATCHES, default="error")
    p.add_argument("--request-id", type=wire_text("--request-id"), default=None, help="idempotency key")
    p.add_argument("--mergekit-config", default=None, metavar="FILE", help="a mergekit slerp YAML instead of A, B and --t")
    p.add_argument("--method", choices=MERGE_METHODS, default=None, help="merge method (default: slerp of A and B); see docs/merge-methods.md")
    p.add_argument("--base", type=wire_text("--base"), default=None, help="the base (task-vector methods; also registers the output)")
    p.add_argument("--weight", default=None, help="global weight of every model (a number, anchors or filtered entries as --t)")
    p.add_argument("--weights", nargs="+", default=None, metavar="W", help="one weight per model, in model order")
    p.add_argument("--density", default=None, help="global density in (0, 1] (ties, dare_*)")
    p.add_argument("--densities", nargs="+", default=None, metavar="D", help="one density per model")
    p.add_argument("--lambda", dest="lambda_", default=None, help="mergekit's lambda (task_arithmetic, ties, dare_*)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None, help="divide by the weights (default: mergekit's)")
    p.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=None, help="DARE's L1 rescaling (default on)")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the final job as JSON")
    p.set_defaults(func=cmd_merge)

    jobs = sub.add_parser("jobs", help="list, inspect, cancel or watch merge jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    lp = jobs_sub.add_parser("list", help="jobs, newest first")
    lp.add_argument("--state", choices=list(JOB_STATES), default=None)
    lp.add_argument("--page-size", type=int, default=0)
    lp.add_argument("--page-token", type=wire_text("--page-token"), default="")
    lp.add_argument("--all", action="store_true", help="follow every page")
    lp.add_argument("--json", action="store_true")
    for name, text in (("get", "one job"), ("cancel", "cancel a job"), ("watch", "follow a job with a progress bar")):
        jp = jobs_sub.add_parser(name, help=text)
        jp.add_argument("job_id", type=wire_text("job_id"))
        jp.add_argument("--json", action="store_true")
        jp.add_argument("--quiet", action="store_true")
    jobs.set_defaults(func=cmd_jobs)
