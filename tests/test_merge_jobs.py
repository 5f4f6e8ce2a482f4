"""SLERP merge jobs over gRPC: start, get, list, watch, cancel; the output layout; idempotency;
overwrite and path rules; cancellation, SIGKILL of a real server process, and disk errors.

Merges that must be interrupted use a ~63M-parameter float32 pair (250 MB per model, generated
once per module) on a server with small work chunks (`chunk_bytes`, so the merge works in 4096-
element ranges), which keeps the merge running for seconds while the test acts on it.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors import safe_open

from kinship_client import KinshipClient, KinshipRpcError
from kinship_client.merge import MergeJobInfo
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint
from kinship_service.server.main import RunningServer

from .server_process import launch

SMALL = LlamaShape(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2)
# About 63M parameters: 250 MB per float32 checkpoint; merging it takes seconds here.
BIG = LlamaShape(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=8, num_kv_heads=4)
# About 3.2M parameters (13 MB in float32), for the file-size-limit test.
SMALL_CHUNKS = 256 * 1024  # KINSHIP_CHUNK_BYTES for merges that must still be running when interrupted
MEDIUM = LlamaShape(vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=2)


@pytest.fixture
def pair(model_root: Path) -> dict[str, object]:
    """Two small float32 fine-tunes of one base, with config, tokenizer and generation files."""
    base = make_base(SMALL, seed=0)
    a, b = make_family(base, 2, rho=0.3, seed=5)
    pa = save_checkpoint(a, model_root / "a", config=SMALL.config(torch.float32))
    pb = save_checkpoint(b, model_root / "b", shards=2, config=SMALL.config(torch.float32))
    (pa / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (pa / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    return {"a": a, "b": b, "pa": pa, "pb": pb}


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(root, A, B): a pair whose merge takes long enough to interrupt."""
    root = tmp_path_factory.mktemp("big-models")
    base = make_base(BIG, seed=0)
    pa = save_checkpoint(base, root / "a", config=BIG.config(torch.float32))
    g = torch.Generator().manual_seed(1)
    for name in base:
        base[name] = base[name] + 0.01 * torch.randn(base[name].shape, generator=g)
    pb = save_checkpoint(base, root / "b", config=BIG.config(torch.float32))
    del base
    return root, pa, pb


def _wait_running(client: KinshipClient, job_id: str, min_bytes: int = 0, timeout: float = 60) -> MergeJobInfo:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.get_merge_job(job_id)
        if info.state == "running" and info.bytes_done >= min_bytes:
            return info
        assert info.state in ("queued", "running"), info
        time.sleep(0.005)
    raise AssertionError(f"job {job_id} did not start running")


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --------------------------------------------------------------------------------------------
# Happy paths and layout
# --------------------------------------------------------------------------------------------


def test_merge_sharded_output_layout(client: KinshipClient, server: RunningServer, pair: dict) -> None:
    op = client.merge(str(pair["pa"]), str(pair["pb"]), t=[0.0, 1.0], output_path="runs/ab", dtype="bfloat16", max_shard_bytes=30_000)
    assert op.info.state in ("queued", "running") and op.job_id
    updates: list[MergeJobInfo] = []
    info = op.wait(timeout=60, on_progress=updates.append)
    assert info.state == "succeeded", info.error
    assert info.error is None and updates[-1].state == "succeeded"
    assert info.tensors_done == info.tensors_total == len(pair["a"])
    assert info.bytes_done == info.bytes_total > 0
    done = [u.bytes_done for u in updates]
    assert done == sorted(done)  # progress never goes backwards

    out = Path(info.output_path)
    assert out == server.settings.output_root / "runs" / "ab"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    n = len(shards)
    assert n >= 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(pair["a"])
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                assert tensor.dtype == torch.bfloat16 and index["weight_map"][name] == shard
                total += tensor.numel() * 2
    assert index["metadata"]["total_size"] == total == info.bytes_total
    # gradient [0, 1]: embeddings take t = 0 (exactly A), lm_head t = 1 (exactly B), as in mergekit
    with safe_open(str(out / index["weight_map"]["model.embed_tokens.weight"]), framework="pt") as handle:
        torch.testing.assert_close(handle.get_tensor("model.embed_tokens.weight"), pair["a"]["model.embed_tokens.weight"].to(torch.bfloat16), rtol=0, atol=0)
    with safe_open(str(out / index["weight_map"]["lm_head.weight"]), framework="pt") as handle:
        torch.testing.assert_close(handle.get_tensor("lm_head.weight"), pair["b"]["lm_head.weight"].to(torch.bfloat16), rtol=0, atol=0)

    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((pair["pa"] / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert {k: v for k, v in config.items() if k != "torch_dtype"} == {k: v for k, v in source_config.items() if k != "torch_dtype"}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (pair["pa"] / name).read_bytes()
    card = (out / "README.md").read_text()
    from kinship_service import __version__

    assert str(pair["pa"]) in card and str(pair["pb"]) in card and __version__ in card and info.job_id in card
    assert "[0, 1]" in card and "merge_method: slerp" in card
    assert f"\nkinship_job: {info.job_id}\n---\n" in card  # the front matter names the job that wrote it
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".kinship-")]


def test_single_shard_and_dtype_default(client: KinshipClient, pair: dict) -> None:
    info = client.merge(str(pair["pa"]), str(pair["pb"]), t=0.5, output_path="single").wait(timeout=60)
    assert info.state == "succeeded", info.error
    out = Path(info.output_path)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == set(pair["a"])
        assert handle.get_tensor("model.norm.weight").dtype == torch.float32


def test_filtered_t_and_mergekit_yaml(client: KinshipClient, pair: dict, model_root: Path) -> None:
    filtered = client.merge(
        str(pair["pa"]), str(pair["pb"]), t=[{"filter": "mlp", "value": 1.0}, {"value": 0.0}], output_path="filtered"
    ).wait(timeout=60)
    assert filtered.state == "succeeded", filtered.error
    with safe_open(str(Path(filtered.output_path) / "model.safetensors"), framework="pt") as handle:
        name = "model.layers.1.mlp.up_proj.weight"
        torch.testing.assert_close(handle.get_tensor(name), pair["b"][name], rtol=0, atol=0)
        name = "model.layers.1.self_attn.q_proj.weight"
        torch.testing.assert_close(handle.get_tensor(name), pair["a"][name], rtol=0, atol=0)
    config = f"""
merge_method: slerp
base_model: a
slices:
  - sources:
      - model: a
        layer_range: [0, {SMALL.num_layers}]
      - model: b
        layer_range: [0, {SMALL.num_layers}]
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - value: 0.5
out_dtype: float16
"""
    info = client.merge(None, None, mergekit_yaml=config, output_path="from-yaml").wait(timeout=60)
    assert info.state == "succeeded", info.error
    assert info.raw.model_a.path == str(model_root / "a") and len(info.raw.t.entries) == 2
    with safe_open(str(Path(info.output_path) / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("model.norm.weight").dtype == torch.float16


def test_list_pagination_and_state_filter(client: KinshipClient, pair: dict) -> None:
    ids = []
    for i in range(5):
        info = client.merge(str(pair["pa"]), str(pair["pb"]), t=0.1 * i, output_path=f"list/{i}").wait(timeout=60)
        assert info.state == "succeeded"
        ids.append(info.job_id)
    seen, token, pages = [], "", 0
    while True:
        jobs, token = client.list_merge_jobs(page_size=2, page_token=token)
        pages += 1
        assert len(jobs) <= 2
        seen += [j.job_id for j in jobs]
        if not token:
            break
    assert seen == ids[::-1] and pages == 3  # newest first, every job once
    succeeded, _ = client.list_merge_jobs(state="succeeded")
    assert {j.job_id for j in succeeded} == set(ids)
    assert client.list_merge_jobs(state="failed") == ([], "")
    with pytest.raises(KinshipRpcError) as bad:
        client.list_merge_jobs(page_token="not-a-token")
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and bad.value.field == "page_token"


def test_watch_streams_until_final_state(client: KinshipClient, pair: dict) -> None:
    info = client.start_merge(str(pair["pa"]), str(pair["pb"]), t=0.3, output_path="watched")
    updates = list(client.watch_merge_job(info.job_id, timeout=60))
    assert updates[-1].state == "succeeded" and all(u.state != "succeeded" for u in updates[:-1])
    assert updates[-1].raw.HasField("end_time") and updates[-1].raw.HasField("start_time")
    # watching a finished job yields it once and ends
    assert [u.state for u in client.watch_merge_job(info.job_id)] == ["succeeded"]


def test_request_id_is_idempotent(client: KinshipClient, pair: dict) -> None:
    first = client.start_merge(str(pair["pa"]), str(pair["pb"]), t=0.5, output_path="idem", request_id="req-1")
    again = client.start_merge(str(pair["pa"]), str(pair["pb"]), t=0.5, output_path="idem", request_id="req-1")
    assert again.job_id == first.job_id and again.request_id == "req-1"
    client.merge(str(pair["pa"]), str(pair["pb"]), t=0.5, output_path="idem", request_id="req-1").wait(timeout=60)
    # after success the output exists, yet the same request id still answers with the same job
    assert client.start_merge(str(pair["pa"]), str(pair["pb"]), t=0.5, output_path="idem", request_id="req-1").job_id == first.job_id
    assert len(client.list_merge_jobs()[0]) == 1
    with pytest.raises(KinshipRpcError) as reused:
        client.start_merge(str(pair["pa"]), str(pair["pb"]), t=0.6, output_path="idem", request_id="req-1")
    assert reused.value.code == grpc.StatusCode.ALREADY_EXISTS and reused.value.reason == "REQUEST_ID_REUSED"


def test_existing_output_needs_overwrite(client: KinshipClient, server: RunningServer, pair: dict) -> None:
    target = server.settings.output_root / "exists"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old")
    with pytest.raises(KinshipRpcError) as exists:
        client.start_merge(str(pair["pa"]), str(pair["pb"]), t=0.5, output_path="exists")
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS and exists.value.field == "output_path"
    assert (target / "old.txt").read_text() == "old"
    info = client.merge(str(pair["pa"]), str(pair["pb"]), t=0.5, output_path="exists", overwrite=True).wait(timeout=60)
    assert info.state == "succeeded"
    assert not (target / "old.txt").exists() and (target / "model.safetensors").is_file()
    assert _leftovers(server.settings.output_root) == ["exists"]


@pytest.mark.parametrize("path", ["../escape", "/etc/kinship-merge", "a/../../escape", "link/inside"])
def test_output_path_escaping_root_is_permission_denied(client: KinshipClient, server: RunningServer, pair: dict, tmp_path: Path, path: str) -> None:
    root = server.settings.output_root
    root.mkdir(parents=True, exist_ok=True)
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    if not (root / "link").exists():
        (root / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KinshipRpcError) as denied:
        client.start_merge(str(pair["pa"]), str(pair["pb"]), t=0.5, output_path=path)
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED and denied.value.field == "output_path"
    assert not (tmp_path / "escape").exists() and not list((tmp_path / "elsewhere").iterdir())


def test_bad_requests_get_precise_statuses(client: KinshipClient, pair: dict, model_root: Path) -> None:
    cases: list[tuple[Callable[[], object], grpc.StatusCode, str]] = [
        (lambda: client.start_merge(str(pair["pa"]), str(pair["pb"]), t=1.5, output_path="x"), grpc.StatusCode.INVALID_ARGUMENT, "t.entries[0]"),
        (lambda: client.start_merge(str(pair["pa"]), str(pair["pb"]), t=float("nan"), output_path="x"), grpc.StatusCode.INVALID_ARGUMENT, "t.entries[0]"),
        (lambda: client.start_merge(str(pair["pa"]), str(pair["pb"]), t=0.5, output_path=""), grpc.StatusCode.INVALID_ARGUMENT, "output_path"),
        (lambda: client.start_merge(str(model_root / "nope"), str(pair["pb"]), t=0.5, output_path="x"), grpc.StatusCode.NOT_FOUND, "model_a"),
        (lambda: client.start_merge("/etc", str(pair["pb"]), t=0.5, output_path="x"), grpc.StatusCode.PERMISSION_DENIED, "model_a"),
        (lambda: client.start_merge(None, None, mergekit_yaml="merge_method: ties", output_path="x"), grpc.StatusCode.INVALID_ARGUMENT, "mergekit_yaml"),
        (lambda: client.get_merge_job("no-such-job"), grpc.StatusCode.NOT_FOUND, "job_id"),
        (lambda: client.cancel_merge_job("no-such-job"), grpc.StatusCode.NOT_FOUND, "job_id"),
        (lambda: list(client.watch_merge_job("no-such-job")), grpc.StatusCode.NOT_FOUND, "job_id"),
    ]
    for call, code, field in cases:
        with pytest.raises(KinshipRpcError) as err:
            call()
        assert err.value.code == code and err.value.field == field, err.value
    # the server still answers
    assert client.list_merge_jobs()[0] == []


def test_shape_mismatch_fails_job_unless_leading_slice(client: KinshipClient, pair: dict, model_root: Path) -> None:
    resized = dict(pair["b"])
    resized["model.embed_tokens.weight"] = torch.randn(SMALL.vocab_size + 8, SMALL.hidden_size)
    path = save_checkpoint(resized, model_root / "b-resized", config=SMALL.config(torch.float32))
    failed = client.merge(str(pair["pa"]), str(path), t=0.5, output_path="mismatch").wait(timeout=60)
    assert failed.state == "failed" and failed.error is not None
    assert failed.error.code == "FAILED_PRECONDITION" and failed.error.reason == "SHAPE_MISMATCH"
    assert "model.embed_tokens.weight" in failed.error.message
    sliced = client.merge(str(pair["pa"]), str(path), t=0.5, output_path="mismatch", shape_mismatch="leading_slice").wait(timeout=60)
    assert sliced.state == "succeeded", sliced.error
    with safe_open(str(Path(sliced.output_path) / "model.safetensors"), framework="pt") as handle:
        assert tuple(handle.get_tensor("model.embed_tokens.weight").shape) == (SMALL.vocab_size, SMALL.hidden_size)


def test_tensor_in_one_model_passes_through_and_integer_tensors_must_match(client: KinshipClient, pair: dict, model_root: Path) -> None:
    extra_a = dict(pair["a"], **{"model.extra.weight": torch.arange(6.0), "model.ids": torch.arange(4)})
    extra_b = dict(pair["b"], **{"model.ids": torch.arange(4)})
    pa = save_checkpoint(extra_a, model_root / "a-extra", config=SMALL.config(torch.float32))
    pb = save_checkpoint(extra_b, model_root / "b-extra", config=SMALL.config(torch.float32))
    info = client.merge(str(pa), str(pb), t=0.5, output_path="extra").wait(timeout=60)
    assert info.state == "succeeded", info.error
    with safe_open(str(Path(info.output_path) / "model.safetensors"), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("model.extra.weight"), torch.arange(6.0))
        assert torch.equal(handle.get_tensor("model.ids"), torch.arange(4))
    pb2 = save_checkpoint(dict(pair["b"], **{"model.ids": torch.arange(4) + 1}), model_root / "b-ids", config=SMALL.config(torch.float32))
    failed = client.merge(str(pa), str(pb2), t=0.5, output_path="ids").wait(timeout=60)
    assert failed.state == "failed" and failed.error.reason == "NON_FLOATING_MISMATCH" and "model.ids" in failed.error.message


# --------------------------------------------------------------------------------------------
# Interruptions
# --------------------------------------------------------------------------------------------


def test_cancel_mid_merge_leaves_no_output(server_factory: Callable[..., RunningServer], model_root: Path, big_pair: tuple[Path, Path, Path]) -> None:
    root, pa, pb = big_pair
    server = server_factory(allowed_roots=(model_root, root), chunk_bytes=SMALL_CHUNKS)
    with KinshipClient(server.address, timeout=60) as client:
        info = client.start_merge(str(pa), str(pb), t=0.5, output_path="cancelled/out")
        _wait_running(client, info.job_id)
        cancelled = client.cancel_merge_job(info.job_id)
        assert cancelled.state == "cancelled" and cancelled.error is None
        assert client.get_merge_job(info.job_id).state == "cancelled"
        assert _leftovers(server.settings.output_root / "cancelled") == []
        assert client.cancel_merge_job(info.job_id).state == "cancelled"  # idempotent on a finished job


def test_queue_limit_answers_resource_exhausted(server_factory: Callable[..., RunningServer], model_root: Path, big_pair: tuple[Path, Path, Path]) -> None:
    root, pa, pb = big_pair
    server = server_factory(allowed_roots=(model_root, root), max_merge_jobs=1, max_queued_merge_jobs=1, chunk_bytes=SMALL_CHUNKS)
    with KinshipClient(server.address, timeout=60) as client:
        running = client.start_merge(str(pa), str(pb), t=0.5, output_path="q/1")
        queued = client.start_merge(str(pa), str(pb), t=0.5, output_path="q/2")
        assert queued.state == "queued"
        with pytest.raises(KinshipRpcError) as full:
            client.start_merge(str(pa), str(pb), t=0.5, output_path="q/3")
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and full.value.retry_after is not None
        assert client.cancel_merge_job(queued.job_id).state == "cancelled"
        assert client.cancel_merge_job(running.job_id).state in ("cancelled", "succeeded")
        assert client.get_merge_job(queued.job_id).state == "cancelled"


class _ServerProcess:
    """`python -m kinship_service` with KINSHIP_* settings, its port read from its first line."""

    def __init__(self, env: dict[str, str], log: Path, fsize_limit: int | None = None) -> None:
        full_env = dict(os.environ, **env, KINSHIP_PORT="0", KINSHIP_METRICS_PORT="0", KINSHIP_HOST="127.0.0.1", KINSHIP_LOG_FORMAT="text")

        def limits() -> None:
            if fsize_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

        self.log = log
        self.proc, self.address = launch(full_env, log, preexec_fn=limits, timeout=60)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=60)


@pytest.fixture
def process_env(tmp_path: Path, model_root: Path, big_pair: tuple[Path, Path, Path]) -> Iterator[dict[str, str]]:
    env = {
        "KINSHIP_ALLOWED_ROOTS": os.pathsep.join([str(model_root), str(big_pair[0])]),
        "KINSHIP_CACHE_DIR": str(tmp_path / "cache"),
        "KINSHIP_OUTPUT_ROOT": str(tmp_path / "merges"),
        "KINSHIP_DEVICE": "cpu",
        "KINSHIP_GRACE_SECONDS": "0",
        "KINSHIP_CHUNK_BYTES": str(SMALL_CHUNKS),
    }
    yield env


def _kill_mid_merge(process_env: dict[str, str], tmp_path: Path, big_pair: tuple[Path, Path, Path], output_path: str) -> MergeJobInfo:
    """Start a merge of the big pair in a server process and SIGKILL it once the job has written bytes."""
    _, pa, pb = big_pair
    first = _ServerProcess(process_env, tmp_path / "server1.log")
    try:
        with KinshipClient(first.address, timeout=60) as client:
            info = client.start_merge(str(pa), str(pb), t=0.5, output_path=output_path)
            _wait_running(client, info.job_id, min_bytes=1)
            first.stop(signal.SIGKILL)
    finally:
        first.stop(signal.SIGKILL)
    return info


def test_sigkill_mid_merge_then_restart_reports_failed(process_env: dict[str, str], tmp_path: Path, big_pair: tuple[Path, Path, Path]) -> None:
    _, pa, pb = big_pair
    output_root = Path(process_env["KINSHIP_OUTPUT_ROOT"])
    info = _kill_mid_merge(process_env, tmp_path, big_pair, "killed/out")
    # nothing that looks finished: the target does not exist, only a hidden temporary directory may
    assert not (output_root / "killed" / "out").exists()
    assert all(name.startswith(".kinship-tmp-") for name in _leftovers(output_root / "killed"))

    second = _ServerProcess(process_env, tmp_path / "server2.log")
    try:
        with KinshipClient(second.address, timeout=60) as client:
            job = client.get_merge_job(info.job_id)
            assert job.state == "failed" and job.error is not None
            assert job.error.code == "ABORTED" and job.error.reason == "SERVER_RESTARTED"
            assert "start the merge again" in job.error.message
            assert [j.job_id for j in client.list_merge_jobs(state="failed")[0]] == [info.job_id]
            assert _leftovers(output_root / "killed") == []  # the temporary directory was removed
            # the restarted server merges normally into the same path
            again = client.merge(str(pa), str(pb), t=0.5, output_path="killed/out").wait(timeout=300)
            assert again.state == "succeeded", again.error
    finally:
        second.stop()


def test_killed_after_publishing_then_restart_reports_succeeded(
    process_env: dict[str, str], tmp_path: Path, big_pair: tuple[Path, Path, Path]
) -> None:
    """A server killed between publishing an output and recording SUCCEEDED: on restart the job is SUCCEEDED."""
    output_root = Path(process_env["KINSHIP_OUTPUT_ROOT"])
    info = _kill_mid_merge(process_env, tmp_path, big_pair, "published/out")
    # What the runner's final rename leaves; the card names the job that wrote it.
    out = output_root / "published" / "out"
    out.mkdir(parents=True)
    (out / "README.md").write_text(f"---\ntags: [merge]\nkinship_job: {info.job_id}\n---\n")
    second = _ServerProcess(process_env, tmp_path / "server2.log")
    try:
        with KinshipClient(second.address, timeout=60) as client:
            job = client.get_merge_job(info.job_id)
            assert job.state == "succeeded" and job.error is None, job
            assert sorted(p.name for p in out.iterdir()) == ["README.md"]  # adopted as it is, not run again
            assert all(not name.startswith(".kinship-tmp-") for name in _leftovers(output_root / "published"))
    finally:
        second.stop()


def test_disk_error_fails_job_with_reason(process_env: dict[str, str], tmp_path: Path, model_root: Path) -> None:
    """A real write failure: the server runs with a 6 MB file-size limit (RLIMIT_FSIZE) and the
    merge's single shard needs 13 MB, so write() fails with EFBIG (CPython ignores SIGXFSZ)."""
    base = make_base(MEDIUM, seed=3)
    a, b = make_family(base, 2, rho=0.5, seed=4)
    pa = save_checkpoint(a, model_root / "ma", config=MEDIUM.config(torch.float32))
    pb = save_checkpoint(b, model_root / "mb", config=MEDIUM.config(torch.float32))
    output_root = Path(process_env["KINSHIP_OUTPUT_ROOT"])
    server = _ServerProcess(process_env, tmp_path / "server.log", fsize_limit=6 * 10**6)
    try:
        with KinshipClient(server.address, timeout=60) as client:
            info = client.merge(str(pa), str(pb), t=0.5, output_path="too-big").wait(timeout=120)
            assert info.state == "failed" and info.error is not None
            assert info.error.code == "RESOURCE_EXHAUSTED" and info.error.reason == "FILE_TOO_LARGE"
            assert "no output was left behind" in info.error.message
            assert _leftovers(output_root) == []
            # smaller shards fit under the limit: the server carries on
            ok = client.merge(str(pa), str(pb), t=0.5, output_path="sharded", max_shard_bytes=4 * 10**6).wait(timeout=120)
            assert ok.state == "succeeded", ok.error
            assert len(list((output_root / "sharded").glob("model-*.safetensors"))) >= 4
    finally:
        server.stop()


def test_merged_values_match_reference_over_grpc(client: KinshipClient, pair: dict) -> None:
    """One float32 merge checked element by element against a float64 reference."""
    info = client.merge(str(pair["pa"]), str(pair["pb"]), t=0.7, output_path="values", dtype="float32").wait(timeout=60)
    with safe_open(str(Path(info.output_path) / "model.safetensors"), framework="pt") as handle:
        for name, a in pair["a"].items():
            a64, b64 = a.double().numpy().ravel(), pair["b"][name].double().numpy().ravel()
            dot = np.clip(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)), -1, 1)
            if abs(dot) > 0.9995:
                ref = 0.3 * a64 + 0.7 * b64
            else:
                theta = np.arccos(dot)
                ref = np.sin(0.3 * theta) / np.sin(theta) * a64 + np.sin(0.7 * theta) / np.sin(theta) * b64
            got = handle.get_tensor(name).double().numpy().ravel()
            assert np.all(np.abs(got - ref) <= 1e-5 * np.abs(ref) + 1e-6 * (np.abs(a64) + np.abs(b64))), name


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_parse_t_forms() -> None:
    from kinship_client.merge_cli import parse_t

    assert parse_t("0.5") == 0.5
    assert parse_t("0,0.5,1") == [0.0, 0.5, 1.0]
    assert parse_t("self_attn=0,1;mlp=1,0;0.5") == [
        {"filter": "self_attn", "value": [0.0, 1.0]},
        {"filter": "mlp", "value": [1.0, 0.0]},
        {"value": 0.5},
    ]
    assert parse_t('[{"filter": "mlp", "value": 0.2}, {"value": 0.4}]') == [{"filter": "mlp", "value": 0.2}, {"value": 0.4}]


def test_cli_merge_and_jobs(server: RunningServer, pair: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from kinship_client.cli import main

    target = ["--target", server.address]
    assert main([*target, "merge", str(pair["pa"]), str(pair["pb"]), "--t", "self_attn=0,1;0.5", "--out", "cli/ab", "--dtype", "bfloat16", "--json"]) == 0
    out, err = capsys.readouterr()
    job = json.loads(out)
    assert job["state"] == "succeeded" and job["error"] is None
    assert "started merge job" in err and "100.0%" in err  # the progress bar reached the end
    assert (Path(job["output_path"]) / "model.safetensors").is_file()

    assert main([*target, "jobs", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [j["job_id"] for j in listed["jobs"]] == [job["job_id"]]
    assert main([*target, "jobs", "get", job["job_id"]]) == 0
    assert "succeeded" in capsys.readouterr().out
    assert main([*target, "jobs", "watch", job["job_id"], "--quiet"]) == 0
    assert main([*target, "jobs", "cancel", job["job_id"]]) == 0  # already finished: reports its final state
    assert "succeeded" in capsys.readouterr().out
    # a failing job exits 1 with the reason; an existing output is refused up front
    assert main([*target, "merge", str(pair["pa"]), str(pair["pb"]), "--out", "cli/ab"]) == 1
    assert "ALREADY_EXISTS" in capsys.readouterr().err
    assert main([*target, "jobs", "get", "nope"]) == 1
