"""The merge-job registry: one SQLite table of job records, shared by the server processes on one cache directory.

SQLite (stdlib `sqlite3`, WAL mode) rather than `diskcache.Index`: listing needs ordered,
filtered range queries (newest first, by state, resumable from a page token) and idempotency
needs a unique index on the request id checked atomically across processes; SQLite gives both in
one transaction and survives crashes (WAL, synchronous=FULL on every state change).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

from kinship_service.jobs.records import ACTIVE, JobRecord, page_query


class JobRegistry(Protocol):
    """What the job manager needs of a registry: this SQLite one, or PostgreSQL's (pg_store.py) across replicas."""

    def insert(self, record: JobRecord) -> JobRecord | None: ...
    def save(self, record: JobRecord) -> None: ...
    def get(self, job_id: str) -> JobRecord | None: ...
    def by_request_id(self, request_id: str) -> JobRecord | None: ...
    def page(self, before_seq: int | None, state: str | None, limit: int) -> list[tuple[int, JobRecord]]: ...
    def close(self) -> None: ...


class JobStore:
    """The SQLite table of jobs. One connection guarded by a lock (threads share it)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS jobs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                job_id TEXT NOT NULL UNIQUE,
                request_id TEXT NOT NULL,
                state TEXT NOT NULL,
                owner TEXT NOT NULL,
                heartbeat REAL NOT NULL,
                record TEXT NOT NULL
            );
            CREATE UNIQUE INDEX IF NOT EXISTS jobs_request_id ON jobs(request_id) WHERE request_id != '';
            CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs(state, seq);
            """
        )

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def insert(self, record: JobRecord) -> JobRecord | None:
        """Insert; on a request-id clash return the existing record instead."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO jobs(job_id, request_id, state, owner, heartbeat, record) VALUES (?, ?, ?, ?, ?, ?)",
                    (record.job_id, record.request_id, record.state, record.owner, time.time(), record.to_json()),
                )
                return None
            except sqlite3.IntegrityError:
                row = self._db.execute("SELECT record FROM jobs WHERE request_id = ?", (record.request_id,)).fetchone()
                if row is None:
                    raise
                return JobRecord.from_json(row[0])

    def save(self, record: JobRecord) -> None:
        """Write a job's new snapshot (and refresh its heartbeat)."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, heartbeat = ?, record = ? WHERE job_id = ?",
                (record.state, time.time(), record.to_json(), record.job_id),
            )

    def get(self, job_id: str) -> JobRecord | None:
        """The stored snapshot of a job, or None."""
        with self._lock:
            row = self._db.execute("SELECT record FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return JobRecord.from_json(row[0]) if row else None

    def by_request_id(self, request_id: str) -> JobRecord | None:
        """The job started with this request id, or None."""
        with self._lock:
            row = self._db.execute("SELECT record FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
        return JobRecord.from_json(row[0]) if row else None

    def page(self, before_seq: int | None, state: str | None, limit: int) -> list[tuple[int, JobRecord]]:
        """Up to `limit` jobs newest first, older than `before_seq`, optionally in one state, with their sequence numbers."""
        query, args = page_query("jobs", "?", before_seq, state, limit)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [(seq, JobRecord.from_json(text)) for seq, text in rows]

    def active_rows(self) -> list[tuple[str, float, JobRecord]]:
        """Every QUEUED or RUNNING job with its owner and last heartbeat (for recovery)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT owner, heartbeat, record FROM jobs WHERE state IN (?, ?)", ACTIVE
            ).fetchall()
        return [(owner, heartbeat, JobRecord.from_json(text)) for owner, heartbeat, text in rows]

    def heartbeat(self, owner: str) -> None:
        """Refresh the heartbeat of every active job `owner` holds."""
        with self._lock:
            self._db.execute("UPDATE jobs SET heartbeat = ? WHERE owner = ? AND state IN (?, ?)", (time.time(), owner, *ACTIVE))
