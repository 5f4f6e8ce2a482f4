"""Cached fingerprints: the store's copies, verified, with in-process copies of the hot ones.

A FINGERPRINT request reads one fingerprint per model; the verified in-process copies
(up to MEMORY_FINGERPRINT_BYTES, least recently used dropped first) spare it the disk.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

from kinship_service.cache.codecs import fingerprint_from_bytes, fingerprint_to_parts
from kinship_service.cache.keys import fingerprint_key
from kinship_service.cache.plans import interned
from kinship_service.cache.store import CacheStore
from kinship_service.kinship.fingerprint import Fingerprint
from kinship_service.server import metrics

MEMORY_FINGERPRINT_BYTES = 512 * 2**20
"""In-process copies of verified fingerprints (1 MiB each), so hot FINGERPRINT queries skip the disk."""


_MEMORY_HITS = metrics.CACHE_HITS.labels("mem")
"""Bound once: the FINGERPRINT hot path counts two or more of these per call."""


class FingerprintCache:
    """Fingerprints by (base identity, checkpoint identity) (thread-safe)."""

    def __init__(self, store: CacheStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, Fingerprint] = OrderedDict()
        self._memory_bytes = 0

    def get(self, base_id: str, ckpt_id: str) -> Fingerprint | None:
        """The cached fingerprint of a checkpoint against a base, or None (a damaged entry is dropped)."""
        key = fingerprint_key(base_id, ckpt_id)
        with self._lock:
            fp = self._memory.get(key)
            if fp is not None:
                self._memory.move_to_end(key)
        if fp is not None:
            _MEMORY_HITS.inc()
            return fp
        payload = self.store.get(key)
        if payload is None:
            return None
        try:
            fp = fingerprint_from_bytes(payload)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            self.store.delete(key)
            metrics.CACHE_CORRUPT.inc()
            return None
        self._remember(key, fp)
        return fp

    def put(self, base_id: str, ckpt_id: str, fp: Fingerprint) -> int:
        """Store a fingerprint (and keep it in memory); the bytes stored."""
        key = fingerprint_key(base_id, ckpt_id)
        stored = self.store.put(key, fingerprint_to_parts(fp))
        self._remember(key, fp)
        return stored

    def stored(self, base_id: str, ckpt_id: str) -> bool:
        """Whether the store holds a fingerprint (not verified)."""
        return self.store.contains(fingerprint_key(base_id, ckpt_id))

    def _remember(self, key: str, fp: Fingerprint) -> None:
        fp.tensors = interned(fp.tensors)  # an equal list: cheap comparisons with plans (see plans.interned)
        with self._lock:
            if key in self._memory:
                return
            self._memory[key] = fp
            self._memory_bytes += fp.nbytes
            while self._memory_bytes > MEMORY_FINGERPRINT_BYTES and len(self._memory) > 1:
                _, old = self._memory.popitem(last=False)
                self._memory_bytes -= old.nbytes

    def forget_memory(self) -> None:
        """Drop the in-process copies (the store is untouched)."""
        with self._lock:
            self._memory.clear()
            self._memory_bytes = 0
