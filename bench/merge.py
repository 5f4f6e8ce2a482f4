"""Benchmark: SLERP-merge two ~500M-parameter bf16 checkpoints and compare with the I/O floor.

    /tmp/v/bin/python bench/merge.py                      # 500M parameters, files under /tmp/kinship-bench-merge
    /tmp/v/bin/python bench/merge.py --params 50e6        # quicker
    /tmp/v/bin/python bench/merge.py --device cuda        # the math on the GPU (reads and writes stay on the host)

Prints the merge's wall time, its peak RSS above the interpreter's baseline (after imports),
and the ratio of its time to a floor measured in the same run: reading every byte of both inputs
once plus writing the output's number of bytes once (with fsync, as the merge does). Each part
runs in its own child process so RSS figures are clean. The inputs are generated once (tensor by
tensor, so generation itself stays small) and reused on later runs.

Targets (issue 5): ratio under 2.0, peak RSS under 2 GiB above baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

SHARDS = 2


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def generate(directory: Path, params: float) -> None:
    """Write models a and b (bf16, 2 shards each, with config and tokenizer files) one tensor at a time."""
    import torch

    from kinship_service.checkpoints.synthetic import shape_for_parameters
    from kinship_service.merge.safetensors_writer import HeaderEntry, SafetensorsWriter, tensor_bytes

    shape = shape_for_parameters(int(params))
    shapes = shape.tensor_shapes()
    names = list(shapes)
    total = sum(math.prod(s) for s in shapes.values())
    cut, acc = len(names), 0
    for i, name in enumerate(names):
        acc += math.prod(shapes[name])
        if acc >= total / SHARDS:
            cut = i + 1
            break
    groups = [names[:cut], names[cut:]]
    for model, noise in (("a", 0.02), ("b", 0.05)):
        out = directory / model
        if (out / "model.safetensors.index.json").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for index, group in enumerate(groups):
            file = f"model-{index + 1:05d}-of-{SHARDS:05d}.safetensors"
            writer = SafetensorsWriter(out / file, [HeaderEntry(n, "BF16", shapes[n]) for n in group], {"format": "pt"})
            offset = 0
            for name in group:
                dims = shapes[name]
                base_gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                if len(dims) == 1:
                    base = 1.0 + 0.05 * torch.randn(dims, generator=base_gen)
                else:
                    base = torch.randn(dims, generator=base_gen) * (1.0 / math.sqrt(dims[-1]))
                gen = torch.Generator().manual_seed((zlib.crc32(name.encode()) + ord(model)) % 2**31)
                # Most tensors are near-colinear fine-tunes (linear fallback); q_proj differ more (SLERP branch).
                scale = 1.0 if "q_proj" in name else noise
                tensor = (base + scale * base.std() * torch.randn(dims, generator=gen)).to(torch.bfloat16)
                data = tensor_bytes(tensor)
                writer.write_at(offset, data)
                offset += data.nbytes
                weight_map[name] = file
                del base, tensor
            writer.finish()
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (out / "config.json").write_text(json.dumps(shape.config(torch.bfloat16)))
        (out / "tokenizer_config.json").write_text("{}")
    print(json.dumps({"parameters": shape.num_parameters, "tensors": len(names)}))


def floor(directory: Path, output_bytes: int) -> None:
    """Read both inputs once and write `output_bytes` once (fsynced); print the seconds."""
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    started = time.perf_counter()
    read = 0
    for model in ("a", "b"):
        for path in sorted((directory / model).glob("*.safetensors")):
            with open(path, "rb", buffering=0) as handle:
                while n := handle.readinto(view):
                    read += n
    target = directory / "floor.bin"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    left = output_bytes
    while left > 0:
        left -= os.write(fd, view[: min(left, len(buf))])
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - started
    target.unlink()
    print(json.dumps({"floor_seconds": seconds, "floor_cpu_seconds": _cpu(), "bytes_read": read, "bytes_written": output_bytes}))


def merge(directory: Path, threads: int = 1, device: str = "cpu") -> None:
    """Run the merge exactly as a job does (MergeRunner into a temp dir, renamed into place)."""
    import shutil

    import torch

    from kinship_service.checkpoints.sources import LocalPath, resolve
    from kinship_service.config import Settings
    from kinship_service.merge.model_card import ModelCard
    from kinship_service.merge.plan import MergeSettings
    from kinship_service.merge.runner import MergeRunner
    from kinship_service.merge.slerp import FactorEntry, InterpolationSpec

    baseline = _rss_kib("VmRSS")
    cpu_before = _cpu()
    roots = (directory,)
    a = resolve(LocalPath(str(directory / "a")), roots)
    b = resolve(LocalPath(str(directory / "b")), roots)
    spec = InterpolationSpec((FactorEntry("self_attn", (0.0, 0.5, 1.0), True), FactorEntry("", (0.4,), False)))
    final = directory / "merged"
    shutil.rmtree(final, ignore_errors=True)
    started = time.perf_counter()
    use_kernel = Settings.from_env().cpu_kernel  # KINSHIP_CPU_KERNEL=0: the torch path, for comparison
    runner = MergeRunner(
        a, b, MergeSettings(t=spec, out_dtype="BF16"), allowed_roots=roots, threads=threads, use_cpu_kernel=use_kernel, device=device
    )
    summary = runner.run(directory / ".kinship-tmp-bench", final, overwrite=True, card=ModelCard("a", "b", "", "", spec))
    seconds = time.perf_counter() - started
    peak = _rss_kib("VmHWM")
    device_peak = torch.cuda.max_memory_allocated() / 2**20 if summary.device.startswith("cuda") else 0.0
    print(
        json.dumps(
            {
                "merge_seconds": seconds,
                "merge_cpu_seconds": _cpu() - cpu_before,
                "bytes_written": summary.bytes_written,
                "tensors": summary.tensors,
                "slerp_tensors": summary.slerp_tensors,
                "linear_tensors": summary.linear_tensors,
                "baseline_rss_mib": baseline / 1024,
                "peak_rss_mib": peak / 1024,
                "peak_above_baseline_mib": (peak - baseline) / 1024,
                "torch_threads": torch.get_num_threads(),
                "cpu_kernel": runner.use_cpu_kernel,
                "device": summary.device,
                "device_peak_mib": device_peak,
            }
        )
    )
    shutil.rmtree(final, ignore_errors=True)


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=520e6, help="parameters per model (default 520M)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/kinship-bench-merge"))
    parser.add_argument("--threads", type=int, default=2, help="math worker threads of the merge (the server uses 2)")
    parser.add_argument(
        "--pause", type=float, default=10.0, help="idle seconds before each timed step, so each starts with the disk drained"
    )
    parser.add_argument("--repeat", type=int, default=3, help="floor/merge/floor rounds (default 3)")
    parser.add_argument("--device", default="cpu", help="where the merge's math runs: cpu (default), cuda or cuda:N")
    parser.add_argument("--role", choices=["main", "generate", "floor", "merge"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--output-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = args.dir / f"p{int(args.params)}"
    if args.role == "generate":
        generate(directory, args.params)
        return 0
    if args.role == "floor":
        floor(directory, args.output_bytes)
        return 0
    if args.role == "merge":
        merge(directory, args.threads, args.device)
        return 0
    common = ["--params", str(args.params), "--dir", str(args.dir)]
    started = time.perf_counter()
    info = _child(*common, "--role", "generate")
    print(f"models: {info['parameters'] / 1e6:.0f}M parameters each, {info['tensors']} tensors, bf16 "
          f"(ready in {time.perf_counter() - started:.1f} s) under {directory}")
    input_bytes = sum(p.stat().st_size for m in ("a", "b") for p in (directory / m).glob("*.safetensors"))
    output_bytes = input_bytes // 2
    ratios: list[float] = []
    merges: list[float] = []
    floors: list[float] = []
    for round_ in range(1, args.repeat + 1):
        time.sleep(args.pause)
        floor1 = _child(*common, "--role", "floor", "--output-bytes", str(output_bytes))
        time.sleep(args.pause)
        result = _child(*common, "--role", "merge", "--threads", str(args.threads), "--device", args.device)
        time.sleep(args.pause)
        floor2 = _child(*common, "--role", "floor", "--output-bytes", str(result["bytes_written"]))
        floor_s = min(floor1["floor_seconds"], floor2["floor_seconds"])
        ratio = result["merge_seconds"] / floor_s
        ratios.append(ratio)
        merges.append(result["merge_seconds"])
        floors += [floor1["floor_seconds"], floor2["floor_seconds"]]
        print(f"round {round_}: floor (read inputs once + write output once, fsync) {floor1['floor_seconds']:.2f} s before, "
              f"{floor2['floor_seconds']:.2f} s after; merge {result['merge_seconds']:.2f} s wall, "
              f"{result['merge_cpu_seconds']:.2f} s CPU; ratio {ratio:.2f} (against the smaller floor)")
    if result["device"] != "cpu":
        print(f"device {result['device']}: peak device memory {result['device_peak_mib']:.0f} MiB")
    print(f"merge: {result['tensors']} tensors ({result['slerp_tensors']} SLERP, {result['linear_tensors']} linear fallback), "
          f"{result['bytes_written'] / 2**30:.2f} GiB written")
    print(f"ratio to floor: median {sorted(ratios)[len(ratios) // 2]:.2f}, range {min(ratios):.2f}-{max(ratios):.2f} (target < 2.0)")
    print(f"best merge {min(merges):.2f} s against best floor {min(floors):.2f} s: {min(merges) / min(floors):.2f}")
    print(f"peak RSS: {result['peak_rss_mib']:.0f} MiB, {result['peak_above_baseline_mib']:.0f} MiB above the "
          f"interpreter's baseline of {result['baseline_rss_mib']:.0f} MiB (target < 2048 MiB)")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine: figures are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
