"""Where the CPU time of the exact pass goes: in-process calls on bench/kinship.py's files, CPU seconds.

Runs each phase in this process and prints its CPU time (`time.process_time`: every thread of
the process) and wall time, best of `--repeat`, with the load average. On a shared machine CPU
time is the steadier figure; phases run interleaved, round after round.

- floor: one thread `readinto` of every file, 16 MiB at a time (bench/kinship.py's floor)
- pread: one thread `pread` of every file in 64 KiB pieces from compiled code (what the fused
  kernel's reads cost by themselves)
- moments: `exact_kinship` with no observer (the fused kernel reading the files, moments only)
- sketch: `exact_kinship` with a `FingerprintObserver` (moments and the fingerprint sketch, as a
  cold EXACT request computes them)
- cache: `KinshipCache.kinship` in mode EXACT on an empty cache (what the servicer runs for a
  cold EXACT request: identities, plan, the pass, building and storing fingerprints and pairs)
- register: `KinshipCache.register` of the first model, the cache too small for its delta
  (RegisterCheckpoint's fingerprint-only pass, as bench/kinship.py times it)
- rpc: the cold EXACT Kinship RPC through a real server in this process (bench/kinship.py's call;
  timed after the server's kernel warm-up thread finished)

`--profile PHASE` runs that phase once more under cProfile (the calling thread: the Python
around the kernels) and prints the functions with the most own time.

    python bench/kinship.py                       # generates the files first (bench-output/kinship)
    python bench/kinship_phases.py                # then this
    python bench/kinship_phases.py --phases sketch --repeat 5
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=ROOT / "bench-output" / "kinship" / "p5e+08-n3", help="bench/kinship.py's family")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--phases", nargs="+", default=["floor", "pread", "moments", "sketch"], help="also: cache, register, rpc")
    parser.add_argument("--profile", help="a phase to run once more under cProfile")
    args = parser.parse_args()

    from kinship_service.cache.observer import FingerprintObserver
    from kinship_service.cache.registry import KinshipCache
    from kinship_service.checkpoints.sources import LocalPath, resolve
    from kinship_service.kinship import cpu_kernel, cpu_kernel_jit, exact

    dirs = [args.dir / "base", *sorted(p for p in args.dir.glob("m*") if p.is_dir())]
    if not (dirs[0] / "config.json").exists() or len(dirs) < 3:
        print(f"no family in {args.dir}: run bench/kinship.py first", file=sys.stderr)
        return 2
    checkpoints = [resolve(LocalPath(str(d)), [args.dir]) for d in dirs]
    files = sorted(p for d in dirs for p in d.glob("*.safetensors"))
    cpu_kernel.warm_up()

    def floor() -> None:
        view = memoryview(bytearray(16 * 2**20))
        for file in files:
            with open(file, "rb", buffering=0) as handle:
                while handle.readinto(view):
                    pass

    def pread() -> None:
        read_file = _compiled_reader()
        buffer = np.empty(64 * 1024, dtype=np.uint8)
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                assert read_file(cpu_kernel_jit.PREAD_ADDRESS, fd, os.fstat(fd).st_size, buffer.ctypes.data, buffer.size) == 0
            finally:
                os.close(fd)

    def moments() -> None:
        exact.exact_kinship(checkpoints[0], checkpoints[1:])

    def sketch() -> None:
        exact.exact_kinship(checkpoints[0], checkpoints[1:], observers=[FingerprintObserver(len(checkpoints) - 1, "cpu")])

    def cache() -> None:
        with tempfile.TemporaryDirectory(prefix="kinship-phases-") as directory:
            store = KinshipCache(_settings(args.dir, Path(directory)))
            try:
                store.kinship(checkpoints[0], checkpoints[1:], mode="exact")
            finally:
                store.close()

    def register() -> None:
        with tempfile.TemporaryDirectory(prefix="kinship-phases-") as directory:
            store = KinshipCache(_settings(args.dir, Path(directory), cache_size_limit=2**30))
            try:
                assert store.register(checkpoints[1], checkpoints[0]).delta_bytes == 0
            finally:
                store.close()

    def rpc() -> tuple[float, float]:
        from kinship_client import KinshipClient
        from kinship_service.server.main import serve

        with tempfile.TemporaryDirectory(prefix="kinship-phases-") as directory:
            running = serve(_settings(args.dir, Path(directory)))
            client = KinshipClient(running.address, timeout=3600)
            try:
                client.wait_ready()
                for thread in threading.enumerate():  # start-up (loading the kernels) is not the call
                    if thread.name == "cpu-kernel-warm-up":
                        thread.join()
                cpu, wall = time.process_time(), time.perf_counter()
                client.kinship(str(dirs[0]), [str(d) for d in dirs[1:]], mode="exact")
                return time.process_time() - cpu, time.perf_counter() - wall
            finally:
                client.close()
                running.stop(0)

    phases: dict[str, Callable[[], tuple[float, float] | None]] = {
        "floor": floor, "pread": pread, "moments": moments, "sketch": sketch, "cache": cache, "register": register, "rpc": rpc,
    }  # fmt: skip
    best: dict[str, tuple[float, float]] = {}
    print(f"{sum(f.stat().st_size for f in files) / 2**30:.2f} GiB in {len(files)} files; load average {_load()}")
    for _ in range(args.repeat):
        for name in args.phases:
            cpu, wall = time.process_time(), time.perf_counter()
            own = phases[name]()  # a phase that times only part of itself returns its figures
            cpu, wall = own if own is not None else (time.process_time() - cpu, time.perf_counter() - wall)
            print(f"  {name:<8} CPU {cpu:.3f} s  wall {wall:.3f} s  (load {_load()})", flush=True)
            previous = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(previous[0], cpu), min(previous[1], wall))
    print("best:", ", ".join(f"{name} CPU {cpu:.3f} s / wall {wall:.3f} s" for name, (cpu, wall) in best.items()))
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(phases[args.profile])
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    return 0


def _settings(root: Path, cache_dir: Path, **overrides: object) -> Any:
    from kinship_service.config import Settings

    return Settings.from_env(
        {}, host="127.0.0.1", port=0, metrics_port=0, allowed_roots=(root,), cache_dir=cache_dir,
        log_format="text", log_level="WARNING", **overrides,
    )  # fmt: skip


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _compiled_reader() -> Callable[[int, int, int, int, int], int]:
    """A compiled loop reading a whole file by `pread` into one buffer (the kernel's reads, without its math)."""
    from kinship_service.kinship.cpu_kernel_jit import call_pread, jit

    @jit(nogil=True)
    def read_file(function: int, fd: int, size: int, address: int, piece: int) -> int:
        done = 0
        while done < size:
            got = call_pread(function, fd, address, min(piece, size - done), done)
            if got <= 0:
                return -1
            done += got
        return 0

    return read_file  # type: ignore[no-any-return]


if __name__ == "__main__":
    sys.exit(main())
