"""Benchmark: the exact pass (base + 3 bf16 models) on one node vs split across a local Ray cluster of 1 and 2 nodes.

All on this machine: each Ray node is given one CPU (`ray.cluster_utils.Cluster`), so the
figures show the shape of the scaling (what splitting by tensor range and reducing float64
partials costs, and what a second node gains), not absolute cluster speed. Prints, per layout,
the best of `--repeat` passes (each after an untimed warm-up, which loads the numba kernels in
the Ray workers), its ratio to the read floor measured in the same run (reading every byte
once), its speed-up over the single-node pass, and the largest relative difference of any
PCC, cosine or Euclidean value from the single-node pass (the claim is <= 1e-12).

    python bench/distributed.py                  # 1e8 parameters per model in /tmp/kinship-bench-distributed
    python bench/distributed.py --params 5e8 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kinship import ensure_family, read_floor  # noqa: E402  (bench/kinship.py)

from kinship_service.cache.observer import FingerprintObserver  # noqa: E402
from kinship_service.checkpoints.safetensors_header import read_checkpoint_headers  # noqa: E402
from kinship_service.checkpoints.sources import LocalPath, resolve  # noqa: E402
from kinship_service.kinship.exact import ExactKinship, exact_kinship  # noqa: E402


def max_relative_difference(a: ExactKinship, b: ExactKinship) -> float:
    worst = 0.0
    for metric in ("pcc", "cosine", "euclidean"):
        for row_a, row_b in zip(getattr(a.overall, metric), getattr(b.overall, metric), strict=True):
            for x, y in zip(row_a, row_b, strict=True):
                if x != y:
                    worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1.0e8, help="parameters per model (default 1e8)")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/kinship-bench-distributed"))
    parser.add_argument("--repeat", type=int, default=2, help="timed passes per layout; the best is reported")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from kinship_service.config import Settings
    from kinship_service.distributed import cluster as ray_cluster
    from kinship_service.distributed.exact_pass import distributed_exact_kinship

    paths = ensure_family(args.dir, args.params, args.models)
    checkpoints = [resolve(LocalPath(str(p)), (args.dir,), "models") for p in paths]
    headers = [read_checkpoint_headers(c).tensors for c in checkpoints]
    files = [f for c in checkpoints for f in c.files]
    read_floor(files)  # warm the page cache
    floor = min(read_floor(files)[0] for _ in range(2))

    def local_pass() -> ExactKinship:
        return exact_kinship(checkpoints[0], checkpoints[1:], observers=[FingerprintObserver(args.models, "cpu")])

    local_pass()  # numba kernels compiled or loaded
    local_seconds, reference = min(((r.seconds, r) for r in (local_pass() for _ in range(args.repeat))), key=lambda x: x[0])
    load = os.getloadavg()[0]
    rows = [("single node (no Ray)", 1, local_seconds, 0.0)]
    for nodes in (1, 2):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 * 2**20, "include_dashboard": False})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20)
        cluster.wait_for_nodes()
        ray_cluster._connected = None
        ray_cluster.connect(Settings.from_env({}, ray_address=cluster.address))
        try:

            def ray_pass(tasks: int) -> ExactKinship:
                return distributed_exact_kinship(
                    checkpoints[0], checkpoints[1:], headers=headers, observers=[FingerprintObserver(args.models, "cpu")], tasks=tasks
                )

            for tasks in sorted({nodes, 2 * nodes}):
                ray_pass(tasks)  # warm-up: workers start and load the kernels
                timed = [ray_pass(tasks) for _ in range(args.repeat)]
                best = min(timed, key=lambda r: r.seconds)
                rows.append((f"Ray, {nodes} node(s), {tasks} tasks", nodes, best.seconds, max(max_relative_difference(r, reference) for r in timed)))
        finally:
            ray.shutdown()
            cluster.shutdown()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    total = sum(f.stat().st_size for f in files)
    print(f"\nprocessor: {cpu}; {os.cpu_count()} cores; load average at start {load:.2f}")
    print(f"base + {args.models} models of {args.params:.3g} bf16 parameters: {total / 2**30:.2f} GiB; read floor {floor:.3f} s")
    print(f"{'layout':34} {'seconds':>8} {'x floor':>8} {'speed-up':>9} {'max rel diff':>13}")
    for name, _nodes, seconds, diff in rows:
        print(f"{name:34} {seconds:8.3f} {seconds / floor:8.2f} {local_seconds / seconds:9.2f} {diff:13.1e}")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    worst = max(r[3] for r in rows)
    print(f"\nresults equal to the single-node pass to {worst:.1e} relative (claim: <= 1e-12): {'ok' if worst <= 1e-12 else 'FAILED'}")
    return 0 if worst <= 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
