"""Checkpoint sources: turn a reference (local path or Hub repo) into a set of safetensors files.

Local paths are confined to `KINSHIP_ALLOWED_ROOTS` after resolving symlinks, so a
request can never make the server read elsewhere. Hub repos go through
huggingface_hub's cache (honouring `HF_HUB_OFFLINE`, `HF_TOKEN`, `HF_HOME`). Only
safetensors weights are accepted: PyTorch pickles run code when loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

from .errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files fetched from the Hub besides weights: what a merge copies and what identifies a model.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "README.md"]

_CONVERT_HINT = (
    "PyTorch pickle files are refused because loading them runs arbitrary code. Convert the "
    "checkpoint first, e.g. `model = AutoModel.from_pretrained(dir); "
    "model.save_pretrained(dir, safe_serialization=True)`, or "
    "`safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')`."
)


@dataclass(frozen=True)
class LocalPath:
    """A checkpoint on the server's disk."""

    path: str


@dataclass(frozen=True)
class HubRepo:
    """A checkpoint on the Hugging Face Hub."""

    repo_id: str
    revision: str = ""


CheckpointSpec = Union[LocalPath, HubRepo]


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: which file holds each tensor."""

    label: str
    """What the caller asked for, for messages (`/models/a` or `hf://org/repo@rev`)."""
    directory: Path
    """Directory of the checkpoint (config and tokenizer files live here)."""
    files: tuple[Path, ...]
    """The safetensors files, in a fixed order."""
    weight_map: dict[str, Path] = field(default_factory=dict, compare=False, hash=False)
    """Tensor name -> file, from the index when the checkpoint is sharded (else filled on read)."""
    revision: str = ""
    """Resolved Hub commit hash; empty for local checkpoints."""

    @property
    def size_bytes(self) -> int:
        """Total size of the weight files."""
        return sum(p.stat().st_size for p in self.files)


def describe(spec: CheckpointSpec) -> str:
    """A short human label for a reference."""
    if isinstance(spec, HubRepo):
        return f"hf://{spec.repo_id}" + (f"@{spec.revision}" if spec.revision else "")
    return spec.path


def check_allowed(path: str, allowed_roots: Sequence[Path], field_name: str) -> Path:
    """Resolve `path` (following symlinks) and insist it lies under an allowed root.

    Raises PermissionDenied before looking at whether the path exists, so requests
    cannot probe the server's file system outside the roots.
    """
    if not path:
        raise InvalidArgument("the checkpoint path is empty", field=field_name)
    if "\x00" in path:
        raise InvalidArgument("the checkpoint path contains a NUL byte", field=field_name)
    resolved = Path(os.path.realpath(os.path.expanduser(path)))
    for root in allowed_roots:
        real_root = Path(os.path.realpath(root))
        if resolved == real_root or resolved.is_relative_to(real_root):
            return resolved
    if not allowed_roots:
        raise PermissionDenied(
            f"{path}: this server reads no local paths; start it with KINSHIP_ALLOWED_ROOTS "
            "naming the directories that hold checkpoints",
            field=field_name,
        )
    raise PermissionDenied(
        f"{path} is outside the directories this server may read "
        f"(KINSHIP_ALLOWED_ROOTS={os.pathsep.join(str(r) for r in allowed_roots)})",
        field=field_name,
    )


def resolve(spec: CheckpointSpec, allowed_roots: Sequence[Path], field_name: str = "checkpoint") -> Checkpoint:
    """Resolve a reference into its safetensors files, or raise a KinshipError saying why not."""
    if isinstance(spec, HubRepo):
        return _resolve_hub(spec, field_name)
    resolved = check_allowed(spec.path, allowed_roots, field_name)
    if not resolved.exists():
        raise NotFound(f"{spec.path} does not exist", reason="CHECKPOINT_NOT_FOUND", field=field_name)
    checkpoint = _resolve_local(resolved, spec.path, field_name)
    for file in checkpoint.files:  # a shard may be a symlink leading out of the roots
        check_allowed(str(file), allowed_roots, field_name)
    return checkpoint


def _resolve_local(path: Path, label: str, field_name: str, revision: str = "") -> Checkpoint:
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise FailedPrecondition(f"{label} is a PyTorch pickle. {_CONVERT_HINT}", reason="PICKLE_REFUSED", field=field_name)
        if path.suffix != ".safetensors":
            raise InvalidArgument(f"{label} is not a .safetensors file", reason="NOT_SAFETENSORS", field=field_name)
        return Checkpoint(label=label, directory=path.parent, files=(path,), revision=revision)
    if not path.is_dir():
        raise InvalidArgument(f"{label} is neither a file nor a directory", reason="NOT_SAFETENSORS", field=field_name)
    index = path / INDEX_FILE
    if index.is_file():
        return _from_index(path, index, label, field_name, revision)
    if (path / SINGLE_FILE).is_file():
        return Checkpoint(label=label, directory=path, files=(path / SINGLE_FILE,), revision=revision)
    shards = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if shards:
        return Checkpoint(label=label, directory=path, files=tuple(shards), revision=revision)
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
        raise FailedPrecondition(
            f"{label} holds only PyTorch pickle weights. {_CONVERT_HINT}", reason="PICKLE_REFUSED", field=field_name
        )
    raise FailedPrecondition(f"{label} holds no .safetensors files", reason="NO_SAFETENSORS", field=field_name)


def _from_index(directory: Path, index: Path, label: str, field_name: str, revision: str) -> Checkpoint:
    try:
        weight_map_raw = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map_raw, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FailedPrecondition(
            f"{index} is not a valid safetensors index ({exc}); it needs a `weight_map` object",
            reason="BAD_INDEX",
            field=field_name,
        ) from None
    weight_map: dict[str, Path] = {}
    for name, shard in weight_map_raw.items():
        # Lexical check here; where symlinks lead is checked against the allowed roots in resolve().
        shard_path = Path(os.path.normpath(directory / str(shard)))
        if not shard_path.is_relative_to(directory) or "\x00" in str(shard):
            raise PermissionDenied(f"{index} points outside its directory: {shard}", field=field_name)
        if not shard_path.is_file():
            raise FailedPrecondition(
                f"{index} lists {shard} for tensor {name}, but that file is missing", reason="SHARD_MISSING", field=field_name
            )
        weight_map[name] = shard_path
    files = tuple(sorted(set(weight_map.values())))
    if not files:
        raise FailedPrecondition(f"{index} lists no tensors", reason="BAD_INDEX", field=field_name)
    return Checkpoint(label=label, directory=directory, files=files, weight_map=weight_map, revision=revision)


def _resolve_hub(spec: HubRepo, field_name: str) -> Checkpoint:
    # Imported here: huggingface_hub reads HF_* variables at import, and tests set them per case.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    label = describe(spec)
    if not spec.repo_id or "\x00" in spec.repo_id or ".." in spec.repo_id or spec.repo_id.startswith("/"):
        raise InvalidArgument(f"{spec.repo_id!r} is not a Hub repo id (use owner/name)", field=f"{field_name}.hub.repo_id")
    try:
        folder = snapshot_download(
            repo_id=spec.repo_id,
            revision=spec.revision or None,
            allow_patterns=HUB_PATTERNS,
        )
    except GatedRepoError:
        raise PermissionDenied(
            f"{label} is gated; give the server an HF_TOKEN with access", reason="HUB_GATED", field=field_name
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        hint = " (HF_HUB_OFFLINE is set: only repos already in the Hub cache resolve)" if offline else ""
        raise NotFound(f"{label} not found{hint}: {type(exc).__name__}", reason="HUB_NOT_FOUND", field=field_name) from None
    except ValueError as exc:  # huggingface_hub's validators raise HFValidationError(ValueError)
        raise InvalidArgument(f"{label}: {exc}", field=f"{field_name}.hub.repo_id") from None
    except (HfHubHTTPError, OSError) as exc:
        raise Unavailable(f"{label}: the Hub could not be reached ({exc}); retry later", reason="HUB_UNAVAILABLE") from None
    folder_path = Path(folder)
    revision = folder_path.name  # snapshots/<commit hash>
    checkpoint = _resolve_local(folder_path, label, field_name, revision=revision)
    repo_cache = folder_path.parent.parent  # models--owner--name: snapshots link to its blobs
    for file in checkpoint.files:
        check_allowed(str(file), [repo_cache], field_name)
    return checkpoint
