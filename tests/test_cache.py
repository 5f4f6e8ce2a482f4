"""The cache (issue 3): fingerprints, lossless deltas and pair results in a real diskcache directory.

Expected kinship values come from an independent float64 NumPy reference over the
files on disk, never from the service's own math.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kinship_client import KinshipClient, KinshipRpcError
from kinship_client.cli import main as cli_main
from kinship_service.cache.delta import bits, encode, from_bytes, reconstruct, to_parts
from kinship_service.cache.store import CacheStore
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint
from kinship_service.server import metrics
from kinship_service.server.main import RunningServer

from .server_process import launch

SMALL = LlamaShape(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
REPO = Path(__file__).resolve().parents[1]


# -- independent reference ------------------------------------------------------------------
def load(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():
            out[name] = handle.get_tensor(name)
    return out


def reference(base_dir: Path, model_dirs: list[Path]) -> dict[tuple[int, int], tuple[float, float, float]]:
    """PCC, cosine and Euclidean distance of every pair, in float64 NumPy."""
    base = load(base_dir)
    models = [load(d) for d in model_dirs]
    names = sorted(n for n in base if all(n in m and m[n].shape == base[n].shape for m in models))
    vectors = [
        np.concatenate([m[n].to(torch.float64).numpy().ravel() - base[n].to(torch.float64).numpy().ravel() for n in names])
        for m in models
    ]
    out = {}
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            a, b = vectors[i], vectors[j]
            ac, bc = a - a.mean(), b - b.mean()
            pcc = float(np.dot(ac, bc) / np.sqrt(np.dot(ac, ac) * np.dot(bc, bc)))
            cos = float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))
            out[(i, j)] = (pcc, cos, float(np.sqrt(np.sum((a - b) ** 2))))
    return out


def check_against(result, expected, tol: float) -> None:
    assert len(result.pairs) == len(expected)
    for pair in result.pairs:
        pcc, cos, ed = expected[(pair.first, pair.second)]
        assert pair.values.pcc == pytest.approx(pcc, abs=tol, rel=tol)
        assert pair.values.cosine == pytest.approx(cos, abs=tol, rel=tol)
        assert pair.values.euclidean == pytest.approx(ed, rel=max(tol, 1e-9))


def counter(metric, *labels: str) -> float:
    return (metric.labels(*labels) if labels else metric)._value.get()


@pytest.fixture
def paths(family: dict[str, object]) -> dict[str, Path]:
    return {k: Path(v) for k, v in family["paths"].items()}  # type: ignore[union-attr]


def models_of(paths: dict[str, Path]) -> list[str]:
    return [str(paths[f"m{i}"]) for i in range(3)]


def value_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.val"))


# -- cold, warm, fingerprint ------------------------------------------------------------------
def test_cold_request_fills_cache_and_warm_request_reads_nothing(server: RunningServer, client: KinshipClient, paths) -> None:
    expected = reference(paths["base"], [paths[f"m{i}"] for i in range(3)])
    cold = client.kinship(str(paths["base"]), models_of(paths), mode="exact", per_layer=True)
    assert cold.mode == "exact" and cold.bytes_read > 0
    check_against(cold, expected, 1e-9)
    identities = [m.identity for m in cold.raw.models]
    assert all(i.startswith("local-") for i in identities) and len(set(identities)) == 3

    cache = server.servicer.kinship_cache
    base_id = cache.identities.identify(cache._resolve(_spec(paths["base"]), "base")).identity
    assert all(cache.get_fingerprint(base_id, i) is not None for i in identities), "the exact pass stores fingerprints"
    assert len(cache.store) > 0

    warm = client.kinship(str(paths["base"]), models_of(paths), mode="exact", per_layer=True)
    assert warm.mode == "exact" and warm.bytes_read == 0
    check_against(warm, expected, 1e-9)
    assert [(p.first, p.second, p.values) for p in warm.pairs] == [(p.first, p.second, p.values) for p in cold.pairs]
    assert [(l.group, l.tensors, l.elements) for l in warm.layers] == [(l.group, l.tensors, l.elements) for l in cold.layers]
    assert [m.identity for m in warm.raw.models] == identities

    auto = client.kinship(str(paths["base"]), models_of(paths), mode="auto")
    assert auto.mode == "exact" and auto.bytes_read == 0  # pair results make exact free

    # A pair subset with the same tensor set is answered from the stored pairs too.
    sub = client.kinship(str(paths["base"]), models_of(paths)[1:], mode="exact")
    assert sub.bytes_read == 0 and sub.pairs[0].values == cold.pairs[2].values

    fp = client.kinship(str(paths["base"]), models_of(paths), mode="fingerprint")
    assert fp.mode == "fingerprint" and fp.bytes_read == 0
    check_against(fp, expected, 0.01)
    assert [m.identity for m in fp.raw.models] == identities
    assert fp.elements_compared == cold.elements_compared and fp.tensors_compared == cold.tensors_compared


def _spec(path: Path):
    from kinship_service.checkpoints.sources import LocalPath

    return LocalPath(str(path))


def test_fingerprint_mode_without_fingerprints_is_failed_precondition(client: KinshipClient, paths) -> None:
    with pytest.raises(KinshipRpcError) as info:
        client.kinship(str(paths["base"]), models_of(paths), mode="fingerprint")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.reason == "FINGERPRINT_MISSING"
    assert "RegisterCheckpoint" in info.value.message
    # The server lives on and AUTO falls back to an exact pass.
    auto = client.kinship(str(paths["base"]), models_of(paths), mode="auto")
    assert auto.mode == "exact" and auto.bytes_read > 0


def test_register_then_fingerprint_and_delta_answers(server: RunningServer, client: KinshipClient, paths) -> None:
    expected = reference(paths["base"], [paths[f"m{i}"] for i in range(3)])
    registrations = [client.register_checkpoint(m, str(paths["base"])) for m in models_of(paths)]
    for reg in registrations:
        assert not reg.already_registered
        assert reg.fingerprint_bytes == 4 * 2**18 and reg.delta_bytes > 0
        assert reg.elements == SMALL.num_parameters and reg.tensors == len(SMALL.tensor_shapes())
        assert set(reg.layer_norms) == {"embed", "layers.0", "layers.1", "head"}
    # The statistics are exact: compare with the reference's norms.
    base, m0 = load(paths["base"]), load(paths["m0"])
    delta = np.concatenate([(m0[n].double() - base[n].double()).numpy().ravel() for n in sorted(base)])
    assert registrations[0].delta_sum_squares == pytest.approx(float(np.dot(delta, delta)), rel=1e-12)
    assert registrations[0].delta_sum == pytest.approx(float(delta.sum()), rel=1e-9, abs=1e-12)
    again = client.register_checkpoint(models_of(paths)[0], str(paths["base"]))
    assert again.already_registered and again.identity == registrations[0].identity

    fp = client.kinship(str(paths["base"]), models_of(paths), mode="fingerprint")
    check_against(fp, expected, 0.01)
    auto = client.kinship(str(paths["base"]), models_of(paths), mode="auto")
    assert auto.mode == "exact" and auto.bytes_read == 0  # stored deltas: the weights are not read
    check_against(auto, expected, 1e-9)


# -- identity -------------------------------------------------------------------------------
def test_editing_a_checkpoint_in_place_invalidates(client: KinshipClient, paths, family) -> None:
    base_ref = str(paths["base"])
    first = client.kinship(base_ref, models_of(paths), mode="exact")
    client.register_checkpoint(models_of(paths)[0], base_ref)
    file = paths["m0"] / "model.safetensors"
    old = os.stat(file)
    # Rewrite m0 in place: same names, shapes and size, different weights; then put the mtime back.
    replacement = make_family(family["base"], 1, rho=0.0, seed=99)[0]
    tensors = {k: v.contiguous() for k, v in replacement.items()}
    save_file(tensors, str(file), metadata={"format": "pt"})
    os.utime(file, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert os.stat(file).st_size == old.st_size and os.stat(file).st_mtime_ns == old.st_mtime_ns

    with pytest.raises(KinshipRpcError) as info:
        client.kinship(base_ref, models_of(paths), mode="fingerprint")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION  # the stale fingerprint is never served
    fresh = client.kinship(base_ref, models_of(paths), mode="exact")
    assert fresh.bytes_read > 0
    assert fresh.raw.models[0].identity != first.raw.models[0].identity
    assert fresh.raw.models[1].identity == first.raw.models[1].identity
    check_against(fresh, reference(paths["base"], [paths[f"m{i}"] for i in range(3)]), 1e-9)
    reg = client.register_checkpoint(models_of(paths)[0], base_ref)
    assert not reg.already_registered


# -- integrity ------------------------------------------------------------------------------
def test_cache_store_drops_corrupt_and_truncated_entries(tmp_path: Path) -> None:
    store = CacheStore(tmp_path / "c", 64 * 2**20)
    payload = os.urandom(200_000)
    store.put("fp/a", payload)
    store.put("fp/b", [payload[:10], memoryview(payload)[10:]])
    store.put("pair/small", b"tiny value kept inline")
    assert bytes(store.get("fp/a")) == payload and bytes(store.get("fp/b")) == payload
    files = value_files(tmp_path / "c")
    assert len(files) == 2
    before = counter(metrics.CACHE_CORRUPT)
    with open(files[0], "r+b") as handle:  # flip one byte
        handle.seek(100_000)
        byte = handle.read(1)
        handle.seek(100_000)
        handle.write(bytes([byte[0] ^ 0x01]))
    with open(files[1], "r+b") as handle:  # truncate
        handle.truncate(150_000)
    assert store.get("fp/a") is None and store.get("fp/b") is None
    assert not store.contains("fp/a") and not store.contains("fp/b"), "damaged entries are dropped"
    assert counter(metrics.CACHE_CORRUPT) == before + 2
    assert bytes(store.get("pair/small")) == b"tiny value kept inline"
    store.close()
    reopened = CacheStore(tmp_path / "c", 64 * 2**20)  # survives a restart
    assert bytes(reopened.get("pair/small")) == b"tiny value kept inline"


def test_corrupted_cache_files_are_detected_and_recomputed(server_factory, tmp_path: Path, model_root: Path) -> None:
    # Tensors large enough that delta chunks are files too (small values live inside SQLite).
    shape = LlamaShape()
    base = make_base(shape, seed=0)
    paths = {"base": save_checkpoint(base, model_root / "base")}
    for i, model in enumerate(make_family(base, 3, rho=0.5, seed=1)):
        paths[f"m{i}"] = save_checkpoint(model, model_root / f"m{i}")
    expected = reference(paths["base"], [paths[f"m{i}"] for i in range(3)])
    first = server_factory()
    with KinshipClient(first.address, timeout=120) as client:
        for m in models_of(paths):
            client.register_checkpoint(m, str(paths["base"]))
    first.stop(0)
    files = value_files(tmp_path / "cache")
    assert len(files) >= 6  # three fingerprints and delta chunks
    for index, file in enumerate(files):
        with open(file, "r+b") as handle:
            if index % 2:
                handle.truncate(os.path.getsize(file) // 2)
            else:
                handle.seek(os.path.getsize(file) - 1)
                last = handle.read(1)
                handle.seek(os.path.getsize(file) - 1)
                handle.write(bytes([last[0] ^ 0xFF]))
    before = counter(metrics.CACHE_CORRUPT)
    second = server_factory()  # a restarted server over the damaged directory
    with KinshipClient(second.address, timeout=120) as client:
        with pytest.raises(KinshipRpcError) as info:
            client.kinship(str(paths["base"]), models_of(paths), mode="fingerprint")
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        result = client.kinship(str(paths["base"]), models_of(paths), mode="auto")
        assert result.mode == "exact" and result.bytes_read > 0, "damaged deltas and fingerprints are recomputed"
        check_against(result, expected, 1e-9)
        assert counter(metrics.CACHE_CORRUPT) >= before + 3
        again = client.kinship(str(paths["base"]), models_of(paths), mode="fingerprint")
        check_against(again, expected, 0.01)


# -- eviction -------------------------------------------------------------------------------
def test_eviction_keeps_the_directory_under_its_limit(server_factory, tmp_path: Path, model_root: Path, family) -> None:
    limit = 3 * 2**20 + 2**19  # room for about three 1 MiB fingerprints with their deltas
    running = server_factory(cache_size_limit=limit)
    base_dir = Path(family["paths"]["base"])  # type: ignore[index]
    extra = make_family(family["base"], 6, rho=0.3, seed=7)  # type: ignore[arg-type]
    dirs = [save_checkpoint(m, model_root / f"e{i}") for i, m in enumerate(extra)]
    evicted_before = counter(metrics.CACHE_EVICTIONS)
    store = running.servicer.kinship_cache.store
    with KinshipClient(running.address, timeout=120) as client:
        for d in dirs:
            client.register_checkpoint(str(d), str(base_dir))
            assert store.volume() <= limit
            # The store's files: its SQLite index and value files (other components may keep their own files here).
            on_disk = (tmp_path / "cache" / "cache.db").stat().st_size + sum(p.stat().st_size for p in value_files(tmp_path / "cache"))
            # SQLite truncates its file lazily (WAL checkpoints), so allow it a few hundred KiB of lag.
            assert on_disk <= limit + 2**18
        assert counter(metrics.CACHE_EVICTIONS) > evicted_before
        # The most recently registered checkpoints are still cached; evicted ones fall back to exact.
        recent = client.kinship(str(base_dir), [str(dirs[-2]), str(dirs[-1])], mode="fingerprint")
        assert recent.mode == "fingerprint"
        running.servicer.kinship_cache.forget_memory()  # (in-process copies of verified fingerprints stay valid)
        old = client.kinship(str(base_dir), [str(dirs[0]), str(dirs[1])], mode="auto")
        assert old.mode == "exact" and old.bytes_read > 0


# -- lossless deltas --------------------------------------------------------------------------
def _edge_cases(model: torch.Tensor, base: torch.Tensor) -> None:
    """Put values whose subtraction is not invertible into flat model/base tensors."""
    m = torch.tensor([-0.0, 0.0, float("inf"), float("inf"), float("nan"), 1.0, 3e38, 1e-40, 65504.0, -2.0**-24])
    b = torch.tensor([0.0, -0.0, float("inf"), 1.0, 2.0, 1e-30, -3e38, 1e-45, -65504.0, 1e30])
    model.view(-1)[: m.numel()] = m.to(model.dtype)
    base.view(-1)[: b.numel()] = b.to(base.dtype)


@pytest.mark.parametrize("dtype,base_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_delta_round_trip_is_bit_exact(server_factory, model_root: Path, dtype: torch.dtype, base_dtype: torch.dtype) -> None:
    base = {k: v.to(base_dtype) for k, v in make_base(SMALL, seed=3).items()}
    model = {k: v.to(dtype) for k, v in make_family({k: v.float() for k, v in base.items()}, 1, rho=0.0, seed=4)[0].items()}
    _edge_cases(model["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    base_dir = save_checkpoint(base, model_root / "b")
    model_dir = save_checkpoint(model, model_root / "m")
    running = server_factory(chunk_bytes=4096 * 8 * 3)
    with KinshipClient(running.address, timeout=120) as client:
        reg = client.register_checkpoint(str(model_dir), str(base_dir))
    assert reg.delta_bytes > 0
    on_disk_model, on_disk_base = load(model_dir), load(base_dir)
    seen = []
    for name, chunks in running.servicer.kinship_cache.read_delta(_spec(base_dir), _spec(model_dir)):
        flat_base = on_disk_base[name].reshape(-1).to(torch.float64)
        offset, parts = 0, []
        for chunk in chunks:
            parts.append(reconstruct(chunk, flat_base[offset : offset + chunk.numel]))
            offset += chunk.numel
        rebuilt = torch.cat(parts).reshape(on_disk_model[name].shape)
        assert rebuilt.dtype == on_disk_model[name].dtype
        assert torch.equal(bits(rebuilt), bits(on_disk_model[name])), name
        seen.append(name)
    assert sorted(seen) == sorted(on_disk_model)


def test_delta_encoding_handles_every_bit_pattern_class() -> None:
    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        width = torch.empty(0, dtype=dtype).element_size()
        int_dtype = {2: torch.int16, 4: torch.int32}[width]
        # Random bit patterns cover NaNs, infinities, subnormals and both zeros.
        low, high = torch.iinfo(int_dtype).min, torch.iinfo(int_dtype).max
        model = torch.randint(low, high, (50_000,), generator=generator, dtype=torch.int64).to(int_dtype).view(dtype)
        base = torch.randint(low, high, (50_000,), generator=generator, dtype=torch.int64).to(int_dtype).view(dtype)
        base64 = base.to(torch.float64)
        chunk = encode(model, base64)
        parsed = from_bytes(memoryview(bytearray(b"".join(bytes(p) for p in to_parts(chunk)))))
        assert torch.equal(bits(reconstruct(parsed, base64)), bits(model))
        want = model.to(torch.float64) - base64
        got = parsed.delta.to(torch.float64)
        assert torch.equal(bits(got), bits(want)), "the stored delta is the float64 task vector, bit for bit"


# -- several processes ------------------------------------------------------------------------
def test_two_server_processes_share_one_cache_directory(tmp_path: Path, model_root: Path, paths) -> None:
    expected = reference(paths["base"], [paths[f"m{i}"] for i in range(3)])
    env = dict(os.environ)
    env.update(
        KINSHIP_PORT="0",
        KINSHIP_HOST="127.0.0.1",
        KINSHIP_METRICS_PORT="0",
        KINSHIP_ALLOWED_ROOTS=str(model_root),
        KINSHIP_CACHE_DIR=str(tmp_path / "shared-cache"),
        KINSHIP_DEVICE="cpu",
        KINSHIP_LOG_FORMAT="text",
        KINSHIP_GRACE_SECONDS="0",
    )
    processes = [launch(env, tmp_path / "server-1.log"), launch(env, tmp_path / "server-2.log")]
    errors: list[BaseException] = []
    results: list[object] = []

    def work(address: str, order: list[str]) -> None:
        try:
            with KinshipClient(address, timeout=120) as client:
                for m in order:
                    client.register_checkpoint(m, str(paths["base"]))
                for mode in ("exact", "auto", "fingerprint", "exact"):
                    results.append(client.kinship(str(paths["base"]), models_of(paths), mode=mode))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    try:
        threads = [
            threading.Thread(target=work, args=(processes[0][1], models_of(paths))),
            threading.Thread(target=work, args=(processes[1][1], list(reversed(models_of(paths))))),
            threading.Thread(target=work, args=(processes[0][1], models_of(paths)[1:] + models_of(paths)[:1])),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        assert len(results) == 12
        for result in results:
            check_against(result, expected, 0.01 if result.mode == "fingerprint" else 1e-9)  # type: ignore[attr-defined]
        # A third process started afterwards answers from what the others cached (restart survival).
        third = launch(env, tmp_path / "server-3.log")
        processes.append(third)
        with KinshipClient(third[1], timeout=120) as client:
            warm = client.kinship(str(paths["base"]), models_of(paths), mode="exact")
            assert warm.bytes_read == 0
            check_against(warm, expected, 1e-9)
    finally:
        for process, _ in processes:
            process.terminate()
        for process, _ in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


# -- CLI --------------------------------------------------------------------------------------
def test_cli_register(server: RunningServer, paths, capsys) -> None:
    code = cli_main(["--target", server.address, "register", "--base", str(paths["base"]), str(paths["m0"])])
    assert code == 0
    out = capsys.readouterr().out
    assert "registered" in out and "identity local-" in out and "fingerprint_bytes=1048576" in out
    code = cli_main(["--target", server.address, "register", "--json", "--base", str(paths["base"]), str(paths["m0"])])
    assert code == 0
    assert '"already_registered": true' in capsys.readouterr().out
    code = cli_main(["--target", server.address, "kinship", "--mode", "fingerprint", "--base", str(paths["base"]), str(paths["m0"]), str(paths["m1"])])
    assert code == 1  # m1 is not registered: FAILED_PRECONDITION, printed, no traceback
    assert "FAILED_PRECONDITION" in capsys.readouterr().err


# -- other checkpoint forms and bad input ------------------------------------------------------
def test_hub_checkpoints_get_hub_identities_and_are_cached(client: KinshipClient, tmp_path: Path, model_root: Path) -> None:
    from .test_sources import build_hub_cache

    base = make_base(SMALL, seed=30)
    a, b = make_family(base, 2, rho=0.4, seed=31)
    save_checkpoint(base, model_root / "base")
    for name, tensors in (("a", a), ("b", b)):
        save_checkpoint(tensors, tmp_path / f"src-{name}", shards=2)
        build_hub_cache(f"kinship-cache-test/{name}", tmp_path / f"src-{name}", commit=(name * 40)[:40])
    refs = ["hf://kinship-cache-test/a", "hf://kinship-cache-test/b@main"]
    cold = client.kinship(str(model_root / "base"), refs, mode="exact")
    assert all(m.identity.startswith("hub-") for m in cold.raw.models)
    warm = client.kinship(str(model_root / "base"), refs, mode="exact")
    assert warm.bytes_read == 0 and [p.values for p in warm.pairs] == [p.values for p in cold.pairs]
    reg = client.register_checkpoint(refs[0], str(model_root / "base"))
    assert reg.identity == cold.raw.models[0].identity and not reg.already_registered
    fp = client.kinship(str(model_root / "base"), refs, mode="fingerprint")
    assert abs(fp.pairs[0].values.pcc - cold.pairs[0].values.pcc) <= 0.01


def test_sharded_resized_vocabulary_with_leading_slice_is_cached(client: KinshipClient, model_root: Path) -> None:
    base = make_base(SMALL, seed=40)
    models = make_family(base, 3, rho=0.6, seed=41)
    save_checkpoint(base, model_root / "base", shards=3)
    resized = dict(models[2])
    resized["model.embed_tokens.weight"] = torch.cat([models[2]["model.embed_tokens.weight"], torch.randn(8, SMALL.hidden_size)])
    resized["lm_head.weight"] = torch.cat([models[2]["lm_head.weight"], torch.randn(8, SMALL.hidden_size)])
    dirs = [save_checkpoint(m, model_root / f"s{i}", shards=2) for i, m in enumerate([models[0], models[1], resized])]
    refs = [str(d) for d in dirs]
    for policy in ("skip", "leading_slice"):
        cold = client.kinship(str(model_root / "base"), refs, mode="exact", shape_mismatch=policy, per_layer=True)
        warm = client.kinship(str(model_root / "base"), refs, mode="auto", shape_mismatch=policy, per_layer=True)
        assert cold.bytes_read > 0 and warm.bytes_read == 0 and warm.mode == "exact"
        assert [p.values for p in warm.pairs] == [p.values for p in cold.pairs]
        assert warm.skipped == cold.skipped and warm.sliced == cold.sliced
        assert [(l.group, l.tensors, [p.values for p in l.pairs]) for l in warm.layers] == [
            (l.group, l.tensors, [p.values for p in l.pairs]) for l in cold.layers
        ]
    assert len(cold.sliced) == 2  # the two policies are cached apart
    # The first two models' own tensor sets include the embeddings the joint pass skipped or sliced,
    # so no fingerprint of theirs was stored from these passes: FINGERPRINT must refuse, not guess.
    with pytest.raises(KinshipRpcError) as info:
        client.kinship(str(model_root / "base"), refs[:2], mode="fingerprint")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_register_checkpoint_bad_input(client: KinshipClient, paths, tmp_path: Path) -> None:
    from kinship_client.v1 import common_pb2, kinship_pb2

    with pytest.raises(KinshipRpcError) as info:
        client._call(client.stub.RegisterCheckpoint, kinship_pb2.RegisterCheckpointRequest(base=common_pb2.CheckpointRef(path=str(paths["base"]))), None)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "checkpoint"
    with pytest.raises(KinshipRpcError) as info:
        client.register_checkpoint(str(tmp_path / "elsewhere"), str(paths["base"]))
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(KinshipRpcError) as info:
        client.register_checkpoint(str(paths["m0"]) + "-missing", str(paths["base"]))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(KinshipRpcError) as info:
        client._call(
            client.stub.Kinship,
            kinship_pb2.KinshipRequest(
                base=common_pb2.CheckpointRef(path=str(paths["base"])),
                models=[common_pb2.CheckpointRef(path=m) for m in models_of(paths)],
                mode=42,
            ),
            None,
        )
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "mode"
    # A model equal to its base registers (its task vector is zero) but has no kinship.
    reg = client.register_checkpoint(str(paths["base"]), str(paths["base"]))
    assert reg.delta_sum_squares == 0.0
    client.register_checkpoint(str(paths["m0"]), str(paths["base"]))
    with pytest.raises(KinshipRpcError) as info:
        client.kinship(str(paths["base"]), [str(paths["base"]), str(paths["m0"])], mode="fingerprint")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.reason == "ZERO_TASK_VECTOR"
    assert client.kinship(str(paths["base"]), models_of(paths), mode="auto").mode == "exact"  # still serving


def test_registered_hub_checkpoints_need_not_stay_in_the_hub_cache(
    server: RunningServer, client: KinshipClient, tmp_path: Path, model_root: Path
) -> None:
    import shutil as _shutil

    from .test_sources import build_hub_cache

    base = make_base(SMALL, seed=50)
    models = make_family(base, 3, rho=0.5, seed=51)
    save_checkpoint(base, model_root / "base")
    refs, snapshots = [], []
    for index, tensors in enumerate(models):
        commit = (str(index) * 40)[:40]
        save_checkpoint(tensors, tmp_path / f"src-{index}")
        snapshots.append(build_hub_cache(f"kinship-gone/m{index}", tmp_path / f"src-{index}", commit=commit))
        refs.append(f"hf://kinship-gone/m{index}@{commit}")
    expected = reference(model_root / "base", [tmp_path / f"src-{i}" for i in range(3)])
    registrations = [client.register_checkpoint(r, str(model_root / "base")) for r in refs[:2]]
    client.kinship(str(model_root / "base"), refs, mode="exact")  # caches pair results and m2's fingerprint
    for snapshot in snapshots:  # the Hub cache is cleaned up: blobs, snapshots and refs gone
        _shutil.rmtree(snapshot.parent.parent)

    exact = client.kinship(str(model_root / "base"), refs, mode="exact")
    assert exact.bytes_read == 0 and exact.mode == "exact"
    check_against(exact, expected, 1e-9)
    fp = client.kinship(str(model_root / "base"), refs, mode="fingerprint")
    check_against(fp, expected, 0.01)
    assert [m.identity for m in fp.raw.models][:2] == [r.identity for r in registrations]
    again = client.register_checkpoint(refs[0], str(model_root / "base"))
    assert again.already_registered
    # The stored delta alone rebuilds the weights (with the local base), bit for bit.
    from kinship_service.checkpoints.sources import HubRepo

    on_disk_base, original = load(model_root / "base"), load(tmp_path / "src-0")
    for name, chunks in server.servicer.kinship_cache.read_delta(_spec(model_root / "base"), HubRepo("kinship-gone/m0", "0" * 40)):
        flat_base = on_disk_base[name].reshape(-1).to(torch.float64)
        offset, parts = 0, []
        for chunk in chunks:
            parts.append(reconstruct(chunk, flat_base[offset : offset + chunk.numel]))
            offset += chunk.numel
        assert torch.equal(bits(torch.cat(parts)), bits(original[name].reshape(-1))), name
    # What the cache cannot answer needs the files: NOT_FOUND with a hint, as for an unpinned reference.
    with pytest.raises(KinshipRpcError) as info:
        client.kinship(str(model_root / "base"), [refs[2], refs[2]], mode="exact")
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "no longer in the Hub cache" in info.value.message
    with pytest.raises(KinshipRpcError) as info:
        client.kinship(str(model_root / "base"), ["hf://kinship-gone/m0", "hf://kinship-gone/m1"], mode="auto")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_repeated_fingerprint_answers_are_identical_and_other_tensor_sets_stay_refused(tmp_path: Path, model_root: Path) -> None:
    """The FINGERPRINT path memoises per plan (tensor list, groups) and per sketch pair: nothing may leak across."""
    from kinship_service.cache.registry import KinshipCache
    from kinship_service.checkpoints.sources import LocalPath
    from kinship_service.config import Settings
    from kinship_service.errors import FailedPrecondition

    shape = LlamaShape(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2)
    base = make_base(shape, seed=40)
    models = make_family(base, 3, rho=0.5, seed=41)
    base_ref = LocalPath(str(save_checkpoint(base, model_root / "base")))
    refs = [LocalPath(str(save_checkpoint(m, model_root / f"m{i}"))) for i, m in enumerate(models)]
    pruned = {k: v for k, v in models[2].items() if k != "model.layers.1.mlp.up_proj.weight"}
    pruned_ref = LocalPath(str(save_checkpoint(pruned, model_root / "pruned")))
    cache = KinshipCache(Settings(allowed_roots=(model_root,), cache_dir=tmp_path / "cache"), "cpu")
    try:
        for ref in (*refs, pruned_ref):
            cache.register(ref, base_ref)
        first = cache.kinship(base_ref, refs, mode="fingerprint")
        first.result.tensors_by_group["layers.0"] = -1  # a caller editing its answer must not touch the next one
        for order in ([0, 1, 2], [2, 0, 1], [0, 1, 2]):
            again = cache.kinship(base_ref, [refs[i] for i in order], mode="fingerprint").result
            for metric in ("pcc", "cosine", "euclidean"):
                got, want = getattr(again.overall, metric), getattr(first.result.overall, metric)
                for a, i in enumerate(order):
                    for b, j in enumerate(order):
                        assert float(got[a][b]).hex() == float(want[i][j]).hex()
            assert again.tensors_by_group["layers.0"] > 0
        # The pruned model's own fingerprint covers one tensor fewer: joined with m0 the compared set
        # shrinks, and m0's fingerprint (over the full set) must not be used for it.
        with pytest.raises(FailedPrecondition) as info:
            cache.kinship(base_ref, [refs[0], pruned_ref], mode="fingerprint")
        assert info.value.reason == "FINGERPRINT_MISSING" and "models[0]" in info.value.message
        assert cache.kinship(base_ref, refs[:2], mode="fingerprint").mode_used == "fingerprint"
    finally:
        cache.close()


def _reference_sketch(base: dict[str, torch.Tensor], model: dict[str, torch.Tensor]) -> np.ndarray:
    """The CountSketch of model - base in float64 NumPy, from the hashing's definition (fingerprint.py's module docstring)."""
    from kinship_service.kinship.fingerprint import SKETCH_WIDTH, block_params, sign_table

    width = SKETCH_WIDTH
    signs = sign_table(width).numpy()
    sketch = np.zeros(width)
    for name in sorted(base):
        delta = model[name].double().numpy().ravel() - base[name].double().numpy().ravel()
        for block in range(0, (delta.size + width - 1) // width):
            part = delta[block * width : (block + 1) * width]
            rotation, sign = block_params(name, block, width)
            lo = np.arange(part.size)
            sketch[(lo + rotation) % width] += sign * signs[lo] * part  # one block: distinct buckets
    return sketch


# About 300K parameters: 4 bytes each of delta is more than a quarter of a 4 MiB cache, the 1 MiB fingerprint fits.
MEDIUM = LlamaShape(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize(("cpu_kernel", "bf16_base"), [(True, False), (False, False), (True, True)])
def test_fingerprint_only_registration_matches_the_reference(
    server_factory, model_root: Path, tmp_path: Path, cpu_kernel: bool, bf16_base: bool
) -> None:
    """A cache too small for the delta: RegisterCheckpoint computes only the fingerprint (fused kernel or torch).

    With a bf16 base (one dtype throughout) the fused kernel reads the files itself; with a float32
    base the chunks are read into memory first.
    """
    base_weights = make_base(MEDIUM, seed=21)
    if bf16_base:
        base_weights = {k: v.to(torch.bfloat16) for k, v in base_weights.items()}
    model_weights = make_family(base_weights, 1, rho=0.5, seed=22)[0]
    base_dir = save_checkpoint(base_weights, model_root / "base")
    model_dir = save_checkpoint({k: v.to(torch.bfloat16) for k, v in model_weights.items()}, model_root / "m")
    server = server_factory(cpu_kernel=cpu_kernel, cache_dir=tmp_path / f"cache-{cpu_kernel}-{bf16_base}", cache_size_limit=4 * 2**20)
    with KinshipClient(server.address) as client:
        reg = client.register_checkpoint(str(model_dir), str(base_dir))
    assert reg.delta_bytes == 0 and reg.fingerprint_bytes == 4 * 2**18
    base, model = load(base_dir), load(model_dir)
    assert 4 * MEDIUM.num_parameters > 2**20
    delta = np.concatenate([(model[n].double() - base[n].double()).numpy().ravel() for n in sorted(base)])
    assert reg.elements == delta.size == MEDIUM.num_parameters
    assert reg.delta_sum_squares == pytest.approx(float(np.dot(delta, delta)), rel=1e-12)
    assert reg.delta_sum == pytest.approx(float(delta.sum()), rel=1e-9, abs=1e-12)
    cache = server.servicer.kinship_cache
    base_id = cache.identities.identify(cache._resolve(_spec(base_dir), "base")).identity
    fp = cache.get_fingerprint(base_id, reg.identity)
    assert fp is not None
    expected = _reference_sketch(base, model)
    got = fp.sketch.double().numpy()
    # stored as float32: equal to the float64 reference to float32 rounding
    np.testing.assert_allclose(got, expected, rtol=2**-23, atol=1e-6 * np.abs(expected).max())  # float32 partial sums per chunk
