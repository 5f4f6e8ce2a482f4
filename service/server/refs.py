"""CheckpointRef protos <-> domain checkpoint references (LocalPath, HubRepo), shared by every RPC."""

from __future__ import annotations

from kinship_client.v1 import common_pb2
from kinship_service.checkpoints.sources import CheckpointSpec, HubRepo, LocalPath
from kinship_service.errors import InvalidArgument


def spec_from_ref(ref: common_pb2.CheckpointRef, field: str) -> CheckpointSpec:
    """A CheckpointRef proto as a domain reference; INVALID_ARGUMENT naming `field` when unset."""
    which = ref.WhichOneof("source")
    if which == "path":
        return LocalPath(ref.path)
    if which == "hub":
        if not ref.hub.repo_id:
            raise InvalidArgument("hub.repo_id is empty", field=f"{field}.hub.repo_id")
        return HubRepo(ref.hub.repo_id, ref.hub.revision)
    raise InvalidArgument(f"{field} is not set: give a local path or a Hub repo", field=field)


def ref_from_spec(spec: CheckpointSpec) -> common_pb2.CheckpointRef:
    """A domain reference as a CheckpointRef proto."""
    if isinstance(spec, HubRepo):
        return common_pb2.CheckpointRef(hub=common_pb2.HubCheckpoint(repo_id=spec.repo_id, revision=spec.revision))
    return common_pb2.CheckpointRef(path=spec.path)
