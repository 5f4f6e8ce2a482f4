"""Heavy work on a real local Ray cluster of two nodes (`ray.cluster_utils.Cluster`, one CPU and 150 MB of object store each).

Expected values come from a float64 reference written here and from the single-node pass;
the merge on Ray is compared byte for byte with the same merge run locally.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kinship_client import KinshipClient
from kinship_service.cache.observer import FingerprintObserver
from kinship_service.checkpoints.safetensors_header import read_checkpoint_headers
from kinship_service.checkpoints.sources import Checkpoint, LocalPath, resolve
from kinship_service.checkpoints.synthetic import make_base, make_family, save_checkpoint
from kinship_service.config import ConfigError, Settings
from kinship_service.distributed import cluster as ray_cluster
from kinship_service.distributed.exact_pass import distributed_exact_kinship, split_ranges
from kinship_service.errors import KinshipError
from kinship_service.kinship.exact import TensorPlan, exact_kinship
from kinship_service.server.main import RunningServer, serve

from .conftest import SMALL

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

STORE = 150 * 2**20


@pytest.fixture(scope="session")
def local_ray_cluster() -> Iterator[Cluster]:
    """A head and a worker node on this machine, one CPU each; this process connects as a driver."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": STORE, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, object_store_memory=STORE)
    cluster.wait_for_nodes()
    ray_cluster.connect(Settings.from_env({}, ray_address=cluster.address))
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_cluster_address(local_ray_cluster: Cluster) -> str:
    """The address of the local cluster (no GPU on any node)."""
    return str(local_ray_cluster.address)


def _checkpoints(paths: list[Path]) -> list[Checkpoint]:
    return [resolve(LocalPath(str(p)), (p.parent,), "models") for p in paths]


def _reference(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCC, cosine and Euclidean matrices of the task vectors in float64 NumPy (every tensor, sorted names)."""
    names = sorted(base)
    deltas = [np.concatenate([(m[k].double() - base[k].double()).numpy().ravel() for k in names]) for m in models]
    d = np.stack(deltas)
    return np.corrcoef(d), (d @ d.T) / np.outer(np.linalg.norm(d, axis=1), np.linalg.norm(d, axis=1)), np.linalg.norm(d[:, None] - d[None], axis=2)


def _close(a: float, b: float, rel: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-300)


def test_split_ranges_cover_the_plan_in_order() -> None:
    tensors = [TensorPlan(f"t{i}", (size,), False, "other") for i, size in enumerate([5, 1, 1, 9, 2, 2, 30])]
    for parts in range(1, 9):
        ranges = split_ranges(tensors, parts)
        assert [t for r in ranges for t in r] == tensors
        assert 1 <= len(ranges) <= parts and all(ranges)
    with pytest.raises(ValueError, match="at least 1"):
        split_ranges(tensors, 0)


def test_distributed_pass_equals_single_node_and_reference(ray_cluster_address: str, model_root: Path) -> None:
    base = make_base(SMALL, seed=0)
    models = make_family(base, 3, rho=0.5, seed=1)
    paths = [save_checkpoint(base, model_root / "base")] + [save_checkpoint(m, model_root / f"m{i}") for i, m in enumerate(models)]
    checkpoints = _checkpoints(paths)
    headers = [read_checkpoint_headers(c).tensors for c in checkpoints]
    local_observer, ray_observer = FingerprintObserver(3, "cpu"), FingerprintObserver(3, "cpu")
    local = exact_kinship(checkpoints[0], checkpoints[1:], observers=[local_observer])
    spread = distributed_exact_kinship(checkpoints[0], checkpoints[1:], headers=headers, observers=[ray_observer], tasks=3)
    pcc, cosine, euclid = _reference(base, models)
    for i in range(3):
        for j in range(3):
            assert _close(spread.overall.pcc[i][j], local.overall.pcc[i][j])
            assert _close(spread.overall.cosine[i][j], local.overall.cosine[i][j])
            assert _close(spread.overall.euclidean[i][j], local.overall.euclidean[i][j])
            assert _close(spread.overall.pcc[i][j], float(pcc[i, j]), 1e-10)
            assert _close(spread.overall.cosine[i][j], float(cosine[i, j]), 1e-10)
            assert _close(spread.overall.euclidean[i][j], float(euclid[i, j]), 1e-10)
    assert spread.by_group.keys() == local.by_group.keys()
    for group, sims in local.by_group.items():
        assert all(_close(a, b) for a, b in zip(sum(spread.by_group[group].pcc, []), sum(sims.pcc, []), strict=True))
    assert spread.tensors_by_group == local.tensors_by_group
    assert spread.bytes_read == local.bytes_read
    local_observer.flush()
    ray_observer.flush()
    assert torch.allclose(ray_observer.sketch.sketch, local_observer.sketch.sketch, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(ray_observer.stats.groups, local_observer.stats.groups, strict=True):
        assert mine.keys() == theirs.keys()
        for group, stats in theirs.items():
            assert mine[group].count == stats.count and _close(mine[group].sum_squares, stats.sum_squares)


def test_server_with_ray_address_answers_exact_kinship(
    ray_cluster_address: str, server_factory: Callable[..., RunningServer], family: dict[str, object]
) -> None:
    paths = family["paths"]
    assert isinstance(paths, dict)
    names = [str(paths[f"m{i}"]) for i in range(3)]
    with KinshipClient(server_factory(ray_address=ray_cluster_address, ray_pass_tasks=2).address, timeout=120) as client:
        spread = client.kinship(str(paths["base"]), names, mode="exact")
    local = exact_kinship(*_split(_checkpoints([paths["base"], *[paths[f"m{i}"] for i in range(3)]])))
    assert spread.mode == "exact" and spread.elements_compared == local.overall.count
    for pair in spread.pairs:
        assert _close(pair.values.pcc, local.overall.pcc[pair.first][pair.second])
        assert _close(pair.values.euclidean, local.overall.euclidean[pair.first][pair.second])


def _split(checkpoints: list[Checkpoint]) -> tuple[Checkpoint, list[Checkpoint]]:
    return checkpoints[0], checkpoints[1:]


def _merge(client: KinshipClient, a: Path, b: Path, output: str) -> str:
    job = client.start_merge(str(a), str(b), t=0.3, output_path=output)
    updates = list(client.watch_merge_job(job.job_id, timeout=120))
    final = updates[-1]
    assert final.state == "succeeded", final.error
    return final.output_path


def test_merge_on_ray_equals_local_merge_byte_for_byte(
    ray_cluster_address: str, server_factory: Callable[..., RunningServer], model_root: Path, tmp_path: Path
) -> None:
    base = make_base(SMALL, seed=0)
    a, b = make_family(base, 2, rho=0.3, seed=5)
    pa = save_checkpoint(a, model_root / "a", config=SMALL.config(torch.float32))
    pb = save_checkpoint(b, model_root / "b", shards=2, config=SMALL.config(torch.float32))
    with KinshipClient(server_factory().address, timeout=120) as client:
        local = Path(_merge(client, pa, pb, "local"))
    with KinshipClient(server_factory(ray_address=ray_cluster_address).address, timeout=120) as client:
        on_ray = Path(_merge(client, pa, pb, "on-ray"))
        progress = client.get_merge_job(client.list_merge_jobs()[0][0].job_id)
    assert progress.tensors_done == progress.tensors_total > 0
    weights = sorted(p.name for p in local.iterdir() if p.suffix == ".safetensors")
    assert weights and weights == sorted(p.name for p in on_ray.iterdir() if p.suffix == ".safetensors")
    for name in weights:
        assert (local / name).read_bytes() == (on_ray / name).read_bytes()
    assert not [p for p in on_ray.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_merge_without_a_fitting_ray_worker_fails_with_a_reason(
    ray_cluster_address: str, server_factory: Callable[..., RunningServer], model_root: Path
) -> None:
    base = make_base(SMALL, seed=0)
    a, b = make_family(base, 2, rho=0.3, seed=5)
    pa, pb = save_checkpoint(a, model_root / "a"), save_checkpoint(b, model_root / "b")
    # No node has a GPU: the merge's worker is never placed, and the wait for it ends.
    running = server_factory(ray_address=ray_cluster_address, ray_gpus_per_merge=1.0, ray_timeout_seconds=3.0)
    with KinshipClient(running.address, timeout=120) as client:
        job = client.start_merge(str(pa), str(pb), t=0.5, output_path="never")
        final = list(client.watch_merge_job(job.job_id, timeout=120))[-1]
    assert final.state == "failed" and final.error is not None
    assert final.error.reason == "RAY_TIMEOUT" and "KINSHIP_RAY_TIMEOUT_SECONDS" in final.error.message
    assert not (running.settings.output_root / "never").exists()


def test_unreachable_ray_address_stops_start_up_naming_the_variable(tmp_path: Path, model_root: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        settings = Settings.from_env(
            {}, port=0, metrics_port=0, host="127.0.0.1", cache_dir=tmp_path / "c", allowed_roots=(model_root,), ray_address=f"127.0.0.1:{port}"
        )
        with pytest.raises(ConfigError, match="KINSHIP_RAY_ADDRESS"):
            serve(settings)
    with pytest.raises(ConfigError, match="KINSHIP_RAY_TIMEOUT_SECONDS"):
        Settings.from_env({"KINSHIP_RAY_TIMEOUT_SECONDS": "0"})


def test_kinship_server_exits_when_the_ray_address_refuses(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env = {**os.environ, "KINSHIP_RAY_ADDRESS": f"127.0.0.1:{s.getsockname()[1]}", "KINSHIP_PORT": "0",
               "KINSHIP_METRICS_PORT": "0", "KINSHIP_CACHE_DIR": str(tmp_path / "c"), "KINSHIP_LOG_FORMAT": "text"}
        done = subprocess.run([sys.executable, "-m", "kinship_service"], env=env, capture_output=True, timeout=120)
    assert done.returncode == 1
    assert b"KINSHIP_RAY_ADDRESS" in done.stderr and b"nothing answers there" in done.stderr


class _Blocker:
    """Holds a CPU of the cluster while it lives."""

    def ready(self) -> bool:
        return True


def test_merge_on_ray_cancelled_while_waiting_for_a_worker(
    ray_cluster_address: str, server_factory: Callable[..., RunningServer], model_root: Path
) -> None:
    base = make_base(SMALL, seed=0)
    a, b = make_family(base, 2, rho=0.3, seed=5)
    pa, pb = save_checkpoint(a, model_root / "a"), save_checkpoint(b, model_root / "b")
    blockers = [ray.remote(num_cpus=1)(_Blocker).remote() for _ in range(2)]  # every CPU of both nodes
    try:
        ray.get([blocker.ready.remote() for blocker in blockers], timeout=120)
        running = server_factory(ray_address=ray_cluster_address)
        with KinshipClient(running.address, timeout=120) as client:
            job = client.start_merge(str(pa), str(pb), t=0.5, output_path="cancelled")
            for info in client.watch_merge_job(job.job_id, timeout=120):
                if info.state == "running":  # its worker cannot be placed while the blockers hold the CPUs
                    break
                assert info.state == "queued", info
            final = client.cancel_merge_job(job.job_id)
    finally:
        for blocker in blockers:
            ray.kill(blocker)
    assert final.state == "cancelled", final
    assert not (running.settings.output_root / "cancelled").exists()


def test_ray_is_not_imported_without_the_variable() -> None:
    code = (
        "import sys; import kinship_service.server.main, kinship_service.server.front, kinship_service.jobs.manager, "
        "kinship_service.distributed.exact_pass, kinship_service.distributed.merge; "
        "from kinship_service.config import Settings; from kinship_service.jobs.manager import MergeJobManager; "
        "MergeJobManager(Settings.from_env({})); assert 'ray' not in sys.modules, 'ray imported'"
    )
    env = {k: v for k, v in os.environ.items() if k != "KINSHIP_RAY_ADDRESS"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def test_a_task_error_comes_back_as_the_local_pass_error(ray_cluster_address: str, model_root: Path) -> None:
    base = make_base(SMALL, seed=0)
    models = make_family(base, 2, rho=0.5, seed=1)
    paths = [save_checkpoint(base, model_root / "base")] + [save_checkpoint(m, model_root / f"m{i}") for i, m in enumerate(models)]
    checkpoints = _checkpoints(paths)
    headers = [read_checkpoint_headers(c).tensors for c in checkpoints]
    damaged = checkpoints[2].files[0]
    with open(damaged, "r+b") as handle:  # cut inside the data, after the headers were read
        handle.truncate(damaged.stat().st_size // 2)
    with pytest.raises(KinshipError) as local:
        exact_kinship(checkpoints[0], checkpoints[1:], headers=headers)
    with pytest.raises(KinshipError) as spread:
        distributed_exact_kinship(checkpoints[0], checkpoints[1:], headers=headers, tasks=2)
    assert type(spread.value) is type(local.value) and spread.value.reason == local.value.reason
    assert spread.value.message == local.value.message


def test_merge_asking_for_a_gpu_runs_on_the_one_ray_assigns(
    local_ray_cluster: Cluster, server_factory: Callable[..., RunningServer], model_root: Path
) -> None:
    """A node declaring one GPU joins for this test: Ray places the merge there and sets its CUDA_VISIBLE_DEVICES.
    With CUDA the merge runs on it; with a CPU-only torch (CI) it fails at once with MERGE_DEVICE_UNAVAILABLE."""
    node = local_ray_cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=STORE)
    try:
        local_ray_cluster.wait_for_nodes()
        base = make_base(SMALL, seed=0)
        a, b = make_family(base, 2, rho=0.3, seed=5)
        pa, pb = save_checkpoint(a, model_root / "a"), save_checkpoint(b, model_root / "b")
        running = server_factory(ray_address=local_ray_cluster.address, ray_gpus_per_merge=1.0)
        with KinshipClient(running.address, timeout=120) as client:
            job = client.start_merge(str(pa), str(pb), t=0.5, output_path="on-gpu")
            final = list(client.watch_merge_job(job.job_id, timeout=300))[-1]
    finally:
        local_ray_cluster.remove_node(node)
    if torch.cuda.is_available():
        assert final.state == "succeeded", final.error
        return
    assert final.state == "failed" and final.error is not None
    assert final.error.reason == "MERGE_DEVICE_UNAVAILABLE" and "torch sees no CUDA device" in final.error.message
    assert not (running.settings.output_root / "on-gpu").exists()
