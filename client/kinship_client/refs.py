"""Checkpoint references: what the client accepts for a checkpoint and the CheckpointRef it sends."""

from __future__ import annotations

import os

from .v1 import common_pb2

CheckpointLike = str | os.PathLike[str] | common_pb2.CheckpointRef
"""A checkpoint: a path on the server, `hf://owner/name[@revision]`, or a CheckpointRef."""


def checkpoint_ref(value: CheckpointLike, argument: str = "checkpoint") -> common_pb2.CheckpointRef:
    """`/path`, `hf://owner/name[@revision]` or a CheckpointRef -> CheckpointRef.

    Raises:
        ValueError: the path is not valid UTF-8 (for example a file name with undecodable
            bytes, which Python holds as surrogates); the message names `argument`.
    """
    if isinstance(value, common_pb2.CheckpointRef):
        return value
    text = os.fspath(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{argument} {text!r} is not valid UTF-8; the service takes UTF-8 paths: rename the file or give a UTF-8 path"
        ) from None
    if text.startswith("hf://"):
        repo, _, revision = text[len("hf://") :].partition("@")
        return common_pb2.CheckpointRef(hub=common_pb2.HubCheckpoint(repo_id=repo, revision=revision))
    return common_pb2.CheckpointRef(path=text)


def checkpoint_label(ref: common_pb2.CheckpointRef) -> str:
    """The inverse of checkpoint_ref, for display."""
    if ref.WhichOneof("source") == "hub":
        return f"hf://{ref.hub.repo_id}" + (f"@{ref.hub.revision}" if ref.hub.revision else "")
    return ref.path


