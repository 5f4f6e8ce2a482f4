"""A/B benchmark: the exact pass with the fused numba kernel (service/cpu_kernel.py) vs the torch path.

Runs, in one process and against the same page-cache-warm files (bench/kinship.py's
base + 3 x 500M bf16 family by default), alternating:

- floor:  read every byte of every file once (bench/kinship.py's read_floor);
- fused:  a COPY of exact_kinship's streaming loop calling `cpu_kernel.accumulate`
          once per lockstep chunk (no float64 buffer, no per-block torch ops);
- f32:    the same loop, but bf16 -> float32 widened by torch first (in 1M-element
          pieces) and the kernel run over float32 rows (the brief's alternative);
- torch:  the real `exact_kinship` (current service path), with --torch.

It checks that every variant's similarities agree with the torch path, and prints
min / median / max per variant, the ratio to the floor, the kernel's JIT compile time
(cold cache, in a child process) and the peak RSS above baseline of a fused pass.

    python bench/kernel_ab.py                   # fused + f32 vs floor, 5 rounds
    python bench/kernel_ab.py --torch --rounds 3
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from kinship import peak_rss_mib, read_floor, reset_peak_rss, rss_now_mib  # noqa: E402

from kinship_service.checkpoints.dtypes import ITEMSIZE  # noqa: E402
from kinship_service.checkpoints.sources import LocalPath, resolve  # noqa: E402
from kinship_service.checkpoints.streaming import CheckpointReader  # noqa: E402
from kinship_service.kinship import cpu_kernel  # noqa: E402
from kinship_service.kinship.exact import _lockstep, exact_kinship, plan_comparison  # noqa: E402
from kinship_service.kinship.similarity import PairwiseMoments, Similarities, similarities  # noqa: E402


def fused_pass(base, models, *, chunk_bytes: int = 256 * 2**20, widen_f32: bool = False) -> Similarities:
    """exact_kinship's loop with the fused kernel plugged in (what the lead would integrate)."""
    readers = [CheckpointReader(c) for c in (base, *models)]
    headers = [r.tensors() for r in readers]
    plan = plan_comparison(headers, [c.label for c in (base, *models)], False)
    n = len(models)
    itemsize = max(ITEMSIZE[h[t.name].dtype] for h in headers for t in plan.tensors)
    read_elements = max(256, chunk_bytes // ((n + 1) * itemsize))
    moments: dict[str, PairwiseMoments] = {}
    for tensor in plan.tensors:
        group = moments.setdefault(tensor.group, PairwiseMoments(n))
        for chunks in _lockstep(readers, tensor, read_elements):
            if widen_f32:
                flat = [c.reshape(-1) for c in chunks]
                size = flat[0].numel()
                for start in range(0, size, 1 << 20):
                    cpu_kernel.accumulate([f[start : start + (1 << 20)].float() for f in flat], group)
            else:
                cpu_kernel.accumulate(chunks, group)
    total = PairwiseMoments(n)
    for m in moments.values():
        total.merge(m)
    return similarities(total)


def worst_relative_difference(a: Similarities, b: Similarities) -> float:
    worst = 0.0
    for pa, pb in zip(a.pairs(), b.pairs(), strict=False):
        for x, y in zip(pa[2:], pb[2:], strict=False):
            worst = max(worst, abs(x - y) / max(abs(y), 1e-300))
    return worst


def compile_seconds() -> tuple[float, float]:
    """warm_up() in fresh interpreters: with an empty numba cache, then with that cache filled."""
    code = "import time; t=time.perf_counter(); from kinship_service.kinship import cpu_kernel as k; w=k.warm_up(); print(w, time.perf_counter()-t)"
    with tempfile.TemporaryDirectory(prefix="kinship-numba-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        cold = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout.split()
        warm = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout.split()
    return float(cold[0]), float(warm[0])


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=ROOT / "bench-output" / "kinship" / "p5e+08-n3")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--torch", action="store_true", help="also time the current exact_kinship (slow)")
    parser.add_argument("--no-f32", action="store_true", help="skip the torch-widened float32 variant")
    parser.add_argument("--chunk-mib", type=int, default=256)
    args = parser.parse_args()

    names = ["base"] + sorted(p.name for p in args.dir.iterdir() if p.is_dir() and p.name != "base")
    checkpoints = [resolve(LocalPath(str(args.dir / name)), [args.dir]) for name in names]
    files = sorted(f for c in checkpoints for f in c.files)
    print(f"load average before: {load_average()}  (2 cores; others' jobs share them)")
    cold, warm = compile_seconds()
    print(f"JIT: warm_up() {cold:.2f} s with an empty numba cache, {warm:.3f} s with the disk cache filled")
    cpu_kernel.warm_up()
    read_floor(files)  # page cache warm for everyone

    baseline = rss_now_mib()
    resettable = reset_peak_rss()
    reference = fused_pass(checkpoints[0], checkpoints[1:], chunk_bytes=args.chunk_mib << 20)
    peak = peak_rss_mib() - baseline

    variants = ["fused"] + ([] if args.no_f32 else ["f32"]) + (["torch"] if args.torch else [])
    times: dict[str, list[float]] = {v: [] for v in ["floor", *variants]}
    cpu: dict[str, list[tuple[float, float]]] = {v: [] for v in ["floor", *variants]}
    results: dict[str, Similarities] = {}
    for _ in range(args.rounds):
        for variant in ["floor", *variants]:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            if variant == "floor":
                _, total_bytes = read_floor(files)
            elif variant == "torch":
                results[variant] = exact_kinship(checkpoints[0], checkpoints[1:], chunk_bytes=args.chunk_mib << 20).overall
            else:
                results[variant] = fused_pass(
                    checkpoints[0], checkpoints[1:], chunk_bytes=args.chunk_mib << 20, widen_f32=variant == "f32"
                )
            times[variant].append(time.perf_counter() - started)
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu[variant].append((after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime))
    floor = min(times["floor"])
    print(f"files: {len(files)}, {total_bytes / 2**30:.2f} GiB; torch threads {torch.get_num_threads()}; rounds {args.rounds}")
    for variant, runs in times.items():
        best = min(runs)
        print(
            f"{variant:>6}: min {best:.3f} s  median {statistics.median(runs):.3f}  max {max(runs):.3f}"
            f"  ratio(min/floor min) {best / floor:.2f}   runs {[round(t, 3) for t in runs]}"
        )
        user = min(u for u, _ in cpu[variant])
        system = min(s for _, s in cpu[variant])
        print(f"{'':>8}CPU seconds (all threads, min over rounds): user {user:.2f}  system {system:.2f}")
    for variant, sims in results.items():
        print(f"{variant:>6}: worst relative difference to the first fused pass {worst_relative_difference(sims, reference):.2e}")
    if "torch" in results:
        print(f" fused vs torch path: worst relative difference {worst_relative_difference(reference, results['torch']):.2e}")
    label = "peak RSS above baseline" if resettable else "peak RSS above baseline (process peak)"
    print(f"{label} during a fused pass: {peak:.0f} MiB (includes mapped file pages of the current chunk)")
    print(f"mean pcc {reference.mean()[0]:.9f}; load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
