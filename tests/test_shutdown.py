"""Graceful shutdown of a real `python -m kinship_service` process on SIGTERM.

What Kubernetes relies on: health turns NOT_SERVING first (so the pod leaves the
Service's endpoints), an RPC already running finishes, and the process exits on its
own within the grace period; work still running when the grace period ends is
cancelled rather than keeping the process alive.

The slow in-flight request is a cold Kinship call over 3 models (three generated
checkpoints of about 60 MiB, hard-linked under several names, so the disk holds only
four files): a second or more of work on this machine. The test waits until the
server's metrics show the call in flight before it sends SIGTERM. The call that the
grace period cuts short uses 24 models, so it is surely still running then.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kinship_client import KinshipClient, KinshipResult, KinshipRpcError
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint

from .free_ports import free_port

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM semantics are POSIX")

# About 16M parameters: 62 MiB per float32 checkpoint.
SHAPE = LlamaShape(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8, num_kv_heads=4)
N_MODELS = 3  # the calls that must finish (cold cache: each also writes fingerprints and deltas)
N_CANCELLED = 24  # the call the grace period cuts short


@pytest.fixture(scope="module")
def slow_request_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    """(allowed root, base, N_MODELS model directories) for a Kinship call that takes seconds."""
    root = tmp_path_factory.mktemp("shutdown-models")
    base = make_base(SHAPE, seed=0)
    family = make_family(base, 3, rho=0.5, seed=1)
    base_dir = save_checkpoint(base, root / "base")
    distinct = [save_checkpoint(model, root / f"distinct{i}") for i, model in enumerate(family)]
    del base, family
    models = []
    for i in range(N_CANCELLED):
        directory = root / f"m{i:02d}"
        directory.mkdir()
        os.link(distinct[i % 3] / "model.safetensors", directory / "model.safetensors")
        models.append(directory)
    return root, base_dir, models


class ServerProcess:
    """`python -m kinship_service` in a subprocess, with its address and metrics port."""

    def __init__(self, tmp_path: Path, root: Path, **env: str) -> None:
        self.metrics_port = free_port()
        self.stderr_path = tmp_path / "server.stderr"
        environ = dict(os.environ)
        environ.update(
            {
                "KINSHIP_HOST": "127.0.0.1",
                "KINSHIP_PORT": "0",
                "KINSHIP_METRICS_PORT": str(self.metrics_port),
                "KINSHIP_ALLOWED_ROOTS": str(root),
                "KINSHIP_CACHE_DIR": str(tmp_path / "cache"),
                "KINSHIP_OUTPUT_ROOT": str(tmp_path / "merges"),
                "KINSHIP_DEVICE": "cpu",
                "KINSHIP_LOG_FORMAT": "json",
                "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "2",
                # Keep the in-flight pass slow (seconds) whatever the machine: the torch path in
                # small chunks, so SIGTERM always lands while it runs.
                "KINSHIP_CPU_KERNEL": "0",
                "KINSHIP_CHUNK_BYTES": "256KiB",
            }
        )
        environ.update(env)
        self._stderr = self.stderr_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kinship_service"], env=environ, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        self.address = self._read_address()

    def _read_address(self) -> str:
        assert self.process.stdout is not None
        found: list[str] = []

        def reader() -> None:
            for line in self.process.stdout:  # type: ignore[union-attr]
                match = re.search(r"kinship-server listening on (\S+)", line)
                if match:
                    found.append(match.group(1))
                    return

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        thread.join(120)
        if not found:
            self.process.kill()
            raise AssertionError(f"server did not start; its log:\n{self.log()}")
        return found[0]

    def log(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def in_flight(self, method: str) -> float:
        """The server's `kinship_rpcs_in_flight` gauge for `method`."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        match = re.search(rf'^kinship_rpcs_in_flight\{{grpc_method="{method}"\}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._stderr.close()


@pytest.fixture
def start_server(tmp_path: Path, slow_request_models) -> Iterator:
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        server = ServerProcess(tmp_path, slow_request_models[0], **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def _start_slow_kinship(server: ServerProcess, models, n: int = N_MODELS) -> tuple[KinshipClient, Future]:
    _root, base, model_dirs = models
    model_dirs = model_dirs[:n]
    client = KinshipClient(server.address, timeout=300)
    pool = ThreadPoolExecutor(1)
    future: Future = pool.submit(client.kinship, str(base), [str(m) for m in model_dirs], mode="exact")
    pool.shutdown(wait=False)
    deadline = time.monotonic() + 60
    while server.in_flight("Kinship") < 1:
        assert not future.done(), f"the Kinship call ended before it was seen in flight: {future.exception()}"
        assert time.monotonic() < deadline, "the Kinship call never showed up as in flight"
        time.sleep(0.02)
    return client, future


def _health_status(stub: health_pb2_grpc.HealthStub) -> str:
    try:
        status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    except grpc.RpcError as error:
        return error.code().name


@pytest.mark.timeout(900)  # the in-flight call may take minutes on a loaded CI machine
def test_sigterm_marks_not_serving_finishes_in_flight_and_exits(start_server, slow_request_models):
    grace, drain = 600.0, 2.0  # longer than the slow call takes on any loaded machine: the test waits on states, not on time
    server = start_server(KINSHIP_GRACE_SECONDS=str(grace), KINSHIP_DRAIN_SECONDS=str(drain))
    # A second channel, as a load balancer or kubelet would have.
    with grpc.insecure_channel(server.address) as probe_channel:
        probe = health_pb2_grpc.HealthStub(probe_channel)
        assert _health_status(probe) == "SERVING"
        client, future = _start_slow_kinship(server, slow_request_models)
        assert not future.done()
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)

        seen: list[tuple[str, bool]] = []  # (health status, was the Kinship call still running)
        while server.process.poll() is None and time.monotonic() - sent < grace + drain + 30:
            seen.append((_health_status(probe), future.done()))
            if seen[-1][0] != "SERVING" and future.done():
                break
            time.sleep(0.05)

    statuses = [status for status, _ in seen]
    assert "NOT_SERVING" in statuses, f"health never reported NOT_SERVING after SIGTERM: {statuses[:20]}"
    first = statuses.index("NOT_SERVING")
    assert "SERVING" not in statuses[first:], "health went back to SERVING during shutdown"
    assert not seen[first][1], "the Kinship call had already finished when NOT_SERVING was first seen"

    result: KinshipResult = future.result(timeout=grace + drain + 30)
    assert len(result.models) == N_MODELS
    assert len(result.pairs) == N_MODELS * (N_MODELS - 1) // 2
    # A complete answer: the family was built with task-vector correlation about 0.5.
    assert all(0.3 < p.values.pcc < 0.7 for p in result.pairs), result.pairs
    client.close()

    returncode = server.process.wait(timeout=grace + drain + 30)
    log = server.log()
    assert returncode == 0, log
    assert '"message": "shutting down"' in log and '"signal": "SIGTERM"' in log
    assert '"message": "stopped"' in log


@pytest.mark.timeout(900)  # the in-flight call may take minutes on a loaded CI machine
def test_new_calls_are_refused_after_drain_and_probe_port_reports_not_serving(start_server, slow_request_models):
    health_port = free_port()
    server = start_server(KINSHIP_GRACE_SECONDS="600", KINSHIP_DRAIN_SECONDS="0", KINSHIP_HEALTH_PORT=str(health_port))
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as probe_channel:
        probe = health_pb2_grpc.HealthStub(probe_channel)
        assert _health_status(probe) == "SERVING"
        client, future = _start_slow_kinship(server, slow_request_models)
        server.process.send_signal(signal.SIGTERM)
        statuses = []
        while not future.done() and server.process.poll() is None:
            statuses.append(_health_status(probe))
            if statuses[-1] == "NOT_SERVING":
                break
            time.sleep(0.05)
        assert "NOT_SERVING" in statuses or future.done(), statuses
        if not future.done():
            # The main port takes no new calls once the grace period has begun.
            with KinshipClient(server.address, timeout=10) as late:
                with pytest.raises(KinshipRpcError) as err:
                    late.kinship(str(slow_request_models[1]), [str(m) for m in slow_request_models[2][:2]])
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(future.result(timeout=300).pairs) == N_MODELS * (N_MODELS - 1) // 2
    client.close()
    assert server.process.wait(timeout=150) == 0, server.log()


def test_work_still_running_after_the_grace_period_is_cancelled(start_server, slow_request_models):
    grace = 0.2
    server = start_server(KINSHIP_GRACE_SECONDS=str(grace), KINSHIP_DRAIN_SECONDS="0")
    client, future = _start_slow_kinship(server, slow_request_models, N_CANCELLED)
    server.process.send_signal(signal.SIGTERM)
    with pytest.raises(KinshipRpcError) as err:
        future.result(timeout=120)
    assert err.value.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), err.value
    client.close()
    # The process exits by itself: the cancelled pass stops at its next chunk.
    assert server.process.wait(timeout=120) == 0, server.log()
