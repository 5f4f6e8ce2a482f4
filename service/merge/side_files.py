"""The files of a merged model besides its weights: config.json, model A's tokenizer and generation files, README.md."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from kinship_service.checkpoints.sources import Checkpoint
from kinship_service.errors import PermissionDenied
from kinship_service.merge.output import write_bytes_file, write_json_file
from kinship_service.merge.plan import DTYPE_CONFIG_NAMES, MergePlan, read_config

COPIED_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "*.tiktoken",
    "chat_template*",
    "generation_config.json",
    "preprocessor_config.json",
)
"""Files copied from model A besides the weights: tokenizer and generation settings."""


def write_side_files(tmp_dir: Path, checkpoint_a: Checkpoint, allowed_roots: Sequence[Path], plan: MergePlan, readme: str) -> list[str]:
    """Write config.json (model A's, with the output dtype), A's tokenizer files and `readme` into `tmp_dir`.

    Returns the names written, each file fsynced.
    """
    written = []
    config = read_config(checkpoint_a)
    if config is not None:
        dtype_text = DTYPE_CONFIG_NAMES.get(plan.config_dtype, plan.config_dtype.lower())
        config["torch_dtype"] = dtype_text
        if "dtype" in config:  # newer transformers write `dtype`
            config["dtype"] = dtype_text
        write_json_file(tmp_dir / "config.json", config)
        written.append("config.json")
    for source in side_files(checkpoint_a, allowed_roots):
        write_bytes_file(tmp_dir / source.name, source.read_bytes())
        written.append(source.name)
    write_bytes_file(tmp_dir / "README.md", readme.encode())
    written.append("README.md")
    return written


def side_files(checkpoint: Checkpoint, allowed_roots: Sequence[Path]) -> list[Path]:
    """Model A's tokenizer and generation files, refusing any whose target leaves A's allowed area."""
    directory = checkpoint.directory
    if checkpoint.revision:  # Hub snapshot: files are symlinks into the repo's blob store
        allowed = [Path(os.path.realpath(directory.parent.parent))]
    else:
        allowed = [Path(os.path.realpath(r)) for r in allowed_roots] or [Path(os.path.realpath(directory))]
    found: dict[str, Path] = {}
    for pattern in COPIED_FILE_PATTERNS:
        for path in sorted(directory.glob(pattern)):
            if path.name in found or path.name in ("config.json", "README.md") or not path.is_file():
                continue
            real = Path(os.path.realpath(path))
            if not any(real == root or real.is_relative_to(root) for root in allowed):
                raise PermissionDenied(f"{path.name} of model A links outside the allowed roots; refusing to copy it")
            found[path.name] = path
    return list(found.values())
