"""A cache store whose small entries live in PostgreSQL and whose deltas stay in this node's diskcache.

With `KINSHIP_STATE_URL` set, every replica sees the fingerprints, pair results and Hub records
any replica computed (a checkpoint registered on one answers FINGERPRINT on all), while the
deltas (about 4 bytes per parameter) stay local and are rebuilt on a miss: a replica without a
checkpoint's delta reads the weights, and RegisterCheckpoint there stores it again.

`SharedCacheStore` is a `CacheStore`, so the registry (registry.py) does not know which is which:
the key's kind (`store.kind_of`) routes each call. PostgreSQL keeps its own page checksums and
WAL, so shared values go in without the envelope; they are not evicted (a fingerprint is 1 MiB:
a population of thousands fits in a few GiB). A database that cannot be reached answers
UNAVAILABLE (STATE_UNAVAILABLE), not a miss: a miss would start passes over the weights on every
replica at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import psycopg

from kinship_service.cache.store import Buffer, CacheStore, kind_of
from kinship_service.server import metrics
from kinship_service.state.database import Database

SHARED_KINDS = frozenset({"fp", "pair", "hubref"})
"""Key kinds kept in PostgreSQL: fingerprints, pair results, Hub records (keys.py)."""

Connection = psycopg.Connection[tuple[object, ...]]


def _joined(parts: Buffer | Sequence[Buffer]) -> bytes:
    if isinstance(parts, (bytes, bytearray, memoryview)):
        return bytes(parts)
    return b"".join(bytes(p) for p in parts)


class SharedCacheStore(CacheStore):
    """A CacheStore: kinds in SHARED_KINDS in the `kinship_cache` table, the rest in the diskcache directory."""

    def __init__(self, directory: Path | str, size_limit: int, database: Database) -> None:
        super().__init__(directory, size_limit)
        self.database = database

    @staticmethod
    def shared(key: str) -> bool:
        """Whether `key` lives in PostgreSQL."""
        return kind_of(key) in SHARED_KINDS

    def put(self, key: str, parts: Buffer | Sequence[Buffer]) -> int:
        if not self.shared(key):
            return super().put(key, parts)
        return self.put_many([(key, parts)])

    def put_many(self, items: Sequence[tuple[str, Buffer | Sequence[Buffer]]]) -> int:
        local = [(k, p) for k, p in items if not self.shared(k)]
        rows = [(k, kind_of(k), _joined(p)) for k, p in items if self.shared(k)]
        stored = super().put_many(local) if local else 0
        if rows:

            def work(conn: Connection) -> None:
                with conn.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO kinship_cache (key, kind, value) VALUES (%s, %s, %s) "
                        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
                        rows,
                    )

            self.database.run(work)
            for _key, kind, value in rows:
                metrics.CACHE_BYTES_WRITTEN.labels(kind).inc(len(value))
                stored += len(value)
        return stored

    def get(self, key: str) -> memoryview | None:
        if not self.shared(key):
            return super().get(key)
        row = self.database.run(lambda conn: conn.execute("SELECT value FROM kinship_cache WHERE key = %s", (key,)).fetchone())
        kind = kind_of(key)
        if row is None:
            metrics.CACHE_MISSES.labels(kind).inc()
            return None
        value = row[0]
        assert isinstance(value, bytes)
        metrics.CACHE_HITS.labels(kind).inc()
        metrics.CACHE_BYTES_READ.labels(kind).inc(len(value))
        return memoryview(bytearray(value))  # a private writable buffer, as CacheStore.get gives

    def contains(self, key: str) -> bool:
        if not self.shared(key):
            return super().contains(key)
        row = self.database.run(lambda conn: conn.execute("SELECT 1 FROM kinship_cache WHERE key = %s", (key,)).fetchone())
        return row is not None

    def delete(self, key: str) -> None:
        if not self.shared(key):
            super().delete(key)
            return
        self.database.run(lambda conn: conn.execute("DELETE FROM kinship_cache WHERE key = %s", (key,)))
