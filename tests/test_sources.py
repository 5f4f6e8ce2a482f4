"""Checkpoint sources: local files, sharded directories, an offline Hub cache, and refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from kinship_service.checkpoints.sources import HubRepo, LocalPath, resolve, resolve_with_stats
from kinship_service.checkpoints.streaming import CheckpointReader
from kinship_service.checkpoints.synthetic import make_base, make_family, save_checkpoint
from kinship_service.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

from .conftest import SMALL


def build_hub_cache(repo_id: str, source: Path, commit: str = "a" * 40, branch: str = "main") -> Path:
    """Lay out `source`'s files as huggingface_hub's cache does: blobs by hash, snapshot symlinks, a ref."""
    cache = Path(os.environ["HF_HUB_CACHE"])
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        data = file.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / branch).write_text(commit)
    return snapshot


def test_hub_checkpoints_resolve_offline_from_the_cache(client, tmp_path, model_root):
    base = make_base(SMALL, seed=20)
    a, b = make_family(base, 2, rho=0.5, seed=21)
    save_checkpoint(base, model_root / "base")
    for name, tensors in (("a", a), ("b", b)):
        save_checkpoint(tensors, tmp_path / f"src-{name}", shards=2, config=SMALL.config(torch.float32))
        build_hub_cache(f"kinship-test/{name}", tmp_path / f"src-{name}", commit=(name * 40)[:40])
    hub = client.kinship(str(model_root / "base"), ["hf://kinship-test/a", "hf://kinship-test/b@main"], mode="exact")
    save_checkpoint(a, model_root / "a")
    save_checkpoint(b, model_root / "b")
    local = client.kinship(str(model_root / "base"), [str(model_root / "a"), str(model_root / "b")], mode="exact")
    assert hub.pairs[0].values == local.pairs[0].values

    checkpoint = resolve(HubRepo("kinship-test/a", "main"), [])
    assert checkpoint.revision == "a" * 40
    assert len(checkpoint.files) == 2
    assert len(CheckpointReader(checkpoint).tensors()) == len(SMALL.tensor_shapes())


def test_unknown_hub_repo_is_not_found_offline():
    with pytest.raises(NotFound, match="HF_HUB_OFFLINE"):
        resolve(HubRepo("kinship-test/never-cached"), [])


def test_bad_hub_repo_id_is_invalid():
    with pytest.raises(InvalidArgument):
        resolve(HubRepo("../../etc"), [])


def test_single_file_and_directory_forms(model_root):
    base = make_base(SMALL, seed=22)
    directory = save_checkpoint(base, model_root / "single")
    by_dir = resolve(LocalPath(str(directory)), [model_root])
    by_file = resolve(LocalPath(str(directory / "model.safetensors")), [model_root])
    assert by_dir.files == by_file.files
    loose = model_root / "loose"
    loose.mkdir()
    shutil.copy(directory / "model.safetensors", loose / "weights.safetensors")
    assert resolve(LocalPath(str(loose)), [model_root]).files == (loose / "weights.safetensors",)


def test_paths_outside_the_roots_are_denied(model_root, tmp_path):
    outside = tmp_path / "outside"
    save_checkpoint(make_base(SMALL), outside)
    with pytest.raises(PermissionDenied):
        resolve(LocalPath(str(outside)), [model_root])
    with pytest.raises(PermissionDenied):
        resolve(LocalPath(str(model_root / ".." / "outside")), [model_root])
    (model_root / "escape").symlink_to(outside)
    with pytest.raises(PermissionDenied):
        resolve(LocalPath(str(model_root / "escape")), [model_root])
    with pytest.raises(PermissionDenied, match="KINSHIP_ALLOWED_ROOTS"):
        resolve(LocalPath(str(outside)), [])
    # Denied before existence is checked: no probing outside the roots.
    with pytest.raises(PermissionDenied):
        resolve(LocalPath("/no/such/place"), [model_root])
    with pytest.raises(InvalidArgument):
        resolve(LocalPath(str(model_root) + "/a\x00b"), [model_root])


def test_refusals(model_root):
    with pytest.raises(NotFound):
        resolve(LocalPath(str(model_root / "missing")), [model_root])
    pickle_dir = model_root / "pickled"
    pickle_dir.mkdir()
    torch.save({"w": torch.zeros(2)}, pickle_dir / "pytorch_model.bin")
    with pytest.raises(FailedPrecondition, match="safe_serialization"):
        resolve(LocalPath(str(pickle_dir)), [model_root])
    with pytest.raises(FailedPrecondition, match="pickle"):
        resolve(LocalPath(str(pickle_dir / "pytorch_model.bin")), [model_root])
    (model_root / "notes.txt").write_text("hello")
    with pytest.raises(InvalidArgument, match="not a .safetensors"):
        resolve(LocalPath(str(model_root / "notes.txt")), [model_root])
    empty = model_root / "empty"
    empty.mkdir()
    with pytest.raises(FailedPrecondition, match="no .safetensors"):
        resolve(LocalPath(str(empty)), [model_root])


def test_index_problems(model_root):
    directory = save_checkpoint(make_base(SMALL), model_root / "sharded", shards=2)
    index = directory / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    index.write_text(json.dumps(doc))
    with pytest.raises(PermissionDenied):
        resolve(LocalPath(str(directory)), [model_root])
    doc["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(FailedPrecondition, match="missing"):
        resolve(LocalPath(str(directory)), [model_root])
    index.write_text("{not json")
    with pytest.raises(FailedPrecondition, match="index"):
        resolve(LocalPath(str(directory)), [model_root])


def test_corrupt_and_truncated_files_name_the_file(model_root):
    directory = save_checkpoint(make_base(SMALL), model_root / "bad")
    file = directory / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(FailedPrecondition, match="model.safetensors"):
        CheckpointReader(resolve(LocalPath(str(directory)), [model_root])).tensors()
    file.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(FailedPrecondition, match="not a readable safetensors"):
        CheckpointReader(resolve(LocalPath(str(directory)), [model_root])).tensors()


def test_symlinked_weight_files_leaving_the_roots_are_refused(model_root, tmp_path):
    """Resolution skips a second realpath only for regular files directly in a resolved directory; links are checked."""
    outside_single = save_checkpoint(make_base(SMALL, seed=30), tmp_path / "outside-single")
    outside_sharded = save_checkpoint(make_base(SMALL, seed=30), tmp_path / "outside-sharded", shards=2)
    # model.safetensors itself a link out of the roots.
    single = model_root / "single-link"
    single.mkdir()
    (single / "model.safetensors").symlink_to(outside_single / "model.safetensors")
    with pytest.raises(PermissionDenied):
        resolve(LocalPath(str(single)), [model_root])
    # One shard of an index a link out of the roots.
    sharded = save_checkpoint(make_base(SMALL, seed=31), model_root / "shard-link", shards=2)
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    shard.symlink_to(outside_sharded / shard.name)
    with pytest.raises(PermissionDenied):
        resolve(LocalPath(str(sharded)), [model_root])
    # An index placing its shards in a sub-directory that is a link out of the roots (each shard a regular file).
    via_dir = model_root / "subdir-link"
    via_dir.mkdir()
    (via_dir / "sub").symlink_to(outside_sharded)
    doc = json.loads((outside_sharded / "model.safetensors.index.json").read_text())
    doc["weight_map"] = {name: f"sub/{file}" for name, file in doc["weight_map"].items()}
    (via_dir / "model.safetensors.index.json").write_text(json.dumps(doc))
    with pytest.raises(PermissionDenied):
        resolve(LocalPath(str(via_dir)), [model_root])
    # Loose shards (no index, no model.safetensors), one a link out of the roots.
    loose = model_root / "loose-link"
    loose.mkdir()
    shutil.copy(outside_single / "model.safetensors", loose / "a.safetensors")
    (loose / "b.safetensors").symlink_to(outside_single / "model.safetensors")
    with pytest.raises(PermissionDenied):
        resolve(LocalPath(str(loose)), [model_root])
    # realpath gives up on a symlink loop and returns a path still holding a link (`escape`, leading out):
    # the files under it must still be checked one by one.
    (model_root / "loop").symlink_to(model_root / "loop")
    (model_root / "escape").symlink_to(outside_single)
    for spelling in ("loop/../escape", "loop/../escape/model.safetensors"):
        with pytest.raises(PermissionDenied):
            resolve(LocalPath(f"{model_root}/{spelling}"), [model_root])
    # A root named through a loop resolves (lexically) to `escape`, still a link: no shortcut below it either.
    for spelling in ("escape", "escape/model.safetensors"):
        with pytest.raises(PermissionDenied):
            resolve(LocalPath(f"{model_root}/{spelling}"), [model_root / "loop" / ".." / "escape"])


def test_links_inside_the_roots_and_path_spellings_resolve(model_root, tmp_path):
    real = save_checkpoint(make_base(SMALL, seed=32), model_root / "real")
    sharded = save_checkpoint(make_base(SMALL, seed=33), model_root / "sharded", shards=3)
    linked = model_root / "linked"
    linked.mkdir()
    (linked / "model.safetensors").symlink_to(real / "model.safetensors")  # a link that stays inside
    assert resolve(LocalPath(str(linked)), [model_root]).files == (linked / "model.safetensors",)
    (model_root / "alias").symlink_to(real)  # a linked directory: files under its real path
    assert resolve(LocalPath(str(model_root / "alias")), [model_root]).files == (real / "model.safetensors",)
    for spelling in (f"{real}/", f"{model_root}/./real", f"{model_root}//real", f"{model_root}/sharded/../real"):
        assert resolve(LocalPath(spelling), [model_root]).files == (real / "model.safetensors",), spelling
    # Roots named through a link: requests spelled through the link or through the real path.
    (tmp_path / "root-link").symlink_to(model_root)
    for root in (tmp_path / "root-link", model_root):
        for base in (tmp_path / "root-link", model_root):
            checkpoint = resolve(LocalPath(str(base / "sharded")), [root])
            assert checkpoint.files == tuple(sorted(sharded.glob("model-*.safetensors")))
    with pytest.raises(PermissionDenied):
        resolve(LocalPath(str(tmp_path / "root-link" / ".." / "outside")), [model_root])


def test_stats_from_resolution_are_the_files_stats(model_root):
    sharded = save_checkpoint(make_base(SMALL, seed=34), model_root / "sharded", shards=2)
    checkpoint, stats = resolve_with_stats(LocalPath(str(sharded)), [model_root])
    assert len(stats) == len(checkpoint.files) == 2
    for file, st in zip(checkpoint.files, stats, strict=False):
        assert st is not None
        now = os.stat(file)
        assert (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (now.st_ino, now.st_size, now.st_mtime_ns, now.st_ctime_ns)
    linked = model_root / "linked"
    linked.mkdir()
    (linked / "model.safetensors").symlink_to(sharded / checkpoint.files[0].name)
    assert resolve_with_stats(LocalPath(str(linked)), [model_root])[1] == (None,)  # a link: the caller stats it


def test_a_path_swapped_for_a_link_out_of_the_roots_is_refused_on_the_next_request(model_root, tmp_path):
    """Request paths are resolved afresh on every call: no answer is remembered for a path."""
    directory = save_checkpoint(make_base(SMALL, seed=35), model_root / "swapped")
    outside = save_checkpoint(make_base(SMALL, seed=35), tmp_path / "outside")
    assert resolve(LocalPath(str(directory)), [model_root]).directory == directory
    directory.rename(model_root / "moved")
    directory.symlink_to(outside)
    with pytest.raises(PermissionDenied):
        resolve(LocalPath(str(directory)), [model_root])
    directory.unlink()
    with pytest.raises(NotFound):
        resolve(LocalPath(str(directory)), [model_root])
