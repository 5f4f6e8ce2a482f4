"""Faults (issue 7): SIGKILL mid-work then restart, disk full, checkpoints changing under a reader.

Every test but the last runs a real `python -m kinship_service` process (a crash must not take
pytest with it) over real files; the last changes a checkpoint at a fixed point of a request, so it
serves in-process (conftest's real gRPC server on loopback). What the tests check, after each fault:

- the cache never serves a corrupt entry: every value in the cache directory either verifies
  or is dropped on read, and every kinship answer equals an independent float64 NumPy
  reference computed here from the files;
- job states are truthful (a job that was queued or running when the server died is FAILED
  with reason SERVER_RESTARTED, never RUNNING, never lost) and no output looks finished;
- a full disk gives FAILED jobs and errors with reasons, and the server recovers when space
  returns (a real small tmpfs the test mounts; skipped where mounting is not permitted, the
  RLIMIT_FSIZE variant in test_merge_jobs.py covers that case);
- a checkpoint truncated or rewritten while a request reads it gives FAILED_PRECONDITION
  naming the file, and the server lives on.

Already covered elsewhere, not repeated here: SIGKILL of a running merge and restart
(test_merge_jobs.py), corrupted and truncated cache files (test_cache.py), RLIMIT_FSIZE write
failures of merges (test_merge_jobs.py).
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
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors import safe_open

from kinship_client import KinshipClient, KinshipRpcError
from kinship_service.cache.store import CacheStore
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint

from .free_ports import free_port
from .server_process import launch

# About 20M parameters (80 MB per float32 checkpoint): registration writes five delta chunks
# of 16 MB, and a pass takes long enough to be interrupted.
MID = LlamaShape(vocab_size=4096, hidden_size=768, intermediate_size=2048, num_layers=2, num_heads=8, num_kv_heads=4)
TINY = LlamaShape(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


# -- an independent reference -------------------------------------------------------------
def _load(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name).to(torch.float64).numpy().ravel()
    return out


def reference_pcc(base_dir: Path, model_dirs: list[Path]) -> dict[tuple[int, int], tuple[float, float]]:
    """PCC and cosine of every pair of task vectors, float64 NumPy over the files."""
    base = _load(base_dir)
    models = [_load(d) for d in model_dirs]
    names = sorted(n for n in base if all(n in m and m[n].shape == base[n].shape for m in models))
    vectors = [np.concatenate([m[n] - base[n] for n in names]) for m in models]
    out = {}
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            a, b = vectors[i], vectors[j]
            ac, bc = a - a.mean(), b - b.mean()
            out[(i, j)] = (
                float(ac @ bc / np.sqrt((ac @ ac) * (bc @ bc))),
                float(a @ b / np.sqrt((a @ a) * (b @ b))),
            )
    return out


def assert_matches(result, expected: dict[tuple[int, int], tuple[float, float]], tol: float) -> None:
    assert len(result.pairs) == len(expected)
    for pair in result.pairs:
        pcc, cos = expected[(pair.first, pair.second)]
        assert pair.values.pcc == pytest.approx(pcc, abs=tol, rel=tol)
        assert pair.values.cosine == pytest.approx(cos, abs=tol, rel=tol)


def assert_cache_verifies(cache_dir: Path) -> int:
    """Read every entry through the integrity check; returns how many were dropped as damaged.

    A SIGKILL may leave orphan value files or incomplete sets of delta chunks (never served:
    the manifest and fingerprint are written last), but no entry that reads back wrong.
    """
    store = CacheStore(cache_dir, 2**40)
    try:
        keys = list(store._cache.iterkeys())
        dropped = sum(1 for key in keys if store.get(key) is None)
    finally:
        store.close()
    return dropped


# -- a server process -------------------------------------------------------------------------
class ServerProcess:
    """`python -m kinship_service` on loopback; the port is read from its first line."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.metrics_port = free_port()
        full_env = dict(
            os.environ,
            **env,
            KINSHIP_HOST="127.0.0.1",
            KINSHIP_PORT="0",
            KINSHIP_METRICS_PORT=str(self.metrics_port),
            KINSHIP_LOG_FORMAT="text",
            KINSHIP_DEVICE="cpu",
            KINSHIP_GRACE_SECONDS="0",
        )
        self.log = log
        self.proc, self.address = launch(full_env, log)

    def metric(self, name: str, labels: str = "") -> float:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        match = re.search(rf"^{re.escape(name)}(?:\{{{re.escape(labels)}\}})? (\S+)$", body, re.M) if labels else re.search(
            rf"^{re.escape(name)} (\S+)$", body, re.M
        )
        return float(match.group(1)) if match else 0.0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture(scope="module")
def mid_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and three fine-tunes of about 20M parameters (float32), written once per module."""
    root = tmp_path_factory.mktemp("mid-models")
    base = make_base(MID, seed=11)
    paths = {"root": root, "base": save_checkpoint(base, root / "base", config=MID.config(torch.float32))}
    for i, model in enumerate(make_family(base, 3, rho=0.5, seed=12)):
        paths[f"m{i}"] = save_checkpoint(model, root / f"m{i}", config=MID.config(torch.float32))
    return paths


def env_for(tmp_path: Path, *roots: Path, **extra: str) -> dict[str, str]:
    env = {
        "KINSHIP_ALLOWED_ROOTS": os.pathsep.join(str(r) for r in roots),
        "KINSHIP_CACHE_DIR": str(tmp_path / "cache"),
        "KINSHIP_OUTPUT_ROOT": str(tmp_path / "merges"),
    }
    env.update(extra)
    return env


def wait_until(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"{what} not reached within {timeout} s")


def value_files(cache_dir: Path) -> list[Path]:
    return list(cache_dir.rglob("*.val"))


# -- SIGKILL -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_during_registration_then_restart_serves_nothing_corrupt(tmp_path: Path, mid_family: dict[str, Path]) -> None:
    base, model = mid_family["base"], mid_family["m0"]
    env = env_for(tmp_path, mid_family["root"])
    first = ServerProcess(env, tmp_path / "server1.log")
    outcome: list[object] = []

    def register() -> None:
        try:
            with KinshipClient(first.address, timeout=300) as client:
                outcome.append(client.register_checkpoint(str(model), str(base)))
        except KinshipRpcError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=register)
    thread.start()
    try:
        # some delta chunks are on disk: the registration is part-way through its writes
        wait_until(lambda: len(value_files(tmp_path / "cache")) >= 2 or bool(outcome), what="delta chunks written")
    finally:
        first.kill()
        thread.join(60)
    assert not outcome or isinstance(outcome[0], KinshipRpcError), "the registration was still running when killed"
    assert assert_cache_verifies(tmp_path / "cache") == 0

    expected = reference_pcc(base, [model, mid_family["m1"]])
    second = ServerProcess(env, tmp_path / "server2.log")
    try:
        with KinshipClient(second.address, timeout=300) as client:
            # the fingerprint is written last: a killed registration left none to serve
            with pytest.raises(KinshipRpcError) as info:
                client.kinship(str(base), [str(model), str(mid_family["m1"])], mode="fingerprint")
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            again = client.register_checkpoint(str(model), str(base))
            assert not again.already_registered
            client.register_checkpoint(str(mid_family["m1"]), str(base))
            # exact from the stored deltas (the base is not read): the same float64 numbers
            from_deltas = client.kinship(str(base), [str(model), str(mid_family["m1"])], mode="exact")
            assert from_deltas.mode == "exact"
            assert_matches(from_deltas, expected, 1e-9)
            assert_matches(client.kinship(str(base), [str(model), str(mid_family["m1"])], mode="fingerprint"), expected, 0.01)
    finally:
        second.stop()
    assert assert_cache_verifies(tmp_path / "cache") == 0


@pytest.mark.slow
def test_sigkill_at_many_points_of_cache_writing_work(tmp_path: Path, mid_family: dict[str, Path]) -> None:
    """Kill the server at spread-out moments of a workload that writes the cache (registrations,
    cold exact passes storing fingerprints and pair results), restart, and check every answer."""
    base = mid_family["base"]
    models = [mid_family[f"m{i}"] for i in range(3)]
    expected = reference_pcc(base, models)
    env = env_for(tmp_path, mid_family["root"])

    def workload(address: str, errors: list[BaseException]) -> None:
        try:
            with KinshipClient(address, timeout=300) as client:
                client.kinship(str(base), [str(m) for m in models], mode="exact")
                for m in models:
                    client.register_checkpoint(str(m), str(base))
        except Exception as exc:  # noqa: BLE001 - a killed server surfaces as UNAVAILABLE
            errors.append(exc)

    # one undisturbed run on a scratch cache tells how long the workload takes here
    scratch = ServerProcess(env_for(tmp_path / "scratch", mid_family["root"]), tmp_path / "scratch.log")
    started = time.monotonic()
    errors: list[BaseException] = []
    workload(scratch.address, errors)
    full = time.monotonic() - started
    scratch.stop()
    assert not errors, errors

    for round_, fraction in enumerate((0.15, 0.4, 0.65, 0.9)):
        server = ServerProcess(env, tmp_path / f"round{round_}.log")
        errors = []
        thread = threading.Thread(target=workload, args=(server.address, errors))
        thread.start()
        thread.join(full * fraction)
        server.kill()
        thread.join(60)
        assert assert_cache_verifies(tmp_path / "cache") == 0
        check = ServerProcess(env, tmp_path / f"check{round_}.log")
        try:
            with KinshipClient(check.address, timeout=300) as client:
                for mode in ("auto", "exact"):
                    assert_matches(client.kinship(str(base), [str(m) for m in models], mode=mode), expected, 1e-9 if mode == "exact" else 0.01)
                try:
                    assert_matches(client.kinship(str(base), [str(m) for m in models], mode="fingerprint"), expected, 0.01)
                except KinshipRpcError as exc:  # fingerprints not written before the kill
                    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            check.stop()
    assert assert_cache_verifies(tmp_path / "cache") == 0


@pytest.mark.slow
def test_sigkill_with_a_queued_and_a_running_merge_reports_both_failed(tmp_path: Path, mid_family: dict[str, Path]) -> None:
    env = env_for(tmp_path, mid_family["root"], KINSHIP_MAX_MERGE_JOBS="1")
    output_root = tmp_path / "merges"
    first = ServerProcess(env, tmp_path / "server1.log")
    try:
        with KinshipClient(first.address, timeout=60) as client:
            running = client.start_merge(str(mid_family["m0"]), str(mid_family["m1"]), t=0.5, output_path="k/run")
            queued = client.start_merge(str(mid_family["m1"]), str(mid_family["m2"]), t=0.5, output_path="k/queued")
            wait_until(lambda: client.get_merge_job(running.job_id).bytes_done > 0, what="merge running")
            before = {job_id: client.get_merge_job(job_id).state for job_id in (running.job_id, queued.job_id)}
            first.kill()
    finally:
        first.kill()
    assert before[queued.job_id] in ("queued", "running"), before  # one worker: the second waits behind the first
    for job_id, name in ((running.job_id, "run"), (queued.job_id, "queued")):
        if before[job_id] != "succeeded":
            assert not (output_root / "k" / name).exists(), "a killed job leaves nothing that looks finished"
    second = ServerProcess(env, tmp_path / "server2.log")
    try:
        with KinshipClient(second.address, timeout=60) as client:
            for job_id, name in ((running.job_id, "run"), (queued.job_id, "queued")):
                job = client.get_merge_job(job_id)
                watched = [w.state for w in client.watch_merge_job(job_id, timeout=30)]
                assert watched == [job.state], "watching a finished job ends at once with its final state"
                if before[job_id] == "succeeded":  # finished before the kill: stays finished
                    assert job.state == "succeeded" and (output_root / "k" / name / "model.safetensors").is_file()
                    continue
                assert job.state == "failed" and job.error is not None, job
                assert job.error.code == "ABORTED" and job.error.reason == "SERVER_RESTARTED", job.error
                assert not (output_root / "k" / name).exists()
            leftovers = sorted(p.name for p in (output_root / "k").iterdir()) if (output_root / "k").exists() else []
            assert all(not n.startswith(".kinship-tmp-") for n in leftovers), leftovers  # temporary directories removed
            with pytest.raises(KinshipRpcError) as info:
                client.cancel_merge_job("0" * 32)
            assert info.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        second.stop()


# -- disk full ---------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[tuple[Path, callable]]:
    """A real tmpfs of 4 MiB the test can grow later (`grow(size)`); skipped where mounting is not allowed."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}); test_merge_jobs.py covers write failures with RLIMIT_FSIZE")

    def grow(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    try:
        yield mount, grow
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_disk_full_merge_fails_with_reason_and_recovers_when_space_returns(tmp_path: Path, small_fs, model_root: Path) -> None:
    mount, grow = small_fs
    shape = LlamaShape(vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=2)
    base = make_base(shape, seed=3)  # about 3.2M parameters: 13 MB per float32 output
    a, b = make_family(base, 2, rho=0.5, seed=4)
    pa = save_checkpoint(a, model_root / "a", config=shape.config(torch.float32))
    pb = save_checkpoint(b, model_root / "b", config=shape.config(torch.float32))
    env = env_for(tmp_path, model_root, KINSHIP_OUTPUT_ROOT=str(mount / "out"))
    server = ServerProcess(env, tmp_path / "server.log")
    try:
        with KinshipClient(server.address, timeout=60) as client:
            for shard in (0, 2 * 10**6):  # one big shard, then several small ones: both hit ENOSPC
                info = client.merge(str(pa), str(pb), t=0.5, output_path=f"full-{shard}", max_shard_bytes=shard).wait(timeout=120)
                assert info.state == "failed" and info.error is not None, info
                assert info.error.code == "RESOURCE_EXHAUSTED" and info.error.reason == "DISK_FULL", info.error
                assert "disk is full" in info.error.message and "no output was left behind" in info.error.message
                assert sorted(p.name for p in (mount / "out").iterdir()) == [], "no partial output stays behind"
            assert client.get_merge_job(info.job_id).state == "failed"
            grow("64m")
            ok = client.merge(str(pa), str(pb), t=0.5, output_path="after").wait(timeout=120)
            assert ok.state == "succeeded", ok.error
            assert (mount / "out" / "after" / "model.safetensors").is_file()
    finally:
        server.stop()
    assert not server.alive()


@pytest.mark.slow
def test_disk_full_cache_gives_reasons_answers_still_stand_and_recovers(tmp_path: Path, small_fs, model_root: Path) -> None:
    mount, grow = small_fs
    shape = LlamaShape(vocab_size=1024, hidden_size=256, intermediate_size=704, num_layers=2, num_heads=4, num_kv_heads=2)
    base = make_base(shape, seed=5)  # about 2.1M parameters: an 8 MB delta does not fit in 4 MiB
    paths = [save_checkpoint(base, model_root / "base")]
    for i, model in enumerate(make_family(base, 2, rho=0.5, seed=6)):
        paths.append(save_checkpoint(model, model_root / f"m{i}"))
    expected = reference_pcc(paths[0], paths[1:])
    env = env_for(tmp_path, model_root, KINSHIP_CACHE_DIR=str(mount / "cache"))
    server = ServerProcess(env, tmp_path / "server.log")
    try:
        with KinshipClient(server.address, timeout=120) as client:
            with pytest.raises(KinshipRpcError) as info:
                client.register_checkpoint(str(paths[1]), str(paths[0]))
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.reason == "CACHE_WRITE_FAILED", info.value
            assert "free disk space" in info.value.message
            # exact answers do not depend on the cache: the answer stands, only the warming failed
            assert_matches(client.kinship(str(paths[0]), [str(p) for p in paths[1:]], mode="exact"), expected, 1e-9)
            with pytest.raises(KinshipRpcError) as missing:
                client.kinship(str(paths[0]), [str(p) for p in paths[1:]], mode="fingerprint")
            assert missing.value.code == grpc.StatusCode.FAILED_PRECONDITION
            grow("256m")
            for p in paths[1:]:
                client.register_checkpoint(str(p), str(paths[0]))
            assert_matches(client.kinship(str(paths[0]), [str(p) for p in paths[1:]], mode="fingerprint"), expected, 0.01)
            assert_matches(client.kinship(str(paths[0]), [str(p) for p in paths[1:]], mode="exact"), expected, 1e-9)
    finally:
        server.stop()
    assert assert_cache_verifies(mount / "cache") == 0


# -- checkpoints changing under a reader -------------------------------------------------------
# The change is made from a Python audit hook, in the server's own thread, at the moment the request
# opens the checkpoint's file to read its header: after the file's state (stat) was taken for the
# checkpoint's identity, before any tensor is read. Nothing is mocked and nothing races: every run
# sees the change at the same point of the request, however busy the machine. (The earlier version
# changed the file from the test thread while a pass ran in a server process; on a busy machine the
# change could land before the identity was taken, and the rewritten file then gave a correct result
# on the new bytes.)
_CHANGE_ON_OPEN: dict[str, Callable[[], None]] = {}
_hook_installed = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and _CHANGE_ON_OPEN and args and isinstance(args[0], (str, os.PathLike)):
        action = _CHANGE_ON_OPEN.pop(os.fspath(args[0]), None)  # pop: fires once, even if the action opens the file
        if action is not None:
            action()


def change_on_first_open(path: Path, action: Callable[[], None]) -> None:
    """Run `action` in whichever thread next opens `path` with Python's open(), before that open proceeds."""
    global _hook_installed
    if not _hook_installed:  # audit hooks cannot be removed: one, idle unless armed, for the session
        sys.addaudithook(_audit)
        _hook_installed = True
    _CHANGE_ON_OPEN[str(path)] = action


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_checkpoint_changed_while_read_gives_a_clear_error(server_factory, family, model_root: Path, change: str) -> None:
    paths = family["paths"]
    base, models = Path(paths["base"]), [Path(paths[f"m{i}"]) for i in range(3)]
    target = models[2] / "model.safetensors"
    size = target.stat().st_size
    replacement = (models[0] / "model.safetensors").read_bytes()
    assert len(replacement) == size

    def change_it() -> None:
        with open(target, "r+b") as handle:
            if change == "truncate":
                handle.truncate(size // 3)
            else:  # rewritten in place with another fine-tune's weights: same size and header, other values
                handle.write(replacement)

    running = server_factory()
    change_on_first_open(target, change_it)
    try:
        with KinshipClient(running.address, timeout=300) as client:
            with pytest.raises(KinshipRpcError) as info:
                client.kinship(str(base), [str(m) for m in models], mode="exact")
            assert not _CHANGE_ON_OPEN, "the request never opened the file with open(): move the trigger to where it reads"
            error = info.value
            assert error.code == grpc.StatusCode.FAILED_PRECONDITION, error
            assert error.reason == "CHECKPOINT_CHANGED", error
            assert "m2" in error.message, error.message
            # alive and well: the untouched checkpoints answer, as the reference says
            result = client.kinship(str(base), [str(models[0]), str(models[1])], mode="exact")
            assert_matches(result, reference_pcc(base, models[:2]), 1e-9)
    finally:
        _CHANGE_ON_OPEN.clear()
