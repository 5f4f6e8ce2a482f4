"""Benchmark: every merge method against mergekit's CLI on the same bf16 inputs, in the same run.

    /work/venvs/bm14/bin/python bench/merge_methods.py                       # 509M parameters per model
    /work/venvs/bm14/bin/python bench/merge_methods.py --params 20e6 --methods linear,ties   # quick
    python bench/merge_methods.py --device cuda --peer cpu   # ours on the GPU against ours on the CPU
    python bench/merge_methods.py --params 50e6 --methods ties --torch-path  # kernels vs torch path

For each method it merges a base and two models (three for ties and model_stock) with our
runner (exactly as a merge job does: `MergeRunner` into a temp dir renamed into place, 2 math
threads) and with mergekit 0.1.5's `mergekit-yaml config.yml out --lazy-unpickle
--out-shard-size ...` on CPU, each in a child process of its own; wall and CPU time come
from `os.wait4`, the peak RSS from the child's own VmHWM (polled; interpreter included, for both
tools). It prints the ratios ours/mergekit (targets: at most 0.5 for both) and how far our
output is from mergekit's on a sample of tensors, in bf16 ulps (target: at most 1). dare_* draw
their random masks differently (mergekit: torch.bernoulli on the global generator; ours: a
seeded hash per coordinate), so only their kept fraction is compared, not their values.

mergekit runs with `dtype: float32` and `out_dtype: bfloat16` (float32 math, bf16 output),
which is what our kernels do. Inputs are generated once under --dir and reused.

`--device cuda` runs our math on the GPU; `--peer cpu` replaces mergekit by our own CPU merge
(default kernels) in the same run, where mergekit is not installed (the device check): the ratios
are then GPU/CPU, and the check compares the two outputs (dare_* included: same masks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MERGEKIT = Path("/work/venvs/mergekit/bin/mergekit-yaml")
MODELS = ("base", "m1", "m2", "m3")
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "model_stock", "slerp")
THREE = ("ties", "model_stock")
"""Methods benchmarked on three models (the others on two)."""
DENSITY = 0.5
SAMPLE_TENSORS = 12


def generate(directory: Path, params: float) -> dict[str, int]:
    """Write base, m1, m2, m3 (bf16, one file each, config.json) one tensor at a time; fine-tunes of one base."""
    import torch

    from kinship_service.checkpoints.synthetic import shape_for_parameters
    from kinship_service.merge.safetensors_writer import HeaderEntry, SafetensorsWriter, tensor_bytes

    shape = shape_for_parameters(int(params))
    shapes = shape.tensor_shapes()
    names = sorted(shapes)
    shared_scale, own_scale = 0.01, 0.01  # task vectors share half their variance: kinship about 0.5
    for model in MODELS:
        out = directory / model
        if (out / "model.safetensors").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        writer = SafetensorsWriter(out / "model.safetensors.partial", [HeaderEntry(n, "BF16", shapes[n]) for n in names], {"format": "pt"})
        offset = 0
        for name in names:
            dims = shapes[name]
            seed = zlib.crc32(name.encode())
            base_gen = torch.Generator().manual_seed(seed)
            base = (1.0 + 0.05 * torch.randn(dims, generator=base_gen)) if len(dims) == 1 else torch.randn(dims, generator=base_gen) / math.sqrt(dims[-1])
            tensor = base
            if model != "base":
                scale = float(base.std()) or 1.0
                shared = torch.randn(dims, generator=torch.Generator().manual_seed(seed + 1))
                own = torch.randn(dims, generator=torch.Generator().manual_seed((seed + 7 * int(model[1:])) % 2**31))
                tensor = base + scale * (shared_scale * shared + own_scale * own)
            data = tensor_bytes(tensor.to(torch.bfloat16))
            writer.write_at(offset, data)
            offset += data.nbytes
            del base, tensor
        writer.finish()
        (out / "model.safetensors.partial").rename(out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(shape.config(torch.bfloat16)))
    return {"parameters": shape.num_parameters, "tensors": len(names)}


def _inputs(method: str) -> list[str]:
    """The input models of a method, in our runner's order (base first when the method takes one)."""
    models = ["m1", "m2", "m3"] if method in THREE else ["m1", "m2"]
    return models if method in ("linear", "slerp") else ["base", *models]


def mergekit_config(directory: Path, method: str) -> str:
    """The mergekit YAML of `method` over the benchmark's inputs (the same parameters as `ours`)."""
    models = [m for m in _inputs(method) if m != "base"]
    lines = [f"merge_method: {method}", "dtype: float32", "out_dtype: bfloat16"]
    if method == "slerp":
        lines += [f"base_model: {directory / 'm1'}", "models:", f"  - model: {directory / 'm1'}", f"  - model: {directory / 'm2'}",
                  "parameters:", "  t: 0.5"]
        return "\n".join(lines) + "\n"
    if method != "linear":
        lines.append(f"base_model: {directory / 'base'}")
    lines.append("models:")
    for model in models:
        lines.append(f"  - model: {directory / model}")
        if method != "model_stock":
            weight = 1.0 if method == "ties" else 0.5
            params = [f"weight: {weight}"] + ([f"density: {DENSITY}"] if method in ("ties", "dare_ties", "dare_linear") else [])
            lines.append("    parameters: {" + ", ".join(params) + "}")
    return "\n".join(lines) + "\n"


def ours(directory: Path, method: str, out: Path, threads: int, device: str = "cpu", use_cpu_kernel: bool = True) -> None:
    """Merge with our runner, as a job does (`use_cpu_kernel=False`: the torch path); print a JSON summary."""
    from kinship_service.checkpoints.sources import LocalPath, resolve
    from kinship_service.merge.model_card import ModelCard
    from kinship_service.merge.parameters import MethodParameters
    from kinship_service.merge.plan import MergeSettings
    from kinship_service.merge.runner import MergeRunner
    from kinship_service.merge.slerp import InterpolationSpec

    roots = (directory,)
    names = _inputs(method)
    checkpoints = [resolve(LocalPath(str(directory / n)), roots) for n in names]
    constant = InterpolationSpec.constant
    if method == "slerp":
        settings = MergeSettings(t=constant(0.5), out_dtype="BF16")
        card = ModelCard("m1", "m2", "", "", constant(0.5))
    else:
        models = [n for n in names if n != "base"]
        global_settings: dict[str, InterpolationSpec] = {}
        per_model: tuple[dict[str, InterpolationSpec], ...] = ()
        if method != "model_stock":
            weight = 1.0 if method == "ties" else 0.5
            entry = {"weight": constant(weight)}
            if method in ("ties", "dare_ties", "dare_linear"):
                entry["density"] = constant(DENSITY)
            per_model = tuple(dict(entry) for _ in models)
        parameters = MethodParameters(global_settings, per_model, None, None, 0)
        settings = MergeSettings(out_dtype="BF16", method=method, method_parameters=parameters, model_count=len(models))
        card = ModelCard("", "", "", "", constant(0.0), method=method, models=tuple((n, "") for n in models))
    started = time.perf_counter()
    runner = MergeRunner(
        checkpoints[0], checkpoints[1], settings, more_checkpoints=checkpoints[2:], allowed_roots=roots, threads=threads, device=device,
        use_cpu_kernel=use_cpu_kernel,
    )
    summary = runner.run(out.parent / f".kinship-tmp-{out.name}", out, overwrite=True, card=card)
    device_peak = 0.0
    if summary.device.startswith("cuda"):
        import torch

        device_peak = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps({"seconds": time.perf_counter() - started, "bytes_written": summary.bytes_written, "tensors": summary.tensors,
                      "device": summary.device, "device_peak_mib": device_peak}))


def _hwm_mib(pid: int) -> float | None:
    """The process's peak resident set (VmHWM) in MiB, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _timed_child(command: list[str], log: Path) -> dict[str, float]:
    """Run `command` as a child; its wall and CPU seconds and peak RSS (MiB).

    The peak is the child's own VmHWM, polled every 50 ms until it exits (monotonic, so the last
    reading is the peak up to the last 50 ms). Not wait4's ru_maxrss: Linux carries the parent's
    high-water mark from fork across exec into it, so every child would read at least the
    benchmark's own peak.
    """
    import threading

    started = time.perf_counter()
    peak = 0.0
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        done = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not done.is_set():
                value = _hwm_mib(process.pid)
                if value is not None:
                    peak = max(peak, value)
                done.wait(0.05)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        done.set()
        watcher.join()
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({process.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return {"seconds": seconds, "peak_rss_mib": peak, "cpu_seconds": usage.ru_utime + usage.ru_stime}


def _tensors(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    where = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                where[name] = file
    return where


def _bf16_ulps(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x - y| in bf16 ulps of max(|x|, |y|, rms(y) / 256) (2^(exponent - 7)).

    The floor at 1/256 of the tensor's RMS: where base and delta cancel to almost zero (1e-8 in a
    tensor of 0.06), float32 rounding order alone moves the result by many ulps of that tiny value.
    """
    import torch

    floor = max(float(y.square().mean().sqrt()) / 256, torch.finfo(torch.bfloat16).tiny)
    larger = torch.maximum(x.abs(), y.abs()).clamp(min=floor)
    ulp = torch.exp2(torch.floor(torch.log2(larger)) - 7)
    return (x - y).abs() / ulp


def _tied_at_threshold(inputs: list[Path], name: str, density: float) -> torch.Tensor:
    """Elements where some model's |delta| equals its TIES threshold (which of them survive is arbitrary in mergekit)."""
    import torch
    from safetensors import safe_open

    def load(directory: Path) -> torch.Tensor:
        with safe_open(str(directory / "model.safetensors"), "pt") as handle:
            return handle.get_tensor(name).float().reshape(-1)

    base = load(inputs[0])
    tied = torch.zeros(base.numel(), dtype=torch.bool)
    for model in inputs[1:]:
        magnitude = (load(model) - base).abs()
        k = max(1, int(density * magnitude.numel()))
        threshold = magnitude.kthvalue(magnitude.numel() - k + 1).values
        tied |= magnitude == threshold
    return tied


def compare(ours_dir: Path, theirs_dir: Path, method: str, inputs: list[Path]) -> dict[str, float]:
    """Largest distance in bf16 ulps between the outputs over a sample of tensors (dare_*: changed fractions instead).

    ties: elements where a model's |delta| ties with its magnitude threshold are left out (mergekit keeps an
    arbitrary subset of equal magnitudes, torch.argsort not being stable; ours keeps the first ones).
    """
    from safetensors import safe_open

    mine, theirs = _tensors(ours_dir), _tensors(theirs_dir)
    names = sorted(set(mine) & set(theirs))
    step = max(1, len(names) // SAMPLE_TENSORS)
    sample = names[::step][:SAMPLE_TENSORS]
    worst, over_one, total, excluded = 0.0, 0, 0, 0
    changed_ours, changed_theirs = [], []
    for name in sample:
        with safe_open(str(mine[name]), "pt") as a, safe_open(str(theirs[name]), "pt") as b:
            x, y = a.get_tensor(name).float().reshape(-1), b.get_tensor(name).float().reshape(-1)
        if x.shape != y.shape:
            raise RuntimeError(f"{method}: {name} has {x.numel()} elements here and {y.numel()} from mergekit")
        if method.startswith("dare"):
            with safe_open(str(inputs[0] / "model.safetensors"), "pt") as handle:
                base = handle.get_tensor(name).float().reshape(-1)
            changed_ours.append(float((x != base).float().mean()))
            changed_theirs.append(float((y != base).float().mean()))
            continue
        if method == "ties":
            keep = ~_tied_at_threshold(inputs, name, DENSITY)
            excluded += int((~keep).sum())
            x, y = x[keep], y[keep]
        ulps = _bf16_ulps(x, y)
        worst = max(worst, float(ulps.max()) if ulps.numel() else 0.0)
        over_one += int((ulps > 1).sum())
        total += ulps.numel()
    if method.startswith("dare"):
        return {"changed_fraction_ours": sum(changed_ours) / len(changed_ours),
                "changed_fraction_mergekit": sum(changed_theirs) / len(changed_theirs)}
    return {"max_ulps": worst, "over_one_ulp_fraction": over_one / max(total, 1), "compared": total,
            "excluded_ties": excluded, "sampled_tensors": len(sample)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=509e6, help="parameters per model (default 509M)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/kinship-bench-methods"))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--threads", type=int, default=2, help="our merge's math threads (the server uses 2)")
    parser.add_argument("--keep", action="store_true", help="keep the inputs afterwards (default: delete them)")
    parser.add_argument("--device", default="cpu", help="where our merge's math runs: cpu (default), cuda or cuda:N")
    parser.add_argument("--peer", choices=["mergekit", "cpu"], default="mergekit",
                        help="what ours is compared with: mergekit's CLI (default) or our own merge on the CPU")
    parser.add_argument("--torch-path", action="store_true",
                        help="also run our merge on its torch path (numba kernels off) in the same run: an A/B of the kernels")
    parser.add_argument("--no-kernel", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=["main", "ours"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = args.dir / f"p{int(args.params)}"
    if args.role == "ours":
        ours(directory, args.method, args.out, args.threads, args.device, use_cpu_kernel=not args.no_kernel)
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {', '.join(unknown)}; use {', '.join(METHODS)}")
    started = time.perf_counter()
    info = generate(directory, args.params)
    print(f"models: {info['parameters'] / 1e6:.0f}M parameters each, {info['tensors']} tensors, bf16, ready in "
          f"{time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    shard = f"{int(2 * info['parameters'])}"  # one output shard, as ours writes for this size
    rows = []
    for method in methods:
        out_ours, out_theirs = directory / f"out-ours-{method}", directory / f"out-mergekit-{method}"
        config = directory / f"{method}.yml"
        config.write_text(mergekit_config(directory, method))
        load = os.getloadavg()[0]
        ours_command = [sys.executable, __file__, "--role", "ours", "--params", str(args.params), "--dir", str(args.dir),
                        "--method", method, "--threads", str(args.threads)]
        mine = _timed_child([*ours_command, "--out", str(out_ours), "--device", args.device], directory / f"{method}-ours.log")
        plain = None
        if args.torch_path:
            out_plain = directory / f"out-ours-torch-{method}"
            plain = _timed_child([*ours_command, "--out", str(out_plain), "--device", args.device, "--no-kernel"],
                                 directory / f"{method}-ours-torch.log")
            shutil.rmtree(out_plain, ignore_errors=True)
        shutil.rmtree(out_theirs, ignore_errors=True)
        if args.peer == "cpu":
            theirs = _timed_child([*ours_command, "--out", str(out_theirs), "--device", "cpu"], directory / f"{method}-cpu.log")
        else:
            theirs = _timed_child([str(MERGEKIT), str(config), str(out_theirs), "--lazy-unpickle", "--out-shard-size", shard,
                                   "--no-copy-tokenizer", "--quiet"], directory / f"{method}-mergekit.log")
        check = compare(out_ours, out_theirs, method if args.peer == "mergekit" else "peer",
                        [directory / n for n in _inputs(method)])
        row = {"method": method, "models": len([n for n in _inputs(method) if n != "base"]), "load_average": load,
               "ours": mine, "mergekit": theirs, "time_ratio": mine["seconds"] / theirs["seconds"],
               "rss_ratio": mine["peak_rss_mib"] / theirs["peak_rss_mib"], "check": check}
        if plain is not None:
            row["ours_torch_path"] = plain
            row["kernel_cpu_ratio"] = mine["cpu_seconds"] / plain["cpu_seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out_ours, ignore_errors=True)
        shutil.rmtree(out_theirs, ignore_errors=True)
    peer = "mergekit" if args.peer == "mergekit" else "ours on cpu"
    print(f"\nours on {args.device}, peer: {peer}")
    print("\n| method | models | ours s (CPU s) | peer s (CPU s) | time ratio | ours peak RSS MiB | peer MiB | RSS ratio | check | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["check"]
        check = (f"max {c['max_ulps']:.2f} ulp, {100 * c['over_one_ulp_fraction']:.4f}% over 1 ulp" if "max_ulps" in c
                 else f"changed {c['changed_fraction_ours']:.3f} vs {c['changed_fraction_mergekit']:.3f}")
        print(f"| {r['method']} | {r['models']} | {r['ours']['seconds']:.1f} ({r['ours']['cpu_seconds']:.1f}) | "
              f"{r['mergekit']['seconds']:.1f} ({r['mergekit']['cpu_seconds']:.1f}) | "
              f"{r['time_ratio']:.2f} | {r['ours']['peak_rss_mib']:.0f} | {r['mergekit']['peak_rss_mib']:.0f} | "
              f"{r['rss_ratio']:.2f} | {check} | {r['load_average']:.1f} |")
    if not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
