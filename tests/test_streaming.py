"""Chunk reads by offset (`checkpoints/streaming.py`): what is read equals the file, a file truncated under a read is CHECKPOINT_CHANGED.

Kinship chunks are read with `os.preadv` at the validated header's offsets, not through memory
maps: a file that shrinks under a live read must give FAILED_PRECONDITION CHECKPOINT_CHANGED
(a memory map would kill the process with SIGBUS). The truncation is made at a fixed point of the
read (after the headers were validated, or between two chunks of a pass), never by racing a thread.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kinship_client import KinshipClient, KinshipRpcError
from kinship_service.checkpoints.safetensors_header import read_checkpoint_headers
from kinship_service.checkpoints.sources import LocalPath, resolve
from kinship_service.checkpoints.streaming import CheckpointReader, ReadStats
from kinship_service.errors import FailedPrecondition
from kinship_service.kinship.exact import exact_kinship


def _checkpoint(root: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    directory = root / name
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunks_equal_the_stored_tensors(model_root: Path, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(37, 11, generator=generator).to(dtype),
        "b": torch.randn(5, generator=generator).to(dtype),
        "c": torch.randn((), generator=generator).to(dtype),
        "d": torch.randn(300, 2000, generator=generator).to(dtype),  # large enough for parallel pieces
    }
    directory = _checkpoint(model_root, "m", tensors)
    stats = ReadStats()
    reader = CheckpointReader(resolve(LocalPath(str(directory)), [model_root]), stats)
    stored = load_file(str(directory / "model.safetensors"))
    for name, expected in stored.items():
        for budget in (1, 64, 10**7):
            parts = [chunk.clone() for chunk in reader.read_chunks(name, max_elements=budget)]
            got = torch.cat([p.reshape(-1) for p in parts])
            assert torch.equal(got.view(torch.uint8), expected.reshape(-1).view(torch.uint8)), (name, budget)
    # a leading slice of both dimensions: the stored rows' corner, row by row
    parts = [chunk.clone() for chunk in reader.read_chunks("a", max_elements=14, shape=(20, 7))]
    assert all(p.shape[1:] == (7,) for p in parts)
    assert torch.equal(torch.cat(parts).view(torch.uint8), stored["a"][:20, :7].contiguous().view(torch.uint8))
    assert stats.total_bytes > 0


def _truncated_family(model_root: Path) -> tuple[list[Path], Path]:
    generator = torch.Generator().manual_seed(5)
    base = {f"w{i}": torch.randn(64, 64, generator=generator) for i in range(4)}
    dirs = [_checkpoint(model_root, "base", base)]
    for m in range(3):
        dirs.append(_checkpoint(model_root, f"m{m}", {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in base.items()}))
    return dirs, dirs[3] / "model.safetensors"


def _expect_changed(excinfo: pytest.ExceptionInfo[FailedPrecondition]) -> None:
    assert excinfo.value.reason == "CHECKPOINT_CHANGED", excinfo.value
    assert "model.safetensors of" in str(excinfo.value) and "m2" in str(excinfo.value)


def test_truncated_after_the_header_was_validated(model_root: Path) -> None:
    dirs, target = _truncated_family(model_root)
    checkpoint = resolve(LocalPath(str(dirs[3])), [model_root])
    reader = CheckpointReader(checkpoint, tensors=read_checkpoint_headers(checkpoint).tensors)  # validated, whole
    os.truncate(target, target.stat().st_size - 100)  # the last tensor now ends early
    assert next(reader.read_chunks("w0", max_elements=64)).shape == (1, 64)  # earlier tensors still read
    with pytest.raises(FailedPrecondition) as excinfo:
        list(reader.read_chunks("w3", max_elements=64))
    _expect_changed(excinfo)


def test_truncated_between_two_chunks_of_a_pass(model_root: Path) -> None:
    dirs, target = _truncated_family(model_root)
    checkpoints = [resolve(LocalPath(str(d)), [model_root]) for d in dirs]
    calls = 0

    def truncate_on_third_check() -> None:  # called between chunks: a chunk of the next tensor is yet to be read
        nonlocal calls
        calls += 1
        if calls == 3:
            os.truncate(target, 4096)

    with pytest.raises(FailedPrecondition) as excinfo:
        exact_kinship(checkpoints[0], checkpoints[1:], chunk_bytes=4 * 64 * 4 * 16, check_cancelled=truncate_on_third_check)
    _expect_changed(excinfo)
    assert calls >= 3


# -- through the server: the file shrinks after its header was read, when the pass opens it to read chunks
_TRUNCATE_ON_CHUNK_OPEN: dict[str, Callable[[], None]] = {}
_hook_installed = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    # os.open (the chunk reader) raises "open" with mode None; open() (the header reader) with a mode string.
    if event == "open" and _TRUNCATE_ON_CHUNK_OPEN and len(args) >= 2 and args[1] is None and isinstance(args[0], (str, os.PathLike)):
        action = _TRUNCATE_ON_CHUNK_OPEN.pop(os.fspath(args[0]), None)
        if action is not None:
            action()


def test_server_answers_checkpoint_changed_not_a_dead_process(server_factory, model_root: Path) -> None:
    global _hook_installed
    dirs, target = _truncated_family(model_root)
    if not _hook_installed:  # audit hooks cannot be removed: one, idle unless armed
        sys.addaudithook(_audit)
        _hook_installed = True
    running = server_factory()
    _TRUNCATE_ON_CHUNK_OPEN[str(target)] = lambda: os.truncate(target, 4096)
    try:
        with KinshipClient(running.address, timeout=120) as client:
            with pytest.raises(KinshipRpcError) as info:
                client.kinship(str(dirs[0]), [str(d) for d in dirs[1:]], mode="exact")
            assert not _TRUNCATE_ON_CHUNK_OPEN, "the pass never opened the file with os.open"
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, info.value
            assert info.value.reason == "CHECKPOINT_CHANGED", info.value
            # alive: the untouched checkpoints answer, as an independent float64 reference says
            result = client.kinship(str(dirs[0]), [str(dirs[1]), str(dirs[2])], mode="exact")
            flat = [np.concatenate([load_file(str(d / "model.safetensors"))[f"w{i}"].double().numpy().ravel() for i in range(4)]) for d in dirs[:3]]
            a, b = flat[1] - flat[0], flat[2] - flat[0]
            expected = float(np.corrcoef(a, b)[0, 1])
            assert result.pairs[0].values.pcc == pytest.approx(expected, rel=1e-9)
    finally:
        _TRUNCATE_ON_CHUNK_OPEN.clear()
