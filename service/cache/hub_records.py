"""Records of Hub checkpoints pinned to a commit: what answers for them once they leave the Hub cache.

When a Hub checkpoint is identified, its identity, size and tensor headers are kept
under its (repo, commit). A later request for that commit, with the files gone, is
identified from the record, so fingerprints, deltas and pair results still answer.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from kinship_service.cache.keys import hubref_key
from kinship_service.cache.store import CacheStore
from kinship_service.checkpoints.identity import CheckpointIdentity
from kinship_service.checkpoints.safetensors_header import TensorInfo


class HubRecords:
    """Hub identities by (repo, commit), in the cache store (thread-safe)."""

    def __init__(self, store: CacheStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._seen: set[str] = set()

    def remember(self, repo_id: str, commit: str, ident: CheckpointIdentity) -> None:
        """Keep the record of `repo_id@commit` (written once per server process)."""
        key = hubref_key(repo_id, commit)
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
        record = {
            "identity": ident.identity,
            "size_bytes": ident.size_bytes,
            "headers": [[i.name, i.dtype, list(i.shape)] for i in ident.headers.values()],
        }
        self.store.put(key, json.dumps(record).encode())

    def identity(self, repo_id: str, commit: str) -> CheckpointIdentity | None:
        """The recorded identity of `repo_id@commit` (no file states: it cannot be read), or None."""
        payload = self.store.get(hubref_key(repo_id, commit))
        if payload is None:
            return None
        try:
            doc = json.loads(bytes(payload))
            where = Path(f"hf://{repo_id}@{commit}")
            headers = {name: TensorInfo(name, dtype, tuple(int(d) for d in shape), where) for name, dtype, shape in doc["headers"]}
            return CheckpointIdentity(doc["identity"], int(doc["size_bytes"]), headers, ())
        except (ValueError, KeyError, TypeError):
            self.store.delete(hubref_key(repo_id, commit))
            return None
