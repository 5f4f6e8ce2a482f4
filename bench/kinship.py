"""Benchmark: exact kinship of a base plus 3 models (>= 500M parameters each, bf16) through the real service.

Prints the wall time of one cold Kinship RPC (mode EXACT, fresh server and empty cache,
so the pass also computes and stores the fingerprints), the floor measured in the same
run (reading every byte of the same files once, sequentially, page cache warm for
both), their ratio, the CPU seconds of the floor and of the server's processes during the
call (on a shared machine CPU time is steadier than wall time), and the peak RSS above the
baseline (the server runs in this process, single-process layout, so its pass is measured here). Then the same for
RegisterCheckpoint's fingerprint-only pass (one model against the base; the cache is
too small for the delta, so only the fingerprint is computed), against the floor of reading
those two checkpoints. The processor (`/proc/cpuinfo` model name) and the load average
before and after are printed too: a ratio means little without them.

    python bench/kinship.py                      # 500M parameters, ./bench-output/kinship
    python bench/kinship.py --params 1.5e9       # bigger models: RSS must not grow

Targets (issue 15): ratio <= 1.5 on CPU (issue 2: 2.0); peak RSS < 2 GiB above baseline, independent of size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _server import cpu_seconds, server_pids  # noqa: E402


def cpu_model() -> str:
    """The processor's model name from /proc/cpuinfo (Linux), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def server_cpu() -> float:
    """CPU seconds so far of this process, which runs the (single-process) server, and of any children."""
    return sum(cpu_seconds(pid) for pid in server_pids(os.getpid()))


def rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def ensure_family(directory: Path, params: float, n_models: int) -> list[Path]:
    marker = directory / "family.json"
    wanted = {"params": params, "n_models": n_models, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return [directory / "base", *(directory / f"m{i}" for i in range(n_models))]
    # Generated in a child process so its memory does not count in this one's peak RSS.
    code = (
        "import sys, torch; from pathlib import Path; "
        "from kinship_service.checkpoints.synthetic import shape_for_parameters, write_family_streaming; "
        f"s = shape_for_parameters({int(params)}, num_layers=8); print('shape', s, s.num_parameters, flush=True); "
        f"write_family_streaming(Path({str(directory)!r}), s, {n_models}, rho=0.5, dtype=torch.bfloat16)"
    )
    print(f"generating base + {n_models} models of {params:.3g} parameters in {directory} ...", flush=True)
    subprocess.run([sys.executable, "-c", code], check=True)
    marker.write_text(json.dumps(wanted))
    return [directory / "base", *(directory / f"m{i}" for i in range(n_models))]


def read_floor(files: list[Path], block: int = 16 * 2**20) -> tuple[float, int, float]:
    """Seconds to read every byte of `files` once, sequentially, into one reused buffer; bytes; CPU seconds."""
    buffer = bytearray(block)
    view = memoryview(buffer)
    total = 0
    cpu = time.process_time()
    started = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while True:
                count = handle.readinto(view)
                if not count:
                    break
                total += count
    return time.perf_counter() - started, total, time.process_time() - cpu


@dataclass
class Run:
    """One timed call and the floor measured just before it."""

    floor: float
    floor_cpu: float
    seconds: float
    server_cpu: float
    peak: float


def timed(files: list[Path], call: Callable[[], Any]) -> tuple[Run, Any]:
    """Measure the floor of `files`, then `call` (wall, CPU of the server's processes, peak RSS)."""
    floor, _total, floor_cpu = read_floor(files)
    reset_peak_rss()
    cpu = server_cpu()
    started = time.perf_counter()
    answer = call()
    seconds = time.perf_counter() - started
    used = server_cpu() - cpu
    return Run(floor, floor_cpu, seconds, used, peak_rss_mib()), answer


def report(what: str, runs: list[Run]) -> None:
    """Best of the runs: the floor, the call, their ratio; CPU seconds of both."""
    floor, best = min(r.floor for r in runs), min(r.seconds for r in runs)
    floor_cpu, best_cpu = min(r.floor_cpu for r in runs), min(r.server_cpu for r in runs)
    print(f"{what}:")
    print(f"  floor (read every byte once): {floor:.3f} s, CPU {floor_cpu:.3f} s   runs: {[round(r.floor, 3) for r in runs]}")
    print(f"  call:                         {best:.3f} s, CPU {best_cpu:.3f} s (server processes)   runs: {[round(r.seconds, 3) for r in runs]}")
    print(f"  ratio to floor:               {best / floor:.2f}  (target <= 1.5); CPU-time ratio (call / floor) {best_cpu / floor_cpu:.2f}")


def wait_for_warm_up() -> None:
    """Wait for the server's kernel warm-up thread (it goes on to load the merge kernels after the
    exact pass's): its CPU time is start-up, not the timed call's."""
    for thread in threading.enumerate():
        if thread.name == "cpu-kernel-warm-up":
            thread.join()


def ensure_warm_up_family(directory: Path) -> list[Path]:
    """A tiny base and two models: the call that waits for the server's start-up before anything is timed."""
    if not (directory / "m1" / "model.safetensors").exists():
        from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint

        shape = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
        base = make_base(shape, seed=1)
        save_checkpoint(base, directory / "base")
        for i, model in enumerate(make_family(base, 2, rho=0.5, seed=2)):
            save_checkpoint(model, directory / f"m{i}")
    return [directory / "base", directory / "m0", directory / "m1"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=5.0e8, help="parameters per model (default 5e8)")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=ROOT / "bench-output" / "kinship")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument("--torch-path", action="store_true", help="KINSHIP_CPU_KERNEL=false: the torch loop, not the fused kernel")
    parser.add_argument("--pread", action="store_true", help="KINSHIP_MAPPED_READS=false: the fused kernel copies with pread instead of mapping")
    args = parser.parse_args()

    dirs = ensure_family(args.dir / f"p{args.params:.0e}-n{args.models}", args.params, args.models)

    import torch

    from kinship_client import KinshipClient
    from kinship_service.config import Settings
    from kinship_service.server.main import serve

    files = sorted(p for d in dirs for p in d.glob("*.safetensors"))
    pair_files = sorted(p for d in dirs[:2] for p in d.glob("*.safetensors"))
    warm = ensure_warm_up_family(args.dir / "warm-up")
    load_before = load_average()
    read_floor(files)  # warm the page cache so floor and service see the same state
    baseline = rss_now_mib()
    resettable = reset_peak_rss()
    exact_runs: list[Run] = []
    register_runs: list[Run] = []
    result = None
    for _ in range(args.repeat):
        # A fresh server and empty cache each run: the pass is cold (cached pair results would answer in ms).
        with tempfile.TemporaryDirectory(prefix="kinship-bench-cache-") as cache_dir:
            settings = Settings.from_env(
                {},
                host="127.0.0.1",
                port=0,
                metrics_port=0,
                allowed_roots=(args.dir,),
                cache_dir=Path(cache_dir),
                cpu_kernel=not args.torch_path,
                mapped_reads=not args.pread,
                log_format="text",
                log_level="WARNING",
            )
            running = serve(settings)
            client = KinshipClient(running.address, timeout=3600)
            client.wait_ready()
            # Start-up is not the pass: a tiny exact call waits for the heavy-work process and its kernels.
            client.kinship(str(warm[0]), [str(d) for d in warm[1:]], mode="exact")
            wait_for_warm_up()
            run, result = timed(files, partial(client.kinship, str(dirs[0]), [str(d) for d in dirs[1:]], mode="exact"))
            exact_runs.append(run)
            client.close()
            running.stop(0)
        # RegisterCheckpoint with a cache too small for the delta: the fingerprint-only pass.
        with tempfile.TemporaryDirectory(prefix="kinship-bench-cache-") as cache_dir:
            settings = Settings.from_env(
                {},
                host="127.0.0.1",
                port=0,
                metrics_port=0,
                allowed_roots=(args.dir,),
                cache_dir=Path(cache_dir),
                cache_size_limit=2**30,
                cpu_kernel=not args.torch_path,
                mapped_reads=not args.pread,
                log_format="text",
                log_level="WARNING",
            )
            running = serve(settings)
            client = KinshipClient(running.address, timeout=3600)
            client.wait_ready()
            client.kinship(str(warm[0]), [str(d) for d in warm[1:]], mode="exact")
            wait_for_warm_up()
            run, registration = timed(pair_files, partial(client.register_checkpoint, str(dirs[1]), str(dirs[0])))
            register_runs.append(run)
            assert registration.delta_bytes == 0, "the cache should be too small for the delta"
            client.close()
            running.stop(0)
    assert result is not None
    params = result.elements_compared
    total_bytes = sum(f.stat().st_size for f in files)
    print(f"processor: {cpu_model()}, {os.cpu_count()} CPUs; load average before {load_before}, after {load_average()}")
    print(f"models: base + {args.models}, {params / 1e6:.0f}M parameters each, bf16, {total_bytes / 2**30:.2f} GiB in all")
    reads = "torch path" if args.torch_path else ("pread" if args.pread else "mapped")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {result.device}, fused kernel reads: {reads}")
    report(f"exact Kinship RPC (base + {args.models} models)", exact_runs)
    report("RegisterCheckpoint, fingerprint only (base + 1 model)", register_runs)
    label = "peak RSS above baseline" if resettable else "peak RSS above baseline (process peak)"
    for what, runs in (("exact", exact_runs), ("register", register_runs)):
        print(f"{label + ', ' + what + ':':<44}{max(r.peak for r in runs) - baseline:.0f} MiB  (baseline {baseline:.0f} MiB, target < 2048 MiB)")
    print(f"mean PCC {result.mean.pcc:.6f}, cosine {result.mean.cosine:.6f}, euclidean {result.mean.euclidean:.3f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("KINSHIP_LOG_LEVEL", "WARNING")
    sys.exit(main())
