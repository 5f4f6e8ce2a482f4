"""Benchmark: exact kinship of a base plus 3 models (>= 500M parameters each, bf16) through the real service.

Prints the wall time of one cold Kinship RPC (mode EXACT, fresh server and empty cache,
so the pass also computes and stores the fingerprints), the floor measured in the same
run (reading every byte of the same files once, sequentially, page cache warm for
both), their ratio, and the server's peak RSS above the interpreter's baseline.

    python bench/kinship.py                      # 500M parameters, ./bench-output/kinship
    python bench/kinship.py --params 1.5e9       # bigger models: RSS must not grow

Targets (issue 2): ratio <= 2.0 on CPU; peak RSS < 2 GiB above baseline, independent of size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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


def read_floor(files: list[Path], block: int = 16 * 2**20) -> tuple[float, int]:
    """Seconds to read every byte of `files` once, sequentially, into one reused buffer."""
    buffer = bytearray(block)
    view = memoryview(buffer)
    total = 0
    started = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while True:
                count = handle.readinto(view)
                if not count:
                    break
                total += count
    return time.perf_counter() - started, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=5.0e8, help="parameters per model (default 5e8)")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=ROOT / "bench-output" / "kinship")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument("--torch-path", action="store_true", help="KINSHIP_CPU_KERNEL=false: the torch loop, not the fused kernel")
    args = parser.parse_args()

    dirs = ensure_family(args.dir / f"p{args.params:.0e}-n{args.models}", args.params, args.models)

    import torch

    from kinship_client import KinshipClient
    from kinship_service.config import Settings
    from kinship_service.server.main import serve

    files = sorted(p for d in dirs for p in d.glob("*.safetensors"))
    read_floor(files)  # warm the page cache so floor and service see the same state
    baseline = rss_now_mib()
    resettable = reset_peak_rss()
    floors, times, peaks = [], [], []
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
                log_format="text",
                log_level="WARNING",
            )
            running = serve(settings)
            client = KinshipClient(running.address, timeout=3600)
            client.wait_ready()
            floor, total_bytes = read_floor(files)
            floors.append(floor)
            reset_peak_rss()
            started = time.perf_counter()
            result = client.kinship(str(dirs[0]), [str(d) for d in dirs[1:]], mode="exact")
            times.append(time.perf_counter() - started)
            peaks.append(peak_rss_mib())
            client.close()
            running.stop(0)
    peak = max(peaks)
    assert result is not None
    floor, best = min(floors), min(times)
    params = result.elements_compared
    print(f"models: base + {args.models}, {params / 1e6:.0f}M parameters each, bf16, {total_bytes / 2**30:.2f} GiB in all")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {result.device}")
    print(f"floor (read every byte once): {floor:.3f} s  ({total_bytes / floor / 2**30:.2f} GiB/s)   runs: {[round(f, 3) for f in floors]}")
    print(f"exact Kinship RPC:            {best:.3f} s  ({total_bytes / best / 2**30:.2f} GiB/s)   runs: {[round(t, 3) for t in times]}")
    print(f"ratio to floor:               {best / floor:.2f}  (target <= 2.0)")
    label = "peak RSS above baseline:" if resettable else "peak RSS above baseline (process peak):"
    print(f"{label:<30}{peak - baseline:.0f} MiB  (baseline {baseline:.0f} MiB, target < 2048 MiB)")
    print(f"mean PCC {result.mean.pcc:.6f}, cosine {result.mean.cosine:.6f}, euclidean {result.mean.euclidean:.3f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("KINSHIP_LOG_LEVEL", "WARNING")
    sys.exit(main())
