"""Bad checkpoint paths get their documented status in every RPC that takes one (issue 12), and the server answers on.

- a path component over the file system's NAME_MAX, or a path over PATH_MAX: INVALID_ARGUMENT
  PATH_TOO_LONG naming the field (it was INTERNAL: ENAMETOOLONG from stat);
- a shard index with JSON nested deeper than the parser's stack: FAILED_PRECONDITION BAD_INDEX
  naming the index file (it was INTERNAL: RecursionError);
- a symlink inside the allowed roots that leads to a device outside them: PERMISSION_DENIED, as
  for any other target outside (it was FAILED_PRECONDITION NO_SAFETENSORS).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from kinship_client import KinshipClient, KinshipRpcError
from kinship_client.population import Member

pytestmark = pytest.mark.both_layouts  # each server test also runs through the front (conftest)

NAME_MAX = os.pathconf("/", "PC_NAME_MAX")
PATH_MAX = os.pathconf("/", "PC_PATH_MAX")


def still_serving(client: KinshipClient, family: dict[str, object]) -> None:
    paths = family["paths"]
    assert isinstance(paths, dict)
    result = client.kinship(str(paths["base"]), [str(paths["m0"]), str(paths["m1"])], mode="exact")
    assert len(result.pairs) == 1


def every_rpc(client: KinshipClient, family: dict[str, object], bad: str) -> dict[str, Callable[[], object]]:
    """Each RPC that takes a checkpoint, given `bad` in one checkpoint field; keys: the field the error must name."""
    paths = family["paths"]
    assert isinstance(paths, dict)
    base, m0, m1 = str(paths["base"]), str(paths["m0"]), str(paths["m1"])
    members = [Member("a", 1.0, m0, 1), Member("b", 0.5, bad, 1), Member("c", 0.2, m1, 1)]
    return {
        "base": lambda: client.kinship(bad, [m0, m1], mode="exact"),
        "models[1]": lambda: client.kinship(base, [m0, bad], mode="exact"),
        "models[0]": lambda: client.kinship(base, [bad, m1], mode="fingerprint"),
        "checkpoint": lambda: client.register_checkpoint(bad, base),
        "model_b": lambda: client.start_merge(m0, bad, t=0.5, output_path="out"),
        "members[1].checkpoint": lambda: client.rank_candidates(members, top_k=3, base=base),
        "members[1].checkpoint ": lambda: client.should_stop(members, top_k=3, base=base),  # (a distinct key)
    }


def expect_error(call: Callable[[], object], code: grpc.StatusCode) -> KinshipRpcError:
    with pytest.raises(KinshipRpcError) as info:
        call()
    error = info.value
    assert error.code == code, error
    assert "Traceback" not in error.message
    return error


@pytest.mark.parametrize("kind", ["component", "path"])
def test_too_long_paths_are_invalid_argument_in_every_rpc(client, family, model_root: Path, kind: str) -> None:
    if kind == "component":
        bad = str(model_root / ("a" * (NAME_MAX + 1)) / "model")
    else:  # components within NAME_MAX, the whole over PATH_MAX
        part = "b" * min(200, NAME_MAX)
        bad = str(model_root / "/".join([part] * (PATH_MAX // len(part) + 1)))
    for field, call in every_rpc(client, family, bad).items():
        error = expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert error.reason == "PATH_TOO_LONG", (field, error)
        assert "too long" in error.message
        assert error.field == field.strip(), (field, error.field)
    still_serving(client, family)


def test_a_long_path_within_the_limits_is_still_not_found(client, family, model_root: Path) -> None:
    bad = str(model_root / ("c" * NAME_MAX))
    error = expect_error(lambda: client.kinship(bad, [bad, bad], mode="exact"), grpc.StatusCode.NOT_FOUND)
    assert error.field == "base"
    still_serving(client, family)


def test_deeply_nested_shard_index_is_bad_index_naming_the_file(client, family, model_root: Path) -> None:
    directory = model_root / "nested"
    directory.mkdir()
    index = directory / "model.safetensors.index.json"
    index.write_text("[" * 200_000 + "]" * 200_000)
    paths = family["paths"]
    assert isinstance(paths, dict)
    for call in (
        lambda: client.kinship(str(paths["base"]), [str(paths["m0"]), str(directory)], mode="exact"),
        lambda: client.register_checkpoint(str(directory), str(paths["base"])),
    ):
        error = expect_error(call, grpc.StatusCode.FAILED_PRECONDITION)
        assert error.reason == "BAD_INDEX", error
        assert str(index) in error.message and "nested too deeply" in error.message
    index.write_text('{"weight_map": ' * 100_000 + "}" * 100_000)  # nested objects too
    error = expect_error(lambda: client.register_checkpoint(str(directory), str(paths["base"])), grpc.StatusCode.FAILED_PRECONDITION)
    assert error.reason == "BAD_INDEX"
    still_serving(client, family)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_symlinks_to_devices_outside_the_roots_are_permission_denied(client, family, model_root: Path, device: str) -> None:
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist here")
    layouts: dict[str, Path] = {}
    link = model_root / "device-link"  # the checkpoint path itself
    link.symlink_to(device)
    layouts["checkpoint"] = link
    single = model_root / "single"  # its model.safetensors
    single.mkdir()
    (single / "model.safetensors").symlink_to(device)
    layouts["single file"] = single
    shards = model_root / "shards"  # a shard found by globbing *.safetensors
    shards.mkdir()
    (shards / "model-00001-of-00001.safetensors").symlink_to(device)
    layouts["glob"] = shards
    indexed = model_root / "indexed"  # the index itself
    indexed.mkdir()
    (indexed / "model.safetensors.index.json").symlink_to(device)
    layouts["index"] = indexed
    for name, path in layouts.items():
        for field, call in every_rpc(client, family, str(path)).items():
            error = expect_error(call, grpc.StatusCode.PERMISSION_DENIED)
            assert error.reason == "PATH_NOT_ALLOWED", (name, field, error)
            assert device not in error.message, "the target outside the roots is not disclosed"
    still_serving(client, family)


def test_a_mergekit_model_name_too_long_for_a_path_is_not_internal(client, family) -> None:
    """A relative mergekit model name is looked up under the allowed roots; one too long to be a path is no INTERNAL."""
    name = "d" * (NAME_MAX + 1)
    paths = family["paths"]
    assert isinstance(paths, dict)
    config = f"merge_method: slerp\nbase_model: {paths['m0']}\nmodels:\n  - model: {paths['m0']}\n  - model: {name}\nparameters:\n  t: 0.5\n"
    try:
        job = client.start_merge(None, None, mergekit_yaml=config, output_path="long-name")
    except KinshipRpcError as error:
        assert error.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), error
    else:  # not a local path: taken for a Hub repo id, which the job then cannot find
        final = [*client.watch_merge_job(job.job_id)][-1]
        assert final.state == "failed" and final.error is not None and final.error.reason != "INTERNAL", final
    still_serving(client, family)
