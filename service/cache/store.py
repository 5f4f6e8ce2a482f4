"""The on-disk cache: a diskcache store of integrity-checked byte values, LRU-evicted under a size limit.

Every value is stored as an envelope ``magic | payload length | SHA-256(payload) |
payload``; `get` re-hashes the payload and drops an entry whose digest or length is
wrong (a corrupted or truncated file), so a damaged entry is recomputed and never
served. Only bytes go in: the store refuses pickled values both ways, because
unpickling a tampered cache file would run code.

diskcache keeps its index in SQLite (WAL mode) and large values as files next to it,
so one directory can be shared by the threads of one server and by several server
processes, and survives restarts. Eviction is least-recently-used: automatic culling
on write is off (`cull_limit=0`) and every `put` culls explicitly, one entry at a time,
which lets us count evictions.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sqlite3
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import diskcache
from diskcache.core import MODE_PICKLE

from kinship_service.server import metrics

log = logging.getLogger("kinship.cache")

Buffer = bytes | bytearray | memoryview

MAGIC = b"KCv1"
_HEADER = struct.Struct("<4sQ32s")
HEADER_BYTES = _HEADER.size


class _BytesOnlyDisk(diskcache.Disk):  # type: ignore[misc]  # diskcache ships no type information
    """A diskcache Disk that never unpickles: a pickled value reads as missing."""

    def fetch(self, mode: int, filename: str | None, value: object, read: bool) -> object:
        if mode == MODE_PICKLE:
            raise OSError("pickled values are refused by the kinship cache")
        return super().fetch(mode, filename, value, read)


class _Envelope(io.RawIOBase):
    """A file-like view of header + parts, so large values are written without joining them in memory."""

    def __init__(self, header: bytes, parts: Sequence[memoryview]) -> None:
        super().__init__()
        self._parts: Iterator[memoryview] = iter([memoryview(header), *parts])
        self._current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while not len(self._current):
            nxt = next(self._parts, None)
            if nxt is None:
                return b""
            self._current = nxt
        if size is None or size < 0:
            size = len(self._current)
        out = self._current[:size]
        self._current = self._current[size:]
        return bytes(out)


def _as_bytes_view(part: Buffer) -> memoryview:
    view = memoryview(part)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def kind_of(key: str) -> str:
    """The metric label of a key: its first path component (`fp`, `delta`, `pair`, ...)."""
    return key.split("/", 1)[0]


class CacheStore:
    """Integrity-checked byte values in a diskcache directory, with LRU eviction under `size_limit` bytes."""

    def __init__(self, directory: Path | str, size_limit: int, *, timeout: float = 60.0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.size_limit = int(size_limit)
        self._cache = diskcache.Cache(
            str(self.directory),
            timeout=timeout,
            disk=_BytesOnlyDisk,
            size_limit=self.size_limit,
            eviction_policy="least-recently-used",
            cull_limit=0,
        )

    # -- writing ---------------------------------------------------------------------
    def put(self, key: str, parts: Buffer | Sequence[Buffer]) -> int:
        """Store the concatenation of `parts` under `key`; returns the bytes stored.

        Large values stream to a file in the cache directory without being joined in
        memory. Evicts least-recently-used entries afterwards to stay under the limit.
        """
        stored = self._put(key, parts)
        self.cull()
        return stored

    def put_many(self, items: Sequence[tuple[str, Buffer | Sequence[Buffer]]]) -> int:
        """Store several small values in one transaction (pair results); returns the bytes stored."""
        stored = 0
        with self._cache.transact(retry=True):
            for key, parts in items:
                stored += self._put(key, parts)
        self.cull()
        return stored

    def _put(self, key: str, parts: Buffer | Sequence[Buffer]) -> int:
        views = [_as_bytes_view(parts)] if isinstance(parts, (bytes, bytearray, memoryview)) else [_as_bytes_view(p) for p in parts]
        digest = hashlib.sha256()
        length = 0
        for view in views:
            digest.update(view)
            length += len(view)
        header = _HEADER.pack(MAGIC, length, digest.digest())
        if length + HEADER_BYTES < 32768:
            self._cache.set(key, header + b"".join(bytes(v) for v in views), retry=True)
        else:
            self._cache.set(key, _Envelope(header, views), read=True, retry=True)
        stored = length + HEADER_BYTES
        metrics.CACHE_BYTES_WRITTEN.labels(kind_of(key)).inc(stored)
        return stored

    def cull(self) -> int:
        """Evict least-recently-used entries until the store is under its size limit."""
        # diskcache's own cull() drops ten entries per step; evict one at a time instead so
        # a small cache keeps what fits. Reads the index directly (diskcache 5.6 schema).
        evicted = 0
        try:
            while self._cache.volume() > self.size_limit:
                rows = self._cache._sql("SELECT key, raw FROM Cache ORDER BY access_time LIMIT 1").fetchall()
                if not rows:
                    break
                db_key, raw = rows[0]
                if self._cache.delete(self._cache._disk.get(db_key, raw), retry=True):
                    evicted += 1
        except diskcache.Timeout:
            pass
        if evicted:
            metrics.CACHE_EVICTIONS.inc(evicted)
        return evicted

    # -- reading ---------------------------------------------------------------------
    def get(self, key: str) -> memoryview | None:
        """The payload stored under `key` (a view of a private writable buffer), or None when absent or damaged.

        A damaged entry (bad digest, wrong length) is dropped from the store.
        """
        kind = kind_of(key)
        try:
            value = self._cache.get(key, default=None, read=True, retry=True)
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            log.warning("cache read failed; treating it as a miss", extra={"key": key, "error": repr(exc)})
            value = None
        if value is None:
            metrics.CACHE_MISSES.labels(kind).inc()
            return None
        try:
            raw = bytearray(value) if isinstance(value, bytes) else _read_all(value)
        except OSError:
            metrics.CACHE_MISSES.labels(kind).inc()
            return None
        payload = self._verify(key, raw)
        if payload is None:
            metrics.CACHE_MISSES.labels(kind).inc()
            return None
        metrics.CACHE_HITS.labels(kind).inc()
        metrics.CACHE_BYTES_READ.labels(kind).inc(len(raw))
        return payload

    def _verify(self, key: str, raw: bytearray) -> memoryview | None:
        problem = None
        if len(raw) < HEADER_BYTES:
            problem = f"{len(raw)} bytes, shorter than the header"
        else:
            magic, length, digest = _HEADER.unpack_from(raw)
            payload = memoryview(raw)[HEADER_BYTES:]
            if magic != MAGIC:
                problem = "bad magic"
            elif len(payload) != length:
                problem = f"truncated: {len(payload)} of {length} payload bytes"
            elif hashlib.sha256(payload).digest() != digest:
                problem = "digest mismatch"
        if problem is None:
            return payload
        log.warning("dropping corrupt cache entry", extra={"key": key, "problem": problem})
        metrics.CACHE_CORRUPT.inc()
        self.delete(key)
        return None

    def contains(self, key: str) -> bool:
        """Whether `key` is present (without reading or verifying it, and without touching its LRU time)."""
        try:
            return key in self._cache
        except (sqlite3.Error, diskcache.Timeout):
            return False

    def delete(self, key: str) -> None:
        try:
            self._cache.delete(key, retry=True)
        except diskcache.Timeout:
            pass

    # -- housekeeping ----------------------------------------------------------------
    def volume(self) -> int:
        """Bytes on disk as diskcache counts them (values plus the SQLite database)."""
        return int(self._cache.volume())

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        self._cache.close()


def _read_all(handle: io.BufferedReader) -> bytearray:
    with handle:
        size = os.fstat(handle.fileno()).st_size
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = handle.readinto(view[got:])
            if not n:
                break
            got += n
        del view
        if got != size:
            del buffer[got:]
        return buffer
