"""Benchmark of the cache (issue 3): fingerprint queries, fingerprint matrices, cold vs warm exact kinship.

Runs a real server as a subprocess (`python -m kinship_service`) on a fresh cache
directory and talks to it through the real client:

1. FINGERPRINT Kinship RPC between two registered checkpoints: p50 / p99 over
   `--calls` calls (target: p99 < 5 ms).
2. The n x n kinship matrix of `--matrix` registered checkpoints from fingerprints
   (`KinshipCache.fingerprint_matrix`, the batch estimate over many fingerprints),
   in this process over the same cache directory: first call (fingerprints read and
   verified from disk) and warm calls (target: < 100 ms).
3. Cold EXACT (first request: reads every byte, sketches fingerprints in the same
   pass, stores them and the pair results) vs warm EXACT (the same request again:
   pair results, no weights read) on base + 3 models of >= 500M parameters in bf16,
   the files of bench/kinship.py (target: warm >= 10x faster). "Cold" is cache-cold;
   the files are in the page cache, as in bench/kinship.py.

    python bench/cache.py                     # defaults: 1000 calls, n = 100, 5e8 parameters
    python bench/cache.py --params 0          # skip the big exact comparison
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from _server import proc_status, server_pids, start_server  # bench/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=1, help="repeat the FINGERPRINT measurement (noisy machine)")
    parser.add_argument("--matrix", type=int, default=100)
    parser.add_argument("--params", type=float, default=5.0e8, help="parameters per model for cold vs warm EXACT (0: skip)")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench-output")
    args = parser.parse_args()

    import torch

    from kinship_client import KinshipClient
    from kinship_service.cache.registry import KinshipCache
    from kinship_service.checkpoints.sources import LocalPath
    from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint
    from kinship_service.config import Settings
    from kinship_service.kinship.fingerprint import SKETCH_WIDTH, estimate

    work = args.dir / "cache"
    small_dir = work / f"small-n{args.matrix}"
    shape = LlamaShape(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2)
    if not (small_dir / f"m{args.matrix - 1}" / "model.safetensors").exists():
        print(f"generating base + {args.matrix} small checkpoints in {small_dir} ...", flush=True)
        base = make_base(shape, seed=0)
        save_checkpoint(base, small_dir / "base", dtype=torch.bfloat16)
        for i, model in enumerate(make_family(base, args.matrix, rho=0.5, seed=1)):
            save_checkpoint(model, small_dir / f"m{i}", dtype=torch.bfloat16)
    cache_dir = work / f"cache-{os.getpid()}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    server_env = {
        "KINSHIP_HOST": "127.0.0.1",
        "KINSHIP_PORT": "0",
        "KINSHIP_METRICS_PORT": "0",
        "KINSHIP_ALLOWED_ROOTS": str(args.dir),
        "KINSHIP_CACHE_DIR": str(cache_dir),
        "KINSHIP_CACHE_SIZE_LIMIT": "64GiB",
        "KINSHIP_LOG_LEVEL": "WARNING",
        "KINSHIP_LOG_FORMAT": "text",
        "KINSHIP_GRACE_SECONDS": "0",
    }
    process, address = start_server(server_env, work / "server.log")
    try:
        client = KinshipClient(address, timeout=3600)
        client.wait_ready()
        base_ref = str(small_dir / "base")
        models = [str(small_dir / f"m{i}") for i in range(args.matrix)]

        started = time.perf_counter()
        for m in models:
            client.register_checkpoint(m, base_ref)
        registering = time.perf_counter() - started
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; shared machine: figures are noisy")
        print(f"registered {len(models)} checkpoints ({shape.num_parameters} parameters each) in {registering:.2f} s")

        # 1. FINGERPRINT RPC latency.
        pair = models[:2]
        for _ in range(50):
            client.kinship(base_ref, pair, mode="fingerprint")
        for batch in range(args.batches):
            latencies = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                result = client.kinship(base_ref, pair, mode="fingerprint")
                latencies.append(time.perf_counter() - t0)
            assert result.mode == "fingerprint" and result.bytes_read == 0
            print(
                f"FINGERPRINT Kinship RPC (2 models, {args.calls} calls, batch {batch + 1}/{args.batches}): "
                f"p50 {percentile(latencies, 50) * 1e3:.2f} ms, p99 {percentile(latencies, 99) * 1e3:.2f} ms, "
                f"mean {statistics.mean(latencies) * 1e3:.2f} ms  (target p99 < 5 ms)"
            )

        # 2. The n x n matrix from fingerprints, in this process over the same cache directory.
        settings = Settings.from_env({}, allowed_roots=(args.dir,), cache_dir=cache_dir, cache_size_limit=64 * 2**30)
        cache = KinshipCache(settings, "cpu")
        refs = [LocalPath(m) for m in models]
        t0 = time.perf_counter()
        matrix = cache.fingerprint_matrix(LocalPath(base_ref), refs, "pcc")
        first = time.perf_counter() - t0
        assert matrix is not None and len(matrix) == args.matrix
        warm = []
        for _ in range(20):
            t0 = time.perf_counter()
            cache.fingerprint_matrix(LocalPath(base_ref), refs, "pcc")
            warm.append(time.perf_counter() - t0)
        base_id = cache.identities.identify(cache._resolve(LocalPath(base_ref), "base")).identity
        fps = [cache.get_fingerprint(base_id, cache.identities.identify(cache._resolve(r, "m")).identity) for r in refs]
        math_times = []
        for _ in range(20):
            t0 = time.perf_counter()
            estimate(fps)  # type: ignore[arg-type]
            math_times.append(time.perf_counter() - t0)
        print(
            f"{args.matrix}-model kinship matrix from fingerprints: first {first * 1e3:.1f} ms (read + verify "
            f"{args.matrix} MiB from disk), warm median {statistics.median(warm) * 1e3:.1f} ms "
            f"(math alone {statistics.median(math_times) * 1e3:.1f} ms)  (target < 100 ms)"
        )
        print(f"fingerprint size: {SKETCH_WIDTH * 4} bytes of sketch + a few KiB of statistics, any model size")
        cache.close()

        # 3. Cold vs warm EXACT on the 500M-parameter family of bench/kinship.py.
        if args.params > 0:
            from kinship import ensure_family, read_floor  # bench/kinship.py

            dirs = ensure_family(args.dir / "kinship" / f"p{args.params:.0e}-n3", args.params, 3)
            files = sorted(p for d in dirs for p in d.glob("*.safetensors"))
            read_floor(files)  # page cache warm, as in bench/kinship.py
            t0 = time.perf_counter()
            cold = client.kinship(str(dirs[0]), [str(d) for d in dirs[1:]], mode="exact")
            cold_s = time.perf_counter() - t0
            warm_s = []
            for _ in range(5):
                t0 = time.perf_counter()
                again = client.kinship(str(dirs[0]), [str(d) for d in dirs[1:]], mode="exact")
                warm_s.append(time.perf_counter() - t0)
            assert again.bytes_read == 0 and again.mode == "exact"
            assert [p.values for p in again.pairs] == [p.values for p in cold.pairs]
            t0 = time.perf_counter()
            fp = client.kinship(str(dirs[0]), [str(d) for d in dirs[1:]], mode="fingerprint")
            fp_s = time.perf_counter() - t0
            worst = max(abs(a.values.pcc - b.values.pcc) for a, b in zip(fp.pairs, cold.pairs, strict=False))
            warm_best = min(warm_s)
            print(
                f"EXACT on base + 3 x {cold.elements_compared / 1e6:.0f}M parameters bf16 "
                f"({sum(f.stat().st_size for f in files) / 2**30:.2f} GiB): cold {cold_s:.2f} s "
                f"(read {cold.bytes_read / 2**30:.2f} GiB, fingerprints sketched and stored in the same pass), "
                f"warm {warm_best * 1e3:.2f} ms (bytes_read 0; runs {[round(w * 1e3, 2) for w in warm_s]} ms)"
            )
            print(f"cold / warm EXACT: {cold_s / warm_best:.0f}x  (target >= 10x)")
            print(f"FINGERPRINT on the same set: {fp_s * 1e3:.2f} ms, max |PCC error| vs exact {worst:.5f}")
        peaks = [proc_status(pid, "VmHWM") for pid in server_pids(process.pid)]  # the front and its heavy-work process
        print(f"server peak RSS: {sum(peaks):.0f} MiB ({' + '.join(f'{p:.0f}' for p in peaks)} MiB by process)")
        client.close()
    finally:
        process.terminate()
        process.wait(timeout=60)
        shutil.rmtree(cache_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
