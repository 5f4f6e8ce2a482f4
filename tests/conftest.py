"""Shared fixtures: a real gRPC server on a loopback port, and checkpoint families on disk."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kinship_client import KinshipClient
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint
from kinship_service.config import Settings
from kinship_service.server.front import HeavyProcess, start_front
from kinship_service.server.main import RunningServer, serve

# No network in tests: Hub checkpoints resolve only from a cache layout a test builds here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="kinship-hf-cache-")
torch.set_num_threads(min(2, os.cpu_count() or 1))

SMALL = LlamaShape(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    """The directory the test server may read (its only allowed root)."""
    root = tmp_path / "models"
    root.mkdir()
    return root


def _test_settings(tmp_path: Path, model_root: Path, overrides: dict[str, object]) -> Settings:
    """Loopback, a free port, no metrics port, the test's model root and cache, CPU, no grace period."""
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "allowed_roots": (model_root,),
        "cache_dir": tmp_path / "cache",
        "output_root": tmp_path / "merges",
        "log_format": "text",
        "device": "cpu",
        "grace_seconds": 0.0,
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


@pytest.fixture
def server_factory(tmp_path: Path, model_root: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start in-process servers on free loopback ports; each is stopped at teardown."""
    started: list[RunningServer] = []

    def start(**overrides: object) -> RunningServer:
        running = serve(_test_settings(tmp_path, model_root, overrides))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop(0)


@pytest.fixture
def server(request: pytest.FixtureRequest, server_factory: Callable[..., RunningServer], split_factory: Callable[..., InProcessSplit]):
    """The single-process server; in modules marked `both_layouts`, also the front with its heavy-work server."""
    if getattr(request, "param", "one-process") == "front":
        return split_factory()
    return server_factory()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("both_layouts") and "server" in metafunc.fixturenames:
        metafunc.parametrize("server", ["one-process", "front"], indirect=True)


class InProcessSplit:
    """The two-process layout in one process: a front (front.py) on its own event-loop thread,
    forwarding to an in-process server on a Unix socket. Real gRPC on both hops."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.heavy = HeavyProcess(settings)
        self.backend = serve(settings, bind=f"unix:{self.heavy.socket}")
        self.heavy.adopt()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="front-loop", daemon=True)
        self.thread.start()
        self.front = asyncio.run_coroutine_threadsafe(start_front(settings, self.heavy), self.loop).result(60)
        self.address = self.front.address

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.front.stop(0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()
        self.backend.stop(0)
        self.heavy.stop(0)


@pytest.fixture
def split_factory(tmp_path: Path, model_root: Path) -> Iterator[Callable[..., InProcessSplit]]:
    """Start in-process fronts with their heavy-work servers (the production layout); stopped at teardown."""
    started: list[InProcessSplit] = []

    def start(**overrides: object) -> InProcessSplit:
        running = InProcessSplit(_test_settings(tmp_path, model_root, overrides))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def client(server: RunningServer) -> Iterator[KinshipClient]:
    with KinshipClient(server.address, timeout=120) as c:
        yield c


@pytest.fixture
def family(model_root: Path) -> dict[str, object]:
    """A float32 base and three fine-tunes (task-vector correlation about 0.5), single-file checkpoints."""
    base = make_base(SMALL, seed=0)
    models = make_family(base, 3, rho=0.5, seed=1)
    paths = {"base": save_checkpoint(base, model_root / "base", config=SMALL.config(torch.float32))}
    for i, model in enumerate(models):
        paths[f"m{i}"] = save_checkpoint(model, model_root / f"m{i}", config=SMALL.config(torch.float32))
    return {"base": base, "models": models, "paths": paths, "shape": SMALL}
