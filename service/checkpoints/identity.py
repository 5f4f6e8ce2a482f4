"""Checkpoint content identity: a cache key that changes whenever a checkpoint's weights change.

- Hub checkpoints (files inside a huggingface_hub cache snapshot, symlinked to
  `blobs/<hash>`): the resolved commit, and per file its name in the repo, its blob
  name (the blob's content hash: SHA-256 for LFS files), size and a hash of its
  safetensors header. No modification time: a re-downloaded blob keeps its identity.
- Local files: per file the resolved path, size, inode, `mtime_ns`, `ctime_ns` and the
  SHA-256 of its safetensors header (the first 8 + N bytes: tensor names, dtypes,
  shapes and offsets). An in-place edit changes mtime and ctime (ctime cannot be set
  back by `touch`), and any change of layout changes the header hash.

Identities are memoised per process on the files' stat results, so a repeated
request costs one `stat` per file (none when the resolver hands over the stats it
took while resolving the checkpoint); the header is re-read whenever stat changes. The
parsed headers come along, so tensor plans can be made without opening the files
again.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kinship_service.checkpoints.safetensors_header import FileState, TensorInfo, file_state, read_checkpoint_headers
from kinship_service.checkpoints.sources import Checkpoint
from kinship_service.errors import FailedPrecondition

IDENTITY_VERSION = 1


@dataclass(frozen=True)
class CheckpointIdentity:
    """A checkpoint's content identity and its validated safetensors headers."""

    identity: str
    """`hub-<hex>` or `local-<hex>` (128-bit digest)."""
    size_bytes: int
    headers: dict[str, TensorInfo]
    """Every tensor's header entry, by name (as `read_checkpoint_headers` gives): what plans and readers use."""
    states: tuple[FileState, ...]


def _hub_blob(path: Path) -> str | None:
    """The blob name when `path` is a Hub-cache snapshot link into `blobs/`, else None."""
    real = Path(os.path.realpath(path))
    return real.name if real.parent.name == "blobs" else None


class IdentityResolver:
    """Computes and memoises checkpoint identities (thread-safe)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._memo: OrderedDict[tuple[str, tuple[FileState, ...]], CheckpointIdentity] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries

    def identify(self, checkpoint: Checkpoint, stats: Sequence[os.stat_result | None] = ()) -> CheckpointIdentity:
        """The identity of `checkpoint` as its files are now.

        `stats`: optional `os.stat` results of `checkpoint.files` (in order; None for
        "stat it here") taken moments ago in this same request, e.g. by
        `sources.resolve_with_stats`, so no file is stat-ed twice. Never pass stale ones.
        """
        try:
            if stats:
                states = tuple(file_state(f, st) for f, st in zip(checkpoint.files, stats, strict=True))
            else:
                states = tuple(file_state(f) for f in checkpoint.files)
        except OSError as exc:
            raise FailedPrecondition(f"{checkpoint.label}: cannot stat its weight files ({exc})", reason="CHECKPOINT_UNREADABLE") from None
        memo_key = (checkpoint.revision, states)
        with self._lock:
            hit = self._memo.get(memo_key)
            if hit is not None:
                self._memo.move_to_end(memo_key)
                return hit
        result = self._compute(checkpoint, states)
        with self._lock:
            self._memo[memo_key] = result
            while len(self._memo) > self._max:
                self._memo.popitem(last=False)
        return result

    def unchanged(self, ident: CheckpointIdentity) -> bool:
        """True when the files still have the stat results the identity was computed from."""
        try:
            return all(file_state(Path(s.path)) == s for s in ident.states)
        except OSError:
            return False

    def _compute(self, checkpoint: Checkpoint, states: tuple[FileState, ...]) -> CheckpointIdentity:
        digest = hashlib.sha256(f"kinship-identity-v{IDENTITY_VERSION}\n".encode())
        blobs = [_hub_blob(f) for f in checkpoint.files] if checkpoint.revision else []
        hub = bool(blobs) and all(b is not None for b in blobs)
        if hub:
            digest.update(f"hub\n{checkpoint.revision}\n".encode())
        else:
            digest.update(b"local\n")
        read = read_checkpoint_headers(checkpoint, states)
        for index, (file, state, header) in enumerate(zip(checkpoint.files, states, read.files, strict=True)):
            if hub:
                rel = os.path.relpath(file, checkpoint.directory) if file.is_relative_to(checkpoint.directory) else file.name
                line = f"{rel}\n{blobs[index]}\n{state.size}\n"
            else:
                line = f"{state.path}\n{state.size}\n{state.inode}\n{state.mtime_ns}\n{state.ctime_ns}\n"
            digest.update(line.encode())
            digest.update(header.digest)
        prefix = "hub" if hub else "local"
        return CheckpointIdentity(
            identity=f"{prefix}-{digest.hexdigest()[:32]}",
            size_bytes=sum(s.size for s in states),
            headers=read.tensors,
            states=states,
        )

